"""train.py: the training loop that wires every idea of this repository together.

Read it top to bottom, like nanoGPT's train.py: the config, then the helpers in the order the loop
uses them (data, the model and its losses, masks, optimizer and schedules, one optimizer step,
checkpoints, logging), then `main`, which runs the loop. Each step does

    1. teacher forward   (no gradient; only for the self-distillation methods)
    2. student forward   -> one scalar loss per objective, summed with their weights
    3. backward, clip, optimizer step, logit-scale clamp
    4. EMA update of the teacher from the student, and of the distillation centres

The objectives (chosen with --method):

    clip           L = L_contrastive(image, caption)                         (CLIP / SigLIP)
    silc           L = mean_g L_contrastive(global view g, caption)
                       + w_sd * L_local->global                              (SILC, Naeem et al. 2023)
    maskclip       L = L_contrastive + lambda * L_masked-distill + beta * L_mlm   (MaskCLIP, Dong et al. 2022)
    silc+maskclip  both self-distillation losses with one teacher            (the SigLIP 2 recipe)

and on the shapes world every method adds, from patch_text_start on, w_pt * L_patch-text: each patch
of a text-paired view must pick its own image's caption among the batch's (losses.patch_text_loss).
It is what makes the CPU default's patch features line up with words (docs/experiments.md);
--patch_text_weight=0 gives the papers' losses alone (the default on real data).

--loss picks the contrastive loss: "softmax" (CLIP, Radford et al. 2021) or "sigmoid" (SigLIP,
Zhai et al. 2023). The pieces live in their own files: clip.py (the model), losses.py (every loss and
head), ema.py (the teacher), masking.py (patch and token masks), data.py (text, crops, batches),
eval_seg.py (zero-shot evaluation); loaders/ reads the data and the public weights.

Run it: `python train.py` (the CPU default), any Config field as --key=value, `--help` lists them.

Evaluation, as open_clip users expect it: at the end and every --eval_interval steps, rank 0 measures
the shapes world (on shapes data), retrieval on held-out pairs (--val_data) and zero-shot
classification on a class-folder tree (--zeroshot_data); each result goes into out_dir/log.jsonl with
its step, beside the training records, and out_dir/curves.png is redrawn from the log.

Batch size convention: `batch_size` is the GLOBAL batch of one optimizer step, summed over ranks and
gradient-accumulation micro-steps. So the same config gives the same optimisation problem on 1 or 8
processes and for any grad_accum (tests/test_train.py checks both).
"""

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from clip import CLIP, ConvStem, autocast_for, model_config, pick_device, trim_padding
from data import (EOT_ID, PAD_ID, ByteTokenizer, CenterView, MultiCrop, WordTokenizer, collate, make_loader,
                  view_batch)
from ema import ema_update, make_teacher, teacher_forward
from eval_seg import real_data_metrics, shapes_metrics
from experiments.curves import save_curves
from loaders.classification import ClassFolderDataset
from loaders.imagetext import build_dataset, build_eval_dataset
from loaders.pretrained import config_from_checkpoint, load_pretrained_into
from loaders.shapes import SHAPES_VOCABULARY, world_from_config
from loaders.templates import get_templates
from losses import (DINOHead, LocalToGlobalLoss, MaskedDistillLoss, MaskedPatchDecoder, TextMLMDecoder,
                    center_stats, clip_loss, koleo_loss, mlm_loss, patch_text_loss, siglip_loss, teacher_entropy)
from masking import num_masked, sample_generator, sample_masks, sample_mlm


# -----------------------------------------------------------------------------------------------
# Config: every default is the CPU-friendly one. Override any field with --key=value.
@dataclasses.dataclass
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
    crops: str = "auto"             # where the views are cut: auto (device on CUDA, DataLoader workers on CPU) | device | workers
    image_size: int = 64
    shapes_colour_prob: float = 0.2  # shapes data: fraction of captions that name colours (loaders/shapes.py)
    shapes_backdrop: str = "uniform"  # shapes data: uniform | patchwork (a background that names no image)
    shapes_object_scale: float = 1.0  # shapes data: object radii 11-20 px at 64 px, times this
    shapes_two_objects: float = 0.5  # shapes data: the fraction of (multi-object split) images with two objects
    shapes_templates: bool = True   # shapes data: captions in phrases ("a photo of ...") or the objects alone
    tokenizer: str = "auto"         # auto: word-level for shapes (a closed vocabulary), byte-level for real data
    # --- model ---
    model: str = "tiny"             # tiny | S/16 | B/16 | B/32 | L/14 (see clip.MODEL_SIZES)
    patch_size: int = 0             # 0 = the named size's value; a non-zero value overrides it
    stem: str = ""                  # "" = the named size's; "linear" (public CLIP) | "conv" (Xiao et al. 2021)
    pool: str = ""                  # "" = the named size's; "cls" | "mean" | "unitmean" (clip.CLIPConfig.pool)
    stem_convs: int = -1            # -1 = the named size's; extra 3x3 stride-1 convs of the conv stem (clip.ConvStem)
    vision_width: int = 0
    vision_layers: int = 0
    text_width: int = 0
    text_layers: int = 0
    embed_dim: int = 0
    # --- optimisation ---
    steps: int = 540
    stop_at: int = 0                # stop (after a checkpoint) here; the schedules still span `steps`
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
    grad_clip_mode: str = "global"  # global: one norm over all gradients | tensor: each tensor alone (DINO)
    log_grad_norms: bool = False    # log each objective's gradient norm on the image tower (one process)
    # --- dense alignment: every patch must name its own image's caption (losses.patch_text_loss) ---
    patch_text_weight: float = -1.0  # w_pt in L = L_con + w_pt * L_pt (+ the method's terms); 0 = off;
                                     # -1 = 0.5 on the shapes world, 0 on real data (the papers' losses alone:
                                     # it is not SILC's or MaskCLIP's, and costs b*N*B logits per rank)
    patch_text_start: float = 0.3   # fraction of training after which it switches on (from step 0 it
                                    # slowed the contrastive loss's escape from log B: docs/experiments.md)
    # --- SILC: local-to-global self-distillation ---
    sd_views: str = "silc"          # silc: 2 global crops (scale 0.4-1), each paired with the caption (SILC) |
                                    # siglip2: one global view, open_clip's 0.9-1 crop, the only text-paired
                                    # and teacher view (SigLIP 2: augmentations go to the distillation only;
                                    # screened on silc+maskclip, not ahead on every seed: docs/experiments.md)
    n_local_crops: int = 4
    local_foreground: float = 0.0   # a local crop must be this fraction object (shapes only; 0 = any crop)
    local_colour_prob: float = 0.8  # colour jitter of the local crops: how often (DINO 0.8), and its hue
    local_hue: float = 0.1          # range in turns (DINO 0.1; 0.5 = any hue: a local crop's colour says nothing)
    sd_weight: float = 1.0          # w_sd in L = L_con + w_sd * L_sd
    sd_start: float = 0.0           # fraction of training after which self-distillation switches on
    koleo_weight: float = -1.0      # w_ko: KoLeo spread of the student head's global-view features, mean
                                    # over the views (losses.koleo_loss; DINOv2: 0.1 per view on the class
                                    # token, summed over its 2 views). -1 = method default: 0.1 for silc
                                    # and silc+maskclip (it takes the pooled teacher out of the uniform
                                    # regime: docs/experiments.md; SILC itself has no such term); 0 = off
    head_hidden: int = 512          # DINO head sizes (DINO, B/16: 2048 / 256 / 65536)
    head_bottleneck: int = 32       # 32, not DINO's 256, and teacher_temp 0.04 fixed, not DINO's 0.04 -> 0.07:
    head_out: int = 1024            # K prototypes.  with DINO's values the CPU-scale teacher stayed near
                                    # uniform (entropy ~log K); measured in docs/experiments.md
    teacher_momentum: float = 0.99  # fixed EMA momentum (SILC: a schedule that converges to 1 hurts)
    momentum_schedule: str = "fixed"  # fixed | cosine (DINO: momentum -> 1)
    teacher_temp: float = 0.04      # the teacher temperature after its warm-up
    teacher_temp_warmup: float = 0.04  # its start value, warmed up linearly to teacher_temp
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
    patch_loss: str = "masked"      # masked (MaskCLIP, iBOT) | all: every patch, hidden or not (TIPSv2)
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
    eval_batch_size: int = 250      # evaluation batches (the val loss depends on it: its negatives)
    # --- evaluation on real data, as open_clip's --val-data and --imagenet-val (any --data) ---
    val_data: str = ""              # held-out pairs (.csv/.tsv or .tar shards): R@1/5/10 both ways, val loss
    zeroshot_data: str = ""         # a class-folder tree root/<class>/*.jpg (ImageNet val): zero-shot top-1/5
    zeroshot_classnames: str = ""   # its class names, one line per folder in sorted order ("": folder names)
    zeroshot_templates: str = "openai"  # openai (the 80 prompts) | short (7)


