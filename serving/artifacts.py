"""The archive step's artifact build: what a version's workers will run, built once, offline, and measured.

For `onnx` the fp32 ONNX graph, for `int8` the int8 graph calibrated on a stated, seeded sample of the
checkpoint's training split (training/calibration.py); both with the same builders the development cache uses
(handlers/runtimes.py). Then the test-split metric of what will run (the artifact itself, or the checkpoint
through the `eager`/`bf16`/`compile` runtime) next to the fp32 checkpoint's, measured side by side on the same
images; a loss beyond the version's budget refuses the archive. Everything lands in `artifact.json`
(handlers/artifacts.py), which the worker checks before loading.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from handlers.artifacts import FORMAT, MANIFEST, PACKED, file_sha256
from handlers.runtimes import OrtModule, builder_versions, export_onnx, prepare_runtime, quantize_onnx
from serving.config import ArchiveConfig
from training.calibration import CalibrationError, calibration_set, measure
from training.checkpoint import build_model

log = logging.getLogger(__name__)

NOTES = {
    "eager": "the checkpoint runs as it is (fp32 PyTorch)",
    "bf16": "the checkpoint runs under bf16 autocast",
    "compile": "compiles at load: inductor's output is specific to the host's CPU or GPU and torch build, so the "
               "worker compiles at start (set startupTimeout) into its local cache; nothing compiled is packed",
}


class ArtifactBuildError(RuntimeError):
    """The artifact cannot be built or loses more accuracy than the version allows."""


def build_artifact(cfg: ArchiveConfig, ckpt: dict[str, Any], out_dir: Path,
                   data_root: str | None = None) -> dict[str, Any]:
    """Write the artifact (onnx/int8/qat) and artifact.json into out_dir; returns the manifest."""
    runtime = cfg.runtime
    model = build_model(ckpt)
    manifest: dict[str, Any] = {"format": FORMAT, "runtime": runtime, "checkpoint": cfg.checkpoint.name,
                                "checkpoint_sha256": file_sha256(cfg.checkpoint), "built_with": builder_versions()}
    if runtime == "qat":
        target = out_dir / "model.qat.onnx"
        _qat_artifact(cfg, ckpt, model, target, manifest)
        manifest.update(file=target.name, sha256=file_sha256(target))
        served = OrtModule(target, torch.get_num_threads())
    elif runtime in PACKED:
        fp32 = out_dir / "model.fp32.onnx"
        export_onnx(model, ckpt["preprocess"], fp32)
        target = fp32
        if runtime == "int8":
            target = out_dir / "model.int8.onnx"
            batches, about = _calibration(cfg, ckpt, data_root)
            quantize_onnx(fp32, target, batches)
            fp32.unlink()  # only what runs is packed
            manifest["calibration"] = about
        manifest.update(file=target.name, sha256=file_sha256(target))
        served = OrtModule(target, torch.get_num_threads())
    else:
        manifest["note"] = NOTES[runtime]
        served = prepare_runtime(runtime, build_model(ckpt), ckpt["preprocess"])[0]
    manifest["accuracy"] = _accuracy(cfg, ckpt, model, served, data_root)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _qat_artifact(cfg: ArchiveConfig, ckpt: dict[str, Any], model: torch.nn.Module, target: Path,
                  manifest: dict[str, Any]) -> None:
    """The int8 graph quantization-aware training learnt (training/qat.py), as QDQ ONNX: no calibration, the
    scales come from training. A checkpoint trained without qat: true is refused."""
    from training.qat import QATError, export_onnx

    qat = ckpt.get("qat")
    try:
        export_onnx(model, ckpt["preprocess"], qat, target)
    except QATError as e:
        raise ArtifactBuildError(f"{cfg.name} {cfg.version}: runtime qat: {e}") from None
    manifest["qat"] = {"scheme": qat["scheme"], "versions": qat["versions"],
                       "fake_quantizers": qat.get("fake_quantizers"),
                       "fake_quant_test_acc": (ckpt.get("metrics") or {}).get("test_acc")}


def _calibration(cfg: ArchiveConfig, ckpt: dict[str, Any], data_root: str | None) -> tuple[list[torch.Tensor], dict]:
    spec = cfg.artifact
    synthetic = spec.calibration == "synthetic"
    try:
        batches, about = calibration_set(ckpt, spec.calibration_images, spec.calibration_seed, data_root, synthetic)
    except CalibrationError as e:
        raise ArtifactBuildError(
            f"int8 calibration reads the checkpoint's training data on the archiving machine, and cannot: {e}. Give "
            "the data's location with --data-root, or (for a model whose accuracy does not matter, e.g. random "
            "weights) set artifact.calibration: synthetic and artifact.max_accuracy_drop: null in the config") from None
    if synthetic:
        log.warning("%s %s: int8 calibrated on synthetic images (artifact.calibration: synthetic)", cfg.name,
                    cfg.version)
    return batches, about


def _accuracy(cfg: ArchiveConfig, ckpt: dict[str, Any], fp32: torch.nn.Module, served: torch.nn.Module,
              data_root: str | None) -> dict[str, Any]:
    """The test metric of what will run next to the fp32 checkpoint's, on the same images; refused when the
    loss exceeds artifact.max_accuracy_drop (points)."""
    spec, runtime = cfg.artifact, cfg.runtime
    try:
        reference = measure(fp32, ckpt, data_root, spec.accuracy_images)
    except CalibrationError as e:
        if runtime == "eager" or spec.max_accuracy_drop is None:  # eager is the reference: nothing to lose
            return {"measured": False, "reason": str(e)}
        raise ArtifactBuildError(
            f"cannot measure the {runtime} artifact's accuracy: {e}. Give the data's location with --data-root, "
            "or set artifact.max_accuracy_drop: null to archive without the check") from None
    result = {"metric": reference["metric"], "split": reference["split"], "images": reference["images"],
              "fp32": reference["value"], "runtime": runtime}
    if runtime != "eager":
        value = measure(served, ckpt, data_root, spec.accuracy_images)["value"]
        result.update({runtime: value, "drop_pt": round(100 * (reference["value"] - value), 2)})
    else:
        result.update({runtime: reference["value"], "drop_pt": 0.0})
    result["budget_pt"] = spec.max_accuracy_drop
    if spec.max_accuracy_drop is not None and result["drop_pt"] > spec.max_accuracy_drop:
        raise ArtifactBuildError(
            f"{cfg.name} {cfg.version}: the {runtime} artifact scores {100 * result[runtime]:.2f} % {result['metric']} "
            f"on {result['images']} {result['split']} images against {100 * result['fp32']:.2f} % for the fp32 "
            f"checkpoint: {result['drop_pt']:.2f} points lost, over the budget of {spec.max_accuracy_drop} "
            "(artifact.max_accuracy_drop); use another runtime or raise the budget in the config")
    return result
