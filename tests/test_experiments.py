"""Tests of experiments/ (bench, ablate, probe): their arithmetic and bookkeeping, never their timings.

The FLOP count of bench.step_flops is checked against torch's own FlopCounterMode on a real
forward of train.py's Pretrainer and teacher (an independent count of every matmul and
convolution); the rest against hand-worked numbers and small fake runs.
"""
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import train
from clip import CLIP, CLIPConfig
from experiments import ablate, bench, probe

SMALL = dict(batch_size=4, vision_width=32, vision_layers=1, text_width=32, text_layers=1, embed_dim=32,
             head_hidden=32, head_bottleneck=16, head_out=64, n_local_crops=2)


# ---------------------------------------------------------------------------------------------
# bench.py
# ---------------------------------------------------------------------------------------------
def test_dino_head_flops_by_hand():
    # 3 layers: 10->20, 20->20, 20->5, then 5->7 prototypes: 2 * (200 + 400 + 100 + 35)
    assert bench.dino_head_flops(10, 20, 5, 7) == 2 * (200 + 400 + 100 + 35)
    assert bench.dino_head_flops(10, 20, 5, 7, nlayers=1) == 2 * (50 + 35)


@pytest.mark.parametrize("method,sd_views", [(m, "silc") for m in train.METHODS] + [("silc+maskclip", "siglip2")])
def test_step_flops_match_torch_flop_counter(method, sd_views):
    """Forward FLOPs of the student and the teacher, counted by torch (math attention, so that
    the attention matmuls are visible to the counter), equal step_flops' formula; the backward
    costs about twice the forward, which is the x3 of F_step. SigLIP 2's views: one global view."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ema import make_teacher, teacher_forward
    cfg = train.resolve_method_defaults(train.Config(method=method, sd_views=sd_views, **SMALL))
    clip_cfg, tokenizer = train.build_model_config(cfg)
    batch = bench.make_batches(cfg, clip_cfg, tokenizer, 1, torch.device("cpu"), trim=True)[0]
    torch.manual_seed(0)
    pt = train.Pretrainer(cfg, clip_cfg)
    teacher = make_teacher(pt.image_student()) if (pt.use_sd or pt.use_mask) else None
    local = batch["local_crops"].shape[-1] if "local_crops" in batch else 0
    n_masked = int(batch["patch_mask"][0].sum()) if "patch_mask" in batch else 0
    fl = bench.step_flops(cfg, clip_cfg, batch["tokens"].shape[1], local, n_masked)

    def counted(fn):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            out = fn()
        return fc.get_total_flops(), out

    t_flops, t_out = counted(lambda: teacher_forward(teacher, batch, pt.use_sd, pt.use_mask)
                             if teacher is not None else None)
    s_flops, out = counted(lambda: pt(batch, t_out, 0.07))
    b_flops, _ = counted(lambda: out["loss"].backward())
    B = cfg.batch_size
    assert t_flops == B * fl["teacher"]
    # the counter also sees the B x B logits of the contrastive loss, which step_flops leaves out
    assert s_flops == pytest.approx(B * fl["student"], rel=1e-3)
    assert s_flops > B * fl["student"]
    # backward ~ 2x forward (gradients w.r.t. inputs and weights), a little less because the first
    # convolution of the stem needs no gradient w.r.t. the image: that is the "x3" of step_flops
    assert 1.8 < b_flops / s_flops <= 2.0
    assert fl["step"] == B * (3 * fl["student"] + fl["teacher"])


def test_step_flops_parts_by_hand():
    """silc: 2 global + n local image forwards, (2 + n) head tokens; teacher 2 globals + 2 heads."""
    from clip import flops_per_image, flops_per_text
    cfg = train.resolve_method_defaults(train.Config(method="silc", **SMALL))
    clip_cfg, _ = train.build_model_config(cfg)
    fl = bench.step_flops(cfg, clip_cfg, text_len=20, local_size=28)
    head = bench.dino_head_flops(32, 32, 16, 64)
    p = fl["student_parts"]
    assert p["image_global"] == 2 * flops_per_image(clip_cfg, 64)
    assert p["image_local"] == 2 * flops_per_image(clip_cfg, 28)
    assert p["sd_head"] == 4 * head
    # text at 20 tokens, 1 layer of width 32 (MLP 128), projection 32 -> 32
    assert p["text"] == 2 * 20 * (4 * 32 * 32 + 2 * 32 * 128) + 4 * 20 * 20 * 32 + 2 * 32 * 32
    assert p["text"] < flops_per_text(clip_cfg)                          # the full 64-token context
    assert fl["teacher"] == 2 * flops_per_image(clip_cfg, 64) + 2 * head


def test_mfu_and_peaks():
    assert bench.mfu(2e12, 0.5, 8e12) == pytest.approx(0.5)      # 4 TFLOP/s achieved of 8
    assert bench.mfu(1e12, 1.0, None) is None
    assert bench.gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.gpu_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.gpu_peak_tflops("NVIDIA H200") == 989.0
    assert bench.gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.gpu_peak_tflops("Some Other GPU") is None


def test_scaling_note_by_hand():
    rows = bench.scaling_note(1000.0, epochs=[2], gpus=[8])
    cc3m = next(r for r in rows if r["dataset"] == "CC3M")
    assert cc3m["hours"] == pytest.approx(3.3e6 * 2 / 8000 / 3600)   # 0.229 h
    assert {r["dataset"] for r in rows} == {"CC3M", "CC12M"}


def test_format_table_rows():
    row = dict(size="tiny", method="silc", mode="eager", batch_size=8, step_s=0.25, samples_per_s=32.0,
               peak_mem_mib=100.0, flops_per_step=5e9, mfu=0.125, params=2e6)
    text = bench.format_table([row, dict(size="B/16", method="clip", mode="compiled", batch_size=8,
                                         error="OOM")])
    lines = text.splitlines()
    assert len(lines) == 3
    assert "250.0" in lines[1] and "12.5" in lines[1] and "5.00" in lines[1]
    assert "OOM" in lines[2]


# ---------------------------------------------------------------------------------------------
# ablate.py
# ---------------------------------------------------------------------------------------------
def test_aggregate_against_statistics():
    vals = [10.0, 12.5, 17.0]
    a = ablate.aggregate(vals + [None, float("nan")])
    assert a["n"] == 3
    assert a["mean"] == pytest.approx(13.1666667)
    assert a["std"] == pytest.approx(math.sqrt(((10 - 13.1666667) ** 2 + (12.5 - 13.1666667) ** 2
                                                + (17 - 13.1666667) ** 2) / 2))
    assert (a["min"], a["max"]) == (10.0, 17.0)
    assert ablate.aggregate([4.0])["std"] == 0.0
    assert ablate.aggregate([])["n"] == 0


def test_sec_per_step_and_equal_time():
    recs = [{"samples_per_s": 8.0}, {"samples_per_s": 64.0}, {"samples_per_s": 32.0}, {"samples_per_s": 16.0}]
    # batch 32: the first record is dropped; 32/64, 32/32, 32/16 -> median 1.0 s/step
    assert ablate.sec_per_step(recs, 32) == pytest.approx(1.0)
    assert ablate.sec_per_step(recs[:2], 32) == pytest.approx(statistics.median([4.0, 0.5]))
    assert ablate.sec_per_step([], 32) is None
    # silc takes 2.5x as long per step: clip gets 2.5x the steps
    assert ablate.equal_time_steps(1000, [0.1, 0.1], [0.25, 0.25]) == 2500
    assert ablate.equal_time_steps(1000, [], [0.2]) is None


def test_batch_size_of_and_extra_checks():
    assert ablate.batch_size_of(["x", "--batch_size=16", "--batch_size=32"]) == 32
    assert ablate.batch_size_of(["x"]) == train.Config.batch_size
    ablate.check_extra(["--lr=1e-3"])
    for bad in (["--seed=1"], ["--out_dir=x"], ["lr=1"], ["--eval=False"]):
        with pytest.raises(ValueError):
            ablate.check_extra(bad)


def test_markdown_table_cells():
    summary = ablate.summarize({"clip": [{"shapes8_naive": 10.0}, {"shapes8_naive": 14.0}]}, keys=("shapes8_naive",))
    md = ablate.markdown_table(summary, keys=("shapes8_naive",), steps={"clip": 100})
    lines = md.splitlines()
    assert lines[0] == "| method | steps | seeds | shapes8 naive |"
    std = math.sqrt(8.0)                                      # (2^2 + 2^2) / (2 - 1)
    assert lines[2] == f"| clip | 100 | 2 | 12.0 ± {std:.1f} [10.0–14.0] |"


def test_chart_draws_bar_and_whisker():
    summary = {"clip": {"shapes8_naive": {"mean": 50.0, "std": 1.0, "min": 40.0, "max": 60.0, "n": 3}}}
    img = ablate.draw_chart(summary, None, keys=("shapes8_naive",))
    # layout (see draw_chart): y axis 0..70 (60 * 1.05 rounded up to 10), plot from y=60 to 360;
    # one group 120 px wide from x=50, its one 18-px bar centred: x = 50 + (120 - 22) // 2 = 99 to 117,
    # the whisker at x=108
    y_of = lambda v: 60 + 300 * (1 - v / 70)                  # noqa: E731
    assert img.getpixel((101, int(y_of(25)))) == ablate.PALETTE[0]     # inside the bar
    assert img.getpixel((97, int(y_of(25)))) != ablate.PALETTE[0]      # left of the bar
    assert img.getpixel((101, int(y_of(56)))) != ablate.PALETTE[0]     # above the mean
    assert img.getpixel((108, int(y_of(56)))) == (0, 0, 0)             # the whisker up to the max
    assert img.getpixel((108, int(y_of(64)))) != (0, 0, 0)             # nothing above the max


def _fake_run(root, label, seed, metrics, sps):
    d = ablate.run_dir(root, label, seed)
    os.makedirs(d)
    with open(os.path.join(d, "metrics.json"), "w") as f:
        json.dump(dict(metrics, step=10), f)
    with open(os.path.join(d, "log.jsonl"), "w") as f:
        for s in sps:
            f.write(json.dumps({"step": 1, "samples_per_s": s, "loss": 1.0}) + "\n")


def test_report_from_existing_runs(tmp_path):
    root = str(tmp_path)
    for seed, (mi, acc) in enumerate([(10.0, 0.5), (12.0, 0.7)]):
        _fake_run(root, "clip", seed, {"shapes8_naive": mi, "zeroshot_acc": acc}, [128.0])
        _fake_run(root, "silc", seed, {"shapes8_naive": mi + 5, "zeroshot_acc": acc}, [64.0])
    summary = ablate.main(["--report_only", "--methods=clip,silc", "--seeds=0,1", f"--out_root={root}",
                           "--steps=10", "--equal_time"])
    assert summary["clip"]["shapes8_naive"]["mean"] == pytest.approx(11.0)
    assert summary["silc"]["shapes8_naive"]["min"] == pytest.approx(15.0)
    assert summary["clip"]["zeroshot_acc"]["mean"] == pytest.approx(60.0)      # in percent
    # s/step = batch_size / samples_per_s, with train.py's default batch size
    assert summary["clip"]["sec_per_step"]["mean"] == pytest.approx(train.Config().batch_size / 128.0)
    for ext in ("md", "png", "json"):
        assert os.path.exists(os.path.join(root, f"ablation.{ext}"))
    with open(os.path.join(root, "equal_time.json")) as f:
        assert json.load(f)["clip_steps"] == 20                                # silc is 2x slower
    with open(os.path.join(root, "ablation.md")) as f:                        # silc - clip = +5 on both seeds
        assert "5.0 ± 0.0 [5.0–5.0] (2/2 > 0)" in f.read()


def test_probe_results_are_read_and_missing_probes_listed(tmp_path):
    root = str(tmp_path)
    for seed in range(2):
        _fake_run(root, "silc", seed, {"shapes8_naive": 1.0, "teacher_zeroshot_acc": 0.5}, [64.0])
        out = ablate.run_dir(root, "silc", seed)
        with open(os.path.join(out, "probe_naive.json"), "w") as f:
            json.dump({"miou": 20.0 + seed}, f)
        # naive done; maskclip and the teacher's (the run has a teacher) missing: two probe.py commands
        cmds = ablate.probe_commands(out)
        assert len(cmds) == 2 and all(c[1:3] == ["-m", "experiments.probe"] for c in cmds)
        assert "--dense=maskclip" in cmds[0] and "--teacher" in cmds[1] and "--dense=naive" in cmds[1]
        assert f"--ckpt={os.path.join(out, 'ckpt.pt')}" in cmds[0]
    _fake_run(root, "clip", 0, {"shapes8_naive": 1.0}, [64.0])                 # no teacher: no teacher probe
    assert all("--teacher" not in c for c in ablate.probe_commands(ablate.run_dir(root, "clip", 0)))
    summary = ablate.main(["--report_only", "--methods=silc", "--seeds=0,1", f"--out_root={root}", "--steps=10"])
    assert summary["silc"]["probe_naive"]["mean"] == pytest.approx(20.5)
    assert summary["silc"]["probe_maskclip"]["n"] == 0
    with open(os.path.join(root, "ablation.md")) as f:
        md = f.read()
    assert "Dense linear probe" in md and "20.5 ± 0.7 [20.0–21.0]" in md


def test_paired_differences_by_hand():
    runs = {"clip": [{"seed": 0, "m": 10.0}, {"seed": 1, "m": 2.0}, {"seed": 2, "m": 5.0}],
            "silc": [{"seed": 1, "m": 3.0}, {"seed": 0, "m": 9.0}, {"seed": 2, "m": 8.0}],
            "maskclip": [{"seed": 0, "m": None}, {"seed": 3, "m": 1.0}]}
    paired = ablate.paired_differences(runs, keys=("m",))
    d = paired["silc"]["m"]                      # differences by seed: -1, +1, +3
    assert (d["n"], d["wins"], d["min"], d["max"]) == (3, 2, -1.0, 3.0)
    assert d["mean"] == pytest.approx(1.0) and d["std"] == pytest.approx(2.0)
    assert paired["maskclip"]["m"]["n"] == 0     # no seed with a value in both
    assert "clip" not in paired and ablate.paired_differences({"silc": runs["silc"]}, keys=("m",)) == {}


def test_launch_skips_and_records(tmp_path):
    out = str(tmp_path / "run")
    # a stand-in for train.py that takes 0.3 s and writes a metrics.json
    cmd = [sys.executable, "-c", f"import json, os, time; time.sleep(0.3); json.dump({{'step': 1}}, "
                                 f"open(os.path.join({out!r}, 'metrics.json'), 'w'))"]
    t0 = time.time()
    assert ablate.launch(cmd, out) == "ok"
    elapsed = time.time() - t0
    with open(os.path.join(out, "ablate_run.json")) as f:
        info = json.load(f)
    assert info["returncode"] == 0 and 0.3 <= info["wall_s"] <= elapsed
    assert ablate.launch(cmd, out) == "skipped"
    assert ablate.launch([sys.executable, "-c", "raise SystemExit(3)"], out, force=True) == "failed"


def test_launch_sets_threads_and_jobs_flag(tmp_path):
    # --jobs runs train.py with OMP_NUM_THREADS = cores / jobs: the stand-in writes what it saw
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-c", f"import json, os; json.dump({{'step': 1, 'omp': os.environ.get("
                                 f"'OMP_NUM_THREADS')}}, open(os.path.join({out!r}, 'metrics.json'), 'w'))"]
    assert ablate.launch(cmd, out, threads=3) == "ok"
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["omp"] == "3"
    with open(os.path.join(out, "ablate_run.json")) as f:
        assert json.load(f)["threads"] == 3
    args, _ = ablate.parse_args(["--jobs=2", "--methods=clip"])
    assert args.jobs == 2
    assert args.steps == train.Config.steps          # the ablation's default run is train.py's default
    with pytest.raises(SystemExit):     # the equal-time ratio must be timed alone
        ablate.parse_args(["--jobs=2", "--equal_time"])
    with pytest.raises(SystemExit):
        ablate.parse_args(["--jobs=0"])


def test_dry_run_with_jobs_prints_one_command_per_line_in_plan_order(tmp_path, capsys, monkeypatch):
    # --dry_run --jobs=2 printed from two threads, and two commands could share a line: print()
    # writes the text and the newline separately. The stand-in widens that gap so a second thread
    # would always land in it.
    def slow_print_launch(cmd, out_dir, force=False, dry_run=False, threads=0):
        assert dry_run
        sys.stdout.write(" ".join(cmd))
        time.sleep(0.05)
        sys.stdout.write("\n")
        return "dry_run"

    monkeypatch.setattr(ablate, "launch", slow_print_launch)
    ablate.main(["--dry_run", "--jobs=2", "--no_probe", "--methods=clip,silc", "--seeds=5,6,7",
                 f"--out_root={tmp_path}"])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    expected = [(m, s) for m in ("clip", "silc") for s in (5, 6, 7)]
    assert len(lines) == len(expected)
    for line, (m, s) in zip(lines, expected):
        assert line.count("train.py") == 1
        assert f"--method={m} " in line and f"--seed={s} " in line
        assert line.endswith(os.path.join(str(tmp_path), f"{m}_s{s}"))


# ---------------------------------------------------------------------------------------------
# probe.py: the dense linear probe, each against an independent computation
# ---------------------------------------------------------------------------------------------
def test_patch_class_fractions_by_hand():
    labels = torch.tensor([[[0, 0, 1, 2],
                            [0, 255, 1, 1],
                            [3, 3, 255, 255],
                            [3, 0, 255, 255]]])                  # [1, 4, 4], 2x2 patches
    q, count = probe.patch_class_fractions(labels, (2, 2), num_classes=4)
    assert count.tolist() == [[[3, 4], [4, 0]]]
    assert q[0, 0, 0].tolist() == [1, 0, 0, 0]                    # three 0s (one pixel ignored)
    assert q[0, 0, 1].tolist() == [0, 0.75, 0.25, 0]
    assert q[0, 1, 0].tolist() == [0.25, 0, 0, 0.75]
    assert q[0, 1, 1].tolist() == [0, 0, 0, 0]                    # nothing labelled
    with pytest.raises(ValueError, match="labels must be in"):
        probe.patch_class_fractions(labels, (2, 2), num_classes=3)
    with pytest.raises(ValueError, match="tile"):
        probe.patch_class_fractions(labels, (3, 3), num_classes=4)


def test_probe_loss_is_the_mean_pixel_cross_entropy():
    """The soft-label patch form equals a loop over pixels, each scored with its patch's logits."""
    g = torch.Generator().manual_seed(0)
    n, h, w, E, C, p = 2, 3, 2, 5, 4, 3
    feats = torch.randn(n, h, w, E, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (n, h * p, w * p), generator=g)
    labels[0, :2, :2] = 255
    weight = torch.randn(C, E, generator=g, dtype=torch.float64)
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    q, count = probe.patch_class_fractions(labels, (h, w), C)
    wd = 0.01
    got = probe.probe_loss(weight, bias, feats.reshape(-1, E), q.reshape(-1, C), count.reshape(-1), wd)
    total, pixels = 0.0, 0
    for i in range(n):
        for y in range(h * p):
            for x in range(w * p):
                if labels[i, y, x] == 255:
                    continue
                logits = (weight @ feats[i, y // p, x // p] + bias).tolist()
                lse = math.log(sum(math.exp(v) for v in logits))
                total += lse - logits[labels[i, y, x]]
                pixels += 1
    want = total / pixels + wd * float((weight ** 2).sum())
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_fit_reaches_the_optimum_and_separable_features_segment_perfectly():
    # features that encode the class of a patch along a class direction, plus noise
    g = torch.Generator().manual_seed(1)
    n, h, w, C, E, p = 6, 4, 4, 3, 8, 2
    patch_labels = torch.randint(0, C, (n, h, w), generator=g)
    directions = torch.nn.functional.normalize(torch.randn(C, E, generator=g), dim=-1)
    feats = directions[patch_labels] + 0.05 * torch.randn(n, h, w, E, generator=g)
    labels = patch_labels.repeat_interleave(p, 1).repeat_interleave(p, 2)          # [n, 8, 8]
    labels[0, :2, :2] = 255                  # patch (0, 0) of image 0 unlabelled: left out entirely
    labels[1, 0, 0] = 255                    # one unlabelled pixel
    wd = 1e-3
    info = {}
    W, b = probe.fit_probe(feats, labels, C, wd, info=info)
    assert info["grad_norm"] < 1e-5 and 0 < info["lbfgs_iterations"] <= 300
    # the objective is fitted on standardised features (mean 0, std 1 per dimension, over the
    # patches with labels); undo the folding by hand and check that its gradient there (by
    # autograd, independently) is ~0
    q, count = probe.patch_class_fractions(labels, (h, w), C)
    keep = count.reshape(-1) > 0
    assert int(keep.sum()) == n * h * w - 1
    X = feats.reshape(-1, E).double()[keep]
    mean, std = X.mean(0), X.std(0)
    W_std = (W.double() * std).requires_grad_()
    b_std = (b.double() + W.double() @ mean).requires_grad_()
    loss = probe.probe_loss(W_std, b_std, (X - mean) / std, q.reshape(-1, C)[keep], count.reshape(-1)[keep], wd)
    loss.backward()
    assert W_std.grad.abs().max() < 1e-5 and b_std.grad.abs().max() < 1e-5
    # separable features: every patch right; bilinear upsampling blends neighbouring patches'
    # logits near their borders, so pixels can only be checked loosely
    assert torch.equal((feats @ W.T + b).argmax(-1), patch_labels)
    pred = probe.probe_predict(feats, W, b, labels.shape[-2:])
    assert (pred == labels).float().mean() > 0.9
    assert probe.score(patch_labels, patch_labels, C, background_index=0)["miou"] == 100.0


def test_choose_wd_fits_on_80_percent_and_scores_the_other_20(monkeypatch):
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(10, 2, 2, 4, generator=g)
    labels = torch.randint(0, 3, (10, 4, 4), generator=g)
    wd, scores = probe.choose_wd(feats, labels, 3, background_index=0, grid=(1e-4, 1e-2))
    for v in (1e-4, 1e-2):                                   # recomputed by hand from the parts
        W, b = probe.fit_probe(feats[:8], labels[:8], 3, v)
        pred = probe.probe_predict(feats[8:], W, b, (4, 4))
        assert scores[v] == probe.score(pred, labels[8:], 3, 0)["miou"]
    assert scores[wd] == max(scores.values())
    # ties go to the larger (safer) wd
    monkeypatch.setattr(probe, "score", lambda *a, **k: {"miou": 50.0})
    assert probe.choose_wd(feats, labels, 3, 0, grid=(1e-4, 1e-2))[0] == 1e-2


def test_cli_fits_on_tune_and_scores_val(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = CLIPConfig(image_size=32, patch_size=8, stem="linear", vision_width=32, vision_layers=1,
                     vision_heads=2, text_width=32, text_layers=1, text_heads=2, embed_dim=16)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": CLIP(cfg).state_dict(), "model_config": dataclasses.asdict(cfg)}, path)
    # which split's features reach the fit, and which are scored
    source, fitted, predicted = {}, [], []
    real_extract, real_fit, real_predict = probe.extract_features, probe.fit_probe, probe.probe_predict

    def extract(model, ds, *a, **k):
        f, y = real_extract(model, ds, *a, **k)
        source[id(f)] = ds.name
        return f, y
    monkeypatch.setattr(probe, "extract_features", extract)
    monkeypatch.setattr(probe, "fit_probe", lambda f, *a, **k: fitted.append(source[id(f)]) or real_fit(f, *a, **k))
    monkeypatch.setattr(probe, "probe_predict", lambda f, *a, **k: predicted.append(source[id(f)]) or real_predict(f, *a, **k))
    results = probe.main(["--ckpt", str(path), "--max_images", "10", "--wd", "1e-3"])
    assert fitted == ["shapes8-tune"] and predicted == ["shapes8-val"]
    r = json.loads((tmp_path / "probe_naive_shapes8_tune-val_wd0.001_n10.json").read_text())
    assert r["miou"] == results[str(path)]["miou"] and r["num_fit"] == 10 and r["num_eval"] == 10
    assert r["class_names"][0] == "circle" and len(r["iou"]) == 8 and r["wd"] == 1e-3   # background ignored
    probe.main(["--ckpt", str(path), "--max_images", "10", "--wd", "1e-3", "--dataset", "shapes9"])
    r9 = json.loads((tmp_path / "probe_naive_shapes9_tune-val_wd0.001_n10.json").read_text())
    assert r9["class_names"][0] == "background" and len(r9["iou"]) == 9
    for bad in (["--ckpt", str(tmp_path / "missing.pt")], ["--ckpt", str(tmp_path)],
                ["--ckpt", str(path), "--eval_split", "tune"], ["--ckpt", str(path), "--wd", "-1"],
                ["--ckpt", str(path), "--max_images", "0"]):
        with pytest.raises(SystemExit):
            probe.main(bad)


# ---------------------------------------------------------------------------------------------
# shortcut.py: the local-crop-to-own-image shortcut
# ---------------------------------------------------------------------------------------------
def test_shortcut_statistics_by_hand_and_a_world_that_gives_itself_away():
    """The nine statistics of a view, by hand on a 2 x 2 image; the matcher finds every crop's own image
    when crops repeat their image's statistics (the extreme shortcut), and gets 1 / N right when every
    crop's statistics are those of one fixed image; measure() on the real views reports a fraction."""
    from data import normalize
    from experiments import shortcut
    px = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 0.0], [0.5, 0.5]], [[0.0, 0.0], [0.5, 0.5]]])  # [3, 2, 2]
    st = shortcut.view_statistics(normalize(px)[None])[0]
    assert st[:3].tolist() == pytest.approx([0.5, 0.25, 0.25], abs=1e-6)
    assert st[3].item() == pytest.approx(px[0].flatten().std().item(), abs=1e-6)
    assert st[6].item() == pytest.approx(0.25, abs=1e-6)                       # saturation: 1, 0, 0, 0
    luma = (px * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)
    grad = (luma[1:] - luma[:-1]).abs().mean() + (luma[:, 1:] - luma[:, :-1]).abs().mean()
    assert st[7].item() == pytest.approx(grad.item(), abs=1e-6) and st[8].item() == pytest.approx(0.25)
    g = torch.randn(10, 9, generator=torch.Generator().manual_seed(0))
    owner = torch.arange(10).repeat(3)                                          # 3 crops per image
    assert shortcut.match_top1(g, g[owner] + 0.01, owner) == 1.0
    assert shortcut.match_top1(g, g[torch.zeros(30, dtype=torch.long)], owner) == pytest.approx(0.1)
    r = shortcut.measure(train.resolve_method_defaults(train.parse_args(["--method=silc", "--n_local_crops=2"])),
                         n_images=16)
    assert 0 <= r["top1"] <= 1 and r["chance"] == 1 / 16 and r["n_local"] == 32