METHODS = ("clip", "silc", "maskclip", "silc+maskclip")
# The terms that compare rows across the batch: under gradient accumulation every micro-batch computes them
# on the whole step's (cached) rows with its own slot live (Pretrainer.whole_step), so each holds the
# whole step's value; every other term is a per-sample mean, and each micro-batch holds its share of it.
WHOLE_STEP_TERMS = ("contrastive", "patch_text", "koleo")


def parse_args(argv):
    """--key=value overrides of Config. An unknown key or a badly typed value exits with a clear
    message instead of a traceback."""
    cfg = Config()
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__ + "\nConfig fields and defaults:")
            for f in dataclasses.fields(Config):
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
                val = val.lower() in ("true", "1", "yes")
            elif typ in (int, "int", float, "float"):
                val = (int if typ in (int, "int") else float)(val)
        except ValueError:
            sys.exit(f"error: --{key} expects a {getattr(typ, '__name__', typ)}, got {val!r}")
        setattr(cfg, key, val)
    return cfg


def resolve_method_defaults(cfg):
    """Fill the -1 / auto fields with the defaults of the chosen method, and check choices."""
    choices = dict(method=METHODS, loss=("softmax", "sigmoid"), mask_mode=("drop", "token", "auto"),
                   mask_kind=("random", "block"), momentum_schedule=("fixed", "cosine"),
                   grad_clip_mode=("global", "tensor"), patch_loss=("masked", "all"), crops=("auto", "device", "workers"),
                   sd_views=("silc", "siglip2"))
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            sys.exit(f"error: --{key} must be one of {allowed}, got {getattr(cfg, key)!r}")
    both = cfg.method == "silc+maskclip"
    if cfg.mask_ratio < 0:
        cfg.mask_ratio = 0.5 if both else 0.75          # SigLIP 2: 50%; MaskCLIP: 75%
    if cfg.mask_mode == "auto":
        cfg.mask_mode = "token" if both else "drop"     # SigLIP 2 uses mask tokens; FLIP-style drop is cheaper
    if cfg.dist_weight < 0:
        cfg.dist_weight = 0.25 if both else 0.05        # SigLIP 2: 1 and 0.25; MaskCLIP: lambda = 0.05
    if cfg.mlm_weight < 0:
        cfg.mlm_weight = 0.0 if both else 0.05          # MaskCLIP: beta = 0.05; SigLIP 2 has no MLM
    if cfg.koleo_weight < 0:
        cfg.koleo_weight = 0.1 if "silc" in cfg.method else 0.0   # DINOv2's weight; SILC and SigLIP 2 have no such term
    if cfg.patch_text_weight < 0:
        cfg.patch_text_weight = 0.5 if cfg.data == "shapes" else 0.0
    return cfg


# -----------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; a plain `python train.py` does not.
def setup_distributed(cfg):
    """-> (rank, world, local_rank, device, owned). NCCL on CUDA, gloo on CPU. A process group that
    already exists (main() called by a script that made one) is used, and left to its owner (owned)."""
    device = pick_device(cfg.device)
    distributed, owned = dist.is_available() and dist.is_initialized(), False
    if not distributed and "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        distributed = owned = True
    if not distributed:
        return 0, 1, 0, device, owned
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device.type == "cuda":
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    return rank, world, local_rank, device, owned


def cleanup(world, owned=True):
    """Wait for every rank, then close the process group if this run opened it."""
    if world > 1 and dist.is_initialized():
        dist.barrier()
        if owned:
            dist.destroy_process_group()


