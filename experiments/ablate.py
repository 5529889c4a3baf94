"""experiments/ablate.py: does self-distillation make better dense features? One command trains clip,
clip+views (SILC's views and contrastive loss, distillation weight 0: the control that separates extra
views from distillation), silc, maskclip and silc+maskclip with the same model, data, steps and seeds,
evaluates each (the student, and the EMA teacher where there is one), and writes a table, a bar chart
and a JSON summary.

Each run is a subprocess of train.py (so the ablation measures exactly what anyone gets from it):

    python train.py --method=M --seed=S --steps=T --eval_split=SPLIT --out_dir=OUT_ROOT/M_sS [extra]

and is read back from its metrics.json (train.py's final evaluation on the shapes data: zero-shot
classification, image<->text retrieval R@1, zero-shot segmentation mIoU on shapes8, background
ignored as on VOC-20, with every dense readout and their best, and shapes9 with background as a class)
and its log.jsonl (training throughput). Every arm trains with train.py's defaults, so on the shapes world
each one includes the patch-text loss (losses.patch_text_loss); `-- --patch_text_weight=0` compares
the papers' losses alone.
Then experiments/probe.py fits a dense linear probe on the run's patch features (naive and MaskCLIP trick:
fitted on the tune split, scored on val), which tells apart "the patch features do not know the
classes" from "they know them but do not line up with the class names" (--no_probe skips it).

Aggregation over seeds, per method and metric: mean, sample standard deviation (n - 1 in the
denominator; 0 with one seed), min and max. Percent everywhere: accuracy and recall are
multiplied by 100, mIoU is already in percent (eval_seg.py). "Seed ranges do not overlap" (issue 7)
means min of one method > max of the other.

Equal wall-clock comparison (--equal_time). The distillation losses make a step dearer, so at
equal steps SILC also spent more compute. The fair second comparison gives CLIP the time SILC took:
    sec/step(M)  = median over log.jsonl records (the first one, which holds start-up, dropped when
                   there are 3 or more) of batch_size / samples_per_s, the training loop's own clock:
                   it excludes start-up and the final evaluation (an eval_interval evaluation falls
                   into the interval after it, which the median ignores)
    T_clip       = round(T * mean_seeds sec/step(silc) / mean_seeds sec/step(clip))
and trains clip for T_clip steps (OUT_ROOT/clip_eqtime_sS; its schedules span T_clip). Measured
from the equal-step runs, which run first, and saved in OUT_ROOT/equal_time.json so that a resumed
sweep keeps the same T_clip; run the sweep on an otherwise idle machine, or the ratio carries the
noise of whatever else ran. The wall time of every subprocess is recorded too
(wall_s: start-up + training + evaluation).

Resumable: a run whose metrics.json exists is skipped (--force reruns it from scratch); a run with a
checkpoint but no metrics.json continues with --resume=True.

Run it:
    python -m experiments.ablate --dry_run                                   # print the commands
    python -m experiments.ablate --seeds=0,1,2 --equal_time                  # the sweep (540 steps), then the report
    python -m experiments.ablate --steps=3000 --eval_split=tune -- --batch_size=128 --lr=1e-3   # train.py overrides after --
    python -m experiments.ablate --jobs=2 --steps=540                        # 2 runs at a time (small CPUs; see --help)
Outputs (in --out_root): ablation.md, ablation.png, ablation.json, and one folder per run.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from train import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root
# The ablation's arms: a label -> its train.py flags. clip+views is SILC's views and contrastive loss
# (both global crops, scale 0.4-1, each paired with the caption) with no distillation: it separates
# "extra views" from "distillation", which SILC's reviewers asked for.
ARMS = {"clip": ["--method=clip"], "clip+views": ["--method=silc", "--sd_weight=0"], "silc": ["--method=silc"],
        "maskclip": ["--method=maskclip"], "silc+maskclip": ["--method=silc+maskclip"]}
# metric key in metrics.json -> (column title, factor to percent). shapes8: background ignored, the 8
# shapes as classes (the field's headline convention, as VOC-20); best: the best of the 4 dense readouts.
METRICS = {
    "shapes8_best": ("shapes8 best", 1.0),
    "shapes8_naive": ("shapes8 naive", 1.0),
    "shapes8_maskclip": ("shapes8 MaskCLIP", 1.0),
    "shapes8_sclip": ("shapes8 SCLIP", 1.0),
    "shapes8_clearclip": ("shapes8 ClearCLIP", 1.0),
    "shapes9_best": ("shapes9 best (with bg)", 1.0),
    "zeroshot_acc": ("zero-shot acc", 100.0),
    "i2t_r1": ("I->T R@1", 100.0),
    "t2i_r1": ("T->I R@1", 100.0),
    "teacher_shapes8_best": ("teacher shapes8 best", 1.0),
    "teacher_zeroshot_acc": ("teacher zero-shot acc", 100.0),
}
# dense linear probe (probe.py on each run's checkpoint, shapes8): key -> (column title, dense mode, who)
PROBE = {
    "probe_naive": ("probe shapes8 naive", "naive", ""),
    "probe_maskclip": ("probe shapes8 MaskCLIP", "maskclip", ""),
    "probe_teacher_naive": ("teacher probe shapes8 naive", "naive", "teacher_"),
}
COST = {"sec_per_step": ("s/step", 1.0), "wall_s": ("wall s", 1.0)}
TITLES = {k: v[0] for k, v in {**METRICS, **PROBE, **COST}.items()}   # column / chart-group titles
EQTIME = "clip_eqtime"          # the label (and folder prefix) of the equal-wall-clock CLIP runs
RESERVED = ("method", "sd_weight", "seed", "steps", "out_dir", "eval_split", "resume")   # set by ablate.py


# -----------------------------------------------------------------------------------------------
# Commands and runs
# -----------------------------------------------------------------------------------------------
def run_dir(out_root, label, seed):
    return os.path.join(out_root, f"{label}_s{seed}")


def train_command(arm, seed, steps, eval_split, out_dir, extra=(), python=sys.executable):
    """The train.py command line of one run of an arm (a list for subprocess)."""
    return [python, os.path.join(ROOT, "train.py"), *ARMS[arm], f"--seed={seed}",
            f"--steps={steps}", f"--eval_split={eval_split}", f"--out_dir={out_dir}", *extra]


def check_extra(extra):
    """train.py overrides after `--` must be --key=value and must not set what ablate.py sets."""
    for arg in extra:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"extra train.py arguments must look like --key=value, got {arg!r}")
        key = arg[2:].split("=", 1)[0].replace("-", "_")
        if key in RESERVED:
            raise ValueError(f"--{key} is set by ablate.py (use its own flags), not after `--`")
        if key == "eval" and arg.split("=", 1)[1].lower() in ("false", "0", "no"):
            raise ValueError("--eval=False would leave no metrics.json to compare")


def batch_size_of(cmd):
    """The global batch size a train.py command line runs with (its last --batch_size, else the default)."""
    value = None
    for arg in cmd:
        if arg.startswith("--batch_size=") or arg.startswith("--batch-size="):
            value = int(arg.split("=", 1)[1])
    if value is None:
        value = Config.batch_size
    return value


def launch(cmd, out_dir, force=False, dry_run=False, threads=0):
    """Run one train.py command unless its metrics.json exists. Its stdout and stderr go to
    out_dir/train_output.txt; the command, return code and wall time to out_dir/ablate_run.json.
    threads > 0 sets OMP_NUM_THREADS for the run (torch's intra-op threads).
    Returns 'skipped', 'dry_run', 'ok' or 'failed'."""
    metrics = os.path.join(out_dir, "metrics.json")
    if dry_run:
        print(" ".join(cmd))
        return "dry_run"
    if os.path.exists(metrics) and not force:
        return "skipped"
    if force and os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    resumed = os.path.exists(os.path.join(out_dir, "ckpt.pt"))
    if resumed:
        cmd = cmd + ["--resume=True"]
    elif os.path.exists(os.path.join(out_dir, "log.jsonl")):
        os.remove(os.path.join(out_dir, "log.jsonl"))      # train.py appends: start a fresh log
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads > 0 else None
    t = time.time()
    with open(os.path.join(out_dir, "train_output.txt"), "a") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.time() - t
    with open(os.path.join(out_dir, "ablate_run.json"), "w") as f:
        json.dump({"cmd": cmd, "returncode": rc, "wall_s": wall, "resumed": resumed,
                   "threads": threads or None}, f, indent=2)
    return "ok" if rc == 0 and os.path.exists(metrics) else "failed"


# -----------------------------------------------------------------------------------------------
# Reading runs back
# -----------------------------------------------------------------------------------------------
def read_log(path):
    """The training records of a log.jsonl (the ones with a samples_per_s field)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in (json.loads(line) for line in f if line.strip()) if "samples_per_s" in r]


