"""What building the runtime artifact at archive time changed, measured side by side in one run:

1. Worker start: a fresh process loads ResNet-18@224 with `onnx` / `int8` the way a worker did before (export,
   and for int8 calibrate and quantize, at load, into an empty cache) and the way it does now (check and load the
   artifact packed in the archive). Median of --reps fresh processes each, the two ways alternating.
2. Calibration: int8 archives of trained checkpoints calibrated on the seeded training-split sample and on
   synthetic images; the accuracy each archive records (its own int8 graph against the fp32 checkpoint, the whole
   test split, measured by the archive step).

    .venv/bin/python scripts/artifact_bench.py --checkpoints checkpoints/lenet5-fashion_mnist.pt --docs

Writes reports/runtimes/artifacts-<date>.json; --docs also writes docs/runtimes-artifacts.json and the generated
block of docs/runtimes.md (tests/test_runtimes.py checks the block against the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from load_tests.reliability import write_doc_block  # noqa: E402
from scripts.runtime_bench import _cpu_name, _ort_version, bench_checkpoint  # noqa: E402

DOC, NAME = ROOT / "docs" / "runtimes.md", "runtimes-artifacts"
_CHILD = """
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
from handlers.image import ImagePipeline
p = ImagePipeline.from_file({path!r}, runtime={rt!r}, runtime_cache={cache!r}, cpu_threads={threads}{artifact})
print(json.dumps(dict(p.runtime_info, load_s=round(time.perf_counter() - t0, 2))))
"""


def archive(checkpoint: Path, store: Path, name: str, runtime: str, calibration: str = "dataset") -> dict[str, Any]:
    """Through the archive step itself; no accuracy budget (this measures, it does not gate)."""
    from serving.archive import build_archive
    from serving.config import load_config

    cfg = store.parent / "configs" / name / "1.0.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump({
        "name": name, "version": "1.0", "checkpoint": str(checkpoint.resolve()), "runtime": runtime,
        "artifact": {"calibration": calibration, "max_accuracy_drop": None},
        "torchserve": {"batchSize": 8, "maxBatchDelay": 5, "minWorkers": 1, "maxWorkers": 1, "responseTimeout": 60,
                       "deviceType": "cpu"}}))
    return build_archive(load_config(cfg), store)


def _child(path: Path, runtime: str, cache: str, threads: int, artifact: bool) -> dict[str, Any]:
    code = _CHILD.format(root=str(ROOT), path=str(path), rt=runtime, cache=cache, threads=threads,
                         artifact=", artifact='artifact.json'" if artifact else "")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{runtime} start failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def worker_start(work: Path, threads: int, reps: int) -> dict[str, Any]:
    """Seconds from a fresh process's start to a ready pipeline: built at load vs loaded from the archive."""
    import zipfile

    ckpt = bench_checkpoint(work / "resnet18-224-random.pt")
    out: dict[str, Any] = {}
    for runtime in ("onnx", "int8"):
        entry = archive(ckpt, work / "store", f"start-{runtime}", runtime, calibration="synthetic")
        unpacked = work / f"unpacked-{runtime}"
        with zipfile.ZipFile(work / "store" / entry["mar"]) as z:
            z.extractall(unpacked)
        times: dict[str, list[float]] = {"built at load": [], "packed artifact": []}
        for _ in range(reps):
            with tempfile.TemporaryDirectory(prefix="empty-cache-") as cache:
                times["built at load"].append(_child(ckpt, runtime, cache, threads, False)["load_s"])
            with tempfile.TemporaryDirectory(prefix="empty-cache-") as cache:
                times["packed artifact"].append(_child(unpacked / ckpt.name, runtime, cache, threads, True)["load_s"])
            print(f"  start {runtime}: {times['built at load'][-1]} s built, {times['packed artifact'][-1]} s packed",
                  flush=True)
        out[runtime] = {k: {"median_s": round(statistics.median(v), 2), "runs_s": v} for k, v in times.items()}
    return out


def calibration(checkpoints: list[Path], work: Path) -> dict[str, Any]:
    out = {}
    for path in checkpoints:
        rows = {}
        for kind in ("dataset", "synthetic"):
            entry = archive(path, work / "store", f"cal-{path.stem.replace('_', '-')}-{kind}", "int8", kind)
            rows[kind] = {**entry["accuracy"], "calibration": entry["artifact"]["calibration"]["source"]}
            print(f"  {path.name} int8, {kind} calibration: {rows[kind]}", flush=True)
        out[path.name] = rows
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Measured {report['date']} by `scripts/artifact_bench.py` on {report['cpu']} ({report['cores']} cores, "
             f"{report['threads']} threads; torch {report['torch']}, onnxruntime {report['onnxruntime']}; load "
             f"average {report['load_before'][0]:.2f} before, {report['load_after'][0]:.2f} after); figures in "
             "[runtimes-artifacts.json](runtimes-artifacts.json).", ""]
    if report.get("start"):
        lines += ["Worker start, ResNet-18@224 (a fresh process until its pipeline is ready, median of "
                  f"{report['reps']}):", "", "| runtime | built at load (before) s | packed artifact (now) s |",
                  "| --- | ---: | ---: |"]
        lines += [f"| {rt} | {r['built at load']['median_s']} | {r['packed artifact']['median_s']} |"
                  for rt, r in report["start"].items()]
    for name, rows in report.get("calibration", {}).items():
        first = next(iter(rows.values()))
        lines += ["", f"{name}: int8 accuracy recorded by the archive step ({first['metric']}, {first['images']} "
                  f"{first['split']} images):", "", "| calibration (64 images) | fp32 % | int8 % | Δ pt |",
                  "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['calibration']} | {100 * r['fp32']:.2f} | {100 * r['int8']:.2f} | {-r['drop_pt']:+.2f} |"
                  for r in rows.values()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoints", nargs="*", type=Path, default=[], help="trained checkpoints (calibration)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: start,calibration")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "runtimes")
    ap.add_argument("--docs", action="store_true", help="write docs/runtimes-artifacts.json and its block")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    skip = set(a.skip.split(","))
    work = a.out / "artifacts-work"
    a.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": _cpu_name(), "cores": os.cpu_count(),
                              "threads": a.threads, "reps": a.reps, "torch": torch.__version__,
                              "onnxruntime": _ort_version(), "load_before": os.getloadavg()}
    if "start" not in skip:
        report["start"] = worker_start(work, a.threads, a.reps)
    if "calibration" not in skip:
        report["calibration"] = calibration(a.checkpoints, work)
    report["load_after"] = os.getloadavg()
    out = a.out / f"artifacts-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=1))
    if a.docs:
        (DOC.parent / f"{NAME}.json").write_text(json.dumps(report, indent=1) + "\n")
        write_doc_block(DOC, NAME, markdown(report))
    print(markdown(report))
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
