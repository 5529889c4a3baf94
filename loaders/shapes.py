"""The shapes world: a procedural image-caption dataset with segmentation masks, made on the fly.

It is this repository's embedded data (no download): `python train.py` trains on it, and every
zero-shot measurement of the README is taken on its val split. Every sample is a pure function of
(seed, split, index), so any process can make any sample and the splits are disjoint by
construction. It was designed for LEARNABILITY and against shortcuts: 8 shapes that stay distinct
under rotation, crop and flip, saturated object colours on desaturated backgrounds, and captions
that always name every object's shape (see ShapesDataset). Its samples have the same form as the
csv and tar readers' (loaders/imagetext.py): {"image": uint8 [3, H, W], "caption": str, ...}, plus
the mask and object boxes that only a made-up world can know.

Why it is not in data.py: data.py teaches the path from a sample to a batch (tokens, crops,
collate), which is the same for this world and for real photos. The polygon maths that draws a star
is not one of the ideas a student comes to learn, so it lives here, beside the other data sources.

Also here: SHAPES_TEMPLATES, the zero-shot prompts for the shape names; ShapesSegmentation, the
same world seen as a segmentation benchmark (background = label 0); and write_shapes_files, the
world written to disk as real data comes (csv, a tar shard, class folders), so that the real-data
path of train.py, eval_seg.py and the probes can be tried with no download.
"""

import csv
import io
import os
import re
import tarfile

import numpy as np
import torch
from PIL import Image

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
BACKGROUND_NAMES = ["plain", "gradient", "noisy", "striped", "patchwork"]   # the last: backdrop="patchwork"

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


# Every word a caption or a zero-shot prompt of this world can hold: the vocabulary of the word-level
# tokenizer (data.WordTokenizer). The templates' words, the objects' (names, plurals, colours, counts,
# sizes), the relations' and the backgrounds', and the two punctuation marks.
GRAMMAR_WORDS = ["a", "an", "and", "are", "large", "small", "to", "the", "left", "right", "of", "above",
                 "below", "on", "background", ",", "."]
SHAPES_VOCABULARY = sorted(set(GRAMMAR_WORDS + SHAPE_NAMES + [_plural(n) for n in SHAPE_NAMES] + COLOUR_NAMES
                               + BACKGROUND_NAMES + list(_NUMBER_WORDS.values())
                               + [w for t in CAPTION_TEMPLATES + SHAPES_TEMPLATES for w in re.findall(r"[a-z]+", t)]))


