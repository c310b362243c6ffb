"""Video test material: a tiny segmentation checkpoint, real clips from the moving Fashion-MNIST generator, and
bodies that are broken in each way a client can break them."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

TINY_SEG_ARGS = {"img_size": 64, "depth": 1, "dim": 32, "heads": 2, "mlp_dim": 64, "head_width": 16,
                 "detail_width": 8, "num_classes": 11}


def tiny_seg_checkpoint(seed: int = 0, size: int = 64) -> dict[str, Any]:
    """A random-weight ViT segmentation model from the registry (vit_seg_tiny at toy width), 64 px frames."""
    from training.clips import CLASSES, MEAN, STD
    from training.models import get_model
    from training.presets import make_preprocess

    torch.manual_seed(seed)
    args = {**TINY_SEG_ARGS, "img_size": size}
    model = get_model("vit_seg_tiny", **args)
    return {"arch": "vit_seg_tiny", "model_args": args, "state_dict": model.state_dict(), "classes": CLASSES,
            "task": "segmentation", "preprocess": make_preprocess(size, 3, MEAN, STD, crop=False),
            "metrics": {"seed": seed}, "recipe": {"name": "tiny-seg-test"}}


def write_test_clip(path: Path, seed: int = 1, frames: int = 24, size: int | tuple[int, int] = 64,
                    fps: float = 30.0) -> bytes:
    """A moving Fashion-MNIST test-split clip written as H.264 MP4 by the generator; returns its bytes."""
    from training.clips import make_clip, write_clip

    return write_clip(path, make_clip(seed, "test", frames, size), fps).read_bytes()


def boxes(data: bytes) -> dict[bytes, tuple[int, int]]:
    """Top-level MP4 boxes: type -> (offset, size)."""
    out, pos = {}, 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        out[kind] = (pos, size)
        pos += size
    return out


def corrupt_frames(data: bytes, seed: int = 0, n: int = 64) -> bytes:
    """Flip `n` bytes inside the coded frames (the mdat payload, past the first frame): the container still
    opens, the damage shows while decoding."""
    start, size = boxes(data)[b"mdat"]
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for i in rng.integers(start + size // 4, start + size, n):
        out[i] ^= 0xFF
    return bytes(out)


def zero_frame_mp4() -> bytes:
    """An MP4 whose H.264 track holds no frame (header written, nothing encoded)."""
    import av

    buf = io.BytesIO()
    container = av.open(buf, "w", format="mp4")
    stream = container.add_stream("libx264", rate=30)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    container.start_encoding()
    container.close()
    return buf.getvalue()


AVI_HEAD = b"RIFF\x00\x10\x00\x00AVI LIST" + bytes(64)
