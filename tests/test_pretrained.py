"""Tests for loaders/pretrained.py: public CLIP weights in clip.py, and CLIP's BPE tokenizer.

Two kinds of reference:
* Always run: a naive forward pass written here directly on OpenAI-named tensors (explicit patch
  matmul, LayerNorm formula, per-head softmax attention, argmax-token pooling), hand-worked BPE merges
  and pre-tokenisation examples, and the error paths.
* With open_clip installed (optional test dependency; skipped with a reason otherwise, and an error
  instead of a skip when REQUIRE_OPEN_CLIP=1, as .ci/run sets): randomly initialised open_clip models
  (ViT-B-16, ViT-B-32-quickgelu, tiny custom ones) loaded into clip.py give the same image and text
  embeddings (max abs difference < 1e-4, float32); TorchScript and OpenAI-style float16 files; and our
  tokenizer gives the same ids as open_clip's on a few hundred varied captions, with its merges file.
"""

import gzip
import math
import os
import random
from dataclasses import replace

import pytest
import torch

from clip import CLIP, interpolate_pos_embed, model_config
from loaders.pretrained import (BPETokenizer, bytes_to_unicode, clean_text, convert_state_dict, load_pretrained,
                               load_pretrained_into, model_from_state_dict, read_state_dict, save_converted,
                               split_words)

TOL = 1e-4


@pytest.fixture(scope="module")
def open_clip():
    if os.environ.get("REQUIRE_OPEN_CLIP") == "1":
        import open_clip as oc                         # CI: a missing install must fail, not skip
        return oc
    return pytest.importorskip(
        "open_clip", reason="open_clip (pip package open-clip-torch) is an optional test dependency "
                            "for the parity tests; .ci/run installs it in a side environment")


# ----------------------------------------------------------------------------------------------
# A tiny merges file and the ids it implies (worked out by hand)
# ----------------------------------------------------------------------------------------------
# Byte symbols come first in bytes_to_unicode order: '!'..'~' are ids 0..93 (id = ord(c) - 33),
# the same symbols ending a word ("</w>") are ids 256 + that. The merges get 512, 513, ...
TINY_MERGES = ["l o", "e r</w>", "lo w", "low er</w>"]        # -> "lo" 512, "er</w>" 513, "low" 514, "lower</w>" 515
TINY_SOT, TINY_EOT, TINY_VOCAB = 516, 517, 518


@pytest.fixture
def tiny_merges(tmp_path):
    path = tmp_path / "tiny_merges.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2"] + TINY_MERGES) + "\n")
    return str(path)


def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert list(table)[:3] == [33, 34, 35] and len(set(table.values())) == 256
    assert all(table[b] == chr(b) for b in range(33, 127))
    assert table[0] == chr(256) and table[32] == chr(288)      # space -> "Ġ" (the 33rd non-printable byte)
    assert table[127] == chr(289) and table[173] == chr(323)   # 68 remapped bytes in all
    assert not any(c.isspace() for c in table.values())


def test_bpe_hand_worked(tiny_merges):
    tok = BPETokenizer(tiny_merges, context_length=8)
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id) == (TINY_VOCAB, TINY_SOT, TINY_EOT)
    # "lower": l o w e r</w> -> lo w e r</w> (rank 0) -> lo w er</w> (rank 1) -> low er</w> -> lower</w>
    assert tok.encode_words("lower") == [515]
    # "low": l o w</w> -> lo w</w>; ("lo", "w</w>") is not a merge -> stop
    assert tok.encode_words("low") == [512, 256 + ord("w") - 33]
    # both occurrences of the best pair merge in the same step: lo w lo w er</w> -> low low er</w>
    assert tok.encode_words("lowlower") == [514, 515]
    # "Hi!" -> "hi" "!" -> h, i</w>, !</w>
    assert tok.encode_words("Hi!") == [ord("h") - 33, 256 + ord("i") - 33, 256]
    # "é" = bytes C3 A9 -> printable symbols "Ã" (id 94 + 12 + (0xC3 - 0xAE) = 127) and "©</w>" (256 + 94 + 8)
    assert tok.encode_words("é") == [127, 358]
    assert tok.encode("low") == [TINY_SOT, 512, 342, TINY_EOT]


def test_tokenizer_call_pads_and_truncates_keeping_eot(tiny_merges):
    tok = BPETokenizer(tiny_merges, context_length=8)
    out = tok(["lower", "a b c d e f g h i j"])
    assert out.dtype == torch.long and out.shape == (2, 8)
    assert out[0].tolist() == [TINY_SOT, 515, TINY_EOT, 0, 0, 0, 0, 0]
    letters = [256 + ord(c) - 33 for c in "abcdef"]
    assert out[1].tolist() == [TINY_SOT] + letters + [TINY_EOT]       # cut to 8, EOT kept last
    assert tok("lower").shape == (1, 8)
    assert tok.decode(out[0]) == "lower"
    assert tok.decode(tok("Low, LOWER!")[0]) == "low , lower !"


