"""Figures and reports for the benchmark: latency percentiles, locust CSV parsing, ratios, JSON, Markdown, PNG.

Everything here works on plain dicts (the JSON the harness writes), so it is testable without a server.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

NOTES_MARKER = "<!-- notes below this line are kept when `make bench` rewrites the page -->"


def percentiles(samples_ms: Sequence[float], qs: Sequence[int] = (50, 95, 99)) -> dict[str, float | None]:
    """{"p50_ms": ..., "p95_ms": ..., "p99_ms": ...} with linear interpolation; None for no samples."""
    if not len(samples_ms):
        return {f"p{q}_ms": None for q in qs}
    values = np.percentile(np.asarray(samples_ms, dtype=float), list(qs))
    return {f"p{q}_ms": round(float(v), 2) for q, v in zip(qs, values)}


def read_locust_stats(path: str | Path, name: str = "Aggregated") -> dict[str, Any]:
    """The row `name` (default: the Aggregated row) of locust's <prefix>_stats.csv as our figures.

    Locust's percentiles are bucketed (1 ms below 100 ms, 10 ms up to 1 s, 100 ms above), so p99 at 700 ms
    means 700 +- 5 ms.
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    row = next((r for r in rows if r.get("Name") == name), None)
    if row is None:
        raise ValueError(f"{path}: no row named {name!r} (rows: {[r.get('Name') for r in rows]})")

    def num(key: str) -> float | None:
        value = (row.get(key) or "").strip()
        return None if value in ("", "N/A") else float(value)

    requests, failures = int(num("Request Count") or 0), int(num("Failure Count") or 0)
    return {"requests": requests, "failures": failures, "rps": round(num("Requests/s") or 0.0, 2),
            "ok_rps": round((num("Requests/s") or 0.0) - (num("Failures/s") or 0.0), 2),
            "mean_ms": _round(num("Average Response Time")), "p50_ms": _round(num("50%")),
            "p95_ms": _round(num("95%")), "p99_ms": _round(num("99%")), "max_ms": _round(num("Max Response Time"))}


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of Prometheus metric `name` whose labels include `labels` (0.0 when none does)."""
    import re

    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name) + 1:line.rindex("}")]))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def _round(x: float | None, nd: int = 1) -> float | None:
    return None if x is None or math.isnan(x) else round(x, nd)


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def compute_ratios(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per concurrency: (c)/(d) throughput, (d)/(c) p99 (above 1: ours answers faster), (c)/(b): how much of the
    in-process pipeline's throughput the server keeps -- (b) measured with the server's layout (workers x
    threads, its batch size) when the run has it, else the single-process point nearest the batch size -- and,
    where measured, (e)/(d): ours with the eager runtime against stock, eager against eager."""
    rest = result.get("rest", {})
    ours = {p["users"]: p for p in rest.get("ours", [])}
    stock = {p["users"]: p for p in rest.get("stock", [])}
    eager = {p["users"]: p for p in rest.get("ours_eager", [])}
    pipe = _reference(result)
    rows = []
    for users in sorted(set(ours) | set(stock)):
        c, d = ours.get(users, {}), stock.get(users, {})
        row = {"users": users, "c_over_d_rps": _div(c.get("rps"), d.get("rps")),
               "d_over_c_p99": _div(d.get("p99_ms"), c.get("p99_ms")),
               "c_over_b": _div(c.get("rps"), pipe.get("img_s") if pipe else None)}
        if users in eager:
            row["e_over_d_rps"] = _div(eager[users].get("rps"), d.get("rps"))
        rows.append(row)
    return rows


def _reference(result: dict[str, Any]) -> dict[str, Any] | None:
    """The (b) that (c) is compared with: the server's layout when measured."""
    return result.get("pipeline_layout") or _at_batch(
        result.get("pipeline", []), result.get("meta", {}).get("torchserve", {}).get("batchSize", 8))


def _at_batch(points: list[dict[str, Any]], batch: int) -> dict[str, Any] | None:
    return min(points, key=lambda p: abs(p["batch"] - batch)) if points else None


def _f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "–"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _sides(result: dict[str, Any]) -> tuple[str, str, str]:
    m = result.get("meta", {})
    sides, ts = m.get("sides", {}), m.get("torchserve", {})
    layout = f"{ts.get('workers', 1)} worker(s) x {ts.get('threads', m.get('threads', '?'))} thread(s)"
    return (sides.get("ours", f"our handler, runtime {m.get('runtime')}") + f", {layout}",
            sides.get("stock", "stock image_classifier (fp32 eager PyTorch)") + f", {layout}",
            sides.get("ours_eager", "our handler, runtime eager (fp32 eager PyTorch)"))


