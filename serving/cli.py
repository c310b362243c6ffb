"""`python -m serving ...`: archive, serve/stop, predict and version management. Errors are one line on stderr
and a non-zero exit status, never a traceback."""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from serving.config import ConfigError, archive_hint, version_key
from serving.server import DEFAULT_RUNTIME, DEFAULT_STORE, ServingError

DEFAULT_MODEL = "fmnist-lenet5"
DEFAULT_VIDEO_MODEL = "fmnist-video-seg-vit-tiny"


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
    p.add_argument("--replace", action="store_true", help="rebuild an archived version from changed inputs "
                   "(recorded in index.json; refused while the version is registered on the server of --runtime-dir)")
    p.add_argument("--data-root", help="where the checkpoints' datasets are (default: their recipes' data_root): "
                   "int8 calibration and the accuracy check read them")
    p = add("serve", "start TorchServe in the background and register --models")
    p.add_argument("--models", default="", help="comma-separated name[:version] to register (default version: "
                   "the highest archived one), or `all`")
    p.add_argument("--inference-port", type=int, default=8080)
    p.add_argument("--management-port", type=int, default=8081)
    p.add_argument("--metrics-port", type=int, default=8082)
    p.add_argument("--grpc-ports", default="7070,7071", help="gRPC inference,management ports (always started)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server")
    _ready_timeout(p)
    add("stop", "stop the TorchServe of this runtime dir")
    p = add("predict", "classify images through the inference API; prints the JSON answer")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--version", help="a specific version (default: the model's default version)")
    p.add_argument("--topk", type=int, help="number of classes to return (default: the model's topk)")
    p.add_argument("--grpc", action="store_true", help="over TorchServe's gRPC inference API instead of REST")
    p = add("predict-video", "send a clip to a segmentation model; write it back with masks and boxes drawn in")
    p.add_argument("clip", type=Path)
    p.add_argument("--out", type=Path, required=True, help="the annotated MP4 to write")
    p.add_argument("--model", default=DEFAULT_VIDEO_MODEL)
    p.add_argument("--version", help="a specific version (default: the model's default version)")
    sampling = p.add_mutually_exclusive_group()
    sampling.add_argument("--every", type=int, help="answer every k-th frame (default: every frame)")
    sampling.add_argument("--fps", type=float, help="answer at most this many frames per second of video")
    p.add_argument("--max-frames", type=int, help="stop after this many answered frames")
    p.add_argument("--masks", choices=("rle", "png"), default="rle", help="mask encoding on the wire")
    add("models", "list registered models and versions (* marks the default)")
    p = add("describe", "a model's versions: TorchServe's description, what each worker loaded and the archive "
            "record (sha256, artifact, accuracy measured at archive time)")
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
    _ready_timeout(p)
    _dry_run(p)
    p = add("scale", "set the worker count of a version")
    _name_version(p)
    p.add_argument("--min-workers", type=int, required=True)
    p.add_argument("--max-workers", type=int)
    _name_version(add("set-default", "make a registered version the default"))
    _name_version(add("unregister", "unregister a version (not the default while others exist)"))
    p = add("rollout", "register -> workers READY -> smoke check -> set-default [-> retire old]; undone on any "
            "failure or interruption before the switch")
    _name_version(p)
    p.add_argument("--retire-old", action="store_true", help="unregister the previous default afterwards")
    p.add_argument("--smoke-image", type=Path, help="image for the smoke check (default: a synthetic PNG)")
    _ready_timeout(p)
    _dry_run(p)
    p = add("rollback", "make the previous default the default again (only a version that served as the "
            "default; READY workers and a smoke check first)")
    p.add_argument("name")
    p.add_argument("--to", metavar="VERSION", help="roll back to this version (it must have served as the default)")
    p.add_argument("--smoke-image", type=Path, help="image for the smoke check (default: a synthetic PNG)")
    _ready_timeout(p, 30.0)
    _dry_run(p)
    p = add("metrics", "print the Prometheus metrics")
    p.add_argument("--grep", help="only lines containing this text")
    add("ping", "health check: TorchServe's /ping with the inference key; exit status 0 when Healthy")
    p = add("howto", "print working curl commands for a running server (the key read from the key file)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--image", type=Path, help="image in the commands (default: the first reports/samples/*.png)")
    from serving.fleet_cli import add_parser as add_fleet

    add_fleet(sub)
    return parser


def _name_version(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("version")


def _ready_timeout(p: argparse.ArgumentParser, default: float = 180.0) -> None:
    p.add_argument("--ready-timeout", type=float, default=default, metavar="S",
                   help=f"seconds to wait for the version's workers to be READY (default {default:g})")


def _dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="check and print what would be done; change nothing")


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def cmd_archive(a: argparse.Namespace) -> int:
    from serving.archive import archive_all
    from serving.config import CONFIG_DIR, find_configs

    paths = find_configs(CONFIG_DIR) if a.all else a.config
    if not paths:
        raise ConfigError("nothing to archive: give --config PATH (repeatable) or --all")
    built, skipped = archive_all(paths, a.store, skip_missing=a.all, replace=a.replace,
                                 registered=_registered_check(a.runtime_dir, a.store) if a.replace else None,
                                 data_root=a.data_root)
    for e in built:
        replaced = e.get("replaced", [{}])[-1].get("replaced_at") == e["created"]
        state = "unchanged" if e.get("unchanged") else ("replaced" if replaced else "built")
        print(f"{a.store / e['mar']}  sha256 {e['sha256'][:16]}…  ({e['arch']}, {e['runtime']}; {state}; "
              f"{_accuracy_line(e)})")
    for msg in skipped:
        print(msg, file=sys.stderr)
    if not built:
        raise ConfigError("no archive built: none of the configured checkpoints exists yet")
    return 0


def _accuracy_line(entry: dict[str, Any]) -> str:
    acc = entry.get("accuracy") or {}
    if not acc.get("metric"):
        return "accuracy not measured: " + str(acc.get("reason", "no data"))
    runtime = entry["runtime"]
    return (f"{acc['metric']} {100 * acc[runtime]:.2f} % ({runtime}) vs {100 * acc['fp32']:.2f} % (fp32) on "
            f"{acc['images']} {acc['split']} images")


def _registered_check(runtime_dir: Path, store: Path) -> Any:
    """is_registered(name, version) on the TorchServe of runtime_dir; always False when none is running."""
    from serving import server

    if server.server_pid(runtime_dir) is None:
        return lambda name, version: False
    from serving.manage import Client

    return Client(runtime_dir, store).is_registered


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
    ep = server.start(a.store, a.runtime_dir, ports, timeout=a.timeout, models=models,
                      ready_timeout=a.ready_timeout)
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
    send = _grpc_sender(a, client) if a.grpc else _rest_sender(a, client)
    for path in a.images:
        data = path.read_bytes()
        if a.topk is not None:  # per-request topk travels in the JSON form of the request
            data = json.dumps({"image": base64.b64encode(data).decode(), "topk": a.topk}).encode()
        status, body = send(data)
        failed += status != 200
        if len(a.images) == 1:
            _print(body)
        else:
            print(json.dumps({"image": str(path), "status": status, **body}))
    return 1 if failed else 0


def _rest_sender(a: argparse.Namespace, client: Any) -> Any:
    def send(data: bytes) -> tuple[int, Any]:
        r = client.predict(a.model, data, a.version)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, {"code": r.status_code, "message": r.text.strip() or r.reason}
    return send


def _grpc_sender(a: argparse.Namespace, client: Any) -> Any:
    """gRPC answers carry no per-request status (TorchServe 0.12): an error body's "code" is the status."""
    import grpc

    from serving.grpc_client import GrpcClient
    from serving.server import CONFIG_NAME, read_properties

    props = read_properties(a.runtime_dir / CONFIG_NAME)
    target = f"{props.get('grpc_inference_address', '127.0.0.1')}:{props.get('grpc_inference_port', '7070')}"
    grpc_client = GrpcClient(target, client.ep.inference_key, a.runtime_dir / "grpc")

    def send(data: bytes) -> tuple[int, Any]:
        for attempt in range(2):
            try:
                return grpc_client.predict(a.model, data, a.version)
            except grpc.RpcError as e:
                if attempt == 0 and e.code() == grpc.StatusCode.PERMISSION_DENIED:  # an expired key: renew once
                    client._refresh_token("inference")
                    grpc_client.metadata = [("authorization", f"Bearer {client.ep.inference_key}")]
                    continue
                raise ServingError(f"gRPC {e.code().name}: {e.details()}") from None
        raise AssertionError("unreachable")
    return send


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
    """Commands that work as printed: the model's real versions, an image that exists, and the inference key read
    from the key file when they run. The key itself is never printed (it would stay in terminal scrollback and CI
    logs, and a renewed key replaces it)."""
    from training.commands import project_command

    ep, key_file = client.ep, a.runtime_dir.resolve() / "key_file.json"
    from serving.archive import read_index

    default, versions = client.default_version(a.model), client.versions(a.model)
    archived = sorted({e["version"] for e in read_index(a.store) if e.get("name") == a.model}, key=version_key)
    image = a.image or next(iter(sorted(Path("reports/samples").glob("*.png"))), None)
    if image is None:
        image = Path("reports/samples/0000_ankle-boot.png")
        samples = project_command(f"training samples --out-dir {image.parent}")
        print(f"No sample image yet; write some first:\n  {samples}")
    where = "".join(f" --{flag} {path}" for flag, path, usual in (("runtime-dir", a.runtime_dir, DEFAULT_RUNTIME),
                                                                     ("store", a.store, DEFAULT_STORE))
                    if Path(path).resolve() != usual.resolve())
    auth, url = '-H "Authorization: Bearer $KEY"', f"{ep.inference_url}/predictions/{a.model}"
    read_key = f"""python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["inference"]["key"])' {key_file}"""
    print(f"""Inference key (the "inference" entry of {key_file}; it expires, and a renewed key replaces it there):
  KEY=$({read_key})
Predict:
  curl {auth} -T {image} {url}
  curl {auth} -T {image} {url}/{default}
  curl {auth} -H 'Content-Type: application/json' -d "{{\\"image\\": \\"$(base64 -w0 {image})\\", \\"topk\\": 3}}" {url}
  (curl -d/--data-binary without a Content-Type sends a form: add -H 'Content-Type: application/octet-stream')
Health (/ping needs the inference key too; `serving ping` also renews an expired key, exit status 0 when Healthy):
  curl {auth} {ep.inference_url}/ping
  {project_command("serving ping")}{where}
Answers per version (Prometheus): curl -s {ep.metrics_url}/metrics | grep 'handler_answers_total{{ModelName="{a.model}"'
Versions (registered {', '.join(versions)}; default {default}; archived {', '.join(archived) or 'none'}):""")
    from serving.rollout import rollback_target

    commands = ["models", f"describe {a.model}", *[f"rollout {a.model} {v}" for v in archived if v != default]]
    try:
        rollback_target(client.history(), a.model, default, versions)
        commands.append(f"rollback {a.model}")
    except ServingError:  # nothing to roll back to: not a command that works
        pass
    for args in commands:
        print(f"  {project_command('serving ' + args)}{where}")
    return 0


def run(a: argparse.Namespace) -> int:
    if a.cmd in ("fleet", "manifests"):
        from serving.fleet_cli import run as run_fleet

        return run_fleet(a)
    local = {"archive": cmd_archive, "serve": cmd_serve, "stop": cmd_stop}
    if a.cmd in local:
        return local[a.cmd](a)
    from serving.manage import Client

    client = Client(a.runtime_dir, a.store)
    if a.cmd == "predict":
        return cmd_predict(a, client)
    if a.cmd == "predict-video":
        from serving.video import predict_video

        if not a.clip.is_file():
            raise ServingError(f"clip not found: {a.clip}")
        _print(predict_video(client, a.model, a.clip, a.out, a.version, every=a.every, fps=a.fps,
                             max_frames=a.max_frames, masks=a.masks))
        return 0
    if a.cmd == "models":
        return cmd_models(client)
    if a.cmd == "howto":
        return cmd_howto(a, client)
    if a.cmd == "ping":
        print(client.ping()["status"])
        return 0
    if a.cmd == "describe":
        versions = client.describe_full(a.name, a.version)
        _print(versions)
        for d in versions:  # what a worker warns about (synthetic int8 calibration, ...) also goes to stderr
            for key in ("warning", "version_warning"):
                text = ((d.get("customizedMetadata") or {}).get("runtime_info") or {}).get(key)
                if text:
                    print(f"warning: {a.name} {d['modelVersion']}: {text}", file=sys.stderr)
    elif a.cmd == "register":
        if a.dry_run:
            mar = client.verify_archive(a.name, a.version)
            state = "already registered" if client.is_registered(a.name, a.version) else "would be registered"
            print(f"{a.name} {a.version}: {mar} sha256 verified; {state} (dry run: nothing changed)")
            return 0
        client.register(a.name, a.version, a.min_workers, a.max_workers, a.batch_size, a.max_batch_delay,
                        a.response_timeout, a.set_default, ready_timeout=a.ready_timeout)
        ready = len(client.describe(a.name, a.version)[0].get("workers", []))
        print(f"registered {a.name} {a.version}: {ready} worker(s) READY" + (", default" if a.set_default else ""))
    elif a.cmd == "scale":
        print(client.scale(a.name, a.version, a.min_workers, a.max_workers))
    elif a.cmd == "set-default":
        print(client.set_default(a.name, a.version))
    elif a.cmd == "unregister":
        print(client.unregister(a.name, a.version))
    elif a.cmd == "rollout":
        from serving.rollout import rollout

        image = a.smoke_image.read_bytes() if a.smoke_image else None
        _print(rollout(client, a.name, a.version, retire_old=a.retire_old, image=image,
                       ready_timeout=a.ready_timeout, dry_run=a.dry_run))
    elif a.cmd == "rollback":
        from serving.rollout import rollback

        image = a.smoke_image.read_bytes() if a.smoke_image else None
        r = rollback(client, a.name, to=a.to, image=image, ready_timeout=a.ready_timeout, dry_run=a.dry_run)
        if r.get("dry_run"):
            print(f"{r['name']}: would set the default {r['from']} -> {r['to']} after: {', '.join(r['steps'][:2])} "
                  "(dry run: nothing changed)")
        else:
            smoke = r["smoke_check"]
            print(f"{r['name']}: default {r['from']} -> {r['to']} (smoke check passed: HTTP {smoke['status']} "
                  f"from {smoke['answered_by']} in {smoke['ms']} ms)")
    elif a.cmd == "metrics":
        text = client.metrics()
        print("\n".join(ln for ln in text.splitlines() if not a.grep or a.grep in ln))
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a rollout or register undoes its partial work on either."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated("terminated by SIGTERM")


def _error(e: BaseException, text: str) -> None:
    """One line for the error, then one line per note (what was cleaned up, or what could not be)."""
    print(f"error: {text}", file=sys.stderr)
    for note in getattr(e, "__notes__", []):
        print(f"  {note}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from serving.archive import ArchiveError

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run(args)
    except BrokenPipeError:  # e.g. `python -m serving metrics | head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second failure at exit
        return 0
    except (ServingError, ConfigError, ArchiveError, OSError) as e:
        _error(e, str(e))
        return 1
    except KeyboardInterrupt as e:
        _error(e, str(e) or "interrupted")
        return 143 if isinstance(e, Terminated) else 130