def sec_per_step(records, batch_size):
    """Median seconds per optimizer step over log records (B / samples_per_s); the first record,
    which includes start-up (data workers, first allocations), is dropped when there are >= 3."""
    sps = [r["samples_per_s"] for r in records if r.get("samples_per_s")]
    if len(sps) >= 3:
        sps = sps[1:]
    if not sps:
        return None
    return statistics.median(batch_size / s for s in sps)


def read_run(out_dir, cmd):
    """One finished run as a flat dict: the metrics in percent, sec_per_step, wall_s, steps.
    None if its metrics.json is missing."""
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        m = json.load(f)
    row = {"out_dir": out_dir, "step": m.get("step")}
    for key, (_, factor) in METRICS.items():
        v = m.get(key)
        row[key] = None if v is None or (isinstance(v, float) and math.isnan(v)) else factor * v
    row["sec_per_step"] = sec_per_step(read_log(os.path.join(out_dir, "log.jsonl")), batch_size_of(cmd))
    wall = None
    info = os.path.join(out_dir, "ablate_run.json")
    if os.path.exists(info):
        with open(info) as f:
            wall = json.load(f).get("wall_s")
    row["wall_s"] = wall
    for key, (_, dense, who) in PROBE.items():               # probe.py's results, where they exist
        probe_path = os.path.join(out_dir, f"probe_{who}{dense}.json")
        row[key] = None
        if os.path.exists(probe_path):
            with open(probe_path) as f:
                row[key] = json.load(f).get("miou")
    return row


