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


# ---------------------------------------------------------------------------------------------
# Whole runs of train.py
# ---------------------------------------------------------------------------------------------
def assert_same_run(a, b, atol=1e-5, params_atol=1e-5, steps=None):
    """Two run directories: same logged losses at every step, same final parameters."""
    la, lb = read_log(a), read_log(b)
    if steps is not None:
        la = [r for r in la if r["step"] in steps]
        lb = [r for r in lb if r["step"] in steps]
    assert [r["step"] for r in la] == [r["step"] for r in lb] and la
    for ra, rb in zip(la, lb):
        for k in ra:
            if k in ("contrastive", "sd", "dist", "mlm", "loss", "logit_scale"):
                assert ra[k] == pytest.approx(rb[k], abs=atol), (k, ra, rb)
    ca, cb = read_params(a), read_params(b)
    for part in ("model", "extra"):
        assert ca[part].keys() == cb[part].keys()
        for k in ca[part]:
            torch.testing.assert_close(ca[part][k], cb[part][k], atol=params_atol, rtol=0, msg=f"{part}.{k}")
    if ca["teacher"] is not None:
        for k in ca["teacher"]:
            torch.testing.assert_close(ca["teacher"][k], cb["teacher"][k], atol=params_atol, rtol=0, msg=k)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_ddp_two_processes_equal_one_process(tmp_path, loss):
    """torchrun --nproc_per_node=2 (gloo, CPU) on the same global batch gives the same losses and
    parameters as one process: the local contrastive loss with gathered features is exact."""
    args = ["--steps=3", "--batch_size=16", f"--loss={loss}"]
    run_train(tmp_path / "one", *args)
    run_train(tmp_path / "two", *args, nproc=2)
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-5, params_atol=2e-5)


def test_ddp_silc_equals_one_process(tmp_path):
    """SILC under DDP: the centre is all-reduced, the teacher follows identical students."""
    args = ["--steps=2", "--batch_size=8", "--method=silc", "--n_local_crops=2"]
    run_train(tmp_path / "one", *args)
    run_train(tmp_path / "two", *args, nproc=2)
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-5, params_atol=2e-5)


@pytest.mark.parametrize("method", ["clip", "silc", "maskclip"])
def test_resume_is_exact(tmp_path, method):
    """N steps, checkpoint, resume for N more == 2N uninterrupted steps (teacher and centres too)."""
    args = ["--steps=4", "--batch_size=8", f"--method={method}", "--n_local_crops=2", "--num_workers=1"]
    run_train(tmp_path / "full", *args)
    run_train(tmp_path / "split", *args, "--stop_at=2")
    assert read_params(tmp_path / "split")["step"] == 2
    run_train(tmp_path / "split", *args, "--resume=True")
    assert_same_run(tmp_path / "full", tmp_path / "split", atol=0, params_atol=0, steps={3, 4})


def test_non_finite_loss_stops_with_a_message(tmp_path):
    p = run_train(tmp_path / "nan", "--steps=6", "--batch_size=8", "--lr=1e30", "--warmup_steps=1",
                  "--grad_clip=0", "--ckpt_interval=1", check=False)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "non-finite loss at step" in p.stdout
    assert "Traceback" not in p.stderr
    step = int(p.stdout.split("non-finite loss at step ")[1].split()[0])
    # the last checkpoint is the last good step, written before the bad one
    assert read_params(tmp_path / "nan")["step"] == step


@pytest.mark.parametrize("method", ["silc+maskclip"])
def test_every_method_runs_and_logs_its_terms(tmp_path, method):
    run_train(tmp_path / "run", "--steps=2", "--batch_size=8", f"--method={method}", "--n_local_crops=2",
              "--mlm_weight=0.05")
    rec = read_log(tmp_path / "run")[-1]
    for k in ("contrastive", "sd", "dist", "mlm", "teacher_entropy"):
        assert k in rec and rec[k] == rec[k], (k, rec)   # present and not NaN
    # the total is the weighted sum of the terms: 1 * sd + 0.25 * dist + 0.05 * mlm
    assert rec["loss"] == pytest.approx(rec["contrastive"] + rec["sd"] + 0.25 * rec["dist"] + 0.05 * rec["mlm"],
                                        rel=1e-5)


