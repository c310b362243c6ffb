"""Where a TorchServe worker's time goes under load: py-spy samples each worker process (idle samples included)
while locust runs, and every sample is put in one stage by the frames on its stack.

    summary = profile_workers(pids, seconds, out_dir)  # {"stages": {"inference": 41.0, ...}, "samples": N, ...}

Stages, first match from the top of the list: decode (handlers/decode.py images, handlers/video.py clip frames),
preprocess (training/presets.py), inference (handlers/runtimes.py, ONNX Runtime or torch), postprocess (a
pipeline's `postprocess`: top-k, or masks -> detections (training/masks.py) and mask encoding), answer
(handlers/image.py, segment.py, request.py, adapter.py: parse, answer bodies, JSON), frontend I/O (TorchServe's
worker loop in model_service_worker.py with nothing of ours on the stack: waiting for the next batch, reading it,
writing the answers), and other. A worker that spends a large share of its
time in frontend I/O is starved by the frontend or the load generator, not slowed by its own code.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

STAGES = (("decode", ("handlers/decode.py", "handlers/video.py")), ("preprocess", ("training/presets.py",)),
          ("inference", ("handlers/runtimes.py", "onnxruntime", "torch/nn/")),
          ("postprocess", ("postprocess (", "training/masks.py")),
          ("answer", ("handlers/image.py", "handlers/segment.py", "handlers/request.py", "handlers/pipeline.py",
                      "handlers/adapter.py")),
          ("frontend I/O", ("model_service_worker.py",)))


def py_spy() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.is_file() else shutil.which("py-spy")


def stage_of(stack: str) -> str:
    """The stage of one collapsed stack ("frame;frame;...", frames "function (path:line)")."""
    for stage, markers in STAGES:
        if any(m in stack for m in markers):
            return stage
    return "other"


def summarize(raw: str) -> Counter:
    """py-spy's raw (collapsed) output -> samples per stage."""
    counts: Counter = Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[stage_of(stack)] += int(n)
    return counts


def profile_workers(pids: list[int], seconds: float, out_dir: Path, rate: int = 100) -> dict[str, Any]:
    """Sample every pid for `seconds` (in parallel) and return the share of samples per stage, in %."""
    exe = py_spy()
    if exe is None:
        return {"error": "py-spy not installed (pip install py-spy; it is in requirements.txt)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for pid in pids:
        raw = out_dir / f"worker-{pid}.txt"
        cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(rate),
               "--format", "raw", "--idle", "--nonblocking", "--output", str(raw)]
        procs.append((raw, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    counts: Counter = Counter()
    errors = []
    for raw, proc in procs:
        _, err = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0 or not raw.is_file():
            errors.append(err.decode(errors="replace").strip()[-300:])
            continue
        counts += summarize(raw.read_text())
    total = sum(counts.values())
    result: dict[str, Any] = {"workers": len(pids), "seconds": seconds, "samples": total,
                              "stages": {stage: round(100 * counts[stage] / total, 1)
                                         for stage, _ in (*STAGES, ("other", ()))} if total else {},
                              "raw": [str(raw) for raw, _ in procs]}
    if errors:
        result["errors"] = errors
    return result
