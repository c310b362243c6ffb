"""End-to-end video benchmark, one model, one clip, one run on one machine (`make bench-video`):

  (i)    one clip in-process: the handler's SegmentPipeline on the clip's bytes (decode -> preprocess -> infer ->
         post-process -> answer JSON), with one thread (what one server worker gets) and with the whole CPU
  (ii)   clip requests through TorchServe: one client, then one client per worker, each posting the whole clip
  (iii)  camera streams through TorchServe: N cameras posting JPEG frames at 30 FPS each, on schedule whatever the
         answers (open loop, up to --in-flight frames per camera), N = 1, 2, ... until a stream misses real
         time: how many streams one node holds with p99 <= 100 ms
  (base) TorchServe's near-real-time example's pattern: a client decodes the clip, JPEG-encodes each frame and
         sends the frames one by one, waiting for each answer, to the same model's frame endpoint

    python -m load_tests.video_bench           # make bench-video: ~6 min on 2 cores; docs/video.md block + PNG
    python -m load_tests.video_bench --quick   # seconds: a tiny model, in-process only, no docs

The model, its runtime and its TorchServe settings come from the archive config (--config): the archive step
builds the .mar with its runtime artifact, the server loads it, and (i) loads the same files from the unpacked
.mar. Weights: the config's checkpoint when it exists, else random-but-seeded weights (speed does not depend on
them; post-processing does a little, through the number of connected components). Where the server's workers
spend their time is sampled with py-spy (load_tests/profile.py) during extra points that are not counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
import torch
import yaml

from handlers.artifacts import write_json
from handlers.cpu import cpu_budget, threads_per_worker
from load_tests import video_report
from load_tests.bench import machine_info
from load_tests.inprocess import bench_seg_checkpoint
from load_tests.profile import profile_workers
from load_tests.report import metric, percentiles
from load_tests.rest import process_tree_cpu, run_locust, unpack

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "archive_configs" / "fmnist-video-seg-vit-tiny" / "1.0.yaml"
ARCH = "vit_seg_tiny"  # random weights: the model the shipped config serves
QUICK_MODEL = {"depth": 1, "dim": 32, "heads": 2, "mlp_dim": 64, "head_width": 16, "detail_width": 8}
JPEG_QUALITY = 90  # camera frames, and the baseline client's per-frame encoding


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m load_tests.video_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=CONFIG, help="archive config: model, runtime, TorchServe settings")
    p.add_argument("--checkpoint", type=Path, default=None, help="weights (default: the config's checkpoint when it "
                   "exists, else random weights)")
    p.add_argument("--random-weights", action="store_true", help="random weights even if the checkpoint exists")
    p.add_argument("--runtime", default=None, help="override the config's runtime")
    p.add_argument("--frames", type=int, default=300, help="clip length in frames (30 FPS)")
    p.add_argument("--size", type=int, default=224, help="clip side in pixels")
    p.add_argument("--reps", type=int, default=3, help="(i) clip passes per thread count")
    p.add_argument("--clip-seconds", type=float, default=15, help="(ii) seconds per point")
    p.add_argument("--fps", type=float, default=30, help="(iii) frames per second per camera")
    p.add_argument("--streams", type=_ints, default=[1, 2, 3, 4, 6, 8], help="(iii) camera counts, in order; "
                   "stops after the first that misses real time")
    p.add_argument("--stream-seconds", type=float, default=15, help="(iii) measured seconds per point")
    p.add_argument("--p99-ms", type=float, default=100, help="(iii) real time: p99 frame latency at most this")
    p.add_argument("--in-flight", type=int, default=4, help="(iii) frames a camera may have unanswered: each camera "
                   "is this many locust users pacing fps / in-flight each, started 1 / fps apart")
    p.add_argument("--baseline-seconds", type=float, default=10, help="(base) client loop seconds (whole clips)")
    p.add_argument("--profile-seconds", type=float, default=8, help="py-spy seconds per profiled point (0: none)")
    p.add_argument("--skip-rest", action="store_true", help="(i) only: no TorchServe")
    p.add_argument("--quick", action="store_true", help="plumbing check: tiny model, 16 frames of 64 px, (i) only")
    p.add_argument("--seed", type=int, default=0, help="clip and random-weight seed")
    p.add_argument("--build-dir", type=Path, default=ROOT / "reports/video-bench/build")
    p.add_argument("--out-dir", type=Path, default=ROOT / "reports/video-bench", help="JSON, locust CSVs, py-spy")
    p.add_argument("--docs-dir", default=None, help="write video_bench.json, video_bench.png and the docs/video.md "
                   "block here (default: docs/, nothing with --quick; '' for nothing)")
    a = p.parse_args(argv)
    if a.quick:
        a.frames, a.size, a.reps, a.skip_rest, a.random_weights = min(a.frames, 16), 64, 1, True, True
        a.runtime = a.runtime or "eager"
    if a.docs_dir is None:
        a.docs_dir = "" if a.quick else str(ROOT / "docs")
    return a


# -- inputs -----------------------------------------------------------------------------------------------------
def load_config(a: argparse.Namespace, checkpoint: Path) -> Any:
    """The archive config with the benchmark's checkpoint (and runtime); the artifact's accuracy is not checked
    (the weights may be random), everything else is what the config ships."""
    from serving.config import parse_config

    data = yaml.safe_load(a.config.read_text())
    data.update(checkpoint=str(checkpoint.resolve()), artifact={"max_accuracy_drop": None, "accuracy_images": 1})
    if a.runtime:
        data["runtime"] = a.runtime
    return parse_config(data, source=str(a.config))


def checkpoint(a: argparse.Namespace) -> tuple[Path, str]:
    """(path, what the weights are)."""
    from handlers.artifacts import file_sha256
    from serving.config import parse_config
    from training.checkpoint import load_checkpoint

    path = a.checkpoint or parse_config(yaml.safe_load(a.config.read_text()), source=str(a.config)).checkpoint
    if not a.random_weights and path.is_file():
        miou = (load_checkpoint(path, map_location="cpu").get("metrics") or {}).get("test_miou")
        return path, (f"trained weights {path.name} (sha256 {file_sha256(path)[:12]}"
                      + (f", test mIoU {miou:.3f})" if isinstance(miou, float) else ")"))
    out = a.build_dir / f"{ARCH}-{a.size}-seed{a.seed}{'-quick' if a.quick else ''}.pt"
    bench_seg_checkpoint(out, ARCH, a.size, a.seed, **(QUICK_MODEL if a.quick else {}))
    return out, f"random weights (seed {a.seed}{', a tiny width for --quick' if a.quick else ''})"


def write_inputs(a: argparse.Namespace) -> tuple[bytes, Path, dict[str, Any]]:
    """The clip (H.264 MP4 from the moving Fashion-MNIST test split) and its frames as camera JPEGs."""
    from PIL import Image

    from training.clips import make_clip, write_clip

    clip = make_clip(a.seed, "test", a.frames, a.size)
    path = write_clip(a.build_dir / f"clip-{a.size}-{a.frames}.mp4", clip, a.fps)
    frames_dir = a.build_dir / f"frames-{a.size}"
    shutil.rmtree(frames_dir, ignore_errors=True)
    frames_dir.mkdir(parents=True)
    sizes = []
    for i, frame in enumerate(clip.frames):
        Image.fromarray(frame.permute(1, 2, 0).numpy()).save(frames_dir / f"{i:05d}.jpg", quality=JPEG_QUALITY)
        sizes.append((frames_dir / f"{i:05d}.jpg").stat().st_size)
    data = path.read_bytes()
    return data, frames_dir, {"frames": a.frames, "width": a.size, "height": a.size, "fps": a.fps,
                              "bytes": len(data), "codec": "H.264 (libx264, yuv420p, CRF 18)",
                              "jpeg_quality": JPEG_QUALITY, "jpeg_mean_bytes": round(sum(sizes) / len(sizes)),
                              "source": f"moving Fashion-MNIST test split, seed {a.seed}"}


# -- (i) in-process -----------------------------------------------------------------------------------------------
def measure_clip(pipe: Any, clip: bytes, reps: int) -> dict[str, Any]:
    """`reps` passes of one clip request through the pipeline after one warm-up: frames/s end to end and
    milliseconds per frame per stage (answer = building the answer + its compact JSON, as the adapter sends it)."""
    from handlers.pipeline import STAGES

    totals, latencies, frames, size = dict.fromkeys((*STAGES, "other"), 0.0), [], 0, 0
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        [(status, body)] = pipe.handle_requests([{"data": clip}])
        t1 = time.perf_counter()
        text = json.dumps(body, separators=(",", ":"))
        t2 = time.perf_counter()
        if status != 200:
            raise RuntimeError(f"the clip failed in-process: {status} {str(body)[:300]}")
        if rep == 0:
            continue  # warm-up
        latencies.append(t2 - t0)
        frames, size = frames + len(body["frames"]), len(text)
        for stage in STAGES:
            totals[stage] += pipe.timings[stage]
        totals["answer"] += t2 - t1
        totals["other"] += (t2 - t0) - sum(pipe.timings.values()) - (t2 - t1)
    wall = sum(latencies)
    stages = {k: round(1000 * v / frames, 3) for k, v in totals.items()}
    if pipe.lanes > 1:  # stage times are summed over the lanes and overlap: no wall-time remainder to show
        stages["other"] = None
    return {"frames": frames, "reps": reps, "fps": round(frames / wall, 1), "clip_s": round(wall / reps, 3),
            "stages_ms": stages, "answer_bytes": size}


def run_inprocess(a: argparse.Namespace, ckpt_path: Path, model_dir: Path | None, cfg: Any, clip: bytes,
                  threads_list: list[int]) -> list[dict[str, Any]]:
    """One clip in-process per thread count, and with an ONNX Runtime runtime the most threads again as one lane
    (a one-thread inference) per core."""
    from handlers.artifacts import PACKED
    from handlers.segment import SegmentPipeline

    out = []
    top = max(threads_list)
    runs = [(t, 1) for t in threads_list] + ([(top, top)] if top > 1 and cfg.runtime in PACKED else [])
    for threads, lanes in runs:
        torch.set_num_threads(threads)
        options = {k: v for k, v in cfg.handler_options.items() if k not in ("runtime", "artifact")}
        options["lanes"] = lanes
        if model_dir is not None:  # the archived files, as a worker loads them
            pipe = SegmentPipeline.from_file(model_dir / ckpt_path.name, runtime=cfg.runtime,
                                             artifact="artifact.json", **options)
        else:
            pipe = SegmentPipeline.from_file(ckpt_path, runtime=cfg.runtime, **options)
        print(f"  (i) in-process, {threads} thread(s), {lanes} lane(s)", flush=True)
        out.append({"threads": threads, "lanes": lanes, "runtime": cfg.runtime, "max_batch": pipe.max_batch,
                    **measure_clip(pipe, clip, a.reps)})
        del pipe
    return out


# -- TorchServe ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Served:
    ep: Any
    url: str
    key_file: Path
    pid: int | None
    worker_pids: list[int]

    def counters(self) -> dict[str, float]:
        """The handler's stage milliseconds (all workers) and the frontend's request count for the model, now."""
        from handlers.adapter import STAGE_METRIC
        from handlers.pipeline import STAGES

        name = self.url.rsplit("/", 1)[1]
        text = requests.get(f"{self.ep.metrics_url}/metrics", timeout=10).text
        return {"requests": metric(text, "ts_inference_requests_total", model_name=name),
                **{stage: metric(text, STAGE_METRIC, ModelName=name, Stage=stage) for stage in STAGES}}

    def stages_since(self, before: dict[str, float], frames_per_request: int = 1) -> dict[str, Any]:
        """Server-side milliseconds per frame by stage since `before` (the handler's own timers, summed over the
        workers; the frontend's queueing and transfer are not in them)."""
        time.sleep(1.5)  # the workers' metrics reach the frontend's Prometheus endpoint asynchronously
        after = self.counters()
        frames = (after["requests"] - before["requests"]) * frames_per_request
        return {k: round((after[k] - v) / frames, 3) for k, v in before.items() if k != "requests"} if frames else {}

    def post(self, session: requests.Session, data: bytes, ctype: str) -> requests.Response:
        return session.post(self.url, data=data, timeout=300,
                            headers={"Authorization": f"Bearer {self.ep.inference_key}", "Content-Type": ctype})


def clip_point(served: Served, clip: bytes, frames: int, clients: int, seconds: float) -> dict[str, Any]:
    """(ii) `clients` threads, each posting the whole clip again and again for about `seconds`."""
    latencies: list[float] = []
    errors: list[str] = []
    stop = time.perf_counter() + seconds

    def client() -> None:
        with requests.Session() as s:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = served.post(s, clip, "video/mp4")
                if r.status_code != 200 or len(r.json().get("frames", [])) != frames:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                    return
                latencies.append(time.perf_counter() - t0)

    counters = served.counters()
    cpu0, t0 = process_tree_cpu(served.pid) if served.pid else 0.0, time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = process_tree_cpu(served.pid) - cpu0 if served.pid else 0.0
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "error": errors[:1],
            "fps": round(frames * len(latencies) / wall, 1), "wall_s": round(wall, 1),
            **percentiles([1000 * x for x in latencies]), "server_cpu_pct": round(100 * cpu / wall, 1),
            "server_stages_ms": served.stages_since(counters, frames)}


