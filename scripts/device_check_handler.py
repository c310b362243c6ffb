"""Device check for the serving pipeline: ResNet-50 @ 224 on one GPU, the model alone vs JPEG bytes -> top-5.

For a GPU machine with torch + torchvision + pillow and no TorchServe or Java (handlers.image imports no `ts`).
Random weights and synthetic 500x375 JPEGs, so it needs no files and no network. Prints one JSON object:
  model_img_s     (a) forward only, bf16 autocast + channels_last, batch `--batch`, random input on the GPU
  pipeline_img_s  (b) ImagePipeline.handle_requests: `--batch` raw-JPEG requests -> nvjpeg batch decode ->
                      eval_batch (grouped resize) -> forward -> softmax/top-5 -> per-request JSON bodies
  stages_ms       decode / preprocess / forward per batch, measured separately
plus sanity checks (every answer 200; a corrupt item gets its own 400; GPU vs CPU probabilities).

    python3 scripts/device_check_handler.py                 # on the GPU box
    python scripts/device_check_handler.py --device cpu --batch 4 --iters 1 --warmup 0   # smoke test
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handlers.image import ImagePipeline  # noqa: E402
from training.models import get_model  # noqa: E402
from training.presets import eval_batch, make_preprocess  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def synthetic_jpegs(n: int, w: int = 500, h: int = 375, quality: int = 90) -> list[bytes]:
    """Photo-like JPEGs (gradients, blobs, mild noise) so the decoder does realistic work."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(40, 200)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        chans = [np.sin(x / rng.uniform(20, 90) + i) * 60 + 120 + blob * rng.uniform(-90, 90) for _ in range(3)]
        a = np.clip(np.stack(chans, -1) + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a, "RGB").save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def seconds_per_call(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> float:
    """Median wall time of `fn` after warm-up calls; CUDA work is synchronized before each clock read."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--distinct", type=int, default=64, help="distinct JPEGs, cycled to fill a batch")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)
    model_args = {"num_classes": 1000, "in_channels": 3, "img_size": 224}
    ckpt = {"arch": args.arch, "model_args": model_args, "state_dict": get_model(args.arch, **model_args).state_dict(),
            "classes": [f"class{i:04d}" for i in range(1000)], "metrics": {}, "recipe": {},
            "preprocess": make_preprocess(224, 3, IMAGENET_MEAN, IMAGENET_STD, resize=256)}
    pipe = ImagePipeline(ckpt, device, topk=5, max_images_per_request=args.batch, max_batch=args.batch)
    jpegs = synthetic_jpegs(min(args.distinct, args.batch))
    batch_jpegs = [jpegs[i % len(jpegs)] for i in range(args.batch)]
    requests = [{"data": d} for d in batch_jpegs]

    # (a) the model alone
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    with torch.inference_mode():
        t_forward = seconds_per_call(lambda: pipe.forward(x), args.iters, args.warmup, device)
    # (b) the whole pipeline, bytes in, JSON-ready bodies out
    t_pipeline = seconds_per_call(lambda: pipe.handle_requests(requests), args.iters, args.warmup, device)
    # stages, one at a time
    decoded = pipe.decode(batch_jpegs)
    t_decode = seconds_per_call(lambda: pipe.decode(batch_jpegs), args.iters, args.warmup, device)
    t_pre = seconds_per_call(lambda: eval_batch(decoded, pipe.preprocess, device=device), args.iters, args.warmup,
                             device)

    answers = pipe.handle_requests(requests)
    mixed = pipe.handle_requests([requests[0], {"data": jpegs[0][:1000]}, {"data": b"not an image"}, requests[1]])
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "torchvision": __import__("torchvision").__version__,
        "arch": args.arch, "batch": args.batch, "image": "500x375 JPEG q90", "jpeg_decoder": pipe.jpeg_decoder,
        "model_img_s": round(args.batch / t_forward, 1),
        "pipeline_img_s": round(args.batch / t_pipeline, 1),
        "pipeline_over_model": round(t_forward / t_pipeline, 3),
        "decode_img_s": round(args.batch / t_decode, 1),
        "stages_ms": {"decode": round(t_decode * 1e3, 2), "preprocess": round(t_pre * 1e3, 2),
                      "forward": round(t_forward * 1e3, 2), "pipeline_total": round(t_pipeline * 1e3, 2)},
        "all_200": all(status == 200 for status, _ in answers),
        "bad_items_isolated": [status for status, _ in mixed] == [200, 400, 400, 200],
    }
    if device.type == "cuda":  # the same images through the CPU path (PIL + draft, fp32)
        cpu = ImagePipeline(ckpt, "cpu", topk=1000)
        gpu_all = ImagePipeline(ckpt, device, topk=1000)
        diffs = []
        for (_, c), (_, g) in zip(cpu.handle_requests(requests[:4]), gpu_all.handle_requests(requests[:4])):
            pc = {p["index"]: p["probability"] for p in c["predictions"]}
            diffs.append(max(abs(p["probability"] - pc[p["index"]]) for p in g["predictions"]))
        report["cpu_vs_gpu_max_prob_diff"] = max(diffs)
        report["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