def test_split_words_follows_the_clip_pattern():
    # contractions; letters run; ONE number character at a time; runs of other characters
    assert split_words("don't stop!!! 2024") == ["don", "'t", "stop", "!!!", "2", "0", "2", "4"]
    # greedy punctuation runs swallow a following apostrophe ("''s" is "''" + "s", not "'" + "'s")
    assert split_words("'hello''s it's") == ["'", "hello", "''", "s", "it", "'s"]
    # \p{N}: "½" (No), "²" (No), "Ⅻ" (Nl), "٣" (Nd) are numbers; "三" is a letter (Lo) though numeric
    assert split_words("x²½Ⅻ٣三四") == ["x", "²", "½", "Ⅻ", "٣", "三四"]
    # underscore and hyphen are not letters; the special tokens are kept whole
    assert split_words("a_b-c<|endoftext|>") == ["a", "_", "b", "-", "c", "<|endoftext|>"]
    assert split_words("'S'LL") == ["'S", "'LL"]                     # IGNORECASE contractions


def test_clean_text_reproduces_the_ordinary_ftfy_fixes():
    assert clean_text("  A  Dog\tand\n a CAT  ") == "a dog and a cat"
    assert clean_text("dog\u2019s \u201cball\u201d") == "dog's \"ball\""          # curly quotes
    assert clean_text("Tom &amp;amp; Jerry &rsquo;s") == "tom & jerry 's"         # nested entities, then quote
    assert clean_text("\ufb01ne \uff26\uff35\uff2c\uff2c\u3000width") == "fine full width"
    assert clean_text("cafe\u0301\x00\x7f") == "caf\u00e9"                          # NFC, control characters


# ----------------------------------------------------------------------------------------------
# Conversion against a naive forward pass on OpenAI-named tensors
# ----------------------------------------------------------------------------------------------

