"""data.py: the path from a sample to a batch: captions into token ids, images into (multi-)crops,
samples into batches, and the order in which the batches come.

A sample is a dict {"image": uint8 [3, H, W] RGB, "caption": str, ...}, whatever its source: the
embedded shapes world (loaders/shapes.py), open_clip's csv files or webdataset tar shards
(loaders/imagetext.py). This file is what happens next:

1. Text. A byte-level tokenizer: the UTF-8 bytes of the caption, shifted by 4 so that ids 0-3 are
   free for special tokens, between a start and an end token, padded to a fixed context length:

       "a red star"  ->  [SOT, 97+4, 32+4, 114+4, ..., 114+4, EOT, PAD, PAD, ...]     (L ids)

   PAD = 0, SOT = 1, EOT = 2, MASK = 3 (for masked language modelling, MaskCLIP), vocabulary 260.
   The text tower pools its output at the EOT token (CLIP, Radford et al. 2021), so a caption
   longer than L is cut and the EOT is put back as the last id: it must never be lost.
   (Public CLIP weights come with their BPE tokenizer, loaders/pretrained.py: same interface.)

2. Images: one decoder (any file to uint8 RGB; photos straight to a square working size, with
   JPEG draft mode, see decode_image) and one normaliser (CLIP's mean and std):
   x = (pixel / 255 - mean) / std. Bad input is skipped and counted (`skip`), never a crash.

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

   Where the pixels are cut: MultiCrop draws a sample's random numbers (boxes, flips, colour factors)
   in the DataLoader worker, from the sample's own seeded generator, and `MultiCrop.views` does the
   pixel work for a whole batch, one resampling call per resolution. It runs in the worker (a batch
   of one: the CPU default, where the workers are the parallelism), or in the training step on the
   GPU (train.py --crops=device), so that the workers only decode. Same code, same numbers: the
   same crops either way.

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

4. Batches. `collate` stacks the views by resolution and tokenizes the captions. Skips are counted
   per process (each DataLoader worker keeps its own); every batch carries its worker's count, and
   train.py logs the sum over workers and ranks as "skipped".

5. Order. Global step t reads positions [t*B, (t+1)*B) of an endless stream of per-epoch
   permutations of the dataset (`StepSampler`), and every sample seeds its own augmentation from
   (seed, epoch, index) (`SeededSample`). So a run is reproducible, resumable at any step, and the
   same on 1 or N processes.

6. Evaluation. No randomness: `CenterView` is the one evaluation view (the centred square, resized).
   (loaders/imagetext.EvalBatches reads every sample of an evaluation set once, in order.)
"""

import math
import random
import re
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


def pad_batch(rows: list[list[int]], context_length: int) -> torch.Tensor:
    """Token id lists -> LongTensor [B, context_length], right-padded with PAD_ID."""
    return torch.tensor([ids + [PAD_ID] * (context_length - len(ids)) for ids in rows],
                        dtype=torch.long).reshape(len(rows), context_length)


def _bounded(ids: list[int], context_length: int) -> list[int]:
    """SOT ids EOT, cut to context_length with the EOT (the pooling position) kept last."""
    ids = [SOT_ID] + ids + [EOT_ID]
    return ids if len(ids) <= context_length else ids[: context_length - 1] + [EOT_ID]


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
        self.pad_token_id, self.eot_token_id, self.mask_token_id = PAD_ID, EOT_ID, MASK_ID
        self.special_ids = (PAD_ID, SOT_ID, EOT_ID)              # never masked, never drawn as replacements

    def encode(self, text: str) -> list[int]:
        return _bounded([b + BYTE_OFFSET for b in text.encode("utf-8")], self.context_length)

    def __call__(self, texts) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        return pad_batch([self.encode(t) for t in texts], self.context_length)   # [B, L]

    def decode(self, ids) -> str:
        """Inverse of encode: stops at the first EOT, drops special ids. A multi-byte character cut
        by truncation decodes to U+FFFD rather than raising."""
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        ids = ids[:ids.index(EOT_ID)] if EOT_ID in ids else ids
        return bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET).decode("utf-8", errors="replace")

    def state(self) -> dict:
        """What a checkpoint needs to rebuild this tokenizer (loaders.pretrained.tokenizer_from_state)."""
        return {"kind": "byte", "context_length": self.context_length}


