"""experiments/probe.py: a dense linear probe. How much do a model's patch features know about the classes, with
the text tower left out?

Zero-shot segmentation (eval_seg.py) asks two things of the patch features at once:
  (1) that patches of different classes are SEPARABLE in feature space, and
  (2) that each lies next to the right class NAME in the joint image-text space.
A low zero-shot mIoU cannot tell which one failed. A linear probe measures (1) alone: freeze the
model, read the very features the zero-shot evaluation reads (eval_seg.dense_features,
f_p = normalise(proj(ln_post(x_p))) in [h, w, E], naive or MaskCLIP-trick), and fit a linear
classifier on labelled images:

    logits_p = W f_p + b                      W [C, E], b [C], one prediction per patch p

Then segment new images exactly as the zero-shot evaluation does (patch logits, bilinear upsampling
to the pixels, argmax) and score them with the same confusion matrix and mIoU. The gap between
probe mIoU and zero-shot mIoU is then what text alignment loses. This is the standard way to judge
the dense features of self-supervised ViTs (DINO, iBOT, DINOv2 report linear segmentation probes),
and the question issue 7 asks of SILC and MaskCLIP: what does self-distillation teach the patches?

Training target. A patch covers p x p pixels, which may hold several classes. Predicting one
distribution per patch and scoring it against every labelled pixel of the patch gives

    L = sum_pixels CE(logits_{patch(pixel)}, y_pixel) / #pixels
      = sum_p n_p * H(q_p, softmax(logits_p)) / sum_p n_p

where q_p is the fraction of each class among patch p's n_p labelled pixels: the pixel loss is
exactly a soft-label cross-entropy over patches (weighted by n_p), with 64x fewer rows than one
per pixel at patch size 8. Plus wd * |W|^2 (the bias is not
decayed). The problem is convex, and with wd > 0 its optimum is unique up to adding the same
constant to every class's bias, which changes no prediction (a class absent from the fitted images
has its bias pushed towards minus infinity). Full-batch L-BFGS from zero approaches it
deterministically: no learning rate, no seed. It stops after at most 300 iterations; the iteration
count and the final gradient norm are written to the JSON, with a warning when the gradient is
still large.

Data splits (never tune on the evaluation split): the probe is fitted on the shapes TUNE split and
reported on VAL. wd is fixed at 1e-4 for every checkpoint, so that methods are compared under one
protocol. It was picked by looking at the tune split alone (`choose_wd`'s split: fit on its first
80% of images, score mIoU on the other 20%) with CLIP seed 0's checkpoint: 1e-3 scored 16.1, 1e-4
19.0 and 1e-5 20.6. The best score, 1e-5, was NOT taken: it had not converged after 300 L-BFGS
iterations (its result depends on when the optimiser stops), while 1e-4 nearly had (weight norm 214
at 100 iterations, 237 at 300). `--choose_wd` instead takes the grid's best score per checkpoint.

Run:
    python -m experiments.probe --ckpt runs/clip_s0/ckpt.pt runs/silc_s0/ckpt.pt      # naive features
    python -m experiments.probe --ckpt runs/*_s0/ckpt.pt --dense maskclip
Prints one row per checkpoint and writes <checkpoint folder>/probe_<dense>.json (other
settings than the defaults write a file whose name says them).
"""

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from eval_seg import ConfusionMatrix, dense_features, miou_from_confusion, preprocess, to_percent
from loaders.pretrained import checkpoint_config, load_model_from_checkpoint
from loaders.segmentation import IGNORE_INDEX, load_dataset
from loaders.shapes import world_from_config

WD_GRID = (1e-5, 1e-4, 1e-3)
DEFAULT_WD = 1e-4


