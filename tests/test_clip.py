"""Tests for clip.py, each against an independent computation (hand-written maths or public numbers)."""

import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
from clip import (CLIP, MODEL_SIZES, Attention, Block, QuickGELU, TextTransformer,
                  VisionTransformer, count_params, flops_per_image, flops_per_text,
                  interpolate_pos_embed, model_config)


def small_config(**overrides):
    """A 2-layer version of the tiny model: fast, but every code path is the same."""
    base = dict(patch_size=4, vision_layers=2, text_layers=2, vision_width=64, text_width=64, embed_dim=32,
                vision_heads=4, text_heads=4)
    return model_config("tiny", **{**base, **overrides})


# ------------------------------------------------------------------------------------------------
# Position-embedding interpolation
# ------------------------------------------------------------------------------------------------

def keys_bicubic_1d(x, out_size):
    """Resize along the last dim with Keys' cubic convolution (a = -0.75), half-pixel centres and
    replicated borders, written out by hand: out[o] = sum_k w_k(t) x[clamp(i0 - 1 + k)]."""
    a = -0.75

    def w(s):  # the cubic convolution kernel
        s = abs(s)
        if s <= 1:
            return (a + 2) * s ** 3 - (a + 3) * s ** 2 + 1
        if s < 2:
            return a * s ** 3 - 5 * a * s ** 2 + 8 * a * s - 4 * a
        return 0.0

    n = x.shape[-1]
    cols = []
    for o in range(out_size):
        src = (o + 0.5) * n / out_size - 0.5
        i0 = math.floor(src)
        t = src - i0
        acc = 0
        for k in range(-1, 3):
            acc = acc + w(k - t) * x[..., min(max(i0 + k, 0), n - 1)]
        cols.append(acc)
    return torch.stack(cols, dim=-1)


def test_pos_embed_identity_at_training_size(monkeypatch):
    torch.manual_seed(0)
    vit = VisionTransformer(small_config())
    G = vit.grid_size
    assert vit.pos_embed_for(G, G) is vit.pos_embed   # the parameter itself, untouched

    # At the training size, embed() must never resample: make any interpolation call explode.
    def boom(*args, **kwargs):
        raise AssertionError("interpolate called at the training grid")
    monkeypatch.setattr(clip.F, "interpolate", boom)
    tokens = vit.embed(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 1 + G * G, 64)


@pytest.mark.parametrize("new_grid", [(8, 8), (7, 11), (24, 20), (3, 16)])
def test_pos_embed_bicubic_matches_hand_written_keys_kernel(new_grid):
    torch.manual_seed(0)
    G, D = 6, 5
    pos = torch.randn(1 + G * G, D, dtype=torch.float64)
    out = interpolate_pos_embed(pos, *new_grid)
    gh, gw = new_grid
    assert out.shape == (1 + gh * gw, D)
    assert torch.equal(out[0], pos[0])   # the class token's position is kept apart

    grid = pos[1:].reshape(G, G, D).permute(2, 0, 1)           # [D, G, G]
    expected = keys_bicubic_1d(grid, gw)                       # resize columns -> [D, G, gw]
    expected = keys_bicubic_1d(expected.transpose(1, 2), gh).transpose(1, 2)   # rows -> [D, gh, gw]
    expected = expected.permute(1, 2, 0).reshape(gh * gw, D)
    torch.testing.assert_close(out[1:], expected, atol=1e-5, rtol=1e-5)


