"""How a served model runs: `prepare_runtime` turns the eager model into the module a worker calls (no `ts` import).

| runtime | what runs |
| --- | --- |
| eager   | fp32 PyTorch; channels_last for conv nets (on this CPU as fast or faster at every size measured) |
| compile | torch.compile, inductor default mode + freezing (weights folded and prepacked), dynamic batch; warmed |
|         | up at load so no request pays for compiling; inductor's cache lives under the cache dir; bf16 on CUDA |
| onnx    | ONNX Runtime (CPUExecutionProvider) on a dynamo-exported fp32 graph with a dynamic batch axis |
| bf16    | bf16 autocast + channels_last (CPU with AVX512-BF16/AMX, or CUDA) |
| int8    | ONNX Runtime static int8 (QDQ, per-channel int8 weights, uint8 activations, MinMax calibration; the |
|         | layer that computes the logits stays fp32) |
| tensorrt| CUDA only, when importable: torch-tensorrt, else ONNX Runtime's TensorRT provider (handlers/gpu.py) |

On CUDA, `compile` adds CUDA graphs over power-of-two batch buckets (handlers/gpu.py).

ONNX files are exported once per checkpoint into `<cache>/<checkpoint sha256>/` (a file lock lets concurrent workers
share one export; a restart reuses it). int8 calibrates on images of the checkpoint's training set when it can load
them, else on synthetic images built from the preprocess stats (see `calibration_batches`). docs/runtimes.md has
the measurements behind these choices.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

RUNTIMES = ("eager", "compile", "onnx", "bf16", "int8", "tensorrt")
CPU_ONLY = ("onnx", "int8")           # onnxruntime is installed with the CPU provider only
EXPORTED = ("onnx", "int8", "tensorrt")  # runtimes that may build an ONNX file, cached under the checkpoint's sha256
CALIBRATION_IMAGES = 64               # 4 batches of 16
INT8_SCHEME = "qdq-fp32head"          # the quantize_onnx recipe, part of the cached file's name
ORT_SPINNING = "0"                    # idle ORT threads sleep: the decoder and other workers share the cores


def default_cache_dir() -> Path:
    """$VISION_SERVE_CACHE, else $XDG_CACHE_HOME/vision-serve, else ~/.cache/vision-serve."""
    if os.environ.get("VISION_SERVE_CACHE"):
        return Path(os.environ["VISION_SERVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vision-serve"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_sha256(ckpt: Mapping[str, Any]) -> str:
    """A content hash for a checkpoint held in memory (no file to hash): arch, args, preprocess and weights."""
    h = hashlib.sha256(repr((ckpt["arch"], sorted(ckpt["model_args"].items()), sorted(ckpt["preprocess"].items())))
                       .encode())
    state = ckpt.get("ema_state_dict") or ckpt["state_dict"]
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class WrappedModel(nn.Module):
    """The model with its input layout and precision: channels_last and/or autocast; returns float32 logits."""

    def __init__(self, model: nn.Module, channels_last: bool, autocast: torch.dtype | None, device_type: str):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.channels_last, self.autocast, self.device_type = channels_last, autocast, device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast is None:
            return self.model(x).float()
        with torch.autocast(self.device_type, dtype=self.autocast):
            return self.model(x).float()


class OrtModule(nn.Module):
    """An onnxruntime session behind the nn.Module interface: float32 NCHW batch in, float32 logits out."""

    def __init__(self, path: str | os.PathLike, threads: int):
        super().__init__()
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", ORT_SPINNING)
        self.path, self.threads = str(path), threads
        self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])


def prepare_runtime(name: str, model: nn.Module, preprocess: Mapping[str, Any], device: torch.device | str = "cpu",
                    *, threads: int | None = None, cache_dir: str | os.PathLike | None = None,
                    key: str | None = None, recipe: Mapping[str, Any] | None = None, max_batch: int = 64
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """(module mapping a normalized float32 batch to float32 outputs, info for logs/describe).

    `threads`: CPU threads for ONNX Runtime (default torch.get_num_threads(), which the handler sets from
    cpu_threads). `key`: the checkpoint's sha256, naming its cache folder (required by onnx/int8). `recipe`: the
    checkpoint's recipe, whose dataset feeds int8 calibration. `max_batch`: the largest batch the pipeline runs
    (CUDA graphs and TensorRT profiles are built up to it).
    """
    device = torch.device(device)
    if name not in RUNTIMES:
        raise ValueError(f"runtime {name!r} is not supported; choose one of {list(RUNTIMES)}")
    if name in CPU_ONLY and device.type != "cpu":
        raise ValueError(f"runtime {name!r} runs on CPU only (onnxruntime CPU provider); on {device.type} use "
                         "'bf16' or 'compile'")
    start = time.perf_counter()
    model = model.eval().to(device)
    cuda = device.type == "cuda"
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    info: dict[str, Any] = {"runtime": name}
    if name == "eager":
        # fp32 on CUDA too (the bf16 runtime is the CUDA default, see ImagePipeline)
        conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
        out: nn.Module = WrappedModel(model, conv, None, device.type)
    elif name == "bf16":
        out = WrappedModel(model, True, torch.bfloat16, device.type)
    elif name == "compile":
        wrapped = WrappedModel(model, cuda, torch.bfloat16 if cuda else None, device.type)
        if cuda:
            from handlers.gpu import compile_cuda

            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
            out = compile_cuda(wrapped, preprocess, device, max_batch)
            info["cuda_graphs"] = list(out.sizes)
        else:
            out = _compile(wrapped, preprocess, device, cache)
    elif name == "tensorrt":
        from handlers.gpu import tensorrt, tensorrt_backend

        onnx_file = None
        if device.type == "cuda" and tensorrt_backend() == "onnxruntime" and key:
            onnx_file, _ = _cached(cache / key / f"fp32-{preprocess['channels']}x{preprocess['size']}.onnx",
                                   lambda p: export_onnx(model, preprocess, p))
        out, trt_info = tensorrt(model, preprocess, device, max_batch, onnx_file, cache)
        info.update(trt_info)
    else:
        if not key:
            raise ValueError(f"runtime {name!r} needs the checkpoint's sha256 to name its cache")
        folder = cache / key
        shape = f"{preprocess['channels']}x{preprocess['size']}"
        fp32, hit = _cached(folder / f"fp32-{shape}.onnx", lambda p: export_onnx(model, preprocess, p))
        info["cache"] = "hit" if hit else "miss"
        if name == "int8":
            stem = folder / f"int8-{shape}-{INT8_SCHEME}"  # a new scheme gets new files, never a stale model
            meta = stem.with_suffix(".json")  # written with the model: where its calibration images came from
            int8, hit = _cached(stem.with_suffix(".onnx"), lambda p: meta.write_text(
                json.dumps(quantize_onnx(fp32, p, preprocess, recipe))))
            info.update(cache="hit" if hit else "miss", **(json.loads(meta.read_text()) if meta.is_file() else {}))
            fp32 = int8
        out = OrtModule(fp32, threads or torch.get_num_threads())
        info.update(file=str(fp32), threads=out.threads)
    info["prepare_s"] = round(time.perf_counter() - start, 2)
    return out, info


def _compile(module: nn.Module, preprocess: Mapping[str, Any], device: torch.device, cache: Path) -> nn.Module:
    # inductor's FX-graph/AOT caches go next to the ONNX files (the first value wins for the whole process), so a
    # restarted worker compiles from cache in seconds instead of minutes
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    # every compiled model adds 3 graphs to the cache of the shared forward code; dynamo's default limit (8)
    # would silently fall back to eager for the third model in one process (benchmarks, tests)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = torch.compile(module, options={"freezing": True})  # "default" mode: no autotuning, bounded startup
    c, s = int(preprocess["channels"]), int(preprocess["size"])
    with torch.inference_mode():
        # batch 2 marked dynamic gives one graph for 2..15 (a conv guard splits at 16), 16 one for >= 16, and
        # batch 1 is always specialised: after these three no request pays for a compile
        for batch in (2, 16, 1):
            x = torch.zeros(batch, c, s, s, device=device)
            if batch > 1:
                torch._dynamo.mark_dynamic(x, 0)
            compiled(x)
    return compiled


def _cached(path: Path, build: Callable[[Path], object]) -> tuple[Path, bool]:
    """Build `path` once: under an exclusive lock, into a temp file then os.replace. Returns (path, was cached)."""
    if path.is_file():
        return path, True
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second worker waits here, then finds the file
        if path.is_file():
            return path, True
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            build(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path, False


def export_onnx(model: nn.Module, preprocess: Mapping[str, Any], path: str | os.PathLike) -> None:
    """torch.onnx.export (dynamo) at the model's input size, batch axis dynamic; input "x", output "logits"."""
    c, s = int(preprocess["channels"]), int(preprocess["size"])
    x = torch.zeros(2, c, s, s)  # batch 2: export specialises a size-1 dimension
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
        torch.onnx.export(model.cpu().eval(), (x,), str(path), input_names=["x"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True, external_data=False)


def quantize_onnx(fp32: str | os.PathLike, path: str | os.PathLike, preprocess: Mapping[str, Any],
                  recipe: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """ORT static quantization: QDQ, per-channel int8 weights, uint8 activations, MinMax ranges over the
    `calibration_batches`. The layer that computes the logits stays fp32 (`logits_nodes`): quantized logits take
    256 levels, which ties close top-2 classes and coarsens the served probabilities (and costs nothing
    measurable). Returns where the calibration images came from."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": b.numpy()} for b in batches])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    batches, source = calibration_batches(preprocess, recipe)
    pre = Path(path).with_name(Path(path).name + ".pre.onnx")
    try:
        # shape inference + graph fusions the quantizer expects; a failing symbolic inference (a segmentation
        # head's computed sizes) dumps its model into the working directory, hence a scratch one
        with tempfile.TemporaryDirectory(dir=Path(path).parent) as scratch, contextlib.chdir(scratch):
            try:
                quant_pre_process(str(Path(fp32).resolve()), str(pre.resolve()))
            except Exception as e:
                log.info("int8: symbolic shape inference failed (%s); ONNX shape inference only", e)
                quant_pre_process(str(Path(fp32).resolve()), str(pre.resolve()), skip_symbolic_shape=True)
        head = logits_nodes(onnx.load(str(pre)).graph)
        quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=head)
    finally:
        pre.unlink(missing_ok=True)
    return {"calibration": source, "calibration_images": sum(len(b) for b in batches)}


_RESHAPING = {"Resize", "Reshape", "Transpose", "Identity", "Cast", "Flatten", "Squeeze", "Unsqueeze"}


def logits_nodes(graph: Any) -> list[str]:
    """The nodes that compute the outputs: each output's producer, followed back through resampling and reshaping
    nodes to the layer that computes the values (a classifier's Gemm; a segmentation head's 1x1 Conv before its
    final upsampling)."""
    producer = {out: node for node in graph.node for out in node.output}
    names = []
    for output in graph.output:
        node = producer.get(output.name)
        while node is not None:
            names.append(node.name)
            if node.op_type not in _RESHAPING or not node.input:
                break
            node = producer.get(node.input[0])
    return names


def calibration_batches(preprocess: Mapping[str, Any], recipe: Mapping[str, Any] | None = None,
                        n: int = CALIBRATION_IMAGES, batch_size: int = 16) -> tuple[list[torch.Tensor], str]:
    """Deterministic normalized calibration batches and their source ("<dataset>:train" or "synthetic").

    Best are images from the data the checkpoint was trained on (its recipe's dataset, training split, first `n`
    of the seeded split); where that data is not on the serving machine, synthetic images with the preprocess
    mean/std (see `_synthetic`), which costs accuracy: a warning is logged.
    """
    from training.presets import eval_batch

    images, source = None, "synthetic"
    if recipe and recipe.get("dataset") == "moving_fmnist":  # segmentation: frames of the clip generator
        images, source = _clip_frames(recipe, int(preprocess["size"]), n)
        recipe = None
    if recipe and recipe.get("dataset"):
        try:
            from training.data import DatasetError, load_dataset
        except ImportError as e:  # an archive that does not carry training/data.py
            log.warning("int8 calibration: cannot import training.data (%s); using synthetic images", e)
            recipe = None
    if recipe and recipe.get("dataset"):
        try:
            splits = load_dataset(recipe["dataset"], recipe.get("data_root"), seed=int(recipe.get("seed", 0)),
                                  val_fraction=float(recipe.get("val_fraction", 0.1)),
                                  image_size=recipe.get("img_size"), limit=n)
            train = splits.train
            images = train.images[:n] if hasattr(train, "images") else [train[i][0] for i in range(min(n, len(train)))]
            source = f"{recipe['dataset']}:train"
        except (DatasetError, OSError) as e:
            log.warning("int8 calibration: %s; using synthetic images", e)
    if images is not None and len(images) and images[0].shape[0] == preprocess["channels"]:
        x = eval_batch(images, dict(preprocess))
    else:
        source = "synthetic"
        log.warning("int8 calibration on synthetic images: expect a larger accuracy loss than with training data")
        x = _synthetic(preprocess, n)
    return [x[i:i + batch_size].contiguous() for i in range(0, len(x), batch_size)], source


def _clip_frames(recipe: Mapping[str, Any], size: int, n: int) -> tuple[torch.Tensor | None, str]:
    """n frames drawn like the training frames (training garments, the recipe's clip knobs and seed)."""
    try:
        from training.clips import frame_batch, make_config, split_generator
        from training.data import DatasetError

        gen = split_generator(int(recipe.get("seed", 0)), "train", 1)
        frames, _ = frame_batch(gen, n, "train", (size, size), make_config(recipe.get("data_args")),
                                recipe.get("data_root"))
        return frames, "moving_fmnist:train"
    except (ImportError, ValueError, OSError, DatasetError) as e:
        log.warning("int8 calibration: cannot draw training frames (%s); using synthetic images", e)
        return None, "synthetic"


def _synthetic(preprocess: Mapping[str, Any], n: int) -> torch.Tensor:
    """Smooth random fields plus fine noise, squashed by a sigmoid into 0..1 pixels, then normalized with the
    checkpoint's mean/std. Of the generators tried this lost least accuracy (docs/runtimes.md)."""
    g = torch.Generator().manual_seed(0)
    c, s = int(preprocess["channels"]), int(preprocess["size"])
    field = F.interpolate(torch.randn(n, c, 7, 7, generator=g), size=(s, s), mode="bilinear", align_corners=False)
    pixels = torch.sigmoid(field / field.std() + 0.3 * torch.randn(n, c, s, s, generator=g))
    mean = torch.tensor(preprocess["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(preprocess["std"]).view(1, -1, 1, 1)
    return (pixels - mean) / std
