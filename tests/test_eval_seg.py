"""Tests for eval_seg.py, each against an independent computation: hand-worked confusion matrices,
hand-made dataset trees, hand-averaged windows, and per-head / per-prompt loops written here."""

import dataclasses
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_seg
from test_loaders import save_image, save_palette_png
from clip import CLIP, CLIPConfig
from data import ByteTokenizer
from eval_seg import (ConfusionMatrix, build_text_classifier, class_probabilities, dense_features,
                      miou_from_confusion, predict_classes, predict_logits, sliding_window_logits, window_boxes)
from loaders.pretrained import load_model_from_checkpoint
from loaders.segmentation import load_dataset
from loaders.shapes import ShapesSegmentation
from loaders.templates import get_templates


def tiny_model(stem="linear", seed=0):
    """2-layer, 32-wide CLIP; biases randomised so every bias term matters in the comparisons."""
    torch.manual_seed(seed)
    cfg = CLIPConfig(image_size=16, patch_size=4, stem=stem, vision_width=32, vision_layers=2,
                     vision_heads=2, text_width=32, text_layers=1, text_heads=2, embed_dim=16,
                     context_length=32)
    model = CLIP(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


# ------------------------------------------------------------------------------------------------
# Metric
# ------------------------------------------------------------------------------------------------

def test_miou_hand_worked_with_ignore_and_absent_classes():
    # 5 classes, 0 = background; class 3 appears nowhere; class 4 is predicted but not in the truth.
    truth = torch.tensor([0, 0, 0, 1, 1, 2, 255, 255, 1])
    pred = torch.tensor([0, 1, 0, 1, 1, 1, 2, 0, 4])
    cm = ConfusionMatrix(5)
    cm.update(pred[:4], truth[:4])                 # two updates == one over all pixels
    cm.update(pred[4:], truth[4:])
    # Valid pairs (truth, pred): (0,0) (0,1) (0,0) (1,1) (1,1) (2,1) (1,4); the 255 pixels are skipped.
    expected = torch.zeros(5, 5, dtype=torch.long)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 1], expected[1, 4] = 2, 1, 2, 1, 1
    assert torch.equal(cm.counts, expected)
    m = miou_from_confusion(cm.counts, background_index=0)
    # IoU0 = 2/(3+2-2), IoU1 = 2/(3+4-2), IoU2 = 0/1, IoU3 = no union, IoU4 = 0/1.
    iou = [2 / 3, 2 / 5, 0.0, float("nan"), 0.0]
    for got, want in zip(m["iou"], iou):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)
    assert m["miou"] == pytest.approx((2 / 3 + 2 / 5 + 0 + 0) / 4)
    assert m["fg_miou"] == pytest.approx((2 / 5 + 0 + 0) / 3)
    assert m["pixel_acc"] == pytest.approx(4 / 7)


def test_shapes8_metric_by_hand_background_ignored():
    """shapes8, the field's convention: a 4 x 4 label map with background (0) ignored and the shapes
    shifted down by one; the prediction is scored among the 8 shapes only, by hand."""
    raw = torch.tensor([[0, 0, 1, 1], [0, 3, 3, 1], [2, 2, 3, 0], [2, 0, 0, 0]])   # 0 bg, k = shape k - 1
    truth = torch.where(raw == 0, 255, raw - 1)                                  # what ShapesSegmentation gives
    pred = torch.tensor([[5, 7, 0, 0], [1, 2, 2, 0], [1, 1, 0, 4], [2, 6, 6, 6]])   # any class on background
    cm = ConfusionMatrix(8)
    cm.update(pred, truth)
    # labelled pixels: class 0 (raw 1): 3 pixels, all predicted 0 -> TP 3; class 1 (raw 2): 3 pixels,
    # predicted 1, 1, 2 -> TP 2, FN 1; class 2 (raw 3): 3 pixels predicted 2, 2, 0 -> TP 2, FN 1.
    # FP: class 0 gets 1 (a class-2 pixel), class 2 gets 1 (a class-1 pixel), class 1 none.
    m = miou_from_confusion(cm.counts)
    assert m["iou"][:3] == pytest.approx([3 / 4, 2 / 3, 2 / 4])
    assert all(math.isnan(v) for v in m["iou"][3:])                             # classes 3-7: no union
    assert m["miou"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 4) / 3) and m["pixel_acc"] == pytest.approx(7 / 9)
    # the chance level of uniformly random labels: n_c / (N + (C - 1) n_c) per class, all C classes
    counts = torch.zeros(8, 8, dtype=torch.long)
    counts[0, 0], counts[1, 3], counts[2, 5] = 3, 3, 3                           # truth rows: 3, 3, 3, 0...
    assert eval_seg.chance_miou(counts) == pytest.approx(3 * (3 / (9 + 7 * 3)) / 8)
    balanced = torch.eye(8, dtype=torch.long) * 100
    assert eval_seg.chance_miou(balanced) == pytest.approx(1 / 15)                # 6.7% for 8 classes
    g = torch.Generator().manual_seed(0)                                          # and by simulation
    y = torch.randint(0, 8, (200_000,), generator=g)
    sim = ConfusionMatrix(8)
    sim.update(torch.randint(0, 8, (200_000,), generator=g), y)
    assert 100 * miou_from_confusion(sim.counts)["miou"] == pytest.approx(100 * eval_seg.chance_miou(sim.counts), abs=0.1)


