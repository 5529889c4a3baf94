"""Tests of train.py: the CLI, DDP equivalence, exact resume, torch.compile, the non-finite-loss stop.

The training runs here are real runs of train.py (as subprocesses) with a very small model, so the
whole loop (data order, masks, teacher, optimizer, checkpoints) is what gets compared.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import data
import train

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


def test_patch_text_loss_on_shapes_by_default_and_from_its_start(tmp_path):
    """The patch-text loss: weight 0.5 on the shapes world and 0 on real data unless asked for; on from
    step int(patch_text_start * steps); absent from the log before, in the weighted total after."""
    resolve = lambda *a: train.resolve_method_defaults(train.parse_args(list(a)))
    assert resolve().patch_text_weight == 0.5
    assert resolve("--data=pairs.csv").patch_text_weight == 0.0
    assert resolve("--data=pairs.csv", "--patch_text_weight=0.2").patch_text_weight == 0.2
    cfg = resolve()                                                      # 540 steps, start 0.3: step 162
    assert [train.step_values(s, cfg)["patch_text"] for s in (0, 161, 162, 539)] == [False, False, True, True]
    run_train(tmp_path / "run", "--steps=6", "--batch_size=8", "--patch_text_start=0.5")
    recs = read_log(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert ["patch_text" in r for r in recs] == [False, False, False, True, True, True]
    for r in recs:
        assert r["loss"] == pytest.approx(r["contrastive"] + 0.5 * r.get("patch_text", 0.0), rel=1e-5)


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
def test_one_schedule_serves_lr_temperature_and_momentum():
    """train.schedule against its closed form, and step_values' three uses of it by hand."""
    import math
    s = [train.schedule(t, 15, 1.0, 0.0, warmup=5, start=0.5) for t in range(16)]
    assert s[:5] == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0])          # start + (base - start)(t + 1) / 5
    for t in range(5, 16):                                             # cosine: progress (t - 5) / 10
        assert s[t] == pytest.approx(0.5 * (1 + math.cos(math.pi * (t - 5) / 10)))
    assert s[15] == pytest.approx(0.0, abs=1e-12) and train.schedule(99, 15, 1.0, 0.0) == pytest.approx(0.0)
    assert train.schedule(7, 10, 0.3, 0.3, warmup=2, start=0.3) == 0.3    # base == final == start: constant
    cfg = train.Config(lr=1.0, min_lr=0.0, warmup_steps=10, steps=110)
    lr = [train.step_values(t, cfg)["lr"] for t in (0, 9, 60, 110)]
    assert lr == pytest.approx([0.1, 1.0, 0.5, 0.0], abs=1e-12)       # half-way through the cosine at 60
    cfg = train.Config(steps=100, teacher_temp_warmup=0.04, teacher_temp=0.07, teacher_temp_warmup_frac=0.5,
                       momentum_schedule="cosine", teacher_momentum=0.996)
    temp = [train.step_values(t, cfg)["teacher_temp"] for t in (0, 24, 49, 80)]
    assert temp == pytest.approx([0.04 + 0.03 / 50, 0.04 + 0.03 * 25 / 50, 0.07, 0.07])
    mom = [train.step_values(t, cfg)["momentum"] for t in (0, 50, 100)]
    assert mom == pytest.approx([0.996, 0.998, 1.0])                   # DINO's cosine to 1
    cfg.momentum_schedule = "fixed"
    assert train.step_values(77, cfg)["momentum"] == 0.996             # SILC: fixed
    cfg.sd_start = 0.5                                                 # late start: counted from step 50
    v = train.step_values(50, cfg)
    assert v["distill"] and not train.step_values(49, cfg)["distill"] and v["teacher_temp"] == pytest.approx(0.04 + 0.03 / 25)


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


# Every method under DDP. One worker process per world size runs all the cases (tests/ddp_train_worker.py),
# so the imports and the process start are paid once. 3 steps, global batch 8.
DDP_BASE = SMALL + ["--steps=3", "--batch_size=8", "--n_local_crops=2", "--ckpt_interval=1"]
DDP_CASES = [
    {"name": "clip_softmax", "args": DDP_BASE + ["--method=clip", "--loss=softmax"]},
    {"name": "clip_sigmoid", "args": DDP_BASE + ["--method=clip", "--loss=sigmoid"]},
    # SILC with the unit-mean pool (the tiny default) in float32: the 2-rank run drifts from the
    # one-process run at its second step (the conv stem's gradient 5% apart, the weights 3e-4 after
    # step 2, everything else at 1e-6). In float64 the two agree to 1e-15 at every step, so it is
    # rounding that this configuration amplifies (on the second step's local crops: seed 1, a linear
    # stem or local crops holding 30% object agree at 3e-5), not a DDP error: the float32 case runs
    # with the class token, and the unit mean is checked in float64 (docs/experiments.md, "Not done").
    {"name": "silc", "args": DDP_BASE + ["--method=silc", "--pool=cls"]},
    {"name": "silc_unitmean_float64", "args": DDP_BASE + ["--method=silc"], "float64": True},
    {"name": "maskclip_drop", "args": DDP_BASE + ["--method=maskclip", "--mask_mode=drop"]},
    {"name": "maskclip_token", "args": DDP_BASE + ["--method=maskclip", "--mask_mode=token", "--mask_kind=block"]},
    # with its default KoLeo term, whose nearest neighbours are found over the gathered global batch
    {"name": "silc+maskclip", "args": DDP_BASE + ["--method=silc+maskclip", "--mlm_weight=0.05"]},
    # 2 ranks x 2 micro-batches against 1 process with the whole batch at once
    {"name": "silc+maskclip_accum", "args": DDP_BASE + ["--method=silc+maskclip", "--mlm_weight=0.05"],
     "ddp_args": ["--grad_accum=2"]},
]
NAN_CASE = {"name": "nan_on_rank1", "args": DDP_BASE + ["--steps=4", "--method=silc"], "nan_at_call": 1}


