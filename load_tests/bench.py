"""Side-by-side benchmark, one model, one image set, one run on one machine:

  (a) model forward in-process            (batch sweep)
  (b) our handler pipeline in-process     (batch sweep; bytes -> top-k JSON, handlers.image.ImagePipeline)
  (c) TorchServe + our handler, REST      (concurrency sweep, locust closed loop)
  (d) TorchServe + stock image_classifier (same weights, same preprocessing, same batch settings)

    python -m load_tests.bench                 # `make bench`: ~3-4 min on 2 cores; writes docs/benchmarks.md
    python -m load_tests.bench --quick --skip-rest --docs-dir ''   # seconds, in-process only, JSON only

The runtime (--runtime) goes into the archive config (`runtime:` -> the handler's options) and into
ImagePipeline(runtime=...), so runs with different runtimes compare like with like.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import torch

from load_tests import report
from load_tests.images import QUALITY, SIZE, write_jpegs
from load_tests.inprocess import bench_checkpoint, measure_forward, measure_pipeline
from load_tests.rest import BatchSettings, build_our_archive, build_stock_archive, register, run_locust, warm_up

ROOT = Path(__file__).resolve().parents[1]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m load_tests.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="registry name; (d) needs resnet18 at 224 px")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--runtime", default="eager", help="handler runtime (archive config + ImagePipeline)")
    p.add_argument("--images", type=int, default=64, help="how many 500x375 JPEGs to send (round-robin)")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8, 16], help="(a), (b) sweep, e.g. 1,8,16")
    p.add_argument("--concurrency", type=_ints, default=[1, 4, 16], help="(c), (d) sweep of locust users")
    p.add_argument("--seconds", type=float, default=15, help="measured seconds per REST point")
    p.add_argument("--inproc-seconds", type=float, default=5, help="measured seconds per in-process point")
    p.add_argument("--batch-size", type=int, default=8, help="TorchServe batchSize for (c) and (d)")
    p.add_argument("--max-batch-delay", type=int, default=20, help="TorchServe maxBatchDelay (ms)")
    p.add_argument("--workers", type=int, default=1, help="TorchServe workers per model")
    p.add_argument("--threads", type=int, default=0, help="torch threads in-process and per worker (sets "
                   "OMP_NUM_THREADS for the server; 0: the defaults, i.e. all cores)")
    p.add_argument("--skip-rest", action="store_true", help="only (a) and (b): no TorchServe, no Java")
    p.add_argument("--quick", action="store_true", help="a smoke run: few, short points (figures are noise)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--build-dir", type=Path, default=ROOT / "reports/bench/build", help="checkpoint, .mar, images")
    p.add_argument("--out-dir", type=Path, default=ROOT / "reports/bench", help="bench-<date>.json and locust CSVs")
    p.add_argument("--docs-dir", default=None, help="write benchmarks.md + bench_concurrency.png here "
                   "(default: docs/, or nothing with --quick; '' for nothing)")
    a = p.parse_args(argv)
    if a.quick:
        a.batch_sizes, a.concurrency = a.batch_sizes[:2] if len(a.batch_sizes) > 2 else a.batch_sizes, [1, 4]
        a.seconds, a.inproc_seconds, a.images = min(a.seconds, 4), min(a.inproc_seconds, 1), min(a.images, 16)
    if a.docs_dir is None:
        a.docs_dir = "" if a.quick else str(ROOT / "docs")
    return a


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    java = "?"
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
        java = (out.stderr or out.stdout).splitlines()[0].split('"')[1]
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    versions = {"Python": platform.python_version(), "torch": torch.__version__, "Java": java}
    for pkg in ("torchvision", "torchserve", "locust"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {"hardware": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30),
            "versions": versions, "threads": torch.get_num_threads()}


def free_ports(n: int = 3) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_rest(a: argparse.Namespace, ckpt: dict[str, Any], ckpt_path: Path, image_dir: Path,
             out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Archive both models into a fresh store, serve both from one TorchServe, sweep users; always stop it."""
    from serving import server

    settings = BatchSettings(a.batch_size, a.max_batch_delay, a.workers)
    store = a.build_dir / "store"
    shutil.rmtree(store, ignore_errors=True)
    ours = f"bench-{a.arch}"
    stock = f"stock-{a.arch}"
    our_mar = build_our_archive(ckpt_path, store, a.build_dir, ours, a.runtime, settings)
    stock_mar = build_stock_archive(ckpt, store, a.build_dir, stock, settings)
    runtime_dir = a.build_dir / "ts-runtime"
    image = next(iter(sorted(image_dir.glob("*.jpg")))).read_bytes()
    results: dict[str, list[dict[str, Any]]] = {"ours": [], "stock": []}
    ports = server.Ports(*free_ports(len(dataclasses.fields(server.Ports))))  # HTTP and gRPC: none on defaults
    ep = server.start(store, runtime_dir, ports, timeout=180)
    try:
        for name, mar in ((ours, our_mar), (stock, stock_mar)):
            register(ep, mar, name, settings)
            warm_up(ep, name, image)
        pid = server.server_pid(runtime_dir)
        key_file = runtime_dir / server.KEY_FILE
        for i, users in enumerate(a.concurrency):
            # Alternate which server goes first, so a change in background load does not favour one of them.
            order = [("ours", ours, "predictions"), ("stock", stock, "labels")]
            for key, name, expect in order if i % 2 == 0 else order[::-1]:
                print(f"  ({'c' if key == 'ours' else 'd'}) {name}: {users} users, {a.seconds:g} s", flush=True)
                point = run_locust(ep, key_file, name, str(image_dir), users, a.seconds,
                                   out_dir / "locust" / f"{key}-u{users}", pid, expect)
                results[key].append(point)
    finally:
        server.stop(runtime_dir)
    return results


