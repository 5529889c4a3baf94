"""Tests of losses.py, each against an independent computation (naive loops, formulas, hand-worked
values), plus one 2-process gloo run (tests/ddp_losses_worker.py) for the DDP claims."""
import doctest
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import losses
from losses import (DINOHead, LocalToGlobalLoss, MaskedDistillLoss, MaskedPatchDecoder,
                    TextMLMDecoder, clip_loss, mlm_loss, patch_text_loss, siglip_loss)
from masking import mlm_mask_tokens

PAD_ID, SOT_ID, EOT_ID, MASK_ID, VOCAB = 0, 1, 2, 3, 260       # the byte tokenizer's ids (data.py)
SPECIAL = (PAD_ID, SOT_ID, EOT_ID)

DT = torch.float64


# ---------------------------------------------------------------------------------------------
# Naive references: python loops over pairs, nothing shared with losses.py
# ---------------------------------------------------------------------------------------------

def naive_clip(img, txt, t):
    B = img.shape[0]
    total = 0.0
    for a, b in ((img, txt), (txt, img)):          # image->text rows, then text->image rows
        for i in range(B):
            logits = [t * (a[i] * b[j]).sum() for j in range(B)]
            total = total - (logits[i] - torch.log(sum(torch.exp(z) for z in logits)))
    return total / (2 * B)


def naive_siglip(img, txt, t, bias):
    B = img.shape[0]
    total = 0.0
    for i in range(B):
        for j in range(B):
            z = 1.0 if i == j else -1.0
            x = z * (t * (img[i] * txt[j]).sum() + bias)
            total = total + torch.log(1 + torch.exp(-x))          # -log sigmoid(x)
    return total / B


def naive_patch_text(patches, txt, t, bias=None):
    """Every patch p of image i: softmax over captions j of t * p.y_j with target i (bias None), or
    -log sigmoid(z_ij (t * p.y_j + bias)) summed over j; mean over all patches."""
    B, N, _ = patches.shape
    total = 0.0
    for i in range(B):
        for n in range(N):
            logits = [t * (patches[i, n] * txt[j]).sum() for j in range(B)]
            if bias is None:
                total = total - (logits[i] - torch.log(sum(torch.exp(z) for z in logits)))
            else:
                for j in range(B):
                    x = (1.0 if i == j else -1.0) * (logits[j] + bias)
                    total = total + torch.log(1 + torch.exp(-x))
    return total / (B * N)


def random_pairs(B=6, E=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(B, E, generator=g, dtype=DT), dim=-1).requires_grad_(True)
    txt = F.normalize(torch.randn(B, E, generator=g, dtype=DT), dim=-1).requires_grad_(True)
    return img, txt


def naive_soft_ce(t_row, s_row, center, tt, ts):
    """-sum_k softmax((t - c)/tt)[k] * log softmax(s/ts)[k] with python floats."""
    K = len(t_row)
    te = [math.exp((t_row[k] - center[k]) / tt) for k in range(K)]
    pt = [v / sum(te) for v in te]
    lse = math.log(sum(math.exp(s_row[k] / ts) for k in range(K)))
    return -sum(pt[k] * (s_row[k] / ts - lse) for k in range(K))


# ---------------------------------------------------------------------------------------------
# Contrastive losses
# ---------------------------------------------------------------------------------------------

def test_docstring_worked_examples():
    res = doctest.testmod(losses)
    assert res.attempted >= 3 and res.failed == 0
    e = torch.eye(2)
    by_hand = math.log(1 + math.exp(-1))                           # 0.3133 per row
    assert clip_loss(e, e, torch.tensor(1.0)).item() == pytest.approx(by_hand, abs=1e-6)
    assert siglip_loss(e, e, torch.tensor(1.0), torch.tensor(0.0)).item() == pytest.approx(
        (2 * by_hand + 2 * math.log(2)) / 2, abs=1e-6)
    e0, e1 = e[0], e[1]                                            # patch_text_loss: 3 right patches, 1 wrong
    p = torch.stack([torch.stack([e0, e1]), torch.stack([e1, e1])])
    assert patch_text_loss(p, e, torch.tensor(1.0)).item() == pytest.approx(
        (3 * by_hand + math.log(1 + math.e)) / 4, abs=1e-6)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_loss_and_gradients_match_naive_loop(kind):
    img, txt = random_pairs()
    t = torch.tensor(7.3, dtype=DT, requires_grad=True)
    b = torch.tensor(-2.1, dtype=DT, requires_grad=True)
    if kind == "clip":
        fast, slow, leaves = clip_loss(img, txt, t), naive_clip(img, txt, t), (img, txt, t)
    else:
        fast, slow, leaves = siglip_loss(img, txt, t, b), naive_siglip(img, txt, t, b), (img, txt, t, b)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-12)
    for gf, gs in zip(torch.autograd.grad(fast, leaves), torch.autograd.grad(slow, leaves)):
        torch.testing.assert_close(gf, gs, rtol=1e-10, atol=1e-12)


