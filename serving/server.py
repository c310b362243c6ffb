"""Start and stop a real TorchServe 0.12 for one runtime directory, and find its addresses and tokens.

Everything TorchServe writes goes under the runtime dir (default `.runtime/`): config.properties, key_file.json
(written into its working directory), logs/ and config snapshots (LOG_LOCATION, METRICS_LOCATION), and tmp/.
The launcher keeps its pid file in the temp dir and Java extracts models and worker sockets there too, so a
per-runtime TMPDIR/TEMP lets several servers (e.g. tests next to a demo) run side by side and lets `stop`
touch only its own server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import psutil
import requests

from serving.config import ROOT, config_file, venv_tool

DEFAULT_RUNTIME = ROOT / ".runtime"
DEFAULT_STORE = ROOT / "model_store"
TEMPLATE = config_file("config.properties.template")
CONFIG_NAME = "config.properties"
KEY_FILE = "key_file.json"


class ServingError(RuntimeError):
    """A serving operation failed; the message is meant for a one-line CLI error."""


@dataclass(frozen=True)
class Ports:
    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    # TorchServe always starts its gRPC APIs too; a second server on the same ports dies right after startup.
    grpc_inference: int = 7070
    grpc_management: int = 7071


@dataclass(frozen=True)
class Endpoints:
    """Where a running server listens and the tokens it accepts (read from the runtime dir)."""

    inference_url: str
    management_url: str
    metrics_url: str
    inference_key: str
    management_key: str
    api_key: str


def free_ports(n: int = 5) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def allowed_urls_regex(store: Path) -> str:
    """Only .mar files directly inside the store. Registering by bare file name never hits this check
    (it is not a URL); any file:// or http(s):// URL must match it or the frontend refuses the register."""
    store_str = str(Path(store).resolve())
    if "," in store_str:  # allowed_urls is a comma-separated list of regexes
        raise ServingError(f"model store path must not contain a comma: {store_str}")
    return f"file://{re.escape(store_str)}/[^/]+\\.mar"


def _props_value(value: Any) -> str:
    return str(value).replace("\\", "\\\\")  # java.util.Properties treats backslash as an escape


def render_config(runtime_dir: Path, store: Path, ports: Ports = Ports(), extra: dict[str, Any] | None = None,
                  template: Path = TEMPLATE) -> Path:
    """Write <runtime_dir>/config.properties from the template; `extra` keys override or add properties."""
    runtime_dir.mkdir(parents=True, exist_ok=True)
    path = runtime_dir / CONFIG_NAME
    path.write_text(config_text(store, ports, extra, template))
    return path


def config_text(store: Path, ports: Ports = Ports(), extra: dict[str, Any] | None = None,
                template: Path = TEMPLATE) -> str:
    """config.properties from the template; `extra` keys override or add properties."""
    values = {
        "inference_port": ports.inference, "management_port": ports.management, "metrics_port": ports.metrics,
        "grpc_inference_port": ports.grpc_inference, "grpc_management_port": ports.grpc_management,
        "model_store": Path(store).resolve(), "load_models": "", "default_workers_per_model": 1,
        "token_expiration_min": 60, "allowed_urls": allowed_urls_regex(store),
    }
    text = Template(template.read_text()).substitute({k: _props_value(v) for k, v in values.items()})
    lines = text.splitlines()
    for key, value in (extra or {}).items():
        line = f"{key}={_props_value(value)}"
        idx = next((i for i, ln in enumerate(lines) if ln.split("=", 1)[0].strip() == key), None)
        if idx is None:
            lines.append(line)
        else:
            lines[idx] = line
    return "\n".join(lines) + "\n"


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def read_keys(runtime_dir: Path) -> dict[str, str]:
    """key_file.json: {"management": {"key", "expiration time"}, "inference": {...}, "API": {"key"}}."""
    path = Path(runtime_dir) / KEY_FILE
    try:
        data = json.loads(path.read_text())
        return {"management": data["management"]["key"], "inference": data["inference"]["key"],
                "api": data["API"]["key"]}
    except FileNotFoundError:
        raise ServingError(f"no {path}: is TorchServe running for this runtime dir? (`python -m serving serve`)") \
            from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ServingError(f"{path} is not a TorchServe key file ({e})") from None


def endpoints(runtime_dir: Path = DEFAULT_RUNTIME) -> Endpoints:
    cfg = Path(runtime_dir) / CONFIG_NAME
    if not cfg.is_file():
        raise ServingError(f"no {cfg}: start the server first (`python -m serving serve`)")
    props = read_properties(cfg)
    if props.get("disable_token_authorization", "").strip().lower() == "true":
        keys = {"management": "", "inference": "", "api": ""}  # a fleet node: the balancer checks the key
    else:
        keys = read_keys(runtime_dir)
    return Endpoints(props["inference_address"], props["management_address"], props["metrics_address"],
                     keys["inference"], keys["management"], keys["api"])


def renew_key(ep: Endpoints, runtime_dir: Path, token_type: str) -> Endpoints:
    """Ask the server for a fresh `token_type` key with the (non-expiring) API key; TorchServe rewrites
    key_file.json, which is read again. Keys expire after token_expiration_min."""
    try:
        requests.get(f"{ep.management_url}/token", params={"type": token_type}, timeout=10,
                     headers={"Authorization": f"Bearer {ep.api_key}"})
    except requests.RequestException:
        return ep
    keys = read_keys(runtime_dir)
    return Endpoints(ep.inference_url, ep.management_url, ep.metrics_url, keys["inference"], keys["management"],
                     keys["api"])