# -----------------------------------------------------------------------------------------------
# Model config and tokenizer: a named size (clip.MODEL_SIZES) with the byte-level tokenizer when
# training from scratch, or the architecture and BPE tokenizer of a public checkpoint (--init_from).
def build_model_config(cfg):
    sigmoid = dict(init_logit_scale=math.log(10.0), init_logit_bias=-10.0) if cfg.loss == "sigmoid" else {}
    overrides = {k: getattr(cfg, k) for k in ("patch_size", "stem", "vision_width", "vision_layers",
                                              "text_width", "text_layers", "embed_dim", "pool") if getattr(cfg, k)}
    if cfg.stem_convs >= 0:
        overrides["stem_convs"] = cfg.stem_convs
    try:
        if cfg.init_from:
            ckpt_cfg, tokenizer = config_from_checkpoint(cfg.init_from, cfg.bpe_path, act=cfg.init_act)
            return dataclasses.replace(ckpt_cfg, image_size=cfg.image_size, **sigmoid), tokenizer
        kind = ("word" if cfg.data == "shapes" else "byte") if cfg.tokenizer == "auto" else cfg.tokenizer
        if kind not in ("word", "byte"):
            raise ValueError(f"--tokenizer must be auto, word or byte, got {cfg.tokenizer!r}")
        tokenizer = WordTokenizer(SHAPES_VOCABULARY, context_length=32) if kind == "word" else ByteTokenizer(64)
        clip_cfg = model_config(cfg.model, image_size=cfg.image_size, vocab_size=tokenizer.vocab_size, eot_token_id=EOT_ID,
                                pad_token_id=PAD_ID, context_length=tokenizer.context_length, **overrides, **sigmoid)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    return clip_cfg, tokenizer


# -----------------------------------------------------------------------------------------------
# Data: the views each method needs (data.MultiCrop), the source (loaders/), the batch order
def shapes_world(cfg):
    """The shapes world's options (loaders.shapes.ShapesDataset) for training and evaluation alike."""
    return world_from_config(dataclasses.asdict(cfg))


def crops_on_device(cfg) -> bool:
    """Where MultiCrop cuts the views (--crops). On a GPU, in the training step: the workers only decode
    and draw the crops' random numbers, and all crops of the batch are resampled on the device, one call
    per resolution (DINO's recipe runs 10 DataLoader workers per GPU for its multi-crop). On a CPU, in the DataLoader
    workers, which are then the only parallelism. Both give the same crops (tests/test_data.py)."""
    return cfg.crops == "device" or (cfg.crops == "auto" and pick_device(cfg.device).type == "cuda")


def train_views(cfg, patch_size):
    """The views of the method (data.MultiCrop; the crop sizes depend on the model's patch size). Every
    method has a text-paired view of scale 0.9-1.0 (open_clip's training crop), except SILC's: with
    --sd_views=silc, 2 global crops of scale 0.4-1, each paired with the caption (SILC sec. 3). The SILC
    methods add n local crops (scale 0.05-0.4). With --sd_views=siglip2 the one global view is both the
    text-paired view and the teacher's (SigLIP 2: 1 teacher view, the locals are the students; the
    contrastive loss sees the image as CLIP does). All views share the flip."""
    if "silc" in cfg.method:
        two = cfg.sd_views == "silc"
        return MultiCrop(cfg.image_size, patch_size, n_global=2 if two else 1, n_local=cfg.n_local_crops,
                         global_scale=(0.4, 1.0) if two else (0.9, 1.0), local_foreground=cfg.local_foreground,
                         colour_prob=cfg.local_colour_prob, hue=cfg.local_hue, on_device=crops_on_device(cfg))
    return MultiCrop(cfg.image_size, patch_size, n_global=1, n_local=0, global_scale=(0.9, 1.0),
                     on_device=crops_on_device(cfg))


def build_train_data(cfg, patch_size, tokenizer):
    """(dataset, collate_fn): the source (loaders/) through the method's views (train_views), batched with
    the tokenizer. Photos (csv, tar) are decoded straight to the views' working size (data.decode_image)."""
    transform = train_views(cfg, patch_size)
    sep = None if cfg.csv_separator == "auto" else cfg.csv_separator
    try:
        dataset = build_dataset(cfg.data, "train", transform, cfg.image_size, seed=cfg.seed, n=cfg.subset,
                                csv_img_key=cfg.csv_img_key, csv_caption_key=cfg.csv_caption_key,
                                csv_sep=sep, repeat=True, world=shapes_world(cfg),
                                working_size=transform.working_size)
    except (FileNotFoundError, ValueError) as e:   # a wrong path or a bad file: say so, no traceback
        sys.exit(f"error: {e}")
    return dataset, functools.partial(collate, tokenizer=tokenizer)


def build_eval_sets(cfg):
    """The real-data evaluation sets, read with the evaluation view (data.CenterView): --val_data
    (loaders.imagetext.build_eval_dataset) and --zeroshot_data (loaders.classification), None where not
    given. A wrong path or layout stops the run here, before the first step, on every rank."""
    view, sep = CenterView(cfg.image_size), None if cfg.csv_separator == "auto" else cfg.csv_separator
    try:
        if cfg.zeroshot_classnames and not cfg.zeroshot_data:
            raise ValueError("--zeroshot_classnames names the classes of --zeroshot_data, which is not given")
        get_templates(cfg.zeroshot_templates)
        val = zs = None
        if cfg.val_data:
            val = build_eval_dataset(cfg.val_data, view, cfg.csv_img_key, cfg.csv_caption_key, sep)
        if cfg.zeroshot_data:
            zs = ClassFolderDataset(cfg.zeroshot_data, cfg.zeroshot_classnames or None, view)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if cfg.eval_interval and cfg.data != "shapes" and val is None and zs is None:
        sys.exit(f"error: --eval_interval={cfg.eval_interval} asks for an evaluation every {cfg.eval_interval} steps, "
                 f"but --data={cfg.data} has no evaluation set: give --val_data (held-out image-text pairs) "
                 f"and/or --zeroshot_data (a class-folder tree), or --eval_interval=0")
    return {"val_set": val, "zeroshot_set": zs}


