"""Tests of train.py: the CLI, DDP equivalence, exact resume, torch.compile, the non-finite-loss stop.

The training runs here are real runs of train.py (as subprocesses) with a very small model, so the
whole loop (data order, masks, teacher, optimizer, checkpoints) is what gets compared.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402

# a model small enough that a few steps take a second or two on one core
SMALL = ["--vision_width=32", "--vision_layers=1", "--text_width=32", "--text_layers=1",
         "--embed_dim=32", "--head_hidden=32", "--head_bottleneck=16", "--head_out=64",
         "--num_workers=0", "--eval=False", "--log_interval=1", "--warmup_steps=2"]


def run_train(out_dir, *args, nproc=1, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    if nproc == 1:
        cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port=0" if False else "--rdzv-endpoint=localhost:0", "--rdzv-backend=c10d",
               os.path.join(ROOT, "train.py")]
    cmd += SMALL + [f"--out_dir={out_dir}", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def read_params(out_dir):
    ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    return ckpt


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_overrides_and_types():
    cfg = train.parse_args(["--steps=7", "--lr=0.5", "--compile=true", "--method=silc"])
    assert (cfg.steps, cfg.lr, cfg.compile, cfg.method) == (7, 0.5, True, "silc")


def test_cli_rejects_unknown_key(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--stepz=7"])
    msg = str(e.value.code)
    assert "unknown config key 'stepz'" in msg and "steps" in msg and "batch_size" in msg


def test_cli_rejects_bad_type():
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--steps=ten"])
    assert "--steps expects a int" in str(e.value.code) and "'ten'" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--compile=maybe"])
    assert "--compile expects a bool" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        train.parse_args(["steps=3"])
    assert "--key=value" in str(e.value.code)


def test_cli_from_the_command_line(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--nope=1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode != 0 and "unknown config key 'nope'" in p.stderr
    assert "Traceback" not in p.stderr


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------
def test_lr_schedule_warmup_then_cosine():
    cfg = train.Config(lr=1.0, min_lr=0.0, warmup_steps=10, steps=110)
    assert train.lr_at(0, cfg) == pytest.approx(0.1)
    assert train.lr_at(9, cfg) == pytest.approx(1.0)
    assert train.lr_at(60, cfg) == pytest.approx(0.5)       # half-way through the cosine
    assert train.lr_at(110, cfg) == pytest.approx(0.0, abs=1e-12)


def test_teacher_temperature_and_momentum_schedules():
    cfg = train.Config(steps=100, teacher_temp_warmup=0.04, teacher_temp=0.07, teacher_temp_warmup_frac=0.5)
    assert train.teacher_temp_at(0, cfg, 0) == pytest.approx(0.04)
    assert train.teacher_temp_at(25, cfg, 0) == pytest.approx(0.055)
    assert train.teacher_temp_at(80, cfg, 0) == pytest.approx(0.07)
    cfg.momentum_schedule, cfg.teacher_momentum = "cosine", 0.996
    assert train.momentum_at(0, cfg, 0) == pytest.approx(0.996)
    assert train.momentum_at(50, cfg, 0) == pytest.approx(0.998)
    assert train.momentum_at(100, cfg, 0) == pytest.approx(1.0)
    cfg.momentum_schedule = "fixed"
    assert train.momentum_at(77, cfg, 0) == 0.996


def test_step_sampler_covers_the_same_global_batch_on_any_world_size():
    one = iter(train.StepSampler(n=50, batch_size=8, world=1, rank=0, accum=1, seed=3))
    two = [iter(train.StepSampler(n=50, batch_size=8, world=2, rank=r, accum=1, seed=3)) for r in range(2)]
    acc = iter(train.StepSampler(n=50, batch_size=8, world=1, rank=0, accum=2, seed=3))
    for _ in range(20):   # crosses several epoch boundaries
        g = next(one)
        assert next(two[0]) + next(two[1]) == g
        assert next(acc) + next(acc) == g
    # resuming at step 5 continues the same stream
    s = iter(train.StepSampler(n=50, batch_size=8, world=1, rank=0, accum=1, seed=3))
    stream = [next(s) for _ in range(8)]
    r = iter(train.StepSampler(n=50, batch_size=8, world=1, rank=0, accum=1, seed=3, start_step=5))
    assert [next(r) for _ in range(3)] == stream[5:]
    # every index appears once per epoch
    s = iter(train.StepSampler(n=48, batch_size=8, world=1, rank=0, accum=1, seed=0))
    first_epoch = [i for _ in range(6) for i, e in next(s)]
    assert sorted(first_epoch) == list(range(48))