# ---------------------------------------------------------------------------------------------
# objects.py: shapes8 split by the number of shapes per image
# ---------------------------------------------------------------------------------------------
def test_split_by_objects_by_hand(tmp_path):
    """Three 2 x 2 images, 3 classes, 255 = background: image 1 holds one shape; images 2 and 3 hold
    two, and image 2's objects all got one name (merged). The per-group mIoUs, worked by hand from
    the confusion matrices; then measure() on a real (untrained, tiny) checkpoint, whose "all" group
    must equal eval_seg's own shapes8 mIoU on the same images."""
    import eval_seg
    from experiments import objects
    from loaders.segmentation import load_dataset
    B = 255
    truths = [torch.tensor([[0, 0], [B, B]]), torch.tensor([[1, 2], [B, 1]]), torch.tensor([[2, 2], [0, B]])]
    preds = [torch.tensor([[0, 1], [2, 2]]), torch.tensor([[1, 1], [0, 1]]), torch.tensor([[2, 2], [0, 0]])]
    conf, merged, several = objects.split_by_objects(truths, preds, 3)
    assert several == 2 and merged == 0.5
    assert conf["1"].counts.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 0]]
    assert conf["2+"].counts.tolist() == [[1, 0, 0], [0, 2, 0], [0, 1, 2]]
    miou = {k: eval_seg.miou_from_confusion(c.counts)["miou"] for k, c in conf.items()}
    # "1": class 0 IoU 1/2, class 1 0/1, class 2 absent. "2+": 1/1, 2/3, 2/3. "all" (the two summed):
    # class 0 2/3, class 1 2/4 (predicted on 4 pixels, true on 2), class 2 2/3.
    assert miou["1"] == pytest.approx(1 / 4) and miou["2+"] == pytest.approx(7 / 9)
    assert miou["all"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)

    train.main(["--steps=1", "--eval=False", "--batch_size=8", "--num_workers=0", f"--out_dir={tmp_path}"])
    ckpt = os.path.join(tmp_path, "ckpt.pt")
    r = objects.measure(ckpt, split="tune", max_images=12)
    model, tok = eval_seg.load_model_from_checkpoint(ckpt, "cpu")
    ref = eval_seg.evaluate_segmentation(model, tok, load_dataset("shapes8", split="tune", size=64), max_images=12,
                                         progress=False)
    assert r["miou_all"] == pytest.approx(ref["miou"], abs=1e-3)
    assert r["images_1"] + r["images_2+"] == 12 and r["images_2+"] > 0