class WordTokenizer:
    """Whole words as tokens, for a closed vocabulary such as the shapes world's (loaders/shapes.py,
    about 70 words and "," "."). Each shape name is then ONE token, so the text tower does not first
    have to learn to spell "circle" from bytes before a caption can mean anything: a byte-level
    tiny CLIP sits for a seed-dependent 90-200 steps on its log-B plateau (docs/experiments.md).
    Ids: PAD 0, SOT 1, EOT 2, MASK 3, UNK 4 (any word outside the vocabulary), then the vocabulary.
    A word is a run of letters (lower-cased); "," and "." are tokens of their own. decode joins the
    words with spaces and re-attaches the punctuation, so every shapes caption round-trips exactly.
    Same interface as ByteTokenizer; real image-text data keeps the byte (or CLIP's BPE) tokenizer."""

    UNK_ID = 4

    def __init__(self, words, context_length: int = 32):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for SOT and EOT), got {context_length}")
        self.words = list(dict.fromkeys(words))                          # [V'], order kept, no repeats
        self.ids = {w: i + self.UNK_ID + 1 for i, w in enumerate(self.words)}
        self.context_length, self.vocab_size = context_length, self.UNK_ID + 1 + len(self.words)
        self.pad_token_id, self.eot_token_id, self.mask_token_id = PAD_ID, EOT_ID, MASK_ID
        self.special_ids = (PAD_ID, SOT_ID, EOT_ID, self.UNK_ID)

    def encode(self, text: str) -> list[int]:
        pieces = re.findall(r"[^\W\d_]+|[^\w\s]", text.lower())          # words, and punctuation marks
        return _bounded([self.ids.get(p, self.UNK_ID) for p in pieces], self.context_length)

    def __call__(self, texts) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        return pad_batch([self.encode(t) for t in texts], self.context_length)   # [B, L]

    def decode(self, ids) -> str:
        """Inverse of encode up to the first EOT: words joined by spaces, no space before "," or "."."""
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        ids = ids[:ids.index(EOT_ID)] if EOT_ID in ids else ids
        words = [self.words[i - self.UNK_ID - 1] if i > self.UNK_ID else "<unk>" for i in ids if i >= self.UNK_ID]
        return re.sub(r" ([,.])", r"\1", " ".join(words))

    def state(self) -> dict:
        return {"kind": "word", "context_length": self.context_length, "words": self.words}


# ------------------------------------------------------------------------------------------------
# 2. Images: one decoder, one normaliser, and the count of what was skipped
# ------------------------------------------------------------------------------------------------
def decode_image(source, working_size: int = 0, draft: bool = True):
    """A path or file object -> (uint8 [3, h, w] RGB tensor, (H, W) of the stored image). Palette, grey
    and alpha images all become RGB.

    working_size > 0: the image comes at working_size x working_size, whatever its aspect. Its crops
    are placed in the stored frame (H, W) and sampled in normalised coordinates (crop_and_resize), so a
    squeezed copy serves them as well as the photo would, provided it has the pixels they need:
    MultiCrop asks for twice its training size, so that no crop is shrunk by much more than 2x.
    Two things make it fast:
      * JPEG draft mode: libjpeg downscales in the DCT domain while decoding, by 1/2, 1/4 or 1/8, to the
        smallest size that still has >= working_size pixels on both sides. A 4000 x 3000 photo for a
        448-px working size decodes at 1000 x 750, 16x fewer pixels. (A photo under twice the working
        size on its short side decodes at full size: there is no smaller scale to use.)
      * then ONE antialiased resize to the working size, in uint8: torch's bilinear filter with
        antialiasing, as in shrink_short_side (it widens with the shrink factor, so every source pixel
        is averaged in, none skipped), which reads the decoded [h, w, 3] array in place.
    A worker's memory is bounded by the draft size (at most about 2x the working size per side for a
    JPEG): no float copy of the photo, and no second copy at its decoded size, is made.
    draft=False decodes in full before the resize (what experiments/loaderbench.py compares with)."""
    with Image.open(source) as im:
        frame = (im.height, im.width)
        if working_size > 0 and draft:
            im.draft("RGB", (working_size, working_size))   # JPEG only; other formats ignore it
        arr = np.array(im if im.mode == "RGB" else im.convert("RGB"))   # [h, w, 3] uint8 (a writable copy)
    x = torch.from_numpy(arr).permute(2, 0, 1)                         # [3, h, w], a view (channels-last)
    if working_size > 0 and tuple(x.shape[-2:]) != (working_size, working_size):
        x = F.interpolate(x[None], size=(working_size, working_size), mode="bilinear", antialias=True,
                          align_corners=False)[0]                      # uint8 [3, R, R]
    return x.contiguous(), frame


