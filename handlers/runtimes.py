"""How a served model runs: `prepare_runtime` turns the eager model into the module a worker calls (no `ts` import).

| runtime | what runs |
| --- | --- |
| eager   | fp32 PyTorch; channels_last for conv nets (on this CPU as fast or faster at every size measured) |
| compile | torch.compile, inductor default mode + freezing (weights folded and prepacked), dynamic batch; warmed |
|         | up at load so no request pays for compiling; inductor's cache lives under the cache dir; bf16 on CUDA |
| onnx    | ONNX Runtime (CPUExecutionProvider) on a dynamo-exported fp32 graph with a dynamic batch axis; ViT |
|         | attention cores fused into MultiHeadAttention at export (handlers/fusion.py) |
| bf16    | bf16 autocast + channels_last (CPU with AVX512-BF16/AMX, or CUDA) |
| int8    | ONNX Runtime static int8 (QDQ, per-channel int8 weights, uint8 activations, MinMax calibration; the |
|         | layer that computes the logits and the fused attention cores stay fp32) |
| qat     | ONNX Runtime on the int8 graph quantization-aware training learnt (training/qat.py: the converted pt2e |
|         | graph as QDQ ONNX); only for checkpoints trained with qat: true, no calibration |
| tensorrt| CUDA only, when importable: torch-tensorrt, else ONNX Runtime's TensorRT provider (handlers/gpu.py) |

On CUDA, `compile` adds CUDA graphs over power-of-two batch buckets (handlers/gpu.py).

In a TorchServe worker, `onnx`, `int8` and `qat` load the artifact the archive step built and packed into the .mar
(`artifact`: the path of its manifest; handlers/artifacts.py checks it and its sha256 first). Without an
artifact (tests, benchmarks, notebooks) the graph is built here and kept in a development cache under
`<cache>/<checkpoint sha256>/<build key>/`: the key covers the torch, onnx, onnxscript and ONNX Runtime versions,
the exporter, the quantization scheme and the calibration source, and each cached file's sha256 is recorded at
build and checked at load (a file that does not match is rebuilt, never loaded). docs/runtimes.md has the
measurements behind these choices.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata as md
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from handlers.artifacts import CALIBRATION_IMAGES, CALIBRATION_SEED, PACKED, file_sha256, verify_artifact
from handlers.fusion import FUSED_OP, fuse_attention

log = logging.getLogger(__name__)

RUNTIMES = ("eager", "compile", "onnx", "bf16", "int8", "qat", "tensorrt")
CPU_ONLY = PACKED                     # onnxruntime is installed with the CPU provider only
EXPORTED = (*PACKED, "tensorrt")      # runtimes that may build an ONNX graph, cached under the checkpoint's sha256
INT8_SCHEME = "qdq-fp32head"          # the quantize_onnx recipe, part of the build key
EXPORTER = "torch.onnx.export(dynamo=True)"
ORT_SPINNING = "0"                    # idle ORT threads sleep: the decoder and other workers share the cores
SYNTHETIC_WARNING = ("int8 calibrated on synthetic images, not on the training data: expect a larger accuracy "
                     "loss (docs/runtimes.md)")


def default_cache_dir() -> Path:
    """$VISION_SERVE_CACHE, else $XDG_CACHE_HOME/vision-serve, else ~/.cache/vision-serve."""
    if os.environ.get("VISION_SERVE_CACHE"):
        return Path(os.environ["VISION_SERVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vision-serve"


def builder_versions() -> dict[str, str]:
    """What an ONNX or int8 graph depends on besides the weights: a change means a new build."""
    out = {"exporter": EXPORTER, "attention_fusion": FUSED_OP, "int8_scheme": INT8_SCHEME}
    for pkg in ("torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def version_drift(runtime: str, built_with: Mapping[str, str] | None) -> str | None:
    """A packed artifact's accuracy was measured with the versions in its manifest (`built_with`): a worker that
    runs it with another ONNX Runtime (onnx, int8) or torch (the others) says so."""
    pkg = "onnxruntime" if runtime in PACKED else "torch"
    built, running = (built_with or {}).get(pkg), builder_versions()[pkg]
    if built is None or built == running:
        return None
    return (f"built and measured with {pkg} {built}, running on {pkg} {running}: the accuracy recorded at archive "
            "time may not hold exactly; archive it again on this software (--replace) to measure it again")


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
                    key: str | None = None, recipe: Mapping[str, Any] | None = None,
                    artifact: str | os.PathLike | None = None, max_batch: int = 64,
                    qat: Mapping[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(module mapping a normalized float32 batch to float32 outputs, info for logs/describe).

    `threads`: CPU threads for ONNX Runtime (default torch.get_num_threads(), which the handler sets from
    cpu_threads). `key`: the checkpoint's sha256 (checked against the artifact manifest; names the development
    cache). `artifact`: the archive's artifact manifest; onnx/int8 then load its file and build nothing.
    `recipe`: the checkpoint's recipe, whose training data calibrates a development int8 build. `max_batch`: the
    largest batch the pipeline runs (CUDA graphs and TensorRT profiles are built up to it). `qat`: the
    checkpoint's `qat` entry (what quantization-aware training learnt), for a development qat build.
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
    packed = None
    if artifact is not None:
        packed, checked = verify_artifact(artifact, name, key)
        info.update(checked)
        drift = version_drift(name, checked.get("built_with"))
        if drift:
            info["version_warning"] = drift
            log.warning("%s", drift)
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
        if cuda and tensorrt_backend() == "onnxruntime":  # ONNX Runtime's TensorRT provider builds from the graph
            onnx_file = _development_build("onnx", model.cpu(), preprocess, cache, key, recipe, info)
        out, trt_info = tensorrt(model.to(device), preprocess, device, max_batch, onnx_file, cache)
        info.update(trt_info)
    else:
        if packed is None:
            packed = _development_build(name, model, preprocess, cache, key, recipe, info, qat)
        out = OrtModule(packed, threads or torch.get_num_threads())
        info.update(file=str(packed), threads=out.threads)
    if (info.get("calibration") or {}).get("source") == "synthetic":
        info["warning"] = SYNTHETIC_WARNING
        log.warning("%s", SYNTHETIC_WARNING)
    info["prepare_s"] = round(time.perf_counter() - start, 2)
    return out, info


def _development_build(name: str, model: nn.Module, preprocess: Mapping[str, Any], cache: Path, key: str | None,
                       recipe: Mapping[str, Any] | None, info: dict[str, Any],
                       qat: Mapping[str, Any] | None = None) -> Path:
    """onnx/int8/qat without an archive: build in the development cache (see the module docstring)."""
    if not key:
        raise ValueError(f"runtime {name!r} needs the checkpoint's sha256 to name its cache")
    shape = f"{preprocess['channels']}x{preprocess['size']}"
    versions = builder_versions()
    if name == "qat":
        from training.qat import export_onnx as export_qat
        from training.qat import qat_state
        from training.qat import versions as qat_versions

        qat_state(dict(qat or {}))  # a checkpoint without QAT is refused before anything is built
        folder = cache / key / _build_key({**versions, **qat_versions(), "qat": qat["scheme"]})
        path, hit = _cached(folder / f"qat-{shape}.onnx", lambda p: export_qat(model, dict(preprocess), dict(qat), p))
        info["cache"] = "hit" if hit else "miss"
        return path
    fp32, hit = _cached(cache / key / _build_key(versions) / f"fp32-{shape}.onnx",
                        lambda p: export_onnx(model, preprocess, p))
    info["cache"] = "hit" if hit else "miss"
    if name == "onnx":
        return fp32
    batches, about = development_calibration(preprocess, recipe)
    folder = cache / key / _build_key({**versions, "calibration": about})
    int8, hit = _cached(folder / f"int8-{shape}.onnx", lambda p: quantize_onnx(fp32, p, batches))
    info.update(cache="hit" if hit else "miss", calibration=about)
    return int8


def _build_key(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def development_calibration(preprocess: Mapping[str, Any],
                            recipe: Mapping[str, Any] | None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Calibration for a development int8 build: the seeded training-split sample the archive step uses
    (training/calibration.py) when the data is on this machine, else synthetic images (said loudly)."""
    from training.calibration import CalibrationError, calibration_set

    ckpt = {"preprocess": dict(preprocess), "recipe": dict(recipe or {}), "task": (recipe or {}).get("task")}
    try:
        return calibration_set(ckpt, CALIBRATION_IMAGES, CALIBRATION_SEED)
    except CalibrationError as e:
        log.warning("int8 calibration: %s; using synthetic images", e)
        return calibration_set(ckpt, CALIBRATION_IMAGES, CALIBRATION_SEED, synthetic=True)


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
    """Build `path` once: under an exclusive lock, into a temp file then os.replace, its sha256 recorded beside
    it (`<file>.sha256`). A cached file whose sha256 does not match the record (changed, truncated) is rebuilt,
    never loaded. Returns (path, was cached)."""
    record = path.with_name(path.name + ".sha256")

    def intact() -> bool:
        try:
            return path.is_file() and record.read_text().split()[0] == file_sha256(path)
        except (OSError, IndexError):
            return False

    if intact():
        return path, True
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second worker waits here, then finds the file
        if intact():
            return path, True
        if path.exists():
            log.warning("cached %s does not match its recorded sha256: rebuilding it", path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            build(tmp)
            digest = file_sha256(tmp)
            os.replace(tmp, path)
            record.write_text(f"{digest}  {path.name}\n")
        finally:
            tmp.unlink(missing_ok=True)
    return path, False


def export_onnx(model: nn.Module, preprocess: Mapping[str, Any], path: str | os.PathLike, *,
                fuse: bool = True) -> None:
    """torch.onnx.export (dynamo) at the model's input size, batch axis dynamic; input "x", output "logits".
    `fuse`: ViT attention cores become one MultiHeadAttention each (handlers/fusion.py; what was fused is in the
    graph's metadata); False only to measure against the plain export (scripts/vit_fusion.py)."""
    c, s = int(preprocess["channels"]), int(preprocess["size"])
    x = torch.zeros(2, c, s, s)  # batch 2: export specialises a size-1 dimension
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
        torch.onnx.export(model.cpu().eval(), (x,), str(path), input_names=["x"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True, external_data=False)
    if fuse:
        import onnx

        graph = onnx.load(str(path))
        fuse_attention(graph)
        onnx.save(graph, str(path))


def quantize_onnx(fp32: str | os.PathLike, path: str | os.PathLike, batches: Sequence[torch.Tensor]) -> None:
    """ORT static quantization: QDQ, per-channel int8 weights, uint8 activations, MinMax ranges over the
    calibration `batches` (normalized float32, training/calibration.py). The layer that computes the logits stays
    fp32 (`logits_nodes`): quantized logits take 256 levels, which ties close top-2 classes and coarsens the served
    probabilities (and costs nothing measurable). Fused attention cores (MultiHeadAttention, a contrib op the
    quantizer leaves alone) stay fp32 between the quantized qkv and output projections: measured faster than
    quantizing Q·Kᵀ, Softmax and ·V (docs/video.md, "Attention fusion")."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": b.numpy()} for b in batches])

        def get_next(self) -> dict | None:
            return next(self.items, None)

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
