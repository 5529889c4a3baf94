"""Tests for loaders/: the shapes world (analytic areas, masks against pixels, captions against the
objects drawn), the csv and tar readers (shards and csv files built here), and the segmentation
benchmark readers (tiny fake trees with the real layouts)."""

import csv
import hashlib
import io
import math
import os
import re
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import loaders.shapes as shapes
from data import SKIPPED, ByteTokenizer, collate
from loaders.imagetext import CsvDataset, TarShardDataset, build_dataset, expand_braces, list_shards, subset
from loaders.segmentation import CLASSNAMES_DIR, load_dataset, read_class_names
from loaders.shapes import ShapesDataset
from loaders.templates import OPENAI_TEMPLATES

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
    palette = {tuple(c) for c in shapes.COLOUR_RGB.tolist()}
    for i in range(60):
        s = ds[i]
        img, mask = s["image"], s["mask"]
        bg = ds.background(i)
        # background pixels are exactly the background render; object pixels are palette colours
        assert torch.equal(img[:, mask == 0], bg[:, mask == 0])
        obj = img[:, mask > 0].T.tolist()
        assert obj and all(tuple(p) in palette for p in obj)
        # every object box encloses pixels of the mask; the mask holds 1..K only
        assert mask.min() >= 0 and mask.max() <= len(shapes.SHAPE_NAMES)
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
        got = shapes.shape_inside(name, u, v).sum() * cell
        assert abs(got - area) < 0.01 * area, (name, got, area)
    # the heart and crescent: inside the unit disc, and of a comparable area
    for name in ("heart", "crescent"):
        inside = shapes.shape_inside(name, u, v)
        assert not inside[u * u + v * v > 1].any()
        assert 0.8 < inside.sum() * cell < 2.6


def _named_shapes(caption):
    names = set()
    for k, name in enumerate(shapes.SHAPE_NAMES):
        if re.search(rf"\b({name}|{shapes._plural(name)})\b", caption):
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
    s = next(ds[i] for i in range(100) if any(c in ds[i]["caption"] for c in shapes.COLOUR_NAMES))
    rgb = {tuple(p) for p in s["image"][:, s["mask"] > 0].T.tolist()}
    named = [c for c in shapes.COLOUR_NAMES if re.search(rf"\b{c}\b", s["caption"])]
    assert {tuple(shapes.COLOUR_RGB[shapes.COLOUR_NAMES.index(c)].tolist()) for c in named} <= rgb


def test_patchwork_backdrop_is_cells_of_desaturated_tints_and_names_itself():
    """backdrop="patchwork": the background is 6-12 regions (Voronoi cells), each desaturated like the
    uniform backdrops (within 25 of a grey level per channel, up to the noise), the objects unchanged in
    kind; the caption's background word, when there is one, is "patchwork"."""
    pat = ShapesDataset("val", cache=False, backdrop="patchwork")
    for i in range(20):
        bg = pat.background(i).float()                                       # [3, H, W]
        spread = (bg.max(0).values - bg.min(0).values)                         # per-pixel channel spread
        assert spread.median() <= 50 + 1e-6
        caption = pat.generate(i)["caption"]
        assert "background" not in caption or "patchwork background" in caption
        assert not any(f"{k} background" in caption for k in ("plain", "gradient", "noisy", "striped"))
    # several regions: the mean tint of the image's quarters differs, unlike a plain backdrop
    quarters = [pat.background(0)[:, y:y + 32, x:x + 32].float().mean((1, 2)) for y in (0, 32) for x in (0, 32)]
    assert max((q - quarters[0]).abs().max() for q in quarters) > 5
    with pytest.raises(ValueError, match="backdrop"):
        ShapesDataset("val", backdrop="wallpaper")


def test_single_object_splits_balanced_with_labels():
    ds = ShapesDataset("val_single", length=80)
    K = len(shapes.SHAPE_NAMES)
    counts = [0] * K
    for i in range(80):
        s = ds[i]
        assert s["label"] == i % K
        assert set(s["mask"].unique().tolist()) == {0, s["label"] + 1}
        assert _named_shapes(s["caption"]) == {s["label"] + 1}
        counts[s["label"]] += 1
    assert counts == [10] * K
    assert ds.class_names == shapes.SHAPE_NAMES
    for t in shapes.SHAPES_TEMPLATES:
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
    assert list_shards(pattern) == list_shards(folder)


