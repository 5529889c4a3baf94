#!/usr/bin/env bash
# The GPU checks of issue 17, prepared in a CPU-only session and NOT yet run. One script for one lent
# GPU (written for an H100 / H200 with 16 cores), estimated at 10-12 minutes in all (not timed yet);
# every part has its own time limit, so a slow part cannot eat the others, and the parts come in order
# of importance. From the repository root:
#     bash experiments/gpu_check.sh            # writes logs and JSON under $OUT (default gpu_check/)
# The parts:
#   1. correctness on CUDA: the crops cut on the GPU equal the workers' crops (<= 1e-5), and every
#      gradient has its parameter's strides, eager and compiled (tests/test_data.py, tests/test_train.py);
#   2. DDP + torch.compile + grad_accum=2 (the issue's command, on a one-rank NCCL group, which builds
#      the same buckets): DDP's "Grad strides do not match bucket view strides" warning with the
#      conv stem as before issue 17 (contiguous weights) and with channels-last weights (now);
#   3. SILC at 224 px end to end (train.py on tar shards of generated JPEGs, B/16, 8 local crops,
#      compiled, bf16, crops on the device) against the step alone (experiments/bench.py);
#   4. the loader alone on this machine's cores (experiments/loaderbench.py, crops on cuda).
set -uo pipefail
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONHASHSEED=0
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0), torch.get_num_threads())" | tee "$OUT/env.txt"

echo "== 1. correctness on CUDA"
timeout 240 python -m pytest -q -rs tests/test_data.py::test_crops_on_the_device_equal_the_crops_of_the_workers \
    tests/test_train.py::test_gradients_have_their_parameters_strides_on_cuda 2>&1 | tail -8 | tee "$OUT/1_pytest.txt"

echo "== 2. DDP + compile + grad_accum=2: the bucket stride warning, before and after"
for layout in contiguous channels_last; do
  timeout 150 python - "$layout" "$OUT" > "$OUT/2_ddp_$layout.log" 2>&1 <<'EOF'
import contextlib, sys
import torch, torch.distributed as dist
sys.path.insert(0, ".")
import clip, data, train
layout, out = sys.argv[1], sys.argv[2]
if layout == "contiguous":                         # the conv stem as it was before issue 17
    clip.ConvStem.channels_last_ = lambda self: self
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
device = torch.device("cuda:0")
cfg = train.resolve_method_defaults(train.parse_args(["--method=silc", "--compile=True", "--grad_accum=2",
                                                      "--batch_size=64", "--device=cuda", "--num_workers=2"]))
clip_cfg, tok = train.build_model_config(cfg)
dataset, collate_fn = train.build_train_data(cfg, clip_cfg.patch_size, tok)
loader = iter(data.make_loader(dataset, collate_fn, cfg.batch_size, 1, 0, cfg.grad_accum, cfg.seed, 0, 2))
pt, opt, teacher = train.build_student(cfg, clip_cfg, device)
model, features_fn = train.wrap_student(pt, cfg, 2, 0, device)   # world 2: wrapped in DDP, as under torchrun
print("stem weight strides:", [tuple(m.weight.stride()) for m in pt.clip.visual.stem if isinstance(m, torch.nn.Conv2d)])
for step in range(3):
    batches = []
    for a in range(cfg.grad_accum):
        b = next(loader)
        b.pop("skipped")
        batches.append(train.prepare_batch(b, cfg, tok, clip_cfg.patch_size, step, a * 32, device, trim=False))
    terms = train.train_step(model, pt, teacher, opt, batches, step, cfg, clip.autocast_for(device), 1, features_fn)
    print("step", step, "loss", float(terms["loss"]))
dist.destroy_process_group()
EOF
  echo "$layout: exit $?, warnings: $(grep -c 'Grad strides do not match' "$OUT/2_ddp_$layout.log")" | tee -a "$OUT/2_ddp_summary.txt"
done

echo "== 3. SILC at 224 px: train.py end to end against the step alone"
timeout 120 python -c "
from experiments.loaderbench import make_shards
print(make_shards('/tmp/gpu_check_shards', 500, 375, 1024, 16))" | tee "$OUT/3_shards.txt"
SILC="--model=B/16 --image_size=224 --n_local_crops=8 --head_hidden=2048 --head_bottleneck=256 --head_out=65536"
timeout 240 python -m experiments.bench --sizes=B/16 --methods=silc --batch_size=256 --compile=compiled \
    --steps=10 --warmup=3 --open_clip=off --n_local_crops=8 --head_hidden=2048 --head_bottleneck=256 \
    --head_out=65536 --out="$OUT/3_step_alone.json" > "$OUT/3_step_alone.log" 2>&1
tail -3 "$OUT/3_step_alone.log"
timeout 240 python train.py $SILC --method=silc --batch_size=256 --compile=True --steps=90 --log_interval=10 \
    --eval=False --num_workers=14 --data=/tmp/gpu_check_shards --crops=device --out_dir="$OUT/3_train_device" \
    > "$OUT/3_train_device.log" 2>&1
python -c "
import json, sys
rows = [json.loads(l) for l in open('$OUT/3_train_device/log.jsonl') if '\"loss\"' in l]
sps = [r['samples_per_s'] for r in rows if r['step'] > 20]
print('train.py, crops on the device: samples/s after step 20:', [round(s) for s in sps])
print('step alone:', round(json.load(open('$OUT/3_step_alone.json'))['results'][0]['samples_per_s']))
" 2>&1 | tee "$OUT/3_summary.txt"

echo "== 4. the loader alone, this machine's cores"
timeout 200 python -m experiments.loaderbench --device=cuda --views=silc --photos=500x375,1024x768 \
    --pipelines=workers,device --workers=1,14 --batch_size=64 --batches=6 --decode_repeats=2 \
    --out="$OUT/4_loaderbench.json" > "$OUT/4_loaderbench.log" 2>&1
tail -25 "$OUT/4_loaderbench.log"
echo "done: $OUT"