# -----------------------------------------------------------------------------------------------
# The student: CLIP plus the heads and decoders the method needs, ONE nn.Module whose forward returns
# every loss, because DDP must see one forward per step; the teacher (no gradients) stays outside.
class Pretrainer(nn.Module):
    def __init__(self, cfg, clip_cfg):
        super().__init__()
        self.cfg = cfg
        self.use_sd = "silc" in cfg.method and cfg.sd_weight > 0     # silc with sd_weight 0: SILC's views alone
        self.use_mask = "maskclip" in cfg.method
        self.use_patch_text = cfg.patch_text_weight > 0
        self.use_koleo = self.use_sd and cfg.koleo_weight > 0          # SILC's head features, spread (koleo_loss)
        self.clip = CLIP(clip_cfg)
        if not self.use_mask or cfg.mask_mode == "drop":
            # The ViT's mask token serves mask_mode="token" only (drop mode removes hidden tokens).
            # Frozen, DDP does not wait for a gradient that never comes.
            self.clip.visual.mask_token.requires_grad_(False)
        D = clip_cfg.vision_width
        if self.use_sd:
            # SILC: the DINO head on the pooled token of every crop (clip.VisionTransformer.pooled; sizes: see Config)
            self.head = DINOHead(D, cfg.head_hidden, cfg.head_bottleneck, cfg.head_out)
            self.l2g_loss = LocalToGlobalLoss(cfg.head_out, student_temp=cfg.student_temp)
        if self.use_mask:
            # MaskCLIP: a separate head (the "online quantizer") for patch tokens, with its own centre
            self.patch_head = DINOHead(D, cfg.head_hidden, cfg.head_bottleneck, cfg.head_out)
            self.mask_loss = MaskedDistillLoss(cfg.head_out, student_temp=cfg.student_temp)
            self.decoder = MaskedPatchDecoder(D, clip_cfg.vision_heads, num_layers=cfg.decoder_layers)
            if cfg.mlm_weight > 0:
                self.text_decoder = TextMLMDecoder(clip_cfg.text_width, clip_cfg.text_heads, clip_cfg.vocab_size,
                                                   clip_cfg.pad_token_id, num_layers=cfg.text_decoder_layers)
        self.weights = {"contrastive": 1.0, "sd": cfg.sd_weight, "dist": cfg.dist_weight, "mlm": cfg.mlm_weight,
                        "patch_text": cfg.patch_text_weight, "koleo": cfg.koleo_weight}

    def image_student(self):
        """The modules the EMA teacher copies: image encoder + heads (the text tower has no teacher)."""
        parts = {"visual": self.clip.visual}
        if self.use_sd:
            parts["head"] = self.head
        if self.use_mask:
            parts["patch_head"] = self.patch_head
        return nn.ModuleDict(parts)

    def encode(self, batch, patch_text=True):
        """L2-normalised embeddings of every text-paired view [n_g, b, E] and of the captions [b, E],
        the image tokens [n_g*b, 1+N, D], and (when the patch-text loss is on at this step) the unit
        patch features [n_g, b, N, E] (clip.VisionTransformer.patch_features), None without it."""
        txt = F.normalize(self.clip.text(batch["tokens"])[0], dim=-1)          # [b, E]
        if "global_crops" in batch:
            # SILC: every global view is aligned with the caption ("otherwise the two objectives
            # diverge", SILC sec. 3). One encoder forward per resolution: globals here, locals later.
            g = batch["global_crops"]                                           # [n_g, b, 3, S, S], n_g = 2 or 1
        else:
            g = batch["images"].unsqueeze(0)                                    # [1, b, 3, S, S]
        n_g, b = g.shape[:2]
        if self.use_patch_text and patch_text:   # the dense features the evaluation reads
            g_emb, g_tok, patches = self.clip.visual(g.flatten(0, 1), patches=True)    # ..., [n_g*b, N, E]
            patches = patches.view(n_g, b, *patches.shape[1:])                  # [n_g, b, N, E]
        else:
            (g_emb, g_tok), patches = self.clip.visual(g.flatten(0, 1)), None   # [n_g*b, E], [n_g*b, 1+N, D]
        return F.normalize(g_emb, dim=-1).view(n_g, b, -1), txt, g_tok, patches

    def head_features(self, g_tok, n_g):
        """SILC's head on the pooled token of the text-paired (global) views: their unit bottleneck
        features [n_g, b, bottleneck], which the prototypes score and the KoLeo term spreads."""
        return self.head.embed(self.clip.visual.pooled(g_tok)).view(n_g, -1, self.cfg.head_bottleneck)

    @torch.no_grad()
    def contrastive_features(self, batch, patch_text=True, distill=True):
        """encode() without gradient or tokens: what gradient accumulation caches (and, with the KoLeo
        term on at a distillation step, the head features it spreads over the whole step)."""
        img, txt, g_tok, patches = self.encode(batch, patch_text)
        z = self.head_features(g_tok, img.shape[0]) if distill and self.use_koleo else None
        return img, txt, patches, z

    def whole_step(self, img, txt, patches, z, cache, slot):
        """Gradient accumulation (open_clip's --accum-freq): this micro-batch's live features replace its
        slot of the cached ones, so the batch-level losses (image-text, KoLeo) see ALL the step's rows and
        only this slot's gradient flows; summed over the slots, that is the whole step's gradient. The
        temperature (and SigLIP's bias) would get the whole d loss / d t in every slot: they take it in
        the last one only. -> img [n_g, k*b, E], txt [k*b, E], patches, z [n_g, k*b, bottleneck], scale, bias."""
        scale, bias = self.clip.logit_scale.exp(), self.clip.logit_bias
        if cache is None:
            return img, txt, patches, z, scale, bias
        merged = []
        for i, live in enumerate((img, txt, patches, z)):
            parts = [c[i] for c in cache]
            parts[slot] = live
            merged.append(None if live is None else torch.cat(parts, dim=0 if i == 1 else 1))
        if slot != len(cache) - 1:
            scale, bias = scale.detach(), (bias.detach() if bias is not None else None)
        return (*merged, scale, bias)

    def contrastive_loss(self, img, txt, scale, bias):
        """Mean over the text-paired views [n_g, B, E] of the CLIP / SigLIP loss."""
        loss = siglip_loss if self.cfg.loss == "sigmoid" else lambda i, t, s, b: clip_loss(i, t, s)
        return sum(loss(img[v], txt, scale, bias) for v in range(img.shape[0])) / img.shape[0]

    def patch_text(self, patches, txt, scale, bias):
        """Mean over the text-paired views [n_g, B, N, E] of losses.patch_text_loss, with the contrastive
        loss's temperature (and SigLIP's bias): a patch is scored exactly as the dense evaluation scores it."""
        bias = bias if self.cfg.loss == "sigmoid" else None
        return sum(patch_text_loss(patches[v], txt, scale, bias) for v in range(patches.shape[0])) / patches.shape[0]

    def local_to_global_loss(self, batch, z, teacher_out, teacher_temp):
        """SILC: the student's pooled token of EVERY view (global and local) must predict the
        teacher's distribution on each OTHER global view. z: the global views' head features
        [n_g, b, bottleneck] (head_features) of this micro-batch."""
        student = list(self.head.prototype_logits(z))                          # n_g x [b, K]
        if batch.get("local_crops") is not None and batch["local_crops"].shape[0] > 0:
            l = batch["local_crops"]                                            # [n, b, 3, s, s]
            _, l_tok = self.clip.visual(l.flatten(0, 1))
            student += list(self.head(self.clip.visual.pooled(l_tok)).chunk(l.shape[0]))
        return self.l2g_loss(student, teacher_out["global"], teacher_temp)

    def masked_loss(self, batch, teacher_out, teacher_temp, n_slots=1):
        """MaskCLIP: a SECOND student forward on the masked first view; the decoder predicts the
        teacher's patch codes (of the same view) at the hidden positions."""
        cfg = self.cfg
        src = batch["global_crops"][0] if "global_crops" in batch else batch["images"]
        mask = batch["patch_mask"]                                              # [b, N] bool
        # the masked count as a Python int (every image hides this many): static shapes for torch.compile
        n_masked = num_masked(mask.shape[1], cfg.mask_ratio)
        _, m_tok = self.clip.visual(src, mask=mask, mask_mode=cfg.mask_mode, num_masked=n_masked)  # [b, 1+N', D]
        pred = self.decoder(m_tok, mask, self.clip.visual)                      # [b, N, D]
        if cfg.patch_loss == "all":   # TIPSv2's iBOT++: the visible patches are scored too
            mask, n_masked = torch.ones_like(mask), mask.shape[1]
        # every micro-batch of a step scores the same number of patches: the step's count is n_slots x
        return self.mask_loss(self.patch_head(pred), teacher_out["patch"], mask, teacher_temp,
                              num_masked=n_masked, count=mask.sum() * n_slots)

    def mlm(self, batch):
        """MaskCLIP's text branch: a third (text) forward on the corrupted caption; a small
        bidirectional decoder reads the causal encoder's token features, never the padding."""
        feats = self.clip.text(batch["mlm_inputs"])[1]                          # [b, L, W]
        logits = self.text_decoder(feats, batch["mlm_inputs"])                  # [b, L, V]
        return mlm_loss(logits, batch["mlm_labels"], count=batch.get("mlm_count"))

    def forward(self, batch, teacher_out=None, teacher_temp=0.07, cache=None, slot=0, patch_text=True):
        """A micro-batch (prepare_batch) and the teacher's logits (None while distillation is off) ->
        the scalar losses, and "loss", their sum with self.weights. cache, slot: see whole_step; the
        batch-level terms (WHOLE_STEP_TERMS) hold the whole step's value, every other term this
        micro-batch's share of it. patch_text: whether the patch-text loss is on at this step (patch_text_start)."""
        n_slots = 1 if cache is None else len(cache)
        img, txt, g_tok, patches = self.encode(batch, patch_text)
        z = self.head_features(g_tok, img.shape[0]) if teacher_out is not None and self.use_sd else None
        koleo_on = z is not None and self.use_koleo
        img, txt, patches, z_step, scale, bias = self.whole_step(img, txt, patches, z if koleo_on else None,
                                                                 cache, slot)
        out = {"contrastive": self.contrastive_loss(img, txt, scale, bias)}
        if patches is not None:
            out["patch_text"] = self.patch_text(patches, txt, scale, bias)
        if z is not None:
            out["sd"] = self.local_to_global_loss(batch, z, teacher_out, teacher_temp) / n_slots
        if koleo_on:   # each global view on its own (as DINOv2): two crops of one image are not neighbours to avoid
            out["koleo"] = sum(koleo_loss(zv) for zv in z_step) / z_step.shape[0]
        if teacher_out is not None and self.use_mask:
            out["dist"] = self.masked_loss(batch, teacher_out, teacher_temp, n_slots)
            if self.cfg.mlm_weight > 0:
                out["mlm"] = self.mlm(batch)
        out["loss"] = sum(self.weights[k] * v for k, v in out.items())
        return out


