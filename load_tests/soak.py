"""Soak: steady locust load on a fresh TorchServe for `duration` seconds, with the resident memory (RSS) of the
Java frontend and of each Python worker sampled by psutil; RSS growth over 10 % is flagged.

Growth method: drop the warm-up (the first max(60 s, 20 % of the run): class loading, JIT, Java heap and
allocator growth; the frontend's heap grew in one ~50 MiB step about 1.7 min into a 10-minute run), then compare
the median RSS of the last 20 % of the remaining samples with the median of the first 20 %, per process (a
restarted worker is a new pid, so a new series) and for the sum of all.

    python -m load_tests.soak --duration 600        # also run by `make reliability` (SOAK_S)

Also home of what the fault runs (load_tests/reliability.py) share: the tiny test store and the locust driver.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from serving import server  # noqa: E402
from tests.torchserve import TorchServe, gray_png, tiny_archive, tiny_checkpoint  # noqa: E402

LOCUSTFILE = ROOT / "load_tests" / "locustfile.py"
MODEL = "tiny"
LIMIT_PCT = 10.0


def build_store(work: Path, batch_size: int = 8, max_batch_delay: int = 5) -> Path:
    """tiny 1.0 and 2.0 (random-weight LeNet-5s leaning to classes 2 and 7) in work/store, and load images.
    The store is this run's scratch copy, rebuilt from nothing: archived versions are immutable, and a rerun's
    checkpoints are new files."""
    for scratch in ("store", "configs"):
        shutil.rmtree(work / scratch, ignore_errors=True)
    for version, favour in (("1.0", 2), ("2.0", 7)):
        ckpt = tiny_checkpoint(work / f"tiny-{version}.pt", seed=int(float(version)), favour=favour,
                               classes=[f"v{version}-class{i}" for i in range(10)])
        tiny_archive(work / "store", work / "configs", MODEL, version, ckpt, batchSize=batch_size,
                     maxBatchDelay=max_batch_delay, minWorkers=1, maxWorkers=2)
    (work / "images").mkdir(exist_ok=True)
    for i in range(16):
        (work / "images" / f"g{i:02d}.png").write_bytes(gray_png(seed=i))
    return work / "store"


class Load:
    """The project's locustfile, headless, in the background: `users` closed-loop users for `seconds`."""

    def __init__(self, ts: TorchServe, images: Path, users: int, seconds: float, prefix: Path,
                 think: float = 0.0):
        prefix.parent.mkdir(parents=True, exist_ok=True)
        self.prefix, self.users, self.seconds = prefix, users, seconds
        self.cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
                    "-u", str(users), "-r", str(users), "-t", f"{max(1, round(seconds))}s", "--shape", "steady",
                    "--host", ts.inference_url, "--model", MODEL, "--images", str(images),
                    "--token-file", str(ts.runtime_dir / server.KEY_FILE), "--think-time", str(think),
                    "--csv", str(prefix), "--csv-full-history", "--loglevel", "WARNING"]

    def start(self) -> Load:
        self.log = open(f"{self.prefix}_locust.log", "wb")  # closed in wait()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        return self

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """End the run before its time (SIGTERM: locust stops its users and closes its CSV files). Its CSV
        files are rewritten once a second, so stop a few seconds after what is being measured."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)

    def wait(self) -> dict[str, Any]:
        """Wait for locust to end (bounded) and read its per-second history and failure table."""
        try:
            self.proc.wait(timeout=self.seconds + 60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        with (open(f"{self.prefix}_stats_history.csv") as h, open(f"{self.prefix}_failures.csv") as f,
              open(f"{self.prefix}_stats.csv") as s):
            rows = [r for r in csv.DictReader(h) if r["Name"] == "Aggregated"]
            failures = {_error_text(r["Error"]): int(r["Occurrences"]) for r in csv.DictReader(f)}
            total = next((r for r in csv.DictReader(s) if r["Name"] == "Aggregated"), {})
        if not rows:
            raise RuntimeError(f"locust wrote no history; see {self.prefix}_locust.log")
        hist = [(float(r["Timestamp"]), int(r["Total Request Count"]), int(r["Total Failure Count"])) for r in rows]
        n, failed, span = hist[-1][1], hist[-1][2], hist[-1][0] - hist[0][0]
        ok = [n1 - f1 - n0 + f0 for (_, n0, f0), (_, n1, f1) in zip(hist, hist[1:])]  # answers per second
        first = next((i for i, x in enumerate(ok) if x), len(ok))
        return {"users": self.users, "requests": n, "failed": failed, "rps": round(n / max(1.0, span), 1),
                "p99_ms": _num(total.get("99%")), "max_ms": _num(total.get("Max Response Time")),
                "zero_answer_s": sum(1 for x in ok[first:-1] if x == 0),  # whole seconds without one answer
                "failures": failures, "history": hist}


def _num(text: str | None) -> float | None:
    try:
        return round(float(text), 1) if text not in (None, "", "N/A") else None
    except ValueError:
        return None


def _error_text(error: str) -> str:
    """locust's failure repr, CatchResponseError('HTTP 507: {\\n "code": ...'), as one plain line."""
    error = re.sub(r"^CatchResponseError\((['\"])(.*)\1\)$", r"\2", error, flags=re.S).replace("\\n", " ")
    return " ".join(error.split())[:160]


def rss_mib(java_pid: int) -> dict[str, float]:
    """{"frontend (java)": MiB, "worker <pid>": MiB, ...} for one server's process tree."""
    out: dict[str, float] = {}
    try:
        java = psutil.Process(java_pid)
        out["frontend (java)"] = java.memory_info().rss / 2**20
        for p in java.children(recursive=True):
            if "model_service_worker" in " ".join(p.cmdline()):
                out[f"worker {p.pid}"] = p.memory_info().rss / 2**20
    except psutil.Error:  # a worker that just died: skip this sample's value
        pass
    return out


def growth(samples: list[tuple[float, dict[str, float]]], warmup: float) -> dict[str, float | None]:
    """Percent growth per series (and "total") after the warm-up: median of the last 20 % vs the first 20 %."""
    t0 = samples[0][0] if samples else 0.0
    kept = [(t, s | {"total": sum(s.values())}) for t, s in samples if t - t0 >= warmup]
    out: dict[str, float | None] = {}
    for name in dict.fromkeys(k for _, s in kept for k in s):
        series = [s[name] for _, s in kept if name in s]
        n = max(1, len(series) // 5)
        if len(series) < 5:
            out[name] = None
            continue
        first, last = statistics.median(series[:n]), statistics.median(series[-n:])
        out[name] = round(100 * (last - first) / first, 1)
    return out


def plot(samples: list[tuple[float, dict[str, float]]], warmup: float, path: Path, small: Path | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = samples[0][0]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for name in dict.fromkeys(k for _, s in samples for k in s):
        pts = [((t - t0) / 60, s[name]) for t, s in samples if name in s]
        ax.plot([x for x, _ in pts], [y for _, y in pts], label=name)
    ax.axvspan(0, warmup / 60, color="grey", alpha=0.15, label="warm-up (not compared)")
    ax.set(xlabel="minutes", ylabel="RSS (MiB)", title="TorchServe RSS under steady load")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    if small is not None:
        fig.savefig(small, dpi=60)
    plt.close(fig)


def soak(store: Path, images: Path, work: Path, out: Path, duration: float, users: int = 4, think: float = 0.02,
         interval: float = 2.0, docs_png: Path | None = None) -> dict[str, Any]:
    """Run the soak on a fresh server; returns errors, RSS samples and growth per process."""
    warmup = max(60.0, 0.2 * duration) if duration >= 120 else 0.2 * duration  # the JVM heap grows in steps
    with TorchServe(store, work / "soak", models=[(MODEL, "1.0")]) as ts:
        java = server.server_pid(ts.runtime_dir)
        load = Load(ts, images, users, duration, out / "soak", think=think).start()
        samples: list[tuple[float, dict[str, float]]] = []
        while load.running():
            samples.append((time.time(), rss_mib(java)))
            time.sleep(interval)
        res = load.wait()
    res.pop("history")
    pct = growth(samples, warmup)
    plot(samples, warmup, out / "soak_rss.png", docs_png)
    worker_pids = {k for _, s in samples for k in s if k.startswith("worker")}
    return {**res, "duration_s": duration, "think_s": think, "warmup_s": warmup, "growth_pct": pct,
            "worker_restarts": max(0, len(worker_pids) - 1), "limit_pct": LIMIT_PCT,
            "flagged": sorted(k for k, v in pct.items() if v is not None and v > LIMIT_PCT),
            "rss_last_mib": {k: round(v, 1) for k, v in (samples[-1][1] if samples else {}).items()},
            "samples": [(round(t - samples[0][0], 1), {k: round(v, 1) for k, v in s.items()}) for t, s in samples]}


def soak_md(r: dict[str, Any]) -> str:
    growth_txt = ", ".join(f"{k} {'+' if (v or 0) >= 0 else ''}{v} %" for k, v in r["growth_pct"].items())
    last = ", ".join(f"{k} {v:.0f} MiB" for k, v in r["rss_last_mib"].items())
    verdict = "**flagged: " + ", ".join(r["flagged"]) + "**" if r["flagged"] else f"none over {r['limit_pct']:.0f} %"
    return (f"Soak: {r['duration_s']:.0f} s, {r['users']} users with {r['think_s']} s think time: {r['requests']} "
            f"requests ({r['rps']} req/s), **{r['failed']} failed**, {r['worker_restarts']} worker restarts. "
            f"RSS growth after a {r['warmup_s']:.0f} s warm-up (median of the last 20 % vs the first 20 %): "
            f"{growth_txt}; {verdict}. RSS at the end: {last}.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600, help="seconds of load")
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--think", type=float, default=0.02, help="seconds each user waits between requests")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "reliability")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    store = build_store(a.out / "work")
    r = soak(store, a.out / "work" / "images", a.out / "work", a.out, a.duration, a.users, a.think)
    (a.out / "soak.json").write_text(json.dumps(r, indent=2) + "\n")
    print(soak_md(r))
    return 1 if r["failed"] or r["flagged"] else 0


if __name__ == "__main__":
    sys.exit(main())