def run_worker(out_dir, cases, nproc):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cases.json").write_text(json.dumps(cases))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    worker = os.path.join(ROOT, "tests", "ddp_train_worker.py")
    cmd = [sys.executable, worker] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--rdzv-endpoint=localhost:0", "--rdzv-backend=c10d", worker]
    p = subprocess.run(cmd + [str(out_dir), str(out_dir / "cases.json")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def real_eval_cases(data_dir):
    """CLIP on a csv of shapes images, evaluated on held-out pairs (csv, or a tar shard) and on a class-folder
    tree every 2 steps and at the end; the val sets hold a corrupt image and an empty caption, the
    class folders one corrupt image (loaders.shapes.write_shapes_files)."""
    from loaders.shapes import write_shapes_files
    paths = write_shapes_files(str(data_dir), n_train=16, n_val=10, n_class=2, size=32, bad_samples=True)
    args = DDP_BASE + ["--method=clip", f"--data={paths['train_csv']}", f"--zeroshot_data={paths['classes_val']}",
                       f"--zeroshot_classnames={paths['classnames']}", "--zeroshot_templates=short",
                       "--eval_interval=2", "--eval=True", "--image_size=32", "--eval_batch_size=4"]
    return [{"name": "eval_csv", "args": args + [f"--val_data={paths['val_csv']}"]},
            {"name": "eval_tar", "args": args + [f"--val_data={os.path.dirname(paths['val_tar'])}"]}]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_train")
    eval_cases = real_eval_cases(root / "data")
    run_worker(root / "one", DDP_CASES + eval_cases, nproc=1)
    p = run_worker(root / "two", DDP_CASES + eval_cases + [NAN_CASE], nproc=2)
    return root, p


@pytest.mark.parametrize("case", ["eval_csv", "eval_tar"])
def test_real_data_evaluation_during_training_is_logged_and_the_same_under_torchrun(ddp_runs, case):
    """--val_data (csv or tar shards) and --zeroshot_data evaluated every --eval_interval steps and at the
    end: each evaluation is a log.jsonl record with its step, every sample read once (10 pairs, 16 images)
    and the bad ones counted (2 and 1) apart from the training data's count, curves.png drawn; and with
    2 processes (rank 0 evaluates alone, every sample) the metrics equal 1 process's."""
    root, _ = ddp_runs
    evals = {}
    for world in ("one", "two"):
        with open(root / world / case / "log.jsonl") as f:
            records = [json.loads(line) for line in f]
        evals[world] = [r for r in records if "val_i2t_r1" in r]
        assert [r["step"] for r in evals[world]] == [2, 3]
        assert all(r["skipped"] == 0 for r in records if "samples_per_s" in r)      # training data: none bad
        assert (root / world / case / "curves.png").exists()
    for a, b in zip(evals["one"], evals["two"]):
        assert a.keys() == b.keys() and {"val_t2i_r10", "val_contrastive", "zeroshot_top5"} <= a.keys()
        assert (a["val_pairs"], a["val_skipped"], a["zeroshot_images"], a["zeroshot_skipped"]) == (10, 2, 16, 1)
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5), k
    metrics = json.loads((root / "one" / case / "metrics.json").read_text())
    assert metrics == {**evals["one"][-1], "step": 3}


def test_an_eval_interval_without_an_eval_set_and_bad_eval_sets_are_clear_errors(tmp_path):
    from loaders.shapes import write_shapes_files
    paths = write_shapes_files(str(tmp_path), n_train=2, n_val=2, n_class=1, size=32)
    cases = {
        "has no evaluation set": [f"--data={paths['train_csv']}", "--eval_interval=5"],
        "not found": [f"--zeroshot_data={tmp_path / 'nope'}"],
        "names 2 classes but": [f"--zeroshot_data={paths['classes_val']}", f"--zeroshot_classnames={tmp_path / 'two.txt'}"],
        "which is not given": [f"--zeroshot_classnames={paths['classnames']}"],
        "unknown templates": [f"--zeroshot_data={paths['classes_val']}", "--zeroshot_templates=fancy"],
        "own evaluation": ["--val_data=shapes"],
    }
    (tmp_path / "two.txt").write_text("circle\nsquare\n")                   # 2 names for 8 class folders
    for message, args in cases.items():
        with pytest.raises(SystemExit) as e:
            train.build_eval_sets(train.parse_args(args))
        assert message in str(e.value.code), (message, e.value.code)
    ok = train.build_eval_sets(train.parse_args([f"--data={paths['train_csv']}", "--eval_interval=5",
                                                 f"--val_data={paths['val_csv']}"]))
    assert ok["zeroshot_set"] is None and len(ok["val_set"]) == 2


@pytest.mark.parametrize("case", [c["name"] for c in DDP_CASES])
def test_every_method_under_torchrun_equals_one_process(ddp_runs, case):
    """torchrun --nproc_per_node=2 (gloo, CPU) on the same global batch as one process: the first
    step's gradients (on every rank, as the optimizer sees them), every logged loss, and the weights
    after 3 steps (student, heads, centres and teacher) agree. A constant-factor gradient error,
    which AdamW would normalise away in the weights, shows in the gradients."""
    root, _ = ddp_runs
    one, two = root / "one" / case, root / "two" / case
    f64 = next(c for c in DDP_CASES if c["name"] == case).get("float64", False)
    rel, atol, floor = (1e-10, 1e-10, 1e-12) if f64 else (1e-4, 1e-5, 1e-9)   # float64: only rounding at 1e-16 is left
    ref = torch.load(one / "grads_rank0.pt", weights_only=True)
    assert len(ref) > 10
    assert {g.dtype for g in ref.values()} == {torch.float64 if f64 else torch.float32}
    for rank in range(2):
        got = torch.load(two / f"grads_rank{rank}.pt", weights_only=True)
        assert got.keys() == ref.keys(), (rank, sorted(got.keys() ^ ref.keys()))
        for name in ref:
            scale = ref[name].abs().max().item()
            torch.testing.assert_close(got[name], ref[name], rtol=0, atol=rel * scale + floor, msg=name)
    assert_same_run(one, two, atol=max(atol, 2e-6), params_atol=atol)   # the log rounds to 6 decimals
    # the teacher's entropies: per image (averaged over ranks) and of the batch's mean target (all-reduced).
    # They describe the step's LAST micro-batch, which grad_accum makes a different set of images per world size
    accum = "--grad_accum=2" in next(c for c in DDP_CASES if c["name"] == case).get("ddp_args", [])
    for ra, rb in zip(read_log(one), read_log(two)) if not accum else ():
        for k in ("teacher_entropy", "teacher_entropy_batch", "patch_entropy", "patch_entropy_batch"):
            assert (k in ra) == (k in rb) and ra.get(k, 0.0) == pytest.approx(rb.get(k, 0.0), abs=1e-5), (k, ra, rb)


def test_ddp_gradients_fill_their_buckets_without_a_layout_copy(ddp_runs):
    """DDP warns "Grad strides do not match bucket view strides" when a gradient's strides differ from its
    parameter's (each such bucket pays a copy): never in any of the runs above."""
    _, p = ddp_runs
    assert "Grad strides do not match" not in p.stdout + p.stderr


def test_a_non_finite_loss_on_one_rank_stops_every_rank(ddp_runs):
    """Rank 1 alone gets a NaN loss at its second step: both ranks stop with exit code 1 before the bad
    update, and the checkpoint on disk is the last good step."""
    root, p = ddp_runs
    run = root / "two" / "nan_on_rank1"
    codes = [json.loads((run / f"exit_rank{r}.json").read_text())["code"] for r in range(2)]
    assert codes == [1, 1]
    assert "non-finite loss at step 1" in p.stdout
    assert read_params(run)["step"] == 1


def test_torchrun_maskclip_from_the_command_line(tmp_path):
    """The command that crashed ("Expected to have finished reduction in the prior iteration"): MaskCLIP
    in drop mode leaves the ViT's mask token out of the loss, so it must be frozen, not waited for."""
    p = run_train(tmp_path / "mc", "--method=maskclip", "--steps=3", "--batch_size=8", nproc=2)
    assert "Traceback" not in p.stderr and len(read_log(tmp_path / "mc")) == 3


@pytest.mark.parametrize("method", ["clip", "silc", "maskclip"])
def test_resume_is_exact(tmp_path, method):
    """N steps, checkpoint, resume for N more == 2N uninterrupted steps (teacher and centres too)."""
    args = ["--steps=4", "--batch_size=8", f"--method={method}", "--n_local_crops=2", "--num_workers=1"]
    run_train(tmp_path / "full", *args)
    run_train(tmp_path / "split", *args, "--stop_at=2")
    assert read_params(tmp_path / "split")["step"] == 2
    run_train(tmp_path / "split", *args, "--resume=True")
    assert_same_run(tmp_path / "full", tmp_path / "split", atol=0, params_atol=0, steps={3, 4})


def test_start_log_fresh_run_empties_it_and_resume_keeps_records_up_to_the_checkpoint(tmp_path):
    """A fresh run must not append to an earlier run's log.jsonl (its curves would mix two runs); a
    resumed run keeps what came before its checkpoint and drops what a killed run logged after it."""
    log = tmp_path / "log.jsonl"
    records = [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.9}, {"step": 2, "zeroshot_acc": 0.3},
               {"step": 3, "loss": 3.8}, {"step": 4, "loss": 3.7}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    train.start_log(str(log), 2)
    assert [json.loads(line) for line in log.read_text().splitlines()] == records[:3]
    train.start_log(str(log), 0)
    assert log.read_text() == ""
    train.start_log(str(tmp_path / "absent.jsonl"), 0)          # no log yet: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()
    # end to end: a stale log in the out_dir is replaced by this run's own records
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in range(1, 6)))
    run_train(tmp_path / "run", "--steps=2", "--batch_size=8")
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2]
    assert all(r["loss"] != 9.0 for r in read_log(tmp_path / "run"))


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
    for k in ("contrastive", "patch_text", "sd", "dist", "mlm", "koleo", "teacher_entropy"):
        assert k in rec and rec[k] == rec[k], (k, rec)   # present and not NaN
    # the total is the weighted sum of the terms: 0.5 * patch_text + 1 * sd + 0.25 * dist + 0.05 * mlm + 0.1 * koleo
    assert rec["loss"] == pytest.approx(rec["contrastive"] + 0.5 * rec["patch_text"] + rec["sd"] + 0.25 * rec["dist"]
                                        + 0.05 * rec["mlm"] + 0.1 * rec["koleo"], rel=1e-5)


