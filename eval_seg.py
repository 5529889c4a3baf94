"""eval_seg.py: zero-shot semantic segmentation with a CLIP model, measured the way papers measure it.

The idea. CLIP (Radford et al. 2021) puts whole images and captions in one space. If the ViT's
PATCH tokens land in that same space, every patch can be classified by the class name it is most
similar to, with no segmentation training at all:

    f_p   = proj(ln_post(x_p)) / |.|              patch p's feature in the joint space   [E]
    t_c   = text classifier of class c (below)                                            [E]
    l_pc  = <f_p, t_c>                            cosine logit, upsampled to pixels
    P_pc  = softmax_c(tau * l_pc),  pred_p = argmax_c P_pc      (tau: a fixed logit scale, 40)

This is where SILC (Naeem et al. 2023, arXiv 2310.13355) and MaskCLIP (Dong et al. 2022, arXiv
2208.12262) show what their local objectives are for: dense features that line up with text.

Text classifier (CLIP's prompt ensembling). Each class has one or more names (synonyms); each name
n is written into every template T_j ("a photo of a {}."), encoded and normalised, averaged, and
renormalised:  t_n = normalise( mean_j normalise(g(T_j(n))) ). A class scores the MAX over its
names: P_c = max_{n in c} softmax_n(tau * l_pn) (softmax over all names, as SCLIP does; the argmax
is the same as taking the max over names of the logits).

Dense features: plain CLIP's patch tokens are poorly localised; four ways to read them, all
training-free and all applied to the LAST block only, by hand, without touching weights or the
model's normal forward (x: tokens entering the last block, h = ln_1(x), q/k/v: its projections):
    naive      x1 = x + Attn(h);                  x2 = x1 + MLP(ln_2(x1))    (the normal forward)
    maskclip   x1 = x + out_proj(v);              x2 = x1 + MLP(ln_2(x1))    (Zhou et al. ECCV 2022:
               attention replaced by the identity, each patch keeps its own value)
    sclip      A = softmax(q q^T/sqrt d) + softmax(k k^T/sqrt d);  x1 = x + out_proj(A v);
               x2 = x1 + MLP(ln_2(x1))                        (SCLIP, Wang et al. 2023, arXiv 2312.01597)
    clearclip  A = softmax(q q^T/sqrt d);  x2 = out_proj(A v)  (no residual, no MLP; ClearCLIP,
               Lan et al. ECCV 2024, arXiv 2407.12442)
    then f = normalise(proj(ln_post(x2))) for the patch tokens.

Inference (the SCLIP / ClearCLIP / NACLIP protocol): resize the short side to S (336; Cityscapes
560), slide a crop x crop window (224) with a stride (112); per window: cosine logits at patch
resolution, bilinearly upsampled to the window; windows averaged where they overlap; upsampled to
the ORIGINAL image size (the ground truth is never resized); scale, softmax, argmax. Datasets with a
background class use background prompts and/or a probability threshold (pixels whose best class
probability is below it become background).

Metric: one confusion matrix over all pixels of the dataset (ignore label 255), per class
IoU_c = TP_c / (TP_c + FP_c + FN_c), mIoU = mean over the classes with a non-zero union; pixel
accuracy = trace / total. fg-mIoU (mean over the foreground classes only) when there is a background.
Results are reported in PERCENT, like the papers.

Image-level measures, with the same text classifier: zero-shot classification (top-1 / top-5 on a
class-folder tree such as ImageNet's val set, as open_clip's --imagenet-val) and image<->text
retrieval (R@1/5/10 both ways and the contrastive val loss on held-out pairs, as open_clip's
--val-data), on real data (`real_data_metrics`) and on the shapes world (`shapes_metrics`): what
train.py logs during training. And the pictures: segmentation grids, PCA maps.

The benchmark readers, layouts and class names are in loaders/segmentation.py (class folders:
loaders/classification.py, image-text pairs: loaders/imagetext.py), the prompt templates
in loaders/templates.py; loaders/pretrained.py reads checkpoints.

Run:
    python eval_seg.py --ckpt out/ckpt.pt                                 # shapes val split
    python eval_seg.py --ckpt out/ckpt.pt --dataset voc20 --root /data/VOCdevkit --dense maskclip
    python eval_seg.py --ckpt out/ckpt.pt --task classify --root /data/imagenet/val --classnames names.txt
    python eval_seg.py --ckpt out/ckpt.pt --task retrieval --root /data/cc3m/val.csv
Segmentation writes <out_dir>/seg_metrics.json, seg_grid.png (image | ground truth | prediction) and
seg_pca_XXX.png (the first 3 principal components of the patch features as RGB: semantic features
paint each object in one colour).
"""

import argparse
import contextlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from clip import autocast_for, pick_device, trim_padding
from data import CenterView, collate, normalize
from loaders.classification import ClassFolderDataset
from loaders.imagetext import EvalBatches, build_eval_dataset
from loaders.pretrained import checkpoint_config, load_model_from_checkpoint
from loaders.segmentation import DATASETS, IGNORE_INDEX, dataset_defaults, load_dataset
from loaders.shapes import SHAPES_TEMPLATES, ShapesDataset, world_from_config
from loaders.templates import get_templates

DENSE_MODES = ("naive", "maskclip", "sclip", "clearclip")