def client_loop(served: Served, clip: bytes, seconds: float) -> dict[str, Any]:
    """(base) The near-real-time example's client: decode the clip (PyAV here; the example uses OpenCV), encode
    each frame as JPEG, POST it, wait for the answer, next frame; whole passes over the clip for ~`seconds`."""
    import av
    from PIL import Image

    spent = {"decode": 0.0, "encode": 0.0, "request": 0.0}
    latencies, frames, errors = [], 0, 0
    t_start = time.perf_counter()
    with requests.Session() as s:
        while frames == 0 or time.perf_counter() - t_start < seconds:
            with av.open(io.BytesIO(clip)) as container:
                decoded = container.decode(video=0)
                while True:
                    t0 = time.perf_counter()
                    frame = next(decoded, None)
                    if frame is None:
                        break
                    rgb = frame.to_ndarray(format="rgb24")
                    t1 = time.perf_counter()
                    buf = io.BytesIO()
                    Image.fromarray(rgb).save(buf, "JPEG", quality=JPEG_QUALITY)
                    t2 = time.perf_counter()
                    r = served.post(s, buf.getvalue(), "image/jpeg")
                    t3 = time.perf_counter()
                    errors += r.status_code != 200 or "detections" not in r.json()
                    spent["decode"] += t1 - t0
                    spent["encode"] += t2 - t1
                    spent["request"] += t3 - t2
                    latencies.append(t3 - t2)
                    frames += 1
    wall = time.perf_counter() - t_start
    return {"frames": frames, "errors": errors, "fps": round(frames / wall, 1), "wall_s": round(wall, 1),
            "client_ms": {k: round(1000 * v / frames, 3) for k, v in spent.items()},
            **percentiles([1000 * x for x in latencies])}


