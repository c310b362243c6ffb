"""The video pipeline without TorchServe, on real H.264 MP4 files from the clip generator: telling frames from
clips, decoding and sampling, batching with other requests, streaming, masks and every kind of bad input."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from handlers.errors import BadInput
from handlers.segment import SegmentPipeline, decode_mask, encode_mask
from handlers.video import Sampling, VideoClip, VideoLimits, sniff
from tests.images import b64, encode, photo
from tests.videos import AVI_HEAD, corrupt_frames, tiny_seg_checkpoint, write_test_clip, zero_frame_mp4


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """24 frames at the model's 64 px, 12 frames at 96x64 (answers are upsampled to the frame size), 24 frames
    at 2 fps (12 s) and 40 frames."""
    tmp = tmp_path_factory.mktemp("clips")
    return {"square": write_test_clip(tmp / "square.mp4", seed=1, frames=24), "dir": tmp,
            "wide": write_test_clip(tmp / "wide.mp4", seed=2, frames=12, size=(64, 96)),
            "slow": write_test_clip(tmp / "slow.mp4", seed=1, frames=24, fps=2.0),
            "long": write_test_clip(tmp / "long.mp4", seed=3, frames=40)}


@pytest.fixture(scope="module")
def ckpt():
    return tiny_seg_checkpoint()


@pytest.fixture(scope="module")
def pipe(ckpt):
    return SegmentPipeline(ckpt, max_batch=5)


def ok(answer):
    status, body = answer
    assert status == 200, body
    return body


def err(answer, status, type_):
    assert answer[0] == status and answer[1]["type"] == type_, answer
    return answer[1]["message"]


def png_frame(frame: torch.Tensor) -> bytes:
    return encode(Image.fromarray(frame.permute(1, 2, 0).numpy()), "PNG")


def test_the_bytes_decide_frame_or_clip(clips):
    assert sniff(encode(photo(), "PNG")) == sniff(encode(photo(), "JPEG")) == sniff(encode(photo(), "WEBP")) == "image"
    assert sniff(clips["square"]) == "mp4"
    assert sniff(b"\x1a\x45\xdf\xa3" + bytes(30)) == "matroska"
    for body, status, kind in ((b"", 400, "EmptyBody"), (AVI_HEAD, 415, "UnsupportedVideo"),
                               (b"%PDF-1.7 ...", 415, "UnsupportedMedia"), (b"hello", 415, "UnsupportedMedia")):
        with pytest.raises(BadInput) as e:
            sniff(body)
        assert (e.value.status, e.value.type) == (status, kind)


@pytest.mark.parametrize("fields, message", [
    ({"every": "0"}, "every must be >= 1"), ({"every": "2.5"}, "every must be an integer"),
    ({"fps": "-3"}, "fps must be from"), ({"fps": "abc"}, "fps must be a number"), ({"fps": "nan"}, "fps must be"),
    ({"every": 2, "fps": 5}, "either every"), ({"max_frames": "0"}, "max_frames must be from 1"),
    ({"max_frames": 10_000}, "max_frames must be from 1 to 3000")])
def test_wrong_sampling_parameters_are_400(fields, message):
    with pytest.raises(BadInput, match=message) as e:
        Sampling.from_fields(fields, VideoLimits().max_frames)
    assert (e.value.status, e.value.type) == (400, "InvalidSampling")


def test_decoding_samples_frames_with_index_and_time(clips):
    from training.clips import make_clip, read_clip

    decoded, _, _ = read_clip(clips["dir"] / "square.mp4")  # the generator's own reader of the file
    truth = make_clip(1, "test", 24, 64).frames
    every = list(VideoClip(clips["square"], "mp4").frames(Sampling(every=5)))
    assert [f.info["frame"] for f in every] == [0, 5, 10, 15, 20]
    assert [f.info["time"] for f in every] == pytest.approx([i / 30 for i in (0, 5, 10, 15, 20)], abs=1e-4)
    for f in every:
        assert f.pixels.dtype == torch.uint8 and torch.equal(f.pixels, decoded[f.info["frame"]])
        assert (f.pixels.float() - truth[f.info["frame"]].float()).abs().median() <= 8  # H.264 of what was drawn
    clip = VideoClip(clips["square"], "mp4")
    by_fps = list(clip.frames(Sampling(fps=7.5, max_frames=4)))  # 30 fps source: one frame in four, four of them
    assert [f.info["frame"] for f in by_fps] == [0, 4, 8, 12] and clip.truncated
    assert clip.info == {"container": "mp4", "codec": "h264", "width": 64, "height": 64, "fps": 30.0,
                         "duration": 0.8, "frames": 24}


def test_clip_frames_run_in_batches_next_to_other_requests(pipe, clips, ckpt):
    """12 sampled frames + one frame request with max_batch 5: forwards of 5, 5, 3; every answer equals the
    one it gets alone."""
    seen = []
    hook = pipe.model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    from training.clips import make_clip

    frame = png_frame(make_clip(3, "test", 1, 64).frames[0])
    try:
        answers = pipe.handle_requests([{"data": clips["square"], "every": "2"}, {"body": frame}])
    finally:
        hook.remove()
    assert seen == [5, 5, 3]
    clip, single = ok(answers[0]), ok(answers[1])
    assert [f["frame"] for f in clip["frames"]] == list(range(0, 24, 2)) and clip["truncated"] is False
    assert clip["sampling"] == {"every": 2, "fps": None, "max_frames": None} and clip["kind"] == "clip"
    alone = ok(SegmentPipeline(ckpt, max_batch=1, postprocess_threads=2).handle_requests([{"body": frame}])[0])
    threads = SegmentPipeline(ckpt, max_batch=5, postprocess_threads=3)  # same answers, frames post-processed in 3
    assert ok(threads.handle_requests([{"data": clips["square"], "every": "2"}])[0]) == clip
    assert single["kind"] == "frame" and (single["width"], single["height"]) == (64, 64)
    assert (decode_mask(single["mask"]) == decode_mask(alone["mask"])).mean() > 0.999
    assert pipe.timings["decode"] > 0 and pipe.timings["inference"] > 0


def test_a_streamed_clip_leaves_in_parts_with_the_same_frames(pipe, clips):
    whole = ok(pipe.handle_requests([{"data": clips["square"], "every": "3"}])[0])
    parts = []
    last = ok(pipe.handle_requests([{"data": clips["square"], "every": "3", "stream": "true"}],
                                   emit=lambda r, lines: parts.append((r, lines)))[0])
    assert [r for r, _ in parts] == [0, 0] and [len(lines) for _, lines in parts] == [6, 3]  # header + 5, then 3
    header, *frames = parts[0][1] + parts[1][1]
    assert header == {k: whole[k] for k in ("model", "version", "kind", "video", "sampling", "classes")}
    assert frames == whole["frames"] and last == [{"end": True, "frames": 8, "truncated": False}]


def test_masks_and_boxes_come_at_the_frames_own_size(pipe, clips):
    body = ok(pipe.handle_requests([{"body": {"video": b64(clips["wide"]), "masks": "png", "max_frames": 2}}])[0])
    assert body["video"]["width"] == 96 and body["truncated"] is True and len(body["frames"]) == 2
    for frame in body["frames"]:
        labels = decode_mask(frame["mask"])
        assert labels.shape == (64, 96)
        for det in frame["detections"]:
            x0, y0, x1, y1 = det["box"]
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 64 and (labels[y0:y1, x0:x1] == det["index"]).any()
    plain = ok(pipe.handle_requests([{"body": clips["wide"], "masks": "none"}])[0])
    assert "mask" not in plain["frames"][0] and plain["frames"][0]["detections"] is not None


def test_rle_and_png_masks_decode_to_the_same_labels():
    rng = np.random.default_rng(0)
    labels = np.zeros((37, 53), dtype=np.uint8)
    labels[5:20, 3:30], labels[18:33, 25:50], labels[0, 52] = 4, 9, 1
    labels[rng.random(labels.shape) < 0.02] = 2
    classes = [f"c{i}" for i in range(11)]
    rle, png = encode_mask(labels, "rle", classes), encode_mask(labels, "png", classes)
    assert [r["index"] for r in rle["rle"]] == [1, 2, 4, 9] and rle["size"] == [37, 53]
    assert (decode_mask(rle) == labels).all() and (decode_mask(png) == labels).all()
    assert encode_mask(np.zeros((4, 4), np.uint8), "rle", classes)["rle"] == []


def test_every_bad_input_gets_its_own_4xx_and_the_rest_of_the_batch_is_answered(ckpt, clips):
    pipe = SegmentPipeline(ckpt, max_batch=4, max_frames=20, max_video_seconds=5, max_frame_pixels=64 * 80,
                           max_decoded_pixels=30 * 64 * 64)
    good, frame = clips["square"], png_frame(torch.full((3, 40, 30), 90, dtype=torch.uint8))
    cases = [
        ({"data": good, "every": "2"}, 200, None),
        ({"body": b""}, 400, "EmptyBody"),
        ({"body": good[: len(good) * 2 // 3]}, 400, "TruncatedVideo"),
        ({"data": corrupt_frames(good), "every": "2"}, 400, "InvalidVideo"),
        ({"body": b"%PDF-1.4 not a video"}, 415, "UnsupportedMedia"),
        ({"body": AVI_HEAD}, 415, "UnsupportedVideo"),
        ({"body": zero_frame_mp4()}, 400, "EmptyVideo"),
        ({"body": clips["wide"]}, 413, "FrameTooLarge"),
        ({"body": clips["slow"]}, 413, "VideoTooLong"),
        ({"data": clips["long"], "every": "2"}, 413, "VideoTooLarge"),  # 40 x 64 x 64 pixels to decode
        ({"body": good}, 413, "TooManyFrames"),  # 24 frames > max_frames 20, and the client set no cap
        ({"data": good, "every": "0"}, 400, "InvalidSampling"),
        ({"data": good, "fps": "fast"}, 400, "InvalidSampling"),
        ({"data": good, "masks": "jpeg"}, 400, "InvalidOption"),
        ({"data": good, "stream": "maybe"}, 400, "InvalidOption"),
        ({"data": good, "evry": "2"}, 400, "UnknownOption"),
        ({"body": {"video": "%%%"}}, 400, "InvalidBase64"),
        ({"body": b"\x89PNG\r\n\x1a\n" + bytes(40)}, 400, "InvalidImage"),
        ({"body": frame}, 200, None),
    ]
    answers = pipe.handle_requests([c for c, _, _ in cases])
    for (item, status, kind), answer in zip(cases, answers):
        if status == 200:
            ok(answer)
        else:
            assert err(answer, status, kind), item.keys()
    assert [f["frame"] for f in ok(answers[0])["frames"]] == list(range(0, 24, 2))
    assert "at frame" in answers[3][1]["message"]  # where in the stream the damage was found
    alone = ok(pipe.handle_requests([cases[0][0], cases[-1][0]])[0])
    assert [f["detections"] for f in alone["frames"]] == [f["detections"] for f in ok(answers[0])["frames"]]


def test_the_pipeline_refuses_a_classification_checkpoint():
    from tests.images import tiny_checkpoint

    with pytest.raises(ValueError, match="segmentation"):
        SegmentPipeline(tiny_checkpoint(3, 32, 36))


def test_a_frame_decodes_at_full_size_for_its_mask(pipe):
    big = encode(photo(200, 120, noise=5), "JPEG", quality=90)
    body = ok(pipe.handle_requests([{"body": big}])[0])
    assert (body["width"], body["height"]) == (200, 120) and decode_mask(body["mask"]).shape == (120, 200)


def test_onnx_and_int8_runtimes_serve_the_segmentation_model(ckpt, clips, tmp_path):
    """ONNX (fp32) answers like eager; int8 calibrates on training frames of the clip generator, keeps the
    classifier layer and its upsampling in fp32, and agrees with eager on nearly every pixel."""
    from training.clips import make_clip
    from training.presets import eval_batch

    ckpt = dict(ckpt, recipe={"name": "tiny", "task": "segmentation", "dataset": "moving_fmnist", "seed": 0})
    x = eval_batch(make_clip(4, "test", 16, 64).frames, ckpt["preprocess"])
    eager = SegmentPipeline(ckpt).forward(x)
    onnx = SegmentPipeline(ckpt, runtime="onnx", runtime_cache=str(tmp_path))
    assert torch.allclose(onnx.forward(x), eager, atol=1e-4)
    int8 = SegmentPipeline(ckpt, runtime="int8", runtime_cache=str(tmp_path))
    assert int8.runtime_info["calibration"]["source"] == "moving_fmnist:train"
    assert (int8.forward(x).argmax(1) == eager.argmax(1)).float().mean() > 0.95
    answer = ok(int8.handle_requests([{"data": clips["square"], "max_frames": 3}])[0])
    assert len(answer["frames"]) == 3


def test_lanes_answer_a_clip_like_one_lane_in_frame_order(ckpt, clips, tmp_path):
    """lanes=2: a clip's chunks are inferred two at a time, each lane with half the threads; whole answers, streamed
    parts (in frame order) and a bad request in the same batch come out as with one lane."""
    import torch as t

    one = SegmentPipeline(ckpt, runtime="onnx", runtime_cache=str(tmp_path), max_batch=4)
    two = SegmentPipeline(ckpt, runtime="onnx", runtime_cache=str(tmp_path), max_batch=4, lanes=2)
    assert two.runtime_info["threads"] == max(1, t.get_num_threads() // 2)
    batch = [{"data": clips["long"]}, {"body": b"not a video"}, {"data": clips["square"], "every": "5"}]
    want, got = one.handle_requests(batch), two.handle_requests(batch)
    assert [f["frame"] for f in ok(got[0])["frames"]] == list(range(40))  # 10 chunks of 4, answered in order
    assert got == want and got[1][0] == 415
    parts: dict[int, list] = {0: [], 1: []}
    for pipe, out in ((one, parts[0]), (two, parts[1])):
        pipe.handle_requests([{"data": clips["long"], "stream": "true"}],
                             emit=lambda r, lines, out=out: out.extend(lines))
    assert parts[1] == parts[0] and [f["frame"] for f in parts[1][1:]] == list(range(40))
    with pytest.raises(ValueError, match="lanes"):
        SegmentPipeline(ckpt, lanes=2)  # eager: lanes are for ONNX Runtime sessions


def test_the_adapter_refuses_an_answer_over_the_frontend_limit(ckpt, clips, tmp_path, monkeypatch):
    """TorchServe drops the worker on an answer over max_response_size: the adapter answers 413 instead, for that
    request only; a streamed answer leaves in parts, each far below the limit."""
    ts = pytest.importorskip("ts")
    from ts.context import Context, RequestProcessor

    import handlers.adapter as adapter
    from handlers.segmenter import Segmenter
    from training.checkpoint import save_checkpoint

    save_checkpoint(ckpt, tmp_path / "model.pt")
    manifest = {"model": {"modelName": "seg", "modelVersion": "1.0", "serializedFile": "model.pt"}}
    ctx = Context("seg", str(tmp_path), manifest, 4, None, ts.__version__,
                  model_yaml_config={"handler": {"max_answer_bytes": 4_000, "max_batch": 4}})
    handler = Segmenter()
    handler.initialize(ctx)
    sent = []  # the intermediate responses, as TorchServe's socket would get them
    monkeypatch.setattr(adapter, "send_intermediate_predict_response",
                        lambda ret, ids, msg, code, c: sent.append(next(iter(ret.values()))))
    data = [{"data": clips["square"], "masks": "png"}, {"data": clips["square"], "masks": "png", "stream": "true"},
            {"data": clips["square"], "max_frames": "2"}]
    ctx.request_processor = [RequestProcessor({"Host": "x"}) for _ in data]  # HTTP requests carry their Host
    ctx.request_ids = {i: f"r{i}" for i in range(len(data))}
    out = handler.handle(data, ctx)
    assert ctx.get_response_status(0)[0] == 413 and json.loads(out[0])["type"] == "AnswerTooLarge"
    assert ctx.get_response_status(1)[0] == 200 and len(sent) == 6 and max(len(p) for p in sent) < 4_000
    lines = [json.loads(x) for part in sent + [out[1]] for x in part.splitlines()]
    assert len(lines) == 26 and lines[-1] == {"end": True, "frames": 24, "truncated": False}
    assert ctx.get_response_status(2)[0] == 200 and len(json.loads(out[2])["frames"]) == 2


def test_an_int8_segmentation_archive_is_calibrated_on_training_frames_and_measured_in_miou(ckpt, tmp_path):
    """The archive step builds the segmentation model's int8 graph like a classifier's, through the task's own
    entries in training/calibration.py: frames drawn like the training frames, mIoU on the held-out test clips."""
    import yaml

    from serving.archive import build_archive
    from serving.config import load_config
    from training.checkpoint import save_checkpoint

    recipe = {"name": "tiny", "task": "segmentation", "dataset": "moving_fmnist", "seed": 0,
              "data_args": {"test_clips": 2, "clip_frames": 4}}
    path = save_checkpoint(dict(ckpt, recipe=recipe), tmp_path / "seg.pt")
    config = tmp_path / "configs" / "seg" / "1.0.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(yaml.safe_dump({
        "name": "seg", "version": "1.0", "checkpoint": str(path), "handler": "handlers/segmenter.py",
        "runtime": "int8", "artifact": {"max_accuracy_drop": None},  # random weights: nothing to hold
        "torchserve": {"batchSize": 4, "maxBatchDelay": 5, "minWorkers": 1, "maxWorkers": 1, "responseTimeout": 60,
                       "deviceType": "cpu", "handler": {"max_batch": 4}}}))
    entry = build_archive(load_config(config), tmp_path / "store")
    with zipfile.ZipFile(tmp_path / "store" / entry["mar"]) as z:
        manifest = json.loads(z.read("artifact.json"))
        assert "model.int8.onnx" in z.namelist() and "segmenter.py" in z.namelist()
        assert "training/masks.py" in z.namelist()
    assert manifest["calibration"]["source"] == "moving_fmnist:train" and manifest["calibration"]["images"] == 64
    accuracy = manifest["accuracy"]
    assert accuracy["metric"] == "miou" and accuracy["split"] == "moving_fmnist:test" and accuracy["images"] == 8
    assert 0 <= accuracy["int8"] <= 1 and abs(accuracy["drop_pt"]) < 5


@pytest.mark.parametrize("name, script", [("video-decoders", "video_decoders"), ("video-runtimes", "seg_runtimes"),
                                          ("video-training", "seg_train_report"), ("video-fusion", "vit_fusion")])
def test_every_figure_in_video_md_is_generated_from_a_committed_json(name, script):
    """docs/video.md's measurement blocks are exactly what their JSON files generate (no hand-typed figures)."""
    import importlib
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    block = re.search(f"<!-- {name}:begin -->\n(.*?)\n<!-- {name}:end -->", (root / "docs/video.md").read_text(), re.S)
    assert block, name
    data = root / "docs" / f"{name.replace('-', '_')}.json"
    if not data.is_file():
        assert block.group(1).startswith("(awaiting "), f"{name}: figures without their JSON"
        pytest.skip(f"awaits scripts/{script}.py --docs on a quiet machine")
    markdown = importlib.import_module(f"scripts.{script}").markdown
    assert block.group(1) == markdown(json.loads(data.read_text()))