# ---------------------------------------------------------------------------------------------
# linprobe.py: linear-probe and few-shot classification on frozen image embeddings
# ---------------------------------------------------------------------------------------------
def test_logistic_fit_equals_naive_gradient_descent():
    """probe.fit_logistic (L-BFGS on standardised features, folded back) against plain gradient descent
    written here on the same objective (mean cross-entropy + wd |W|^2 on standardised features): the
    same W and, up to the constant that no softmax sees, the same b."""
    from experiments import linprobe
    g = torch.Generator().manual_seed(0)
    n, E, C, wd = 30, 4, 3, 0.05
    X = torch.randn(n, E, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.2, 1.0], dtype=torch.float64) + 2
    y = torch.randint(0, C, (n,), generator=g)
    W, b = linprobe.fit(X, y, C, wd)
    m, s = X.mean(0), X.std(0)
    Z = (X - m) / s
    Wz = torch.zeros(C, E, dtype=torch.float64)
    bz = torch.zeros(C, dtype=torch.float64)
    Y = torch.nn.functional.one_hot(y, C).double()
    for _ in range(20000):                                  # gradient by hand: (softmax - Y) / n, + 2 wd W
        P = torch.softmax(Z @ Wz.T + bz, dim=1)
        Wz -= 0.5 * ((P - Y).T @ Z / n + 2 * wd * Wz)
        bz -= 0.5 * (P - Y).mean(0)
    W_ref, b_ref = Wz / s, bz - (Wz / s) @ m
    assert (W.double() - W_ref).abs().max() < 1e-4
    assert ((b.double() - b.double().mean()) - (b_ref - b_ref.mean())).abs().max() < 1e-4


