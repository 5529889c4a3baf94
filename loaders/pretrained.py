"""Public CLIP weights in clip.py, any checkpoint back into a model, and CLIP's byte-pair-encoding (BPE)
tokenizer.

Few people can pretrain a ViT-B/16 on hundreds of millions of pairs, but anyone can take a public
CLIP (Radford et al. 2021), measure its zero-shot segmentation (eval_seg.py) and continue training it
with the SILC or MaskCLIP losses (train.py --init_from). This file makes that possible with no
download code: the user fetches the files, we read them from a local path. And the way back: a model
trained here becomes an open_clip model (section 3), so it runs where people already work.

1. Weights. OpenAI's CLIP checkpoints (ViT-B/32, ViT-B/16, ViT-L/14; TorchScript archives or plain
   state dicts) and open_clip's checkpoints of the same architectures are the same pre-norm ViT as
   clip.py; only the parameter names differ. The renaming is the table below (OPENAI_TO_OURS and
   BLOCK_TO_OURS in code); open_clip's CLIP class uses exactly OpenAI's names.

       OpenAI / open_clip name                   clip.py name                 note
       visual.conv1.weight                       visual.stem.weight           [D, 3, p, p]; stem="linear"
       visual.class_embedding                    visual.cls_token
       visual.positional_embedding               visual.pos_embed             [1 + G*G, D]
       visual.ln_pre.*, visual.ln_post.*         (same)
       visual.proj                               visual.proj.weight           transposed: x @ P -> Linear
       visual.transformer.resblocks.{i}.*        visual.blocks.{i}.*          see block table
       token_embedding.weight                    text.token_embedding.weight
       positional_embedding                      text.pos_embed               [L, W]
       transformer.resblocks.{i}.*               text.blocks.{i}.*            see block table
       ln_final.*                                text.ln_final.*
       text_projection                           text.proj.weight             transposed
       logit_scale (, logit_bias)                (same)                       shape [] or [1]
     block table (inside a resblock):
       ln_1.*, ln_2.*, attn.out_proj.*           (same)
       attn.in_proj_weight, attn.in_proj_bias    attn.in_proj.weight, .bias   rows = [W_q; W_k; W_v]
       mlp.c_fc.*, mlp.c_proj.*                  mlp.fc1.*, mlp.fc2.*
     dropped: input_resolution, context_length, vocab_size (OpenAI TorchScript metadata, not weights),
              attn_mask (the text causal mask, in open_clip TorchScript exports; clip.py builds its own)
     added:   visual.mask_token = zeros (not part of public CLIP; clip.py also starts it at zero)

   Containers: OpenAI's TorchScript archives, torch.save files (.bin / .pt), and .safetensors files
   (what open_clip and Hugging Face serve today, open_clip_model.safetensors), read here without the
   safetensors package: an 8-byte header length, a JSON header, raw little-endian tensors.
   Also accepted: open_clip training checkpoints ({"state_dict": ...} with DDP "module." prefixes),
   open_clip's CustomTextCLIP layout ("text.transformer...", "text.text_projection"), and our own
   {"model", "model_config"} files (train.py checkpoints, save_converted). Any other key, a missing
   key or a shape that does not fit is a ValueError that lists them: a silent partial load would
   give a model that runs and is wrong.

   The architecture is read off the tensor shapes, as OpenAI's build_model does: vision width and
   patch size from conv1, grid (hence image size) from the position embedding, layer counts from the
   block indices, text width / context / vocabulary from the text embeddings, the joint dimension from
   text_projection; heads = width / 64 (OpenAI's ViTs and open_clip's standard configs; overridable).
   Two things are NOT in the weights:
   * the activation. OpenAI trained with QuickGELU, x * sigmoid(1.702 x); open_clip's plain configs
     (e.g. its LAION ViT-B-32 weights) use exact GELU, its "-quickgelu" configs QuickGELU. Default
     act="quick_gelu" (right for every OpenAI file); pass act="gelu" for open_clip models whose
     config name has no "quickgelu". A wrong choice runs fine and silently gives worse embeddings.
   * the pooling token. OpenAI pools text at argmax(token id), i.e. at EOT, the largest id; clip.py
     pools at the first position equal to config.eot_token_id, set to vocab_size - 1 (= 49407).

2. Tokenizer. CLIP's text encoder reads byte-level BPE tokens (Sennrich et al. 2016; byte-level as
   in GPT-2): text is cleaned and lower-cased, split into words by a pre-tokenisation pattern, each
   word's UTF-8 bytes are written as printable characters (bytes_to_unicode), and adjacent symbols
   are merged greedily, always taking the pair that ranks first in the merges file
   (bpe_simple_vocab_16e6.txt.gz, shipped with OpenAI's CLIP and with open_clip), until no listed
   pair remains. A word's last symbol carries "</w>", so "cat" as a whole word and "cat" inside
   "category" are different tokens. Vocabulary: 256 byte symbols + the same 256 with "</w>" + 48,894
   merges + <|startoftext|> (49406) + <|endoftext|> (49407) = 49,408. A caption becomes
   [SOT] tokens... [EOT] 0 0 ... (77 ids; padding id 0; truncation keeps EOT last, as open_clip
   does; OpenAI's tokenizer raises instead). open_clip spells the special tokens <start_of_text> and
   <end_of_text>: same ids, but typed literally in a caption only OpenAI's spelling is recognised here.
   The byte tokenizer in data.py stays the default for training from scratch.

   Differences from the original, by design (standard library only):
   * Pre-tokenisation. The original uses the third-party `regex` module:
       <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+
     (case-insensitive). Python's `re` has no \\p{L}/\\p{N} (and its \\w, \\d do not match them
     exactly: "三" is numeric to str.isnumeric but a letter, Lo, to Unicode), so split_words scans the
     text once, classifying each character by unicodedata.category (L* letter, N* number) and
     str.isspace, trying the alternatives in the same order with the same greediness.
     Characters newer than Python's Unicode tables (3.11: Unicode 14) count as punctuation here.
   * Cleaning. The original runs ftfy.fix_text, html.unescape twice, strip, collapse whitespace,
     lower-case. ftfy is not a dependency: clean_text keeps the fixes that change ordinary text
     (HTML entities, curly quotes -> straight, Latin ligatures, full-width ASCII, control
     characters, NFC normalisation) and SKIPS ftfy's mojibake repair (e.g. "cafÃ©" -> "café") and
     terminal-escape removal. Such text tokenises differently from the original.

3. Export. A train.py checkpoint becomes an open_clip model folder (`export_open_clip`; the
   command: `python -m loaders.pretrained export out/ckpt.pt out/open_clip`): the import table read
   backwards (projections transposed back to x @ P), the open_clip model config of its size
   (open_clip_config.json, what `open_clip.create_model("local-dir:...")` reads) and the tokenizer
   it needs. The training-only parts (DINO heads, decoders, the mask token, the optimizer) stay
   behind. Two limits, both said plainly: the convolutional stem has no open_clip counterpart (train
   with --stem=linear to export), and open_clip has no byte- or word-level tokenizer: a model trained
   with CLIP's BPE (--init_from) is complete in open_clip; any other gives open_clip its image tower
   and its text tower, whose ids must come from this project's tokenizer (recorded in the config).
"""

