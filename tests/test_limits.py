"""Decoded-pixel budgets: per request (refused from the headers, before anything is decoded) and per worker batch
(decoded in chunks that never hold more than max_batch_pixels), in-process and in a real TorchServe worker whose
peak RSS is measured while a batch of decompression bombs goes through it.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
import torch
from PIL import Image

from handlers.decode import DecodeLimits, image_pixels
from handlers.errors import BadInput
from handlers.image import ImagePipeline
from handlers.pipeline import Job
from handlers.request import MAX_REQUEST_BYTES
from serving import server
from tests.images import b64, encode, photo, png_header_only, tiny_checkpoint
from tests.torchserve import TorchServe, gray_png

BOMB_SIDE = 6000  # 36 M pixels: under max_image_pixels (40 M), so each bomb is a valid image on its own


def uniform_png(side: int = BOMB_SIDE) -> bytes:
    """A side x side black grayscale PNG: 36 MB of pixels in about 40 KB."""
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _status(answer: tuple[int, dict]) -> tuple[int, str | None]:
    return answer[0], answer[1].get("type")


def _round(obj):
    """Probabilities to 5 decimals: a different batch size may change the last float bits."""
    if isinstance(obj, float):
        return round(obj, 5)
    if isinstance(obj, (list, tuple)):
        return [_round(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    return obj


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint(1, 28)


# -- in-process ------------------------------------------------------------------------------------------------
def test_a_request_over_its_pixel_budget_is_refused_from_the_headers(ckpt):
    """The images claim 3 x 3600 pixels but carry no pixel data: a 413 TooManyPixels (not InvalidImage) proves the
    budget was checked before any decoding; the other requests of the batch are answered."""
    pipe = ImagePipeline(ckpt, max_image_pixels=5000, max_request_pixels=10_000)
    decoded = []
    pipe.decode = lambda datas: decoded.extend(datas) or ImagePipeline.decode(pipe, datas)
    good = encode(photo(40, 40), "PNG")
    answers = pipe.handle_requests([{"data": good}, {"body": {"images": [b64(png_header_only(60, 60))] * 3}},
                                    {"body": {"images": [b64(good)] * 6}}])  # 6 x 1600 = 9600 pixels: within
    assert [_status(a) for a in answers] == [(200, None), (413, "TooManyPixels"), (200, None)]
    assert "10000 pixels" in answers[1][1]["message"]
    assert len(decoded) == 7 and png_header_only(60, 60) not in decoded


def test_chunks_hold_at_most_max_batch_pixels_and_answers_do_not_change(ckpt):
    """40x40 images (1600 pixels) with a 5000-pixel batch budget: at most 3 decoded at a time, whatever
    max_batch allows; every answer equals the one from a pipeline without the budget."""
    pipe = ImagePipeline(ckpt, max_image_pixels=5000, max_batch_pixels=5000)
    sizes = []
    pipe.model.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    reqs = [{"data": encode(photo(40, 40, seed=i), "PNG")} for i in range(4)]
    reqs.append({"body": {"images": [b64(encode(photo(40, 40, seed=9 + i), "PNG")) for i in range(4)]}})
    answers = pipe.handle_requests(reqs)
    assert sizes == [3, 3, 2]
    assert _round(answers) == _round(ImagePipeline(ckpt).handle_requests(reqs))


def test_frames_of_a_stream_are_chunked_by_pixels_and_bounded_by_the_stream_itself(ckpt):
    """Frames a stream decoded itself (a video) are held to max_batch_pixels per chunk; the request budget is for
    encoded images (a video's own limits on frames, duration and frame size bound its request)."""
    taken = []

    class Streamed(ImagePipeline):
        def parse(self, item):
            if item == "stream":
                def frames():
                    for i in range(10):
                        taken.append(i)
                        yield torch.zeros(1, 50, 50, dtype=torch.uint8)  # 2500 pixels each
                return Job(frames(), {"topk": 1, "multi": True, "instances": False})
            return super().parse(item)

    pipe = Streamed(ckpt, max_image_pixels=10_000, max_request_pixels=10_000, max_batch_pixels=10_000)
    sizes = []
    pipe.model.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    answers = pipe.handle_requests(["stream", {"body": {"images": [b64(encode(photo(60, 60), "PNG"))] * 3}}])
    assert [_status(a) for a in answers] == [(200, None), (413, "TooManyPixels")]
    assert len(answers[0][1]["results"]) == len(taken) == 10 and sizes == [4, 4, 2]


def test_limits_are_consistent_with_each_other_and_the_frontend():
    with pytest.raises(ValueError, match="max_image_pixels"):
        DecodeLimits(max_pixels=50_000_000, max_batch_pixels=40_000_000)
    with pytest.raises(ValueError, match="max_image_pixels"):
        ImagePipeline(tiny_checkpoint(1, 28), max_image_pixels=1000, max_request_pixels=999)
    props = server.read_properties(server.TEMPLATE)
    assert int(props["max_request_size"]) == MAX_REQUEST_BYTES
    limits = DecodeLimits()
    assert limits.max_bytes <= MAX_REQUEST_BYTES and limits.max_pixels <= limits.max_request_pixels


def test_header_errors_are_found_before_any_image_of_the_request_is_decoded(ckpt):
    pipe = ImagePipeline(ckpt)
    decoded = []
    pipe.decode = lambda datas: decoded.extend(datas) or ImagePipeline.decode(pipe, datas)
    good = b64(encode(photo(30, 30), "PNG"))
    answer = pipe.handle_requests([{"body": {"images": [good, good, b64(png_header_only(9000, 9000))]}}])[0]
    assert _status(answer) == (413, "ImageTooLarge") and answer[1]["message"].startswith("images[2]: ")
    assert decoded == []
    with pytest.raises(BadInput):
        pipe.unit_pixels(b"not an image")


@pytest.mark.parametrize("fmt, kw, mode", [("JPEG", {}, "RGB"), ("JPEG", {"progressive": True}, "RGB"),
                                           ("JPEG", {}, "L"), ("JPEG", {}, "CMYK"), ("PNG", {}, "RGB"),
                                           ("PNG", {}, "L"), ("PNG", {}, "P"), ("WEBP", {}, "RGB"), ("GIF", {}, "P")])
def test_pixels_counted_from_headers_equal_what_pil_reads(fmt, kw, mode):
    for w, h in ((1, 1), (37, 23), (640, 17)):
        data = encode(photo(w, h, mode=mode), fmt, **kw)
        assert image_pixels(data, DecodeLimits()) == w * h == _pil_pixels(data), (fmt, mode, w, h)


def test_a_jpeg_with_two_frame_headers_counts_the_larger():
    """Whichever frame header a decoder believes, the budget counts at least its pixels."""
    data = encode(photo(40, 30), "JPEG")
    i = data.index(b"\xff\xc0")
    seg = data[i:i + 2 + int.from_bytes(data[i + 2:i + 4], "big")]
    big = seg[:5] + (3000).to_bytes(2, "big") + (4000).to_bytes(2, "big") + seg[9:]
    for crafted in (data[:i] + big + data[i:], data[:i] + seg + big + data[i + len(seg):]):
        assert image_pixels(crafted, DecodeLimits()) == 12_000_000 >= _pil_pixels(crafted)


def _pil_pixels(data: bytes) -> int:
    w, h = Image.open(io.BytesIO(data)).size
    return w * h



# -- a real worker ---------------------------------------------------------------------------------------------
def _vm(pid: int, field: str) -> int:
    """A /proc/<pid>/status memory figure in bytes (VmRSS, VmHWM = peak RSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java (run make setup)")
def test_a_batch_of_decompression_bombs_is_refused_and_the_worker_stays_small(tiny_store, tmp_path):
    """Six requests of 64 uniform 6000x6000 PNGs (each ~3 MB of JSON, 2.3 G pixels decoded) share worker batches
    with good requests: every bomb gets a 413 JSON and every good request its answer. Eight legitimate 36 M-pixel
    images fill one batch before them: each is answered, one chunk at a time. Meanwhile the worker's peak RSS
    grows by less than 400 MiB (one such image takes ~210 MiB to decode and resize; the eight in one chunk
    ~700 MiB; every bomb decoded, 14 GB). An address-space limit on the worker turns a regression into failed
    answers rather than a machine out of memory."""
    bomb = uniform_png()
    assert len(bomb) < 64 * 1024
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    with TorchServe(store, tmp_path) as ts:
        ts.client.register("tiny", "1.0", batch_size=8, max_batch_delay=200)
        worker = psutil.Process(ts.client.describe("tiny", "1.0")[0]["workers"][0]["pid"])
        limit = worker.memory_info().vms + (3 << 30)
        worker.rlimit(psutil.RLIMIT_AS, (limit, limit))
        url = f"{ts.inference_url}/predictions/tiny"
        good = {i: gray_png(seed=i) for i in range(8)}
        alone = {i: ts.infer.post(url, data=png, timeout=60).json()["predictions"] for i, png in good.items()}
        Path(f"/proc/{worker.pid}/clear_refs").write_text("5")  # VmHWM := current RSS
        before = _vm(worker.pid, "VmRSS")

        bombs = json.dumps({"images": [b64(bomb)] * 64}).encode()
        mixed = [("bomb", bombs)] * 6 + [(i, png) for i, png in good.items()]
        random.Random(0).shuffle(mixed)
        jobs = [("big", bomb)] * 8 + mixed  # sent first: the eight big images fill one worker batch

        def post(job):
            kind, body = job
            with requests.Session() as s:
                s.headers.update(ts.infer.headers)
                return kind, s.post(url, data=body, timeout=180)

        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(post, jobs))
        peak = _vm(worker.pid, "VmHWM") - before
        for kind, r in answers:
            body = r.json()
            if kind == "bomb":
                assert (r.status_code, body["code"], body["type"]) == (413, 413, "TooManyPixels"), r.text[:300]
            else:
                assert r.status_code == 200, (kind, r.text[:300])
                if kind != "big":
                    got = [(p["index"], round(p["probability"], 4)) for p in body["predictions"]]
                    assert got == [(p["index"], round(p["probability"], 4)) for p in alone[kind]]
        assert peak < 400 << 20, f"the worker's RSS peaked {peak / 2**20:.0f} MiB above its resting size"
        assert worker.is_running() and ts.client.describe("tiny", "1.0")[0]["workers"][0]["pid"] == worker.pid
