"""The REST half of the benchmark: (c) TorchServe + our handler and (d) TorchServe + the stock
`image_classifier` handler, with the same weights and batch settings on one server, loaded by locust.

Server CPU (Java frontend + Python workers) is sampled with psutil while locust runs; locust reports its own CPU
for the same window (--cpu-report), so a starved load generator shows in the figures instead of hiding in them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import requests
import torch
import yaml

from load_tests.report import read_locust_stats

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"


@dataclass(frozen=True)
class BatchSettings:
    """The TorchServe model config used for both (c) and (d)."""

    batch_size: int = 8
    max_batch_delay: int = 20  # ms
    workers: int = 1
    response_timeout: int = 120

    def as_dict(self) -> dict[str, int]:
        return {"batchSize": self.batch_size, "maxBatchDelay": self.max_batch_delay, "workers": self.workers,
                "responseTimeout": self.response_timeout}


def build_our_archive(checkpoint: Path, store: Path, work: Path, name: str, runtime: str,
                      settings: BatchSettings, topk: int = 5) -> str:
    """Through the project's own archive step (config validation, sources packed, the runtime artifact built and
    packed, index + sha256). The weights are random: int8 calibrates on synthetic images (said in the archive)
    and there is no accuracy to hold to a budget."""
    from serving.archive import build_archive
    from serving.config import load_config

    cfg = work / "configs" / name / "1.0.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump({
        "name": name, "version": "1.0", "checkpoint": str(checkpoint.resolve()), "runtime": runtime,
        "description": "benchmark model (random weights)",
        "artifact": {"calibration": "synthetic", "max_accuracy_drop": None},
        "torchserve": {"batchSize": settings.batch_size, "maxBatchDelay": settings.max_batch_delay,
                       "minWorkers": settings.workers, "maxWorkers": settings.workers,
                       "responseTimeout": settings.response_timeout, "deviceType": "cpu",
                       "handler": {"topk": topk}}}))
    return build_archive(load_config(cfg), store)["mar"]


def unpack(mar: Path, dest: Path) -> Path:
    """The .mar's files, as a worker sees its model dir."""
    import zipfile

    shutil.rmtree(dest, ignore_errors=True)
    with zipfile.ZipFile(mar) as z:
        z.extractall(dest)
    return dest


def build_stock_archive(ckpt: dict[str, Any], store: Path, work: Path, name: str, settings: BatchSettings) -> str:
    """model.py (one class, no-arg constructor) + a state_dict .pt + index_to_name.json, stock handler."""
    src = work / "stock"
    src.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "stock_model.py", src / "model.py")
    torch.save(ckpt["state_dict"], src / "weights.pt")
    (src / "index_to_name.json").write_text(json.dumps({str(i): c for i, c in enumerate(ckpt["classes"])}))
    (src / "model-config.yaml").write_text(yaml.safe_dump({
        "minWorkers": settings.workers, "maxWorkers": settings.workers, "batchSize": settings.batch_size,
        "maxBatchDelay": settings.max_batch_delay, "responseTimeout": settings.response_timeout}))
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    cmd = [str(archiver if archiver.is_file() else "torch-model-archiver"), "--model-name", name, "--version", "1.0",
           "--model-file", str(src / "model.py"), "--serialized-file", str(src / "weights.pt"),
           "--handler", "image_classifier", "--extra-files", str(src / "index_to_name.json"),
           "--config-file", str(src / "model-config.yaml"), "--export-path", str(store), "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed for the stock model: {proc.stderr.strip()[-500:]}")
    return f"{name}.mar"


def register(ep: Any, mar: str, name: str, settings: BatchSettings) -> None:
    """Register by file name with explicit batch settings (the same call for both models), workers up."""
    params = {"url": mar, "model_name": name, "initial_workers": settings.workers, "synchronous": "true",
              "batch_size": settings.batch_size, "max_batch_delay": settings.max_batch_delay,
              "response_timeout": settings.response_timeout}
    r = requests.post(f"{ep.management_url}/models", params=params, timeout=300,
                      headers={"Authorization": f"Bearer {ep.management_key}"})
    if r.status_code != 200:
        raise RuntimeError(f"registering {name} failed: HTTP {r.status_code} {r.text[:300]}")


def warm_up(ep: Any, name: str, image: bytes, n: int = 3) -> None:
    """A few requests so the first measured ones do not pay for lazy initialisation."""
    for _ in range(n):
        r = requests.post(f"{ep.inference_url}/predictions/{name}", data=image, timeout=120,
                          headers={"Authorization": f"Bearer {ep.inference_key}", "Content-Type": "image/jpeg"})
        if r.status_code != 200:
            raise RuntimeError(f"warm-up request to {name} failed: HTTP {r.status_code} {r.text[:300]}")


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants, now."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _interp(samples: list[tuple[float, float]], t: float) -> float:
    """Server CPU seconds at wall time t, interpolated between the 0.25 s samples."""
    if t <= samples[0][0]:
        return samples[0][1]
    for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
        if t0 <= t <= t1:
            return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)
    return samples[-1][1]


def run_locust(ep: Any, key_file: Path, model: str, images: str, users: int, seconds: float, out_prefix: Path,
               server_pid: int | None, expect: str = "predictions", extra: Sequence[str] = (),
               spawn_rate: float | None = None) -> dict[str, Any]:
    """One point: `users` users for `seconds` after all are spawned (all at once, or `spawn_rate` per second);
    closed loop (no think time) unless `extra` locustfile options say otherwise (["--pace", "7.5"]: each user
    sends 7.5 requests/s)."""
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    cpu_report = out_prefix.with_name(out_prefix.name + "_cpu.json")
    cpu_report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "-u", str(users), "-r", f"{spawn_rate or users:g}", "-t", f"{max(1, round(seconds))}s", "--shape", "steady",
           "--host", ep.inference_url, "--model", model, "--images", images, "--token-file", str(key_file),
           "--expect", expect, "--csv", str(out_prefix), "--reset-stats", "--cpu-report", str(cpu_report),
           "--loglevel", "WARNING", *extra]
    samples: list[tuple[float, float]] = []
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=HERE.parent)
        deadline = time.monotonic() + seconds + 120
        while proc.poll() is None:
            if server_pid:
                samples.append((time.time(), process_tree_cpu(server_pid)))
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.25)
        log.seek(0)
        tail = log.read().decode(errors="replace")[-1500:]
    stats_csv = Path(f"{out_prefix}_stats.csv")
    if not stats_csv.is_file() or not cpu_report.is_file():
        raise RuntimeError(f"locust produced no stats (exit {proc.returncode}): {tail}")
    point = {"users": users, **read_locust_stats(stats_csv)}
    window = json.loads(cpu_report.read_text())
    point["window_s"] = round(window["wall_s"], 2)
    point["loadgen_cpu_pct"] = round(100 * window["cpu_s"] / window["wall_s"], 1)
    if len(samples) >= 2:
        used = _interp(samples, window["t_end"]) - _interp(samples, window["t_start"])
        point["server_cpu_pct"] = round(100 * used / window["wall_s"], 1)
    return point