def random_openai_state_dict(vision_width=128, vision_layers=2, patch=8, grid=3, text_width=64,
                             text_layers=2, context=16, vocab=TINY_VOCAB, embed=48, seed=0):
    """OpenAI-named ViT CLIP weights with random values (norm gains != 1, non-zero biases)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    def ln(prefix, width):
        return {f"{prefix}.weight": 1 + r(width), f"{prefix}.bias": r(width)}

    def block(prefix, w):
        return {**ln(f"{prefix}.ln_1", w), f"{prefix}.attn.in_proj_weight": r(3 * w, w, std=w ** -0.5),
                f"{prefix}.attn.in_proj_bias": r(3 * w), f"{prefix}.attn.out_proj.weight": r(w, w, std=w ** -0.5),
                f"{prefix}.attn.out_proj.bias": r(w), **ln(f"{prefix}.ln_2", w),
                f"{prefix}.mlp.c_fc.weight": r(4 * w, w, std=w ** -0.5), f"{prefix}.mlp.c_fc.bias": r(4 * w),
                f"{prefix}.mlp.c_proj.weight": r(w, 4 * w, std=(4 * w) ** -0.5), f"{prefix}.mlp.c_proj.bias": r(w)}

    D, W = vision_width, text_width
    sd = {"visual.conv1.weight": r(D, 3, patch, patch, std=(3 * patch * patch) ** -0.5),
          "visual.class_embedding": r(D, std=1.0), "visual.positional_embedding": r(1 + grid * grid, D),
          **ln("visual.ln_pre", D), **ln("visual.ln_post", D), "visual.proj": r(D, embed, std=D ** -0.5),
          "token_embedding.weight": r(vocab, W, std=1.0), "positional_embedding": r(context, W),
          **ln("ln_final", W), "text_projection": r(W, embed, std=W ** -0.5),
          "logit_scale": torch.tensor(math.log(100.0))}
    for i in range(vision_layers):
        sd.update(block(f"visual.transformer.resblocks.{i}", D))
    for i in range(text_layers):
        sd.update(block(f"transformer.resblocks.{i}", W))
    return sd


def naive_clip(sd, images, tokens, act, vision_heads, text_heads):
    """Reference forward, float64, straight from the OpenAI names: returns (image [B, E], text [B, E])."""
    sd = {k: v.double() for k, v in sd.items()}

    def layer_norm(x, prefix):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[prefix + ".weight"] + sd[prefix + ".bias"]

    def activation(x):
        return x * torch.sigmoid(1.702 * x) if act == "quick_gelu" else 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    def block(x, prefix, heads, causal):
        n, w = x.shape[1], x.shape[2]
        h = layer_norm(x, prefix + ".ln_1")
        q, k, v = (h @ sd[prefix + ".attn.in_proj_weight"].T + sd[prefix + ".attn.in_proj_bias"]).split(w, -1)
        d = w // heads
        outs = []
        for j in range(heads):                          # one head at a time, explicit softmax
            qj, kj, vj = (t[..., j * d:(j + 1) * d] for t in (q, k, v))
            scores = qj @ kj.transpose(1, 2) / math.sqrt(d)
            if causal:
                scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
            weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
            outs.append(weights @ vj)
        x = x + torch.cat(outs, -1) @ sd[prefix + ".attn.out_proj.weight"].T + sd[prefix + ".attn.out_proj.bias"]
        h = activation(layer_norm(x, prefix + ".ln_2") @ sd[prefix + ".mlp.c_fc.weight"].T + sd[prefix + ".mlp.c_fc.bias"])
        return x + h @ sd[prefix + ".mlp.c_proj.weight"].T + sd[prefix + ".mlp.c_proj.bias"]

    def n_layers(prefix):
        return len({k.split(".")[len(prefix.split("."))] for k in sd if k.startswith(prefix + ".")})

    # image: each p x p patch (channels, rows, columns flattened) times the conv kernel as a matrix
    w = sd["visual.conv1.weight"]                        # [D, 3, p, p]
    D, p = w.shape[0], w.shape[-1]
    B = images.shape[0]
    patches = images.double().unfold(2, p, p).unfold(3, p, p)           # [B, 3, gh, gw, p, p]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, 3 * p * p)  # [B, N, 3 p p], row-major
    x = torch.cat([sd["visual.class_embedding"].expand(B, 1, D), patches @ w.reshape(D, -1).T], 1)
    x = layer_norm(x + sd["visual.positional_embedding"], "visual.ln_pre")
    for i in range(n_layers("visual.transformer.resblocks")):
        x = block(x, f"visual.transformer.resblocks.{i}", vision_heads, causal=False)
    image = layer_norm(x[:, 0], "visual.ln_post") @ sd["visual.proj"]

    # text: causal transformer, pooled at the largest token id (OpenAI's argmax rule: EOT)
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][: tokens.shape[1]]
    for i in range(n_layers("transformer.resblocks")):
        x = block(x, f"transformer.resblocks.{i}", text_heads, causal=True)
    x = layer_norm(x, "ln_final")
    text = x[torch.arange(tokens.shape[0]), tokens.argmax(-1)] @ sd["text_projection"]
    return image, text


def random_tokens(B, context, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(B, context, dtype=torch.long)
    for b in range(B):
        n = int(torch.randint(1, context - 1, (1,), generator=g))
        tokens[b, 0] = vocab - 2                                         # SOT
        tokens[b, 1:n] = torch.randint(1, vocab - 2, (n - 1,), generator=g)
        tokens[b, n] = vocab - 1                                         # EOT, then padding 0
    return tokens


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_converted_model_matches_naive_reference(act):
    sd = random_openai_state_dict()
    config, ours_sd = convert_state_dict(sd, act=act, text_heads=2)   # vision: 128 // 64 = 2 heads (default)
    assert (config.image_size, config.patch_size, config.vision_width, config.vision_layers) == (24, 8, 128, 2)
    assert (config.vision_heads, config.text_heads, config.context_length, config.embed_dim) == (2, 2, 16, 48)
    assert (config.vocab_size, config.eot_token_id, config.stem, config.act) == (TINY_VOCAB, TINY_EOT, "linear", act)
    model = CLIP(config).eval()
    model.load_state_dict(ours_sd)
    images = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    tokens = random_tokens(3, 16, TINY_VOCAB)
    ref_image, ref_text = naive_clip(sd, images, tokens, act, vision_heads=2, text_heads=2)
    with torch.no_grad():
        image = model.encode_image(images, normalize=False)
        text = model.encode_text(tokens, normalize=False)
    assert (image.double() - ref_image).abs().max() < TOL
    assert (text.double() - ref_text).abs().max() < TOL
    # the activation matters: the other one is far off (so the comparison above has teeth)
    other, _ = naive_clip(sd, images, tokens, "gelu" if act == "quick_gelu" else "quick_gelu", 2, 2)
    assert (image.double() - other).abs().max() > 100 * TOL
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_checkpoint_containers_all_load_the_same(tmp_path, tiny_merges):
    sd = random_openai_state_dict()
    _, reference = convert_state_dict(sd, text_heads=2)
    variants = {
        "plain": sd,
        # OpenAI ships float16 plus three metadata entries
        "openai_fp16": {**{k: v.half() for k, v in sd.items()}, "input_resolution": torch.tensor(24),
                        "context_length": torch.tensor(16), "vocab_size": torch.tensor(TINY_VOCAB)},
        # open_clip training checkpoint: nested, saved from DDP
        "open_clip_train": {"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}},
        # open_clip CustomTextCLIP: text tower under "text."
        "custom_text": {("text." + k if not k.startswith(("visual.", "logit_")) else k): v for k, v in sd.items()},
    }
    for name, obj in variants.items():
        path = str(tmp_path / f"{name}.pt")
        torch.save(obj, path)
        _, converted = convert_state_dict(read_state_dict(path), text_heads=2)
        tol = 1e-2 if name == "openai_fp16" else 0.0                   # float16 rounding
        assert set(converted) == set(reference), name
        for k in reference:
            assert (converted[k] - reference[k]).abs().max() <= tol * (1 + reference[k].abs().max()), (name, k)

    # converted once, saved in our layout, loaded back: the same model and outputs
    config, ours = convert_state_dict(sd, text_heads=2)
    path = str(tmp_path / "converted.pt")
    save_converted(path, config, ours)
    model, tok = load_pretrained(path, merges_path=tiny_merges)
    assert model.config == config and not model.training and tok.context_length == 16
    direct = CLIP(config).eval()
    direct.load_state_dict(ours)
    tokens = tok(["lower low", "hi"])
    images = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), direct.encode_text(tokens))
        assert torch.equal(model.encode_image(images), direct.encode_image(images))


def test_load_pretrained_finds_merges_next_to_checkpoint_or_says_where(tmp_path, tiny_merges):
    path = str(tmp_path / "openai_named.pt")
    torch.save(random_openai_state_dict(text_width=128), path)         # 128 // 64 = 2 text heads
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6"):
        load_pretrained(path)
    os.replace(tiny_merges, tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    model, tok = load_pretrained(path)
    assert tok.vocab_size == model.config.vocab_size and model.config.act == "quick_gelu"


def test_bad_checkpoints_give_clear_errors(tmp_path):
    sd = random_openai_state_dict()
    with pytest.raises(ValueError, match=r"visual\.transformer\.resblocks\.0\.ls_1\.gamma"):
        convert_state_dict({**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(128)}, text_heads=2)
    with pytest.raises(ValueError, match=r"missing keys: \['text\.blocks\.1\.ln_1\.bias'\]"):
        convert_state_dict({k: v for k, v in sd.items() if k != "transformer.resblocks.1.ln_1.bias"}, text_heads=2)
    with pytest.raises(ValueError, match=r"shape mismatches: \['text\.blocks\.0\.mlp\.fc2\.bias: checkpoint \(63,\)"):
        convert_state_dict({**sd, "transformer.resblocks.0.mlp.c_proj.bias": torch.zeros(63)}, text_heads=2)
    with pytest.raises(ValueError, match="ResNet"):
        convert_state_dict({**sd, "visual.attnpool.positional_embedding": torch.zeros(50, 64)})
    with pytest.raises(ValueError, match="not an OpenAI / open_clip ViT CLIP"):
        convert_state_dict({"weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="not divisible"):
        convert_state_dict(sd, text_heads=3)                            # 64 channels do not split in 3
    with pytest.raises(FileNotFoundError, match="never does"):
        read_state_dict(str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="merges file not found"):
        BPETokenizer(str(tmp_path / "nope.txt.gz"))


def test_load_pretrained_into_existing_model(tmp_path):
    sd = random_openai_state_dict()
    path = str(tmp_path / "ckpt.pt")
    torch.save(sd, path)
    config, ours = convert_state_dict(sd, text_heads=2)
    # same architecture, a sigmoid-loss model: weights loaded, its own logit bias kept
    model = CLIP(replace(config, init_logit_bias=-10.0))
    load_pretrained_into(model, path)
    assert torch.equal(model.text.blocks[1].mlp.fc2.weight, ours["text.blocks.1.mlp.fc2.weight"])
    assert model.logit_bias.item() == -10.0 and model.logit_scale.item() == pytest.approx(math.log(100.0))
    # lower training resolution, same patch size: position embedding resized bicubically
    small = CLIP(replace(config, image_size=16))
    load_pretrained_into(small, path)
    assert torch.allclose(small.visual.pos_embed, interpolate_pos_embed(ours["visual.pos_embed"], 2, 2))
    assert torch.equal(small.visual.stem.weight, ours["visual.stem.weight"])
    # a different architecture is refused, naming the fields
    with pytest.raises(ValueError, match="vision_layers: model 4, checkpoint 2"):
        load_pretrained_into(CLIP(replace(config, vision_layers=4)), path)
    with pytest.raises(ValueError, match="stem: model 'conv'"):
        load_pretrained_into(CLIP(model_config("tiny")), path)


# ----------------------------------------------------------------------------------------------
# Parity with open_clip (optional dependency)
# ----------------------------------------------------------------------------------------------

def tiny_open_clip(open_clip, quick_gelu):
    return open_clip.model.CLIP(
        embed_dim=64, quick_gelu=quick_gelu,
        vision_cfg=open_clip.model.CLIPVisionCfg(image_size=32, patch_size=8, width=128, layers=2, head_width=64),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=2),
    ).eval()


def assert_same_embeddings(oc_model, ours, images, tokens):
    with torch.no_grad():
        d_image = (oc_model.encode_image(images) - ours.encode_image(images, normalize=False)).abs().max()
        d_text = (oc_model.encode_text(tokens) - ours.encode_text(tokens, normalize=False)).abs().max()
    assert d_image < TOL and d_text < TOL, (float(d_image), float(d_text))


CAPTIONS = ["A photo of a DOG.", "two cats on a sofa, one asleep", "it's a bird! it's a plane!"]


def test_parity_with_open_clip_vit_b16(open_clip):
    # OpenAI's ViT-B/16 architecture (QuickGELU); the tiny models below cover GELU too.
    torch.manual_seed(0)
    oc_model = open_clip.create_model("ViT-B-16-quickgelu").eval()     # random init, no download
    config, sd = convert_state_dict(oc_model.state_dict())
    assert config == model_config("B/16", init_logit_scale=config.init_logit_scale)
    ours = model_from_state_dict(config, sd).eval()
    tokens = open_clip.get_tokenizer("ViT-B-16")(CAPTIONS)
    assert_same_embeddings(oc_model, ours, torch.randn(1, 3, 224, 224), tokens)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_parity_with_tiny_open_clip_and_act_matters(open_clip, quick_gelu):
    torch.manual_seed(1)
    oc_model = tiny_open_clip(open_clip, quick_gelu)
    images, tokens = torch.randn(2, 3, 32, 32), open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)
    config, sd = convert_state_dict(oc_model.state_dict(), act="quick_gelu" if quick_gelu else "gelu")
    ours = CLIP(config).eval()
    ours.load_state_dict(sd)
    assert_same_embeddings(oc_model, ours, images, tokens)
    # the wrong activation gives visibly different embeddings
    wrong = CLIP(replace(config, act="gelu" if quick_gelu else "quick_gelu")).eval()
    wrong.load_state_dict(sd)
    with torch.no_grad():
        assert (oc_model.encode_image(images) - wrong.encode_image(images, normalize=False)).abs().max() > 100 * TOL


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_openai_float16_and_torchscript_files(open_clip, tmp_path):
    torch.manual_seed(2)
    oc_model = tiny_open_clip(open_clip, quick_gelu=True)
    # OpenAI's layout: open_clip's own OpenAI loader accepts open_clip's CLIP names (strict load) ...
    openai_sd = {**{k: v.half() for k, v in oc_model.state_dict().items()},
                 "input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
                 "vocab_size": torch.tensor(49408)}
    open_clip.model.build_model_from_openai_state_dict(dict(openai_sd), quick_gelu=True)
    # ... and our conversion of that float16 file matches open_clip running the same rounded weights.
    oc_model.load_state_dict({k: v.half().float() for k, v in oc_model.state_dict().items()})
    torch.save(openai_sd, tmp_path / "openai.pt")
    merges = open_clip.tokenizer.default_bpe()
    ours, tokenizer = load_pretrained(str(tmp_path / "openai.pt"), merges_path=merges)   # act quick_gelu default
    images, tokens = torch.randn(2, 3, 32, 32), tokenizer(CAPTIONS)
    assert_same_embeddings(oc_model, ours, images, tokens)
    # TorchScript archive, as OpenAI distributes its .pt files
    traced = torch.jit.trace_module(oc_model, {"encode_image": (images,), "encode_text": (tokens,)},
                                    check_trace=False)
    torch.jit.save(traced, str(tmp_path / "traced.pt"))
    ours_jit, _ = load_pretrained(str(tmp_path / "traced.pt"), merges_path=merges)
    assert_same_embeddings(oc_model, ours_jit, images, tokens)


def varied_captions(n=300, seed=0):
    """Ordinary English captions plus the awkward cases: case, punctuation, numbers, contractions,
    curly quotes, HTML entities, accents, other scripts, emoji, odd whitespace, over-long captions."""
    fixed = [
        "A photo of a cat.", "a DOG running on the Beach!!", "two people, three bikes & a car",
        "it's raining; don't forget the umbrella", "I'M HERE, you're there, we've gone, he'd've",
        "rock'n'roll band on stage", "the dog\u2019s ball", "\u201cquoted\u201d text \u2018here\u2019",
        "Tom &amp; Jerry", "5 &lt; 6 &gt; 4", "fish &amp;amp; chips", "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e",
        "cafe\u0301 (decomposed)", "na\u00efve Z\u00fcrich S\u00e3o Paulo", "\u03b5\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac and \u0440\u0443\u0441\u0441\u043a\u0438\u0439",
        "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8", "\u4e2d\u6587 \u4e09\u4e2a\u82f9\u679c", "\ud55c\uad6d\uc5b4 \ubb38\uc7a5",
        "emoji \U0001F436\U0001F431 party \U0001F389", "x\u00b2 + y\u00b2 = \u00bd z", "chapter \u216b and \u0663 items",
        "price: $100.50, 20% off, #1 seller @store", "snake_case and kebab-case and CamelCase",
        "tabs\tand\nnewlines\r\nand   spaces", "   leading and trailing   ", "",
        "\ufb01ne \ufb02owers", "\uff26\uff35\uff2c\uff2c\u3000\uff37\uff29\uff24\uff34\uff28", "em\u2014dash and ellipsis\u2026",
        "1984 3.14159 1,000,000 2nd 3rd 4th", "O'Neill's pub", "''quoted'' and 's alone", "a" * 90,
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        " ".join(["word"] * 100), "a photo of a {} in the style of ***", "\u00bfqu\u00e9? \u00a1hola!",
        "\u00a9 2021, 30\u00b0C, \u20ac5 and \u00a33",
    ]
    vocab = ["a", "the", "dog", "cat", "photo", "of", "on", "red", "Big", "tiny", "running", "sits",
             "street", "NEW", "york", "man's", "women's", "don't", "it's", "we're", "they've", "I'll",
             "\u2019s", "&amp;", "&quot;hi&quot;", "caf\u00e9", "\u00fcber", "\u00e9t\u00e9", "2", "42", "3.5",
             "1999", "!", "?", ",", ".", "...", "-", "(", ")", "#tag", "@user", "e-mail", "x2",
             "\U0001F600", "\u6771\u4eac", "\u00bd", "\u00b3", "co-op", "50%", "\u201cwow\u201d", "MiXeD"]
    rng = random.Random(seed)
    random_caps = []
    while len(fixed) + len(random_caps) < n:
        words = [rng.choice(vocab) for _ in range(rng.randint(1, 25))]
        sep = rng.choice([" ", " ", " ", "  ", "\t", ""])
        random_caps.append(sep.join(words))
    return fixed + random_caps


def test_tokenizer_parity_with_open_clip(open_clip):
    captions = varied_captions()
    ours = BPETokenizer(open_clip.tokenizer.default_bpe())
    theirs = open_clip.tokenizer.SimpleTokenizer()
    a, b = ours(captions), theirs(captions)
    bad = [c for c, x, y in zip(captions, a, b) if not torch.equal(x, y)]
    assert not bad, f"{len(bad)} captions differ, e.g. {bad[:5]}"
    assert a.shape == (len(captions), 77) and (a[:, 0] == 49406).all()
    assert (a == 49407).sum(1).eq(1).all()                             # exactly one EOT per row
    for caption, ids in zip(captions[:40], a[:40]):
        content = [i for i in ids.tolist() if i not in (0, 49406, 49407)]
        assert ours.decode(ids) == theirs.decode(content).strip(), caption


# ----------------------------------------------------------------------------------------------
# train.py --init_from: continue training a converted public checkpoint with SILC / MaskCLIP
# ----------------------------------------------------------------------------------------------
def run_init_from(tmp_path, ckpt_path, merges, method, image_size, extra=()):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / f"run_{method.replace('+', '_')}"
    cmd = [sys.executable, os.path.join(root, "train.py"), f"--init_from={ckpt_path}", f"--bpe_path={merges}",
           f"--method={method}", "--steps=2", "--batch_size=4", f"--image_size={image_size}", "--eval=False",
           "--num_workers=0", "--n_local_crops=2", "--head_hidden=32", "--head_bottleneck=16",
           "--head_out=64", "--log_interval=1", f"--out_dir={out}", *extra]
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return out


@pytest.mark.parametrize("method", ["silc", "maskclip"])
def test_train_init_from_openai_state_dict(tmp_path, tiny_merges, method):
    """A random OpenAI-named checkpoint (3x3 grid of 8-px patches) continues training at 32 px (the
    position embedding is resized); the student starts from the checkpoint's weights."""
    sd = random_openai_state_dict()
    path = tmp_path / "openai_random.pt"
    torch.save(sd, path)
    out = run_init_from(tmp_path, path, tiny_merges, method, image_size=32)
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["model_config"]["vocab_size"] == TINY_VOCAB and ckpt["model_config"]["image_size"] == 32
    # two small AdamW steps move the weights only a little from the checkpoint's
    w0, w1 = sd["token_embedding.weight"], ckpt["model"]["text.token_embedding.weight"]
    assert (w1 - w0).abs().max() < 0.01 and (w1 - w0).abs().max() > 0
    assert ckpt["teacher"] is not None