def test_losses_are_stable_where_naive_formulas_overflow():
    # positives anti-aligned at scale 1000: the exact loss is 1000 + log(1 + e^-1000) = 1000
    img = torch.eye(2)
    txt = -torch.eye(2)
    t = torch.tensor(1000.0)
    assert clip_loss(img, txt, t).item() == pytest.approx(1000.0, rel=1e-6)
    # sigmoid, one pair, logit -1000: -log sigmoid(-1000) = 1000 (log(1 + exp(1000)) overflows)
    assert siglip_loss(img[:1], txt[:1], t, torch.tensor(0.0)).item() == pytest.approx(1000.0, rel=1e-6)
    assert math.isinf(naive_siglip(img[:1], txt[:1], t, torch.tensor(0.0)).item())


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_patch_text_loss_and_gradients_match_naive_loop(kind):
    g = torch.Generator().manual_seed(3)
    patches = F.normalize(torch.randn(4, 3, 5, generator=g, dtype=DT), dim=-1).requires_grad_(True)
    _, txt = random_pairs(B=4)
    t = torch.tensor(4.2, dtype=DT, requires_grad=True)
    bias = torch.tensor(-1.3, dtype=DT, requires_grad=True) if kind == "sigmoid" else None
    leaves = (patches, txt, t) + ((bias,) if bias is not None else ())
    fast, slow = patch_text_loss(patches, txt, t, bias), naive_patch_text(patches, txt, t, bias)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-12)
    for gf, gs in zip(torch.autograd.grad(fast, leaves), torch.autograd.grad(slow, leaves)):
        torch.testing.assert_close(gf, gs, rtol=1e-10, atol=1e-12)
    # one patch per image equal to its image embedding: the softmax case is clip_loss's image->text half
    if kind == "softmax":
        img, txt = random_pairs()
        half = F.cross_entropy(t * img @ txt.T, torch.arange(6))
        assert patch_text_loss(img[:, None], txt, t).item() == pytest.approx(half.item(), rel=1e-12)


def test_patch_text_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"patches \[b, N, E\]"):
        patch_text_loss(torch.randn(4, 3), torch.randn(4, 3), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"patches \[b, N, E\]"):
        patch_text_loss(torch.randn(4, 2, 3), torch.randn(5, 3), torch.tensor(1.0))


def test_contrastive_bad_input_is_a_clear_error():
    img, txt = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(img, txt, torch.tensor(1.0))
    with pytest.raises(ValueError, match="logit bias"):
        siglip_loss(img[:4], img[:4], torch.tensor(1.0), None)


# ---------------------------------------------------------------------------------------------
# DDP: one 2-process gloo run, compared with one process on the whole batch
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_losses")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "ddp_losses_worker.py"), str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def single_process_grads(kind):
    """Gradient of the naive global-batch loss, one process, the same model and data."""
    import ddp_losses_worker as w
    data = w.make_problem()
    model = w.make_model(with_bias=kind == "siglip")
    img, txt, t, bias = model(data["xi"], data["xt"])
    loss = naive_clip(img, txt, t) if kind == "clip" else naive_siglip(img, txt, t, bias)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_ddp_gradient_equals_single_process_global_batch(ddp, kind):
    # The claim: DDP averages parameter gradients over ranks, and each rank's local loss is defined
    # so that mean_r grad(loss_r) == grad(global-batch loss). After backward every rank holds that
    # average, so each rank's gradient must equal the one-process gradient on the whole batch,
    # and the mean of the per-rank losses must equal the global loss.
    ref_loss, ref = single_process_grads(kind)
    assert (ddp[0][kind + "_loss"] + ddp[1][kind + "_loss"]) / 2 == pytest.approx(ref_loss, rel=1e-5)
    for rank in range(2):
        got = ddp[rank][kind + "_grads"]
        assert set(got) == set(ref)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["patch_text", "patch_text_sigmoid"])
def test_ddp_patch_text_gradient_equals_single_process_global_batch(ddp, kind):
    # The same claim for the per-patch loss: the captions are gathered with gradient, each rank scores
    # its own patches, and the mean over ranks is the naive loop on the whole batch.
    import ddp_losses_worker as w
    data = w.make_problem()
    model = w.make_model(with_bias=kind == "patch_text_sigmoid")
    patches, txt, t, bias = model(data["xp"], data["xt"])                # [B, N, E], [B, E]
    loss = naive_patch_text(patches, txt, t, bias)
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert (ddp[0][kind + "_loss"] + ddp[1][kind + "_loss"]) / 2 == pytest.approx(loss.item(), rel=1e-5)
    for rank in range(2):
        got = ddp[rank][kind + "_grads"]
        assert set(got) == set(ref)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6)


def naive_koleo(z):
    """-mean_i log min_{j != i} ||z_i - z_j||, by a double loop over rows (no eps)."""
    total = 0.0
    for i in range(z.shape[0]):
        total = total - torch.log(min((z[i] - z[j]).norm() for j in range(z.shape[0]) if j != i))
    return total / z.shape[0]


