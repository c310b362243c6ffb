"""The video benchmark's report: verdicts against the goals, tables, the plot; all from its JSON (plain dicts), so
the docs block is regenerated from the committed docs/video_bench.json and checked by a test.

    markdown(result)            # the block between <!-- video-bench:begin/end --> in docs/video.md
    write_docs(result, docs)    # docs/video_bench.json + docs/video_bench.png + that block
    runtimes_markdown(results)  # the <!-- video-bench-runtimes --> block: runs of other runtimes side by side
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from handlers.artifacts import write_json
from load_tests.report import save_figure

BLOCK = "video-bench"
JSON_NAME, PNG_NAME = "video_bench.json", "video_bench.png"
RUNTIMES_BLOCK = "video-bench-runtimes"  # docs/video_bench.json and docs/video_bench_<runtime>.json side by side
STREAMS_GOAL, CLIP_FPS_GOAL = 2, 90.0  # goals to report against: real-time 30 FPS streams; in-process clip FPS
STAGES = ("decode", "preprocess", "inference", "postprocess", "answer")
IDLE = "frontend I/O"  # py-spy: the worker waiting for, reading or writing a batch (load_tests/profile.py)


def _f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "–"
    return f"{x:,.{nd}f}" if isinstance(x, float) else str(x)


def _n(point: dict[str, Any]) -> int:
    """A stream point's camera count (one locust user per camera when the point has no "streams")."""
    return point.get("streams", point["users"])


def streams_held(points: list[dict[str, Any]]) -> int:
    """Streams held in real time: the largest camera count of the sweep's leading run of real-time points."""
    held = 0
    for p in sorted(points, key=_n):
        if not p["realtime"]:
            break
        held = _n(p)
    return held


def profile_ms(profile: dict[str, Any] | None, workers: int) -> tuple[dict[str, float], float] | None:
    """py-spy stage shares (idle included) -> milliseconds of worker time per answered frame, and the frames/s the
    profiled load reached: every worker's wall time is spent in some stage, so one frame costs workers / fps
    seconds of it in all."""
    if not profile or not profile.get("stages") or not profile.get("load"):
        return None
    load = profile["load"]
    fps = load.get("fps") or load.get("ok_rps")
    if not fps:
        return None
    per_frame = 1000 * workers / fps
    return {k: round(v / 100 * per_frame, 2) for k, v in profile["stages"].items()}, fps


def inprocess_label(point: dict[str, Any]) -> str:
    """"2 thread(s)", or "2 lanes × 1 thread" for a clip whose chunks ran on one one-thread inference per core."""
    lanes = point.get("lanes", 1)
    if lanes > 1:
        return f"{lanes} lanes × {point['threads'] // lanes} thread"
    return f"{point['threads']} thread(s)"


def stage_rows(result: dict[str, Any]) -> list[tuple[str, float | None, dict[str, float]]]:
    """(path, frames/s, ms per frame by stage) for the per-stage table and the plot."""
    rows = []
    for p in result.get("inprocess", []):
        lanes = " (the stages overlap)" if p.get("lanes", 1) > 1 else ""
        rows.append((f"(i) one clip in-process, {inprocess_label(p)}{lanes}", p["fps"], p["stages_ms"]))
    rest, workers = result.get("rest", {}), result["meta"]["torchserve"]["maxWorkers"]
    clips, streams = rest.get("clips") or [], rest.get("streams") or []
    for p, label in ((clips[-1] if clips else None, "(ii) clip requests through TorchServe, {} client(s)"),
                     (streams[-1] if streams else None, "(iii) camera streams through TorchServe, {} stream(s)")):
        if p and p.get("server_stages_ms"):
            rows.append((label.format(p.get("clients") or _n(p)) + " (handler timers)", p.get("fps") or p["ok_rps"],
                         p["server_stages_ms"]))
    for key, label in (("profile_clips", "(ii) clip requests through TorchServe"),
                       ("profile_streams", "(iii) camera streams through TorchServe")):
        got = profile_ms(rest.get(key), workers)
        if got:
            load = rest[key]["load"]
            who = f"{load['clients']} client(s)" if "clients" in load else f"{_n(load)} stream(s)"
            rows.append((f"{label}, {who} (py-spy, worker time)", got[1], got[0]))
    base = rest.get("baseline")
    if base:
        ms = base["client_ms"]
        rows.append(("(base) per-frame client loop (client side)", base["fps"],
                     {"decode": ms["decode"], "JPEG encode": ms["encode"], "request round trip": ms["request"]}))
    return rows


