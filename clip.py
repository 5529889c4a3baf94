"""CLIP: one image encoder and one text encoder trained to meet in a shared embedding space.

CLIP (Radford et al. 2021) encodes an image with a Vision Transformer (ViT) and a caption with a
causal text Transformer, projects both into a joint space of dimension E, and L2-normalises them.
The similarity of image i and caption j is a scaled cosine

    logits[i, j] = exp(s) * <f(image_i) / |f(image_i)|, g(text_j) / |g(text_j)|>     (+ b for SigLIP)

with a learnable temperature s (init ln(1/0.07), clamped to [0, ln 100] after every optimizer
step). The softmax loss (CLIP) and the sigmoid loss (SigLIP, Zhai et al. 2023, which adds the
learnable bias b, init -10 with s init ln 10) live in losses.py; this file is only the model.

Vision tower, in the order the data flows (pre-norm ViT exactly as in OpenAI CLIP / open_clip, so
public checkpoints map onto it name by name):

    image [B, 3, H, W] --stem--> patch tokens [B, N, D]         N = (H / p) * (W / p)
      + position embedding (bicubic-resized when the grid differs from the training grid)
      (optional masking: replace masked tokens by a mask token, or drop them)
      prepend the class token -> ln_pre -> L x Block -> ln_post
      embed  = proj(ln_post(x)[:, 0])          [B, E]   (the pooled image embedding; pool="mean":
                                                            proj(mean of ln_post(x)[:, 1:]); pool="unitmean":
                                                            mean of the unit patch features, below)
      tokens = ln_post(x)                      [B, 1+N, D] (dense features; proj(tokens[:, 1:]) are
                                                            patch features in the joint space)

    Block(x):  x = x + Attention(ln_1(x));  x = x + MLP(ln_2(x))
    Attention: softmax(Q K^T / sqrt(d)) V per head, via F.scaled_dot_product_attention.

Two stems turn pixels into patch tokens:
  * "linear": a p x p convolution with stride p (one linear map per patch), as in public CLIP.
  * "conv": Xiao et al. 2021, "Early convolutions help transformers see better": log2(p) stride-2
    3x3 convolutions (each followed by a norm and ReLU), `stem_convs` stride-1 3x3 convolutions at
    the patch grid, and a final 1x1 convolution. On the small shapes world it learns shape far
    faster than the linear stem (docs/experiments.md, "The conv stem").
    BatchNorm (Xiao et al.'s choice) is replaced by an instance norm (each channel over the
    positions of its own image): BatchNorm mixes the samples of a batch, which would make an
    image's features depend on its batch-mates (breaking masking invariances and
    DDP-vs-single-process equality).

Masked inputs (for MaskCLIP, Dong et al. 2022, and iBOT-style masked distillation), mask [B, N] bool,
True = masked:
  * mask_mode="token": masked patch embeddings are replaced by a learnable mask_token before the
    position embedding is added (iBOT, Zhou et al. 2022). Sequence length unchanged.
  * mask_mode="drop": masked tokens are removed after the position embedding is added, and only
    the visible ones are encoded (MAE / FLIP style; about 4x cheaper at 75% masking). Every image
    must mask the same number of patches so the batch stays rectangular. The visible tokens are
    gathered with an index of static size (`index_of_false`) rather than by boolean indexing,
    whose data-dependent size torch.compile cannot trace in one graph.
  With the conv stem, neighbouring patches share receptive fields, so a masked patch's pixels
  would leak into its visible neighbours; in BOTH modes we zero the masked patches' pixels before
  the stem, which makes the output exactly invariant to what the masked pixels contain.

Text tower: token + position embedding -> L x Block with a causal mask -> ln_final -> take the
features at the end-of-text (EOT) token (its causal view covers the whole caption) -> proj.
"""

import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Configuration and named sizes
# ----------------------------------------------------------------------------------------------

