"""Tests for data.py: each checks the code against an independent computation (hand-built ids,
analytic areas, a naive step-by-step colour jitter, nearest-neighbour indices worked out by hand,
tar shards built here)."""

import csv
import hashlib
import io
import math
import os
import re
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from data import (EOT_ID, MASK_ID, PAD_ID, SOT_ID, VOCAB_SIZE, ByteTokenizer, CsvDataset,  # noqa: E402
                  MultiCrop, ShapesDataset, TarShardDataset, collate)

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


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


# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------
def _sha(t):
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()


def test_shapes_deterministic_and_seeded():
    a, b = ShapesDataset("train", cache=False), ShapesDataset("train", cache=False)
    c = ShapesDataset("train", seed=1, cache=False)
    for i in [0, 7, 12345]:
        sa, sb = a[i], b[i]
        assert torch.equal(sa["image"], sb["image"]) and torch.equal(sa["mask"], sb["mask"])
        assert sa["caption"] == sb["caption"]
        assert sa["image"].dtype == torch.uint8 and sa["image"].shape == (3, 64, 64)
        assert sa["mask"].dtype == torch.int64 and sa["mask"].shape == (64, 64)
        assert not torch.equal(sa["image"], c[i]["image"])
    # any order of access gives the same sample (per-index generator)
    assert torch.equal(a[5]["image"], ShapesDataset("train")[5]["image"])


def test_shapes_splits_disjoint():
    hashes = {}
    for split, n in [("train", 400), ("tune", 200), ("val", 200), ("val_single", 200), ("tune_single", 200)]:
        ds = ShapesDataset(split, cache=False)
        hashes[split] = {_sha(ds[i]["image"]) for i in range(n)}
        assert len(hashes[split]) == n                                   # no repeats inside a split
    names = list(hashes)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert not hashes[names[i]] & hashes[names[j]], (names[i], names[j])
    assert len(ShapesDataset("val")) == 512 and len(ShapesDataset("train")) == 100_000
    with pytest.raises(ValueError):
        ShapesDataset("test")


def test_shapes_mask_matches_pixels():
    ds = ShapesDataset("train", cache=False)
    palette = {tuple(c) for c in data.COLOUR_RGB.tolist()}
    for i in range(60):
        s = ds[i]
        img, mask = s["image"], s["mask"]
        bg = ds.background(i)
        # background pixels are exactly the background render; object pixels are palette colours
        assert torch.equal(img[:, mask == 0], bg[:, mask == 0])
        obj = img[:, mask > 0].T.tolist()
        assert obj and all(tuple(p) in palette for p in obj)
        # every object box encloses pixels of the mask; the mask holds 1..K only
        assert mask.min() >= 0 and mask.max() <= len(data.SHAPE_NAMES)
        for x0, y0, x1, y1 in s["boxes"].long().tolist():
            assert (mask[y0:y1, x0:x1] > 0).any()
        # background colours are desaturated (max - min channel <= 50 + noise), objects saturated
        bgpix = bg.float().view(3, -1)
        if (bgpix.std(dim=1) < 1).all():                                  # plain backgrounds only
            assert (bgpix.max(0).values - bgpix.min(0).values).max() <= 50


def test_shape_silhouette_areas():
    # area of each silhouette on a fine grid vs the analytic area (shapes in units of the radius)
    g = (np.arange(2000) + 0.5) / 1000 - 1.0
    u, v = np.meshgrid(g, g)
    cell = (2 / 2000) ** 2
    s3 = math.sqrt(3)
    expected = {
        "circle": math.pi * 0.85 ** 2,
        "square": 1.5 ** 2,
        "triangle": 3 * s3 / 4 * 1.1 ** 2,                 # equilateral, circumradius 1.1
        "star": 5 * 0.45 * math.sin(math.pi / 5),          # 10 triangles (O, tip, inner corner)
        "cross": 2 * (0.56 * 1.8) - 0.56 ** 2,
        "ring": math.pi * (0.9 ** 2 - 0.5 ** 2),
    }
    for name, area in expected.items():
        got = data.shape_inside(name, u, v).sum() * cell
        assert abs(got - area) < 0.01 * area, (name, got, area)
    # the heart and crescent: inside the unit disc, and of a comparable area
    for name in ("heart", "crescent"):
        inside = data.shape_inside(name, u, v)
        assert not inside[u * u + v * v > 1].any()
        assert 0.8 < inside.sum() * cell < 2.6


