"""Runs train.main() for several configurations in one process, under torchrun or alone, for
tests/test_train.py: the whole training loop (data order, masks, teacher, centres, optimizer,
checkpoints) on 1 process and on 2 (gloo, CPU), compared on the same global batch.

Usage: python tests/ddp_train_worker.py OUT_DIR CASES_JSON
       torchrun --nproc_per_node=2 tests/ddp_train_worker.py OUT_DIR CASES_JSON
CASES_JSON: a list of {"name", "args" (train.py flags), "ddp_args" (extra flags with 2 processes),
"nan_at_call" (optional: the forward call, counted from 0, at which rank 1's loss becomes NaN),
"float64" (optional: the whole run in double precision, model and batches, so that rounding cannot
hide or fake a difference)}.
Writes OUT_DIR/<name>/ (train.py's out_dir), OUT_DIR/<name>/grads_rank<r>.pt (every gradient at the
first optimizer step, after clipping, as the optimizer sees it) and OUT_DIR/<name>/exit_rank<r>.json.

The process group is set up once here; train.main() uses it as it finds it (setup_distributed).
"""
import json
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402


def run_case(case, out_dir, rank, world):
    run_dir = os.path.join(out_dir, case["name"])
    grads = {}
    make_optimizer = train.make_optimizer

    def recording_optimizer(model, cfg, device):
        opt = make_optimizer(model, cfg, device)
        names = {id(p): n for n, p in model.named_parameters()}

        def hook(optimizer, args, kwargs):
            if not grads:   # the first step only
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            grads[names[id(p)]] = p.grad.detach().clone()
        opt.register_step_pre_hook(hook)
        return opt

    forward = train.Pretrainer.forward
    calls = [0]

    def maybe_nan_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if rank == 1 and calls[0] == case.get("nan_at_call"):   # as a diverged contrastive loss would
            out["contrastive"] = out["contrastive"] * float("nan")
            out["loss"] = out["loss"] * float("nan")
        calls[0] += 1
        return out

    prepare_batch = train.prepare_batch

    def float64_batch(*args, **kwargs):
        batch = prepare_batch(*args, **kwargs)
        return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}

    train.make_optimizer, train.Pretrainer.forward = recording_optimizer, maybe_nan_forward
    dtype = torch.get_default_dtype()
    if case.get("float64"):
        torch.set_default_dtype(torch.float64)     # every parameter and buffer is built in float64
        train.prepare_batch = float64_batch
    code = 0
    try:
        train.main(case["args"] + (case.get("ddp_args", []) if world > 1 else []) + [f"--out_dir={run_dir}"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        train.make_optimizer, train.Pretrainer.forward = make_optimizer, forward
        train.prepare_batch = prepare_batch
        torch.set_default_dtype(dtype)
    torch.save(grads, os.path.join(run_dir, f"grads_rank{rank}.pt"))
    with open(os.path.join(run_dir, f"exit_rank{rank}.json"), "w") as f:
        json.dump({"code": code}, f)


def main():
    out_dir, cases = sys.argv[1], json.load(open(sys.argv[2]))
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    for case in cases:
        run_case(case, out_dir, rank, world)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
