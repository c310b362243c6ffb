"""A local fleet: N TorchServe nodes on loopback (own ports and runtime dirs, one model store) behind HAProxy.

    <fleet dir>/          (default .fleet/)
      fleet.json          ports, nodes, the sha256 each node registered per version, canary routes
      key_file.json       the clients' fleet key, in TorchServe's key-file format: {"inference": {"key": ...}}
      history.json        every step of every fleet operation
      haproxy/            haproxy.cfg, its maps, the runtime API socket, haproxy.log
      node-1/, node-2/    each node's TorchServe runtime dir (config, logs, default_history.json)

The nodes run with token auth off and listen on 127.0.0.1 only; HAProxy checks the one fleet key (docs/fleet.md,
"Security"). Fleet operations (rollout, canary, ...) are in serving/fleet_ops.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from handlers.artifacts import write_json
from serving import haproxy, server
from serving.archive import find_entry
from serving.config import ROOT, version_key
from serving.manage import Client
from serving.server import KEY_FILE, Ports, ServingError

DEFAULT_FLEET = ROOT / ".fleet"
STATE_FILE = "fleet.json"
HISTORY_FILE = "history.json"
HISTORY_LIMIT = 2000
MAX_NODES = 16
# Behind the balancer: no per-node token (HAProxy checks the fleet key), loopback addresses from the template.
NODE_CONFIG = {"disable_token_authorization": "true"}


@dataclass(frozen=True)
class Node:
    name: str
    runtime_dir: Path
    ports: Ports

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports.inference}"


class Fleet:
    """A fleet's recorded state (fleet.json) and the handles to drive it."""

    def __init__(self, root: Path, state: dict[str, Any]):
        self.root, self.state = Path(root).resolve(), state
        self._mutex = threading.Lock()

    @classmethod
    def load(cls, root: Path = DEFAULT_FLEET) -> Fleet:
        path = Path(root) / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise ServingError(f"no fleet in {Path(root).resolve()}; start one with `python -m serving fleet up`") \
                from None
        except (OSError, json.JSONDecodeError) as e:
            raise ServingError(f"{path} is not readable ({e})") from None
        if state.get("stopped_at"):
            raise ServingError(f"the fleet in {Path(root).resolve()} is stopped; `python -m serving fleet up`")
        return cls(root, state)

    # -- layout -----------------------------------------------------------------------------------------------
    @property
    def store(self) -> Path:
        return Path(self.state["store"])

    @property
    def nodes(self) -> list[Node]:
        return [Node(n["name"], self.root / n["name"], Ports(*n["ports"])) for n in self.state["nodes"]]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ServingError(f"no node {name!r} in this fleet (nodes: {', '.join(n.name for n in self.nodes)})")

    @property
    def haproxy(self) -> haproxy.Paths:
        return haproxy.Paths(self.root / "haproxy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.state['port']}"

    @property
    def key_file(self) -> Path:
        return self.root / KEY_FILE

    def client(self, node: Node, timeout: float = 60.0) -> Client:
        return Client(node.runtime_dir, self.store, timeout=timeout)

    # -- recorded state ----------------------------------------------------------------------------------------
    def save(self) -> None:
        with self._mutex:
            write_json(self.root / STATE_FILE, self.state)

    def archives(self, node: str) -> dict[str, str]:
        """{"<name>/<version>": sha256} of what this node registered through the fleet."""
        return self.state.setdefault("archives", {}).setdefault(node, {})

    def note_registered(self, node: str, name: str, version: str, sha256: str | None) -> None:
        with self._mutex:
            key = f"{name}/{version}"
            if sha256 is None:
                self.archives(node).pop(key, None)
            else:
                self.archives(node)[key] = sha256
        self.save()

    @property
    def canary(self) -> dict[str, dict[str, Any]]:
        """{model: {"version", "percent"}} for the canary routes HAProxy applies."""
        return self.state.setdefault("canary", {})

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One fleet operation at a time: a second one fails at once instead of interleaving."""
        with open(self.root / ".fleet.lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ServingError(f"another fleet operation is running on {self.root}; try again when it "
                                   "has finished") from None
            yield

    def record(self, op: str, step: str, **detail: Any) -> dict[str, Any]:
        """Append one step to history.json (atomically: temp file + rename, under the state mutex)."""
        entry = {"at": datetime.now(UTC).isoformat(timespec="milliseconds"), "op": op, "step": step, **detail}
        with self._mutex:
            entries = (self.history() + [entry])[-HISTORY_LIMIT:]
            write_json(self.root / HISTORY_FILE, entries)
        return entry

    def history(self) -> list[dict[str, Any]]:
        try:
            return json.loads((self.root / HISTORY_FILE).read_text())
        except FileNotFoundError:
            return []
        except (OSError, json.JSONDecodeError) as e:
            raise ServingError(f"{self.root / HISTORY_FILE} is not readable ({e}); fix or move it away") from None


# -- up / down ---------------------------------------------------------------------------------------------------
def _prepare_dir(root: Path) -> None:
    """A new fleet goes into an empty dir or the dir of a stopped fleet (whose files it replaces)."""
    state_path = root / STATE_FILE
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            state = {}
        running = haproxy.pid(haproxy.Paths(root / "haproxy")) or any(
            server.server_pid(root / n["name"]) for n in state.get("nodes", []))
        if running:
            raise ServingError(f"a fleet is already running in {root}; `python -m serving fleet down` first")
        for n in state.get("nodes", []):
            shutil.rmtree(root / n["name"], ignore_errors=True)
        shutil.rmtree(root / "haproxy", ignore_errors=True)
        for name in (STATE_FILE, HISTORY_FILE, KEY_FILE):
            (root / name).unlink(missing_ok=True)
    elif root.exists() and any(root.iterdir()):
        raise ServingError(f"{root} is not empty and holds no fleet; give an empty or new --fleet-dir")
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)


def _write_key_file(path: Path, key: str) -> None:
    """The fleet key in TorchServe's key-file format, so existing clients read it the same way."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"inference": {"key": key}}, f, indent=2)
        f.write("\n")


def up(root: Path, store: Path, nodes: int, models: list[tuple[str, str]], port: int, stats_port: int,
       timeout: float = 120.0) -> Fleet:
    """Start `nodes` TorchServe nodes with `models` registered (sha256-checked) and HAProxy in front; wait until
    HAProxy's health checks pass on every node. On any failure everything started is stopped again."""
    root, store = Path(root).resolve(), Path(store).resolve()
    if not 1 <= nodes <= MAX_NODES:
        raise ServingError(f"--nodes must be between 1 and {MAX_NODES}, got {nodes}")
    if not models:
        raise ServingError("no model to serve: give --models name[:version],...")
    for name, version in models:
        if find_entry(store, name, version) is None:
            raise ServingError(f"{name} {version} is not archived in {store}; run `python -m serving archive` first")
    _prepare_dir(root)
    ports = [p for p in server.free_ports(5 * nodes + 2) if p not in (port, stats_port)][:5 * nodes]
    state = {"store": str(store), "port": port, "stats_port": stats_port, "models": [list(m) for m in models],
             "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
             "nodes": [{"name": f"node-{i + 1}", "ports": ports[5 * i:5 * i + 5]} for i in range(nodes)]}
    fleet = Fleet(root, state)
    fleet.save()
    key = secrets.token_urlsafe(24)
    try:
        with ThreadPoolExecutor(max_workers=nodes) as pool:
            list(pool.map(lambda n: start_node(fleet, n, models, timeout), fleet.nodes))
        haproxy.render(fleet.haproxy, port, stats_port, [(n.name, n.address) for n in fleet.nodes], [key])
        haproxy.start(fleet.haproxy)
        wait_up(fleet, [n.name for n in fleet.nodes], timeout=30)
        _write_key_file(fleet.key_file, key)
    except BaseException:
        down(root)
        raise
    fleet.record("up", "done", nodes=nodes, models=[f"{n}:{v}" for n, v in models], url=fleet.url)
    return fleet


def start_node(fleet: Fleet, node: Node, models: list[tuple[str, str]], timeout: float = 120.0) -> None:
    """Start one node's TorchServe and register `models` in order (the first version of a model becomes its
    default), recording the sha256 each was registered with."""
    for name, version in models:
        fleet.note_registered(node.name, name, version, None)
    server.start(fleet.store, node.runtime_dir, node.ports, extra=NODE_CONFIG, timeout=timeout, models=models)
    for name, version in models:
        fleet.note_registered(node.name, name, version, find_entry(fleet.store, name, version)["sha256"])


def wait_up(fleet: Fleet, names: list[str], timeout: float = 30.0) -> None:
    """Wait until HAProxy's health checks see these nodes UP."""
    deadline = time.monotonic() + timeout
    while True:
        states = haproxy.servers(fleet.haproxy)
        pending = [n for n in names if not str(states.get(n, {}).get("status", "")).startswith("UP")]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise ServingError("HAProxy's health checks do not pass on " + ", ".join(
                f"{n} ({states.get(n, {}).get('status')}, {states.get(n, {}).get('check')})" for n in pending))
        time.sleep(0.2)


def down(root: Path = DEFAULT_FLEET) -> list[str]:
    """Stop this fleet's HAProxy and nodes (only processes this fleet started); returns what was stopped."""
    root = Path(root).resolve()
    try:
        state = json.loads((root / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        raise ServingError(f"no fleet in {root}") from None
    stopped = ["haproxy"] if haproxy.stop(haproxy.Paths(root / "haproxy")) else []
    names = [n["name"] for n in state.get("nodes", [])]
    with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        results = list(pool.map(lambda n: server.stop(root / n), names))
    stopped += [n for n, was in zip(names, results) if was]
    (root / KEY_FILE).unlink(missing_ok=True)
    state["stopped_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    write_json(root / STATE_FILE, state)
    return stopped


# -- status --------------------------------------------------------------------------------------------------------
def node_models(client: Client) -> dict[str, dict[str, Any]]:
    """{model: {"default", "versions": {version: "ready/all"}}} of one node."""
    return {m["name"]: {"default": m["default"],
                        "versions": {v["version"]: f"{v['ready']}/{v['workers']}" for v in m["versions"]}}
            for m in client.overview()}


def status(fleet: Fleet) -> dict[str, Any]:
    """Per node: HAProxy's view (state, last check, requests in flight) and the node's own (models, versions,
    default, workers); plus the drift: every way in which the nodes disagree or a node is not serving."""
    try:
        balancer = haproxy.servers(fleet.haproxy)
    except ServingError as e:
        balancer = {}
        drift = [f"HAProxy is not answering ({e})"]
    else:
        drift = []
    rows = []
    for node in fleet.nodes:
        hb = balancer.get(node.name, {})
        row: dict[str, Any] = {"node": node.name, "address": node.address, "balancer": hb.get("status", "?"),
                               "check": hb.get("check", ""), "in_flight": hb.get("sessions", 0)}
        try:
            row["models"] = node_models(fleet.client(node, timeout=10))
        except ServingError as e:
            row["models"], row["error"] = {}, str(e)
        rows.append(row)
    drift += _drift(fleet, rows)
    return {"url": fleet.url, "key_file": str(fleet.key_file), "nodes": rows, "canary": fleet.canary,
            "drift": drift}


def _drift(fleet: Fleet, rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if "error" in r:
            out.append(f"{r['node']} does not answer: {r['error']}")
        elif not str(r["balancer"]).startswith("UP"):
            out.append(f"{r['node']} is {r['balancer']} in HAProxy (last check: {r['check'] or 'none'})")
    live = [r for r in rows if "error" not in r]
    for name in sorted({m for r in live for m in r["models"]}):
        defaults = {r["node"]: r["models"].get(name, {}).get("default") for r in live}
        versions = {r["node"]: sorted(r["models"].get(name, {}).get("versions", {}), key=version_key) for r in live}
        if len(set(defaults.values())) > 1:
            out.append(f"{name}: nodes disagree on the default (" + _by_node(defaults) + ")")
        if len({tuple(v) for v in versions.values()}) > 1:
            out.append(f"{name}: nodes disagree on the registered versions (" + _by_node(
                {n: ",".join(v) or "none" for n, v in versions.items()}) + ")")
    shas: dict[str, dict[str, str]] = {}
    for r in live:
        for key, sha in fleet.archives(r["node"]).items():
            shas.setdefault(key, {})[r["node"]] = sha[:12]
    for key, by_node in sorted(shas.items()):
        if len(set(by_node.values())) > 1:
            out.append(f"{key.replace('/', ' ')}: nodes registered different archives (" + _by_node(by_node) + ")")
    return out


def _by_node(values: dict[str, Any]) -> str:
    return ", ".join(f"{n} {v}" for n, v in values.items())