def _named_shapes(caption):
    names = set()
    for k, name in enumerate(data.SHAPE_NAMES):
        if re.search(rf"\b({name}|{data._plural(name)})\b", caption):
            names.add(k + 1)
    return names


def test_captions_name_exactly_the_shapes_in_the_mask():
    ds = ShapesDataset("train", cache=False)
    tok = ByteTokenizer(64)
    captions = []
    for i in range(300):
        s = ds[i]
        present = set(s["mask"].unique().tolist()) - {0}
        assert _named_shapes(s["caption"]) == present, (s["caption"], present)
        assert len(s["caption"].encode()) <= 62                           # never cut by the tokenizer
        assert tok.decode(tok(s["caption"])[0]) == s["caption"]
        captions.append(s["caption"])
    assert len(set(captions)) > 250                                        # few false negatives
    # the colour words that appear are the colours of the objects
    s = next(ds[i] for i in range(100) if any(c in ds[i]["caption"] for c in data.COLOUR_NAMES))
    rgb = {tuple(p) for p in s["image"][:, s["mask"] > 0].T.tolist()}
    named = [c for c in data.COLOUR_NAMES if re.search(rf"\b{c}\b", s["caption"])]
    assert {tuple(data.COLOUR_RGB[data.COLOUR_NAMES.index(c)].tolist()) for c in named} <= rgb


def test_single_object_splits_balanced_with_labels():
    ds = ShapesDataset("val_single", length=80)
    K = len(data.SHAPE_NAMES)
    counts = [0] * K
    for i in range(80):
        s = ds[i]
        assert s["label"] == i % K
        assert set(s["mask"].unique().tolist()) == {0, s["label"] + 1}
        assert _named_shapes(s["caption"]) == {s["label"] + 1}
        counts[s["label"]] += 1
    assert counts == [10] * K
    assert ds.class_names == data.SHAPE_NAMES
    for t in data.SHAPES_TEMPLATES:
        assert "{}" in t and _named_shapes(t.format("")) == set()


# ------------------------------------------------------------------------------------------------
# tar shards
# ------------------------------------------------------------------------------------------------
def _png_bytes(colour, size=(12, 10)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _make_shards(folder, n_shards, per_shard, corrupt=None, empty=None):
    """Shards folder/{0000..}.tar holding key.png + key.txt; returns the keys of good samples."""
    os.makedirs(folder, exist_ok=True)
    keys = []
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f"{s:04d}.tar"), "w") as tar:
            for j in range(per_shard):
                key = f"{s:04d}{j:04d}"
                img = b"this is not a png" if key == corrupt else _png_bytes((s * 20, j * 10, 7))
                _add(tar, f"{key}.png", img)
                _add(tar, f"{key}.txt", (b"" if key == empty else f"caption {key}".encode()))
                if key not in (corrupt, empty):
                    keys.append(key)
    return keys


def _read_keys(folder, rank, world, workers):
    ds = TarShardDataset(folder, rank=rank, world_size=world)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    return [s["key"] for s in loader]


@pytest.mark.parametrize("n_shards", [5, 2])   # 5 >= 2 ranks x 2 workers: split shards; 2: split samples
def test_tar_every_sample_once_over_ranks_and_workers(tmp_path, n_shards):
    folder = str(tmp_path / "shards")
    keys = _make_shards(folder, n_shards, per_shard=7)
    got = _read_keys(folder, 0, 2, 2) + _read_keys(folder, 1, 2, 2)
    assert sorted(got) == sorted(keys)                                     # each exactly once
    if n_shards < 4:   # fewer shards than readers: the sample split is announced (reader 0)
        with pytest.warns(RuntimeWarning, match="round-robin"):
            list(TarShardDataset(folder, rank=0, world_size=4))
    # the brace pattern names the same shards
    pattern = os.path.join(folder, "{0000..%04d}.tar" % (n_shards - 1))
    assert data.list_shards(pattern) == data.list_shards(folder)