# -----------------------------------------------------------------------------------------------
# Batches for the step: on the device, padding trimmed, MaskCLIP's masks drawn per sample
def add_masks(batch, cfg, tokenizer, patch_size, step, first_index):
    """MaskCLIP's inputs: the patch mask and the MLM-corrupted caption, row i drawn from
    masking.sample_generator(seed, step, first_index + i): independent of how the batch is split."""
    src = batch["global_crops"][0] if "global_crops" in batch else batch["images"]
    b, _, H, W = src.shape
    gens = [sample_generator(cfg.seed, step, first_index + i) for i in range(b)]
    batch["patch_mask"] = sample_masks(gens, H // patch_size, W // patch_size, cfg.mask_ratio,
                                       cfg.mask_kind).to(src.device)             # [b, N] bool
    if cfg.mlm_weight > 0:
        batch["mlm_inputs"], batch["mlm_labels"] = sample_mlm(batch["tokens"], tokenizer, cfg.mlm_prob, gens)


def to_device(x, device):
    """Tensors, and the tensors inside dicts, to the device (asynchronously from pinned memory)."""
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x.to(device, non_blocking=True) if torch.is_tensor(x) else x


def prepare_batch(batch, cfg, tokenizer, patch_size, step, first_index, device, trim=True):
    """A loader's micro-batch, ready for the step; first_index: its first position in the global batch.
    With crops on the device (--crops), the views are cut here from the uint8 images, one resampling
    call per resolution (data.MultiCrop.views). trim: cut the padding columns (exact,
    clip.trim_padding; off under torch.compile: no reshapes)."""
    batch = to_device(batch, device)
    if "pixels" in batch:
        views = train_views(cfg, patch_size).views(batch.pop("pixels"), batch.pop("crop_params"))
        batch.update(view_batch(*views))
    if "maskclip" in cfg.method:
        add_masks(batch, cfg, tokenizer, patch_size, step, first_index)
    if trim:
        L = trim_padding(batch["tokens"], tokenizer.eot_token_id).shape[1]
        for key in ("tokens", "mlm_inputs", "mlm_labels"):
            if key in batch:
                batch[key] = batch[key][:, :L]
    return batch