def run(a: argparse.Namespace) -> dict[str, Any]:
    from handlers.image import ImagePipeline

    started = datetime.now(UTC)
    if a.threads:  # before the server starts: its workers inherit the environment
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
        torch.set_num_threads(a.threads)
    load_start = [round(x, 2) for x in os.getloadavg()]
    a.build_dir.mkdir(parents=True, exist_ok=True)
    if not a.skip_rest and (a.arch, a.img_size) != ("resnet18", 224):
        raise SystemExit("the stock-handler anchor (d) is defined for resnet18 at 224 px; use --skip-rest")
    ckpt_path = a.build_dir / f"{a.arch}-{a.img_size}-seed{a.seed}.pt"
    ckpt = bench_checkpoint(ckpt_path, a.arch, a.img_size, seed=a.seed)
    image_dir = a.build_dir / f"images-{SIZE[0]}x{SIZE[1]}"
    paths = write_jpegs(image_dir, a.images)
    images = [p.read_bytes() for p in paths]
    info = machine_info()
    print(f"bench: {a.arch}@{a.img_size}, runtime {a.runtime}, {len(images)} images, load average {load_start}",
          flush=True)

    pipe = ImagePipeline(ckpt, "cpu", runtime=a.runtime, topk=5, model_name=f"bench-{a.arch}")
    print("  (a) model forward", flush=True)
    forward = measure_forward(pipe, images, a.batch_sizes, a.inproc_seconds)
    print("  (b) handler pipeline", flush=True)
    pipeline = measure_pipeline(pipe, images, a.batch_sizes, a.inproc_seconds)
    del pipe  # free its memory and threads before the server's workers start
    stamp = started.strftime("%Y%m%d-%H%M%S")
    rest, rest_error = {}, None
    if not a.skip_rest:
        try:
            rest = run_rest(a, ckpt, ckpt_path, image_dir, a.out_dir / f"run-{stamp}")
        except Exception as e:  # keep (a) and (b): write the report, say what failed, exit non-zero
            rest_error = f"{type(e).__name__}: {e}"
            print(f"bench: the TorchServe part failed: {rest_error}", file=sys.stderr)

    json_path = a.out_dir / f"bench-{stamp}.json"
    meta = {**info, "date": started.strftime("%Y-%m-%d %H:%M UTC"), "loadavg_start": load_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()], "wall_s": round(time.time() - started.timestamp()),
            "model": f"{a.arch} at {a.img_size} px, 3 channels, 10 classes, random weights (seed {a.seed})",
            "runtime": a.runtime, "quick": a.quick, "rest_error": rest_error,
            "images": f"{len(images)} Fashion-MNIST test pictures upscaled to {SIZE[0]}x{SIZE[1]} RGB JPEG "
                      f"(quality {QUALITY}, mean {sum(map(len, images)) / len(images) / 1024:.1f} KiB); preprocess "
                      "resize 256, centre crop 224, ImageNet mean/std for both handlers",
            "torchserve": BatchSettings(a.batch_size, a.max_batch_delay, a.workers).as_dict(),
            "load_generator": f"locust {info['versions']['locust']} headless, FastHttpUser, closed loop (no think "
                              f"time), {a.seconds:g} s per point counted from when all users are spawned "
                              "(--reset-stats), one JPEG per request as the raw body",
            "json": str(json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path)}
    result = {"meta": meta, "model_forward": forward, "pipeline": pipeline, "rest": rest}
    result["ratios"] = report.compute_ratios(result)
    report.write_json(result, json_path)
    print(f"wrote {json_path}")
    if a.docs_dir:
        docs = Path(a.docs_dir)
        png = report.plot_concurrency(result, docs / "bench_concurrency.png") if rest else None
        md_path = report.write_markdown(report.render_markdown(result, png.name if png else None),
                                        docs / "benchmarks.md")
        print(f"wrote {md_path}" + (f" and {png}" if png else ""))
    print(report.render_markdown(result, None))
    return result


def main(argv: list[str] | None = None) -> int:
    result = run(parse_args(argv))
    return 1 if result["meta"]["rest_error"] else 0


if __name__ == "__main__":
    sys.exit(main())