def test_pos_embed_bf16_branch_resamples_in_float32():
    """Under bf16 (a model cast to bf16, or autocast's bf16 parameters), the position embedding is
    resampled in float32 and rounded to bf16 once: it equals the hand-written Keys kernel on the same
    bf16 numbers, in float64, to within one bf16 rounding (|error| <= u |value|, u = 2^-8), and keeps
    the class token and the parameter's dtype. Bicubic arithmetic in bf16 itself would add several
    roundings per tap."""
    torch.manual_seed(1)
    G, D, (gh, gw) = 6, 8, (9, 11)
    pos = torch.randn(1 + G * G, D).bfloat16()
    out = interpolate_pos_embed(pos, gh, gw)
    assert out.dtype == torch.bfloat16 and torch.equal(out[0], pos[0])
    grid = pos[1:].double().reshape(G, G, D).permute(2, 0, 1)
    expected = keys_bicubic_1d(keys_bicubic_1d(grid, gw).transpose(1, 2), gh).transpose(1, 2)
    expected = expected.permute(1, 2, 0).reshape(gh * gw, D)
    err = (out[1:].double() - expected).abs()
    assert (err <= 2.0 ** -8 * expected.abs() + 1e-6).all(), err.max()
    assert interpolate_pos_embed(pos, G, G) is pos


def test_pos_embed_interp_preserves_constants_and_interior_ramps():
    G, D = 8, 3
    # A constant grid stays constant at any size (the kernel weights sum to 1).
    const = torch.full((1 + G * G, D), 0.7)
    torch.testing.assert_close(interpolate_pos_embed(const, 5, 13), torch.full((1 + 65, D), 0.7))

    # A linear ramp f(r, c) = 2 r - 3 c + 1 (in source-grid coordinates) is reproduced wherever all
    # 4x4 taps lie inside the grid, up to the known bias of PyTorch's kernel: with a = -0.75 (not
    # Keys' a = -0.5) the first moment of the weights is not zero, e.g. sum_k w(k - t)(k - t) = 0.047
    # at t = 1/4, so the error is below 0.06 per unit of slope (a twentieth of a grid step).
    r, c = torch.meshgrid(torch.arange(G, dtype=torch.float64), torch.arange(G, dtype=torch.float64), indexing="ij")
    ramp = (2 * r - 3 * c + 1).reshape(G * G, 1).expand(-1, D)
    pos = torch.cat([torch.zeros(1, D, dtype=torch.float64), ramp])
    gh, gw = 16, 12
    out = interpolate_pos_embed(pos, gh, gw)[1:].reshape(gh, gw, D)
    checked = 0
    for i in range(gh):
        for j in range(gw):
            sr, sc = (i + 0.5) * G / gh - 0.5, (j + 0.5) * G / gw - 0.5   # source coordinates
            if 1 <= sr <= G - 3 and 1 <= sc <= G - 3:
                assert (out[i, j] - (2 * sr - 3 * sc + 1)).abs().max() <= 0.06 * (2 + 3)
                checked += 1
    assert checked > 20
    # The ramp's order survives everywhere, borders included: increasing down rows, decreasing along columns.
    assert (out[1:] > out[:-1]).all() and (out[:, 1:] < out[:, :-1]).all()
    # At half-way points (t = 1/2) the symmetric weights make the interpolation exact: 2x upsampling
    # of the interior lands on t = 1/4 and 3/4, but 2x DOWNsampling lands on t = 1/2.
    down = interpolate_pos_embed(pos, 4, 4)[1:].reshape(4, 4, D)
    for i in (1, 2):
        for j in (1, 2):
            torch.testing.assert_close(down[i, j, 0], torch.tensor(2 * (2 * i + 0.5) - 3 * (2 * j + 0.5) + 1, dtype=torch.float64))


def test_vit_uses_interpolated_pos_embed_for_other_sizes():
    torch.manual_seed(0)
    vit = VisionTransformer(small_config(stem="linear"))
    images = torch.randn(2, 3, 32, 48)                        # non-square, 8 x 12 grid
    stem = vit.stem(images).flatten(2).transpose(1, 2)        # [B, N, D]
    pos = interpolate_pos_embed(vit.pos_embed.detach(), 8, 12)
    cls = (vit.cls_token + pos[0]).expand(2, 1, -1)
    expected = vit.ln_pre(torch.cat([cls, stem + pos[1:]], dim=1))
    torch.testing.assert_close(vit.embed(images), expected)
    embed, tokens = vit(images)
    assert embed.shape == (2, 32) and tokens.shape == (2, 1 + 96, 64)