def server_env(runtime_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    logs, tmp = runtime_dir / "logs", runtime_dir / "tmp"
    logs.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    env.update(LOG_LOCATION=str(logs), METRICS_LOCATION=str(logs), TMPDIR=str(tmp), TEMP=str(tmp))
    # Workers must import our code from the .mar, not from a checkout that happens to be on PYTHONPATH.
    env.pop("PYTHONPATH", None)
    env.pop("TS_CONFIG_FILE", None)
    return env


def _torchserve() -> str:
    found = venv_tool("torchserve")
    if not found:
        raise ServingError("torchserve not found; run `make setup`")
    return found


def server_pid(runtime_dir: Path) -> int | None:
    """The Java frontend's pid for this runtime dir, if it is alive."""
    pid_file = Path(runtime_dir) / "tmp" / ".model_server.pid"
    try:
        pid = int(pid_file.read_text().strip())
        proc = psutil.Process(pid)
        return pid if "org.pytorch.serve.ModelServer" in proc.cmdline() else None
    except (OSError, ValueError, psutil.Error):
        return None


def log_tail(runtime_dir: Path, n: int = 20) -> str:
    """What went wrong, from the logs: error lines first (the Java launcher's stdout holds bind errors),
    else the last lines of ts_log.log."""
    logs = Path(runtime_dir) / "logs"
    errors: list[str] = []
    for name in ("launcher.log", "ts_log.log", "model_log.log"):
        path = logs / name
        if path.is_file():
            errors += [f"{name}: {ln.strip()}" for ln in path.read_text(errors="replace").splitlines()
                       if ("[ERROR" in ln or "Caused by" in ln or "Exception:" in ln) and "xpu-smi" not in ln]
    if errors:
        return "errors in " + str(logs) + ":\n" + "\n".join(dict.fromkeys(errors[-n:]))
    path = logs / "ts_log.log"
    if path.is_file():
        return f"last lines of {path}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return f"(no logs under {logs})"


def start(store: Path = DEFAULT_STORE, runtime_dir: Path = DEFAULT_RUNTIME, ports: Ports = Ports(),
          extra: dict[str, Any] | None = None, timeout: float = 120.0,
          models: list[tuple[str, str]] | None = None, ready_timeout: float = 180.0) -> Endpoints:
    """Start TorchServe (background), wait until it is up, then register `models` [(name, version)] from the
    store through the sha256-checked, asynchronous register, waiting up to `ready_timeout` s for each one's
    workers. On any failure the server is stopped again."""
    ep = _start(Path(store), Path(runtime_dir), ports, extra, timeout)
    if models:
        from serving.manage import Client

        try:
            client = Client(runtime_dir, store)
            for name, version in models:
                client.register(name, version, ready_timeout=ready_timeout)
        except BaseException:
            stop(runtime_dir)
            raise
    return ep


def _start(store: Path, runtime_dir: Path, ports: Ports, extra: dict[str, Any] | None, timeout: float) -> Endpoints:
    runtime_dir, store = Path(runtime_dir).resolve(), Path(store).resolve()
    if not store.is_dir():
        raise ServingError(f"model store not found: {store} (run `python -m serving archive --all`)")
    if server_pid(runtime_dir):
        raise ServingError(f"TorchServe is already running for {runtime_dir}; `python -m serving stop` first")
    cfg = render_config(runtime_dir, store, ports, extra)
    (runtime_dir / KEY_FILE).unlink(missing_ok=True)  # a stale key file would pass the readiness check
    cmd = [_torchserve(), "--start", "--ts-config", str(cfg), "--model-store", str(store)]
    env = server_env(runtime_dir)
    launcher_log = runtime_dir / "logs" / "launcher.log"  # the Java frontend's stdout/stderr
    with open(launcher_log, "wb") as out:
        proc = subprocess.run(cmd, cwd=runtime_dir, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise ServingError(f"torchserve --start failed (exit {proc.returncode}); {log_tail(runtime_dir)}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server_pid(runtime_dir) is None:  # e.g. a port already in use
            raise ServingError(f"TorchServe exited during startup; {log_tail(runtime_dir)}")
        # The REST APIs answer before the gRPC ones are bound; "Model server started." comes after both.
        if b"Model server started." not in launcher_log.read_bytes():
            time.sleep(0.3)
            continue
        try:
            ep = endpoints(runtime_dir)
            r = requests.get(f"{ep.management_url}/models", timeout=2,
                             headers={"Authorization": f"Bearer {ep.management_key}"})
            if r.status_code == 200:
                return ep
            if r.status_code == 400:  # a slow start can outlive a short token_expiration_min
                renew_key(ep, runtime_dir, "management")
        except (ServingError, requests.RequestException):
            pass
        time.sleep(0.3)
    stop(runtime_dir)
    raise ServingError(f"TorchServe did not answer within {timeout:.0f}s; {log_tail(runtime_dir)}")


def stop(runtime_dir: Path = DEFAULT_RUNTIME, timeout: float = 30.0) -> bool:
    """Stop the TorchServe of this runtime dir (frontend and its workers). Returns False if none was running."""
    runtime_dir = Path(runtime_dir).resolve()
    pid = server_pid(runtime_dir)
    if pid is None:
        return False
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        procs = []
    subprocess.run([_torchserve(), "--stop"], cwd=runtime_dir, env=server_env(runtime_dir),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:  # only this server's own processes
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    (runtime_dir / KEY_FILE).unlink(missing_ok=True)
    return True
