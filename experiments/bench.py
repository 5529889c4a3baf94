"""experiments/bench.py: what one training step of each method costs, and how close it runs to the hardware's limit.

For every method (clip, silc, maskclip, silc+maskclip), model size (tiny, S/16, B/16) and mode
(eager, torch.compile) it times the REAL training step: train.train_step itself (teacher forward,
student forward, backward, the non-finite check, gradient clipping, AdamW, logit-scale clamp, EMA and
centre updates), with bf16 autocast, fused AdamW and TF32 on CUDA (fp32 on CPU, as train.py). What
it does NOT time: data loading. The batches (shapes images through data.py's MultiCrop and collate,
then train.prepare_batch: masks and MLM corruption included) are made once before the clock starts
and already sit on the device, so the numbers are the model step alone; a real run also needs a
DataLoader fast enough to keep up.

Measured per configuration:
    step time      median over --steps timed steps, after --warmup untimed ones (the first compiled
                   step includes compilation; its time is reported separately as compile_s)
    samples/s      batch_size / step time
    peak memory    CUDA: torch.cuda.max_memory_allocated (reset before each configuration).
                   CPU: the process-wide peak resident set size (resource.getrusage ru_maxrss),
                   and how much this configuration raised it. ru_maxrss never goes down, so a
                   configuration that needs less than an earlier one shows a delta of 0: run one
                   configuration per process (--sizes=X --methods=Y) for clean CPU memory numbers.
    model FLOPs    counted from the architecture (clip.flops_per_image / flops_per_text, a
                   multiply-add = 2 FLOPs), see step_flops():
                       F_step = B * (3 * F_student + F_teacher)
                   the factor 3 = forward + backward (the backward costs about twice the forward);
                   the teacher runs forward only (no_grad). F_student sums every student forward:
                       text tower (at the batch's real token length: train.py trims padding)
                       clip:     F_img(S)
                       silc:     n_g F_img(S) + n_local F_img(s) + (n_g + n_local) F_head
                                 (n_g = 2 global views with --sd_views=silc, 1 with siglip2)
                       maskclip: F_img(S) + F_img(S, visible tokens only in drop mode)
                                 + F_decoder(1 + N) + N F_head  (+ F_text + F_text_decoder for MLM)
                   and F_teacher = n_global F_img(S) + the teacher's heads. Heads and decoders are
                   counted with the same per-token formula as the towers (2 FLOPs per weight per
                   token; attention 4 N^2 D). Norms, softmax, activations, losses and the optimizer
                   are not counted (a few percent at most), so MFU slightly UNDER-states the work.
    MFU            model FLOPs utilisation (PaLM, Chowdhery et al. 2022; nanoGPT's estimate):
                       MFU = (F_step / step time) / peak FLOP/s
                   peak on GPU = the published dense bf16 tensor-core peak of the card (H100 SXM and
                   H200: 989 TFLOP/s; override with --peak_tflops); peak on CPU = the best fp32
                   FLOP/s of a large matmul (2 n^3 FLOPs for n x n) measured in the same process
                   with the same threads, so a CPU MFU of 100% would mean running at matmul speed.

open_clip (optional): when `import open_clip` works, the same CLIP training step (same widths,
depths, heads, patch size, image size, context length, batch, precision, AdamW settings, grad
clipping and clamp) is timed in open_clip and in ours, side by side in this process, and printed as
a ratio (ours / open_clip step time: <= 1 means ours is not slower). Both get identical full-length
token tensors (no padding trim), and both use a linear patch stem (open_clip has no conv stem).

Scaling note (--scaling): from the measured per-GPU samples/s, the hours a CC3M (3.3M pairs) or
CC12M (12M) run of E epochs takes on G GPUs under torchrun, assuming ideal linear scaling (a lower
bound: the feature all-gather and the gradient all-reduce cost a little more) and a data pipeline
that keeps up.

Run it:
    python -m experiments.bench --sizes=tiny --steps=3 --warmup=1 --compile=eager        # seconds, CPU
    python -m experiments.bench --sizes=B/16 --batch_size=256 --compile=both --scaling   # the GPU numbers
    python -m experiments.bench --sizes=tiny --methods=clip --out=bench_tiny.json
    /tmp/openclip-venv/bin/python -m experiments.bench --sizes=B/16 --methods=clip   # with open_clip (.ci/run's venv)
With --compile=compiled or both, keep --warmup >= 2: the first steps compile (compile_s in the JSON).
"""

