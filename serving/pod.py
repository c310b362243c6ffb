"""What runs inside a serving pod besides TorchServe (deploy/, docs/fleet.md):

    python -m serving.pod stage --store /store --dest /models fmnist-lenet5:1.0   # init container
    python -m serving.pod probe live  --config /config/config.properties          # liveness
    python -m serving.pod probe ready --config /config/config.properties          # readiness / startup

`stage` copies the named archives from the (shared, read-only) store into the pod's own model dir, and only
after the copy's sha256 equals both index.json and the .sha256 file: TorchServe then loads bytes that were
checked, and a store changed later cannot change what this pod serves.

The probes work with TorchServe's token auth on or off: with it on, `/ping` needs the inference key and the
management API the management key, which TorchServe writes to key_file.json in its working directory (`--workdir`).
`live`: GET /ping answers 200. `ready`: live, and every registered model's default version has all its workers
READY (at least one). Standard library only: a probe starts in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def stage(store: Path, dest: Path, models: list[tuple[str, str]]) -> list[str]:
    """Copy each name/version's .mar into `dest` once its sha256 checks; returns the file names."""
    from serving.archive import find_entry, sha256_file
    from serving.manage import IntegrityError, verify_archive
    from serving.server import ServingError

    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name, version in models:
        if find_entry(store, name, version) is None:  # (the image has no archive configs to hint at)
            raise ServingError(f"{name} {version} is not in {store / 'index.json'}: the model-store volume lacks "
                               "this version")
        mar = verify_archive(store, name, version)  # the store's copy: file == index.json == .sha256
        tmp = dest / f".{mar}.partial"
        shutil.copyfile(store / mar, tmp)
        want = find_entry(store, name, version)["sha256"]
        got = sha256_file(tmp)
        if got != want:  # the store changed under us, or the copy is bad
            tmp.unlink()
            raise IntegrityError(f"{mar}: the copy's sha256 {got[:12]}… differs from the index's {want[:12]}…")
        tmp.replace(dest / mar)
        out.append(mar)
    return out


def _props(config: Path) -> dict[str, str]:
    from serving.server import read_properties

    return read_properties(config)


def _local(address: str) -> str:
    """TorchServe listens on 0.0.0.0 in a pod; the probe connects to loopback."""
    return address.replace("0.0.0.0", "127.0.0.1").rstrip("/")


def _get(url: str, key: str | None, timeout: float) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    try:
        return status, json.loads(body or b"null")
    except ValueError:
        return status, body[:200].decode(errors="replace")


def probe(kind: str, config: Path, workdir: Path, timeout: float = 3.0) -> str:
    """Raise RuntimeError (one line) unless the server is live (or ready); returns what was checked."""
    props = _props(config)
    keys: dict[str, str | None] = {"inference": None, "management": None}
    if props.get("disable_token_authorization", "false").strip().lower() != "true":
        try:
            data = json.loads((workdir / "key_file.json").read_text())
            keys = {k: data[k]["key"] for k in keys}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RuntimeError(f"token auth is on but {workdir / 'key_file.json'} is not readable ({e})") from None
    try:
        status, body = _get(f"{_local(props['inference_address'])}/ping", keys["inference"], timeout)
        if status != 200:
            raise RuntimeError(f"/ping answered HTTP {status}: {body}")
        if kind == "live":
            return "live: /ping 200"
        mgmt = _local(props["management_address"])
        status, listing = _get(f"{mgmt}/models?limit=1000", keys["management"], timeout)
        if status != 200:
            raise RuntimeError(f"GET /models answered HTTP {status}: {listing}")
        names = [m["modelName"] for m in listing.get("models", [])]
        if not names:
            raise RuntimeError("no model is registered yet")
        for name in names:
            status, desc = _get(f"{mgmt}/models/{name}", keys["management"], timeout)  # the default version
            workers = desc[0].get("workers", []) if status == 200 and desc else []
            ready = sum(w.get("status") == "READY" for w in workers)
            if not ready or ready < len(workers):
                raise RuntimeError(f"{name}: {ready}/{len(workers)} workers READY")
        return f"ready: {', '.join(names)}"
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"TorchServe does not answer: {getattr(e, 'reason', e)}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.pod", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stage", help="verify and copy archives into the pod's model dir")
    s.add_argument("--store", type=Path, required=True)
    s.add_argument("--dest", type=Path, required=True)
    s.add_argument("models", nargs="+", help="name:version")
    q = sub.add_parser("probe", help="liveness / readiness check")
    q.add_argument("kind", choices=["live", "ready"])
    q.add_argument("--config", type=Path, required=True, help="TorchServe's config.properties")
    q.add_argument("--workdir", type=Path, default=Path.cwd(), help="TorchServe's working dir (key_file.json)")
    q.add_argument("--timeout", type=float, default=3.0)
    a = p.parse_args(argv)
    try:
        if a.cmd == "stage":
            models = [tuple(m.split(":", 1)) for m in a.models]
            if any(len(m) != 2 or not all(m) for m in models):
                raise ValueError(f"models must be name:version, got {' '.join(a.models)}")
            for mar in stage(a.store, a.dest, models):
                print(f"staged {a.dest / mar} (sha256 checked)")
        else:
            print(probe(a.kind, a.config, a.workdir, a.timeout))
        return 0
    except (RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