def test_train_init_from_open_clip(open_clip, tmp_path):
    """A randomly initialised open_clip model, saved as its state dict, continues with SILC."""
    model = tiny_open_clip(open_clip, quick_gelu=True)
    path = tmp_path / "open_clip_random.bin"
    torch.save(model.state_dict(), path)
    out = run_init_from(tmp_path, path, open_clip.tokenizer.default_bpe(), "silc", image_size=32)
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["model_config"]["eot_token_id"] == 49407
    # ... and goes back to open_clip complete: a BPE model needs nothing of ours, tokenizer included
    from loaders.pretrained import export_open_clip, load_model_from_checkpoint
    written = export_open_clip(str(out / "ckpt.pt"), str(tmp_path / "back"))
    assert written["tokenizer"]["kind"] == "bpe" and "WRONG" not in written["text_note"]
    back = open_clip.create_model(f"local-dir:{tmp_path / 'back'}").eval()
    tokens = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'back'}")(CAPTIONS)
    ours, _ = load_model_from_checkpoint(str(out / "ckpt.pt"), bpe_path=open_clip.tokenizer.default_bpe())
    assert_same_embeddings(back, ours, torch.randn(2, 3, 32, 32), tokens)


# ----------------------------------------------------------------------------------------------
# safetensors, read without the package
# ----------------------------------------------------------------------------------------------
def write_safetensors_by_hand(path, tensors, header=None, pad=0):
    """The format written out by hand: 8-byte little-endian header length, JSON header, raw bytes."""
    import json
    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
    meta, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        meta[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header if header is not None else meta).encode() + b" " * pad
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def test_safetensors_read_every_dtype_and_refuse_malformed_headers(tmp_path):
    from loaders.pretrained import read_safetensors
    g = torch.Generator().manual_seed(0)
    tensors = {"f64": torch.randn(2, 3, generator=g, dtype=torch.float64), "f32": torch.randn(4, generator=g),
               "f16": torch.randn(3, 1, generator=g).half(), "bf16": torch.randn(5, generator=g).bfloat16(),
               "i64": torch.tensor([-(2 ** 40), 7]), "i32": torch.tensor([[1, -2]], dtype=torch.int32),
               "i8": torch.tensor([-3], dtype=torch.int8), "u8": torch.tensor([250], dtype=torch.uint8),
               "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    path = str(tmp_path / "m.safetensors")
    write_safetensors_by_hand(path, tensors, pad=5)                 # the header may be space-padded
    got = read_safetensors(path)
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    assert read_state_dict(path).keys() == tensors.keys()          # by its extension
    # malformed files: each a clear ValueError
    def bad(name, content=None, header=None):
        p = str(tmp_path / f"{name}.safetensors")
        if content is not None:
            open(p, "wb").write(content)
        else:
            write_safetensors_by_hand(p, {"a": torch.zeros(2), "b": torch.zeros(3)}, header=header)
        return p
    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]}}
    cases = {
        "too short for a safetensors header": bad("short", b"\x01\x02"),
        "header length 10000 does not fit": bad("long", (10000).to_bytes(8, "little") + b"{}"),
        "is not JSON": bad("json", (4).to_bytes(8, "little") + b"{,,}"),
        "not a JSON object": bad("list", (2).to_bytes(8, "little") + b"[]"),
        "malformed entry": bad("dtype", header={**ok, "a": {**ok["a"], "dtype": "F7"}}),
        "malformed entry ": bad("shape", header={**ok, "a": {**ok["a"], "shape": [-2]}}),
        "data_offsets \\[0, 12\\]": bad("size", header={**ok, "a": {**ok["a"], "data_offsets": [0, 12]}}),
        "overlap or gap": bad("overlap", header={"a": ok["a"], "b": {**ok["b"], "data_offsets": [4, 16]}}),
        "cover 8 of the 20": bad("tail", header={"a": ok["a"]}),
    }
    for message, p in cases.items():
        with pytest.raises(ValueError, match=message.strip()):
            read_safetensors(p)


