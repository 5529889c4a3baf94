"""Tests for data.py: each checks the code against an independent computation (hand-built ids, a
naive step-by-step colour jitter, naive bilinear sampling, nearest-neighbour indices worked out by
hand, the batch order against the global stream)."""

import io
import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import EOT_ID, MASK_ID, PAD_ID, SOT_ID, VOCAB_SIZE, ByteTokenizer, MultiCrop, StepSampler, collate
from loaders.shapes import ShapesDataset

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def denorm(x):
    """(x - mean) / std undone, with the test's own copy of CLIP's constants."""
    return x * CLIP_STD + CLIP_MEAN


# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------
def test_tokenizer_ids_by_hand():
    assert (PAD_ID, SOT_ID, EOT_ID, MASK_ID, VOCAB_SIZE) == (0, 1, 2, 3, 260)
    tok = ByteTokenizer(context_length=8)
    # "ab": bytes 97, 98 -> ids 101, 102
    assert tok.encode("ab") == [1, 101, 102, 2]
    t = tok(["ab", ""])
    assert t.dtype == torch.long and t.shape == (2, 8)
    assert t[0].tolist() == [1, 101, 102, 2, 0, 0, 0, 0]
    assert t[1].tolist() == [1, 2, 0, 0, 0, 0, 0, 0]


def test_tokenizer_round_trip_and_truncation():
    tok = ByteTokenizer(context_length=16)
    for text in ["a red star", "two crosses.", "héllo wörld", ""]:
        assert tok.decode(tok(text)[0]) == text
    long = "abcdefghijklmnopqrstuvwxyz"
    ids = tok(long)[0].tolist()
    assert len(ids) == 16 and ids[0] == SOT_ID and ids[-1] == EOT_ID       # EOT kept at the end
    assert ids[1:-1] == [ord(c) + 4 for c in long[:14]]
    assert tok.decode(ids) == long[:14]
    # cutting inside a multi-byte character decodes without raising
    tok3 = ByteTokenizer(context_length=4)
    assert tok3.encode("aé")[-1] == EOT_ID and len(tok3.encode("aé")) == 4
    assert tok3.decode(tok3.encode("aé")).startswith("a")
    with pytest.raises(ValueError):
        ByteTokenizer(context_length=1)


def test_word_tokenizer_ids_by_hand():
    tok = data.WordTokenizer(["a", "red", "star", ",", "."], context_length=8)
    # PAD 0, SOT 1, EOT 2, MASK 3, UNK 4, then the words in order: a 5, red 6, star 7, "," 8, "." 9
    assert tok.vocab_size == 10 and tok.special_ids == (0, 1, 2, 4) and tok.mask_token_id == 3
    assert tok.encode("a red star, a star.") == [1, 5, 6, 7, 8, 5, 7, 2]          # cut: EOT kept last
    assert tok("A blue star")[0].tolist() == [1, 5, 4, 7, 2, 0, 0, 0]               # lower-cased; blue: UNK
    assert tok.decode([1, 5, 6, 7, 8, 5, 9, 2, 0]) == "a red star, a."
    assert tok.decode(tok.encode("a star")) == "a star" and tok.state()["words"] == tok.words


def test_word_tokenizer_round_trips_every_caption_of_the_shapes_world():
    """The shapes world's vocabulary covers every word it writes: thousands of captions of every split,
    with colours in all of them, up to three objects (count words, relations, sizes, backgrounds, both
    backdrops), and every zero-shot prompt of every class and background name, decode to themselves,
    never through UNK."""
    from loaders.shapes import (BACKGROUND_NAMES, SHAPES_BACKGROUND_NAMES, SHAPES_TEMPLATES, SHAPES_VOCABULARY,
                                ShapesDataset)
    tok = data.WordTokenizer(SHAPES_VOCABULARY, context_length=32)
    captions = set()
    for split in ("train", "tune", "val", "tune_single"):
        for kwargs in (dict(), dict(colour_prob=1.0, n_objects_p=(0.2, 0.4, 0.4)), dict(backdrop="patchwork"),
                       dict(colour_prob=0.0, n_objects_p=(0.0, 0.0, 1.0))):       # three of a kind: "three"
            ds = ShapesDataset(split, length=600, cache=False, **kwargs)
            captions |= {ds.generate(i)["caption"] for i in range(len(ds))}
    prompts = {t.format(n) for t in SHAPES_TEMPLATES for n in ShapesDataset("val").class_names + list(SHAPES_BACKGROUND_NAMES)}
    seen = set()
    for text in captions | prompts:
        ids = tok.encode(text)
        assert WordTokenizer_UNK not in ids and tok.decode(ids) == text, text
        seen |= set(re.findall(r"[a-z]+|[,.]", text))
    assert len(captions) > 3000 and {"two", "three", "above", "patchwork", "large", ","} <= seen
    assert set(BACKGROUND_NAMES) <= seen


