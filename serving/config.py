"""Archive configs: archive_configs/<model>/<version>.yaml, one file per served model version.

Validated strictly (an unknown key is an error naming the file and the key), so a typo such as
`maxBatchDelays` never silently falls back to a TorchServe default.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from handlers.artifacts import CALIBRATION_IMAGES, CALIBRATION_SEED, MANIFEST, MAX_ACCURACY_DROP

PACKAGES = Path(__file__).resolve().parents[1]  # where training/, handlers/, serving/ are: a checkout or site-packages


def _project_root() -> Path:
    """The project: the source checkout these packages run from (it has archive_configs/), else the current
    directory (an installed package: archive configs, checkpoints, model store and runtime dir are the user's)."""
    return PACKAGES if (PACKAGES / "archive_configs").is_dir() else Path.cwd()


ROOT = _project_root()
CONFIG_DIR = ROOT / "archive_configs"
DEVICE_TYPES = ("cpu", "gpu")
DEFAULT_HANDLER = "handlers/classifier.py"
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")  # plain TorchServe model names, usable in URLs and file names
VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# key -> (required, type check, description of the allowed values)
TOP_KEYS = {"name", "version", "checkpoint", "handler", "runtime", "description", "torchserve", "artifact"}
TOP_REQUIRED = ("name", "version", "checkpoint", "runtime", "torchserve")
# TorchServe model-config keys we allow; the first six are required so every archive states its batching.
TS_INT_KEYS = {"batchSize": 1, "maxBatchDelay": 0, "minWorkers": 0, "maxWorkers": 1, "responseTimeout": 1,
               "startupTimeout": 1}
TS_REQUIRED = ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers", "responseTimeout", "deviceType")
CALIBRATION_KINDS = ("dataset", "synthetic")
SET_BY_ARCHIVE = ("runtime", "artifact")  # handler options the archive step writes itself


@dataclass
class ArtifactSpec:
    """How the archive step builds and checks a version's runtime artifact (the `artifact:` block)."""

    calibration: str = "dataset"   # int8: a seeded sample of the checkpoint's training split; "synthetic": no data
    calibration_images: int = CALIBRATION_IMAGES
    calibration_seed: int = CALIBRATION_SEED
    max_accuracy_drop: float | None = MAX_ACCURACY_DROP  # points vs the fp32 checkpoint; None: not checked
    accuracy_images: int | None = None  # test images measured (None: the whole test split)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ConfigError(ValueError):
    """An archive config that is missing, malformed or has unknown/invalid keys."""


@dataclass
class ArchiveConfig:
    name: str
    version: str
    checkpoint: Path  # absolute
    handler: Path  # absolute
    runtime: str
    description: str
    torchserve: dict[str, Any]  # TorchServe model-config keys (without `handler`)
    handler_options: dict[str, Any] = field(default_factory=dict)
    artifact: ArtifactSpec = field(default_factory=ArtifactSpec)
    source: Path | None = None

    @property
    def mar_name(self) -> str:
        return f"{self.name}-{self.version}.mar"

    def model_config(self) -> dict[str, Any]:
        """The model-config yaml packed into the .mar (torch-model-archiver --config-file); the handler finds
        the artifact manifest next to the checkpoint, and learns the frontend's response limit (max_answer_bytes):
        TorchServe drops a worker whose answer is larger."""
        answer = {"max_answer_bytes": frontend_limits()["max_response_size"]}
        return {**self.torchserve, "handler": {**answer, **self.handler_options, "runtime": self.runtime,
                                               "artifact": MANIFEST}}


def frontend_limits(template: Path | None = None) -> dict[str, int]:
    """max_request_size and max_response_size (bytes) of the TorchServe frontend, from the config template."""
    path = template or config_file("config.properties.template")
    props = dict(line.split("=", 1) for line in path.read_text().splitlines()
                 if "=" in line and not line.lstrip().startswith("#"))
    return {key: int(props[key].strip()) for key in ("max_request_size", "max_response_size")}


# handler options bounded by the frontend: a body over max_request_size gets an empty 413 from the frontend
# before the handler's own limit could answer, and an answer over max_response_size kills the worker
_FRONTEND_BOUNDS = {"max_image_bytes": "max_request_size", "max_video_bytes": "max_request_size",
                    "max_answer_bytes": "max_response_size"}


def _int(src: str, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{src}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _resolve(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (root / p)


def _handler_options(source: str, opts: Any, handler: Path) -> dict[str, Any]:
    """The model-config `handler:` block, checked against the options that handler's pipeline accepts
    (its class's OPTIONS, one list for both). `runtime` comes from the top-level key."""
    from handlers import pipeline_class
    from handlers.options import check_options, decode_limits

    if not isinstance(opts, dict):
        raise ConfigError(f"{source}: torchserve.handler must be a mapping of handler options")
    if "runtime" in opts:
        raise ConfigError(f"{source}: key 'torchserve.handler.runtime' is not allowed; set the top-level runtime")
    if "artifact" in opts:
        raise ConfigError(f"{source}: key 'torchserve.handler.artifact' is not allowed; the archive step sets it")
    try:
        options = pipeline_class(handler.name).OPTIONS
    except KeyError as e:
        raise ConfigError(f"{source}: handler {handler.name}: {e.args[0]}") from None
    unknown = sorted(set(opts) - set(options))
    if unknown:
        raise ConfigError(f"{source}: unknown key 'torchserve.handler.{unknown[0]}' "
                          f"(allowed: {', '.join(sorted(set(options) - set(SET_BY_ARCHIVE)))})")
    try:
        check_options(opts, options)
        decode_limits(opts)
    except ValueError as e:
        raise ConfigError(f"{source}: torchserve.handler: {e}") from None
    limits = frontend_limits()
    for key, value in opts.items():
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ConfigError(f"{source}: torchserve.handler.{key} must be >= 1, got {value}")
        bound = _FRONTEND_BOUNDS.get(key)
        if bound and value > limits[bound]:
            raise ConfigError(f"{source}: torchserve.handler.{key} ({value}) is over the frontend's {bound} "
                              f"({limits[bound]}, archive_configs/config.properties.template)")
    return dict(opts)


def _artifact_spec(source: str, data: Any) -> ArtifactSpec:
    if data is None:
        return ArtifactSpec()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: artifact must be a mapping")
    allowed = ArtifactSpec.__dataclass_fields__
    _check_keys(source, data, allowed, (), prefix="artifact.")
    spec = ArtifactSpec(**data)
    if spec.calibration not in CALIBRATION_KINDS:
        raise ConfigError(f"{source}: artifact.calibration must be one of {', '.join(CALIBRATION_KINDS)}")
    _int(source, "artifact.calibration_images", spec.calibration_images, 1)
    _int(source, "artifact.calibration_seed", spec.calibration_seed, 0)
    if spec.accuracy_images is not None:
        _int(source, "artifact.accuracy_images", spec.accuracy_images, 1)
    drop = spec.max_accuracy_drop
    if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or drop < 0):
        raise ConfigError(f"{source}: artifact.max_accuracy_drop must be a number of points >= 0, or null "
                          f"(no check), got {drop!r}")
    return spec


def _check_keys(source: str, data: dict[str, Any], allowed: Any, required: Any, prefix: str = "") -> None:
    """An unknown key or a missing required one is an error naming the file and the key."""
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")
    for key in required:
        if key not in data:
            raise ConfigError(f"{source}: missing required key '{prefix}{key}'")


def parse_config(data: Any, source: str = "<config>", root: Path = ROOT) -> ArchiveConfig:
    """Validate a loaded YAML mapping and return an ArchiveConfig (paths resolved against `root`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    _check_keys(source, data, TOP_KEYS, TOP_REQUIRED)
    name, version = data["name"], data["version"]
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{source}: name must match {NAME_RE.pattern}, got {name!r}")
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ConfigError(f"{source}: version must be a quoted string like \"1.0\", got {version!r}")
    from handlers.runtimes import RUNTIMES

    if data["runtime"] not in RUNTIMES:
        raise ConfigError(f"{source}: runtime must be one of {', '.join(RUNTIMES)}, got {data['runtime']!r}")
    for key in ("checkpoint", "handler", "description"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{source}: {key} must be a string")

    ts = data["torchserve"]
    if not isinstance(ts, dict):
        raise ConfigError(f"{source}: torchserve must be a mapping")
    _check_keys(source, ts, set(TS_INT_KEYS) | {"deviceType", "handler"}, TS_REQUIRED, prefix="torchserve.")
    block = {k: _int(source, f"torchserve.{k}", v, TS_INT_KEYS[k]) for k, v in ts.items() if k in TS_INT_KEYS}
    if block["maxWorkers"] < block["minWorkers"]:
        raise ConfigError(f"{source}: torchserve.maxWorkers must be >= torchserve.minWorkers")
    if ts["deviceType"] not in DEVICE_TYPES:
        raise ConfigError(f"{source}: torchserve.deviceType must be one of {', '.join(DEVICE_TYPES)}")
    block["deviceType"] = ts["deviceType"]

    handler = _resolve(data.get("handler", DEFAULT_HANDLER), root)
    if not handler.is_file() and not Path(data.get("handler", DEFAULT_HANDLER)).is_absolute():
        handler = _resolve(data.get("handler", DEFAULT_HANDLER), PACKAGES)  # the installed package's handler
    opts = _handler_options(source, ts.get("handler") or {}, handler)

    return ArchiveConfig(name=name, version=version, checkpoint=_resolve(data["checkpoint"], root),
                         handler=handler, runtime=data["runtime"],
                         description=data.get("description", ""), torchserve=block, handler_options=opts,
                         artifact=_artifact_spec(source, data.get("artifact")))


def load_config(path: str | Path, root: Path = ROOT) -> ArchiveConfig:
    """Load archive_configs/<name>/<version>.yaml; the folder and file names must agree with name/version."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"archive config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    cfg = parse_config(data, source=str(path), root=root)
    if (path.parent.name, path.stem) != (cfg.name, cfg.version):
        raise ConfigError(f"{path}: expected at <configs>/{cfg.name}/{cfg.version}.yaml (name/version mismatch)")
    cfg.source = path
    return cfg


def config_file(name: str) -> Path:
    """A file of archive_configs/ such as the config.properties template: the project's own copy, else the one
    installed with the package (serving/templates/, pyproject.toml)."""
    own = CONFIG_DIR / name
    return own if own.is_file() else Path(__file__).resolve().parent / "templates" / name


def find_configs(config_dir: Path = CONFIG_DIR) -> list[Path]:
    """Every <model>/<version>.yaml under config_dir, sorted."""
    return sorted(p for p in config_dir.glob("*/*.yaml") if p.is_file())


def version_key(version: str) -> tuple:
    """Sort key for versions: numeric parts compare as numbers ("1.10" > "1.9"), others as text."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in str(version).split("."))


def venv_tool(name: str) -> str | None:
    """A console script of this environment (torchserve, torch-model-archiver), else one on PATH."""
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.is_file() else shutil.which(name)


def archive_hint(name: str, version: str | None = None, store: Path | None = None,
                 config_dir: Path = CONFIG_DIR) -> str:
    """What to run so that name/version (None: its highest configured version) is in the store: the archive
    command, after the training command when the config's checkpoint does not exist yet."""
    from serving.archive import DEFAULT_STORE
    from training.commands import project_command, python_command, shown_path, train_args

    configured = sorted((p.stem for p in (config_dir / name).glob("*.yaml")), key=version_key)
    if not configured:
        models = sorted(p.parent.name for p in find_configs(config_dir))
        return (f"there is no archive config for {name} in {shown_path(config_dir)}/ "
                f"(configured models: {', '.join(dict.fromkeys(models)) or 'none'})")
    version = version or configured[-1]
    if version not in configured:
        return f"{name} has no archive config for version {version} (configured: {', '.join(configured)})"
    path = config_dir / name / f"{version}.yaml"
    store_arg = "" if store is None or Path(store).resolve() == DEFAULT_STORE.resolve() else \
        f" --store {shown_path(store)}"
    archive = f"serving archive --config {shown_path(path)}{store_arg}"
    try:
        checkpoint = load_config(path).checkpoint
    except ConfigError as e:
        return f"fix its archive config first: {e}"
    if checkpoint.is_file():
        return f"archive it: {project_command(archive)}"
    return (f"train and archive it: {project_command(train_args(checkpoint))} && "
            f"{python_command()} -m {archive}")
