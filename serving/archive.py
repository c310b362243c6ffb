"""The archive step: archive config + checkpoint -> model_store/<name>-<version>.mar, .sha256 and index.json.

The .mar carries the inference half of our code (the model registry and presets from `training/`, the image
pipeline from `handlers/`), so a TorchServe worker rebuilds the model exactly as the trainer defined it and
does not depend on the repository being on its PYTHONPATH.

A name+version is immutable: index.json records the hashes of everything that went into it (`inputs`).
Archiving the same inputs again changes nothing; different inputs are refused unless `replace` is given, which
is recorded in the entry. Archives are reproducible: entries in name order, fixed timestamps and modes, and a
fixed `createdOn` in the manifest, so the same inputs give the same .mar sha256 on any machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from handlers.artifacts import atomic_write
from handlers.artifacts import file_sha256 as sha256_file
from serving.config import PACKAGES, ROOT, ArchiveConfig, ConfigError, venv_tool, version_key

DEFAULT_STORE = ROOT / "model_store"
INDEX_NAME = "index.json"
# The inference-side modules of `training/` (not data loading, training loop or recipes): a worker never reads
# training data (int8 is calibrated at archive time, serving/artifacts.py). masks.py turns segmentation masks into
# detections (torch/numpy/scipy).
TRAINING_FILES = ("__init__.py", "checkpoint.py", "presets.py", "evaluate.py", "masks.py")


# Versions of the tools whose output lands in an archive: a change is a change of the archive's inputs.
TOOLS = ("torch", "onnx", "onnxruntime", "onnxscript", "torch-model-archiver")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)         # the earliest zip timestamp: every entry gets it
MANIFEST_CREATED = "01/01/1980 00:00:00"  # MANIFEST.json's createdOn (the real time is in index.json)


class ArchiveError(RuntimeError):
    """The archive could not be built (bad checkpoint, archiver failure, an immutable version changed)."""


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


def _write_index(store: Path, entry: dict[str, Any]) -> None:
    """Put `entry` into index.json (the caller holds _index_lock)."""
    key = (entry["name"], entry["version"])
    entries = [e for e in read_index(store) if (e.get("name"), e.get("version")) != key]
    entries.append(entry)
    entries.sort(key=lambda e: (e["name"], version_key(e["version"])))
    atomic_write(store / INDEX_NAME, (json.dumps(entries, indent=2) + "\n").encode())


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


def stage_sources(dest: Path, root: Path = PACKAGES) -> Path:
    """Copy the packages the handler imports, from the code that is running (a checkout or an installed
    package), into dest/ (dest's contents become the archive root)."""
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


def tool_versions() -> dict[str, str]:
    out = {}
    for pkg in TOOLS:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def archive_inputs(cfg: ArchiveConfig, extra: Path, model_config: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides an archive's bytes, as hashes: checkpoint, handler, staged sources, model-config
    and tool versions."""
    files = sorted(p for p in extra.rglob("*") if p.is_file())
    return {"checkpoint": sha256_file(cfg.checkpoint), "handler": sha256_file(cfg.handler),
            "sources": {str(p.relative_to(extra)): sha256_file(p) for p in files},
            "model_config": model_config, "artifact": cfg.artifact.as_dict(), "tools": tool_versions()}


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """A short list of what changed between two recorded `inputs`."""
    if not old:
        return "it was archived before input hashes were recorded"
    out = []
    for key in ("checkpoint", "handler", "model_config", "artifact", "tools"):
        if old.get(key) != new.get(key):
            out.append(key.replace("_", "-"))
    sources = old.get("sources", {}), new["sources"]
    changed = sorted(k for k in set(sources[0]) | set(sources[1]) if sources[0].get(k) != sources[1].get(k))
    if changed:
        out.append("code: " + ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else ""))
    return ", ".join(out) or "the archive file differs from its record"


def normalize_mar(src: Path, dst: Path) -> None:
    """Rewrite a .mar reproducibly: entries sorted by name, one fixed timestamp, mode 0644, deflated, and the
    manifest's `createdOn` fixed."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in sorted(zin.namelist()):
            data = zin.read(name)
            if name == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["createdOn"] = MANIFEST_CREATED
                data = (json.dumps(manifest, indent=2) + "\n").encode()
            info = zipfile.ZipInfo(name, ZIP_DATE)
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(info, data, compresslevel=6)


def build_archive(cfg: ArchiveConfig, store: str | Path = DEFAULT_STORE, root: Path = ROOT, replace: bool = False,
                  registered: Callable[[str, str], bool] | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Build <store>/<name>-<version>.mar (+ .sha256) and record it in <store>/index.json. Returns the entry
    (with "unchanged": True when the same inputs were archived already and nothing was written).

    The runtime artifact is built and measured first (serving/artifacts.py; `data_root` overrides where the
    checkpoint's dataset is read from) and packed with its manifest. An existing name+version with other inputs
    is refused unless `replace`; `registered(name, version)` says whether the version is registered on a
    running server, where a replace is refused too."""
    store = Path(store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    if not cfg.handler.is_file():
        raise ArchiveError(f"{cfg.source or cfg.name}: handler not found: {cfg.handler}")
    ckpt = check_checkpoint(cfg)
    mar = store / cfg.mar_name
    with tempfile.TemporaryDirectory(prefix="archive-") as tmp:
        tmp_path = Path(tmp)
        extra = stage_sources(tmp_path / "extra")
        inputs = archive_inputs(cfg, extra, cfg.model_config())
        unchanged = _existing(store, cfg, inputs, replace, registered)  # fail before the expensive part
        if unchanged is not None:
            return unchanged
        manifest = _build_artifact(cfg, ckpt, extra, data_root)
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
        # Written next to the destination first, then renamed: readers never see a half-written .mar.
        fd, staged = tempfile.mkstemp(prefix=f".{mar.name}.", suffix=".tmp", dir=store)
        os.close(fd)
        try:
            normalize_mar(built, Path(staged))
            os.chmod(staged, 0o644)
            sha = sha256_file(staged)
            with _index_lock(store):  # check again and commit: a concurrent archive run cannot slip in between
                unchanged = _existing(store, cfg, inputs, replace, registered)
                if unchanged is not None:
                    return unchanged
                existing = find_entry(store, cfg.name, cfg.version)
                if existing is not None and not replace and sha != existing.get("sha256"):
                    raise ArchiveError(f"{cfg.name} {cfg.version}: rebuilding {mar.name} from the recorded inputs "
                                       f"gave sha256 {sha[:12]}…, not the recorded "
                                       f"{str(existing.get('sha256'))[:12]}…; pass --replace to record the new one")
                os.replace(staged, mar)
                atomic_write(store / f"{mar.name}.sha256", f"{sha}  {mar.name}\n".encode())
                entry = _entry(cfg, ckpt, root, mar, sha, inputs, existing, manifest)
                _write_index(store, entry)
        finally:
            Path(staged).unlink(missing_ok=True)
    return entry


def _existing(store: Path, cfg: ArchiveConfig, inputs: dict[str, Any], replace: bool,
              registered: Callable[[str, str], bool] | None) -> dict[str, Any] | None:
    """The index entry (marked unchanged) when these inputs are archived already and the .mar is intact; None
    when a build may go ahead; ArchiveError when it may not (see _check_replace)."""
    existing = find_entry(store, cfg.name, cfg.version)
    if existing is None:
        return None
    same = existing.get("inputs_sha256") == digest(inputs)
    mar = store / cfg.mar_name
    if same and mar.is_file() and sha256_file(mar) == existing.get("sha256"):
        return {**existing, "unchanged": True}
    _check_replace(cfg, existing, inputs, same, replace, registered)
    return None


def _build_artifact(cfg: ArchiveConfig, ckpt: dict[str, Any], extra: Path, data_root: str | None) -> dict[str, Any]:
    from serving.artifacts import ArtifactBuildError, build_artifact

    try:
        return build_artifact(cfg, ckpt, extra, data_root)
    except ArtifactBuildError as e:
        raise ArchiveError(f"{cfg.source or cfg.name}: {e}") from None


def _entry(cfg: ArchiveConfig, ckpt: dict[str, Any], root: Path, mar: Path, sha: str, inputs: dict[str, Any],
           existing: dict[str, Any] | None, manifest: dict[str, Any]) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    entry = {
        "name": cfg.name, "version": cfg.version, "mar": mar.name, "sha256": sha, "created": now,
        "checkpoint": _display_path(cfg.checkpoint, root), "metrics": ckpt.get("metrics", {}),
        "arch": ckpt["arch"], "runtime": cfg.runtime, "torchserve": cfg.torchserve,
        "artifact": {k: manifest[k] for k in ("file", "sha256", "calibration", "qat", "note") if k in manifest},
        "accuracy": manifest["accuracy"], "inputs_sha256": digest(inputs), "inputs": inputs,
    }
    if existing is None:
        return entry
    history = list(existing.get("replaced", []))
    if existing.get("sha256") != sha:  # a recorded replace
        history.append({"sha256": existing.get("sha256"), "created": existing.get("created"),
                        "inputs_sha256": existing.get("inputs_sha256"), "replaced_at": now})
    else:  # the same bytes rebuilt (the file was missing or damaged): still the same version
        entry["created"] = existing.get("created", now)
    return {**entry, **({"replaced": history} if history else {})}


def _check_replace(cfg: ArchiveConfig, existing: dict[str, Any], inputs: dict[str, Any], same: bool, replace: bool,
                   registered: Callable[[str, str], bool] | None) -> None:
    """Refuse to overwrite an archived version, unless replace (and the version is not registered)."""
    if same:
        return  # the same inputs, the .mar missing or damaged: rebuild it (the bytes must come out the same)
    what = f"{cfg.name} {cfg.version}"
    if not replace:
        raise ArchiveError(
            f"{what} is already archived (sha256 {str(existing.get('sha256'))[:12]}…, {existing.get('created')}) "
            f"from other inputs ({_differences(existing.get('inputs', {}), inputs)}); versions are immutable: "
            f"give the change a new version, or rebuild this one with --replace (recorded in index.json)")
    if registered is not None and registered(cfg.name, cfg.version):
        raise ArchiveError(f"refusing to replace {what}: it is registered on the running server; unregister it "
                           f"first (`python -m serving unregister {cfg.name} {cfg.version}`)")


def _display_path(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def archive_all(paths: list[Path], store: str | Path = DEFAULT_STORE, root: Path = ROOT,
                skip_missing: bool = False, replace: bool = False,
                registered: Callable[[str, str], bool] | None = None,
                data_root: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
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
        built.append(build_archive(cfg, store, root, replace=replace, registered=registered, data_root=data_root))
    return built, skipped