import gzip
import html
import json
import math
import os
import re
import unicodedata
import zipfile
from dataclasses import asdict

import torch

from clip import CLIP, CLIPConfig, interpolate_pos_embed
from data import CLIP_MEAN, CLIP_STD, ByteTokenizer, WordTokenizer

# ----------------------------------------------------------------------------------------------
# 1. Weights: OpenAI / open_clip names -> clip.py names
# ----------------------------------------------------------------------------------------------

# Every non-block parameter of an OpenAI / open_clip ViT CLIP, and its name in clip.py.
OPENAI_TO_OURS = {
    "visual.conv1.weight": "visual.stem.weight",
    "visual.class_embedding": "visual.cls_token",
    "visual.positional_embedding": "visual.pos_embed",
    "visual.ln_pre.weight": "visual.ln_pre.weight",
    "visual.ln_pre.bias": "visual.ln_pre.bias",
    "visual.ln_post.weight": "visual.ln_post.weight",
    "visual.ln_post.bias": "visual.ln_post.bias",
    "visual.proj": "visual.proj.weight",
    "token_embedding.weight": "text.token_embedding.weight",
    "positional_embedding": "text.pos_embed",
    "ln_final.weight": "text.ln_final.weight",
    "ln_final.bias": "text.ln_final.bias",
    "text_projection": "text.proj.weight",
    "logit_scale": "logit_scale",
    "logit_bias": "logit_bias",
}
# Inside one residual block: "<tower prefix>.resblocks.{i}.<key>" -> "<our prefix>.blocks.{i}.<value>".
BLOCK_TO_OURS = {
    "ln_1.weight": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "attn.in_proj_weight": "attn.in_proj.weight",
    "attn.in_proj_bias": "attn.in_proj.bias",
    "attn.out_proj.weight": "attn.out_proj.weight",
    "attn.out_proj.bias": "attn.out_proj.bias",
    "ln_2.weight": "ln_2.weight",
    "ln_2.bias": "ln_2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
BLOCK_PREFIXES = {"visual.transformer.resblocks.": "visual.blocks.", "transformer.resblocks.": "text.blocks."}
# OpenAI stores projections as P [in, out] used as x @ P; nn.Linear keeps weight [out, in].
TRANSPOSED = {"visual.proj", "text_projection"}
# Not weights: metadata in OpenAI's TorchScript archives, and the causal mask that open_clip's
# TorchScript exports carry (clip.py builds its own).
IGNORED = {"input_resolution", "context_length", "vocab_size", "attn_mask"}
# open_clip's CustomTextCLIP keeps the text tower under "text."; its CLIP class (= OpenAI) does not.
CUSTOM_TEXT_KEYS = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")

_BLOCK_KEY = re.compile(r"((?:visual\.)?transformer\.resblocks\.)(\d+)\.(.+)")
# clip.py fields that fix tensor shapes (checked by load_pretrained_into); act / heads / ids are choices.
ARCH_FIELDS = ("stem", "image_size", "patch_size", "vision_width", "vision_layers", "mlp_ratio",
               "context_length", "vocab_size", "text_width", "text_layers", "embed_dim")


# safetensors dtype names -> torch dtypes (the format's full list, minus the sub-byte and 8-bit exponent-only types)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
                      "BOOL": torch.bool}
SAFETENSORS_MAX_HEADER = 100 * 2**20        # the reference implementation refuses larger headers too


