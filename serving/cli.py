"""`python -m serving ...`: archive, serve/stop, predict and version management. Errors are one line on stderr
and a non-zero exit status, never a traceback."""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

from serving.config import ConfigError, archive_hint, version_key
from serving.server import DEFAULT_RUNTIME, DEFAULT_STORE, ServingError

DEFAULT_MODEL = "fmnist-lenet5"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, default=DEFAULT_STORE, help="model store (default: model_store/)")
    p.add_argument("--runtime-dir", type=Path, default=DEFAULT_RUNTIME,
                   help="TorchServe runtime dir: config, key file, logs (default: .runtime/)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        _common(p)
        return p

    p = add("archive", "build model_store/<name>-<version>.mar (+ .sha256, index.json) from archive configs")
    p.add_argument("--config", type=Path, action="append", default=[], help="archive config YAML (repeatable)")
    p.add_argument("--all", action="store_true", help="every archive_configs/<model>/<version>.yaml")
    p = add("serve", "start TorchServe in the background and register --models")
    p.add_argument("--models", default="", help="comma-separated name[:version] to register (default version: "
                   "the highest archived one), or `all`")
    p.add_argument("--inference-port", type=int, default=8080)
    p.add_argument("--management-port", type=int, default=8081)
    p.add_argument("--metrics-port", type=int, default=8082)
    p.add_argument("--grpc-ports", default="7070,7071", help="gRPC inference,management ports (always started)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server")
    add("stop", "stop the TorchServe of this runtime dir")
    p = add("predict", "classify images through the inference API; prints the JSON answer")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--version", help="a specific version (default: the model's default version)")
    p.add_argument("--topk", type=int, help="number of classes to return (default: the model's topk)")
    add("models", "list registered models and versions (* marks the default)")
    p = add("describe", "TorchServe's description of a model (all versions, or one)")
    p.add_argument("name")
    p.add_argument("version", nargs="?")
    p = add("register", "register an archived version (sha256-verified) from the model store")
    _name_version(p)
    p.add_argument("--min-workers", type=int)
    p.add_argument("--max-workers", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-batch-delay", type=int, help="ms")
    p.add_argument("--response-timeout", type=int, help="s")
    p.add_argument("--set-default", action="store_true")
    p = add("scale", "set the worker count of a version")
    _name_version(p)
    p.add_argument("--min-workers", type=int, required=True)
    p.add_argument("--max-workers", type=int)
    _name_version(add("set-default", "make a registered version the default"))
    _name_version(add("unregister", "unregister a version (not the default while others exist)"))
    p = add("rollout", "register -> workers READY -> smoke prediction -> set-default [-> retire old]")
    _name_version(p)
    p.add_argument("--retire-old", action="store_true", help="unregister the previous default afterwards")
    p.add_argument("--smoke-image", type=Path, help="image for the smoke prediction (default: a synthetic PNG)")
    p = add("rollback", "make the previous default version the default again")
    p.add_argument("name")
    p = add("metrics", "print the Prometheus metrics")
    p.add_argument("--grep", help="only lines containing this text")
    p = add("howto", "print the curl commands for a running server")
    p.add_argument("--model", default=DEFAULT_MODEL)
    return parser


def _name_version(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("version")


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def cmd_archive(a: argparse.Namespace) -> int:
    from serving.archive import archive_all
    from serving.config import CONFIG_DIR, find_configs

    paths = find_configs(CONFIG_DIR) if a.all else a.config
    if not paths:
        raise ConfigError("nothing to archive: give --config PATH (repeatable) or --all")
    built, skipped = archive_all(paths, a.store, skip_missing=a.all)
    for e in built:
        print(f"{a.store / e['mar']}  sha256 {e['sha256'][:16]}…  ({e['arch']}, {e['runtime']})")
    for msg in skipped:
        print(msg, file=sys.stderr)
    if not built:
        raise ConfigError("no archive built: none of the configured checkpoints exists yet")
    return 0


def _parse_models(spec: str, store: Path) -> list[tuple[str, str]]:
    from serving.archive import read_index

    if spec.strip() == "all":  # every archived model, at its highest version
        spec = ",".join(sorted({e["name"] for e in read_index(store)}))
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, version = item.partition(":")
        if not version:
            versions = [e["version"] for e in read_index(store) if e.get("name") == name]
            if not versions:
                raise ServingError(f"{name} has no archive in {store}; {archive_hint(name, None, store)}")
            version = max(versions, key=version_key)
        out.append((name, version))
    return out


def cmd_serve(a: argparse.Namespace) -> int:
    from serving import server

    models = _parse_models(a.models, a.store)
    try:
        grpc = [int(p) for p in a.grpc_ports.split(",")]
        if len(grpc) != 2:
            raise ValueError
        ports = server.Ports(a.inference_port, a.management_port, a.metrics_port, *grpc)
    except (ValueError, TypeError):
        raise ServingError(f"--grpc-ports must be two ports like 7070,7071, got {a.grpc_ports!r}") from None
    ep = server.start(a.store, a.runtime_dir, ports, timeout=a.timeout, models=models)
    print(f"TorchServe up: inference {ep.inference_url}, management {ep.management_url}, metrics {ep.metrics_url}")
    print(f"tokens: {a.runtime_dir.resolve() / server.KEY_FILE}; logs: {a.runtime_dir.resolve() / 'logs'}")
    for name, version in models:
        print(f"registered {name} {version}")
    return 0


def cmd_stop(a: argparse.Namespace) -> int:
    from serving import server

    print("TorchServe stopped" if server.stop(a.runtime_dir) else f"no TorchServe running for {a.runtime_dir}")
    return 0


def cmd_predict(a: argparse.Namespace, client: Any) -> int:
    failed = 0
    for path in a.images:
        data = path.read_bytes()
        if a.topk is not None:  # per-request topk travels in the JSON form of the request
            data = json.dumps({"image": base64.b64encode(data).decode(), "topk": a.topk}).encode()
        r = client.predict(a.model, data, a.version)
        try:
            body = r.json()
        except ValueError:
            body = {"code": r.status_code, "message": r.text.strip() or r.reason}
        failed += r.status_code != 200
        if len(a.images) == 1:
            _print(body)
        else:
            print(json.dumps({"image": str(path), "status": r.status_code, **body}))
    return 1 if failed else 0


def cmd_models(client: Any) -> int:
    rows = client.overview()
    if not rows:
        print("no models registered")
        return 0
    width = max(len(m["name"]) for m in rows) + 2
    print(f"{'MODEL':<{width}}{'VERSION':<10}{'DEFAULT':<9}WORKERS (ready/all)")
    for m in rows:
        for v in m["versions"]:
            star = "*" if v["version"] == m["default"] else ""
            print(f"{m['name']:<{width}}{v['version']:<10}{star:<9}{v['ready']}/{v['workers']}")
    return 0


def cmd_howto(a: argparse.Namespace, client: Any) -> int:
    ep, key_file = client.ep, a.runtime_dir.resolve() / "key_file.json"
    print(f"""Predict (raw image bytes; token from {key_file}, key "inference"):
  curl -H "Authorization: Bearer {ep.inference_key}" -T image.png {ep.inference_url}/predictions/{a.model}
  curl -H "Authorization: Bearer {ep.inference_key}" -T image.png {ep.inference_url}/predictions/{a.model}/VERSION
Metrics (Prometheus): curl {ep.metrics_url}/metrics
Versions: python -m serving models | describe {a.model} | rollout {a.model} VERSION | rollback {a.model}
Tokens expire after token_expiration_min minutes; the CLI renews them, curl users re-read the key file.""")
    return 0


def run(a: argparse.Namespace) -> int:
    local = {"archive": cmd_archive, "serve": cmd_serve, "stop": cmd_stop}
    if a.cmd in local:
        return local[a.cmd](a)
    from serving.manage import Client

    client = Client(a.runtime_dir, a.store)
    if a.cmd == "predict":
        return cmd_predict(a, client)
    if a.cmd == "models":
        return cmd_models(client)
    if a.cmd == "howto":
        return cmd_howto(a, client)
    if a.cmd == "describe":
        default = client.default_version(a.name)
        desc = client.describe(a.name, a.version)
        _print([{**d, "isDefault": d["modelVersion"] == default} for d in desc])
    elif a.cmd == "register":
        print(client.register(a.name, a.version, a.min_workers, a.max_workers, a.batch_size, a.max_batch_delay,
                              a.response_timeout, a.set_default))
    elif a.cmd == "scale":
        print(client.scale(a.name, a.version, a.min_workers, a.max_workers))
    elif a.cmd == "set-default":
        print(client.set_default(a.name, a.version))
    elif a.cmd == "unregister":
        print(client.unregister(a.name, a.version))
    elif a.cmd == "rollout":
        from serving.rollout import rollout

        image = a.smoke_image.read_bytes() if a.smoke_image else None
        _print(rollout(client, a.name, a.version, retire_old=a.retire_old, image=image))
    elif a.cmd == "rollback":
        from serving.rollout import rollback

        r = rollback(client, a.name)
        print(f"{r['name']}: default {r['from']} -> {r['to']}")
    elif a.cmd == "metrics":
        text = client.metrics()
        print("\n".join(ln for ln in text.splitlines() if not a.grep or a.grep in ln))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from serving.archive import ArchiveError

    try:
        return run(args)
    except BrokenPipeError:  # e.g. `python -m serving metrics | head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second failure at exit
        return 0
    except (ServingError, ConfigError, ArchiveError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