def test_koleo_hand_worked_square_and_naive_loop():
    # Four unit vectors at the corners of a square in the plane: each one's nearest neighbour is at
    # distance sqrt(2), so L = -log sqrt(2) = -0.5 log 2.
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    assert losses.koleo_loss(square).item() == pytest.approx(-0.5 * math.log(2), abs=1e-7)
    # Random unit rows in float64: value and gradient equal the double loop (the eps under the root
    # moves them by ~1e-8 relative at these distances).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    got, ref = losses.koleo_loss(F.normalize(x, dim=-1)), naive_koleo(F.normalize(ref_x, dim=-1))
    got.backward(), ref.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-7)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-6, atol=1e-9)
    # Two identical rows: a large but finite loss and gradient (eps), not inf / nan.
    twin = F.normalize(torch.tensor([[1.0, 2.0], [1.0, 2.0], [-3.0, 1.0]]), dim=-1).requires_grad_(True)
    loss = losses.koleo_loss(twin)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(twin.grad).all() and loss.item() > 5
    with pytest.raises(ValueError, match="two rows"):
        losses.koleo_loss(torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\[b, d\]"):
        losses.koleo_loss(torch.ones(2, 3, 4))


def test_ddp_koleo_equals_single_process_global_batch(ddp):
    # Each rank scores its own rows against the gathered batch: the mean over ranks is the
    # one-process loss, and DDP's averaged gradient is its gradient (nearest neighbours across ranks).
    import ddp_losses_worker as w
    data = w.make_problem()
    model = w.make_model(with_bias=False)
    img, _, _, _ = model(data["xi"], data["xt"])
    d = torch.cdist(img.detach(), img.detach()).fill_diagonal_(float("inf"))
    half = torch.arange(w.B) // (w.B // w.WORLD)
    assert (half[d.argmin(1)] != half).any()        # some nearest neighbours live on the other rank
    loss = naive_koleo(img)
    loss.backward()
    assert (ddp[0]["koleo_loss"] + ddp[1]["koleo_loss"]) / 2 == pytest.approx(loss.item(), rel=1e-5)
    for rank in range(2):
        got = ddp[rank]["koleo_grads"]
        for name in ("img.weight", "img.bias"):
            torch.testing.assert_close(got[name], model.get_parameter(name).grad, rtol=1e-4, atol=1e-6)
        assert got["txt.weight"].abs().max() == 0


def test_ddp_tempting_alternatives_behave_as_the_docstring_says(ddp):
    _, ref = single_process_grads("clip")
    enc = ["img.weight", "img.bias", "txt.weight", "txt.bias"]

    def rel_err(g, scale=1.0):
        return max(((g[n] - scale * ref[n]).norm() / ref[n].norm()).item() for n in enc)

    g = ddp[0]["alt_plain_local_grads"]          # plain all_gather + local loss: wrong direction
    assert rel_err(g) > 0.1 and rel_err(g, 0.5) > 0.1
    g = ddp[0]["alt_plain_global_grads"]         # plain all_gather + [B, B] loss: 1/W of the truth
    assert rel_err(g, 0.5) < 1e-4
    torch.testing.assert_close(g["logit_scale"], ref["logit_scale"], rtol=1e-4, atol=1e-6)
    g = ddp[0]["alt_grad_global_grads"]          # gather with grad + [B, B] loss: right (but O(B^2))
    assert rel_err(g) < 1e-4


def test_teacher_entropy_per_image_and_of_the_batch_by_hand():
    """losses.teacher_entropy against a hand-worked case, K = 2, tau = 1, centre (0, log 3):
    row (0, log 3) centres to (0, 0): P = (1/2, 1/2), H = log 2; row (log 3, log 3) centres to
    (log 3, 0): P = (3/4, 1/4), H = log 4 - (3/4) log 3. The batch mean is (5/8, 3/8)."""
    l3 = math.log(3)
    t = torch.tensor([[0.0, l3], [l3, l3]], dtype=torch.float64)
    center = torch.tensor([[0.0, l3]], dtype=torch.float64)
    per_row, batch = losses.teacher_entropy([t[:1], t[1:]], center, 1.0)    # a list of views, as train.py
    assert per_row.item() == pytest.approx((math.log(2) + math.log(4) - 0.75 * l3) / 2, rel=1e-6)
    assert batch.item() == pytest.approx(-(5 / 8) * math.log(5 / 8) - (3 / 8) * math.log(3 / 8), rel=1e-6)
    # the two collapses: every row alike gives both entropies equal (uniform when t = c)
    same = torch.zeros(5, 4)
    u, b = losses.teacher_entropy([same], torch.zeros(1, 4), 0.04)
    assert u.item() == pytest.approx(math.log(4), rel=1e-6) and b.item() == pytest.approx(math.log(4), rel=1e-6)
    # rows sharp on different prototypes: each row ~0 nats, the batch log 2 (two prototypes used)
    sharp = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    u, b = losses.teacher_entropy([sharp], torch.zeros(1, 2), 0.01)
    assert u.item() < 1e-6 and b.item() == pytest.approx(math.log(2), rel=1e-6)


def naive_l2g(student, teacher, center, tt, ts):
    """Mean over (q, v != q) of the batch-mean soft cross-entropy, python floats."""
    terms = []
    for q in range(len(teacher)):
        for v in range(len(student)):
            if v == q:
                continue
            B = len(teacher[q])
            terms.append(sum(naive_soft_ce(teacher[q][i], student[v][i], center, tt, ts)
                             for i in range(B)) / B)
    return sum(terms) / len(terms), len(terms)


def test_ddp_local_to_global_centre_and_loss(ddp):
    import ddp_losses_worker as w
    data = w.make_problem()
    center = torch.zeros(w.K, dtype=DT)
    for step in range(2):
        teacher, student = data["teacher"][step].to(DT), data["student"][step].to(DT).requires_grad_(True)
        # loss and gradient, one process, global batch; the centre used is the one before this step
        loss = LocalToGlobalLoss(w.K)
        loss.center.copy_(center)
        value = loss(list(student), list(teacher), teacher_temp=0.04)
        value.backward()
        assert (ddp[0]["l2g_loss"][step] + ddp[1]["l2g_loss"][step]) / 2 == pytest.approx(value.item(), rel=1e-5)
        for rank in range(2):
            sl = slice(rank * w.B // 2, (rank + 1) * w.B // 2)
            # DDP would average the two ranks' gradients: the per-rank gradient / 2 is the global one
            torch.testing.assert_close(ddp[rank]["l2g_grad"][step].to(DT) / 2, student.grad[:, sl],
                                       rtol=1e-4, atol=1e-7)
        # running mean over the GLOBAL batch and both teacher views
        center = 0.9 * center + 0.1 * teacher.reshape(-1, w.K).mean(0)
        for rank in range(2):
            torch.testing.assert_close(ddp[rank]["l2g_center"][step].flatten().to(DT), center,
                                       rtol=1e-5, atol=1e-6)
    assert torch.equal(ddp[0]["l2g_center"][1], ddp[1]["l2g_center"][1])


def test_ddp_masked_distill_and_mlm_equal_single_process(ddp):
    import ddp_losses_worker as w
    data = w.make_problem()
    mask = data["m_mask"]
    assert mask[:4].sum() != mask[4:].sum()          # the ranks really hold different counts
    # masked distillation, one process on the whole batch
    s = data["m_student"].clone().requires_grad_(True)
    md = MaskedDistillLoss(w.K)
    value = md(s, data["m_teacher"], mask, teacher_temp=0.05)
    value.backward()
    md.update_center(losses.center_stats(data["m_teacher"]))
    assert (ddp[0]["md_loss"] + ddp[1]["md_loss"]) / 2 == pytest.approx(value.item(), rel=1e-5)
    for rank in range(2):
        sl = slice(rank * 4, (rank + 1) * 4)
        torch.testing.assert_close(ddp[rank]["md_grad"] / 2, s.grad[sl], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(ddp[rank]["md_center"], md.center, rtol=1e-5, atol=1e-6)
    # MLM, one process
    lg = data["mlm_logits"].clone().requires_grad_(True)
    value = mlm_loss(lg, data["mlm_labels"])
    value.backward()
    assert (ddp[0]["mlm_loss"] + ddp[1]["mlm_loss"]) / 2 == pytest.approx(value.item(), rel=1e-5)
    for rank in range(2):
        sl = slice(rank * 4, (rank + 1) * 4)
        torch.testing.assert_close(ddp[rank]["mlm_grad"] / 2, lg.grad[sl], rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Head and local-to-global loss, one process
# ---------------------------------------------------------------------------------------------

def test_dino_head_is_cosine_to_unit_prototypes():
    torch.manual_seed(0)
    head = DINOHead(in_dim=8, hidden_dim=16, bottleneck_dim=4, out_dim=10, nlayers=3)
    x = torch.randn(3, 5, 8)
    out = head(x)
    assert out.shape == (3, 5, 10)
    # independent: cosine between the MLP output and each prototype row
    z = head.mlp(x)
    for k in range(10):
        cos = F.cosine_similarity(z, head.last_layer.weight[k].expand_as(z), dim=-1)
        torch.testing.assert_close(out[..., k], cos, rtol=1e-5, atol=1e-6)
    # only the prototypes' directions matter
    with torch.no_grad():
        head.last_layer.weight.mul_(torch.rand(10, 1) * 5 + 0.1)
    torch.testing.assert_close(head(x), out, rtol=1e-5, atol=1e-6)
    assert len([m for m in head.mlp if isinstance(m, torch.nn.Linear)]) == 3
    assert len([m for m in DINOHead(8, 16, 4, 10, nlayers=1).mlp]) == 1


def test_cancel_last_layer_grad_freezes_prototypes_only():
    torch.manual_seed(0)
    head = DINOHead(8, 16, 4, 10)
    opt = torch.optim.AdamW(head.parameters(), lr=0.1)
    before_last = head.last_layer.weight.detach().clone()
    before_mlp = head.mlp[0].weight.detach().clone()
    head(torch.randn(4, 8)).pow(2).sum().backward()
    assert head.last_layer.weight.grad is not None
    head.cancel_last_layer_grad()
    opt.step()
    assert torch.equal(head.last_layer.weight, before_last)
    assert not torch.equal(head.mlp[0].weight, before_mlp)


def test_local_to_global_equals_naive_double_loop_and_centre_formula():
    g = torch.Generator().manual_seed(1)
    B, K = 3, 5
    student = [torch.randn(B, K, generator=g, dtype=DT) for _ in range(6)]   # 2 global + 4 local
    teacher = [torch.randn(B, K, generator=g, dtype=DT) * 2 for _ in range(2)]
    loss = LocalToGlobalLoss(K, student_temp=0.1, center_momentum=0.9).to(DT)
    c0 = torch.randn(1, K, generator=g, dtype=DT)
    loss.center.copy_(c0)
    value = loss(student, teacher, teacher_temp=0.05)
    expected, n_pairs = naive_l2g([s.tolist() for s in student], [t.tolist() for t in teacher],
                                  c0[0].tolist(), 0.05, 0.1)
    assert n_pairs == 2 * 6 - 2
    assert value.item() == pytest.approx(expected, rel=1e-10)
    # the loss itself leaves the centre alone (the training loop updates it once per step) ...
    assert torch.equal(loss.center, c0)
    # ... with c <- 0.9 c0 + 0.1 * mean over both views and the batch
    loss.update_center(losses.center_stats(teacher))
    mean = sum(t.sum(0) for t in teacher) / (2 * B)
    torch.testing.assert_close(loss.center.double(), 0.9 * c0 + 0.1 * mean)
    assert loss.center.dtype == DT
    # stats of two halves add up to the stats of the whole
    halves = losses.center_stats([t[:1] for t in teacher]) + losses.center_stats([t[1:] for t in teacher])
    torch.testing.assert_close(halves, losses.center_stats(teacher))


def test_local_to_global_pair_count_and_stop_gradient():
    """DINO's 2 global x 10 views: the loss is the mean of exactly the 18 pairs (q, v) with v != q,
    written out one by one here; the teacher side gets no gradient, and each student view's gradient
    is its own terms' (a global view appears in 1 pair as a student, a local view in 2)."""
    g = torch.Generator().manual_seed(7)
    B, K = 2, 4
    student = [torch.randn(B, K, generator=g, dtype=DT, requires_grad=True) for _ in range(10)]
    teacher = [torch.randn(B, K, generator=g, dtype=DT, requires_grad=True) for _ in range(2)]
    loss = LocalToGlobalLoss(K)
    value = loss(student, teacher, teacher_temp=0.04)
    pairs = [(0, v) for v in range(1, 10)] + [(1, 0)] + [(1, v) for v in range(2, 10)]
    assert len(pairs) == 18
    terms = [sum(naive_soft_ce(teacher[q][i].tolist(), student[v][i].tolist(), [0.0] * K, 0.04, 0.1)
                 for i in range(B)) / B for q, v in pairs]
    assert value.item() == pytest.approx(sum(terms) / 18, rel=1e-10)
    value.backward()
    assert all(t.grad is None for t in teacher)
    # d/ds of H(p_t, softmax(s / tau)) = (softmax(s / tau) - p_t) / tau, per row, summed over the
    # teachers that student view v is paired with, / (18 * B)
    for v, s in enumerate(student):
        want = torch.zeros(B, K, dtype=DT)
        for q, t in enumerate(teacher):
            if q != v:
                want += (F.softmax(s.detach() / 0.1, -1) - F.softmax(t.detach() / 0.04, -1)) / 0.1
        torch.testing.assert_close(s.grad, want / (18 * B))
    with pytest.raises(ValueError):
        loss([student[0]], [teacher[0]], teacher_temp=0.04)


# ---------------------------------------------------------------------------------------------
# Masked distillation and its decoder
# ---------------------------------------------------------------------------------------------

def test_masked_distill_equals_naive_per_patch_loop_and_ignores_visible_patches():
    g = torch.Generator().manual_seed(2)
    B, N, K = 2, 6, 5
    s = torch.randn(B, N, K, generator=g, dtype=DT, requires_grad=True)
    t = torch.randn(B, N, K, generator=g, dtype=DT) * 2
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    loss = MaskedDistillLoss(K).to(DT)
    c0 = torch.randn(1, K, generator=g, dtype=DT)
    loss.center.copy_(c0)
    value = loss(s, t, mask, teacher_temp=0.06)
    terms = [naive_soft_ce(t[b, n].tolist(), s[b, n].tolist(), c0[0].tolist(), 0.06, 0.1)
             for b in range(B) for n in range(N) if mask[b, n]]
    assert value.item() == pytest.approx(sum(terms) / len(terms), rel=1e-10)
    # an explicit count (the step's, under gradient accumulation) is the denominator instead
    assert loss(s, t, mask, 0.06, count=torch.tensor(10)).item() == pytest.approx(sum(terms) / 10, rel=1e-10)
    # patch centre: mean over ALL patches of the batch, once the loop calls update_center
    assert torch.equal(loss.center, c0)
    loss.update_center(losses.center_stats(t))
    torch.testing.assert_close(loss.center, 0.9 * c0 + 0.1 * t.reshape(-1, K).mean(0))
    # visible patches: zero gradient, and changing them changes nothing
    value.backward()
    assert (s.grad[~mask] == 0).all() and (s.grad[mask].abs().sum(-1) > 0).all()
    loss.center.copy_(c0)
    s2 = s.detach().clone()
    s2[~mask] = torch.randn(int((~mask).sum()), K, dtype=DT) * 100
    assert loss(s2, t, mask, teacher_temp=0.06).item() == pytest.approx(value.item(), rel=1e-12)


def test_masked_distill_with_a_given_count_is_bit_identical():
    """num_masked switches boolean indexing to a static-shape gather: same rows, same order, so
    the same loss, centre and gradient bit for bit (the naive loop above checks the value itself)."""
    from masking import random_mask
    g = torch.Generator().manual_seed(5)
    B, N, K = 3, 64, 7                      # N > 16: a non-stable sort would reorder rows here
    t = torch.randn(B, N, K, generator=g)
    mask = random_mask(B, N, 0.75, generator=g)
    results = []
    for kw in ({}, {"num_masked": 48}):
        s = torch.randn(B, N, K, generator=torch.Generator().manual_seed(6), requires_grad=True)
        loss = MaskedDistillLoss(K)
        value = loss(s, t, mask, teacher_temp=0.04, **kw)
        value.backward()
        results.append((value.detach(), s.grad))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    with pytest.raises(ValueError, match="num_masked=47"):
        MaskedDistillLoss(K)(s, t, mask, teacher_temp=0.04, num_masked=47)


def test_masked_distill_bad_input():
    loss = MaskedDistillLoss(4)
    with pytest.raises(ValueError, match="bool mask"):
        loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3), 0.04)
    with pytest.raises(ValueError, match="same shape"):
        loss(torch.randn(2, 3, 4), torch.randn(2, 4, 4), torch.ones(2, 3, dtype=torch.bool), 0.04)


def test_patch_decoder_places_tokens_by_hand():
    # with no Blocks, the output is LayerNorm of the assembled sequence, which we can build by hand
    torch.manual_seed(0)
    B, N, D = 2, 6, 8
    dec = MaskedPatchDecoder(D, num_heads=2, num_layers=0)
    with torch.no_grad():
        dec.mask_token.normal_()
    pos = torch.randn(1 + N, D)
    mask = torch.tensor([[1, 0, 0, 1, 0, 1], [0, 1, 1, 0, 0, 1]], dtype=torch.bool)
    full = torch.randn(B, 1 + N, D)                                  # a token-mode encoder output
    visible = torch.stack([torch.cat([full[b, :1], full[b, 1:][~mask[b]]]) for b in range(B)])
    out_drop = dec(visible, mask, pos)
    out_token = dec(full, mask, pos)
    ln = dec.ln
    for b in range(B):
        for n in range(N):
            if mask[b, n]:
                want_drop = ln(dec.mask_token + pos[1 + n])
                want_token = ln(full[b, 1 + n] + dec.mask_token)
            else:
                want_drop = want_token = ln(full[b, 1 + n])
            torch.testing.assert_close(out_drop[b, n], want_drop)
            torch.testing.assert_close(out_token[b, n], want_token)
    with pytest.raises(ValueError, match="patch tokens"):
        dec(full[:, :3], mask, pos)                                  # 2 patch tokens: neither mode


def test_patch_decoder_scatter_equals_boolean_index_put_bit_for_bit():
    """Drop mode puts the visible tokens back with a static-shape scatter; the code before it used
    x[~mask] = patches (index_put). Same output and gradients, bit for bit."""
    torch.manual_seed(1)
    B, N, D = 3, 64, 16
    dec = MaskedPatchDecoder(D, num_heads=2, num_layers=1)
    with torch.no_grad():
        dec.mask_token.normal_()
    pos = torch.randn(1 + N, D, requires_grad=True)
    from masking import random_mask
    mask = random_mask(B, N, 0.75, generator=torch.Generator().manual_seed(4))
    tokens = torch.randn(B, 1 + 16, D, requires_grad=True)

    def reference(tokens):
        x = (dec.mask_token + pos[1:]).expand(B, N, D).clone()
        x[~mask] = tokens[:, 1:].reshape(B * 16, D)
        x = torch.cat([tokens[:, :1], x], dim=1)
        for blk in dec.blocks:
            x = blk(x)
        return dec.ln(x[:, 1:])

    outs, grads = [], []
    for fn in (reference, lambda tok: dec(tok, mask, pos)):
        for p in [*dec.parameters(), pos, tokens]:
            p.grad = None
        out = fn(tokens)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in [*dec.parameters(), pos, tokens]])
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_masked_branch_gradients_reach_student_not_teacher():
    from clip import CLIPConfig, VisionTransformer
    from ema import make_teacher
    from masking import random_mask
    torch.manual_seed(0)
    cfg = CLIPConfig(image_size=16, patch_size=4, stem="linear", vision_width=16, vision_layers=1,
                     vision_heads=2, text_width=16, text_layers=1, text_heads=2, embed_dim=8)
    student = torch.nn.ModuleDict(dict(visual=VisionTransformer(cfg), head=DINOHead(16, 16, 8, 12)))
    decoder = MaskedPatchDecoder(16, num_heads=2, num_layers=1)
    teacher = make_teacher(student)
    images = torch.randn(3, 3, 16, 16)
    mask = random_mask(3, 16, 0.75, generator=torch.Generator().manual_seed(0))
    for mode in ("drop", "token"):
        for p in [*student.parameters(), *decoder.parameters()]:
            p.grad = None
        with torch.no_grad():
            t_logits = teacher["head"](teacher["visual"](images)[1][:, 1:])          # [3, 16, 12]
        _, tok = student["visual"](images, mask=mask, mask_mode=mode)
        pred = decoder(tok, mask, student["visual"])                               # [3, 16, 16]
        loss = MaskedDistillLoss(12)(student["head"](pred), t_logits, mask, teacher_temp=0.04)
        loss.backward()
        assert t_logits.requires_grad is False
        for name, p in [*student.named_parameters(), *decoder.named_parameters()]:
            if name in ("visual.proj.weight",):                  # the pooled projection is not used here
                continue
            if mode == "drop" and name == "visual.mask_token":   # no mask token in the encoder
                continue
            assert p.grad is not None and p.grad.abs().sum() > 0, (mode, name)
        assert all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------------------------------------