def stream_point(a: argparse.Namespace, served: Served, frames_dir: Path, n: int, out: Path,
                 seconds: float | None = None) -> dict[str, Any]:
    """(iii) n cameras at a.fps: each is a.in_flight paced locust users sending a.fps / a.in_flight frames/s,
    started 1 / a.fps apart, so a camera sends a frame every 1 / a.fps s while it has fewer than a.in_flight
    unanswered (a locust user waits for its answer). Real time: no errors, p99 <= a.p99_ms and the frames answered
    keep up with the frames offered (>= 95 %)."""
    users, counters = n * a.in_flight, served.counters()
    point = run_locust(served.ep, served.key_file, served.url.rsplit("/", 1)[1], str(frames_dir), users,
                       seconds or a.stream_seconds, out, served.pid, expect="detections",
                       extra=["--pace", f"{a.fps / a.in_flight:g}"], spawn_rate=a.fps)
    point.update(streams=n, in_flight=a.in_flight, offered_fps=round(n * a.fps, 1),
                 server_stages_ms=served.stages_since(counters))
    point["realtime"] = bool(point["failures"] == 0 and point["p99_ms"] is not None and point["p99_ms"] <= a.p99_ms
                             and point["ok_rps"] >= 0.95 * n * a.fps)
    return point


