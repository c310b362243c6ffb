"""Image bytes -> uint8 tensor (C, H, W), with the checks a public endpoint needs. No TorchServe import.

Two decoders share one set of rules:
- `decode_image` (PIL): every accepted format, EXIF orientation, mode conversion, JPEG draft decoding.
- `decode_jpegs` (torchvision/nvjpeg): a whole list of JPEGs in one call on the GPU; whatever it cannot take
  (CMYK, odd streams) falls back to `decode_image` item by item.
Both check the pixel count from the header (Image.open reads only the header) before any pixel is decoded.
`image_pixels` is that header check on its own: the shared flow uses it to hold each request and each decoded
chunk to a pixel budget before decoding (handlers/pipeline.py).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from handlers.errors import BadInput
from handlers.request import MAX_REQUEST_BYTES
from training.presets import DEFAULT_BACKGROUND

# A truncated file must be an error, not a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Formats we open. Restricting Image.open keeps e.g. EPS (which would run Ghostscript) out of reach.
# (Multi-picture JPEGs open through the JPEG plugin and report format "MPO".)
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# Decoded-pixel budgets per byte of the largest request: 4 pixels per byte (2 bits per pixel, what a JPEG photo
# takes at ordinary qualities) lets any such request of photos through and refuses bodies that inflate far more
# (a uniform 6000x6000 PNG is 36 M pixels in ~40 KB).
PIXELS_PER_REQUEST_BYTE = 4


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 40_000_000        # width * height from the header; bigger -> 413 before decoding
    max_bytes: int = MAX_REQUEST_BYTES  # encoded size of one image; bigger -> 413
    jpeg_draft: bool = True             # let libjpeg decode at 1/2, 1/4, 1/8 scale when that still covers `resize`
    # header pixels of all the images of one request; more -> 413 TooManyPixels before any is decoded
    max_request_pixels: int = PIXELS_PER_REQUEST_BYTE * MAX_REQUEST_BYTES
    # pixels a worker holds decoded at once: a chunk of the batch closes before it would pass this
    max_batch_pixels: int = PIXELS_PER_REQUEST_BYTE * MAX_REQUEST_BYTES

    def __post_init__(self) -> None:
        if not 1 <= self.max_pixels <= min(self.max_request_pixels, self.max_batch_pixels):
            raise ValueError(f"max_image_pixels ({self.max_pixels}) must be >= 1 and at most max_request_pixels "
                             f"({self.max_request_pixels}) and max_batch_pixels ({self.max_batch_pixels})")


def open_image(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Parse the header only and enforce the size limits. Raises BadInput (400/413)."""
    _check_bytes(data, limits)
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise BadInput(413, "ImageTooLarge", f"image dimensions are too large ({e})") from None
    except MemoryError:
        raise
    except Exception:  # PIL raises many types on hostile headers (UnidentifiedImageError, struct.error, ...)
        raise BadInput(400, "InvalidImage", "the data is not an image we can read; send one of "
                       f"{', '.join(f.lower() for f in FORMATS)}") from None
    _check_size(*img.size, limits)
    return img


def image_pixels(data: bytes, limits: DecodeLimits) -> int:
    """width * height from the header alone (nothing decoded), with `open_image`'s checks and errors. PNG and JPEG
    sizes are read straight from their IHDR / frame headers (a few microseconds; PIL's full header parse costs
    several times more, and it runs again when the image is decoded); other formats go through PIL."""
    size = _header_size(data)
    if size is None:
        w, h = open_image(data, limits).size
    else:
        _check_bytes(data, limits)
        w, h = _check_size(*size, limits)
    return w * h


def _check_bytes(data: bytes, limits: DecodeLimits) -> None:
    if not data:
        raise BadInput(400, "EmptyBody", "the request has no image data; send JPEG/PNG/WebP/BMP/GIF/TIFF bytes")
    if len(data) > limits.max_bytes:
        raise BadInput(413, "PayloadTooLarge", f"image is {len(data)} bytes; the limit is {limits.max_bytes} bytes")


