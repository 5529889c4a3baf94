"""2-process CPU (gloo) run of the losses in losses.py, for tests/test_losses.py.

Usage: python tests/ddp_losses_worker.py OUT_DIR
Spawns 2 processes. Each takes its half of a fixed global batch (`make_problem`), runs every loss
under DistributedDataParallel or with the centre all-reduce, and saves what it saw to
OUT_DIR/rank{r}.pt. The test then compares those numbers to one process on the whole batch.
Also runs the two "tempting alternatives" of the module docstring of losses.py, so the test can
show what they get wrong.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import losses  # noqa: E402

WORLD = 2
B, D_IN, E = 8, 5, 6          # global batch, input width, embedding width
K, N = 7, 5                   # prototypes, patches per image


class Toy(nn.Module):
    """Two linear "encoders" and the CLIP temperature/bias: enough to check every gradient path."""

    def __init__(self, with_bias: bool):
        super().__init__()
        self.img = nn.Linear(D_IN, E)
        self.txt = nn.Linear(D_IN, E)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))     # t = exp(2)
        # Only the sigmoid loss has a bias: a parameter without gradient would stall DDP's bucket.
        self.logit_bias = nn.Parameter(torch.tensor(-1.0)) if with_bias else None

    def forward(self, xi, xt):
        # Like CLIP.forward, everything the loss needs comes out of forward, so DDP sees it used.
        img, txt = F.normalize(self.img(xi), dim=-1), F.normalize(self.txt(xt), dim=-1)
        return img, txt, self.logit_scale.exp(), self.logit_bias


def make_model(with_bias: bool) -> Toy:
    """The same initial weights in every process and for both variants."""
    torch.manual_seed(0)
    return Toy(with_bias)


def make_problem():
    """The global batch, identical in every process (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    data = dict(
        xi=torch.randn(B, D_IN, generator=g), xt=torch.randn(B, D_IN, generator=g),
        # two steps of self-distillation logits: 2 global (teacher and student) + 3 local views
        teacher=[torch.randn(2, B, K, generator=g) * 3 for _ in range(2)],
        student=[torch.randn(5, B, K, generator=g) for _ in range(2)],
        # masked patch logits; masks with DIFFERENT counts per image and per rank
        m_student=torch.randn(B, N, K, generator=g), m_teacher=torch.randn(B, N, K, generator=g) * 3,
        m_mask=torch.rand(B, N, generator=g) < 0.5,
        # MLM logits and labels, also with different numbers of labelled positions per rank
        mlm_logits=torch.randn(B, 4, 11, generator=g),
        mlm_labels=torch.where(torch.rand(B, 4, generator=g) < 0.4,
                               torch.randint(11, (B, 4), generator=g), torch.full((B, 4), -100)),
    )
    data["xp"] = torch.randn(B, N, D_IN, generator=g)   # patches for patch_text_loss (drawn last: the rest unchanged)
    data["m_mask"][0, :] = True      # rank 0 gets more masked patches than rank 1
    data["mlm_labels"][1, :] = 3     # rank 0 gets more labelled tokens
    return data


def _plain_gather(x):
    """The tempting alternative (a): dist.all_gather (no autograd), local tensor put back."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def _global_clip(img, txt, t):
    """Full [B, B] softmax loss on already gathered features (the loss one process would compute)."""
    labels = torch.arange(img.shape[0])
    logits = t * img @ txt.T
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _local_clip_plain(img, txt, t):
    """Local loss, but with the non-differentiable gather."""
    rank, b = dist.get_rank(), img.shape[0]
    labels = torch.arange(b) + rank * b
    all_img, all_txt = _plain_gather(img), _plain_gather(txt)
    return (F.cross_entropy(t * img @ all_txt.T, labels) + F.cross_entropy(t * txt @ all_img.T, labels)) / 2


def ddp_grads(loss_fn, shard, with_bias):
    """One forward/backward of the DDP-wrapped toy model on this rank's shard -> (loss, grads)."""
    model = make_model(with_bias)
    ddp = nn.parallel.DistributedDataParallel(model)
    loss = loss_fn(*ddp(shard["xi"], shard["xt"]))
    loss.backward()                                       # DDP averages the gradients here
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def worker(rank, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}",
                            rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    data = make_problem()
    b = B // WORLD
    sl = slice(rank * b, (rank + 1) * b)
    shard = {"xi": data["xi"][sl], "xt": data["xt"][sl]}
    out = {}
    # 0. patch_text_loss: the toy's image encoder maps each of the N patches [b, N, D_IN] -> [b, N, E]
    patch_shard = {"xi": data["xp"][sl], "xt": data["xt"][sl]}
    for name, with_bias in (("patch_text", False), ("patch_text_sigmoid", True)):
        out[name + "_loss"], out[name + "_grads"] = ddp_grads(
            lambda p, t, s, bias: losses.patch_text_loss(p, t, s, bias), patch_shard, with_bias)

    # 0b. koleo_loss on the toy's unit image features; the text side and temperature enter with weight 0
    #     so that DDP sees every parameter used
    out["koleo_loss"], out["koleo_grads"] = ddp_grads(
        lambda i, t, s, bias: losses.koleo_loss(i) + 0.0 * (t.sum() + s), shard, with_bias=False)

    # 1. the contrastive losses, and the alternatives the docstring warns about
    cases = {
        "clip": lambda i, t, s, bias: losses.clip_loss(i, t, s),
        "siglip": lambda i, t, s, bias: losses.siglip_loss(i, t, s, bias),
        "alt_plain_local": lambda i, t, s, bias: _local_clip_plain(i, t, s),
        "alt_plain_global": lambda i, t, s, bias: _global_clip(_plain_gather(i), _plain_gather(t), s),
        "alt_grad_global": lambda i, t, s, bias: _global_clip(losses.gather_with_grad(i),
                                                              losses.gather_with_grad(t), s),
    }
    for name, fn in cases.items():
        out[name + "_loss"], out[name + "_grads"] = ddp_grads(fn, shard, with_bias=name == "siglip")

    # 2. local-to-global loss: two steps, so the centre is a running mean over two batches
    l2g = losses.LocalToGlobalLoss(K, student_temp=0.1, center_momentum=0.9)
    out["l2g_loss"], out["l2g_center"], out["l2g_grad"] = [], [], []
    for step in range(2):
        student = data["student"][step][:, sl].clone().requires_grad_(True)    # [5, b, K]
        loss = l2g(list(student), list(data["teacher"][step][:, sl]), teacher_temp=0.04)
        loss.backward()
        l2g.update_center(losses.center_stats(list(data["teacher"][step][:, sl])))
        out["l2g_loss"].append(loss.item())
        out["l2g_center"].append(l2g.center.clone())
        out["l2g_grad"].append(student.grad.clone())

    # 3. masked distillation loss (unequal masked counts per rank)
    md = losses.MaskedDistillLoss(K)
    s = data["m_student"][sl].clone().requires_grad_(True)
    loss = md(s, data["m_teacher"][sl], data["m_mask"][sl], teacher_temp=0.05)
    loss.backward()
    md.update_center(losses.center_stats(data["m_teacher"][sl]))
    out.update(md_loss=loss.item(), md_grad=s.grad.clone(), md_center=md.center.clone())

    # 4. MLM loss (unequal labelled counts per rank)
    lg = data["mlm_logits"][sl].clone().requires_grad_(True)
    loss = losses.mlm_loss(lg, data["mlm_labels"][sl])
    loss.backward()
    out.update(mlm_loss=loss.item(), mlm_grad=lg.grad.clone())

    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=WORLD, join=True)
