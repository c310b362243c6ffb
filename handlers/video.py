"""Video bodies, without TorchServe or a model: what the bytes are, opening a container within limits, and its
frames decoded one at a time with sampling.

- `sniff(data)`: "image" or a video container ("mp4", "matroska") from the magic numbers; a body that is
  neither is a 415, an empty one a 400. The Content-Type header plays no part (clients forget or fake it).
- `VideoClip(data, container, limits)`: opens the container with PyAV (its own FFmpeg build; the choice between
  PyAV and torchcodec is measured in docs/video.md), checks the declared size against the bytes (a truncated
  body is refused before decoding), the stream's resolution and duration against the limits.
- `VideoClip.frames(sampling, channels)`: a lazy iterator of `Decoded` frames (uint8 (C, H, W) at the
  stream's own size, info {"frame": index, "time": seconds}); at most one frame is held at a time, so a
  pipeline that takes them in chunks bounds memory by its batch. Corrupt data, a frame over the limits or a
  stream that ends before it started raise BadInput mid-stream.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from handlers.errors import BadInput
from handlers.pipeline import Decoded

# FFmpeg demuxers per container: opening with an explicit format means FFmpeg never probes for others.
CONTAINERS = {"mp4": "mov,mp4,m4a,3gp,3g2,mj2", "matroska": "matroska,webm"}
# ISO-BMFF top-level boxes a QuickTime/MP4 file may start with (FFmpeg's mov probe accepts the same).
_MP4_FIRST_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")
_STILL_BRANDS = (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis")  # ISO-BMFF images, not videos
_OTHER_VIDEO = {b"RIFF": "AVI", b"FLV\x01": "FLV", b"OggS": "Ogg", b"\x30\x26\xb2\x75": "ASF/WMV"}
IMAGE_TYPES = "JPEG, PNG, WebP, BMP, GIF, TIFF"
VIDEO_TYPES = "MP4/MOV, WebM, MKV"


def sniff(data: bytes) -> str:
    """"image", "mp4" or "matroska" from the first bytes. Raises BadInput: 400 for an empty body, 415 for
    anything else (another video container, text, a PDF, ...)."""
    if not data:
        raise BadInput(400, "EmptyBody", f"the request body is empty; send an image ({IMAGE_TYPES}) or a video "
                       f"({VIDEO_TYPES})")
    head = data[:16]
    if (head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n" or head[:6] in (b"GIF87a", b"GIF89a")
            or head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*")
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")):
        return "image"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[4:8] in _MP4_FIRST_BOXES:
        return "image" if head[4:8] == b"ftyp" and head[8:12] in _STILL_BRANDS else "mp4"
    other = _OTHER_VIDEO.get(head[:4]) or ("MPEG-TS" if len(data) > 188 and data[0] == data[188] == 0x47 else None)
    if other:
        raise BadInput(415, "UnsupportedVideo", f"{other} videos are not supported; send {VIDEO_TYPES} "
                       "(e.g. `ffmpeg -i in.avi -c:v libx264 out.mp4`)")
    raise BadInput(415, "UnsupportedMedia", f"the body is neither an image ({IMAGE_TYPES}) nor a video "
                   f"({VIDEO_TYPES}); they are told apart by their first bytes, not by the Content-Type")


def declared_size(data: bytes, container: str) -> int | None:
    """The byte length the container's own structure declares (None: open-ended, e.g. a live Matroska stream).
    MP4: the end of the last top-level box; Matroska: the end of the Segment element."""
    if container == "mp4":
        pos = 0
        while pos + 8 <= len(data):
            size = struct.unpack(">I", data[pos:pos + 4])[0]
            if size == 1:
                if pos + 16 > len(data):
                    return pos + 16
                size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
            elif size == 0:  # the last box runs to the end of the file
                return None
            if size < 8:
                raise BadInput(400, "InvalidVideo", f"the MP4 data is corrupt (a box of {size} bytes at {pos})")
            pos += size
        return pos
    pos = 4
    header_size, pos = _ebml_vint(data, pos)  # the EBML header element
    pos += header_size
    if data[pos:pos + 4] != b"\x18\x53\x80\x67":  # the Segment element follows the header
        return pos + 4 if pos + 4 > len(data) else None
    size, start = _ebml_vint(data, pos + 4)
    return None if size is None else start + size


def _ebml_vint(data: bytes, pos: int) -> tuple[Any, int]:
    """An EBML variable-length size at `pos` -> (value or None when 'unknown', position after it)."""
    if pos >= len(data) or data[pos] == 0:
        raise BadInput(400, "TruncatedVideo" if pos >= len(data) else "InvalidVideo",
                       "the Matroska/WebM header is truncated or corrupt")
    length = 8 - data[pos].bit_length() + 1
    raw = data[pos:pos + length]
    if len(raw) < length:
        raise BadInput(400, "TruncatedVideo", "the Matroska/WebM header is truncated")
    value = int.from_bytes(raw, "big") & ((1 << (7 * length)) - 1)
    return (None if value == (1 << (7 * length)) - 1 else value), pos + length


@dataclass(frozen=True)
class VideoLimits:
    """What one clip request may cost. Checked from the container before decoding, and again on every frame
    (headers can lie)."""

    max_bytes: int = 16 * 1024 * 1024     # the encoded clip (TorchServe's max_request_size refuses larger first)
    max_seconds: float = 600.0            # the stream's duration, and the time of any decoded frame
    max_frame_pixels: int = 3840 * 2160   # width x height of the video stream
    max_frames: int = 3000                # sampled frames per clip, i.e. frames answered
    # frames x width x height decoded, sampled or not: the decoding work of one request (about a minute of one core
    # at the 70-85 Mpixel/s measured here: 80,000 frames at 224 px, 4,300 at 720p, 480 at 4K)
    max_decoded_pixels: int = 4_000_000_000


@dataclass(frozen=True)
class Sampling:
    """Which frames of a clip are answered: every `every`-th frame, or at most `fps` frames per second of
    video time (the first frame of each 1/fps interval), stopping after `max_frames` (None: the server limit,
    which a longer clip exceeds with a 413)."""

    every: int = 1
    fps: float | None = None
    max_frames: int | None = None

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], limit: int) -> Sampling:
        """From request fields (text or JSON numbers); a bad value is a 400 InvalidSampling saying why."""
        every = _number(fields.get("every"), int, "every", 1, None)
        fps = _number(fields.get("fps"), float, "fps", 1e-3, 1000.0)
        max_frames = _number(fields.get("max_frames"), int, "max_frames", 1, limit)
        if every is not None and fps is not None:
            raise BadInput(400, "InvalidSampling", "give either every (every k-th frame) or fps (frames per "
                           "second of video), not both")
        return cls(every or 1, fps, max_frames)

    def describe(self) -> dict[str, Any]:
        return {"every": None if self.fps else self.every, "fps": self.fps, "max_frames": self.max_frames}


def _number(value: Any, kind: type, name: str, low: float, high: float | None) -> Any:
    if value is None:
        return None
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = kind(value.strip() if isinstance(value, str) else value)
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError
    except (TypeError, ValueError):
        raise BadInput(400, "InvalidSampling", f"{name} must be {'an integer' if kind is int else 'a number'}, "
                       f"got {str(value)[:40]!r}") from None
    if number < low or (high is not None and number > high):
        bound = f"from {low:g} to {high:g}" if high is not None else f">= {low:g}"
        raise BadInput(400, "InvalidSampling", f"{name} must be {bound}, got {number:g}")
    return number


class VideoClip:
    """One container held in memory, opened with PyAV. `info` describes it; `frames` decodes it."""

    def __init__(self, data: bytes, container: str, limits: VideoLimits = VideoLimits(), threads: int = 1):
        import av

        if len(data) > limits.max_bytes:
            raise BadInput(413, "PayloadTooLarge", f"the video is {len(data)} bytes; the limit is "
                           f"{limits.max_bytes} bytes")
        declared = declared_size(data, container)
        if declared is not None and declared > len(data):
            raise BadInput(400, "TruncatedVideo", f"the video is truncated: its container declares {declared} "
                           f"bytes, the body has {len(data)}")
        self.limits = limits
        try:
            self._container = av.open(io.BytesIO(data), format=CONTAINERS[container])
        except av.EOFError:
            raise BadInput(400, "EmptyVideo", f"the {container.upper()} data ends before its first frame") from None
        except av.FFmpegError as e:
            raise BadInput(400, "InvalidVideo", f"the {container.upper()} data cannot be read ({_reason(e)})") \
                from None
        try:
            self._open(container, threads)
        except BaseException:
            self.close()
            raise

    def _open(self, container: str, threads: int) -> None:
        if not self._container.streams:  # FFmpeg drops a track without samples: a video of zero frames
            raise BadInput(400, "EmptyVideo", "the video has no frames")
        if not self._container.streams.video:
            raise BadInput(400, "NoVideoStream", "the container has no video stream (audio only?)")
        self._stream = stream = self._container.streams.video[0]
        ctx = stream.codec_context
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if width < 1 or height < 1:
            raise BadInput(400, "InvalidVideo", "the video stream has no frame size")
        self._check_size(width, height)
        fps = float(stream.average_rate or stream.guessed_rate or 0) or None
        duration = (float(stream.duration * stream.time_base) if stream.duration and stream.time_base
                    else (self._container.duration / 1e6 if self._container.duration else None))
        if duration is not None and duration > self.limits.max_seconds:
            raise BadInput(413, "VideoTooLong", f"the video lasts {duration:.1f} s; the limit is "
                           f"{self.limits.max_seconds:g} s; cut it (e.g. `ffmpeg -i in.mp4 -t 60 -c copy out.mp4`)")
        frames = int(stream.frames) or (round(duration * fps) if duration and fps else 0)
        if frames * width * height > self.limits.max_decoded_pixels:
            raise self._too_much(frames, width, height)
        self._start = float(stream.start_time * stream.time_base) if stream.start_time and stream.time_base else 0.0
        ctx.thread_type, ctx.thread_count = "AUTO", max(1, threads)
        ctx.options = {"err_detect": "explode"}  # a damaged frame is an error, not a silently concealed picture
        self.info = {"container": container, "codec": ctx.name, "width": width, "height": height,
                     "fps": round(fps, 3) if fps else None,
                     "duration": round(duration, 3) if duration is not None else None,
                     "frames": frames or None}

    def _too_much(self, frames: int, width: int, height: int) -> BadInput:
        return BadInput(413, "VideoTooLarge", f"the video has {frames} frames of {width}x{height} to decode; the limit "
                        f"is {self.limits.max_decoded_pixels} pixels in all: cut it or scale it down")

    def _check_size(self, width: int, height: int) -> None:
        if width * height > self.limits.max_frame_pixels or max(width, height) > 16384:
            raise BadInput(413, "FrameTooLarge", f"video frames are {width}x{height} = {width * height} pixels; "
                           f"the limit is {self.limits.max_frame_pixels}; scale the video down before sending")

    def expected_frames(self, sampling: Sampling) -> int | None:
        """How many frames `sampling` picks by the container's own count (None: unknown)."""
        n = self.info["frames"]
        if n is None:
            return None
        if sampling.fps and self.info["duration"]:
            n = min(n, math.ceil(self.info["duration"] * sampling.fps))
        elif not sampling.fps:
            n = -(-n // sampling.every)
        return n if sampling.max_frames is None else min(n, sampling.max_frames)

    def frames(self, sampling: Sampling, channels: int = 3) -> Iterator[Decoded]:
        """Decode, sample and convert frames one by one; closes the container when done (or abandoned)."""
        import av
        from av.video.reformatter import VideoReformatter

        fmt = "rgb24" if channels == 3 else "gray"
        convert = VideoReformatter()  # one converter for the clip: a fresh one per frame costs as much as decoding
        cap = sampling.max_frames or self.limits.max_frames
        fps = self.info["fps"] or 30.0
        index = taken = pixels_decoded = 0
        last_bucket = -1
        self.truncated = False
        try:
            for frame in self._container.decode(self._stream):
                index += 1
                pixels_decoded += frame.width * frame.height
                if pixels_decoded > self.limits.max_decoded_pixels:
                    raise self._too_much(index, frame.width, frame.height)
                time = float(frame.time) - self._start if frame.time is not None else (index - 1) / fps
                if time > self.limits.max_seconds:
                    raise BadInput(413, "VideoTooLong", f"a frame at {time:.1f} s is past the limit of "
                                   f"{self.limits.max_seconds:g} s")
                if sampling.fps:
                    bucket = math.floor(time * sampling.fps + 1e-6)
                    if bucket <= last_bucket:
                        continue
                    last_bucket = bucket
                elif (index - 1) % sampling.every:
                    continue
                if taken == cap:
                    if sampling.max_frames is None:
                        raise BadInput(413, "TooManyFrames", f"the clip gives more than {cap} frames at this "
                                       "sampling (the server limit); sample sparser (every, fps) or set max_frames")
                    self.truncated = True
                    return
                self._check_size(frame.width, frame.height)
                pixels = torch.from_numpy(np.ascontiguousarray(convert.reformat(frame, format=fmt).to_ndarray()))
                pixels = pixels.permute(2, 0, 1) if pixels.dim() == 3 else pixels.unsqueeze(0)
                taken += 1
                yield Decoded(pixels, {"frame": index - 1, "time": round(time, 6)})
        except av.FFmpegError as e:
            raise BadInput(400, "InvalidVideo", f"the video data is corrupt at frame {index} ({_reason(e)})") \
                from None
        finally:
            self.close()
        if taken == 0:
            raise BadInput(400, "EmptyVideo", "the video has no frames" if index == 0 else
                           f"the video's {index} frames give none at this sampling")

    def close(self) -> None:
        container, self._container = getattr(self, "_container", None), None
        if container is not None:
            container.close()


def _reason(error: Exception) -> str:
    """FFmpeg's message without the errno prefix and file name PyAV adds."""
    text = getattr(error, "strerror", None) or str(error)
    return " ".join(str(text).split())[:120]
