"""Rollout (register -> READY -> smoke prediction -> set-default -> retire old) and rollback of a default."""

from __future__ import annotations

from typing import Any

from serving.config import version_key
from serving.manage import Client, ServingError, smoke_image, wait_ready


def rollout(client: Client, name: str, version: str, retire_old: bool = False, image: bytes | None = None,
            ready_timeout: float = 180.0) -> dict[str, Any]:
    """Make name/version the default only once it is proven to answer. A version registered here and failing
    its smoke test is unregistered again, so a failed rollout leaves the server as it was."""
    previous = client.default_version(name) if name in client.model_names() else None
    registered_here = not client.is_registered(name, version)
    if registered_here:  # asynchronous: a synchronous register stalls some in-flight requests (Client.register)
        client.register(name, version, synchronous=False)
    try:
        wait_ready(client, name, version, timeout=ready_timeout)
        r = client.predict(name, image or smoke_image(), version=version)
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code != 200 or not isinstance(body, dict) or not body.get("predictions"):
            raise ServingError(f"smoke prediction on {name} {version} failed: HTTP {r.status_code} {r.text[:200]}")
    except ServingError:
        if registered_here:
            client.unregister(name, version)
        raise
    if previous != version:
        client.set_default(name, version, kind="rollout")
    retired = None
    if retire_old and previous and previous != version:
        client.unregister(name, previous)
        retired = previous
    return {"name": name, "version": version, "previous": previous, "retired": retired,
            "smoke_check": smoke_summary(name, version, body, custom_image=image is not None)}


def smoke_summary(name: str, version: str, body: dict[str, Any], custom_image: bool) -> dict[str, Any]:
    """The smoke check as a check: passed, on which request. The synthetic pattern's top-1 label means
    nothing, so it is shown only for an image the operator chose."""
    out = {"result": "passed", "request": f"POST /predictions/{name}/{version}", "status": 200,
           "answers": len(body["predictions"])}
    if custom_image:
        top = body["predictions"][0]
        out["top1"] = f"{top.get('label')} {top.get('probability')}"
    else:
        out["image"] = "synthetic test pattern (any label passes)"
    return out


def rollback_target(history: list[dict[str, Any]], name: str, current: str, registered: list[str]) -> str:
    """The version to make default again. Default changes form a stack (a rollback pops the change it
    undoes), so rolling back twice after two rollouts returns to the first version. Without usable history,
    the highest other registered version."""
    stack: list[dict[str, Any]] = []
    for e in (e for e in history if e.get("name") == name):
        top = stack[-1] if stack else None
        if e.get("kind") == "rollback" and top and (top["from"], top["to"]) == (e["to"], e["from"]):
            stack.pop()
        else:
            stack.append(e)
    others = [v for v in registered if v != current]
    if stack and stack[-1]["to"] == current and stack[-1]["from"] in others:
        return stack[-1]["from"]
    if not others:
        hint = ""
        if stack and stack[-1]["to"] == current:
            hint = f" (the previous default {stack[-1]['from']} is no longer registered; register it again first)"
        raise ServingError(f"cannot roll back {name}: no other version is registered besides {current}{hint}")
    return max(others, key=version_key)


def rollback(client: Client, name: str) -> dict[str, Any]:
    current = client.default_version(name)
    target = rollback_target(client.history(), name, current, client.versions(name))
    client.set_default(name, target, kind="rollback")
    return {"name": name, "from": current, "to": target}
