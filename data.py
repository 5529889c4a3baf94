"""data.py: captions into token ids, images into (multi-)crops, and the datasets that feed train.py.

Everything a contrastive image-text model eats passes through here:

1. Text. A byte-level tokenizer: the UTF-8 bytes of the caption, shifted by 4 so that ids 0-3 are
   free for special tokens, between a start and an end token, padded to a fixed context length:

       "a red star"  ->  [SOT, 97+4, 32+4, 114+4, ..., 114+4, EOT, PAD, PAD, ...]     (L ids)

   PAD = 0, SOT = 1, EOT = 2, MASK = 3 (for masked language modelling, MaskCLIP), vocabulary 260.
   The text tower pools its output at the EOT token (CLIP, Radford et al. 2021), so a caption
   longer than L is cut and the EOT is put back as the last id: it must never be lost.

2. Data. Three sources, all yielding the same sample dict {"image": uint8 [3, H, W], "caption": str,
   ...}:
   * ShapesDataset ("shapes"): a procedural toy world, generated on the fly and deterministic from
     (seed, split, index), with a segmentation mask per image. It is the CPU default, and it was
     designed for LEARNABILITY and against shortcuts (see its docstring).
   * CsvDataset: open_clip's csv/tsv format (an image-path column and a caption column).
   * TarShardDataset: webdataset-style .tar shards (key.jpg + key.txt) as img2dataset writes them,
     streamed with the standard tarfile module and split over DDP ranks and DataLoader workers.
   `subset` keeps the first N (or a fraction); `build_dataset` picks the source from a name/path.

3. Views. SILC (Naeem et al. 2023, arXiv 2310.13355) borrows DINO's multi-crop (Caron et al. 2021):
   every image gives 2 GLOBAL crops and n LOCAL crops, each a random resized crop

       area  ~ U(scale) * H * W,   log(aspect) ~ U(log 3/4, log 4/3),   then resized to a square

   global: scale (0.4, 1.0), resized to the training resolution S;
   local:  scale (0.05, 0.4), resized to s = round(S * 96/224 / p) * p  (DINO's 96 px at 224 px,
           rounded to whole patches of p pixels so the ViT grid is exact: S=64, p=8 -> s=24;
           p=4 -> s=28).
   The teacher sees only the global crops; the student sees all of them and must predict, from
   each view, the teacher's output on the other global views. Batches group crops by resolution
   ([2, B, 3, S, S] and [n, B, 3, s, s]) so the encoder runs one forward per resolution.
   All crops of one resolution are resampled by ONE bilinear F.grid_sample call (per-op overhead
   dominates at 64 px); a big photo is first shrunk once with antialiasing, so that no crop is
   downscaled by much more than 2x, where plain bilinear sampling does not alias.

   Which augmentations are on, and why:
   * Global crops are paired with the caption (SILC computes the contrastive loss for each global
     view). So they get ONLY geometric augmentation (crop, flip): a hue shift or grayscale would
     make "a red star" false. Their flip is shared (one coin per image) and the caption's words
     "left"/"right" are swapped when flipped, so position words stay true. When the sample knows
     its objects' boxes (shapes does), a global crop must contain the central half (in width and
     in height) of every object box, so no named object is cut out of a text-paired view
     (rejection sampling over 10 draws; the full image is the fallback).
   * Local crops are never paired with text: they also get colour jitter (brightness, contrast,
     saturation, hue) and random grayscale, as in DINO (blur and solarize are left out: at 24 px
     they erase the shapes).

Images leave the datasets as uint8 [3, H, W] tensors (0-255, RGB) and leave the transforms as float
tensors normalised with CLIP's mean and std: x = (pixel / 255 - mean) / std.

Bad input never crashes a run: an unreadable image or an empty caption is skipped and counted, with
one warning line carrying the running count. Counts are per process (each DataLoader worker keeps
its own); every batch carries its worker's count (`collate`), and train.py logs the sum over
workers and ranks as "skipped". A data path that does not exist is a FileNotFoundError when the
dataset is built.
"""

import csv
import functools
import io
import itertools
import math
import os
import random
import re
import tarfile
import warnings
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ------------------------------------------------------------------------------------------------
# 1. Tokenizer
# ------------------------------------------------------------------------------------------------
PAD_ID, SOT_ID, EOT_ID, MASK_ID = 0, 1, 2, 3
BYTE_OFFSET = 4                     # byte b has id b + 4
VOCAB_SIZE = 256 + BYTE_OFFSET      # 260


class ByteTokenizer:
    """UTF-8 bytes as tokens: no vocabulary file, no unknown tokens, any language.

    encode("ab") -> [SOT, 97+4, 98+4, EOT]            (no padding; at most context_length ids)
    __call__(["ab", "c"]) -> LongTensor [2, context_length], right-padded with PAD_ID = 0
    Truncation keeps the first context_length - 2 bytes and ends with EOT (the pooling position).
    """

    def __init__(self, context_length: int = 64):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for SOT and EOT), got {context_length}")
        self.context_length = context_length
        self.vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        ids = [SOT_ID] + [b + BYTE_OFFSET for b in text.encode("utf-8")] + [EOT_ID]
        if len(ids) > self.context_length:
            ids = ids[: self.context_length - 1] + [EOT_ID]   # cut, but the EOT survives
        return ids

    def __call__(self, texts) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        L = self.context_length
        rows = [self.encode(t) for t in texts]
        padded = [ids + [PAD_ID] * (L - len(ids)) for ids in rows]
        return torch.tensor(padded, dtype=torch.long).reshape(len(texts), L)   # [B, L]

    def decode(self, ids) -> str:
        """Inverse of encode: stops at the first EOT, drops special ids. A multi-byte character cut
        by truncation decodes to U+FFFD rather than raising."""
        if torch.is_tensor(ids):
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            if i == EOT_ID:
                break
            if i >= BYTE_OFFSET:
                out.append(i - BYTE_OFFSET)
        return out.decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------------
# Skipped-sample bookkeeping (per process)
# ------------------------------------------------------------------------------------------------
SKIPPED = Counter()   # reason -> count, in this process


def _skip(reason: str, what: str, error=None):
    """Count one skipped sample and print one warning line with the running count."""
    SKIPPED[reason] += 1
    detail = f": {type(error).__name__}: {error}" if error is not None else ""
    warnings.warn(f"data.py: skipped {what} ({reason}{detail}); {sum(SKIPPED.values())} samples "
                  f"skipped so far in this process", RuntimeWarning, stacklevel=3)


