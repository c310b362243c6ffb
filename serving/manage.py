"""Version management against a running TorchServe: list, describe, register (integrity-checked), scale,
set-default, unregister, rollout and rollback. Talks to the management API with the bearer token from the
runtime dir's key file; every failure is a ServingError with a one-line message.

Every register and scale is asynchronous (HTTP 202, then the management API is polled until the workers are
READY): a synchronous call holds one of the frontend's Netty event-loop threads until the workers are up, and
inference requests on the connections that thread serves stall for that long (measured ~5 s under load;
docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from handlers.artifacts import write_json
from serving.archive import DEFAULT_STORE, find_entry, sha256_file
from serving.config import archive_hint, version_key
from serving.server import DEFAULT_RUNTIME, Endpoints, ServingError, endpoints, log_tail, renew_key

HISTORY_FILE = "default_history.json"
HISTORY_LIMIT = 200            # entries kept per runtime dir
READY_TIMEOUT = 180.0          # seconds for a registered version's workers to become READY


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

    def describe_full(self, name: str, version: str | None = None) -> list[dict[str, Any]]:
        """Per version: TorchServe's description, `isDefault`, what its worker says it loaded
        (`customizedMetadata`: runtime, artifact and its sha256, calibration, accuracy) and the archive's
        index.json record (`archive`: sha256, artifact, accuracy measured at archive time)."""
        default = self.default_version(name)
        out = []
        for d in self.describe(name, version):
            v = d["modelVersion"]
            try:  # TorchServe asks a worker (the handler's describe) only for one named version
                meta = self._mgmt("GET", f"/models/{name}/{v}", params={"customized": "true"})[0]
                meta = meta.get("customizedMetadata")
                meta = json.loads(meta) if isinstance(meta, str) else meta
            except (ServingError, ValueError, IndexError):
                meta = None
            entry = find_entry(self.store, name, v) or {}
            keep = ("mar", "sha256", "created", "runtime", "artifact", "accuracy", "replaced")
            out.append({**d, "isDefault": v == default, "customizedMetadata": meta,
                        "archive": {k: entry[k] for k in keep if k in entry}})
        return out

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
        """The .mar's file name in the store, after checking its sha256 (verify_archive)."""
        return verify_archive(self.store, name, version)

    def register(self, name: str, version: str, min_workers: int | None = None, max_workers: int | None = None,
                 batch_size: int | None = None, max_batch_delay: int | None = None,
                 response_timeout: int | None = None, set_default: bool = False, wait: bool = True,
                 ready_timeout: float = READY_TIMEOUT) -> str:
        """Register <name>-<version>.mar from the store by file name, after the sha256 check, asynchronously
        (TorchServe answers 202 and starts the workers). With `wait`, returns once every worker is READY; a
        version whose workers do not come up in `ready_timeout` (or a wait interrupted by Ctrl-C / SIGTERM) is
        unregistered again, so a failed register leaves the server as it was. Options left out keep the
        archive's model-config values."""
        mar = self.verify_archive(name, version)
        if self.is_registered(name, version):
            raise ServingError(f"{name} {version} is already registered")
        params = {"url": mar, "model_name": name, "synchronous": "false", "initial_workers": min_workers,
                  "batch_size": batch_size, "max_batch_delay": max_batch_delay, "response_timeout": response_timeout}
        params = {k: v for k, v in params.items() if v is not None}
        status = self._mgmt("POST", "/models", ok=(200, 202), params=params).get("status", "registered")
        with undo_on_failure(f"register {name} {version}", lambda: self.unregister(name, version)):
            if max_workers is not None:  # the register API has no max_worker parameter
                current_min = self.describe(name, version)[0].get("minWorkers", 1)
                self.scale(name, version, min_workers if min_workers is not None else current_min, max_workers,
                           wait=False)
            if wait and int(self.describe(name, version)[0].get("minWorkers", 1)) > 0:  # 0: nothing to wait for
                wait_ready(self, name, version, ready_timeout)
        if set_default:
            self.set_default(name, version)
        return status

    def scale(self, name: str, version: str, min_workers: int, max_workers: int | None = None, wait: bool = True,
              ready_timeout: float = READY_TIMEOUT) -> str:
        """Set the worker count (asynchronously, then wait until exactly min_workers workers are READY)."""
        params = {"min_worker": min_workers, "synchronous": "false",
                  **({"max_worker": max(max_workers, min_workers)} if max_workers is not None else {})}
        status = self._mgmt("PUT", f"/models/{name}/{version}", ok=(200, 202), params=params).get("status", "scaled")
        if wait and min_workers > 0:
            wait_ready(self, name, version, ready_timeout, workers=min_workers)
        return status

    def set_default(self, name: str, version: str, kind: str = "set-default") -> str:
        previous = self.default_version(name)
        status = self._mgmt("PUT", f"/models/{name}/{version}/set-default").get("status", "default set")
        if previous != version:
            self._record(name, previous, version, kind)
        return status

    def unregister(self, name: str, version: str) -> str:
        return self._mgmt("DELETE", f"/models/{name}/{version}").get("status", "unregistered")

    def predict(self, name: str, image: bytes | None, version: str | None = None, **kw: Any) -> requests.Response:
        """POST `image` as the body, or (image None) what `kw` says: files=/data= for a multipart form,
        stream=True to read the answer as it arrives."""
        path = f"/predictions/{name}" + (f"/{version}" if version else "")
        body = {"data": image} if image is not None else {}
        return self._request("POST", f"{self.ep.inference_url}{path}", "inference", **body, **kw)

    def ping(self) -> dict[str, Any]:
        """TorchServe's health check, /ping, with the inference key (TorchServe 0.12 guards /ping with it when token
        auth is on); an expired key is renewed first. {"status": "Healthy"}, else ServingError."""
        r = self._request("GET", f"{self.ep.inference_url}/ping", "inference", timeout=10)
        body = r.json() if r.status_code == 200 else {}
        if body.get("status") != "Healthy":
            raise ServingError(f"GET /ping: HTTP {r.status_code}: {_error_message(r)}")
        return body

    def metrics(self) -> str:
        r = requests.get(f"{self.ep.metrics_url}/metrics", timeout=10)
        if r.status_code != 200:
            raise ServingError(f"GET /metrics: HTTP {r.status_code}")
        return r.text

    # -- history (default changes made through this client) -----------------------------------------------
    def history(self) -> list[dict[str, Any]]:
        path = self.runtime_dir / HISTORY_FILE
        try:
            entries = json.loads(path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, json.JSONDecodeError) as e:
            raise ServingError(f"{path} is not readable ({e}); rollback needs it: fix or move it away") from None
        return entries if isinstance(entries, list) else []

    def _record(self, name: str, old: str, new: str, kind: str) -> None:
        """Append one default change: read-modify-write under an exclusive lock, written to a temp file and
        renamed into place, so concurrent CLIs lose no entry and a reader never sees half a file."""
        path = self.runtime_dir / HISTORY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{HISTORY_FILE}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self.history() + [{"name": name, "from": old, "to": new, "kind": kind,
                                         "at": datetime.now(UTC).isoformat(timespec="seconds")}]
            write_json(path, entries[-HISTORY_LIMIT:])