def test_confusion_rejects_labels_out_of_range():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="ground-truth labels"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))


# ------------------------------------------------------------------------------------------------
# Sliding windows
# ------------------------------------------------------------------------------------------------

def test_window_boxes_hand_worked():
    # W=6, crop 4, stride 2: starts 0 and 2 (the second ends at the border); H=4: one row.
    assert window_boxes(4, 6, 4, 2) == [(0, 4, 0, 4), (0, 4, 2, 6)]
    # W=7: starts 0, 2, then 4 -> shifted back to end at 7 -> 3.
    assert window_boxes(4, 7, 4, 2) == [(0, 4, 0, 4), (0, 4, 2, 6), (0, 4, 3, 7)]
    assert window_boxes(3, 5, 8, 4) == [(0, 3, 0, 5)]                 # smaller than the crop: one window
    with pytest.raises(ValueError):
        window_boxes(4, 6, 4, 5)                                      # stride > crop skips pixels


@pytest.mark.parametrize("window_batch", [1, 16])
def test_overlapping_windows_are_averaged(window_batch):
    # Channel 0 = column index, channel 1 = row index; the window function returns each window's
    # MEAN of those channels as a constant map. 6x6 image, crop 4, stride 2: windows start at 0 and 2
    # in each direction, with means 1.5 and 3.5. Pixels 0-1 see only the first (1.5), pixels 2-3 both
    # ((1.5 + 3.5) / 2 = 2.5), pixels 4-5 only the second (3.5).
    cols = torch.arange(6.0).view(1, 6).expand(6, 6)
    images = torch.stack([cols, cols.T, torch.zeros(6, 6)]).unsqueeze(0)   # [1, 3, 6, 6]

    def window_means(crops):                                           # [n, 3, h, w] -> [n, 2, h, w]
        return crops[:, :2].mean(dim=(2, 3), keepdim=True).expand(-1, -1, *crops.shape[2:])

    out = sliding_window_logits(images, window_means, crop=4, stride=2, window_batch=window_batch)
    per_index = torch.tensor([1.5, 1.5, 2.5, 2.5, 3.5, 3.5])
    assert torch.allclose(out[0, 0], per_index.view(1, 6).expand(6, 6))
    assert torch.allclose(out[0, 1], per_index.view(6, 1).expand(6, 6))
    # The identity window function must give the image back exactly (windows placed correctly).
    img = torch.randn(2, 3, 7, 9)
    assert torch.allclose(sliding_window_logits(img, lambda c: c, crop=4, stride=3), img)