def test_tar_corrupt_image_and_empty_caption_skipped_and_counted(tmp_path):
    folder = str(tmp_path / "shards")
    keys = _make_shards(folder, 2, per_shard=4, corrupt="00000002", empty="00010001")
    before = dict(SKIPPED)
    with pytest.warns(RuntimeWarning, match="skipped"):
        got = [s for s in TarShardDataset(folder)]
    assert sorted(s["key"] for s in got) == sorted(keys) and len(got) == 6
    assert SKIPPED["unreadable image"] == before.get("unreadable image", 0) + 1
    assert SKIPPED["empty caption"] == before.get("empty caption", 0) + 1
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
        ds = build_dataset(folder, "train", repeat=True)
        assert ds.shuffle and ds.shuffle_buffer > 0 and ds.repeat
        ds.rank, ds.world_size = rank, 2
        loader = iter(torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate,
                                                  drop_last=True))
        for e in range(2):                                     # 2 workers x 2 batches of 5 = one epoch
            epochs[e] += [c.split()[1] for _ in range(4) for c in next(loader)["captions"]]
    assert sorted(epochs[0]) == sorted(keys) and sorted(epochs[1]) == sorted(keys)
    assert epochs[0] != epochs[1]
    endless = iter(build_dataset(folder, "train", repeat=True))
    passes = [[next(endless)["key"] for _ in range(40)] for _ in range(2)]
    once = build_dataset(folder, "train", repeat=False)
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
    before = dict(SKIPPED)
    with pytest.warns(RuntimeWarning, match="truncated shard"):
        got = [s["key"] for s in TarShardDataset(folder)]
    good = [k for k in keys if not k.startswith("0001")]
    assert set(good) <= set(got) <= set(keys) and len(got) < len(keys) and len(set(got)) == len(got)
    assert SKIPPED["truncated shard (rest of it)"] == before.get("truncated shard (rest of it)", 0) + 1


def test_tar_subset_and_missing_paths(tmp_path):
    folder = str(tmp_path / "shards")
    _make_shards(folder, 4, per_shard=5)
    ds = subset(TarShardDataset(folder), 7)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert len(list(loader)) == 7                                          # 4 + 3 over two workers
    assert len(list(subset(TarShardDataset(folder), 0.5))) == 10      # first 2 of 4 shards
    rep = iter(TarShardDataset(folder, repeat=True, shuffle=True))
    assert len([next(rep) for _ in range(45)]) == 45                       # endless when repeat=True
    with pytest.raises(FileNotFoundError):
        TarShardDataset(os.path.join(folder, "{0000..0009}.tar"))
    with pytest.raises(FileNotFoundError):
        build_dataset(str(tmp_path / "nowhere"))
    assert expand_braces("a/{08..10}.tar") == ["a/08.tar", "a/09.tar", "a/10.tar"]
    assert expand_braces("{x,y}{1..2}") == ["x1", "x2", "y1", "y2"]


def test_draft_decoding_is_close_to_full_decode_and_resize():
    """data.decode_image with a working size: a 1600 x 1200 JPEG for a 200-px working size is decoded by
    libjpeg at 1/4 scale in the DCT domain (400 x 300), then shrunk once to 200 x 200. The reference
    decodes all 1.9 M pixels and applies the same antialiased bilinear resize (torch's, in uint8).
    Tolerance, in grey levels of 255: mean |diff| <= 1.5 and max <= 12. Why: both are low-pass filters
    about as wide as the 6x shrink, of different shapes (DCT scaling keeps each 8x8 block's 2x2 lowest
    frequencies, then a 1.5x bilinear filter; the reference is one 6x bilinear filter), so they differ
    only in the finest detail that survives the shrink, plus uint8 rounding twice. For scale: skipping
    the filter (nearest-neighbour subsampling, i.e. aliasing) is more than 4x farther from the
    reference. A photo under twice the working size on its short side cannot be DCT-scaled: its result
    is exactly the full decode + the same resize."""
    from data import decode_image
    from experiments.loaderbench import photo        # photo-like: a 1 / f^1.25 spectrum, like natural images
    buf = io.BytesIO()
    Image.fromarray(photo(1200, 1600, 0)).save(buf, format="JPEG", quality=90)
    image, frame = decode_image(io.BytesIO(buf.getvalue()), working_size=200)
    assert image.dtype == torch.uint8 and image.shape == (3, 200, 200) and frame == (1200, 1600)
    full = torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))).permute(2, 0, 1)
    assert full.shape == (3, 1200, 1600)

    def resize(x, side, mode="bilinear"):
        aa = dict(antialias=True, align_corners=False) if mode == "bilinear" else {}
        return torch.nn.functional.interpolate(x[None], size=(side, side), mode=mode, **aa)[0].float()

    ref = resize(full, 200)
    diff = (image.float() - ref).abs()
    assert 0 < diff.mean() <= 1.5 and diff.max() <= 12, (diff.mean(), diff.max())   # > 0: the DCT path was taken
    aliased = (resize(full, 200, "nearest") - ref).abs().mean()
    assert diff.mean() < aliased / 4, (diff.mean(), aliased)
    # 500 x 375 for a 256-px working size: no DCT scale reaches 256 on the short side; exact
    buf = io.BytesIO()
    Image.fromarray(photo(375, 500, 1)).save(buf, format="JPEG", quality=90)
    small, frame = decode_image(io.BytesIO(buf.getvalue()), working_size=256)
    want = resize(torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))).permute(2, 0, 1), 256)
    assert frame == (375, 500) and torch.equal(small.float(), want)
    # and without a working size, the stored image itself (what eval and the segmentation readers use)
    stored, frame = decode_image(io.BytesIO(buf.getvalue()))
    assert stored.shape == (3, 375, 500) and frame == (375, 500)


