"""Patch masks for masked image modelling: which patches the student does not get to see.

MaskCLIP (Dong et al. 2022, arXiv 2208.12262) hides 75% of the patches AT RANDOM from the student
and asks it to predict the teacher's features there. iBOT (Zhou et al. 2022), following BEiT,
hides BLOCKS instead: rectangles of patches, each with a random area of at least `min_area`
patches and an aspect ratio h/w in (0.3, 1/0.3), added until the target count is reached. Blocks
are harder to fill in from the immediate neighbours than scattered single patches, so the student
must use more context.

Both functions return a bool mask [B, N] (True = hidden, N = grid_h * grid_w in row-major order)
with EXACTLY n = round(ratio * N) True per row (Python's round), so a batch can drop the same
number of tokens from every image, and both take a torch.Generator so results are reproducible.
To hit the count exactly, block masking lets the last few patches (once fewer than `min_area`
remain) come as smaller rectangles, down to single patches, always within the aspect bounds.

How the ViT then sees a masked image (clip.VisionTransformer, `mask_mode`):
  (a) "token": each masked patch embedding is replaced by one learnable mask token before the
      position embedding is added (iBOT, TIPS, SigLIP 2). The encoder still processes all N
      tokens, so it costs as much as an unmasked forward; the encoder output at a masked position
      is already a prediction for that position.
  (b) "drop": masked tokens are removed and the encoder sees only the N - n visible ones (MAE,
      FLIP). At 75% masking the encoder does ~4x less work (attention ~16x less); a small decoder
      (losses.MaskedPatchDecoder) puts mask tokens back at the hidden positions and predicts them.
      This is why every row must have the same count: the visible tokens form a dense
      [B, N - n, D] tensor.
"""

from __future__ import annotations

import math
import random

import torch


def num_masked(num_patches: int, ratio: float) -> int:
    """Number of hidden patches per image: round(ratio * N). ratio must be in [0, 1)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1) (some patches must stay visible), got {ratio}")
    return int(round(ratio * num_patches))


def random_mask(B: int, N: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniformly random mask, bool [B, N] on the CPU, exactly round(ratio * N) True per row.

    Each row ranks N uniform noise values and hides the n smallest: every subset of size n is
    equally likely (the MAE trick; no Python loop).
    """
    n = num_masked(N, ratio)
    noise = torch.rand(B, N, generator=generator)                      # [B, N]
    hidden = noise.argsort(dim=1)[:, :n]                               # [B, n] patch indices
    return torch.zeros(B, N, dtype=torch.bool).scatter_(1, hidden, True)


def draw_block(rng: random.Random, grid_h: int, grid_w: int, min_area: float, max_area: float,
               aspect: tuple[float, float]) -> tuple[int, int, int, int] | None:
    """One random rectangle (top, left, h, w) inside the grid, or None if this draw failed.

    BEiT's recipe: area ~ U(min_area, max_area), log(h/w) ~ U(log aspect[0], log aspect[1]),
    h = round(sqrt(area * r)), w = round(sqrt(area / r)). Draws whose rounded rectangle leaves the
    area range, the aspect bounds or the grid are rejected (returns None), so every rectangle
    returned satisfies all three exactly.
    """
    area = rng.uniform(min_area, max_area)
    r = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    h, w = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
    if not (1 <= h <= grid_h and 1 <= w <= grid_w):
        return None
    if not (min_area <= h * w <= max_area and aspect[0] <= h / w <= aspect[1]):
        return None
    return rng.randint(0, grid_h - h), rng.randint(0, grid_w - w), h, w


def block_mask(B: int, grid_h: int, grid_w: int, ratio: float,
               generator: torch.Generator | None = None, min_area: int = 16,
               aspect: tuple[float, float] = (0.3, 1 / 0.3), max_tries: int = 10,
               return_boxes: bool = False):
    """Block-wise mask (BEiT / iBOT), bool [B, grid_h * grid_w], exactly round(ratio * N) per row.

    Rectangles (see `draw_block`) are added while they bring new patches without overshooting the
    target; a rectangle may overlap earlier ones. min_area: BEiT's 16 patches (capped at the
    target count for tiny grids); once fewer than min_area patches remain, smaller rectangles are
    allowed. If `max_tries` draws in a row add nothing, a single unmasked patch (a 1 x 1
    rectangle) is taken, so the loop always finishes.
    return_boxes=True also returns, per image, the list of rectangles (top, left, h, w) whose
    union is that image's mask (for tests and visualisation).
    The per-image loop runs in Python with a `random.Random` seeded from `generator`: cheap at
    these grid sizes (a few hundred draws per image at most).
    """
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid must be at least 1 x 1, got {grid_h} x {grid_w}")
    if not (0 < aspect[0] <= 1 <= aspect[1]):
        raise ValueError(f"aspect bounds must satisfy 0 < low <= 1 <= high, got {aspect}")
    N = grid_h * grid_w
    n = num_masked(N, ratio)
    # One Python RNG per call, seeded from the torch generator: deterministic given `generator`.
    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
    masks = torch.zeros(B, grid_h, grid_w, dtype=torch.bool)
    all_boxes = []
    for i in range(B):
        m = masks[i]                                                   # [grid_h, grid_w] view
        boxes, count = [], 0
        while count < n:
            remaining = n - count
            low = min(min_area, n) if remaining >= min(min_area, n) else 1
            box = None
            for _ in range(max_tries):
                cand = draw_block(rng, grid_h, grid_w, low, remaining, aspect)
                if cand is None:
                    continue
                top, left, h, w = cand
                new = h * w - int(m[top:top + h, left:left + w].sum())
                if 0 < new <= remaining:
                    box = cand
                    break
            if box is None:                                            # fallback: one free patch
                free = (~m).flatten().nonzero().flatten()
                k = int(free[rng.randrange(len(free))])
                box = (k // grid_w, k % grid_w, 1, 1)
            top, left, h, w = box
            count += h * w - int(m[top:top + h, left:left + w].sum())
            m[top:top + h, left:left + w] = True
            boxes.append(box)
        all_boxes.append(boxes)
    masks = masks.flatten(1)                                           # [B, N]
    return (masks, all_boxes) if return_boxes else masks