def verdicts(result: dict[str, Any]) -> list[str]:
    """The headline lines: each goal met or by how much it is missed, and where the time goes."""
    m, rest = result["meta"], result.get("rest", {})
    lines = []
    points = rest.get("streams") or []
    if points:
        held, fps, budget = streams_held(points), m["fps_target"], m["p99_target_ms"]
        miss = next((p for p in sorted(points, key=_n) if not p["realtime"]), None)
        text = (f"- **Camera streams**: one node held **{held}** real-time {fps:g} FPS stream(s) (p99 ≤ {budget:g} ms, "
                f"no errors, ≥ 95 % of the offered frames answered); goal ≥ {STREAMS_GOAL}: ")
        text += "**met**." if held >= STREAMS_GOAL else f"**not met**, short by {STREAMS_GOAL - held} stream(s)."
        if miss is not None:
            text += (f" At {_n(miss)} stream(s): p99 {_f(miss['p99_ms'], 0)} ms "
                     f"({miss['p99_ms'] / budget:.1f}x the budget), {_f(miss['ok_rps'])} of "
                     f"{_f(miss['offered_fps'])} frames/s answered, {miss['failures']} errors.")
        lines.append(text)
    elif m.get("rest_error"):
        lines.append(f"- The TorchServe part failed: {m['rest_error'].splitlines()[0][:300]}")
    inproc = max(result.get("inprocess", []), key=lambda p: p["fps"], default=None)  # the fastest way
    if inproc:
        fps = inproc["fps"]
        text = (f"- **One clip in-process**, {inprocess_label(inproc)}: **{_f(fps)} FPS** end to end "
                f"(decode to answer JSON); goal ≥ {CLIP_FPS_GOAL:g}: ")
        text += ("**met**." if fps >= CLIP_FPS_GOAL else
                 f"**not met**, short by {CLIP_FPS_GOAL - fps:.1f} FPS (needs {CLIP_FPS_GOAL / fps:.2f}x).")
        summed = " on all threads together (the stages overlap)" if inproc.get("lanes", 1) > 1 else ""
        lines.append(text + f" Time per frame{summed}: " + _shares(inproc["stages_ms"]) + ".")
    clips, base = rest.get("clips") or [], rest.get("baseline")
    one = next((p for p in clips if p["clients"] == 1), None)
    if one and base:
        lines.append(f"- **Side by side, one client each**: the whole clip as one request (server-side decoding "
                     f"and batching) ran at **{_f(one['fps'])} FPS**, the per-frame client loop at **{_f(base['fps'])} "
                     f"FPS** (p99 per frame {_f(base['p99_ms'], 0)} ms): **{one['fps'] / base['fps']:.2f}x**.")
    for key, what in (("profile_clips", "clip requests"), ("profile_streams", "camera streams")):
        prof = rest.get(key)
        if prof and prof.get("stages"):
            busy = {k: v for k, v in prof["stages"].items() if k not in (IDLE, "other") and v}
            top = max(busy, key=busy.get) if busy else None
            idle = prof["stages"].get(IDLE, 0.0)
            verdict = "." if not top else (
                f". The workers waited for work {idle:.0f} % of the time: the limit lies outside their compute "
                f"(frontend, batching or the clients); of their busy time **{top}** is the largest share."
                if idle > sum(busy.values()) else f". Bottleneck: **{top}**.")
            lines.append(f"- Where the workers' time went under {what} (py-spy, {prof['samples']} samples over "
                         f"{prof['workers']} workers, idle included): "
                         + ", ".join(f"{k} {v:.0f} %" for k, v in sorted(prof["stages"].items(), key=lambda kv: -kv[1])
                                     if v) + verdict)
    return lines


