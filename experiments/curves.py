"""experiments/curves.py: training curves of one or several runs in one picture.

train.py already draws out_dir/curves.png from its own log.jsonl at every evaluation. This command
draws any log.jsonl files together, each run in its own colour, one panel per quantity against the
step: the contrastive and self-distillation losses, the lr, and the evaluation metrics (the
zero-shot and retrieval numbers logged by --eval_interval, --val_data and --zeroshot_data). The
drawing is eval_seg.draw_curves (PIL only).

Run:
    python -m experiments.curves runs/clip_s0/log.jsonl runs/silc_s0/log.jsonl --out docs/curves_ablation.png
    python -m experiments.curves out/log.jsonl --out curves.png --labels clip
"""

import argparse
import os

from eval_seg import save_curves


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