def profiled(served: Served, seconds: float, out_dir: Path, load: Any) -> dict[str, Any]:
    """py-spy on every worker for `seconds` while `load()` runs (started 3 s before, so locust has spawned its
    users; the load runs 2 s past the profile); returns the stage shares and the load's own result."""
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(load=load()))
    thread.start()
    time.sleep(3)
    result.update(profile_workers(served.worker_pids, seconds, out_dir))
    thread.join()
    return result


def run_rest(a: argparse.Namespace, cfg: Any, store: Path, clip: bytes, frames_dir: Path,
             out_dir: Path) -> dict[str, Any]:
    from serving import server
    from serving.manage import Client

    runtime_dir = a.build_dir / "ts-runtime"
    ports = server.Ports(*server.free_ports(len(dataclasses.fields(server.Ports))))
    ep = server.start(store, runtime_dir, ports, timeout=180)
    rest: dict[str, Any] = {"streams": []}
    try:
        client = Client(runtime_dir, store)
        t0 = time.perf_counter()
        client.register(cfg.name, cfg.version)
        rest["ready_s"] = round(time.perf_counter() - t0, 1)
        pids = [w["pid"] for w in client.describe(cfg.name, cfg.version)[0]["workers"]]
        served = Served(ep, f"{ep.inference_url}/predictions/{cfg.name}", runtime_dir / server.KEY_FILE,
                        server.server_pid(runtime_dir), pids)
        frame = next(iter(sorted(frames_dir.glob("*.jpg")))).read_bytes()
        with requests.Session() as s:  # warm-up: every worker answers frames and a clip
            for data, ctype in [(frame, "image/jpeg")] * 4 + [(clip, "video/mp4")] * 2:
                r = served.post(s, data, ctype)
                if r.status_code != 200:
                    raise RuntimeError(f"warm-up failed: HTTP {r.status_code} {r.text[:300]}")
        workers = cfg.torchserve["maxWorkers"]
        for clients in sorted({1, workers}):
            print(f"  (ii) clip requests, {clients} client(s), {a.clip_seconds:g} s", flush=True)
            rest.setdefault("clips", []).append(clip_point(served, clip, a.frames, clients, a.clip_seconds))
        print(f"  (base) per-frame client loop, {a.baseline_seconds:g} s", flush=True)
        rest["baseline"] = client_loop(served, clip, a.baseline_seconds)
        for n in a.streams:
            print(f"  (iii) {n} camera stream(s) at {a.fps:g} FPS, {a.stream_seconds:g} s", flush=True)
            rest["streams"].append(stream_point(a, served, frames_dir, n, out_dir / "locust" / f"streams-{n}"))
            if not rest["streams"][-1]["realtime"]:
                break
        if a.profile_seconds > 0:
            top = rest["streams"][-1]["streams"] if rest["streams"] else 1
            print(f"  profiles (py-spy, not counted): clips with {workers} clients, {top} streams", flush=True)
            rest["profile_clips"] = profiled(served, a.profile_seconds, out_dir / "profile-clips", lambda: clip_point(
                served, clip, a.frames, workers, a.profile_seconds + 5))
            rest["profile_streams"] = profiled(served, a.profile_seconds, out_dir / "profile-streams", lambda: (
                stream_point(a, served, frames_dir, top, out_dir / "locust" / "profile", a.profile_seconds + 5)))
    finally:
        server.stop(runtime_dir)
    return rest