@torch.no_grad()
def extract_features(model, dataset, dense="naive", batch_size=64, device="cpu"):
    """The zero-shot evaluation's patch features and the label maps of a whole dataset:
    features [n, h, w, E] (float32, L2-normalised), labels [n, H, W] (long). Images must share a size."""
    feats, labels = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = preprocess(torch.stack([it["image"] for it in items]).to(device))    # [b, 3, H, W]
        feats.append(dense_features(model, images, dense).float().cpu())              # [b, h, w, E]
        labels.append(torch.stack([it["mask"] for it in items]).long())               # [b, H, W]
    return torch.cat(feats), torch.cat(labels)


def patch_class_fractions(labels, grid, num_classes, ignore_index=IGNORE_INDEX):
    """Label maps [n, H, W] -> (q [n, h, w, C], count [n, h, w], float64): per patch of a grid h x w, the
    fraction of each class among its labelled pixels, and how many pixels are labelled.
    H and W must be multiples of h and w. Patches with no labelled pixel get q = 0, count = 0."""
    n, H, W = labels.shape
    h, w = grid
    if H % h or W % w:
        raise ValueError(f"label maps {H}x{W} do not tile into a {h}x{w} patch grid")
    valid = labels != ignore_index                                                  # [n, H, W]
    if bool(((labels < 0) | (labels >= num_classes))[valid].any()):
        raise ValueError(f"labels must be in [0, {num_classes}) or {ignore_index}")
    onehot = F.one_hot(torch.where(valid, labels, 0), num_classes).int()            # [n, H, W, C]
    onehot = onehot * valid.unsqueeze(-1)                      # (int counts: exact; float64 below)
    per_patch = onehot.reshape(n, h, H // h, w, W // w, num_classes).sum(dim=(2, 4)).double()  # [n, h, w, C]
    count = per_patch.sum(-1)                                                       # [n, h, w]
    return per_patch / count.clamp(min=1).unsqueeze(-1), count


def probe_loss(weight, bias, feats, q, count, wd):
    """Mean pixel cross-entropy (as the soft-label patch form in the module docstring) + wd |W|^2.
    feats [M, E], q [M, C], count [M]."""
    logits = feats @ weight.T + bias                                                # [M, C]
    ce = -(q * F.log_softmax(logits, dim=-1)).sum(-1)                               # [M]
    return (count * ce).sum() / count.sum().clamp(min=1) + wd * weight.square().sum()


def fit_logistic(X, q, count, wd, max_iter=300, info=None):
    """Multinomial logistic regression by full-batch L-BFGS (convex: the start at zero and the result
    are deterministic): minimise probe_loss over W [C, E], b [C] on features X [M, E] with soft labels
    q [M, C] and row weights count [M] (a hard label: a one-hot q, count 1). experiments/linprobe.py
    fits its image-level probe with it too.

    The features are standardised first (each dimension to mean 0, std 1 over the rows, as DINOv2's
    linear head does with a BatchNorm): CLIP's normalised features sit in a narrow cone, so raw they
    need a huge W and L-BFGS crawls. The probe is fitted on the standardised features, with wd on that
    W, and then folded back so that it applies to the raw features:  W_raw = W / s,  b_raw = b - W_raw m.
    info: a dict, if given, receives the L-BFGS iteration count and the final gradient norm."""
    X, q, count = X.double(), q.double(), count.double()
    E, C = X.shape[1], q.shape[1]
    mean, std = X.mean(0), X.std(0) if len(X) > 1 else torch.ones(E, dtype=X.dtype)   # [E], [E]
    std = torch.where(std > 1e-6, std, torch.ones_like(std))    # a (near-)constant dimension: left as is
    X = (X - mean) / std
    weight = torch.zeros(C, E, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(C, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = probe_loss(weight, bias, X, q, count, wd)
        loss.backward()
        return loss

    opt.step(closure)
    if info is not None:
        closure()                                                   # the gradient at the result
        info["lbfgs_iterations"] = opt.state[opt._params[0]].get("n_iter", 0)
        info["grad_norm"] = float(torch.cat([weight.grad.flatten(), bias.grad]).norm())
    w_raw = weight.detach() / std                                                   # [C, E]
    return w_raw.float(), (bias.detach() - w_raw @ mean).float()


def fit_probe(feats, labels, num_classes, wd, max_iter=300, info=None):
    """Fit W [C, E], b [C] on patch features [n, h, w, E] and label maps [n, H, W]: each labelled patch
    is a row, its class fractions the soft label, its labelled-pixel count the weight (fit_logistic)."""
    n, h, w, E = feats.shape
    q, count = patch_class_fractions(labels, (h, w), num_classes)
    X, q, count = feats.reshape(-1, E), q.reshape(-1, num_classes), count.reshape(-1)
    keep = count > 0
    return fit_logistic(X[keep], q[keep], count[keep], wd, max_iter, info)


def probe_predict(feats, weight, bias, out_size):
    """features [n, h, w, E] -> predicted label maps [n, H, W]: patch logits, bilinearly upsampled
    to the pixels (as eval_seg does with the zero-shot logits), argmax."""
    logits = (feats @ weight.T + bias).permute(0, 3, 1, 2)                          # [n, C, h, w]
    logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits.argmax(1)                                                         # [n, H, W]


def score(pred, labels, num_classes, background_index):
    """mIoU, fg-mIoU and per-class IoU in percent (eval_seg's metric)."""
    conf = ConfusionMatrix(num_classes)
    conf.update(pred, labels)
    m = miou_from_confusion(conf.counts, background_index)
    return {"miou": to_percent(m["miou"]), "fg_miou": to_percent(m.get("fg_miou")),
            "pixel_acc": to_percent(m["pixel_acc"]), "iou": [to_percent(v) for v in m["iou"]]}


def choose_wd(feats, labels, num_classes, background_index, grid=WD_GRID, hold_out=0.2):
    """The wd of the grid with the best mIoU on the last `hold_out` of the images, fitted on the
    rest (ties: the larger wd). Call it on the tuning split only. Returns (wd, {wd: mIoU})."""
    n = feats.shape[0]
    n_fit = n - max(1, int(round(hold_out * n)))
    if n_fit < 1:
        raise ValueError(f"need at least 2 images to choose wd, got {n}")
    scores = {}
    for wd in grid:
        W, b = fit_probe(feats[:n_fit], labels[:n_fit], num_classes, wd)
        pred = probe_predict(feats[n_fit:], W, b, labels.shape[-2:])
        scores[wd] = score(pred, labels[n_fit:], num_classes, background_index)["miou"]
    best = max(grid, key=lambda wd: (-math.inf if scores[wd] is None else scores[wd], wd))
    return best, scores


def run_probe(model, dense="naive", fit_split="tune", eval_split="val", size=None, device="cpu",
              wd=DEFAULT_WD, max_images=None, dataset="shapes8", world=None):
    """The whole protocol on the shapes data (shapes8: background ignored, 8 classes, the headline;
    shapes9: background a class): features of both splits, the probe fitted on all of fit_split
    (wd=None: wd chosen on fit_split first), scored once on eval_split. world: ShapesDataset's
    options (the training world's). Returns a dict (percent)."""
    size = size or model.config.image_size
    t0 = time.time()
    data = {}
    model.eval()
    for split in (fit_split, eval_split):
        ds = load_dataset(dataset, split=split, size=size, **(world or {}))
        if max_images is not None and max_images < len(ds):
            ds = load_dataset(dataset, split=split, size=size, length=max_images, **(world or {}))
        data[split] = (ds, *extract_features(model, ds, dense, device=device))
    ds, f_fit, y_fit = data[fit_split]
    C, bg = len(ds.class_names), ds.background_index
    scores = None
    if wd is None:
        wd, scores = choose_wd(f_fit, y_fit, C, bg)
    info = {}
    W, b = fit_probe(f_fit, y_fit, C, wd, info=info)
    if info["grad_norm"] > 1e-3:
        print(f"warning: the probe had not converged (gradient norm {info['grad_norm']:.1e} after "
              f"{info['lbfgs_iterations']} L-BFGS iterations); its score depends on when L-BFGS stopped")
    _, f_eval, y_eval = data[eval_split]
    result = score(probe_predict(f_eval, W, b, y_eval.shape[-2:]), y_eval, C, bg)
    result.update(info)
    result.update(dense=dense, wd=wd, wd_scores_on_fit_split=scores, fit_split=fit_split,
                  eval_split=eval_split, num_fit=len(f_fit), num_eval=len(f_eval),
                  class_names=[names[0] for names in ds.class_names], seconds=round(time.time() - t0, 1))
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description="Dense linear probe of a CLIP checkpoint's patch features "
                                             "(fit on the shapes tune split, scored on val).")
    ap.add_argument("--ckpt", nargs="+", required=True, help="train.py checkpoints")
    ap.add_argument("--dense", default="naive", choices=("naive", "maskclip", "sclip", "clearclip"))
    ap.add_argument("--fit_split", default="tune", choices=("tune", "tune_single"))
    ap.add_argument("--eval_split", default="val", choices=("val", "val_single"))
    ap.add_argument("--wd", type=float, default=DEFAULT_WD, help="weight decay on the standardised-feature weights")
    ap.add_argument("--choose_wd", action="store_true", help=f"choose wd from {WD_GRID} on fit_split, per checkpoint")
    ap.add_argument("--max_images", type=int, default=None, help="use the first N images of each split")
    ap.add_argument("--bpe_path", default=None, help="CLIP's BPE vocabulary, for checkpoints that use it "
                    "(train.py --init_from); the probe itself never reads text")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dataset", default="shapes8", choices=("shapes8", "shapes9"),
                    help="shapes8: background ignored (the headline); shapes9: background a class")
    ap.add_argument("--teacher", action="store_true", help="probe the EMA teacher's image tower")
    args = ap.parse_args(argv)
    if args.wd < 0:
        ap.error(f"--wd must be >= 0, got {args.wd}")
    if args.max_images is not None and args.max_images < (5 if args.choose_wd else 1):
        ap.error(f"--max_images must be at least {5 if args.choose_wd else 1}, got {args.max_images}")
    for path in args.ckpt:
        if not os.path.isfile(path):
            ap.error(f"checkpoint not found: {path}")
    # the standard protocol writes probe_<dense>.json; any other setting gets its own file
    default = (args.fit_split, args.eval_split, args.wd, args.choose_wd, args.max_images, args.dataset) == \
        ("tune", "val", DEFAULT_WD, False, None, "shapes8")
    wd_tag = "auto" if args.choose_wd else f"{args.wd:g}"
    n_tag = "" if args.max_images is None else f"_n{args.max_images}"
    who = "teacher_" if args.teacher else ""
    name = (f"probe_{who}{args.dense}.json" if default else
            f"probe_{who}{args.dense}_{args.dataset}_{args.fit_split}-{args.eval_split}_wd{wd_tag}{n_tag}.json")
    results = {}
    print(f"{'checkpoint':50s} {'mIoU':>6s} {'fg-mIoU':>8s} {'wd':>7s}")
    for path in args.ckpt:
        try:
            model, _ = load_model_from_checkpoint(path, args.device, bpe_path=args.bpe_path, teacher=args.teacher)
        except ValueError as e:
            ap.error(str(e))
        r = run_probe(model, args.dense, args.fit_split, args.eval_split, device=args.device,
                      wd=None if args.choose_wd else args.wd, max_images=args.max_images, dataset=args.dataset,
                      world=world_from_config(checkpoint_config(path)))
        r["checkpoint"] = path
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), name), "w") as f:
            json.dump(r, f, indent=2)
        fg = "-" if r["fg_miou"] is None else f"{r['fg_miou']:.1f}"
        print(f"{path:50s} {r['miou']:6.1f} {fg:>8s} {r['wd']:7.0e}", flush=True)
        results[path] = r
    return results


if __name__ == "__main__":
    main()
