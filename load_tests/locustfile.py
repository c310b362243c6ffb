"""Locust load test for the inference API: POST real image files to /predictions/<model>[/<version>].

    locust -f load_tests/locustfile.py --headless -u 16 -r 16 -t 30s --host http://127.0.0.1:8080 \
        --model fmnist-lenet5 --images 'reports/samples/*.png' --token-file .runtime/key_file.json \
        --csv reports/load/fmnist-lenet5 --html reports/load/fmnist-lenet5.html [--shape ramp]

Each request is one image file's raw bytes with the Content-Type of its extension (with --topk: a multipart
form with the image and a topk field). A request counts as a success only when the answer is HTTP 200 with a
JSON body that has predictions (exactly K of them with --topk); --expect labels accepts the stock TorchServe
handler's {"label": probability} body instead, --expect detections a segmentation model's frame answer. Users do
not wait between requests (--think-time 0), so a run is a closed loop: N users keep at most N requests in flight.
With --pace F each user is a camera instead: one request every 1/F s (a late answer delays the next frame; frames
never bunch up), so N users offer N x F requests/s whatever the server does.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from locust import FastHttpUser, LoadTestShape, constant_pacing, events, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `load_tests` imports under the locust CLI
from load_tests.payload import EXPECT, check_body, load_images, multipart, read_token  # noqa: E402
from load_tests.shapes import SHAPES, Step, shape_name  # noqa: E402

IMAGES: list[tuple[str, bytes, str]] = []  # (file name, body, content type), built once per process
AUTH: dict[str, str] = {}  # the Authorization header, read once from --token-file


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    g = parser.add_argument_group("inference load test")
    g.add_argument("--model", default="fmnist-lenet5", help="model name in the URL")
    g.add_argument("--model-version", default="", help="a version (default: the model's default version)")
    g.add_argument("--images", default="reports/samples", help="a folder of images or a glob ('dir/*.jpg')")
    g.add_argument("--token-file", default="", help="TorchServe key_file.json; its inference key is sent as "
                   "'Authorization: Bearer <key>' (empty: no token)")
    g.add_argument("--topk", type=int, default=0, help="ask for top-k: the image then goes as multipart form "
                   "field 'data' next to a field 'topk' (0: raw image bytes, the model's default top-k)")
    g.add_argument("--shape", default="", choices=["", *SHAPES],
                   help="load profile (default: $LOAD_SHAPE, else steady); uses -u, -r and -t")
    g.add_argument("--expect", default="predictions", choices=list(EXPECT),
                   help="what a good body holds: our classifier's predictions, the stock handler's labels, or a "
                   "segmentation model's detections")
    g.add_argument("--think-time", type=float, default=0.0, help="seconds each user waits between requests")
    g.add_argument("--pace", type=float, default=0.0, help="requests per second per user, e.g. 30 for a 30 FPS "
                   "camera (constant pacing; overrides --think-time; 0: off)")
    g.add_argument("--cpu-report", default="", help="write this process's CPU use over the measured window "
                   "(from spawning complete to the end) as JSON to this path")


@events.init.add_listener
def on_init(environment: Any, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None:  # locust used as a library without our options
        return
    shape_name(opts.shape)  # an unknown $LOAD_SHAPE fails here, before any request
    IMAGES[:] = load_images(opts.images)
    if not IMAGES:
        raise SystemExit(f"no images found for --images {opts.images!r}; run `make samples` or "
                         "`python -m load_tests.images`")
    if opts.topk:
        IMAGES[:] = [(n, *multipart(n, data, ctype, {"topk": str(opts.topk)})) for n, data, ctype in IMAGES]
    AUTH.clear()
    if opts.token_file:
        AUTH["Authorization"] = f"Bearer {read_token(opts.token_file)}"


class ProfileShape(LoadTestShape):
    """Drives the run with the profile named by --shape / $LOAD_SHAPE and the common -u / -r / -t options."""

    use_common_options = True  # -u, -r and -t parametrise the profile instead of being ignored

    def tick(self) -> Step:
        opts = self.runner.environment.parsed_options
        users = int(getattr(opts, "num_users", None) or 1)
        rate = float(getattr(opts, "spawn_rate", None) or users)
        duration = getattr(opts, "run_time", None) or None
        return SHAPES[shape_name(getattr(opts, "shape", None))](self.get_run_time(), users, rate, duration)


_cpu_start: list[tuple[float, float]] = []  # (wall time, CPU seconds) when all users were spawned


def _cpu_now() -> tuple[float, float]:
    t = os.times()
    return time.time(), t.user + t.system


@events.spawning_complete.add_listener
def on_spawned(**_: Any) -> None:
    if not _cpu_start:  # the measured window starts here (--reset-stats resets the stats here too)
        _cpu_start.append(_cpu_now())


@events.test_stop.add_listener
def on_stop(environment: Any, **_: Any) -> None:
    path = getattr(environment.parsed_options, "cpu_report", "")
    if not path or not _cpu_start:
        return
    (t0, c0), (t1, c1) = _cpu_start[0], _cpu_now()
    Path(path).write_text(json.dumps({"t_start": t0, "t_end": t1, "wall_s": t1 - t0, "cpu_s": c1 - c0}))


class InferenceUser(FastHttpUser):
    """One client posting the image files round-robin (each user starts at a different file)."""

    def wait_time(self) -> float:
        if self.pacer is not None:
            return self.pacer(self)
        return self.environment.parsed_options.think_time

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.pacer = constant_pacing(1.0 / opts.pace) if opts.pace > 0 else None
        self.path = f"/predictions/{opts.model}" + (f"/{opts.model_version}" if opts.model_version else "")
        self.expect, self.topk = opts.expect, opts.topk
        start = id(self) % max(1, len(IMAGES))
        self.images = itertools.islice(itertools.cycle(IMAGES), start, None)

    @task
    def predict(self) -> None:
        _, data, ctype = next(self.images)
        with self.client.post(self.path, data=data, headers={"Content-Type": ctype, **AUTH},
                              name=self.path, catch_response=True) as resp:
            why = check_body(resp.status_code or 0, resp.text or "", self.expect, self.topk)
            if why:
                resp.failure(why)
            else:
                resp.success()
