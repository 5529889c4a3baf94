"""Segmentation benchmarks on disk: the standard layouts, their label conventions and class names.

Each reader returns a SegmentationDataset: items {"image": uint8 [3, H, W], "mask": long [H, W]
(255 = ignore), "name": str} and the attributes eval_seg.py needs: name, class_names (a list of
synonym lists, one per label id, from loaders/classnames/*.txt) and background_index (the
background class's id, or None when background pixels are ignored).

Layouts and conventions follow mmsegmentation's preparation guide (see LAYOUTS, shown in the error
when a folder does not match):
  * Pascal VOC 2012 and Pascal Context: palette PNGs read as their palette INDICES (never converted to
    RGB); without the background class, mmsegmentation's reduce-zero-label: 0 -> 255 (ignored),
    every other class - 1 (VOC-20, PC-59: how the field states its headline numbers).
  * ADE20K: 0 = "other" -> ignored, 1..150 -> 0..149.
  * Cityscapes and COCO-Stuff 164k: the converters' *_labelTrainIds.png (0..18 / 0..170, 255 ignore).
  * a generic folder: images/, masks/ (same stem), classes.txt.
The shapes world's own segmentation view is loaders.shapes.ShapesSegmentation.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data import load_image
from loaders.shapes import ShapesSegmentation

IGNORE_INDEX = 255
CLASSNAMES_DIR = Path(__file__).resolve().parent / "classnames"
DATASETS = ("shapes8", "shapes9", "voc20", "voc21", "context59", "context60", "ade150", "cityscapes", "cocostuff171", "folder")


def read_class_names(path) -> list[list[str]]:
    """A class-name file: one class per line, synonyms separated by commas -> [[name, synonym, ...], ...]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file {path} not found (one class per line, synonyms "
                                f"separated by commas)")
    classes = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        names = [n.strip() for n in line.split(",") if n.strip()]
        if not names:
            raise ValueError(f"{path}, line {i + 1}: empty class name (every line must name one class)")
        classes.append(names)
    if not classes:
        raise ValueError(f"{path} holds no class names")
    return classes


def read_label_png(path):
    """A label PNG -> int64 array [H, W] of class indices.

    Palette PNGs (mode "P", e.g. VOC) are read as their palette INDICES, never converted to RGB;
    grayscale PNGs (mode "L"/"I") as their values. An RGB mask is a colour rendering, not labels.
    """
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"{path}: label image has mode {im.mode!r}; expected a palette ('P') or "
                             f"grayscale ('L') PNG of class indices (colour-rendered masks cannot be read)")
        return np.array(im).astype(np.int64)


def reduce_zero_label(label):
    """mmsegmentation's convention: 0 (background / "other") -> 255 (ignored), every other class - 1."""
    label = label.copy()
    label[label == 0] = IGNORE_INDEX
    label -= 1                                                         # 255 (old 0 and old void) -> 254
    label[label == IGNORE_INDEX - 1] = IGNORE_INDEX                    # ... -> 255 again: both ignored
    return label


class SegmentationDataset(torch.utils.data.Dataset):
    """A list of (image file, label file) pairs and the conventions to read them.

    Items: dict(image=uint8 [3, H, W], mask=long [H, W] (255 = ignore), name=str).
    Attributes used by evaluate_segmentation: name, class_names (list of synonym lists, one per
    label id), background_index (label id of the background class, or None).
    """

    def __init__(self, name, pairs, class_names, background_index=None, reduce_zero_label=False, hint=""):
        self.name, self.pairs, self.class_names = name, list(pairs), class_names
        self.background_index = background_index
        self.reduce_zero_label = reduce_zero_label
        self.hint = hint                                               # shown when a label is out of range

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        img_path, label_path = self.pairs[i]
        image = load_image(img_path)                                   # [3, H, W] uint8
        label = read_label_png(label_path)                             # [H, W] int64
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        if label.shape != tuple(image.shape[1:]):
            raise ValueError(f"{label_path}: label size {label.shape} differs from image size "
                             f"{tuple(image.shape[1:])} of {img_path}")
        bad = np.setdiff1d(np.unique(label), np.r_[np.arange(len(self.class_names)), IGNORE_INDEX])
        if len(bad):
            raise ValueError(f"{label_path}: label values {bad.tolist()[:10]} are not class ids "
                             f"0..{len(self.class_names) - 1} or {IGNORE_INDEX}. {self.hint}")
        return {"image": image, "mask": torch.from_numpy(label), "name": Path(img_path).stem}