def _check_size(w: int, h: int, limits: DecodeLimits) -> tuple[int, int]:
    if w * h > limits.max_pixels:
        raise BadInput(413, "ImageTooLarge", f"image is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels}; "
                       "downscale it before sending")
    if w < 1 or h < 1:
        raise BadInput(400, "InvalidImage", f"image has no pixels ({w}x{h})")
    return w, h


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_FRAMES = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))  # SOFn


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR or a JPEG's frame header; None for anything else or anything odd (PIL
    then decides). A JPEG with several frame headers before its first scan reports the largest, so the count
    is never below what a decoder would produce."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] != b"\xff\xd8":
        return None
    i, best = 2, None
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker == 0xDA:  # start of scan: the frame header came before it
            return best
        if marker in _JPEG_FRAMES and i + 9 <= len(data):
            h, w = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            best = (w, h) if best is None or w * h > best[0] * best[1] else best
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def decode_image(data: bytes, channels: int, limits: DecodeLimits = DecodeLimits(),
                 min_side: int | None = None, background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> torch.Tensor:
    """Bytes -> uint8 (channels, H, W) on CPU. `min_side` (the preprocess resize) allows JPEG draft decoding
    at a reduced scale that still leaves the shorter side >= min_side; transparency goes on `background`."""
    img = open_image(data, limits)
    if limits.jpeg_draft and min_side and img.format in ("JPEG", "MPO"):
        _draft(img, channels, min_side)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_tensor(to_mode(img, channels, background))
    except (BadInput, MemoryError):
        raise
    except Exception as e:  # truncated or corrupt pixel data (OSError, SyntaxError, ValueError, ...)
        raise BadInput(400, "InvalidImage", f"the image data is truncated or corrupt ({e})") from None


def _draft(img: Image.Image, channels: int, min_side: int) -> None:
    """Ask libjpeg for a reduced-scale decode (1/2..1/8) only as far as the shorter side stays >= min_side."""
    w, h = img.size
    scale = min(w, h) / min_side
    if scale < 2:
        return
    req = (max(1, -(-w * min_side // min(w, h))), max(1, -(-h * min_side // min(w, h))))
    img.draft("L" if channels == 1 else "RGB", req)


def to_mode(img: Image.Image, channels: int, background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> Image.Image:
    """Any PIL mode -> "L" (channels=1) or "RGB" (channels=3).

    Alpha (RGBA, LA, PA, palette or colour-key transparency) is composited on `background` (the checkpoint's
    `preprocess["background"]`, white for checkpoints that record none); 16/32-bit integer and
    float images are scaled to 8 bits (not clipped); CMYK/YCbCr/LAB go through PIL's converters.
    """
    target = "L" if channels == 1 else "RGB"
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        img = _high_depth_to_l(img)
    if img.mode == "1":
        img = img.convert("L")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, tuple(background) + (255,)), rgba)
    if img.mode == target:
        return img
    if img.mode not in ("L", "RGB", "RGBA"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, P ... -> RGB first, then the target
    return img.convert(target)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale integer images by their container depth (16-bit -> /257) and float images in 0..1 by 255."""
    a = np.asarray(img)
    if img.mode == "F":
        a = a.astype(np.float64)
        a = a * 255.0 if np.nanmax(a, initial=0) <= 1.0 else a
    else:
        a = a.astype(np.float64)
        top = float(a.max(initial=0))
        # 16-bit containers scale by 65535; an "I" image is 8-bit if its values fit, else 16- or 32-bit.
        full = 65535.0 if img.mode.startswith("I;16") or 255 < top <= 65535 else (255.0 if top <= 255 else top)
        a = a * (255.0 / full)
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8), "L")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An "L" or "RGB" PIL image -> uint8 (C, H, W)."""
    a = np.array(img, dtype=np.uint8, copy=True)
    t = torch.from_numpy(a)
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1..8) to a (C, H, W) tensor on any device, like ImageOps.exif_transpose."""
    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-1, -2)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(x, -1, (-2, -1))
    if orientation == 7:
        return x.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(x, 1, (-2, -1))
    return x


def decode_jpegs(datas: Sequence[bytes], channels: int, device: torch.device | str,
                 limits: DecodeLimits = DecodeLimits(), min_side: int | None = None,
                 background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> list[torch.Tensor | BadInput]:
    """Decode many images with torchvision.io.decode_jpeg in one batched call on `device` (nvjpeg on CUDA).

    Every item is header-checked with PIL first; baseline RGB/gray JPEGs go to the batched decoder, the rest
    (PNG, CMYK JPEG, anything it rejects) to `decode_image`. Returns a tensor or a BadInput per item, in order.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | BadInput | None] = [None] * len(datas)
    fast: list[tuple[int, int]] = []  # (item index, EXIF orientation)
    for i, data in enumerate(datas):
        try:
            img = open_image(data, limits)
        except BadInput as e:
            out[i] = e
            continue
        # nvjpeg may paint a truncated stream grey instead of failing: streams without an end marker go to PIL.
        if img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L") and _has_eoi(data):
            try:
                fast.append((i, int(img.getexif().get(0x0112, 1) or 1)))
            except Exception:  # unreadable EXIF: PIL's path decides whether the image is usable
                pass
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    if fast:
        inputs = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i, _ in fast]
        try:
            decoded = decode_jpeg(inputs, mode=mode, device=device)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # one bad stream fails the batched call: retry one by one, then PIL
            decoded = [_decode_one(x, mode, device) for x in inputs]
        for (i, orientation), x in zip(fast, decoded):
            out[i] = orient(x, orientation) if x is not None else None
    for i, data in enumerate(datas):
        if out[i] is None:
            try:
                out[i] = decode_image(data, channels, limits, min_side, background).to(device)
            except BadInput as e:
                out[i] = e
    return out  # type: ignore[return-value]


def _decode_one(x: torch.Tensor, mode: object, device: torch.device | str) -> torch.Tensor | None:
    from torchvision.io import decode_jpeg

    try:
        return decode_jpeg(x, mode=mode, device=device)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:
        return None


def _has_eoi(data: bytes) -> bool:
    return data[-2:] == b"\xff\xd9" or data.rstrip(b"\0")[-2:] == b"\xff\xd9"