def _shares(stages: dict[str, float | None]) -> str:
    stages = {k: v for k, v in stages.items() if v is not None}
    total = sum(stages.values()) or 1.0
    return ", ".join(f"{k} {v:.2f} ms ({100 * v / total:.0f} %)" for k, v in
                     sorted(stages.items(), key=lambda kv: -kv[1]) if v > 0)


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    ts, clip = m["torchserve"], m["clip"]
    busy = (" The 1-minute load average was above 1 at the start (other work on the shared machine, or the run just "
            "before this one): treat the figures as lower bounds." if m["loadavg_start"][0] > 1 else "")
    out = [f"Measured by `make bench-video` (`python -m load_tests.video_bench`) on {m['date']} in {m['wall_s']} s; "
           f"every figure below is in [{JSON_NAME}]({JSON_NAME}) (a copy of `{m['json']}`).", "",
           f"- **Machine**: {m['hardware']}, a CPU budget of {m['cores']} cores, {m['memory_gib']} GiB, no GPU; load "
           f"average {m['loadavg_start']} at the start, {m['loadavg_end']} at the end.{busy}",
           f"- **Software**: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}.",
           f"- **Model**: `{m['arch']}` at {m['img_size']} px, {m['weights']}; runtime `{m['runtime']}` "
           + ("loaded from the checkpoint (--quick: no archive)" if m["quick"] else
              f"from the archive built from `{m['config']}`") + ".",
           f"- **Threads**: (i) one process with 1 and with {m['cores']} threads; TorchServe {ts['maxWorkers']} "
           f"worker(s) x {ts['threads']} thread(s), batchSize {ts['batchSize']}, maxBatchDelay {ts['maxBatchDelay']} "
           f"ms, max_batch {ts['max_batch']}, token auth on, every client and locust on the same machine.",
           f"- **Clip**: {clip['frames']} frames of {clip['width']}x{clip['height']} at {clip['fps']:g} FPS, "
           f"{clip['codec']}, {clip['bytes'] / 1024:.0f} KiB, {clip['source']}; camera frames are its frames as "
           f"JPEG (quality {clip['jpeg_quality']}, {clip['jpeg_mean_bytes'] / 1024:.1f} KiB). Masks as COCO RLE.",
           "", *verdicts(result), "",
           "Milliseconds per frame by stage. (i) from the pipeline's own timers (answer = building it + compact "
           "JSON); (ii) and (iii) \"handler timers\": the same timers in the server's workers "
           "(`handler_stage_milliseconds_total` on TorchServe's metrics endpoint, over the frames answered in the "
           "point: the frontend's queueing and transfer are not in them); \"py-spy\": samples of the workers during "
           "extra, uncounted points (worker wall time per answered frame, so idle time shows as frontend I/O); "
           "(base) timed by the client.", "",
           "| path | FPS | " + " | ".join(STAGES) + f" | {IDLE} | other |", "|---|---:|" + "---:|" * 7]
    for label, fps, ms in stage_rows(result):
        if "request round trip" in ms:
            cells = [_f(ms["decode"], 2), "JPEG encode " + _f(ms["JPEG encode"], 2), "–", "–", "–",
                     "round trip " + _f(ms["request round trip"], 2), "–"]
        else:
            cells = [_f(ms.get(k), 2) for k in (*STAGES, IDLE, "other")]
        out.append(f"| {label} | {_f(fps)} | " + " | ".join(cells) + " |")
    rest = result.get("rest", {})
    if rest.get("clips"):
        out += ["", "(ii) Clip requests (the whole clip per request, answer not streamed):", "",
                "| clients | clips | FPS | p50 ms / clip | p99 ms / clip | server CPU % | errors |",
                "|---:|---:|---:|---:|---:|---:|---:|"]
        for p in rest["clips"]:
            out.append(f"| {p['clients']} | {p['requests']} | {_f(p['fps'])} | {_f(p['p50_ms'], 0)} | "
                       f"{_f(p['p99_ms'], 0)} | {_f(p['server_cpu_pct'], 0)} | {p['errors']} |")
    if rest.get("baseline"):
        b = rest["baseline"]
        out += ["", f"(base) The near-real-time example's loop: {b['frames']} frames in {b['wall_s']} s, "
                f"{_f(b['fps'])} FPS, request round trip p50 {_f(b['p50_ms'], 1)} / p99 {_f(b['p99_ms'], 1)} ms, "
                f"{b['errors']} errors."]
    if rest.get("streams"):
        k = rest["streams"][0].get("in_flight", 1)  # 1: one paced locust user per camera
        fps = m["fps_target"]
        how = (f"with up to {k} unanswered ({k} locust users pacing {fps / k:g} FPS each, started 1/{fps:g} s apart)"
               if k > 1 else f"one locust user per camera paced at {fps:g} FPS: a frame waits for the previous answer")
        out += ["", f"(iii) Camera streams: each sends a JPEG frame every 1/{fps:g} s, one per request, {how}; CPU in "
                "% of one core.", "",
                "| streams | offered FPS | answered FPS | p50 ms | p95 ms | p99 ms | max ms | errors | server CPU % | "
                "load-gen CPU % | real time |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for p in rest["streams"]:
            out.append(f"| {_n(p)} | {_f(p['offered_fps'])} | {_f(p['ok_rps'])} | {_f(p['p50_ms'], 0)} | "
                       f"{_f(p['p95_ms'], 0)} | {_f(p['p99_ms'], 0)} | {_f(p['max_ms'], 0)} | {p['failures']} | "
                       f"{_f(p.get('server_cpu_pct'), 0)} | {_f(p.get('loadgen_cpu_pct'), 0)} | "
                       f"{'yes' if p['realtime'] else 'no'} |")
    out += ["", f"![per-stage time per frame, and camera streams against p99 latency]({PNG_NAME})"]
    return "\n".join(out)


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Left: milliseconds per frame by stage for each path; right: p99 and answered FPS against camera streams."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = stage_rows(result)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4), dpi=72, gridspec_kw={"width_ratios": [1.6, 1]})
    keys = list(dict.fromkeys(k for _, _, ms in rows for k in ms))
    colors = dict(zip(keys, plt.get_cmap("tab10").colors))
    for i, (_, _, ms) in enumerate(rows):
        left = 0.0
        for k in keys:
            v = ms.get(k) or 0.0
            ax1.barh(i, v, left=left, color=colors[k], label=k if i == 0 or k not in ms else None)
            left += v
    handles, labels = ax1.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax1.legend(uniq.values(), uniq.keys(), fontsize=6, loc="lower right")
    ax1.set_yticks(range(len(rows)), [f"{r[0].split(',')[0]} ({_f(r[1])} FPS)" for r in rows], fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xlabel("ms per frame")
    ax1.set_title("where a frame's time goes", fontsize=9)
    points = sorted(result.get("rest", {}).get("streams") or [], key=_n)
    if points:
        n = [_n(p) for p in points]
        ax2.plot(n, [p["p99_ms"] or 0 for p in points], "o-", label="p99 ms")
        ax2.axhline(result["meta"]["p99_target_ms"], color="grey", ls=":", lw=1, label="p99 budget")
        ax2.plot(n, [p["ok_rps"] for p in points], "s--", label="answered FPS")
        ax2.plot(n, [p["offered_fps"] for p in points], ":", color="black", lw=1, label="offered FPS")
        ax2.set_xticks(n)
        ax2.legend(fontsize=6)
    ax2.set_xlabel(f"camera streams at {result['meta']['fps_target']:g} FPS")
    ax2.set_title("camera streams through TorchServe", fontsize=9)
    ax2.set_ylim(bottom=0)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_docs(result: dict[str, Any], docs: Path) -> None:
    from load_tests.reliability import write_doc_block

    write_json(docs / JSON_NAME, result)
    plot(result, docs / PNG_NAME)
    write_doc_block(docs / "video.md", BLOCK, markdown(result))
    print(f"wrote {docs / JSON_NAME}, {docs / PNG_NAME} and the {BLOCK} block of {docs / 'video.md'}")


def runtimes_markdown(results: list[dict[str, Any]]) -> str:
    """Full benchmark runs that differ only in the model's runtime, side by side; ratios against the first."""
    base = results[0]

    def row(r: dict[str, Any]) -> dict[str, Any]:
        fps = {inprocess_label(p): p["fps"] for p in r["inprocess"]}
        clips = max(r["rest"]["clips"], key=lambda c: c["fps"]) if r.get("rest") else None
        cams = sorted(r["rest"]["streams"], key=_n) if r.get("rest") else []
        return {"fps": fps, "best": max(fps.values()), "clips": clips, "cam": cams[0] if cams else None,
                "held": streams_held(cams) if cams else None}

    rows, ref = [row(r) for r in results], row(base)
    ways = list(dict.fromkeys(k for x in rows for k in x["fps"]))  # "1 thread(s)", "2 thread(s)", "2 lanes × 1 ..."
    lines = ["| runtime | " + " | ".join(f"in-process FPS, {w.replace('(s)', 's' if w[0] != '1' else '')}"
                                        for w in ways)
             + " | TorchServe clip FPS (clients) | one camera: p99 ms | real-time streams | best in-process × "
             + base["meta"]["runtime"] + " |", "|---|" + "---:|" * (len(ways) + 4)]
    for r, x in zip(results, rows):
        clips = f"{x['clips']['fps']:.1f} ({x['clips']['clients']})" if x["clips"] else "–"
        cam = f"{x['cam']['p99_ms']:.0f}" if x["cam"] else "–"
        lines.append(f"| {r['meta']['runtime']} | " + " | ".join(_f(x["fps"].get(w)) for w in ways)
                     + f" | {clips} | {cam} | {_f(x['held'], 0)} | {x['best'] / ref['best']:.2f} |")
    best = max(zip(results, rows), key=lambda t: t[1]["best"])
    way = max(best[1]["fps"], key=best[1]["fps"].get)
    gap = CLIP_FPS_GOAL - best[1]["best"]
    lines += ["", f"Best in-process: {best[0]['meta']['runtime']} at {best[1]['best']:.1f} FPS, {way} "
              + (f"(goal ≥ {CLIP_FPS_GOAL:.0f}: **met**)." if gap <= 0 else
                 f"(goal ≥ {CLIP_FPS_GOAL:.0f}: **not met**, short by {gap:.1f} FPS).")]
    dates = ", ".join(f"{r['meta']['runtime']} {r['meta']['date']} (load {r['meta']['loadavg_start'][0]} -> "
                      f"{r['meta']['loadavg_end'][0]})" for r in sorted(results, key=lambda r: r["meta"]["date"]))
    lines += ["", f"Same command, model, clip and TorchServe settings, only `--runtime` differs; runs back to back: "
              f"{dates}. Weights: {base['meta']['weights']}."]
    return "\n".join(lines)