# -----------------------------------------------------------------------------------------------
# The optimizer and the schedules
def make_optimizer(model, cfg, device):
    """AdamW; no weight decay on tensors with fewer than 2 dimensions (biases, norm gains, the logit
    scale/bias) nor on the position / class / mask embeddings (open_clip's rule, plus embeddings)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = {n for n, p in named if p.ndim < 2 or any(e in n for e in ("pos_embed", "cls_token", "mask_token"))}
    groups = [{"params": [p for n, p in named if n not in exempt], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if n in exempt], "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **extra)


def schedule(step, total, base, final, warmup=0, start=0.0):
    """DINO's schedule shape, behind every per-step value (lr, teacher temperature, EMA momentum):
    start + (base - start) * (step + 1) / warmup over the first `warmup` steps, then a half cosine
    from base (at step = warmup) to final (at step = total); base == final: constant."""
    if step < warmup:
        return start + (base - start) * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


def step_values(step, cfg):
    """The step's lr (warm-up, cosine to min_lr), teacher temperature (DINO warms it 0.04 -> 0.07: sharp
    targets while the fresh teacher is almost random; the CPU default keeps 0.04), EMA momentum (FIXED,
    as SILC: "the momentum scheduler of the EMA should not converge to 1.0"; DINO's cosine to 1 on
    request), and whether distillation and the patch-text loss are on. The teacher's schedules count
    from sd_start."""
    start = int(cfg.sd_start * cfg.steps)
    t, span = max(0, step - start), cfg.steps - start          # (before the start: unused)
    warm = max(1, int(cfg.teacher_temp_warmup_frac * span))
    final_momentum = 1.0 if cfg.momentum_schedule == "cosine" else cfg.teacher_momentum
    return dict(lr=schedule(step, cfg.steps, cfg.lr, cfg.min_lr, warmup=cfg.warmup_steps),
                teacher_temp=schedule(t, span, cfg.teacher_temp, cfg.teacher_temp, warm, cfg.teacher_temp_warmup),
                momentum=schedule(t, span, cfg.teacher_momentum, final_momentum),
                distill=step >= start, start=start, patch_text=step >= int(cfg.patch_text_start * cfg.steps))


# -----------------------------------------------------------------------------------------------
# One optimizer step
class NonFiniteLoss(RuntimeError):
    """The step's loss is not finite on some rank; raised on every rank, before any update."""


def is_log_step(step, cfg):
    """Whether step (0-based) writes a log.jsonl record: every log_interval-th step, and the last one."""
    return (step + 1) % cfg.log_interval == 0 or step == cfg.steps - 1


def accumulate_gradients(model, pretrainer, teacher, batches, step, cfg, autocast_ctx=contextlib.nullcontext(),
                         world=1, features_fn=None):
    """Forward and backward over this rank's micro-batches of one step -> its loss terms. The
    contrastive loss sees the whole step (a no-grad features_fn pass fills contrastive_loss's cache),
    the other terms are weighted by share, the centres move once from every micro-batch's teacher
    outputs: grad_accum=k gives the loss and gradients of one k times larger micro-batch."""
    values = step_values(step, cfg)
    distill, t_temp, k = teacher is not None and values["distill"], values["teacher_temp"], len(batches)
    cache = None
    if k > 1:
        with autocast_ctx:
            features = features_fn or pretrainer.contrastive_features
            cache = [features(b, values["patch_text"], distill) for b in batches]  # k x ([n_g, b, E], [b, E], patches, z)
    if "mlm_labels" in batches[0]:
        n_mlm = sum((b["mlm_labels"] != -100).sum() for b in batches)          # the step's MLM positions
        for b in batches:
            b["mlm_count"] = n_mlm
    terms, stats = {}, {}
    for j, batch in enumerate(batches):
        with autocast_ctx:
            t_out = teacher_forward(teacher, batch, pretrainer.use_sd, pretrainer.use_mask) if distill else None
        with (contextlib.nullcontext() if j == k - 1 or world == 1 else model.no_sync()):
            with autocast_ctx:
                out = model(batch, t_out, t_temp, cache, j, values["patch_text"])
            if cfg.log_grad_norms and world == 1 and j == 0 and is_log_step(step, cfg):
                terms.update(objective_grad_norms(out, pretrainer))
            out["loss"].backward()
        for name, v in out.items():
            if name != "loss":    # the batch-level terms: the whole step's value in every slot; the rest: shares
                v = v.detach().to(torch.promote_types(v.dtype, torch.float32))      # bf16 -> float32
                terms[name] = v + (terms.get(name, 0.0) if name not in WHOLE_STEP_TERMS else 0.0)
        for name, logits in (("sd", (t_out or {}).get("global")), ("dist", (t_out or {}).get("patch"))):
            if logits is not None:
                stats[name] = stats.get(name, 0.0) + center_stats(logits)
    for name, loss in (("sd", "l2g_loss"), ("dist", "mask_loss")):   # one centre update per step
        if name in stats:
            getattr(pretrainer, loss).update_center(stats[name])
    terms["loss"] = sum(pretrainer.weights[name] * v for name, v in terms.items() if name in pretrainer.weights)
    if distill:
        terms["teacher_temp"] = t_temp                                           # a float: the same on every rank
    # How informative the teacher is (losses.teacher_entropy), on the step's last micro-batch. Only on logged
    # steps: it costs a softmax over K for every teacher patch and, under DDP, a collective.
    if distill and is_log_step(step, cfg):
        if pretrainer.use_sd:
            terms["teacher_entropy"], terms["teacher_entropy_batch"] = teacher_entropy(
                t_out["global"], pretrainer.l2g_loss.center, t_temp)
        if pretrainer.use_mask:        # MaskCLIP's patch codes: near log K = nothing to distil
            terms["patch_entropy"], terms["patch_entropy_batch"] = teacher_entropy(
                [t_out["patch"].flatten(0, 1)], pretrainer.mask_loss.center, t_temp)
    return terms


def objective_grad_norms(out, pretrainer):
    """Each weighted objective's gradient norm on the image tower, and its cosine with the contrastive
    gradient: which loss drives the shared encoder (a diagnostic on log steps; one extra backward each)."""
    params = [p for p in pretrainer.clip.visual.parameters() if p.requires_grad]
    grads = {}
    for name, v in out.items():
        if name != "loss":
            g = torch.autograd.grad(pretrainer.weights[name] * v, params, retain_graph=True, allow_unused=True)
            grads[name] = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)])
    con = grads["contrastive"]
    return {**{f"gnorm_{n}": g.norm() for n, g in grads.items()},
            **{f"gcos_{n}": F.cosine_similarity(g, con, dim=0) for n, g in grads.items() if n != "contrastive"}}