def test_safetensors_written_by_the_package_read_as_the_bin(tmp_path):
    """open_clip's hub files are written by the safetensors package: read here without it, they give the
    same tensors as the .bin of the same state dict (an open_clip model's, plus other dtypes), and the
    same converted model."""
    if os.environ.get("REQUIRE_OPEN_CLIP") == "1":
        import safetensors.torch as st                 # CI's side venv installs it (requirements-parity.txt)
    else:
        st = pytest.importorskip("safetensors.torch", reason="the safetensors package is an optional test dependency")
    from loaders.pretrained import read_safetensors
    sd = random_openai_state_dict()
    sd.update({"extra.bf16": torch.randn(3, 2).bfloat16(), "extra.f16": torch.randn(4).half(),
               "extra.i64": torch.arange(5), "extra.f64": torch.randn(2, dtype=torch.float64),
               "extra.bool": torch.tensor([True, False])})
    st.save_file(sd, str(tmp_path / "open_clip_model.safetensors"), metadata={"format": "pt"})
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    a = read_safetensors(str(tmp_path / "open_clip_model.safetensors"))
    b = read_state_dict(str(tmp_path / "open_clip_pytorch_model.bin"))
    assert a.keys() == b.keys() == sd.keys()
    for k in sd:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    weights = {k: v for k, v in a.items() if not k.startswith("extra.")}
    config, ours = convert_state_dict(weights, text_heads=2)
    assert config == convert_state_dict({k: v for k, v in b.items() if not k.startswith("extra.")}, text_heads=2)[0]


