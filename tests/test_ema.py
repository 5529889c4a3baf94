"""Tests of ema.py: the EMA step against its formula (plain, through DDP, through torch.compile),
the frozen teacher, and the schedules against hand-computed values."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from ema import ema_update, make_teacher, unwrap_model


def small_student():
    """Parameters and buffers of several kinds: Linear, LayerNorm, BatchNorm (float + long buffers)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.BatchNorm1d(6), nn.Linear(6, 2))


def perturb_(module, seed):
    """Make every parameter and float buffer different, so the formula is tested for real."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        for b in module.buffers():
            if b.is_floating_point():
                b.add_(torch.rand(b.shape, generator=g))
            else:
                b.add_(7)


def check_one_step(teacher, student_raw, wrapped, m=0.9):
    before_t = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    ema_update(teacher, wrapped, m)
    s = dict(student_raw.named_parameters())
    for n, p in teacher.named_parameters():
        want = m * before_t[n] + (1 - m) * s[n].detach()
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, before_t[n])
    s_bufs = dict(student_raw.named_buffers())
    for n, b in teacher.named_buffers():
        assert torch.equal(b, s_bufs[n]), n           # buffers are copied, not averaged


def test_make_teacher_is_a_frozen_independent_copy():
    student = small_student()
    student(torch.randn(5, 4)).sum().backward()          # the student has gradients ...
    teacher = make_teacher(student)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())  # ... not the copy
    for (n, p), (_, q) in zip(student.named_parameters(), teacher.named_parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    assert not teacher.training


def test_one_ema_step_equals_the_formula_for_every_parameter_and_buffer():
    student = small_student()
    teacher = make_teacher(student)
    perturb_(student, 1)
    check_one_step(teacher, student, student, m=0.9)
    # m = 0: exact copy (SigLIP 2 start); m = 1: nothing moves
    ema_update(teacher, student, 0.0)
    for p, q in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(p, q)
    perturb_(student, 2)
    frozen = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.parameters()))


def test_teacher_gets_no_gradient_and_keeps_none():
    student = small_student()
    teacher = make_teacher(student)
    x = torch.randn(5, 4)
    t_out = teacher(x)
    assert not t_out.requires_grad
    (student(x) - t_out).pow(2).sum().backward()
    perturb_(student, 3)
    ema_update(teacher, student, 0.5)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_mismatched_modules_are_a_clear_error():
    teacher = make_teacher(small_student())
    with pytest.raises(ValueError, match="differ"):
        ema_update(teacher, nn.Linear(4, 6), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(teacher, small_student(), 1.5)


def test_through_ddp_and_compile_wrappers(tmp_path):
    # A 1-process gloo group is enough to build a real DistributedDataParallel wrapper.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        student = small_student()
        ddp = nn.parallel.DistributedDataParallel(student)
        teacher = make_teacher(ddp)
        assert not isinstance(teacher, nn.parallel.DistributedDataParallel)
        assert [n for n, _ in teacher.named_parameters()] == [n for n, _ in student.named_parameters()]
        ddp(torch.randn(5, 4)).sum().backward()
        with torch.no_grad():
            perturb_(student, 4)
        check_one_step(teacher, student, ddp)

        # torch.compile around DDP, and around the plain module (eager backend: no C++ build)
        both = torch.compile(ddp, backend="eager")
        out = both(torch.randn(5, 4))              # the wrapper is really used once
        assert out.shape == (5, 2)
        assert unwrap_model(both) is student
        perturb_(student, 5)
        check_one_step(teacher, student, both)
    finally:
        dist.destroy_process_group()
    student = small_student()
    compiled = torch.compile(student, backend="eager")
    compiled(torch.randn(5, 4))
    teacher = make_teacher(compiled)
    assert not isinstance(teacher, torch._dynamo.eval_frame.OptimizedModule)
    perturb_(student, 6)
    check_one_step(teacher, student, compiled)