def load_image(source) -> torch.Tensor:
    """A path or file object -> uint8 [3, H, W] RGB tensor at its stored size."""
    return decode_image(source)[0]


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP's RGB mean and std
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (0-255) or float (0-1) [..., 3, H, W] -> float (x - mean) / std, on x's device."""
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    return (x - _MEAN.to(x.device, x.dtype)) / _STD.to(x.device, x.dtype)


SKIPPED = Counter()   # reason -> count, in this process


def skip(reason: str, what: str, error=None):
    """Count one skipped sample and print one warning line with the running count."""
    SKIPPED[reason] += 1
    detail = f": {type(error).__name__}: {error}" if error is not None else ""
    warnings.warn(f"skipped {what} ({reason}{detail}); {sum(SKIPPED.values())} samples "
                  f"skipped so far in this process", RuntimeWarning, stacklevel=3)

# ------------------------------------------------------------------------------------------------
# 3. Views: random resized crops, flips, colour (torch only; PIL only decodes files)
# ------------------------------------------------------------------------------------------------
def local_crop_size(image_size: int, patch_size: int) -> int:
    """DINO's 96 px local crops at 224 px, scaled to image_size and rounded to whole patches."""
    return max(patch_size, round(image_size * 96 / 224 / patch_size) * patch_size)


def sample_crop_box(height, width, scale, ratio=(3 / 4, 4 / 3), generator=None, keep=None, tries=10,
                    foreground=None, min_foreground=0.0):
    """A random-resized-crop box (top, left, h, w) with area fraction in `scale` and aspect w/h in
    `ratio` (log-uniform), as in Inception / torchvision. keep: float [n, 4] boxes (x0, y0, x1, y1)
    that the crop must contain. After `tries` failures: the whole image if `keep` was given (it
    contains everything), else the largest centred square within the scale range.
    foreground (bool [H, W]) with min_foreground > 0: each draw is placed around a random foreground
    pixel (anywhere inside the crop), and the crop must be at least that fraction foreground (after
    3 x `tries` draws: the most foreground one)."""
    placed = foreground is not None and min_foreground > 0
    r = torch.rand(3 * tries if placed else tries, 5 if placed else 4, generator=generator).tolist()  # fixed count
    fg_pixels = foreground.nonzero().tolist() if placed else []               # [(y, x)]
    best, best_fg = None, -1.0
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for u_area, u_ratio, u_top, u_left, *u_anchor in r:
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(lo + (hi - lo) * u_ratio)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if not (0 < w <= width and 0 < h <= height):
            continue
        top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
        if placed and fg_pixels:                   # the anchor pixel sits at (u_top, u_left) of the crop
            y, x = fg_pixels[int(u_anchor[0] * len(fg_pixels))]
            top = min(max(y - int(u_top * h), 0), height - h)
            left = min(max(x - int(u_left * w), 0), width - w)
        if keep is not None and len(keep) > 0:
            k = keep.tolist() if torch.is_tensor(keep) else keep
            if not all(left <= x0 and top <= y0 and left + w >= x1 and top + h >= y1 for x0, y0, x1, y1 in k):
                continue
        if not placed:
            return top, left, h, w
        fg = float(foreground[top:top + h, left:left + w].float().mean())
        if fg >= min_foreground:
            return top, left, h, w
        best, best_fg = ((top, left, h, w), fg) if fg > best_fg else (best, best_fg)
    if best is not None:
        return best
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
    """Antialiased downscale of img [3, H, W] or [B, 3, H, W] so that min(H, W) <= max_short (no-op if
    already). After it, crops are resampled by a factor of at most ~2, where plain bilinear sampling is
    still alias-free; so big photos are filtered once, not once per crop."""
    H, W = img.shape[-2:]
    if min(H, W) <= max_short:
        return img
    f = max_short / min(H, W)
    size = (max(1, round(H * f)), max(1, round(W * f)))
    x = img if img.ndim == 4 else img[None]
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x if img.ndim == 4 else x[0]


