"""Fleet version management: the per-node operations of serving/rollout.py applied to every node, in order, with
gates. Before anything changes, every node must be UP in HAProxy, answer, agree on the model's default, and
hold (or be able to register) byte-identical archives. A version is registered, READY and smoke-checked on
every node before any default moves; defaults then move one node at a time, each node drained in HAProxy while
it switches. Any failure or interruption undoes what the operation did (defaults back, versions it registered
unregistered, HAProxy states and canary routes restored), so the fleet stays on the old version. Every step
is recorded in <fleet dir>/history.json.

Canary: a share of the requests on the model's default path goes to the canary version through HAProxy
(canary.map; every node has the version registered); the defaults do not move until `promote`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from serving import haproxy, server
from serving.archive import find_entry
from serving.fleet import NODE_CONFIG, Fleet, wait_up
from serving.manage import (
    READY_TIMEOUT,
    Client,
    IntegrityError,
    ServingError,
    undo_on_failure,
    verify_archive,
    wait_ready,
)
from serving.rollout import rollback_target, smoke_check

DRAIN_TIMEOUT = 60.0  # seconds for a drained node's requests in flight to finish


class Op:
    """One fleet operation: its steps go to history.json with a shared id."""

    def __init__(self, fleet: Fleet, kind: str, **fields: Any):
        self.fleet, self.kind, self.fields = fleet, kind, fields
        self.id = f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.steps: list[dict[str, Any]] = []

    def step(self, step: str, **detail: Any) -> None:
        self.steps.append(self.fleet.record(self.kind, step, id=self.id, **self.fields, **detail))


def _clients(fleet: Fleet) -> dict[str, Client]:
    """A client per node; every node must be UP in HAProxy and answer its management API."""
    states = haproxy.servers(fleet.haproxy)
    clients = {}
    for node in fleet.nodes:
        st = states.get(node.name, {})
        if not str(st.get("status", "")).startswith("UP"):
            raise ServingError(f"{node.name} is {st.get('status', 'unknown')} in HAProxy (last check: "
                               f"{st.get('check') or 'none'}); bring it back first (`python -m serving fleet "
                               f"restart {node.name}`); nothing changed")
        clients[node.name] = c = fleet.client(node)
        c.model_names()  # a node that does not answer fails here, before any change
    return clients


def _default(clients: dict[str, Client], name: str) -> str | None:
    """The model's default on every node (None: registered nowhere); nodes that disagree are an error."""
    defaults = {n: (c.default_version(name) if name in c.model_names() else None) for n, c in clients.items()}
    if len(set(defaults.values())) > 1:
        raise ServingError(f"{name}: nodes disagree on the default (" + ", ".join(
            f"{n} {v or 'not registered'}" for n, v in defaults.items()) + "); see `python -m serving fleet "
            "status`; nothing changed")
    return next(iter(defaults.values()))


def _archive(fleet: Fleet, clients: dict[str, Client], name: str, version: str) -> str:
    """The store's sha256 for name/version, once it checks and matches what every node registered."""
    verify_archive(fleet.store, name, version)
    sha = find_entry(fleet.store, name, version)["sha256"]
    for n, c in clients.items():
        recorded = fleet.archives(n).get(f"{name}/{version}")
        if recorded is None and c.is_registered(name, version):
            raise IntegrityError(f"{name} {version} is registered on {n} outside the fleet CLI, so its bytes are "
                                 f"unknown; unregister it there first; nothing changed")
        if recorded is not None and recorded != sha:
            raise IntegrityError(f"{name} {version}: {n} registered an archive with sha256 {recorded[:12]}…, the "
                                 f"store now holds {sha[:12]}…; nodes would serve different bytes under one "
                                 f"version; unregister it on {n} first; nothing changed")
    return sha


def _prepare(fleet: Fleet, op: Op, clients: dict[str, Client], name: str, version: str, sha: str,
             registered: list[str], ready_timeout: float, image: bytes | None) -> None:
    """Register everywhere (asynchronously: live traffic never stalls), then READY and a smoke check on each."""
    for n, c in clients.items():
        if not c.is_registered(name, version):
            c.register(name, version, wait=False)
            registered.append(n)
            fleet.note_registered(n, name, version, sha)
            op.step("register", node=n, sha256=sha)
    for n, c in clients.items():
        op.step("ready", node=n, workers=wait_ready(c, name, version, ready_timeout))
    for n, c in clients.items():
        op.step("smoke", node=n, ms=smoke_check(c, name, version, image)["ms"])