WordTokenizer_UNK = data.WordTokenizer.UNK_ID


# ------------------------------------------------------------------------------------------------
# transforms and multi-crop
# ------------------------------------------------------------------------------------------------
def _box_ok(box, H, W, scale, ratio):
    """The rounded box (h, w) could come from an exact area in `scale` and aspect in `ratio`."""
    top, left, h, w = box[:4]
    assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
    lo_area, hi_area = (w - 0.5) * (h - 0.5) / (H * W), (w + 0.5) * (h + 0.5) / (H * W)
    lo_r, hi_r = (w - 0.5) / (h + 0.5), (w + 0.5) / (h - 0.5)
    return hi_area >= scale[0] and lo_area <= scale[1] and hi_r >= ratio[0] and lo_r <= ratio[1]


def _bilinear_reference(img, box, size):
    """Naive bilinear sampling: output pixel j reads the image at pixel-index coordinate
    left + (j + 0.5) * w / size - 0.5 (mirrored if flipped), clamped to the border."""
    top, left, h, w, flipped = box
    H, W = img.shape[-2:]
    j = torch.arange(size, dtype=torch.float64)
    xs = left + (j + 0.5) * w / size - 0.5
    xs = xs.flip(0) if flipped else xs
    ys = top + (j + 0.5) * h / size - 0.5
    ys, xs = ys.clamp(0, H - 1), xs.clamp(0, W - 1)
    y0, x0 = ys.floor().long(), xs.floor().long()
    y1, x1 = (y0 + 1).clamp(max=H - 1), (x0 + 1).clamp(max=W - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]                        # [size, 1], [1, size]
    im = img.double()
    pick = lambda yy, xx: im[:, yy][:, :, xx]                              # noqa: E731  [3, size, size]
    out = ((1 - fy) * ((1 - fx) * pick(y0, x0) + fx * pick(y0, x1))
           + fy * ((1 - fx) * pick(y1, x0) + fx * pick(y1, x1)))
    return out.float()


def test_local_crop_size_patch_aligned():
    assert data.local_crop_size(64, 4) == 28          # 64 * 96 / 224 = 27.4 -> 7 patches of 4
    assert data.local_crop_size(224, 16) == 96        # DINO's 96 px
    assert data.local_crop_size(224, 14) == 98        # 6.86 -> 7 patches of 14
    assert data.local_crop_size(32, 16) == 16         # at least one patch


def test_multicrop_sizes_scales_and_geometry():
    ds = ShapesDataset("train")
    mc = MultiCrop(64, 4, n_global=2, n_local=8)
    g = torch.Generator().manual_seed(0)
    for i in range(40):
        s = ds[i]
        out = mc(s, generator=g)
        assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 8
        assert all(x.shape == (3, 64, 64) for x in out["global_crops"])
        assert all(x.shape == (3, 28, 28) and 28 % 4 == 0 for x in out["local_crops"])
        assert torch.equal(out["image"], out["global_crops"][0])
        for box in out["global_boxes"]:
            assert _box_ok(box, 64, 64, (0.4, 1.0), (3 / 4, 4 / 3))
            # a text-paired crop keeps the central half of every object box
            top, left, h, w, _ = box
            for x0, y0, x1, y1 in s["boxes"].tolist():
                cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 4, (y1 - y0) / 4
                assert left <= cx - hw and cx + hw <= left + w and top <= cy - hh and cy + hh <= top + h
        for box in out["local_boxes"]:
            assert _box_ok(box, 64, 64, (0.05, 0.4), (3 / 4, 4 / 3))
        # every global view = bilinear resample of its recorded box (+ flip), nothing else
        for view, box in zip(out["global_crops"], out["global_boxes"]):
            ref = _bilinear_reference(s["image"].float() / 255, box, 64)
            assert torch.allclose(denorm(view), ref, atol=1e-5)
        top, left, h, w, flipped = out["global_boxes"][0]
        # the mask went through the same box with nearest sampling: pixel (r, c) reads
        # source row top + floor((r + 0.5) * h / 64), column left + floor((c + 0.5) * w / 64)
        rows = top + ((torch.arange(64) + 0.5) * h / 64).floor().long()
        cols = left + ((torch.arange(64) + 0.5) * w / 64).floor().long()
        mref = s["mask"][rows][:, cols]
        assert torch.equal(out["mask"], mref.flip(-1) if flipped else mref)