def read_safetensors(path: str) -> dict:
    """A .safetensors file -> {name: tensor}, with the standard library and torch only.

    The format (huggingface/safetensors): an unsigned little-endian 64-bit header length n, then n
    bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
    then the raw little-endian tensor bytes, offsets relative to the end of the header. The tensors
    must tile the data section exactly: sorted by offset, each begins where the previous one ends.
    Each tensor is read into its own buffer (no second copy of the file in memory). A malformed
    header (a length past the file, bad JSON, an unknown dtype, a bad shape, offsets that do not
    match the shape, overlap or leave gaps) is a ValueError that says what is wrong."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path!r}: too short for a safetensors header ({size} bytes)")
        n = int.from_bytes(raw, "little")
        if not 2 <= n <= min(size - 8, SAFETENSORS_MAX_HEADER):
            raise ValueError(f"{path!r}: safetensors header length {n} does not fit the {size}-byte file")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path!r}: the safetensors header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path!r}: the safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        data_size = size - 8 - n
        entries = []                                   # (begin, end, name, dtype, shape)
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
                if not all(isinstance(v, int) and v >= 0 for v in [*shape, begin, end]):
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path!r}: tensor {name!r} has a malformed entry {info!r} (known dtypes: "
                                 f"{sorted(SAFETENSORS_DTYPES)})") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or end > data_size:
                raise ValueError(f"{path!r}: tensor {name!r} ({info['dtype']} {shape}, {nbytes} bytes) has "
                                 f"data_offsets [{begin}, {end}] in a {data_size}-byte data section")
            entries.append((begin, end, name, dtype, shape))
        entries.sort(key=lambda e: (e[0], e[1]))
        position = 0
        for begin, end, name, _, _ in entries:         # exact tiling: no overlap, no gap, no tail
            if begin != position:
                raise ValueError(f"{path!r}: tensor {name!r} starts at byte {begin} of the data section, not at "
                                 f"{position} where the previous tensor ends (overlap or gap)")
            position = end
        if position != data_size:
            raise ValueError(f"{path!r}: the tensors cover {position} of the {data_size} data bytes")
        out = {}
        for begin, end, name, dtype, shape in entries:
            buf = bytearray(end - begin)
            f.seek(8 + n + begin)
            f.readinto(buf)
            # (bytes are little-endian, as on every machine torch runs on in practice)
            out[name] = torch.frombuffer(buf, dtype=dtype).reshape(shape) if buf else torch.empty(shape, dtype=dtype)
    return out


def read_state_dict(path: str) -> dict:
    """Read a checkpoint file into a flat {name: tensor} dict, whatever the container.

    TorchScript archive (OpenAI's .pt files) -> torch.jit.load(...).state_dict(); a .safetensors file
    (what open_clip and Hugging Face serve today, open_clip_model.safetensors) -> read_safetensors;
    anything else goes through torch.load(weights_only=True): plain state dicts
    (open_clip_pytorch_model.bin), open_clip training checkpoints (a "state_dict" entry, "module."
    prefixes), and our {"model", "model_config"} files, which are returned whole.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r} (download it yourself: this code never does)")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    # A TorchScript archive is a zip holding serialised code ("constants.pkl", "code/"); a torch.save
    # zip holds only "data.pkl" and tensor storages.
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            is_torchscript = any(n.endswith("/constants.pkl") for n in z.namelist())
        if is_torchscript:
            return dict(torch.jit.load(path, map_location="cpu").state_dict())
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
    if "model" in obj and "model_config" in obj:       # ours: already clip.py names
        return obj
    if isinstance(obj.get("state_dict"), dict):        # open_clip training checkpoint
        obj = obj["state_dict"]
    out = {}
    for k, v in obj.items():
        # saved from a DistributedDataParallel ("module.") or torch.compile ("_orig_mod.") wrapper
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def _to_openai_names(sd: dict) -> dict:
    """Undo open_clip's CustomTextCLIP layout ("text.transformer..." -> "transformer...")."""
    out = {}
    for k, v in sd.items():
        if k.startswith("text.") and k[len("text."):].startswith(CUSTOM_TEXT_KEYS):
            k = k[len("text."):]
        out[k] = v
    return out


def _infer_config(sd: dict, act: str, vision_heads, text_heads, eot_token_id) -> CLIPConfig:
    """Architecture from tensor shapes (the rule of OpenAI's build_model)."""
    if any(k.startswith("visual.layer1.") or k.startswith("visual.attnpool.") for k in sd):
        raise ValueError("this is a ResNet CLIP (RN50, RN101, ...); only ViT checkpoints map onto clip.py")
    needed = ["visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight",
              "positional_embedding", "text_projection", "visual.transformer.resblocks.0.mlp.c_fc.weight"]
    absent = [k for k in needed if k not in sd]
    if absent:
        raise ValueError(f"not an OpenAI / open_clip ViT CLIP state dict: missing {absent} "
                         f"(first keys found: {sorted(sd)[:8]})")
    vision_width, _, patch_size, patch_w = sd["visual.conv1.weight"].shape     # [D, 3, p, p]
    if patch_size != patch_w:
        raise ValueError(f"non-square patches {patch_size}x{patch_w} are not supported")
    n_patches = sd["visual.positional_embedding"].shape[0] - 1                 # [1 + G*G, D]
    grid = math.isqrt(n_patches)
    if grid * grid != n_patches:
        raise ValueError(f"visual.positional_embedding has {n_patches} patch positions, not a square grid")
    vocab_size, text_width = sd["token_embedding.weight"].shape                # [V, W]

    def n_blocks(prefix):
        return len({int(m.group(2)) for k in sd if (m := _BLOCK_KEY.fullmatch(k)) and m.group(1) == prefix})

    # clip.py builds hidden = int(width * mlp_ratio) in both towers, so one ratio must fit both.
    mlp_ratio = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vision_width
    return CLIPConfig(
        image_size=grid * patch_size, patch_size=patch_size, stem="linear",
        vision_width=vision_width, vision_layers=n_blocks("visual.transformer.resblocks."),
        vision_heads=vision_heads or vision_width // 64, mlp_ratio=mlp_ratio,
        context_length=sd["positional_embedding"].shape[0], vocab_size=vocab_size,
        text_width=text_width, text_layers=n_blocks("transformer.resblocks."),
        text_heads=text_heads or text_width // 64, embed_dim=sd["text_projection"].shape[1], act=act,
        eot_token_id=vocab_size - 1 if eot_token_id is None else eot_token_id, pad_token_id=0,
        init_logit_scale=float(sd["logit_scale"]) if "logit_scale" in sd else math.log(1 / 0.07),
        init_logit_bias=float(sd["logit_bias"]) if "logit_bias" in sd else None,
    )