import argparse
import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import time

import torch

import train
from clip import autocast_for, count_params, flops_per_image, flops_per_text, pick_device, transformer_flops

METHODS = train.METHODS
SIZES = ("tiny", "S/16", "B/16")
DEFAULT_IMAGE_SIZE = {"tiny": 64, "S/16": 224, "B/16": 224}

# Published dense (no sparsity) bf16 tensor-core peaks, TFLOP/s. Matched as substrings of
# torch.cuda.get_device_name(), most specific first. H200 is the H100 chip with more memory.
GPU_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100", 989.0),     # SXM
    ("H200", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
]

# Dataset sizes for the scaling note (image-text pairs).
DATASETS = {"CC3M": 3.3e6, "CC12M": 12e6}


# -----------------------------------------------------------------------------------------------
# FLOPs and MFU arithmetic (pure functions; tests/test_bench_ablate.py checks them by hand)
# -----------------------------------------------------------------------------------------------
def dino_head_flops(in_dim, hidden, bottleneck, out_dim, nlayers=3):
    """Forward FLOPs of losses.DINOHead on ONE token: MLP in -> hidden (x nlayers-2) -> bottleneck,
    then the prototype layer bottleneck -> K (2 FLOPs per weight)."""
    if nlayers == 1:
        mlp = in_dim * bottleneck
    else:
        mlp = in_dim * hidden + (nlayers - 2) * hidden * hidden + hidden * bottleneck
    return 2 * (mlp + bottleneck * out_dim)