def summary_lines(result: dict[str, Any], target: float = 2.5, keep: float = 0.9) -> list[str]:
    """The headline: ours vs stock at the highest concurrency measured, naming what runs on each side, against
    the target; eager against eager in the same run; (c)/(b) against its goal, and the profile where missed."""
    ratios = compute_ratios(result)
    both = [r for r in ratios if r["c_over_d_rps"] is not None]
    if not both:
        error = result.get("meta", {}).get("rest_error")
        return [f"- The TorchServe part failed: {error.splitlines()[0][:300]}" if error else
                "- No side-by-side REST figures in this run (TorchServe part skipped)."]
    top = both[-1]
    users = top["users"]
    rest = result["rest"]
    c = next(p for p in rest["ours"] if p["users"] == users)
    d = next(p for p in rest["stock"] if p["users"] == users)
    r = top["c_over_d_rps"]
    ours, stock, eager = _sides(result)
    verdict = (f"meets the {target:g}x target" if r >= target else
               f"below the {target:g}x target: {target / r:.2f}x short")
    lines = [f"- At {users} users, TorchServe + **{ours}** served {_f(c['rps'])} req/s (p99 "
             f"{_f(c['p99_ms'], 0)} ms); TorchServe + **{stock}** served {_f(d['rps'])} req/s (p99 "
             f"{_f(d['p99_ms'], 0)} ms): **{r:.2f}x** ({verdict}). The ratio includes the runtime: the two sides "
             "do not run the same numerics unless both are eager."]
    e = next((p for p in rest.get("ours_eager", []) if p["users"] == users), None)
    if e is not None and top.get("e_over_d_rps") is not None:
        lines.append(f"- Eager against eager in the same run: **{eager}** served {_f(e['rps'])} req/s (p99 "
                     f"{_f(e['p99_ms'], 0)} ms) against the stock handler's {_f(d['rps'])}: "
                     f"**{top['e_over_d_rps']:.2f}x**, what the handler itself (batched decode and preprocessing) "
                     "is worth without a faster runtime.")
    lines.append(f"- Errors: ours {sum(p['failures'] for p in rest['ours'])}, "
                 f"stock {sum(p['failures'] for p in rest['stock'])} over all points.")
    b = _reference(result)
    if top["c_over_b"] is not None and b is not None:
        layout = (f"with the server's layout ({b['workers']} processes x {b['threads']} thread(s) at batch "
                  f"{b['batch']}" if "workers" in b else
                  f"in one process at batch {b['batch']}, not the server's layout ({_sides(result)[0]}")
        met = "met" if top["c_over_b"] >= keep else f"not met, short by {keep - top['c_over_b']:.2f}"
        lines.append(f"- Over REST our handler kept {top['c_over_b'] * 100:.0f} % of the in-process pipeline "
                     f"{layout}: {_f(b['img_s'])} img/s): (c)/(b) = {top['c_over_b']:.2f} (goal >= {keep:g}: {met}).")
    prof = rest.get("profile")
    if prof and prof.get("stages"):
        stages = ", ".join(f"{k} {v:.0f} %" for k, v in sorted(prof["stages"].items(), key=lambda kv: -kv[1]) if v)
        lines.append(f"- Where our workers' time went at {prof['users']} users (py-spy, {prof['samples']} samples "
                     f"over {prof['workers']} workers, idle included): {stages}.")
    return lines


