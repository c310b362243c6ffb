"""The moving_fmnist dataset for the training loop: fresh frames every training step, fixed val frames, and the
held-out test clips (test-pool garments) that training and `python -m training eval` score.

Loaders yield (uint8 frames (N, 3, H, W), int64 class masks (N, H, W)) like the classification loaders yield
(images, labels), so the same loop trains both; normalisation is presets.normalize/eval_batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from training.clips import CLASSES, MEAN, STD, ClipConfig, frame_batch, make_clip, split_generator
from training.data import DatasetInfo

DATASET = "moving_fmnist"
DEFAULT_SIZE = 224
_VAL_SEED, _CHUNK = 1, 64


def dataset_info(size: int | None) -> DatasetInfo:
    return DatasetInfo(DATASET, list(CLASSES), 3, size or DEFAULT_SIZE, list(MEAN), list(STD), in_memory=False)


def limited(cfg: ClipConfig, limit: int | None) -> ClipConfig:
    """`limit` (quick runs) caps training and val frames, and test frames to whole clips."""
    if limit is None:
        return cfg
    return ClipConfig(**{**cfg.__dict__, "train_frames": min(cfg.train_frames, limit),
                         "val_frames": min(cfg.val_frames, limit),
                         "test_clips": max(1, min(cfg.test_clips, math.ceil(limit / cfg.clip_frames)))})


class FrameStream:
    """`cfg.train_frames // batch_size` batches per epoch, each drawn fresh from the train pool. Batch i of epoch
    e is drawn from (seed, e, i), so a resumed run sees the frames an uninterrupted one would."""

    def __init__(self, cfg: ClipConfig, size: int, batch_size: int, seed: int, root: str | None = None,
                 device: torch.device | str = "cpu"):
        self.cfg, self.size, self.batch_size, self.seed, self.root, self.epoch = cfg, size, batch_size, seed, root, 0
        self.device = torch.device(device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, self.cfg.train_frames // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        for i in range(len(self)):
            gen = split_generator(self.seed, "train", epoch, i, device=self.device)
            yield frame_batch(gen, self.batch_size, "train", (self.size, self.size), self.cfg, self.root)


@dataclass
class FrameSet:
    """Fixed frames held in memory: uint8 frames, uint8 masks and (test clips) uint8 instance maps."""

    frames: torch.Tensor  # (N, 3, H, W) uint8
    masks: torch.Tensor  # (N, H, W) uint8
    instances: torch.Tensor | None = None  # (N, H, W) uint8
    batch_size: int = 32

    def __len__(self) -> int:
        return math.ceil(len(self.frames) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.frames), self.batch_size):
            yield self.frames[i:i + self.batch_size], self.masks[i:i + self.batch_size].long()


def val_set(cfg: ClipConfig, size: int, batch_size: int, root: str | None = None) -> FrameSet:
    parts = [frame_batch(split_generator(_VAL_SEED, "val", i), min(_CHUNK, cfg.val_frames - start), "val",
                         (size, size), cfg, root) for i, start in enumerate(range(0, cfg.val_frames, _CHUNK))]
    return FrameSet(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).to(torch.uint8),
                    batch_size=batch_size)


def test_set(cfg: ClipConfig, size: int, batch_size: int, root: str | None = None) -> FrameSet:
    """Clips 0..test_clips-1 of the test split: what `python -m training clips --split test --seed 0
    --frames <clip_frames> --size <size>` writes as MP4."""
    clips = [make_clip(seed, "test", cfg.clip_frames, size, cfg, root) for seed in range(cfg.test_clips)]
    return FrameSet(torch.cat([c.frames for c in clips]), torch.cat([c.masks for c in clips]).to(torch.uint8),
                    torch.cat([c.instances for c in clips]).to(torch.uint8), batch_size)


def make_loaders(cfg: ClipConfig, size: int, batch_size: int, seed: int, root: str | None = None,
                 device: torch.device | str = "cpu") -> tuple[FrameStream, FrameSet, FrameSet]:
    """Training frames are drawn on `device` (on a GPU the generator keeps up with the model); the fixed val and
    test frames are drawn on the CPU, so they are the same whatever trains on them."""
    return (FrameStream(cfg, size, batch_size, seed, root, device), val_set(cfg, size, batch_size, root),
            test_set(cfg, size, batch_size, root))