def test_linear_probe_protocol_on_separable_toy_features():
    """Well separated clusters (one per class): the probe and every few-shot draw get val right; the
    held-out split is 20% of each class, disjoint from the fitted part; the chosen wd's held-out score
    is recomputed by hand; k-shot draws hold k images per class from the fitted part only."""
    from experiments import linprobe
    g = torch.Generator().manual_seed(1)
    C, E = 6, 8
    centres = 3 * torch.nn.functional.normalize(torch.randn(C, E, generator=g), dim=-1)
    def cloud(per_class):
        y = torch.arange(C).repeat_interleave(per_class)
        return centres[y] + 0.1 * torch.randn(len(y), E, generator=g), y
    (tr_f, tr_y), (va_f, va_y) = cloud(15), cloud(5)
    fit_idx, held_idx = linprobe.split_holdout(tr_y, seed=0)
    assert set(fit_idx.tolist()).isdisjoint(held_idx.tolist()) and len(fit_idx) + len(held_idx) == len(tr_y)
    assert torch.bincount(tr_y[held_idx]).tolist() == [3] * C                 # round(0.2 * 15) per class
    shots = linprobe.draw_shots(tr_y, fit_idx, 5, torch.Generator().manual_seed(0))
    assert torch.bincount(tr_y[shots]).tolist() == [5] * C and set(shots.tolist()) <= set(fit_idx.tolist())
    r = linprobe.run_linprobe(tr_f, tr_y, va_f, va_y, C, shots=(1, 5), draws=2, grid=(1e-3, 1e-1))
    assert r["linear"]["top1"] == 1.0 and r["linear"]["top5"] == 1.0
    assert r["fewshot"]["1"]["top1_draws"] == [1.0, 1.0] and r["fewshot"]["5"]["top1_mean"] == 1.0
    wd = r["linear"]["wd"]
    W, b = linprobe.fit(tr_f[fit_idx], tr_y[fit_idx], C, wd)
    hand = ((tr_f[held_idx] @ W.T + b).argmax(1) == tr_y[held_idx]).float().mean().item()
    assert r["linear"]["wd_holdout_top1"][wd] == pytest.approx(hand)
    assert wd == 1e-1                                        # both perfect on held-out: ties -> the larger wd
    # a harder problem, where the classes overlap: accuracy well below 1 but above chance
    noisy = (centres[va_y] + 3 * torch.randn(len(va_y), E, generator=g), va_y)
    r = linprobe.run_linprobe(tr_f + 3 * torch.randn(tr_f.shape, generator=g), tr_y, *noisy, C, shots=(), grid=(1e-2,))
    assert 1 / C < r["linear"]["top1"] < 1.0