def _rename(key: str, table: dict, block_key: re.Pattern, prefixes: dict, block_table: dict) -> str | None:
    """One key through a pair of name tables (either way): a non-block key by `table`, a block key
    "<tower prefix><i>.<rest>" by `prefixes` and `block_table`; None if the tables do not know it."""
    if key in table:
        return table[key]
    m = block_key.fullmatch(key)
    if m and m.group(3) in block_table:
        return f"{prefixes[m.group(1)]}{m.group(2)}.{block_table[m.group(3)]}"
    return None


def _our_name(key: str) -> str | None:
    """clip.py name of one OpenAI / open_clip key, or None if the tables do not know it."""
    return _rename(key, OPENAI_TO_OURS, _BLOCK_KEY, BLOCK_PREFIXES, BLOCK_TO_OURS)


def check_state_dict(config: CLIPConfig, sd: dict) -> None:
    """ValueError listing every missing, unexpected and wrongly shaped key of a clip.py state dict."""
    with torch.device("meta"):                 # shapes only: no memory, no initialisation cost
        expected = {k: tuple(v.shape) for k, v in CLIP(config).state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
                   for k in set(sd) & set(expected) if tuple(sd[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise ValueError("checkpoint does not fit the model:"
                         + (f"\n  missing keys: {missing}" if missing else "")
                         + (f"\n  unexpected keys: {unexpected}" if unexpected else "")
                         + (f"\n  shape mismatches: {wrong}" if wrong else ""))


def convert_state_dict(sd: dict, act: str = "quick_gelu", vision_heads: int | None = None,
                       text_heads: int | None = None, eot_token_id: int | None = None):
    """OpenAI / open_clip state dict -> (CLIPConfig, clip.py state dict), float32.

    act: "quick_gelu" for OpenAI weights and open_clip "-quickgelu" models, "gelu" for the others.
    vision_heads / text_heads: default width // 64. eot_token_id: default vocab_size - 1.
    Our own {"model", "model_config"} dict is returned as it is (act etc. from its config).
    """
    if "model" in sd and "model_config" in sd:
        config = CLIPConfig(**sd["model_config"])
        check_state_dict(config, sd["model"])
        return config, dict(sd["model"])
    if "visual.stem.weight" in sd:
        raise ValueError("this is a bare clip.py state dict: its config is not recorded; save models with "
                         "save_converted(path, config, state_dict) (train.py checkpoints already are fine)")
    sd = _to_openai_names({k: v for k, v in sd.items() if k not in IGNORED})
    config = _infer_config(sd, act, vision_heads, text_heads, eot_token_id)

    unknown = sorted(k for k in sd if _our_name(k) is None)
    if unknown:
        raise ValueError(f"{len(unknown)} checkpoint keys have no place in clip.py (a different "
                         f"architecture, e.g. layer scale, attention pooling, or a non-CLIP model): {unknown}")
    ours = {}
    for k, v in sd.items():
        v = v.detach()
        if v.is_floating_point():
            v = v.float()                          # OpenAI ships float16; clip.py computes in float32
        if k in TRANSPOSED:
            v = v.t()                              # [in, out] -> Linear weight [out, in]
        if k in ("logit_scale", "logit_bias"):
            v = v.reshape(())                      # open_clip may store them as [1]
        ours[_our_name(k)] = v.contiguous()
    ours["visual.mask_token"] = torch.zeros(config.vision_width)
    check_state_dict(config, ours)
    return config, ours


def model_from_state_dict(config: CLIPConfig, sd: dict) -> CLIP:
    """A CLIP that holds these very tensors (shared, not copied), in training mode.

    Built on the meta device, then the tensors are adopted (assign=True): a random initialisation
    that would be overwritten anyway costs ~10 s for ViT-L/14 on a CPU.
    """
    with torch.device("meta"):
        model = CLIP(config)
    model.load_state_dict(sd, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"clip.py has tensors the checkpoint does not fill: {left}")
    return model


def save_converted(path: str, config: CLIPConfig, state_dict: dict) -> None:
    """Write a converted model as {"model", "model_config"}, the layout of train.py's checkpoints."""
    torch.save({"model": state_dict, "model_config": asdict(config)}, path)


def load_pretrained(path: str, merges_path: str | None = None, act: str = "quick_gelu", **kwargs):
    """Checkpoint file -> (CLIP in eval mode, BPETokenizer).

    merges_path: bpe_simple_vocab_16e6.txt.gz; default: that name in the checkpoint's folder.
    act and kwargs (vision_heads, text_heads, eot_token_id) as in convert_state_dict.
    """
    if merges_path is None:
        merges_path = os.path.join(os.path.dirname(os.path.abspath(path)), "bpe_simple_vocab_16e6.txt.gz")
    tokenizer = BPETokenizer(merges_path)
    config, sd = convert_state_dict(read_state_dict(path), act=act, **kwargs)
    model = model_from_state_dict(config, sd)
    if config.vocab_size != tokenizer.vocab_size or config.eot_token_id != tokenizer.eot_token_id:
        raise ValueError(f"the model's vocabulary ({config.vocab_size} ids, EOT {config.eot_token_id}) does "
                         f"not match the tokenizer's ({tokenizer.vocab_size} ids, EOT {tokenizer.eot_token_id})")
    tokenizer.context_length = config.context_length
    return model.eval(), tokenizer


def load_pretrained_into(model: CLIP, path: str) -> CLIP:
    """Copy a checkpoint's weights into an existing CLIP (train.py --init_from); returns the model.

    The model's own act, heads and eot_token_id are used. Its shape fields (ARCH_FIELDS) must match
    the checkpoint, except image_size: a different training resolution (same patch size) gets the
    position embedding resized bicubically. A model with a logit_bias (sigmoid loss) keeps its own
    when the checkpoint has none; a checkpoint's logit_bias is dropped if the model has none.
    """
    mc = model.config
    ckpt_config, sd = convert_state_dict(read_state_dict(path), act=mc.act, vision_heads=mc.vision_heads,
                                         text_heads=mc.text_heads, eot_token_id=mc.eot_token_id)
    differ = [f"{f}: model {getattr(mc, f)!r}, checkpoint {getattr(ckpt_config, f)!r}"
              for f in ARCH_FIELDS if f != "image_size" and getattr(mc, f) != getattr(ckpt_config, f)]
    if differ:
        raise ValueError("the model's architecture differs from the checkpoint's; build the model from "
                         "convert_state_dict(read_state_dict(path))[0] instead:\n  " + "\n  ".join(differ))
    if mc.image_size != ckpt_config.image_size:
        g = mc.image_size // mc.patch_size
        sd["visual.pos_embed"] = interpolate_pos_embed(sd["visual.pos_embed"], g, g).contiguous()
    if model.logit_bias is None:
        sd.pop("logit_bias", None)
    elif "logit_bias" not in sd:
        sd["logit_bias"] = model.logit_bias.detach().clone()
    model.load_state_dict(sd)
    return model


def config_from_checkpoint(path: str, bpe_path: str, act: str = "quick_gelu"):
    """(CLIPConfig, BPETokenizer) of a public CLIP checkpoint, to build a model that will load it
    (train.py --init_from). Missing files are a FileNotFoundError that says what to pass."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if not bpe_path or not os.path.exists(bpe_path):
        raise FileNotFoundError(f"a public CLIP checkpoint needs CLIP's BPE merges file "
                                f"(bpe_simple_vocab_16e6.txt.gz) as --bpe_path, got {bpe_path!r}")
    config, _ = convert_state_dict(read_state_dict(path), act=act)
    return config, BPETokenizer(bpe_path, context_length=config.context_length)


def tokenizer_from_state(state: dict, bpe_path: str | None = None, where: str = "the checkpoint"):
    """The tokenizer a train.py checkpoint was trained with, from its recorded state (tokenizer.state()):
    the byte or word tokenizer (data.py) is rebuilt as it was; CLIP's BPE needs its merges file."""
    if state["kind"] == "byte":
        return ByteTokenizer(context_length=state["context_length"])
    if state["kind"] == "word":
        return WordTokenizer(state["words"], context_length=state["context_length"])
    if not bpe_path:
        raise ValueError(f"{where} uses CLIP's BPE vocabulary: pass --bpe_path=.../bpe_simple_vocab_16e6.txt.gz")
    return BPETokenizer(bpe_path, context_length=state["context_length"])


def checkpoint_config(path: str) -> dict:
    """The train.py config a checkpoint was written with ({} for a public checkpoint)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:          # a TorchScript archive
        return {}
    return ckpt.get("config") or {} if isinstance(ckpt, dict) else {}


def our_checkpoint_parts(ckpt: dict, path: str = "the checkpoint", teacher: bool = False):
    """A loaded train.py checkpoint (or a save_converted file) -> (CLIPConfig, clip.py state dict,
    tokenizer state). teacher=True: the image tower is the EMA teacher's, the text tower the student's.
    The tokenizer is the recorded one (older files: byte-level unless the config has CLIP's BPE
    vocabulary). Only the CLIP itself: heads, decoders and the optimizer state are left behind."""
    config = CLIPConfig(**ckpt["model_config"])
    tok = ckpt.get("tokenizer") or {"kind": "byte" if config.vocab_size == ByteTokenizer().vocab_size else "bpe"}
    # Strip wrappers' prefixes in case the state dict came from DDP or torch.compile.
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    if teacher:
        if not ckpt.get("teacher"):
            raise ValueError(f"{path} holds no EMA teacher (only the self-distillation methods keep one)")
        state.update({k: v for k, v in ckpt["teacher"].items() if k.startswith("visual.")})
    return config, state, {"context_length": config.context_length, **tok}


def load_model_from_checkpoint(path, device="cpu", bpe_path=None, act="quick_gelu", teacher=False):
    """A checkpoint -> (model in eval mode on device, tokenizer).

    Two kinds of file:
    * a train.py checkpoint, {"model": CLIP state_dict, "model_config": dict of CLIPConfig fields}
      (also a converted public model saved by save_converted): the tokenizer is the one the
      model was trained with (recorded in the checkpoint; older ones: byte-level unless the config
      has CLIP's BPE vocabulary). teacher=True: the image tower is the EMA teacher's (SILC and
      MaskCLIP runs keep one; DINO evaluates the teacher), the text tower the student's;
    * a public CLIP checkpoint (OpenAI .pt / TorchScript, open_clip .bin): converted by pretrained.py;
      its BPE tokenizer reads `bpe_path` (bpe_simple_vocab_16e6.txt.gz). `act`: quick_gelu for the
      OpenAI weights, gelu for open_clip models without "-quickgelu" in their name.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:          # a TorchScript archive (OpenAI's .pt files) is not a pickled dict
        ckpt = None
    if not (isinstance(ckpt, dict) and "model" in ckpt and "model_config" in ckpt):
        if not bpe_path:
            keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f"{path} is not a train.py checkpoint (a dict with 'model' and 'model_config'; "
                             f"found {keys}). For a public CLIP checkpoint (OpenAI .pt, open_clip .bin) also "
                             f"pass --bpe_path=.../bpe_simple_vocab_16e6.txt.gz")
        model, tokenizer = load_pretrained(path, merges_path=bpe_path, act=act)
        return model.to(device).eval(), tokenizer
    config, state, tok_state = our_checkpoint_parts(ckpt, path, teacher)
    tokenizer = tokenizer_from_state(tok_state, bpe_path, path)
    model = CLIP(config)
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer


# ----------------------------------------------------------------------------------------------
# 2. CLIP's BPE tokenizer
# ----------------------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable characters (GPT-2's trick).

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ', 188 of them) stand for themselves; the
    other 68 (controls, space, ...) take the characters 256, 257, ... in byte order, so no byte is
    ever whitespace or invisible to the merges. The dict's order (printable first) is the vocabulary
    order of the first 256 ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


# Characters ftfy.fix_text would replace in ordinary text (the part of ftfy we reproduce).
_QUOTES = {**{c: "'" for c in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)},
           **{c: '"' for c in (0x201C, 0x201D, 0x201E, 0x201F)}}
# Latin ligatures and digraphs -> their letters (NFKC gives the letters; "ŉ" -> "ʼn", then uncurled).
_LIGATURES = {ord(c): unicodedata.normalize("NFKC", c) for c in "ĲĳŉǄǅǆǇǈǉǊǋǌǱǲǳﬀﬁﬂﬃﬄﬅﬆ"}
# Full-width / half-width forms (U+FF01..U+FFEF) -> standard width, and the ideographic space -> " ".
_WIDTH = {c: unicodedata.normalize("NFKC", chr(c)) for c in range(0xFF01, 0xFFF0)
          if unicodedata.normalize("NFKC", chr(c)) != chr(c)} | {0x3000: " "}
# Control characters nobody means to type (tab, newline, CR and form feed are kept: whitespace).
_CONTROLS = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
                           0xFEFF, *range(0xFFF9, 0xFFFD)])