def _switch(fleet: Fleet, op: Op, clients: dict[str, Client], name: str, target: str, kind: str,
            switched: list[str]) -> None:
    """Make `target` the default node by node; each node drained in HAProxy (its requests in flight finish,
    no new ones arrive) while it switches, then ready again."""
    for n, c in clients.items():
        if c.default_version(name) == target:
            continue
        haproxy.set_state(fleet.haproxy, n, "drain")
        op.step("drain", node=n)
        try:
            op.step("idle", node=n, waited_s=haproxy.wait_idle(fleet.haproxy, n, DRAIN_TIMEOUT))
            previous = c.default_version(name)
            c.set_default(name, target, kind=kind)
            switched.append(n)
            op.step("set-default", node=n, previous=previous, default=target)
        finally:
            haproxy.set_state(fleet.haproxy, n, "ready")
            op.step("ready-in-haproxy", node=n)


def _undo(fleet: Fleet, op: Op, clients: dict[str, Client], name: str, version: str | None, back_to: str | None,
          registered: list[str], switched: list[str], kind: str,
          canary_before: dict[str, Any] | None) -> Callable[[], None]:
    """What puts the fleet back: the canary route as it was, the switched defaults back, versions registered by
    this operation unregistered (a default cannot be unregistered, so defaults first)."""
    def undo() -> None:
        _set_canary(fleet, name, canary_before)
        for n in switched:
            if back_to:
                clients[n].set_default(name, back_to, kind=kind)
        for n in registered:
            clients[n].unregister(name, version)
            fleet.note_registered(n, name, version, None)
        op.step("undone", switched_back=switched, unregistered=registered)
    return undo


def _set_canary(fleet: Fleet, name: str, canary: dict[str, Any] | None) -> None:
    """HAProxy's canary route for `name` (live, then on disk and in fleet.json); None ends it."""
    path = f"/predictions/{name}"
    haproxy.set_canary(fleet.haproxy, path, f"{canary['version']}/{canary['percent']}" if canary else None)
    if canary:
        fleet.canary[name] = dict(canary)
    else:
        fleet.canary.pop(name, None)
    fleet.save()
    haproxy.write_canary_map(fleet.haproxy, {f"/predictions/{m}": f"{c['version']}/{c['percent']}"
                                             for m, c in fleet.canary.items()})


