"""The image pipeline without TorchServe: decoding, request parsing, batching, errors, parity with evaluation."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from handlers.decode import BadInput, DecodeLimits, decode_image, decode_jpegs, orient, to_tensor
from handlers.image import ImagePipeline, pipeline_options
from tests.images import (
    animated_gif,
    b64,
    cutout,
    data_url,
    encode,
    gray16,
    palette_with_transparency,
    photo,
    png_header_only,
    rgba,
    tiny_checkpoint,
    with_orientation,
)
from training.checkpoint import build_model, load_checkpoint, save_checkpoint
from training.evaluate import predict_probs
from training.presets import eval_batch, make_preprocess


@pytest.fixture(scope="module")
def rgb_ckpt(tmp_path_factory):
    """3 channels, 32 px crop after resizing the shorter side to 36: saved and reloaded like in serving."""
    path = save_checkpoint(tiny_checkpoint(3, 32, 36), tmp_path_factory.mktemp("ckpt") / "rgb.pt")
    return load_checkpoint(path)


@pytest.fixture(scope="module")
def rgb(rgb_ckpt):
    return ImagePipeline(rgb_ckpt)


@pytest.fixture(scope="module")
def gray_ckpt():
    return tiny_checkpoint(1, 28)


@pytest.fixture(scope="module")
def gray(gray_ckpt):
    return ImagePipeline(gray_ckpt)


def ok(answer):
    status, body = answer
    assert status == 200, body
    return body


def err(answer, status, type_):
    assert answer[0] == status and answer[1]["code"] == status and answer[1]["type"] == type_, answer
    assert answer[1]["message"]
    return answer[1]["message"]


def rgb_of(img):
    return to_tensor(img.convert("RGB"))


def close(a, b, tol=1e-6):
    """Same labels in the same order and probabilities equal up to float noise (batch size may change the
    last bits of a convolution)."""
    return [(p["label"], p["index"]) for p in a] == [(p["label"], p["index"]) for p in b] and all(
        abs(p["probability"] - q["probability"]) <= tol for p, q in zip(a, b))


# --- decoding ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True})])
def test_lossless_formats_decode_exactly(fmt, kw):
    img = photo(37, 23)
    assert torch.equal(decode_image(encode(img, fmt, **kw), 3), rgb_of(img))


def test_jpeg_and_first_gif_frame():
    img = photo(40, 30, noise=2)
    assert (decode_image(encode(img, "JPEG", quality=95), 3).float() - rgb_of(img).float()).abs().mean() < 4
    frame = decode_image(animated_gif(), 3)  # the second frame is pure red
    assert frame.shape == (3, 24, 32) and frame[1].float().mean() > 40


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    img = photo(40, 24)
    assert torch.equal(decode_image(with_orientation(img, orientation), 3), rgb_of(img))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_tensor_orient_matches_pil(orientation):
    # what decode_jpegs does on the GPU: the stored pixels, then the EXIF transform on the tensor
    img = photo(40, 24)
    data = with_orientation(img, orientation)
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert torch.equal(orient(rgb_of(Image.open(io.BytesIO(data))), orientation), rgb_of(shown))


def test_mode_conversions():
    img = photo(40, 30, noise=2)
    g = decode_image(encode(img.convert("L"), "PNG"), 3)
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    assert torch.equal(decode_image(encode(img, "PNG"), 1), to_tensor(img.convert("L")))
    a = decode_image(encode(rgba(), "PNG"), 3)  # transparent right half -> white, opaque left half kept
    assert (a[:, :, 20:] == 255).all() and torch.equal(a[:, :, :20], rgb_of(rgba())[:, :, :20])
    p = decode_image(encode(palette_with_transparency(), "PNG"), 3)
    assert (p[:, :15] == 255).all() and (p[:, 15:] < 255).any()
    cmyk = decode_image(encode(img.convert("CMYK"), "JPEG", quality=95), 3)
    assert (cmyk.float() - rgb_of(img).float()).abs().mean() < 6


def test_high_bit_depth_is_scaled_not_clipped():
    a16 = gray16()
    expected = torch.from_numpy(np.rint(a16 / 257.0).astype(np.uint8))
    for data in (encode(Image.fromarray(a16), "PNG"), encode(Image.fromarray(a16.astype(np.int32)), "TIFF")):
        assert (decode_image(data, 1)[0].int() - expected.int()).abs().max() <= 1
    f = decode_image(encode(Image.fromarray((a16 / 65535.0).astype(np.float32)), "TIFF"), 1)[0]
    assert (f.int() - expected.int()).abs().max() <= 1


def test_jpeg_draft_keeps_the_resize_side():
    data = encode(photo(800, 600), "JPEG")
    assert decode_image(data, 3).shape == (3, 600, 800)
    small = decode_image(data, 3, min_side=36)
    assert 36 <= min(small.shape[1:]) <= 600 // 8 + 1
    assert decode_image(data, 3, min_side=300).shape == (3, 300, 400)
    assert decode_image(data, 3, DecodeLimits(jpeg_draft=False), min_side=36).shape == (3, 600, 800)


def test_torchvision_batch_decoder_with_fallbacks():
    img = photo(40, 30, noise=2)
    items = [encode(img, "JPEG", quality=95), encode(img, "JPEG", progressive=True),
             encode(img.convert("CMYK"), "JPEG"), encode(img, "PNG"), with_orientation(img, 6, "JPEG"),
             encode(img, "JPEG")[:300]]
    good = items[0]
    items.append(good[:200] + b"\xff\xd9" + good[202:])  # ends well, breaks mid-scan: fails the batched call
    out = decode_jpegs(items, 3, "cpu")
    for x in out[:5]:
        assert isinstance(x, torch.Tensor) and x.shape == (3, 30, 40), x
        assert (x.float() - rgb_of(img).float()).abs().mean() < 8
    assert all(isinstance(x, BadInput) and x.status == 400 for x in out[5:])


# --- requests ------------------------------------------------------------------------------------------------

def test_every_input_format(rgb):
    img = photo(50, 40)
    png = encode(img, "PNG")
    raw = [encode(img, f, **kw) for f, kw in [("JPEG", {}), ("PNG", {}), ("WEBP", {}), ("BMP", {}), ("TIFF", {})]]
    raw.append(animated_gif())
    single = [{"data": d} for d in raw] + [
        {"body": {"image": b64(png)}}, {"data": json.dumps({"image": b64(png)}).encode()},
        {"data": data_url(png)}, {"data": data_url(png).encode()}, {"body": b64(png)}, {"file": png},
    ]
    multi = [{"body": {"images": [b64(png), data_url(raw[0], "image/jpeg")]}}, {"data": [b64(png)] * 3},
             {"data": json.dumps([b64(png)])}]
    answers = rgb.handle_requests(single + multi)
    reference = ok(answers[1])["predictions"]
    for a in answers[: len(single)]:
        body = ok(a)
        assert body["model"] == "lenet5" and body["version"] == "1.0" and len(body["predictions"]) == 5
    for a in answers[6:12]:  # the same PNG in every wrapping gets the same answer
        assert close(ok(a)["predictions"], reference)
    for a, n in zip(answers[len(single):], (2, 3, 1)):
        assert len(ok(a)["results"]) == n and close(ok(a)["results"][0]["predictions"], reference)


def test_topk_from_request_and_default(rgb):
    png = b64(encode(photo(), "PNG"))
    answers = rgb.handle_requests([{"body": {"image": png, "topk": 3}}, {"data": png.encode()},
                                   {"body": {"image": png, "topk": 10}}, {"data": png, "topk": b"2"}])
    assert [len(ok(a)["predictions"]) for a in answers] == [3, 5, 10, 2]
    preds = ok(answers[2])["predictions"]
    assert [p["probability"] for p in preds] == sorted((p["probability"] for p in preds), reverse=True)
    assert abs(sum(p["probability"] for p in preds) - 1) < 1e-5
    assert all(p["label"] == f"class{p['index']}" for p in preds)
    for bad in (0, 11, "abc", True, 2.5):
        err(rgb.handle_requests([{"body": {"image": png, "topk": bad}}])[0], 400, "InvalidTopK")


def test_bad_requests_get_their_own_errors(rgb):
    png, jpg = encode(photo(), "PNG"), encode(photo(64, 64), "JPEG")
    batch = [
        {"data": png},                                              # 0 ok
        {"data": b""},                                              # 1 empty
        {"data": b"hello, this is text"},                           # 2 not an image
        {"body": {"image": "!!not base64!!"}},                      # 3
        {"data": jpg[: len(jpg) // 2]},                             # 4 truncated JPEG
        {"body": {"images": [b64(png), b64(png[:100])]}},           # 5 one broken item
        {"body": {"picture": b64(png)}},                            # 6 no image key
        {"data": b"{not json"},                                     # 7
        {"body": {"images": [b64(png)] * 65}},                      # 8 too many
        {"data": png[: len(png) - 40]},                             # 9 truncated PNG
        {"data": jpg},                                              # 10 ok
        {"body": "hello world!"},                                   # 11 text/plain, not base64
    ]
    a = rgb.handle_requests(batch)
    assert len(a) == len(batch)
    assert close(ok(a[0])["predictions"], ok(rgb.handle_requests([batch[0]])[0])["predictions"])
    assert close(ok(a[10])["predictions"], ok(rgb.handle_requests([batch[10]])[0])["predictions"])
    err(a[1], 400, "EmptyBody")
    err(a[2], 400, "InvalidImage")
    err(a[3], 400, "InvalidBase64")
    err(a[4], 400, "InvalidImage")
    assert err(a[5], 400, "InvalidImage").startswith("images[1]: ")
    err(a[6], 400, "MissingImage")
    err(a[7], 400, "InvalidJSON")
    err(a[8], 413, "TooManyImages")
    err(a[9], 400, "InvalidImage")
    err(a[11], 400, "InvalidBase64")


def test_size_limits_are_checked_from_the_header(rgb, rgb_ckpt, monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixels must not be decoded")
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for data in (png_header_only(10_000, 5_000), png_header_only(30_000, 30_000)):  # ours, then PIL's bomb limit
        err(rgb.handle_requests([{"data": data}])[0], 413, "ImageTooLarge")
    monkeypatch.undo()
    few_pixels = ImagePipeline(rgb_ckpt, max_image_pixels=1000)
    err(few_pixels.handle_requests([{"data": encode(photo(40, 30), "PNG")}])[0], 413, "ImageTooLarge")
    ok(few_pixels.handle_requests([{"data": encode(Image.new("RGB", (1, 1)), "PNG")}])[0])  # 1x1 is fine
    few_bytes = ImagePipeline(rgb_ckpt, max_image_bytes=2000)
    err(few_bytes.handle_requests([{"data": encode(photo(30, 30), "BMP")}])[0], 413, "PayloadTooLarge")
    err(few_bytes.handle_requests([{"body": {"image": b64(encode(photo(30, 30), "BMP"))}}])[0], 413,
        "PayloadTooLarge")


# --- preprocessing and parity ------------------------------------------------------------------------------

def test_preprocessing_comes_from_the_checkpoint():
    data = encode(photo(90, 60), "PNG")
    seen = []
    for resize in (36, 64):
        ckpt = tiny_checkpoint(3, 32, resize)
        pipe = ImagePipeline(ckpt)
        pipe.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
        ok(pipe.handle_requests([{"data": data}])[0])
        assert torch.equal(seen[-1], eval_batch([decode_image(data, 3)], ckpt["preprocess"]))
    assert seen[0].shape == seen[1].shape == (1, 3, 32, 32) and not torch.allclose(seen[0], seen[1])
    ckpt = tiny_checkpoint(3, 32, 36)
    ckpt["preprocess"] = make_preprocess(32, 3, [0.2] * 3, [0.3] * 3, resize=36)
    pipe = ImagePipeline(ckpt)
    pipe.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    ok(pipe.handle_requests([{"data": data}])[0])
    assert not torch.allclose(seen[-1], seen[0])


def test_alpha_is_composited_on_the_background_the_model_was_trained_on():
    a = decode_image(encode(rgba(), "PNG"), 3, background=(0, 0, 0))  # transparent right half -> black
    assert (a[:, :, 20:] == 0).all() and torch.equal(a[:, :, :20], rgb_of(rgba())[:, :, :20])
    opaque, transparent = cutout(np.array(photo(28, 28, seed=3).convert("L")))
    ckpt = tiny_checkpoint(1, 28)
    ckpt["preprocess"] = make_preprocess(28, 1, [0.5], [0.25], background=(0, 0, 0))  # as Fashion-MNIST records
    pipe = ImagePipeline(ckpt, topk=10)
    on_black = [ok(a)["predictions"] for a in pipe.handle_requests([{"body": opaque}, {"body": transparent}])]
    assert on_black[0] == on_black[1]  # same pixels, same answer
    # A checkpoint that records no background (written before the key existed) keeps compositing on white.
    old = ImagePipeline(tiny_checkpoint(1, 28), topk=10)
    assert "background" not in old.preprocess
    on_white = [ok(a)["predictions"] for a in old.handle_requests([{"body": opaque}, {"body": transparent}])]
    assert on_white[0] != on_white[1]
    assert pipe.describe()["preprocess"]["background"] == [0, 0, 0]  # clients can see it


@pytest.mark.parametrize("which", ["rgb", "gray"])
def test_probabilities_equal_evaluate_predict_probs(which, rgb, gray, rgb_ckpt, gray_ckpt):
    pipe, ckpt = {"rgb": (rgb, rgb_ckpt), "gray": (gray, gray_ckpt)}[which]
    imgs = [encode(photo(w, h, seed=i), fmt) for i, (w, h, fmt) in
            enumerate([(50, 40, "PNG"), (28, 28, "PNG"), (300, 200, "JPEG"), (17, 90, "WEBP"), (1, 1, "PNG")])]
    answer = ok(pipe.handle_requests([{"body": {"images": [b64(d) for d in imgs], "topk": 10}}])[0])
    model = build_model(ckpt)
    for data, result in zip(imgs, answer["results"]):
        expected = predict_probs(model, ckpt["preprocess"], [pipe.decode([data])[0]])[0]
        got = torch.zeros(10)
        for p in result["predictions"]:
            got[p["index"]] = p["probability"]
        assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_batch_failure_answers_every_request(rgb, monkeypatch):
    png = encode(photo(), "PNG")
    for exc, status, type_ in [(RuntimeError("boom"), 500, "InternalError"),
                               (torch.OutOfMemoryError("oom"), 503, "OutOfMemory")]:
        def fail(x, exc=exc):
            raise exc
        monkeypatch.setattr(rgb, "forward", fail)
        a = rgb.handle_requests([{"data": png}, {"data": b""}, {"data": png}])
        err(a[0], status, type_)
        err(a[1], 400, "EmptyBody")
        err(a[2], status, type_)
    monkeypatch.undo()
    ok(rgb.handle_requests([{"data": png}])[0])


def test_options_are_validated(rgb_ckpt):
    assert pipeline_options({"topk": 3, "runtime": "eager"}) == {"topk": 3, "runtime": "eager"}
    for bad in ({"top_k": 3}, {"topk": "3"}, {"max_image_pixels": True}):
        with pytest.raises(ValueError):
            pipeline_options(bad)
    with pytest.raises(ValueError, match="runtime"):
        ImagePipeline(rgb_ckpt, runtime="tensorrt")
    assert ImagePipeline(rgb_ckpt, topk=50).topk == 10  # the default is clamped to the class count


def test_units_run_in_chunks_of_max_batch(rgb_ckpt):
    """However many images a worker batch carries, decode -> forward runs max_batch units at a time, and the
    answers equal those of one big batch."""
    small = ImagePipeline(rgb_ckpt, max_batch=3)
    seen = []
    small.model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    imgs = [encode(photo(40 + i, 33), "PNG") for i in range(7)]
    requests = [{"data": imgs[0]}, {"body": {"images": [b64(d) for d in imgs[1:5]]}}, {"data": imgs[5]},
                {"data": imgs[6]}]
    answers = small.handle_requests(requests)
    assert seen == [3, 3, 1]
    big = ImagePipeline(rgb_ckpt).handle_requests(requests)
    for a, b in zip(answers, big):
        pa, pb = ok(a), ok(b)
        ra, rb = pa.get("results") or [pa], pb.get("results") or [pb]
        assert len(ra) == len(rb) and all(close(x["predictions"], y["predictions"], 1e-5) for x, y in zip(ra, rb))
    assert set(small.timings) == {"decode", "preprocess", "inference", "postprocess", "answer"}
    assert small.timings["inference"] > 0 and small.timings["decode"] > 0


def test_a_bad_unit_fails_only_its_request_and_its_later_units_are_skipped(rgb_ckpt):
    small = ImagePipeline(rgb_ckpt, max_batch=2)
    seen = []
    small.model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    good = [b64(encode(photo(30 + i, 30), "PNG")) for i in range(4)]
    multi = {"body": {"images": [good[0], b64(b"not an image"), good[1], good[2]]}}
    answers = small.handle_requests([{"data": encode(photo(), "PNG")}, multi, {"data": encode(photo(31, 29), "PNG")}])
    ok(answers[0])
    assert err(answers[1], 400, "InvalidImage").startswith("images[1]: ")
    ok(answers[2])
    assert sum(seen) <= 3  # the good first image of each single request (+ at most one unit decoded before the error)


def test_a_unit_source_that_fails_mid_way_fails_its_request_only(rgb_ckpt):
    """A job's units may come from a stream (video frames): an error raised by the stream answers that request."""
    from handlers.errors import BadInput as Bad
    from handlers.pipeline import Job

    class Streamed(ImagePipeline):
        def parse(self, item):
            if item == "stream":
                def frames():
                    yield torch.zeros(3, 32, 32, dtype=torch.uint8)
                    raise Bad(400, "InvalidVideo", "the stream is corrupt at frame 1")
                return Job(frames(), {"topk": 1, "multi": True})
            return super().parse(item)

    pipe = Streamed(rgb_ckpt, max_batch=4)
    answers = pipe.handle_requests(["stream", {"data": encode(photo(), "PNG")}])
    assert err(answers[0], 400, "InvalidVideo") == "the stream is corrupt at frame 1"
    ok(answers[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pipeline_matches_cpu(rgb_ckpt, rgb):
    gpu = ImagePipeline(rgb_ckpt, "cuda")
    assert gpu.jpeg_decoder == "torchvision"
    img = photo(120, 90, noise=2)
    batch = [{"data": encode(img, "JPEG", quality=95)}, {"data": with_orientation(img, 6, "JPEG")},
             {"data": encode(img.convert("CMYK"), "JPEG")}, {"data": encode(img, "PNG")},
             {"data": encode(img, "JPEG")[:200]}, {"body": {"images": [b64(encode(img, "JPEG"))] * 3, "topk": 10}}]
    on_gpu, on_cpu = gpu.handle_requests(batch), rgb.handle_requests(batch)
    assert [a[0] for a in on_gpu] == [a[0] for a in on_cpu] == [200, 200, 200, 200, 400, 200]
    for g, c in zip(ok(on_gpu[5])["results"], ok(on_cpu[5])["results"]):
        gp = {p["index"]: p["probability"] for p in g["predictions"]}
        cp = {p["index"]: p["probability"] for p in c["predictions"]}
        assert max(abs(gp[i] - cp[i]) for i in range(10)) < 0.02  # bf16 + nvjpeg vs fp32 + libjpeg draft
    decoded = decode_jpegs([encode(img, "JPEG", quality=95)], 3, "cuda")[0]
    assert decoded.is_cuda and (decoded.cpu().float() - rgb_of(img).float()).abs().mean() < 4
