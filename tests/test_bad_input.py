"""Bad and odd input over REST against a real TorchServe (one server for the module, batchSize 8 and
maxBatchDelay 50 ms so concurrent requests share worker batches).

Every kind in CASES is sent alone and must get its documented answer: a 4xx with a JSON error body, or a 200
for odd-but-valid images. Then the handler-answered kinds are sent concurrently, mixed with good requests: every
good one must get the same predictions as alone, every bad one its own 4xx, and the workers must not restart.
docs/reliability.md carries the table rendered from CASES (`python -m tests.test_bad_input` rewrites it).
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import requests
from PIL import Image
from urllib3 import encode_multipart_formdata

from tests.images import (
    animated_gif,
    b64,
    encode,
    gray16,
    palette_with_transparency,
    photo,
    png_header_only,
    tiny_checkpoint,
    with_orientation,
)
from tests.torchserve import ROOT, TorchServe, gray_png, tiny_archive

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java (run make setup)")
DOC = ROOT / "docs" / "reliability.md"
GOOD = gray_png(seed=3)
FRONTEND = "(frontend)"  # answered by TorchServe's Java frontend, never reaches a worker
FORM = "application/x-www-form-urlencoded"  # curl's default Content-Type for -d and --data-binary


@dataclass(frozen=True)
class Case:
    kind: str
    what: str
    body: bytes
    status: int
    type: str | None = None  # the JSON error "type"; None for 200
    ctype: str = "application/octet-stream"
    path: str = "tiny"  # model[/version] in /predictions/<path>


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _form(fields: dict) -> tuple[bytes, str]:
    return encode_multipart_formdata(fields)


def _patch_jpeg_size(data: bytes, w: int, h: int) -> bytes:
    """Rewrite the SOF0 frame header so the JPEG claims w x h pixels (its scan data stays 64x48)."""
    i = data.index(b"\xff\xc0")
    return data[:i + 5] + struct.pack(">HH", h, w) + data[i + 9:]


def _corrupt_png(data: bytes) -> bytes:
    """A valid PNG header and IHDR, then zeroed IDAT bytes: zlib reports a broken stream."""
    i = data.index(b"IDAT") + 10
    return data[:i] + b"\0" * 50 + data[i + 50:]


def _cases() -> list[Case]:
    rng = random.Random(0)
    jpeg, png = encode(photo(64, 48), "JPEG", quality=90), encode(photo(64, 48), "PNG")
    scan = bytearray(jpeg)
    sos = jpeg.index(b"\xff\xda") + 20
    scan[sos:sos + 200] = bytes(rng.randrange(256) for _ in range(200))
    multi_empty, multi_empty_ct = _form({"data": ("x.png", b"", "image/png")})
    multi_two, multi_two_ct = _form({"a": ("a.png", GOOD, "image/png"), "b": ("b.png", GOOD, "image/png")})
    multi_topk, multi_topk_ct = _form({"data": ("x.png", GOOD, "image/png"), "topk": "2"})
    img16 = encode(Image.fromarray(gray16()), "PNG")
    rotated = photo(40, 30, seed=4)
    bad = [
        Case("oversized_body", "17 MiB body (max_request_size is 16 MiB)", b"\0" * (17 << 20), 413, FRONTEND),
        Case("unknown_model", "PNG to /predictions/no-such-model", GOOD, 404, "ModelNotFoundException",
             path="no-such-model"),
        Case("unknown_version", "PNG to /predictions/tiny/9.9", GOOD, 404, "ModelVersionNotFoundException",
             path="tiny/9.9"),
        Case("empty_body", "no body", b"", 400, "EmptyBody"),
        Case("multipart_zero_byte", "multipart form, zero-byte file field", multi_empty, 400, "EmptyBody",
             multi_empty_ct),
        Case("multipart_two_fields", "multipart form, two unnamed image fields", multi_two, 400, "MissingImage",
             multi_two_ct),
        Case("plain_text", "text/plain prose", b"hello, this is not an image", 400, "InvalidBase64", "text/plain"),
        Case("random_bytes", "4 KiB of random bytes", bytes(rng.randrange(256) for _ in range(4096)), 400,
             "InvalidImage"),
        Case("truncated_jpeg", "first half of a JPEG", jpeg[:len(jpeg) // 2], 400, "InvalidImage", "image/jpeg"),
        Case("jpeg_no_end_marker", "JPEG without its last 2 bytes (EOI)", jpeg[:-2], 400, "InvalidImage"),
        Case("truncated_png", "first half of a PNG", png[:len(png) // 2], 400, "InvalidImage", "image/png"),
        Case("png_corrupt_data", "valid PNG header, zeroed IDAT data", _corrupt_png(png), 400, "InvalidImage"),
        Case("bomb_png", "PNG header declaring 50000x50000", png_header_only(50000, 50000), 413, "ImageTooLarge"),
        Case("bomb_jpeg", "JPEG header declaring 50000x50000", _patch_jpeg_size(jpeg, 50000, 50000), 413,
             "ImageTooLarge"),
        Case("over_pixel_limit", "PNG header declaring 7000x7000 (> max_image_pixels 40M)",
             png_header_only(7000, 7000), 413, "ImageTooLarge"),
        Case("svg", "SVG (XML) image", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" '
             b'width="8" height="8"><rect width="8" height="8"/></svg>', 400, "InvalidImage", "image/svg+xml"),
        Case("pdf", "PDF header", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", 400, "InvalidImage",
             "application/pdf"),
        Case("eps", "EPS (PIL would run Ghostscript)", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", 400,
             "InvalidImage"),
        Case("ico", "ICO (a format we do not open)", encode(photo(16, 16), "ICO"), 400, "InvalidImage"),
        Case("json_bad_base64", '{"image": "!!!not base64***"}', _json({"image": "!!!not base64***"}), 400,
             "InvalidBase64", "application/json"),
        Case("json_without_image", '{"topk": 3}', _json({"topk": 3}), 400, "MissingImage", "application/json"),
        Case("json_list_one_broken", '["(good base64)", "%%%"]', _json([b64(GOOD), "%%%"]), 400, "InvalidBase64",
             "application/json"),
        Case("json_images_empty", '{"images": []}', _json({"images": []}), 400, "MissingImage", "application/json"),
        Case("json_image_number", '{"image": 123}', _json({"image": 123}), 400, "InvalidBase64", "application/json"),
        Case("json_base64_not_image", '{"image": base64("hello world")}', _json({"image": b64(b"hello world")}),
             400, "InvalidImage", "application/json"),
        Case("json_truncated", '{"image": "abc', b'{"image": "abc', 400, "InvalidJSON", "application/json"),
        Case("json_non_utf8", "JSON with bytes 0xff 0xfe inside", b'{"image": "\xff\xfe"}', 400, "InvalidJSON",
             "application/json"),
        Case("json_deeply_nested", "100000 nested JSON lists", b"[" * 100_000 + b"]" * 100_000, 400,
             "InvalidJSON", "application/json"),
        Case("garbage_as_json", "plain text sent as application/json", b"not json at all", 400, "InvalidImage",
             "application/json"),
        Case("data_url_not_base64", "data:image/png,abc (no ;base64)", b"data:image/png,abc", 400,
             "InvalidBase64", "text/plain"),
        Case("form_base64", "base64 text sent form-encoded (curl -d without -H)", b64(GOOD).encode(), 415,
             "FormEncodedBody", FORM),
        Case("form_json", '{"image": ...} sent form-encoded (curl -d without -H)', _json({"image": b64(GOOD)}), 415,
             "FormEncodedBody", FORM),
        Case("form_binary", "PNG bytes sent form-encoded (curl --data-binary without -H): TorchServe's form decoder "
             "fails before any handler", GOOD, 500, "ErrorDataDecoderException", FORM),
        Case("topk_huge", "topk 1000000", _json({"image": b64(GOOD), "topk": 1_000_000}), 400, "InvalidTopK",
             "application/json"),
        Case("topk_negative", "topk -1", _json({"image": b64(GOOD), "topk": -1}), 400, "InvalidTopK",
             "application/json"),
        Case("topk_not_integer", "topk 2.5", _json({"image": b64(GOOD), "topk": 2.5}), 400, "InvalidTopK",
             "application/json"),
        Case("too_many_images", "65 images in one JSON request (limit 64)", _json({"images": [b64(GOOD)] * 65}),
             413, "TooManyImages", "application/json"),
        Case("pixel_bomb_request", "64 uniform 1100x1100 PNGs in one 107 KB JSON request (77 M pixels)",
             _json({"images": [b64(encode(Image.new("L", (1100, 1100)), "PNG"))] * 64}), 413, "TooManyPixels",
             "application/json"),
    ]
    odd = [
        Case("image_1x1", "1x1 PNG (scaled up)", encode(photo(1, 1), "PNG"), 200, ctype="image/png"),
        Case("image_10000x10", "10000x10 PNG", encode(photo(10000, 10), "PNG"), 200),
        Case("png_16bit", "16-bit grayscale PNG (scaled /257)", img16, 200),
        Case("cmyk_jpeg", "CMYK JPEG", encode(photo(40, 30, mode="CMYK"), "JPEG"), 200),
        Case("palette_transparency", "palette PNG with a transparent index", encode(palette_with_transparency(),
             "PNG"), 200),
        Case("animated_gif", "2-frame animated GIF (first frame used)", animated_gif(), 200),
        Case("bmp", "BMP", encode(photo(40, 30), "BMP"), 200),
        Case("webp", "WebP", encode(photo(40, 30), "WEBP"), 200),
        Case("tiff", "TIFF", encode(photo(40, 30), "TIFF"), 200),
        Case("exif_rotated_jpeg", "JPEG with EXIF orientation 6", with_orientation(rotated, 6, "JPEG"), 200),
        Case("exif_rotated_png", "PNG with EXIF orientation 8 (= upright answer)", with_orientation(rotated, 8),
             200),
        Case("jpeg_corrupt_scan", "JPEG with 200 random bytes in its scan data (no checksum: decodes)",
             bytes(scan), 200),
        Case("png_as_json", "PNG bytes sent as application/json", GOOD, 200, ctype="application/json"),
        Case("png_as_text", "PNG bytes sent as text/plain", GOOD, 200, ctype="text/plain"),
        Case("jpeg_as_png", "JPEG bytes sent as image/png", jpeg, 200, ctype="image/png"),
        Case("json_as_image", '{"image": ...} sent as image/png', _json({"image": b64(GOOD)}), 200,
             ctype="image/png"),
        Case("base64_body", "base64 text as the whole body", b64(GOOD).encode(), 200),
        Case("multipart_topk", "multipart form: data + topk=2", multi_topk, 200, ctype=multi_topk_ct),
    ]
    return bad + odd


CASES = _cases()
BY_KIND = {c.kind: c for c in CASES}
UPRIGHT = encode(photo(40, 30, seed=4), "PNG")


def render_table(cases: list[Case] = CASES) -> str:
    rows = ["| kind | sent | status | error type |", "| --- | --- | --- | --- |"]
    for c in cases:
        kind = c.type if c.type != FRONTEND else "(frontend, empty body)"
        rows.append(f"| `{c.kind}` | {c.what.replace('|', '/')} | {c.status} | {kind or '— (predictions)'} |")
    return "\n".join(rows)


# -- the server -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ts(tiny_store, tmp_path_factory):
    """tiny 1.0 (gray, 28x28) from the session store plus tiny-rgb 1.0 (3 channels, 32x32), batch 8 / 50 ms."""
    from training.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("bad-input")
    store = tmp / "store"
    shutil.copytree(tiny_store, store)
    rgb = save_checkpoint(tiny_checkpoint(channels=3, size=32, seed=1), tmp / "rgb.pt")
    tiny_archive(store, tmp / "configs", "tiny-rgb", "1.0", rgb, batchSize=8, maxBatchDelay=50)
    with TorchServe(store, tmp) as server:
        server.client.register("tiny", "1.0", batch_size=8, max_batch_delay=50)
        server.client.register("tiny-rgb", "1.0")
        server.pids = _pids(server)
        yield server


def _pids(ts: TorchServe) -> dict[str, list[int]]:
    return {m: sorted(w["pid"] for w in ts.client.describe(m, "1.0")[0]["workers"]) for m in ("tiny", "tiny-rgb")}


_local = threading.local()


def _post(ts: TorchServe, case: Case, path: str | None = None) -> requests.Response:
    if not hasattr(_local, "s"):  # one session per thread: requests.Session is not thread-safe
        _local.s = requests.Session()
        _local.s.headers["Authorization"] = ts.infer.headers["Authorization"]
    return _local.s.post(f"{ts.inference_url}/predictions/{path or case.path}", data=case.body,
                         headers={"Content-Type": case.ctype}, timeout=120)


def _check(case: Case, r: requests.Response) -> dict | None:
    assert r.status_code == case.status, (case.kind, r.status_code, r.text[:300])
    if case.type == FRONTEND:
        assert r.content == b""
        return None
    body = r.json()
    if case.status == 200:
        assert body["predictions"] and {"label", "index", "probability"} <= set(body["predictions"][0])
    else:
        assert (body["code"], body["type"]) == (case.status, case.type), body
        assert body["message"] and "predictions" not in body
    return body


# -- one at a time ----------------------------------------------------------------------------------------------
def test_at_least_25_bad_kinds_and_a_table_in_the_docs():
    assert sum(c.status >= 400 for c in CASES) >= 25
    text = DOC.read_text() if DOC.is_file() else ""
    assert render_table() in text, "docs/reliability.md is stale: run `python -m tests.test_bad_input`"


@pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])
def test_each_kind_gets_its_documented_answer(ts, case):
    body = _check(case, _post(ts, case))
    if case.kind == "json_list_one_broken":
        assert body["message"].startswith("[1]:")  # the message names the broken item
    if case.kind == "multipart_topk":
        assert len(body["predictions"]) == 2


def test_exif_orientation_is_applied(ts):
    upright = _check(Case("upright", "", UPRIGHT, 200), _post(ts, Case("upright", "", UPRIGHT, 200)))
    rotated = _check(BY_KIND["exif_rotated_png"], _post(ts, BY_KIND["exif_rotated_png"]))
    assert rotated["predictions"] == upright["predictions"]


@pytest.mark.parametrize("kind", [c.kind for c in CASES if c.status == 200 and c.ctype != "application/json"])
def test_odd_images_also_decode_for_a_three_channel_model(ts, kind):
    body = _check(BY_KIND[kind], _post(ts, BY_KIND[kind], "tiny-rgb"))
    assert body["model"] == "tiny-rgb"


# -- mixed with good requests in shared batches -----------------------------------------------------------------
def test_bad_items_in_shared_batches_do_not_affect_good_ones(ts):
    good = [Case(f"good{i}", "", gray_png(seed=i), 200) for i in range(8)]
    alone = {c.kind: _post(ts, c).json()["predictions"] for c in good}
    handler_cases = [c for c in CASES if c.type != FRONTEND and c.path == "tiny" and c.status != 200]
    jobs = (good * 6 + handler_cases * 2)
    random.Random(1).shuffle(jobs)
    with ThreadPoolExecutor(16) as pool:  # 16 in flight > batchSize 8: batches fill with a mix
        answers = list(pool.map(lambda c: (c, _post(ts, c)), jobs))
    for case, r in answers:
        body = _check(case, r)
        if case.kind in alone:
            got = {p["index"]: p["probability"] for p in body["predictions"]}
            want = {p["index"]: p["probability"] for p in alone[case.kind]}
            assert got.keys() == want.keys()
            assert np.allclose([got[k] for k in want], list(want.values()), atol=1e-4), case.kind


def test_server_still_serves_with_the_same_workers(ts):
    r = ts.infer.post(f"{ts.inference_url}/predictions/tiny", data=GOOD, timeout=60)
    assert r.status_code == 200 and r.json()["predictions"]
    assert _pids(ts) == ts.pids  # no worker crashed and was restarted


if __name__ == "__main__":  # rewrite the table in docs/reliability.md from CASES
    from training.docblock import write_doc_block

    write_doc_block(DOC, "bad-input", render_table())
    print(f"updated {DOC}")
