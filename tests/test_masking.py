"""Tests of masking.py: exact counts, reproducibility, uniformity of random masks, and block masks
that are unions of rectangles within the aspect bounds (checked from the rectangles themselves)."""
import math
import os
import random
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from masking import block_mask, draw_block, random_mask

ASPECT = (0.3, 1 / 0.3)


@pytest.mark.parametrize("N,ratio,n", [(256, 0.75, 192), (196, 0.4, 78), (64, 0.5, 32), (10, 0.33, 3),
                                       (49, 0.0, 0)])
def test_random_mask_exact_counts(N, ratio, n):
    m = random_mask(8, N, ratio, generator=torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and m.shape == (8, N)
    assert (m.sum(1) == n).all()


def test_random_mask_reproducible_and_uniform():
    a = random_mask(4, 50, 0.6, generator=torch.Generator().manual_seed(1))
    b = random_mask(4, 50, 0.6, generator=torch.Generator().manual_seed(1))
    c = random_mask(4, 50, 0.6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every position is hidden with probability n / N = 0.6: check each column's rate (5 sigma)
    rows = 4000
    freq = random_mask(rows, 20, 0.6, generator=torch.Generator().manual_seed(3)).float().sum(0)
    sigma = math.sqrt(rows * 0.6 * 0.4)
    assert ((freq - rows * 0.6).abs() < 5 * sigma).all()


def test_bad_ratio_is_a_clear_error():
    with pytest.raises(ValueError, match="ratio"):
        random_mask(2, 10, 1.0)
    with pytest.raises(ValueError, match="ratio"):
        block_mask(2, 4, 4, -0.1)


def test_draw_block_respects_area_aspect_and_grid():
    rng = random.Random(0)
    got = 0
    for _ in range(3000):
        box = draw_block(rng, 7, 12, 16, 40, ASPECT)
        if box is None:
            continue
        got += 1
        top, left, h, w = box
        assert 16 <= h * w <= 40
        assert ASPECT[0] <= h / w <= ASPECT[1]
        assert 0 <= top and top + h <= 7 and 0 <= left and left + w <= 12
    assert got > 1000                      # most draws succeed


@pytest.mark.parametrize("gh,gw,ratio", [(14, 14, 0.4), (16, 16, 0.75), (8, 8, 0.5), (4, 4, 0.5),
                                         (6, 10, 0.3), (16, 16, 0.1)])
def test_block_mask_exact_count_and_union_of_rectangles(gh, gw, ratio):
    B = 16
    n = int(round(ratio * gh * gw))
    masks, boxes = block_mask(B, gh, gw, ratio, generator=torch.Generator().manual_seed(0),
                              return_boxes=True)
    assert masks.dtype == torch.bool and masks.shape == (B, gh * gw)
    assert (masks.sum(1) == n).all()
    for i in range(B):
        union = torch.zeros(gh, gw, dtype=torch.bool)
        for top, left, h, w in boxes[i]:
            assert 0 <= top and top + h <= gh and 0 <= left and left + w <= gw
            assert ASPECT[0] <= h / w <= ASPECT[1]
            union[top:top + h, left:left + w] = True
        assert torch.equal(union.flatten(), masks[i])


def test_block_masks_are_blocks_not_scattered_patches():
    # 14 x 14 grid, 40%: 78 patches per image. Blocks of >= 16 patches should cover most of them.
    masks, boxes = block_mask(32, 14, 14, 0.4, generator=torch.Generator().manual_seed(1),
                              return_boxes=True)
    n_boxes = sum(len(b) for b in boxes) / len(boxes)
    assert n_boxes < 78 / 4
    big = sum(h * w for b in boxes for _, _, h, w in b if h * w >= 16)
    assert big >= 0.8 * masks.sum().item()
    # the hidden patches of one image have many hidden neighbours (a random mask would have ~40%)
    m = masks.view(32, 14, 14).float()
    right = (m[:, :, 1:] * m[:, :, :-1]).sum() / m[:, :, :-1].sum()
    assert right > 0.6


def test_block_mask_reproducible():
    a = block_mask(3, 8, 8, 0.5, generator=torch.Generator().manual_seed(5))
    b = block_mask(3, 8, 8, 0.5, generator=torch.Generator().manual_seed(5))
    c = block_mask(3, 8, 8, 0.5, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