def train_step(model, pretrainer, teacher, optimizer, batches, step, cfg, autocast_ctx=contextlib.nullcontext(),
               world=1, features_fn=None):
    """One optimizer step: lr, the teacher's switch-on, forward/backward, the non-finite stop (every
    rank together, before the bad update), then clip, AdamW, clamp and EMA. -> the logged terms."""
    values = step_values(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = values["lr"]
    distill = teacher is not None and values["distill"]
    if distill and step == values["start"] and step > 0:
        ema_update(teacher, pretrainer.image_student(), 0.0)   # SigLIP 2: the teacher starts as the student
    terms = accumulate_gradients(model, pretrainer, teacher, batches, step, cfg, autocast_ctx, world, features_fn)
    bad = torch.tensor(float(not torch.isfinite(terms["loss"])), device=terms["loss"].device)
    if world > 1:
        dist.all_reduce(bad)
    if bad.item() > 0:
        raise NonFiniteLoss(f"non-finite loss at step {step} ({ {k: float(v) for k, v in terms.items()} })")
    terms["grad_norm"] = apply_update(pretrainer, optimizer, cfg, step, teacher if distill else None, values["momentum"])
    terms["lr"] = values["lr"]
    if distill:
        terms["momentum"] = values["momentum"]
    return terms


def apply_update(pretrainer, optimizer, cfg, step, teacher=None, momentum=None):
    """After backward: clip, (DINO) cancel the last head layer's early gradient, AdamW, clamp, EMA.
    -> the gradient's global norm before clipping (logged as grad_norm: above grad_clip, global
    clipping shrinks every tensor, the contrastive towers' with the heads')."""
    params = [p for p in pretrainer.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if cfg.grad_clip > 0 and cfg.grad_clip_mode == "global":
        torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, norm)
    elif cfg.grad_clip > 0:                             # DINO's utils.clip_gradients: each tensor on its own
        for p in params:
            torch.nn.utils.clip_grad_norm_([p], cfg.grad_clip)
    if pretrainer.use_sd and step < cfg.freeze_last_layer_steps:
        pretrainer.head.cancel_last_layer_grad()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    pretrainer.clip.clamp_logit_scale()                     # exp(scale) <= 100, as CLIP
    if teacher is not None:
        ema_update(teacher, pretrainer.image_student(), momentum)
    return norm


# -----------------------------------------------------------------------------------------------
# Checkpoints: written atomically, only tensors, numbers, strings, lists and dicts (torch.load with
# weights_only=True). No random-number state: the loop draws from no global generator (crops are
# seeded per sample, masks per sample and step), so resume is exact by construction.
def save_checkpoint(path, pretrainer, teacher, optimizer, step, cfg, tokenizer):
    sd = pretrainer.state_dict()
    atomic_save({
        "model": {k[len("clip."):]: v for k, v in sd.items() if k.startswith("clip.")},  # a plain CLIP
        "model_config": dataclasses.asdict(pretrainer.clip.config), "tokenizer": tokenizer.state(),
        "extra": {k: v for k, v in sd.items() if not k.startswith("clip.")},  # heads, decoders, centres
        "teacher": teacher.state_dict() if teacher is not None else None,
        "optimizer": optimizer.state_dict(), "step": step, "config": dataclasses.asdict(cfg),
    }, path)


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
# The student, built and wrapped for the step
def build_student(cfg, clip_cfg, device, ckpt=None):
    """(Pretrainer, AdamW, EMA teacher or None), initialised from cfg.seed (the same on every rank;
    DDP broadcasts rank 0's weights anyway), from --init_from, or restored from a checkpoint."""
    torch.manual_seed(cfg.seed)
    pretrainer = Pretrainer(cfg, clip_cfg)
    if cfg.init_from:
        load_pretrained_into(pretrainer.clip, cfg.init_from)
    pretrainer.to(device)
    if (device.type == "cuda" or cfg.compile) and isinstance(pretrainer.clip.visual.stem, ConvStem):
        pretrainer.clip.visual.stem.channels_last_()   # the weights in their gradients' layout (DDP's buckets)
    optimizer = make_optimizer(pretrainer, cfg, device)
    teacher = make_teacher(pretrainer.image_student()) if pretrainer.use_sd or pretrainer.use_mask else None
    if ckpt is not None:   # a plain CLIP ("model") and the rest ("extra")
        pretrainer.load_state_dict({**{"clip." + k: v for k, v in ckpt["model"].items()}, **ckpt["extra"]})
        optimizer.load_state_dict(ckpt["optimizer"])
        if teacher is not None:
            teacher.load_state_dict(ckpt["teacher"])
    return pretrainer, optimizer, teacher


def wrap_student(pretrainer, cfg, world, local_rank, device):
    """(what the step calls, the no-grad feature pass of gradient accumulation): torch.compile'd and
    DDP-wrapped as configured. find_unused_parameters only while heads sit idle (sd_start > 0)."""
    model, features_fn = pretrainer, None
    if cfg.compile:
        model = torch.compile(pretrainer)
        features_fn = torch.compile(pretrainer.contrastive_features) if cfg.grad_accum > 1 else None
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None,
                                                    broadcast_buffers=False, find_unused_parameters=cfg.sd_start > 0)
    return model, features_fn


# -----------------------------------------------------------------------------------------------
# Logging and evaluation
def log_record(step, terms, skipped, world, samples_per_s, logit_scale):
    """A log.jsonl record: tensor terms averaged over ranks, skipped samples summed over workers and ranks."""
    terms, n_skipped = dict(terms), torch.tensor(float(sum(skipped.values())))
    if world > 1:
        for k, v in terms.items():
            if torch.is_tensor(v):
                dist.all_reduce(v)
                terms[k] = v / world
        dist.all_reduce(n_skipped)
    return {"step": step, "lr": terms.pop("lr"), "samples_per_s": samples_per_s, "logit_scale": logit_scale,
            **{k: round(float(v), 6) for k, v in terms.items()}, "skipped": int(n_skipped)}


def evaluate(pretrainer, teacher, cfg, tokenizer, device, autocast_ctx, eval_sets=None, pictures=False):
    """The zero-shot measures of the student and, when there is one, of the EMA teacher (its image
    tower, the student's text tower; DINO evaluates the teacher): the shapes world's on shapes data
    (eval_seg.shapes_metrics), and on any data retrieval on --val_data and zero-shot classification on
    --zeroshot_data (eval_seg.real_data_metrics). Rank 0 runs it alone, on every sample of each set:
    the numbers cannot depend on the world size (the other ranks wait at their next collective)."""
    clip, metrics = pretrainer.clip, {}
    eval_sets = {k: v for k, v in (eval_sets or {}).items() if v is not None}
    for prefix, model in (("", clip), ("teacher_", teacher_clip(clip, teacher) if teacher is not None else None)):
        if model is None:
            continue
        if cfg.data == "shapes":
            out = cfg.out_dir if pictures else None
            m = shapes_metrics(model, tokenizer, cfg.eval_split, cfg.image_size, cfg.eval_samples, device, autocast_ctx,
                               seg=cfg.eval_seg, seg_out_dir=os.path.join(out, prefix + "seg") if out else None,
                               world=shapes_world(cfg), batch_size=cfg.eval_batch_size)
            metrics.update({prefix + k: v for k, v in m.items()})
        if eval_sets:
            m = real_data_metrics(model, tokenizer, **eval_sets, templates=cfg.zeroshot_templates,
                                  batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers, device=device,
                                  autocast_ctx=autocast_ctx)
            metrics.update({prefix + k: v for k, v in m.items()})
    return metrics