def test_missing_data_path_is_a_clear_error(tmp_path):
    p = run_train(tmp_path / "x", "--data=/nonexistent/shards/{000..009}.tar", "--steps=1", check=False)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "/nonexistent" in p.stderr + p.stdout


@pytest.mark.parametrize("method", ["clip", "maskclip"])
def test_torch_compile_training_step_matches_eager(method):
    """--compile wraps the Pretrainer in torch.compile: one training step (loss and every gradient)
    must match eager on the same batch. maskclip: the masked branch in drop mode (static-shape
    gathers and scatter, compiled by inductor, backward included)."""
    import copy
    from data import build_train_data
    from ema import make_teacher
    cfg = train.resolve_method_defaults(train.parse_args(SMALL + [f"--method={method}"]))
    clip_cfg, tok = train.build_model_config(cfg)
    torch.manual_seed(0)
    eager = train.Pretrainer(cfg, clip_cfg)
    compiled_raw = copy.deepcopy(eager)
    compiled = torch.compile(compiled_raw)
    dataset, collate_fn = build_train_data(cfg, clip_cfg.patch_size, tok)
    batch = collate_fn([dataset[i] for i in range(8)])
    t_out, temp = None, 0.04
    if eager.use_mask:
        train.add_masks(batch, cfg, clip_cfg, step=0, chunk=0, n_chunks=1)
        t_out = train.teacher_forward(make_teacher(eager.image_student()), batch, eager.use_sd, eager.use_mask)
    out_e = eager(batch, t_out, temp)
    out_c = compiled(batch, t_out, temp)
    out_e["loss"].backward()
    out_c["loss"].backward()
    assert out_c["loss"].item() == pytest.approx(out_e["loss"].item(), abs=1e-5)
    ge = dict(eager.named_parameters())
    for name, p in compiled_raw.named_parameters():
        if p.grad is None:
            assert ge[name].grad is None, name
            continue
        torch.testing.assert_close(p.grad, ge[name].grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("method", ["maskclip", "silc+maskclip"])
def test_masked_training_step_traces_as_one_graph(method):
    """The masked branch (drop mode for maskclip, mask tokens for silc+maskclip) must compile as ONE
    graph: boolean indexing or a .item() on the mask would make torch.compile break it into pieces
    (12 graphs, 11 breaks, for maskclip before the static-shape gathers). torch._dynamo.explain only traces."""
    from data import build_train_data
    from ema import make_teacher
    cfg = train.resolve_method_defaults(train.parse_args(SMALL + [f"--method={method}", "--n_local_crops=2"]))
    clip_cfg, tok = train.build_model_config(cfg)
    torch.manual_seed(0)
    pretrainer = train.Pretrainer(cfg, clip_cfg)
    teacher = make_teacher(pretrainer.image_student())
    dataset, collate_fn = build_train_data(cfg, clip_cfg.patch_size, tok)
    batch = collate_fn([dataset[i] for i in range(4)])
    train.add_masks(batch, cfg, clip_cfg, step=0, chunk=0, n_chunks=1)
    t_out = train.teacher_forward(teacher, batch, pretrainer.use_sd, pretrainer.use_mask)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(pretrainer)(batch, t_out, 0.04)
    reasons = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_count == 1 and explained.graph_break_count == 0, reasons


def test_silc_teacher_neither_collapses_nor_goes_uniform(tmp_path):
    """DINO's failure modes, watched on a short real run: the centred, sharpened teacher output must
    keep a mean entropy well above 0 (collapse onto one prototype) and well below log K (uniform,
    i.e. no information). K = 64 here, log K = 4.16 nats."""
    import math
    run_train(tmp_path / "silc", "--method=silc", "--steps=30", "--batch_size=16", "--n_local_crops=2",
              "--warmup_steps=5", "--lr=1e-3")
    ent = [r["teacher_entropy"] for r in read_log(tmp_path / "silc")]
    log_k = math.log(64)
    assert len(ent) == 30
    assert all(0.1 * log_k < h < 0.97 * log_k for h in ent), ent
    # and the centring + sharpening let it move: the teacher is not stuck at its initial entropy
    assert max(ent) - min(ent) > 0.05, ent