# Masked language modelling
# ---------------------------------------------------------------------------------------------

def random_captions(n, L=40, seed=0):
    """SOT, 5..L-2 byte tokens (ids 4..259), EOT, then PAD: like data.ByteTokenizer's output."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, L, dtype=torch.long)
    lengths = torch.randint(5, L - 1, (n,), generator=g)
    for i, m in enumerate(lengths.tolist()):
        tokens[i, 0] = SOT_ID
        tokens[i, 1:m - 1] = torch.randint(4, 260, (m - 2,), generator=g)
        tokens[i, m - 1] = EOT_ID
    return tokens


def test_mlm_masking_80_10_10_within_binomial_bounds_and_never_special():
    tokens = random_captions(3000)
    inputs, labels = mlm_mask_tokens(tokens, VOCAB, MASK_ID, SPECIAL, mask_prob=0.2, generator=torch.Generator().manual_seed(0))
    special = (tokens == PAD_ID) | (tokens == SOT_ID) | (tokens == EOT_ID)
    # special tokens: never selected, never changed
    assert (labels[special] == -100).all() and torch.equal(inputs[special], tokens[special])
    # unselected tokens are untouched; labels are the original ids where selected
    sel = labels != -100
    assert torch.equal(inputs[~sel], tokens[~sel]) and torch.equal(labels[sel], tokens[sel])

    def within(k, n, p):  # |k - np| < 5 sigma of a binomial
        return abs(k - n * p) < 5 * math.sqrt(n * p * (1 - p))

    n_ord, n_sel = int((~special).sum()), int(sel.sum())
    assert within(n_sel, n_ord, 0.2)
    became_mask = int((inputs[sel] == MASK_ID).sum())
    changed = int(((inputs[sel] != MASK_ID) & (inputs[sel] != tokens[sel])).sum())
    kept = n_sel - became_mask - changed
    n_ordinary_ids = 260 - 4          # random replacements come from the 256 byte ids
    assert within(became_mask, n_sel, 0.8)
    # a random replacement equals the original with probability 1/256: counted as "kept"
    assert within(changed, n_sel, 0.1 * (1 - 1 / n_ordinary_ids))
    assert within(kept, n_sel, 0.1 + 0.1 / n_ordinary_ids)
    # random replacements are ordinary byte ids, never special tokens
    assert (inputs[sel & (inputs != MASK_ID)] >= 4).all()
    # the generator makes it reproducible
    again = mlm_mask_tokens(tokens, VOCAB, MASK_ID, SPECIAL, mask_prob=0.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)


def test_mlm_loss_counts_labelled_positions_only():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 7, generator=g, dtype=DT, requires_grad=True)
    labels = torch.tensor([[-100, 3, -100, 6, -100], [0, -100, -100, -100, 2]])
    value = mlm_loss(logits, labels)
    terms = []
    for b in range(2):
        for i in range(5):
            if labels[b, i] != -100:
                row = logits[b, i].tolist()
                terms.append(math.log(sum(math.exp(z) for z in row)) - row[labels[b, i]])
    assert value.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    value.backward()
    assert (logits.grad[labels == -100] == 0).all()
    assert mlm_loss(logits, torch.full((2, 5), -100)).item() == 0.0


def test_text_decoder_is_bidirectional_and_ignores_padding():
    torch.manual_seed(0)
    dec = TextMLMDecoder(width=16, num_heads=2, vocab_size=30, pad_id=0, num_layers=2)
    tokens = torch.tensor([[1, 7, 8, 9, 2, 0, 0]])
    feats = torch.randn(1, 7, 16)
    out = dec(feats, tokens)
    assert out.shape == (1, 7, 30)
    later = feats.clone()
    later[0, 3] = torch.randn(16)               # a change AFTER position 1 ...
    assert not torch.allclose(dec(later, tokens)[0, 1], out[0, 1])   # ... reaches position 1
    pad = feats.clone()
    pad[0, 5:] = torch.randn(2, 16) * 10       # padding features are never attended to
    torch.testing.assert_close(dec(pad, tokens)[0, :5], out[0, :5])


# ---------------------------------------------------------------------------------------------
# bf16 autocast: what every GPU run does. Each loss against its float64 naive reference, within a
# bound derived from where bf16 rounding enters (CPU autocast to bf16 runs the same casts).
# ---------------------------------------------------------------------------------------------
U_BF16 = 2.0 ** -8          # unit roundoff of bfloat16 (8 significant bits): |bf16(x) - x| <= u |x|
U_FP32 = 2.0 ** -24


def bf16_pairs(B=32, E=64, seed=0):
    """Normalised features as the towers emit them under autocast (bf16), and the exact float64
    values of those bf16 numbers (the reference works on the same inputs)."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(B, E, generator=g, dtype=DT), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(B, E, generator=g, dtype=DT), dim=-1)
    img, txt = img.bfloat16(), txt.bfloat16()
    return img, txt, img.double(), txt.double()


