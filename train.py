"""
train.py: the training loop that wires every idea of this repository together.

Read it top to bottom, like nanoGPT's train.py: a config, the data, the model, the teacher, the
optimizer, then one loop in which each step does

    1. teacher forward   (no gradient; only for the self-distillation methods)
    2. student forward   -> one scalar loss per objective, summed with their weights
    3. backward, clip, optimizer step, logit-scale clamp
    4. EMA update of the teacher from the student

The objectives (chosen with --method):

    clip           L = L_contrastive(image, caption)                         (CLIP / SigLIP)
    silc           L = mean_g L_contrastive(global view g, caption)
                       + w_sd * L_local->global                              (SILC, Naeem et al. 2023)
    maskclip       L = L_contrastive + lambda * L_masked-distill + beta * L_mlm   (MaskCLIP, Dong et al. 2022)
    silc+maskclip  both self-distillation losses with one teacher            (the SigLIP 2 recipe)

--loss picks the contrastive loss: "softmax" (CLIP, Radford et al. 2021) or "sigmoid" (SigLIP,
Zhai et al. 2023). The pieces live in their own files: clip.py (the model), losses.py (every loss and
head), ema.py (the teacher), masking.py (patch masks), data.py (text, images, crops), eval_seg.py
(zero-shot segmentation).

Run it:
    python train.py                                   # CPU default: tiny CLIP on the shapes data
    python train.py --method=silc --steps=2000        # any Config field as --key=value
    torchrun --nproc_per_node=8 train.py --model=B/16 --data=/data/cc3m/{00000..00331}.tar \\
        --image_size=224 --batch_size=4096 --compile=True

Batch size convention: `batch_size` is the GLOBAL batch of one optimizer step, summed over ranks and
gradient-accumulation micro-steps. So the same config gives the same optimisation problem on 1 or 8
processes (that is what tests/test_train.py checks under DDP).
"""

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from clip import CLIP, model_config, trim_padding
from data import (EOT_ID, MASK_ID, PAD_ID, SHAPES_TEMPLATES, SOT_ID, VOCAB_SIZE, ByteTokenizer,
                  ShapesDataset, build_train_data, collate)
from ema import ema_update, make_teacher
from eval_seg import build_text_classifier, classifier_scores, evaluate_segmentation, load_dataset
from losses import (DINOHead, LocalToGlobalLoss, MaskedDistillLoss, MaskedPatchDecoder, TextMLMDecoder,
                    center_stats, clip_loss, mlm_loss, mlm_mask_tokens, siglip_loss)
from masking import block_mask, num_masked, random_mask
from pretrained import BPETokenizer, convert_state_dict, load_pretrained_into, read_state_dict


# -----------------------------------------------------------------------------------------------
# Config: every default is the CPU-friendly one. Override any field with --key=value.
# -----------------------------------------------------------------------------------------------
@dataclass
class Config:
    # --- run ---
    out_dir: str = "out"
    method: str = "clip"            # clip | silc | maskclip | silc+maskclip
    loss: str = "softmax"           # softmax (CLIP) | sigmoid (SigLIP)
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda | cuda:1 ...
    compile: bool = False           # wrap the model in torch.compile
    resume: bool = False            # continue from out_dir/ckpt.pt
    init_from: str = ""             # a public CLIP checkpoint (OpenAI / open_clip file) to start from
    bpe_path: str = ""              # CLIP's bpe_simple_vocab_16e6.txt.gz (needed with init_from)
    init_act: str = "quick_gelu"    # activation of the init_from checkpoint: quick_gelu (OpenAI) | gelu
    # --- data ---
    data: str = "shapes"            # "shapes" | a .csv/.tsv file | a folder or {a..b} pattern of .tar shards
    subset: float = 0.0             # 0 = all; 0 < x < 1: that fraction; x >= 1: the first int(x) samples
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = "auto"     # auto: tab for .tsv, comma for .csv
    num_workers: int = 1
    image_size: int = 64
    shapes_colour_prob: float = 0.2  # shapes data: fraction of captions that name colours (data.py)
    # --- model ---
    model: str = "tiny"             # tiny | S/16 | B/16 | B/32 | L/14 (see clip.MODEL_SIZES)
    patch_size: int = 0             # 0 = the named size's value; a non-zero value overrides it
    stem: str = ""                  # "" = the named size's; "linear" (public CLIP) | "conv" (Xiao et al. 2021)
    vision_width: int = 0
    vision_layers: int = 0
    text_width: int = 0
    text_layers: int = 0
    embed_dim: int = 0
    # --- optimisation ---
    steps: int = 540
    stop_at: int = 0                # stop (after a checkpoint) at this step; 0 = run to `steps`.
                                    # The schedules still span `steps`: for time-sliced jobs and tests.
    batch_size: int = 64            # global batch per optimizer step (all ranks x accumulation)
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0
    # --- SILC: local-to-global self-distillation ---
    n_local_crops: int = 4
    sd_weight: float = 1.0          # w_sd in L = L_con + w_sd * L_sd
    sd_start: float = 0.0           # fraction of training after which self-distillation switches on
    head_hidden: int = 512          # DINO head sizes (DINO, B/16: 2048 / 256 / 65536)
    head_bottleneck: int = 32       # 32, not DINO's 256: see the note on the teacher below
    head_out: int = 1024            # K prototypes
    teacher_momentum: float = 0.99  # fixed EMA momentum (SILC: a schedule that converges to 1 hurts)
    momentum_schedule: str = "fixed"  # fixed | cosine (DINO: momentum -> 1)
    teacher_temp: float = 0.04      # fixed 0.04 (DINO's warm-up ends at 0.07; see the note below)
    teacher_temp_warmup: float = 0.04  # start value, warmed up linearly to teacher_temp
    # Note on the teacher at CPU scale (measured, --method=silc, seed 0): with bottleneck 128 (DINO:
    # 256) and DINO's 0.04 -> 0.07 the teacher's mean entropy stayed at 6.6-6.85 nats of log K = 6.93
    # for all 540 steps: nearly uniform targets, so almost nothing to distil. Head logits are cosines
    # to random unit prototypes, spread ~1/sqrt(bottleneck). After 150 steps: at 0.04 fixed the entropy
    # was 6.1, with bottleneck 32 as well 4.0, with the contrastive loss unchanged (3.90 vs 3.92, mean
    # of steps 110-150); at 0.02 it fell to 1 nat and the contrastive loss stalled. README: the table;
    # full-scale runs keep DINO's values.
    teacher_temp_warmup_frac: float = 0.3
    student_temp: float = 0.1
    freeze_last_layer_steps: int = 0  # DINO cancels the last head layer's gradient for 1 epoch
    # --- MaskCLIP: masked self-distillation + masked language modelling ---
    mask_ratio: float = -1.0        # -1 = method default: 0.75 (maskclip), 0.5 (silc+maskclip)
    mask_mode: str = "auto"         # auto | drop | token (auto: drop for maskclip, token for silc+maskclip)
    mask_kind: str = "random"       # random | block
    dist_weight: float = -1.0       # -1 = method default: 0.05 (maskclip), 0.25 (silc+maskclip)
    mlm_weight: float = -1.0        # -1 = method default: 0.05 (maskclip), 0 (silc+maskclip)
    mlm_prob: float = 0.2
    decoder_layers: int = 1
    text_decoder_layers: int = 1
    # --- logging, evaluation, checkpoints ---
    log_interval: int = 10
    eval_interval: int = 0          # 0 = only at the end
    ckpt_interval: int = 500
    eval: bool = True               # evaluate at the end (classification, retrieval, segmentation)
    eval_seg: bool = True           # include zero-shot segmentation (eval_seg.py)
    eval_samples: int = 512         # images of each val split used during/after training
    eval_split: str = "val"         # val | tune: choose hyper-parameters on "tune", report "val" once


