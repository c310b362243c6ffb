"""Segmentation speeds on this machine, the figures docs/video.md and docs/training.md quote:

1. bare model forward of every segmentation model at 224 px, batch 8, fp32 and bf16 (CPU autocast), eval mode
   (training.zoo: median of --reps, random input: no decode, preprocess or post-process);
2. the clip generator: training frames (224 px, batches of 32) drawn per second;
3. a training step (forward + backward + AdamW, batch 32, bf16 autocast) of vit_seg_tiny and resnet18_seg,
   and the generator's share of it.

    make seg-speed           # -> docs/seg_speed.json (run it under the heavy lock on a quiet machine)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from training.clips import ClipConfig, frame_batch, split_generator  # noqa: E402
from training.models import get_model, list_models  # noqa: E402
from training.presets import make_preprocess, normalize  # noqa: E402
from training.seg_eval import SegmentationLoss  # noqa: E402
from training.zoo import format_table, zoo_table  # noqa: E402

SIZE = 224


def generator_rate(batch: int, reps: int) -> float:
    """Training frames drawn per second (median over reps batches)."""
    cfg, times = ClipConfig(), []
    frame_batch(split_generator(0, "train", 0), batch, "train", (SIZE, SIZE), cfg)  # loads the garment pool
    for i in range(reps):
        start = time.perf_counter()
        frame_batch(split_generator(0, "train", i + 1), batch, "train", (SIZE, SIZE), cfg)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def train_step_rate(arch: str, batch: int, reps: int) -> float:
    """Frames per second of forward + backward + AdamW step (bf16 autocast), median over reps steps."""
    model = get_model(arch).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = SegmentationLoss(dice_weight=0.5)
    pre = make_preprocess(SIZE, 3, [0.5] * 3, [0.25] * 3, crop=False)
    frames, masks = frame_batch(split_generator(0, "train", 0), batch, "train", (SIZE, SIZE), ClipConfig())
    x = normalize(frames, pre)
    times = []
    for i in range(reps + 1):  # the first step warms up (allocator, kernel choice)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x).float(), masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="docs/seg_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    forward = zoo_table(img_size=SIZE, threads=args.threads, in_channels=3, num_classes=11,
                        models=list_models("segmentation"), reps=args.reps, batch=8, precisions=("fp32", "bf16"))
    print(format_table(forward))
    gen = generator_rate(32, args.reps)
    print(f"generator: {gen:.0f} training frames/s ({SIZE} px, batches of 32)")
    steps = {}
    for arch in ("vit_seg_tiny", "resnet18_seg"):
        rate = train_step_rate(arch, 32, args.reps)
        steps[arch] = {"frames_per_s": rate, "generator_share": rate / (rate + gen)}
        print(f"train step {arch}: {rate:.1f} frames/s (bf16, batch 32); the generator would add "
              f"{100 * steps[arch]['generator_share']:.1f} % to each step")
    report = {"forward_batch8": forward, "generator_frames_per_s": gen, "train_step_batch32_bf16": steps,
              "threads": args.threads, "reps": args.reps, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_avg_before": load_before, "load_avg_after": os.getloadavg()}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} (load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
