"""The locustfile against a real TorchServe (the session's `torchserve` fixture: tiny LeNet-5 "tiny" 1.0), plus
its locust-free parts: load shapes, image discovery, token file, success check."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from load_tests.payload import check_body, find_images, load_images, multipart, read_token
from load_tests.report import read_locust_stats
from load_tests.shapes import ramp, shape_name, spike, steady
from tests.torchserve import ROOT, gray_png

LOCUSTFILE = ROOT / "load_tests" / "locustfile.py"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java (run make setup)")


# -- locust-free parts ------------------------------------------------------------------------------------------
def test_shapes_follow_users_and_run_time():
    assert steady(0, 8, 8, 10) == (8, 8) and steady(9.9, 8, 8, 10) == (8, 8) and steady(10, 8, 8, 10) is None
    assert steady(1e6, 8, 8, None) == (8, 8)  # no run time: until stopped
    users = [ramp(t, 16, 1, 100)[0] for t in range(0, 100, 5)]
    assert users[0] == 1 and users == sorted(users) and users[-1] == 16 and ramp(100, 16, 1, 100) is None
    assert spike(10, 16, 1, 100)[0] == 4 and spike(50, 16, 1, 100)[0] == 16 and spike(70, 16, 1, 100)[0] == 4
    assert spike(50, 16, 1, 100)[1] >= 16  # the burst arrives at once
    assert spike(10, 2, 1, 100)[0] == 1


def test_shape_name_from_option_or_environment(monkeypatch):
    monkeypatch.delenv("LOAD_SHAPE", raising=False)
    assert shape_name(None) == "steady"
    monkeypatch.setenv("LOAD_SHAPE", "Spike")
    assert shape_name("") == "spike" and shape_name("ramp") == "ramp"
    with pytest.raises(ValueError, match="unknown load shape 'square'.*steady, ramp, spike"):
        shape_name("square")


def test_images_are_found_by_folder_or_glob_with_content_types(tmp_path):
    for name in ("b.png", "a.JPG", "c.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in find_images(str(tmp_path))] == ["a.JPG", "b.png", "c.webp"]
    assert [p.name for p in find_images(str(tmp_path / "*.png"))] == ["b.png"]
    assert [(n, t) for n, _, t in load_images(str(tmp_path))] == [
        ("a.JPG", "image/jpeg"), ("b.png", "image/png"), ("c.webp", "image/webp")]
    assert find_images(str(tmp_path / "missing" / "*.jpg")) == []


def test_multipart_body_carries_the_image_and_topk():
    body, ctype = multipart("a.png", b"\x89PNG-bytes", "image/png", {"topk": "2"})
    boundary = ctype.split("boundary=")[1]
    assert ctype.startswith("multipart/form-data; ") and body.endswith(f"--{boundary}--\r\n".encode())
    assert b'name="topk"\r\n\r\n2\r\n' in body
    assert b'name="data"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n\x89PNG-bytes\r\n' in body


def test_token_file_gives_the_inference_key(tmp_path):
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps({"management": {"key": "m"}, "inference": {"key": "inf-key"}, "API": {"key": "a"}}))
    assert read_token(path) == "inf-key"
    with pytest.raises(SystemExit, match="cannot read the inference key"):
        read_token(tmp_path / "nope.json")


def test_only_200_with_predictions_is_a_success():
    good = json.dumps({"model": "m", "predictions": [{"label": "a", "index": 0, "probability": 0.9}]})
    assert check_body(200, good) is None
    assert check_body(200, json.dumps({"results": [{"predictions": []}]})) is None
    assert "HTTP 400" in check_body(400, '{"code": 400}')
    assert "HTTP 503" in check_body(503, good)
    assert "not JSON" in check_body(200, "<html>")
    assert "no predictions" in check_body(200, json.dumps({"predictions": []}))
    assert check_body(200, good, topk=1) is None
    assert "1 predictions instead of topk=2" in check_body(200, good, topk=2)
    assert check_body(200, json.dumps({"Coat": 0.7, "Bag": 0.1}), expect="labels") is None
    assert check_body(200, good, expect="labels") is not None


# -- locust against a real server -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("load-images")
    for i in range(4):
        (d / f"{i}.png").write_bytes(gray_png(seed=i))
    return d


def run_locust(ts, images: Path, out: Path, *args: str, env: dict | None = None,
               token_file: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "--host", ts.inference_url, "--model", "tiny", "--images", str(images),
           "--token-file", str(token_file or ts.runtime_dir / "key_file.json"),
           "--csv", str(out), "--html", f"{out}.html", *args]
    run_env = {k: v for k, v in os.environ.items() if k != "LOAD_SHAPE"} | (env or {})
    return subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=120)


@needs_java
def test_headless_run_has_requests_and_no_failures(torchserve, image_dir, tmp_path):
    """--topk 2 also checks that each answer has exactly 2 predictions, so the option reaches the handler."""
    out = tmp_path / "steady"
    proc = run_locust(torchserve, image_dir, out, "-u", "4", "-r", "4", "-t", "5s", "--topk", "2",
                      "--shape", "steady")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = read_locust_stats(f"{out}_stats.csv")
    assert stats["requests"] > 0 and stats["failures"] == 0, proc.stderr[-2000:]
    assert stats["rps"] > 0 and stats["p99_ms"] is not None
    assert Path(f"{out}.html").stat().st_size > 0
    rows = list(csv.DictReader(open(f"{out}_stats.csv")))
    assert [r["Name"] for r in rows] == ["/predictions/tiny", "Aggregated"]


@needs_java
def test_wrong_token_makes_every_request_a_failure(torchserve, image_dir, tmp_path):
    bad = tmp_path / "key_file.json"
    bad.write_text(json.dumps({"inference": {"key": "not-the-key"}, "management": {"key": "x"}, "API": {"key": "y"}}))
    out = tmp_path / "badtoken"
    proc = run_locust(torchserve, image_dir, out, "-u", "2", "-r", "2", "-t", "3s", token_file=bad)
    assert proc.returncode != 0  # locust exits 1 when any request failed
    stats = read_locust_stats(f"{out}_stats.csv")
    assert stats["requests"] > 0 and stats["failures"] == stats["requests"]
    failures = list(csv.DictReader(open(f"{out}_failures.csv")))
    assert failures and all("HTTP 40" in f["Error"] for f in failures), failures


@needs_java
def test_load_shape_is_chosen_by_environment(torchserve, image_dir, tmp_path):
    out = tmp_path / "ramp"
    proc = run_locust(torchserve, image_dir, out, "-u", "6", "-r", "6", "-t", "5s", env={"LOAD_SHAPE": "ramp"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = [r for r in csv.DictReader(open(f"{out}_stats_history.csv")) if r["Name"] == "Aggregated"]
    users = [int(r["User Count"]) for r in history]
    assert users == sorted(users) and users[0] < 6 and max(users) == 6, users
    assert read_locust_stats(f"{out}_stats.csv")["failures"] == 0


@needs_java
def test_paced_users_send_at_the_camera_rate(torchserve, image_dir, tmp_path):
    """--pace 10: each user sends 10 requests/s however fast the server answers (a closed loop on this tiny model
    would send hundreds), so 2 users offer about 20 requests/s."""
    out = tmp_path / "paced"
    proc = run_locust(torchserve, image_dir, out, "-u", "2", "-r", "2", "-t", "3s", "--pace", "10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = read_locust_stats(f"{out}_stats.csv")
    assert stats["failures"] == 0 and 30 <= stats["requests"] <= 2 * 10 * 3 + 4, stats
