"""Real image-text data: open_clip's csv/tsv files and webdataset-style .tar shards.

Both readers yield the sample form that data.py turns into batches, {"image": uint8 [3, H, W],
"caption": str, "frame": (H, W) as stored, ...}, like the shapes world (loaders/shapes.py). Given a
working_size (train.py gives the views' one), they decode every image straight to that square size,
with JPEG draft mode (data.decode_image): the crops are placed in the stored frame, so they need
nothing more, and a worker never holds a full-size photo it does not need.

* CsvDataset: one row per sample, an image-path column and a caption column (open_clip's
  --csv-img-key / --csv-caption-key). Map-style, so train.py's StepSampler orders it exactly.
* TarShardDataset: key.jpg|png|webp + key.txt members, as img2dataset writes them, streamed with the
  standard tarfile module and split over DDP ranks and DataLoader workers (each reads its own
  shards), with a shard shuffle per epoch and a sample shuffle buffer.

Bad input never crashes a run: an unreadable image, an empty caption or a truncated shard is
skipped and counted (data.skip), and a CsvDataset reads the next row instead, so batches keep their
size. A path that does not exist is a FileNotFoundError when the dataset is built.
`build_dataset` picks the reader from a name or path; `subset` keeps the first N samples;
`build_eval_dataset` reads a held-out set for evaluation (every pair once, nothing replaced).
"""

import copy
import functools
import csv
import io
import itertools
import math
import os
import random
import re
import tarfile
import warnings
from collections import Counter

import torch

from data import SKIPPED, collate, decode_image, skip, skip_count
from loaders.shapes import ShapesDataset