def load_image(source) -> torch.Tensor:
    """A path or file object -> uint8 [3, H, W] RGB tensor (palette, grey, alpha all become RGB)."""
    with Image.open(source) as im:
        arr = np.asarray(im.convert("RGB"))                 # [H, W, 3] uint8
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------------------------
# 2a. The shapes world
# ------------------------------------------------------------------------------------------------
# The K shape classes; mask id k + 1 <-> SHAPE_NAMES[k]. Each class stays itself under the
# augmentations: rotation is limited where a large one would turn a shape into another (a square
# turned 45 degrees is a diamond, a triangle turned 60 degrees points down like a heart).
SHAPE_NAMES = ["circle", "square", "triangle", "star", "cross", "heart", "ring", "crescent"]
SHAPE_PLURALS = {"cross": "crosses"}                          # the rest add "s"
SHAPE_MAX_ROTATION = {"circle": 0, "square": 15, "triangle": 20, "star": 180, "cross": 15,
                      "heart": 20, "ring": 0, "crescent": 180}  # degrees, +-
# Saturated object colours. Backgrounds are always desaturated (within +-25 of a grey level per
# channel), so no object can melt into its background.
COLOUR_NAMES = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
COLOUR_RGB = np.array([[220, 40, 40], [245, 140, 20], [240, 220, 30], [40, 180, 60],
                       [30, 200, 220], [40, 80, 230], [140, 60, 200], [240, 110, 190]], np.uint8)
BACKGROUND_NAMES = ["plain", "gradient", "noisy", "striped"]

# Training-caption templates ({} = the list of objects). No template word contains a shape name.
CAPTION_TEMPLATES = ["{}", "a photo of {}", "an image of {}", "a picture of {}", "a drawing of {}",
                     "an illustration of {}", "there is {}", "a scene with {}", "this shows {}"]
# Zero-shot prompts ({} = one class name), built from the same phrases as the training captions.
SHAPES_TEMPLATES = ["a photo of a {}.", "an image of a {}.", "a picture of a {}.", "a drawing of a {}.",
                    "an illustration of a {}.", "there is a {}.", "a scene with a {}.", "a {}."]

_SPLIT_CODE = {"train": 0, "tune": 1, "val": 2, "tune_single": 3, "val_single": 4}
_DEFAULT_LENGTH = {"train": 100_000, "tune": 512, "val": 512, "tune_single": 512, "val_single": 512}
_NUMBER_WORDS = {2: "two", 3: "three"}


def _regular_polygon(u, v, n, r):
    """Inside a regular n-gon with circumradius r and a vertex pointing up (+v)."""
    phi = np.mod(np.arctan2(v, u) - np.pi / 2, 2 * np.pi / n)     # angle from the nearest vertex
    rho = np.sqrt(u * u + v * v)
    return rho * np.cos(phi - np.pi / n) <= r * np.cos(np.pi / n)  # distance to the edge's line


def _star(u, v, points, inner):
    """Inside a star with outer radius 1 and inner radius `inner`, a point up. The plane is folded
    into one half-spike (angle a in [0, pi/points]), where the edge runs from the tip A = (1, 0)
    to the inner corner B; inside = the origin's side of line AB."""
    sector = 2 * np.pi / points
    phi = np.mod(np.arctan2(v, u) - np.pi / 2, sector)
    a = np.minimum(phi, sector - phi)
    rho = np.sqrt(u * u + v * v)
    qx, qy = rho * np.cos(a), rho * np.sin(a)
    bx, by = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
    return (bx - 1.0) * qy - by * (qx - 1.0) >= 0                  # cross(B - A, q - A) >= 0


