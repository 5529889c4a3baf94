"""experiments/curves.py: training curves of one or several runs in one picture.

train.py already draws out_dir/curves.png from its own log.jsonl at every evaluation. This command
draws any log.jsonl files together, each run in its own colour, one panel per quantity against the
step: the contrastive and self-distillation losses, the lr, and the evaluation metrics (the
zero-shot and retrieval numbers logged by --eval_interval, --val_data and --zeroshot_data). The
drawing is draw_curves below (PIL only).

Run:
    python -m experiments.curves runs/clip_s0/log.jsonl runs/silc_s0/log.jsonl --out docs/curves_ablation.png
    python -m experiments.curves out/log.jsonl --out curves.png --labels clip
"""

import argparse
import json
import math
import os

from PIL import Image, ImageDraw, ImageFont

from eval_seg import DISTINCT_COLOURS

# Training curves (train.py draws them from its log.jsonl at every evaluation; experiments/curves.py
# overlays several runs): one panel per quantity, step on x, every run in its own colour.
CURVE_KEYS = (
    "contrastive", "sd", "dist", "mlm", "lr",                            # training records (every log_interval)
    "teacher_entropy", "teacher_entropy_batch",                          # SILC's teacher: uniform, collapsed or neither
    "zeroshot_top1", "zeroshot_top5", "val_i2t_r1", "val_t2i_r1", "val_contrastive",   # real-data evaluation
    "zeroshot_acc", "i2t_r1", "t2i_r1", "val_loss", "shapes8_best",      # the shapes evaluation
    "teacher_zeroshot_top1", "teacher_zeroshot_acc", "teacher_shapes8_best",
)


def _number(v):
    """A finite float, or None (missing, None, NaN, a string)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def draw_curves(runs, path=None, keys=CURVE_KEYS, panel_w=300, panel_h=170, columns=3):
    """runs: {label: [log.jsonl records]} -> (PIL image, points). One panel per key of `keys` that some
    record holds (training terms and evaluation metrics alike: a record is plotted where it has the
    key), all panels on one step axis [0, last step]; each panel's y axis spans its values (5% margin),
    labelled with their minimum and maximum.
    Each run is a line with a 5 x 5 square marker at every point, so a single evaluation still shows.
    points: {key: {label: [(step, value, x, y)]}}, the pixel centre of each marker, for tests and
    for reading values back. Written to `path` (PNG) if given."""
    series = {}                                                   # key -> label -> [(step, value)]
    for key in keys:
        for label, records in runs.items():
            pts = [(r["step"], _number(r.get(key))) for r in records if "step" in r]
            pts = [(t, v) for t, v in pts if v is not None]
            if pts:
                series.setdefault(key, {})[label] = pts
    if not series:
        raise ValueError(f"no record holds any of {list(keys)}: nothing to draw")
    last_step = max(t for per_run in series.values() for pts in per_run.values() for t, _ in pts) or 1
    colours = {label: DISTINCT_COLOURS[i % len(DISTINCT_COLOURS)] for i, label in enumerate(runs)}
    font = ImageFont.load_default()
    legend_h, gap = 22, 8
    rows = math.ceil(len(series) / columns)
    img = Image.new("RGB", (columns * (panel_w + gap) + gap, legend_h + rows * (panel_h + gap) + gap), "white")
    d = ImageDraw.Draw(img)
    x = gap
    for label, colour in colours.items():                         # legend: one entry per run
        d.rectangle([x, 6, x + 10, 16], fill=colour)
        d.text((x + 14, 6), label, fill="black", font=font)
        x += 24 + int(d.textlength(label, font=font))
    left, right, top, bottom = 54, 10, 18, 18                     # plot area inside a panel
    points = {}
    for i, (key, per_run) in enumerate(series.items()):
        px = gap + (i % columns) * (panel_w + gap)
        py = legend_h + gap + (i // columns) * (panel_h + gap)
        x0, x1, y0, y1 = px + left, px + panel_w - right, py + top, py + panel_h - bottom
        values = [v for pts in per_run.values() for _, v in pts]
        v_min, v_max = min(values), max(values)
        pad = 0.05 * (v_max - v_min) if v_max > v_min else 0.5 * abs(v_max) or 0.5
        lo, hi = v_min - pad, v_max + pad

        def to_px(t, v):
            return x0 + (x1 - x0) * t / last_step, y0 + (y1 - y0) * (hi - v) / (hi - lo)

        d.rectangle([x0, y0, x1, y1], outline=(170, 170, 170))
        last = "" if len(per_run) > 1 else f"   last {next(iter(per_run.values()))[-1][1]:.4g}"
        d.text((px + 4, py + 2), key + last, fill="black", font=font)
        for v in {v_max, v_min}:                                  # the values' range and the steps', as numbers
            d.text((x0 - 4, to_px(0, v)[1]), f"{v:.3g}", fill=(90, 90, 90), font=font, anchor="rm")
        d.text((x0, y1 + 3), "0", fill=(90, 90, 90), font=font)
        d.text((x1, y1 + 3), f"step {last_step}", fill=(90, 90, 90), font=font, anchor="ra")
        points[key] = {}
        for label, pts in per_run.items():
            xy = [to_px(t, v) for t, v in pts]
            if len(xy) > 1:
                d.line(xy, fill=colours[label], width=1)
            for cx, cy in xy:
                d.rectangle([round(cx) - 2, round(cy) - 2, round(cx) + 2, round(cy) + 2], fill=colours[label])
            points[key][label] = [(t, v, cx, cy) for (t, v), (cx, cy) in zip(pts, xy)]
    if path:
        img.save(path)
    return img, points


def read_jsonl(path):
    """The records of a log.jsonl, in order (a line cut short by a killed run is left out)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def save_curves(log_paths, out_path, labels=None):
    """Draw the log.jsonl files (labels: one per log; default: each log's folder name) into out_path,
    atomically: written beside it, then renamed over it, so a reader never sees half a PNG."""
    labels = labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in log_paths]
    if len(labels) != len(log_paths):
        raise ValueError(f"{len(labels)} labels for {len(log_paths)} logs")
    if len(set(labels)) < len(labels):                       # two runs in folders of the same name
        labels = [f"{i}:{label}" for i, label in enumerate(labels)]
    img, points = draw_curves({label: read_jsonl(p) for label, p in zip(labels, log_paths)})
    tmp = out_path + ".tmp"
    img.save(tmp, format="PNG")
    os.replace(tmp, out_path)
    return points


def main(argv=None):
    ap = argparse.ArgumentParser(description="Draw the training curves of one or several log.jsonl files.")
    ap.add_argument("logs", nargs="+", help="log.jsonl files of train.py runs")
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument("--labels", default=None, help="comma-separated run names (default: each log's folder name)")
    args = ap.parse_args(argv)
    for path in args.logs:
        if not os.path.isfile(path):
            ap.error(f"log not found: {path}")
    labels = args.labels.split(",") if args.labels else None
    try:
        points = save_curves(args.logs, args.out, labels)
    except ValueError as e:
        ap.error(str(e))
    print(f"wrote {args.out}: {len(points)} panels ({', '.join(points)}) for {len(args.logs)} run(s)")
    return points


if __name__ == "__main__":
    main()