def start_log(log_path, start_step):
    """log.jsonl as this run continues it: a fresh run (start_step 0) starts an empty log, so no earlier
    run's records in the same out_dir end up in its curves; a resumed run keeps the records up to its
    checkpoint's step and drops any that a killed run wrote after it (they are about to be redone)."""
    if not os.path.exists(log_path):
        return
    kept = []
    if start_step > 0:
        with open(log_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= start_step]
    tmp = log_path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, log_path)


def append_log(log_path, record):
    """One record (a training step's terms, or an evaluation's metrics with its step) into log.jsonl."""
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def draw_curves_of(log_path):
    """out_dir/curves.png from log.jsonl: every loss term, the lr and the evaluations against step
    (experiments/curves.py; written atomically). Nothing logged yet: no picture."""
    try:
        save_curves([log_path], os.path.join(os.path.dirname(log_path), "curves.png"))
    except (FileNotFoundError, ValueError):
        pass


def teacher_clip(clip, teacher):
    """A CLIP whose image tower is the EMA teacher's and whose text tower is the student's."""
    model = copy.deepcopy(clip)
    model.visual.load_state_dict(teacher["visual"].state_dict())
    return model


# -----------------------------------------------------------------------------------------------
# main: the loop
def main(argv=None):
    cfg = resolve_method_defaults(parse_args(sys.argv[1:] if argv is None else argv))
    rank, world, local_rank, device, owned = setup_distributed(cfg)
    master = rank == 0
    if cfg.batch_size % (world * cfg.grad_accum) != 0:
        sys.exit(f"error: batch_size {cfg.batch_size} must be divisible by world_size x grad_accum "
                 f"= {world} x {cfg.grad_accum}")
    micro = cfg.batch_size // (world * cfg.grad_accum)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    start_step = ckpt["step"] if ckpt is not None else 0
    if master:
        start_log(log_path, start_step)
        print("config:", json.dumps(dataclasses.asdict(cfg)))
        print(f"world size {world}, device {device}, micro-batch per rank {micro}, first step {start_step}")
    autocast_ctx = autocast_for(device)

    # --- model config, tokenizer, data ---
    clip_cfg, tokenizer = build_model_config(cfg)
    dataset, collate_fn = build_train_data(cfg, clip_cfg.patch_size, tokenizer)
    data_iter = iter(make_loader(dataset, collate_fn, cfg.batch_size, world, rank, cfg.grad_accum, cfg.seed,
                                 start_step, cfg.num_workers, pin_memory=device.type == "cuda"))
    eval_sets = build_eval_sets(cfg)                     # --val_data, --zeroshot_data (None if not given)

    # --- student, optimizer, teacher; what the step calls (compiled, DDP-wrapped) ---
    pretrainer, optimizer, teacher = build_student(cfg, clip_cfg, device, ckpt)
    model, features_fn = wrap_student(pretrainer, cfg, world, local_rank, device)

    # --- the loop ---
    pbar = tqdm(total=cfg.steps, initial=start_step, dynamic_ncols=True, disable=not master)
    skipped = {}                        # DataLoader worker id -> that worker's count of skipped samples
    t_last, samples_since = time.time(), 0
    for step in range(start_step, cfg.steps):
        batches = []
        for a in range(cfg.grad_accum):   # micro-batch a of rank r: positions (a * world + r) * micro ...
            batch = next(data_iter)
            worker, n_skipped = batch.pop("skipped", (-1, 0))
            skipped[worker] = n_skipped
            batches.append(prepare_batch(batch, cfg, tokenizer, clip_cfg.patch_size, step, (a * world + rank) * micro,
                                         device, trim=not cfg.compile))
        try:
            terms = train_step(model, pretrainer, teacher, optimizer, batches, step, cfg, autocast_ctx, world,
                               features_fn)
        except NonFiniteLoss as e:
            if master:
                print(f"\nerror: {e}. Stopping; the last good checkpoint is {ckpt_path}")
            cleanup(world, owned)
            sys.exit(1)
        samples_since += cfg.batch_size
        if is_log_step(step, cfg):
            rec = log_record(step + 1, terms, skipped, world, samples_since / (time.time() - t_last),
                             pretrainer.clip.logit_scale.exp().item())
            t_last, samples_since = time.time(), 0
            pbar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", sps=f"{rec['samples_per_s']:.0f}")
            if master:
                append_log(log_path, rec)
        pbar.update(1)
        if master and cfg.eval_interval and (step + 1) % cfg.eval_interval == 0 and step + 1 < cfg.steps:
            m = evaluate(pretrainer, teacher, cfg, tokenizer, device, autocast_ctx, eval_sets)
            append_log(log_path, {"step": step + 1, **m})
            draw_curves_of(log_path)
            tqdm.write(f"step {step + 1}: {m}")
        if master and ((step + 1) % cfg.ckpt_interval == 0 or step + 1 in (cfg.steps, cfg.stop_at)):
            save_checkpoint(ckpt_path, pretrainer, teacher, optimizer, step + 1, cfg, tokenizer)
        if step + 1 == cfg.stop_at:
            pbar.close()
            if master:
                draw_curves_of(log_path)
                print(f"stopped at step {step + 1} (--stop_at); continue with --resume=True")
            return cleanup(world, owned)
    pbar.close()
    if master and cfg.eval:
        t0 = time.time()
        metrics = evaluate(pretrainer, teacher, cfg, tokenizer, device, autocast_ctx, eval_sets, pictures=True)
        if metrics:
            append_log(log_path, {"step": cfg.steps, **metrics})
        metrics["step"] = cfg.steps
        with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        print(f"final metrics ({time.time() - t0:.0f}s to evaluate):", json.dumps(metrics))
    if master:
        draw_curves_of(log_path)
    cleanup(world, owned)


if __name__ == "__main__":
    main()