# ----------------------------------------------------------------------------------------------
# Export: a train.py checkpoint as an open_clip model
# ----------------------------------------------------------------------------------------------
def test_export_is_the_import_read_backwards(tmp_path):
    """to_open_clip_state_dict then convert_state_dict gives back every tensor (the mask token, training
    only, is dropped and comes back as zeros) and the config; the conv stem is refused with a message."""
    from loaders.pretrained import open_clip_model_cfg, to_open_clip_state_dict
    config = model_config("tiny", stem="linear", pool="cls", act="quick_gelu", init_logit_bias=-10.0, text_heads=2)
    torch.manual_seed(0)
    model = CLIP(config)
    with torch.no_grad():
        model.visual.mask_token.normal_()
    sd = to_open_clip_state_dict(model.state_dict())
    assert "visual.mask_token" not in sd and sd["visual.proj"].shape == (128, 128) and sd["logit_bias"].shape == ()
    assert torch.equal(sd["visual.proj"], model.visual.proj.weight.T)
    back_config, back = convert_state_dict(sd, act="quick_gelu", vision_heads=4, text_heads=2, eot_token_id=2)
    assert replace(back_config, init_logit_scale=config.init_logit_scale, init_logit_bias=-10.0) == config
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v if k != "visual.mask_token" else torch.zeros_like(v)), k
    cfg = open_clip_model_cfg(config)
    assert cfg["vision_cfg"]["head_width"] == 32 and cfg["text_cfg"]["heads"] == 2 and cfg["quick_gelu"]
    assert cfg["text_cfg"]["pool_type"] == "eos" and cfg["text_cfg"]["eos_id"] == 2 and cfg["init_logit_bias"] == -10.0
    assert cfg["vision_cfg"]["pool_type"] == "tok"
    assert open_clip_model_cfg(replace(config, pool="mean"))["vision_cfg"]["pool_type"] == "avg"
    with pytest.raises(ValueError, match="unitmean"):                 # open_clip has no such pool
        open_clip_model_cfg(replace(config, pool="unitmean"))
    with pytest.raises(ValueError, match="--stem=linear"):
        open_clip_model_cfg(model_config("tiny"))
    # the command's function on a checkpoint file: training-only parts left behind, the teacher on request
    from dataclasses import asdict
    from loaders.pretrained import export_open_clip
    teacher = {k: v + 1.0 for k, v in model.state_dict().items() if k.startswith("visual.")}
    ckpt = {"model": model.state_dict(), "model_config": asdict(config), "teacher": teacher,
            "extra": {"head.w": torch.ones(3)}, "tokenizer": {"kind": "byte", "context_length": 64}}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    for who in ("student", "teacher"):
        written = export_open_clip(str(tmp_path / "ckpt.pt"), str(tmp_path / who), teacher=who == "teacher")
        got = torch.load(tmp_path / who / "open_clip_pytorch_model.bin", weights_only=True)
        want = to_open_clip_state_dict({**ckpt["model"], **(teacher if who == "teacher" else {})})
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert written["model_cfg"] == cfg and written["tokenizer"]["kind"] == "byte"
    with pytest.raises(ValueError, match="not a train.py checkpoint"):
        torch.save(sd, tmp_path / "plain.bin")
        export_open_clip(str(tmp_path / "plain.bin"), str(tmp_path / "x"))