def crop_and_resize(img: torch.Tensor, boxes: torch.Tensor, frame: torch.Tensor, size: int) -> torch.Tensor:
    """All crops of a batch of images in ONE bilinear resampling call (F.grid_sample).

    img [B, 3, h, w]; boxes float [B, k, 5] = (top, left, height, width, flipped) in the pixel frame of
    image b, frame[b] = (H, W). img may be a resized copy of that frame (shrunk, or squeezed to a square
    working size): sampling positions are in normalised coordinates, so they do not depend on the
    copy's resolution. Output pixel j of a crop samples the continuous image at
    x = left + (j + 0.5) * width / size (pixel centres at k + 0.5), mirrored when flipped; positions are
    clamped to the image border. The k crops of image b are stacked along the output's height, so one
    call makes every crop without copying any image k times. Returns [B, k, 3, size, size]."""
    B, k = boxes.shape[:2]
    t = (torch.arange(size, dtype=torch.float32, device=boxes.device) + 0.5) / size      # [size] in (0, 1)
    top, left, h, w, flip = (c[..., None] for c in boxes.float().unbind(-1))            # each [B, k, 1]
    x = left + w * torch.where(flip > 0, 1 - t, t)                                      # [B, k, size] pixels
    y = top + h * t                                                                     # [B, k, size]
    H, W = (c.view(B, 1, 1) for c in frame.float().unbind(-1))
    gx, gy = 2 * x / W - 1, 2 * y / H - 1                                               # grid_sample's [-1, 1]
    grid = torch.stack(torch.broadcast_tensors(gx[:, :, None, :], gy[:, :, :, None]), -1)   # [B, k, size, size, 2]
    out = F.grid_sample(img, grid.reshape(B, k * size, size, 2).to(img.dtype), mode="bilinear",
                        padding_mode="border", align_corners=False)                     # [B, 3, k * size, size]
    return out.view(B, 3, k, size, size).transpose(1, 2)                                # [B, k, 3, size, size]


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
    g = (x * _GREY.view(3, 1, 1).to(x.device, x.dtype)).sum(-3, keepdim=True)
    return g.expand_as(x).clone()


def color_jitter_params(n, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, generator=None):
    """The random factors of n colour jitters, with DINO's strengths, folded into the affine map that
    color_jitter applies. The four steps, in this order:
        brightness  x -> b x
        contrast    x -> c (x - m) + m,          m = mean luma of the image
        saturation  x -> s (x - g) + g,          g = luma of each pixel (w . x)
        hue         rotate the chroma plane (I, Q) of YIQ by an angle of up to +-hue turns
    with b, c, s ~ U(1 - strength, 1 + strength). Each step is affine and keeps grey pixels grey
    (w sums to 1; a hue rotation leaves Y alone), so the four fold into ONE affine map
        x -> c b R_hue S_sat x + (1 - c) b m,        S_sat = s I + (1 - s) 1 w^T.
    -> (A = c b R_hue S_sat float [n, 3, 3], b float [n], 1 - c float [n]): a few numbers per crop,
    drawn where the sample's generator lives (a DataLoader worker) and applied wherever the pixels are."""
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
    return torch.from_numpy(A).float(), torch.from_numpy(b).float(), torch.from_numpy(1 - c).float()