def render_markdown(result: dict[str, Any], png_name: str | None = "bench_concurrency.png") -> str:
    m = result["meta"]
    ts = m.get("torchserve", {})
    busy = " (shared with other jobs: treat absolute figures as lower bounds)" if m["loadavg_start"][0] > 1 else ""
    out = ["# Benchmarks", "",
           f"Measured by `make bench` (`python -m load_tests.bench`) on {m['date']}; every figure on this page is in "
           f"[benchmarks.json](benchmarks.json) (a copy of `{m.get('json', 'reports/bench/')}`) and comes from that "
           "one run on one machine; the headline names what runs on each side.", "",
           f"- **Machine**: {m['hardware']}, a CPU budget of {m['cores']} cores, {m.get('memory_gib', '?')} GiB, "
           "no GPU. "
           f"Load average at start {m['loadavg_start']}, at end {m.get('loadavg_end', '?')}"
           f"{busy}.",
           f"- **Software**: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}.",
           f"- **Model**: {m['model']}; ours runs `{m['runtime']}` "
           + (f"from its archive ({_artifact_line(m['runtime_info'])})" if "runtime_info" in m else
              "(built by the worker at start: this run predates runtime artifacts packed in the archive)")
           + f", {m['threads']} thread(s) per process.",
           f"- **Images**: {m['images']}.",
           f"- **TorchServe**: every model on one server, {ts.get('workers', 1)} worker(s) of "
           f"{ts.get('threads', m['threads'])} thread(s) each, batchSize {ts.get('batchSize')}, maxBatchDelay "
           f"{ts.get('maxBatchDelay')} ms, token auth on.",
           f"- **Load generator**: {m['load_generator']}.", "", "## Summary", "", *summary_lines(result), "",
           "## (a) model forward and (b) our handler pipeline, in-process", "",
           "Latency is per call (one batch); (b) is bytes → decode → batch preprocess → forward → top-k JSON.", "",
           "| path | batch | img/s | p50 ms | p95 ms | p99 ms | calls | errors |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, key in (("(a) forward", "model_forward"), ("(b) pipeline", "pipeline")):
        for p in result.get(key, []):
            out.append(f"| {label} | {p['batch']} | {_f(p['img_s'])} | {_f(p['p50_ms'])} | {_f(p['p95_ms'])} | "
                       f"{_f(p['p99_ms'])} | {p['calls']} | {p.get('errors', 0)} |")
    lay = result.get("pipeline_layout")
    if lay:
        out.append(f"| (b) pipeline, {lay['workers']} processes x {lay['threads']} thread(s) | {lay['batch']} | "
                   f"{_f(lay['img_s'])} | {_f(lay['p50_ms'])} (slowest) | – | {_f(lay['p99_ms'])} (slowest) | "
                   f"{lay['calls']} | {lay.get('errors', 0)} |")
    out += ["", "## (c) TorchServe + our handler, (d) TorchServe + stock `image_classifier`, over REST", "",
            "One image per request. CPU is in % of one core (this machine has "
            f"{m['cores'] * 100} %): server = frontend + workers, load gen = the locust process.", "",
            "| users | server | req/s | p50 ms | p95 ms | p99 ms | requests | errors | server CPU % | load-gen CPU % |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rest = result.get("rest", {})
    points = sorted([(p["users"], 0, "(c) ours", p) for p in rest.get("ours", [])] +
                    [(p["users"], 1, "(d) stock", p) for p in rest.get("stock", [])] +
                    [(p["users"], 2, "(e) ours, eager", p) for p in rest.get("ours_eager", [])], key=lambda t: t[:2])
    for users, _, label, p in points:
        out.append(f"| {users} | {label} | {_f(p['rps'])} | {_f(p['p50_ms'], 0)} | {_f(p['p95_ms'], 0)} | "
                   f"{_f(p['p99_ms'], 0)} | {p['requests']} | {p['failures']} | {_f(p.get('server_cpu_pct'), 0)} | "
                   f"{_f(p.get('loadgen_cpu_pct'), 0)} |")
    out += ["", "## Ratios", "",
            "| users | (c)/(d) req/s | (d)/(c) p99 | (c)/(b) req/s | (e)/(d) req/s, eager vs eager |",
            "|---:|---:|---:|---:|---:|"]
    for r in compute_ratios(result):
        cells = [_f(r.get(k), 2) for k in ("c_over_d_rps", "d_over_c_p99", "c_over_b", "e_over_d_rps")]
        out.append(f"| {r['users']} | " + " | ".join(cells) + " |")
    if png_name:
        out += ["", f"![throughput and p99 latency against concurrency]({png_name})"]
    return "\n".join(out) + "\n"


def _artifact_line(info: dict[str, Any]) -> str:
    if not info.get("artifact"):
        return "the checkpoint itself"
    calibration = (info.get("calibration") or {}).get("source")
    return f"{info['artifact']}" + (f", calibrated on {calibration} images" if calibration else "")


def write_markdown(text: str, path: str | Path) -> Path:
    """Write the page; whatever follows NOTES_MARKER in the existing page (hand-written notes) is kept."""
    path = Path(path)
    notes = ""
    if path.is_file():
        old = path.read_text()
        if NOTES_MARKER in old:
            notes = old.split(NOTES_MARKER, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n" + NOTES_MARKER + (notes if notes else "\n"))
    return path


def plot_concurrency(result: dict[str, Any], path: str | Path) -> Path:
    """Two small panels: req/s and p99 against users, ours vs stock; the in-process pipeline as a reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
    for key, label, style in (("ours", "(c) ours", "o-"), ("stock", "(d) stock", "s--")):
        pts = sorted(result.get("rest", {}).get(key, []), key=lambda p: p["users"])
        if pts:
            users = [p["users"] for p in pts]
            ax1.plot(users, [p["rps"] for p in pts], style, label=label)
            ax2.plot(users, [p["p99_ms"] or 0 for p in pts], style, label=label)
    pipe = _at_batch(result.get("pipeline", []), result.get("meta", {}).get("torchserve", {}).get("batchSize", 8))
    if pipe:
        ax1.axhline(pipe["img_s"], color="grey", lw=1, ls=":", label=f"(b) in-process, batch {pipe['batch']}")
    ticks = sorted({p["users"] for key in ("ours", "stock") for p in result.get("rest", {}).get(key, [])})
    for ax, title in ((ax1, "throughput (req/s)"), (ax2, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        if ticks:
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
        ax.set_xlabel("concurrent users")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    ax1.legend(fontsize=7)
    fig.suptitle(f"{result['meta']['model']} on {result['meta']['hardware']}", fontsize=9)
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out, write and close a matplotlib figure (its folder made as needed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