def test_the_training_report_states_the_gap_to_the_goal_and_how_to_finish_a_stopped_schedule(tmp_path):
    from scripts.seg_train_report import markdown, run_entry

    recipe = {"epochs": 8, "batch_size": 32, "data_args": {"train_frames": 2048}, "model_args": {"patch_size": 8}}
    metrics = {"checkpoint": "checkpoints/s.pt", "arch": "vit_seg_tiny", "img_size": 64, "recipe": recipe,
               "miou": 0.35, "miou_objects": 0.3, "ap50": 0.2, "pixel_acc": 0.9, "per_class_iou": {}, "frames": 512,
               "data": "test clips", "training": {"train_time_s": 2400.0, "train_cpu_s": 1200.0, "epochs": 3,
                                                  "steps": 192, "val_miou": [0.1, 0.2, 0.3], "hardware": "cpu"}}
    (tmp_path / "m.json").write_text(json.dumps(metrics))
    (tmp_path / "run.log").write_text(" up 3:30, load average: 8.79, 7.17, 6.43\nepoch 1\nCommand terminated by "
                                      "signal 15\n\tUser time (seconds): 780.23\n\tSystem time (seconds): 4.27\n"
                                      "\tElapsed (wall clock) time (h:mm:ss or m:ss): 40:22.79\n"
                                      " load average: 2.00, 3, 4\n")
    run = run_entry(tmp_path / "m.json", tmp_path / "run.log", "r64")
    assert run["run"] == {"run_wall_s": 2422.79, "run_cpu_s": 784.5, "stopped": True, "parts": 1}
    assert run["training"]["frames_seen"] == 6144 and run["load_start"][0] == 8.79 and run["load_end"][0] == 2.0
    text = markdown({"runs": [run], "goal_miou": 0.85, "cpus": 2})
    assert "missed by 0.500" in text and "3/8 epochs, 6,144 frames" in text and "| 8.8 → 2.0 |" in text
    assert "40.4 min of wall time, 13.1 CPU min, stopped" in text and "10,240 frames" in text
    assert "--recipe r64 --out checkpoints/s.pt --resume checkpoints/s.pt" in text
    resumed = tmp_path / "resumed.log"  # a run finished by --resume: one /usr/bin/time block per part, summed
    resumed.write_text("\tUser time (seconds): 100.0\n\tSystem time (seconds): 2.0\n\tElapsed (wall clock) time "
                       "(h:mm:ss or m:ss): 1:00:00\n\tUser time (seconds): 50.0\n\tSystem time (seconds): 1.0\n"
                       "\tElapsed (wall clock) time (h:mm:ss or m:ss): 10:30.5\n")
    run = run_entry(tmp_path / "m.json", resumed, "r64")
    assert run["run"] == {"run_wall_s": 4230.5, "run_cpu_s": 153.0, "stopped": False, "parts": 2}
    assert "70.5 min of wall time, 2.5 CPU min in 2 parts (resumed);" in markdown({"runs": [run], "goal_miou": 0.85,
                                                                                     "cpus": 2})