# ------------------------------------------------------------------------------------------------
# Attention and blocks
# ------------------------------------------------------------------------------------------------

def naive_attention(attn: Attention, x, causal=False):
    """Per-head loop: softmax(Q K^T / sqrt(d) + mask) V, heads concatenated, then out_proj."""
    B, N, D = x.shape
    h = attn.num_heads
    d = D // h
    Wq, Wk, Wv = attn.in_proj.weight.split(D)
    bq, bk, bv = attn.in_proj.bias.split(D)
    q, k, v = x @ Wq.T + bq, x @ Wk.T + bk, x @ Wv.T + bv
    heads = []
    for i in range(h):
        sl = slice(i * d, (i + 1) * d)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)     # [B, N, N]
        if causal:
            scores = scores.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(scores.softmax(-1) @ v[..., sl])
    return torch.cat(heads, -1) @ attn.out_proj.weight.T + attn.out_proj.bias


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_naive_softmax(causal):
    torch.manual_seed(0)
    attn = Attention(24, 3).double()
    nn.init.normal_(attn.in_proj.bias)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    torch.testing.assert_close(attn(x, is_causal=causal), naive_attention(attn, x, causal))
    if causal:   # the same causal mask given explicitly as a boolean attn_mask (True = may attend)
        allowed = torch.ones(7, 7, dtype=torch.bool).tril()
        torch.testing.assert_close(attn(x, attn_mask=allowed), naive_attention(attn, x, True))