METHODS = ("clip", "silc", "maskclip", "silc+maskclip")


def parse_args(argv):
    """--key=value overrides of Config. An unknown key or a badly typed value exits with a clear
    message instead of a traceback."""
    cfg = Config()
    types = {f.name: f.type for f in fields(Config)}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__)
            print("Config fields and defaults:")
            for f in fields(Config):
                print(f"  --{f.name}={getattr(cfg, f.name)!r}")
            sys.exit(0)
        if not arg.startswith("--") or "=" not in arg:
            sys.exit(f"error: arguments must look like --key=value, got {arg!r}")
        key, val = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in types:
            sys.exit(f"error: unknown config key {key!r}. Valid keys: {', '.join(types)}")
        typ = types[key]
        try:
            if typ in (bool, "bool"):
                if val.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(val)
                parsed = val.lower() in ("true", "1", "yes")
            elif typ in (int, "int"):
                parsed = int(val)
            elif typ in (float, "float"):
                parsed = float(val)
            else:
                parsed = val
        except ValueError:
            sys.exit(f"error: --{key} expects a {getattr(typ, '__name__', typ)}, got {val!r}")
        setattr(cfg, key, parsed)
    return cfg


def resolve_method_defaults(cfg):
    """Fill the -1 / auto fields with the defaults of the chosen method, and check choices."""
    if cfg.method not in METHODS:
        sys.exit(f"error: --method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.loss not in ("softmax", "sigmoid"):
        sys.exit(f"error: --loss must be softmax or sigmoid, got {cfg.loss!r}")
    both = cfg.method == "silc+maskclip"
    if cfg.mask_ratio < 0:
        cfg.mask_ratio = 0.5 if both else 0.75          # SigLIP 2: 50%; MaskCLIP: 75%
    if cfg.mask_mode == "auto":
        cfg.mask_mode = "token" if both else "drop"     # SigLIP 2 uses mask tokens; FLIP-style drop is cheaper
    if cfg.dist_weight < 0:
        cfg.dist_weight = 0.25 if both else 0.05        # SigLIP 2: 1 and 0.25; MaskCLIP: lambda = 0.05
    if cfg.mlm_weight < 0:
        cfg.mlm_weight = 0.0 if both else 0.05          # MaskCLIP: beta = 0.05; SigLIP 2 has no MLM
    if cfg.mask_mode not in ("drop", "token"):
        sys.exit(f"error: --mask_mode must be drop, token or auto, got {cfg.mask_mode!r}")
    if cfg.mask_kind not in ("random", "block"):
        sys.exit(f"error: --mask_kind must be random or block, got {cfg.mask_kind!r}")
    return cfg


# -----------------------------------------------------------------------------------------------
# Distributed helpers: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; a plain `python train.py` does not.
# -----------------------------------------------------------------------------------------------
def setup_distributed(cfg):
    """Returns (rank, world, local_rank, device, owned). NCCL on CUDA, gloo on CPU. A process group
    that already exists (main() called from a script that set one up) is used as it is, and left
    for its owner to destroy (owned = False)."""
    if cfg.device == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device_type = cfg.device.split(":")[0]
    distributed = dist.is_available() and dist.is_initialized()
    owned = False
    if not distributed and "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        distributed = owned = True
    if distributed:
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        device = torch.device(f"cuda:{local_rank}") if device_type == "cuda" else torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world, local_rank = 0, 1, 0
        device = torch.device(cfg.device if cfg.device != "auto" else device_type)
    return rank, world, local_rank, device, owned


# -----------------------------------------------------------------------------------------------
# Model config and tokenizer: a named size (clip.MODEL_SIZES) with the byte-level tokenizer when
# training from scratch, or the architecture and BPE tokenizer of a public checkpoint (--init_from).
# -----------------------------------------------------------------------------------------------
def build_model_config(cfg):
    sigmoid = dict(init_logit_scale=math.log(10.0), init_logit_bias=-10.0) if cfg.loss == "sigmoid" else {}
    if cfg.init_from:
        if not os.path.exists(cfg.init_from):
            sys.exit(f"error: --init_from file {cfg.init_from!r} does not exist")
        if not cfg.bpe_path or not os.path.exists(cfg.bpe_path):
            sys.exit("error: --init_from needs --bpe_path=.../bpe_simple_vocab_16e6.txt.gz (CLIP's BPE merges), "
                     f"got {cfg.bpe_path!r}")
        ckpt_cfg, _ = convert_state_dict(read_state_dict(cfg.init_from), act=cfg.init_act)
        clip_cfg = dataclasses.replace(ckpt_cfg, image_size=cfg.image_size, **sigmoid)
        return clip_cfg, BPETokenizer(cfg.bpe_path, context_length=clip_cfg.context_length)
    overrides = {k: getattr(cfg, k) for k in ("patch_size", "stem", "vision_width", "vision_layers",
                                              "text_width", "text_layers", "embed_dim") if getattr(cfg, k)}
    try:
        clip_cfg = model_config(cfg.model, image_size=cfg.image_size, vocab_size=VOCAB_SIZE,
                                eot_token_id=EOT_ID, pad_token_id=PAD_ID,
                                context_length=64, **overrides, **sigmoid)
    except ValueError as e:
        sys.exit(f"error: {e}")
    return clip_cfg, ByteTokenizer(clip_cfg.context_length)


# -----------------------------------------------------------------------------------------------
# Data order: a step-indexed sampler, so that a run is reproducible, resumable at any step, and
# identical on 1 or N processes. Global step t reads positions [t*B, (t+1)*B) of an endless stream
# made of per-epoch permutations of the dataset; rank r of W, accumulation micro-step a, takes the
# slice [(a*W + r)*b, (a*W + r + 1)*b) with b = B / (W * accum).
# -----------------------------------------------------------------------------------------------
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


# -----------------------------------------------------------------------------------------------
# The student: CLIP plus whatever heads and decoders the method needs, as ONE nn.Module whose
# forward returns every loss. One module because DDP must see a single forward per step to
# synchronise gradients; the teacher stays outside it (it has no gradients to synchronise).
# -----------------------------------------------------------------------------------------------
class Pretrainer(nn.Module):
    def __init__(self, cfg, clip_cfg):
        super().__init__()
        self.cfg = cfg
        self.use_sd = "silc" in cfg.method
        self.use_mask = "maskclip" in cfg.method
        self.clip = CLIP(clip_cfg)
        if not self.use_mask or cfg.mask_mode == "drop":
            # The ViT's mask token only serves mask_mode="token" (drop mode removes the hidden tokens
            # instead). Frozen, DDP does not wait for a gradient that never comes.
            self.clip.visual.mask_token.requires_grad_(False)
        D = clip_cfg.vision_width
        if self.use_sd:
            # SILC: the DINO head on the class token of every crop (sizes: see Config)
            self.head = DINOHead(D, cfg.head_hidden, cfg.head_bottleneck, cfg.head_out)
            self.l2g_loss = LocalToGlobalLoss(cfg.head_out, student_temp=cfg.student_temp)
        if self.use_mask:
            # MaskCLIP: a separate head (the "online quantizer") for patch tokens, with its own centre
            self.patch_head = DINOHead(D, cfg.head_hidden, cfg.head_bottleneck, cfg.head_out)
            self.mask_loss = MaskedDistillLoss(cfg.head_out, student_temp=cfg.student_temp)
            self.decoder = MaskedPatchDecoder(D, clip_cfg.vision_heads, num_layers=cfg.decoder_layers)
            if cfg.mlm_weight > 0:
                self.text_decoder = TextMLMDecoder(clip_cfg.text_width, clip_cfg.text_heads,
                                                   clip_cfg.vocab_size, num_layers=cfg.text_decoder_layers,
                                                   pad_id=clip_cfg.pad_token_id)
        # the weight of each objective in the total loss
        self.weights = {"contrastive": 1.0, "sd": cfg.sd_weight, "dist": cfg.dist_weight, "mlm": cfg.mlm_weight}

    def image_student(self):
        """The modules the EMA teacher copies: image encoder + heads (the text tower has no teacher)."""
        parts = {"visual": self.clip.visual}
        if self.use_sd:
            parts["head"] = self.head
        if self.use_mask:
            parts["patch_head"] = self.patch_head
        return nn.ModuleDict(parts)

    def encode(self, batch):
        """The contrastive inputs of a micro-batch: L2-normalised image embeddings of every
        text-paired view [n_g, b, E], text embeddings [b, E], and the image tokens [n_g*b, 1+N, D]."""
        txt = F.normalize(self.clip.text(batch["tokens"])[0], dim=-1)          # [b, E]
        if self.use_sd or (self.use_mask and "global_crops" in batch):
            # SILC: every global view is aligned with the caption ("otherwise the two objectives
            # diverge", SILC sec. 3). One encoder forward per resolution: globals here, locals later.
            g = batch["global_crops"]                                           # [2, b, 3, S, S]
        else:
            g = batch["images"].unsqueeze(0)                                    # [1, b, 3, S, S]
        n_g, b = g.shape[:2]
        g_emb, g_tok = self.clip.visual(g.flatten(0, 1))                       # [n_g*b, E], [n_g*b, 1+N, D]
        img = F.normalize(g_emb, dim=-1).view(n_g, b, -1)                       # [n_g, b, E]
        return img, txt, g_tok

    @torch.no_grad()
    def contrastive_features(self, batch):
        """encode() without gradient and without the tokens: what gradient accumulation caches."""
        img, txt, _ = self.encode(batch)
        return img, txt

    def contrastive_loss(self, img, txt, cache=None, slot=0):
        """Mean over the text-paired views of the CLIP / SigLIP loss.

        Gradient accumulation (cache = the contrastive_features of every micro-batch of the step,
        slot = this one's position), as open_clip's --accum-freq: this micro-batch's live features
        replace their cached copy, so the loss is over ALL the step's pairs (all its negatives), and
        only this micro-batch's share of the gradient flows. Summed over the slots, the gradients
        are the full batch's. The temperature (and SigLIP's bias) take their gradient in the last
        slot only: in every slot they receive the whole d loss / d t, which would count k times."""
        scale, bias = self.clip.logit_scale.exp(), self.clip.logit_bias
        if cache is not None:
            imgs, txts = [c[0] for c in cache], [c[1] for c in cache]
            imgs[slot], txts[slot] = img, txt
            img, txt = torch.cat(imgs, dim=1), torch.cat(txts, dim=0)          # [n_g, k*b, E], [k*b, E]
            if slot != len(cache) - 1:
                scale, bias = scale.detach(), (bias.detach() if bias is not None else None)
        if self.cfg.loss == "sigmoid":
            losses = [siglip_loss(img[v], txt, scale, bias) for v in range(img.shape[0])]
        else:
            losses = [clip_loss(img[v], txt, scale) for v in range(img.shape[0])]
        return sum(losses) / len(losses)

    def local_to_global_loss(self, batch, g_tok, teacher_out, teacher_temp):
        """SILC: the student's class token of EVERY view (global and local) must predict the
        teacher's distribution on each OTHER global view."""
        n_g = batch["global_crops"].shape[0]
        student = list(self.head(g_tok[:, 0]).chunk(n_g))                      # n_g x [b, K]
        if batch.get("local_crops") is not None and batch["local_crops"].shape[0] > 0:
            l = batch["local_crops"]                                            # [n, b, 3, s, s]
            _, l_tok = self.clip.visual(l.flatten(0, 1))
            student += list(self.head(l_tok[:, 0]).chunk(l.shape[0]))
        return self.l2g_loss(student, teacher_out["global"], teacher_temp)

    def masked_loss(self, batch, teacher_out, teacher_temp, n_slots=1):
        """MaskCLIP: a SECOND student forward on the masked image; the decoder predicts the
        teacher's patch codes at the hidden positions. The source is the first global view when
        there are crops (teacher and student see the same view)."""
        cfg = self.cfg
        src = batch["global_crops"][0] if "global_crops" in batch else batch["images"]
        mask = batch["patch_mask"]                                              # [b, N] bool
        # The masked count as a Python int (add_masks draws exactly this many per image): the
        # kept and masked token counts are then static shapes, which torch.compile needs.
        n_masked = num_masked(mask.shape[1], cfg.mask_ratio)
        _, m_tok = self.clip.visual(src, mask=mask, mask_mode=cfg.mask_mode, num_masked=n_masked)  # [b, 1+N', D]
        pred = self.decoder(m_tok, mask, self.clip.visual)                      # [b, N, D]
        # every micro-batch of a step hides the same number of patches: the step's count is n_slots x
        return self.mask_loss(self.patch_head(pred), teacher_out["patch"], mask, teacher_temp,
                              num_masked=n_masked, count=mask.sum() * n_slots)

    def mlm(self, batch):
        """MaskCLIP's text branch: a third (text) forward on the corrupted caption; the causal
        encoder's token features go through a small bidirectional decoder that sees both
        directions and never attends to padding."""
        feats = self.clip.text(batch["mlm_inputs"])[1]                          # [b, L, W]
        logits = self.text_decoder(feats, batch["mlm_inputs"])                  # [b, L, V]
        return mlm_loss(logits, batch["mlm_labels"], count=batch.get("mlm_count"))

    def forward(self, batch, teacher_out=None, teacher_temp=0.07, cache=None, slot=0):
        """batch: this rank's micro-batch (see data.collate); teacher_out: the teacher's logits
        (None while self-distillation is off); cache, slot: see contrastive_loss. Returns a dict of
        scalar losses; 'loss' (what backward takes) is their sum with self.weights. Every term but
        the contrastive one is this micro-batch's share of the step's term (summed over the slots
        it is the whole batch's), so the step is the same problem for any grad_accum."""
        n_slots = 1 if cache is None else len(cache)
        img, txt, g_tok = self.encode(batch)
        out = {"contrastive": self.contrastive_loss(img, txt, cache, slot)}
        if teacher_out is not None and self.use_sd:
            out["sd"] = self.local_to_global_loss(batch, g_tok, teacher_out, teacher_temp) / n_slots
        if teacher_out is not None and self.use_mask:
            out["dist"] = self.masked_loss(batch, teacher_out, teacher_temp, n_slots)
            if self.cfg.mlm_weight > 0:
                out["mlm"] = self.mlm(batch)
        out["loss"] = sum(self.weights[k] * v for k, v in out.items())
        return out


@torch.no_grad()
def teacher_forward(teacher, batch, use_sd, use_mask):
    """The EMA teacher sees only full / global views, under no_grad (the stop-gradient of DINO)."""
    out = {}
    src = batch["global_crops"] if "global_crops" in batch else batch["images"].unsqueeze(0)
    n_g, b = src.shape[:2]
    _, tok = teacher["visual"](src.flatten(0, 1))                               # [n_g*b, 1+N, D]
    if use_sd:
        out["global"] = list(teacher["head"](tok[:, 0]).chunk(n_g))             # n_g x [b, K]
    if use_mask:
        out["patch"] = teacher["patch_head"](tok[:b, 1:])                       # [b, N, K] of view 0
    return out


# -----------------------------------------------------------------------------------------------
# Schedules (per step, DINO style): learning rate, teacher temperature, EMA momentum.
# -----------------------------------------------------------------------------------------------
def lr_at(step, cfg):
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def teacher_temp_at(step, cfg, start_step):
    """DINO: the teacher temperature warms up linearly (0.04 -> 0.07); sharper early targets keep the
    freshly started distillation from collapsing to the uniform distribution. The CPU default keeps
    it fixed at 0.04 (start = end; see Config)."""
    warm = max(1, int(cfg.teacher_temp_warmup_frac * (cfg.steps - start_step)))
    t = min(1.0, (step - start_step) / warm)
    return cfg.teacher_temp_warmup + t * (cfg.teacher_temp - cfg.teacher_temp_warmup)


def momentum_at(step, cfg, start_step):
    """SILC keeps the EMA momentum FIXED: "the momentum scheduler of the EMA should not converge to
    1.0". DINO's cosine schedule (base -> 1) is the option."""
    if cfg.momentum_schedule == "fixed":
        return cfg.teacher_momentum
    progress = (step - start_step) / max(1, cfg.steps - start_step)
    return 1.0 - (1.0 - cfg.teacher_momentum) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, cfg, device):
    """AdamW; no weight decay on tensors with fewer than 2 dimensions (biases, norm gains, the logit
    scale/bias) nor on the position / class / mask embeddings (open_clip's rule, plus embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "pos_embed" in name or "cls_token" in name or "mask_token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **extra)


# -----------------------------------------------------------------------------------------------
# Checkpoints: written atomically (temporary file + os.replace), so a crash in the middle of a
# save leaves the previous checkpoint intact. Only tensors, numbers, strings, lists and dicts go in,
# so they load with torch.load(weights_only=True). No random-number state is saved because the loop
# draws from no global generator: every crop is seeded by its sample (SeededSample), every patch
# mask and MLM corruption by (seed, step, sample index) (add_masks). Resume is exact by construction.
# -----------------------------------------------------------------------------------------------
def save_checkpoint(path, pretrainer, teacher, optimizer, step, cfg):
    sd = pretrainer.state_dict()
    ckpt = {
        "model": {k[len("clip."):]: v for k, v in sd.items() if k.startswith("clip.")},  # a plain CLIP
        "model_config": dataclasses.asdict(pretrainer.clip.config),
        "extra": {k: v for k, v in sd.items() if not k.startswith("clip.")},  # heads, decoders, centres
        "teacher": teacher.state_dict() if teacher is not None else None,
        "optimizer": optimizer.state_dict(),
        "step": step,
        "config": dataclasses.asdict(cfg),
    }
    atomic_save(ckpt, path)


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, flushed to disk, then renamed over `path`:
    os.replace is atomic on POSIX, so `path` always holds a whole file, the old one or the new one,
    even if the process is killed mid-write (tests/test_train.py kills one with SIGKILL)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.exists(path):
        sys.exit(f"error: --resume was given but there is no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


# -----------------------------------------------------------------------------------------------
# Evaluation on the shapes val splits: validation loss, zero-shot shape classification (class names
# in prompt templates, as CLIP does for ImageNet), image<->text retrieval, and zero-shot segmentation.
# -----------------------------------------------------------------------------------------------
def recall_at_k(sim, match, ks=(1, 5)):
    """R@k: the fraction of queries that find a correct candidate among their k most similar ones.

    sim: [Q, C] similarities; match: [Q, C] bool, True where candidate c is a correct answer for
    query q (shapes captions repeat, "two circles", so every candidate with the same caption counts).
    A query's rank is the number of WRONG candidates at least as similar as its best correct one:
    ties count against the query, so a model that scores everything alike gets no credit."""
    best = torch.where(match, sim, float("-inf")).max(dim=1).values           # [Q]
    rank = ((sim >= best[:, None]) & ~match).sum(dim=1)                         # [Q]
    return {k: (rank < k).float().mean().item() for k in ks}


@torch.no_grad()
def evaluate(clip, cfg, tokenizer, device, autocast_ctx, with_seg=False):
    if cfg.data != "shapes":
        return {}  # real image-text data has no labelled val split here; use eval_seg.py on a dataset
    was_training = clip.training
    clip.eval()
    metrics = {}
    # --- retrieval + val loss on the multi-object val split ---
    val = ShapesDataset(cfg.eval_split, size=cfg.image_size, length=cfg.eval_samples, seed=0)
    imgs, txts, caps, losses = [], [], [], []
    for i in range(0, len(val), 250):
        batch = collate([val[j] for j in range(i, min(i + 250, len(val)))], tokenizer)
        with autocast_ctx:
            im, tx, scale, bias = clip(batch["images"].to(device), batch["tokens"].to(device))
        im, tx = im.float(), tx.float()
        logits = scale * im @ tx.T + (bias if bias is not None else 0.0)
        labels = torch.arange(len(im), device=device)
        losses.append(0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)).item())
        imgs.append(im)
        txts.append(tx)
        caps += batch["captions"]
    im, tx = torch.cat(imgs), torch.cat(txts)
    same = torch.tensor([[a == b for b in caps] for a in caps], device=device)  # [n, n]
    sim = im @ tx.T
    i2t, t2i = recall_at_k(sim, same), recall_at_k(sim.T, same)
    metrics.update(val_loss=float(np.mean(losses)), i2t_r1=i2t[1], i2t_r5=i2t[5], t2i_r1=t2i[1], t2i_r5=t2i[5])
    # --- zero-shot classification on single-object images ---
    single = ShapesDataset(cfg.eval_split + "_single", size=cfg.image_size, length=cfg.eval_samples, seed=0)
    names = [[n] for n in single.class_names]
    classifier = build_text_classifier(clip, tokenizer, names, SHAPES_TEMPLATES, device=device)
    correct = 0
    for i in range(0, len(single), 250):
        batch = collate([single[j] for j in range(i, min(i + 250, len(single)))], tokenizer)
        with autocast_ctx:
            im = clip.encode_image(batch["images"].to(device)).float()
        pred = classifier_scores(im, classifier).argmax(dim=1).cpu()
        correct += (pred == batch["labels"]).sum().item()
    metrics["zeroshot_acc"] = correct / len(single)
    # --- zero-shot segmentation (eval_seg.py) ---
    if with_seg:
        seg_data = load_dataset("shapes", split=cfg.eval_split, size=cfg.image_size, length=cfg.eval_samples)
        for dense in ("naive", "maskclip"):
            seg = evaluate_segmentation(clip, tokenizer, dataset=seg_data, dense=dense, device=device,
                                        out_dir=os.path.join(cfg.out_dir, f"seg_{dense}"),
                                        image_size=cfg.image_size, max_images=cfg.eval_samples)
            metrics[f"miou_{dense}"] = seg["miou"]
            metrics[f"fg_miou_{dense}"] = seg["fg_miou"]
    clip.train(was_training)
    return metrics


# -----------------------------------------------------------------------------------------------
# One optimizer step
# -----------------------------------------------------------------------------------------------
class NonFiniteLoss(RuntimeError):
    """The step's loss is not finite on some rank; raised on every rank, before any update."""


