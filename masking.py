"""Masks: which image patches and which caption tokens the student does not get to see.

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

Captions are masked too, for MaskCLIP's masked language modelling (BERT, Devlin et al. 2019):
`mlm_mask_tokens` hides 20% of a caption's ordinary tokens; losses.TextMLMDecoder predicts them.

Per sample. A training step draws each sample's masks from its own generator, seeded by (seed,
step, the sample's position in the global batch): `sample_generator`. So the masks of a batch do
not depend on how it is split over ranks and micro-batches (train.py's DDP promise), nor on a resume.
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


# ----------------------------------------------------------------------------------------------
# Captions: BERT-style token masking
# ----------------------------------------------------------------------------------------------

def mlm_mask_tokens(tokens: torch.Tensor, vocab_size: int, mask_id: int, special_ids: tuple[int, ...],
                    mask_prob: float = 0.2, generator=None):
    """BERT-style corruption of captions for MLM. tokens [B, L] -> (inputs [B, L], labels [B, L]).

    Every ordinary token (not SOT, EOT, PAD or MASK) is selected independently with probability
    mask_prob (MaskCLIP: 20%). A selected token becomes the MASK id with probability 0.8, a random
    ordinary token with 0.1, and stays as it is with 0.1 (BERT: so the model cannot assume that an
    unmasked-looking token is always correct). labels hold the original id at selected positions
    and -100 (ignored) elsewhere. Special tokens are never selected and never drawn as random
    replacements: a random EOT would move the text encoder's pooling position.
    Random numbers come from `generator` (a CPU generator) and are moved to tokens' device. It may
    also be a list of B generators, one per caption: each row then depends on its own generator
    alone (train.py seeds one per sample, so the corruption is the same on any number of ranks).
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, L], got {tuple(tokens.shape)}")
    excluded = torch.tensor(sorted(set(special_ids) | {mask_id}))
    ids = torch.arange(vocab_size)
    ordinary = ids[~torch.isin(ids, excluded)]                            # [V'] ids a token may become
    shape, dev = tokens.shape, tokens.device
    select_u = _rand_rows(torch.rand, shape, generator).to(dev)           # [B, L]
    action_u = _rand_rows(torch.rand, shape, generator).to(dev)           # [B, L]
    random_ids = ordinary[_rand_rows(lambda s, generator: torch.randint(len(ordinary), s, generator=generator),
                                     shape, generator)].to(dev)           # [B, L]
    eligible = ~torch.isin(tokens, excluded.to(dev))
    selected = eligible & (select_u < mask_prob)                          # [B, L]
    inputs = torch.where(selected & (action_u < 0.8), torch.full_like(tokens, mask_id), tokens)
    inputs = torch.where(selected & (action_u >= 0.8) & (action_u < 0.9), random_ids, inputs)
    labels = torch.where(selected, tokens, torch.full_like(tokens, -100))
    return inputs, labels


def _rand_rows(draw, shape, generator):
    """draw(shape, generator=g) with one generator, or row by row with a list of generators."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
        return torch.stack([draw(tuple(shape[1:]), generator=g) for g in generator])
    return draw(tuple(shape), generator=generator)


# ----------------------------------------------------------------------------------------------
# Per sample
# ----------------------------------------------------------------------------------------------

def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """A CPU generator for one training sample at one step, seeded by (seed, step, its position in
    the step's global batch) and by nothing else: whatever it draws is the same on 1 or N ranks, for
    any gradient accumulation, and after a resume. (Distinct for step < 10^7, batches under 10^6.)"""
    return torch.Generator().manual_seed((seed * 10**13 + step * 10**6 + index) % 2**63)


def sample_masks(generators, grid_h: int, grid_w: int, ratio: float, kind: str = "random") -> torch.Tensor:
    """One patch mask per generator (one per sample), random or block-wise: bool [len(generators), N]."""
    if kind == "block":
        return torch.cat([block_mask(1, grid_h, grid_w, ratio, generator=g) for g in generators])
    return torch.cat([random_mask(1, grid_h * grid_w, ratio, generator=g) for g in generators])


def sample_mlm(tokens: torch.Tensor, tokenizer, mask_prob: float, generators):
    """MLM inputs and labels for captions [b, L] (see mlm_mask_tokens), row i from generators[i] and
    the tokenizer's ids. Drawn at the tokenizer's full context length, then cut back to L, so trimming
    the padding columns cannot change the draws."""
    L, dev = tokens.shape[1], tokens.device
    full = torch.nn.functional.pad(tokens.cpu(), (0, tokenizer.context_length - L), value=tokenizer.pad_token_id)
    inputs, labels = mlm_mask_tokens(full, tokenizer.vocab_size, tokenizer.mask_token_id, tokenizer.special_ids,
                                     mask_prob, generators)
    return inputs[:, :L].to(dev), labels[:, :L].to(dev)