def test_the_training_report_compares_a_run_from_a_classifier_with_scratch_step_for_step(tmp_path):
    from scripts.seg_train_report import markdown, run_entry

    recipe = {"epochs": 4, "batch_size": 32, "data_args": {"train_frames": 2560}, "model_args": {}}
    base = {"checkpoint": "checkpoints/s.pt", "arch": "resnet18_seg", "img_size": 64, "recipe": recipe,
            "miou": 0.3, "miou_objects": 0.2, "ap50": 0.2, "pixel_acc": 0.9, "per_class_iou": {"background": 0.9},
            "frames": 512, "data": "test clips", "training": {"train_time_s": 600.0, "train_cpu_s": 500.0,
                                                               "epochs": 4, "steps": 320, "hardware": "cpu",
                                                               "val_miou": [0.1, 0.15, 0.2, 0.25]}}
    (tmp_path / "scratch.json").write_text(json.dumps(base))
    init = {"source": str(tmp_path / "gone.pt"), "backbone": "resnet18", "head": "new", "tensors": 120,
            "adapted": ["conv1.weight 1 -> 3 channels"]}
    warm = {**base, "miou": 0.5, "init": init, "errors": {"fg_iou": 0.8, "class_right_on_found": 0.6,
                                                          "miou_true_classes": 0.9, "miou_true_masks": 0.6},
            "training": {**base["training"], "val_miou": [0.3, 0.35, 0.4, 0.45]}}
    (tmp_path / "warm.json").write_text(json.dumps(warm))
    (tmp_path / "run.log").write_text("")
    scratch = run_entry(tmp_path / "scratch.json", tmp_path / "run.log", "r64")
    run = run_entry(tmp_path / "warm.json", tmp_path / "run.log", "r64_pretrained")
    assert run["init"]["classifier"] is None  # the classifier's file is gone: nothing made up about it
    run["init"]["classifier"] = {"arch": "resnet18", "dataset": "fashion_mnist", "test_acc": 0.9, "epochs": 1,
                                 "steps": 500, "batch_size": 64, "train_time_s": 1200.0, "train_cpu_s": 1100.0}
    text = markdown({"runs": [scratch, run], "goal_miou": 0.85, "cpus": 2})
    assert "| `resnet18_seg` from `resnet18` | 64 px |" in text and "IoU `resnet18_seg` from `resnet18` |" in text
    assert "test accuracy 0.900), first conv adapted (conv1.weight 1 -> 3 channels)" in text
    assert "together: 30.0 min of training steps" in text
    assert "80 steps 0.300 vs 0.100; 160 steps 0.350 vs 0.150; 320 steps 0.450 vs 0.250." in text
    assert "| `resnet18_seg` from `resnet18` | 0.500 | 0.800 | 60.0 % | 0.900 | 0.600 |" in text
    assert "within reach by correcting the classes alone" in text and "right classes alone would gain 0.400" in text
    assert "missed by 0.350 (best `resnet18_seg` from `resnet18`: 0.500" in text