def clean_text(text: str) -> str:
    """CLIP's text cleaning: HTML entities, the ordinary-text part of ftfy, whitespace, lower case."""
    # ftfy decodes HTML entities first, unless the text has a "<" (then it may be markup), repeating
    # until nothing changes ("&amp;rsquo;" -> "&rsquo;" -> "’"), so the quote fix below sees the result.
    if "<" not in text:
        while (unescaped := html.unescape(text)) != text:
            text = unescaped
    # ftfy's character fixes, in its order (mojibake repair is skipped: see the module docstring).
    text = text.translate(_LIGATURES).translate(_WIDTH).translate(_QUOTES).translate(_CONTROLS)
    text = unicodedata.normalize("NFC", text)       # "e" + combining acute -> "é", as ftfy does
    # CLIP's own steps: unescape twice, collapse every run of whitespace to one space, lower-case.
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def _kind(ch: str) -> str:
    """'L' letter (\\p{L}), 'N' number (\\p{N}), ' ' whitespace (\\s), 'P' anything else."""
    cat = unicodedata.category(ch)[0]
    if cat in "LN":
        return cat
    return " " if ch.isspace() else "P"


def split_words(text: str) -> list[str]:
    """CLIP's pre-tokenisation: the regex alternatives of the module docstring, tried in order.

    At each position: a special token; a contraction ('s 't 're 've 'm 'll 'd, case-insensitive);
    a run of letters; ONE number character ("2024" -> "2", "0", "2", "4"); a run of characters that
    are neither whitespace, letters nor numbers. Whitespace is skipped (it separates words).
    """
    words, i, n = [], 0, len(text)
    while i < n:
        kind = _kind(text[i])
        if kind == " ":
            i += 1
            continue
        special = contraction = None
        if text[i] == "<":
            special = next((s for s in SPECIAL_TOKENS if text.startswith(s, i)), None)
        elif text[i] == "'":
            # casefold per character: the regex module's IGNORECASE also matches "'S" (and "'ſ").
            contraction = next((c for c in CONTRACTIONS
                                if all(text[i + j: i + j + 1].casefold() == c[j] for j in range(1, len(c)))), None)
        if special or contraction:
            j = i + len(special or contraction)
        elif kind == "N":
            j = i + 1
        else:                                         # greedy run of the same kind (letters or other)
            j = i + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