# -- the run ------------------------------------------------------------------------------------------------------
def run(a: argparse.Namespace) -> dict[str, Any]:
    from serving.archive import build_archive
    from training.checkpoint import load_checkpoint

    started = datetime.now(UTC)
    load_start = [round(x, 2) for x in os.getloadavg()]
    a.build_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, weights = checkpoint(a)
    cfg = load_config(a, ckpt_path)
    workers = cfg.torchserve["maxWorkers"]
    worker_threads = int(cfg.handler_options.get("cpu_threads") or threads_per_worker(workers))
    os.environ["OMP_NUM_THREADS"] = str(worker_threads)  # the server's workers inherit it (handlers/adapter.py)
    clip, frames_dir, clip_info = write_inputs(a)
    info = machine_info()
    print(f"video bench: {cfg.name} ({weights}), runtime {cfg.runtime}, {workers} workers x {worker_threads} "
          f"thread(s), {a.frames} frames of {a.size} px, load average {load_start}", flush=True)
    store, model_dir = a.build_dir / "store", None
    if not a.quick:
        shutil.rmtree(store, ignore_errors=True)
        model_dir = unpack(store / build_archive(cfg, store)["mar"], a.build_dir / "unpacked")
    inprocess = run_inprocess(a, ckpt_path, model_dir, cfg, clip, sorted({1, cpu_budget()}))
    stamp = started.strftime("%Y%m%d-%H%M%S")
    rest, rest_error = {}, None
    if not a.skip_rest:
        try:
            rest = run_rest(a, cfg, store, clip, frames_dir, a.out_dir / f"run-{stamp}")
        except Exception as e:  # keep (i): write the report, say what failed, exit non-zero
            rest_error = f"{type(e).__name__}: {e}"
            print(f"video bench: the TorchServe part failed: {rest_error}")
    json_path = a.out_dir / f"video-bench-{stamp}.json"
    meta = {**info, "date": started.strftime("%Y-%m-%d %H:%M UTC"), "loadavg_start": load_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()], "wall_s": round(time.time() - started.timestamp()),
            "quick": a.quick, "rest_error": rest_error, "model": cfg.name, "description": cfg.description,
            "weights": weights, "arch": load_checkpoint(ckpt_path, map_location="cpu")["arch"], "img_size": a.size,
            "config": str(a.config.relative_to(ROOT) if a.config.is_relative_to(ROOT) else a.config),
            "runtime": cfg.runtime, "clip": clip_info, "fps_target": a.fps, "p99_target_ms": a.p99_ms,
            "torchserve": {**{k: cfg.torchserve[k] for k in ("batchSize", "maxBatchDelay", "maxWorkers")},
                           "threads": worker_threads, "max_batch": cfg.handler_options.get("max_batch")},
            "json": str(json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path)}
    result = {"meta": meta, "inprocess": inprocess, "rest": rest}
    write_json(json_path, result)
    print(f"wrote {json_path}")
    if a.docs_dir:
        video_report.write_docs(result, Path(a.docs_dir))
    print(video_report.markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    result = run(parse_args(argv))
    return 1 if result["meta"]["rest_error"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