def probe_commands(out_dir, python=sys.executable):
    """probe.py's commands for a finished run whose probe results are missing (one per dense mode,
    and the teacher's when the run has one)."""
    ckpt = os.path.join(out_dir, "ckpt.pt")
    has_teacher = False
    if os.path.exists(os.path.join(out_dir, "metrics.json")):
        with open(os.path.join(out_dir, "metrics.json")) as f:
            has_teacher = "teacher_zeroshot_acc" in json.load(f)
    return [[python, "-m", "experiments.probe", f"--ckpt={ckpt}", f"--dense={dense}"] + (["--teacher"] if who else [])
            for _, dense, who in PROBE.values() if has_teacher or not who
            if not os.path.exists(os.path.join(out_dir, f"probe_{who}{dense}.json"))]


def run_probes(out_dir, dry_run=False, threads=0):
    """Run the missing dense linear probes of one run (output appended to train_output.txt).
    Returns False if one failed."""
    ok = True
    for cmd in probe_commands(out_dir):
        if dry_run:
            print(" ".join(cmd))
            continue
        env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads > 0 else None
        with open(os.path.join(out_dir, "train_output.txt"), "a") as f:
            ok &= subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode == 0
    return ok


def equal_time_steps(steps, clip_sec_per_step, silc_sec_per_step):
    """CLIP's step count for the wall time SILC needs for `steps` steps (means over seeds)."""
    clip_s = [x for x in clip_sec_per_step if x]
    silc_s = [x for x in silc_sec_per_step if x]
    if not clip_s or not silc_s:
        return None
    return max(1, round(steps * statistics.mean(silc_s) / statistics.mean(clip_s)))