class BPETokenizer:
    """CLIP's tokenizer: text -> ids in the 49,408-id vocabulary of OpenAI CLIP and open_clip.

    encode("a dog") -> [49406, 320, 1929, 49407] (SOT, "a</w>", "dog</w>", EOT; at most
    context_length ids, truncation keeps EOT last)
    __call__(["a dog", ...]) -> LongTensor [B, context_length], right-padded with 0
    decode(ids) -> the cleaned text, words separated by spaces (stops at the first EOT).
    Same interface as data.ByteTokenizer.
    """

    def __init__(self, merges_path: str, context_length: int = 77):
        if not os.path.isfile(merges_path):
            raise FileNotFoundError(
                f"BPE merges file not found at {merges_path!r}: get bpe_simple_vocab_16e6.txt.gz from "
                f"OpenAI's CLIP repository (clip/) or an open_clip install (open_clip/) and pass its path")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for SOT and EOT), got {context_length}")
        with gzip.open(merges_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # Line 0 is a version header; CLIP uses the first 49152 - 256 - 2 = 48,894 merges, which
        # with 512 byte symbols and 2 special tokens makes 49,408 ids.
        merges = [tuple(line.split()) for line in lines[1:] if line][: 49152 - 256 - 2]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"{merges_path!r} is not a BPE merges file (lines must be 'a b'): {bad[:3]}")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.decoder = vocab
        self.ranks = {m: r for r, m in enumerate(merges)}    # lower rank = merged earlier
        self.vocab_size = len(vocab)                          # 49408 with the standard file
        self.sot_token_id = self.encoder[SPECIAL_TOKENS[0]]   # 49406
        self.eot_token_id = self.encoder[SPECIAL_TOKENS[1]]   # 49407
        self.pad_token_id = 0                                 # (id 0 is also "!": padding sits after EOT)
        # No [MASK] in CLIP's vocabulary: for masked language modelling SOT doubles as one. It never
        # occurs inside a caption, and a new embedding row would change the pretrained shapes.
        self.mask_token_id = self.sot_token_id
        self.special_ids = (self.pad_token_id, self.sot_token_id, self.eot_token_id)
        self.context_length = context_length
        self.cache = {}                                       # word -> list of symbols

    def state(self) -> dict:
        """What a checkpoint records of this tokenizer (the merges file itself is the user's)."""
        return {"kind": "bpe", "context_length": self.context_length}

    def bpe(self, word: str) -> list[str]:
        """Merge one word's symbols: repeatedly join every occurrence of the best-ranked adjacent pair."""
        if word in self.cache:
            return self.cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]      # the last symbol marks the word's end
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break                                          # no listed pair left
            merged, i = [], 0
            while i < len(symbols):                            # left to right, non-overlapping
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        if len(self.cache) > 1_000_000:                        # bound memory over a long training run
            self.cache.clear()
        self.cache[word] = symbols
        return symbols

    def encode_words(self, text: str) -> list[int]:
        """Token ids of a text without SOT / EOT (the original tokenizer's encode)."""
        ids = []
        for word in split_words(clean_text(text)):
            if word in SPECIAL_TOKENS:
                ids.append(self.encoder[word])
                continue
            chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(chars))
        return ids

    def encode(self, text: str) -> list[int]:
        ids = [self.sot_token_id] + self.encode_words(text) + [self.eot_token_id]
        if len(ids) > self.context_length:
            ids = ids[: self.context_length - 1] + [self.eot_token_id]   # cut, but EOT survives
        return ids

    def __call__(self, texts) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.pad_token_id, dtype=torch.long)  # [B, L]
        for i, text in enumerate(texts):
            ids = self.encode(text)
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids) -> str:
        """Ids -> text: SOT dropped, stops at the first EOT; "</w>" becomes a space."""
        if torch.is_tensor(ids):
            ids = ids.tolist()
        symbols = []
        for i in ids:
            if i == self.eot_token_id:
                break
            if i != self.sot_token_id:
                symbols.append(self.decoder[i])
        data = bytearray(self.byte_decoder[c] for c in "".join(symbols))
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()


