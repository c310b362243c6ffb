"""Side-by-side benchmark, one model, one image set, one run on one machine:

  (a) model forward in-process            (batch sweep)
  (b) our handler pipeline in-process     (batch sweep; bytes -> top-k JSON, handlers.image.ImagePipeline), and
      at the server's batch size with the server's layout: --workers processes x --threads threads side by side
  (c) TorchServe + our handler, REST      (concurrency sweep, locust closed loop)
  (d) TorchServe + stock image_classifier (same weights, same preprocessing, same batch settings; fp32 eager)
  (e) TorchServe + our handler with the eager runtime, at the highest concurrency: eager against eager

    python -m load_tests.bench                 # `make bench`: ~5 min on 2 cores; writes docs/benchmarks.md
    python -m load_tests.bench --quick --skip-rest --docs-dir ''   # seconds, in-process only, JSON only

Everything of ours runs from the archive: the archive step builds the runtime artifact (--runtime) into the
.mar, the server loads it from there, and (a)/(b) load the same files from the unpacked .mar. Threads come from
the CPU budget (affinity, cgroup quota) shared among --workers unless --threads is given. Where (c) keeps less
than 90 % of the layout (b), the workers are profiled with py-spy during an extra point (load_tests/profile.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import torch

from handlers.artifacts import write_json
from handlers.cpu import cpu_budget, threads_per_worker
from load_tests import report
from load_tests.images import QUALITY, SIZE, write_jpegs
from load_tests.inprocess import bench_checkpoint, measure_forward, measure_layout, measure_pipeline
from load_tests.rest import (
    BatchSettings,
    build_our_archive,
    build_stock_archive,
    register,
    run_locust,
    unpack,
    warm_up,
)

ROOT = Path(__file__).resolve().parents[1]
POINTS = {"ours": "c", "stock": "d", "ours_eager": "e"}
RUNTIME_NAMES = {"eager": "fp32 eager PyTorch", "bf16": "bf16 autocast PyTorch", "compile": "torch.compile",
                 "onnx": "fp32 ONNX Runtime", "int8": "int8 ONNX Runtime, static QDQ"}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m load_tests.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="registry name; (d) needs resnet18 at 224 px")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--runtime", default="int8", help="our handler's runtime (archive config -> the packed artifact)")
    p.add_argument("--images", type=int, default=64, help="how many 500x375 JPEGs to send (round-robin)")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8, 16], help="(a), (b) sweep, e.g. 1,8,16")
    p.add_argument("--concurrency", type=_ints, default=[1, 4, 16], help="(c), (d) sweep of locust users")
    p.add_argument("--seconds", type=float, default=15, help="measured seconds per REST point")
    p.add_argument("--inproc-seconds", type=float, default=5, help="measured seconds per in-process point")
    p.add_argument("--batch-size", type=int, default=8, help="TorchServe batchSize for (c) and (d)")
    p.add_argument("--max-batch-delay", type=int, default=20, help="TorchServe maxBatchDelay (ms)")
    p.add_argument("--workers", type=int, default=2, help="TorchServe workers per model (and layout (b) processes)")
    p.add_argument("--threads", type=int, default=0, help="threads per worker and per in-process pipeline (sets "
                   "OMP_NUM_THREADS for the server; 0: the CPU budget shared among --workers)")
    p.add_argument("--profile-seconds", type=float, default=10, help="py-spy the workers this long where (c)/(b) "
                   "< 0.9 (0: never)")
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
    for pkg in ("torchvision", "torchserve", "onnxruntime", "locust"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {"hardware": cpu, "cores": cpu_budget(), "machine_cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30), "versions": versions,
            "threads": torch.get_num_threads()}


@dataclasses.dataclass
class Archives:
    store: Path
    ours: str          # model names on the server
    ours_eager: str
    stock: str
    model_dir: Path    # ours, unpacked: what a worker loads


def build_archives(a: argparse.Namespace, ckpt: dict[str, Any], ckpt_path: Path) -> Archives:
    """Ours (a.runtime, its artifact built by the archive step), ours with eager, and stock, in a fresh store."""
    settings = BatchSettings(a.batch_size, a.max_batch_delay, a.workers)
    store = a.build_dir / "store"
    shutil.rmtree(store, ignore_errors=True)
    names = Archives(store, f"bench-{a.arch}", f"bench-{a.arch}-eager", f"stock-{a.arch}", a.build_dir / "unpacked")
    mar = build_our_archive(ckpt_path, store, a.build_dir, names.ours, a.runtime, settings)
    unpack(store / mar, names.model_dir)
    if not a.skip_rest:
        build_our_archive(ckpt_path, store, a.build_dir, names.ours_eager, "eager", settings)
        build_stock_archive(ckpt, store, a.build_dir, names.stock, settings)
    return names


def run_rest(a: argparse.Namespace, archives: Archives, image_dir: Path, out_dir: Path,
             layout_img_s: float | None) -> dict[str, Any]:
    """Serve all three from one TorchServe, sweep users for (c) and (d), then (e) at the top concurrency, then
    (where (c) keeps < 90 % of the layout (b)) profile our workers; always stop the server."""
    from serving import server
    from serving.manage import Client
    from serving.server import free_ports

    settings = BatchSettings(a.batch_size, a.max_batch_delay, a.workers)
    runtime_dir = a.build_dir / "ts-runtime"
    image = next(iter(sorted(image_dir.glob("*.jpg")))).read_bytes()
    results: dict[str, Any] = {"ours": [], "stock": [], "ours_eager": []}
    ports = server.Ports(*free_ports(len(dataclasses.fields(server.Ports))))  # HTTP and gRPC: none on defaults
    ep = server.start(archives.store, runtime_dir, ports, timeout=180)
    try:
        client = Client(runtime_dir, archives.store)
        for name in (archives.ours, archives.ours_eager):  # sha256-checked, asynchronous, waits for READY
            t0 = time.perf_counter()
            client.register(name, "1.0", min_workers=a.workers, batch_size=a.batch_size,
                            max_batch_delay=a.max_batch_delay, response_timeout=settings.response_timeout)
            results.setdefault("ready_s", {})[name] = round(time.perf_counter() - t0, 1)
        register(ep, f"{archives.stock}.mar", archives.stock, settings)
        for name in (archives.ours, archives.ours_eager, archives.stock):
            warm_up(ep, name, image)
        pid = server.server_pid(runtime_dir)
        key_file = runtime_dir / server.KEY_FILE

        def point(key: str, name: str, users: int, expect: str = "predictions") -> dict[str, Any]:
            print(f"  ({POINTS[key]}) {name}: {users} users, {a.seconds:g} s", flush=True)
            return run_locust(ep, key_file, name, str(image_dir), users, a.seconds,
                              out_dir / "locust" / f"{key}-u{users}", pid, expect)

        for i, users in enumerate(a.concurrency):
            # Alternate which server goes first, so a change in background load does not favour one of them.
            order = [("ours", archives.ours, "predictions"), ("stock", archives.stock, "labels")]
            for key, name, expect in order if i % 2 == 0 else order[::-1]:
                results[key].append(point(key, name, users, expect))
        top = max(a.concurrency)
        results["ours_eager"].append(point("ours_eager", archives.ours_eager, top))
        c = results["ours"][-1]["rps"]
        if a.profile_seconds > 0 and layout_img_s and c < 0.9 * layout_img_s:
            results["profile"] = profile_point(a, ep, key_file, archives, image_dir, out_dir, client, top, pid)
    finally:
        server.stop(runtime_dir)
    return results


def profile_point(a: argparse.Namespace, ep: Any, key_file: Path, archives: Archives, image_dir: Path,
                  out_dir: Path, client: Any, users: int, pid: int | None) -> dict[str, Any]:
    """An extra (c) point, not counted in the figures, with py-spy on each of our workers."""
    import threading

    from load_tests.profile import profile_workers

    pids = [w["pid"] for w in client.describe(archives.ours, "1.0")[0]["workers"]]
    seconds = a.profile_seconds
    print(f"  profiling {archives.ours}: {users} users, py-spy on workers {pids}, {seconds:g} s", flush=True)
    load = threading.Thread(target=run_locust, args=(ep, key_file, archives.ours, str(image_dir), users,
                                                     seconds + 4, out_dir / "locust" / f"profile-u{users}", pid))
    load.start()
    time.sleep(2)  # users spawned
    result = profile_workers(pids, seconds, out_dir / "profile")
    load.join()
    return {"users": users, **result}


def run(a: argparse.Namespace) -> dict[str, Any]:
    from handlers.image import ImagePipeline

    started = datetime.now(UTC)
    threads = a.threads or threads_per_worker(a.workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before the server starts: its workers inherit the environment
    torch.set_num_threads(threads)
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
    print(f"bench: {a.arch}@{a.img_size}, runtime {a.runtime}, {a.workers} workers x {threads} threads, "
          f"{len(images)} images, load average {load_start}", flush=True)
    archives = build_archives(a, ckpt, ckpt_path)
    pipe = ImagePipeline.from_file(archives.model_dir / ckpt_path.name, "cpu", runtime=a.runtime,
                                   artifact="artifact.json", topk=5, model_name=f"bench-{a.arch}")
    print("  (a) model forward", flush=True)
    forward = measure_forward(pipe, images, a.batch_sizes, a.inproc_seconds)
    print("  (b) handler pipeline", flush=True)
    pipeline = measure_pipeline(pipe, images, a.batch_sizes, a.inproc_seconds)
    runtime_info = {k: v for k, v in pipe.runtime_info.items() if k not in ("file", "prepare_s")}
    del pipe  # free its memory and threads before the other processes start
    print(f"  (b) handler pipeline, {a.workers} processes x {threads} threads, batch {a.batch_size}", flush=True)
    layout = measure_layout(archives.model_dir, ckpt_path.name, a.runtime, images, a.workers, threads,
                            a.batch_size, a.inproc_seconds)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    rest, rest_error = {}, None
    if not a.skip_rest:
        try:
            rest = run_rest(a, archives, image_dir, a.out_dir / f"run-{stamp}", layout["img_s"])
        except Exception as e:  # keep (a) and (b): write the report, say what failed, exit non-zero
            rest_error = f"{type(e).__name__}: {e}"
            print(f"bench: the TorchServe part failed: {rest_error}", file=sys.stderr)

    json_path = a.out_dir / f"bench-{stamp}.json"
    meta = {**info, "date": started.strftime("%Y-%m-%d %H:%M UTC"), "loadavg_start": load_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()], "wall_s": round(time.time() - started.timestamp()),
            "model": f"{a.arch} at {a.img_size} px, 3 channels, 10 classes, random weights (seed {a.seed})",
            "runtime": a.runtime, "runtime_info": runtime_info, "threads": threads, "quick": a.quick,
            "rest_error": rest_error,
            "sides": {"ours": f"our handler, runtime {a.runtime} ({RUNTIME_NAMES.get(a.runtime, a.runtime)}), "
                              "loaded from the archive",
                      "ours_eager": f"our handler, runtime eager ({RUNTIME_NAMES['eager']})",
                      "stock": f"stock image_classifier ({RUNTIME_NAMES['eager']})"},
            "images": f"{len(images)} Fashion-MNIST test pictures upscaled to {SIZE[0]}x{SIZE[1]} RGB JPEG "
                      f"(quality {QUALITY}, mean {sum(map(len, images)) / len(images) / 1024:.1f} KiB); preprocess "
                      "resize 256, centre crop 224, ImageNet mean/std for both handlers",
            "torchserve": {**BatchSettings(a.batch_size, a.max_batch_delay, a.workers).as_dict(), "threads": threads},
            "load_generator": f"locust {info['versions']['locust']} headless, FastHttpUser, closed loop (no think "
                              f"time), {a.seconds:g} s per point counted from when all users are spawned "
                              "(--reset-stats), one JPEG per request as the raw body",
            "json": str(json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path)}
    result = {"meta": meta, "model_forward": forward, "pipeline": pipeline, "pipeline_layout": layout, "rest": rest}
    result["ratios"] = report.compute_ratios(result)
    write_json(json_path, result)
    print(f"wrote {json_path}")
    if a.docs_dir:
        docs = Path(a.docs_dir)
        png = report.plot_concurrency(result, docs / "bench_concurrency.png") if rest else None
        md_path = report.write_markdown(report.render_markdown(result, png.name if png else None),
                                        docs / "benchmarks.md")
        write_json(docs / "benchmarks.json", result)  # the figures the page shows, committed with it
        print(f"wrote {md_path}, {docs / 'benchmarks.json'}" + (f" and {png}" if png else ""))
    print(report.render_markdown(result, None))
    return result


def main(argv: list[str] | None = None) -> int:
    result = run(parse_args(argv))
    return 1 if result["meta"]["rest_error"] else 0


if __name__ == "__main__":
    sys.exit(main())