def train_and_export(tmp_path, name, *flags):
    """A few train.py steps (not a random init), then the export command -> (run dir, export dir)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run, out = tmp_path / name, tmp_path / f"{name}_open_clip"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(root, "train.py"), f"--out_dir={run}", "--steps=3",
                        "--batch_size=8", "--eval=False", "--num_workers=0", "--warmup_steps=1", "--lr=3e-3", *flags],
                       cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    p = subprocess.run([sys.executable, "-m", "loaders.pretrained", "export", str(run / "ckpt.pt"), str(out)],
                       cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0 and "WRONG ids" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]
    return run, out


@pytest.mark.parametrize("name, flags", [
    ("tiny", ["--stem=linear", "--pool=cls"]),                       # the CPU default size, linear stem, class token
    ("custom", ["--stem=linear", "--patch_size=4", "--image_size=32", "--vision_width=96", "--vision_layers=2",
                "--text_width=64", "--text_layers=2", "--embed_dim=48", "--loss=sigmoid", "--method=silc",
                "--n_local_crops=2", "--head_hidden=32", "--head_bottleneck=16", "--head_out=64",
                "--data=shapes", "--tokenizer=byte", "--pool=mean"]),
])
def test_exported_model_gives_our_embeddings_in_open_clip(open_clip, tmp_path, name, flags):
    """open_clip.create_model_and_transforms('local-dir:...') on the exported folder of a trained
    checkpoint: the same image and text embeddings as ours (max abs difference <= 1e-4), with this
    project's tokenizer for the text (recorded in the config); the SigLIP bias and the logit scale
    come through; open_clip's preprocessing is told our mean, std and size."""
    import json
    from loaders.pretrained import load_model_from_checkpoint, tokenizer_from_state
    run, out = train_and_export(tmp_path, name, *flags)
    oc_model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc_model.eval()
    ours, tok = load_model_from_checkpoint(str(run / "ckpt.pt"))
    start = CLIP(ours.config).state_dict()                          # (a fresh init, to check training moved it)
    assert not torch.equal(start["text.proj.weight"], ours.state_dict()["text.proj.weight"])
    written = json.loads((out / "open_clip_config.json").read_text())
    tok2 = tokenizer_from_state(written["tokenizer"])
    S = ours.config.image_size
    images = torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(0))
    captions = ["a photo of a red star.", "two circles and a cross", "", "x" * 200]
    tokens = tok2(captions)
    assert torch.equal(tokens, tok(captions))
    assert_same_embeddings(oc_model, ours, images, tokens)
    assert oc_model.logit_scale.item() == pytest.approx(ours.logit_scale.item(), abs=1e-6)
    if "--loss=sigmoid" in flags:
        assert oc_model.logit_bias.item() == pytest.approx(ours.logit_bias.item(), abs=1e-6)
    assert f"size=({S}, {S})" in str(preprocess) or f"size={S}" in str(preprocess)
