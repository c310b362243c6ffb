"""The model zoo at a glance: parameters, FLOPs and CPU latency of the registered models.

    python -m training zoo                                  # 28 px, 1 channel (Fashion-MNIST), batch 1
    python -m training zoo --img-size 224 --in-channels 3   # ImageNet-sized input
    make zoo-seg    # segmentation models at 224 px, batch 8, fp32 and bf16 -> docs/seg_forward.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from training.models import get_model, list_models

DEFAULT_IMG_SIZE, DEFAULT_IN_CHANNELS = 28, 1  # every builder's default input (Fashion-MNIST)


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Forward FLOPs (a multiply-add counts 2). The math SDPA backend is forced while counting because the
    fused CPU attention kernel has no FLOP formula and would count as zero."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def cpu_latency_ms(model: torch.nn.Module, x: torch.Tensor, warmup: int = 2, reps: int = 5,
                   bf16: bool = False) -> float:
    """Median wall time of `reps` forward passes after `warmup` untimed ones (allocator and kernel choice);
    `bf16`: under CPU autocast to bfloat16."""
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(warmup + reps):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def zoo_table(img_size: int | None = None, threads: int = 2, in_channels: int | None = None,
              num_classes: int = 10, models: Sequence[str] | None = None, reps: int = 5, batch: int = 1,
              precisions: Sequence[str] = ("fp32",)) -> list[dict[str, Any]]:
    """One row per model and precision: name, params_m, gflops (per image), latency_ms of a forward at `batch`
    (eval mode, `threads` threads) and images_per_s."""
    size = img_size or DEFAULT_IMG_SIZE
    channels = in_channels or DEFAULT_IN_CHANNELS
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for name in models or list_models("classification"):
            model = get_model(name, num_classes=num_classes, in_channels=channels, img_size=size).eval()
            x = torch.randn(batch, channels, size, size)
            info = {"name": name, "img_size": size, "in_channels": channels, "batch": batch,
                    "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                    "gflops": count_flops(model, x[:1]) / 1e9}
            for precision in precisions:
                ms = cpu_latency_ms(model, x, reps=reps, bf16=precision == "bf16")
                rows.append({**info, "precision": precision, "latency_ms": ms, "images_per_s": 1000 * batch / ms})
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    batch = rows[0]["batch"] if rows else 1
    lines = [f"{'model':<20}{'precision':>10}{'params (M)':>12}{'GFLOPs':>10}{f'CPU ms (b={batch})':>15}{'img/s':>9}"]
    lines += [f"{r['name']:<20}{r['precision']:>10}{r['params_m']:>12.2f}{r['gflops']:>10.3f}{r['latency_ms']:>15.1f}"
              f"{r['images_per_s']:>9.1f}" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=None, help=f"input side in px (default {DEFAULT_IMG_SIZE})")
    parser.add_argument("--in-channels", type=int, default=None,
                        help=f"input channels (default {DEFAULT_IN_CHANNELS})")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for the latency runs")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per model (median is reported)")
    parser.add_argument("--batch", type=int, default=1, help="images per forward (default 1)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="fp32 and/or bf16 (CPU autocast)")
    parser.add_argument("--json", help="also write the rows, hardware and load average to this JSON file")
    parser.add_argument("--models", nargs="+", choices=list_models(), metavar="NAME",
                        help="only these models (default: every classifier; segmentation models by name, "
                             "e.g. --models vit_seg_tiny --img-size 224 --in-channels 3)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    rows = zoo_table(img_size=args.img_size, threads=args.threads, in_channels=args.in_channels,
                     num_classes=args.num_classes, models=args.models, reps=args.reps, batch=args.batch,
                     precisions=args.precision)
    size = rows[0]["img_size"] if rows else args.img_size
    channels = rows[0]["in_channels"] if rows else args.in_channels
    print(f"input {args.batch}x{channels}x{size}x{size}, {args.threads} CPU threads, median of {args.reps} runs")
    print(format_table(rows))
    if args.json:
        report = {"rows": rows, "threads": args.threads, "reps": args.reps, "torch": torch.__version__,
                  "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                  "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
                  "what": "bare model forward, eval mode, random input, no decode/preprocess/post-process"}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