@pytest.mark.parametrize("t", [14.3, 100.0])
def test_contrastive_losses_under_bf16_autocast(t):
    """The only bf16 arithmetic inside the losses is the cosine matmul: each cosine is rounded once,
    so logit (i, j) moves by at most d_ij = t (u |cos_ij| + E 2^-24). A loss moves, to first order, by
    its sensitivities times d, plus a second-order remainder:
      CLIP:   per row, sum_j |p_j - y_j| d_j + max_j d_j^2 / 2   (softmax p, one-hot y)
      SigLIP: per pair, sigmoid(-z l) d + d^2 / 8.
    The value must also come out in float32 (a bf16 reduction of the loss would not)."""
    img, txt, img64, txt64 = bf16_pairs()
    B, E = img.shape
    cos = img64 @ txt64.T
    d = t * (U_BF16 * cos.abs() + E * U_FP32)                                  # [B, B]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_clip = clip_loss(img, txt, torch.tensor(t))
        got_sig = siglip_loss(img, txt, torch.tensor(t), torch.tensor(-10.0))
    assert got_clip.dtype == torch.float32 and got_sig.dtype == torch.float32
    ref_clip = naive_clip(img64, txt64, torch.tensor(t, dtype=DT)).item()
    ref_sig = naive_siglip(img64, txt64, torch.tensor(t, dtype=DT), torch.tensor(-10.0, dtype=DT)).item()
    bound = 0.0
    for logits, dd in ((t * cos, d), (t * cos.T, d.T)):
        p = logits.softmax(-1)
        sens = (p - torch.eye(B, dtype=DT)).abs()
        bound += ((sens * dd).sum(-1) + dd.max(-1).values ** 2 / 2).sum() / (2 * B)
    assert abs(got_clip.item() - ref_clip) <= bound + 1e-6 * ref_clip, (got_clip.item(), ref_clip, bound)
    z = 2 * torch.eye(B, dtype=DT) - 1
    bound = (torch.sigmoid(-z * (t * cos - 10)) * d + d ** 2 / 8).sum() / B
    assert abs(got_sig.item() - ref_sig) <= bound + 1e-6 * ref_sig, (got_sig.item(), ref_sig, bound)


