"""The benchmark harness's figures and reports on synthetic inputs (no server), plus a tiny in-process run."""

from __future__ import annotations

import json

import pytest

from handlers.artifacts import write_json
from load_tests import report
from load_tests.images import to_photo
from load_tests.inprocess import bench_checkpoint, measure_forward, measure_layout, measure_pipeline, time_calls

STATS_CSV = """Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,\
Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%
POST,/predictions/m,1200,3,240,251.5,20.1,910.7,355.0,40.0,0.1,240,260,280,290,330,400,520,610,900,910,910
,Aggregated,1200,3,240,251.5,20.1,910.7,355.0,40.0,0.1,240,260,280,290,330,400,520,610,900,910,910
"""


def point(users, rps, p99, failures=0):
    return {"users": users, "requests": int(rps * 15), "failures": failures, "rps": rps, "p50_ms": p99 / 3,
            "p95_ms": p99 / 1.2, "p99_ms": p99, "server_cpu_pct": 180.0, "loadgen_cpu_pct": 4.0}


@pytest.fixture
def result():
    inproc = [{"batch": b, "calls": 10, "errors": 0, "img_s": s, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0}
              for b, s in ((1, 20.0), (8, 40.0), (16, 42.0))]
    return {"meta": {"date": "2026-01-01 00:00 UTC", "hardware": "Test CPU", "cores": 2, "memory_gib": 24,
                     "loadavg_start": [3.5, 2.0, 1.0], "loadavg_end": [3.0, 2.0, 1.0],
                     "versions": {"torch": "2.x", "torchserve": "0.12.0"}, "model": "resnet18 at 224 px",
                     "runtime": "eager", "threads": 2, "images": "64 JPEGs",
                     "torchserve": {"batchSize": 8, "maxBatchDelay": 20, "workers": 1},
                     "load_generator": "locust", "json": "reports/bench/bench-x.json"},
            "model_forward": inproc, "pipeline": [dict(p, img_s=p["img_s"] / 2) for p in inproc],
            "rest": {"ours": [point(1, 10.0, 150.0), point(16, 30.0, 700.0, failures=2)],
                     "stock": [point(1, 8.0, 200.0), point(16, 20.0, 1400.0)]}}


def test_percentiles_interpolate_and_handle_no_samples():
    assert report.percentiles(list(range(1, 101))) == {"p50_ms": 50.5, "p95_ms": 95.05, "p99_ms": 99.01}
    assert report.percentiles([7.0]) == {"p50_ms": 7.0, "p95_ms": 7.0, "p99_ms": 7.0}
    assert report.percentiles([]) == {"p50_ms": None, "p95_ms": None, "p99_ms": None}


def test_locust_stats_csv_becomes_figures(tmp_path):
    path = tmp_path / "x_stats.csv"
    path.write_text(STATS_CSV)
    s = report.read_locust_stats(path)
    assert s == {"requests": 1200, "failures": 3, "rps": 40.0, "ok_rps": 39.9, "mean_ms": 251.5, "p50_ms": 240.0,
                 "p95_ms": 400.0, "p99_ms": 610.0, "max_ms": 910.7}
    assert report.read_locust_stats(path, "/predictions/m")["requests"] == 1200
    path.write_text(STATS_CSV.replace(",610,", ",N/A,"))
    assert report.read_locust_stats(path)["p99_ms"] is None
    with pytest.raises(ValueError, match="no row named 'Aggregated'"):
        path.write_text(STATS_CSV.splitlines()[0] + "\n")
        report.read_locust_stats(path)


def test_ratios_compare_like_with_like(result):
    rows = report.compute_ratios(result)
    assert rows == [{"users": 1, "c_over_d_rps": 1.25, "d_over_c_p99": 1.33, "c_over_b": 0.5},
                    {"users": 16, "c_over_d_rps": 1.5, "d_over_c_p99": 2.0, "c_over_b": 1.5}]
    result["rest"]["stock"] = []
    assert report.compute_ratios(result)[0]["c_over_d_rps"] is None