def test_sliding_window_covering_the_image_equals_whole_image():
    model = tiny_model()
    images = torch.randn(2, 3, 16, 24)
    text = F.normalize(torch.randn(5, 16), dim=-1)
    whole = predict_logits(model, images, text, "maskclip", crop=None)
    for crop in (24, 32):                                             # >= both sides: one window
        slide = predict_logits(model, images, text, "maskclip", crop=crop, stride=crop // 2)
        assert torch.allclose(slide, whole, atol=1e-6)
    # And a whole-image logit map really is the cosine of patch features and text, upsampled.
    feats = dense_features(model, images, "maskclip")                  # [2, 4, 6, 16]
    coarse = torch.einsum("bhwe,qe->bqhw", feats, text)
    assert torch.allclose(whole, F.interpolate(coarse, size=(16, 24), mode="bilinear"), atol=1e-6)


def test_window_logits_pad_to_patch_multiple():
    # 18 x 14 is not a multiple of the 4-px patch: padded to 20 x 16, logits cut back.
    model = tiny_model()
    images = torch.randn(1, 3, 18, 14)
    text = F.normalize(torch.randn(3, 16), dim=-1)
    out = eval_seg.window_logits(model, images, text, "naive")
    padded = F.pad(images, (0, 2, 0, 2))
    ref = eval_seg.window_logits(model, padded, text, "naive")[:, :, :18, :14]
    assert out.shape == (1, 3, 18, 14) and torch.allclose(out, ref, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Dense-feature tricks on the last block
# ------------------------------------------------------------------------------------------------

def _into_last_block(model, images):
    x = model.visual.embed(images)
    for blk in model.visual.blocks[:-1]:
        x = blk(x)
    return x                                                           # [B, 1+N, D]


def _to_features(model, x, images):
    f = F.normalize(model.visual.proj(model.visual.ln_post(x[:, 1:])), dim=-1)
    p = model.config.patch_size
    return f.reshape(images.shape[0], images.shape[2] // p, images.shape[3] // p, -1)


def test_maskclip_equals_identity_attention_and_leaves_the_model_alone():
    model = tiny_model(stem="conv")
    images = torch.randn(2, 3, 16, 12)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        embed_before, tokens_before = model.visual(images)
        got = {mode: dense_features(model, images, mode) for mode in eval_seg.DENSE_MODES}
        embed_after, tokens_after = model.visual(images)

        # Identity attention, written as the model's own attention with a mask that lets each token
        # see only itself (softmax over one key = 1): out_proj(v).
        x = _into_last_block(model, images)
        last = model.visual.blocks[-1]
        only_self = torch.eye(x.shape[1], dtype=torch.bool)
        x1 = x + last.attn(last.ln_1(x), attn_mask=only_self)
        x2 = x1 + last.mlp(last.ln_2(x1))
        want_maskclip = _to_features(model, x2, images)
        want_naive = _to_features(model, model.visual.blocks[-1](x), images)
    assert torch.allclose(got["maskclip"], want_maskclip, atol=1e-5)
    assert torch.allclose(got["naive"], want_naive, atol=1e-5)
    assert not torch.allclose(got["maskclip"], got["naive"], atol=1e-3)   # the trick does something
    assert got["naive"].shape == (2, 4, 3, 16)
    assert torch.allclose(got["naive"].norm(dim=-1), torch.ones(2, 4, 3))
    # The normal forward and the weights are untouched.
    assert torch.equal(embed_before, embed_after) and torch.equal(tokens_before, tokens_after)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _per_head_attention(attn, h, kind):
    """softmax(q q^T / sqrt d) (+ softmax(k k^T / sqrt d) for sclip) per head, one head at a time."""
    D = h.shape[-1]
    nh = attn.num_heads
    d = D // nh
    W, b = attn.in_proj.weight, attn.in_proj.bias
    outs = []
    for i in range(nh):
        rows = slice(i * d, (i + 1) * d)
        q = h @ W[:D][rows].T + b[:D][rows]                           # [B, T, d]
        k = h @ W[D:2 * D][rows].T + b[D:2 * D][rows]
        v = h @ W[2 * D:][rows].T + b[2 * D:][rows]
        a = torch.softmax(q @ q.transpose(1, 2) / math.sqrt(d), dim=-1)
        if kind == "sclip":
            a = a + torch.softmax(k @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
        outs.append(a @ v)
    return attn.out_proj(torch.cat(outs, dim=-1))                      # [B, T, D]


def test_sclip_and_clearclip_equal_hand_written_versions():
    model = tiny_model()
    images = torch.randn(2, 3, 12, 16)
    with torch.no_grad():
        x = _into_last_block(model, images)
        last = model.visual.blocks[-1]
        x1 = x + _per_head_attention(last.attn, last.ln_1(x), "sclip")
        want_sclip = _to_features(model, x1 + last.mlp(last.ln_2(x1)), images)
        want_clear = _to_features(model, _per_head_attention(last.attn, last.ln_1(x), "clearclip"), images)
        got_sclip = dense_features(model, images, "sclip")
        got_clear = dense_features(model, images, "clearclip")
    assert torch.allclose(got_sclip, want_sclip, atol=1e-5)
    assert torch.allclose(got_clear, want_clear, atol=1e-5)
    with pytest.raises(ValueError, match="unknown dense mode"):
        dense_features(model, images, "magic")


# ------------------------------------------------------------------------------------------------
# Text classifier and the decision rule
# ------------------------------------------------------------------------------------------------

def test_text_classifier_is_normalised_mean_of_normalised_templates():
    model = tiny_model()
    tok = ByteTokenizer(context_length=32)
    classes = [["cat", "kitty"], [], ["dog"]]                         # class 1 has no text query
    templates = ["a photo of a {}.", "{}", "a drawing of the {}."]
    weights, query_class = build_text_classifier(model, tok, classes, templates, batch_size=2)
    assert query_class.tolist() == [0, 0, 2]
    rows = []
    with torch.no_grad():
        for names in classes:
            for name in names:
                embs = [model.encode_text(tok([t.format(name)]), normalize=False)[0] for t in templates]
                mean = sum(e / e.norm() for e in embs) / len(embs)
                rows.append(mean / mean.norm())
    assert torch.allclose(weights, torch.stack(rows), atol=1e-5)


def test_class_probability_is_max_over_synonyms_and_threshold_gives_background():
    # One pixel, queries [0.1, 0.3, 0.2] belonging to classes [0, 0, 1], scale 10:
    # softmax([1, 3, 2]) -> class 0 = e^3 / Z, class 1 = e^2 / Z, class 2 (no query) = 0.
    logits = torch.tensor([0.1, 0.3, 0.2]).view(1, 3, 1, 1)
    probs = class_probabilities(logits, torch.tensor([0, 0, 1]), num_classes=3, logit_scale=10.0)
    Z = math.exp(1) + math.exp(3) + math.exp(2)
    assert torch.allclose(probs.flatten(), torch.tensor([math.exp(3) / Z, math.exp(2) / Z, 0.0]))
    assert predict_classes(probs).item() == 0
    assert predict_classes(probs, prob_thresh=0.7, background_index=2).item() == 2   # e^3/Z = 0.665
    assert predict_classes(probs, prob_thresh=0.6, background_index=2).item() == 0


def test_classifier_scores_max_over_synonyms():
    weights = torch.eye(3)                                             # queries e0, e1, e2
    feats = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])           # [2, 3]
    scores = eval_seg.classifier_scores(feats, (weights, torch.tensor([0, 0, 2])))
    # class 0 = max(f.e0, f.e1); class 1 has no query (-inf); class 2 = f.e2
    assert torch.allclose(scores, torch.tensor([[0.8, -math.inf, 0.0], [0.6, -math.inf, 0.8]]))


def test_preprocess_short_side_and_normalisation():
    images = torch.randint(0, 256, (1, 3, 375, 500), dtype=torch.uint8)
    assert eval_seg.preprocess(images, 336).shape == (1, 3, 336, 448)
    small = torch.tensor([[[[0, 255]]], [[[51, 102]]], [[[255, 0]]]], dtype=torch.uint8).view(1, 3, 1, 2)
    out = eval_seg.preprocess(small)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])      # CLIP's, written out here
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(out[0, :, 0, 0], (small[0, :, 0, 0] / 255.0 - mean) / std)


