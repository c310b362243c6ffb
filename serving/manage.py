"""Version management against a running TorchServe: list, describe, register (integrity-checked), scale,
set-default, unregister, rollout and rollback. Talks to the management API with the bearer token from the
runtime dir's key file; every failure is a ServingError with a one-line message.
"""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from serving.archive import DEFAULT_STORE, find_entry, sha256_file
from serving.config import archive_hint, version_key
from serving.server import DEFAULT_RUNTIME, Endpoints, ServingError, endpoints, renew_key

HISTORY_FILE = "default_history.json"


class IntegrityError(ServingError):
    """A .mar whose bytes do not match index.json and its .sha256 file."""


class Client:
    """Management + inference API client for the TorchServe of one runtime dir."""

    def __init__(self, runtime_dir: Path = DEFAULT_RUNTIME, store: Path = DEFAULT_STORE, timeout: float = 120.0):
        self.runtime_dir, self.store, self.timeout = Path(runtime_dir), Path(store), timeout
        self.ep: Endpoints = endpoints(self.runtime_dir)

    # -- HTTP -------------------------------------------------------------------------------------------
    def _request(self, method: str, url: str, token_type: str, **kw: Any) -> requests.Response:
        for attempt in range(2):
            key = self.ep.management_key if token_type == "management" else self.ep.inference_key
            try:
                r = requests.request(method, url, headers={"Authorization": f"Bearer {key}"},
                                     timeout=kw.pop("timeout", self.timeout), **kw)
            except requests.ConnectionError:
                raise ServingError(f"cannot reach TorchServe at {url.split('/', 3)[2]}; is it running? "
                                   "(`python -m serving serve`)") from None
            except requests.Timeout:
                raise ServingError(f"{method} {url} timed out after {self.timeout:.0f}s") from None
            if attempt == 0 and _error_type(r) == "InvalidKeyException":
                self._refresh_token(token_type)  # tokens expire (token_expiration_min); get a fresh one once
                continue
            return r
        return r

    def _refresh_token(self, token_type: str) -> None:
        self.ep = renew_key(self.ep, self.runtime_dir, token_type)

    def _mgmt(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kw: Any) -> Any:
        r = self._request(method, f"{self.ep.management_url}{path}", "management", **kw)
        if r.status_code not in ok:
            raise ServingError(f"{method} {path}: HTTP {r.status_code}: {_error_message(r)}")
        return r.json() if r.content else {}

    # -- queries ----------------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        names, token = [], None
        while True:
            params = {"limit": 100, **({"next_page_token": token} if token else {})}
            page = self._mgmt("GET", "/models", params=params)
            names += [m["modelName"] for m in page.get("models", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)

    def describe(self, name: str, version: str | None = None) -> list[dict[str, Any]]:
        """TorchServe's description; without a version, every version (`/models/NAME/all`)."""
        return self._mgmt("GET", f"/models/{name}/{version or 'all'}")

    def default_version(self, name: str) -> str:
        return self._mgmt("GET", f"/models/{name}")[0]["modelVersion"]  # no version = the default one

    def versions(self, name: str) -> list[str]:
        return sorted((d["modelVersion"] for d in self.describe(name)), key=version_key)

    def is_registered(self, name: str, version: str) -> bool:
        r = self._request("GET", f"{self.ep.management_url}/models/{name}/{version}", "management")
        return r.status_code == 200

    def overview(self) -> list[dict[str, Any]]:
        """[{name, default, versions: [{version, workers, ready}]}] for every registered model."""
        out = []
        for name in self.model_names():
            default = self.default_version(name)
            rows = [{"version": d["modelVersion"], "workers": len(d.get("workers", [])),
                     "ready": sum(w.get("status") == "READY" for w in d.get("workers", []))}
                    for d in self.describe(name)]
            rows.sort(key=lambda v: version_key(v["version"]))
            out.append({"name": name, "default": default, "versions": rows})
        return out

    # -- changes ----------------------------------------------------------------------------------------
    def verify_archive(self, name: str, version: str) -> str:
        """The .mar's file name in the store, after checking its sha256 against index.json and .sha256."""
        entry = find_entry(self.store, name, version)
        if entry is None:
            raise ServingError(f"{name} {version} is not in {self.store / 'index.json'}; "
                               f"{archive_hint(name, version, self.store)}")
        mar = self.store / entry["mar"]
        if Path(entry["mar"]).name != entry["mar"] or not mar.is_file():
            raise ServingError(f"archive {mar} is missing")
        side = mar.with_name(mar.name + ".sha256")
        try:
            recorded = side.read_text().split()[0]
        except (OSError, IndexError):
            raise IntegrityError(f"{side} is missing or empty; refusing to register {mar.name}") from None
        actual = sha256_file(mar)
        if not (actual == entry.get("sha256") == recorded):
            raise IntegrityError(f"sha256 mismatch for {mar.name}: file {actual[:12]}…, index "
                                 f"{str(entry.get('sha256'))[:12]}…, .sha256 {recorded[:12]}…; refusing to register")
        return entry["mar"]

    def register(self, name: str, version: str, min_workers: int | None = None, max_workers: int | None = None,
                 batch_size: int | None = None, max_batch_delay: int | None = None,
                 response_timeout: int | None = None, set_default: bool = False, synchronous: bool = True) -> str:
        """Register <name>-<version>.mar from the store by file name (synchronous: returns with workers up).
        Options left out keep the archive's model-config values. synchronous=False returns once TorchServe has
        accepted the archive (HTTP 202, workers still starting; follow with wait_ready): a synchronous register
        holds one of the frontend's Netty event-loop threads until the workers are up, and inference requests on
        the connections that thread serves stall for that long (measured ~5 s under load; docs/reliability.md)."""
        mar = self.verify_archive(name, version)
        if self.is_registered(name, version):
            raise ServingError(f"{name} {version} is already registered")
        params = {"url": mar, "model_name": name, "synchronous": str(synchronous).lower(),
                  "initial_workers": min_workers, "batch_size": batch_size, "max_batch_delay": max_batch_delay,
                  "response_timeout": response_timeout}
        params = {k: v for k, v in params.items() if v is not None}
        status = self._mgmt("POST", "/models", ok=(200, 202), params=params).get("status", "registered")
        if max_workers is not None:  # the register API has no max_worker parameter
            current_min = self.describe(name, version)[0].get("minWorkers", 1)
            self.scale(name, version, min_workers if min_workers is not None else current_min, max_workers)
        if set_default:
            self.set_default(name, version)
        return status

    def scale(self, name: str, version: str, min_workers: int, max_workers: int | None = None) -> str:
        params = {"min_worker": min_workers, "synchronous": "true",
                  **({"max_worker": max(max_workers, min_workers)} if max_workers is not None else {})}
        return self._mgmt("PUT", f"/models/{name}/{version}", params=params).get("status", "scaled")

    def set_default(self, name: str, version: str, kind: str = "set-default") -> str:
        previous = self.default_version(name)
        status = self._mgmt("PUT", f"/models/{name}/{version}/set-default").get("status", "default set")
        if previous != version:
            self._record(name, previous, version, kind)
        return status

    def unregister(self, name: str, version: str) -> str:
        return self._mgmt("DELETE", f"/models/{name}/{version}").get("status", "unregistered")

    def predict(self, name: str, image: bytes, version: str | None = None) -> requests.Response:
        path = f"/predictions/{name}" + (f"/{version}" if version else "")
        return self._request("POST", f"{self.ep.inference_url}{path}", "inference", data=image)

    def metrics(self) -> str:
        r = requests.get(f"{self.ep.metrics_url}/metrics", timeout=10)
        if r.status_code != 200:
            raise ServingError(f"GET /metrics: HTTP {r.status_code}")
        return r.text

    # -- history (default changes made through this client) -----------------------------------------------
    def history(self) -> list[dict[str, Any]]:
        path = self.runtime_dir / HISTORY_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return []

    def _record(self, name: str, old: str, new: str, kind: str) -> None:
        entries = self.history() + [{"name": name, "from": old, "to": new, "kind": kind,
                                     "at": datetime.now(UTC).isoformat(timespec="seconds")}]
        path = self.runtime_dir / HISTORY_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries[-200:], indent=2) + "\n")
        tmp.replace(path)


def _error_type(r: requests.Response) -> str | None:
    try:
        return r.json().get("type") if r.status_code >= 400 else None
    except (ValueError, AttributeError):
        return None


def _error_message(r: requests.Response) -> str:
    try:
        body = r.json()
        return str(body.get("message") or body.get("error") or body)
    except ValueError:
        return (r.text or r.reason or "").strip()[:300] or "(empty body)"


def smoke_image() -> bytes:
    """A 64x64 mid-grey PNG with a light square: any classifier must answer it with 200 and predictions."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (64, 64), 96)
    ImageDraw.Draw(img).rectangle((16, 16, 47, 47), fill=200)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def wait_ready(client: Client, name: str, version: str, timeout: float = 120.0) -> int:
    """Wait until at least one worker of name/version is READY; returns the ready count."""
    deadline = time.monotonic() + timeout
    while True:
        workers = client.describe(name, version)[0].get("workers", [])
        ready = sum(w.get("status") == "READY" for w in workers)
        if ready and ready == len(workers):
            return ready
        if time.monotonic() > deadline:
            raise ServingError(f"{name} {version}: {ready}/{len(workers)} workers READY after {timeout:.0f}s")
        time.sleep(0.5)
