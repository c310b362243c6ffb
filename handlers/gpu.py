"""The CUDA side of the runtimes (handlers/runtimes.py): CUDA graphs for `compile`, and the optional `tensorrt`.

- `compile` on CUDA: bf16 autocast + channels_last under torch.compile with inductor's CUDA graphs
  (`triton.cudagraphs`, what mode="reduce-overhead" sets) and a symbolic batch. A CUDA graph replays one shape, so
  `BatchBuckets` pads each batch up to the next power of two (at most 2x the work) and every bucket up to the
  pipeline's max_batch is recorded at load: a worker never records or compiles on a request.
- `tensorrt`: torch-tensorrt (dynamo frontend, fp16 kernels allowed, batch 1..max_batch) when it is importable,
  else ONNX Runtime's TensorrtExecutionProvider when that is installed, else a clear error at load.
Neither is available on the CPU machines the tests run on; scripts/device_check_video.py exercises them on a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


def buckets(max_batch: int) -> list[int]:
    """Powers of two below max_batch, and max_batch itself: the batch sizes a CUDA graph is recorded for."""
    return sorted({1 << i for i in range(max(1, max_batch).bit_length()) if 1 << i < max_batch} | {max(1, max_batch)})


class BatchBuckets(nn.Module):
    """Pads a batch to the next bucket size, runs `module`, returns the first n rows (a copy: a CUDA graph's
    outputs live in memory the next replay overwrites). Batches over the largest bucket run in pieces."""

    def __init__(self, module: nn.Module, max_batch: int):
        super().__init__()
        self.module, self.sizes = module, buckets(max_batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = self.sizes[-1]
        if len(x) > top:
            return torch.cat([self(x[i:i + top]) for i in range(0, len(x), top)])
        n = len(x)
        size = next(b for b in self.sizes if b >= n)
        if size > n:
            x = torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])
        return self.module(x)[:n].clone()


def compile_cuda(module: nn.Module, preprocess: Mapping[str, Any], device: torch.device, max_batch: int) -> nn.Module:
    """torch.compile with CUDA graphs behind BatchBuckets, every bucket compiled and recorded now."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = torch.compile(module, dynamic=True, options={"freezing": True, "triton.cudagraphs": True})
    out = BatchBuckets(compiled, max_batch)
    c, s = int(preprocess["channels"]), int(preprocess["size"])
    with torch.inference_mode():
        for size in out.sizes:
            for _ in range(3):  # cudagraph trees record on the second call of a shape, replay from the third
                out(torch.zeros(size, c, s, s, device=device))
    torch.cuda.synchronize(device)
    return out


def tensorrt_backend() -> str | None:
    """"torch_tensorrt", "onnxruntime" (TensorrtExecutionProvider) or None: what the tensorrt runtime would use."""
    try:
        import torch_tensorrt  # noqa: F401

        return "torch_tensorrt"
    except ImportError:
        pass
    try:
        import onnxruntime as ort

        return "onnxruntime" if "TensorrtExecutionProvider" in ort.get_available_providers() else None
    except ImportError:
        return None


def tensorrt(model: nn.Module, preprocess: Mapping[str, Any], device: torch.device, max_batch: int,
             onnx_file: Path | None, cache: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A TensorRT engine for batch 1..max_batch at the checkpoint's input size. `onnx_file`: the fp32 export,
    needed only by the ONNX Runtime path (the caller exports it when `tensorrt_backend()` says so)."""
    backend = tensorrt_backend()
    if device.type != "cuda" or backend is None:
        raise ValueError("runtime 'tensorrt' needs a CUDA device and torch-tensorrt (or onnxruntime-gpu with "
                         "TensorRT) installed; use 'compile' or 'bf16' on CUDA, 'int8'/'onnx' on CPU")
    c, s = int(preprocess["channels"]), int(preprocess["size"])
    if backend == "torch_tensorrt":
        import torch_tensorrt

        spec = torch_tensorrt.Input(min_shape=(1, c, s, s), opt_shape=(max_batch, c, s, s),
                                    max_shape=(max_batch, c, s, s), dtype=torch.float32)
        engine = torch_tensorrt.compile(model.eval().to(device), ir="dynamo", inputs=[spec],
                                        enabled_precisions={torch.float32, torch.float16})
        return Float32(engine), {"backend": backend, "precision": "fp16 kernels allowed"}
    import onnxruntime as ort

    options = {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(cache / "tensorrt"), "device_id": device.index or 0,
               "trt_profile_min_shapes": f"x:1x{c}x{s}x{s}", "trt_profile_max_shapes": f"x:{max_batch}x{c}x{s}x{s}",
               "trt_profile_opt_shapes": f"x:{max_batch}x{c}x{s}x{s}"}
    os.makedirs(options["trt_engine_cache_path"], exist_ok=True)
    session = ort.InferenceSession(str(onnx_file), providers=[("TensorrtExecutionProvider", options),
                                                              "CUDAExecutionProvider"])
    return OrtCuda(session, device), {"backend": backend, "precision": "fp16 kernels allowed"}


class Float32(nn.Module):
    """float32 logits from an engine whose output may be fp16."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float()).float()


class OrtCuda(nn.Module):
    """An ONNX Runtime session on the GPU behind nn.Module: the batch goes in and out through host memory."""

    def __init__(self, session: Any, device: torch.device):
        super().__init__()
        self.session, self.device = session, device
        self.input_name = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(self.device).float()