def test_attention_weights_map_one_to_one_onto_nn_multiheadattention():
    # open_clip stores attention as nn.MultiheadAttention(in_proj_weight, in_proj_bias, out_proj):
    # copying those tensors into in_proj / out_proj must give the same function.
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    nn.init.normal_(mha.in_proj_bias)
    attn = Attention(32, 4)
    attn.in_proj.weight.data.copy_(mha.in_proj_weight)
    attn.in_proj.bias.data.copy_(mha.in_proj_bias)
    attn.out_proj.load_state_dict(mha.out_proj.state_dict())
    x = torch.randn(3, 9, 32)
    torch.testing.assert_close(attn(x), mha(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def test_block_is_prenorm_residual_and_quick_gelu():
    torch.manual_seed(0)
    blk = Block(16, 2, mlp_ratio=2.0, act="quick_gelu")
    x = torch.randn(2, 5, 16)
    y = x + naive_attention(blk.attn, blk.ln_1(x))
    h = blk.ln_2(y) @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
    h = h * torch.sigmoid(1.702 * h)
    expected = y + h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    torch.testing.assert_close(blk(x), expected, atol=1e-5, rtol=1e-5)
    assert isinstance(blk.mlp.act, QuickGELU) and blk.mlp.fc1.out_features == 32


# ------------------------------------------------------------------------------------------------
# Text tower
# ------------------------------------------------------------------------------------------------

def test_text_pools_at_first_eot_and_ignores_what_follows():
    torch.manual_seed(0)
    cfg = small_config()
    text = TextTransformer(cfg)
    B, L = 4, 12
    tokens = torch.randint(4, cfg.vocab_size, (B, L))
    eot_pos = [3, 11, 0, 6]
    for b, p in enumerate(eot_pos):
        tokens[b, p] = cfg.eot_token_id
        tokens[b, p + 1:] = cfg.pad_token_id
    tokens[3, 9] = cfg.eot_token_id          # a second EOT later: the first one must win
    embed, feats = text(tokens)
    assert feats.shape == (B, L, cfg.text_width)
    pooled = torch.stack([feats[b, p] for b, p in enumerate(eot_pos)])
    torch.testing.assert_close(embed, pooled @ text.proj.weight.T)

    # Causal mask: tokens after the EOT cannot change the pooled embedding; tokens before it can.
    changed = tokens.clone()
    changed[1:, -1] = 17                      # rows 1..3 change after their EOT (row 1's EOT is last: skip)
    changed[1, -1] = cfg.eot_token_id
    torch.testing.assert_close(text(changed)[0], embed)
    changed[0, 1] = 99                        # before row 0's EOT at position 3
    assert not torch.allclose(text(changed)[0][0], embed[0])


def test_text_without_eot_or_too_long_is_an_error():
    cfg = small_config()
    text = TextTransformer(cfg)
    with pytest.raises(ValueError, match="end-of-text"):
        text(torch.full((2, 5), 7))
    with pytest.raises(ValueError, match="context_length"):
        text(torch.full((1, cfg.context_length + 1), cfg.eot_token_id))


# ------------------------------------------------------------------------------------------------
# Masking
# ------------------------------------------------------------------------------------------------

def equal_count_mask(B, N, n_masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(B, N, generator=g).argsort(dim=1)[:, :n_masked]
    return torch.zeros(B, N, dtype=torch.bool).scatter_(1, idx, True)


def pixels_of(mask, B, g, p):
    """Pixel-level [B, 1, g*p, g*p] version of a patch mask [B, g*g]."""
    return mask.reshape(B, 1, g, g).repeat_interleave(p, 2).repeat_interleave(p, 3)


@pytest.mark.parametrize("stem", ["linear", "conv"])
@pytest.mark.parametrize("mode", ["drop", "token"])
def test_output_invariant_to_pixels_of_masked_patches(stem, mode):
    torch.manual_seed(0)
    vit = VisionTransformer(small_config(stem=stem)).eval()
    B, g, p = 3, 16, 4
    images = torch.randn(B, 3, 64, 64)
    mask = equal_count_mask(B, g * g, 192)
    pix = pixels_of(mask, B, g, p)
    noisy = torch.where(pix, torch.randn_like(images) * 5, images)       # change masked pixels only
    e1, t1 = vit(images, mask, mode)
    e2, t2 = vit(noisy, mask, mode)
    n_tokens = 1 + (g * g - 192 if mode == "drop" else g * g)
    assert t1.shape == (B, n_tokens, 64)
    torch.testing.assert_close(e1, e2)
    torch.testing.assert_close(t1, t2)
    # Not vacuous: changing a visible pixel does change the output.
    visible = torch.where(~pix, images + 1.0, images)
    assert not torch.allclose(vit(visible, mask, mode)[0], e1)


def test_drop_mode_keeps_visible_tokens_in_order_with_their_positions():
    torch.manual_seed(0)
    vit = VisionTransformer(small_config(stem="linear"))
    B = 2
    images = torch.randn(B, 3, 64, 64)
    mask = equal_count_mask(B, 256, 100, seed=1)
    full = vit.embed(images)                             # [B, 1 + 256, D], after ln_pre
    dropped = vit.embed(images, mask, "drop")            # [B, 1 + 156, D]
    # ln_pre is per token, so dropping commutes with it: pick the visible rows of the full sequence.
    for b in range(B):
        keep = [0] + [1 + i for i in range(256) if not mask[b, i]]
        torch.testing.assert_close(dropped[b], full[b, keep])


def test_token_mode_puts_mask_token_at_masked_positions_linear_stem():
    torch.manual_seed(0)
    vit = VisionTransformer(small_config(stem="linear"))
    D, p, g, B = 64, 4, 16, 2
    nn.init.normal_(vit.mask_token)                      # non-zero, so the test can see it
    images = torch.randn(B, 3, 64, 64)
    mask = equal_count_mask(B, g * g, 60)
    mask[1, :10] = True                                  # token mode allows unequal counts
    # Hand-built: cut patches (channel, row, col order, as a conv kernel), apply the stem matrix.
    patches = images.reshape(B, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, 3 * p * p)
    x = patches @ vit.stem.weight.reshape(D, -1).T                      # [B, N, D]
    x = torch.where(mask[..., None], vit.mask_token, x) + vit.pos_embed[1:]
    x = torch.cat([(vit.cls_token + vit.pos_embed[0]).expand(B, 1, D), x], dim=1)
    expected = F.layer_norm(x, (D,), vit.ln_pre.weight, vit.ln_pre.bias)
    torch.testing.assert_close(vit.embed(images, mask, "token"), expected, atol=1e-5, rtol=1e-5)


def test_token_mode_conv_stem_zeroes_masked_pixels_then_uses_mask_token():
    torch.manual_seed(0)
    vit = VisionTransformer(small_config(stem="conv"))
    nn.init.normal_(vit.mask_token)
    B, g, p, D = 2, 16, 4, 64
    images = torch.randn(B, 3, 64, 64)
    mask = equal_count_mask(B, g * g, 128)
    blanked = images * (~pixels_of(mask, B, g, p)).float()
    x = vit.stem(blanked).flatten(2).transpose(1, 2)
    x = torch.where(mask[..., None], vit.mask_token, x) + vit.pos_embed[1:]
    x = torch.cat([(vit.cls_token + vit.pos_embed[0]).expand(B, 1, D), x], dim=1)
    torch.testing.assert_close(vit.embed(images, mask, "token"), vit.ln_pre(x))


@pytest.mark.parametrize("B,N,n_masked", [(3, 16, 12), (2, 256, 128), (4, 9, 0), (2, 7, 6)])
def test_index_of_false_is_boolean_indexing_with_a_static_shape(B, N, n_masked):
    mask = equal_count_mask(B, N, n_masked, seed=N)
    idx = clip.index_of_false(mask, N - n_masked)
    # by hand: the unmasked positions of each row, in increasing order
    assert idx.tolist() == [[n for n in range(N) if not mask[b, n]] for b in range(B)]
    x = torch.randn(B, N, 5)
    assert torch.equal(clip.gather_rows(x, idx), x[~mask].reshape(B, N - n_masked, 5))


def test_drop_mode_equals_boolean_indexing_bit_for_bit():
    """The static-shape gather gives what boolean indexing gave (the code before it), output and
    gradients, bit for bit: a reference written with x[~mask] here."""
    torch.manual_seed(0)
    vit = VisionTransformer(small_config(stem="linear"))
    images = torch.randn(2, 3, 64, 64)
    mask = equal_count_mask(2, 256, 192, seed=3)

    def reference_embed(images):
        x = vit.stem(images).flatten(2).transpose(1, 2) + vit.pos_embed[1:]       # [B, N, D]
        x = x[~mask].reshape(2, 64, -1)                                            # boolean indexing
        cls = (vit.cls_token + vit.pos_embed[0]).expand(2, 1, -1)
        return vit.ln_pre(torch.cat([cls, x], dim=1))

    outs, grads = [], []
    for fn in (reference_embed, lambda im: vit.embed(im, mask, "drop", num_masked=192)):
        vit.zero_grad()
        out = fn(images)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in vit.parameters() if p.grad is not None])
    assert torch.equal(outs[0], outs[1])
    assert len(grads[0]) == len(grads[1]) > 0 and all(torch.equal(a, b) for a, b in zip(*grads))


def test_drop_mode_with_a_given_count_is_bit_identical():
    """num_masked only replaces the count read from the mask: same output, same gradients, bit for bit."""
    torch.manual_seed(0)
    vit = VisionTransformer(small_config(stem="conv"))
    images = torch.randn(2, 3, 64, 64)
    mask = equal_count_mask(2, 256, 192)
    outs, grads = [], []
    for kw in ({}, {"num_masked": 192}):
        vit.zero_grad()
        _, tok = vit(images, mask, "drop", **kw)
        tok.square().mean().backward()
        outs.append(tok)
        grads.append([p.grad.clone() for p in vit.parameters() if p.grad is not None])
    assert outs[0].shape == (2, 1 + 64, 64)
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads)) and len(grads[0]) == len(grads[1])
    with pytest.raises(ValueError, match="num_masked=100"):
        vit(images, mask, "drop", num_masked=100)