@contextlib.contextmanager
def undo_on_failure(what: str, undo: Any) -> Iterator[None]:
    """Run the body; if it raises anything (an error, Ctrl-C, SIGTERM turned into an exception), call `undo`
    and re-raise the original exception. A failing undo never hides the original: it is added as a note."""
    try:
        yield
    except BaseException as e:
        try:
            undo()
        except BaseException as cleanup:  # noqa: B036 -- the original error is re-raised below
            e.add_note(f"cleanup after the failed {what} also failed: {type(cleanup).__name__}: {cleanup}")
        else:
            e.add_note(f"cleaned up after the failed {what}")
        raise


def verify_archive(store: Path, name: str, version: str) -> str:
    """The .mar's file name in `store`, after checking its sha256 against index.json and its .sha256 file."""
    entry = find_entry(Path(store), name, version)
    if entry is None:
        raise ServingError(f"{name} {version} is not in {Path(store) / 'index.json'}; "
                           f"{archive_hint(name, version, Path(store))}")
    mar = Path(store) / entry["mar"]
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


def wait_ready(client: Client, name: str, version: str, timeout: float = READY_TIMEOUT,
               workers: int | None = None) -> int:
    """Wait until name/version has `workers` (default: its minWorkers, at least one) workers, all READY; returns
    the ready count. A version that can have no worker (minWorkers 0) fails at once; a timeout names the
    server's error lines (e.g. a worker that refuses its archive)."""
    deadline = time.monotonic() + timeout
    while True:
        desc = client.describe(name, version)[0]
        want = workers if workers is not None else int(desc.get("minWorkers", 1))
        if want < 1:
            raise ServingError(f"{name} {version} has minWorkers 0: no worker will start; scale it first "
                               f"(`python -m serving scale {name} {version} --min-workers 1`)")
        states = [w.get("status") for w in desc.get("workers", [])]
        ready = states.count("READY")
        if ready >= want and ready == len(states):
            return ready
        if time.monotonic() > deadline:
            raise ServingError(f"{name} {version}: {ready}/{want} workers READY after {timeout:.0f}s; "
                               f"{log_tail(client.runtime_dir, 6)}")
        time.sleep(0.3)
