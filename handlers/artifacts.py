"""What a worker runs is what was archived: the artifact manifest (`artifact.json`) packed into every .mar.

The archive step (serving/artifacts.py) builds each version's runtime artifact once, offline: the fp32 ONNX graph
for `onnx`, the calibrated int8 ONNX graph for `int8`. It packs the file next to the checkpoint with a manifest:

    {"format": 1, "runtime": "int8", "checkpoint": "m.pt", "checkpoint_sha256": "...",
     "file": "model.int8.onnx", "sha256": "...", "built_with": {...}, "calibration": {...}, "accuracy": {...}}

A worker checks the checkpoint and the artifact against the manifest before loading anything, and loads the
artifact as it is: it never exports, calibrates, reads training data or writes a cache. `eager`, `bf16` and
`compile` run the checkpoint itself (`compile` compiles at load: inductor's output is specific to the host's
CPU or GPU and torch build), so their manifest has no `file`. Standard library only (no torch, no `ts`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

MANIFEST = "artifact.json"
FORMAT = 1
PACKED = ("onnx", "int8", "qat")  # runtimes whose artifact is a built file; the others run the checkpoint
CALIBRATION_IMAGES = 64    # int8: images drawn from the training split (more changed nothing, docs/runtimes.md)
CALIBRATION_SEED = 0       # the seed of that draw
MAX_ACCURACY_DROP = 0.5    # points of test accuracy an artifact may lose against the fp32 checkpoint
REBUILD = "rebuild the archive with `python -m serving archive --config <config> --replace`"


class ArtifactError(RuntimeError):
    """An archive whose artifact is missing, damaged or not the one its manifest names: refused at load."""


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], Any], mode: int = 0o644) -> Path:
    """Write `data` (bytes, or a function that writes to the open binary file, e.g. torch.save) so a reader sees
    the old file or the whole new one, never a part: a temp file in the same folder (made if missing), flushed to
    disk, given `mode` (mkstemp makes 0600), then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any, mode: int = 0o644) -> Path:
    """`data` as indented JSON (keys in insertion order, a final newline), written with atomic_write."""
    return atomic_write(path, (json.dumps(data, indent=2) + "\n").encode(), mode)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def require_artifact(options: Mapping[str, Any]) -> None:
    """In a worker: a runtime that runs a built file needs the archive's manifest (an archive built before
    artifacts were packed, or by hand, has none), so the worker never builds one itself."""
    runtime = options.get("runtime")
    if runtime in PACKED and not options.get("artifact"):
        raise ArtifactError(f"this archive carries no built {runtime} artifact (no `artifact` in its model-config "
                            f"handler block), and a worker does not build one; {REBUILD}")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"the archive has no {path.name}; {REBUILD}") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path.name} is not readable JSON ({e}); {REBUILD}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path.name} is not an artifact manifest of format {FORMAT}; {REBUILD}")
    return manifest


def verify_artifact(manifest_path: str | os.PathLike, runtime: str,
                    checkpoint_sha256: str | None) -> tuple[Path | None, dict[str, Any]]:
    """Check the manifest against what is about to run; returns (the artifact file or None, what to report).

    Refused with ArtifactError: another runtime than the manifest's, a checkpoint whose sha256 differs, a missing
    artifact file, an artifact whose sha256 differs from the manifest's."""
    manifest_path = Path(manifest_path)
    m = read_manifest(manifest_path)
    if m.get("runtime") != runtime:
        raise ArtifactError(f"{manifest_path.name} was built for runtime {m.get('runtime')!r}, not {runtime!r}; "
                            f"{REBUILD}")
    if checkpoint_sha256 is not None and m.get("checkpoint_sha256") != checkpoint_sha256:
        raise ArtifactError(f"the checkpoint's sha256 {checkpoint_sha256[:12]}… is not the "
                            f"{str(m.get('checkpoint_sha256'))[:12]}… that {manifest_path.name} was built from; "
                            f"refusing to load; {REBUILD}")
    info = {k: m[k] for k in ("calibration", "qat", "accuracy", "note", "built_with") if k in m}
    if runtime not in PACKED:
        return None, info
    name = str(m.get("file") or "")
    path = manifest_path.parent / name
    if not name or Path(name).name != name:
        raise ArtifactError(f"{manifest_path.name} names no artifact file (or a path: {name!r}); {REBUILD}")
    if not path.is_file():
        raise ArtifactError(f"the {runtime} artifact {name} named in {manifest_path.name} is missing from the "
                            f"archive; refusing to load; {REBUILD}")
    actual = file_sha256(path)
    if actual != m.get("sha256"):
        raise ArtifactError(f"the {runtime} artifact {name} has sha256 {actual[:12]}…, not the "
                            f"{str(m.get('sha256'))[:12]}… recorded in {manifest_path.name}: it was changed after "
                            f"the archive was built; refusing to load; {REBUILD}")
    return path, {**info, "artifact": name, "artifact_sha256": actual}
