"""The EMA teacher: an exponential moving average of the student's weights.

SILC (Naeem et al. 2023, arXiv 2310.13355) and MaskCLIP (Dong et al. 2022, arXiv 2208.12262)
distil the student into targets made by a "mean teacher", as DINO (Caron et al. 2021) does. The
teacher is a copy of the student IMAGE encoder and its projection head(s) (the text tower has no
teacher). It is never trained by gradient: after every optimizer step
    theta_t <- m * theta_t + (1 - m) * theta_s          (every parameter)
    buffer_t <- buffer_s                                (buffers are copied, not averaged)
so it is a smoothed, slowly moving version of the student and gives stable targets.
1 / (1 - m) is roughly how many recent steps the average spans.

Momentum. DINO raises m along a cosine from 0.996 to 1 (the teacher freezes at the end). SILC
reports that "the momentum scheduler of the EMA should not converge to 1.0" and keeps m FIXED,
without publishing the value. The fixed value should let the teacher span a small fraction of the
run: 0.996 (a ~250-step average, DINO's starting value) suits runs of tens of thousands of steps;
for the short CPU runs of this repo (~1-2k steps) 0.99 (~100 steps, under 10% of the run) keeps
the teacher from lagging far behind a student that is still changing quickly. train.py's
schedules give both: fixed by default, DINO's cosine on request (--momentum_schedule=cosine).

Wrappers. The student may be wrapped by DistributedDataParallel (`.module`) and/or torch.compile
(`._orig_mod`); the EMA always reads the raw module underneath, so parameter names match and no
wrapper state is copied. The teacher holds no gradients (requires_grad False, .grad None) and is
never given to an optimizer.

What the teacher sees: only full images or global crops, under no_grad (DINO's stop-gradient); its
heads' logits become the distillation targets (`teacher_forward`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


def unwrap_model(module: nn.Module) -> nn.Module:
    """Peel DDP (.module) and torch.compile (._orig_mod) wrappers, in any order and nesting."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            module = module._orig_mod
        else:
            return module


def make_teacher(module: nn.Module) -> nn.Module:
    """A deep copy of the (unwrapped) student modules, frozen: requires_grad False, no .grad,
    eval mode (the ViT has no dropout or batch norm, so this only states the intent)."""
    teacher = copy.deepcopy(unwrap_model(module))
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.grad = None                     # never carry gradients (whatever deepcopy keeps)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta_s for every parameter; buffers copied.

    teacher and student must hold the same parameter and buffer names once unwrapped (a clear
    ValueError names the first difference). momentum = 0 makes the teacher an exact copy of the
    student (SigLIP 2 initialises the teacher this way when distillation switches on).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    t_named = dict(unwrap_model(teacher).named_parameters())
    s_named = dict(unwrap_model(student).named_parameters())
    if t_named.keys() != s_named.keys():
        diff = sorted(t_named.keys() ^ s_named.keys())
        raise ValueError(f"teacher and student parameters differ, e.g. {diff[:3]}: build the teacher "
                         f"with make_teacher(student) from the same modules")
    names = list(t_named)
    t_params = [t_named[n] for n in names]
    s_params = [s_named[n].detach() for n in names]
    # One fused kernel per op over the whole list instead of a Python loop over tensors.
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)

    t_bufs = dict(unwrap_model(teacher).named_buffers())
    s_bufs = dict(unwrap_model(student).named_buffers())
    if t_bufs.keys() != s_bufs.keys():
        raise ValueError(f"teacher and student buffers differ: {sorted(t_bufs.keys() ^ s_bufs.keys())[:3]}")
    for n, buf in t_bufs.items():
        buf.copy_(s_bufs[n])


@torch.no_grad()
def teacher_forward(teacher: nn.Module, batch: dict, use_sd: bool, use_mask: bool) -> dict:
    """The teacher's targets for a batch (see data.collate): it sees the global crops (or the plain
    images), never the local ones.
      "global": SILC's pooled targets, a list over global views of head logits [b, K];
      "patch":  MaskCLIP's patch targets, patch-head logits [b, N, K] of the first view (the one the
                masked student sees)."""
    out = {}
    src = batch["global_crops"] if "global_crops" in batch else batch["images"].unsqueeze(0)
    n_g, b = src.shape[:2]
    _, tok = teacher["visual"](src.flatten(0, 1))                               # [n_g*b, 1+N, D]
    if use_sd:
        out["global"] = list(teacher["head"](teacher["visual"].pooled(tok)).chunk(n_g))   # n_g x [b, K]
    if use_mask:
        out["patch"] = teacher["patch_head"](tok[:b, 1:])                       # [b, N, K] of view 0
    return out
