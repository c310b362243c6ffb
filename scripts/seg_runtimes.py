"""Runtimes for a segmentation checkpoint side by side: mIoU and AP@0.5 on the held-out test clips, and speed.

    flock /tmp/heavy.lock .venv/bin/python scripts/seg_runtimes.py \\
        --checkpoint checkpoints/vit_seg_tiny-moving_fmnist.pt --docs

1. Accuracy: the checkpoint's test clips (its recipe's clip knobs, test-split garments: what `python -m training
   eval` scores) through SegmentPipeline.forward per runtime (eager, onnx, int8, bf16 by default), scored with
   training.seg_eval.SegMetrics (torchmetrics mIoU, AP@0.5 of the component boxes); delta vs eager and the share of
   pixels whose label equals eager's.
2. Speed: the model forward at batch `--batch` on a fixed normalized batch, every runtime round-robin in one
   process, `--reps` times, medians; the load average before and after.
Prints Markdown and the verdict for int8 (does it hold the mIoU budget?); writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from handlers.runtimes import file_sha256  # noqa: E402
from handlers.segment import SegmentPipeline  # noqa: E402
from scripts.video_docs import publish  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402
from training.clips import make_config  # noqa: E402
from training.presets import eval_batch  # noqa: E402
from training.seg_data import test_set  # noqa: E402
from training.seg_eval import SegMetrics  # noqa: E402

MIOU_BUDGET = 0.005  # int8 is served where it loses at most half a point of mIoU against eager


def accuracy(pipes: dict[str, SegmentPipeline], ckpt: dict[str, Any], batch: int) -> dict[str, dict[str, Any]]:
    recipe = ckpt.get("recipe") or {}
    frames = test_set(make_config(recipe.get("data_args")), int(ckpt["preprocess"]["size"]), batch,
                      recipe.get("data_root"))
    metrics = {name: SegMetrics(ckpt["classes"], detections=True) for name in pipes}
    same, pixels = dict.fromkeys(pipes, 0), 0
    with torch.inference_mode():
        for i in range(0, len(frames.frames), batch):
            x = eval_batch(frames.frames[i:i + batch], ckpt["preprocess"])
            masks, inst = frames.masks[i:i + batch].long(), frames.instances[i:i + batch].long()
            labels = {}
            for name, pipe in pipes.items():
                logits = pipe.forward(x)
                metrics[name].update(logits, masks, inst)
                labels[name] = logits.argmax(1)
            pixels += labels["eager"].numel()
            for name in pipes:
                same[name] += int((labels[name] == labels["eager"]).sum())
    out = {}
    for name, m in metrics.items():
        r = m.compute()
        out[name] = {"miou": round(r["miou"], 4), "miou_objects": round(r["miou_objects"], 4),
                     "ap50": round(r["ap50"], 4), "same_label_as_eager": round(same[name] / pixels, 5)}
    return {"frames": len(frames.frames), "clips": len(frames.frames) // max(1, make_config(
        recipe.get("data_args")).clip_frames), "runtimes": out}


def speed(pipes: dict[str, SegmentPipeline], size: int, batch: int, reps: int) -> dict[str, float]:
    x = torch.randn(batch, 3, size, size)
    times: dict[str, list[float]] = {name: [] for name in pipes}
    with torch.inference_mode():
        for pipe in pipes.values():
            pipe.forward(x)
        for _ in range(reps):
            for name, pipe in pipes.items():
                t0 = time.perf_counter()
                pipe.forward(x)
                times[name].append(time.perf_counter() - t0)
    return {name: round(batch / statistics.median(t), 1) for name, t in times.items()}


def markdown(r: dict[str, Any]) -> str:
    acc, fps = r["accuracy"]["runtimes"], r["speed_fps"]
    eager = acc["eager"]
    lines = [f"| runtime | mIoU | Δ pt | mIoU objects | AP@0.5 | same label as eager | frames/s batch {r['batch']} | "
             "× eager |", "|" + "---|" * 8]
    for name, a in acc.items():
        lines.append(f"| {name} | {a['miou']:.4f} | {100 * (a['miou'] - eager['miou']):+.2f} | {a['miou_objects']:.4f}"
                     f" | {a['ap50']:.4f} | {100 * a['same_label_as_eager']:.2f} % | {fps[name]:.1f} | "
                     f"{fps[name] / fps['eager']:.2f} |")
    if "int8" in acc:
        loss = eager["miou"] - acc["int8"]["miou"]
        verdict = "holds" if loss <= MIOU_BUDGET else "does not hold"
        weak = (f" The check is only as telling as the model: eager's own mIoU is {eager['miou']:.3f} (goal 0.85); "
                "rerun it with a better checkpoint." if eager["miou"] < 0.5 else "")
        lines += ["", f"Verdict: int8 {verdict} the mIoU budget of {100 * MIOU_BUDGET:.1f} pt (Δ {-100 * loss:+.2f} "
                  f"pt) at {fps['int8'] / fps['eager']:.2f}× eager's frames/s.{weak}"]
    lines += ["", f"Measured {r['date'][:16].replace('T', ' ')} UTC: `{r['arch']}` from `{r['checkpoint']}` at "
              f"{r['size']} px, {r['accuracy']['frames']} test frames; forward at batch {r['batch']}, {r['threads']} "
              f"thread(s), median of {r['reps']} round-robin passes, on {r['cpus']} cores ({r['machine']}), torch "
              f"{r['torch']}. Load average (1 min) {r['load_before'][0]} before, {r['load_after'][0]} after (its own "
              "threads included)" + (": other jobs (niced training) ran beside it." if r["load_before"][0] > 1
                                     else "; nothing else ran beside it.")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--runtimes", default="eager,onnx,int8,bf16", help="comma list; eager first (the reference)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "video_runtimes.json")
    p.add_argument("--docs", action="store_true", help="also docs/video_runtimes.json and its block in video.md")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ckpt = load_checkpoint(a.checkpoint, map_location="cpu")
    names = a.runtimes.split(",")
    if names[0] != "eager":
        raise SystemExit("--runtimes must start with eager (the reference)")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as cache:
        sha = file_sha256(a.checkpoint)
        pipes = {name: SegmentPipeline(ckpt, runtime=name, runtime_cache=cache, checkpoint_sha256=sha,
                                       max_batch=a.batch) for name in names}
        result: dict[str, Any] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "checkpoint": str(a.checkpoint),
            "checkpoint_sha256": sha, "arch": ckpt["arch"], "size": ckpt["preprocess"]["size"],
            "checkpoint_metrics": {k: v for k, v in (ckpt.get("metrics") or {}).items() if not isinstance(v, dict)},
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": a.threads,
            "torch": torch.__version__, "batch": a.batch, "reps": a.reps,
            "runtime_info": {n: {k: v for k, v in p.runtime_info.items() if k != "file"} for n, p in pipes.items()},
            "load_before": [round(x, 2) for x in load_before]}
        result["speed_fps"] = speed(pipes, int(ckpt["preprocess"]["size"]), a.batch, a.reps)
        result["accuracy"] = accuracy(pipes, ckpt, a.batch)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    publish(result, a.out, "video-runtimes", markdown(result), a.docs)
    print(f"\nload average {result['load_before'][0]} before, {result['load_after'][0]} after; JSON: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