def accumulate_gradients(model, pretrainer, teacher, batches, step, cfg, autocast_ctx=contextlib.nullcontext(),
                         world=1, features_fn=None):
    """Forward and backward over this rank's micro-batches of one step -> the step's loss terms.

    batches: the grad_accum micro-batches (prepared by prepare_batch). With more than one, the
    contrastive loss still sees the whole step's batch (Pretrainer.contrastive_loss, fed by a
    no-grad pass of features_fn over every micro-batch), the distillation terms are weighted by each
    micro-batch's share, and the centres are updated once, after the last micro-batch, from the
    teacher outputs of all of them. So grad_accum=k gives the same loss and gradients as one
    micro-batch k times larger (tests/test_train.py checks it in float64)."""
    sd_start_step = int(cfg.sd_start * cfg.steps)
    distill = teacher is not None and step >= sd_start_step
    t_temp = teacher_temp_at(step, cfg, sd_start_step)
    k = len(batches)
    cache = None
    if k > 1:
        features_fn = features_fn or pretrainer.contrastive_features
        with autocast_ctx:
            cache = [features_fn(b) for b in batches]                           # k x ([n_g, b, E], [b, E])
    if "mlm_labels" in batches[0]:
        n_mlm = sum((b["mlm_labels"] != -100).sum() for b in batches)          # the step's MLM positions
        for b in batches:
            b["mlm_count"] = n_mlm
    terms, stats = {}, {}
    for j, batch in enumerate(batches):
        with autocast_ctx:
            t_out = teacher_forward(teacher, batch, pretrainer.use_sd, pretrainer.use_mask) if distill else None
        sync = j == k - 1 or world == 1
        with (contextlib.nullcontext() if sync else model.no_sync()):
            with autocast_ctx:
                out = model(batch, t_out, t_temp, cache, j)
            out["loss"].backward()
        for name, v in out.items():
            if name != "loss":    # contrastive: the whole step's value in every slot; the rest: shares
                terms[name] = v.detach().float() + (terms.get(name, 0.0) if name != "contrastive" else 0.0)
        if distill:
            for name, logits in (("sd", t_out.get("global")), ("dist", t_out.get("patch"))):
                if logits is not None:
                    stats[name] = stats.get(name, 0.0) + center_stats(logits)
    if "sd" in stats:
        pretrainer.l2g_loss.update_center(stats["sd"])
    if "dist" in stats:
        pretrainer.mask_loss.update_center(stats["dist"])
    terms["loss"] = sum(pretrainer.weights[name] * v for name, v in terms.items())
    if distill:
        terms["teacher_temp"] = t_temp                                           # a float: the same on every rank
        if pretrainer.use_sd:
            terms["teacher_entropy"] = teacher_entropy(t_out["global"], pretrainer.l2g_loss.center, t_temp)
    return terms


