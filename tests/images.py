"""Test images of every kind, generated in memory with PIL (no files, no network)."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image

# exif_transpose applies these per orientation; storing the inverse makes the displayed image the original.
_INVERSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_270}


def photo(w: int = 64, h: int = 48, seed: int = 0, mode: str = "RGB", noise: float = 25.0) -> Image.Image:
    """Smooth gradients plus noise: structured enough that different images get different predictions.
    Lossy-format comparisons want little `noise` (JPEG smooths it away)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / max(w - 1, 1), y / max(h - 1, 1), (x + y) / max(w + h - 2, 1)], -1) * 200
    a = np.clip(base + rng.normal(0, noise, (h, w, 3)) + seed * 7 % 50, 0, 255).astype(np.uint8)
    return Image.fromarray(a, "RGB").convert(mode)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


def with_orientation(img: Image.Image, orientation: int, fmt: str = "PNG") -> bytes:
    """Pixels stored transposed plus an EXIF Orientation tag, so a viewer shows exactly `img`."""
    stored = img.transpose(_INVERSE[orientation]) if orientation in _INVERSE else img.copy()
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, fmt, exif=exif.tobytes())


def rgba(w: int = 40, h: int = 30) -> Image.Image:
    """Opaque photo on the left half, fully transparent (black underneath) on the right half."""
    img = photo(w, h).convert("RGBA")
    a = np.array(img)
    a[:, w // 2:, :3] = 0
    a[:, w // 2:, 3] = 0
    return Image.fromarray(a, "RGBA")


def cutout(item: np.ndarray, threshold: int = 100) -> tuple[bytes, bytes]:
    """(opaque PNG, RGBA PNG) of a white-on-black grayscale item (Fashion-MNIST style): the opaque one shows the
    item on pure black; the RGBA cut-out keeps the item opaque and makes the rest transparent, with white under
    the transparent pixels (what an editor's "remove background" leaves behind)."""
    item = np.where(item < threshold, 0, item).astype(np.uint8)
    alpha = np.where(item > 0, 255, 0).astype(np.uint8)
    rgba = np.stack([np.where(item > 0, item, 255)] * 3 + [alpha], -1).astype(np.uint8)
    return encode(Image.fromarray(item, "L"), "PNG"), encode(Image.fromarray(rgba, "RGBA"), "PNG")


def palette_with_transparency(w: int = 40, h: int = 30) -> Image.Image:
    """A "P" image whose palette index 0 is transparent (the classic GIF/PNG-8 case)."""
    img = photo(w, h).quantize(16)
    a = np.array(img)
    a[: h // 2] = 0
    out = Image.fromarray(a, "P")
    out.putpalette(img.getpalette())
    out.info["transparency"] = 0
    return out


def gray16(w: int = 40, h: int = 30) -> np.ndarray:
    """A 16-bit ramp using the whole 0..65535 range (clipping it to 8 bits would make it almost all white)."""
    return (np.linspace(0, 65535, w * h).reshape(h, w)).astype(np.uint16)


def animated_gif(w: int = 32, h: int = 24) -> bytes:
    """Two frames: the first is the photo, the second pure red; decoders must use the first."""
    first = photo(w, h).quantize(64)
    second = Image.new("RGB", (w, h), (255, 0, 0)).quantize(4)
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels but carries no real pixel data: decoding it would fail, so a 413 proves
    the limit was enforced from the header alone."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def tiny_checkpoint(channels: int = 1, size: int = 28, resize: int | None = None, num_classes: int = 10,
                    seed: int = 0) -> dict:
    """A LeNet-5 checkpoint with random weights, in the project's checkpoint format."""
    import torch

    from training.models import get_model
    from training.presets import make_preprocess

    torch.manual_seed(seed)
    args = {"num_classes": num_classes, "in_channels": channels, "img_size": size}
    model = get_model("lenet5", **args).eval()
    mean, std = [0.5] * channels, [0.25] * channels
    return {"arch": "lenet5", "model_args": args, "state_dict": model.state_dict(),
            "classes": [f"class{i}" for i in range(num_classes)],
            "preprocess": make_preprocess(size, channels, mean, std, resize=resize),
            "metrics": {}, "recipe": {}}