def test_local_crops_hold_an_object_part_when_asked():
    """MultiCrop(local_foreground=0.25): every local crop box, read on the sample's rendered mask, is at
    least 25% object pixels; without the rule about a tenth of them hold no object at all."""
    ds = ShapesDataset("train", cache=False)
    fractions = {0.0: [], 0.25: []}
    for thr in fractions:
        mc = MultiCrop(64, 8, n_global=2, n_local=6, local_foreground=thr)
        for i in range(60):
            sample = ds[i]
            out = mc(sample, generator=torch.Generator().manual_seed(i))
            fg = sample["mask"] > 0
            fractions[thr] += [float(fg[t:t + h, l:l + w].float().mean()) for t, l, h, w, _ in out["local_boxes"]]
    assert min(fractions[0.25]) >= 0.25
    assert sum(f == 0 for f in fractions[0.0]) / len(fractions[0.0]) > 0.05
    # and the rule changes nothing when off: the same boxes as a MultiCrop without the argument
    a = MultiCrop(64, 8, n_local=3)(ds[0], generator=torch.Generator().manual_seed(1))
    b = MultiCrop(64, 8, n_local=3, local_foreground=0.0)(ds[0], generator=torch.Generator().manual_seed(1))
    assert a["local_boxes"] == b["local_boxes"]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_crops_on_the_device_equal_the_crops_of_the_workers(device):
    """MultiCrop(on_device=True) draws the same random numbers as the workers' MultiCrop and leaves the
    pixel work to views(), run on a whole collated batch on `device` (one resampling call per resolution):
    every global and local view equals the one made sample by sample in the worker (max abs diff <= 1e-5,
    float32), and everything else a sample carries (caption, mask, boxes) is the same. Two sources: the
    shapes world (object boxes kept whole, masks, the local_foreground rule) and photos of four different
    stored frames, decoded to one square working size; colour jitter and grayscale both occur."""
    from data import decode_image
    from experiments.loaderbench import jpeg_bytes, photo
    from train import to_device
    photos = []
    for i, (h, w) in enumerate([(90, 120), (160, 90), (150, 200), (64, 64)]):
        image, frame = decode_image(io.BytesIO(jpeg_bytes(photo(h, w, i))), working_size=64)
        assert image.shape == (3, 64, 64) and frame == (h, w)
        photos.append(dict(image=image, frame=frame, caption=f"a photo on the left {i}"))
    shapes = [ShapesDataset("train")[i] for i in range(6)]
    configs = [(shapes, dict(image_size=64, patch_size=8, n_global=2, n_local=4, local_foreground=0.25)),
               (photos, dict(image_size=32, patch_size=4, n_global=2, n_local=6)),
               (shapes, dict(image_size=64, patch_size=8, n_global=1, n_local=0, global_scale=(0.9, 1.0)))]
    tok = ByteTokenizer(64)
    for samples, kwargs in configs:
        workers, on_device = MultiCrop(**kwargs), MultiCrop(**kwargs, on_device=True)
        a = collate([workers(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(samples)], tok)
        b = collate([on_device(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(samples)], tok)
        assert "global_crops" not in b and b["pixels"].dtype == torch.uint8
        params = b.pop("crop_params")
        if kwargs["n_local"]:
            assert params["jitter"].any() and params["grey"].any() and not params["jitter"].all()
        views = data.view_batch(*on_device.views(b.pop("pixels").to(device), to_device(params, device)))
        assert views.keys() == {k for k in a if k in ("images", "global_crops", "local_crops")}
        for k, v in views.items():
            assert v.device.type == device and v.shape == a[k].shape, k
            assert (v.cpu() - a[k]).abs().max().item() <= 1e-5, k
        for k in b:
            if k not in views:
                assert (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]), k


def test_global_crops_never_colour_augmented():
    # A one-colour image: any geometric resampling keeps the colour exactly; colour jitter or
    # grayscale would change it. Local crops (allowed colour aug) must show the difference.
    colour = torch.tensor([200, 30, 60], dtype=torch.uint8).view(3, 1, 1)
    sample = dict(image=colour.expand(3, 48, 40).clone(), caption="a red square")
    mc = MultiCrop(32, 4, n_global=2, n_local=8)
    g = torch.Generator().manual_seed(1)
    changed_locals = 0
    for _ in range(10):
        out = mc(sample, generator=g)
        for v in out["global_crops"]:
            assert torch.allclose(denorm(v), colour.float().expand_as(v) / 255, atol=1e-5)
        for v, aug in zip(out["local_crops"], out["local_colour"]):
            same = torch.allclose(denorm(v), colour.float().expand_as(v) / 255, atol=1e-4)
            assert same != aug                                             # changed exactly when augmented
            changed_locals += aug
    assert changed_locals > 0
    # colour_local=False: locals untouched too
    out = MultiCrop(32, 4, local_colour=False)(sample, generator=g)
    assert not any(out["local_colour"])


def test_flip_swaps_left_right_in_caption():
    assert data.swap_left_right("a star to the left of a circle") == "a star to the right of a circle"
    assert data.swap_left_right("Left, right, bright") == "Right, left, bright"
    s = ShapesDataset("train")[0]
    s["caption"] = "a heart to the left of a ring"
    mc = MultiCrop(64, 4, n_global=2, n_local=0)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        out = mc(s, generator=g)
        flipped = out["global_boxes"][0][4]
        assert out["global_boxes"][1][4] == flipped                        # one coin for both views
        assert out["caption"] == ("a heart to the right of a ring" if flipped else s["caption"])
        seen.add(flipped)
    assert seen == {True, False}


def test_color_jitter_equals_step_by_step():
    # the folded affine map == brightness, contrast, saturation, hue applied one after the other
    x = torch.rand(5, 3, 9, 7) * 0.5 + 0.25
    y = data.color_jitter(x, data.color_jitter_params(5, generator=torch.Generator().manual_seed(3)))
    u = torch.rand(5, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    w = torch.tensor([0.299, 0.587, 0.114])
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    for k in range(5):
        b, c, s, h = 1 + 0.4 * u[k, 0], 1 + 0.4 * u[k, 1], 1 + 0.2 * u[k, 2], 0.1 * u[k, 3] * 2 * math.pi
        z = x[k] * b
        luma = lambda t: (t * w.view(3, 1, 1)).sum(0)                      # noqa: E731
        m = luma(z).mean()
        z = (z - m) * c + m
        gpx = luma(z)
        z = (z - gpx) * s + gpx
        q = torch.einsum("ij,jhw->ihw", yiq, z)                            # to YIQ, rotate (I, Q)
        i2 = q[1] * torch.cos(h) - q[2] * torch.sin(h)
        q2 = q[1] * torch.sin(h) + q[2] * torch.cos(h)
        z = torch.einsum("ij,jhw->ihw", torch.linalg.inv(yiq), torch.stack([q[0], i2, q2]))
        assert torch.allclose(y[k], z.clamp(0, 1), atol=1e-5)
    grey = torch.full((1, 3, 4, 4), 0.4)
    out = data.color_jitter(grey, data.color_jitter_params(1, generator=torch.Generator().manual_seed(0)))[0]
    assert torch.allclose(out[0], out[1], atol=1e-5) and torch.allclose(out[1], out[2], atol=1e-5)
    gs = data.grayscale(torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1))
    assert torch.allclose(gs.flatten(), torch.full((3,), 0.299))


def test_sample_crop_box_fallbacks():
    keep = torch.tensor([[0.0, 0.0, 30.0, 30.0]])                          # impossible at scale <= 0.1
    assert data.sample_crop_box(32, 32, (0.05, 0.1), keep=keep) == (0, 0, 32, 32)
    top, left, h, w = data.sample_crop_box(100, 20, (0.9, 1.0))            # ratio unreachable -> centre
    assert (h, w) == (20, 20) and top == 40 and left == 0


# ------------------------------------------------------------------------------------------------
# batching
# ------------------------------------------------------------------------------------------------
def test_collate_plain_and_multicrop():
    ds = ShapesDataset("val_single", length=8)
    tok = ByteTokenizer(64)
    samples = [ds[i] for i in range(4)]
    batch = collate(samples[:2] + [None] + samples[2:], tok)              # None (skipped) is dropped
    assert batch["images"].shape == (4, 3, 64, 64) and batch["images"].dtype == torch.float32
    ref = (samples[1]["image"].float() / 255 - CLIP_MEAN) / CLIP_STD
    assert torch.allclose(batch["images"][1], ref, atol=1e-6)
    assert torch.equal(batch["tokens"], tok([s["caption"] for s in samples]))
    assert batch["masks"].shape == (4, 64, 64) and batch["labels"].tolist() == [0, 1, 2, 3]
    assert "global_crops" not in batch and collate([None]) is None

    mc = MultiCrop(64, 4, n_global=2, n_local=3)
    views = [mc(s) for s in samples]
    batch = collate(views, tok)
    assert batch["global_crops"].shape == (2, 4, 3, 64, 64)
    assert batch["local_crops"].shape == (3, 4, 3, 28, 28)
    assert torch.equal(batch["images"], batch["global_crops"][0])
    assert torch.equal(batch["local_crops"][2, 1], views[1]["local_crops"][2])
    assert torch.equal(batch["global_crops"][1, 3], views[3]["global_crops"][1])
    assert batch["masks"].shape == (4, 64, 64)
    with pytest.raises(ValueError, match="transform"):
        collate([dict(image=torch.zeros(3, 4, 4, dtype=torch.uint8), caption="a"),
                 dict(image=torch.zeros(3, 5, 5, dtype=torch.uint8), caption="b")])


def test_shapes_through_dataloader_workers():
    ds = ShapesDataset("train", length=16, transform=MultiCrop(64, 4, n_local=2))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["global_crops"].shape == (2, 8, 3, 64, 64)
    # the images themselves do not depend on the worker that made them
    plain = ShapesDataset("train", length=16)
    assert batches[1]["captions"][3] in (plain[11]["caption"], data.swap_left_right(plain[11]["caption"]))


# ------------------------------------------------------------------------------------------------
# batch order
# ------------------------------------------------------------------------------------------------
def test_step_sampler_covers_the_same_global_batch_on_any_world_size():
    one = iter(StepSampler(n=50, batch_size=8, world=1, rank=0, accum=1, seed=3))
    two = [iter(StepSampler(n=50, batch_size=8, world=2, rank=r, accum=1, seed=3)) for r in range(2)]
    acc = iter(StepSampler(n=50, batch_size=8, world=1, rank=0, accum=2, seed=3))
    for _ in range(20):   # crosses several epoch boundaries
        g = next(one)
        assert next(two[0]) + next(two[1]) == g
        assert next(acc) + next(acc) == g
    # resuming at step 5 continues the same stream
    s = iter(StepSampler(n=50, batch_size=8, world=1, rank=0, accum=1, seed=3))
    stream = [next(s) for _ in range(8)]
    r = iter(StepSampler(n=50, batch_size=8, world=1, rank=0, accum=1, seed=3, start_step=5))
    assert [next(r) for _ in range(3)] == stream[5:]
    # every index appears once per epoch
    s = iter(StepSampler(n=48, batch_size=8, world=1, rank=0, accum=1, seed=0))
    first_epoch = [i for _ in range(6) for i, e in next(s)]
    assert sorted(first_epoch) == list(range(48))
