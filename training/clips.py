"""Moving Fashion-MNIST: synthetic video with exact ground truth, in the spirit of Moving MNIST (Srivastava et
al., 2015). 1-4 tinted garments per clip glide and bounce off the frame edges over a textured, cluttered, noisy
background; later garments occlude earlier ones. Every frame comes with a class mask (0 = background), an
instance map and one box per visible garment, all taken from what is drawn (a garment covers a pixel where its
upscaled Fashion-MNIST image is brighter than COVER; that pixel then shows only that garment's tint).

Garments come from disjoint pools: `train` (the first 54k Fashion-MNIST training images), `val` (the last 6k)
and `test` (the 10k test images), so clips for evaluation never show a garment seen in training.
Rendering is batched torch code (one grid_sample for every garment of every frame), deterministic from a seed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training.data import FASHION_MNIST_CLASSES, fashion_mnist_arrays

CLASSES = ["background", *FASHION_MNIST_CLASSES]  # class index k in a mask is CLASSES[k]
SPLITS = ("train", "val", "test")
VAL_START = 54_000  # training images from here on form the val pool
COVER = 0.2  # a garment covers a pixel where its bilinearly upscaled intensity (0..1) exceeds this
SHADE_MIN = 0.3  # a covered pixel shows tint * (SHADE_MIN + (1 - SHADE_MIN) * intensity)
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]  # normalisation of the frames (0..1 units)


class ClipError(ValueError):
    """Clip knobs or files that cannot be used as given."""


@dataclass(kw_only=True)
class ClipConfig:
    """The knobs of the moving_fmnist dataset (a recipe's `data_args`; an unknown key is an error)."""

    objects: tuple[int, int] = (1, 4)  # garments per clip, inclusive range
    scale: tuple[float, float] = (0.28, 0.45)  # garment side / shorter frame side
    speed: tuple[float, float] = (0.008, 0.03)  # pixels per frame / shorter frame side
    clutter: int = 3  # up to this many plain ellipses and boxes in the background
    noise: float = 6.0  # std of the per-frame pixel noise (0..255 units)
    train_frames: int = 16_384  # frames per training epoch, freshly drawn every epoch
    val_frames: int = 256  # fixed validation frames (val pool)
    test_clips: int = 32  # held-out clips (test pool) scored at the end of training and by eval
    clip_frames: int = 16  # frames per test clip

    def __post_init__(self) -> None:
        self.objects, self.scale, self.speed = tuple(self.objects), tuple(self.scale), tuple(self.speed)
        checks = [
            (len(self.objects) == 2 and 1 <= self.objects[0] <= self.objects[1],
             "objects must be [min, max], 1 <= min <= max"),
            (len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1, "scale must be [min, max] in (0, 1]"),
            (len(self.speed) == 2 and 0 <= self.speed[0] <= self.speed[1], "speed must be [min, max], 0 <= min <= max"),
            (self.clutter >= 0 and self.noise >= 0, "clutter and noise must be >= 0"),
            (min(self.train_frames, self.val_frames, self.test_clips, self.clip_frames) >= 1,
             "train_frames, val_frames, test_clips and clip_frames must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ClipError(msg)


def make_config(values: dict[str, Any] | None, source: str = "data_args") -> ClipConfig:
    """A ClipConfig from a mapping; an unknown key or a bad value is a ClipError naming the known keys."""
    known = [f.name for f in dataclasses.fields(ClipConfig)]
    unknown = sorted(set(values or {}) - set(known))
    if unknown:
        raise ClipError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(known)}")
    try:
        return ClipConfig(**(values or {}))
    except (TypeError, ClipError) as e:
        raise ClipError(f"{source}: {e}") from None


@functools.lru_cache(maxsize=4)
def garment_pool(split: str, root: str | None = None, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 28, 28), class indices int64 (N,) in 1..10) of one split's garments, on `device`."""
    if split not in SPLITS:
        raise ClipError(f"split must be one of {SPLITS}, got {split!r}")
    arrays = fashion_mnist_arrays(root)
    prefix = "t10k" if split == "test" else "train"
    images, labels = arrays[f"{prefix}-images-idx3"], arrays[f"{prefix}-labels-idx1"]
    part = {"train": slice(0, VAL_START), "val": slice(VAL_START, None), "test": slice(None)}[split]
    return (torch.from_numpy(images[part].copy()).to(device),
            torch.from_numpy(labels[part].astype(np.int64) + 1).to(device))


def split_generator(seed: int, split: str, *extra: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for (seed, split, ...): train clip 3 and test clip 3 share no random numbers. Frames are drawn
    on the generator's device (a GPU draws its own training frames; CPU and GPU draws differ)."""
    state = np.random.SeedSequence([seed, SPLITS.index(split), *extra]).generate_state(2)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class Scenes:
    """B scenes of J garment slots; slot j is drawn over slots < j (z-order); an inactive slot draws nothing."""

    garments: torch.Tensor  # (B, J, 28, 28) uint8
    labels: torch.Tensor  # (B, J) int64, class index 1..10 (0 where inactive)
    active: torch.Tensor  # (B, J) bool
    tints: torch.Tensor  # (B, J, 3) float, 0..255
    sides: torch.Tensor  # (B, J) float, garment side in pixels
    starts: torch.Tensor  # (B, J, 2) float, top-left (x, y) at frame 0
    velocity: torch.Tensor  # (B, J, 2) float, pixels per frame
    background: torch.Tensor  # (B, 3, H, W) float, 0..255

    def select(self, index: torch.Tensor) -> Scenes:
        return Scenes(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def sample_scenes(gen: torch.Generator, n: int, split: str, size: tuple[int, int], cfg: ClipConfig,
                  root: str | None = None) -> Scenes:
    """n random scenes of one split's garments for frames of size (H, W)."""
    dev = gen.device
    images, classes = garment_pool(split, root, str(dev))
    h, w = size
    short, slots = min(h, w), cfg.objects[1]
    count = torch.randint(cfg.objects[0], cfg.objects[1] + 1, (n, 1), generator=gen, device=dev)
    active = torch.arange(slots, device=dev).view(1, -1) < count
    pick = torch.randint(0, len(images), (n, slots), generator=gen, device=dev)
    sides = short * _uniform(gen, (n, slots), *cfg.scale)
    span = torch.stack([w - sides, h - sides], dim=-1).clamp(min=0)
    angle = _uniform(gen, (n, slots), 0, 2 * torch.pi)
    speed = short * _uniform(gen, (n, slots), *cfg.speed)
    return Scenes(garments=images[pick], labels=classes[pick] * active, active=active,
                  tints=_tints(gen, (n, slots)), sides=sides, starts=_uniform(gen, (n, slots, 2), 0, 1) * span,
                  velocity=torch.stack([angle.cos(), angle.sin()], dim=-1) * speed[..., None],
                  background=backgrounds(gen, n, size, cfg.clutter))


def _uniform(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen, device=gen.device)


def _tints(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Saturated, fairly bright colours (HSV: any hue, saturation 0.35-1, value 0.7-1) in 0..255."""
    hue, sat, val = _uniform(gen, shape, 0, 1), _uniform(gen, shape, 0.35, 1), _uniform(gen, shape, 0.7, 1)
    k = (torch.tensor([5.0, 3.0, 1.0], device=gen.device) + hue[..., None] * 6) % 6
    return 255 * val[..., None] * (1 - sat[..., None] * (torch.minimum(k, 4 - k).clamp(0, 1)))


def backgrounds(gen: torch.Generator, n: int, size: tuple[int, int], clutter: int) -> torch.Tensor:
    """(n, 3, H, W) float 0..255: a base colour, coarse and medium colour noise, stripes and a few
    plain ellipses and boxes (garment-sized blobs that are not garments), so neither colour nor brightness nor
    'anything that is not smooth' finds the garments."""
    h, w = size
    low = (max(2, h // 4), max(2, w // 4))  # smooth noise is built at quarter resolution, then upsampled once
    dev = gen.device
    bg = _uniform(gen, (n, 3, 1, 1), 28, 228)
    for cells, amp in ((4, 40.0), (max(2, min(h, w) // 8), 18.0)):
        noise = torch.randn(n, 3, cells, cells, generator=gen, device=dev)
        bg = bg + amp * F.interpolate(noise, size=low, mode="bicubic", align_corners=False)
    bg = F.interpolate(bg, size=(h, w), mode="bilinear", align_corners=False)
    ys, xs = torch.arange(h, device=dev).view(1, h, 1).float(), torch.arange(w, device=dev).view(1, 1, w).float()
    angle, freq = _uniform(gen, (n, 1, 1), 0, torch.pi), _uniform(gen, (n, 1, 1), 2, 12) / min(h, w)
    phase, amp = _uniform(gen, (n, 1, 1), 0, 2 * torch.pi), _uniform(gen, (n, 1, 1, 1), 0, 35)
    stripes = torch.sin(2 * torch.pi * freq * (xs * angle.cos() + ys * angle.sin()) + phase)
    bg = bg + amp * _uniform(gen, (n, 3, 1, 1), -1, 1) * stripes[:, None]
    if clutter:
        k = clutter
        cx, cy = _uniform(gen, (n, k, 1, 1), 0, w), _uniform(gen, (n, k, 1, 1), 0, h)
        rx, ry = (min(h, w) * _uniform(gen, (n, k, 1, 1), 0.05, 0.2) for _ in range(2))
        dx, dy = (xs[:, None] - cx) / rx, (ys[:, None] - cy) / ry
        box = _uniform(gen, (n, k, 1, 1), 0, 1) < 0.5
        inside = torch.where(box, torch.maximum(dx.abs(), dy.abs()) <= 1, dx**2 + dy**2 <= 1)  # (n, k, H, W)
        inside &= _uniform(gen, (n, k, 1, 1), 0, 1) < 0.7  # some slots stay empty
        colours = _tints(gen, (n, k))  # (n, k, 3)
        for j in range(k):
            bg = torch.where(inside[:, j, None], colours[:, j, :, None, None], bg)
    return bg.clamp(0, 255)


def positions(scenes: Scenes, t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Top-left (x, y) of every garment at frame t (B,): straight lines folded back at the frame edges."""
    h, w = size
    span = torch.stack([w - scenes.sides, h - scenes.sides], dim=-1).clamp(min=1e-6)  # (B, J, 2)
    p = scenes.starts + scenes.velocity * t.view(-1, 1, 1).float()
    return span - (torch.remainder(p, 2 * span) - span).abs()


def render(scenes: Scenes, pos: torch.Tensor, size: tuple[int, int], noise: float,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw B frames: (frames uint8 (B, 3, H, W), class masks int64 (B, H, W), instance maps int64 (B, H, W)).
    Instance id j + 1 is slot j; 0 is background. The masks hold exactly the pixels each garment shows."""
    h, w = size
    b, j = scenes.active.shape
    # Each garment is sampled on its own crop of side c (its side plus the sub-pixel offset), at the same pixel
    # centres as a whole-frame sampling would use, then pasted back to front into a canvas padded by c.
    c = int(scenes.sides.max().ceil()) + 2
    sides, x0, y0 = scenes.sides.reshape(-1), pos[..., 0].reshape(-1), pos[..., 1].reshape(-1)
    ix, iy = x0.floor(), y0.floor()
    dev = scenes.sides.device
    theta = torch.zeros(b * j, 2, 3, device=dev)  # crop pixel -> garment coordinates (affine_grid's [-1, 1] units)
    theta[:, 0, 0], theta[:, 0, 2] = c / sides, (c - 2 * (x0 - ix)) / sides - 1
    theta[:, 1, 1], theta[:, 1, 2] = c / sides, (c - 2 * (y0 - iy)) / sides - 1
    grid = F.affine_grid(theta, [b * j, 1, c, c], align_corners=False)
    garments = scenes.garments.reshape(b * j, 1, 28, 28).float() / 255
    crops = F.grid_sample(garments, grid, mode="bilinear", padding_mode="zeros", align_corners=False).view(b, j, c, c)
    covers = (crops > COVER) & scenes.active.view(b, j, 1, 1)
    instances = torch.zeros(b, h + c, w + c, dtype=torch.long, device=dev)
    shade = torch.zeros(b, h + c, w + c, device=dev)
    span = torch.arange(c, device=dev)
    rows = (iy.long().view(b, j, 1) + span).view(b, j, c, 1)
    cols = (ix.long().view(b, j, 1) + span).view(b, j, 1, c)
    batch = torch.arange(b, device=dev).view(b, 1, 1)
    for k in range(j):  # back to front: a later garment overwrites what it covers
        at = (batch, rows[:, k], cols[:, k])
        instances[at] = torch.where(covers[:, k], k + 1, instances[at])
        shade[at] = torch.where(covers[:, k], crops[:, k], shade[at])
    instances, shade = instances[:, :h, :w].contiguous(), shade[:, :h, :w]
    top = (instances - 1).clamp(min=0)
    tint = scenes.tints.gather(1, top.view(b, -1, 1).expand(-1, -1, 3)).transpose(1, 2).view(b, 3, h, w)
    drawn = tint * (SHADE_MIN + (1 - SHADE_MIN) * shade[:, None])
    frames = torch.where(instances[:, None] > 0, drawn, scenes.background)
    if noise:
        frames = frames + noise * torch.randn(b, 3, h, w, generator=gen, device=gen.device)
    masks = scenes.labels.gather(1, top.view(b, -1)).view(b, h, w) * (instances > 0)
    return frames.round().clamp(0, 255).to(torch.uint8), masks, instances


def instance_boxes(instances: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes int64 (T, J, 4) as [x0, y0, x1, y1] with x1/y1 exclusive, visible (T, J) bool) of instance maps."""
    ids = torch.arange(1, slots + 1, device=instances.device).view(1, -1, 1, 1)
    hit = instances[:, None] == ids  # (T, J, H, W)
    cols, rows = hit.any(dim=2), hit.any(dim=3)  # (T, J, W), (T, J, H)
    visible = cols.any(dim=-1)

    def extent(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(a.shape[-1], device=a.device)
        return torch.where(a, idx, a.shape[-1]).amin(-1), torch.where(a, idx + 1, 0).amax(-1)

    (x0, x1), (y0, y1) = extent(cols), extent(rows)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1) * visible[..., None]
    return boxes, visible


def frame_batch(gen: torch.Generator, n: int, split: str, size: tuple[int, int], cfg: ClipConfig,
                root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n independent frames (each a random moment of a random clip): (uint8 (n, 3, H, W), masks int64 (n, H, W))."""
    scenes = sample_scenes(gen, n, split, size, cfg, root)
    frames, masks, _ = render(scenes, scenes.starts, size, cfg.noise, gen)
    return frames, masks


@dataclass
class Clip:
    frames: torch.Tensor  # (T, 3, H, W) uint8, RGB
    masks: torch.Tensor  # (T, H, W) int64, class index (0 = background)
    instances: torch.Tensor  # (T, H, W) int64, instance id (0 = none; id j + 1 is garment j, drawn over ids <= j)
    labels: torch.Tensor  # (J,) int64, class index of each instance id - 1
    tints: torch.Tensor  # (J, 3) float, 0..255
    boxes: torch.Tensor  # (T, J, 4) int64, [x0, y0, x1, y1] with x1/y1 exclusive; zeros where not visible
    visible: torch.Tensor  # (T, J) bool
    seed: int
    split: str

    def frame_boxes(self, t: int) -> list[dict[str, Any]]:
        """Ground-truth detections of frame t: one per visible instance."""
        return [{"instance": j + 1, "label": CLASSES[int(self.labels[j])], "index": int(self.labels[j]),
                 "box": self.boxes[t, j].tolist()} for j in range(len(self.labels)) if self.visible[t, j]]


def make_clip(seed: int, split: str = "test", frames: int = 16, size: int | tuple[int, int] = 224,
              config: ClipConfig | None = None, root: str | None = None) -> Clip:
    """One clip, the same for the same arguments on every run. `size` is a side or (H, W)."""
    cfg = config or ClipConfig()
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if frames < 1 or min(hw) < 16:
        raise ClipError(f"a clip needs >= 1 frame and sides >= 16 px, got {frames} frames of {hw}")
    gen = split_generator(seed, split)
    scene = sample_scenes(gen, 1, split, hw, cfg, root)
    keep = scene.active[0]
    parts = []
    for start in range(0, frames, 16):  # chunks bound the (frames x garments x H x W) sampling grid
        t = torch.arange(start, min(frames, start + 16))
        chunk = scene.select(torch.zeros(len(t), dtype=torch.long))
        parts.append(render(chunk, positions(chunk, t, hw), hw, cfg.noise, gen))
    video, masks, instances = (torch.cat(p) for p in zip(*parts))
    slots = int(keep.sum())  # active slots come first: ids 1..slots
    boxes, visible = instance_boxes(instances, slots)
    return Clip(video, masks, instances, scene.labels[0, :slots], scene.tints[0, :slots], boxes, visible, seed, split)


def clip_stem(split: str, seed: int) -> str:
    return f"{split}-{seed:05d}"


def write_clip(path: str | os.PathLike, clip: Clip, fps: float = 30.0, crf: int = 18) -> Path:
    """Write clip as H.264 MP4 (yuv420p, libx264 via PyAV) plus <stem>.gt.npz (masks, instances) and
    <stem>.gt.json (classes, fps, size, instances, boxes per frame). Returns the MP4 path."""
    import av

    path = Path(path)
    t, _, h, w = clip.frames.shape
    if h % 2 or w % 2:
        raise ClipError(f"H.264 in yuv420p needs even frame sides, got {w}x{h}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))  # 29.97 -> 30000/1001
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for rgb in clip.frames.permute(0, 2, 3, 1).numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
        container.mux(stream.encode())
    stem = path.with_suffix("")
    np.savez_compressed(f"{stem}.gt.npz", masks=clip.masks.to(torch.uint8).numpy(),
                        instances=clip.instances.to(torch.uint8).numpy())
    instances = [{"instance": j + 1, "label": CLASSES[int(k)], "index": int(k)} for j, k in enumerate(clip.labels)]
    gt = {"classes": CLASSES, "fps": fps, "frames": t, "width": w, "height": h, "seed": clip.seed,
          "split": clip.split, "instances": instances, "boxes": [clip.frame_boxes(i) for i in range(t)]}
    Path(f"{stem}.gt.json").write_text(json.dumps(gt))
    return path


def read_clip(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any], dict[str, torch.Tensor]]:
    """Decode an MP4 written by write_clip: (frames uint8 (T, 3, H, W), the .gt.json dict, {masks, instances})."""
    import av

    path = Path(path)
    stem = path.with_suffix("")
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        gt = json.loads(Path(f"{stem}.gt.json").read_text())
        with np.load(f"{stem}.gt.npz") as arrays:
            maps = {k: torch.from_numpy(arrays[k].astype(np.int64)) for k in ("masks", "instances")}
    except (OSError, av.error.FFmpegError, ValueError) as e:
        raise ClipError(f"cannot read clip {path} with its ground truth: {e}") from None
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2), gt, maps


def write_clips(out_dir: str | os.PathLike, n: int, split: str = "test", frames: int = 64,
                size: int | tuple[int, int] = 224, fps: float = 30.0, seed: int = 0,
                config: ClipConfig | None = None, root: str | None = None) -> list[Path]:
    """Clips with seeds seed..seed+n-1, written as <out_dir>/<split>-<seed>.mp4 with their ground truth."""
    out = Path(out_dir)
    return [write_clip(out / f"{clip_stem(split, s)}.mp4", make_clip(s, split, frames, size, config, root), fps)
            for s in range(seed, seed + n)]
