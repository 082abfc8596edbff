"""Activation memory and time of the student's forward + backward per gradient-checkpointing policy.

The SD 1.5 UNet architecture with random weights (nothing downloaded; `--width-divisor 2` halves every block's
channels so a CPU box runs 512 px in seconds), fp32 weights, optionally under autocast as the trainer runs it. Each
policy runs in its own process, so each peak is its own: after a first (warmup) step, the peak above the memory held
before the step (weights, gradients) is the step's activations and temporaries: CUDA max allocated, or on CPU the
peak RSS (reset through /proc/self/clear_refs after glibc's freed heap is handed back). The ops row counts the ops
one step dispatches (on a GPU, about one kernel launch each): recomputation adds them.

    python benchmarks/checkpointing.py --resolution 512 --batch 1 --width-divisor 2          # CPU, ~4 min
    python benchmarks/checkpointing.py --resolution 512 --batch 12 --mixed_precision bf16     # GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

POLICIES = ("none", "full", "selective")


def measure(policy: str, args: argparse.Namespace) -> dict[str, float]:
    """Time and peak of `args.steps` forward + backward steps of the UNet under `policy` (this process)."""
    from diffusers import UNet2DConditionModel

    from tcdistill.bench_assets import SD15_UNET
    from tcdistill.models import DTYPES, enable_gradient_checkpointing
    from tcdistill.timing import OpCounter, held_memory, peak_memory, reset_peak_memory, trim_heap

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = dict(SD15_UNET, block_out_channels=[c // args.width_divisor for c in SD15_UNET["block_out_channels"]])
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device).train()
    if policy != "none":
        enable_gradient_checkpointing(unet, policy)
    lat = args.resolution // 8
    x = torch.randn(args.batch, 4, lat, lat, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    cond = torch.randn(args.batch, 77, config["cross_attention_dim"], device=device)
    dtype = DTYPES.get(args.mixed_precision)  # "no" -> None: autocast off

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = unet(x, t, cond).sample
        held_memory(device)  # synchronises CUDA
        t1 = time.perf_counter()
        out.float().square().mean().backward()
        held_memory(device)
        unet.zero_grad(set_to_none=False)  # the gradients stay allocated: the peak below is the step's own
        return t1 - t0, time.perf_counter() - t1

    step()  # warmup: allocates the gradients
    with OpCounter() as ops:
        step()
    trim_heap()
    reset_peak_memory(device)
    held = held_memory(device)
    times = [step() for _ in range(args.steps)]
    return dict(policy=policy, fwd_ms=1000 * min(f for f, _ in times), bwd_ms=1000 * min(b for _, b in times),
                step_peak_mib=(peak_memory(device)[0] - held) / 2**20, ops=ops.count, device=str(device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--width-divisor", dest="width_divisor", type=int, default=1, help="Divide every block's channels (2: a quarter of the FLOPs).")
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--steps", type=int, default=2, help="Timed steps per policy (the fastest is reported).")
    p.add_argument("--policy", choices=POLICIES, default=None, help="Run one policy in this process and print its JSON (the driver's child).")
    args = p.parse_args()
    from tcdistill.bench_assets import SD15_UNET

    if any((c // args.width_divisor) % SD15_UNET.get("norm_num_groups", 32) for c in SD15_UNET["block_out_channels"]):
        raise SystemExit(f"--width-divisor {args.width_divisor}: the channels must stay multiples of the 32 GroupNorm groups (use 1, 2 or 5)")
    if args.policy:
        print(json.dumps(measure(args.policy, args)))
        return
    rows = []
    for policy in POLICIES:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--policy", policy], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"policy {policy} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"SD 1.5 UNet / {args.width_divisor}, {args.resolution} px, batch {args.batch}, mixed_precision {args.mixed_precision}, {base['device']}")
    print(f"{'policy':<10} {'fwd ms':>9} {'bwd ms':>9} {'fwd+bwd':>8} {'step peak MiB':>14} {'vs none':>8} {'ops/step':>9}")
    for r in rows:
        total = (r["fwd_ms"] + r["bwd_ms"]) / (base["fwd_ms"] + base["bwd_ms"])
        print(f"{r['policy']:<10} {r['fwd_ms']:>9.0f} {r['bwd_ms']:>9.0f} {total:>7.2f}x {r['step_peak_mib']:>14.0f} "
              f"{r['step_peak_mib'] / base['step_peak_mib']:>7.2f}x {r['ops']:>9}")


if __name__ == "__main__":
    main()