def rollout(fleet: Fleet, name: str, version: str, ready_timeout: float = READY_TIMEOUT,
            image: bytes | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Register -> READY -> smoke on every node, then switch the default node by node (drained)."""
    with fleet.lock():
        clients = _clients(fleet)
        if name in fleet.canary:
            raise ServingError(f"a canary of {name} {fleet.canary[name]['version']} is active: `fleet promote` or "
                               "`fleet rollback` it first; nothing changed")
        previous = _default(clients, name)
        sha = _archive(fleet, clients, name, version)
        plan = {"model": name, "version": version, "previous": previous, "nodes": list(clients),
                "steps": ["register where missing (sha256 checked)", "READY on every node", "smoke on every node",
                          *([f"per node: drain, set default {previous} -> {version}, ready"] if previous
                            and previous != version else [])]}
        if dry_run:
            return {**plan, "dry_run": True}
        op = Op(fleet, "rollout", model=name, version=version)
        op.step("start", previous=previous, sha256=sha)
        registered: list[str] = []
        switched: list[str] = []
        undo = _undo(fleet, op, clients, name, version, previous, registered, switched, "rollback", None)
        with undo_on_failure(f"fleet rollout of {name} {version}", undo):
            _prepare(fleet, op, clients, name, version, sha, registered, ready_timeout, image)
            if previous and previous != version:
                _switch(fleet, op, clients, name, version, "rollout", switched)
        op.step("done")
        return {**plan, "id": op.id, "registered_on": registered, "switched": switched}


def canary(fleet: Fleet, name: str, version: str, percent: int, ready_timeout: float = READY_TIMEOUT,
           image: bytes | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Send `percent` % of the default path's requests to `version` (registered, READY and smoke-checked on
    every node first); the defaults stay. Again with another percent: the share changes."""
    if not isinstance(percent, int) or not 1 <= percent <= 99:
        raise ServingError(f"--percent must be an integer from 1 to 99, got {percent} (100 %: `fleet promote`; "
                           "0 %: `fleet rollback`); nothing changed")
    with fleet.lock():
        clients = _clients(fleet)
        current = _default(clients, name)
        if current is None:
            raise ServingError(f"{name} is not registered on the fleet: a canary needs a default to share with; "
                               f"`fleet rollout {name} {version}` instead; nothing changed")
        if version == current:
            raise ServingError(f"{name} {version} is already the default; nothing changed")
        active = fleet.canary.get(name)
        if active and active["version"] != version:
            raise ServingError(f"a canary of {name} {active['version']} is active: `fleet promote` or `fleet "
                               "rollback` it first; nothing changed")
        sha = _archive(fleet, clients, name, version)
        plan = {"model": name, "version": version, "percent": percent, "default": current,
                "steps": ["register where missing (sha256 checked)", "READY on every node", "smoke on every node",
                          f"HAProxy: {percent} % of /predictions/{name} -> /predictions/{name}/{version}"]}
        if dry_run:
            return {**plan, "dry_run": True}
        op = Op(fleet, "canary", model=name, version=version)
        op.step("start", default=current, percent=percent, before=active, sha256=sha)
        registered: list[str] = []
        undo = _undo(fleet, op, clients, name, version, None, registered, [], "rollback", active)
        with undo_on_failure(f"fleet canary of {name} {version}", undo):
            _prepare(fleet, op, clients, name, version, sha, registered, ready_timeout, image)
            _set_canary(fleet, name, {"version": version, "percent": percent})
            op.step("route", percent=percent)
        op.step("done")
        return {**plan, "id": op.id, "registered_on": registered}


def promote(fleet: Fleet, name: str, ready_timeout: float = READY_TIMEOUT, image: bytes | None = None,
            dry_run: bool = False) -> dict[str, Any]:
    """The canary version becomes the default on every node (READY + smoke, then node by node, drained); the
    canary route ends once every node has switched."""
    with fleet.lock():
        active = fleet.canary.get(name)
        if not active:
            raise ServingError(f"no canary of {name} is active; `fleet rollout {name} VERSION` switches directly")
        clients = _clients(fleet)
        previous, version = _default(clients, name), active["version"]
        sha = _archive(fleet, clients, name, version)
        plan = {"model": name, "version": version, "previous": previous,
                "steps": ["READY on every node", "smoke on every node",
                          f"per node: drain, set default {previous} -> {version}, ready", "end the canary route"]}
        if dry_run:
            return {**plan, "dry_run": True}
        op = Op(fleet, "promote", model=name, version=version)
        op.step("start", previous=previous, canary=active)
        switched: list[str] = []
        undo = _undo(fleet, op, clients, name, version, previous, [], switched, "rollback", active)
        with undo_on_failure(f"fleet promote of {name} {version}", undo):
            _prepare(fleet, op, clients, name, version, sha, [], ready_timeout, image)
            _switch(fleet, op, clients, name, version, "rollout", switched)
            _set_canary(fleet, name, None)
            op.step("route-ended")
        op.step("done")
        return {**plan, "id": op.id, "switched": switched}


def rollback(fleet: Fleet, name: str, to: str | None = None, ready_timeout: float = 30.0,
             image: bytes | None = None, dry_run: bool = False) -> dict[str, Any]:
    """With a canary active: end it (all traffic on the default again). Otherwise make the previous default
    (or `to`, a version that served as the default) the default on every node, once it is READY and passes a
    smoke check everywhere; node by node, drained. The target follows serving/rollout.py's rollback_target on
    each node's own history, and the nodes must agree on it."""
    with fleet.lock():
        active = fleet.canary.get(name)
        if active:
            if to is not None:
                raise ServingError(f"a canary of {name} {active['version']} is active: `fleet rollback {name}` "
                                   "(without --to) ends it first; nothing changed")
            plan = {"model": name, "ended_canary": active, "steps": ["end the canary route"]}
            if dry_run:
                return {**plan, "dry_run": True}
            op = Op(fleet, "rollback", model=name, version=active["version"])
            _set_canary(fleet, name, None)
            op.step("route-ended", canary=active)
            return {**plan, "id": op.id}
        clients = _clients(fleet)
        current = _default(clients, name)
        if current is None:
            raise ServingError(f"{name} is not registered on the fleet; nothing to roll back")
        targets = {n: rollback_target(c.history(), name, current, c.versions(name), to) for n, c in clients.items()}
        if len(set(targets.values())) > 1:
            raise ServingError(f"{name}: the nodes' histories point to different rollback targets (" + ", ".join(
                f"{n} {v}" for n, v in targets.items()) + "); name one with --to; nothing changed")
        target = next(iter(targets.values()))
        plan = {"model": name, "from": current, "to": target,
                "steps": ["READY on every node", "smoke on every node",
                          f"per node: drain, set default {current} -> {target}, ready"]}
        if dry_run:
            return {**plan, "dry_run": True}
        op = Op(fleet, "rollback", model=name, version=target)
        op.step("start", current=current)
        switched: list[str] = []
        # Undoing a rollback pushes the version it left again (kind rollout), as per-node history expects.
        undo = _undo(fleet, op, clients, name, None, current, [], switched, "rollout", None)
        with undo_on_failure(f"fleet rollback of {name} to {target}", undo):
            for n, c in clients.items():
                op.step("ready", node=n, workers=wait_ready(c, name, target, ready_timeout))
            for n, c in clients.items():
                op.step("smoke", node=n, ms=smoke_check(c, name, target, image)["ms"])
            _switch(fleet, op, clients, name, target, "rollback", switched)
        op.step("done")
        return {**plan, "id": op.id, "switched": switched}


def restart_node(fleet: Fleet, node_name: str, ready_timeout: float = READY_TIMEOUT) -> dict[str, Any]:
    """Restart one node's TorchServe (drained first; a crashed node is just started) and restore what the fleet
    recorded for it: the same archives (sha256 checked again), the fleet's default first so that no default
    change is needed, every version READY and smoke-checked; then HAProxy sends it requests again."""
    with fleet.lock():
        node = fleet.node(node_name)
        records = dict(fleet.archives(node.name))
        defaults = _restore_defaults(fleet, node.name, records)
        op = Op(fleet, "restart", node=node.name)
        op.step("start", archives=records, defaults=defaults)
        haproxy.set_state(fleet.haproxy, node.name, "drain")
        try:
            op.step("idle", waited_s=haproxy.wait_idle(fleet.haproxy, node.name, DRAIN_TIMEOUT))
            op.step("stopped", was_running=server.stop(node.runtime_dir))
            server.start(fleet.store, node.runtime_dir, node.ports, extra=NODE_CONFIG)
            op.step("started")
            client = fleet.client(node)
            order = sorted(records, key=lambda k: k.split("/", 1)[1] != defaults.get(k.split("/", 1)[0]))
            for key in order:
                name, version = key.split("/", 1)
                verify_archive(fleet.store, name, version)
                if find_entry(fleet.store, name, version)["sha256"] != records[key]:
                    raise IntegrityError(f"{name} {version}: the store's archive is no longer the one the fleet "
                                         f"registered ({records[key][:12]}…); not restoring it on {node.name}")
                client.register(name, version, wait=False)
                op.step("register", model=name, version=version)
            for key in order:
                name, version = key.split("/", 1)
                wait_ready(client, name, version, ready_timeout)
                op.step("smoke", model=name, version=version, ms=smoke_check(client, name, version)["ms"])
        finally:
            haproxy.set_state(fleet.haproxy, node.name, "ready")
        wait_up(fleet, [node.name], timeout=30)
        op.step("done")
        return {"node": node.name, "id": op.id, "restored": order, "defaults": defaults}


def _restore_defaults(fleet: Fleet, node: str, records: dict[str, str]) -> dict[str, str]:
    """{model: default} a restarted node must have: what the other nodes agree on, else its own last recorded
    default change, else its first recorded version."""
    models = {k.split("/", 1)[0] for k in records}
    others = {}
    for n in fleet.nodes:
        if n.name != node:
            try:
                c = fleet.client(n, timeout=10)
                others[n.name] = {m: c.default_version(m) for m in models if m in c.model_names()}
            except ServingError:
                continue
    out = {}
    for m in sorted(models):
        seen = {d[m] for d in others.values() if m in d}
        if len(seen) == 1:
            out[m] = seen.pop()
            continue
        mine = [e["to"] for e in fleet.client(fleet.node(node)).history() if e.get("name") == m]  # file only
        out[m] = mine[-1] if mine else next(k.split("/", 1)[1] for k in records if k.startswith(f"{m}/"))
    return out