def test_tar_corrupt_image_and_empty_caption_skipped_and_counted(tmp_path):
    folder = str(tmp_path / "shards")
    keys = _make_shards(folder, 2, per_shard=4, corrupt="00000002", empty="00010001")
    before = dict(data.SKIPPED)
    with pytest.warns(RuntimeWarning, match="skipped"):
        got = [s for s in TarShardDataset(folder)]
    assert sorted(s["key"] for s in got) == sorted(keys) and len(got) == 6
    assert data.SKIPPED["unreadable image"] == before.get("unreadable image", 0) + 1
    assert data.SKIPPED["empty caption"] == before.get("empty caption", 0) + 1
    s = got[0]
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 10, 12)
    assert s["caption"] == f"caption {s['key']}"


def test_tar_as_training_reads_it_every_sample_once_per_epoch(tmp_path):
    """The reader exactly as train.py builds it (build_dataset: shard shuffle, a shuffle buffer,
    repeat=True), on 2 ranks x 2 DataLoader workers with collate: each epoch, every sample appears
    exactly once over the 4 readers, and the next epoch is a different order. set_epoch(1) on a
    one-pass reader gives exactly the second pass of the endless one."""
    folder = str(tmp_path / "shards")
    keys = _make_shards(folder, 8, per_shard=5)               # 8 shards -> 2 per reader, 10 samples each
    epochs = [[], []]
    for rank in range(2):
        ds = data.build_dataset(folder, "train", repeat=True)
        assert ds.shuffle and ds.shuffle_buffer > 0 and ds.repeat
        ds.rank, ds.world_size = rank, 2
        loader = iter(torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate,
                                                  drop_last=True))
        for e in range(2):                                     # 2 workers x 2 batches of 5 = one epoch
            epochs[e] += [c.split()[1] for _ in range(4) for c in next(loader)["captions"]]
    assert sorted(epochs[0]) == sorted(keys) and sorted(epochs[1]) == sorted(keys)
    assert epochs[0] != epochs[1]
    endless = iter(data.build_dataset(folder, "train", repeat=True))
    passes = [[next(endless)["key"] for _ in range(40)] for _ in range(2)]
    once = data.build_dataset(folder, "train", repeat=False)
    once.set_epoch(1)
    assert [s["key"] for s in once] == passes[1] != passes[0]


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.55])
def test_tar_truncated_shard_is_skipped_and_counted(tmp_path, fraction):
    """A shard cut short (a failed copy) loses its tail. tarfile stops silently at a truncated header,
    so without a check the lost samples would go unnoticed: the reader counts the shard as truncated
    (and a sample whose caption was cut off as such) and reads every other shard in full."""
    folder = str(tmp_path / "shards")
    keys = _make_shards(folder, 3, per_shard=6)
    path = os.path.join(folder, "0001.tar")
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * fraction))
    before = dict(data.SKIPPED)
    with pytest.warns(RuntimeWarning, match="truncated shard"):
        got = [s["key"] for s in TarShardDataset(folder)]
    good = [k for k in keys if not k.startswith("0001")]
    assert set(good) <= set(got) <= set(keys) and len(got) < len(keys) and len(set(got)) == len(got)
    assert data.SKIPPED["truncated shard (rest of it)"] == before.get("truncated shard (rest of it)", 0) + 1


def test_tar_subset_and_missing_paths(tmp_path):
    folder = str(tmp_path / "shards")
    _make_shards(folder, 4, per_shard=5)
    ds = data.subset(TarShardDataset(folder), 7)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert len(list(loader)) == 7                                          # 4 + 3 over two workers
    assert len(list(data.subset(TarShardDataset(folder), 0.5))) == 10      # first 2 of 4 shards
    rep = iter(TarShardDataset(folder, repeat=True, shuffle=True))
    assert len([next(rep) for _ in range(45)]) == 45                       # endless when repeat=True
    with pytest.raises(FileNotFoundError):
        TarShardDataset(os.path.join(folder, "{0000..0009}.tar"))
    with pytest.raises(FileNotFoundError):
        data.build_dataset(str(tmp_path / "nowhere"))
    assert data.expand_braces("a/{08..10}.tar") == ["a/08.tar", "a/09.tar", "a/10.tar"]
    assert data.expand_braces("{x,y}{1..2}") == ["x1", "x2", "y1", "y2"]


