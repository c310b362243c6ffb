"""The end-to-end video benchmark: its --quick run (real pipeline, real MP4, tiny model), the verdicts it derives
from figures, the camera pacing of the locust user, and docs/video.md's block against the committed JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from load_tests import video_report
from load_tests.payload import check_body

ROOT = Path(__file__).resolve().parents[1]


def stream(n, p99, ok_rps, realtime, failures=0):
    return {"streams": n, "in_flight": 4, "users": 4 * n, "offered_fps": 30.0 * n, "ok_rps": ok_rps,
            "p50_ms": p99 / 2, "p95_ms": p99 * 0.9,
            "p99_ms": p99, "max_ms": p99 * 1.2, "failures": failures, "realtime": realtime}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run: 16 frames of 64 px, a tiny ViT segmenter, in-process only, no docs."""
    from load_tests.video_bench import parse_args, run

    tmp = tmp_path_factory.mktemp("video-bench")
    return run(parse_args(["--quick", "--build-dir", str(tmp / "build"), "--out-dir", str(tmp)])), tmp


def test_quick_run_times_every_stage_of_a_real_clip(quick):
    result, tmp = quick
    assert result["rest"] == {} and result["meta"]["quick"] and result["meta"]["rest_error"] is None
    assert [p["threads"] for p in result["inprocess"]] == sorted({1, result["meta"]["cores"]})
    for p in result["inprocess"]:
        assert p["frames"] == 16 * p["reps"] and p["fps"] > 0 and p["answer_bytes"] > 0
        assert set(p["stages_ms"]) == {*video_report.STAGES, "other"}
        assert p["stages_ms"]["decode"] > 0 and p["stages_ms"]["inference"] > 0 and p["stages_ms"]["postprocess"] > 0
    saved = json.loads(next(tmp.glob("video-bench-*.json")).read_text())
    assert saved["inprocess"] == result["inprocess"] and saved["meta"]["clip"]["frames"] == 16
    assert len(list((tmp / "build" / "frames-64").glob("*.jpg"))) == 16
    md = video_report.markdown(result)
    assert "**One clip in-process**" in md and "| (i) one clip in-process, 1 thread(s) |" in md