def step_flops(cfg, clip_cfg, text_len, local_size=0, n_masked=0):
    """Model FLOPs of one training step of train.py (all ranks' batch), by component.

    cfg: train.Config after resolve_method_defaults; clip_cfg: clip.CLIPConfig; text_len: the
    token length the text tower really runs at; local_size: the local crops' side (silc);
    n_masked: masked patches per image (maskclip). Returns a dict of forward FLOPs PER SAMPLE
    ('student', 'teacher' and their parts) and 'step' = B * (3 * student + teacher).
    """
    use_sd, use_mask = "silc" in cfg.method, "maskclip" in cfg.method
    S, D = cfg.image_size, clip_cfg.vision_width
    N = (S // clip_cfg.patch_size) ** 2                      # patches of a global view
    text = flops_per_text(dataclasses.replace(clip_cfg, context_length=text_len))
    img = flops_per_image(clip_cfg, image_size=S)
    head = dino_head_flops(D, cfg.head_hidden, cfg.head_bottleneck, cfg.head_out)
    n_global = train.train_views(cfg, clip_cfg.patch_size).n_global   # the text-paired (and teacher) views
    parts = {"text": text, "image_global": n_global * img}
    teacher = {}
    if use_sd:
        parts["image_local"] = cfg.n_local_crops * flops_per_image(clip_cfg, image_size=local_size)
        parts["sd_head"] = (n_global + cfg.n_local_crops) * head
        teacher["image"] = n_global * img
        teacher["sd_head"] = n_global * head
    if use_mask:
        visible = N - n_masked if cfg.mask_mode == "drop" else N
        parts["image_masked"] = flops_per_image(clip_cfg, image_size=S, n_visible=visible)
        parts["decoder"] = transformer_flops(1 + N, D, cfg.decoder_layers, clip_cfg.mlp_ratio)
        parts["patch_head"] = N * head
        teacher["image"] = n_global * img                    # one teacher forward serves both losses
        teacher["patch_head"] = N * head
        if cfg.mlm_weight > 0:
            W = clip_cfg.text_width
            parts["mlm_text"] = text
            parts["mlm_decoder"] = (transformer_flops(text_len, W, cfg.text_decoder_layers, clip_cfg.mlp_ratio)
                                    + 2 * text_len * W * clip_cfg.vocab_size)
    if cfg.patch_text_weight > 0:   # each patch meets all B captions (counted: N times the contrastive logits,
        E = clip_cfg.embed_dim      # left out), after its projection, which pool="unitmean" has made already
        proj = 0 if clip_cfg.pool == "unitmean" else 2 * N * D * E
        parts["patch_text"] = n_global * (proj + 2 * N * cfg.batch_size * E)
    student, teach = sum(parts.values()), sum(teacher.values())
    return {"student": student, "teacher": teach, "student_parts": parts, "teacher_parts": teacher,
            "step": cfg.batch_size * (3 * student + teach)}


def mfu(flops_per_step, step_time_s, peak_flops):
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak FLOP/s."""
    if not peak_flops or step_time_s <= 0:
        return None
    return flops_per_step / step_time_s / peak_flops


def gpu_peak_tflops(device_name):
    """Published dense bf16 peak (TFLOP/s) for a CUDA device name, or None if the card is unknown."""
    for key, tflops in GPU_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def cpu_matmul_peak(n=2048, reps=5):
    """Best fp32 FLOP/s of an n x n matmul on this CPU with torch's current threads (2 n^3 FLOPs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b                                                    # warm the allocator and the BLAS threads
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def scaling_note(samples_per_s_per_gpu, epochs=(1, 10, 30), gpus=(1, 8, 64), datasets=None):
    """Hours for a dataset x epochs run on G GPUs at the measured per-GPU throughput, assuming
    ideal linear scaling. Returns a list of dict(dataset, pairs, epochs, gpus, hours)."""
    datasets = DATASETS if datasets is None else datasets
    rows = []
    for name, pairs in datasets.items():
        for e in epochs:
            for g in gpus:
                hours = pairs * e / (samples_per_s_per_gpu * g) / 3600
                rows.append({"dataset": name, "pairs": pairs, "epochs": e, "gpus": g, "hours": hours})
    return rows


def format_table(rows):
    """The results as a fixed-width text table (one line per configuration)."""
    head = ["size", "method", "mode", "batch", "step ms", "samples/s", "peak MiB", "GFLOP/step", "MFU %",
            "params M"]
    lines = [head]
    for r in rows:
        if r.get("error"):
            lines.append([r["size"], r["method"], r["mode"], str(r["batch_size"]), r["error"], "", "", "", "", ""])
            continue
        m = r["mfu"]
        lines.append([r["size"], r["method"], r["mode"], str(r["batch_size"]), f"{1000 * r['step_s']:.1f}",
                      f"{r['samples_per_s']:.1f}", f"{r['peak_mem_mib']:.0f}", f"{r['flops_per_step'] / 1e9:.2f}",
                      "n/a" if m is None else f"{100 * m:.1f}", f"{r['params'] / 1e6:.2f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


# -----------------------------------------------------------------------------------------------
# The timed step: train.py's loop body for one optimizer step (world size 1, no accumulation)
# -----------------------------------------------------------------------------------------------
def make_config(size, method, args, device):
    """train.Config of one benchmark configuration (method defaults resolved)."""
    cfg = train.Config(model=size, method=method, batch_size=args.batch_size, device=str(device),
                       image_size=args.image_size or DEFAULT_IMAGE_SIZE.get(size, 224),
                       n_local_crops=args.n_local_crops, eval=False, loss=args.loss,
                       head_hidden=args.head_hidden, head_bottleneck=args.head_bottleneck,
                       head_out=args.head_out)
    return train.resolve_method_defaults(cfg)


def make_batches(cfg, clip_cfg, tokenizer, n_batches, device, trim):
    """n_batches training batches exactly as train.py builds them (shapes data, MultiCrop, collate,
    train.prepare_batch), on the device, made before any timing."""
    dataset, collate_fn = train.build_train_data(cfg, clip_cfg.patch_size, tokenizer)
    torch.manual_seed(cfg.seed)                              # crops draw from torch's global generator
    batches = []
    B = cfg.batch_size
    for k in range(n_batches):
        batch = collate_fn([dataset[i] for i in range(k * B, (k + 1) * B)])
        batches.append(train.prepare_batch(batch, cfg, tokenizer, clip_cfg.patch_size, step=k, first_index=0,
                                           device=device, trim=trim))
    return batches


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step_fn, batches, warmup, steps, device):
    """(first step seconds, list of timed step seconds). step_fn(batch) runs one full step."""
    times = []
    first = None
    for i in range(warmup + steps):
        sync(device)
        t = time.perf_counter()
        step_fn(batches[i % len(batches)])
        sync(device)
        dt = time.perf_counter() - t
        if i == 0:
            first = dt
        if i >= warmup:
            times.append(dt)
    return first, times


def make_train_step(cfg, pretrainer, model, teacher, optimizer, autocast_ctx):
    """train.train_step on one batch (world size 1, no accumulation), as a function of the batch.
    Step 0 of the schedules: past any last-layer freeze (off by default), distillation on."""
    def step(batch):
        train.train_step(model, pretrainer, teacher, optimizer, [dict(batch)], 0, cfg, autocast_ctx)
    return step


def peak_memory_start(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # KiB on Linux


def peak_memory_end(device, start):
    """(peak MiB, delta MiB): CUDA allocator peak, or the process-wide peak RSS and its rise."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        return peak, peak
    now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return now / 1024, (now - start) / 1024


def bench_one(size, method, compiled, args, device, peak_flops):
    """Time one configuration; returns a result dict (with 'error' set on out-of-memory)."""
    cfg = make_config(size, method, args, device)
    cfg.compile = compiled
    clip_cfg, tokenizer = train.build_model_config(cfg)
    autocast_ctx = autocast_for(device)
    row = {"size": size, "method": method, "mode": "compiled" if compiled else "eager",
           "batch_size": cfg.batch_size, "image_size": cfg.image_size, "device": args.device_name}
    # train.py trims padding columns in eager mode only (a changing shape would recompile)
    batches = make_batches(cfg, clip_cfg, tokenizer, args.n_batches, device, trim=not compiled)
    b0 = batches[0]
    text_len = b0["tokens"].shape[1]
    local_size = b0["local_crops"].shape[-1] if b0.get("local_crops") is not None else 0
    n_masked = int(b0["patch_mask"][0].sum()) if "patch_mask" in b0 else 0
    fl = step_flops(cfg, clip_cfg, text_len, local_size, n_masked)
    mem0 = peak_memory_start(device)
    pretrainer = optimizer = teacher = model = None
    try:
        pretrainer, optimizer, teacher = train.build_student(cfg, clip_cfg, device)
        model, _ = train.wrap_student(pretrainer, cfg, 1, 0, device)
        step = make_train_step(cfg, pretrainer, model, teacher, optimizer, autocast_ctx)
        first, times = time_steps(step, batches, args.warmup, args.steps, device)
        peak, delta = peak_memory_end(device, mem0)
        step_s = statistics.median(times)
        row.update(step_s=step_s, step_s_min=min(times), step_s_max=max(times), first_step_s=first,
                   compile_s=(first - step_s) if compiled else None,
                   samples_per_s=cfg.batch_size / step_s, peak_mem_mib=peak, mem_delta_mib=delta,
                   params=count_params(pretrainer, trainable_only=True), text_len=text_len,
                   local_size=local_size, n_masked=n_masked, flops_per_step=fl["step"],
                   flops_student_per_sample=fl["student"], flops_teacher_per_sample=fl["teacher"],
                   flops_parts=fl["student_parts"], flops_teacher_parts=fl["teacher_parts"],
                   achieved_tflops=fl["step"] / step_s / 1e12, mfu=mfu(fl["step"], step_s, peak_flops))
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    finally:
        del pretrainer, optimizer, teacher, model, batches
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# -----------------------------------------------------------------------------------------------
# open_clip side by side (optional dependency)
# -----------------------------------------------------------------------------------------------
def open_clip_model(clip_cfg):
    """An open_clip CLIP with the same architecture as our clip_cfg (linear stem)."""
    import open_clip
    vision = open_clip.CLIPVisionCfg(layers=clip_cfg.vision_layers, width=clip_cfg.vision_width,
                                     head_width=clip_cfg.vision_width // clip_cfg.vision_heads,
                                     mlp_ratio=clip_cfg.mlp_ratio, patch_size=clip_cfg.patch_size,
                                     image_size=clip_cfg.image_size)
    text = open_clip.CLIPTextCfg(context_length=clip_cfg.context_length, vocab_size=clip_cfg.vocab_size,
                                 width=clip_cfg.text_width, heads=clip_cfg.text_heads,
                                 layers=clip_cfg.text_layers, mlp_ratio=clip_cfg.mlp_ratio)
    return open_clip.CLIP(clip_cfg.embed_dim, vision, text, quick_gelu=clip_cfg.act == "quick_gelu")


def bench_open_clip(size, compiled, args, device):
    """Ours vs open_clip, the same CLIP step on the same batches. Both models are built and warmed up
    first, then their timed steps alternate (ours, open_clip, ours, ...), so a change in machine load
    hits both alike. Returns a dict, or None if open_clip is not installed."""
    try:
        import open_clip  # noqa: F401
        from open_clip.loss import ClipLoss
    except ImportError:
        return None
    cfg = make_config(size, "clip", args, device)
    cfg.stem = "linear"                                      # open_clip's ViT has a linear patch stem
    clip_cfg, tokenizer = train.build_model_config(cfg)
    autocast_ctx = autocast_for(device)
    batches = make_batches(cfg, clip_cfg, tokenizer, args.n_batches, device, trim=False)
    result = {"size": size, "mode": "compiled" if compiled else "eager", "batch_size": cfg.batch_size,
              "note": "same architecture (linear stem), full-length tokens, same AdamW/clip/clamp"}

    torch.manual_seed(0)
    ours = train.Pretrainer(cfg, clip_cfg).to(device)
    ours_model = torch.compile(ours) if compiled else ours
    theirs = open_clip_model(clip_cfg).to(device)
    theirs_model = torch.compile(theirs) if compiled else theirs
    criterion = ClipLoss()
    result["params_ours"] = count_params(ours, trainable_only=True)    # should be (nearly) equal
    result["params_open_clip"] = count_params(theirs, trainable_only=True)

    def ours_loss(batch):
        return ours_model(batch)["loss"]

    def theirs_loss(batch):
        img, txt, scale = theirs_model(batch["images"], batch["tokens"])      # normalised features
        return criterion(img, txt, scale)

    def theirs_clamp():
        with torch.no_grad():
            theirs.logit_scale.clamp_(0, math.log(100))

    def make_step(net, loss_fn, clamp):
        optimizer = train.make_optimizer(net, cfg, device)

        def step(batch):
            with autocast_ctx:
                loss = loss_fn(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clamp()
        return step

    steps = {"ours": make_step(ours, ours_loss, ours.clip.clamp_logit_scale),
             "open_clip": make_step(theirs, theirs_loss, theirs_clamp)}
    try:
        for name, fn in steps.items():                       # warm-up (and compilation) of both
            time_steps(fn, batches, 0, max(1, args.warmup), device)
        times = {name: [] for name in steps}
        for i in range(args.steps):                          # alternate the timed steps
            for name, fn in steps.items():
                times[name] += time_steps(fn, batches[i % len(batches):] + batches, 0, 1, device)[1]
        for name in steps:
            result[f"{name}_step_s"] = statistics.median(times[name])
        result["ratio_ours_over_open_clip"] = result["ours_step_s"] / result["open_clip_step_s"]
    except torch.OutOfMemoryError:
        result["error"] = "OOM"
    del ours, ours_model, theirs, theirs_model, steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# -----------------------------------------------------------------------------------------------
# main
# -----------------------------------------------------------------------------------------------
def summary(args, peak_tflops, peak_src, rows, cost=(), parity=(), scaling=()):
    """Everything bench.py measured, as one JSON-ready dict."""
    return {"device": args.device_name, "peak_tflops": peak_tflops, "peak_source": peak_src,
            "torch": torch.__version__, "args": {k: v for k, v in vars(args).items()},
            "results": rows, "cost_vs_clip": list(cost), "open_clip": list(parity), "scaling": list(scaling)}


def write_json(path, obj):
    """Write obj to path atomically (a temporary file, then a rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny", help="comma list of " + ",".join(SIZES))
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ",".join(METHODS))
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--image_size", type=int, default=0, help="0 = 64 for tiny, 224 for S/16 and B/16")
    p.add_argument("--n_local_crops", type=int, default=train.Config.n_local_crops)
    p.add_argument("--head_hidden", type=int, default=train.Config.head_hidden,
                   help="DINO head sizes (train.py's CPU defaults; DINO at scale: 2048 / 256 / 65536)")
    p.add_argument("--head_bottleneck", type=int, default=train.Config.head_bottleneck)
    p.add_argument("--head_out", type=int, default=train.Config.head_out)
    p.add_argument("--loss", default="softmax", choices=("softmax", "sigmoid"))
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--n_batches", type=int, default=2, help="distinct batches prepared and cycled")
    p.add_argument("--compile", default="eager", choices=("eager", "compiled", "both"))
    p.add_argument("--device", default="auto")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="override the device peak (TFLOP/s)")
    p.add_argument("--open_clip", default="auto", choices=("auto", "off"),
                   help="auto: time open_clip's CLIP step beside ours when open_clip imports")
    p.add_argument("--scaling", action="store_true", help="print the CC3M / CC12M scaling note")
    p.add_argument("--epochs", default="1,10,30", help="epochs for the scaling note")
    p.add_argument("--gpus", default="1,8,64", help="GPU counts for the scaling note")
    p.add_argument("--out", default="bench.json")
    args = p.parse_args(argv)
    args.sizes, args.methods = args.sizes.split(","), args.methods.split(",")
    for s in args.sizes:
        if s not in SIZES:
            p.error(f"unknown size {s!r}; choose from {SIZES}")
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {METHODS}")
    if args.steps < 1 or args.warmup < 0 or args.n_batches < 1:
        p.error("need --steps >= 1, --warmup >= 0, --n_batches >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cuda":
        args.device_name = torch.cuda.get_device_name(device)
        peak_tflops = args.peak_tflops or gpu_peak_tflops(args.device_name)
        peak_src = "--peak_tflops" if args.peak_tflops else "published dense bf16"
        if peak_tflops is None:
            print(f"warning: unknown GPU {args.device_name!r}: pass --peak_tflops for MFU")
    else:
        args.device_name = f"CPU ({torch.get_num_threads()} threads)"
        peak_tflops = args.peak_tflops or cpu_matmul_peak() / 1e12
        peak_src = "--peak_tflops" if args.peak_tflops else "measured fp32 2048^3 matmul, best of 5"
    peak_flops = peak_tflops * 1e12 if peak_tflops else None
    print(f"device: {args.device_name}; peak {peak_tflops or float('nan'):.3f} TFLOP/s ({peak_src}); "
          f"torch {torch.__version__}")
    print("timing the model step only: batches are made once, before the clock, and sit on the device")
    modes = {"eager": [False], "compiled": [True], "both": [False, True]}[args.compile]
    rows, parity = [], []
    for size in args.sizes:
        for compiled in modes:
            for method in args.methods:
                r = bench_one(size, method, compiled, args, device, peak_flops)
                rows.append(r)
                if r.get("error"):
                    print(f"  {size} {method} {r['mode']}: {r['error']}")
                else:
                    m = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
                    print(f"  {size} {method} {r['mode']}: {1000 * r['step_s']:.1f} ms/step, "
                          f"{r['samples_per_s']:.1f} samples/s, MFU {m}, peak {r['peak_mem_mib']:.0f} MiB",
                          flush=True)
                # written after every configuration, so a run stopped by a time limit keeps its rows
                write_json(args.out, summary(args, peak_tflops, peak_src, rows))
            if args.open_clip == "auto":
                res = bench_open_clip(size, compiled, args, device)
                if res is None:
                    print("  open_clip is not installed: skipping the side-by-side CLIP step")
                else:
                    parity.append(res)
    print()
    print(format_table(rows))
    # SILC's extra cost per sample, against its extra FLOPs (same size and mode)
    base = {(r["size"], r["mode"]): r for r in rows if r["method"] == "clip" and not r.get("error")}
    cost = []
    for r in rows:
        b = base.get((r["size"], r["mode"]))
        if b is None or r.get("error") or r["method"] == "clip":
            continue
        cost.append({"size": r["size"], "mode": r["mode"], "method": r["method"],
                     "time_ratio": r["step_s"] / b["step_s"],
                     "flops_ratio": r["flops_per_step"] / b["flops_per_step"]})
    if cost:
        print("\ncost relative to clip (same size, mode, batch): step-time ratio vs model-FLOPs ratio")
        for c in cost:
            print(f"  {c['size']} {c['mode']} {c['method']}: time x{c['time_ratio']:.2f}, "
                  f"FLOPs x{c['flops_ratio']:.2f}")
    for res in parity:
        if res.get("error"):
            print(f"\nopen_clip vs ours, {res['size']} {res['mode']}: {res['error']}")
        else:
            print(f"\nopen_clip vs ours, CLIP step, {res['size']} {res['mode']} batch {res['batch_size']}: "
                  f"open_clip {1000 * res['open_clip_step_s']:.1f} ms, ours {1000 * res['ours_step_s']:.1f} ms, "
                  f"ratio ours/open_clip = {res['ratio_ours_over_open_clip']:.3f} ({res['note']})")
    scaling = []
    if args.scaling:
        for r in rows:
            if r.get("error") or r["mode"] != modes[-1]:
                continue
            notes = scaling_note(r["samples_per_s"], epochs=[int(e) for e in args.epochs.split(",")],
                                 gpus=[int(g) for g in args.gpus.split(",")])
            scaling.append({"size": r["size"], "method": r["method"], "mode": r["mode"],
                            "samples_per_s_per_device": r["samples_per_s"], "rows": notes})
            print(f"\nscaling note: {r['size']} {r['method']} ({r['mode']}) at {r['samples_per_s']:.0f} "
                  f"samples/s per device (ideal linear scaling; data loading assumed to keep up):")
            for n in notes:
                print(f"  {n['dataset']} x {n['epochs']} epochs on {n['gpus']} GPUs: {n['hours']:.1f} h")
    out = summary(args, peak_tflops, peak_src, rows, cost, parity, scaling)
    write_json(args.out, out)
    print(f"\nwrote {args.out}")
    return out


if __name__ == "__main__":
    main()
