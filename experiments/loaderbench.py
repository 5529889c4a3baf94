"""experiments/loaderbench.py: how fast the data pipeline alone makes training batches (no model).

bench.py times the model step with its batches already on the device; this script times what feeds
it: train.py's own pipeline (train.build_train_data: the tar reader, JPEG decoding, data.MultiCrop,
collate, data.make_loader's DataLoader, then train.prepare_batch), on tar shards of generated
photo-like JPEGs, for every combination of
    views      clip: one 224-px view (scale 0.9-1); silc: 2 x 224 px + 8 x 96 px (colour jitter and
               grayscale on the local crops). B/16's patch size, as at scale.
    photos     500 x 375 and 1024 x 768 by default (--photos): colour noise with a 1 / f^1.25 amplitude
               spectrum (natural images fall off about as 1 / f), JPEG quality 90, so the files are
               photo-sized (about 70 and 290 kB) and decode like photos.
    pipeline   before:  the code of another checkout (--baseline, e.g. the commit before issue 17):
                        every photo decoded at full size, the views cut in the DataLoader workers;
               workers: this checkout, --crops=workers: photos decoded straight to the working size
                        (JPEG draft mode, data.decode_image), the views cut in the workers;
               device:  this checkout, --crops=device: the workers decode and draw the crops' random
                        numbers; train.prepare_batch cuts the views on --device in the main process.
    workers    DataLoader workers (0: the main process does everything).

Two timed loops per configuration, after --warmup batches (worker start-up, first shard reads), each
started once the workers' queues of ready batches have been taken (so it times the steady rate):
    loader     samples/s out of the DataLoader alone: --batches batches of --batch_size.
    + step     samples/s of DataLoader + train.prepare_batch (the crop step of --crops=device, the
               copy to the device), synchronised, over as many batches. On a CPU the "device" is the
               main process's core, which the crop step then shares with nothing but the workers.
Per core: loader samples/s / max(1, workers); every process runs one torch thread (--threads), so
a worker is one core. The issue's target, SILC views at >= 2x today's rate per CPU core with crops on
the device, is the ratio (device loader per core) / (before loader per core): with crops on a GPU
the workers' cores do only what the loader loop measures, and the crop step runs on the GPU (the
"step ms/batch" column: its time alone on --device, on batches already out of the loader).

Also (decode): ms per image to decode each photo size on one thread (data.decode_image): in full,
in full then one resize to the working size (448 px for 224-px views), and with draft mode then the
same resize, and the speed-up of draft mode. Draft mode can only scale by 1/2, 1/4, 1/8, to a size
that keeps >= 448 px on the short side, so it helps photos of >= 896 px short side (2048 x 1536 is
measured too).

Each tree is measured in its own subprocess (its own imports); results go to --out (JSON) and a table.
Timings need the machine to themselves. Run:
    git worktree add /tmp/base 9b1b6d4        # the commit before issue 17, for the "before" rows
    python -m experiments.loaderbench --baseline=/tmp/base --out=loaderbench.json
    python -m experiments.loaderbench --photos=500x375 --views=silc --workers=0,1 --batches=2 --batch_size=8   # a quick check
"""

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------------------------
# Shards of generated photos
# -----------------------------------------------------------------------------------------------
def photo(height, width, seed):
    """A photo-like uint8 [H, W, 3]: colour noise with a 1 / f^1.25 amplitude spectrum, correlated
    across channels (fine detail and JPEG size like a photo's, unlike flat colours or white noise)."""
    rng = np.random.default_rng(seed)
    f = np.sqrt(np.fft.fftfreq(height)[:, None] ** 2 + np.fft.rfftfreq(width)[None, :] ** 2)
    f[0, 0] = 1
    chans = []
    for _ in range(3):
        x = np.fft.irfft2((rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** 1.25, s=(height, width))
        chans.append((x - x.mean()) / x.std())
    x = np.stack(chans, -1) @ np.array([[1, .6, .4], [.6, 1, .6], [.4, .6, 1]]) / 1.6
    return np.clip(128 + 50 * x, 0, 255).astype(np.uint8)


def jpeg_bytes(img, quality=90):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_shards(folder, width, height, n_images, n_shards):
    """folder/{0000..}.tar of n_images photos (key.jpg + key.txt), made once and reused."""
    done = os.path.join(folder, "done.json")
    if os.path.exists(done):
        return json.load(open(done))
    os.makedirs(folder, exist_ok=True)
    sizes = []
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f"{s:04d}.tar"), "w") as tar:
            for j in range(s, n_images, n_shards):
                payload = {"jpg": jpeg_bytes(photo(height, width, j)), "txt": f"a photo, number {j}".encode()}
                sizes.append(len(payload["jpg"]))
                for ext, data in payload.items():
                    info = tarfile.TarInfo(f"{j:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    meta = {"width": width, "height": height, "n_images": n_images, "jpeg_kb_mean": sum(sizes) / len(sizes) / 1024}
    json.dump(meta, open(done, "w"))
    return meta


# -----------------------------------------------------------------------------------------------
# One tree's measurements (run in a subprocess whose import path starts at that tree)
# -----------------------------------------------------------------------------------------------
def measure(spec):
    """spec: dict(pipeline, views, shards, workers, batch_size, batches, warmup, device, threads,
    image_size, n_local) -> the row. Uses only what train.py offered before issue 17 (build_train_data,
    make_loader, prepare_batch), so that the "before" tree runs the same measurement."""
    import torch

    import train
    from data import make_loader
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    flags = dict(data=spec["shards"], method=spec["views"], model="B/16", image_size=spec["image_size"],
                 n_local_crops=spec["n_local"], seed=0, device=spec["device"], num_workers=spec["workers"])
    if spec["pipeline"] != "before":
        flags["crops"] = spec["pipeline"]                    # "workers" | "device"
    cfg = train.resolve_method_defaults(train.Config(**flags))
    clip_cfg, tokenizer = train.build_model_config(cfg)
    dataset, collate_fn = train.build_train_data(cfg, clip_cfg.patch_size, tokenizer)
    kwargs = {"pin_memory": True} if device.type == "cuda" and spec["pipeline"] != "before" else {}
    dl = make_loader(dataset, collate_fn, spec["batch_size"], 1, 0, 1, cfg.seed, 0, spec["workers"], **kwargs)
    loader = iter(dl)
    queued = (dl.prefetch_factor or 0) * spec["workers"]     # batches the workers may hold ready

    def drain():
        """Take the batches the workers made while the main process was busy: a timed loop then starts
        with (almost) empty queues and measures the steady rate, not the backlog."""
        for _ in range(queued):
            next(loader)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(batch):
        batch.pop("skipped", None)
        out = train.prepare_batch(batch, cfg, tokenizer, clip_cfg.patch_size, 0, 0, device)
        sync()
        return out

    for _ in range(spec["warmup"]):
        step(next(loader))
    # the loader alone
    drain()
    t = time.perf_counter()
    cached = [next(loader) for _ in range(spec["batches"])]
    loader_s = time.perf_counter() - t
    # the crop step alone, on batches already out of the loader (the workers have their prefetch
    # queues full by then and idle)
    crop_ms = []
    for batch in cached:
        t = time.perf_counter()
        views = step(batch)
        crop_ms.append(1000 * (time.perf_counter() - t))
    # loader + step, as the training loop draws them
    drain()
    t = time.perf_counter()
    for _ in range(spec["batches"]):
        views = step(next(loader))
    both_s = time.perf_counter() - t
    n = spec["batches"] * spec["batch_size"]
    shapes = {k: list(v.shape) for k, v in views.items() if k in ("images", "global_crops", "local_crops")}
    return {**{k: spec[k] for k in ("pipeline", "views", "workers", "batch_size", "batches", "device", "threads")},
            "loader_sps": n / loader_s, "loader_sps_per_core": n / loader_s / max(1, spec["workers"]),
            "step_ms": statistics.median(crop_ms), "loader_step_sps": n / both_s, "view_shapes": shapes}


def measure_decode(files_by_photo, working_size, repeats):
    """ms per image (median over repeats x images) of data.decode_image: the stored size (full), in full
    then one resize to the working size (full_resize), and with draft mode then the same resize
    (draft). This tree, this process's one thread."""
    from data import decode_image
    kinds = {"full": dict(working_size=0), "full_resize": dict(working_size=working_size, draft=False),
             "draft": dict(working_size=working_size)}
    rows = []
    for name, files in files_by_photo.items():
        times = {k: [] for k in kinds}
        for _ in range(repeats):
            for data in files:
                for kind, kwargs in kinds.items():
                    t = time.perf_counter()
                    decode_image(io.BytesIO(data), **kwargs)
                    times[kind].append(1000 * (time.perf_counter() - t))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"photo": name, "jpeg_kb": sum(map(len, files)) / len(files) / 1024, "working_size": working_size,
                     **{f"{k}_ms": v for k, v in med.items()}, "draft_speedup": med["full_resize"] / med["draft"]})
    return rows


