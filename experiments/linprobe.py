"""experiments/linprobe.py: linear-probe and few-shot classification on frozen image embeddings.

Zero-shot classification asks the image embedding to sit next to the right class NAME. A linear
probe asks less: is the class linearly readable from the embedding at all, text left out? These are
the seed papers' other tables: MaskCLIP reports an ImageNet linear probe of 73.7 against CLIP's 66.5
(Dong et al. 2022), SILC reports few-shot classification (Naeem et al. 2023). The protocol here:

  features   the pooled image embedding f = normalise(proj(ln_post(x)[cls])), what zero-shot reads
             (eval_seg.encode_images), of every image of a train and a val class-folder tree
             (loaders.classification; root/<class>/*.jpg, the same class folders in both), through the
             evaluation view (data.CenterView: the centred square, resized; no augmentation). Frozen.
  probe      multinomial logistic regression on the standardised features, mean cross-entropy +
             wd * |W|^2, fitted by full-batch L-BFGS in float64 (experiments.probe.fit_logistic: the
             dense probe's fit, one row per image instead of per patch). Convex: no seed, no lr.
  wd         chosen on a held-out part of TRAIN, never on val: a seeded 20% of each class's train
             images is held out, the probe fitted on the rest with every wd of WD_GRID, the best
             held-out top-1 wins (ties: the larger wd); then refitted on all of train, scored once on val.
  few-shot   k = 1, 5, 10 images per class drawn from the fitted 80% (`draws` seeded draws; a class
             with fewer images gives all it has); wd chosen per draw on the same held-out 20%;
             val accuracy averaged over the draws (mean, std and each draw).
Accuracy is eval_seg.topk_accuracy (ties count against the image), in fractions.

Memory: the fit holds every train feature in float64 (ImageNet's 1.28M x 512 would be 5 GB); use
--train_per_class to probe on the first N images of each class.

Run:
    python -m experiments.linprobe --ckpt out/ckpt.pt --train /data/imagenet/train --val /data/imagenet/val
    python -m loaders.shapes /tmp/shapes_files && python -m experiments.linprobe --ckpt out/ckpt.pt \\
        --train /tmp/shapes_files/classes/train --val /tmp/shapes_files/classes/val
Prints the numbers and writes --out (default <checkpoint folder>/linprobe.json) as JSON.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from clip import autocast_for, pick_device
from data import CenterView
from loaders.imagetext import EvalBatches
from eval_seg import encode_images, topk_accuracy
from experiments.probe import fit_logistic
from loaders.classification import ClassFolderDataset
from loaders.pretrained import load_model_from_checkpoint

WD_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
SHOTS = (1, 5, 10)


def split_holdout(labels, fraction=0.2, seed=0):
    """Per class, a seeded `fraction` of its images held out (at least one when the class has two or
    more, never all of them) -> (fit indices, held-out indices), both sorted."""
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = min(max(1, round(fraction * len(idx))), len(idx) - 1) if len(idx) > 1 else 0
        held += idx[:n_held].tolist()
        fit += idx[n_held:].tolist()
    return torch.tensor(sorted(fit)), torch.tensor(sorted(held))


def draw_shots(labels, pool, k, generator):
    """k random indices of each class from `pool` (all of the class's when it has fewer) -> sorted indices."""
    out = []
    for c in labels[pool].unique().tolist():
        idx = pool[labels[pool] == c]
        out += idx[torch.randperm(len(idx), generator=generator)[:k]].tolist()
    return torch.tensor(sorted(out))


def fit(feats, labels, num_classes, wd):
    """The probe on hard labels: one-hot soft labels, every image weight 1 -> (W [C, E], b [C])."""
    q = F.one_hot(labels, num_classes)
    return fit_logistic(feats, q, torch.ones(len(labels)), wd)


def accuracy(feats, labels, weight, bias, ks=(1,)):
    """Top-k accuracy of the probe's logits W f + b."""
    return topk_accuracy(feats @ weight.T + bias, labels, ks)


def choose_wd(feats, labels, fit_idx, held_idx, num_classes, grid=WD_GRID):
    """The wd of the grid whose probe, fitted on fit_idx, has the best top-1 on held_idx (ties: the
    larger wd, the safer one). -> (wd, {wd: held-out top-1})."""
    scores = {}
    for wd in grid:
        W, b = fit(feats[fit_idx], labels[fit_idx], num_classes, wd)
        scores[wd] = accuracy(feats[held_idx], labels[held_idx], W, b)[1]
    return max(grid, key=lambda wd: (scores[wd], wd)), scores


def run_linprobe(train_feats, train_labels, val_feats, val_labels, num_classes, shots=SHOTS, draws=3, seed=0,
                 grid=WD_GRID):
    """The whole protocol of the module docstring on extracted features -> a dict of results (fractions)."""
    ks = (1, 5) if num_classes > 5 else (1,)
    fit_idx, held_idx = split_holdout(train_labels, seed=seed)
    if len(held_idx) == 0:
        raise ValueError("no class has two train images: nothing to hold out for choosing wd")
    wd, scores = choose_wd(train_feats, train_labels, fit_idx, held_idx, num_classes, grid)
    W, b = fit(train_feats, train_labels, num_classes, wd)                  # all of train, the chosen wd
    acc = accuracy(val_feats, val_labels, W, b, ks)
    result = {"linear": {"wd": wd, "wd_holdout_top1": scores, **{f"top{k}": acc[k] for k in ks}},
              "num_fit": len(fit_idx), "num_holdout": len(held_idx), "fewshot": {}}
    g = torch.Generator().manual_seed(seed + 1)
    for k in shots:
        tops, wds = [], []
        for _ in range(draws):
            idx = draw_shots(train_labels, fit_idx, k, g)
            wd_k, _ = choose_wd(train_feats, train_labels, idx, held_idx, num_classes, grid)
            W, b = fit(train_feats[idx], train_labels[idx], num_classes, wd_k)
            tops.append(accuracy(val_feats, val_labels, W, b)[1])
            wds.append(wd_k)
        result["fewshot"][str(k)] = {"top1_mean": statistics.mean(tops),
                                     "top1_std": statistics.stdev(tops) if len(tops) > 1 else 0.0,
                                     "top1_draws": tops, "wd_draws": wds}
    return result


def extract(model, root, size, batch_size, num_workers, device, train_per_class=0):
    """(features [N, E], labels [N], the dataset, skipped count) of a class-folder tree."""
    ds = ClassFolderDataset(root, transform=CenterView(size), max_per_class=train_per_class)
    batches = EvalBatches(ds, batch_size, num_workers=num_workers)
    feats, labels = encode_images(model, batches, device, autocast_for(device), progress=True,
                                  desc=os.path.basename(root))
    return feats, labels, ds, batches.skipped


def main(argv=None):
    ap = argparse.ArgumentParser(description="Linear-probe and few-shot classification on a checkpoint's frozen "
                                             "image embeddings (class-folder train and val trees).")
    ap.add_argument("--ckpt", required=True, help="a train.py checkpoint (or a public CLIP with --bpe_path)")
    ap.add_argument("--train", required=True, help="train class-folder tree: root/<class>/*.jpg")
    ap.add_argument("--val", required=True, help="val class-folder tree with the same class folders")
    ap.add_argument("--shots", default="1,5,10", help="few-shot k values, comma-separated ('' = none)")
    ap.add_argument("--draws", type=int, default=3, help="few-shot draws per k (averaged)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train_per_class", type=int, default=0,
                    help="use the first N train images of each class (0 = all)")
    ap.add_argument("--batch_size", type=int, default=250)
    ap.add_argument("--num_workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--teacher", action="store_true", help="probe the EMA teacher's image tower")
    ap.add_argument("--bpe_path", default=None, help="CLIP's BPE vocabulary, for checkpoints that use it")
    ap.add_argument("--act", default="quick_gelu", choices=("quick_gelu", "gelu"), help="public checkpoints only")
    ap.add_argument("--out", default=None, help="JSON to write (default: <checkpoint folder>/linprobe[_teacher].json)")
    args = ap.parse_args(argv)
    try:
        shots = tuple(int(k) for k in args.shots.split(",") if k.strip())
    except ValueError:
        ap.error(f"--shots must be comma-separated integers, got {args.shots!r}")
    if any(k < 1 for k in shots) or args.draws < 1:
        ap.error("--shots values and --draws must be >= 1")
    device = pick_device(args.device)
    t0 = time.time()
    try:
        model, _ = load_model_from_checkpoint(args.ckpt, device, bpe_path=args.bpe_path, act=args.act,
                                              teacher=args.teacher)
        size = model.config.image_size
        tr_f, tr_y, tr_ds, tr_skip = extract(model, args.train, size, args.batch_size, args.num_workers, device,
                                             args.train_per_class)
        va_f, va_y, va_ds, va_skip = extract(model, args.val, size, args.batch_size, args.num_workers, device)
        if tr_ds.classes != va_ds.classes:
            raise ValueError(f"{args.train} and {args.val} hold different class folders "
                             f"({len(tr_ds.classes)} and {len(va_ds.classes)}; first differences: "
                             f"{sorted(set(tr_ds.classes) ^ set(va_ds.classes))[:5]})")
        result = run_linprobe(tr_f, tr_y, va_f, va_y, len(tr_ds.classes), shots, args.draws, args.seed)
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    result.update(checkpoint=args.ckpt, teacher=args.teacher, train=args.train, val=args.val,
                  classes=len(tr_ds.classes), num_train=len(tr_y), num_val=len(va_y),
                  skipped={"train": tr_skip, "val": va_skip}, wd_grid=list(WD_GRID), draws=args.draws,
                  seed=args.seed, seconds=round(time.time() - t0, 1))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)),
                                   f"linprobe{'_teacher' if args.teacher else ''}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    lin = result["linear"]
    print(f"linear probe ({len(tr_y)} train / {len(va_y)} val images, {len(tr_ds.classes)} classes, wd {lin['wd']:g}): "
          + "  ".join(f"{k} {v:.4f}" for k, v in lin.items() if k.startswith("top")))
    for k, r in result["fewshot"].items():
        print(f"{k:>3s}-shot: top1 {r['top1_mean']:.4f} +- {r['top1_std']:.4f} over {len(r['top1_draws'])} draws")
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