class CsvDataset(torch.utils.data.Dataset):
    """open_clip's csv format: one row per sample, an image-path column and a caption column.

    Relative image paths are resolved against the csv file's folder. A corrupt / missing image or
    an empty caption is skipped and counted, and the NEXT index is read instead (up to
    `max_retries` in a row), so batches keep their size (DDP's all-gather needs equal sizes).
    max_retries=0 (evaluation, where a replacement would count one pair twice): None instead.
    Returns dict(image=uint8 [3, H, W], frame=(H, W), caption=str), through `transform` if given;
    working_size > 0: image is uint8 [3, working_size, working_size] (data.decode_image), frame the
    stored size.
    """

    def __init__(self, path: str, transform=None, img_key: str = "filepath", caption_key: str = "title",
                 sep: str | None = None, max_retries: int = 20, working_size: int = 0):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"csv/tsv file not found: {path}")
        if sep in (None, "auto"):
            sep = "\t" if path.lower().endswith(".tsv") else ","
        self.transform, self.max_retries, self.working_size = transform, max_retries, working_size
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
            skip("empty caption", f"row {i} ({self.images[i]})")
            return None
        try:
            image, frame = decode_image(self.images[i], self.working_size)
        except Exception as e:          # missing file, truncated/corrupt data, decompression bomb...
            skip("unreadable image", self.images[i], e)
            return None
        return dict(image=image, frame=frame, caption=caption)

    def __getitem__(self, index):
        if self.max_retries == 0:            # evaluation: every row once; a bad one is None (collate drops it)
            sample = self.load(index)
            return self.transform(sample) if sample is not None and self.transform is not None else sample
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
    Yields dict(image=uint8 [3, H, W], frame=(H, W), caption=str, key=str), through `transform` if
    given; working_size > 0: image is uint8 [3, working_size, working_size] (data.decode_image).
    The shuffle buffer holds samples BEFORE they are decoded (the image file's bytes and the caption),
    so its memory is that of the files (about 100 kB a JPEG), not of decoded photos.
    """

    def __init__(self, shards, transform=None, rank: int | None = None, world_size: int | None = None,
                 shuffle: bool = False, shuffle_buffer: int = 0, seed: int = 0, repeat: bool = False,
                 max_samples: int | None = None, working_size: int = 0):
        self.shards = list_shards(shards)
        self.working_size = working_size
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
            skip("unreadable shard", path, e)
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
                    skip("truncated shard (rest of it)", path)
            except (tarfile.TarError, OSError, EOFError) as e:   # truncated / corrupt tar
                skip("corrupt shard (rest of it)", path, e)
            if group:
                yield tar, key, group

    def _read(self, tar, key, group, path):
        """One sample's files as they are stored: dict(key, where, data = the image file's bytes,
        caption), or None (counted) without an image, or with a missing or empty caption."""
        where = f"{path}:{key}"
        img_m = next((group[e] for e in IMAGE_EXTS if e in group), None)
        if img_m is None or "txt" not in group:
            skip("no image" if img_m is None else "no caption", where)
            return None
        try:
            caption = tar.extractfile(group["txt"]).read().decode("utf-8", errors="replace").strip()
            if not caption:
                skip("empty caption", where)
                return None
            data = tar.extractfile(img_m).read()
        except Exception as e:
            skip("unreadable image", where, e)
            return None
        return dict(key=key, where=where, data=data, caption=caption)

    def _decode(self, record):
        """A _read record -> the sample, or None (counted) if its image does not decode."""
        try:
            image, frame = decode_image(io.BytesIO(record["data"]), self.working_size)
        except Exception as e:
            skip("unreadable image", record["where"], e)
            return None
        return dict(image=image, frame=frame, caption=record["caption"], key=record["key"])

    def _one_pass(self, epoch, reader, n_readers):
        """This reader's records of one pass, undecoded."""
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(shards)   # same order on every rank
        if len(shards) >= n_readers:
            for path in shards[reader::n_readers]:
                for tar, key, group in self._members(path):
                    r = self._read(tar, key, group, path)
                    if r is not None:
                        yield r
        else:
            if reader == 0 and epoch == self.epoch:
                warnings.warn(f"loaders/imagetext.py: {len(shards)} shard(s) for {n_readers} readers (ranks x workers): "
                              f"splitting SAMPLES round-robin; every reader walks every shard", RuntimeWarning)
            j = 0
            for path in shards:
                for tar, key, group in self._members(path):
                    if j % n_readers == reader:
                        r = self._read(tar, key, group, path)
                        if r is not None:
                            yield r
                    j += 1

    def __iter__(self):
        rank, world = self._rank_world()
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, n_readers = rank * n_workers + worker, world * n_workers
        epoch = self.epoch
        while True:
            it = self._one_pass(epoch, reader, n_readers)
            if self.shuffle_buffer > 0:    # shuffled while still compressed: the buffer holds files, not photos
                it = _shuffled(it, self.shuffle_buffer, random.Random(self.seed * 7919 + epoch * 131 + reader))
            it = (s for s in map(self._decode, it) if s is not None)
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


def build_dataset(name_or_path: str, split: str = "train", transform=None, image_size: int = 64,
                  length: int | None = None, seed: int = 0, n: float = 0, csv_img_key: str = "filepath",
                  csv_caption_key: str = "title", csv_sep: str | None = None, repeat: bool = False,
                  world: dict | None = None, working_size: int = 0):
    """"shapes" -> ShapesDataset(split); a .csv/.tsv path -> CsvDataset; a folder of .tar shards, a
    .tar file or a brace pattern -> TarShardDataset (shuffled and, with repeat=True, endless).
    `split` and `world` (ShapesDataset's options) only apply to shapes, `working_size` (the square size
    photos are decoded to; 0 = as stored) to csv and tar. n > 0 -> subset(dataset, n)."""
    if name_or_path == "shapes":
        ds = ShapesDataset(split, size=image_size, length=length, seed=seed, transform=transform, **(world or {}))
    elif name_or_path.lower().endswith((".csv", ".tsv")):
        ds = CsvDataset(name_or_path, transform, csv_img_key, csv_caption_key, csv_sep, working_size=working_size)
    else:
        if not (os.path.exists(name_or_path) or "{" in name_or_path):
            raise FileNotFoundError(f"data {name_or_path!r} is not 'shapes', a .csv/.tsv file, a folder of "
                                    f".tar shards, a .tar file or a {{a..b}} shard pattern that exists")
        ds = TarShardDataset(name_or_path, transform, shuffle=split == "train", shuffle_buffer=1000 * (split == "train"),
                             seed=seed, repeat=repeat, working_size=working_size)
    return subset(ds, n) if n else ds