def world_from_config(config: dict) -> dict:
    """ShapesDataset's options from a train.py config (a dict, as checkpoints store it): the world a
    model was trained in, so that it is evaluated in the same one."""
    scale = config.get("shapes_object_scale", 1.0)
    two = config.get("shapes_two_objects", 0.5)
    return dict(colour_prob=config.get("shapes_colour_prob", 0.2), backdrop=config.get("shapes_backdrop", "uniform"),
                radius=(11.0 * scale, 20.0 * scale), templates=config.get("shapes_templates", True),
                n_objects_p=(1.0 - two, two, 0.0))


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

    Design, against the shortcuts that made earlier prototypes match captions by colour and
    background alone (the measurements that chose it: docs/experiments.md, "The shapes world"):
      * 8 shapes that stay distinct under rotation, crop and flip; 8 saturated colours; objects of
        radius 11-20 px at 64 px (scaled with `size`), i.e. 3-5 patches of 8 px wide.
      * 1 or 2 objects by default (`n_objects_p` = P(1, 2, 3 objects) = (0.5, 0.5, 0); 3 objects
        are available), so half the images hold several objects that one global embedding cannot
        localise. The same shape or colour may repeat; centres stay 0.8 * (r1 + r2) apart and the
        largest is painted first, so occlusion happens but every object stays mostly visible; all
        lie fully inside the image.
      * Backgrounds: plain, gradient, noise, stripes, always desaturated.
      * Captions: every object's SHAPE is always named; colours in `colour_prob` (default 0.2) of
        captions (named more often, a tiny CLIP matches captions by colour and never learns
        shapes). Order random; sometimes count words ("two squares"), relative size words ("a
        large star and a small circle"), a relation ("a heart to the left of a ring") or the
        background. Relative words (not "on the left" / "small") stay true under crops that keep
        every object, and "left"/"right" are swapped by the flip (see data.MultiCrop). 9 templates
        x colour x order x count: 3635 distinct captions in 4096 samples; in a batch of 128, an
        image has on average about one OTHER caption that is also true of it (mostly "a circle").
    """

    def __init__(self, split: str = "train", size: int = 64, length: int | None = None, seed: int = 0,
                 transform=None, cache: bool | None = None, max_caption_bytes: int = 62,
                 colour_prob: float = 0.2, radius: tuple[float, float] = (11.0, 20.0),
                 n_objects_p: tuple[float, float, float] = (0.5, 0.5, 0.0), backdrop: str = "uniform",
                 templates: bool = True):
        if split not in _SPLIT_CODE:
            raise ValueError(f"unknown shapes split {split!r}; choose one of {list(_SPLIT_CODE)}")
        if size < 32:
            raise ValueError(f"shapes images must be at least 32 px, got size={size}")
        if backdrop not in ("uniform", "patchwork"):
            raise ValueError(f"backdrop must be 'uniform' or 'patchwork', got {backdrop!r}")
        self.backdrop, self.templates = backdrop, templates     # templates=False: captions are the objects alone
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
        """(kind index, uint8 [H, W, 3]). backdrop "uniform": one of plain / gradient / noisy / striped with one
        pair of tints, so every crop of an image shares its background's tint and texture: a local
        crop can be matched to its own image by those alone (experiments/shortcut.py measures it).
        "patchwork": 6-12 Voronoi cells, each its own uniform background, so a crop's background says
        little about which image it came from."""
        if self.backdrop == "uniform":
            return self._draw_uniform(rng)
        S, n = self.size, int(rng.integers(6, 13))
        seeds = rng.uniform(0, S, size=(n, 2))                                          # [n, (x, y)]
        cell = np.argmin((self._xx[..., None] - seeds[:, 0]) ** 2 + (self._yy[..., None] - seeds[:, 1]) ** 2, -1)
        # per cell: two desaturated tints, a texture (0 plain, 1 noise, 2 stripes) and its direction
        c1 = rng.uniform(35, 220, size=(n, 1)) + rng.uniform(-25, 25, size=(n, 3))      # [n, 3]
        c2 = np.clip(c1 + rng.choice([-1, 1], size=(n, 1)) * rng.uniform(30, 60, size=(n, 1)), 0, 255)
        kind, angle = rng.integers(3, size=n), rng.uniform(0, np.pi, size=n)
        period, amp = rng.uniform(6, 14, size=n) * S / 64, rng.uniform(6, 20, size=n)
        t = self._xx * np.cos(angle[cell]) + self._yy * np.sin(angle[cell])              # [H, W]
        stripe = (kind[cell] == 2) & (np.mod(t / period[cell], 1.0) < 0.5)               # [H, W]
        img = np.where(stripe[..., None], c2[cell], c1[cell])                             # [H, W, 3]
        noise = rng.standard_normal((S, S, 3)) * (amp[cell] * (kind[cell] == 1))[..., None]
        return BACKGROUND_NAMES.index("patchwork"), np.clip(np.rint(img + noise), 0, 255).astype(np.uint8)

    def _draw_uniform(self, rng):
        kind = int(rng.integers(4))
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
        template = template if self.templates else "{}"
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


# The background's names for its text prompts: the words the shapes captions use for it.
SHAPES_BACKGROUND_NAMES = ("background",) + tuple(f"{kind} background" for kind in BACKGROUND_NAMES)


class ShapesSegmentation(torch.utils.data.Dataset):
    """The shapes world seen as a segmentation benchmark, in the field's two conventions:
      background="ignore" ("shapes8", the headline, as VOC-20 / PC-59 / ADE-150): background pixels
          are ignored (label 255) and every pixel is classified among the 8 shapes (labels 0-7);
      background="class" ("shapes9", as VOC-21): label 0 is the background class, k = shape k - 1,
          predicted through its own prompts (or a probability threshold).
    Items: {"image": uint8 [3, H, W], "mask": long [H, W], "name"}; class_names: one synonym list per
    label; background_index: 0 or None."""

    def __init__(self, split="val", size=64, seed=0, length=None, background="ignore",
                 background_names=SHAPES_BACKGROUND_NAMES, **world):
        if background not in ("ignore", "class"):
            raise ValueError(f"background must be 'ignore' or 'class', got {background!r}")
        kwargs = {} if length is None else {"length": length}
        self.shapes = ShapesDataset(split=split, size=size, seed=seed, **kwargs, **world)
        self.ignore = background == "ignore"
        self.name = f"shapes{8 if self.ignore else 9}-{split}"
        shapes = [[n] for n in self.shapes.class_names]
        self.class_names = shapes if self.ignore else [list(background_names)] + shapes
        self.background_index = None if self.ignore else 0

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        item = self.shapes[i]
        mask = item["mask"].long()                                     # 0 background, k = shape k - 1
        if self.ignore:
            mask = torch.where(mask == 0, 255, mask - 1)
        return {"image": item["image"], "mask": mask, "name": f"{i:05d}"}


# ------------------------------------------------------------------------------------------------
# The shapes world written to disk in the real-data layouts, to try the real-data path (csv, tar shards,
# class folders) with no download: python -m loaders.shapes OUT_DIR
# ------------------------------------------------------------------------------------------------
def write_shapes_files(out_dir, n_train=512, n_val=64, n_class=16, size=64, bad_samples=False, seed=0):
    """Write the shapes world as real data would come:
      train.csv + train/      n_train pairs of the train split (open_clip's csv: filepath,title)
      val.csv + val/          n_val pairs of the val split (a held-out set for --val_data)
      val_tar/000000.tar      the same val pairs as a webdataset shard (key.png + key.txt)
      classes/train/<shape>/, classes/val/<shape>/   n_class single-object images per shape (the
                              tune_single and val_single splits), the class-folder layout
      classes/names.txt       the class names, one per folder in sorted order
    bad_samples=True adds what the readers must skip and count: an unreadable image and an empty
    caption in val.csv and in the shard, and an unreadable image in classes/val/circle/.
    Returns {name: path} of what it wrote."""
    def png(sample):
        buf = io.BytesIO()
        Image.fromarray(sample["image"].permute(1, 2, 0).numpy()).save(buf, format="PNG")
        return buf.getvalue()

    def write(path, payload):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(payload)

    paths = {}
    for split, n in (("train", n_train), ("val", n_val)):
        data = ShapesDataset(split, size=size, length=n, seed=seed, cache=False)
        rows = []
        for i in range(n):
            s = data[i]
            write(os.path.join(out_dir, split, f"{i:06d}.png"), png(s))
            rows.append((f"{split}/{i:06d}.png", s["caption"]))
        if bad_samples and split == "val":
            write(os.path.join(out_dir, split, "corrupt.png"), b"not an image")
            rows += [(f"{split}/corrupt.png", "a corrupt image"), (f"{split}/{0:06d}.png", "")]
        paths[f"{split}_csv"] = os.path.join(out_dir, f"{split}.csv")
        with open(paths[f"{split}_csv"], "w", newline="") as f:
            csv.writer(f).writerows([("filepath", "title"), *rows])
        if split == "val":                                      # the same pairs as one tar shard
            paths["val_tar"] = os.path.join(out_dir, "val_tar", "000000.tar")
            os.makedirs(os.path.dirname(paths["val_tar"]), exist_ok=True)
            with tarfile.open(paths["val_tar"], "w") as tar:
                for j, (image, caption) in enumerate(rows):
                    with open(os.path.join(out_dir, image), "rb") as f:
                        members = {"png": f.read(), "txt": caption.encode("utf-8")}
                    for ext, payload in members.items():
                        info = tarfile.TarInfo(f"{j:06d}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
    for split, source in (("train", "tune_single"), ("val", "val_single")):
        data = ShapesDataset(source, size=size, length=n_class * len(SHAPE_NAMES), seed=seed, cache=False)
        for i in range(len(data)):
            s = data[i]
            write(os.path.join(out_dir, "classes", split, SHAPE_NAMES[s["label"]], f"{i:06d}.png"), png(s))
        paths[f"classes_{split}"] = os.path.join(out_dir, "classes", split)
    if bad_samples:
        write(os.path.join(out_dir, "classes", "val", SHAPE_NAMES[0], "corrupt.png"), b"not an image")
    paths["classnames"] = os.path.join(out_dir, "classes", "names.txt")
    with open(paths["classnames"], "w") as f:
        f.write("\n".join(sorted(SHAPE_NAMES)) + "\n")
    return paths


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Write the shapes world in the real-data layouts (csv, tar shard, "
                                             "class folders): write_shapes_files.")
    ap.add_argument("out_dir")
    ap.add_argument("--n_train", type=int, default=512)
    ap.add_argument("--n_val", type=int, default=64)
    ap.add_argument("--n_class", type=int, default=16, help="images per shape in each class-folder split")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--bad_samples", action="store_true", help="add corrupt images and empty captions")
    args = ap.parse_args()
    for name, path in write_shapes_files(args.out_dir, args.n_train, args.n_val, args.n_class, args.size,
                                         args.bad_samples).items():
        print(f"{name:14s} {path}")