LAYOUTS = {
    "voc": """VOCdevkit/                      (--root: VOCdevkit or VOCdevkit/VOC2012)
  VOC2012/
    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png     palette PNG: 0 background, 1-20 classes, 255 void
    ImageSets/Segmentation/val.txt one <id> per line""",
    "context": """VOCdevkit/                      (--root: VOCdevkit or VOCdevkit/VOC2010)
  VOC2010/
    JPEGImages/<id>.jpg
    SegmentationClassContext/<id>.png   0 background, 1-59 classes (mmsegmentation's
                                        tools/dataset_converters/pascal_context.py writes these)
    ImageSets/SegmentationContext/val.txt""",
    "ade": """ADEChallengeData2016/            (--root: it or its parent)
  images/validation/*.jpg
  annotations/validation/*.png     0 other (ignored), 1-150 classes""",
    "cityscapes": """cityscapes/                     (--root)
  leftImg8bit/val/<city>/<name>_leftImg8bit.png
  gtFine/val/<city>/<name>_gtFine_labelTrainIds.png   0-18, 255 ignore (made by cityscapesscripts'
                                                       createTrainIdLabelImgs)""",
    "cocostuff": """coco_stuff164k/                 (--root)
  images/val2017/<id>.jpg
  annotations/val2017/<id>_labelTrainIds.png   0-170, 255 ignore (made by mmsegmentation's
                                               tools/dataset_converters/coco_stuff164k.py)""",
    "folder": """<root>/
  images/<name>.jpg|.png
  masks/<name>.png                 palette or grayscale PNG of class ids, 255 = ignore
  classes.txt                      one class per line (synonyms separated by commas), line i = id i""",
}


def _layout_error(kind, root, problem):
    return FileNotFoundError(f"{problem}\n(looked under {root})\nExpected layout:\n{LAYOUTS[kind]}")


def _find_dir(root, candidates, marker, kind):
    """The first of root/<candidate> that contains `marker`; else a FileNotFoundError showing the layout."""
    root = Path(root)
    for cand in candidates:
        if (root / cand / marker).exists():
            return root / cand
    raise _layout_error(kind, root, f"{marker} not found")


def _pairs_from_list(base, list_file, img_dir, img_ext, label_dir, kind):
    """(image, label) pairs for the ids listed in list_file; missing files -> error."""
    if not (base / list_file).is_file():
        raise _layout_error(kind, base, f"split file {list_file} not found")
    ids = [s.strip() for s in (base / list_file).read_text().splitlines() if s.strip()]
    pairs = [(base / img_dir / f"{i}{img_ext}", base / label_dir / f"{i}.png") for i in ids]
    missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
    if missing or not pairs:
        raise _layout_error(kind, base, f"{len(missing)} listed files missing, e.g. {missing[:3]}"
                            if missing else f"{list_file} lists no images")
    return pairs


def _pairs_by_stem(img_files, label_for, kind, root):
    """Pair each image with label_for(image path); any missing label or no image -> error."""
    img_files = sorted(img_files)
    if not img_files:
        raise _layout_error(kind, root, "no images found")
    pairs = [(p, label_for(p)) for p in img_files]
    missing = [str(l) for _, l in pairs if not l.is_file()]
    if missing:
        raise _layout_error(kind, root, f"{len(missing)} label files missing, e.g. {missing[:3]}")
    return pairs


# The two Pascal benchmarks share their layout: an id list, JPEG images, palette PNG labels, class 0 =
# background (kept with a background class, reduced away without one).
PASCAL = {
    "voc": dict(folders=[".", "VOC2012", "VOCdevkit/VOC2012"], marker="JPEGImages",
                ids="ImageSets/Segmentation/val.txt", labels="SegmentationClass", names=("voc21", "voc20")),
    "context": dict(folders=[".", "VOC2010", "VOCdevkit/VOC2010"], marker="SegmentationClassContext",
                    ids="ImageSets/SegmentationContext/val.txt", labels="SegmentationClassContext",
                    names=("context60", "context59")),
}


def pascal_dataset(root, kind, with_background=False):
    """Pascal VOC 2012 val (kind "voc", 1449 images: voc21 / voc20) or Pascal Context val ("context",
    5105 images: context60 / context59). With background it is class 0; without, reduce-zero-label."""
    p = PASCAL[kind]
    base = _find_dir(root, p["folders"], p["marker"], kind)
    pairs = _pairs_from_list(base, p["ids"], "JPEGImages", ".jpg", p["labels"], kind)
    name = p["names"][0] if with_background else p["names"][1]
    return SegmentationDataset(name, pairs, read_class_names(CLASSNAMES_DIR / f"{name}.txt"),
                               background_index=0 if with_background else None,
                               reduce_zero_label=not with_background)


def ade_dataset(root):
    """ADE20K (SceneParsing) val, 2000 images: 0 = other -> ignored, 1..150 -> 0..149."""
    base = _find_dir(root, [".", "ADEChallengeData2016"], "images/validation", "ade")
    pairs = _pairs_by_stem((base / "images/validation").glob("*.jpg"),
                           lambda p: base / "annotations/validation" / f"{p.stem}.png", "ade", base)
    return SegmentationDataset("ade150", pairs, read_class_names(CLASSNAMES_DIR / "ade150.txt"),
                               reduce_zero_label=True)