# -----------------------------------------------------------------------------------------------
# Aggregation, table, chart
# -----------------------------------------------------------------------------------------------
def aggregate(values):
    """mean, sample std (n - 1; 0 for one value), min, max and n of the non-missing values."""
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    std = statistics.stdev(v) if len(v) > 1 else 0.0
    return {"mean": statistics.mean(v), "std": std, "min": min(v), "max": max(v), "n": len(v)}


def summarize(runs, keys=tuple(METRICS) + tuple(PROBE) + tuple(COST)):
    """runs: {label: [run dict per seed]} -> {label: {metric: aggregate}}."""
    return {label: {k: aggregate([r.get(k) for r in rows]) for k in keys} for label, rows in runs.items()}


def paired_differences(runs, base="clip", keys=tuple(METRICS) + tuple(PROBE)):
    """Per-seed differences to the base method: {label: {metric: aggregate of m(label, s) - m(base, s)}}
    over the seeds both have. The same seed means the same initial CLIP weights and the same image
    order, so a paired difference removes the seed-to-seed spread that both methods share."""
    if base not in runs:
        return {}
    base_by_seed = {r["seed"]: r for r in runs[base]}
    out = {}
    for label, rows in runs.items():
        if label == base:
            continue
        out[label] = {}
        for k in keys:
            diffs = [r[k] - base_by_seed[r["seed"]][k] for r in rows
                     if r["seed"] in base_by_seed and r.get(k) is not None
                     and base_by_seed[r["seed"]].get(k) is not None]
            out[label][k] = dict(aggregate(diffs), wins=sum(d > 0 for d in diffs))
    return out


def fmt_cell(a, digits=1):
    if a["n"] == 0:
        return "n/a"
    return (f"{a['mean']:.{digits}f} ± {a['std']:.{digits}f} "
            f"[{a['min']:.{digits}f}–{a['max']:.{digits}f}]")


