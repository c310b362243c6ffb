"""The archive step: archive config + checkpoint -> model_store/<name>-<version>.mar, .sha256 and index.json.

The .mar carries the inference half of our code (the model registry and presets from `training/`, the image
pipeline from `handlers/`), so a TorchServe worker rebuilds the model exactly as the trainer defined it and
does not depend on the repository being on its PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from serving.config import ROOT, ArchiveConfig, ConfigError, venv_tool, version_key

DEFAULT_STORE = ROOT / "model_store"
INDEX_NAME = "index.json"
# The inference-side modules of `training/` (not data loading, training loop or recipes).
# data.py lets an int8 worker calibrate on the checkpoint's own training data (numpy/torch/PIL only).
TRAINING_FILES = ("__init__.py", "checkpoint.py", "presets.py", "evaluate.py", "data.py")


class ArchiveError(RuntimeError):
    """The archive could not be built (bad checkpoint, archiver failure)."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the store is shared read-only with the server
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _index_lock(store: Path) -> Iterator[None]:
    """Serialise read-modify-write of index.json between concurrent archive runs."""
    with open(store / ".index.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_index(store: str | Path = DEFAULT_STORE) -> list[dict[str, Any]]:
    path = Path(store) / INDEX_NAME
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArchiveError(f"{path} is not valid JSON ({e}); rebuild: `python -m serving archive --all`") from None
    if not isinstance(entries, list):
        raise ArchiveError(f"{path}: expected a JSON list")
    return entries


def find_entry(store: str | Path, name: str, version: str) -> dict[str, Any] | None:
    return next((e for e in read_index(store) if e.get("name") == name and e.get("version") == version), None)


def _update_index(store: Path, entry: dict[str, Any]) -> None:
    with _index_lock(store):
        key = (entry["name"], entry["version"])
        entries = [e for e in read_index(store) if (e.get("name"), e.get("version")) != key]
        entries.append(entry)
        entries.sort(key=lambda e: (e["name"], version_key(e["version"])))
        _atomic_write(store / INDEX_NAME, (json.dumps(entries, indent=2) + "\n").encode())


def check_checkpoint(cfg: ArchiveConfig) -> dict[str, Any]:
    """Load weights-only and rebuild the model, so a broken checkpoint fails here and not in a worker."""
    from training.checkpoint import CheckpointError, build_model, load_checkpoint
    from training.commands import train_command

    if not cfg.checkpoint.is_file():
        raise ArchiveError(f"{cfg.source or cfg.name}: checkpoint {cfg.checkpoint} not found; train it first: "
                           f"{train_command(cfg.checkpoint)}")
    try:
        ckpt = load_checkpoint(cfg.checkpoint)
        build_model(ckpt)
    except (CheckpointError, KeyError, RuntimeError, TypeError) as e:
        raise ArchiveError(f"{cfg.source or cfg.name}: checkpoint {cfg.checkpoint} is not usable: {e}") from None
    return ckpt


def stage_sources(dest: Path, root: Path = ROOT) -> Path:
    """Copy the packages the handler imports into dest/ (dest's contents become the archive root)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    (dest / "training").mkdir(parents=True)
    for name in TRAINING_FILES:
        shutil.copy2(root / "training" / name, dest / "training" / name)
    shutil.copytree(root / "training" / "models", dest / "training" / "models", ignore=ignore)
    from handlers import PIPELINES

    (dest / "handlers").mkdir()
    for src in sorted((root / "handlers").glob("*.py")):
        if src.name not in PIPELINES:  # handler entry files go in through --handler, at the archive root
            shutil.copy2(src, dest / "handlers" / src.name)
    return dest


def _archiver() -> str:
    found = venv_tool("torch-model-archiver")
    if not found:
        raise ArchiveError("torch-model-archiver not found; run `make setup`")
    return found


def build_archive(cfg: ArchiveConfig, store: str | Path = DEFAULT_STORE, root: Path = ROOT) -> dict[str, Any]:
    """Build <store>/<name>-<version>.mar (+ .sha256) and record it in <store>/index.json. Returns the entry."""
    store = Path(store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    if not cfg.handler.is_file():
        raise ArchiveError(f"{cfg.source or cfg.name}: handler not found: {cfg.handler}")
    ckpt = check_checkpoint(cfg)
    with tempfile.TemporaryDirectory(prefix="archive-") as tmp:
        tmp_path = Path(tmp)
        extra = stage_sources(tmp_path / "extra", root)
        model_config = tmp_path / "model-config.yaml"
        model_config.write_text(yaml.safe_dump(cfg.model_config(), sort_keys=False))
        export = tmp_path / "export"
        export.mkdir()
        cmd = [_archiver(), "--model-name", cfg.name, "--version", cfg.version,
               "--serialized-file", str(cfg.checkpoint), "--handler", str(cfg.handler),
               "--extra-files", str(extra), "--config-file", str(model_config),
               "--archive-format", "default", "--export-path", str(export), "--force"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        built = export / f"{cfg.name}.mar"
        if proc.returncode != 0 or not built.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise ArchiveError(f"torch-model-archiver failed for {cfg.name} {cfg.version}: {' | '.join(tail)}")
        # Copy next to the destination first, then rename: readers never see a half-written .mar.
        mar = store / cfg.mar_name
        fd, staged = tempfile.mkstemp(prefix=f".{mar.name}.", suffix=".tmp", dir=store)
        os.close(fd)
        try:
            shutil.copyfile(built, staged)
            os.chmod(staged, 0o644)
            digest = sha256_file(staged)
            os.replace(staged, mar)
        except BaseException:
            Path(staged).unlink(missing_ok=True)
            raise
    _atomic_write(store / f"{mar.name}.sha256", f"{digest}  {mar.name}\n".encode())
    entry = {
        "name": cfg.name, "version": cfg.version, "mar": mar.name, "sha256": digest,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "checkpoint": _display_path(cfg.checkpoint, root), "metrics": ckpt.get("metrics", {}),
        "arch": ckpt["arch"], "runtime": cfg.runtime, "torchserve": cfg.torchserve,
    }
    _update_index(store, entry)
    return entry


def _display_path(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def archive_all(paths: list[Path], store: str | Path = DEFAULT_STORE, root: Path = ROOT,
                skip_missing: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Validate every config first (fail before building anything), then build each archive.
    With skip_missing, a config whose checkpoint is not trained yet is skipped (and reported), not an error.
    Returns (index entries built, messages about skipped configs)."""
    from serving.config import load_config
    from training.commands import train_command

    configs = [load_config(p, root=root) for p in paths]
    seen: dict[tuple[str, str], Path | None] = {}
    for cfg in configs:
        key = (cfg.name, cfg.version)
        if key in seen:
            raise ConfigError(f"{cfg.source}: {cfg.name} {cfg.version} is also defined in {seen[key]}")
        seen[key] = cfg.source
    built, skipped = [], []
    for cfg in configs:
        if skip_missing and not cfg.checkpoint.is_file():
            skipped.append(f"skipped {cfg.name} {cfg.version}: no checkpoint {_display_path(cfg.checkpoint, root)}; "
                           f"train it first: {train_command(cfg.checkpoint)}")
            continue
        built.append(build_archive(cfg, store, root))
    return built, skipped