def test_verdicts_say_by_how_much_a_goal_is_missed(quick, tmp_path):
    result = json.loads(json.dumps(quick[0]))
    for p in result["inprocess"]:
        p["fps"] = 50.0
    result["inprocess"][-1]["fps"] = 60.0  # the verdict rates the fastest way
    result["meta"].update(fps_target=30.0, p99_target_ms=100.0)
    result["rest"] = {"streams": [stream(1, 60.0, 30.0, True), stream(2, 250.0, 48.0, False)],
                      "clips": [{"clients": 1, "requests": 5, "fps": 45.0, "p50_ms": 1, "p99_ms": 2,
                                 "server_cpu_pct": 100.0, "errors": 0}],
                      "baseline": {"frames": 300, "wall_s": 15.0, "fps": 20.0, "errors": 0, "p50_ms": 40.0,
                                   "p99_ms": 60.0, "client_ms": {"decode": 1.0, "encode": 2.0, "request": 47.0}}}
    md = video_report.markdown(result)
    assert "one node held **1** real-time 30 FPS stream(s)" in md and "**not met**, short by 1 stream(s)" in md
    assert "At 2 stream(s): p99 250 ms (2.5x the budget), 48.0 of 60.0 frames/s answered" in md
    assert "**60.0 FPS** end to end" in md and "short by 30.0 FPS (needs 1.50x)" in md
    assert "**45.0 FPS**, the per-frame client loop at **20.0 FPS**" in md and "**2.25x**" in md
    assert "| 2 | 60.0 | 48.0 | 125 | 225 | 250 | 300 | 0 | – | – | no |" in md
    assert "with up to 4 unanswered (4 locust users pacing 7.5 FPS each, started 1/30 s apart)" in md
    png = video_report.plot(result, tmp_path / "video_bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(png) < 150_000
    result["rest"]["streams"] = [stream(1, 40.0, 30.0, True), stream(2, 70.0, 59.0, True), stream(3, 90, 80, False)]
    assert "held **2** real-time" in video_report.markdown(result) and "**met**." in video_report.markdown(result)


def test_profile_shares_become_worker_milliseconds_per_frame():
    profile = {"stages": {"inference": 50.0, "frontend I/O": 30.0, "decode": 20.0}, "samples": 900, "workers": 2,
               "load": {"clients": 2, "fps": 40.0}}
    ms, fps = video_report.profile_ms(profile, workers=2)
    assert fps == 40.0 and ms == {"inference": 25.0, "frontend I/O": 15.0, "decode": 10.0}  # 2 workers / 40 FPS
    assert video_report.profile_ms({"stages": {}, "load": {"fps": 1}}, 2) is None


def test_streams_held_counts_only_the_leading_real_time_points():
    points = [stream(2, 90, 60, True), stream(1, 50, 30, True), stream(3, 200, 70, False), stream(4, 95, 120, True)]
    assert video_report.streams_held(points) == 2
    assert video_report.streams_held([stream(1, 150, 25, False)]) == 0


def test_a_frame_answer_counts_when_it_has_detections():
    assert check_body(200, '{"kind": "frame", "detections": []}', expect="detections") is None
    assert "no detections" in check_body(200, '{"predictions": []}', expect="detections")
    assert check_body(400, '{"code": 400}', expect="detections").startswith("HTTP 400")


def test_the_video_md_block_is_generated_from_the_committed_json():
    """docs/video.md's benchmark block is exactly what docs/video_bench.json generates (no hand-typed figures)."""
    text = (ROOT / "docs" / "video.md").read_text()
    block = re.search(f"<!-- {video_report.BLOCK}:begin -->\n(.*?)\n<!-- {video_report.BLOCK}:end -->", text, re.S)
    assert block, "docs/video.md has no video-bench block"
    data = ROOT / "docs" / video_report.JSON_NAME
    if not data.is_file():
        assert block.group(1).startswith("(awaiting "), "figures without their JSON"
        pytest.skip("awaits `make bench-video` on a quiet machine")
    result = json.loads(data.read_text())
    assert not result["meta"]["quick"], "the committed figures come from a full run"
    assert block.group(1) == video_report.markdown(result)


def test_the_runtimes_block_is_generated_from_the_committed_runs():
    """The runtime comparison under the benchmark block is what the committed runs generate, and they are comparable:
    the same clip, model and weights, full runs, only the runtime differs."""
    text = (ROOT / "docs" / "video.md").read_text()
    name = video_report.RUNTIMES_BLOCK
    block = re.search(f"<!-- {name}:begin -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    assert block, f"docs/video.md has no {name} block"
    runs = [json.loads((ROOT / "docs" / f).read_text()) for f in (video_report.JSON_NAME, "video_bench_int8.json")]
    assert [r["meta"]["runtime"] for r in runs] == ["onnx", "int8"]
    for key in ("arch", "img_size", "weights", "quick"):
        assert runs[0]["meta"][key] == runs[1]["meta"][key], key
    clip = [{k: v for k, v in r["meta"]["clip"].items() if k != "bytes"} for r in runs]  # x264's size varies a little
    assert clip[0] == clip[1]
    assert block.group(1) == video_report.runtimes_markdown(runs)


def test_the_runtimes_table_rates_each_run_against_the_first():
    """Hand-made runs: FPS per thread count, best clip FPS, the one-camera p99, streams held, ratio and verdict."""
    def run(runtime: str, fps1: float, fps2: float, p99: float, date: str) -> dict:
        return {"meta": {"runtime": runtime, "date": date, "loadavg_start": [0.5], "loadavg_end": [1.0],
                         "weights": "random weights (seed 0)"},
                "inprocess": [{"threads": 1, "fps": fps1}, {"threads": 2, "fps": fps2}],
                "rest": {"clips": [{"clients": 1, "fps": fps1}, {"clients": 2, "fps": 2 * fps1}],
                         "streams": [{"users": 4, "streams": 1, "p99_ms": p99, "realtime": p99 <= 100}]}}

    md = video_report.runtimes_markdown([run("onnx", 20.0, 30.0, 150.0, "b"), run("int8", 40.0, 60.0, 90.0, "a")])
    assert "| onnx | 20.0 | 30.0 | 40.0 (2) | 150 | 0 | 1.00 |" in md
    assert "| int8 | 40.0 | 60.0 | 80.0 (2) | 90 | 1 | 2.00 |" in md
    assert "Best in-process: int8 at 60.0 FPS, 2 thread(s) (goal ≥ 90: **not met**, short by 30.0 FPS)." in md
    assert md.index("int8 a") < md.index("onnx b")  # runs listed in the order they ran
    lanes = run("int8", 40.0, 60.0, 90.0, "a")
    lanes["inprocess"].append({"threads": 2, "lanes": 2, "fps": 75.0})  # the same cores as one-thread lanes
    md = video_report.runtimes_markdown([run("onnx", 20.0, 30.0, 150.0, "b"), lanes])
    assert "| in-process FPS, 2 lanes × 1 thread |" in md
    assert "| onnx | 20.0 | 30.0 | – | 40.0 (2) | 150 | 0 | 1.00 |" in md
    assert "| int8 | 40.0 | 60.0 | 75.0 | 80.0 (2) | 90 | 1 | 2.50 |" in md
    assert "Best in-process: int8 at 75.0 FPS, 2 lanes × 1 thread (goal ≥ 90: **not met**, short by 15.0 FPS)." in md