def run_tree(code, specs):
    """Measure specs with the code at `code` (this file, run as a script, imports train from there)."""
    env = dict(os.environ, PYTHONPATH=code, OMP_NUM_THREADS=str(specs[0]["threads"]) if specs else "1")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--_measure", json.dumps(specs)],
                       env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"measuring with the code at {code} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -----------------------------------------------------------------------------------------------
# Tables
# -----------------------------------------------------------------------------------------------
def format_rows(rows, keys, heads):
    lines = [heads] + [[r[k] if isinstance(r[k], str) else f"{r[k]:.1f}" if isinstance(r[k], float) else str(r[k])
                        for k in keys] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(heads))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def ratios(rows):
    """Per photo size and worker count: SILC's device-crop loader rate per core over before's."""
    out = []
    key = lambda r: (r["photo"], r["workers"])                       # noqa: E731
    before = {key(r): r for r in rows if r["views"] == "silc" and r["pipeline"] == "before"}
    for r in rows:
        if r["views"] == "silc" and r["pipeline"] == "device" and key(r) in before:
            b = before[key(r)]
            out.append({"photo": r["photo"], "workers": r["workers"], "before_per_core": b["loader_sps_per_core"],
                        "device_per_core": r["loader_sps_per_core"],
                        "ratio": r["loader_sps_per_core"] / b["loader_sps_per_core"]})
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", default="500x375,1024x768", help="comma list of WxH")
    p.add_argument("--decode_photos", default="500x375,1024x768,2048x1536", help="photo sizes of the decode table")
    p.add_argument("--views", default="clip,silc")
    p.add_argument("--pipelines", default="before,workers,device", help="before needs --baseline")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--baseline", default="", help="a checkout of the code before issue 17, for the 'before' rows")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="timed batches per loop")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--n_local", type=int, default=8)
    p.add_argument("--device", default="cpu", help="where --crops=device cuts the views (cpu | cuda)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process (workers use 1)")
    p.add_argument("--n_images", type=int, default=64, help="distinct photos per size (read in a loop)")
    p.add_argument("--decode_repeats", type=int, default=3)
    p.add_argument("--data_dir", default="/tmp/loaderbench_data")
    p.add_argument("--out", default="loaderbench.json")
    p.add_argument("--_measure", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args._measure:                                    # the subprocess: measure, print one JSON line
        print(json.dumps([measure(s) for s in json.loads(args._measure)]))
        return None
    pipelines = args.pipelines.split(",")
    if "before" in pipelines and not args.baseline:
        print("no --baseline checkout given: skipping the 'before' rows")
        pipelines.remove("before")
    photos = {}
    for name in args.photos.split(","):
        w, h = map(int, name.split("x"))
        photos[name] = make_shards(os.path.join(args.data_dir, f"{name}_{args.n_images}"), w, h, args.n_images, 4)
        photos[name]["shards"] = os.path.join(args.data_dir, f"{name}_{args.n_images}")
    rows = []
    for tree, names in (("baseline", ["before"]), ("this", ["workers", "device"])):
        names = [n for n in names if n in pipelines]
        if not names:
            continue
        specs = [dict(pipeline=pl, views=v, shards=photos[ph]["shards"], workers=int(nw), batch_size=args.batch_size,
                      batches=args.batches, warmup=args.warmup, device=args.device, threads=args.threads,
                      image_size=args.image_size, n_local=args.n_local, photo=ph)
                 for ph in photos for v in args.views.split(",") for pl in names for nw in args.workers.split(",")]
        print(f"measuring {len(specs)} configurations with the code at {args.baseline if tree == 'baseline' else ROOT}",
              flush=True)
        for spec, row in zip(specs, run_tree(args.baseline if tree == "baseline" else ROOT, specs)):
            rows.append({"photo": spec["photo"], "jpeg_kb": photos[spec["photo"]]["jpeg_kb_mean"], **row})
    rows.sort(key=lambda r: (r["views"], r["photo"], ["before", "workers", "device"].index(r["pipeline"]), r["workers"]))
    print()
    print(format_rows(rows, ["views", "photo", "pipeline", "workers", "loader_sps", "loader_sps_per_core", "step_ms",
                             "loader_step_sps"],
                      ["views", "photo", "pipeline", "workers", "loader samples/s", "per core", "step ms/batch",
                       "loader+step samples/s"]))
    summary = ratios(rows)
    if summary:
        print("\nSILC views, loader per core: crops on the device vs before (target >= 2)")
        print(format_rows(summary, ["photo", "workers", "before_per_core", "device_per_core", "ratio"],
                          ["photo", "workers", "before /core", "device /core", "ratio"]))
    # decode speed, this tree, single thread
    files = {}
    for name in args.decode_photos.split(","):
        w, h = map(int, name.split("x"))
        files[name] = [jpeg_bytes(photo(h, w, 1000 + j)) for j in range(4)]
    import torch
    torch.set_num_threads(args.threads)
    decode = measure_decode(files, 2 * args.image_size, args.decode_repeats)
    print(f"\ndecoding one photo to the {2 * args.image_size}-px working size (ms, single thread)")
    print(format_rows(decode, ["photo", "jpeg_kb", "full_ms", "full_resize_ms", "draft_ms", "draft_speedup"],
                      ["photo", "JPEG kB", "full decode", "full + resize", "draft + resize", "speed-up"]))
    out = {"args": {k: v for k, v in vars(args).items() if k != "_measure"}, "torch": torch.__version__,
           "cpus": os.cpu_count(), "rows": rows, "silc_device_vs_before": summary, "decode": decode,
           "note": "per core = loader samples/s / max(1, workers); one torch thread per process"}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")
    return out


if __name__ == "__main__":
    if "--_measure" in sys.argv:     # run as a script by run_tree: the tree to measure is on PYTHONPATH
        sys.path = [p for p in sys.path if os.path.abspath(p) != os.path.dirname(os.path.abspath(__file__))]
    main()