def test_pca_map_gives_one_colour_per_feature_region():
    feats = torch.zeros(4, 6, 8)
    feats[:, :3] = torch.randn(8)                                      # left region
    feats[:, 3:] = torch.randn(8)                                      # right region
    rgb = eval_seg.pca_rgb(feats)
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    left, right = rgb[:, :3].reshape(-1, 3), rgb[:, 3:].reshape(-1, 3)
    assert (left == left[0]).all() and (right == right[0]).all() and not (left[0] == right[0]).all()


# ------------------------------------------------------------------------------------------------
# The whole loop, the checkpoint loader and the command line
# ------------------------------------------------------------------------------------------------

def make_folder_dataset(root, sizes=((16, 20), (16, 20), (18, 14))):
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate(sizes):
        save_image(root / "images" / f"im{i}.png", h, w)
        save_palette_png(str(root / "masks" / f"im{i}.png"), rng.choice([0, 1, 2, 255], size=(h, w)))
    (root / "classes.txt").write_text("background\nred thing\nblue thing, azure thing\n")


def naive_segmentation(model, tok, dataset, templates, short_side, crop, stride, logit_scale, prob_thresh):
    """The zero-shot protocol written out without eval_seg: prompt-ensembled text queries built one
    prompt at a time, the MaskCLIP identity-attention trick through the model's own attention with an
    only-self mask, windows placed by hand, logits averaged per pixel, upsampled to the label size,
    softmax over queries, max over synonyms, the threshold to background, one confusion matrix in
    numpy, IoU per class -> (miou, fg_miou, pixel_acc) over classes with a union, background 0."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    p = model.config.patch_size
    C = len(dataset.class_names)
    queries, owner = [], []
    with torch.no_grad():
        for c, names in enumerate(dataset.class_names):
            for name in names:
                rows = [F.normalize(model.encode_text(tok([t.format(name)])), dim=-1)[0] for t in templates]
                queries.append(F.normalize(torch.stack(rows).mean(0), dim=0))
                owner.append(c)
    queries = torch.stack(queries)                                           # [Q, E]
    conf = np.zeros((C, C), np.int64)
    for i in range(len(dataset)):
        item = dataset[i]
        img, truth = item["image"].float() / 255, item["mask"].numpy()
        H0, W0 = img.shape[1:]
        f = short_side / min(H0, W0)
        img = F.interpolate(img[None], size=(int(H0 * f + 0.5), int(W0 * f + 0.5)), mode="bilinear",
                            align_corners=False)[0]
        img = (img - mean) / std                                             # [3, H, W]
        H, W = img.shape[1:]
        ys = list(range(0, max(H - crop, 0) + 1, stride))
        xs = list(range(0, max(W - crop, 0) + 1, stride))
        ys += [H - crop] if ys[-1] + crop < H else []
        xs += [W - crop] if xs[-1] + crop < W else []
        total, count = torch.zeros(len(queries), H, W), torch.zeros(H, W)
        for y in ys:
            for x in xs:
                win = img[:, y:y + crop, x:x + crop]
                h, w = win.shape[1:]
                win = F.pad(win, (0, (-w) % p, 0, (-h) % p))[None]
                with torch.no_grad():
                    t = _into_last_block(model, win)
                    last = model.visual.blocks[-1]
                    only_self = torch.eye(t.shape[1], dtype=torch.bool)
                    t = t + last.attn(last.ln_1(t), attn_mask=only_self)
                    t = t + last.mlp(last.ln_2(t))
                    feats = _to_features(model, t, win)[0]                   # [h', w', E]
                logits = torch.einsum("hwe,qe->qhw", feats, queries)[None]
                logits = F.interpolate(logits, size=win.shape[2:], mode="bilinear", align_corners=False)[0]
                total[:, y:y + h, x:x + w] += logits[:, :h, :w]
                count[y:y + h, x:x + w] += 1
        logits = F.interpolate((total / count)[None], size=(H0, W0), mode="bilinear", align_corners=False)[0]
        probs = (logit_scale * logits).softmax(0)                            # [Q, H0, W0]
        per_class = torch.stack([probs[[q for q in range(len(owner)) if owner[q] == c]].max(0).values
                                 for c in range(C)])                          # [C, H0, W0]
        best, pred = per_class.max(0)
        pred[best < prob_thresh] = 0
        for t_, p_ in zip(truth.flatten(), pred.numpy().flatten()):
            if t_ != 255:
                conf[t_, p_] += 1
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = [tp[c] / union[c] for c in range(C) if union[c] > 0]
    fg = [tp[c] / union[c] for c in range(1, C) if union[c] > 0]
    return 100 * np.mean(iou), 100 * np.mean(fg), 100 * tp.sum() / conf.sum()


def test_evaluate_segmentation_end_to_end(tmp_path):
    make_folder_dataset(tmp_path / "ds")
    ds = load_dataset("folder", tmp_path / "ds")
    model, tok = tiny_model(), ByteTokenizer(context_length=32)
    kwargs = dict(dense="maskclip", templates="short", short_side=16, crop=16, stride=8, prob_thresh=0.4,
                  progress=False)
    res = eval_seg.evaluate_segmentation(model, tok, ds, batch_size=3, out_dir=tmp_path / "out",
                                         n_pictures=2, **kwargs)
    on_disk = json.loads((tmp_path / "out" / "seg_metrics.json").read_text())
    assert on_disk["miou"] == res["miou"] and res["num_images"] == 3
    assert on_disk["settings"]["crop"] == 16 and on_disk["settings"]["bg_prompts"] is True
    assert set(res["per_class_iou"]) == {"background", "red thing", "blue thing"}
    for name in ("seg_grid.png", "seg_pca_000.png", "seg_pca_001.png"):
        assert Image.open(tmp_path / "out" / name).size[0] > 0
    assert not (tmp_path / "out" / "seg_pca_002.png").exists()

    # The independent recomputation, which shares no code with eval_seg's pipeline.
    miou, fg, acc = naive_segmentation(model, tok, ds, get_templates("short"), short_side=16, crop=16,
                                       stride=8, logit_scale=40.0, prob_thresh=0.4)
    assert res["miou"] == pytest.approx(miou, abs=1e-3)
    assert res["fg_miou"] == pytest.approx(fg, abs=1e-3)
    assert res["pixel_acc"] == pytest.approx(acc, abs=1e-3)
    assert 0 < res["pixel_acc"] < 100
    assert model.training is False
    with pytest.raises(ValueError, match="background could never be predicted"):
        eval_seg.evaluate_segmentation(model, tok, ds, bg_prompts=False, prob_thresh=0.0, progress=False)


def test_shapes_datasets_run_whole_image():
    """shapes8 (background ignored, 8 shape classes: the headline, as VOC-20) and shapes9 (background a
    class, by its prompts, as VOC-21), each against the naive oracle."""
    model, tok = tiny_model(), ByteTokenizer(context_length=32)
    s8, s9 = ShapesSegmentation(split="val", size=32, length=3), ShapesSegmentation(split="val", size=32, length=3,
                                                                                    background="class")
    assert s8.background_index is None and [c[0] for c in s8.class_names] == s8.shapes.class_names
    assert s9.background_index == 0 and s9.class_names[0][:2] == ["background", "plain background"]
    raw = s9.shapes[1]["mask"]
    assert torch.equal(s8[1]["mask"], torch.where(raw == 0, 255, raw - 1)) and torch.equal(s9[1]["mask"], raw)
    for ds in (s8, s9):
        res = eval_seg.evaluate_segmentation(model, tok, ds, dense="maskclip", progress=False)
        # By name, as train.py calls it: the same images (the val split is deterministic) -> same numbers.
        name = ds.name.split("-")[0]
        by_name = eval_seg.evaluate_segmentation(model, tok, name, dense="maskclip", image_size=32, max_images=3,
                                                 device="cpu", progress=False)
        assert by_name["miou"] == res["miou"] and by_name["dataset"] == f"{name}-val"
        assert res["settings"]["crop"] == 0 and res["settings"]["templates"] == "shapes"
        assert res["settings"]["bg_prompts"] is (ds.background_index is not None)
        # whole image at its native size = one window covering it, no resize
        miou, fg, acc = naive_segmentation(model, tok, ds, get_templates("shapes"), short_side=32,
                                           crop=32, stride=32, logit_scale=40.0, prob_thresh=0.0)
        assert res["miou"] == pytest.approx(miou, abs=1e-3) and res["pixel_acc"] == pytest.approx(acc, abs=1e-3)
        if ds.background_index is not None:
            assert res["fg_miou"] == pytest.approx(fg, abs=1e-3)


def test_checkpoint_round_trip_and_cli(tmp_path):
    make_folder_dataset(tmp_path / "ds")
    model = tiny_model()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}, path)
    loaded, tok = load_model_from_checkpoint(str(path))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert isinstance(tok, ByteTokenizer) and tok.context_length == 32
    res = eval_seg.main(["--ckpt", str(path), "--dataset", "folder", "--root", str(tmp_path / "ds"),
                         "--device", "cpu", "--short_side", "16", "--crop", "16", "--stride", "8",
                         "--templates", "short", "--n_pictures", "1"])
    assert (tmp_path / "seg_metrics.json").exists() and res["settings"]["dense"] == "naive"
    torch.save({"state_dict": model.state_dict()}, path)
    with pytest.raises(ValueError, match="model_config"):
        load_model_from_checkpoint(str(path))


# ---------------------------------------------------------------------------------------------
# The shapes world's image-level measures: retrieval and zero-shot classification
# ---------------------------------------------------------------------------------------------
def naive_recall(sim, match, k):
    """Each query: sort the candidates by similarity, the wrong ones first among equals (ties count
    against the query); a hit if a correct one sits in the first k places."""
    hits = 0
    for q in range(len(sim)):
        order = sorted(range(len(sim[q])), key=lambda c: (-float(sim[q][c]), bool(match[q][c])))
        hits += any(bool(match[q][c]) for c in order[:k])
    return hits / len(sim)


def test_recall_at_k_by_hand_and_against_a_naive_loop_with_ties():
    sim = torch.tensor([[0.9, 0.5, 0.9, 0.1],     # q0: correct c0 ties with wrong c2 -> rank 1
                        [0.2, 0.8, 0.3, 0.4],     # q1: correct c1 is the best -> rank 0
                        [0.5, 0.5, 0.5, 0.5],     # q2: all tied -> rank 3 (every wrong one counts)
                        [0.1, 0.7, 0.6, 0.9]])    # q3: correct c2 and c3 (same caption) -> rank 0
    match = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    r = eval_seg.recall_at_k(sim, match, ks=(1, 2, 3, 4))
    assert r == {1: 0.5, 2: 0.75, 3: 0.75, 4: 1.0}
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        sim = torch.randint(0, 4, (30, 20), generator=g).float()        # many ties
        match = torch.rand(30, 20, generator=g) < 0.1
        r = eval_seg.recall_at_k(sim, match, ks=(1, 5))
        for k in (1, 5):
            assert r[k] == pytest.approx(naive_recall(sim.tolist(), match.tolist(), k), abs=1e-6)


def test_shapes_metrics_against_a_hand_built_classifier():
    """eval_seg.shapes_metrics (what train.py logs): zero-shot accuracy and retrieval, recomputed
    naively: the classifier built by hand (every class name in every template, one caption at a time,
    averaged, normalised), argmax per image; retrieval by the naive loop over the model's own
    similarities."""
    from data import collate
    from loaders.shapes import SHAPES_TEMPLATES, ShapesDataset
    torch.manual_seed(3)
    cfg = CLIPConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                     text_width=32, text_layers=1, text_heads=2, embed_dim=16, context_length=64)
    model = CLIP(cfg).eval()
    for p in model.parameters():                      # a random model, but a varied one
        p.data.add_(0.5 * torch.randn_like(p))
    tok = ByteTokenizer(context_length=64)
    m = eval_seg.shapes_metrics(model, tok, "val", image_size=32, n=24, device="cpu")
    single = ShapesDataset("val_single", size=32, length=24, seed=0)
    with torch.no_grad():
        classes = []
        for name in single.class_names:
            rows = [F.normalize(model.encode_text(tok([t.format(name)])), dim=-1)[0] for t in SHAPES_TEMPLATES]
            classes.append(F.normalize(torch.stack(rows).mean(0), dim=0))
        classes = torch.stack(classes)                                              # [8, E]
        correct = 0
        for i in range(len(single)):
            image = collate([single[i]], tok)["images"]
            pred = int((model.encode_image(image)[0] @ classes.T).argmax())
            correct += pred == single[i]["label"]
        assert m["zeroshot_acc"] == pytest.approx(correct / len(single), abs=1e-9)
        assert 0 < correct < len(single)
        val = ShapesDataset("val", size=32, length=24, seed=0)
        items = [val[i] for i in range(len(val))]
        im = torch.cat([model.encode_image(collate([it], tok)["images"]) for it in items])
        tx = torch.cat([model.encode_text(tok([it["caption"]])) for it in items])
    same = [[a["caption"] == b["caption"] for b in items] for a in items]
    sim = (im @ tx.T).tolist()
    assert m["i2t_r1"] == pytest.approx(naive_recall(sim, same, 1), abs=1e-6)
    assert m["t2i_r5"] == pytest.approx(naive_recall([list(r) for r in zip(*sim)], same, 5), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Real data: zero-shot top-1 / top-5, retrieval and its val loss
# ---------------------------------------------------------------------------------------------
def test_topk_accuracy_hand_computed_with_ties():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.2, 0.0, 0.5, 0.4],    # true 1: best -> top-1 and top-5
                           [0.8, 0.1, 0.7, 0.6, 0.5, 0.4, 0.3],    # true 6: 6th best -> neither
                           [0.2, 0.2, 0.2, 0.9, 0.1, 0.0, 0.3],    # true 0: ties with 1 and 2, below 3 and 6:
                                                                   #   4 wrong classes >= it -> rank 4: top-5 only
                           [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])   # true 2: all tied -> rank 6: neither
    labels = torch.tensor([1, 6, 0, 2])
    assert eval_seg.topk_accuracy(scores, labels, ks=(1, 5)) == {1: 0.25, 5: 0.5}


class PairsModel(torch.nn.Module):
    """A stand-in CLIP that returns given embeddings: batch["images"] / ["tokens"] hold row indices."""

    def __init__(self, img, txt, scale):
        super().__init__()
        self.img, self.txt, self.scale = img, txt, torch.tensor(scale)

    def forward(self, images, tokens):
        return self.img[images.flatten(1)[:, 0].long()], self.txt[tokens[:, 0].long()], self.scale, None


def test_retrieval_and_val_loss_against_naive_loops_with_ties():
    """A known similarity matrix with ties (embeddings on a coarse grid): R@1/5/10 both ways equal the
    naive loop (ties against the query, the pair's own caption the only right answer, as open_clip);
    the val loss is open_clip's: per batch the mean of the two cross-entropies, weighted by batch size."""
    g = torch.Generator().manual_seed(0)
    n, bs = 23, 10
    img = F.normalize(torch.randint(-1, 2, (n, 3), generator=g).float() + 1e-3 * torch.arange(3), dim=-1)
    txt = F.normalize(torch.randint(-1, 2, (n, 3), generator=g).float() + 1e-3 * torch.arange(3), dim=-1)
    rows = [torch.arange(i, min(i + bs, n)) for i in range(0, n, bs)]       # each batch's row indices
    batches = [{"images": r.view(-1, 1, 1, 1).float(), "tokens": r.view(-1, 1), "captions": [f"c{j}" for j in r.tolist()]}
               for r in rows]
    r = eval_seg.image_text_retrieval(PairsModel(img, txt, 5.0), batches, "cpu")
    sim = (img @ txt.T).tolist()
    eye = [[i == j for j in range(n)] for i in range(n)]
    assert len({round(v, 6) for row in sim for v in row}) < n * n / 3          # many ties
    for k in (1, 5, 10):
        assert r[f"i2t_r{k}"] == pytest.approx(naive_recall(sim, eye, k), abs=1e-6)
        assert r[f"t2i_r{k}"] == pytest.approx(naive_recall([list(c) for c in zip(*sim)], eye, k), abs=1e-6)
    total = 0.0
    for b in batches:
        rows = b["tokens"].flatten().tolist()
        for i in rows:                                   # image i against the batch's captions, and back
            li = [5.0 * sim[i][j] for j in rows]
            lt = [5.0 * sim[j][i] for j in rows]
            ce = lambda lg, t: math.log(sum(math.exp(v) for v in lg)) - lg[t]     # noqa: E731
            total += 0.5 * (ce(li, rows.index(i)) + ce(lt, rows.index(i)))
    assert r["loss"] == pytest.approx(total / n, rel=1e-5) and r["pairs"] == n


def test_zeroshot_classification_on_a_class_folder_against_a_hand_built_classifier(tmp_path):
    """eval_seg.real_data_metrics on a class-folder tree (one corrupt image): top-1 / top-5 against a
    classifier built by hand from the names file (max over synonyms) and a naive rank per image."""
    import warnings
    from data import CenterView
    from loaders.classification import ClassFolderDataset
    model, tok = tiny_model(), ByteTokenizer(32)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
    for c, colour in enumerate(colours):
        for i in range(2):
            Image.new("RGB", (24 + 8 * i, 20), tuple(v + 20 * i for v in colour)).save(tmp_path / f"x{c}_{i}.png")
            os.makedirs(tmp_path / "t" / f"k{c}", exist_ok=True)
            os.replace(tmp_path / f"x{c}_{i}.png", tmp_path / "t" / f"k{c}" / f"{i}.png")
    (tmp_path / "t" / "k0" / "2.png").write_bytes(b"broken")
    names = [["red", "crimson"], ["green"], ["blue"], ["yellow"], ["cyan", "teal"], ["magenta"]]
    (tmp_path / "names.txt").write_text("\n".join(", ".join(n) for n in names) + "\n")
    ds = ClassFolderDataset(str(tmp_path / "t"), str(tmp_path / "names.txt"), CenterView(16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = eval_seg.real_data_metrics(model, tok, zeroshot_set=ds, templates="short", batch_size=5, progress=False)
    templates = get_templates("short")
    with torch.no_grad():
        def text(name):
            rows = [F.normalize(model.encode_text(tok([t.format(name)])), dim=-1)[0] for t in templates]
            return F.normalize(torch.stack(rows).mean(0), dim=0)
        hits1 = hits5 = 0
        for i in range(len(ds)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")                 # the corrupt image, skipped above already
                item = ds[i]
            if item is None:
                continue
            f = model.encode_image(item["image"][None])[0]
            score = [max(float(f @ text(n)) for n in syn) for syn in names]
            wrong_above = sum(s >= score[item["label"]] for c, s in enumerate(score) if c != item["label"])
            hits1, hits5 = hits1 + (wrong_above < 1), hits5 + (wrong_above < 5)
    assert m["zeroshot_images"] == 12 and m["zeroshot_skipped"] == 1
    assert m["zeroshot_top1"] == pytest.approx(hits1 / 12) and m["zeroshot_top5"] == pytest.approx(hits5 / 12)
    assert 0 < hits5 and hits1 < 12                         # the comparison is not trivially 0 or 1
