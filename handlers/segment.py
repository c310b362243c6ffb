"""Segmentation on the shared flow, for camera frames and video clips at one endpoint.

A request's body is told apart by its bytes (handlers/video.py `sniff`): an image is a frame (one unit), an
MP4/WebM/MKV container is a clip whose sampled frames are decoded lazily, so the shared loop runs them in chunks of
`max_batch` next to the frames of other requests. Post-processing: logits -> bilinear to the frame's own size ->
per-pixel labels and the probability of each -> detections (training/masks.py, one definition with evaluation) ->
the mask as COCO RLE, a PNG label map, or nothing. A clip is answered whole, or streamed as NDJSON lines while it is
decoded.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from handlers.errors import BadInput
from handlers.pipeline import Job, Pipeline, Unit
from handlers.request import b64_bytes, parse_json, split_item
from handlers.video import IMAGE_TYPES, VIDEO_TYPES, Sampling, VideoClip, VideoLimits, sniff
from training.masks import DEFAULT_MIN_AREA, labels_and_scores, masks_to_detections

MASK_FORMATS = ("rle", "png", "none")
FIELDS = frozenset({"every", "fps", "max_frames", "masks", "stream", "min_area"})  # per-request options
PAYLOAD_KEYS = ("video", "image", "data")  # where a JSON body carries the base64 clip or frame
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclass
class SegmentJob(Job):
    """A frame (one encoded image) or a clip (`clip` set, units decoded as they are taken)."""

    clip: VideoClip | None = None
    sampling: Sampling | None = None
    masks: str = "rle"
    min_area: int = DEFAULT_MIN_AREA
    stream: bool = False
    header_sent: bool = False


class SegmentPipeline(Pipeline):
    """Per-pixel classes, detections and masks for frames and clips (a segmentation checkpoint)."""

    OPTIONS = {**Pipeline.OPTIONS, "masks": str, "min_area": int, "max_video_bytes": int, "max_video_seconds": int,
               "max_frame_pixels": int, "max_frames": int, "max_decoded_pixels": int, "postprocess_threads": int}
    COMPACT_JSON = True  # masks and boxes: TorchServe's indented JSON would triple an answer's size

    def __init__(self, ckpt: dict[str, Any], device: str | torch.device = "cpu", *, masks: str = "rle",
                 min_area: int = DEFAULT_MIN_AREA, max_video_bytes: int = VideoLimits.max_bytes,
                 max_video_seconds: int = int(VideoLimits.max_seconds),
                 max_frame_pixels: int = VideoLimits.max_frame_pixels, max_frames: int = VideoLimits.max_frames,
                 max_decoded_pixels: int = VideoLimits.max_decoded_pixels, postprocess_threads: int | None = None,
                 **options: Any):
        if (ckpt.get("task") or "classification") != "segmentation":
            raise ValueError("this pipeline serves segmentation checkpoints (task: segmentation); serve a "
                             "classifier with handlers/classifier.py")
        if masks not in MASK_FORMATS:
            raise ValueError(f"masks must be one of {MASK_FORMATS}, got {masks!r}")
        options.setdefault("jpeg_draft", False)  # masks and boxes are answered at the frame's own size
        super().__init__(ckpt, device, **options)
        self.masks, self.min_area = masks, max(1, min_area)
        # per-frame post-processing in threads (the model is idle meanwhile); 1: inline. Not measured on a quiet
        # machine yet, hence off by default
        self.postprocess_threads = max(1, postprocess_threads or 1)
        self._pool: ThreadPoolExecutor | None = None
        self.video_limits = VideoLimits(max_video_bytes, float(max_video_seconds), max_frame_pixels, max_frames,
                                        max_decoded_pixels)

    # -- parse ----------------------------------------------------------------------------------------------
    def parse(self, item: Any) -> SegmentJob:
        data, fields = self._payload(item)
        job = SegmentJob([], masks=self._choice(fields.get("masks"), "masks", MASK_FORMATS, self.masks),
                         min_area=self._min_area(fields.get("min_area")),
                         stream=self._flag(fields.get("stream"), "stream"))
        kind = sniff(data)
        if kind == "image":
            job.units = [data]
            return job
        job.sampling = Sampling.from_fields(fields, self.video_limits.max_frames)
        job.clip = VideoClip(data, kind, self.video_limits, threads=torch.get_num_threads())
        expected = job.clip.expected_frames(job.sampling)
        if job.sampling.max_frames is None and expected is not None and expected > self.video_limits.max_frames:
            job.clip.close()
            raise BadInput(413, "TooManyFrames", f"the clip gives {expected} frames at this sampling; the limit is "
                           f"{self.video_limits.max_frames}: sample sparser (every, fps) or set max_frames")
        job.units = job.clip.frames(job.sampling, self.preprocess["channels"])
        return job

    def _payload(self, item: Any) -> tuple[bytes, dict[str, Any]]:
        """(the frame or clip bytes, the request's option fields) from raw bytes, a multipart form or JSON."""
        if isinstance(item, dict):
            unknown = sorted(k for k in item if k not in FIELDS and k not in ("data", "body"))
            if unknown and any(k in item for k in ("data", "body")):
                raise BadInput(400, "UnknownOption", f"unknown field(s) {unknown[:3]}; options are "
                               f"{', '.join(sorted(FIELDS))}")
        payload, fields = split_item(item, FIELDS)
        if isinstance(payload, (bytearray, memoryview)):
            payload = bytes(payload)
        if isinstance(payload, bytes) and payload[:64].lstrip()[:1] == b"{":
            payload = parse_json(payload)
        elif isinstance(payload, str) and payload.lstrip()[:1] == "{":
            payload = parse_json(payload)
        if isinstance(payload, dict):
            keys = [k for k in PAYLOAD_KEYS if k in payload]
            unknown = sorted(set(payload) - FIELDS - set(PAYLOAD_KEYS))
            if unknown:
                raise BadInput(400, "UnknownOption", f"unknown JSON field(s) {unknown[:3]}; the data goes in one of "
                               f"{', '.join(PAYLOAD_KEYS)}, options are {', '.join(sorted(FIELDS))}")
            if len(keys) != 1:
                raise BadInput(400, "MissingData", 'the JSON must carry exactly one of "video", "image" or "data" '
                               "(base64)")
            limit = max(self.video_limits.max_bytes, self.limits.max_bytes)
            return b64_bytes(payload[keys[0]], limit, keys[0]), {**fields, **{k: payload[k] for k in FIELDS
                                                                              if k in payload}}
        if not isinstance(payload, bytes):
            raise BadInput(400, "MissingData", f"send the frame ({IMAGE_TYPES}) or the clip ({VIDEO_TYPES}) as the "
                           "body, or as JSON {\"video\": \"<base64>\"}")
        return payload, fields

    @staticmethod
    def _choice(value: Any, name: str, choices: Sequence[str], default: str) -> str:
        if value is None:
            return default
        text = str(value).strip().lower()
        if text not in choices:
            raise BadInput(400, "InvalidOption", f"{name} must be one of {', '.join(choices)}, got {str(value)[:40]!r}")
        return text

    @staticmethod
    def _flag(value: Any, name: str) -> bool:
        if value is None or isinstance(value, bool):
            return bool(value)
        text = str(value).strip().lower()
        if text not in _TRUE + _FALSE:
            raise BadInput(400, "InvalidOption", f"{name} must be true or false, got {str(value)[:40]!r}")
        return text in _TRUE

    def _min_area(self, value: Any) -> int:
        if value is None:
            return self.min_area
        text = str(value).strip()
        if isinstance(value, bool) or not text.isdigit() or not 1 <= int(text) <= 1 << 24:
            raise BadInput(400, "InvalidOption", f"min_area must be a positive integer (pixels), got {text[:40]!r}")
        return int(text)

    # -- post-process ---------------------------------------------------------------------------------------
    def postprocess(self, logits: torch.Tensor, units: Sequence[Unit]) -> list[Any]:
        """Logits at model size -> per frame: labels at the frame's size, detections, the encoded mask."""
        maps = []
        same = all(tuple(u.pixels.shape[-2:]) == tuple(logits.shape[-2:]) for u in units)
        if same:  # frames at the model's size (the usual clip): the whole chunk at once
            labels, scores = labels_and_scores(logits)
            maps = list(zip(labels.to(torch.uint8).cpu(), scores.cpu()))
        else:  # one frame at a time: a 1080p frame's upsampled logits alone are ~90 MB
            for n, unit in enumerate(units):
                up = F.interpolate(logits[n:n + 1], size=tuple(unit.pixels.shape[-2:]), mode="bilinear",
                                   align_corners=False)
                lab, score = labels_and_scores(up)
                maps.append((lab[0].to(torch.uint8).cpu(), score[0].cpu()))
        # detections and mask encoding per frame (scipy, pycocotools, zlib) release the GIL for most of their work
        args = [(unit, lab, c) for unit, (lab, c) in zip(units, maps)]
        if self.postprocess_threads > 1 and len(args) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.postprocess_threads, thread_name_prefix="postprocess")
            return list(self._pool.map(lambda a: self._frame_result(*a), args))
        return [self._frame_result(*a) for a in args]

    def _frame_result(self, unit: Unit, labels: torch.Tensor, scores: torch.Tensor) -> dict[str, Any]:
        job: SegmentJob = unit.job  # type: ignore[assignment]
        dets = masks_to_detections(labels, scores, min_area=job.min_area, classes=self.classes)
        result: dict[str, Any] = dict(unit.info)
        if job.clip is None:
            result.update(width=int(labels.shape[1]), height=int(labels.shape[0]))
        result["detections"] = dets
        if job.masks != "none":
            result["mask"] = encode_mask(labels.numpy(), job.masks, self.classes)
        return result

    # -- answers --------------------------------------------------------------------------------------------
    def _header(self, job: SegmentJob) -> dict[str, Any]:
        return {"model": self.model_name, "version": self.model_version, "kind": "clip", "video": job.clip.info,
                "sampling": job.sampling.describe(), "classes": self.classes}

    def partial(self, job: Job) -> list[dict[str, Any]] | None:
        """A streamed clip's NDJSON lines so far: the header once, then one line per answered frame."""
        if not isinstance(job, SegmentJob) or not job.stream or job.clip is None:
            return None
        lines = [] if job.header_sent else [self._header(job)]
        job.header_sent = True
        lines += job.results
        job.results = []
        return lines or None

    def answer(self, job: Job) -> Any:
        assert isinstance(job, SegmentJob)
        if job.clip is None:
            return {"model": self.model_name, "version": self.model_version, "kind": "frame", **job.results[0]}
        end = {"end": True, "frames": job.count, "truncated": bool(getattr(job.clip, "truncated", False))}
        if job.stream:
            return (self.partial(job) or []) + [end]
        return {**self._header(job), "frames": job.results, "truncated": end["truncated"]}

    def describe(self) -> dict[str, Any]:
        limits = self.video_limits
        return {**super().describe(), "masks": self.masks, "min_area": self.min_area,
                "postprocess_threads": self.postprocess_threads,
                "max_video_bytes": limits.max_bytes, "max_video_seconds": limits.max_seconds,
                "max_frame_pixels": limits.max_frame_pixels, "max_frames": limits.max_frames,
                "max_decoded_pixels": limits.max_decoded_pixels}