@dataclass
class CLIPConfig:
    """All the numbers that define a CLIP model. The defaults are the "tiny" CPU model."""
    image_size: int = 64            # training resolution (square); the position grid is image_size // patch_size
    patch_size: int = 8
    stem: str = "conv"              # "linear" (public CLIP) | "conv" (Xiao et al. 2021)
    stem_convs: int = 4             # conv stem: extra 3x3 stride-1 convs at the patch grid (local mixing before attention)
    vision_width: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    mlp_ratio: float = 4.0          # MLP hidden width = mlp_ratio * width (both towers)
    context_length: int = 64        # 64 bytes fit the shapes captions (data.py's byte tokenizer)
    vocab_size: int = 260           # byte tokenizer: 256 bytes + PAD, SOT, EOT, MASK
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    embed_dim: int = 128            # joint image-text space E
    pool: str = "cls"               # image embedding: "cls" (the class token, OpenAI CLIP) | "mean" (of the patch tokens)
                                    # | "unitmean" (of the unit-length patch features: each patch one equal vote)
    act: str = "gelu"               # "gelu" | "quick_gelu" (OpenAI checkpoints use x * sigmoid(1.702 x))
    eot_token_id: int = 2           # text is pooled at the first occurrence of this id
    pad_token_id: int = 0
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None   # e.g. -10 (with init_logit_scale = ln 10) for the sigmoid loss

    def __post_init__(self):
        if self.stem not in ("linear", "conv"):
            raise ValueError(f"stem must be 'linear' or 'conv', got {self.stem!r}")
        if self.pool not in ("cls", "mean", "unitmean"):
            raise ValueError(f"pool must be 'cls', 'mean' or 'unitmean', got {self.pool!r}")
        if self.act not in ("gelu", "quick_gelu"):
            raise ValueError(f"act must be 'gelu' or 'quick_gelu', got {self.act!r}")
        if self.stem == "linear":
            self.stem_convs = 0     # a linear stem has no convs to add: one config per model (e.g. tiny with --stem=linear)
        if self.stem_convs < 0:
            raise ValueError(f"stem_convs must be >= 0, got {self.stem_convs}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.stem == "conv" and not _is_power_of_two(self.patch_size):
            raise ValueError(f"the conv stem needs a power-of-2 patch_size (one stride-2 conv per factor 2), "
                             f"got {self.patch_size}; use stem='linear'")
        for name in ("vision", "text"):
            width, heads = getattr(self, f"{name}_width"), getattr(self, f"{name}_heads")
            if width % heads != 0:
                raise ValueError(f"{name}_width {width} is not divisible by {name}_heads {heads}")
        for name in ("eot_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})")


# The sizes that mirror public checkpoints take the OpenAI / open_clip text setup: BPE vocabulary of
# 49408 ids with EOT = 49407 (the largest id), 77-token context, 224 px images, linear stem.
# Sources: open_clip src/open_clip/model_configs/ViT-{S-16,B-16,B-32,L-14}.json; heads = width / 64
# (open_clip's default head width). OpenAI's released ViTs use QuickGELU (open_clip's "-quickgelu"
# configs); S/16 has no OpenAI checkpoint and keeps open_clip's default GELU.
# NOTE: to train these sizes with data.py's byte tokenizer, override vocab_size, eot_token_id and
# context_length (model_config(size, vocab_size=260, eot_token_id=2, context_length=64)).
_PUBLIC = dict(image_size=224, stem="linear", stem_convs=0, context_length=77, vocab_size=49408,
               eot_token_id=49407, pad_token_id=0, mlp_ratio=4.0)

MODEL_SIZES: dict[str, dict] = {
    # CPU default: 64x64 shapes images, 8-px patches (8x8 grid), conv stem with 4 stride-1 convs at the
    # patch grid and 3 ViT blocks (docs/experiments.md, "The conv stem"); ~1.4M parameters. The image
    # embedding is the mean of the unit patch features (pool="unitmean"; VisionTransformer.joint_embedding).
    # 8-px patches: a training step costs ~4x less than with 4-px patches (64 vs 256 tokens), which
    # is what lets `python train.py` see ~30k samples in ~8 CPU minutes. patch_size=4 gives a finer
    # segmentation grid at 4x the cost.
    "tiny": dict(image_size=64, patch_size=8, stem="conv", stem_convs=4, vision_width=128, vision_layers=3,
                 vision_heads=4, mlp_ratio=4.0, context_length=64, vocab_size=260, text_width=128,
                 text_layers=3, text_heads=4, embed_dim=128, act="gelu", eot_token_id=2, pad_token_id=0,
                 pool="unitmean"),
    # open_clip ViT-S-16.json: embed 384, vision 384/12, text 384/12/6 (no public OpenAI weights).
    "S/16": dict(_PUBLIC, patch_size=16, vision_width=384, vision_layers=12, vision_heads=6,
                 text_width=384, text_layers=12, text_heads=6, embed_dim=384, act="gelu"),
    # OpenAI CLIP ViT-B/16 and ViT-B/32: vision 768/12/12, text 512/12/8, embed 512.
    "B/16": dict(_PUBLIC, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                 text_width=512, text_layers=12, text_heads=8, embed_dim=512, act="quick_gelu"),
    "B/32": dict(_PUBLIC, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
                 text_width=512, text_layers=12, text_heads=8, embed_dim=512, act="quick_gelu"),
    # OpenAI CLIP ViT-L/14: vision 1024/24/16, text 768/12/12, embed 768.
    "L/14": dict(_PUBLIC, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                 text_width=768, text_layers=12, text_heads=12, embed_dim=768, act="quick_gelu"),
}


def model_config(size: str, **overrides) -> CLIPConfig:
    """The CLIPConfig of a named size, with any field overridden, e.g. model_config("B/16", stem="conv")."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    valid = {f.name for f in fields(CLIPConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown CLIPConfig field(s) {unknown}; valid fields: {sorted(valid)}")
    return replace(CLIPConfig(), **{**MODEL_SIZES[size], **overrides})


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


# ----------------------------------------------------------------------------------------------
# Transformer pieces shared by both towers
# ----------------------------------------------------------------------------------------------

class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI CLIP was trained with (kept for its checkpoints)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention, softmax(Q K^T / sqrt(d)) V per head.

    in_proj holds [W_q; W_k; W_v] stacked as rows (the layout of nn.MultiheadAttention's
    in_proj_weight, so open_clip weights copy over unchanged); heads are consecutive chunks of d.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, D = x.shape                                                        # x: [B, N, D]
        h = self.num_heads
        qkv = self.in_proj(x).reshape(B, N, 3, h, D // h).permute(2, 0, 3, 1, 4)  # [3, B, h, N, d]
        q, k, v = qkv.unbind(0)                                                  # each [B, h, N, d]
        # SDPA picks a fused kernel (flash / memory-efficient) when it can; same maths as the naive form.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # [B, h, N, d]
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))               # [B, N, D]


class Block(nn.Module):
    """Pre-norm Transformer block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, act: str = "gelu"):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.ln_2 = nn.LayerNorm(dim)
        # open_clip names these c_fc / gelu / c_proj; fc1 / act / fc2 here.
        self.mlp = nn.Sequential(OrderedDict(
            fc1=nn.Linear(dim, hidden),
            act=QuickGELU() if act == "quick_gelu" else nn.GELU(),
            fc2=nn.Linear(hidden, dim),
        ))

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.mlp(self.ln_2(x))
        return x