def color_jitter(x: torch.Tensor, params) -> torch.Tensor:
    """Colour jitter of float [n, 3, H, W] in [0, 1], crop i with its own params[.][i]
    (color_jitter_params): one batched 3x3 matmul, then one clamp to [0, 1] at the end (torchvision
    clamps after every step; the difference only shows on pixels pushed past 0 or 1)."""
    A, b, one_minus_c = params                                                # [n, 3, 3], [n], [n]
    n = x.shape[0]
    flat = x.reshape(n, 3, -1)                                                # [n, 3, HW]
    m = b.to(x.dtype) * (_GREY.to(x.device, x.dtype) @ flat).mean(-1)         # [n] mean luma after brightness
    shift = (one_minus_c.to(x.dtype) * m).view(n, 1, 1)
    y = torch.baddbmm(shift, A.to(x.dtype), flat)                             # A @ x + (1 - c) b m
    return y.view_as(x).clamp(0, 1)


class MultiCrop:
    """Image -> global and local views (DINO / SILC multi-crop); see the module docstring.

    Two halves, so that the pixel work can run where it is cheapest (train.py's --crops):
      __call__(sample)       draws every random number of one sample (boxes, flips, colour factors),
                             from the sample's own seeded generator, in a DataLoader worker;
      views(pixels, params)  does the pixel work of a whole batch: one resampling call per resolution,
                             then colour jitter and grayscale of the local crops, on any device.
    on_device=False: __call__ also calls views() on its one sample (the workers make the crops).
    on_device=True: the workers only decode and draw; the training step calls views() on the
    accelerator. Both placements run the same code on the same numbers (tests/test_data.py).

    __call__(sample) -> dict(
        caption      = the caption, with left/right swapped if the global views were flipped,
        mask         = int64 [S, S] through the first global crop's geometry (if the sample has one),
        label        = passed through,
        global_boxes / local_boxes = [(top, left, h, w, flipped)] per crop, in the sample's frame
                       (its source pixels: sample["frame"], or the image's own size),
        local_colour = [bool] per local crop: colour augmentation applied,
      and, on_device=False:
        image        = float [3, S, S], the first global crop, normalised (the text-paired view),
        global_crops = n_global x [3, S, S]  } only when n_global + n_local > 1
        local_crops  = n_local  x [3, s, s]  }
      or, on_device=True:
        pixels       = the sample's uint8 image [3, h, w], as it came,
        crop_params  = dict of small tensors, this sample's input to views() (collate stacks them))
    Randomness comes from `generator` or torch's global generator (train.py seeds it per sample).
    """

    def __init__(self, image_size: int = 64, patch_size: int = 4, n_global: int = 2, n_local: int = 8,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), local_size: int | None = None,
                 ratio=(3 / 4, 4 / 3), flip: bool = True, local_colour: bool = True,
                 colour_prob: float = 0.8, grayscale_prob: float = 0.2, keep_objects: bool = True,
                 local_foreground: float = 0.0, hue: float = 0.1, on_device: bool = False):
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
        self.colour_prob, self.grayscale_prob, self.hue = colour_prob, grayscale_prob, hue   # DINO: 0.8, 0.2, 0.1
        self.keep_objects = keep_objects
        # A toy-world choice (SILC's reviewers: "a local crop may contain only background"): when the
        # sample has a mask, a local crop must be at least this fraction foreground (an object part).
        self.local_foreground = local_foreground
        self.on_device = on_device
        # The resolution the global crops are cut from: twice theirs, so that no crop is shrunk by much
        # more than 2x. Readers of photos decode straight to it (data.decode_image's working_size).
        self.working_size = 2 * image_size

    def __call__(self, sample: dict, generator=None) -> dict:
        img = sample["image"]                                            # [3, h, w] uint8 (or float in [0, 1])
        frame = sample.get("frame")                                      # the pixel frame of boxes and crops
        H, W = (int(frame[0]), int(frame[1])) if frame is not None else img.shape[-2:]
        keep = None
        if self.keep_objects and sample.get("boxes") is not None and len(sample["boxes"]) > 0:
            b = sample["boxes"].float()                                  # [n, 4]: keep the central half
            cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
            hw, hh = (b[:, 2] - b[:, 0]) / 4, (b[:, 3] - b[:, 1]) / 4
            keep = torch.stack([cx - hw, cy - hh, cx + hw, cy + hh], dim=1)
        out = {k: v for k, v in sample.items() if k not in ("image", "mask", "boxes", "frame")}

        # Global views: one flip coin for all of them, so one caption is true for every view.
        flip_global = self.flip and bool(torch.rand(1, generator=generator) < 0.5)
        if flip_global:
            out["caption"] = swap_left_right(sample["caption"])
        g_boxes = [(*sample_crop_box(H, W, self.global_scale, self.ratio, generator, keep), flip_global)
                   for _ in range(self.n_global)]
        if sample.get("mask") is not None:                              # same geometry as view 0
            m = resized_crop(sample["mask"], g_boxes[0][:4], self.image_size)   # [S, S]
            out["mask"] = hflip(m) if flip_global else m

        # Local views: own flips, plus colour augmentation (never paired with text).
        fg = sample["mask"] > 0 if self.local_foreground > 0 and sample.get("mask") is not None else None
        l_boxes = [(*sample_crop_box(H, W, self.local_scale, self.ratio, generator, foreground=fg,
                                     min_foreground=self.local_foreground if fg is not None else 0.0),
                    self.flip and bool(torch.rand(1, generator=generator) < 0.5)) for _ in range(self.n_local)]
        n = self.n_local
        jitter = grey = torch.zeros(n, dtype=torch.bool)
        colour = (torch.eye(3).expand(n, 3, 3).clone(), torch.ones(n), torch.zeros(n))   # the identity map
        if n > 0:
            u = torch.rand(n, 2, generator=generator)                  # [n, 2]: drawn for all crops, used where chosen
            jitter = (u[:, 0] < self.colour_prob) & self.local_colour   # [n] bool
            grey = (u[:, 1] < self.grayscale_prob) & self.local_colour
            if jitter.any():                                             # drawn only when some crop uses them
                colour = color_jitter_params(n, hue=self.hue, generator=generator)
        out["global_boxes"], out["local_boxes"], out["local_colour"] = g_boxes, l_boxes, (jitter | grey).tolist()
        params = {"frame": torch.tensor([H, W], dtype=torch.float32),                        # [2]
                  "global_boxes": torch.tensor(g_boxes, dtype=torch.float32).view(self.n_global, 5),
                  "local_boxes": torch.tensor(l_boxes, dtype=torch.float32).view(n, 5),      # [n, 5]
                  "jitter": jitter, "grey": grey, "colour_matrix": colour[0],               # [n], [n], [n, 3, 3]
                  "brightness": colour[1], "contrast_shift": colour[2]}                     # [n], [n]
        if self.on_device:
            out["pixels"], out["crop_params"] = img, params
            return out

        # Crops in the worker: views() on a batch of one.
        g, l = self.views(img[None], {k: v[None] for k, v in params.items()})   # [G, 1, 3, S, S], [n, 1, 3, s, s]
        globals_ = list(g[:, 0].unbind(0))
        out["image"] = globals_[0]
        if self.n_global + n > 1:
            out["global_crops"], out["local_crops"] = globals_, list(l[:, 0].unbind(0)) if l is not None else []
        return out

    def views(self, pixels: torch.Tensor, params: dict):
        """The pixel work of a batch, on whatever device `pixels` is on. pixels: uint8 [B, 3, h, w] (or
        float in [0, 1]), one size for the whole batch; params: each sample's crop_params from __call__,
        stacked ([B, ...], data.collate), on the same device.
        -> (global crops float [G, B, 3, S, S], local crops float [n, B, 3, s, s] or None), normalised."""
        img = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels   # [B, 3, h, w] in [0, 1]
        B, frame = img.shape[0], params["frame"]                                   # frame [B, 2] = (H, W)
        # Normalisation is a per-channel affine map and bilinear weights are >= 0 and sum to 1, so
        # normalise-then-crop == crop-then-normalise: the global views crop the normalised image.
        src = normalize(shrink_short_side(img, self.working_size))
        g = crop_and_resize(src, params["global_boxes"], frame, self.image_size)   # [B, G, 3, S, S]
        g = g.transpose(0, 1).contiguous()                                        # [G, B, 3, S, S]
        if self.n_local == 0:
            return g, None
        n, s = self.n_local, self.local_size
        max_short = math.ceil(2 * s / math.sqrt(self.local_scale[1]))
        v = crop_and_resize(shrink_short_side(img, max_short), params["local_boxes"], frame, s)
        v = v.reshape(B * n, 3, s, s)                                             # in [0, 1]
        # colour augmentation where it was chosen: jitter, then grayscale (DINO's order)
        colour = (params["colour_matrix"].flatten(0, 1), params["brightness"].flatten(), params["contrast_shift"].flatten())
        v = torch.where(params["jitter"].view(-1, 1, 1, 1), color_jitter(v, colour), v)
        v = torch.where(params["grey"].view(-1, 1, 1, 1), grayscale(v), v)
        return g, normalize(v).view(B, n, 3, s, s).transpose(0, 1).contiguous()  # [n, B, 3, s, s]


