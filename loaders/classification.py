"""Image classification data on disk: the class-folder layout of ImageNet's val tree.

    root/<class folder>/<image>.jpg|jpeg|png|webp|bmp      (any case: ImageNet's files end in .JPEG)

One folder per class; class index = the folder's position in sorted order (torchvision's
ImageFolder rule, which ImageNet's wnid folders n01440764 ... follow, and so open_clip's
--imagenet-val). The class NAMES that the zero-shot classifier writes into its templates come from
a text file, one class per line in that same sorted order, synonyms separated by commas (the format
of loaders/classnames/, read by loaders.segmentation.read_class_names); without one, from the folder
names, "_" read as a space ("golden_retriever" -> "golden retriever").

Used by eval_seg.py (zero-shot top-1 / top-5), train.py (--zeroshot_data, during training) and
experiments/linprobe.py (a train and a val folder). Bad input: a class folder with no image, or a
names file whose length differs from the number of folders, is a ValueError when the dataset is
built; a corrupt image is skipped and counted when it is read (data.skip), never a crash.
"""

import os

import torch

from data import load_image, skip
from loaders.segmentation import read_class_names

CLASS_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ClassFolderDataset(torch.utils.data.Dataset):
    """root/<class>/<image> -> dict(image=uint8 [3, H, W], label=int), through `transform` if given;
    None for an unreadable image (skipped and counted; data.collate drops it).

    class_names: [[name, synonym, ...], ...] per class in sorted-folder order (class_names_file gives
    them from a file); default: the folder names. .classes holds the folder names. max_per_class > 0:
    only the first that many images (sorted by name) of each class."""

    def __init__(self, root: str, class_names_file: str | None = None, transform=None, max_per_class: int = 0):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"class-folder dataset {root} not found (expected root/<class>/<image>.jpg)")
        self.root, self.transform = root, transform
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.classes:
            raise ValueError(f"{root} holds no class folders (expected root/<class>/<image>.jpg)")
        self.samples = []                                        # (path, label)
        for label, folder in enumerate(self.classes):
            files = sorted(f for f in os.listdir(os.path.join(root, folder)) if f.lower().endswith(CLASS_IMAGE_EXTS))
            if not files:
                raise ValueError(f"class folder {os.path.join(root, folder)} holds no images "
                                 f"({', '.join(CLASS_IMAGE_EXTS)}): every class needs at least one")
            files = files[:max_per_class] if max_per_class > 0 else files
            self.samples += [(os.path.join(root, folder, f), label) for f in files]
        if class_names_file:
            self.class_names = read_class_names(class_names_file)
            if len(self.class_names) != len(self.classes):
                raise ValueError(f"{class_names_file} names {len(self.class_names)} classes but {root} has "
                                 f"{len(self.classes)} class folders: one line per folder, in sorted folder order")
        else:
            self.class_names = [[folder.replace("_", " ")] for folder in self.classes]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            image = load_image(path)
        except Exception as e:            # truncated / corrupt file, not an image, decompression bomb...
            skip("unreadable image", path, e)
            return None
        sample = dict(image=image, label=label)
        return self.transform(sample) if self.transform is not None else sample
