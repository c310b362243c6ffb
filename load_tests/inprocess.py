"""The benchmark's model and its in-process measurements: (a) model forward, (b) our handler pipeline.

Both run through one `ImagePipeline(runtime=...)`, so (a) times the model exactly as the runtime prepared it
and a later runtime (compile, ONNX, bf16, int8) shows up in (a), (b) and the server alike.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from load_tests.report import percentiles

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def bench_checkpoint(path: str | Path, arch: str = "resnet18", img_size: int = 224, num_classes: int = 10,
                     seed: int = 0) -> dict[str, Any]:
    """Random-but-seeded weights saved as our checkpoint. Preprocess = the stock handler's hard-coded one
    (shorter side 256, centre crop 224, ImageNet mean/std), so (c) and (d) do the same work per image."""
    from training.checkpoint import save_checkpoint
    from training.data import FASHION_MNIST_CLASSES
    from training.models import get_model
    from training.presets import make_preprocess

    torch.manual_seed(seed)
    args = {"num_classes": num_classes, "in_channels": 3, "img_size": img_size}
    model = get_model(arch, **args).eval()
    classes = list(FASHION_MNIST_CLASSES) if num_classes == 10 else [f"class{i}" for i in range(num_classes)]
    ckpt = {"arch": arch, "model_args": args, "state_dict": model.state_dict(), "classes": classes,
            "preprocess": make_preprocess(img_size, 3, IMAGENET_MEAN, IMAGENET_STD, resize=round(img_size * 256 / 224)),
            "metrics": {"note": "random weights for benchmarking", "seed": seed},
            "recipe": {"name": "bench-random-weights", "seed": seed}}
    save_checkpoint(ckpt, path)
    return ckpt


def bench_seg_checkpoint(path: str | Path, arch: str = "vit_seg_tiny", img_size: int = 224, seed: int = 0,
                         **model_args: Any) -> dict[str, Any]:
    """A random-but-seeded segmentation checkpoint as training writes one (classes with background first, the
    whole frame resized, the clip generator's mean/std); `model_args` shrink it (the --quick run)."""
    from training.checkpoint import save_checkpoint
    from training.clips import CLASSES, MEAN, STD
    from training.models import get_model
    from training.presets import make_preprocess

    torch.manual_seed(seed)
    args = {"num_classes": len(CLASSES), "in_channels": 3, "img_size": img_size, **model_args}
    model = get_model(arch, **args).eval()
    ckpt = {"arch": arch, "model_args": args, "state_dict": model.state_dict(), "classes": list(CLASSES),
            "task": "segmentation", "preprocess": make_preprocess(img_size, 3, MEAN, STD, crop=False),
            "metrics": {"note": "random weights for benchmarking", "seed": seed},
            "recipe": {"name": "bench-random-weights", "seed": seed}}
    save_checkpoint(ckpt, path)
    return ckpt


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def time_calls(fn: Callable[[], Any], items: int, seconds: float, min_calls: int = 3,
               warmup: int = 1) -> dict[str, Any]:
    """Call fn repeatedly for about `seconds` (at least min_calls times, after `warmup` untimed calls).
    fn may return an error count. img/s = items * calls / wall time; latency is per call."""
    for _ in range(warmup):
        fn()
    lat, errors = [], 0
    c0, t0 = _cpu_s(), time.perf_counter()
    while len(lat) < min_calls or time.perf_counter() - t0 < seconds:
        s = time.perf_counter()
        errors += int(fn() or 0)
        lat.append((time.perf_counter() - s) * 1000)
    wall = time.perf_counter() - t0
    return {"batch": items, "calls": len(lat), "errors": errors, "img_s": round(items * len(lat) / wall, 2),
            **percentiles(lat), "cpu_pct": round(100 * (_cpu_s() - c0) / wall, 0)}


def _batch_of(images: Sequence[bytes], n: int, offset: int = 0) -> list[bytes]:
    return list(itertools.islice(itertools.cycle(images), offset, offset + n))


def measure_forward(pipe: Any, images: Sequence[bytes], batch_sizes: Sequence[int],
                    seconds: float) -> list[dict[str, Any]]:
    """(a) the model alone on an already preprocessed batch (real images, decoded and normalized once)."""
    from training.presets import eval_batch

    decoded = pipe.decode(_batch_of(images, max(batch_sizes)))
    bad = [d for d in decoded if not isinstance(d, torch.Tensor)]
    if bad:
        raise RuntimeError(f"benchmark images failed to decode: {bad[0]}")
    full = eval_batch(decoded, pipe.preprocess, device=pipe.device)
    out = []
    for b in batch_sizes:
        x = full[:b].contiguous()

        def run(x: torch.Tensor = x) -> int:
            with torch.inference_mode():
                pipe.forward(x)
            return 0

        out.append(time_calls(run, b, seconds))
    return out


def measure_pipeline(pipe: Any, images: Sequence[bytes], batch_sizes: Sequence[int],
                     seconds: float) -> list[dict[str, Any]]:
    """(b) what one TorchServe batch costs in the handler: one request item per image, bytes -> top-k bodies."""
    out = []
    for b in batch_sizes:
        def run(b: int = b, offset: Any = itertools.count(0, b)) -> int:  # a fresh slice of images per call
            items = [{"body": data} for data in _batch_of(images, b, next(offset) % len(images))]
            return sum(status != 200 for status, _ in pipe.handle_requests(items))

        out.append(time_calls(run, b, seconds))
    return out


def _layout_worker(model_dir: str, checkpoint: str, runtime: str, threads: int, images: list[bytes], batch: int,
                   seconds: float, barrier: Any, out: Any) -> None:
    """One process of measure_layout: the archived model as a worker loads it, then (b) at one batch size."""
    torch.set_num_threads(threads)
    from handlers.image import ImagePipeline

    pipe = ImagePipeline.from_file(Path(model_dir) / checkpoint, runtime=runtime, artifact="artifact.json",
                                   cpu_threads=threads, topk=5)
    measure_pipeline(pipe, images, [batch], 0.5)  # warm-up
    barrier.wait()  # all processes measure at the same time, as the server's workers do
    out.put(measure_pipeline(pipe, images, [batch], seconds)[0])


def measure_layout(model_dir: Path, checkpoint: str, runtime: str, images: Sequence[bytes], workers: int,
                   threads: int, batch: int, seconds: float) -> dict[str, Any]:
    """(b) with the server's layout: `workers` processes of `threads` threads each run the archived pipeline at the
    server's batch size side by side; img/s is their sum. What the server's workers could do without TorchServe."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_layout_worker, args=(str(model_dir), checkpoint, runtime, threads, list(images),
                                                      batch, seconds, barrier, out)) for _ in range(workers)]
    for proc in procs:
        proc.start()
    points = [out.get(timeout=seconds + 600) for _ in procs]
    for proc in procs:
        proc.join(60)
    return {"batch": batch, "workers": workers, "threads": threads,
            "img_s": round(sum(p["img_s"] for p in points), 2), "errors": sum(p["errors"] for p in points),
            "calls": sum(p["calls"] for p in points), "p50_ms": max(p["p50_ms"] for p in points),
            "p99_ms": max(p["p99_ms"] for p in points), "processes": points}
