"""Compile time and step time of one UNet's forward + backward per `--compile_scope` (issue 4).

The student's training graph alone: SD 1.5's layout (random weights; `--width` scales its channels), cross-attention
width 768, one process per scope so each starts from an empty inductor cache (pass TORCHINDUCTOR_CACHE_DIR to reuse
one). Prints the first call (dynamo + inductor compile, forward and backward) and the median of the later calls.

    python benchmarks/compile_scope.py --scope eager|unet|blocks [--width 0.4] [--latent 16] [--batch 2] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))  # cold unless given

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from tcdistill.bench_assets import SD15_UNET  # noqa: E402
from tcdistill.models import REGIONAL_BLOCKS, compile_blocks  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scope", choices=["eager", "unet", "blocks"], required=True)
    p.add_argument("--width", type=float, default=0.4, help="Channel scale of SD 1.5's (320, 640, 1280, 1280); multiples of 32 after scaling.")
    p.add_argument("--latent", type=int, default=16, help="Latent side (pixels / 8).")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="Timed calls after the first.")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    # SD 1.5's UNet, its widths scaled by --width (multiples of the 32 GroupNorm groups)
    channels = tuple(int(c * args.width) // 32 * 32 for c in SD15_UNET["block_out_channels"])
    unet = UNet2DConditionModel(**{**SD15_UNET, "block_out_channels": channels}, sample_size=args.latent).to(dev)
    if args.scope == "unet":
        unet.compile(dynamic=False)
    elif args.scope == "blocks":
        compile_blocks(unet, "default")
    regions = sum(type(m).__name__ in REGIONAL_BLOCKS for m in unet.modules()) if args.scope == "blocks" else int(args.scope == "unet")
    x = torch.randn(args.batch, 4, args.latent, args.latent, device=dev)
    t = torch.randint(0, 1000, (args.batch,), device=dev)
    cond = torch.randn(args.batch, 77, SD15_UNET["cross_attention_dim"], device=dev)

    def call() -> float:
        start = time.perf_counter()
        unet(x, t, cond, return_dict=False)[0].square().mean().backward()
        unet.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start

    first = call()
    times = [call() for _ in range(args.steps)]
    print(f"scope {args.scope}: channels {channels}, latent {args.latent}, batch {args.batch}, compiled regions {regions}; "
          f"first call {first:.1f} s; later calls median {1000 * statistics.median(times):.0f} ms "
          f"(min {1000 * min(times):.0f}, max {1000 * max(times):.0f})")


if __name__ == "__main__":
    main()