def test_linprobe_and_curves_commands(tmp_path):
    """python -m experiments.linprobe on the shapes world written as class folders (a random tiny
    checkpoint: the numbers are whatever they are, the JSON must hold them all), and the curves command."""
    from PIL import Image
    from experiments import curves, linprobe
    from loaders.shapes import write_shapes_files
    paths = write_shapes_files(str(tmp_path / "data"), n_train=2, n_val=2, n_class=3, size=32, bad_samples=True)
    torch.manual_seed(0)
    cfg = CLIPConfig(image_size=32, patch_size=8, stem="linear", vision_width=32, vision_layers=1,
                     vision_heads=2, text_width=32, text_layers=1, text_heads=2, embed_dim=16)
    torch.save({"model": CLIP(cfg).state_dict(), "model_config": dataclasses.asdict(cfg)}, tmp_path / "ckpt.pt")
    with pytest.warns(RuntimeWarning, match="skipped"):
        r = linprobe.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--train", paths["classes_train"], "--val",
                           paths["classes_val"], "--shots", "1,2", "--draws", "2", "--num_workers", "0",
                           "--device", "cpu"])
    saved = json.loads((tmp_path / "linprobe.json").read_text())
    assert saved["num_train"] == 24 and saved["num_val"] == 24 and saved["skipped"] == {"train": 0, "val": 1}
    assert saved["classes"] == 8 and set(saved["fewshot"]) == {"1", "2"}
    assert len(saved["fewshot"]["2"]["top1_draws"]) == 2
    assert 0 <= saved["linear"]["top1"] <= saved["linear"]["top5"] <= 1
    assert saved["linear"]["top1"] == r["linear"]["top1"] and saved["linear"]["wd"] in linprobe.WD_GRID
    for c in ("x", "y"):
        os.makedirs(tmp_path / "other" / c)
        Image.new("RGB", (8, 8)).save(tmp_path / "other" / c / "0.png")
    with pytest.raises(SystemExit):                          # different class folders in train and val
        linprobe.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--train", paths["classes_train"],
                       "--val", str(tmp_path / "other"), "--num_workers", "0", "--device", "cpu"])
    log = tmp_path / "run" / "log.jsonl"
    os.makedirs(log.parent)
    log.write_text("\n".join(json.dumps({"step": s, "lr": 0.1, "contrastive": 1.0 / s, "samples_per_s": 1})
                             for s in (1, 2, 3)) + "\n" + json.dumps({"step": 3, "zeroshot_top1": 0.5}) + "\n")
    points = curves.main([str(log), str(log), "--out", str(tmp_path / "c.png"), "--labels", "a,b"])
    assert (tmp_path / "c.png").exists() and set(points["contrastive"]) == {"a", "b"}
    assert [v for _, v, _, _ in points["contrastive"]["a"]] == [1.0, 0.5, 1.0 / 3]
    with pytest.raises(SystemExit):
        curves.main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "d.png")])


