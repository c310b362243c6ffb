"""`python -m training select`: measure every trained checkpoint the way it would be served, then write the
model-selection report (training/select_report.py).

Per checkpoint: parameters, forward FLOPs, weights size, the data it was trained on, and per runtime (eager fp32,
onnx fp32, bf16, int8 post-training, qat for QAT checkpoints) its test accuracy, the model-forward latency at batch
1 and 8 on this CPU (`threads` threads, median of `reps` after warm-up), throughput, and the size of the file the
runtime runs. GPU latency is measured only on a machine with a GPU. Latency is the model forward on a prepared
batch (decode and preprocessing excluded: they are the same for every model at one input size). Measure on a quiet
machine: the load average before and after is recorded.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import build_model, load_checkpoint
from training.recipe import RecipeError

RUNTIMES = ("eager", "onnx", "bf16", "int8", "qat")  # qat applies to checkpoints trained with qat: true
BATCHES = (1, 8)


class SelectError(RecipeError):
    """Nothing to report on (no checkpoints, checkpoints of several datasets, unknown runtimes)."""


@dataclass
class Settings:
    checkpoints: list[str] = field(default_factory=list)
    runtimes: tuple[str, ...] = RUNTIMES
    threads: int = 2
    reps: int = 30                     # timed forward passes per point (median)
    accuracy_images: int | None = None  # test images per accuracy (None: the whole test split)
    usd_per_hour: float = 0.10         # assumed machine price for the cost column (an input, not a measurement)
    data_root: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.runtimes) - set(RUNTIMES))
        if unknown:
            raise SelectError(f"unknown runtime(s) {', '.join(unknown)}; choose from {', '.join(RUNTIMES)}")


def family(arch: str) -> str:
    """CNN, ResNet or ViT: the families the guidance compares."""
    if "vit" in arch:
        return "ViT"
    if "resnet" in arch or arch.startswith("plain"):
        return "ResNet"
    return "CNN"


def prepare(runtime: str, ckpt: dict[str, Any], path: Path, threads: int, cache: Path) -> torch.nn.Module:
    """The module `runtime` serves for this checkpoint (the same code path as a worker's development build)."""
    from handlers.runtimes import file_sha256, prepare_runtime

    module, _ = prepare_runtime(runtime, build_model(ckpt), ckpt["preprocess"], "cpu", threads=threads,
                                cache_dir=cache, key=file_sha256(path), recipe=ckpt.get("recipe"), qat=ckpt.get("qat"))
    return module


def latency_ms(module: torch.nn.Module, x: torch.Tensor, reps: int, device: str = "cpu") -> float:
    times = []
    with torch.inference_mode():
        for i in range(reps + 5):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            module(x)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 5:
                times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def measure_checkpoint(path: Path, s: Settings, splits: Any, cache: Path) -> dict[str, Any]:
    from training.calibration import measure as measure_metric
    from training.presets import eval_batch
    from training.zoo import count_flops

    ckpt = load_checkpoint(path)
    model = build_model(ckpt)
    pre = ckpt["preprocess"]
    x1 = eval_batch(splits.test.images[:1], pre)
    row: dict[str, Any] = {
        "checkpoint": str(path), "name": path.stem, "arch": ckpt["arch"], "family": family(ckpt["arch"]),
        "model_args": {k: v for k, v in ckpt["model_args"].items() if k not in ("num_classes", "in_channels")},
        "params": sum(p.numel() for p in model.parameters()), "gflops": count_flops(model, x1) / 1e9,
        "weights_mb": sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20,
        "train_images": _train_images(ckpt, s.data_root), "epochs": ckpt.get("epoch"),
        "test_acc": ckpt["metrics"].get("test_acc"), "qat": bool(ckpt.get("qat")),
        "distilled_from": (ckpt["metrics"].get("distillation") or {}).get("teacher_arch"), "runtimes": {}}
    for runtime in s.runtimes:
        if runtime == "qat" and not row["qat"]:
            continue  # qat runs only checkpoints trained with qat: true
        try:
            module = prepare(runtime, ckpt, path, s.threads, cache)
        except Exception as e:  # a runtime that cannot run this model is a row, not a crash
            row["runtimes"][runtime] = {"error": str(e).strip().splitlines()[0][:200]}
            continue
        r: dict[str, Any] = {"acc": measure_metric(module, ckpt, s.data_root, s.accuracy_images)["value"]}
        for b in BATCHES:
            r[f"ms_b{b}"] = latency_ms(module, eval_batch(splits.test.images[:b], pre), s.reps)
        r["img_s_b8"] = 8000.0 / r["ms_b8"]
        file = getattr(module, "path", None)
        r["file_mb"] = os.path.getsize(file) / 2**20 if file else row["weights_mb"]
        if file:
            r["convs"] = ort_convs(file, Path(cache))
        row["runtimes"][runtime] = r
    if torch.cuda.is_available():
        row["gpu"] = _gpu_latency(model, splits.test, pre, s.reps)
    return row


def ort_convs(file: str | os.PathLike, tmp: Path) -> dict[str, int]:
    """How ONNX Runtime runs the graph's convolutions after its optimisations: `int8` as QLinearConv kernels (QDQ
    pairs fused), `float` as float convolutions (a conv whose quantize/dequantize pairs it could not fuse)."""
    import collections

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp / "optimised.onnx")
    so.log_severity_level = 3  # the hardware-specific-graph warning of a saved optimised model
    ort.InferenceSession(str(file), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return {"int8": ops["QLinearConv"],
            "float": sum(n for op, n in ops.items() if "Conv" in op and op != "QLinearConv")}


def _gpu_latency(model: torch.nn.Module, test: Any, pre: dict[str, Any], reps: int) -> dict[str, float]:
    from handlers.runtimes import prepare_runtime
    from training.presets import eval_batch

    module, _ = prepare_runtime("bf16", model, pre, "cuda")
    return {f"ms_b{b}": latency_ms(module, eval_batch(test.images[:b], pre, device="cuda"), reps, "cuda")
            for b in BATCHES}


def _train_images(ckpt: dict[str, Any], data_root: str | None) -> int:
    from training.data import load_dataset

    r = ckpt.get("recipe") or {}
    return len(load_dataset(r.get("dataset", "fashion_mnist"), data_root or r.get("data_root"),
                            val_fraction=float(r.get("val_fraction", 0.1)), seed=int(r.get("seed", 0)),
                            limit=r.get("limit")).train)


def discover(root: str | Path, dataset: str) -> list[str]:
    """Finished checkpoints under `root` trained on `dataset` (those with a test accuracy)."""
    found = []
    for path in sorted(Path(root).rglob("*.pt")):
        try:
            ckpt = load_checkpoint(path)
        except ValueError:
            continue
        if (ckpt.get("recipe") or {}).get("dataset") == dataset and ckpt["metrics"].get("test_acc") is not None:
            found.append(str(path))
    return found


def measure(s: Settings) -> dict[str, Any]:
    """Every checkpoint measured; they must share one dataset (the report compares them on its test split)."""
    from training.data import load_dataset
    from training.runs import machine

    if not s.checkpoints:
        raise SelectError("no checkpoints to compare: train some first (e.g. make experiment-kd), or pass "
                          "--checkpoints")
    datasets = {p: (load_checkpoint(p).get("recipe") or {}).get("dataset") for p in s.checkpoints}
    if len(set(datasets.values())) != 1:
        raise SelectError(f"the checkpoints come from several datasets ({sorted(set(map(str, datasets.values())))}); "
                          "compare one dataset at a time")
    dataset = next(iter(datasets.values()))
    splits = load_dataset(dataset, s.data_root)
    previous = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    start_load = os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="select-") as tmp:
            rows = [measure_checkpoint(Path(p), s, splits, Path(tmp)) for p in sorted(s.checkpoints)]
    finally:
        torch.set_num_threads(previous)
    meta = machine()
    meta.update(load_average_start=[round(v, 2) for v in start_load], threads=s.threads, reps=s.reps,
                torch=torch.__version__, dataset=dataset, test_images=s.accuracy_images or len(splits.test),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    return {"settings": asdict(s), "machine": meta, "models": rows}