def cityscapes_dataset(root):
    """Cityscapes val, 500 images, labelTrainIds (0-18, 255)."""
    base = _find_dir(root, [".", "cityscapes"], "leftImg8bit/val", "cityscapes")

    def label_for(p):
        stem = p.name[: -len("_leftImg8bit.png")]
        return base / "gtFine/val" / p.parent.name / f"{stem}_gtFine_labelTrainIds.png"

    pairs = _pairs_by_stem((base / "leftImg8bit/val").glob("*/*_leftImg8bit.png"), label_for,
                           "cityscapes", base)
    return SegmentationDataset("cityscapes", pairs, read_class_names(CLASSNAMES_DIR / "cityscapes19.txt"),
                               hint="Use the *_gtFine_labelTrainIds.png files, not labelIds.")


def cocostuff_dataset(root):
    """COCO-Stuff 164k val2017, 5000 images, labelTrainIds (0-170, 255)."""
    base = _find_dir(root, [".", "coco_stuff164k"], "images/val2017", "cocostuff")
    pairs = _pairs_by_stem((base / "images/val2017").glob("*.jpg"),
                           lambda p: base / "annotations/val2017" / f"{p.stem}_labelTrainIds.png",
                           "cocostuff", base)
    return SegmentationDataset("cocostuff171", pairs, read_class_names(CLASSNAMES_DIR / "cocostuff171.txt"),
                               hint="Use the *_labelTrainIds.png files from the mmseg converter.")


def folder_dataset(root, background_index="auto"):
    """A generic folder: images/, masks/ (same stem, .png), classes.txt. Labels are used as they are.

    background_index: "auto" = the class whose first name is "background" (if any); an int; or None.
    """
    root = Path(root)
    if not (root / "classes.txt").is_file() or not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise _layout_error("folder", root, "classes.txt, images/ or masks/ not found")
    class_names = read_class_names(root / "classes.txt")
    if background_index == "auto":
        firsts = [c[0].lower() for c in class_names]
        background_index = firsts.index("background") if "background" in firsts else None
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    pairs = _pairs_by_stem([p for p in (root / "images").iterdir() if p.suffix.lower() in exts],
                           lambda p: root / "masks" / f"{p.stem}.png", "folder", root)
    return SegmentationDataset(root.name or "folder", pairs, class_names, background_index=background_index)


# The zero-shot protocol per benchmark (SCLIP / ClearCLIP configs), read by eval_seg.py. short_side=0:
# keep the native size; crop=0: whole-image inference. prob_thresh: below it a pixel becomes
# background (0 = off); bg_prompts: the background class gets text prompts.
_REFERENCE = dict(short_side=336, crop=224, stride=112, logit_scale=40.0, templates="openai",
                  bg_prompts=False, prob_thresh=0.0)
PROTOCOL = {
    # Shapes images are tiny (64 px, the training size): whole image, native resolution. shapes8
    # ignores the background, as VOC-20 does; shapes9 keeps it as a class, predicted by its own prompts
    # (the captions name it, "... on a striped background", in 1 of 5 samples), as VOC-21 does.
    "shapes8": dict(short_side=0, crop=0, stride=0, logit_scale=40.0, templates="shapes",
                    bg_prompts=False, prob_thresh=0.0),
    "shapes9": dict(short_side=0, crop=0, stride=0, logit_scale=40.0, templates="shapes",
                    bg_prompts=True, prob_thresh=0.0),
    "voc20": _REFERENCE,
    "voc21": dict(_REFERENCE, bg_prompts=True, prob_thresh=0.1),   # SCLIP: background names + 0.1
    "context59": _REFERENCE,
    "context60": dict(_REFERENCE, bg_prompts=True, prob_thresh=0.1),
    "ade150": _REFERENCE,
    "cityscapes": dict(_REFERENCE, short_side=560),
    "cocostuff171": _REFERENCE,
    "folder": dict(_REFERENCE, bg_prompts=True),
}


def dataset_defaults(dataset):
    """The protocol of a dataset object (by its name; shapes8-* -> shapes8, unknown -> folder), a copy."""
    name = dataset.name.split("-")[0] if dataset.name.startswith("shapes") else dataset.name
    return dict(PROTOCOL.get(name, PROTOCOL["folder"]))


def load_dataset(name, root=None, **kwargs):
    """Dataset by name: shapes8 | shapes9 | voc20 | voc21 | context59 | context60 | ade150 | cityscapes |
    cocostuff171 | folder. kwargs go to the reader (e.g. shapes: split, size, seed, length)."""
    if name in ("shapes8", "shapes9"):
        return ShapesSegmentation(background="ignore" if name == "shapes8" else "class", **kwargs)
    if root is None:
        raise ValueError(f"dataset {name!r} needs --root (the dataset folder)")
    if not Path(root).exists():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    if name in ("voc20", "voc21"):
        return pascal_dataset(root, "voc", with_background=name == "voc21")
    if name in ("context59", "context60"):
        return pascal_dataset(root, "context", with_background=name == "context60")
    if name == "ade150":
        return ade_dataset(root)
    if name == "cityscapes":
        return cityscapes_dataset(root)
    if name == "cocostuff171":
        return cocostuff_dataset(root)
    if name == "folder":
        return folder_dataset(root, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