@contextlib.contextmanager
def evaluation_mode(model):
    """model.eval() inside the block, its own train/eval mode restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# -----------------------------------------------------------------------------------------------
# Text classifier
# -----------------------------------------------------------------------------------------------

@torch.no_grad()
def build_text_classifier(model, tokenizer, class_names, templates, batch_size=256, device=None):
    """Embed every synonym of every class with prompt ensembling.

    class_names: list (one entry per class) of lists of synonyms; a class with an empty list gets no
    text query (used for a background class that is decided by a threshold instead).
    Returns (weights [Q, E], query_class [Q] long): one L2-normalised row per synonym (query) and
    the class index each row belongs to; a class's score is the max over its rows.
      weights[q] = normalise( mean_j normalise(encode_text(template_j.format(name_q))) )
    device: where the tokens go (default: the model's device).
    """
    templates = get_templates(templates)
    names, query_class = [], []
    for c, synonyms in enumerate(class_names):
        for name in synonyms:
            names.append(name)
            query_class.append(c)
    if not names:
        raise ValueError("no class has a name: nothing to classify with")
    device = next(model.parameters()).device if device is None else torch.device(device)
    prompts = [t.format(n) for n in names for t in templates]          # Q * T prompts, name-major
    embeds = []
    for i in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[i:i + batch_size]).to(device)        # [b, L]
        tokens = trim_padding(tokens, model.config.eot_token_id)        # exact: causal, EOT pooling
        embeds.append(model.encode_text(tokens, normalize=True).float())  # [b, E]
    embeds = torch.cat(embeds).view(len(names), len(templates), -1)    # [Q, T, E]
    weights = F.normalize(embeds.mean(dim=1), dim=-1)                  # [Q, E]
    return weights, torch.tensor(query_class, dtype=torch.long, device=device)


def classifier_scores(features, classifier, num_classes=None):
    """Zero-shot classification scores: features [..., E] (L2-normalised) and a classifier from
    build_text_classifier -> [..., C] cosine similarity, max over each class's synonyms
    (-inf for a class without a query)."""
    weights, query_class = classifier
    sims = features.float() @ weights.to(features.device).T             # [..., Q]
    C = int(query_class.max()) + 1 if num_classes is None else num_classes
    out = sims.new_full(sims.shape[:-1] + (C,), float("-inf"))
    index = query_class.to(sims.device).expand(sims.shape)
    return out.scatter_reduce(-1, index, sims, reduce="amax", include_self=True)


# -----------------------------------------------------------------------------------------------
# Dense features: the last block, read four ways
# -----------------------------------------------------------------------------------------------

def _heads(attn, h):
    """q, k, v of an Attention module (in_proj rows = [W_q; W_k; W_v]), split into heads: each [B, nh, T, d]."""
    B, T, D = h.shape
    nh = attn.num_heads
    q, k, v = attn.in_proj(h).chunk(3, dim=-1)                         # each [B, T, D]
    return [t.reshape(B, T, nh, D // nh).transpose(1, 2) for t in (q, k, v)]


def _merge(y):
    """[B, nh, T, d] -> [B, T, nh * d]."""
    B, nh, T, d = y.shape
    return y.transpose(1, 2).reshape(B, T, nh * d)


def last_block_tricks(block, x, dense):
    """Run the last Block on x [B, T, D] with the attention swapped as `dense` says -> [B, T, D].

    Only reads the block's weights; the block itself (and so the model's forward) is untouched.
    """
    h = block.ln_1(x)                                                  # [B, T, D]
    q, k, v = _heads(block.attn, h)                                    # each [B, nh, T, d]
    scale = q.shape[-1] ** -0.5
    if dense == "maskclip":
        # Identity attention: every token keeps its own value vector (Zhou et al. ECCV 2022).
        x = x + block.attn.out_proj(_merge(v))
        return x + block.mlp(block.ln_2(x))
    if dense == "sclip":
        # Correlative self-attention: tokens attend to tokens with similar queries / keys. The two
        # softmaxes are summed as in the SCLIP paper (rows sum to 2; no renormalisation).
        a = (q @ q.transpose(-1, -2) * scale).softmax(-1) + (k @ k.transpose(-1, -2) * scale).softmax(-1)
        x = x + block.attn.out_proj(_merge(a @ v))                     # a: [B, nh, T, T]
        return x + block.mlp(block.ln_2(x))
    if dense == "clearclip":
        # q-q attention, and drop the residual and the MLP, whose output is what makes CLIP's
        # patch features noisy (Lan et al. ECCV 2024).
        a = (q @ q.transpose(-1, -2) * scale).softmax(-1)              # [B, nh, T, T]
        return block.attn.out_proj(_merge(a @ v))
    raise ValueError(f"unknown dense mode {dense!r}; choose one of {DENSE_MODES}")


@torch.no_grad()
def dense_features(model, images, dense="naive"):
    """Patch features in the joint space, L2-normalised: images [B, 3, H, W] -> [B, H/p, W/p, E].

    H and W must be multiples of the patch size p. See the module docstring for the four modes.
    """
    if dense not in DENSE_MODES:
        raise ValueError(f"unknown dense mode {dense!r}; choose one of {DENSE_MODES}")
    vit = model.visual
    B, _, H, W = images.shape
    p = model.config.patch_size
    if dense == "naive":
        _, tokens = vit(images)                                        # [B, 1+N, D], after ln_post
        patches = tokens[:, 1:]                                        # [B, N, D]
    else:
        x = vit.embed(images)                                          # [B, 1+N, D]
        for blk in vit.blocks[:-1]:
            x = blk(x)
        x = last_block_tricks(vit.blocks[-1], x, dense)                # [B, 1+N, D]
        patches = vit.ln_post(x[:, 1:])                                # [B, N, D]
    feats = vit.patch_features(patches)                                # [B, N, E], unit length
    return feats.reshape(B, H // p, W // p, -1)                        # [B, h, w, E]


# -----------------------------------------------------------------------------------------------
# Inference: whole image or sliding window
# -----------------------------------------------------------------------------------------------

def window_logits(model, crops, text_weights, dense="naive"):
    """Cosine logits of one batch of windows: crops [B, 3, h, w] -> [B, Q, h, w].

    The crop is zero-padded (bottom/right) to a multiple of the patch size (zero = the mean colour
    after normalisation), logits are computed per patch, bilinearly upsampled to the padded size,
    and the padding is cut off again.
    """
    B, _, h, w = crops.shape
    p = model.config.patch_size
    ph, pw = math.ceil(h / p) * p, math.ceil(w / p) * p
    if (ph, pw) != (h, w):
        crops = F.pad(crops, (0, pw - w, 0, ph - h))
    feats = dense_features(model, crops, dense)                        # [B, ph/p, pw/p, E]
    logits = torch.einsum("bhwe,qe->bqhw", feats, text_weights.to(feats.dtype))  # [B, Q, ph/p, pw/p]
    logits = F.interpolate(logits, size=(ph, pw), mode="bilinear", align_corners=False)
    return logits[:, :, :h, :w]                                        # [B, Q, h, w]


def window_boxes(H, W, crop, stride):
    """Sliding-window boxes (y1, y2, x1, x2) covering an H x W image (mmsegmentation's "slide" rule).

    Windows start every `stride` pixels; the last one is shifted back to end at the border, and a
    window never exceeds the image (an image smaller than the crop is one window).
    """
    if stride <= 0 or stride > crop:
        raise ValueError(f"need 0 < stride <= crop (else pixels are skipped), got crop {crop}, stride {stride}")
    n_y = max(H - crop + stride - 1, 0) // stride + 1
    n_x = max(W - crop + stride - 1, 0) // stride + 1
    boxes = []
    for iy in range(n_y):
        for ix in range(n_x):
            y2, x2 = min(iy * stride + crop, H), min(ix * stride + crop, W)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


def sliding_window_logits(images, logit_fn, crop, stride, window_batch=16):
    """Average logit_fn over overlapping windows: images [B, 3, H, W] -> [B, Q, H, W].

    logit_fn(crops [b, 3, h, w]) -> [b, Q, h, w] is injectable (tests feed a known function). All
    windows have the same size, so up to `window_batch` of them go through logit_fn at once.
    """
    B, _, H, W = images.shape
    boxes = window_boxes(H, W, crop, stride)
    total, count = None, torch.zeros(1, 1, H, W, device=images.device)
    for i in range(0, len(boxes), window_batch):
        chunk = boxes[i:i + window_batch]
        crops = torch.cat([images[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])  # [n*B, 3, h, w]
        out = logit_fn(crops)                                          # [n*B, Q, h, w]
        if total is None:
            total = images.new_zeros(B, out.shape[1], H, W, dtype=out.dtype)
        for j, (y1, y2, x1, x2) in enumerate(chunk):
            total[:, :, y1:y2, x1:x2] += out[j * B:(j + 1) * B]
            count[:, :, y1:y2, x1:x2] += 1
    return total / count                                               # every pixel is covered >= once


@torch.no_grad()
def predict_logits(model, images, text_weights, dense="naive", crop=None, stride=None,
                   out_size=None, logit_fn=None):
    """Per-query cosine logits at pixel level: images [B, 3, H, W] (normalised) -> [B, Q, H', W'].

    crop=None: whole-image inference; else sliding windows (crop, stride). out_size=(H', W'): the
    averaged logits are bilinearly upsampled to it (the original image size); None keeps (H, W).
    logit_fn: the per-window function (default: window_logits with this model and text).
    """
    if logit_fn is None:
        def logit_fn(crops):
            return window_logits(model, crops, text_weights, dense)
    if crop is None:
        logits = logit_fn(images)                                      # [B, Q, H, W]
    else:
        logits = sliding_window_logits(images, logit_fn, crop, stride if stride is not None else crop)
    if out_size is not None and tuple(out_size) != tuple(logits.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits


def class_probabilities(logits, query_class, num_classes, logit_scale=40.0):
    """logits [B, Q, H, W] (cosine, one per query) -> class probabilities [B, C, H, W].

    Softmax over all queries of logit_scale * logits, then each class takes the max over its
    queries. A class without queries gets probability 0.
    """
    probs = (logit_scale * logits).softmax(dim=1)                      # [B, Q, H, W]
    B, Q, H, W = probs.shape
    out = probs.new_zeros(B, num_classes, H, W)
    index = query_class.to(probs.device).view(1, Q, 1, 1).expand(B, Q, H, W)
    return out.scatter_reduce(1, index, probs, reduce="amax", include_self=True)  # [B, C, H, W]


def predict_classes(probs, prob_thresh=0.0, background_index=None):
    """Class probabilities [B, C, H, W] -> label map [B, H, W]; pixels whose best probability is
    below prob_thresh become background_index (if there is one)."""
    best, pred = probs.max(dim=1)                                      # [B, H, W] each
    if prob_thresh > 0 and background_index is not None:
        pred[best < prob_thresh] = background_index
    return pred


@torch.no_grad()
def segment(model, images, text_weights, query_class, num_classes, dense="naive", crop=None,
            stride=None, out_size=None, logit_scale=40.0, prob_thresh=0.0, background_index=None,
            logit_fn=None):
    """Normalised images [B, 3, H, W] -> predicted labels [B, H', W'] (the whole pipeline)."""
    logits = predict_logits(model, images, text_weights, dense, crop, stride, out_size, logit_fn)
    probs = class_probabilities(logits, query_class, num_classes, logit_scale)
    return predict_classes(probs, prob_thresh, background_index)


# -----------------------------------------------------------------------------------------------
# Metric: one confusion matrix over the whole dataset
# -----------------------------------------------------------------------------------------------

class ConfusionMatrix:
    """counts[t, p] = number of pixels with ground truth t predicted as p (ignore_index skipped)."""

    def __init__(self, num_classes, ignore_index=IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, pred, target):
        """pred, target: integer tensors of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        pred, target = pred.flatten().long().cpu(), target.flatten().long().cpu()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        C = self.num_classes
        if len(target) and (target.min() < 0 or target.max() >= C):
            raise ValueError(f"ground-truth labels must be in [0, {C}) or {self.ignore_index}, "
                             f"found {sorted(set(target.unique().tolist()) - set(range(C)))}")
        if len(pred) and (pred.min() < 0 or pred.max() >= C):
            raise ValueError(f"predicted labels must be in [0, {C})")
        self.counts += torch.bincount(target * C + pred, minlength=C * C).view(C, C)


def chance_miou(counts):
    """The mIoU that labels drawn uniformly at random would score, from the truth's class counts
    (rows of the confusion matrix): class c with n_c of N pixels gets E[TP] = n_c / C, E[FP] =
    (N - n_c) / C, E[FN] = n_c (1 - 1/C), so IoU_c = n_c / (N + (C - 1) n_c); every class is predicted,
    so all C count. Balanced classes: 1 / (2C - 1), 6.7% for 8."""
    n = torch.as_tensor(counts, dtype=torch.float64).sum(1)                 # [C] truth pixels per class
    return float((n / (n.sum() + (len(n) - 1) * n)).mean())


def to_percent(v):
    """A metric fraction -> percent, rounded to 4 decimals; None or NaN (no union) -> None."""
    return None if v is None or math.isnan(v) else round(100 * v, 4)


def miou_from_confusion(counts, background_index=None):
    """Confusion counts [C, C] (rows = truth) -> dict of metrics (fractions; NaN IoU = absent class).

    iou[c] = TP / (TP + FP + FN), NaN where the union is 0 (class neither present nor predicted);
    miou = mean over classes with a union; fg_miou = the same without background_index.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    tp = counts.diag()                                                 # [C]
    union = counts.sum(0) + counts.sum(1) - tp                         # [C]  pred + truth - both
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    total = counts.sum()
    out = {"iou": iou.tolist(),
           "miou": float(iou.nanmean()) if bool((union > 0).any()) else float("nan"),
           "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan")}
    if background_index is not None:
        fg = torch.cat([iou[:background_index], iou[background_index + 1:]])
        out["fg_miou"] = float(fg.nanmean()) if bool((~fg.isnan()).any()) else float("nan")
    return out


# -----------------------------------------------------------------------------------------------
# Pictures
# -----------------------------------------------------------------------------------------------

# 20 colours that stay distinguishable side by side (S. Trubetskoy's list of distinct colours).
DISTINCT_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
                    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
                    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)]


def class_palette(num_classes, background_index=None):
    """Colours [C, 3] uint8 for label maps: the 20 distinct colours first (the background, if any,
    black), then hues spread by the golden ratio for datasets with more classes."""
    colours = list(DISTINCT_COLOURS)
    for c in range(len(colours), num_classes):
        hue = (c * 0.618033988749895) % 1.0
        value = (1.0, 0.75, 0.55)[c % 3]
        hsv = Image.new("HSV", (1, 1), (int(hue * 255), 200, int(value * 255)))
        colours.append(hsv.convert("RGB").getpixel((0, 0)))
    if background_index is not None:                 # shift so the first classes keep the best colours
        colours.insert(background_index, (0, 0, 0))
    return np.array(colours[:num_classes], dtype=np.uint8).reshape(num_classes, 3)


def colourise(label, palette):
    """Label map [H, W] (255 = ignore, drawn white) -> RGB uint8 [H, W, 3]."""
    label = np.asarray(label)
    out = np.full(label.shape + (3,), 255, dtype=np.uint8)
    valid = label != IGNORE_INDEX
    out[valid] = palette[label[valid]]
    return out


def pca_rgb(features):
    """Patch features [h, w, E] -> uint8 RGB [h, w, 3]: the first 3 principal components, each
    min-max scaled to 0..255 (patches with similar features get similar colours)."""
    h, w, E = features.shape
    x = features.reshape(h * w, E).double()
    x = x - x.mean(dim=0, keepdim=True)                               # [N, E] centred
    _, _, vh = torch.linalg.svd(x, full_matrices=False)                # vh: [min(N,E), E]
    comps = x @ vh[:3].T                                               # [N, <=3]
    if comps.shape[1] < 3:
        comps = torch.cat([comps, comps.new_zeros(h * w, 3 - comps.shape[1])], dim=1)
    lo, hi = comps.min(dim=0).values, comps.max(dim=0).values
    comps = (comps - lo) / (hi - lo).clamp(min=1e-12)
    return (comps * 255).round().byte().reshape(h, w, 3).numpy()


def _panel(array, height, nearest):
    """HxWx3 uint8 -> a PIL image scaled to `height` pixels high (aspect kept)."""
    im = Image.fromarray(array)
    width = max(1, round(im.width * height / im.height))
    return im.resize((width, height), Image.NEAREST if nearest else Image.BILINEAR)


def save_prediction_grid(rows, names, path, background_index=None, panel_height=192):
    """rows: list of (image uint8 [3,H,W], truth [H,W], prediction [H,W]); names: one display name per
    class. Writes a PNG: one row per image (image | ground truth | prediction) and a colour legend
    of the classes that appear."""
    palette = class_palette(len(names), background_index)
    font = ImageFont.load_default()
    panels = []
    for image, truth, pred in rows:
        panels.append([_panel(image.permute(1, 2, 0).numpy(), panel_height, nearest=False),
                       _panel(colourise(truth, palette), panel_height, nearest=True),
                       _panel(colourise(pred, palette), panel_height, nearest=True)])
    col_w = [max(r[j].width for r in panels) for j in range(3)]
    gap, head = 4, 16
    width = sum(col_w) + 4 * gap
    present = sorted(set(np.unique(np.concatenate([np.ravel(t) for _, t, p in rows] +
                                                  [np.ravel(p) for _, t, p in rows])).tolist()))
    entries = [(names[c], tuple(int(v) for v in palette[c])) for c in present if c != IGNORE_INDEX]
    if IGNORE_INDEX in present:
        entries.append(("ignore", (255, 255, 255)))
    entry_w = 150
    per_line = max(1, (width - gap) // entry_w)
    legend_h = 18 * math.ceil(len(entries) / per_line) + gap
    height = head + len(rows) * (panel_height + gap) + gap + legend_h
    canvas = Image.new("RGB", (width, height), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    x = gap
    for j, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((x, 2), title, fill=(255, 255, 255), font=font)
        x += col_w[j] + gap
    for i, row in enumerate(panels):
        x, y = gap, head + i * (panel_height + gap)
        for j, im in enumerate(row):
            canvas.paste(im, (x, y))
            x += col_w[j] + gap
    y0 = head + len(rows) * (panel_height + gap) + gap
    for k, (name, colour) in enumerate(entries):
        x, y = gap + (k % per_line) * entry_w, y0 + (k // per_line) * 18
        draw.rectangle([x, y, x + 13, y + 13], fill=colour, outline=(255, 255, 255))
        draw.text((x + 18, y), name[:20], fill=(255, 255, 255), font=font)
    canvas.save(path)


def save_pca_picture(image, features, path, panel_height=192):
    """image uint8 [3, H, W] and its patch features [h, w, E] -> PNG: image | PCA RGB map."""
    left = _panel(image.permute(1, 2, 0).numpy(), panel_height, nearest=False)
    right = _panel(pca_rgb(features), panel_height, nearest=True)
    canvas = Image.new("RGB", (left.width + right.width + 4, panel_height), (40, 40, 40))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 4, 0))
    canvas.save(path)


# -----------------------------------------------------------------------------------------------
# The evaluation loop
# -----------------------------------------------------------------------------------------------

def preprocess(images, short_side=None):
    """uint8 (or float in [0, 1]) images [B, 3, H, W] -> float, short side resized to short_side
    (bilinear, aspect kept, like mmcv's rescale), normalised with CLIP's mean / std (data.normalize)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if short_side is not None:
        H, W = x.shape[-2:]
        s = short_side / min(H, W)
        size = (int(H * s + 0.5), int(W * s + 0.5))
        if size != (H, W):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return normalize(x)


def protocol_settings(dataset, **given):
    """The dataset's protocol (loaders.segmentation.PROTOCOL), each setting given (not None) overriding it."""
    settings = dataset_defaults(dataset)
    settings.update({k: v for k, v in given.items() if v is not None})
    if settings["crop"] and not settings["stride"]:
        settings["stride"] = settings["crop"]
    if dataset.background_index is not None and not settings["bg_prompts"] and settings["prob_thresh"] <= 0:
        raise ValueError("the dataset has a background class but neither bg_prompts nor prob_thresh > 0 "
                         "is set: background could never be predicted")
    return settings


def text_queries(model, tokenizer, dataset, settings, device):
    """The text classifier of the dataset's classes. Without background prompts the background class
    gets no text query: only the probability threshold can predict it."""
    bg = dataset.background_index
    names = [[] if (c == bg and not settings["bg_prompts"]) else synonyms
             for c, synonyms in enumerate(dataset.class_names)]
    return build_text_classifier(model, tokenizer, names, settings["templates"], device=device)


def same_size_groups(dataset, n, batch_size):
    """Read the first n items batch_size at a time, and yield each read's items grouped by image size
    (all of them at once for shapes; real datasets' photos vary)."""
    for start in range(0, n, batch_size):
        groups = {}
        for i in range(start, min(start + batch_size, n)):
            item = dataset[i]
            groups.setdefault(tuple(item["image"].shape), []).append(item)
        yield from groups.values()


def segment_group(model, group, text, settings, num_classes, background_index, device):
    """Items of one image size -> (raw uint8 images [b, 3, H, W], truth [b, H, W], the preprocessed
    images, predictions [b, H, W] at the labels' size), with the dataset's protocol `settings`."""
    raw = torch.stack([it["image"] for it in group])                     # [b, 3, H, W]
    truth = torch.stack([it["mask"] for it in group])                    # [b, H, W]
    images = preprocess(raw.to(device), settings["short_side"] or None)  # [b, 3, H', W']
    pred = segment(model, images, *text, num_classes, dense=settings["dense"], crop=settings["crop"] or None,
                   stride=settings["stride"], out_size=truth.shape[-2:], logit_scale=settings["logit_scale"],
                   prob_thresh=settings["prob_thresh"], background_index=background_index).cpu()
    return raw, truth, images, pred


def display_names(class_names, bg):
    """Each class's first name, "background" for the background class (VOC21's background prompts
    start with "sky"), made unique if a class list repeats a name."""
    display = [names[0] for names in class_names]
    if bg is not None:
        display[bg] = "background"
    if len(set(display)) < len(display):
        display = [f"{c}:{name}" for c, name in enumerate(display)]
    return display


def evaluate_segmentation(model, tokenizer, dataset="shapes8", dense="naive", templates=None,
                          short_side=None, crop=None, stride=None, logit_scale=None, bg_prompts=None,
                          prob_thresh=None, batch_size=32, max_images=None, out_dir=None, n_pictures=8,
                          progress=True, device=None, root=None, image_size=64):
    """Zero-shot segmentation of a whole dataset -> metrics dict (also written to out_dir/seg_metrics.json).

    model: an unwrapped CLIP (not DDP / compiled); its train/eval mode is restored afterwards.
    dataset: an object from load_dataset (with .name, .class_names, .background_index), or a name
    for load_dataset (with `root`; for "shapes8" / "shapes9", the val split at `image_size` pixels).
    Settings left at None take the dataset's protocol (loaders.segmentation.PROTOCOL); short_side=0 keeps the
    native size, crop=0 means whole-image inference. bg_prompts: give the background class its text
    names; prob_thresh: best class probability below which a pixel becomes background (0 = off).
    Images of the same size are batched (batch_size). device: default the model's device.
    Returned metrics are in PERCENT: miou, fg_miou (None without a background class), pixel_acc,
    per_class_iou {first class name: IoU or None if the class has no union}.
    """
    if isinstance(dataset, str):
        dataset = (load_dataset(dataset, split="val", size=image_size) if dataset.startswith("shapes")
                   else load_dataset(dataset, root))
    if dense not in DENSE_MODES:
        raise ValueError(f"unknown dense mode {dense!r}; choose one of {DENSE_MODES}")
    settings = protocol_settings(dataset, templates=templates, logit_scale=logit_scale, bg_prompts=bg_prompts,
                                 prob_thresh=prob_thresh, short_side=short_side, crop=crop, stride=stride)
    settings.update(dense=dense, dataset=dataset.name, batch_size=batch_size)
    C, bg = len(dataset.class_names), dataset.background_index
    device = next(model.parameters()).device if device is None else torch.device(device)
    conf = ConfusionMatrix(C)
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    pictures = []
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    with evaluation_mode(model):
        text = text_queries(model, tokenizer, dataset, settings, device)    # (weights [Q, E], query_class [Q])
        bar = tqdm(total=n, desc=f"seg {dataset.name} ({dense})", disable=not progress)
        for group in same_size_groups(dataset, n, batch_size):
            raw, truth, images, pred = segment_group(model, group, text, settings, C, bg, device)
            conf.update(pred, truth)
            for j in range(min(len(group), n_pictures - len(pictures)) if out_dir is not None else 0):
                shown = pred[j] if bg is not None else torch.where(truth[j] == IGNORE_INDEX, IGNORE_INDEX, pred[j])
                pictures.append((raw[j], truth[j].numpy(), shown.numpy()))    # (ignored pixels are not shown)
                save_pca_picture(raw[j], _whole_image_features(model, images[j:j + 1], dense),
                                 os.path.join(out_dir, f"seg_pca_{len(pictures) - 1:03d}.png"))
            bar.update(len(group))
        bar.close()
    m = miou_from_confusion(conf.counts, bg)
    display = display_names(dataset.class_names, bg)
    result = {"dataset": dataset.name, "num_images": n, "miou": to_percent(m["miou"]),
              "fg_miou": to_percent(m["fg_miou"]) if bg is not None else None,
              "pixel_acc": to_percent(m["pixel_acc"]), "chance_miou": to_percent(chance_miou(conf.counts)),
              "per_class_iou": {name: to_percent(v) for name, v in zip(display, m["iou"])},
              "seconds": round(time.time() - t0, 2), "settings": settings}
    if out_dir is not None:
        if pictures:
            save_prediction_grid(pictures, display, os.path.join(out_dir, "seg_grid.png"), bg)
        with open(os.path.join(out_dir, "seg_metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def _whole_image_features(model, images, dense):
    """Dense features of the whole (resized) image, padded to a multiple of the patch size: [h, w, E]."""
    p = model.config.patch_size
    H, W = images.shape[-2:]
    images = F.pad(images, (0, (-W) % p, 0, (-H) % p))
    return dense_features(model, images, dense)[0].cpu()


# -----------------------------------------------------------------------------------------------
# Image-level measures: zero-shot classification and image-text retrieval (real data and shapes)
# -----------------------------------------------------------------------------------------------
def match_ranks(sim, match):
    """sim [Q, C] similarities, match [Q, C] bool (True where candidate c is a correct answer for
    query q) -> long [Q]: each query's rank, the number of WRONG candidates at least as similar as its
    best correct one. Ties count against the query, so a model that scores everything alike gets no
    credit (open_clip's argsort breaks exact ties arbitrarily instead; otherwise the same rank)."""
    best = torch.where(match, sim, float("-inf")).max(dim=1).values           # [Q]
    return ((sim >= best[:, None]) & ~match).sum(dim=1)                         # [Q]


def recall_at_k(sim, match, ks=(1, 5)):
    """R@k: the fraction of queries that find a correct candidate among their k most similar ones
    (match_ranks < k). Shapes captions repeat ("two circles"), so there every candidate with the same
    caption counts; held-out image-text sets count the pair's own caption only, as open_clip does."""
    rank = match_ranks(sim, match)
    return {k: int((rank < k).sum()) / len(rank) for k in ks}      # the exact fraction hits / queries


def topk_accuracy(scores, labels, ks=(1, 5)):
    """Top-k accuracy: scores [N, C], labels [N] -> {k: fraction of images whose true class is among
    the k best}. It is R@k with the classes as the candidates and one correct answer each."""
    return recall_at_k(scores, F.one_hot(labels.long(), scores.shape[1]).bool(), ks)


@torch.no_grad()
def encode_images(model, batches, device, autocast_ctx=None, progress=False, desc="images"):
    """Batches with "images" (and "labels") -> (L2-normalised pooled image embeddings [N, E] float32 on
    the CPU, labels [N] or None). What zero-shot classification and the linear probe read."""
    feats, labels = [], []
    for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch", dynamic_ncols=True, leave=False):
        with autocast_ctx or contextlib.nullcontext():
            feats.append(model.encode_image(batch["images"].to(device)).float().cpu())   # [b, E]
        if "labels" in batch:
            labels.append(batch["labels"])
    if not feats:
        raise ValueError("no readable image in the evaluation set (every sample was skipped)")
    return torch.cat(feats), (torch.cat(labels) if labels else None)


def zeroshot_classification(model, tokenizer, class_names, templates, batches, device, autocast_ctx=None,
                            ks=(1, 5), progress=False):
    """Zero-shot top-k accuracy (fractions) on labelled image batches: each image's embedding against
    the prompt-ensembled text classifier (build_text_classifier; class_names: [[name, synonym...]] per
    class), the best synonym per class. -> {"top1", "top5", "images"} for ks=(1, 5)."""
    with evaluation_mode(model):
        weights, query_class = build_text_classifier(model, tokenizer, class_names, templates, device=device)
        feats, labels = encode_images(model, batches, device, autocast_ctx, progress, desc="zero-shot")
    scores = classifier_scores(feats, (weights.cpu(), query_class.cpu()), num_classes=len(class_names))  # [N, C]
    acc = topk_accuracy(scores, labels, ks)
    return {**{f"top{k}": acc[k] for k in ks}, "images": len(labels)}


@torch.no_grad()
def image_text_retrieval(model, batches, device, autocast_ctx=None, same_caption=False, ks=(1, 5, 10),
                         progress=False):
    """Image->text and text->image R@k over a set of pairs, and its contrastive loss, as open_clip's
    evaluate computes them (open_clip_train/train.py): the loss per batch is the symmetric
    cross-entropy of exp(s) * cosine, averaged over pairs; R@k ranks every pair against the whole set.
    The correct answer is the pair's own caption (open_clip) or, with same_caption, every candidate
    whose caption is identical (the shapes world). The SigLIP bias is left out, as in open_clip: a
    constant added to every logit changes no softmax. The batches fix the loss (its negatives), so the
    caller fixes the batch size. -> {"loss", "i2t_r1", ..., "t2i_r10", "pairs"} (fractions)."""
    imgs, txts, caps, loss_sum = [], [], [], 0.0
    with evaluation_mode(model):
        for batch in tqdm(batches, desc="retrieval", disable=not progress, unit="batch", dynamic_ncols=True,
                          leave=False):
            with autocast_ctx or contextlib.nullcontext():
                im, tx, scale, _ = model(batch["images"].to(device), batch["tokens"].to(device))
            im, tx = im.float(), tx.float()                                    # [b, E] each, normalised
            logits = scale.float() * im @ tx.T                                 # [b, b]
            labels = torch.arange(len(im), device=logits.device)
            loss_sum += 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)).item() * len(im)
            imgs, txts, caps = imgs + [im.cpu()], txts + [tx.cpu()], caps + batch["captions"]
    if not imgs:
        raise ValueError("no readable pair in the evaluation set (every sample was skipped)")
    im, tx = torch.cat(imgs), torch.cat(txts)                                  # [n, E]
    sim = im @ tx.T                                                            # [n, n]
    if same_caption:
        ids = {c: i for i, c in enumerate(dict.fromkeys(caps))}
        cap_id = torch.tensor([ids[c] for c in caps])
        match = cap_id[:, None] == cap_id[None, :]                             # [n, n]
    else:
        match = torch.eye(len(caps), dtype=torch.bool)
    i2t, t2i = recall_at_k(sim, match, ks), recall_at_k(sim.T, match.T, ks)
    return {"loss": loss_sum / len(caps), **{f"i2t_r{k}": i2t[k] for k in ks}, **{f"t2i_r{k}": t2i[k] for k in ks},
            "pairs": len(caps)}


def real_data_metrics(model, tokenizer, val_set=None, zeroshot_set=None, templates="openai", batch_size=250,
                      num_workers=0, device="cpu", autocast_ctx=None, progress=True):
    """What train.py logs for real data (and eval_seg.py's --task classify / retrieval prints):
      val_i2t_r1/5/10, val_t2i_r1/5/10, val_contrastive, val_pairs, val_skipped   retrieval and the
          contrastive loss on a held-out image-text set (val_set: loaders.imagetext.build_eval_dataset);
      zeroshot_top1, zeroshot_top5, zeroshot_images, zeroshot_skipped            zero-shot classification
          on a class-folder set (zeroshot_set: loaders.classification.ClassFolderDataset).
    The sets' transform must give the model's input (data.CenterView). Skipped: samples not read
    (corrupt image, empty caption), counted, as in training. Fractions, not percent, like open_clip."""
    out = {}
    if val_set is not None:
        batches = EvalBatches(val_set, batch_size, tokenizer, num_workers)
        r = image_text_retrieval(model, batches, device, autocast_ctx, progress=progress)
        out.update({"val_" + k: v for k, v in r.items() if k not in ("loss", "pairs")},
                   val_contrastive=r["loss"], val_pairs=r["pairs"], val_skipped=batches.skipped)
    if zeroshot_set is not None:
        batches = EvalBatches(zeroshot_set, batch_size, None, num_workers)
        r = zeroshot_classification(model, tokenizer, zeroshot_set.class_names, templates, batches, device,
                                    autocast_ctx, progress=progress)
        out.update(zeroshot_top1=r["top1"], zeroshot_top5=r["top5"], zeroshot_images=r["images"],
                   zeroshot_skipped=batches.skipped)
    return out


@torch.no_grad()
def shapes_metrics(model, tokenizer, split="val", image_size=64, n=512, device="cpu", autocast_ctx=None,
                   seg=True, seg_out_dir=None, world=None, batch_size=250):
    """The shapes world's zero-shot measures of a CLIP model (an unwrapped one; its mode is restored):
      val_loss, i2t_r1/r5, t2i_r1/r5  retrieval on the multi-object `split` (n images; every candidate
                                       with the same caption counts as correct; image_text_retrieval)
      zeroshot_acc                     the 8 shape names in the shapes templates, on single-object images
      shapes8_X, shapes9_X             zero-shot segmentation mIoU with each dense readout X, background
                                       ignored (8 classes) / as a class (9), with seg; shapes8_chance: the
                                       mIoU of uniformly random labels. seg_out_dir: pictures and
                                       seg_metrics.json of shapes8 go there"""
    autocast_ctx = autocast_ctx or autocast_for(torch.device(device))
    metrics = {}
    def batches(dataset):
        return [collate([dataset[j] for j in range(i, min(i + batch_size, n))], tokenizer)
                for i in range(0, n, batch_size)]
    world = world or {}                                 # ShapesDataset's options (the training world's)
    with evaluation_mode(model):
        # --- retrieval + val loss on the multi-object split ---
        r = image_text_retrieval(model, batches(ShapesDataset(split, size=image_size, length=n, seed=0, **world)),
                                 device, autocast_ctx, same_caption=True, ks=(1, 5))
        metrics.update(val_loss=r["loss"], **{k: r[k] for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")})
        # --- zero-shot classification on single-object images ---
        single = ShapesDataset(split + "_single", size=image_size, length=n, seed=0, **world)
        z = zeroshot_classification(model, tokenizer, [[c] for c in single.class_names], SHAPES_TEMPLATES,
                                    batches(single), device, autocast_ctx, ks=(1,))
        metrics["zeroshot_acc"] = z["top1"]
        # --- zero-shot segmentation, every dense readout: shapes8 (background ignored, the headline) and
        #     shapes9 (background as a class, through its prompts) ---
        if seg:
            for name in ("shapes8", "shapes9"):
                data = load_dataset(name, split=split, size=image_size, length=n, **world)
                for dense in DENSE_MODES:
                    out = (os.path.join(seg_out_dir, f"seg_{name}_{dense}") if seg_out_dir and name == "shapes8"
                           else None)
                    result = evaluate_segmentation(model, tokenizer, dataset=data, dense=dense, device=device,
                                                   out_dir=out, max_images=n, progress=False)
                    metrics[f"{name}_{dense}"] = result["miou"]
                    if name == "shapes8" and dense == "naive":
                        metrics["shapes8_chance"] = result["chance_miou"]
                metrics[f"{name}_best"] = max(metrics[f"{name}_{d}"] for d in DENSE_MODES)   # the best readout
    return metrics


# -----------------------------------------------------------------------------------------------
# The command line
# -----------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description="Zero-shot semantic segmentation (and classification, retrieval) "
                                             "with a CLIP checkpoint.")
    ap.add_argument("--ckpt", required=True, help="a train.py checkpoint, or a public CLIP checkpoint "
                    "(OpenAI .pt, open_clip .bin; then also --bpe_path)")
    ap.add_argument("--task", default="seg", choices=("seg", "classify", "retrieval"),
                    help="seg: segmentation on --dataset; classify: zero-shot top-1/top-5 on the class-folder "
                         "tree --root (root/<class>/*.jpg); retrieval: R@1/5/10 and the contrastive loss on "
                         "the image-text pairs --root (.csv/.tsv or .tar shards)")
    ap.add_argument("--classnames", default=None, help="classify: class names, one line per class folder in "
                    "sorted order (synonyms separated by commas); default: the folder names")
    ap.add_argument("--csv_img_key", default="filepath", help="retrieval on a csv: the image-path column")
    ap.add_argument("--csv_caption_key", default="title", help="retrieval on a csv: the caption column")
    ap.add_argument("--num_workers", type=int, default=2, help="classify / retrieval: image-decoding workers")
    ap.add_argument("--bpe_path", default=None, help="CLIP's bpe_simple_vocab_16e6.txt.gz (public checkpoints)")
    ap.add_argument("--act", default="quick_gelu", choices=("quick_gelu", "gelu"),
                    help="activation of a public checkpoint: quick_gelu (OpenAI) or gelu (most open_clip)")
    ap.add_argument("--dataset", default="shapes8", choices=DATASETS,
                    help="shapes8: background ignored (the headline, as VOC-20); shapes9: background a class")
    ap.add_argument("--teacher", action="store_true", help="evaluate the EMA teacher's image tower")
    ap.add_argument("--root", default=None, help="dataset folder (not needed for shapes)")
    ap.add_argument("--split", default="val", help="shapes split (val | tune | val_single | ...)")
    ap.add_argument("--dense", default="naive", choices=DENSE_MODES)
    ap.add_argument("--out_dir", default=None, help="default: the checkpoint's folder")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    ap.add_argument("--templates", default=None, help="openai | short | shapes (default: per dataset)")
    ap.add_argument("--short_side", type=int, default=None, help="0 = native size")
    ap.add_argument("--crop", type=int, default=None, help="sliding-window crop; 0 = whole image")
    ap.add_argument("--stride", type=int, default=None)
    ap.add_argument("--whole", action="store_true", help="whole-image inference (no sliding window)")
    ap.add_argument("--logit_scale", type=float, default=None)
    ap.add_argument("--bg_prompts", type=int, default=None, choices=(0, 1), help="give background its names")
    ap.add_argument("--prob_thresh", type=float, default=None, help="below it a pixel becomes background")
    ap.add_argument("--batch_size", type=int, default=None, help="default 32; classify / retrieval: 250, "
                    "train.py's --eval_batch_size (the val loss depends on it: its negatives)")
    ap.add_argument("--max_images", type=int, default=None)
    ap.add_argument("--n_pictures", type=int, default=8)
    ap.add_argument("--size", type=int, default=None, help="shapes image size; classify / retrieval: the input "
                    "size (default: the model's)")
    ap.add_argument("--seed", type=int, default=0, help="shapes seed")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    model, tokenizer = load_model_from_checkpoint(args.ckpt, device, bpe_path=args.bpe_path, act=args.act,
                                                  teacher=args.teacher)
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.ckpt))
    if args.task != "seg":                     # image-level measures on a real dataset
        if not args.root:
            ap.error(f"--task {args.task} needs --root (the class-folder tree, or the csv / tar shards)")
        view = CenterView(args.size or model.config.image_size)
        try:
            sets = (dict(zeroshot_set=ClassFolderDataset(args.root, args.classnames, view)) if args.task == "classify"
                    else dict(val_set=build_eval_dataset(args.root, view, args.csv_img_key, args.csv_caption_key)))
        except (FileNotFoundError, ValueError) as e:
            ap.error(str(e))
        result = real_data_metrics(model, tokenizer, **sets, templates=args.templates or "openai",
                                   batch_size=args.batch_size or 250, num_workers=args.num_workers, device=device,
                                   autocast_ctx=autocast_for(device))
        path = os.path.join(out_dir, f"{args.task}_metrics.json")
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"root": args.root, **result}, f, indent=2)
        print(f"{args.task} on {args.root}: " + "  ".join(f"{k} {v:.4g}" for k, v in result.items()) + f" -> {path}")
        return result
    if args.dataset.startswith("shapes"):       # the world the checkpoint was trained in
        size = args.size or model.config.image_size
        dataset = load_dataset(args.dataset, split=args.split, size=size, seed=args.seed,
                               **world_from_config(checkpoint_config(args.ckpt)))
    else:
        dataset = load_dataset(args.dataset, args.root)
    result = evaluate_segmentation(
        model, tokenizer, dataset, dense=args.dense, templates=args.templates,
        short_side=args.short_side, crop=0 if args.whole else args.crop, stride=args.stride,
        logit_scale=args.logit_scale, bg_prompts=None if args.bg_prompts is None else bool(args.bg_prompts),
        prob_thresh=args.prob_thresh, batch_size=args.batch_size or 32, max_images=args.max_images,
        out_dir=out_dir, n_pictures=args.n_pictures)
    fg = f"  fg-mIoU {result['fg_miou']:.2f}" if result["fg_miou"] is not None else ""
    print(f"{result['dataset']} ({args.dense}): mIoU {result['miou']:.2f}{fg}  pixel acc "
          f"{result['pixel_acc']:.2f}  ({result['num_images']} images) -> {out_dir}/seg_metrics.json")
    return result


if __name__ == "__main__":
    main()