def test_markdown_states_settings_tables_and_the_verdict(result):
    md = report.render_markdown(result)
    assert "Test CPU, a CPU budget of 2 cores" in md and "[3.5, 2.0, 1.0]" in md and "shared with other jobs" in md
    assert "batchSize 8, maxBatchDelay 20 ms" in md
    assert "| (a) forward | 8 | 40.0 |" in md and "| (b) pipeline | 8 | 20.0 |" in md
    assert "| 16 | (c) ours | 30.0 | 233 | 583 | 700 | 450 | 2 | 180 | 4 |" in md
    assert "| 16 | 1.50 | 2.00 | 1.50 | – |" in md
    assert "**1.50x** (below the 2.5x target: 1.67x short)" in md
    assert "Errors: ours 2, stock 0" in md and "(bench_concurrency.png)" in md
    result["rest"]["stock"][-1]["rps"] = 10.0
    assert "**3.00x** (meets the 2.5x target)" in report.render_markdown(result)
    result["rest"] = {}
    assert "No side-by-side REST figures" in report.render_markdown(result, None)
    result["meta"]["rest_error"] = "ServingError: port in use\nmore"
    assert "- The TorchServe part failed: ServingError: port in use\n" in report.render_markdown(result, None)


def test_headline_names_both_sides_adds_eager_against_eager_and_compares_b_with_the_server_layout(result):
    """The figures that hold: what runs on each side is named, eager is compared with eager in the same run, and
    (c) is held against (b) measured with the server's process x thread layout, not a single process."""
    result["meta"].update(runtime="int8", sides={"ours": "our handler, runtime int8 (int8 ONNX Runtime)",
                                                 "ours_eager": "our handler, runtime eager (fp32 eager PyTorch)",
                                                 "stock": "stock image_classifier (fp32 eager PyTorch)"})
    result["meta"]["torchserve"].update(workers=2, threads=1)
    result["rest"]["ours_eager"] = [point(16, 25.0, 900.0)]
    result["pipeline_layout"] = {"batch": 8, "workers": 2, "threads": 1, "img_s": 40.0, "p50_ms": 1.0,
                                 "p99_ms": 3.0, "calls": 20, "errors": 0}
    rows = report.compute_ratios(result)
    assert rows[-1] == {"users": 16, "c_over_d_rps": 1.5, "d_over_c_p99": 2.0, "c_over_b": 0.75,
                        "e_over_d_rps": 1.25}
    md = report.render_markdown(result)
    assert ("**our handler, runtime int8 (int8 ONNX Runtime), 2 worker(s) x 1 thread(s)** served 30.0"
            in md and "stock image_classifier (fp32 eager PyTorch), 2 worker(s) x 1 thread(s)** served 20.0" in md)
    assert "Eager against eager in the same run: **our handler, runtime eager (fp32 eager PyTorch)** served 25.0" in md
    assert "**1.25x**" in md and "| 16 | (e) ours, eager | 25.0 |" in md
    assert "with the server's layout (2 processes x 1 thread(s) at batch 8: 40.0 img/s): (c)/(b) = 0.75 (goal >= " \
           "0.9: not met, short by 0.15)" in md
    assert "| (b) pipeline, 2 processes x 1 thread(s) | 8 | 40.0 |" in md
    result["rest"]["profile"] = {"users": 16, "workers": 2, "samples": 2000,
                                 "stages": {"inference": 50.0, "decode": 20.0, "frontend I/O": 30.0, "other": 0.0}}
    assert ("Where our workers' time went at 16 users (py-spy, 2000 samples over 2 workers, idle included): "
            "inference 50 %, frontend I/O 30 %, decode 20 %.") in report.render_markdown(result)


def test_profile_stages_come_from_the_frames_on_each_stack():
    from load_tests.profile import summarize

    raw = "\n".join([
        "<module> (ts/model_service_worker.py:1);handle (handlers/pipeline.py:9);decode_image (handlers/decode.py:5) 7",
        "<module> (ts/model_service_worker.py:1);handle (handlers/pipeline.py:9);forward (handlers/runtimes.py:3) 11",
        "<module> (ts/model_service_worker.py:1);recv_into (socket.py:2) 5",
        "<module> (ts/model_service_worker.py:1);handle (handlers/pipeline.py:9);eval_batch (training/presets.py:4) 2",
        "<module> (other.py:1) 1"])
    assert summarize(raw) == {"decode": 7, "inference": 11, "frontend I/O": 5, "preprocess": 2, "other": 1}