def init_blocks_(blocks: nn.ModuleList, width: int):
    """Initialise a stack of Blocks the way OpenAI CLIP / open_clip initialise the text Transformer.

    From open_clip's TextTransformer.init_parameters (and OpenAI's CLIP.initialize_parameters):
    in_proj std width^-0.5, out_proj and fc2 std width^-0.5 * (2 * layers)^-0.5 (the residual
    branches shrink with depth so the residual stream's variance stays bounded), fc1 std
    (2 width)^-0.5. open_clip leaves its ViT blocks at PyTorch defaults; we use this one rule for
    both towers. Attention biases start at zero (as in nn.MultiheadAttention); MLP biases keep
    nn.Linear's default.
    """
    attn_std = width ** -0.5
    proj_std = width ** -0.5 * (2 * len(blocks)) ** -0.5
    fc_std = (2 * width) ** -0.5
    for blk in blocks:
        nn.init.normal_(blk.attn.in_proj.weight, std=attn_std)
        nn.init.zeros_(blk.attn.in_proj.bias)
        nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(blk.attn.out_proj.bias)
        nn.init.normal_(blk.mlp.fc1.weight, std=fc_std)
        nn.init.normal_(blk.mlp.fc2.weight, std=proj_std)


# ----------------------------------------------------------------------------------------------
# Vision tower
# ----------------------------------------------------------------------------------------------