def test_bad_masks_and_inputs_are_clear_errors():
    vit = VisionTransformer(small_config())
    images = torch.randn(2, 3, 64, 64)
    unequal = torch.zeros(2, 256, dtype=torch.bool)
    unequal[0, :5] = True
    unequal[1, :7] = True
    with pytest.raises(ValueError, match="same number of masked"):
        vit(images, unequal, "drop")
    with pytest.raises(ValueError, match="bool tensor"):
        vit(images, torch.zeros(2, 255, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor"):
        vit(images, torch.zeros(2, 256, dtype=torch.long))
    with pytest.raises(ValueError, match="mask_mode"):
        vit(images, unequal, "zero")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        vit(torch.randn(1, 3, 64, 62))
    with pytest.raises(ValueError, match="power-of-2"):
        model_config("tiny", patch_size=6, image_size=60)
    with pytest.raises(ValueError, match="power-of-2"):
        clip.ConvStem(64, 14)
    with pytest.raises(ValueError, match="B/16"):
        model_config("XL/3")
    with pytest.raises(ValueError, match="valid fields"):
        model_config("tiny", widht=3)


# ------------------------------------------------------------------------------------------------
# Named sizes, CLIP wrapper, logit scale
# ------------------------------------------------------------------------------------------------

# Parameter counts of OpenAI's released checkpoints (e.g. HF CLIPModel / keras-hub metadata); our
# model adds exactly one extra vector, the vision mask_token.
OPENAI_PARAMS = {"B/32": 151_277_313, "B/16": 149_620_737, "L/14": 427_616_513}


@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
def test_named_sizes_shapes_and_public_parameter_counts(size):
    cfg = model_config(size)
    with torch.device("meta"):      # no memory, no maths: shapes only
        model = CLIP(cfg)
        images = torch.empty(2, 3, cfg.image_size, cfg.image_size)
        tokens = torch.empty(2, cfg.context_length, dtype=torch.long)
        img, txt, scale, bias = model(images, tokens)
        _, dense = model.visual(images)
        _, feats = model.text(tokens)
    G = cfg.image_size // cfg.patch_size
    assert img.shape == txt.shape == (2, cfg.embed_dim)
    assert dense.shape == (2, 1 + G * G, cfg.vision_width)
    assert feats.shape == (2, cfg.context_length, cfg.text_width)
    assert bias is None and scale.shape == ()
    if size in OPENAI_PARAMS:
        assert count_params(model) - cfg.vision_width == OPENAI_PARAMS[size]
    if size == "tiny":
        assert 1_000_000 <= count_params(model) <= 2_000_000


def test_tiny_forward_is_normalised_and_encoders_agree():
    torch.manual_seed(0)
    model = CLIP(small_config())
    images = torch.randn(3, 3, 64, 64)
    tokens = torch.randint(4, 260, (3, 20))
    tokens[:, 15] = 2
    img, txt, scale, bias = model(images, tokens)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    raw = model.visual(images)[0]
    torch.testing.assert_close(img, raw / raw.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(model.encode_image(images, normalize=False), raw)
    torch.testing.assert_close(model.encode_text(tokens), txt)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-6) and bias is None
    # patches=True: the unit patch features normalise(proj(t_p)), the same tokens and embedding; with
    # pool="unitmean" (the tiny default) the embedding is their mean, with "cls" proj of the class token
    for pool in ("unitmean", "cls"):
        torch.manual_seed(0)
        model = CLIP(small_config(pool=pool))
        emb, tok = model.visual(images)
        emb2, tok2, unit = model.visual(images, patches=True)
        want = model.visual.proj(tok[:, 1:])
        want = want / want.norm(dim=-1, keepdim=True)                  # [3, N, E]
        torch.testing.assert_close(unit, want)
        torch.testing.assert_close(tok2, tok)
        torch.testing.assert_close(emb2, emb)
        torch.testing.assert_close(emb, want.mean(1) if pool == "unitmean" else model.visual.proj(tok[:, 0]))


def unit_mean(features):
    """The mean of unit vectors, written as a loop over the rows: [N, E] -> [E]."""
    total = torch.zeros(features.shape[-1])
    for f in features:
        total = total + f / math.sqrt(float((f * f).sum()))
    return total / len(features)


@pytest.mark.parametrize("pool", ["cls", "mean", "unitmean"])
def test_image_embedding_pools_the_class_token_or_the_patch_mean(pool):
    """pool="cls": proj of the class token after ln_post; pool="mean": proj of the mean of the N patch
    tokens after ln_post (open_clip's pool_type="avg"); pool="unitmean": the mean of the patch features
    proj(t_p), each divided by its length; each recomputed here by hand from the blocks; with drop
    masking the mean runs over the visible patches only."""
    torch.manual_seed(0)
    vit = CLIP(small_config(pool=pool)).visual
    images = torch.randn(2, 3, 64, 64)
    x = vit.embed(images)
    for blk in vit.blocks:
        x = blk(x)
    t = F.layer_norm(x, (x.shape[-1],), vit.ln_post.weight, vit.ln_post.bias, eps=vit.ln_post.eps)  # [2, 1+N, D]
    N = t.shape[1] - 1                                                     # 256 patches of 4 px
    W = vit.proj.weight.T                                                  # [D, E]
    def by_hand(t):                                                        # [2, 1+n, D] -> [2, E]
        if pool == "unitmean":
            return torch.stack([unit_mean(t[b, 1:] @ W) for b in range(2)])
        return (t[:, 0] if pool == "cls" else t[:, 1:].sum(1) / (t.shape[1] - 1)) @ W
    torch.testing.assert_close(vit(images)[0], by_hand(t))
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[:, ::2] = True                                                    # hide every other patch
    emb, tok = vit(images, mask=mask, mask_mode="drop")
    assert tok.shape[1] == 1 + N // 2
    torch.testing.assert_close(emb, by_hand(tok))
    # what SILC's head reads: the class token, or the patch mean in the tower's width for both means
    torch.testing.assert_close(vit.pooled(tok), tok[:, 0] if pool == "cls" else tok[:, 1:].sum(1) / (N // 2))
    with pytest.raises(ValueError, match="pool"):
        small_config(pool="max")


def test_logit_scale_clamp_and_bias():
    model = CLIP(small_config(init_logit_scale=math.log(10), init_logit_bias=-10.0))
    assert isinstance(model.logit_bias, nn.Parameter) and model.logit_bias.item() == -10.0
    assert model(torch.randn(1, 3, 64, 64), torch.tensor([[1, 2]]))[2].item() == pytest.approx(10.0)
    for value, expected in [(7.0, math.log(100)), (-3.0, 0.0), (2.0, 2.0)]:
        model.logit_scale.data.fill_(value)
        model.clamp_logit_scale()
        assert model.logit_scale.item() == pytest.approx(expected)


def test_init_follows_open_clip_stds():
    torch.manual_seed(0)
    cfg = model_config("tiny", text_width=256, text_layers=4, text_heads=4)
    model = CLIP(cfg)
    W, L = 256, 4
    blk = model.text.blocks[0]
    for tensor, std in [(model.text.token_embedding.weight, 0.02), (model.text.pos_embed, 0.01),
                        (blk.attn.in_proj.weight, W ** -0.5), (blk.attn.out_proj.weight, W ** -0.5 / math.sqrt(2 * L)),
                        (blk.mlp.fc1.weight, (2 * W) ** -0.5), (model.text.proj.weight, W ** -0.5),
                        (model.visual.pos_embed, 128 ** -0.5)]:
        assert tensor.std().item() == pytest.approx(std, rel=0.1)
    assert torch.all(model.visual.mask_token == 0) and torch.all(blk.attn.in_proj.bias == 0)


# ------------------------------------------------------------------------------------------------
# FLOP estimates, checked against PyTorch's own FLOP counter
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["cls", "unitmean"])
@pytest.mark.parametrize("stem", ["linear", "conv"])
def test_flops_match_torch_flop_counter(stem, pool):
    # The counter sees matmuls and convolutions; the MATH attention backend spells attention out as
    # matmuls (the fused CPU kernel is not counted), so every term of our formula is measured.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = small_config(stem=stem, pool=pool)            # unitmean projects every patch, not one token
    model = CLIP(cfg)

    def measured(fn, *args):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fn(*args)
        return counter.get_total_flops()

    assert measured(model.visual, torch.randn(1, 3, 64, 64)) == flops_per_image(cfg)
    assert measured(model.text, torch.full((1, cfg.context_length), 2)) == flops_per_text(cfg)
    # drop mode: only the 64 visible tokens (+ class token) enter the blocks
    mask = equal_count_mask(1, 256, 192)
    assert measured(model.visual, torch.randn(1, 3, 64, 64), mask, "drop") == flops_per_image(cfg, n_visible=64)
    # a different resolution (interpolated position grid)
    assert measured(model.visual, torch.randn(1, 3, 32, 32)) == flops_per_image(cfg, image_size=32)


def test_trim_padding_is_exact_and_keeps_rows_without_eot():
    from clip import trim_padding
    torch.manual_seed(0)
    cfg = small_config()
    text = TextTransformer(cfg).eval()
    tokens = torch.zeros(3, cfg.context_length, dtype=torch.long)
    for row, n in enumerate([5, 9, 3]):                 # SOT, n bytes, EOT, padding
        tokens[row, 0] = 1
        tokens[row, 1:n + 1] = torch.randint(4, 260, (n,))
        tokens[row, n + 1] = cfg.eot_token_id
    trimmed = trim_padding(tokens, cfg.eot_token_id)
    assert trimmed.shape == (3, 11)                     # longest row: SOT + 9 + EOT
    with torch.no_grad():
        full, _ = text(tokens)
        short, _ = text(trimmed)
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)
    no_eot = tokens.clone()
    no_eot[1, 10] = 7
    assert trim_padding(no_eot, cfg.eot_token_id) is no_eot


def test_conv_stem_normalises_each_channel_over_its_own_image():
    """clip.ConvStem's norm is an instance norm: after the first conv + norm, each channel of each
    image has mean 0 and variance 1 over that image's positions (checked against the formula), an
    image's tokens do not depend on its batch-mates (a BatchNorm would fail this), and the stem sees
    contrast, not exposure: scaling an image's pixels by 2.5 leaves its tokens unchanged up to the
    norm's eps (the convs before a norm have no bias)."""
    torch.manual_seed(0)
    stem = clip.ConvStem(64, 8, extra=2).eval()
    conv, norm = stem[0], stem[1]
    assert conv.bias is None
    x = torch.randn(5, 3, 64, 64)
    h = conv(x)                                                                   # [5, C, 32, 32]
    by_hand = (h - h.mean((2, 3), keepdim=True)) / torch.sqrt(h.var((2, 3), unbiased=False, keepdim=True) + norm.eps)
    torch.testing.assert_close(norm(h), by_hand * norm.weight[:, None, None] + norm.bias[:, None, None])
    alone = stem(x[:1])
    torch.testing.assert_close(stem(x)[:1], alone, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stem(torch.cat([x[:1], 3 * torch.randn(4, 3, 64, 64)]))[:1], alone, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stem(2.5 * x[:1]), alone, atol=1e-4, rtol=1e-4)
    assert (stem(x[1:2]) - alone).abs().max() > 0.1                                 # a different image differs