def test_tar_and_csv_readers_decode_to_the_working_size(tmp_path):
    """working_size=16: every image comes as uint8 [3, 16, 16], its stored frame (H, W) beside it, in
    the tar reader (with the shuffle buffer of training, which holds the undecoded files) and the csv one."""
    folder = str(tmp_path / "shards")
    keys = _make_shards(folder, 2, per_shard=3)
    got = list(build_dataset(folder, "train", working_size=16))
    assert sorted(s["key"] for s in got) == sorted(keys)
    assert all(s["image"].shape == (3, 16, 16) and s["frame"] == (10, 12) for s in got)
    Image.new("RGB", (30, 20), (5, 6, 7)).save(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text("filepath,title\na.png,a grey square\n")
    s = build_dataset(str(tmp_path / "pairs.csv"), working_size=16)[0]
    assert s["image"].shape == (3, 16, 16) and s["frame"] == (20, 30) and (s["image"] == torch.tensor([5, 6, 7]).view(3, 1, 1)).all()


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
    before = sum(SKIPPED.values())
    with pytest.warns(RuntimeWarning, match="skipped"):
        s = ds[1]                                                          # bad image, empty caption -> row 3
    assert s["caption"] == "two" and s["image"][0, 0, 0] == 100
    assert sum(SKIPPED.values()) == before + 2
    with pytest.raises(FileNotFoundError):
        CsvDataset(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="column"):
        CsvDataset(str(path), caption_key="caption")
    sub = subset(ds, 0.5)
    assert len(sub) == 2 and sub[0]["caption"] == "zero"
    bad_root = tmp_path / "moved.csv"
    bad_root.write_text("filepath,title\nnope/0.png,zero\n")
    with pytest.raises(FileNotFoundError, match="resolved against"):
        CsvDataset(str(bad_root))


# ------------------------------------------------------------------------------------------------
# Segmentation benchmarks: tiny fake trees with the real layouts
# ------------------------------------------------------------------------------------------------

def save_palette_png(path, label):
    """Palette PNG whose colours are NOT the indices (index i -> colour (7i, 255-i, 3i) mod 256)."""
    im = Image.fromarray(label.astype(np.uint8))
    im.putpalette([v % 256 for i in range(256) for v in (7 * i, 255 - i, 3 * i)])
    assert im.mode == "P"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im.save(path)


def save_gray_png(path, label):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(label.astype(np.uint8)).save(path)


def save_image(path, h, w):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


LABEL = np.array([[0, 5, 20, 255], [1, 1, 0, 255], [20, 5, 5, 0]])        # 3 x 4


def test_voc_palette_read_as_indices_and_reduce_zero_label(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    save_image(base / "JPEGImages" / "2007_000033.jpg", 3, 4)
    save_palette_png(base / "SegmentationClass" / "2007_000033.png", LABEL)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n")

    voc21 = load_dataset("voc21", tmp_path / "VOCdevkit")
    item = voc21[0]
    assert item["image"].shape == (3, 3, 4) and item["image"].dtype == torch.uint8
    assert item["mask"].tolist() == LABEL.tolist()                    # indices, 255 kept
    assert len(voc21.class_names) == 21 and voc21.background_index == 0
    voc20 = load_dataset("voc20", base)                                 # the VOC2012 folder works too
    assert voc20[0]["mask"].tolist() == [[255, 4, 19, 255], [0, 0, 255, 255], [19, 4, 4, 255]]
    assert len(voc20.class_names) == 20 and voc20.background_index is None
    assert voc20.class_names[14][0] == "person" and len(voc20.class_names[14]) > 1   # synonyms


def test_context_59_and_60(tmp_path):
    base = tmp_path / "VOC2010"
    label = np.array([[0, 1, 59], [255, 30, 0]])
    save_image(base / "JPEGImages" / "2008_000002.jpg", 2, 3)
    save_gray_png(base / "SegmentationClassContext" / "2008_000002.png", label)
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    assert load_dataset("context60", tmp_path)[0]["mask"].tolist() == label.tolist()
    assert load_dataset("context59", tmp_path)[0]["mask"].tolist() == [[255, 0, 58], [255, 29, 255]]
    assert len(load_dataset("context59", tmp_path).class_names) == 59


def test_ade_reduce_zero_label(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    save_image(base / "images" / "validation" / "ADE_val_00000001.jpg", 2, 2)
    save_gray_png(base / "annotations" / "validation" / "ADE_val_00000001.png", np.array([[0, 1], [150, 7]]))
    ds = load_dataset("ade150", tmp_path)
    assert ds[0]["mask"].tolist() == [[255, 0], [149, 6]]
    assert len(ds.class_names) == 150 and ds.class_names[0] == ["wall"]


def test_cityscapes_train_ids_kept_and_bad_ids_rejected(tmp_path):
    stem = "frankfurt_000000_000294"
    save_image(tmp_path / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png", 2, 2)
    gt = tmp_path / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelTrainIds.png"
    save_gray_png(gt, np.array([[0, 18], [255, 3]]))
    ds = load_dataset("cityscapes", tmp_path)
    assert ds[0]["mask"].tolist() == [[0, 18], [255, 3]] and len(ds.class_names) == 19
    save_gray_png(gt, np.array([[0, 33], [255, 3]]))                   # a labelId, not a trainId
    with pytest.raises(ValueError, match="labelTrainIds"):
        ds[0]


def test_cocostuff_train_ids(tmp_path):
    save_image(tmp_path / "images" / "val2017" / "000000000139.jpg", 2, 2)
    save_gray_png(tmp_path / "annotations" / "val2017" / "000000000139_labelTrainIds.png",
                  np.array([[0, 170], [255, 90]]))
    ds = load_dataset("cocostuff171", tmp_path)
    assert ds[0]["mask"].tolist() == [[0, 170], [255, 90]] and len(ds.class_names) == 171


def test_generic_folder(tmp_path):
    save_image(tmp_path / "images" / "a.png", 2, 3)
    save_palette_png(str(tmp_path / "masks" / "a.png"), np.array([[0, 1, 2], [255, 2, 1]]))
    (tmp_path / "classes.txt").write_text("background\ncat, kitty\ndog\n")
    ds = load_dataset("folder", tmp_path)
    assert ds.class_names == [["background"], ["cat", "kitty"], ["dog"]] and ds.background_index == 0
    assert ds[0]["mask"].tolist() == [[0, 1, 2], [255, 2, 1]] and ds[0]["name"] == "a"


def test_missing_or_malformed_datasets_give_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        load_dataset("voc20", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        load_dataset("ade150", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("cityscapes", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs --root"):
        load_dataset("voc20")
    # An image without its label file.
    save_image(tmp_path / "f" / "images" / "a.png", 2, 2)
    (tmp_path / "f" / "masks").mkdir()
    (tmp_path / "f" / "classes.txt").write_text("a\nb\n")
    with pytest.raises(FileNotFoundError, match="label files missing"):
        load_dataset("folder", tmp_path / "f")
    # A colour-rendered (RGB) mask cannot be read as labels.
    Image.new("RGB", (2, 2)).save(tmp_path / "f" / "masks" / "a.png")
    with pytest.raises(ValueError, match="mode 'RGB'"):
        load_dataset("folder", tmp_path / "f")[0]


def test_shipped_class_name_files():
    sizes = {"voc20": 20, "voc21": 21, "context59": 59, "context60": 60, "ade150": 150,
             "cityscapes19": 19, "cocostuff171": 171}
    for name, n in sizes.items():
        classes = read_class_names(CLASSNAMES_DIR / f"{name}.txt")
        assert len(classes) == n, name
    assert read_class_names(CLASSNAMES_DIR / "voc21.txt")[1:] == \
        read_class_names(CLASSNAMES_DIR / "voc20.txt")
    assert len(OPENAI_TEMPLATES) == len(set(OPENAI_TEMPLATES)) == 80


# ------------------------------------------------------------------------------------------------
# Evaluation sets: class folders, held-out image-text pairs, the shapes world written to disk
# ------------------------------------------------------------------------------------------------
def test_class_folder_labels_names_and_bad_input(tmp_path):
    from loaders.classification import ClassFolderDataset
    for folder, n in (("b_dog", 2), ("a_cat", 1), ("c", 3)):
        for i in range(n):
            save_image(tmp_path / "t" / folder / f"{i}.JPEG", 4, 5)          # ImageNet's upper-case extension
    (tmp_path / "t" / "c" / "notes.txt").write_text("not an image")           # ignored: not an image file
    (tmp_path / "t" / "c" / "9.png").write_bytes(b"corrupt")
    ds = ClassFolderDataset(str(tmp_path / "t"))
    assert ds.classes == ["a_cat", "b_dog", "c"] and ds.class_names == [["a cat"], ["b dog"], ["c"]]
    assert [label for _, label in ds.samples] == [0, 1, 1, 2, 2, 2, 2] and len(ds) == 7
    s = ds[1]
    assert s["label"] == 1 and s["image"].shape == (3, 4, 5) and s["image"].dtype == torch.uint8
    before = sum(SKIPPED.values())
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert ds[6] is None                                                # 9.png, after 0..2.JPEG: corrupt
    assert sum(SKIPPED.values()) == before + 1
    (tmp_path / "names.txt").write_text("cat, kitty\ndog\nthing\n")
    ds = ClassFolderDataset(str(tmp_path / "t"), str(tmp_path / "names.txt"), max_per_class=1)
    assert ds.class_names == [["cat", "kitty"], ["dog"], ["thing"]] and len(ds) == 3
    (tmp_path / "names2.txt").write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="names 2 classes but .* has 3 class folders"):
        ClassFolderDataset(str(tmp_path / "t"), str(tmp_path / "names2.txt"))
    os.makedirs(tmp_path / "t" / "d_empty")
    with pytest.raises(ValueError, match="d_empty holds no images"):
        ClassFolderDataset(str(tmp_path / "t"))
    with pytest.raises(FileNotFoundError):
        ClassFolderDataset(str(tmp_path / "nope"))


def test_eval_sets_read_every_pair_once_and_count_the_bad_ones(tmp_path):
    """write_shapes_files' val set with its bad samples: the csv reader gives None for the corrupt image
    and the empty caption (no replacement row: a pair must not count twice), the tar reader skips them;
    loaders.imagetext.EvalBatches reads every good pair once, in order, with 0 or 2 workers, and counts 2 skipped."""
    from loaders.imagetext import EvalBatches
    from loaders.imagetext import build_eval_dataset
    from loaders.shapes import write_shapes_files
    paths = write_shapes_files(str(tmp_path), n_train=4, n_val=6, n_class=1, size=32, bad_samples=True)
    val = ShapesDataset("val", size=32, length=6)
    want = [val[i]["caption"] for i in range(6)]
    csv_ds = build_eval_dataset(paths["val_csv"])
    assert len(csv_ds) == 8
    with pytest.warns(RuntimeWarning):
        assert csv_ds[6] is None and csv_ds[7] is None
    assert torch.equal(csv_ds[0]["image"], val[0]["image"])                # PNG is lossless
    for ds in (csv_ds, build_eval_dataset(os.path.dirname(paths["val_tar"]))):
        for workers in (0, 2):
            batches = EvalBatches(ds, batch_size=3, num_workers=workers)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                caps = [c for b in batches for c in b["captions"]]
            assert caps == want and batches.skipped == 2, (type(ds).__name__, workers)
    with pytest.raises(ValueError, match="own evaluation"):
        build_eval_dataset("shapes")
    with pytest.raises(FileNotFoundError):
        build_eval_dataset(str(tmp_path / "missing_dir"))
    # the class folders: 1 image per shape and split, names in sorted folder order
    from loaders.classification import ClassFolderDataset
    cls = ClassFolderDataset(paths["classes_val"], paths["classnames"])
    assert [n[0] for n in cls.class_names] == cls.classes == sorted(shapes.SHAPE_NAMES) and len(cls) == 9

