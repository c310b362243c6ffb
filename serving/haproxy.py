"""HAProxy in front of a local fleet: render its config from archive_configs/haproxy.cfg.template, start and stop
it, and drive it through its runtime API (a Unix socket): node states (drain / ready), live session counts,
canary routes and the fleet key map. Everything lives in one directory (<fleet dir>/haproxy/).
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template

import psutil

from serving.config import config_file
from serving.server import ServingError

TEMPLATE = config_file("haproxy.cfg.template")
BACKEND = "nodes"


@dataclass(frozen=True)
class Paths:
    """Where one HAProxy keeps its files."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "haproxy.cfg"

    @property
    def socket(self) -> Path:
        return self.root / "admin.sock"

    @property
    def keys_map(self) -> Path:
        return self.root / "keys.map"

    @property
    def canary_map(self) -> Path:
        return self.root / "canary.map"

    @property
    def pid_file(self) -> Path:
        return self.root / "haproxy.pid"

    @property
    def log(self) -> Path:
        return self.root / "haproxy.log"


def binary() -> str:
    """Debian installs HAProxy into /usr/sbin, which a normal user's PATH often lacks."""
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else None)
    if not found:
        raise ServingError("haproxy not found; run `make setup` (it installs Debian's haproxy package)")
    return found


def key_hash(key: str) -> str:
    """What keys.map stores for a key: the sha256 of the whole header value, as HAProxy's `hex` prints it."""
    return hashlib.sha256(f"Bearer {key}".encode()).hexdigest().upper()


def render(paths: Paths, port: int, stats_port: int, nodes: list[tuple[str, str]], keys: list[str],
           canary: dict[str, str] | None = None) -> Path:
    """Write haproxy.cfg and its maps. nodes: [(server name, "host:port")]; keys: accepted fleet keys;
    canary: {"/predictions/<model>": "<version>/<percent>"}."""
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.root.chmod(0o700)
    servers = "\n".join(f"    server {name} {addr}" for name, addr in nodes)
    text = Template(TEMPLATE.read_text()).substitute(
        admin_socket=paths.socket, port=port, stats_port=stats_port, keys_map=paths.keys_map,
        canary_map=paths.canary_map, servers=servers)
    _write(paths.keys_map, "".join(f"{key_hash(k)} fleet\n" for k in keys))
    write_canary_map(paths, canary or {})
    _write(paths.config, text)
    return paths.config


def write_canary_map(paths: Paths, canary: dict[str, str]) -> None:
    """The map file HAProxy reads at start; live changes go through set_canary as well."""
    _write(paths.canary_map, "".join(f"{k} {v}\n" for k, v in sorted(canary.items())))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(path)


def check(paths: Paths) -> None:
    """`haproxy -c`: a config HAProxy would refuse is an error before anything starts."""
    r = subprocess.run([binary(), "-c", "-f", str(paths.config)], capture_output=True, text=True)
    if r.returncode != 0:
        raise ServingError(f"HAProxy refuses {paths.config}: {(r.stdout + r.stderr).strip()[-600:]}")


def pid(paths: Paths) -> int | None:
    """The pid of the HAProxy running this config, if alive (a stale or reused pid is not ours)."""
    try:
        proc = psutil.Process(int(paths.pid_file.read_text().strip()))
        return proc.pid if str(paths.config) in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE else None
    except (OSError, ValueError, psutil.Error):
        return None


def start(paths: Paths, timeout: float = 10.0) -> int:
    """Start HAProxy in the background (its own session, log in haproxy.log) and wait for its runtime API."""
    check(paths)
    if pid(paths):
        raise ServingError(f"HAProxy is already running for {paths.config}")
    paths.socket.unlink(missing_ok=True)
    with open(paths.log, "ab") as log:
        proc = subprocess.Popen([binary(), "-f", str(paths.config)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    paths.pid_file.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = paths.log.read_text(errors="replace").strip().splitlines()[-5:]
            raise ServingError(f"HAProxy exited at start (exit {proc.returncode}): {' | '.join(tail)}")
        try:
            command(paths, "show info")
            return proc.pid
        except ServingError:
            time.sleep(0.1)
    stop(paths)
    raise ServingError(f"HAProxy's runtime API did not answer within {timeout:.0f}s; see {paths.log}")


def stop(paths: Paths, timeout: float = 10.0) -> bool:
    """Stop this HAProxy (SIGUSR1: finish the requests in flight, then exit; SIGKILL after `timeout`)."""
    found = pid(paths)
    if found is None:
        return False
    proc = psutil.Process(found)
    proc.send_signal(signal.SIGUSR1)
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    paths.pid_file.unlink(missing_ok=True)
    paths.socket.unlink(missing_ok=True)
    return True


def command(paths: Paths, cmd: str, timeout: float = 5.0) -> str:
    """One runtime API command; its answer. An answer that reports an error raises."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(paths.socket))
            s.sendall(cmd.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
    except OSError as e:
        raise ServingError(f"HAProxy runtime API {paths.socket}: {e}") from None
    out = b"".join(chunks).decode(errors="replace")
    first = out.strip().splitlines()[0] if out.strip() else ""
    if first.startswith(("Unknown command", "No such", "Require", "Permission denied")) or "not found" in first:
        raise ServingError(f"HAProxy runtime API: `{cmd}`: {first}")
    return out


def servers(paths: Paths) -> dict[str, dict[str, str | int]]:
    """{server: {status, check, sessions, queued, weight}} for the fleet's backend, from `show stat`."""
    text = command(paths, "show stat").lstrip("# ")
    out: dict[str, dict[str, str | int]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("pxname") == BACKEND and row.get("svname") not in ("BACKEND", "FRONTEND"):
            out[row["svname"]] = {"status": row["status"], "check": row.get("check_status", ""),
                                  "sessions": int(row["scur"] or 0), "queued": int(row["qcur"] or 0),
                                  "weight": int(row["weight"] or 0)}
    return out


def set_state(paths: Paths, server: str, state: str) -> None:
    """ready | drain (no new requests, the ones in flight finish) | maint."""
    command(paths, f"set server {BACKEND}/{server} state {state}")


def wait_idle(paths: Paths, server: str, timeout: float = 60.0) -> float:
    """Wait until a drained server has no request in flight or queued; returns the seconds waited."""
    t0 = time.monotonic()
    while True:
        s = servers(paths)[server]
        if not s["sessions"] and not s["queued"]:
            return round(time.monotonic() - t0, 2)
        if time.monotonic() - t0 > timeout:
            raise ServingError(f"{server} still has {s['sessions']} request(s) in flight after {timeout:.0f}s")
        time.sleep(0.05)


def set_canary(paths: Paths, path: str, value: str | None) -> None:
    """Route a share of `path` to a canary version ("<version>/<percent>"), or stop (value None), live."""
    current = command(paths, f"show map {paths.canary_map}")
    present = any(line.split()[1:2] == [path] for line in current.splitlines())
    if value is None:
        if present:
            command(paths, f"del map {paths.canary_map} {path}")
    elif present:
        command(paths, f"set map {paths.canary_map} {path} {value}")
    else:
        command(paths, f"add map {paths.canary_map} {path} {value}")
