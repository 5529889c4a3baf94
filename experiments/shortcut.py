"""experiments/shortcut.py: can SILC's local-to-global task be solved without looking at any shape?

SILC (Naeem et al. 2023) asks the student to predict, from a small local crop, the teacher's
distribution on a global view of the SAME image. If cheap colour and texture statistics already tell
which image a local crop came from, the task can be solved without learning shapes, and the
distillation teaches the encoder to track background tint and texture. This script measures that
shortcut on the views train.py makes for SILC (train.build_train_data):

  * nine statistics per view, on its pixels in [0, 1]: the mean and the standard deviation of R, G
    and B, the mean saturation (max - min over the channels), the mean absolute luma gradient
    (texture), and the fraction of strongly saturated pixels (> 0.3: object pixels);
  * each local crop of N images is matched to the nearest first global view of the N (Euclidean
    distance between the statistics, each z-scored over all views): top-1 accuracy, chance 1 / N;
  * the share of local crops that hold no object pixel, and that are at most 20% object.

Run:
    python -m experiments.shortcut                               # today's shapes world and SILC views
    python -m experiments.shortcut -- --local_foreground=0.2     # train.py flags after --
Prints one line and writes --out (JSON).
"""

import argparse
import dataclasses
import json
import sys

import torch

import train
from data import CLIP_MEAN, CLIP_STD, SeededSample


def view_statistics(views: torch.Tensor) -> torch.Tensor:
    """Normalised views [n, 3, s, s] -> the nine statistics [n, 9] (see the module docstring)."""
    x = views * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    x = x.clamp(0, 1)
    sat = x.max(1).values - x.min(1).values                                   # [n, s, s]
    luma = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)    # [n, s, s]
    grad = (luma[:, 1:, :] - luma[:, :-1, :]).abs().mean((1, 2)) + (luma[:, :, 1:] - luma[:, :, :-1]).abs().mean((1, 2))
    return torch.cat([x.mean((2, 3)), x.std((2, 3)), sat.mean((1, 2))[:, None], grad[:, None],
                      (sat > 0.3).float().mean((1, 2))[:, None]], dim=1)


def match_top1(glob, loc, owner):
    """Statistics of N global views [N, 9] and of local crops [M, 9] with their image index owner [M]:
    the fraction of crops whose nearest global view (Euclidean, each statistic z-scored over all views)
    is their own image's."""
    allv = torch.cat([glob, loc])
    mu, sd = allv.mean(0), allv.std(0).clamp_min(1e-8)
    dist = torch.cdist((loc - mu) / sd, (glob - mu) / sd)                                     # [M, N]
    return (dist.argmin(1) == owner).float().mean().item()


def measure(cfg, n_images=64, first=0):
    """{"top1": matching accuracy, "chance": 1 / N, "pure_background": share, "under_20pct": share}."""
    clip_cfg, tokenizer = train.build_model_config(cfg)
    cfg = dataclasses.replace(cfg, crops="workers")          # the views of each sample, cut where it is read
    dataset, _ = train.build_train_data(cfg, clip_cfg.patch_size, tokenizer)
    seeded = SeededSample(dataset, cfg.seed)
    samples = [seeded[(first + i, 0)] for i in range(n_images)]
    glob = view_statistics(torch.stack([s["global_crops"][0] for s in samples]))             # [N, 9]
    loc = [view_statistics(torch.stack(s["local_crops"])) for s in samples]                  # N x [n, 9]
    owner = torch.cat([torch.full((len(v),), i) for i, v in enumerate(loc)])
    top1 = match_top1(glob, torch.cat(loc), owner)
    # object pixels of each local crop, from the mask drawn through the same geometry
    plain = dataset.dataset if hasattr(dataset, "dataset") else dataset
    fg = []
    for i, s in enumerate(samples):
        mask = plain.generate(first + i)["mask"] > 0
        for top, left, h, w, _ in s["local_boxes"]:
            fg.append(float(mask[top:top + h, left:left + w].float().mean()))
    fg = torch.tensor(fg)
    return {"top1": top1, "chance": 1 / n_images, "n_local": len(owner),
            "pure_background": (fg == 0).float().mean().item(), "under_20pct": (fg <= 0.2).float().mean().item()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description="Local-crop-to-own-image matching from colour and texture alone.")
    ap.add_argument("--n_images", type=int, default=64)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    cfg = train.resolve_method_defaults(train.parse_args(["--method=silc"] + extra))
    r = measure(cfg, args.n_images)
    print(f"local crop -> own image from 9 colour/texture statistics: top-1 {100 * r['top1']:.1f}% "
          f"(chance {100 * r['chance']:.1f}%, {r['n_local']} crops); no object pixel: "
          f"{100 * r['pure_background']:.1f}%, at most 20% object: {100 * r['under_20pct']:.1f}%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"flags": extra, **r}, f, indent=2)
    return r


if __name__ == "__main__":
    main()