# ----------------------------------------------------------------------------------------------
# 3. Weights out: a train.py checkpoint as an open_clip model
# ----------------------------------------------------------------------------------------------

# The import tables read backwards: clip.py name -> OpenAI / open_clip name.
OURS_TO_OPENAI = {ours: theirs for theirs, ours in OPENAI_TO_OURS.items()}
BLOCK_TO_OPENAI = {ours: theirs for theirs, ours in BLOCK_TO_OURS.items()}
OUR_BLOCK_PREFIXES = {ours: theirs for theirs, ours in BLOCK_PREFIXES.items()}
_OUR_BLOCK_KEY = re.compile(r"((?:visual|text)\.blocks\.)(\d+)\.(.+)")
# Parts of clip.py that open_clip's CLIP has no place for, and that inference never uses: the ViT's
# mask token (MaskCLIP / iBOT masked inputs only).
TRAINING_ONLY = {"visual.mask_token"}
OPEN_CLIP_WEIGHTS, OPEN_CLIP_CONFIG = "open_clip_pytorch_model.bin", "open_clip_config.json"


def _openai_name(key: str) -> str | None:
    """OpenAI / open_clip name of one clip.py key (the inverse of _our_name), or None."""
    return _rename(key, OURS_TO_OPENAI, _OUR_BLOCK_KEY, OUR_BLOCK_PREFIXES, BLOCK_TO_OPENAI)