def test_training_curves_plot_the_logged_values(tmp_path):
    """A synthetic log.jsonl (training records every 10 steps, evaluations every 50, one NaN, two runs):
    every plotted point is a logged value at its step, at the pixel the panel's axes put it, drawn in
    its run's colour; keys nobody logged get no panel; the PNG is written whole (no .tmp left)."""
    from PIL import Image

    from eval_seg import DISTINCT_COLOURS
    from experiments import curves
    log_a = [{"step": s, "lr": 1e-3 * s / 100, "contrastive": 5.0 - s / 50, "loss": 5.0, "samples_per_s": 1.0}
             for s in range(10, 101, 10)]
    log_a += [{"step": 50, "zeroshot_top1": 0.2, "val_i2t_r1": 0.1}, {"step": 100, "zeroshot_top1": 0.4,
                                                                      "val_i2t_r1": float("nan")}]
    log_b = [{"step": s, "lr": 5e-4, "contrastive": 4.0, "sd": 3.0 - s / 100} for s in (20, 40)]
    for name, log in (("a", log_a), ("b", log_b)):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "log.jsonl", "w") as f:
            f.write("\n".join(json.dumps(r) for r in log) + "\n")
    out = str(tmp_path / "curves.png")
    points = curves.save_curves([str(tmp_path / "a" / "log.jsonl"), str(tmp_path / "b" / "log.jsonl")], out)
    assert os.path.exists(out) and not os.path.exists(out + ".tmp")
    assert list(points) == ["contrastive", "sd", "lr", "zeroshot_top1", "val_i2t_r1"]     # CURVE_KEYS order
    img = Image.open(out).convert("RGB")
    colour = {"a": DISTINCT_COLOURS[0], "b": DISTINCT_COLOURS[1]}
    for key, per_run in points.items():
        for label, log in (("a", log_a), ("b", log_b)):
            want = [(r["step"], r[key]) for r in log if key in r and math.isfinite(r[key])]
            got = per_run.get(label, [])
            assert [(t, v) for t, v, _, _ in got] == want, (key, label)
        xs = [(t, x) for pts in per_run.values() for t, _, x, _ in pts]
        ys = [(v, y) for pts in per_run.values() for _, v, _, y in pts]
        # x is linear in the step from 0 (the panel's left edge) to the last step, 100, for every panel
        (t0, x0), (t1, x1) = min(xs), max(xs)
        assert all(abs(x - (x0 + (x1 - x0) * (t - t0) / (t1 - t0 or 1))) < 1e-6 for t, x in xs)
        # y is linear and decreasing in the value
        (v0, y0), (v1, y1) = min(ys), max(ys)
        assert all(abs(y - (y0 + (y1 - y0) * (v - v0) / (v1 - v0 or 1))) < 1e-6 for v, y in ys) and (v1 == v0 or y1 < y0)
    for key, per_run in points.items():
        for label, pts in per_run.items():
            for _, _, x, y in pts:
                assert img.getpixel((round(x), round(y))) == colour[label], (key, label)
    with pytest.raises(ValueError, match="nothing to draw"):
        curves.draw_curves({"x": [{"step": 1, "other": 2.0}]})