def _jpeg_shards(folder, n_shards=2, per_shard=8):
    """Tar shards of small photo-like JPEGs of different sizes and aspects, with captions."""
    import io
    import tarfile
    import numpy as np
    from experiments.loaderbench import jpeg_bytes, photo
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f"{s:04d}.tar"), "w") as tar:
            for j in range(per_shard):
                h, w = int(rng.integers(30, 90)), int(rng.integers(30, 90))
                for name, payload in ((f"{s}{j:03d}.jpg", jpeg_bytes(photo(h, w, 10 * s + j))),
                                      (f"{s}{j:03d}.txt", f"photo {s} {j}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def test_crops_on_the_device_train_like_crops_in_the_workers(tmp_path):
    """--crops=device (the workers decode and draw the random numbers; the step cuts the views, one
    resampling call per resolution) against --crops=workers (the CPU default), same seeds: the same
    logged losses at every step and the same weights, for SILC on the shapes world (object boxes, masks,
    the local_foreground rule) and CLIP on tar shards of JPEGs of several sizes, decoded to the working
    size (their crops placed in each photo's own frame)."""
    _jpeg_shards(tmp_path / "shards")
    cases = {"silc": ["--method=silc", "--n_local_crops=2", "--local_foreground=0.2"],
             "tar": ["--method=clip", f"--data={tmp_path / 'shards'}", "--image_size=32"]}
    for name, args in cases.items():
        for placement in ("workers", "device"):
            run_train(tmp_path / name / placement, *args, "--steps=3", "--batch_size=8", f"--crops={placement}")
        assert_same_run(tmp_path / name / "workers", tmp_path / name / "device", atol=1e-6, params_atol=1e-6)


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
    from ema import make_teacher, teacher_forward
    cfg = train.resolve_method_defaults(train.parse_args(SMALL + [f"--method={method}"]))
    clip_cfg, tok = train.build_model_config(cfg)
    torch.manual_seed(0)
    eager = train.Pretrainer(cfg, clip_cfg)
    compiled_raw = copy.deepcopy(eager)
    compiled = torch.compile(compiled_raw)
    dataset, collate_fn = train.build_train_data(cfg, clip_cfg.patch_size, tok)
    batch = collate_fn([dataset[i] for i in range(8)])
    t_out, temp = None, 0.04
    if eager.use_mask:
        train.add_masks(batch, cfg, tok, clip_cfg.patch_size, 0, 0)
        t_out = teacher_forward(make_teacher(eager.image_student()), batch, eager.use_sd, eager.use_mask)
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


def test_compiled_conv_stem_gradients_have_their_parameters_strides():
    """Under torch.compile, inductor returns the conv stem's 1x1 weight gradient channels-last when the
    stem runs at two resolutions in one step (SILC's global and local crops): strides (16, 1, 16, 16)
    against the contiguous weight's (16, 1, 1, 1). The same memory, but DDP compares strides literally:
    "Grad strides do not match bucket view strides" (seen on CPU under gloo DDP with the whole SILC
    step, as on the GPU; docs/benchmarks.md). train.build_student gives the stem channels-last weights
    under --compile (clip.ConvStem.channels_last_): every gradient then has its parameter's strides.
    The stem alone is compiled here (the whole step compiles for minutes on a cold cache)."""
    cfg = train.resolve_method_defaults(train.parse_args(SMALL + ["--method=silc", "--compile=True"]))
    clip_cfg, _ = train.build_model_config(cfg)
    stem = train.build_student(cfg, clip_cfg, torch.device("cpu"))[0].clip.visual.stem
    last = [m for m in stem if isinstance(m, torch.nn.Conv2d)][-1]
    assert last.weight.shape == (32, 16, 1, 1) and last.weight.stride() == (16, 1, 16, 16)   # channels-last
    glob, loc = torch.randn(8, 3, 64, 64), torch.randn(16, 3, 24, 24)      # the global and local crop sizes
    torch.compile(lambda a, b: stem(a).square().mean() + stem(b).square().mean())(glob, loc).backward()
    for name, p in stem.named_parameters():
        assert p.grad.stride() == p.stride(), (name, p.grad.stride(), p.stride())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the GPU's gradient layout")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gradients_have_their_parameters_strides_on_cuda(compiled):
    """On CUDA, train.build_student makes the conv stem's weights channels-last (clip.ConvStem.channels_last_),
    the layout of the weight gradients cuDNN and the compiled backward return for its channels-last
    activations: after a SILC step every gradient has exactly its parameter's strides, which is what DDP
    checks before it warns "Grad strides do not match bucket view strides"."""
    from ema import teacher_forward
    cfg = train.resolve_method_defaults(train.parse_args(SMALL + ["--method=silc", "--n_local_crops=2", "--device=cuda"]))
    clip_cfg, tok = train.build_model_config(cfg)
    pretrainer, _, teacher = train.build_student(cfg, clip_cfg, torch.device("cuda"))
    stem = [m for m in pretrainer.clip.visual.stem if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.stride()[1] == 1 for c in stem[1:])                       # channels-last, 1x1 included
    dataset, collate_fn = train.build_train_data(cfg, clip_cfg.patch_size, tok)
    batch = collate_fn([data.SeededSample(dataset, 0)[(i, 0)] for i in range(8)])
    batch.pop("skipped")
    batch = train.prepare_batch(batch, cfg, tok, clip_cfg.patch_size, 0, 0, torch.device("cuda"), trim=not compiled)
    model = torch.compile(pretrainer) if compiled else pretrainer
    model(batch, teacher_forward(teacher, batch, True, False), 0.04)["loss"].backward()
    for name, p in pretrainer.named_parameters():
        if p.grad is not None:
            assert p.grad.stride() == p.stride(), (name, p.grad.stride(), p.stride())


@pytest.mark.parametrize("method", ["maskclip", "silc+maskclip"])
def test_masked_training_step_traces_as_one_graph(method):
    """The masked branch (drop mode for maskclip, mask tokens for silc+maskclip) must compile as ONE
    graph: boolean indexing or a .item() on the mask would make torch.compile break it into pieces
    (12 graphs, 11 breaks, for maskclip before the static-shape gathers). torch._dynamo.explain only traces."""
    from ema import make_teacher, teacher_forward
    cfg = train.resolve_method_defaults(train.parse_args(SMALL + [f"--method={method}", "--n_local_crops=2"]))
    clip_cfg, tok = train.build_model_config(cfg)
    torch.manual_seed(0)
    pretrainer = train.Pretrainer(cfg, clip_cfg)
    teacher = make_teacher(pretrainer.image_student())
    dataset, collate_fn = train.build_train_data(cfg, clip_cfg.patch_size, tok)
    batch = collate_fn([dataset[i] for i in range(4)])
    train.add_masks(batch, cfg, tok, clip_cfg.patch_size, 0, 0)
    t_out = teacher_forward(teacher, batch, pretrainer.use_sd, pretrainer.use_mask)
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
    batch = [r["teacher_entropy_batch"] for r in read_log(tmp_path / "silc")]
    log_k = math.log(64)
    assert len(ent) == 30
    assert all(0.1 * log_k < h < 0.97 * log_k for h in ent), ent
    # entropy is concave: the batch's mean target is at least as spread as the mean image's
    assert all(h <= hb + 1e-5 <= log_k + 1e-5 for h, hb in zip(ent, batch)), (ent, batch)
    # and the centring + sharpening let it move: the teacher is not stuck at its initial entropy
    assert max(ent) - min(ent) > 0.05, ent


# ---------------------------------------------------------------------------------------------
# The step itself, in-process: masks, MLM padding, gradient accumulation, global RNG
# ---------------------------------------------------------------------------------------------
def small_setup(*args, dtype=torch.float32):
    """(cfg, clip_cfg, pretrainer, teacher, dataset, collate_fn) for a SMALL model, as main() builds them."""
    from ema import make_teacher, teacher_forward
    cfg = train.resolve_method_defaults(train.parse_args(SMALL + list(args)))
    clip_cfg, tok = train.build_model_config(cfg)
    torch.manual_seed(cfg.seed)
    pretrainer = train.Pretrainer(cfg, clip_cfg).to(dtype)
    teacher = make_teacher(pretrainer.image_student()) if (pretrainer.use_sd or pretrainer.use_mask) else None
    dataset, collate_fn = train.build_train_data(cfg, clip_cfg.patch_size, tok)
    return cfg, clip_cfg, tok, pretrainer, teacher, dataset, collate_fn


def loader_batches(cfg, clip_cfg, tok, dataset, collate_fn, step, world, rank, accum, batch_size, trim=True):
    """The micro-batches rank `rank` of `world` prepares at `step`, read as main() reads them."""
    sampler = iter(data.StepSampler(len(dataset), batch_size, world, rank, accum, cfg.seed, start_step=step))
    micro = batch_size // (world * accum)
    seeded = data.SeededSample(dataset, cfg.seed)
    out = []
    for a in range(accum):
        batch = collate_fn([seeded[key] for key in next(sampler)])
        batch.pop("skipped")
        out.append(train.prepare_batch(batch, cfg, tok, clip_cfg.patch_size, step, (a * world + rank) * micro, "cpu",
                                       trim=trim))
    return out


@pytest.mark.parametrize("kind", ["random", "block"])
def test_masks_and_mlm_corruption_do_not_depend_on_ranks_or_micro_batches(kind):
    """Model-free: at a given step, the patch masks and the MLM inputs/labels of 2 ranks x 2 micro-batches,
    concatenated in global order (micro-batch a of rank r holds positions (a * W + r) * b ...), equal
    the one-process output. Before the fix, rank 1's rows came from a generator seeded by its chunk."""
    cfg, clip_cfg, tok, _, _, dataset, collate_fn = small_setup("--method=maskclip", "--mlm_weight=0.05",
                                                           f"--mask_kind={kind}")
    L = clip_cfg.context_length

    def padded(x, fill):
        return torch.nn.functional.pad(x, (0, L - x.shape[1]), value=fill)

    for step in (0, 3):
        (ref,) = loader_batches(cfg, clip_cfg, tok, dataset, collate_fn, step, world=1, rank=0, accum=1, batch_size=16)
        parts = {}
        for rank in range(2):
            for a, b in enumerate(loader_batches(cfg, clip_cfg, tok, dataset, collate_fn, step, 2, rank, 2, 16)):
                parts[a * 2 + rank] = b
        got = [parts[c] for c in range(4)]
        assert torch.equal(torch.cat([b["patch_mask"] for b in got]), ref["patch_mask"])
        assert ref["patch_mask"].sum(1).eq(round(0.75 * ref["patch_mask"].shape[1])).all()
        for key, fill in (("mlm_inputs", clip_cfg.pad_token_id), ("mlm_labels", -100)):
            assert torch.equal(torch.cat([padded(b[key], fill) for b in got]), padded(ref[key], fill)), key
        assert (ref["mlm_labels"] != -100).sum() > 10
    # and the untrimmed (compiled) path corrupts the caption the same way
    (full,) = loader_batches(cfg, clip_cfg, tok, dataset, collate_fn, 3, 1, 0, 1, 16, trim=False)
    assert torch.equal(full["mlm_inputs"], padded(ref["mlm_inputs"], clip_cfg.pad_token_id))


def test_mlm_decoder_ignores_padding_so_trimming_changes_nothing():
    """The MLM branch must not attend to padding: its loss is the same on the trimmed caption (eager)
    and on the full context (torch.compile's fixed shape). Before the fix the decoder got no token ids,
    attended to the padding features, and the two differed."""
    cfg, clip_cfg, tok, pretrainer, _, dataset, collate_fn = small_setup("--method=maskclip", "--mlm_weight=0.05")
    (trimmed,) = loader_batches(cfg, clip_cfg, tok, dataset, collate_fn, 0, 1, 0, 1, 8, trim=True)
    (full,) = loader_batches(cfg, clip_cfg, tok, dataset, collate_fn, 0, 1, 0, 1, 8, trim=False)
    assert full["mlm_inputs"].shape[1] > trimmed["mlm_inputs"].shape[1] + 10
    a, b = pretrainer.mlm(trimmed), pretrainer.mlm(full)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    assert 1.0 < a.item() < 10.0


def split_batch(batch, k):
    """A collated batch -> k equal micro-batches (crops are [views, B, ...], the rest [B, ...])."""
    b = len(batch["captions"]) // k
    parts = []
    for j in range(k):
        sl = slice(j * b, (j + 1) * b)
        part = {}
        for key, v in batch.items():
            if key in ("global_crops", "local_crops"):
                part[key] = v[:, sl]
            elif torch.is_tensor(v) or isinstance(v, list):
                part[key] = v[sl]
        parts.append(part)
    return parts


@pytest.mark.parametrize("args", [["--method=clip"], ["--method=clip", "--loss=sigmoid"], ["--method=silc"],
                                  ["--method=maskclip", "--mlm_weight=0.05"],
                                  ["--method=silc+maskclip", "--mlm_weight=0.05"]],
                         ids=["clip", "siglip", "silc", "maskclip", "silc+maskclip"])
def test_grad_accum_equals_one_batch_twice_as_large(args):
    """float64: accumulate_gradients over 2 micro-batches of b gives the same loss terms, the same
    gradient of every parameter and the same centres as one micro-batch of 2b. The contrastive and
    patch-text losses keep all 2b pairs (open_clip's cached-feature accumulation, the patch features
    cached too), the distillation terms are weighted by their share, the centres move once per step.
    Before, each micro-batch had only b negatives."""
    import copy
    cfg, clip_cfg, tok, pt, teacher, dataset, collate_fn = small_setup(*args, "--n_local_crops=2", "--patch_text_start=0",
                                                                       dtype=torch.float64)
    batch = collate_fn([data.SeededSample(dataset, 0)[(i, 0)] for i in range(8)])
    batch.pop("skipped")
    batch = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
    results = []
    for k in (1, 2):
        model, t = copy.deepcopy(pt), copy.deepcopy(teacher)
        micro = [train.prepare_batch(b, cfg, tok, clip_cfg.patch_size, 0, j * (8 // k), "cpu")
                 for j, b in enumerate(split_batch(batch, k))]
        terms = train.accumulate_gradients(model, model, t, micro, 0, cfg)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((terms, grads, {n: b.clone() for n, b in model.named_buffers()}))
    (t1, g1, c1), (t2, g2, c2) = results
    assert "patch_text" in t1 and "patch_text" in t2
    assert ("koleo" in t1) == ("silc" in args[0])      # the SILC methods' default: KoLeo over the whole step
    for name in ("contrastive", "patch_text", "sd", "dist", "mlm", "koleo", "loss"):
        if name in t1:
            assert t2[name].item() == pytest.approx(t1[name].item(), rel=1e-12, abs=1e-12), name
    assert g1.keys() == g2.keys() and "clip.logit_scale" in g1
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-9, atol=1e-12, msg=n)
    for n in c1:
        torch.testing.assert_close(c2[n], c1[n], rtol=1e-12, atol=1e-12, msg=n)
    if pt.use_sd:
        assert c1["l2g_loss.center"].abs().sum() > 0       # the centre did move
    # the cache holds the patch features only while the patch-text loss is on (patch_text_start)
    n_g, N = micro[0].get("global_crops", micro[0]["images"][None]).shape[0], (cfg.image_size // clip_cfg.patch_size) ** 2
    assert pt.contrastive_features(micro[0], True)[2].shape == (n_g, 4, N, clip_cfg.embed_dim)
    assert pt.contrastive_features(micro[0], False)[2] is None


def test_a_step_draws_from_no_global_generator():
    """Resume is exact by construction: nothing in a training step reads torch's, numpy's or Python's
    global random state (crops are seeded per sample, masks per sample and step), so a checkpoint
    needs none of it. Two steps from the same weights under different global seeds are identical."""
    import copy
    import random
    import numpy as np
    cfg, clip_cfg, tok, pt, teacher, dataset, collate_fn = small_setup("--method=silc+maskclip", "--mlm_weight=0.05",
                                                                 "--n_local_crops=2")
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        model, t = copy.deepcopy(pt), copy.deepcopy(teacher)
        opt = train.make_optimizer(model, cfg, torch.device("cpu"))
        batches = loader_batches(cfg, clip_cfg, tok, dataset, collate_fn, 2, 1, 0, 1, 8)
        train.train_step(model, model, t, opt, batches, 2, cfg)
        results.append({**model.state_dict(), **{"teacher." + k: v for k, v in t.state_dict().items()}})
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_teacher_switch_on_at_sd_start_resumes_exactly_and_follows_the_closed_forms(tmp_path):
    """SigLIP 2's late start: --sd_start=0.5 of 8 steps switches distillation on at step 4, with the
    teacher reset to the student. With a cosine momentum and a 0.04 -> 0.07 teacher temperature:
      * stopped at steps 4 and 5 and resumed to 8, the run equals the uninterrupted one exactly;
      * the teacher after step 4 is the student copy followed by one EMA step,
        teacher_5 = m_4 * student_4 + (1 - m_4) * student_5;
      * the logged temperature and momentum are their closed forms counted from the start step."""
    import math
    args = ["--method=silc", "--steps=8", "--batch_size=8", "--n_local_crops=2", "--sd_start=0.5",
            "--momentum_schedule=cosine", "--teacher_momentum=0.9", "--teacher_temp_warmup=0.04",
            "--teacher_temp=0.07", "--teacher_temp_warmup_frac=0.5"]
    run_train(tmp_path / "full", *args)
    run_train(tmp_path / "split", *args, "--stop_at=4")
    student_4 = read_params(tmp_path / "split")
    run_train(tmp_path / "split", *args, "--resume=True", "--stop_at=5")
    at_5 = read_params(tmp_path / "split")
    run_train(tmp_path / "split", *args, "--resume=True")
    assert_same_run(tmp_path / "full", tmp_path / "split", atol=0, params_atol=0, steps={6, 7, 8})

    start, steps = 4, 8

    def momentum(t):       # DINO's cosine from 0.9 to 1 over the distillation steps
        return 1 - (1 - 0.9) * (1 + math.cos(math.pi * (t - start) / (steps - start))) / 2

    def temperature(t):    # linear 0.04 -> 0.07 over int(0.5 * (8 - 4)) = 2 steps (train.schedule's (t + 1) / 2)
        return 0.04 + 0.03 * min(1.0, (t - start + 1) / 2)

    m4 = momentum(4)
    for name, t5 in at_5["teacher"].items():    # visual.* sits in the CLIP state, head.* in "extra"
        part = "model" if name.startswith("visual.") else "extra"
        s4, s5 = student_4[part][name], at_5[part][name]
        torch.testing.assert_close(t5, m4 * s4 + (1 - m4) * s5, rtol=1e-6, atol=1e-7)   # float32 rounding
    log = {r["step"]: r for r in read_log(tmp_path / "full")}
    assert all("teacher_temp" not in log[s] and "sd" not in log[s] for s in range(1, 5))   # off before the start
    for t in range(4, 8):          # log step t + 1 is written after step t
        assert log[t + 1]["teacher_temp"] == pytest.approx(temperature(t), abs=5e-7)   # logged to 6 decimals
        assert log[t + 1]["momentum"] == pytest.approx(momentum(t), abs=5e-7)
    assert [round(log[t]["teacher_temp"], 6) for t in (5, 6, 7, 8)] == [0.055, 0.07, 0.07, 0.07]


def test_skips_in_dataloader_workers_reach_the_log(tmp_path):
    """Each DataLoader worker counts the samples it skips in its own process; the batches carry the
    counts to the loop, which logs their sum. 16 csv rows, rows 3 and 10 unreadable, 2 workers, one
    epoch (2 steps of 8): each bad row is met once, so the log says 2."""
    import csv
    from PIL import Image
    os.makedirs(tmp_path / "img")
    rows = []
    for i in range(16):
        path = tmp_path / "img" / f"{i}.png"
        if i in (3, 10):
            path.write_bytes(b"not an image")
        else:
            Image.new("RGB", (40, 36), (10 * i, 80, 160)).save(path)
        rows.append((f"img/{i}.png", f"a picture of a circle number {i}"))
    with open(tmp_path / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        w.writerows(rows)
    run_train(tmp_path / "run", f"--data={tmp_path / 'data.csv'}", "--steps=2", "--batch_size=8",
              "--num_workers=2", "--image_size=32")
    log = read_log(tmp_path / "run")
    assert [r["skipped"] for r in log][-1] == 2


def test_a_checkpoint_write_killed_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    """A subprocess writes checkpoints in a loop (train.atomic_save, as save_checkpoint does), each a
    24 MB tensor filled with its own counter; SIGKILL at random moments, 6 times. Every time, the file
    on disk loads with weights_only=True and is whole: its tensor holds one counter throughout."""
    import random
    import signal
    import time
    path = tmp_path / "ckpt.pt"
    script = (f"import sys, torch; sys.path.insert(0, {ROOT!r}); import train\n"
              f"x = torch.empty(6_000_000)\n"
              f"for i in range(10**9):\n"
              f"    train.atomic_save({{'step': i, 'w': x.fill_(i)}}, {str(path)!r})\n"
              f"    print(i, flush=True)\n")
    rng = random.Random(0)
    seen = set()
    for trial in range(6):
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "0" or trial > 0    # at least one checkpoint written
        time.sleep(rng.uniform(0.0, 0.4))
        p.send_signal(signal.SIGKILL)
        p.wait()
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert (ckpt["w"] == ckpt["step"]).all() and ckpt["w"].numel() == 6_000_000
        seen.add(ckpt["step"])
    assert len(seen) > 1


# ---------------------------------------------------------------------------------------------
# Loss balance and the controls
# ---------------------------------------------------------------------------------------------
def test_per_tensor_clipping_as_dino_and_objective_gradient_norms():
    """--grad_clip_mode=tensor clips each gradient tensor to norm <= grad_clip on its own (DINO's
    utils.clip_gradients): by hand, g * min(1, c / (|g| + 1e-6)). log_grad_norms: each weighted objective's
    gradient norm on the image tower equals a separate backward of that objective alone."""
    import copy
    cfg, clip_cfg, tok, pt, teacher, dataset, collate_fn = small_setup("--method=silc", "--n_local_crops=2",
                                                                       "--grad_clip=0.05", "--grad_clip_mode=tensor")
    batches = loader_batches(cfg, clip_cfg, tok, dataset, collate_fn, 0, 1, 0, 1, 8)
    model, t = copy.deepcopy(pt), copy.deepcopy(teacher)
    train.accumulate_gradients(model, model, t, batches, 0, cfg)
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    captured = {}
    def optimizer_seeing_the_clipped_grads(model):       # its step records the gradients it is given
        opt = train.make_optimizer(model, cfg, torch.device("cpu"))
        opt.register_step_pre_hook(lambda o, a, k: captured.update({n: p.grad.clone() for n, p in model.named_parameters()
                                                                       if p.grad is not None}))
        return opt
    norm = train.apply_update(model, optimizer_seeing_the_clipped_grads(model), cfg, 0)
    for n, g in before.items():                          # c / (|g| + 1e-6): DINO's and torch's coefficient
        torch.testing.assert_close(captured[n], g * min(1.0, 0.05 / (g.norm().item() + 1e-6)), rtol=1e-5, atol=1e-9)
    assert sum(g.norm() > 0.05 for g in before.values()) > 3                      # some tensors were clipped
    # the logged grad_norm: the global norm before clipping, sqrt of the summed squares by hand
    total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in before.values()))
    assert norm.item() == pytest.approx(total, rel=1e-5) and total > 0.05
    # global clipping (the default mode): every tensor times the same factor c / total
    cfg.grad_clip_mode = "global"
    model, t = copy.deepcopy(pt), copy.deepcopy(teacher)
    train.accumulate_gradients(model, model, t, batches, 0, cfg)
    assert train.apply_update(model, optimizer_seeing_the_clipped_grads(model), cfg, 0).item() == pytest.approx(total, rel=1e-5)
    for n, g in before.items():
        torch.testing.assert_close(captured[n], g * (0.05 / total), rtol=1e-4, atol=1e-9)
    cfg.grad_clip_mode = "tensor"
    # per-objective gradient norms against one backward per objective
    cfg.log_grad_norms, cfg.log_interval = True, 1
    model = copy.deepcopy(pt)
    terms = train.accumulate_gradients(model, model, copy.deepcopy(teacher), batches, 0, cfg)
    visual = [p for p in model.clip.visual.parameters() if p.requires_grad]
    for name in ("contrastive", "sd"):
        m2 = copy.deepcopy(pt)
        out = m2(batches[0], train.teacher_forward(copy.deepcopy(teacher), batches[0], True, False), 0.04)
        (m2.weights[name] * out[name]).backward()
        want = torch.cat([p.grad.flatten() for p in m2.clip.visual.parameters() if p.requires_grad and p.grad is not None]).norm()
        assert terms[f"gnorm_{name}"].item() == pytest.approx(want.item(), rel=1e-4), name
    assert -1 <= terms["gcos_sd"].item() <= 1 and len(visual) > 10


def test_clip_views_control_and_patch_loss_on_all_tokens():
    """clip+views (--method=silc --sd_weight=0): SILC's two global views in the contrastive loss, no
    teacher, no head. --patch_loss=all (TIPSv2): the masked-distillation loss scores every patch."""
    cfg, clip_cfg, tok, pt, teacher, dataset, collate_fn = small_setup("--method=silc", "--sd_weight=0")
    assert not pt.use_sd and teacher is None and not hasattr(pt, "head")
    (batch,) = loader_batches(cfg, clip_cfg, tok, dataset, collate_fn, 0, 1, 0, 1, 8)
    assert batch["global_crops"].shape[0] == 2
    out = pt(batch)
    g = batch["global_crops"]
    nrm = torch.nn.functional.normalize
    with torch.no_grad():
        txt = nrm(pt.clip.text(batch["tokens"])[0], dim=-1)
        t = pt.clip.logit_scale.exp()
        want = sum(train.clip_loss(nrm(pt.clip.visual(g[v])[0], dim=-1), txt, t) for v in range(2)) / 2
        # the patch-text loss on BOTH text-paired views: each patch's projected token against the captions
        want_pt = sum(train.patch_text_loss(nrm(pt.clip.visual.proj(pt.clip.visual(g[v])[1][:, 1:]), dim=-1), txt, t)
                      for v in range(2)) / 2
    assert set(out) == {"contrastive", "patch_text", "loss"}
    assert out["contrastive"].item() == pytest.approx(want.item(), rel=1e-6)
    assert out["patch_text"].item() == pytest.approx(want_pt.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(want.item() + 0.5 * want_pt.item(), rel=1e-6)
    assert set(pt(batch, patch_text=False)) == {"contrastive", "loss"}      # before patch_text_start
    from ema import teacher_forward
    for mode in ("masked", "all"):
        cfg, clip_cfg, tok, pt, teacher, dataset, collate_fn = small_setup("--method=maskclip", f"--patch_loss={mode}",
                                                                           "--mlm_weight=0")
        (batch,) = loader_batches(cfg, clip_cfg, tok, dataset, collate_fn, 0, 1, 0, 1, 4)
        t_out = teacher_forward(teacher, batch, False, True)
        got = pt.masked_loss(batch, t_out, 0.04)
        # independent: the decoder's prediction through the patch head, soft cross-entropy per patch
        mask = batch["patch_mask"]
        _, tok_m = pt.clip.visual(batch["images"], mask=mask, mask_mode="drop")
        s = pt.patch_head(pt.decoder(tok_m, mask, pt.clip.visual))
        p_t = torch.softmax((t_out["patch"] - pt.mask_loss.center) / 0.04, -1)
        ce = -(p_t * torch.log_softmax(s / 0.1, -1)).sum(-1)                       # [b, N]
        want = ce[mask].mean() if mode == "masked" else ce.mean()
        assert got.item() == pytest.approx(want.item(), rel=1e-5), mode


def test_koleo_term_spreads_the_student_heads_global_views():
    """--koleo_weight: SILC's loss gains w_ko * (mean over the two global views of the KoLeo term on the
    student head's unit bottleneck); checked against a per-row nearest-neighbour loop. 0.1 by default
    for the SILC methods, 0 for the others."""
    from ema import teacher_forward
    cfg, clip_cfg, tok, pt, teacher, dataset, collate_fn = small_setup("--method=silc", "--koleo_weight=0.1")
    (batch,) = loader_batches(cfg, clip_cfg, tok, dataset, collate_fn, 0, 1, 0, 1, 6)
    t_out = teacher_forward(teacher, batch, True, False)
    out = pt(batch, t_out, 0.04)
    with torch.no_grad():
        want = 0.0
        for v in range(2):
            z = pt.head.embed(pt.clip.visual.pooled(pt.clip.visual(batch["global_crops"][v])[1]))   # [b, bottleneck]
            nearest = [min((z[i] - z[j]).norm() for j in range(len(z)) if j != i) for i in range(len(z))]
            want += -torch.log(torch.stack(nearest)).mean() / 2
    assert out["koleo"].item() == pytest.approx(want.item(), rel=1e-5)
    others = sum(pt.weights[k] * v for k, v in out.items() if k not in ("loss", "koleo"))
    assert out["loss"].item() == pytest.approx(others.item() + 0.1 * want.item(), rel=1e-6)
    _, _, _, pt0, teacher0, _, _ = small_setup("--method=silc", "--koleo_weight=0")
    assert "koleo" not in pt0(batch, teacher_forward(teacher0, batch, True, False), 0.04)
    assert small_setup("--method=silc")[0].koleo_weight == 0.1 and small_setup("--method=maskclip")[0].koleo_weight == 0


def test_siglip2_views_one_text_paired_teacher_view_and_local_students():
    """--sd_views=siglip2 (SigLIP 2, after SILC's advice): one global view, open_clip's 0.9-1 crop, is both
    the contrastive loss's view and the teacher's only view; the n local crops are the students. Against
    an independent computation: the contrastive and patch-text losses of that one view, and the
    distillation loss as the mean over the local views of H(P_t(global), P_s(local)), written out."""
    from ema import teacher_forward
    cfg, clip_cfg, tok, pt, teacher, dataset, collate_fn = small_setup("--method=silc", "--sd_views=siglip2",
                                                                       "--n_local_crops=3")
    views = train.train_views(cfg, clip_cfg.patch_size)
    assert (views.n_global, views.n_local, views.global_scale) == (1, 3, (0.9, 1.0))
    (batch,) = loader_batches(cfg, clip_cfg, tok, dataset, collate_fn, 0, 1, 0, 1, 8)
    assert batch["global_crops"].shape[0] == 1 and batch["local_crops"].shape[0] == 3
    assert torch.equal(batch["images"], batch["global_crops"][0])
    t_out = teacher_forward(teacher, batch, True, False)
    assert len(t_out["global"]) == 1
    out = pt(batch, t_out, 0.04)
    nrm = torch.nn.functional.normalize
    with torch.no_grad():
        txt = nrm(pt.clip.text(batch["tokens"])[0], dim=-1)
        t = pt.clip.logit_scale.exp()
        emb, tokens = pt.clip.visual(batch["images"])
        want = train.clip_loss(nrm(emb, dim=-1), txt, t)
        want_pt = train.patch_text_loss(nrm(pt.clip.visual.proj(tokens[:, 1:]), dim=-1), txt, t)
        p_t = torch.softmax((t_out["global"][0] - pt.l2g_loss.center) / 0.04, -1)        # [b, K]
        ces = []
        for v in range(3):
            s_v = pt.head(pt.clip.visual.pooled(pt.clip.visual(batch["local_crops"][v])[1]))
            ces.append(-(p_t * torch.log_softmax(s_v / cfg.student_temp, -1)).sum(-1).mean())
        want_sd = sum(ces) / 3
    assert out["contrastive"].item() == pytest.approx(want.item(), rel=1e-6)
    assert out["patch_text"].item() == pytest.approx(want_pt.item(), rel=1e-6)
    assert out["sd"].item() == pytest.approx(want_sd.item(), rel=1e-6)
    # the default is SILC's own views for both SILC methods (SigLIP 2's were screened, not kept)
    assert train.resolve_method_defaults(train.Config(method="silc")).sd_views == "silc"
    assert train.resolve_method_defaults(train.Config(method="silc+maskclip")).sd_views == "silc"


def test_the_teacher_is_evaluated_and_checkpoints_carry_their_tokenizer(tmp_path):
    """A self-distillation run's metrics.json has the EMA teacher's measures beside the student's (the
    teacher's image tower with the student's text tower), the shapes8 headline for every readout and
    the chance level, and so does every evaluation in log.jsonl (--eval_interval); the checkpoint records
    its word-level tokenizer, so eval_seg and probe rebuild it, and teacher=True loads the teacher's
    image tower."""
    from data import WordTokenizer
    from loaders.pretrained import load_model_from_checkpoint
    run_train(tmp_path / "run", "--method=silc", "--steps=2", "--batch_size=8", "--n_local_crops=2", "--eval=True",
              "--eval_samples=16", "--image_size=32", "--eval_interval=1")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # every evaluation in log.jsonl with its step (the one at step 1, the final one), and the curves drawn
    with open(tmp_path / "run" / "log.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "zeroshot_acc" in r]
    assert [r["step"] for r in evals] == [1, 2] and evals[-1] == {k: v for k, v in m.items()}
    assert "teacher_shapes8_best" in evals[0] and (tmp_path / "run" / "curves.png").exists()
    for who in ("", "teacher_"):
        for k in ("zeroshot_acc", "i2t_r1", "shapes8_naive", "shapes8_sclip", "shapes8_best", "shapes9_clearclip"):
            assert who + k in m, who + k
    assert m["shapes8_best"] == max(m[f"shapes8_{d}"] for d in ("naive", "maskclip", "sclip", "clearclip"))
    assert 0 < m["shapes8_chance"] < 100 / 8
    ckpt = read_params(tmp_path / "run")
    assert ckpt["tokenizer"]["kind"] == "word"
    student, tok = load_model_from_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    teacher, _ = load_model_from_checkpoint(str(tmp_path / "run" / "ckpt.pt"), teacher=True)
    assert isinstance(tok, WordTokenizer) and tok.words == ckpt["tokenizer"]["words"]
    assert torch.equal(teacher.visual.blocks[0].attn.in_proj.weight, ckpt["teacher"]["visual.blocks.0.attn.in_proj.weight"])
    assert torch.equal(teacher.text.proj.weight, student.text.proj.weight)
    assert not torch.equal(teacher.visual.proj.weight, student.visual.proj.weight)      # 2 EMA steps apart
    assert (tmp_path / "run" / "seg" / "seg_shapes8_naive" / "seg_grid.png").exists()
    assert (tmp_path / "run" / "teacher_seg" / "seg_shapes8_sclip" / "seg_metrics.json").exists()
