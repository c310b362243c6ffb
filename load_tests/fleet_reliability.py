"""Fleet operations and faults under load, through HAProxy (`make reliability-fleet`):

    python -m load_tests.fleet_reliability                  # all scenarios, figures into docs/fleet.md
    python -m load_tests.fleet_reliability --seconds 12     # shorter runs

Each scenario is its own locust run (the project's locustfile, closed loop, no think time) on the balancer's
default path, with a probe (one request at a time) recording which version answered: 4 s of load, the
operation, some seconds more, then the run ends; the run's p99 is the p99 around that operation. Scenarios, on
a 2-node fleet of the tiny test model: steady load (no operation), rolling rollout 1.0 -> 2.0, rollback, canary
of 2.0 at 20 %, promote, rollback again, a graceful restart of one node's TorchServe (`fleet restart`), and one
node killed with SIGKILL (frontend and workers) and brought back. Plus the throughput of 1, 2 and 3 nodes.
The locust driver and probe are load_tests/soak.py's Load and load_tests/reliability.py's Probe.
Results: reports/reliability-fleet/results.json, docs/fleet-reliability.json and the figures block of docs/fleet.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from load_tests.reliability import Probe  # noqa: E402
from load_tests.soak import MODEL, Load, build_store  # noqa: E402
from serving import fleet_ops as ops  # noqa: E402
from serving import haproxy, server  # noqa: E402
from serving.fleet import Fleet, down, up  # noqa: E402
from tests.torchserve import TorchServe  # noqa: E402
from training.docblock import write_doc_block  # noqa: E402

DOC = ROOT / "docs" / "fleet.md"
JSON_OUT = ROOT / "docs" / "fleet-reliability.json"
BUSY_LOAD = 2.0  # 1-min load average above which the run's latency and throughput are a busy machine's


def target(fleet: Fleet) -> SimpleNamespace:
    """What Load and Probe need from a server, for the balancer: its URL, the dir of its key file, a session."""
    key = json.loads(fleet.key_file.read_text())["inference"]["key"]
    return SimpleNamespace(inference_url=fleet.url, runtime_dir=fleet.root, ep=SimpleNamespace(inference_key=key),
                           _session=TorchServe._session)


def start_fleet(store: Path, root: Path, nodes: int) -> Fleet:
    port, stats_port = server.free_ports(2)
    return up(root, store, nodes, [(MODEL, "1.0")], port, stats_port)


def _retried(log: Path, offset: int) -> int:
    """Requests HAProxy replayed (retries field of its log lines, e.g. `+1` = redispatched) since `offset`."""
    text = log.read_bytes()[offset:].decode(errors="replace") if log.is_file() else ""
    return sum(1 for m in re.finditer(r" \d+/\d+/\d+/\d+/(\+?\d+) \d+/\d+ \"", text) if m.group(1) not in ("0", "+0"))


def under_load(fleet: Fleet, images: Path, out: Path, scenario: str, users: int,
               action: Callable[[], dict[str, Any] | None], lead: float = 4.0, tail: float = 4.0,
               limit: float = 300.0) -> dict[str, Any]:
    """Locust on the default path: `lead` seconds of steady load, `action`, `tail` seconds more, then the run
    ends (at most `limit` seconds in all); its p99 is the p99 around the action."""
    t = target(fleet)
    log = fleet.haproxy.log
    offset = log.stat().st_size if log.is_file() else 0
    slug = re.sub(r"[^a-z0-9]+", "-", scenario.lower()).strip("-")
    load = Load(t, images, users, limit, out / slug).start()
    probe = Probe(t)
    probe.start()
    time.sleep(lead)
    t0 = time.time()
    detail = action() or {}
    op_s = round(time.time() - t0, 2)
    done_under_load = load.running()
    time.sleep(tail)
    load.stop()
    probe.stop.set()
    probe.join(30)
    res = load.wait()
    res.pop("history")
    versions = [v for _, s, v in probe.seen if s == 200]
    after = [v for t_, s, v in probe.seen if s == 200 and t_ >= t0 + op_s]
    return {"scenario": scenario, **res, "op_s": op_s, "op_under_load": done_under_load,
            "probe_requests": len(probe.seen), "probe_failed": sum(s != 200 for _, s, _ in probe.seen),
            "probe_versions": dict(Counter(versions)), "probe_versions_after": dict(Counter(after)),
            "last_version": versions[-1] if versions else None,
            "replayed_by_haproxy": _retried(log, offset), "loadavg_end": round(os.getloadavg()[0], 2), **detail}


def kill_node(fleet: Fleet, name: str, users: int) -> dict[str, Any]:
    """SIGKILL a node's frontend and workers (a crashed machine or pod), then bring it back with `fleet
    restart`. Returns the requests in flight on it at the kill as HAProxy counted them, the bound (closed loop:
    at most `users` requests are in flight at all), and how long until HAProxy saw it down and up again."""
    node = fleet.node(name)
    in_flight = haproxy.servers(fleet.haproxy)[name]["sessions"]
    java = psutil.Process(server.server_pid(node.runtime_dir))
    procs = [java, *java.children(recursive=True)]
    t_kill = time.time()
    for p in procs:
        p.send_signal(signal.SIGKILL)
    down_s = None
    while down_s is None and time.time() - t_kill < 30:
        if not haproxy.servers(fleet.haproxy)[name]["status"].startswith("UP"):
            down_s = round(time.time() - t_kill, 2)
        time.sleep(0.05)
    ops.restart_node(fleet, name)
    return {"in_flight_at_kill": in_flight, "max_in_flight": users, "killed_processes": len(procs),
            "marked_down_s": down_s,
            "back_up_s": round(time.time() - t_kill, 2)}


def planned(fleet: Fleet, images: Path, out: Path, users: int, seconds: float) -> list[dict[str, Any]]:
    """Every planned operation and both node faults, each under its own load run, in this order."""
    def run(scenario: str, action: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        r = under_load(fleet, images, out, scenario, users, action, tail=seconds / 2)
        print(json.dumps(r), flush=True)
        return r

    return [run("steady load, no operation", lambda: time.sleep(seconds)),
            run("rolling rollout 1.0 -> 2.0", lambda: {"result": ops.rollout(fleet, MODEL, "2.0")["switched"]}),
            run("rollback 2.0 -> 1.0", lambda: {"result": ops.rollback(fleet, MODEL)["to"]}),
            run("canary 2.0 at 20 %", lambda: {"result": ops.canary(fleet, MODEL, "2.0", 20)["percent"]}),
            run("promote the canary 2.0", lambda: {"result": ops.promote(fleet, MODEL)["switched"]}),
            run("rollback 2.0 -> 1.0 after the promote", lambda: {"result": ops.rollback(fleet, MODEL)["to"]}),
            run("graceful restart of node-2's TorchServe", lambda: {"result": ops.restart_node(fleet, "node-2")[
                "restored"]}),
            run("SIGKILL node-1 (frontend + workers), then restart it", lambda: kill_node(fleet, "node-1", users))]


def throughput(store: Path, images: Path, work: Path, out: Path, nodes_list: list[int], users: int,
               seconds: float) -> list[dict[str, Any]]:
    """Steady load through HAProxy on fresh fleets of 1, 2, 3 ... nodes."""
    rows = []
    for n in nodes_list:
        fleet = start_fleet(store, work / f"throughput-{n}", n)
        try:
            r = under_load(fleet, images, out, f"throughput {n} node(s)", users, lambda: time.sleep(seconds))
        finally:
            down(fleet.root)
        rows.append({"nodes": n, **r})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def summary_md(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"Measured {results['date']} on {m['cpus']} CPU cores ({m['cpu']}), 1-min load average "
             f"{results['loadavg_start']} at the start and {results['loadavg_end']} at the end; TorchServe "
             f"{results['torchserve']}, HAProxy {results['haproxy']}; tiny LeNet-5 (batch 8 / 5 ms, 1-2 workers "
             f"per node), 2 nodes, locust {results['users']} users, closed loop; each run: 4 s of load, the operation, "
             f"{results['seconds'] / 2:.0f} s more. Source: docs/fleet-reliability.json.", "",
             "| scenario | requests (req/s) | **failed** (load + probe) | p99 / max ms | replayed by HAProxy | "
             "operation took | versions answering the probe after it | load avg after |", "|" + " --- |" * 8]
    for r in results["planned"]:
        extra = ""
        if "in_flight_at_kill" in r:
            extra = (f" (in flight on it: {r['in_flight_at_kill']} by HAProxy's count at the kill, at most "
                     f"{r['max_in_flight']}; marked down after {r['marked_down_s']} s, back after {r['back_up_s']} s)")
        seen = ", ".join(f"{v}: {n}" for v, n in sorted(r["probe_versions_after"].items()))
        lines.append(f"| {r['scenario']}{extra} | {r['requests']} ({r['rps']}) | **{r['failed']} + "
                     f"{r['probe_failed']}** | {r['p99_ms']:.0f} / {r['max_ms']:.0f} | {r['replayed_by_haproxy']} | "
                     f"{r['op_s']} s | {seen} | {r.get('loadavg_end', '?')} |")
    lines += ["", "| nodes | requests (req/s) | failed | p99 ms | load avg after |", "|" + " --- |" * 5]
    for r in results["throughput"]:
        lines.append(f"| {r['nodes']} | {r['requests']} ({r['rps']}) | {r['failed']} | {r['p99_ms']:.0f} | "
                     f"{r.get('loadavg_end', '?')} |")
    failed = sum(r["failed"] + r["probe_failed"] for r in results["planned"] if "in_flight_at_kill" not in r)
    crash = next((r for r in results["planned"] if "in_flight_at_kill" in r), None)
    verdict = f"Planned operations: {failed} failed request(s) in total (goal 0)."
    if crash:
        verdict += (f" SIGKILL of a node: {crash['failed'] + crash['probe_failed']} failed (bound: the requests in "
                    f"flight on it, at most {crash['max_in_flight']}); HAProxy replayed "
                    f"{crash['replayed_by_haproxy']} on the other node.")
    loads = [results["loadavg_start"], results["loadavg_end"]]
    loads += [r["loadavg_end"] for r in results["planned"] + results["throughput"] if "loadavg_end" in r]
    if max(loads) > BUSY_LOAD:
        verdict += (f" The machine was shared during this run (1-min load average up to {max(loads)} on "
                    f"{m['cpus']} cores): the failed-request counts stand, but p99 and throughput are a busy "
                    f"machine's; quiet-machine figures await `flock /tmp/heavy.lock make reliability-fleet` with "
                    f"the load average well under {BUSY_LOAD:g}.")
    return "\n".join(lines + ["", verdict])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.fleet_reliability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20, help="steady and throughput runs; the load goes on for "
                   "half of it after an operation")
    p.add_argument("--nodes-list", default="1,2,3", help="fleet sizes for the throughput runs ('' : none)")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "reliability-fleet")
    p.add_argument("--json", type=Path, default=JSON_OUT, help="where the results JSON is copied ('' : none)")
    p.add_argument("--docs", type=Path, default=DOC, help="doc whose figures block is rewritten ('' : none)")
    a = p.parse_args(argv)
    import ts as ts_pkg

    a.out.mkdir(parents=True, exist_ok=True)
    work = a.out / "work"
    store, images = build_store(work), work / "images"
    hap = os.popen(f"{haproxy.binary()} -v").read().split()[2]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.machine())
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "torchserve": ts_pkg.__version__, "haproxy": hap,
                               "machine": {"cpus": os.cpu_count(), "cpu": cpu}, "users": a.users,
                               "seconds": a.seconds, "loadavg_start": round(os.getloadavg()[0], 2)}
    fleet = start_fleet(store, work / "fleet", 2)
    try:
        results["planned"] = planned(fleet, images, a.out, a.users, a.seconds)
    finally:
        down(fleet.root)
    nodes_list = [int(n) for n in a.nodes_list.split(",") if n.strip()]
    results["throughput"] = throughput(store, images, work, a.out, nodes_list, a.users, a.seconds)
    results["loadavg_end"] = round(os.getloadavg()[0], 2)
    text = json.dumps(results, indent=2) + "\n"
    (a.out / "results.json").write_text(text)
    if a.json.name:
        a.json.write_text(text)
    md = summary_md(results)
    if a.docs.name:
        write_doc_block(a.docs, "fleet-figures", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