class CenterView:
    """The evaluation view, with no randomness: the largest centred square of the image, resized to
    size x size, normalised. This is open_clip's val transform (resize the short side, centre crop),
    resampled like the training crops (antialiased bilinear; open_clip's is bicubic).
    __call__(sample) -> the sample with image = float [3, size, size]."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, sample: dict) -> dict:
        img = sample["image"]
        img = img.float() / 255.0 if img.dtype == torch.uint8 else img   # [3, H, W] in [0, 1]
        H, W = img.shape[-2:]
        side = min(H, W)
        box = ((H - side) // 2, (W - side) // 2, side, side)
        return {**sample, "image": normalize(resized_crop(img, box, self.size))}


# ------------------------------------------------------------------------------------------------
# 4. Batching
# ------------------------------------------------------------------------------------------------
def view_batch(global_crops: torch.Tensor, local_crops: torch.Tensor | None = None) -> dict:
    """Stacked views -> the batch keys the model reads: images [B, 3, S, S] = global view 0 (the
    text-paired one) and, when there is more than one view, global_crops [G, B, 3, S, S] and
    local_crops [n, B, 3, s, s] (grouped by resolution: one encoder forward each)."""
    out = {"images": global_crops[0]}
    n = 0 if local_crops is None else local_crops.shape[0]
    if global_crops.shape[0] + n > 1:
        out["global_crops"] = global_crops
        if n > 0:
            out["local_crops"] = local_crops
    return out


def collate(samples: list, tokenizer=None) -> dict | None:
    """Samples -> batch dict. None samples (skipped) are dropped; an all-None batch gives None.

    images [B, 3, S, S] float (global view 0, or the plain image normalised if it is still uint8),
    tokens [B, L] long and captions list[str] (when every sample has a caption), masks [B, H, W] and
    labels [B] (when every sample has one), global_crops [G, B, 3, S, S] and local_crops
    [n, B, 3, s, s] (when multi-crop is on: see view_batch). With crops on the device
    (MultiCrop(on_device=True)), pixels uint8 [B, 3, h, w] and crop_params {name: [B, ...]} instead
    of the views: MultiCrop.views makes them in the training step (train.prepare_batch).
    """
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    tokenizer = tokenizer or ByteTokenizer()
    batch = {}
    if "pixels" in samples[0]:
        sizes = {tuple(s["pixels"].shape) for s in samples}
        if len(sizes) > 1:
            raise ValueError(f"images of different sizes in one batch {sorted(sizes)}: crops on the device need "
                             f"one working size (the readers' working_size, data.decode_image)")
        batch["pixels"] = torch.stack([s["pixels"] for s in samples])   # uint8 [B, 3, h, w]
        batch["crop_params"] = {k: torch.stack([s["crop_params"][k] for s in samples])
                                for k in samples[0]["crop_params"]}     # each [B, ...]
    elif "global_crops" in samples[0]:
        G, n = len(samples[0]["global_crops"]), len(samples[0]["local_crops"])
        g = torch.stack([torch.stack([s["global_crops"][i] for s in samples]) for i in range(G)])  # [G, B, 3, S, S]
        l = torch.stack([torch.stack([s["local_crops"][i] for s in samples]) for i in range(n)]) if n else None
        batch.update(view_batch(g, l))                                  # [n, B, 3, s, s]
    else:
        images = [normalize(s["image"]) if s["image"].dtype == torch.uint8 else s["image"] for s in samples]
        sizes = {tuple(x.shape) for x in images}
        if len(sizes) > 1:
            raise ValueError(f"images of different sizes in one batch {sorted(sizes)}: give the dataset a "
                             f"transform (data.MultiCrop) that outputs one size")
        batch["images"] = torch.stack(images)                           # [B, 3, S, S]
    if all("caption" in s for s in samples):                           # (classification data has none)
        batch["captions"] = [s["caption"] for s in samples]
        batch["tokens"] = tokenizer(batch["captions"])                  # [B, L]
    if all(s.get("mask") is not None for s in samples):
        batch["masks"] = torch.stack([s["mask"] for s in samples])      # [B, H, W]
    if all("label" in s for s in samples):
        batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)  # [B]
    batch["skipped"] = skip_count()
    return batch


def skip_count() -> tuple:
    """(reader id, its running count of skipped samples). Skips are counted in the process that reads
    the data (a DataLoader worker, or the main process: id -1); batches carry this to the loop's log."""
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else -1, sum(SKIPPED.values())