def shape_inside(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean silhouette of one shape class. u, v: coordinates in the object's own frame, in
    units of its radius, v pointing up. Every shape fits in the unit disc and has a similar area."""
    rho2 = u * u + v * v
    if name == "circle":
        return rho2 <= 0.85 ** 2
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if name == "triangle":
        return _regular_polygon(u, v + 0.275, 3, 1.1)                # centred on its bounding box
    if name == "star":
        return _star(u, v, 5, 0.45)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.28) & (av <= 0.9)) | ((av <= 0.28) & (au <= 0.9))
    if name == "heart":
        x, y = 1.35 * u, 1.35 * v + 0.125                            # (x^2+y^2-1)^3 - x^2 y^3 <= 0
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if name == "ring":
        return (rho2 <= 0.9 ** 2) & (rho2 >= 0.5 ** 2)
    if name == "crescent":
        return (rho2 <= 0.9 ** 2) & ((u - 0.4) ** 2 + v * v > 0.72 ** 2)  # a disc with a bite
    raise ValueError(f"unknown shape {name!r}; known: {SHAPE_NAMES}")


def _plural(name):
    return SHAPE_PLURALS.get(name, name + "s")


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


class ShapesDataset(torch.utils.data.Dataset):
    """A procedural world of coloured shapes with captions and segmentation masks. No download.

    Sample i of a split is a pure function of (seed, split, i): its own random generator is seeded
    with that triple, so any DataLoader worker (or rank) can make any sample, and the splits are
    disjoint by construction (different seed streams).

    Returns dict(
        image   = uint8 [3, H, W] RGB tensor (0-255; transforms convert and normalise it),
        caption = str (at most max_caption_bytes UTF-8 bytes, so the byte tokenizer never cuts it),
        mask    = int64 [H, W]: 0 = background, k = SHAPE_NAMES[k - 1], the TOP object at each pixel,
        boxes   = float32 [n_objects, 4]: each object's full (unoccluded) box x0, y0, x1, y1 in pixels,
        label   = int class index 0..K-1 (single-object splits only)),
    passed through `transform` when one is given.

    Splits: "train" (length 100_000 by default; make it as long as you like), "tune" (for choosing
    hyper-parameters: never tune on val), "val" (512 fixed images), and "val_single"/"tune_single"
    (one object per image, classes balanced: label = index % K, for zero-shot classification).
    `seed` changes every split: keep seed=0 for val so that runs compare on the same images.

    Design (issue 2 tells how earlier prototypes failed: captions were matched by colour and
    background alone, and shapes were never learned):
      * 8 shapes that stay distinct under rotation, crop and flip; 8 saturated colours; objects of
        radius 11-20 px at 64 px (scaled with `size`), i.e. 3-5 patches of 8 px wide.
      * 1 or 2 objects by default (`n_objects_p` = P(1, 2, 3 objects) = (0.5, 0.5, 0); 3 objects
        are available), so half the images hold several objects that one global embedding cannot
        localise. Measured on the tune split with a tiny CLIP, 120 steps x 64 images: zero-shot
        shape accuracy 28% with (0.5, 0.5, 0) and radius 11-20 (39% after 360 steps), 18% with
        (0.4, 0.4, 0.2); with (0.3, 0.4, 0.3) and radius 9-20 it was 13% after 100 steps (chance is
        12.5%) and 17% after 480. The same shape or colour may repeat; they keep their centres 0.8 * (r1 + r2) apart and are painted largest first,
        so occlusion happens but every object stays mostly visible; all lie fully inside the image.
      * Backgrounds: plain, gradient, noise, stripes, always desaturated.
      * Captions: every object's SHAPE is always named; colours in `colour_prob` (default 0.2) of
        captions. Measured on the tune split (issue 2 notes): with colours in 60% of captions a
        tiny CLIP first learned to match captions by colour, and zero-shot shape classification was
        still at chance after 19k samples; at 20% it rose above chance by 13k samples. Order
        random; sometimes count words ("two squares"), relative size words ("a large star and a
        small circle"), a relation ("a heart to the left of a ring") or the background. Relative
        words (not "on the left" / "small") stay true under crops that keep every object, and
        "left"/"right" are swapped by the flip (see MultiCrop). 9 templates x colour x order x
        count: 3635 distinct captions in 4096 samples; in a batch of 128, an image has on average
        about one OTHER caption that is also true of it (mostly short ones like "a circle").
    """

    def __init__(self, split: str = "train", size: int = 64, length: int | None = None, seed: int = 0,
                 transform=None, cache: bool | None = None, max_caption_bytes: int = 62,
                 colour_prob: float = 0.2, radius: tuple[float, float] = (11.0, 20.0),
                 n_objects_p: tuple[float, float, float] = (0.5, 0.5, 0.0)):
        if split not in _SPLIT_CODE:
            raise ValueError(f"unknown shapes split {split!r}; choose one of {list(_SPLIT_CODE)}")
        if size < 32:
            raise ValueError(f"shapes images must be at least 32 px, got size={size}")
        self.split, self.size, self.seed, self.transform = split, size, seed, transform
        self.length = _DEFAULT_LENGTH[split] if length is None else int(length)
        self.single = split.endswith("_single")
        self.class_names = list(SHAPE_NAMES)
        self.max_caption_bytes = max_caption_bytes
        self.colour_prob = colour_prob
        self.n_objects_p = list(n_objects_p)          # probabilities of 1, 2, 3 objects (multi-object splits)
        self.radius = (radius[0] * size / 64, radius[1] * size / 64)   # radii quoted at 64 px
        # Small fixed splits are cached in memory (in each process) after their first generation.
        self.cache = (split != "train") if cache is None else cache
        self._cache = {}
        c = np.arange(size, dtype=np.float32) + 0.5                     # pixel centres
        self._xx, self._yy = np.meshgrid(c, c)                          # [H, W] each

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.split} split of length {self.length}")
        sample = self._cache.get(index)
        if sample is None:
            sample = self.generate(index)
            if self.cache:
                self._cache[index] = sample
        return self.transform(sample) if self.transform is not None else dict(sample)

    def _rng(self, index):
        return np.random.default_rng([self.seed, _SPLIT_CODE[self.split], index])

    # --- background: drawn FIRST from the sample's generator, so it can be re-rendered alone ---
    def _draw_background(self, rng):
        kind = int(rng.integers(len(BACKGROUND_NAMES)))
        c1 = rng.uniform(35, 220) + rng.uniform(-25, 25, size=3)       # desaturated tints
        c2 = rng.uniform(35, 220) + rng.uniform(-25, 25, size=3)
        angle = rng.uniform(0, 2 * np.pi)
        S = self.size
        if kind == 0:                                                    # plain
            return kind, np.broadcast_to(np.rint(c1).astype(np.uint8), (S, S, 3))
        if kind == 2:                                                    # pixel noise
            img = c1.astype(np.float32) + rng.standard_normal((S, S, 3), dtype=np.float32) * rng.uniform(6, 20)
        else:
            t = self._xx * np.cos(angle) + self._yy * np.sin(angle)     # [H, W] position along a direction
            if kind == 1:                                                # linear gradient c1 -> c2
                t = (t - t.min()) / (t.max() - t.min())
                img = c1.astype(np.float32) + t[..., None] * (c2 - c1).astype(np.float32)
            else:                                                        # stripes, period 6-14 px at 64
                if abs(float(np.mean(c1 - c2))) < 30:                    # keep stripes visible
                    c2 = c1 + np.sign(128 - c1.mean()) * 50
                period = rng.uniform(6, 14) * S / 64
                img = np.where((np.mod(t / period, 1.0) < 0.5)[..., None], c1, c2)
        return kind, np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def background(self, index) -> torch.Tensor:
        """The background of sample `index` alone, uint8 [3, H, W] (for tests and figures)."""
        _, bg = self._draw_background(self._rng(index))
        return torch.from_numpy(np.array(bg)).permute(2, 0, 1).contiguous()

    # --- objects ---
    def _place_objects(self, rng, n):
        """Radii and centres for n objects, at least 0.8 * (r_i + r_j) apart, fully inside."""
        radii = np.sort(rng.uniform(*self.radius, size=n))[::-1]         # largest first
        for _ in range(10):
            centres, ok = [], True
            for r in radii:
                cand = rng.uniform(r + 1, self.size - 1 - r, size=(16, 2))   # [16, (x, y)]
                good = np.ones(16, bool)
                for (px, py), pr in zip(centres, radii):
                    good &= np.hypot(cand[:, 0] - px, cand[:, 1] - py) >= 0.8 * (r + pr)
                if not good.any():
                    ok = False
                    break
                centres.append(cand[np.argmax(good)])
            if ok:
                return radii, centres
            radii = radii * 0.9                                          # too crowded: shrink, retry
        return radii[: len(centres)], centres                           # keep whatever fitted

    def generate(self, index) -> dict:
        """Render sample `index` (no transform, no cache)."""
        rng = self._rng(index)
        bg_kind, img = self._draw_background(rng)                       # [H, W, 3] uint8
        img = img.copy()
        mask = np.zeros((self.size, self.size), np.int64)               # [H, W]
        K = len(SHAPE_NAMES)
        if self.single:
            n, shapes = 1, np.array([index % K])                        # balanced classes
        else:
            n = int(rng.choice([1, 2, 3], p=self.n_objects_p))
            shapes = rng.integers(K, size=n)
        colours = rng.integers(len(COLOUR_NAMES), size=n)
        radii, centres = self._place_objects(rng, n)
        objects, boxes = [], []
        for k, (r, (cx, cy)) in enumerate(zip(radii, centres)):          # largest painted first
            name = SHAPE_NAMES[shapes[k]]
            theta = np.deg2rad(rng.uniform(-1, 1) * SHAPE_MAX_ROTATION[name])
            # Rasterise only the object's bounding window: cheap and exact (hard edges).
            x0, x1 = max(0, int(cx - r) - 1), min(self.size, int(cx + r) + 2)
            y0, y1 = max(0, int(cy - r) - 1), min(self.size, int(cy + r) + 2)
            dx = self._xx[y0:y1, x0:x1] - cx
            dy = cy - self._yy[y0:y1, x0:x1]                             # up is +v
            u = (dx * np.cos(theta) + dy * np.sin(theta)) / r
            v = (-dx * np.sin(theta) + dy * np.cos(theta)) / r
            inside = shape_inside(name, u, v)                            # [h, w] bool
            img[y0:y1, x0:x1][inside] = COLOUR_RGB[colours[k]]
            mask[y0:y1, x0:x1][inside] = shapes[k] + 1
            ys, xs = np.nonzero(inside)
            boxes.append([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1])
            objects.append(dict(shape=name, colour=COLOUR_NAMES[colours[k]], r=float(r),
                                cx=float(cx), cy=float(cy)))
        sample = dict(image=torch.from_numpy(img).permute(2, 0, 1).contiguous(),
                      caption=self._caption(objects, BACKGROUND_NAMES[bg_kind], rng),
                      mask=torch.from_numpy(mask),
                      boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        if self.single:
            sample["label"] = int(shapes[0])
        return sample

    # --- captions ---
    def _caption(self, objects, background, rng) -> str:
        n = len(objects)
        radii = [o["r"] for o in objects]
        use_colour = rng.random() < self.colour_prob
        use_size = n >= 2 and max(radii) / min(radii) >= 1.4 and rng.random() < 0.4
        use_bg = rng.random() < 0.2
        template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
        order = list(rng.permutation(n))
        relation = None
        if n == 2 and rng.random() < 0.35:
            a, b = objects[order[0]], objects[order[1]]
            dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]               # image y points down
            if abs(dx) >= 2 * abs(dy):
                relation = "to the left of" if dx > 0 else "to the right of"
            elif abs(dy) >= 2 * abs(dx):
                relation = "above" if dy > 0 else "below"
        period = "." if rng.random() < 0.5 else ""
        # Build, then drop optional parts until the caption fits the tokenizer's context.
        while True:
            text = self._render_caption(objects, order, use_colour, use_size, relation, template,
                                        background if use_bg else None) + period
            if len(text.encode("utf-8")) <= self.max_caption_bytes:
                return text
            if use_bg:
                use_bg = False
            elif template != "{}":
                template = "{}"
            elif use_size:
                use_size = False
            elif relation is not None:
                relation = None
            elif use_colour:
                use_colour = False
            else:
                return text                                             # cannot shorten further

    @staticmethod
    def _render_caption(objects, order, use_colour, use_size, relation, template, background):
        radii = [o["r"] for o in objects]

        def words(o):   # adjectives of one object, in English order: size, colour
            w = []
            if use_size and o["r"] == max(radii):
                w.append("large")
            elif use_size and o["r"] == min(radii):
                w.append("small")
            if use_colour:
                w.append(o["colour"])
            return w

        if relation is not None:
            a, b = objects[order[0]], objects[order[1]]
            pa, pb = words(a) + [a["shape"]], words(b) + [b["shape"]]
            desc = f"{_article(pa[0])} {' '.join(pa)} {relation} {_article(pb[0])} {' '.join(pb)}"
        else:
            # group identical descriptions: two "red circle"s -> "two red circles"
            groups = {}
            for i in order:
                key = tuple(words(objects[i])) + (objects[i]["shape"],)
                groups[key] = groups.get(key, 0) + 1
            phrases = []
            for key, count in groups.items():
                if count == 1:
                    phrases.append(f"{_article(key[0])} {' '.join(key)}")
                else:
                    phrases.append(" ".join((_NUMBER_WORDS[count],) + key[:-1] + (_plural(key[-1]),)))
            desc = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        if template == "there is {}" and desc.split(" ", 1)[0] in _NUMBER_WORDS.values():
            template = "there are {}"                                   # agrees with the first noun
        text = template.format(desc)
        if background is not None:
            text += f" on a {background} background"
        return text


# ------------------------------------------------------------------------------------------------
# 2b. Real data: csv/tsv files and tar shards
# ------------------------------------------------------------------------------------------------
class CsvDataset(torch.utils.data.Dataset):
    """open_clip's csv format: one row per sample, an image-path column and a caption column.

    Relative image paths are resolved against the csv file's folder. A corrupt / missing image or
    an empty caption is skipped and counted, and the NEXT index is read instead (up to
    `max_retries` in a row), so batches keep their size (DDP's all-gather needs equal sizes).
    Returns dict(image=uint8 [3, H, W], caption=str), through `transform` if given.
    """

    def __init__(self, path: str, transform=None, img_key: str = "filepath", caption_key: str = "title",
                 sep: str | None = None, max_retries: int = 20):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"csv/tsv file not found: {path}")
        if sep in (None, "auto"):
            sep = "\t" if path.lower().endswith(".tsv") else ","
        self.transform, self.max_retries = transform, max_retries
        root = os.path.dirname(os.path.abspath(path))
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=sep)
            columns = reader.fieldnames or []
            for key, what in ((img_key, "img_key"), (caption_key, "caption_key")):
                if key not in columns:
                    raise ValueError(f"column {key!r} not found in {path} (separator {sep!r}); its columns "
                                     f"are {columns}. Set the csv {what} / separator to match.")
            rows = [(r[img_key], r[caption_key]) for r in reader]
        if not rows:
            raise ValueError(f"{path} has a header but no rows")
        self.images = [p if os.path.isabs(p) else os.path.join(root, p) for p, _ in rows]
        self.captions = [c if c is not None else "" for _, c in rows]
        # A wrong image root shows up as "every path is missing": say so now rather than skip forever.
        head = self.images[:10]
        if not any(os.path.exists(p) for p in head):
            raise FileNotFoundError(f"none of the first {len(head)} image paths in {path} exist (e.g. "
                                    f"{head[0]}); relative paths are resolved against {root}")

    def __len__(self):
        return len(self.images)

    def load(self, i):
        """Sample i, or None (counted) if its image is unreadable or its caption empty."""
        caption = self.captions[i].strip()
        if not caption:
            _skip("empty caption", f"row {i} ({self.images[i]})")
            return None
        try:
            image = load_image(self.images[i])
        except Exception as e:          # missing file, truncated/corrupt data, decompression bomb...
            _skip("unreadable image", self.images[i], e)
            return None
        return dict(image=image, caption=caption)

    def __getitem__(self, index):
        for attempt in range(self.max_retries):
            sample = self.load((index + attempt) % len(self))
            if sample is not None:
                return self.transform(sample) if self.transform is not None else sample
        raise RuntimeError(f"{self.max_retries} unreadable samples in a row from index {index}: "
                           f"is the data readable? (skipped so far: {dict(SKIPPED)})")


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_braces(pattern: str) -> list[str]:
    """"a/{00..02}.tar" -> ["a/00.tar", "a/01.tar", "a/02.tar"]; "{x,y}" -> alternatives.
    Zero padding follows the first number's width. Several braces expand left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1))
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    return [p for o in options for p in expand_braces(head + o + tail)]


def list_shards(spec) -> list[str]:
    """A folder (all *.tar inside, sorted), a .tar file, a brace pattern, or a list of these ->
    shard paths. Raises FileNotFoundError naming what is missing."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in list_shards(s)]
    if os.path.isdir(spec):
        shards = sorted(os.path.join(spec, f) for f in os.listdir(spec)
                        if f.endswith((".tar", ".tar.gz", ".tgz")))
        if not shards:
            raise FileNotFoundError(f"no .tar shards in folder {spec}")
        return shards
    shards = expand_braces(spec)
    missing = [p for p in shards if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shard(s) not found, e.g. {missing[0]} "
                                f"(from {spec!r})")
    return shards


def _ends_cleanly(tar) -> bool:
    """Whether a tar that has been read to its end ends properly: with a block of 512 zero bytes where
    the next header would start. tarfile stops SILENTLY at a header cut short (a shard truncated by a
    failed copy loses its last samples without an error), so the end is checked here."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)


def _shuffled(iterator, size, rng):
    """Approximate shuffle with a buffer of `size` samples (webdataset style)."""
    buf = []
    for x in iterator:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


class TarShardDataset(torch.utils.data.IterableDataset):
    """Webdataset-style tar shards (key.jpg|jpeg|png|webp + key.txt), read with `tarfile`.

    Splitting, so that no sample is read twice in an epoch: the R = world_size x num_workers readers
    (rank r, DataLoader worker w -> reader r * num_workers + w) take
      * whole SHARDS round-robin when there are at least R shards (each reader opens only its own;
        ranks may then get unequal sample counts: train for a fixed number of steps with repeat=True);
      * otherwise SAMPLES round-robin: every reader walks every shard but decodes only the samples
        whose running index is its own (a warning says so; I/O is R times higher).
    rank/world_size default to torch.distributed's (0 and 1 when it is not initialised), read when
    iteration starts. Shard order is shuffled per epoch with (seed + epoch), identically on every
    rank, when shuffle=True; `shuffle_buffer` > 0 adds a sample-level shuffle inside each reader.
    repeat=True loops over epochs forever (epoch + 1 each pass). max_samples caps the samples of
    THIS RANK per pass (shared out over its workers; set by `subset`).
    Yields dict(image=uint8 [3, H, W], caption=str, key=str), through `transform` if given.
    """

    def __init__(self, shards, transform=None, rank: int | None = None, world_size: int | None = None,
                 shuffle: bool = False, shuffle_buffer: int = 0, seed: int = 0, repeat: bool = False,
                 max_samples: int | None = None):
        self.shards = list_shards(shards)
        self.transform, self.rank, self.world_size = transform, rank, world_size
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.repeat, self.max_samples = repeat, max_samples
        self.epoch = 0

    def set_epoch(self, epoch: int):
        """Call before creating the DataLoader iterator to reshuffle the shard order."""
        self.epoch = epoch

    def _rank_world(self):
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _members(self, path):
        """Yield (key, {ext: TarInfo}) groups of consecutive members of one shard (tar stays open)."""
        try:
            tar = tarfile.open(path, "r:*")
        except (tarfile.TarError, OSError) as e:
            _skip("unreadable shard", path, e)
            return
        with tar:
            key, group = None, {}
            try:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, base = os.path.split(member.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)        # webdataset: key = up to the first dot
                    k = os.path.join(folder, stem)
                    if k != key and group:
                        yield tar, key, group
                        group = {}
                    key = k
                    group[ext.lower()] = member
                if not _ends_cleanly(tar):
                    _skip("truncated shard (rest of it)", path)
            except (tarfile.TarError, OSError, EOFError) as e:   # truncated / corrupt tar
                _skip("corrupt shard (rest of it)", path, e)
            if group:
                yield tar, key, group

    def _decode(self, tar, key, group, path):
        where = f"{path}:{key}"
        img_m = next((group[e] for e in IMAGE_EXTS if e in group), None)
        if img_m is None or "txt" not in group:
            _skip("no image" if img_m is None else "no caption", where)
            return None
        try:
            caption = tar.extractfile(group["txt"]).read().decode("utf-8", errors="replace").strip()
            if not caption:
                _skip("empty caption", where)
                return None
            image = load_image(io.BytesIO(tar.extractfile(img_m).read()))
        except Exception as e:
            _skip("unreadable image", where, e)
            return None
        return dict(image=image, caption=caption, key=key)

    def _one_pass(self, epoch, reader, n_readers):
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(shards)   # same order on every rank
        if len(shards) >= n_readers:
            for path in shards[reader::n_readers]:
                for tar, key, group in self._members(path):
                    s = self._decode(tar, key, group, path)
                    if s is not None:
                        yield s
        else:
            if reader == 0 and epoch == self.epoch:
                warnings.warn(f"data.py: {len(shards)} shard(s) for {n_readers} readers (ranks x workers): "
                              f"splitting SAMPLES round-robin; every reader walks every shard", RuntimeWarning)
            j = 0
            for path in shards:
                for tar, key, group in self._members(path):
                    if j % n_readers == reader:
                        s = self._decode(tar, key, group, path)
                        if s is not None:
                            yield s
                    j += 1

    def __iter__(self):
        rank, world = self._rank_world()
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, n_readers = rank * n_workers + worker, world * n_workers
        epoch = self.epoch
        while True:
            it = self._one_pass(epoch, reader, n_readers)
            if self.shuffle_buffer > 0:
                it = _shuffled(it, self.shuffle_buffer, random.Random(self.seed * 7919 + epoch * 131 + reader))
            if self.max_samples is not None:   # this worker's share of the rank's quota
                quota = self.max_samples // n_workers + (1 if worker < self.max_samples % n_workers else 0)
                it = itertools.islice(it, quota)
            for s in it:
                yield self.transform(s) if self.transform is not None else s
            if not self.repeat:
                return
            epoch += 1


class FirstN(torch.utils.data.Dataset):
    """The first n samples of a map-style dataset; other attributes (class_names...) pass through."""

    def __init__(self, dataset, n):
        self.dataset, self.n = dataset, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for a subset of {self.n}")
        return self.dataset[i]

    def __getattr__(self, name):
        if name == "dataset":          # not set yet (e.g. while unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class IterableFirstN(torch.utils.data.IterableDataset):
    """Stops after n samples of this rank's share (split over its DataLoader workers)."""

    def __init__(self, dataset, n):
        self.dataset, self.n = dataset, n

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return itertools.islice(iter(self.dataset), self.n // nw + (1 if w < self.n % nw else 0))


def subset(dataset, n):
    """A smaller dataset: n >= 1 keeps the first int(n) samples, 0 < n < 1 keeps that fraction.
    Map-style: the first samples by index. TarShardDataset: n samples of THIS RANK's share per pass
    (max_samples), or the first ceil(n * shards) shards for a fraction. Other iterables: n samples
    of this rank's share; a fraction needs a known length and raises ValueError."""
    if isinstance(n, bool) or not n > 0:
        raise ValueError(f"subset needs n >= 1 (a count) or 0 < n < 1 (a fraction), got {n!r}")
    if isinstance(dataset, TarShardDataset):
        import copy
        out = copy.copy(dataset)
        if n < 1:
            out.shards = dataset.shards[: max(1, math.ceil(n * len(dataset.shards)))]
        else:
            out.max_samples = int(n)
        return out
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if n < 1:
            raise ValueError("a fraction of an iterable dataset of unknown length is undefined; pass a count")
        return IterableFirstN(dataset, int(n))
    count = int(n) if n >= 1 else max(1, math.ceil(n * len(dataset)))
    return FirstN(dataset, min(count, len(dataset)))


# ------------------------------------------------------------------------------------------------
# 3. Transforms (torch only; PIL only decodes files)
# ------------------------------------------------------------------------------------------------
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP's RGB mean and std
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (0-255) or float (0-1) [..., 3, H, W] -> float (x - mean) / std."""
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    return (x - _MEAN.to(x.dtype)) / _STD.to(x.dtype)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of normalize: float in [0, 1] (for looking at crops)."""
    return x * _STD.to(x.dtype) + _MEAN.to(x.dtype)


def local_crop_size(image_size: int, patch_size: int) -> int:
    """DINO's 96 px local crops at 224 px, scaled to image_size and rounded to whole patches."""
    return max(patch_size, round(image_size * 96 / 224 / patch_size) * patch_size)


def sample_crop_box(height, width, scale, ratio=(3 / 4, 4 / 3), generator=None, keep=None, tries=10):
    """A random-resized-crop box (top, left, h, w) with area fraction in `scale` and aspect w/h in
    `ratio` (log-uniform), as in Inception / torchvision. keep: float [n, 4] boxes (x0, y0, x1, y1)
    that the crop must contain. After `tries` failures: the whole image if `keep` was given (it
    contains everything), else the largest centred square within the scale range."""
    r = torch.rand(tries, 4, generator=generator).tolist()   # fixed number of draws per call
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for u_area, u_ratio, u_top, u_left in r:
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(lo + (hi - lo) * u_ratio)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if not (0 < w <= width and 0 < h <= height):
            continue
        top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
        if keep is not None and len(keep) > 0:
            k = keep.tolist() if torch.is_tensor(keep) else keep
            if not all(left <= x0 and top <= y0 and left + w >= x1 and top + h >= y1 for x0, y0, x1, y1 in k):
                continue
        return top, left, h, w
    if keep is not None and len(keep) > 0:
        return 0, 0, height, width
    side = min(height, width, round(math.sqrt(scale[1] * area)))
    return (height - side) // 2, (width - side) // 2, side, side


def resized_crop(x: torch.Tensor, box, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Crop box (top, left, h, w) of x [C, H, W] (float) or [H, W] (mask, any int dtype), resize to
    size x size. Images: bilinear with antialiasing; masks: nearest ("nearest-exact": output pixel
    i reads input pixel floor((i + 0.5) * h / size))."""
    top, left, h, w = box
    if x.ndim == 2:                                            # a label mask: never blend ids
        m = x[top: top + h, left: left + w]
        if (h, w) == (size, size):
            return m.clone()
        m = F.interpolate(m[None, None].float(), size=(size, size), mode="nearest-exact")
        return m[0, 0].to(x.dtype)
    c = x[:, top: top + h, left: left + w]
    if (h, w) == (size, size):
        return c.clone()
    return F.interpolate(c[None], size=(size, size), mode=mode, antialias=True, align_corners=False)[0]


def shrink_short_side(img: torch.Tensor, max_short: int) -> torch.Tensor:
    """Antialiased downscale of img [3, H, W] so that min(H, W) <= max_short (no-op if already).
    After it, crops are resampled by a factor of at most ~2, where plain bilinear sampling is
    still alias-free; so big photos are filtered once, not once per crop."""
    H, W = img.shape[-2:]
    if min(H, W) <= max_short:
        return img
    f = max_short / min(H, W)
    size = (max(1, round(H * f)), max(1, round(W * f)))
    return F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def crop_and_resize(img: torch.Tensor, boxes, H: int, W: int, size: int) -> torch.Tensor:
    """Many crops of one image in ONE bilinear resampling call (F.grid_sample).

    boxes: [(top, left, h, w, flipped)] in the pixel frame of an H x W image; img [3, H', W'] may
    be a downscaled copy of that image (sampling positions are in normalised coordinates, so they
    do not depend on the copy's resolution). Output pixel j of a crop samples the continuous
    image at x = left + (j + 0.5) * w / size (pixel centres at k + 0.5), mirrored when flipped;
    positions are clamped to the image border. Returns [n, 3, size, size]."""
    b = np.array([bx[:4] for bx in boxes], dtype=np.float32)             # [n, 4] top, left, h, w
    flip = np.array([bool(bx[4]) for bx in boxes])                        # [n]
    t = (np.arange(size, dtype=np.float32) + 0.5) / size                  # [size] in (0, 1)
    tx = np.where(flip[:, None], 1 - t, t)                                # [n, size]
    x = b[:, 1:2] + b[:, 3:4] * tx                                        # [n, size] pixels
    y = b[:, 0:1] + b[:, 2:3] * t                                         # [n, size]
    n = len(boxes)
    grid = np.empty((n, size, size, 2), np.float32)                       # grid_sample's [-1, 1] coords
    grid[..., 0] = (2 * x / W - 1)[:, None, :]
    grid[..., 1] = (2 * y / H - 1)[:, :, None]
    grid = torch.from_numpy(grid).to(img.dtype)
    return F.grid_sample(img[None].expand(n, -1, -1, -1), grid, mode="bilinear",
                         padding_mode="border", align_corners=False)      # [n, 3, size, size]


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right (last dimension)."""
    return x.flip(-1)


def swap_left_right(caption: str) -> str:
    """The caption of a mirrored image: "left" <-> "right" as whole words, case kept."""
    def swap(m):
        w = m.group(0)
        new = {"left": "right", "right": "left"}[w.lower()]
        return new.capitalize() if w[0].isupper() else new
    return re.sub(r"\b(left|right)\b", swap, caption, flags=re.IGNORECASE)


_GREY = torch.tensor([0.299, 0.587, 0.114])                     # ITU-R 601 luma weights w (sum 1)
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ).contiguous()
_GREY_NP, _RGB2YIQ_NP, _YIQ2RGB_NP = _GREY.double().numpy(), _RGB2YIQ.double().numpy(), _YIQ2RGB.double().numpy()


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """float [..., 3, H, W] -> its luma w . x repeated on the 3 channels."""
    g = (x * _GREY.view(3, 1, 1).to(x.dtype)).sum(-3, keepdim=True)
    return g.expand_as(x).clone()


def color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, generator=None):
    """DINO's jitter strengths, on float [3, H, W] or a batch [n, 3, H, W] in [0, 1] (each image
    its own random factors), in this order:
        brightness  x -> b x
        contrast    x -> c (x - m) + m,          m = mean luma of the image
        saturation  x -> s (x - g) + g,          g = luma of each pixel (w . x)
        hue         rotate the chroma plane (I, Q) of YIQ by an angle of up to +-hue turns
    with b, c, s ~ U(1 - strength, 1 + strength). Each step is affine and keeps grey pixels grey
    (w sums to 1; a hue rotation leaves Y alone), so the four fold into ONE affine map
        x -> c b R_hue S_sat x + (1 - c) b m,        S_sat = s I + (1 - s) 1 w^T,
    applied with one batched 3x3 matmul and one clamp to [0, 1] at the end (torchvision clamps
    after every step; the difference only shows on pixels pushed past 0 or 1)."""
    single = x.ndim == 3
    x = x[None] if single else x                                              # [n, 3, H, W]
    n = x.shape[0]
    # the n 3x3 matrices are tiny: build them in numpy (far less per-call overhead than torch)
    u = (torch.rand(n, 4, generator=generator) * 2 - 1).double().numpy()     # [n, 4] in [-1, 1)
    b, c, s = 1 + brightness * u[:, 0], 1 + contrast * u[:, 1], 1 + saturation * u[:, 2]
    angle = hue * u[:, 3] * 2 * math.pi
    rot = np.zeros((n, 3, 3))
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = np.cos(angle), -np.sin(angle)
    rot[:, 2, 1], rot[:, 2, 2] = np.sin(angle), np.cos(angle)
    w = _GREY_NP[None, None, :]                                               # [1, 1, 3]
    sat = s[:, None, None] * np.eye(3) + (1 - s)[:, None, None] * w           # s I + (1 - s) 1 w^T
    A = (c * b)[:, None, None] * (_YIQ2RGB_NP @ rot @ _RGB2YIQ_NP @ sat)      # [n, 3, 3]
    flat = x.reshape(n, 3, -1)                                                # [n, 3, HW]
    m = torch.from_numpy(b).to(x.dtype) * (_GREY.to(x.dtype) @ flat).mean(-1)   # [n] mean luma after brightness
    shift = (torch.from_numpy(1 - c).to(x.dtype) * m).view(n, 1, 1)
    y = torch.baddbmm(shift, torch.from_numpy(A).to(x.dtype), flat)           # A @ x + (1 - c) b m
    y = y.view_as(x).clamp(0, 1)
    return y[0] if single else y


class MultiCrop:
    """Image -> global and local views (DINO / SILC multi-crop); see the module docstring.

    __call__(sample) -> dict(
        image        = float [3, S, S], the first global crop, normalised (the text-paired view),
        caption      = the caption, with left/right swapped if the global views were flipped,
        mask         = int64 [S, S] through the first global crop's geometry (if the sample has one),
        label        = passed through,
        global_crops = n_global x [3, S, S]  } only when n_global + n_local > 1
        local_crops  = n_local  x [3, s, s]  }
        global_boxes / local_boxes = [(top, left, h, w, flipped)] per crop, in source pixels,
        local_colour = [bool] per local crop: colour augmentation applied)
    Randomness comes from `generator` or torch's global generator (train.py seeds it per sample).
    """

    def __init__(self, image_size: int = 64, patch_size: int = 4, n_global: int = 2, n_local: int = 8,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), local_size: int | None = None,
                 ratio=(3 / 4, 4 / 3), flip: bool = True, local_colour: bool = True,
                 colour_prob: float = 0.8, grayscale_prob: float = 0.2, keep_objects: bool = True):
        if n_global < 1:
            raise ValueError(f"n_global must be >= 1 (the text-paired view), got {n_global}")
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.n_global, self.n_local = image_size, n_global, n_local
        self.local_size = local_size or local_crop_size(image_size, patch_size)
        if self.local_size % patch_size != 0:
            raise ValueError(f"local_size {self.local_size} is not a multiple of patch_size {patch_size}")
        self.global_scale, self.local_scale, self.ratio = tuple(global_scale), tuple(local_scale), ratio
        self.flip, self.local_colour = flip, local_colour
        self.colour_prob, self.grayscale_prob = colour_prob, grayscale_prob
        self.keep_objects = keep_objects

    def __call__(self, sample: dict, generator=None) -> dict:
        img = sample["image"]
        img = img.float() / 255.0 if img.dtype == torch.uint8 else img   # [3, H, W] in [0, 1]
        H, W = img.shape[-2:]
        keep = None
        if self.keep_objects and sample.get("boxes") is not None and len(sample["boxes"]) > 0:
            b = sample["boxes"].float()                                  # [n, 4]: keep the central half
            cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
            hw, hh = (b[:, 2] - b[:, 0]) / 4, (b[:, 3] - b[:, 1]) / 4
            keep = torch.stack([cx - hw, cy - hh, cx + hw, cy + hh], dim=1)
        out = {k: v for k, v in sample.items() if k not in ("image", "mask", "boxes")}

        # Global views: one flip coin for all of them, so one caption is true for every view.
        flip_global = self.flip and bool(torch.rand(1, generator=generator) < 0.5)
        if flip_global:
            out["caption"] = swap_left_right(sample["caption"])
        g_boxes = [(*sample_crop_box(H, W, self.global_scale, self.ratio, generator, keep), flip_global)
                   for _ in range(self.n_global)]
        # Normalisation is a per-channel affine map and bilinear weights are >= 0 and sum to 1, so
        # normalise-then-crop == crop-then-normalise: the global views crop the normalised image.
        src = normalize(shrink_short_side(img, 2 * self.image_size))
        globals_ = crop_and_resize(src, g_boxes, H, W, self.image_size)  # [G, 3, S, S]
        if sample.get("mask") is not None:                              # same geometry as view 0
            m = resized_crop(sample["mask"], g_boxes[0][:4], self.image_size)   # [S, S]
            out["mask"] = hflip(m) if flip_global else m

        # Local views: own flips, plus colour augmentation (never paired with text).
        l_boxes = [(*sample_crop_box(H, W, self.local_scale, self.ratio, generator),
                    self.flip and bool(torch.rand(1, generator=generator) < 0.5)) for _ in range(self.n_local)]
        locals_, l_colour = [], []
        if self.n_local > 0:
            max_short = math.ceil(2 * self.local_size / math.sqrt(self.local_scale[1]))
            views = crop_and_resize(shrink_short_side(img, max_short), l_boxes, H, W, self.local_size)
            # [n, 3, s, s] in [0, 1]; random numbers drawn for all crops, used where chosen
            u = torch.rand(self.n_local, 2, generator=generator)        # [n, 2]
            jitter = (u[:, 0] < self.colour_prob) & self.local_colour   # [n] bool
            grey = (u[:, 1] < self.grayscale_prob) & self.local_colour
            if jitter.any():
                views = torch.where(jitter.view(-1, 1, 1, 1), color_jitter(views, generator=generator), views)
            if grey.any():
                views = torch.where(grey.view(-1, 1, 1, 1), grayscale(views), views)
            locals_ = list(normalize(views).unbind(0))
            l_colour = (jitter | grey).tolist()

        globals_ = list(globals_.unbind(0))
        out["image"] = globals_[0]
        out["global_boxes"], out["local_boxes"], out["local_colour"] = g_boxes, l_boxes, l_colour
        if self.n_global + self.n_local > 1:
            out["global_crops"], out["local_crops"] = globals_, locals_
        return out


class EvalTransform:
    """Evaluation view: resize the short side to image_size (bilinear, antialiased), centre-crop a
    square, normalise. The mask (if any) goes through the same geometry with nearest sampling."""

    def __init__(self, image_size: int = 64):
        self.image_size = image_size

    def __call__(self, sample: dict) -> dict:
        img = sample["image"]
        img = img.float() / 255.0 if img.dtype == torch.uint8 else img
        H, W = img.shape[-2:]
        S = self.image_size
        out = {k: v for k, v in sample.items() if k not in ("image", "mask", "boxes")}
        # the centred square of side min(H, W), resized to S: same as resize-short-side + centre crop
        side = min(H, W)
        box = ((H - side) // 2, (W - side) // 2, side, side)
        out["image"] = normalize(resized_crop(img, box, S).clamp(0, 1))
        if sample.get("mask") is not None:
            out["mask"] = resized_crop(sample["mask"], box, S)
        return out


# ------------------------------------------------------------------------------------------------
# 4. Batching
# ------------------------------------------------------------------------------------------------
def collate(samples: list, tokenizer=None) -> dict | None:
    """Samples -> batch dict. None samples (skipped) are dropped; an all-None batch gives None.

    images [B, 3, S, S] float (global view 0, or the plain image normalised if it is still uint8),
    tokens [B, L] long, captions list[str], masks [B, H, W] (when every sample has one),
    labels [B] (when every sample has one), global_crops [G, B, 3, S, S] and local_crops
    [n, B, 3, s, s] (when multi-crop is on: grouped by resolution, one encoder forward each).
    """
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    tokenizer = tokenizer or ByteTokenizer()
    batch = {}
    if "global_crops" in samples[0]:
        G = len(samples[0]["global_crops"])
        batch["global_crops"] = torch.stack([torch.stack([s["global_crops"][g] for s in samples])
                                             for g in range(G)])        # [G, B, 3, S, S]
        batch["images"] = batch["global_crops"][0]                      # view 0 is the text-paired one
        n = len(samples[0]["local_crops"])
        if n > 0:
            batch["local_crops"] = torch.stack([torch.stack([s["local_crops"][i] for s in samples])
                                                for i in range(n)])     # [n, B, 3, s, s]
    else:
        images = [normalize(s["image"]) if s["image"].dtype == torch.uint8 else s["image"] for s in samples]
        sizes = {tuple(x.shape) for x in images}
        if len(sizes) > 1:
            raise ValueError(f"images of different sizes in one batch {sorted(sizes)}: give the dataset a "
                             f"transform (MultiCrop or EvalTransform) that outputs one size")
        batch["images"] = torch.stack(images)                           # [B, 3, S, S]
    batch["captions"] = [s["caption"] for s in samples]
    batch["tokens"] = tokenizer(batch["captions"])                      # [B, L]
    if all(s.get("mask") is not None for s in samples):
        batch["masks"] = torch.stack([s["mask"] for s in samples])      # [B, H, W]
    if all("label" in s for s in samples):
        batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)  # [B]
    # Skips are counted in the process that reads the data (a DataLoader worker, or the main
    # process: id -1); the batch carries that process's running count to the training loop's log.
    info = torch.utils.data.get_worker_info()
    batch["skipped"] = (info.id if info is not None else -1, sum(SKIPPED.values()))
    return batch


# ------------------------------------------------------------------------------------------------
# 5. One entry point per use
# ------------------------------------------------------------------------------------------------
def build_dataset(name_or_path: str, split: str = "train", transform=None, image_size: int = 64,
                  length: int | None = None, seed: int = 0, n: float = 0, csv_img_key: str = "filepath",
                  csv_caption_key: str = "title", csv_sep: str | None = None, repeat: bool = False,
                  colour_prob: float = 0.2):
    """"shapes" -> ShapesDataset(split); a .csv/.tsv path -> CsvDataset; a folder of .tar shards, a
    .tar file or a brace pattern -> TarShardDataset (shuffled and, with repeat=True, endless).
    `split` only applies to shapes (real data: pass a different path). n > 0 -> subset(dataset, n)."""
    if name_or_path == "shapes":
        ds = ShapesDataset(split, size=image_size, length=length, seed=seed, transform=transform,
                           colour_prob=colour_prob)
    elif name_or_path.lower().endswith((".csv", ".tsv")):
        ds = CsvDataset(name_or_path, transform, csv_img_key, csv_caption_key, csv_sep)
    else:
        if not (os.path.exists(name_or_path) or "{" in name_or_path):
            raise FileNotFoundError(f"data {name_or_path!r} is not 'shapes', a .csv/.tsv file, a folder of "
                                    f".tar shards, a .tar file or a {{a..b}} shard pattern that exists")
        ds = TarShardDataset(name_or_path, transform, shuffle=split == "train", shuffle_buffer=1000 * (split == "train"),
                             seed=seed, repeat=repeat)
    return subset(ds, n) if n else ds


def build_train_data(cfg, patch_size: int, tokenizer):
    """train.py's data: (dataset, collate_fn) from its Config.

    The crops depend on the model (patch size -> local crop size) and the batches on the tokenizer,
    so train.py builds those first. Views: SILC methods get 2 global + n local crops (scale 0.4-1 /
    0.05-0.4); the others one text-paired view, a random resized crop of scale 0.9-1.0 (open_clip's
    training crop), with the shared flip + caption swap."""
    if "silc" in cfg.method:
        transform = MultiCrop(cfg.image_size, patch_size, n_global=2, n_local=cfg.n_local_crops)
    else:
        transform = MultiCrop(cfg.image_size, patch_size, n_global=1, n_local=0, global_scale=(0.9, 1.0))
    sep = None if cfg.csv_separator == "auto" else cfg.csv_separator
    dataset = build_dataset(cfg.data, "train", transform, cfg.image_size, seed=cfg.seed, n=cfg.subset,
                            csv_img_key=cfg.csv_img_key, csv_caption_key=cfg.csv_caption_key,
                            csv_sep=sep, repeat=True, colour_prob=cfg.shapes_colour_prob)
    return dataset, functools.partial(collate, tokenizer=tokenizer)


if __name__ == "__main__":
    # python data.py: a few shapes captions and the generation speed (one process).
    import time
    torch.set_num_threads(1)          # as in a DataLoader worker; tiny tensors gain nothing from threads
    ds = ShapesDataset("train", cache=False)
    for i in range(8):
        print(f"{i}: {ds[i]['caption']!r}")
    t = time.perf_counter()
    n = 2000
    for i in range(n):
        ds[i]
    dt = time.perf_counter() - t
    print(f"ShapesDataset: {n / dt:.0f} samples/s ({1000 * dt / n:.2f} ms per 64x64 sample)")
    mc = MultiCrop(64, 4)
    t = time.perf_counter()
    for i in range(500):
        mc(ds[i])
    print(f"+ MultiCrop(2 global, 8 local): {500 / (time.perf_counter() - t):.0f} samples/s")