def build_eval_dataset(path: str, transform=None, csv_img_key: str = "filepath", csv_caption_key: str = "title",
                       csv_sep: str | None = None):
    """A held-out image-text set for evaluation (train.py --val_data, eval_seg.py --task retrieval): every
    pair once, in file order, none read twice. A .csv/.tsv -> CsvDataset that gives None for a bad row
    (counted; no replacement); tar shards -> TarShardDataset read whole by this process (no rank split:
    one process evaluates alone, so the numbers cannot depend on the world size), unshuffled, one pass."""
    if path == "shapes":
        raise ValueError("the shapes world has its own evaluation (train.py runs it on shapes data); "
                         "--val_data takes a .csv/.tsv file or .tar shards")
    if path.lower().endswith((".csv", ".tsv")):
        return CsvDataset(path, transform, csv_img_key, csv_caption_key, csv_sep, max_retries=0)
    if not (os.path.exists(path) or "{" in path):
        raise FileNotFoundError(f"val data {path!r} is not a .csv/.tsv file, a folder of .tar shards, a .tar "
                                f"file or a {{a..b}} shard pattern that exists")
    return TarShardDataset(path, transform, rank=0, world_size=1)


# ------------------------------------------------------------------------------------------------
# Evaluation order: every sample once, in order, and the count of what was skipped
# ------------------------------------------------------------------------------------------------
def _fresh_skip_count(worker_id):
    """DataLoader worker_init_fn: a forked worker inherits its parent's skip count; start it at 0."""
    SKIPPED.clear()


def _eval_collate(samples, tokenizer):
    """(the batch or None, its reader's skip count): the count arrives even when the whole batch was skipped."""
    return collate(samples, tokenizer), skip_count()


class _ThenNone(torch.utils.data.IterableDataset):
    """An iterable dataset followed by one None: the last batch is then collated after the stream has
    ended, so its skip count includes the samples skipped after the last good one."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        yield from self.dataset
        yield None


class EvalBatches:
    """Every sample of an evaluation set once, in its order, batch_size at a time (collate: unreadable
    samples come as None and are dropped), read by num_workers DataLoader workers. After a full pass,
    .skipped is the number of samples skipped in it, summed over the workers.
    A map-style dataset (csv, class folders) keeps its order and batches with any number of workers;
    an iterable one (tar shards) is read by at most ONE worker, since several would each make their own
    batches, and the batches (hence the val loss) would then depend on the worker count."""

    def __init__(self, dataset, batch_size: int, tokenizer=None, num_workers: int = 0):
        self.dataset, self.batch_size, self.tokenizer, self.num_workers = dataset, batch_size, tokenizer, num_workers
        self.skipped = 0

    def __iter__(self):
        iterable = isinstance(self.dataset, torch.utils.data.IterableDataset)
        workers = min(self.num_workers, 1) if iterable else self.num_workers
        loader = torch.utils.data.DataLoader(
            _ThenNone(self.dataset) if iterable else self.dataset, batch_size=self.batch_size, shuffle=False,
            num_workers=workers,
            collate_fn=functools.partial(_eval_collate, tokenizer=self.tokenizer),
            worker_init_fn=_fresh_skip_count)
        saved, counts = Counter(SKIPPED), {}                 # counts: reader id -> its running count
        try:
            for batch, (reader, count) in loader:
                counts[reader] = count
                if batch is not None:                         # (None: every sample of it was skipped)
                    batch.pop("skipped")
                    yield batch
        finally:                                              # read in this process: the training log's
            SKIPPED.clear()                                   # count stays the training data's own
            SKIPPED.update(saved)
        self.skipped = sum(c - (sum(saved.values()) if r == -1 else 0) for r, c in counts.items())