def encode_mask(labels: np.ndarray, fmt: str, classes: Sequence[str]) -> dict[str, Any]:
    """An (H, W) uint8 label map -> {"format": "rle", "size": [H, W], "rle": [{"index", "label", "counts"}]}
    (one COCO RLE per class present, background left out; `pycocotools.mask.decode` reads each) or
    {"format": "png", "size": [H, W], "png": base64 of an 8-bit grey PNG whose pixel values are class indices}."""
    h, w = labels.shape
    if fmt == "png":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(labels), "L").save(buf, "PNG", compress_level=1)
        return {"format": "png", "size": [h, w], "png": base64.b64encode(buf.getvalue()).decode("ascii")}
    from pycocotools import mask as coco_mask

    present = [int(k) for k in np.flatnonzero(np.bincount(labels.ravel(), minlength=len(classes))) if k > 0]
    rles = coco_mask.encode(np.asfortranarray(np.stack([labels == k for k in present], axis=-1).astype(np.uint8))
                            ) if present else []
    return {"format": "rle", "size": [h, w],
            "rle": [{"index": k, "label": classes[k], "counts": r["counts"].decode("ascii")}
                    for k, r in zip(present, rles)]}


def decode_mask(mask: Mapping[str, Any]) -> np.ndarray:
    """The inverse of `encode_mask`: an answer's mask -> (H, W) uint8 label map (clients and tests)."""
    h, w = mask["size"]
    if mask["format"] == "png":
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(base64.b64decode(mask["png"]))))
    from pycocotools import mask as coco_mask

    labels = np.zeros((h, w), dtype=np.uint8)
    for r in mask["rle"]:
        labels[coco_mask.decode({"size": [h, w], "counts": r["counts"].encode("ascii")}) > 0] = r["index"]
    return labels
