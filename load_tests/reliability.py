"""Faults under load against a real TorchServe, and the soak (load_tests/soak.py). `make reliability`:

    python -m load_tests.reliability                      # kill (1 and 2 workers), rollout/rollback, snapshot
    python -m load_tests.reliability --soak-duration 60   # + a 60 s soak (default 600 s; 0 skips it)

Load is locust, headless, with the project's locustfile (closed loop: N users, no think time, so at most N
requests are in flight). Faults: (a) kill -9 a worker (pid from the management API's describe): failures vs
the in-flight bound, time until the replacement worker is READY and until throughput is back; (b) rollout of
version 2.0 (register -> READY -> smoke -> set-default) then rollback to 1.0 and retiring 2.0, on the default
URL; (c) stop and restart from TorchServe's latest config snapshot, comparing models, versions, default and
workers. Results: reports/reliability/results.json + summary.md, and the figures block in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from load_tests.soak import MODEL, Load, build_store  # noqa: E402
from serving import server  # noqa: E402
from serving.manage import Client, ServingError, verify_archive  # noqa: E402
from serving.rollout import rollback, rollout  # noqa: E402
from tests.torchserve import TorchServe, gray_png  # noqa: E402
from training.docblock import write_doc_block  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"
FIGURES = "reliability.json"  # next to the doc: the figures its generated blocks come from
RECOVERY_S = 10.0  # goal: full service (>= 90 % throughput) again this long after a worker is killed
RSS_LIMIT_PCT = 10.0


def recovery(history: list[tuple[float, int, int]], t_fault: float, skip: float = 3.0,
             level: float = 0.9) -> tuple[float, float | None]:
    """(median completed req/s before the fault, seconds from the fault to the end of the first 1-s history row
    after it with >= level x that rate, followed by another such row). Rows are cumulative counts per second."""
    rates = [(t1, (n1 - f1 - n0 + f0) / max(t1 - t0, 1e-9))
             for (t0, n0, f0), (t1, n1, f1) in zip(history, history[1:])]
    before = [r for t, r in rates if history[0][0] + skip <= t <= t_fault]
    base = statistics.median(before) if before else 0.0
    after = [(t, r) for t, r in rates if t - 1 >= t_fault]
    for i, (t, r) in enumerate(after[:-1]):
        if r >= level * base and after[i + 1][1] >= level * base:
            return round(base, 1), round(t - t_fault, 1)
    return round(base, 1), None


def worker_pids(client: Client, version: str = "1.0") -> list[int]:
    return sorted(w["pid"] for w in client.describe(MODEL, version)[0]["workers"])


def kill_worker(ts: TorchServe, images: Path, out: Path, workers: int, users: int, seconds: float) -> dict[str, Any]:
    """(a) kill -9 one worker of the default version while locust runs."""
    ts.client.scale(MODEL, "1.0", workers, workers)
    load = Load(ts, images, users, seconds, out / f"kill-{workers}w").start()
    time.sleep(min(8.0, seconds / 3))  # steady load before the fault
    victim = worker_pids(ts.client)[0]
    t_kill = time.time()
    os.kill(victim, signal.SIGKILL)
    ready_s = None
    while load.running() and ready_s is None:
        ws = ts.client.describe(MODEL, "1.0")[0]["workers"]
        if len(ws) == workers and victim not in [w["pid"] for w in ws] and all(w["status"] == "READY" for w in ws):
            ready_s = round(time.time() - t_kill, 2)
        time.sleep(0.2)
    res = load.wait()
    base, back = recovery(res.pop("history"), t_kill)
    return {"scenario": f"kill -9 one of {workers} worker(s)", "workers": workers, **res, "max_in_flight": users,
            "worker_ready_s": ready_s, "baseline_rps": base, "throughput_back_s": back}


class Probe(threading.Thread):
    """One request at a time to the default URL, recording (time, status, version that answered)."""

    def __init__(self, ts: TorchServe, interval: float = 0.1):
        super().__init__(daemon=True)
        self.url, self.interval, self.seen = f"{ts.inference_url}/predictions/{MODEL}", interval, []
        self.session, self.stop = ts._session(ts.ep.inference_key), threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                r = self.session.post(self.url, data=gray_png(), timeout=60)
                self.seen.append((time.time(), r.status_code, r.json().get("version") if r.ok else r.text[:100]))
            except (requests.RequestException, ValueError) as e:
                self.seen.append((time.time(), 0, type(e).__name__))


def rollout_rollback(ts: TorchServe, images: Path, out: Path, users: int, seconds: float) -> dict[str, Any]:
    """(b) rollout 2.0 then rollback to 1.0 and retire 2.0, all while locust loads the default URL."""
    load = Load(ts, images, users, seconds, out / "rollout").start()
    probe = Probe(ts)
    probe.start()
    steps: dict[str, Any] = {}
    time.sleep(min(5.0, seconds / 6))
    t = time.time()
    rollout(ts.client, MODEL, "2.0")  # register -> all workers READY -> smoke on /2.0 -> set-default
    steps["rollout_s"] = round(time.time() - t, 2)
    time.sleep(min(5.0, seconds / 6))
    t = time.time()
    rollback(ts.client, MODEL)
    steps["rollback_s"] = round(time.time() - t, 2)
    time.sleep(min(3.0, seconds / 10))
    ts.client.unregister(MODEL, "2.0")  # retire the rolled-back version, still under load
    steps["steps_under_load"] = load.running()
    while load.running():
        time.sleep(0.2)
    probe.stop.set()
    probe.join(30)
    res = load.wait()
    res.pop("history")
    versions = [v for _, s, v in probe.seen if s == 200]
    switches = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
    return {"scenario": "rollout 2.0 + rollback to 1.0 + unregister 2.0", **res, **steps,
            "probe_requests": len(probe.seen), "probe_failed": sum(s != 200 for _, s, _ in probe.seen),
            "default_sequence": switches}


def model_state(client: Client) -> dict[str, Any]:
    """What a restart must bring back: versions, default, worker counts and batching per version."""
    keys = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay")
    return {name: {"default": client.default_version(name),
                   "versions": {d["modelVersion"]: {**{k: d[k] for k in keys}, "workers": len(d["workers"])}
                                for d in client.describe(name)}} for name in client.model_names()}


def read_snapshot(path: Path) -> dict[str, Any]:
    """The model_snapshot JSON inside a TorchServe snapshot .cfg (a Java properties file)."""
    for line in path.read_text().splitlines():
        if line.startswith("model_snapshot="):
            value = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), line.split("=", 1)[1])
            return json.loads(value)
    raise ServingError(f"{path} has no model_snapshot")


def restart_from_snapshot(ts: TorchServe, timeout: float = 120.0) -> Path:
    """Stop the server, then start it with its latest config snapshot (`torchserve --start --ts-config`).
    Every archive the snapshot names is sha256-checked first, as the CLI's register does."""
    server.stop(ts.runtime_dir)  # `torchserve --stop` writes a *-shutdown.cfg snapshot
    snapshot = max((ts.runtime_dir / "logs" / "config").glob("*.cfg"), key=lambda p: p.name)
    for name, versions in read_snapshot(snapshot)["models"].items():
        for version in versions:
            verify_archive(ts.store, name, version)
    log = ts.runtime_dir / "logs" / "launcher.log"
    with open(log, "wb") as f:
        subprocess.run([server._torchserve(), "--start", "--ts-config", str(snapshot), "--model-store",
                        str(ts.store)], cwd=ts.runtime_dir, env=server.server_env(ts.runtime_dir), stdout=f,
                       stderr=subprocess.STDOUT, check=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b"Model server started." in log.read_bytes() and (ts.runtime_dir / server.KEY_FILE).is_file():
            ts.ep = server.endpoints(ts.runtime_dir)
            ts.infer, ts.mgmt = ts._session(ts.ep.inference_key), ts._session(ts.ep.management_key)
            ts.client = Client(ts.runtime_dir, ts.store)
            if _all_ready(ts.client):
                return snapshot
        time.sleep(0.5)
    raise ServingError(f"no restart from {snapshot.name} within {timeout:.0f}s; {ts.log_tail()}")


def _all_ready(client: Client) -> bool:
    try:
        descs = [d for name in client.model_names() for d in client.describe(name)]
    except ServingError:
        return False
    return bool(descs) and all(len(d["workers"]) >= d["minWorkers"] and
                               all(w["status"] == "READY" for w in d["workers"]) for d in descs)


def snapshot_restart(ts: TorchServe) -> dict[str, Any]:
    """(c) a non-trivial state (2.0 the default, 1.0 on 2 workers), stop, restart from the snapshot, compare."""
    if not ts.client.is_registered(MODEL, "2.0"):
        ts.client.register(MODEL, "2.0")
    ts.client.scale(MODEL, "1.0", 2, 2)
    ts.client.set_default(MODEL, "2.0")
    before = model_state(ts.client)
    t = time.time()
    snapshot = restart_from_snapshot(ts)
    after = model_state(ts.client)
    r = ts.infer.post(f"{ts.inference_url}/predictions/{MODEL}", data=gray_png(), timeout=60)
    return {"scenario": "stop + restart from the config snapshot", "snapshot": snapshot.name,
            "restart_s": round(time.time() - t, 1), "restored": before == after, "before": before, "after": after,
            "default_answers": r.json().get("version") if r.ok else r.status_code}


def summary_md(results: dict[str, Any]) -> str:
    """The Markdown figures table for summary.md and docs/reliability.md."""
    from load_tests.soak import soak_md

    m = results["machine"]
    lines = [f"Measured {results['date']} on {m}, 1-min load average {results['loadavg_start']} at the start and "
             f"{results.get('loadavg_end')} at the end (TorchServe {results['torchserve']}, tiny LeNet-5, batch 8 / "
             "5 ms, locust closed loop, no think time).", "",
             "| fault | users | requests (req/s) | failed (in-flight bound) | p99 / max latency | seconds without "
             "an answer | replacement READY | ≥ 90 % throughput again |", "|" + " --- |" * 8]

    def common(r: dict[str, Any]) -> str:
        return (f"| {r['scenario']} | {r['users']} | {r['requests']} ({r['rps']}) | {r['failed']} "
                f"({r.get('max_in_flight', '—')}) | {r['p99_ms']:.0f} / {r['max_ms']:.0f} ms | {r['zero_answer_s']} |")
    for r in results.get("kill", []):
        lines.append(common(r) + f" {r['worker_ready_s']} s | {r['throughput_back_s']} s |")
    if "rollout" in results:
        r = results["rollout"]
        lines.append(common(r) + f" rollout {r['rollout_s']} s, rollback {r['rollback_s']} s; probe: "
                     f"{r['probe_failed']}/{r['probe_requests']} failed, defaults seen "
                     f"{' → '.join(r['default_sequence'])} | — |")
    runs = [*results.get("kill", []), results.get("rollout", {})]
    fails = [f"{v} × `{k}` ({r['scenario']})" for r in runs for k, v in r.get("failures", {}).items()]
    if fails:
        lines += ["", "Failures seen: " + "; ".join(fails) + "."]
    if "snapshot" in results:
        s = results["snapshot"]
        lines += ["", f"Snapshot restart ({s['snapshot']}): restored = **{s['restored']}** in {s['restart_s']} s "
                  f"(stop → all workers READY); default answers with version {s['default_answers']}; state "
                  f"`{json.dumps(s['after'], separators=(',', ':'))}`."]
    if "soak" in results:
        lines += ["", soak_md(results["soak"])]
    return "\n".join(lines)


def verdicts(results: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """(goal, met, the figures that decide it) for every goal the run measured; nothing else decides a verdict."""
    out = []
    for r in results.get("kill", []):
        back, failed, bound = r.get("throughput_back_s"), r["failed"], r.get("max_in_flight")
        met = back is not None and back <= RECOVERY_S and bound is not None and failed <= bound
        out.append((f"kill -9 one of {r['workers']} worker(s) → ≥ 90 % throughput within {RECOVERY_S:g} s, "
                    "failures ≤ requests in flight", met,
                    f"{'never' if back is None else f'after {back} s'}; {failed} failed of {bound} in flight; "
                    f"replacement READY after {r.get('worker_ready_s')} s"))
    if "rollout" in results:
        r = results["rollout"]
        out.append(("rollout and rollback under load → 0 failed requests", r["failed"] == 0 and r["probe_failed"] == 0,
                    f"{r['failed']} of {r['requests']} failed; probe {r['probe_failed']} of {r['probe_requests']}"))
    if "snapshot" in results:
        r = results["snapshot"]
        out.append(("restart from the config snapshot → the same models, versions, default and workers",
                    bool(r["restored"]), f"restored = {r['restored']} in {r['restart_s']} s"))
    if "soak" in results:
        r = results["soak"]
        worst = max((v for v in r["growth_pct"].values() if v is not None), default=0.0)
        out.append((f"soak → 0 failed requests, RSS growth < {RSS_LIMIT_PCT:g} %",
                    r["failed"] == 0 and worst < RSS_LIMIT_PCT,
                    f"{r['failed']} of {r['requests']} failed over {r['duration_s']:.0f} s; largest RSS growth "
                    f"{worst:+.1f} %"))
    return out


def verdicts_md(results: dict[str, Any]) -> str:
    """The goals table of docs/reliability.md, computed from the run's figures."""
    lines = [f"Verdicts of the run of {results['date']} (load average {results['loadavg_start']} at the start; "
             "figures below and in [reliability.json](reliability.json)):", "", "| goal | verdict | figures |",
             "| --- | --- | --- |"]
    lines += [f"| {goal} | **{'met' if met else 'not met'}** | {why} |" for goal, met, why in verdicts(results)]
    return "\n".join(lines)


def figures_json(results: dict[str, Any]) -> dict[str, Any]:
    """What is committed next to the doc: everything but the soak's RSS samples (plotted in soak_rss.png)."""
    out = dict(results)
    if "soak" in out:
        out["soak"] = {k: v for k, v in out["soak"].items() if k != "samples"}
    return out


def write_docs(results: dict[str, Any], doc: Path) -> None:
    """Rewrite both generated blocks of the doc and the figures JSON beside it, from one run's results."""
    (doc.parent / FIGURES).write_text(json.dumps(figures_json(results), indent=2) + "\n")
    write_doc_block(doc, "reliability-verdicts", verdicts_md(results))
    write_doc_block(doc, "reliability-figures", summary_md(results))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.reliability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=8, help="locust users during the faults")
    p.add_argument("--fault-seconds", type=float, default=30, help="load duration per fault run")
    p.add_argument("--soak-duration", type=float, default=600, help="soak seconds (0: no soak)")
    p.add_argument("--soak-users", type=int, default=4)
    p.add_argument("--soak-think", type=float, default=0.02, help="seconds each soak user waits between requests")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "reliability")
    p.add_argument("--docs", type=Path, default=DOC, help="doc whose figures block is rewritten ('' : none)")
    a = p.parse_args(argv)
    import platform

    import ts as ts_pkg

    from load_tests.soak import soak

    a.out.mkdir(parents=True, exist_ok=True)
    work = a.out / "work"
    store, images = build_store(work), work / "images"
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "torchserve": ts_pkg.__version__,
                               "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})", "kill": [],
                               "loadavg_start": round(os.getloadavg()[0], 1)}  # the machine may be shared
    with TorchServe(store, work, models=[(MODEL, "1.0")]) as ts:
        for workers in (1, 2):
            results["kill"].append(kill_worker(ts, images, a.out, workers, a.users, a.fault_seconds))
            print(json.dumps(results["kill"][-1]))
        ts.client.scale(MODEL, "1.0", 1, 2)
        results["rollout"] = rollout_rollback(ts, images, a.out, a.users, a.fault_seconds)
        print(json.dumps(results["rollout"]))
        results["snapshot"] = snapshot_restart(ts)
        print(json.dumps(results["snapshot"]))
    if a.soak_duration > 0:
        docs_png = a.docs.parent / "soak_rss.png" if a.docs.name else None
        results["soak"] = soak(store, images, work, a.out, a.soak_duration, a.soak_users, a.soak_think,
                               docs_png=docs_png)
        print(json.dumps({k: v for k, v in results["soak"].items() if k != "samples"}))
    results["loadavg_end"] = round(os.getloadavg()[0], 1)
    (a.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = summary_md(results)
    (a.out / "summary.md").write_text(md + "\n")
    if a.docs.name:
        write_docs(results, a.docs)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