# ------------------------------------------------------------------------------------------------
# 5. Data order: a step-indexed sampler, so that a run is reproducible, resumable at any step, and
# identical on 1 or N processes. Global step t reads positions [t*B, (t+1)*B) of an endless stream
# made of per-epoch permutations of the dataset; rank r of W, accumulation micro-step a, takes the
# slice [(a*W + r)*b, (a*W + r + 1)*b) with b = B / (W * accum).
# ------------------------------------------------------------------------------------------------
class StepSampler(torch.utils.data.Sampler):
    def __init__(self, n, batch_size, world, rank, accum, seed, start_step=0):
        self.n, self.B, self.world, self.rank, self.accum = n, batch_size, world, rank, accum
        self.micro = batch_size // (world * accum)
        self.seed, self.start_step = seed, start_step
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch):
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def __iter__(self):
        step = self.start_step
        while True:
            for a in range(self.accum):
                start = step * self.B + (a * self.world + self.rank) * self.micro
                batch = []
                for pos in range(start, start + self.micro):
                    epoch, i = divmod(pos, self.n)
                    # (index, epoch) lets the dataset seed this sample's augmentation (see SeededSample)
                    batch.append((int(self._permutation(epoch)[i]), epoch))
                yield batch
            step += 1

    def __len__(self):  # endless; DataLoader only needs this for its own bookkeeping
        return 2**62


