"""Moving Fashion-MNIST: determinism, split pools, masks/instances/boxes against what is drawn, occlusion order,
motion, the config's validation, and the MP4 round trip through the CLI and PyAV."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.cli import main as cli_main
from training.clips import (
    SHADE_MIN,
    ClipError,
    Scenes,
    garment_pool,
    instance_boxes,
    make_clip,
    make_config,
    read_clip,
    render,
    sample_scenes,
    split_generator,
)

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")
QUIET = make_config({"noise": 0.0})  # exact colours: every pixel is either a garment's tint or the background


def test_a_seed_gives_the_same_clip_every_time():
    a, b, c = make_clip(5, "test", 6, 64), make_clip(5, "test", 6, 64), make_clip(6, "test", 6, 64)
    for name in ("frames", "masks", "instances", "boxes", "visible", "labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.frames, c.frames)
    assert a.frames.shape == (6, 3, 64, 64) and a.frames.dtype == torch.uint8
    assert a.masks.shape == a.instances.shape == (6, 64, 64) and a.masks.dtype == torch.int64


def test_splits_draw_from_disjoint_garment_pools():
    sizes = {s: len(garment_pool(s)[0]) for s in ("train", "val", "test")}
    assert sizes == {"train": 54_000, "val": 6_000, "test": 10_000}
    test_pool = {bytes(img.numpy()) for img in garment_pool("test")[0]}
    scenes = sample_scenes(split_generator(0, "test"), 8, "test", (64, 64), QUIET)
    drawn = [bytes(g.numpy()) for g, on in zip(scenes.garments.flatten(0, 1), scenes.active.flatten()) if on]
    assert drawn and all(g in test_pool for g in drawn)
    labels = scenes.labels[scenes.active]
    assert labels.min() >= 1 and labels.max() <= 10  # class 0 is the background


def test_masks_and_instances_hold_exactly_what_each_garment_shows():
    clip = make_clip(11, "test", 8, 96, QUIET)
    assert clip.visible.any()
    fg = clip.instances > 0
    assert torch.equal(clip.masks[fg], clip.labels[clip.instances[fg] - 1])  # class = the instance's class
    assert (clip.masks[~fg] == 0).all()
    # A covered pixel shows its instance's tint times a shade in [SHADE_MIN, 1], nothing of the background.
    pixels = clip.frames.permute(0, 2, 3, 1)[fg].float()  # (P, 3)
    tint = clip.tints[clip.instances[fg] - 1]
    shade = (pixels * tint).sum(1) / (tint * tint).sum(1)
    assert shade.min() >= SHADE_MIN - 0.02 and shade.max() <= 1.01
    assert (pixels - shade[:, None] * tint).abs().max() <= 1.0  # uint8 rounding only
    # Without noise the background is static: pixels that are background in two frames are equal.
    both = ~fg[0] & ~fg[-1]
    assert torch.equal(clip.frames[0][:, both], clip.frames[-1][:, both])


SQUARES = {0: ((10.0, 10.0), (255.0, 0.0, 0.0)), 1: ((24.0, 24.0), (0.0, 0.0, 255.0))}  # top-left, tint


def _square_scenes(order: list[int]) -> Scenes:
    """Two white 28x28 'garments' (SQUARES) in slots order[0] (back) and order[1] (front), then an inactive slot."""
    slots = [SQUARES[k] for k in order] + [((0.0, 0.0), (0.0, 255.0, 0.0))]
    return Scenes(garments=torch.full((1, 3, 28, 28), 255, dtype=torch.uint8),
                  labels=torch.tensor([[4 + order[0], 4 + order[1], 0]]), active=torch.tensor([[True, True, False]]),
                  tints=torch.tensor([[t for _, t in slots]]), sides=torch.full((1, 3), 28.0),
                  starts=torch.tensor([[xy for xy, _ in slots]]), velocity=torch.zeros(1, 3, 2),
                  background=torch.full((1, 3, 64, 64), 100.0))


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_occlusion_follows_the_z_order(order):
    scenes = _square_scenes(order)
    frames, masks, instances = render(scenes, scenes.starts, (64, 64), 0.0, torch.Generator())
    front = order[1]
    assert instances[0, 30, 30] == 2  # the overlap shows the garment drawn last ...
    assert frames[0, :, 30, 30].tolist() == [int(v) for v in SQUARES[front][1]]  # ... in its tint, at full shade
    assert masks[0, 30, 30] == 4 + front
    assert frames[0, :, 5, 5].tolist() == [100, 100, 100] and instances[0, 5, 5] == masks[0, 5, 5] == 0
    # A 28 px garment at integer x is sampled at its own pixel centres: it covers exactly x .. x + 27.
    boxes, visible = instance_boxes(instances, 3)
    extent = {0: [10, 10, 38, 38], 1: [24, 24, 52, 52]}
    assert boxes[0, :2].tolist() == [extent[order[0]], extent[order[1]]]
    assert int((instances == 2).sum()) == 28 * 28  # the front one whole,
    assert int((instances == 1).sum()) == 28 * 28 - 14 * 14  # the back one less the 14 x 14 overlap
    assert visible[0].tolist() == [True, True, False]  # the inactive slot draws nothing


def test_boxes_are_the_extents_of_the_visible_pixels_and_garments_move():
    clip = make_clip(2, "test", 12, (64, 96), make_config({"objects": [3, 4], "speed": [0.03, 0.05]}))
    for t in range(12):
        for j in range(len(clip.labels)):
            ys, xs = torch.nonzero(clip.instances[t] == j + 1, as_tuple=True)
            assert bool(clip.visible[t, j]) == (len(ys) > 0)
            if len(ys):
                assert clip.boxes[t, j].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                assert clip.frame_boxes(t)[[d["instance"] for d in clip.frame_boxes(t)].index(j + 1)]["box"] == \
                    clip.boxes[t, j].tolist()
    assert not torch.equal(clip.boxes[0], clip.boxes[-1])  # they move


def test_config_is_validated():
    with pytest.raises(ClipError, match="unknown key.*colour.*known keys: objects"):
        make_config({"colour": 1})
    for bad in ({"objects": [3, 2]}, {"scale": [0, 0.5]}, {"train_frames": 0}, {"speed": [0.1]}):
        with pytest.raises(ClipError):
            make_config(bad)


def test_mp4_round_trip_through_the_cli(tmp_path, capsys):
    out = tmp_path / "clips"
    r = subprocess.run([sys.executable, "-m", "training", "clips", "--out-dir", str(out), "--n", "2", "--frames", "6",
                        "--size", "48", "64", "--fps", "25", "--seed", "3", "--noise", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.glob("*.mp4")) == ["test-00003.mp4", "test-00004.mp4"]
    import av

    with av.open(str(out / "test-00003.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 25
        assert (stream.codec_context.width, stream.codec_context.height) == (64, 48)
    frames, gt, maps = read_clip(out / "test-00003.mp4")
    clip = make_clip(3, "test", 6, (48, 64), QUIET)
    assert frames.shape == clip.frames.shape == (6, 3, 48, 64)
    diff = (frames.float() - clip.frames.float()).abs()
    # H.264 at CRF 18 with 4:2:0 chroma (each 2x2 block shares its colour): close, not exact; small frames are
    # mostly edges (about 6 on average here, 3 at 224 px)
    assert diff.median() <= 4 and diff.mean() < 8
    assert torch.equal(maps["masks"], clip.masks) and torch.equal(maps["instances"], clip.instances)
    assert gt["fps"] == 25 and gt["frames"] == 6 and gt["classes"][0] == "background"
    assert [[d["box"] for d in frame] for frame in gt["boxes"]] == [[d["box"] for d in clip.frame_boxes(t)]
                                                                   for t in range(6)]
    assert json.loads((out / "test-00003.gt.json").read_text())["seed"] == 3
    # the error path in-process (the same main(); one interpreter start per test is enough)
    assert cli_main(["clips", "--out-dir", str(out), "--n", "1", "--frames", "2", "--size", "49"]) == 2
    assert "even frame sides" in capsys.readouterr().err


def test_decoding_a_damaged_clip_is_a_clear_error(tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + np.random.default_rng(0).bytes(500))
    with pytest.raises(ClipError, match="cannot read clip"):
        read_clip(tmp_path / "x.mp4")
