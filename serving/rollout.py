"""Rollout (register -> READY -> smoke check -> set-default -> retire old) and rollback of a default.

Default changes made through the CLI are recorded per runtime dir (Client.history). They form a stack:
rollout and set-default push the new default, rollback pops back to the default before it. So a rollback only
ever goes to a version that served as the default before, never forward: after 1.0 -> 2.0 -> 3.0, rollback
gives 2.0, a second rollback 1.0, and a third is refused (1.0 is the earliest default on record). To go
forward again, roll the version out. `rollback --to VERSION` names any version that served as the default.
Whatever the target, it must be registered, have all its workers READY and pass a smoke check first.
"""

from __future__ import annotations

import time
from typing import Any

from serving.manage import READY_TIMEOUT, Client, ServingError, smoke_image, undo_on_failure, wait_ready


def smoke_check(client: Client, name: str, version: str, image: bytes | None = None) -> dict[str, Any]:
    """POST one image to /predictions/<name>/<version>: it must answer 200 with predictions, from that version.
    Reported as a check (passed, on which request, answered by which version, how fast): the synthetic
    pattern's top-1 label means nothing, so it is shown only for an image the operator chose."""
    start = time.perf_counter()
    r = client.predict(name, image or smoke_image(), version=version)
    ms = round((time.perf_counter() - start) * 1000)
    try:
        body = r.json()
    except ValueError:
        body = None
    ok = (r.status_code == 200 and isinstance(body, dict) and bool(body.get("predictions"))
          and str(body.get("version", version)) == version)
    if not ok:
        raise ServingError(f"smoke check on {name} {version} failed: HTTP {r.status_code} {r.text[:200]}")
    out = {"result": "passed", "request": f"POST /predictions/{name}/{version}", "status": r.status_code,
           "answers": len(body["predictions"]), "answered_by": str(body.get("version", version)), "ms": ms}
    if image:
        top = body["predictions"][0]
        out["top1"] = f"{top.get('label')} {top.get('probability')}"
    else:
        out["image"] = "synthetic test pattern (any label passes)"
    return out


def rollout(client: Client, name: str, version: str, retire_old: bool = False, image: bytes | None = None,
            ready_timeout: float = READY_TIMEOUT, dry_run: bool = False) -> dict[str, Any]:
    """Make name/version the default only once it is proven to answer. Until the default is switched, any
    failure or interruption (Ctrl-C, SIGTERM) undoes what this rollout did: the default goes back and a version
    it registered is unregistered; a failing undo is reported next to the original error, never instead of it."""
    client.verify_archive(name, version)  # before anything changes, also in a dry run
    previous = client.default_version(name) if name in client.model_names() else None
    registered_here = not client.is_registered(name, version)
    plan = {"name": name, "version": version, "previous": previous,
            "steps": [*(["register (sha256 checked)"] if registered_here else []), "wait for READY workers",
                      "smoke check", *([f"set default {previous} -> {version}"] if previous != version else []),
                      *([f"unregister {previous}"] if retire_old and previous and previous != version else [])]}
    if dry_run:
        return {**plan, "dry_run": True}

    def undo() -> None:
        if previous and previous != version and client.default_version(name) == version:
            client.set_default(name, previous, kind="rollback")  # pops the switch if it was recorded
        if registered_here:
            client.unregister(name, version)

    with undo_on_failure(f"rollout of {name} {version}", undo):
        if registered_here:
            client.register(name, version, wait=False)
        wait_ready(client, name, version, ready_timeout)
        smoke = smoke_check(client, name, version, image)
        if previous != version:
            client.set_default(name, version, kind="rollout")
    retired = None
    if retire_old and previous and previous != version:
        client.unregister(name, previous)
        retired = previous
    return {"name": name, "version": version, "previous": previous, "retired": retired, "smoke_check": smoke}


def default_stack(history: list[dict[str, Any]], name: str) -> list[str]:
    """The defaults of `name` as a stack, oldest first: a rollout or set-default pushes, a rollback pops back
    to its target. A change whose `from` is not the top (the default was changed outside this CLI) pushes that
    version too: it served as the default."""
    stack: list[str] = []
    for e in (e for e in history if e.get("name") == name):
        frm, to = str(e.get("from")), str(e.get("to"))
        if e.get("kind") == "rollback" and to in stack:
            del stack[len(stack) - stack[::-1].index(to):]
            continue
        if not stack or stack[-1] != frm:
            stack.append(frm)
        stack.append(to)
    return stack


def rollback_target(history: list[dict[str, Any]], name: str, current: str, registered: list[str],
                    to: str | None = None) -> str:
    """The version a rollback makes the default: the default before `current` on the stack, or `to` when it
    served as the default at some point. Never a version that did not serve, never forward past the stack."""
    stack = default_stack(history, name)
    served = sorted({str(e.get(k)) for e in history if e.get("name") == name for k in ("from", "to")})
    if to is not None:
        if to == current:
            raise ServingError(f"{name} {to} is already the default")
        if to not in served:
            raise ServingError(f"cannot roll back {name} to {to}: it never served as the default (on record: "
                               f"{', '.join(served) or 'none'}); make a new version the default with rollout")
        target = to
    elif current not in stack:
        raise ServingError(f"cannot roll back {name}: no default change to {current} is on record in this runtime "
                           f"dir (changed outside this CLI?); name the target with --to (versions that served as "
                           f"the default: {', '.join(served) or 'none'})")
    else:
        below = stack[:len(stack) - 1 - stack[::-1].index(current)]
        if not below:
            raise ServingError(f"cannot roll back {name}: {current} is the earliest default on record; a rollback "
                               "never goes forward (use rollout to make another version the default)")
        target = below[-1]
    if target not in registered:
        raise ServingError(f"cannot roll back {name} to {target}: it is no longer registered; register it again "
                           f"first (`python -m serving register {name} {target}`)")
    return target


def rollback(client: Client, name: str, to: str | None = None, image: bytes | None = None,
             ready_timeout: float = 30.0, dry_run: bool = False) -> dict[str, Any]:
    """Make the previous default (or `to`) the default again, once it is registered, all its workers are READY
    and it passes a smoke check."""
    current = client.default_version(name)
    target = rollback_target(client.history(), name, current, client.versions(name), to)
    if dry_run:
        return {"name": name, "from": current, "to": target, "dry_run": True,
                "steps": ["wait for READY workers", "smoke check", f"set default {current} -> {target}"]}
    wait_ready(client, name, target, ready_timeout)
    smoke = smoke_check(client, name, target, image)
    client.set_default(name, target, kind="rollback")
    return {"name": name, "from": current, "to": target, "smoke_check": smoke}
