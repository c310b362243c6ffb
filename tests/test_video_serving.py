"""A segmentation model served by a real TorchServe (batchSize 4): frame and clip requests at one endpoint,
streamed and not, bad bodies, and served masks equal to the in-process pipeline's for the same frames."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import requests
import torch

from handlers.segment import SegmentPipeline, decode_mask
from tests.images import encode, photo
from tests.torchserve import ROOT, TorchServe, tiny_archive
from tests.videos import AVI_HEAD, corrupt_frames, tiny_seg_checkpoint, write_test_clip, zero_frame_mp4
from training.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java (run make setup)")
MODEL = "tiny-video-seg"
OPTIONS = {"max_batch": 4, "max_frames": 64}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("video-serving")
    ckpt = save_checkpoint(tiny_seg_checkpoint(), tmp / "seg.pt")
    # a long batch delay: requests sent together land in one worker batch
    tiny_archive(tmp / "store", tmp / "configs", MODEL, "1.0", ckpt, handler_file="handlers/segmenter.py",
                 batchSize=4, maxBatchDelay=300, maxWorkers=1, handler=OPTIONS)
    clip = write_test_clip(tmp / "clip.mp4", seed=1, frames=24)
    pipeline = SegmentPipeline(load_checkpoint(ckpt), model_name=MODEL, **OPTIONS)
    with TorchServe(tmp / "store", tmp, models=[(MODEL, "1.0")]) as ts:
        yield SimpleNamespace(ts=ts, url=f"{ts.inference_url}/predictions/{MODEL}", clip=clip, tmp=tmp,
                              pipeline=pipeline)


def post(env, body=None, fields=None, stream=False):
    if fields is None:
        return env.ts.infer.post(env.url, data=body, stream=stream, timeout=120)
    return env.ts.infer.post(env.url, files={"data": ("x", body)}, data=fields, stream=stream, timeout=120)


def together(*calls):
    """Run the calls concurrently (one TorchServe batch); results in call order."""
    out = [None] * len(calls)

    def run(i, call):
        out[i] = call()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def in_process(env, item):
    status, body = env.pipeline.handle_requests([item])[0]
    assert status == 200, body
    return body


def same_frames(served, local):
    """Equal masks and detections (labels, boxes; scores up to float noise across batch compositions)."""
    assert len(served) == len(local)
    for s, m in zip(served, local):
        assert (s.get("frame"), s.get("time")) == (m.get("frame"), m.get("time"))
        assert (decode_mask(s["mask"]) == decode_mask(m["mask"])).all()
        assert [(d["label"], d["box"]) for d in s["detections"]] == [(d["label"], d["box"]) for d in m["detections"]]
        assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(s["detections"], m["detections"]))


def test_frames_from_concurrent_streams_match_the_pipeline(env):
    from training.clips import make_clip

    frames = [encode(photo(64, 64, seed=i), "PNG") for i in range(2)]
    frames += [encode(_pil(f), "JPEG", quality=92) for f in make_clip(5, "test", 2, (48, 80)).frames]
    answers = together(*[lambda f=f: post(env, f) for f in frames])
    for frame, r in zip(frames, answers):
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json"), r.text
        body = r.json()
        assert body["kind"] == "frame" and body["model"] == MODEL and body["version"] == "1.0"
        same_frames([body], [in_process(env, {"body": frame})])
    assert r.json()["width"] == 80 and decode_mask(r.json()["mask"]).shape == (48, 80)


def test_a_clip_is_answered_whole_or_streamed_next_to_frames_in_one_batch(env):
    whole = post(env, env.clip, {"every": "2", "masks": "png"})
    assert whole.status_code == 200, whole.text
    body = whole.json()
    same_frames(body["frames"], in_process(env, {"data": env.clip, "every": "2", "masks": "png"})["frames"])
    assert [f["frame"] for f in body["frames"]] == list(range(0, 24, 2)) and body["video"]["frames"] == 24

    frame = encode(photo(64, 64, seed=3), "PNG")
    streamed, alone, bad, default = together(
        lambda: post(env, env.clip, {"stream": "true"}, stream=True), lambda: post(env, frame),
        lambda: post(env, env.clip, {"every": "0"}), lambda: post(env, env.clip))
    with streamed:
        assert streamed.status_code == 200 and streamed.headers.get("Transfer-Encoding") == "chunked"
        assert streamed.headers["Content-Type"] == "application/x-ndjson"
        chunks = [c for c in streamed.iter_content(chunk_size=None) if c]
    lines = [json.loads(x) for x in b"".join(chunks).splitlines()]
    assert len(chunks) >= 3  # 24 frames with max_batch 4 leave in several parts
    header, frames, end = lines[0], lines[1:-1], lines[-1]
    assert header["kind"] == "clip" and end == {"end": True, "frames": 24, "truncated": False}
    same_frames(frames, in_process(env, {"data": env.clip})["frames"])
    assert alone.status_code == 200 and alone.json()["kind"] == "frame"
    assert bad.status_code == 400 and bad.json()["type"] == "InvalidSampling"
    assert default.status_code == 200 and len(default.json()["frames"]) == 24


def test_bad_bodies_get_4xx_json_and_the_worker_keeps_serving(env):
    good = env.clip
    cases = [(b"", None, 400, "EmptyBody"), (good[: len(good) // 2], None, 400, "TruncatedVideo"),
             (corrupt_frames(good), {"every": "3"}, 400, "InvalidVideo"), (b"just some text", None, 415,
                                                                        "UnsupportedMedia"),
             (AVI_HEAD, None, 415, "UnsupportedVideo"), (zero_frame_mp4(), None, 400, "EmptyVideo"),
             (good, {"fps": "-1"}, 400, "InvalidSampling"), (good, {"masks": "gif"}, 400, "InvalidOption"),
             (good, {"max_frames": "1000"}, 400, "InvalidSampling")]
    answers = together(*[lambda b=b, f=f: post(env, b, f) for b, f, _, _ in cases])
    for (_, _, status, kind), r in zip(cases, answers):
        assert r.status_code == status and r.json()["type"] == kind and r.json()["code"] == status, r.text
    r = post(env, encode(photo(64, 64), "PNG"))
    assert r.status_code == 200 and r.json()["detections"] is not None
    workers = env.ts.client.describe(MODEL, "1.0")[0]["workers"]
    assert [w["status"] for w in workers] == ["READY"]


def test_version_management_auth_and_metrics_work_as_for_images(env):
    """The serving CLI's rollout smoke-checks a segmentation model on a frame; no token, no answer; metrics."""
    r = subprocess.run([sys.executable, "-m", "serving", "rollout", MODEL, "1.0", "--runtime-dir",
                        str(env.ts.runtime_dir), "--store", str(env.ts.store)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["smoke_check"]["result"] == "passed"
    frame = encode(photo(64, 64), "PNG")
    assert requests.post(env.url, data=frame, timeout=60).status_code in (400, 401)
    assert f'model_name="{MODEL}"' in requests.get(f"{env.ts.metrics_url}/metrics", timeout=30).text


def test_predict_video_writes_the_annotated_clip(env):
    import av

    clip, out = env.tmp / "clip.mp4", env.tmp / "annotated.mp4"
    r = subprocess.run([sys.executable, "-m", "serving", "predict-video", str(clip), "--out", str(out), "--model",
                        MODEL, "--every", "3", "--runtime-dir", str(env.ts.runtime_dir), "--store",
                        str(env.ts.store)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["frames_answered"] == 8 and summary["frames_written"] == 24
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(clip)) as c:
        first = c.decode(video=0).__next__().to_ndarray(format="rgb24")
    assert len(frames) == 24 and frames[0].shape == (64, 64, 3)
    assert abs(frames[0].astype(float) - first.astype(float)).mean() > 5  # masks and boxes drawn in
    r = subprocess.run([sys.executable, "-m", "serving", "predict-video", str(clip), "--out", str(out), "--model",
                        MODEL, "--fps", "-2", "--runtime-dir", str(env.ts.runtime_dir)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error: HTTP 400") and "fps must be" in r.stderr


@pytest.fixture(scope="module")
def grpc_stub(env, tmp_path_factory):
    """An inference stub from the protos inside TorchServe's own jar (serving/grpc_client.py: one set of generated
    modules per process, so other gRPC tests of the session share the descriptor pool)."""
    grpc = pytest.importorskip("grpc")
    pytest.importorskip("grpc_tools.protoc")
    from serving.grpc_client import stubs

    pb2, pb2_grpc = stubs(tmp_path_factory.mktemp("proto"))
    channel = grpc.insecure_channel(f"127.0.0.1:{env.ts.ports.grpc_inference}")
    yield SimpleNamespace(stub=pb2_grpc.InferenceAPIsServiceStub(channel), pb2=pb2, grpc=grpc,
                          auth=(("authorization", f"Bearer {env.ts.ep.inference_key}"),))
    channel.close()


def test_over_grpc_answers_come_whole_and_the_worker_keeps_serving(env, grpc_stub):
    """gRPC carries the options as inputs; an answer never leaves in parts there (TorchServe 0.12 wedges the worker
    when a unary gRPC answer does), and its StreamPredictions call gets the whole answer as one message (without
    the handler's end-of-stream header TorchServe fails the worker with a NullPointerException)."""
    g = grpc_stub

    def request(**inputs):
        return g.pb2.PredictionsRequest(model_name=MODEL, input=inputs)

    unary = g.stub.Predictions(request(data=env.clip, stream=b"true", every=b"6"), metadata=g.auth, timeout=120)
    lines = [json.loads(x) for x in unary.prediction.splitlines()]
    assert lines[0]["kind"] == "clip" and [x["frame"] for x in lines[1:-1]] == [0, 6, 12, 18]
    assert lines[-1] == {"end": True, "frames": 4, "truncated": False}
    frame = encode(photo(64, 64, seed=4), "PNG")
    streamed = list(g.stub.StreamPredictions(request(data=frame), metadata=g.auth, timeout=120))
    assert len(streamed) == 1 and json.loads(streamed[0].prediction)["kind"] == "frame"
    again = g.stub.Predictions(request(data=frame), metadata=g.auth, timeout=60)
    assert json.loads(again.prediction) == json.loads(streamed[0].prediction)
    assert post(env, frame).status_code == 200


def _pil(frame: torch.Tensor):
    from PIL import Image

    return Image.fromarray(frame.permute(1, 2, 0).numpy())
