"""Device check for video segmentation: the serving pipeline (handlers/segment.py) in-process on one GPU.

For a GPU machine with torch + torchvision + onnxruntime (CPU) + opencv-python-headless and no TorchServe, PyAV,
torchcodec or TensorRT: clips are decoded with OpenCV instead of the handler's PyAV decoder (same sampling and
unit flow, see `CvClip`); everything after decoding is the serving code. Clips: H.264 MP4 files written here by
the generator (`make clips` -> data/clips), carried to the GPU machine. Prints one JSON object (and writes --out):

  environment   torch/CUDA/GPU, which optional modules import (scipy, pycocotools, torch_tensorrt, av, ...)
  decode        OpenCV decode alone, frames/s (one thread)
  forward       per runtime: the model alone at batch --max-batch, frames/s
  end_to_end    per runtime: SegmentPipeline.handle_requests over all clips at once (OpenCV decode -> GPU
                preprocess -> forward -> labels at frame size -> detections -> masks), frames/s and seconds per stage
  agreement     share of pixels whose label equals the CPU fp32 answer, per runtime (first clip, 32 frames)

    python3 scripts/device_check_video.py --clips data/clips                      # on the GPU box
    python scripts/device_check_video.py --device cpu --arch vit_seg_tiny --runtimes eager --frames 32  # smoke test
Runtimes: bf16 (autocast + channels_last), compile (bf16 + torch.compile with CUDA graphs over batch buckets),
tensorrt (only when torch-tensorrt or ORT's TensorRT provider imports; reported as skipped otherwise).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from handlers.pipeline import Decoded  # noqa: E402
from handlers.segment import SegmentJob, SegmentPipeline, decode_mask  # noqa: E402
from handlers.video import Sampling  # noqa: E402
from training.models import get_model  # noqa: E402
from training.presets import make_preprocess  # noqa: E402

CLASSES = ["background", "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
OPTIONAL = ("scipy", "pycocotools", "cv2", "onnxruntime", "torch_tensorrt", "av", "torchcodec", "ts")


class CvClip:
    """An MP4 decoded by OpenCV with the interface SegmentPipeline uses of handlers.video.VideoClip."""

    def __init__(self, path: Path, max_frames: int | None = None):
        import cv2

        self.path, self.max_frames, self.truncated = path, max_frames, False
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise RuntimeError(f"OpenCV cannot open {path}")
        fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
        self.info = {"container": "mp4", "codec": "h264", "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                     "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), "fps": fps,
                     "frames": int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), "decoder": "opencv"}
        cap.release()

    def frames(self, sampling: Sampling, channels: int = 3) -> Iterator[Decoded]:
        import cv2

        cap = cv2.VideoCapture(str(self.path))
        index = taken = 0
        try:
            while self.max_frames is None or taken < self.max_frames:
                ok, bgr = cap.read()
                if not ok:
                    return
                if index % sampling.every == 0:
                    rgb = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)
                    taken += 1
                    yield Decoded(rgb, {"frame": index, "time": round(index / self.info["fps"], 6)})
                index += 1
        finally:
            cap.release()

    def close(self) -> None:
        pass


class CvPipeline(SegmentPipeline):
    """SegmentPipeline whose requests are MP4 paths decoded by OpenCV (no PyAV on the GPU machine)."""

    clip_frames: int | None = None

    def parse(self, item: Any) -> SegmentJob:
        job = SegmentJob([], masks=self.masks, min_area=self.min_area, sampling=Sampling())
        job.clip = CvClip(Path(item), self.clip_frames)  # type: ignore[assignment]
        job.units = job.clip.frames(job.sampling)
        return job


def opencv_detections() -> None:
    """Without scipy: the same components (8-connected, per class, min_area) from OpenCV, in SegmentPipeline."""
    import cv2

    import handlers.segment as segment

    def detect(labels, scores=None, min_area=64, classes=None):
        lab = labels.numpy().astype(np.uint8)
        conf = scores.numpy() if scores is not None else None
        out = []
        for k in [int(k) for k in np.unique(lab) if k > 0]:
            n, comp, stats, _ = cv2.connectedComponentsWithStats((lab == k).astype(np.uint8), connectivity=8)
            for i in range(1, n):
                x, y, w, h, area = stats[i]
                if area >= min_area:
                    score = float(conf[comp == i].mean()) if conf is not None else 1.0
                    out.append({"label": classes[k] if classes else k, "index": k, "score": score,
                                "box": [int(x), int(y), int(x + w), int(y + h)]})
        return sorted(out, key=lambda d: -d["score"])

    segment.masks_to_detections = detect


def checkpoint(arch: str, size: int, path: Path | None) -> dict[str, Any]:
    if path:
        from training.checkpoint import load_checkpoint

        return load_checkpoint(path, map_location="cpu")
    torch.manual_seed(0)
    args = {"img_size": size, "num_classes": len(CLASSES)}
    return {"arch": arch, "model_args": args, "state_dict": get_model(arch, **args).state_dict(),
            "classes": CLASSES, "task": "segmentation", "recipe": {"name": "random"}, "metrics": {},
            "preprocess": make_preprocess(size, 3, [0.5] * 3, [0.25] * 3, crop=False)}


def timed(fn: Any, device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=Path, default=ROOT / "data" / "clips", help="folder of MP4 clips")
    p.add_argument("--arch", default="vit_seg_b16")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--checkpoint", type=Path, help="a trained checkpoint (default: random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runtimes", default="bf16,compile,tensorrt")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--frames", type=int, help="frames per clip at most (default: all)")
    p.add_argument("--masks", default="rle", choices=("rle", "png", "none"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "device_check_video.json")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    paths = sorted(a.clips.glob("*.mp4"))
    if not paths:
        raise SystemExit(f"no MP4 clips in {a.clips}: write them with `make clips` and carry the folder")
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "importable": {m: importlib.util.find_spec(m) is not None for m in OPTIONAL}}
    if not env["importable"]["scipy"]:
        opencv_detections()
    masks = a.masks if a.masks != "rle" or env["importable"]["pycocotools"] else "png"
    ckpt = checkpoint(a.arch, a.size, a.checkpoint)
    result: dict[str, Any] = {"environment": env, "arch": ckpt["arch"], "size": a.size, "clips": len(paths),
                              "masks": masks, "max_batch": a.max_batch,
                              "detections": "training.masks (scipy)" if env["importable"]["scipy"] else
                              "OpenCV connected components (no scipy here)"}

    t0 = time.perf_counter()
    n = sum(1 for path in paths for _ in CvClip(path, a.frames).frames(Sampling()))
    result["decode"] = {"frames": n, "fps": round(n / (time.perf_counter() - t0), 1)}

    reference = CvPipeline(ckpt, "cpu", masks="png", max_batch=32)
    reference.clip_frames = 32
    ref_frames = reference.handle_requests([str(paths[0])])[0][1]["frames"]
    result["forward"], result["end_to_end"], result["agreement"] = {}, {}, {}
    for runtime in a.runtimes.split(","):
        try:
            pipe = CvPipeline(ckpt, device, runtime=runtime, masks=masks, max_batch=a.max_batch)
        except (ValueError, RuntimeError, ImportError) as e:
            result["forward"][runtime] = {"skipped": str(e)[:300]}
            continue
        pipe.clip_frames = a.frames
        x = torch.randn(a.max_batch, 3, a.size, a.size, device=device)
        with torch.inference_mode():
            s = timed(lambda p=pipe, x=x: p.forward(x), device, a.reps)
        result["forward"][runtime] = {"fps": round(a.max_batch / s, 1), "runtime_info": {
            k: v for k, v in pipe.runtime_info.items() if k != "file"}}
        runs = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            answers = pipe.handle_requests([str(p) for p in paths])
            runs.append((time.perf_counter() - t0, dict(pipe.timings)))
        assert all(status == 200 for status, _ in answers), answers[0]
        frames = sum(len(body["frames"]) for _, body in answers)
        wall, stages = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        result["end_to_end"][runtime] = {"frames": frames, "seconds": round(wall, 3), "fps": round(frames / wall, 1),
                                         "stages_s": {k: round(v, 3) for k, v in stages.items()}}
        pipe.clip_frames, pipe.masks = 32, "png"
        mine = pipe.handle_requests([str(paths[0])])[0][1]["frames"]
        result["agreement"][runtime] = round(float(np.mean([
            (decode_mask(m["mask"]) == decode_mask(r["mask"])).mean() for m, r in zip(mine, ref_frames)])), 4)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