def train_step(model, pretrainer, teacher, optimizer, batches, step, cfg, autocast_ctx=contextlib.nullcontext(),
               world=1, features_fn=None):
    """One optimizer step: the learning rate, the teacher's switch-on, forward/backward over the
    micro-batches, the non-finite stop (every rank stops together, before the bad update), then
    clip, AdamW, logit-scale clamp and the EMA teacher update. Returns the logged terms."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    sd_start_step = int(cfg.sd_start * cfg.steps)
    distill = teacher is not None and step >= sd_start_step
    if distill and step == sd_start_step and sd_start_step > 0:
        ema_update(teacher, pretrainer.image_student(), 0.0)   # SigLIP 2: the teacher starts as the student
    terms = accumulate_gradients(model, pretrainer, teacher, batches, step, cfg, autocast_ctx, world, features_fn)
    bad = torch.tensor(float(not torch.isfinite(terms["loss"])), device=terms["loss"].device)
    if world > 1:
        dist.all_reduce(bad)
    if bad.item() > 0:
        raise NonFiniteLoss(f"non-finite loss at step {step} ({ {k: float(v) for k, v in terms.items()} })")
    momentum = momentum_at(step, cfg, sd_start_step)
    apply_update(pretrainer, optimizer, cfg, step, teacher if distill else None, pretrainer.image_student(),
                 momentum)
    terms["lr"] = lr
    if distill:
        terms["momentum"] = momentum
    return terms


def prepare_batch(batch, cfg, clip_cfg, step, first_index, device, trim=True):
    """A micro-batch from the loader, ready for the step: on the device, its padding columns trimmed
    (exact, see clip.trim_padding; skipped under torch.compile, where a changing shape would
    recompile), and for MaskCLIP its patch masks and corrupted caption (add_masks). first_index: the
    micro-batch's first position in the step's global batch."""
    batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    if "maskclip" in cfg.method:
        add_masks(batch, cfg, clip_cfg, step, first_index)
    if trim:
        L = trim_padding(batch["tokens"], clip_cfg.eot_token_id).shape[1]
        for key in ("tokens", "mlm_inputs", "mlm_labels"):
            if key in batch:
                batch[key] = batch[key][:, :L]
    return batch


# -----------------------------------------------------------------------------------------------
# main: the loop
# -----------------------------------------------------------------------------------------------
def main(argv=None):
    cfg = resolve_method_defaults(parse_args(sys.argv[1:] if argv is None else argv))
    rank, world, local_rank, device, owned = setup_distributed(cfg)
    master = rank == 0
    if cfg.batch_size % (world * cfg.grad_accum) != 0:
        sys.exit(f"error: batch_size {cfg.batch_size} must be divisible by world_size x grad_accum "
                 f"= {world} x {cfg.grad_accum}")
    micro = cfg.batch_size // (world * cfg.grad_accum)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if master:
        print("config:", json.dumps(dataclasses.asdict(cfg)))
        print(f"world size {world}, device {device}, micro-batch per rank {micro}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # TF32 for any float32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    autocast_ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else contextlib.nullcontext())

    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None

    # --- model config, tokenizer, data ---
    clip_cfg, tokenizer = build_model_config(cfg)
    try:
        dataset, collate_fn = build_train_data(cfg, clip_cfg.patch_size, tokenizer)
    except (FileNotFoundError, ValueError) as e:   # a wrong path or a bad file: say so, no traceback
        sys.exit(f"error: {e}")
    if isinstance(dataset, torch.utils.data.IterableDataset):
        # tar shards: the dataset itself splits shards over ranks and workers
        loader = torch.utils.data.DataLoader(dataset, batch_size=micro, collate_fn=collate_fn,
                                             num_workers=cfg.num_workers, drop_last=True)
    else:
        start = ckpt["step"] if ckpt is not None else 0
        sampler = StepSampler(len(dataset), cfg.batch_size, world, rank, cfg.grad_accum, cfg.seed, start)
        loader = torch.utils.data.DataLoader(SeededSample(dataset, cfg.seed), batch_sampler=sampler,
                                             collate_fn=collate_fn, num_workers=cfg.num_workers,
                                             persistent_workers=cfg.num_workers > 0,
                                             prefetch_factor=4 if cfg.num_workers > 0 else None)

    # --- model (same seed on every rank; DDP broadcasts rank 0's weights anyway) ---
    torch.manual_seed(cfg.seed)
    pretrainer = Pretrainer(cfg, clip_cfg)
    if cfg.init_from:
        load_pretrained_into(pretrainer.clip, cfg.init_from)
    pretrainer.to(device)
    optimizer = make_optimizer(pretrainer, cfg, device)
    teacher = None
    if pretrainer.use_sd or pretrainer.use_mask:
        teacher = make_teacher(pretrainer.image_student())                     # deep copy, no grad
    start_step = 0
    if ckpt is not None:
        # the checkpoint splits the state into a plain CLIP ("model") and the rest ("extra")
        pretrainer.load_state_dict({**{"clip." + k: v for k, v in ckpt["model"].items()}, **ckpt["extra"]})
        if teacher is not None:
            teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["step"]
        if master:
            print(f"resumed from {ckpt_path} at step {start_step}")
    model, features_fn = pretrainer, None
    if cfg.compile:
        model = torch.compile(pretrainer)
        if cfg.grad_accum > 1:
            features_fn = torch.compile(pretrainer.contrastive_features)
    if world > 1:
        # find_unused_parameters: heads sit idle until self-distillation switches on (sd_start > 0)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=cfg.sd_start > 0)

    # --- the loop ---
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    pbar = tqdm(total=cfg.steps, initial=start_step, dynamic_ncols=True) if master else None
    data_iter = iter(loader)
    skipped = {}                        # DataLoader worker id -> that worker's count of skipped samples
    t_last, samples_since = time.time(), 0
    for step in range(start_step, cfg.steps):
        batches = []
        for a in range(cfg.grad_accum):
            batch = next(data_iter)
            worker, n_skipped = batch.pop("skipped", (-1, 0))
            skipped[worker] = n_skipped
            batches.append(prepare_batch(batch, cfg, pretrainer.clip.config, step, (a * world + rank) * micro,
                                         device, trim=not cfg.compile))
        try:
            terms = train_step(model, pretrainer, teacher, optimizer, batches, step, cfg, autocast_ctx, world,
                               features_fn)
        except NonFiniteLoss as e:
            if master:
                print(f"\nerror: {e}. Stopping; the last good checkpoint is {ckpt_path}")
            cleanup(world, owned)
            sys.exit(1)

        # --- logging (rank 0 writes; the terms are averaged over ranks, the skips summed) ---
        samples_since += cfg.batch_size
        if (step + 1) % cfg.log_interval == 0 or step == cfg.steps - 1:
            n_skipped = torch.tensor(float(sum(skipped.values())))
            if world > 1:   # tensors differ per rank; the floats (schedule values) are the same everywhere
                for v in terms.values():
                    if torch.is_tensor(v):
                        dist.all_reduce(v)
                terms = {k: v / world if torch.is_tensor(v) else v for k, v in terms.items()}
                dist.all_reduce(n_skipped)
            dt = time.time() - t_last
            rec = {"step": step + 1, "lr": terms.pop("lr"), "samples_per_s": samples_since / dt,
                   "logit_scale": pretrainer.clip.logit_scale.exp().item(),
                   **{k: round(float(v), 6) for k, v in terms.items()}, "skipped": int(n_skipped)}
            t_last, samples_since = time.time(), 0
            if master:
                pbar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", sps=f"{rec['samples_per_s']:.0f}")
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
        if master:
            pbar.update(1)
        if cfg.eval_interval and (step + 1) % cfg.eval_interval == 0 and step + 1 < cfg.steps and master:
            m = evaluate(pretrainer.clip, cfg, tokenizer, device, autocast_ctx)
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step + 1, **m}) + "\n")
            tqdm.write(f"step {step + 1}: {m}")
        stopping = step + 1 == cfg.stop_at
        if master and ((step + 1) % cfg.ckpt_interval == 0 or step + 1 == cfg.steps or stopping):
            save_checkpoint(ckpt_path, pretrainer, teacher, optimizer, step + 1, cfg)
        if stopping:
            if master:
                pbar.close()
                print(f"stopped at step {step + 1} (--stop_at); continue with --resume=True")
            cleanup(world, owned)
            return
    if master:
        pbar.close()
    if master and cfg.eval:
        t0 = time.time()
        metrics = evaluate(pretrainer.clip, cfg, tokenizer, device, autocast_ctx, with_seg=cfg.eval_seg)
        metrics["step"] = cfg.steps
        with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        print(f"final metrics ({time.time() - t0:.0f}s to evaluate):", json.dumps(metrics))
    cleanup(world, owned)


def apply_update(pretrainer, optimizer, cfg, step, teacher=None, student_image=None, momentum=None):
    """Everything after backward: clip gradients, (DINO) cancel the head's last-layer gradient
    early on, AdamW step, clamp the logit scale, then move the EMA teacher toward the student."""
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(pretrainer.parameters(), cfg.grad_clip)
    if pretrainer.use_sd and step < cfg.freeze_last_layer_steps:
        pretrainer.head.cancel_last_layer_grad()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    pretrainer.clip.clamp_logit_scale()                     # exp(scale) <= 100, as CLIP
    if teacher is not None:
        ema_update(teacher, student_image, momentum)


def cleanup(world, owned=True):
    """Wait for every rank, then close the process group if this run opened it."""
    if world > 1 and dist.is_initialized():
        dist.barrier()
        if owned:
            dist.destroy_process_group()


@torch.no_grad()
def teacher_entropy(teacher_logits, center, temp):
    """Mean entropy (nats) of the centred, sharpened teacher distribution: near 0 means collapse to
    one prototype, near log K means a uniform (uninformative) teacher."""
    t = torch.cat(teacher_logits).float()
    p = F.softmax((t - center) / temp, dim=-1)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()                 # a tensor: no sync here


def mlm_token_ids(clip_cfg):
    """(mask id, special ids) for masked language modelling. The byte tokenizer reserves a [MASK] id
    (3). CLIP's BPE vocabulary has none, so there the start-of-text id (49406) doubles as [MASK]: it
    never occurs inside a caption, and adding an embedding row would change the pretrained shapes."""
    if clip_cfg.eot_token_id == 2:      # byte-level tokenizer (data.py)
        return MASK_ID, (PAD_ID, SOT_ID, clip_cfg.eot_token_id)
    sot = clip_cfg.eot_token_id - 1     # CLIP BPE: SOT 49406, EOT 49407
    return sot, (clip_cfg.pad_token_id, sot, clip_cfg.eot_token_id)


def sample_generator(seed, step, index):
    """A CPU generator for one training sample at one step: seeded by (seed, step, its position in
    the step's global batch) and by nothing else, so whatever it draws is the same on 1 or N ranks,
    for any grad_accum, and after a resume. (Distinct for step < 10^7 and batches under 10^6.)"""
    return torch.Generator().manual_seed((seed * 10**13 + step * 10**6 + index) % 2**63)


def add_masks(batch, cfg, clip_cfg, step, first_index):
    """MaskCLIP inputs for this micro-batch: the patch mask, and the MLM-corrupted caption.
    Row i draws both from sample_generator(seed, step, first_index + i), so the masks of the global
    batch do not depend on how it is split over ranks and micro-batches. The caption is corrupted
    at the full context length (then cut back), so trimming the padding cannot change the draws."""
    src = batch["global_crops"][0] if "global_crops" in batch else batch["images"]
    b, _, H, W = src.shape
    gh, gw = H // clip_cfg.patch_size, W // clip_cfg.patch_size
    gens = [sample_generator(cfg.seed, step, first_index + i) for i in range(b)]
    if cfg.mask_kind == "block":
        mask = torch.cat([block_mask(1, gh, gw, cfg.mask_ratio, generator=g) for g in gens])   # [b, N]
    else:
        mask = torch.cat([random_mask(1, gh * gw, cfg.mask_ratio, generator=g) for g in gens])  # [b, N]
    batch["patch_mask"] = mask.to(src.device)
    if cfg.mlm_weight > 0:
        mask_id, special = mlm_token_ids(clip_cfg)
        tokens = batch["tokens"].cpu()
        L = tokens.shape[1]
        full = F.pad(tokens, (0, clip_cfg.context_length - L), value=clip_cfg.pad_token_id)   # [b, context]
        inputs, labels = mlm_mask_tokens(full, mask_prob=cfg.mlm_prob, generator=gens,
                                         vocab_size=clip_cfg.vocab_size, mask_id=mask_id, special_ids=special)
        batch["mlm_inputs"], batch["mlm_labels"] = inputs[:, :L].to(src.device), labels[:, :L].to(src.device)


if __name__ == "__main__":
    main()