def test_distillation_losses_under_bf16_autocast_reduce_in_float32_and_keep_float32_centres():
    """The self-distillation losses upcast their bf16 logits before any arithmetic, so on bf16 inputs
    they equal the float64 naive loops on the same numbers to float32 precision (rel 1e-5; a bf16
    softmax would be off by ~u |logit| / tau, about 0.04 here). The centres stay float32."""
    g = torch.Generator().manual_seed(4)
    B, K, N = 3, 6, 5
    student = [(torch.randn(B, K, generator=g) * 0.5).bfloat16() for _ in range(4)]
    teacher = [(torch.randn(B, K, generator=g) * 0.5).bfloat16() for _ in range(2)]
    l2g = LocalToGlobalLoss(K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = l2g(student, teacher, teacher_temp=0.04)
        l2g.update_center(losses.center_stats(teacher))
    expected, _ = naive_l2g([s.double().tolist() for s in student], [t.double().tolist() for t in teacher],
                            [0.0] * K, 0.04, 0.1)
    assert value.dtype == torch.float32 and value.item() == pytest.approx(expected, rel=1e-5)
    assert l2g.center.dtype == torch.float32
    torch.testing.assert_close(l2g.center[0].double(), 0.1 * torch.cat(teacher).double().mean(0),
                               rtol=1e-6, atol=1e-7)
    s, t = torch.randn(B, N, K, generator=g).bfloat16(), torch.randn(B, N, K, generator=g).bfloat16()
    mask = torch.rand(B, N, generator=g) < 0.5
    md = MaskedDistillLoss(K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = md(s, t, mask, teacher_temp=0.06)
        md.update_center(losses.center_stats(t))
    terms = [naive_soft_ce(t[b, n].double().tolist(), s[b, n].double().tolist(), [0.0] * K, 0.06, 0.1)
             for b in range(B) for n in range(N) if mask[b, n]]
    assert value.dtype == torch.float32 and value.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert md.center.dtype == torch.float32
    logits, labels = torch.randn(B, N, K, generator=g).bfloat16(), torch.randint(K, (B, N), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = mlm_loss(logits, labels)
    rows = logits.double().flatten(0, 1).tolist()
    naive = sum(math.log(sum(math.exp(z) for z in r)) - r[y] for r, y in zip(rows, labels.flatten().tolist()))
    assert value.dtype == torch.float32 and value.item() == pytest.approx(naive / len(rows), rel=1e-5)