class SeededSample(torch.utils.data.Dataset):
    """Seeds the random number generators from (seed, epoch, index) before reading a sample, so every
    random crop, flip and colour jitter is a function of the sample alone: the same on any rank,
    any DataLoader worker, and after a resume."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        s = (self.seed * 1_000_003 + epoch * 7_919 + index) % (2**31)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        return self.dataset[index]


def make_loader(dataset, collate_fn, batch_size, world, rank, accum, seed, start_step=0, num_workers=1,
                pin_memory=False):
    """This rank's DataLoader of micro-batches. A map-style dataset (shapes, csv) comes in StepSampler's
    order from start_step on, each sample seeded by SeededSample; an iterable one (tar shards) splits
    itself over ranks and workers and yields batch_size / (world * accum) samples at a time.
    pin_memory (on CUDA): batches in page-locked memory, so their copy to the GPU overlaps compute."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size // (world * accum), collate_fn=collate_fn,
                                           num_workers=num_workers, drop_last=True, pin_memory=pin_memory)
    sampler = StepSampler(len(dataset), batch_size, world, rank, accum, seed, start_step)
    return torch.utils.data.DataLoader(SeededSample(dataset, seed), batch_sampler=sampler, collate_fn=collate_fn,
                                       num_workers=num_workers, persistent_workers=num_workers > 0,
                                       prefetch_factor=4 if num_workers > 0 else None, pin_memory=pin_memory)