def markdown_table(summary, keys=tuple(METRICS) + tuple(COST), steps=None):
    """One row per method (label): 'mean ± std [min–max]' per metric, n = seeds."""
    head = ["method", "steps", "seeds"] + [TITLES[k] for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, agg in summary.items():
        n = max(agg[k]["n"] for k in keys)                  # seeds with a value in these columns
        s = "" if steps is None else str(steps.get(label, ""))
        cells = [fmt_cell(agg[k], 2 if k == "sec_per_step" else (0 if k == "wall_s" else 1)) for k in keys]
        lines.append("| " + " | ".join([label, s, str(n)] + cells) + " |")
    return "\n".join(lines)


def paired_table(paired):
    """paired_differences as markdown: 'mean ± std [min–max] (wins/n > 0)' per metric that any
    method has, one row per method."""
    keys = [k for k in tuple(METRICS) + tuple(PROBE) if any(p[k]["n"] for p in paired.values())]
    head = ["method − clip", "seeds"] + [TITLES[k] for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, agg in paired.items():
        n = max(a["n"] for a in agg.values())
        cells = [f"{fmt_cell(agg[k])} ({agg[k]['wins']}/{agg[k]['n']} > 0)" if agg[k]["n"] else "n/a"
                 for k in keys]
        lines.append("| " + " | ".join([label, str(n)] + cells) + " |")
    return "\n".join(lines)


PALETTE = [(66, 103, 172), (221, 132, 82), (85, 168, 104), (196, 78, 82), (129, 114, 179), (147, 120, 96)]


def draw_chart(summary, path, keys=tuple(METRICS), title="", width=None, height=420):
    """Grouped bar chart with PIL: one group per metric, one bar per method (mean over seeds), a
    whisker from min to max over seeds. Returns the PIL image (also saved to `path` if given)."""
    from PIL import Image, ImageDraw, ImageFont
    labels = list(summary)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:                                        # Pillow < 10.1: fixed bitmap font
        font = ImageFont.load_default()
    widest = max((font.getlength(TITLES.get(k, k)) for k in keys), default=0)
    group_w = max(30 + 22 * len(labels), 120, int(widest) + 16)   # room for the widest group label
    left, right, top, bottom = 50, 20, 60, 60
    width = width or left + right + group_w * len(keys)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    top_val = max([a["max"] for agg in summary.values() for k, a in agg.items() if k in keys and a["n"]] + [1.0])
    y_max = 10 * math.ceil(top_val * 1.05 / 10)              # percent axis in steps of 10
    plot_h = height - top - bottom

    def y_of(v):
        return top + plot_h * (1 - v / y_max)

    tick = 10 if y_max <= 60 else 20
    for v in range(0, y_max + 1, tick):                      # grid and y labels
        y = y_of(v)
        d.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        d.text((left - 6, y), str(v), fill="black", font=font, anchor="rm")
    d.line([(left, top), (left, top + plot_h)], fill="black")
    d.line([(left, top + plot_h), (width - right, top + plot_h)], fill="black")
    bar_w = 18
    for gi, key in enumerate(keys):
        x0 = left + gi * group_w + (group_w - 22 * len(labels)) // 2    # bars centred in their group
        for li, label in enumerate(labels):
            a = summary[label][key]
            if not a["n"]:
                continue
            x = x0 + li * 22
            colour = PALETTE[li % len(PALETTE)]
            d.rectangle([x, y_of(a["mean"]), x + bar_w, y_of(0)], fill=colour)
            cx = x + bar_w / 2                               # whisker: min..max over seeds
            d.line([(cx, y_of(a["min"])), (cx, y_of(a["max"]))], fill="black", width=1)
            for v in (a["min"], a["max"]):
                d.line([(cx - 4, y_of(v)), (cx + 4, y_of(v))], fill="black", width=1)
        name = TITLES.get(key, key)
        d.text((x0 + len(labels) * 11, top + plot_h + 8), name, fill="black", font=font, anchor="mt")
    # title and legend
    d.text((left, 8), title or "bars: mean over seeds; whiskers: min-max", fill="black", font=font)
    x = left
    for li, label in enumerate(labels):
        n = max(a["n"] for a in summary[label].values())
        d.rectangle([x, 32, x + 12, 44], fill=PALETTE[li % len(PALETTE)])
        text = f"{label} (n={n})"
        d.text((x + 16, 38), text, fill="black", font=font, anchor="lm")
        x += 16 + int(d.textlength(text, font=font)) + 18
    if path:
        img.save(path)
    return img


# -----------------------------------------------------------------------------------------------
# main
# -----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Arguments after `--` go to every train.py run (e.g. -- --batch_size=64).")
    p.add_argument("--methods", default=",".join(ARMS), help=f"arms, from {', '.join(ARMS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=540, help="optimizer steps per run (default: train.py's)")
    p.add_argument("--eval_split", default="val", choices=("val", "tune"))
    p.add_argument("--out_root", default="runs")
    p.add_argument("--equal_time", action="store_true",
                   help="also train clip for the wall time silc takes (needs clip and silc)")
    p.add_argument("--jobs", type=int, default=1,
                   help="train.py runs at once, each with cores/jobs threads: more total throughput on "
                        "a small CPU (2 one-thread runs on 2 cores did 2 x 38 samples/s against 63 for one "
                        "two-thread run), but the s/step and wall columns then time a shared machine")
    p.add_argument("--no_probe", dest="probe", action="store_false",
                   help="skip the dense linear probe (probe.py) of each finished run")
    p.add_argument("--force", action="store_true", help="rerun runs whose metrics.json exists")
    p.add_argument("--dry_run", action="store_true", help="print the train.py commands, run nothing")
    p.add_argument("--report_only", action="store_true", help="run nothing; summarise what exists")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
        if m not in ARMS:
            p.error(f"unknown arm {m!r}; choose from {list(ARMS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s != ""]
        check_extra(extra)
    except ValueError as e:
        p.error(str(e))
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.equal_time:
        if args.jobs > 1:
            p.error("--equal_time needs --jobs=1: the step-time ratio must come from runs alone on the machine")
        args.methods += [m for m in ("clip", "silc") if m not in args.methods]
    return args, extra


def equal_time_steps_for(args, cmds, extra):
    """CLIP's step count at SILC's wall time (--equal_time), measured once from the equal-step runs and
    kept in equal_time.json: a rerun (resume) must not give the remaining seeds a different count
    because the timing noise moved. None until the runs it is measured from exist."""
    eq_path = os.path.join(args.out_root, "equal_time.json")
    if os.path.exists(eq_path) and not args.force:
        with open(eq_path) as f:
            saved = json.load(f)
        if saved["steps"] == args.steps:
            return saved["clip_steps"]
    reads = {m: [read_run(run_dir(args.out_root, m, s), cmds[(m, s)][0]) for s in args.seeds] for m in ("clip", "silc")}
    sps = {m: [r["sec_per_step"] for r in reads[m] if r] for m in reads}
    eq_steps = equal_time_steps(args.steps, sps["clip"], sps["silc"])
    if eq_steps is not None and not args.dry_run:
        with open(eq_path, "w") as f:
            json.dump({"steps": args.steps, "clip_steps": eq_steps, "clip_sec_per_step": sps["clip"],
                       "silc_sec_per_step": sps["silc"]}, f, indent=2)
    if eq_steps is None:
        print(f"# equal time: clip's step count = steps x (silc s/step) / (clip s/step), measured "
              f"from the runs above once they exist; e.g. with --steps={args.steps}:")
        if args.dry_run:
            for s in args.seeds:
                print(" ".join(train_command("clip", s, "<T_clip>", args.eval_split,
                                             run_dir(args.out_root, EQTIME, s), extra)))
    return eq_steps


def write_report(args, extra, cmds, eq_steps, threads):
    """ablation.md (tables, paired differences), ablation.png and ablation.json of the finished runs."""
    runs, steps_of = {}, {}
    for (label, seed), (cmd, out) in cmds.items():
        r = read_run(out, cmd)
        if r is not None:
            runs.setdefault(label, []).append(dict(r, seed=seed))
            steps_of[label] = r["step"]
    if not runs:
        print("no finished runs to summarise")
        return None
    summary = summarize(runs)
    md_path, png_path, json_path = (os.path.join(args.out_root, f"ablation.{e}") for e in ("md", "png", "json"))
    cmd_line = " ".join(["python -m experiments.ablate", f"--methods={','.join(args.methods)}",
                         f"--seeds={','.join(map(str, args.seeds))}", f"--steps={args.steps}",
                         f"--eval_split={args.eval_split}"] + (["--equal_time"] if args.equal_time else [])
                        + ([f"--jobs={args.jobs}"] if args.jobs > 1 else [])
                        + (["--", " ".join(extra)] if extra else []))
    table = markdown_table(summary, keys=tuple(METRICS) + tuple(COST), steps=steps_of)
    has_probe = any(a["n"] for agg in summary.values() for k, a in agg.items() if k in PROBE)
    if has_probe:
        table += "\n\nDense linear probe (probe.py: fitted on the tune split, scored on val):\n\n"
        table += markdown_table(summary, keys=tuple(PROBE), steps=steps_of)
    paired = paired_differences(runs)
    if paired:
        table += ("\n\nPaired by seed (same seed = same initial weights and image order): the difference "
                  "to clip, mean ± std [min–max] over seeds, and on how many seeds it is positive:\n\n"
                  + paired_table(paired))
    note = ("Cells: mean ± sample std [min–max] over seeds, percent (mIoU from eval_seg.py; accuracy "
            f"and R@1 x 100); s/step from train.py's log; wall s includes start-up and evaluation. "
            f"Split: {args.eval_split}.")
    if args.jobs > 1:
        note += (f" Timing: {args.jobs} runs at a time with {threads} thread(s) each, so s/step and wall s "
                 f"measure a shared machine (compare them between methods only roughly).")
    if eq_steps:
        note += f" {EQTIME}: clip trained for {eq_steps} steps, the wall time of silc's {args.steps}."
    with open(md_path, "w") as f:
        f.write(f"Command: `{cmd_line}`\n\n{table}\n\n{note}\n")
    eq = f" ({EQTIME}: {eq_steps})" if eq_steps else ""
    draw_chart(summary, png_path, keys=tuple(METRICS) + (tuple(PROBE) if has_probe else ()),
               title=f"shapes {args.eval_split} split, {args.steps} steps{eq}; "
                     f"bars: mean, whiskers: min-max over seeds (percent)")
    with open(json_path, "w") as f:
        json.dump({"command": cmd_line, "eval_split": args.eval_split, "steps": args.steps,
                   "equal_time_clip_steps": eq_steps, "extra": extra, "summary": summary,
                   "paired_vs_clip": paired, "runs": runs}, f, indent=2)
    print(f"\n{table}\n\n{note}\nwrote {md_path}, {png_path}, {json_path}")
    return summary


def main(argv=None):
    args, extra = parse_args(argv)
    if not args.dry_run:
        os.makedirs(args.out_root, exist_ok=True)
    plan = [(m, m, s, args.steps) for m in args.methods for s in args.seeds]   # (label, method, seed, steps)
    cmds = {}
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0

    def go(label, method, seed, steps):
        out = run_dir(args.out_root, label, seed)
        cmd = train_command(method, seed, steps, args.eval_split, out, extra)
        cmds[(label, seed)] = (cmd, out)
        if args.report_only:
            return
        t = time.time()
        status = launch(cmd, out, force=args.force, dry_run=args.dry_run, threads=threads)
        if status in ("ok", "failed"):
            print(f"{label} seed {seed}: {status} in {time.time() - t:.0f} s ({out})", flush=True)
            if status == "failed":
                print(f"  see {os.path.join(out, 'train_output.txt')}")
        elif status == "skipped":
            print(f"{label} seed {seed}: metrics.json exists, skipped ({out})")
        if args.probe and status in ("ok", "skipped", "dry_run"):
            # the dense linear probe of the finished run (probe.py), unless its results exist
            if not run_probes(out, dry_run=args.dry_run, threads=threads):
                print(f"  probe failed: see {os.path.join(out, 'train_output.txt')}")

    # args.jobs threads, each waiting on one train.py subprocess at a time (1 job: in plan order).
    # A dry run launches nothing, so it prints in plan order from one thread: from several, two
    # commands' prints could interleave on one line.
    with ThreadPoolExecutor(1 if args.dry_run else args.jobs) as pool:
        list(pool.map(lambda job: go(*job), plan))
    eq_steps = equal_time_steps_for(args, cmds, extra) if args.equal_time else None
    if eq_steps is not None:
        print(f"equal time: clip gets {eq_steps} steps (silc's {args.steps} steps' wall time)")
        for s in args.seeds:
            go(EQTIME, "clip", s, eq_steps)
    return None if args.dry_run else write_report(args, extra, cmds, eq_steps, threads)


if __name__ == "__main__":
    main()