def test_page_rewrite_keeps_hand_written_notes(result, tmp_path):
    page = tmp_path / "benchmarks.md"
    report.write_markdown(report.render_markdown(result), page)
    page.write_text(page.read_text() + "\nWhy stock is slower: a PIL loop.\n")
    result["meta"]["date"] = "2026-02-02 00:00 UTC"
    report.write_markdown(report.render_markdown(result), page)
    text = page.read_text()
    assert "2026-02-02" in text and "2026-01-01" not in text
    assert text.count(report.NOTES_MARKER) == 1 and text.endswith("\nWhy stock is slower: a PIL loop.\n")


def test_json_and_png_are_written(result, tmp_path):
    result["ratios"] = report.compute_ratios(result)
    path = write_json(tmp_path / "bench" / "bench-x.json", result)
    assert json.loads(path.read_text())["ratios"][1]["c_over_d_rps"] == 1.5
    # a full run's rest section also holds the eager point, worker start times and the profile
    result["rest"].update(ours_eager=[point(16, 25.0, 800.0)], ready_s={"ours": 3.0}, profile={"stages": {}})
    png = report.plot_concurrency(result, tmp_path / "docs" / "bench_concurrency.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 200_000


def test_time_calls_counts_items_calls_and_errors():
    calls = []
    r = time_calls(lambda: calls.append(1) or 1, items=4, seconds=0.0, min_calls=5, warmup=2)
    assert len(calls) == 7 and r["calls"] == 5 and r["errors"] == 5 and r["batch"] == 4 and r["img_s"] > 0
    assert r["p50_ms"] is not None and r["p99_ms"] >= r["p50_ms"]


def test_in_process_measurements_run_the_real_pipeline(tmp_path):
    import io

    import numpy as np

    from handlers.image import ImagePipeline

    ckpt = bench_checkpoint(tmp_path / "lenet.pt", arch="lenet5", img_size=28)
    assert ckpt["preprocess"]["resize"] == 32 and ckpt["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    images = []
    for seed in range(3):
        buf = io.BytesIO()
        gray = np.random.default_rng(seed).integers(0, 255, (28, 28), dtype=np.uint8)
        photo = to_photo(gray, (120, 90))
        assert photo.size == (120, 90) and photo.mode == "RGB"
        photo.save(buf, "JPEG", quality=90)
        images.append(buf.getvalue())
    pipe = ImagePipeline(ckpt, "cpu", runtime="eager", topk=5)
    forward = measure_forward(pipe, images, [1, 4], seconds=0.0)
    pipeline = measure_pipeline(pipe, images, [1, 4], seconds=0.0)
    assert [p["batch"] for p in forward] == [1, 4] and all(p["calls"] >= 3 for p in forward)
    assert [p["errors"] for p in pipeline] == [0, 0] and all(p["img_s"] > 0 for p in pipeline)


def test_the_layout_point_runs_the_archived_pipeline_in_several_processes(tmp_path):
    """(b) with the server's layout: two processes of one thread load the unpacked archive and measure together."""
    from load_tests.rest import BatchSettings, build_our_archive, unpack

    ckpt = bench_checkpoint(tmp_path / "lenet.pt", arch="lenet5", img_size=28)
    mar = build_our_archive(tmp_path / "lenet.pt", tmp_path / "store", tmp_path, "m", "int8", BatchSettings())
    model_dir = unpack(tmp_path / "store" / mar, tmp_path / "unpacked")
    assert (model_dir / "model.int8.onnx").is_file() and ckpt["arch"] == "lenet5"
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (60, 40), (120, 30, 200)).save(buf, "JPEG")
    point = measure_layout(model_dir, "lenet.pt", "int8", [buf.getvalue()], workers=2, threads=1, batch=4,
                           seconds=0.2)
    assert (point["workers"], point["threads"], point["batch"], point["errors"]) == (2, 1, 4, 0)
    assert len(point["processes"]) == 2 and point["img_s"] == round(sum(p["img_s"] for p in point["processes"]), 2)
