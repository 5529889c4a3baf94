"""experiments/objects.py: where a model's shapes8 errors are, split by how many shapes an image holds.

A shapes image holds one object, or two or more (loaders/shapes.py). Its caption names them all, and
every training signal that reaches a patch in this repository is about the whole caption: the
contrastive loss pools the image, the patch-text loss (losses.patch_text_loss) asks every patch for
its image's caption, and SILC's local-to-global loss asks a local crop for the global view's
distribution. Nothing says which patch is which object. So the question this script measures is:
how much of the shapes8 mIoU that is missing is lost on the images with several shapes?

For one checkpoint it runs the zero-shot segmentation of eval_seg.py (same protocol, same readout)
and keeps one confusion matrix per group of images:

    "1"   images whose object pixels carry one shape class,
    "2+"  images whose object pixels carry two or more,
    "all" every image (this is eval_seg's shapes8 mIoU for the same images and readout),

and, over the "2+" images, the fraction in which EVERY object pixel got one single name (the
objects merged into one): the failure the README's segmentation grid shows.

    python -m experiments.objects --ckpt run_a/ckpt.pt run_b/ckpt.pt --split tune --max_images 256
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import eval_seg
from loaders.segmentation import load_dataset
from loaders.shapes import world_from_config


def split_by_objects(truths, preds, num_classes, ignore_index=eval_seg.IGNORE_INDEX):
    """Per-image truths and predictions ([H, W] integer tensors, background = ignore_index) ->
    ({"1", "2+", "all"}: ConfusionMatrix, merged fraction of the "2+" images, their count)."""
    conf = {k: eval_seg.ConfusionMatrix(num_classes, ignore_index) for k in ("1", "2+", "all")}
    merged = several = 0
    for t, p in zip(truths, preds):
        obj = t != ignore_index                                          # [H, W] object pixels
        group = "1" if t[obj].unique().numel() <= 1 else "2+"
        conf[group].update(p, t)
        conf["all"].update(p, t)
        if group == "2+":
            several += 1
            merged += int(p[obj].unique().numel() == 1)
    return conf, (merged / several if several else float("nan")), several


def measure(ckpt, split="tune", dense="naive", max_images=None, teacher=False, device="cpu"):
    """One checkpoint -> {"miou_1", "miou_2+", "miou_all", "merged_2+", "images_1", "images_2+"} (percent)."""
    model, tokenizer = eval_seg.load_model_from_checkpoint(ckpt, device, teacher=teacher)
    dataset = load_dataset("shapes8", split=split, size=model.config.image_size,
                           **world_from_config(eval_seg.checkpoint_config(ckpt)))
    settings = eval_seg.protocol_settings(dataset)
    settings.update(dense=dense, dataset=dataset.name, batch_size=32)
    C = len(dataset.class_names)
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    truths, preds = [], []
    with eval_seg.evaluation_mode(model):
        text = eval_seg.text_queries(model, tokenizer, dataset, settings, device)
        for group in eval_seg.same_size_groups(dataset, n, settings["batch_size"]):
            _, truth, _, pred = eval_seg.segment_group(model, group, text, settings, C, None, device)
            truths += list(truth)
            preds += list(pred)
    conf, merged, several = split_by_objects(truths, preds, C)
    out = {f"miou_{k}": eval_seg.to_percent(eval_seg.miou_from_confusion(c.counts)["miou"]) for k, c in conf.items()}
    out.update({"merged_2+": eval_seg.to_percent(merged), "images_1": len(truths) - several, "images_2+": several})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="shapes8 mIoU split by the number of shapes per image.")
    ap.add_argument("--ckpt", nargs="+", required=True, help="train.py checkpoints")
    ap.add_argument("--split", default="tune", help="shapes split (tune | val)")
    ap.add_argument("--dense", default="naive", choices=eval_seg.DENSE_MODES)
    ap.add_argument("--max_images", type=int, default=None)
    ap.add_argument("--teacher", action="store_true", help="score the EMA teacher's image tower")
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)
    for path in args.ckpt:
        if not os.path.isfile(path):
            ap.error(f"checkpoint not found: {path}")
    results = {}
    for path in args.ckpt:
        results[path] = measure(path, args.split, args.dense, args.max_images, args.teacher)
        print(path, "  ".join(f"{k} {v}" for k, v in results[path].items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"split": args.split, "dense": args.dense, "teacher": args.teacher, "runs": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