def conv_stem_channels(width: int, patch_size: int) -> list[int]:
    """Output channels of the stride-2 convs of ConvStem: doubling up to width / 2, e.g. (128, 4) -> [32, 64]."""
    n = int(math.log2(patch_size))
    return [max(width // 2 ** (n - i), 8) for i in range(n)]


def channels_last(w: torch.Tensor) -> torch.Tensor:
    """A copy of a conv weight [O, C, kh, kw] in channels-last memory, with the canonical channels-last
    strides (kh kw C, 1, kw C, C) even where kh = kw = 1. Tensor.contiguous(memory_format=channels_last)
    leaves a [O, C, 1, 1] tensor's strides (C, 1, 1, 1) as they are: the same memory, but not the
    strides that channels-last kernels give its gradient."""
    return w.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format).permute(0, 3, 1, 2)


class ConvStem(nn.Sequential):
    """Early convolutions (Xiao et al. 2021): log2(p) x [3x3 conv stride 2 -> norm -> ReLU], then
    `extra` x [3x3 conv stride 1 -> norm -> ReLU] at the patch grid, then a 1x1 conv.

    Maps [B, 3, H, W] to [B, width, H/p, W/p], like the linear stem, but each token now summarises
    its patch through a small convolutional hierarchy (with some overlap into neighbouring patches),
    and the stride-1 convs mix each token with its 8 neighbours before any attention has learned to.

    The norm is an instance norm (GroupNorm with one group per channel): each channel is normalised
    over the positions of its own image. Xiao et al. use BatchNorm; a per-image norm keeps every
    image independent of the others. It must not be a LayerNorm over the channels of each pixel:
    that scales a flat background pixel and an edge pixel to the same size, so edges, which is what
    a shape is made of, no longer stand out. Measured on the shapes world (docs/experiments.md,
    "The conv stem"): with the per-pixel LayerNorm the tiny ViT stays at chance for 150 supervised
    steps; with the instance norm and 2 extra convs it is at 73% single-shape top-1 after 200.
    """

    def __init__(self, width: int, patch_size: int, extra: int = 0):
        if not _is_power_of_two(patch_size):
            raise ValueError(f"ConvStem needs a power-of-2 patch_size, got {patch_size}")
        layers, c_in = [], 3
        for c_out in conv_stem_channels(width, patch_size):
            # no bias: the norm right after it subtracts each channel's mean, a bias with it
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False),
                       nn.GroupNorm(c_out, c_out), nn.ReLU()]
            c_in = c_out
        for _ in range(extra):
            layers += [nn.Conv2d(c_in, c_in, kernel_size=3, stride=1, padding=1, bias=False),
                       nn.GroupNorm(c_in, c_in), nn.ReLU()]
        layers.append(nn.Conv2d(c_in, width, kernel_size=1))
        super().__init__(*layers)

    def channels_last_(self):
        """Give the convs that read channels-last activations (all but the first) channels-last weights,
        in place. train.build_student calls it on GPUs and under torch.compile.

        A convolution runs channels-last when its input or its weight is, and its output stays so
        through the instance norms and ReLUs; with these weights every activation after the first conv
        is channels-last on a GPU. The GPU's convolutions (cuDNN) and the compiled backward (inductor,
        on CPUs too: SILC's 1x1 conv gradient, summed over the global and the local crops, comes back
        as (C, 1, C, C)) then return channels-last weight gradients, and a gradient must take its
        parameter's strides: with contiguous weights, autograd copies each such 3x3 gradient into the
        parameter's layout, and the 1x1 conv's gradient, the same memory in strides that differ only on
        its size-1 axes, makes DDP warn "Grad strides do not match bucket view strides" (DDP compares
        strides literally). With channels-last weights, weights, gradients and DDP's buckets share one
        layout. The first conv reads the image, contiguous, and keeps a contiguous weight.
        Not in eager mode on a CPU: there oneDNN returns each weight gradient in its weight's own layout,
        so contiguous weights already agree, and a reduction over a channels-last gradient (the norm of
        gradient clipping) adds in another order: the CPU default run would no longer repeat bit for
        bit (docs/benchmarks.md)."""
        for conv in [m for m in self if isinstance(m, nn.Conv2d)][1:]:
            conv.weight.data = channels_last(conv.weight.data)
        return self


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Resize a ViT position embedding [1 + G*G, D] (class token first) to a grid_h x grid_w grid.

    The class token's embedding is kept apart; the G x G patch embeddings are treated as a
    D-channel image and resized bicubically (as DINO does for its small local crops).
    At the training grid the parameter itself is returned (exact identity, no resampling).
    """
    n_patches, D = pos_embed.shape[0] - 1, pos_embed.shape[1]
    G = math.isqrt(n_patches)
    if G * G != n_patches:
        raise ValueError(f"pos_embed has {n_patches} patch positions, not a square grid")
    if (grid_h, grid_w) == (G, G):
        return pos_embed
    grid = pos_embed[1:].reshape(1, G, G, D).permute(0, 3, 1, 2)                 # [1, D, G, G]
    # Resample in at least float32 (bicubic in bf16 would add visible rounding noise).
    grid = grid.to(torch.promote_types(grid.dtype, torch.float32))
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, D).to(pos_embed.dtype)  # [gh*gw, D]
    return torch.cat([pos_embed[:1], grid], dim=0)                               # [1 + gh*gw, D]


def _check_mask(mask, B, N, mask_mode, num_masked=None):
    """Validate a patch mask: bool [B, N]; in drop mode the same masked count in every row (and
    equal to num_masked when that is given). The count checks read tensor values, so they run
    eagerly only: under torch.compile they would break the graph."""
    if mask_mode not in ("token", "drop"):
        raise ValueError(f"mask_mode must be 'token' or 'drop', got {mask_mode!r}")
    if mask.dtype != torch.bool or tuple(mask.shape) != (B, N):
        raise ValueError(f"mask must be a bool tensor of shape [B, N] = [{B}, {N}], "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if mask_mode == "drop" and not torch.compiler.is_compiling():
        counts = mask.sum(dim=1)                                                  # [B]
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"mask_mode='drop' needs the same number of masked patches in every "
                             f"image, got counts {counts.tolist()}")
        if num_masked is not None and int(counts[0]) != num_masked:
            raise ValueError(f"num_masked={num_masked} but the mask hides {int(counts[0])} patches per image")


def index_of_false(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The positions where a bool mask [B, N] is False, `count` per row, in increasing order:
    long [B, count]. Every row must hold exactly `count` False entries.

    It is x[~mask] with a static shape: gathering with it gives the same tensor, bit for bit, as
    boolean indexing (same elements, same row-major order), but the output's size comes from the
    Python int `count` instead of from the mask's values. Boolean indexing has a data-dependent
    size (a nonzero() under the hood), which makes torch.compile break the graph and makes a GPU
    wait for the count. A STABLE sort of the 0/1 mask puts the False (0) positions first and keeps
    them in their original order."""
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)            # [B, N]
    return order[:, :count]                                                    # [B, count]


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], index long [B, n] -> x[b, index[b, i]] as [B, n, D]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class VisionTransformer(nn.Module):
    """ViT image encoder. forward(images, mask=None, mask_mode="token", num_masked=None)
    -> (embed [B, E], tokens [B, 1+N', D])."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        D, p = config.vision_width, config.patch_size
        self.patch_size = p
        self.grid_size = config.image_size // p                  # training grid G (G x G patches)
        self.stem_type = config.stem
        self.pool = config.pool
        if config.stem == "linear":
            # One linear map per non-overlapping patch; no bias, as in OpenAI CLIP's conv1.
            self.stem = nn.Conv2d(3, D, kernel_size=p, stride=p, bias=False)
        else:
            self.stem = ConvStem(D, p, config.stem_convs)
        scale = D ** -0.5
        # open_clip VisionTransformer: class and position embeddings ~ N(0, width^-0.5), proj likewise.
        self.cls_token = nn.Parameter(scale * torch.randn(D))                          # [D]
        self.pos_embed = nn.Parameter(scale * torch.randn(1 + self.grid_size ** 2, D))  # [1 + G*G, D]
        # iBOT initialises its mask token at zero; it is learned like any other embedding.
        self.mask_token = nn.Parameter(torch.zeros(D))                                 # [D]
        self.ln_pre = nn.LayerNorm(D)
        self.blocks = nn.ModuleList(Block(D, config.vision_heads, config.mlp_ratio, config.act)
                                    for _ in range(config.vision_layers))
        self.ln_post = nn.LayerNorm(D)
        self.proj = nn.Linear(D, config.embed_dim, bias=False)
        init_blocks_(self.blocks, D)
        nn.init.normal_(self.proj.weight, std=scale)

    def pos_embed_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embedding [1 + grid_h*grid_w, D] for an input grid (identity at the training grid)."""
        return interpolate_pos_embed(self.pos_embed, grid_h, grid_w)

    def embed(self, images, mask=None, mask_mode="token", num_masked=None):
        """Pixels -> the token sequence entering the first block: [B, 1+N', D] (after ln_pre).
        num_masked (drop mode, optional): the masked count per image, as a Python int. Give it
        when it is known (train.py knows it from the mask ratio): the kept sequence length then
        needs no look at the mask's values, which torch.compile cannot trace without a break."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        B, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of patch_size {p}")
        gh, gw = H // p, W // p
        N = gh * gw
        if mask is not None:
            _check_mask(mask, B, N, mask_mode, num_masked)
            if self.stem_type == "conv":
                # Overlapping receptive fields: blank the masked patches' pixels so they cannot leak
                # into visible neighbours (output becomes invariant to them, in both mask modes).
                keep = (~mask).reshape(B, 1, gh, gw).to(images.dtype)                 # [B, 1, gh, gw]
                keep = keep.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)    # [B, 1, H, W]
                images = images * keep

        x = self.stem(images)                                  # [B, D, gh, gw]
        x = x.flatten(2).transpose(1, 2)                       # [B, N, D], row-major patch order
        pos = self.pos_embed_for(gh, gw)                       # [1 + N, D]

        if mask is not None and mask_mode == "token":
            # iBOT: the masked patch's content is replaced, its position is still added below.
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)   # [B, N, D]
        x = x + pos[1:]                                        # [B, N, D]
        if mask is not None and mask_mode == "drop":
            # Keep each row's visible tokens, in their original order (= x[~mask], static shape).
            n_visible = N - (int(mask[0].sum()) if num_masked is None else num_masked)
            x = gather_rows(x, index_of_false(mask, n_visible))   # [B, N_vis, D]

        cls = (self.cls_token + pos[0]).to(x.dtype).expand(B, 1, -1)   # [B, 1, D]
        x = torch.cat([cls, x], dim=1)                         # [B, 1 + N', D]
        return self.ln_pre(x)

    def forward(self, images, mask=None, mask_mode="token", num_masked=None, patches=False):
        """-> the image embedding [B, E] and the tokens after ln_post [B, 1 + N', D]; with patches=True
        also the unit patch features [B, N', E] (patch_features), computed once and shared with the
        pool="unitmean" embedding, which averages them."""
        x = self.embed(images, mask, mask_mode, num_masked)    # [B, 1 + N', D]
        for blk in self.blocks:
            x = blk(x)
        tokens = self.ln_post(x)                               # [B, 1 + N', D]
        unit = self.patch_features(tokens[:, 1:]) if patches or self.pool == "unitmean" else None
        embed = self.joint_embedding(tokens, unit)             # [B, E]
        return (embed, tokens, unit) if patches else (embed, tokens)

    def patch_features(self, patch_tokens):
        """The unit patch features in the joint space, normalise(proj(t_p)), [B, N', D] -> [B, N', E]
        (at least float32: bf16 under autocast is promoted): what the dense readouts (eval_seg.py)
        compare with the words."""
        f = self.proj(patch_tokens)                            # [B, N', E]
        return F.normalize(f.to(torch.promote_types(f.dtype, torch.float32)), dim=-1)

    def pooled(self, tokens):
        """The one token that stands for the image, [B, 1+N', D] -> [B, D]: the class token (pool="cls",
        OpenAI CLIP), or the mean of the patch tokens (pool="mean"; open_clip's pool_type="avg"; also
        what SILC's head reads with pool="unitmean").
        With the mean, every patch token is in the embedding the contrastive loss trains, so each
        patch is pushed toward its caption; with the class token only attention carries the loss to
        the patches. Measured on the shapes world: docs/experiments.md, "After the new stem"."""
        return tokens[:, 1:].mean(1) if self.pool in ("mean", "unitmean") else tokens[:, 0]

    def joint_embedding(self, tokens, unit=None):
        """The image embedding in the joint space, [B, 1+N', D] -> [B, E]: proj of the pooled token, or
        with pool="unitmean" the mean of the UNIT patch features, mean_p normalise(proj(t_p)).

        With the unit mean every patch has one equal vote on the embedding's direction. The dense
        readouts (eval_seg.py) compare each patch's direction with the words; with a plain mean a few
        patches of large norm can carry the embedding while the others point anywhere, and the readout,
        which normalises every patch, then counts those others as much as the large ones. Measured on
        the shapes world (docs/experiments.md, "Pooling the unit patch features"): the share of object
        patches that get their own shape's name rises from 39% (class token) to 51%.
        unit: patch_features(tokens[:, 1:]) when the caller has them already."""
        if self.pool == "unitmean":
            unit = self.patch_features(tokens[:, 1:]) if unit is None else unit
            return unit.mean(1)                                               # [B, N', E] -> [B, E]
        return self.proj(self.pooled(tokens))


# ----------------------------------------------------------------------------------------------
# Text tower
# ----------------------------------------------------------------------------------------------

def trim_padding(tokens: torch.Tensor, eot_token_id: int) -> torch.Tensor:
    """[B, L] -> [B, L'] without the columns after the batch's last end-of-text token.

    Exact, not an approximation: the text tower is causal and pools at the first EOT, so positions
    after it cannot change any output; short captions in a long context cost far less this way.
    A row without an EOT leaves the batch untouched (the tower then raises its own clear error).
    Callers skip it under torch.compile, where a changing shape would recompile."""
    is_eot = tokens == eot_token_id                                     # [B, L]
    if not bool(is_eot.any(dim=1).all()):
        return tokens
    return tokens[:, :int(is_eot.int().argmax(dim=1).max()) + 1]


class TextTransformer(nn.Module):
    """Causal text encoder. forward(tokens [B, L]) -> (embed [B, E], token_features [B, L, W])."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        W = config.text_width
        self.context_length = config.context_length
        self.eot_token_id = config.eot_token_id
        self.token_embedding = nn.Embedding(config.vocab_size, W)
        self.pos_embed = nn.Parameter(torch.empty(config.context_length, W))   # [L, W]
        self.blocks = nn.ModuleList(Block(W, config.text_heads, config.mlp_ratio, config.act)
                                    for _ in range(config.text_layers))
        self.ln_final = nn.LayerNorm(W)
        self.proj = nn.Linear(W, config.embed_dim, bias=False)
        # open_clip TextTransformer.init_parameters: token emb std 0.02, positions 0.01, proj width^-0.5.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        init_blocks_(self.blocks, W)
        nn.init.normal_(self.proj.weight, std=W ** -0.5)

    def forward(self, tokens):
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"tokens must be [B, L] with L <= context_length {self.context_length}, "
                             f"got {tuple(tokens.shape)}")
        B, L = tokens.shape
        x = self.token_embedding(tokens) + self.pos_embed[:L]    # [B, L, W]
        for blk in self.blocks:
            x = blk(x, is_causal=True)        # token t attends to positions <= t only
        feats = self.ln_final(x)              # [B, L, W]

        # Pool at the first EOT: under the causal mask it is the first position that has read the
        # whole caption (padding after it cannot influence it).
        is_eot = tokens == self.eot_token_id                                     # [B, L]
        # (The check reads values, so it is skipped while tracing for torch.compile or on "meta".)
        if not torch.compiler.is_compiling() and tokens.device.type != "meta":
            if not bool(is_eot.any(dim=1).all()):
                raise ValueError(f"every caption needs an end-of-text token (id {self.eot_token_id}); "
                                 f"rows without one: {(~is_eot.any(dim=1)).nonzero().flatten().tolist()}")
        positions = torch.arange(L, device=tokens.device).expand(B, L)          # [B, L]
        first_eot = torch.where(is_eot, positions, L).amin(dim=1)               # [B]
        pooled = feats[torch.arange(B, device=tokens.device), first_eot]       # [B, W]
        return self.proj(pooled), feats                                          # [B, E], [B, L, W]


# ----------------------------------------------------------------------------------------------
# CLIP: both towers and the temperature
# ----------------------------------------------------------------------------------------------

class CLIP(nn.Module):
    """Image and text towers plus the learnable logit scale s (and optional bias b, for SigLIP)."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config)
        self.text = TextTransformer(config)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))   # scalar s
        if config.init_logit_bias is None:
            self.register_parameter("logit_bias", None)
        else:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))  # scalar b

    def encode_image(self, images, normalize=True):
        embed, _ = self.visual(images)                         # [B, E]
        return F.normalize(embed, dim=-1) if normalize else embed

    def encode_text(self, tokens, normalize=True):
        embed, _ = self.text(tokens)                           # [B, E]
        return F.normalize(embed, dim=-1) if normalize else embed

    def forward(self, images, tokens):
        """-> (image embeddings [B, E] normalised, text embeddings [B, E] normalised, exp(s), b or None)."""
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp(), self.logit_bias

    @torch.no_grad()
    def clamp_logit_scale(self):
        """Keep exp(s) in [1, 100] (CLIP clips the temperature at 100). Call after each optimizer step."""
        self.logit_scale.clamp_(0, math.log(100))


# ----------------------------------------------------------------------------------------------
# Where and in what precision the model runs
# ----------------------------------------------------------------------------------------------

def pick_device(name: str = "auto") -> torch.device:
    """A --device flag -> torch.device; "auto" is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device):
    """The precision the model runs in on `device`, as a context manager: bf16 autocast on CUDA (the
    matmuls in bf16; the losses upcast before they reduce, losses.py), with TF32 allowed for any
    float32 matmul left outside it; plain float32 on the CPU, where bf16 is slower."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.autocast("cuda", dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Size accounting (for logs and MFU estimates)
# ----------------------------------------------------------------------------------------------

def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def transformer_flops(n_tokens: int, width: int, layers: int, mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs of `layers` blocks on n_tokens tokens (a multiply-add counts 2).

    Per block: 2 N (3 D^2 + D^2 + 2 D H) for the linear layers, plus 2 N^2 D for Q K^T and 2 N^2 D
    for the attention-weighted sum of V. Norms, softmax and activations are ignored.
    """
    N, D, H = n_tokens, width, int(width * mlp_ratio)
    return layers * (2 * N * (4 * D * D + 2 * D * H) + 4 * N * N * D)


def flops_per_image(config: CLIPConfig, image_size: int | None = None, n_visible: int | None = None) -> int:
    """Forward FLOPs of the vision tower for one square image (training step ~ 3x this).

    n_visible: number of patch tokens kept (drop-mode masking); default all of them.
    """
    S = config.image_size if image_size is None else image_size
    p, D = config.patch_size, config.vision_width
    g = S // p
    if config.stem == "linear":
        stem = 2 * g * g * (3 * p * p) * D
    else:
        stem, c_in, side = 0, 3, S
        for c_out in conv_stem_channels(D, p):
            side //= 2
            stem += 2 * side * side * c_in * c_out * 9
            c_in = c_out
        stem += config.stem_convs * 2 * g * g * c_in * c_in * 9  # the stride-1 3x3 convs at the patch grid
        stem += 2 * g * g * c_in * D                            # the final 1x1 conv
    n = g * g if n_visible is None else n_visible
    n_proj = n if config.pool == "unitmean" else 1          # unitmean projects every patch, then averages
    return stem + transformer_flops(1 + n, D, config.vision_layers, config.mlp_ratio) + n_proj * 2 * D * config.embed_dim


def flops_per_text(config: CLIPConfig) -> int:
    """Forward FLOPs of the text tower for one caption at full context (causal attention counted in full)."""
    L, W = config.context_length, config.text_width
    return transformer_flops(L, W, config.text_layers, config.mlp_ratio) + 2 * W * config.embed_dim