def open_clip_model_cfg(config: CLIPConfig) -> dict:
    """The model config open_clip's CLIP class is built from (the "model_cfg" of open_clip_config.json;
    open_clip/model.py CLIPVisionCfg / CLIPTextCfg), for any clip.py size with the linear stem.

    open_clip derives its ViT heads as width / head_width; the text tower takes its heads directly.
    Text pooling: open_clip's default ("argmax": the largest id, OpenAI's EOT) is right for CLIP's BPE
    only; "eos" pools at the first id equal to eos_id, exactly clip.py's rule, for every tokenizer.
    init_logit_bias makes open_clip create the SigLIP bias parameter (its value comes from the weights)."""
    if config.stem != "linear":
        raise ValueError("this model has the convolutional stem (Xiao et al. 2021), which open_clip's ViT does "
                         "not have; only linear-stem models export. Train with --stem=linear to export.")
    if config.pool == "unitmean":
        raise ValueError("this model pools the unit patch features (pool='unitmean'), which open_clip's ViT does "
                         "not do; only pool='cls' or 'mean' models export. Train with --pool=cls or --pool=mean to export.")
    cfg = {
        "embed_dim": config.embed_dim,
        "quick_gelu": config.act == "quick_gelu",
        "vision_cfg": {"image_size": config.image_size, "patch_size": config.patch_size,
                       "width": config.vision_width, "layers": config.vision_layers,
                       "head_width": config.vision_width // config.vision_heads, "mlp_ratio": config.mlp_ratio,
                       "pool_type": "avg" if config.pool == "mean" else "tok"},   # ln_post, then the pool (open_clip's order)
        "text_cfg": {"context_length": config.context_length, "vocab_size": config.vocab_size,
                     "width": config.text_width, "heads": config.text_heads, "layers": config.text_layers,
                     "mlp_ratio": config.mlp_ratio, "pad_id": config.pad_token_id,
                     "eos_id": config.eot_token_id, "pool_type": "eos"},
    }
    if config.init_logit_bias is not None:
        cfg["init_logit_bias"] = config.init_logit_bias
    return cfg


def to_open_clip_state_dict(sd: dict) -> dict:
    """clip.py state dict -> open_clip (= OpenAI) names and layouts, float32; the training-only parts
    dropped. A key the tables do not know is a ValueError (a silent partial export would load wrong)."""
    unknown = sorted(k for k in sd if k not in TRAINING_ONLY and _openai_name(k) is None)
    if unknown:
        raise ValueError(f"{len(unknown)} keys have no open_clip name: {unknown}")
    out = {}
    for k, v in sd.items():
        if k in TRAINING_ONLY:
            continue
        name = _openai_name(k)
        v = v.detach().float().cpu()
        out[name] = (v.t() if name in TRANSPOSED else v).contiguous()   # Linear [out, in] -> x @ P [in, out]
    return out


TEXT_NOTES = {
    "bpe": "CLIP's BPE: open_clip.get_tokenizer('local-dir:<this folder>') gives the ids this model was trained on.",
    "other": ("This model was trained with this project's {kind} tokenizer (data.py), which open_clip does not "
              "have: open_clip.get_tokenizer would return CLIP's BPE and WRONG ids. The image tower needs "
              "nothing; for text, tokenize with loaders.pretrained.tokenizer_from_state(<the 'tokenizer' "
              "entry of this file>) and pass the ids to model.encode_text."),
}


def export_open_clip(path: str, out_dir: str, teacher: bool = False) -> dict:
    """A train.py checkpoint -> an open_clip model folder, loadable with
    open_clip.create_model_and_transforms("local-dir:" + out_dir):
      open_clip_pytorch_model.bin   the CLIP state dict in open_clip's names (torch.save)
      open_clip_config.json         {"model_cfg", "preprocess_cfg", "tokenizer", "text_note"}
    teacher=True: the EMA teacher's image tower with the student's text tower. Heads, decoders, the
    mask token and the optimizer state stay behind. Returns the config written."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(ckpt, dict) and "model" in ckpt and "model_config" in ckpt):
        raise ValueError(f"{path} is not a train.py checkpoint (a dict with 'model' and 'model_config')")
    config, state, tok = our_checkpoint_parts(ckpt, path, teacher)
    check_state_dict(config, state)
    written = {
        "model_cfg": open_clip_model_cfg(config),
        # eval_seg.py / train.py's evaluation view: the centred square, resized (bilinear), CLIP's mean / std
        "preprocess_cfg": {"size": config.image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                           "interpolation": "bilinear", "resize_mode": "shortest"},
        "tokenizer": tok,
        "text_note": TEXT_NOTES["bpe"] if tok["kind"] == "bpe" else TEXT_NOTES["other"].format(kind=tok["kind"]),
    }
    os.makedirs(out_dir, exist_ok=True)
    torch.save(to_open_clip_state_dict(state), os.path.join(out_dir, OPEN_CLIP_WEIGHTS))
    with open(os.path.join(out_dir, OPEN_CLIP_CONFIG), "w") as f:
        json.dump(written, f, indent=2)
    return written


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="Export a train.py checkpoint as an open_clip model folder "
                                             "(open_clip.create_model_and_transforms('local-dir:OUT_DIR')).")
    ap.add_argument("command", choices=["export"])
    ap.add_argument("ckpt", help="a train.py checkpoint (out/ckpt.pt)")
    ap.add_argument("out_dir", help="the folder to write (open_clip_pytorch_model.bin, open_clip_config.json)")
    ap.add_argument("--teacher", action="store_true", help="export the EMA teacher's image tower")
    args = ap.parse_args(argv)
    try:
        written = export_open_clip(args.ckpt, args.out_dir, teacher=args.teacher)
    except (FileNotFoundError, ValueError) as e:
        ap.exit(2, f"error: {e}\n")
    print(f"wrote {args.out_dir}/{OPEN_CLIP_WEIGHTS} and {OPEN_CLIP_CONFIG}\ntext: {written['text_note']}")
    return written


if __name__ == "__main__":
    main()