# ------------------------------------------------------------------------------------------------
# csv
# ------------------------------------------------------------------------------------------------
def test_csv_dataset(tmp_path):
    os.makedirs(tmp_path / "img")
    for k in range(3):
        Image.new("RGB", (8, 6), (k * 50, 0, 0)).save(tmp_path / "img" / f"{k}.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"garbage")
    rows = [("img/0.png", "zero"), ("img/bad.png", "broken"), ("img/1.png", ""), ("img/2.png", "two")]
    path = tmp_path / "data.tsv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title"])
        w.writerows(rows)
    ds = CsvDataset(str(path))                                             # tab for .tsv, paths relative
    assert len(ds) == 4
    s = ds[0]
    assert s["caption"] == "zero" and s["image"].shape == (3, 6, 8) and s["image"][0, 0, 0] == 0
    before = sum(data.SKIPPED.values())
    with pytest.warns(RuntimeWarning, match="skipped"):
        s = ds[1]                                                          # bad image, empty caption -> row 3
    assert s["caption"] == "two" and s["image"][0, 0, 0] == 100
    assert sum(data.SKIPPED.values()) == before + 2
    with pytest.raises(FileNotFoundError):
        CsvDataset(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="column"):
        CsvDataset(str(path), caption_key="caption")
    sub = data.subset(ds, 0.5)
    assert len(sub) == 2 and sub[0]["caption"] == "zero"
    bad_root = tmp_path / "moved.csv"
    bad_root.write_text("filepath,title\nnope/0.png,zero\n")
    with pytest.raises(FileNotFoundError, match="resolved against"):
        CsvDataset(str(bad_root))


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
            assert torch.allclose(data.denormalize(view), ref, atol=1e-5)
        top, left, h, w, flipped = out["global_boxes"][0]
        # the mask went through the same box with nearest sampling: pixel (r, c) reads
        # source row top + floor((r + 0.5) * h / 64), column left + floor((c + 0.5) * w / 64)
        rows = top + ((torch.arange(64) + 0.5) * h / 64).floor().long()
        cols = left + ((torch.arange(64) + 0.5) * w / 64).floor().long()
        mref = s["mask"][rows][:, cols]
        assert torch.equal(out["mask"], mref.flip(-1) if flipped else mref)


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
            assert torch.allclose(data.denormalize(v), colour.float().expand_as(v) / 255, atol=1e-5)
        for v, aug in zip(out["local_crops"], out["local_colour"]):
            same = torch.allclose(data.denormalize(v), colour.float().expand_as(v) / 255, atol=1e-4)
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
    y = data.color_jitter(x, generator=torch.Generator().manual_seed(3))
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
    grey = torch.full((3, 4, 4), 0.4)
    out = data.color_jitter(grey, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out[0], out[1], atol=1e-5) and torch.allclose(out[1], out[2], atol=1e-5)
    gs = data.grayscale(torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1))
    assert torch.allclose(gs.flatten(), torch.full((3,), 0.299))


def test_sample_crop_box_fallbacks():
    keep = torch.tensor([[0.0, 0.0, 30.0, 30.0]])                          # impossible at scale <= 0.1
    assert data.sample_crop_box(32, 32, (0.05, 0.1), keep=keep) == (0, 0, 32, 32)
    top, left, h, w = data.sample_crop_box(100, 20, (0.9, 1.0))            # ratio unreachable -> centre
    assert (h, w) == (20, 20) and top == 40 and left == 0


def test_eval_transform_centre_crop():
    img = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)
    mask = torch.randint(0, 5, (64, 80))
    out = data.EvalTransform(64)(dict(image=img, caption="x", mask=mask))
    ref = (img[:, :, 8:72].float() / 255 - CLIP_MEAN) / CLIP_STD          # no resize needed: a crop
    assert torch.allclose(out["image"], ref, atol=1e-5)
    assert torch.equal(out["mask"], mask[:, 8:72])
    out = data.EvalTransform(32)(dict(image=img, caption="x"))
    assert out["image"].shape == (3, 32, 32)


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
