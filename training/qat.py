"""Int8 quantization-aware training (QAT) with PyTorch 2 export quantization (torchao's pt2e flow).

    registry model --torch.export (training graph, dynamic batch)--> prepare_qat_pt2e(X86InductorQuantizer, QAT)
      --> train as usual (fake-quantised int8 weights and activations; BN folded into the conv weights with its
          batch statistics) --> convert_pt2e --> quantize/dequantize around every int8 op --> ONNX (QDQ) that
          ONNX Runtime runs with int8 kernels: the `qat` runtime (handlers/runtimes.py)

Why this API: torch.ao.quantization's eager and FX QAT are deprecated; torchao's newer `quantize_(model,
QATConfig(...))` fake-quantises Linear and Embedding layers for LLM schemes (int4/int8 weights, dynamic
activations) and has no static int8 convolution. The pt2e flow covers convolutions and linear layers with static
per-channel int8 weights and per-tensor uint8 activations, and its converted graph exports to the same QDQ ONNX
form that the post-training `int8` runtime runs, so PTQ and QAT are compared on the same kernels.

The checkpoint keeps the contract: `state_dict` holds the float weights under the registry model's names (it still
loads into `get_model(arch)`: the eager runtime runs it in float), and `qat` holds what the fake quantisation learnt
(observer ranges, scales and zero points) plus the versions that prepared it. `fake_quantized(ckpt)` rebuilds the
trained fake-quantised model; `quantized(ckpt)` converts it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata as md
import io
import logging
import types
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from training.recipe import RecipeError

SCHEME = "pt2e-x86-qat"  # torchao X86InductorQuantizer, QAT config: int8 per-channel weights, uint8 activations
EXAMPLE_BATCH = 4        # export's example batch (the batch dimension is dynamic)


class QATError(RecipeError):
    """A model the quantizer cannot prepare, or a QAT checkpoint that cannot be rebuilt."""


def versions() -> dict[str, str]:
    return {pkg: md.version(pkg) for pkg in ("torch", "torchao")}


@contextlib.contextmanager
def _quiet():
    """torchao's import logs a deprecation notice through torch's pytree logger, and export warns about
    internals: neither is news for the user of a training CLI."""
    pytree = logging.getLogger("torch.utils._pytree")
    level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pytree.setLevel(level)


def _reuse_pattern_graphs() -> None:
    """torchao's prepare and convert turn every conv/BN pattern variant they look for into a graph with
    torch.export on every call (about a hundred exports per convert: most of a small model's convert time). A
    pattern's graph depends only on the pattern function (its code and captured values) and the shapes of its
    example inputs, so each is exported once per process and copied on reuse. Idempotent; a torchao without the
    helper is left as it is."""
    from torchao.quantization.pt2e import qat_utils, reference_representation_rewrite, utils

    original = getattr(utils, "_get_aten_graph_module_for_pattern", None)
    if original is None or getattr(original, "reuses_graphs", False):
        return
    graphs: dict[Any, Any] = {}

    def key(v: Any, values: bool) -> Any:
        if isinstance(v, torch.Tensor):  # traced inputs: their shape matters; captured constants: their values
            return ("tensor", tuple(v.shape), v.dtype, v.device.type, tuple(v.flatten().tolist()) if values else None)
        if isinstance(v, (tuple, list)):
            return tuple(key(x, values) for x in v)
        hash(v)  # anything unhashable is not reused (TypeError)
        return v

    def export_once(pattern: Any, example_inputs: tuple[Any, ...], is_cuda: bool = False, **kwargs: Any) -> Any:
        try:  # torchao wraps each pattern function in a parameterless module (export_utils.WrapperModule)
            fn = pattern.fn if isinstance(pattern, nn.Module) and not list(pattern.parameters()) else pattern
            k = (fn.__code__, key(fn.__defaults__ or (), True),
                 key(tuple(c.cell_contents for c in (fn.__closure__ or ())), True), key(example_inputs, False),
                 is_cuda, key(sorted(kwargs.items()), False))
            hash(k)
        except (TypeError, AttributeError, ValueError):
            return original(pattern, example_inputs, is_cuda, **kwargs)
        if k not in graphs:
            graphs[k] = original(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(graphs[k])

    export_once.reuses_graphs = True  # type: ignore[attr-defined]
    for module in (utils, qat_utils, reference_representation_rewrite):
        if getattr(module, "_get_aten_graph_module_for_pattern", None) is original:
            module._get_aten_graph_module_for_pattern = export_once


def _quantizer():
    with _quiet():
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

    return X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))


def prepare_qat(model: nn.Module, preprocess: dict[str, Any], arch: str = "") -> nn.Module:
    """The model as a fake-quantised training graph (train()/eval() switch its BN and dropout). Raises QATError
    with the reason when the model cannot be exported or the x86 quantizer cannot annotate it."""
    with _quiet():
        from torchao.quantization.pt2e import allow_exported_model_train_eval
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

        _reuse_pattern_graphs()

    name = arch or type(model).__name__
    zero = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.affine and bool((m.weight == 0).any())]
    if zero:
        where = ", ".join(zero[:3]) + (", ..." if len(zero) > 3 else "")
        raise QATError(f"QAT folds BatchNorm scales into the conv weights, and {name} has BatchNorm weights of zero "
                       f"({where}; zero-initialised residual branches do that): start from trained weights, or for "
                       "a ResNet set model_args zero_init_residual: false")
    float_keys = list(model.state_dict())
    c, s = int(preprocess["channels"]), int(preprocess["size"])
    x = torch.randn(EXAMPLE_BATCH, c, s, s, device=next(model.parameters()).device)
    was_training = model.training
    model.train()
    try:
        with _quiet():
            graph = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}).module()
    except Exception as e:  # torch.export raises many types; the first line says what it could not trace
        raise QATError(f"{name} cannot be exported to a graph for QAT: {_first_line(e)}") from None
    finally:
        model.train(was_training)
    try:
        with _quiet():
            prepared = prepare_qat_pt2e(graph, _quantizer())
    except Exception as e:  # the quantizer's pattern matching fails with ValueError/AssertionError/KeyError
        raise QATError(f"the x86 int8 quantizer cannot handle {name}: {_first_line(e)}. Train it in float and "
                       "serve it with the int8 (post-training) runtime") from None
    fake_quants = [k for k in prepared.state_dict() if k not in float_keys and k.endswith(".scale")]
    if not fake_quants:
        raise QATError(f"the x86 int8 quantizer found nothing to quantize in {name}")
    allow_exported_model_train_eval(prepared)
    prepared.float_keys = float_keys  # the registry model's names: what the checkpoint's state_dict holds
    prepared.train(was_training)  # allow_exported_model_train_eval's train() returns nothing
    return prepared


def checkpoint_entries(prepared: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`state` (the prepared model's CPU state dict) -> the checkpoint's `state_dict` (float weights under the
    registry's names) and `qat` (the fake quantisation's state, the scheme and the versions that prepared it)."""
    float_keys = set(prepared.float_keys)
    observers = {k: v for k, v in state.items() if k not in float_keys}
    return {"state_dict": {k: v for k, v in state.items() if k in float_keys},
            "qat": {"scheme": SCHEME, "state": observers, "versions": versions(),
                    "fake_quantizers": sum(k.endswith(".scale") for k in observers)}}


def qat_state(qat: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """The fake quantisation's state from a checkpoint's `qat` entry (refused when there is none)."""
    if not qat:
        raise QATError("this checkpoint was not trained with qat: true (it has no `qat` entry); serve it with the "
                       "int8 runtime (post-training quantization) instead")
    if qat.get("scheme") != SCHEME:
        raise QATError(f"QAT scheme {qat.get('scheme')!r} is not {SCHEME!r}")
    return dict(qat["state"])


def full_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The prepared model's state dict from a QAT checkpoint (to resume it)."""
    return {**ckpt["state_dict"], **qat_state(ckpt.get("qat"))}


def attach(model: nn.Module, preprocess: dict[str, Any], qat: dict[str, Any] | None, arch: str = "") -> nn.Module:
    """A float model with a QAT checkpoint's weights + that checkpoint's `qat` entry -> the trained fake-quantised
    graph, in eval mode, on the CPU (the model itself is left as it is)."""
    state = {**model.state_dict(), **qat_state(qat)}
    prepared = prepare_qat(copy.deepcopy(model).cpu(), preprocess, arch)
    try:
        prepared.load_state_dict(state)
    except RuntimeError as e:
        raise QATError(f"the checkpoint's QAT state does not fit the graph prepared here (prepared with "
                       f"{(qat or {}).get('versions')}, this is {versions()}): {_first_line(e)}") from None
    prepared.eval()
    return prepared


def fake_quantized(ckpt: dict[str, Any]) -> nn.Module:
    """The trained fake-quantised model of a QAT checkpoint, in eval mode, on the CPU."""
    from training.models import get_model

    model = get_model(ckpt["arch"], **ckpt["model_args"])
    model.load_state_dict(ckpt["state_dict"])
    return attach(model, ckpt["preprocess"], ckpt.get("qat"), ckpt["arch"])


def convert(prepared: nn.Module) -> nn.Module:
    """A trained fake-quantised graph -> the int8 model (quantize/dequantize ops around int8 weights)."""
    with _quiet():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        _reuse_pattern_graphs()
        converted = convert_pt2e(copy.deepcopy(prepared))  # converted from the eval-mode graph
    converted.train = types.MethodType(_inference_only, converted)  # exported graphs refuse train()/eval()
    converted.eval = types.MethodType(lambda self: self, converted)
    for m in converted.modules():
        m.training = False
    return converted


def quantized(ckpt: dict[str, Any]) -> nn.Module:
    """The converted int8 model of a QAT checkpoint, on the CPU."""
    return convert(fake_quantized(ckpt))


def export_onnx(model: nn.Module, preprocess: dict[str, Any], qat: dict[str, Any] | None, path: str | Path) -> None:
    """The converted model as a QDQ ONNX graph (input "x", output "logits", dynamic batch) that ONNX Runtime runs:
    the `qat` runtime's artifact. `model`: the float model built from the checkpoint; `qat`: its `qat` entry."""
    from handlers.runtimes import export_onnx as export

    int8 = convert(attach(model, preprocess, qat))
    with contextlib.redirect_stdout(io.StringIO()), _quiet():
        export(int8, preprocess, path)


def _inference_only(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise QATError("a converted int8 model runs inference only; train the QAT checkpoint instead")
    return self


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
