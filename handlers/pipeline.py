"""The serving pipeline without TorchServe: requests -> decode -> one batched preprocess -> one forward -> top-k.

It runs in unit tests, benchmarks and on a GPU box with no TorchServe; handlers/classifier.py adapts it.
Preprocessing comes only from the checkpoint's `preprocess` block through training.presets.eval_batch.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from handlers.decode import BadInput, DecodeLimits, decode_image, decode_jpegs
from handlers.runtimes import RUNTIMES, content_sha256, file_sha256, prepare_runtime
from training.checkpoint import build_model, load_checkpoint
from training.presets import eval_batch

__all__ = ["BadInput", "ImagePipeline", "ParsedRequest", "parse_request", "pipeline_options", "RUNTIMES"]

log = logging.getLogger(__name__)

# Handler options (model-config.yaml `handler:` block) -> expected type. Unknown keys are an error.
OPTIONS: dict[str, type] = {"topk": int, "max_image_pixels": int, "max_image_bytes": int,
                            "max_images_per_request": int, "runtime": str, "jpeg_decoder": str,
                            "jpeg_draft": bool, "max_batch": int, "cpu_threads": int, "runtime_cache": str}


def pipeline_options(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a handler-options mapping: unknown keys or wrong types raise ValueError saying what to fix."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown handler option(s) {unknown}; known: {sorted(OPTIONS)}")
    for key, typ in OPTIONS.items():
        if key in cfg and (not isinstance(cfg[key], typ) or (typ is int and isinstance(cfg[key], bool))):
            raise ValueError(f"handler option {key!r} must be {typ.__name__}, got {cfg[key]!r}")
    return cfg


_B64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_\r\n")


def error_body(status: int, type_: str, message: str) -> dict[str, Any]:
    return {"code": status, "type": type_, "message": message}


@dataclass
class ParsedRequest:
    images: list[bytes]       # encoded images, in request order
    topk: int | None = None   # None: the configured default
    multi: bool = False       # answered as {"results": [...]} (a list or {"images": [...]} was sent)


def parse_request(item: Any, max_images: int = 64, max_bytes: int = 20 * 1024 * 1024) -> ParsedRequest:
    """One TorchServe request item -> ParsedRequest. Raises BadInput (400/413) with a message for the client.

    Accepted: raw image bytes; JSON {"image": b64} or {"images": [b64, ...]} or [b64, ...] (bytes, str or
    already decoded by TorchServe), each b64 optionally a data URL; an optional "topk" in the JSON object or as
    a multipart field.
    """
    payload, field_topk = _payload(item)
    if isinstance(payload, (bytes, bytearray, memoryview)):
        payload = bytes(payload)
        head = payload[:64].lstrip()
        if head[:1] in (b"{", b"["):
            payload = _json(payload)
        elif head[:5].lower() == b"data:" or (head and _B64_CHARS.issuperset(head)):
            # a data URL or base64 text sent as application/octet-stream (no image starts with 64 such bytes)
            return ParsedRequest([_b64(payload.decode("latin-1"), max_bytes, "body")], field_topk)
        else:
            if not payload:
                raise BadInput(400, "EmptyBody", "the request body is empty; send image bytes or JSON "
                               '{"image": "<base64>"}')
            return ParsedRequest([payload], field_topk)
    if isinstance(payload, str):
        text = payload.strip()
        if text[:1] in ("{", "["):
            payload = _json(text)
        else:  # a text/plain body: one base64 string or data URL
            return ParsedRequest([_b64(text, max_bytes, "body")], field_topk)
    if isinstance(payload, dict):
        topk = payload.get("topk", field_topk)
        if "image" in payload:
            return ParsedRequest([_b64(payload["image"], max_bytes, "image")], topk)
        if "images" in payload:
            return ParsedRequest(_b64_list(payload["images"], max_images, max_bytes, "images"), topk, True)
        raise BadInput(400, "MissingImage", 'the JSON has no image; send {"image": "<base64>"} or '
                       '{"images": ["<base64>", ...]}')
    if isinstance(payload, list):
        return ParsedRequest(_b64_list(payload, max_images, max_bytes, ""), field_topk, True)
    raise BadInput(400, "MissingImage", "the request has no image; send image bytes or JSON "
                   '{"image": "<base64>"}')


def _payload(item: Any) -> tuple[Any, Any]:
    """TorchServe gives {"data" or "body": value, ...}; multipart forms give one key per field."""
    if not isinstance(item, dict):
        return item, None
    topk = item.get("topk")
    if isinstance(topk, (bytes, bytearray)):
        topk = topk.decode("latin-1")
    for key in ("data", "body"):
        if item.get(key) is not None:
            return item[key], topk
    rest = [v for k, v in item.items() if k != "topk" and v is not None]
    if len(rest) == 1:
        return rest[0], topk
    if not rest:
        raise BadInput(400, "EmptyBody", "the request body is empty; send image bytes or JSON "
                       '{"image": "<base64>"}')
    names = ", ".join(repr(k)[:20] for k in sorted(item)[:3])
    raise BadInput(400, "MissingImage", f"the body arrived as a form with {len(item)} fields ({names}, ...): "
                   "send image bytes with Content-Type image/* or application/octet-stream (curl --data-binary "
                   "sends form encoding unless told otherwise), or a multipart field named 'data'")


def _json(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: e.g. 100000 nested "["
        raise BadInput(400, "InvalidJSON", f"the body looks like JSON but does not parse ({e})") from None


def _b64_list(items: Any, max_images: int, max_bytes: int, name: str) -> list[bytes]:
    if not isinstance(items, list) or not items:
        raise BadInput(400, "MissingImage", f"{name or 'the JSON list'} must be a non-empty list of base64 strings")
    if len(items) > max_images:
        raise BadInput(413, "TooManyImages", f"{len(items)} images in one request; the limit is {max_images}; "
                       "split the request")
    return [_b64(s, max_bytes, f"{name}[{i}]") for i, s in enumerate(items)]


def _b64(text: Any, max_bytes: int, where: str = "image") -> bytes:
    """A base64 string (standard or URL-safe, padding optional, whitespace ignored) or a data URL -> bytes."""
    if not isinstance(text, str):
        raise BadInput(400, "InvalidBase64", f"{where}: expected a base64 string, got {type(text).__name__}")
    if text[:5].lower() == "data:":
        header, sep, text = text.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise BadInput(400, "InvalidBase64", f"{where}: a data URL must look like data:image/png;base64,<data>")
    text = "".join(text.split())
    if not text:
        raise BadInput(400, "EmptyBody", f"{where}: the base64 string is empty")
    if len(text) * 3 // 4 > max_bytes:
        raise BadInput(413, "PayloadTooLarge", f"{where}: image is over the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_" if "-" in text or "_" in text
                                else None, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(400, "InvalidBase64", f"{where}: not valid base64; encode the image file's bytes with "
                       "base64 (e.g. `base64 -w0 cat.jpg`)") from None


class ImagePipeline:
    """A checkpoint served as a function: `handle_requests(list of request items) -> [(status, body), ...]`."""

    def __init__(self, ckpt: dict[str, Any], device: str | torch.device = "cpu", *, topk: int = 5,
                 max_image_pixels: int = 40_000_000, max_image_bytes: int = 20 * 1024 * 1024,
                 max_images_per_request: int = 64, runtime: str | None = None, jpeg_decoder: str = "auto",
                 jpeg_draft: bool = True, max_batch: int = 256, model_name: str | None = None,
                 model_version: str | None = None, cpu_threads: int | None = None, runtime_cache: str | None = None,
                 checkpoint_sha256: str | None = None):
        self.device = torch.device(device)
        # None: the device's default -- fp32 eager on CPU, bf16 autocast + channels_last on CUDA
        runtime = runtime or ("bf16" if self.device.type == "cuda" else "eager")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime {runtime!r} is not supported; choose one of {list(RUNTIMES)}")
        if jpeg_decoder not in ("auto", "pil", "torchvision"):
            raise ValueError("jpeg_decoder must be 'auto', 'pil' or 'torchvision'")
        self.preprocess: dict[str, Any] = dict(ckpt["preprocess"])
        self.classes = [str(c) for c in ckpt["classes"]]
        self.topk = max(1, min(int(topk), len(self.classes)))  # a default above the class count is clamped
        self.limits = DecodeLimits(max_image_pixels, max_image_bytes, jpeg_draft)
        self.max_images_per_request, self.max_batch, self.runtime = max_images_per_request, max_batch, runtime
        cuda = self.device.type == "cuda"
        self.jpeg_decoder = ("torchvision" if cuda else "pil") if jpeg_decoder == "auto" else jpeg_decoder
        self.model_name = model_name or str(ckpt["arch"])
        self.model_version = str(model_version or "1.0")
        if cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(cpu_threads)  # torch and ONNX Runtime both follow it (see prepare_model)
        self.runtime_cache, self.recipe = runtime_cache, dict(ckpt.get("recipe") or {})
        # onnx/int8 files are cached per checkpoint: the file's sha256 when loaded from a file, else a content hash
        self.checkpoint_sha256 = checkpoint_sha256 or (content_sha256(ckpt) if runtime in ("onnx", "int8") else None)
        self.runtime_info: dict[str, Any] = {}
        self.model = self.prepare_model(build_model(ckpt))

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | torch.device = "cpu", **options: Any) -> ImagePipeline:
        """Load a checkpoint (weights_only) and build the pipeline; `options` are the keyword arguments above."""
        ckpt = load_checkpoint(path, map_location="cpu")
        if options.get("runtime") in ("onnx", "int8"):  # their exports are cached under the file's sha256
            options.setdefault("checkpoint_sha256", file_sha256(path))
        return cls(ckpt, device, **options)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The eager model -> the module `forward` runs for `self.runtime` (handlers/runtimes.py). ONNX Runtime uses
        torch's thread count, which the TorchServe adapter sets from cpu_threads (cores / workers by default)."""
        module, self.runtime_info = prepare_runtime(
            self.runtime, model, self.preprocess, self.device, threads=torch.get_num_threads(),
            cache_dir=self.runtime_cache, key=self.checkpoint_sha256, recipe=self.recipe)
        log.info("runtime %s ready: %s", self.runtime, self.runtime_info)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A normalized float32 batch -> float32 logits (layout and precision are the runtime's business)."""
        return self.model(x).float()

    def decode(self, datas: Sequence[bytes]) -> list[torch.Tensor | BadInput]:
        """Encoded images -> uint8 (C, H, W) tensors on the pipeline device, or a BadInput per failed item."""
        channels = self.preprocess["channels"]
        if self.jpeg_decoder == "torchvision":
            return decode_jpegs(datas, channels, self.device, self.limits, self.preprocess["resize"])
        out: list[torch.Tensor | BadInput] = []
        for data in datas:
            try:
                out.append(decode_image(data, channels, self.limits, min_side=self.preprocess["resize"]))
            except BadInput as e:
                out.append(e)
        return out

    @torch.inference_mode()
    def predict(self, images: Sequence[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images -> (top-k probabilities, top-k class indices), both (N, k) on CPU."""
        probs, idx = [], []
        for start in range(0, len(images), self.max_batch):
            x = eval_batch(images[start:start + self.max_batch], self.preprocess, device=self.device)
            p, i = torch.softmax(self.forward(x), dim=1).topk(k, dim=1)
            probs.append(p.cpu())
            idx.append(i.cpu())
        return torch.cat(probs), torch.cat(idx)

    def handle_requests(self, requests: Sequence[Any]) -> list[tuple[int, Any]]:
        """Answer every request item: (200, predictions) or (4xx/5xx, error JSON). Never raises."""
        answers: list[tuple[int, Any] | None] = [None] * len(requests)
        parsed: dict[int, ParsedRequest] = {}
        for r, item in enumerate(requests):
            try:
                parsed[r] = p = parse_request(item, self.max_images_per_request, self.limits.max_bytes)
                p.topk = self._topk(p.topk)
            except BadInput as e:
                answers[r] = (e.status, e.body())
            except Exception as e:  # a parser bug must not take the batch down
                log.exception("request %d: parsing failed", r)
                answers[r] = (500, error_body(500, "InternalError", f"could not read the request ({type(e).__name__})"))
        flat = [(r, j, data) for r, p in parsed.items() if answers[r] is None for j, data in enumerate(p.images)]
        try:
            decoded = self.decode([data for _, _, data in flat])
        except Exception as e:
            return self._fail_all(answers, e)
        for (r, j, _), x in zip(flat, decoded):
            if isinstance(x, BadInput) and answers[r] is None:
                where = f"images[{j}]: " if parsed[r].multi else ""
                answers[r] = (x.status, error_body(x.status, x.type, where + x.message))
        good = [(r, j, x) for (r, j, _), x in zip(flat, decoded) if answers[r] is None]
        if good:
            try:
                probs, idx = self.predict([x for _, _, x in good], max(parsed[r].topk for r, _, _ in good))
            except Exception as e:
                return self._fail_all(answers, e)
            preds: dict[int, list[list[dict[str, Any]]]] = {}
            for n, (r, _, _) in enumerate(good):
                k = parsed[r].topk
                preds.setdefault(r, []).append(
                    [{"label": self.classes[c], "index": c, "probability": p}
                     for p, c in zip(probs[n, :k].tolist(), idx[n, :k].tolist())])
            for r, lists in preds.items():
                body: dict[str, Any] = {"model": self.model_name, "version": self.model_version}
                if parsed[r].multi:
                    body["results"] = [{"predictions": p} for p in lists]
                else:
                    body["predictions"] = lists[0]
                answers[r] = (200, body)
        return answers  # type: ignore[return-value]

    def _topk(self, topk: Any) -> int:
        if topk is None:
            return self.topk
        n = len(self.classes)
        if isinstance(topk, str) and topk.strip().isdigit():
            topk = int(topk)
        if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= n:
            raise BadInput(400, "InvalidTopK", f"topk must be an integer from 1 to {n}, got {topk!r}")
        return topk

    def _fail_all(self, answers: list[tuple[int, Any] | None], exc: Exception) -> list[tuple[int, Any]]:
        """A failure of the shared batch (OOM, a model error): every request not already answered gets 5xx."""
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
            log.error("out of memory on %d requests", len(answers))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            fail = (503, error_body(503, "OutOfMemory", "the server ran out of memory; retry with fewer images"))
        else:
            log.exception("inference failed", exc_info=exc)
            fail = (500, error_body(500, "InternalError", f"inference failed ({type(exc).__name__}); retry later"))
        return [a if a is not None else fail for a in answers]

    def describe(self) -> dict[str, Any]:
        """What a client needs to know to call the model."""
        return {"model": self.model_name, "version": self.model_version, "classes": self.classes,
                "preprocess": self.preprocess, "topk": self.topk, "device": str(self.device),
                "runtime": self.runtime, "runtime_info": {k: v for k, v in self.runtime_info.items() if k != "file"},
                "max_image_pixels": self.limits.max_pixels,
                "max_image_bytes": self.limits.max_bytes, "max_images_per_request": self.max_images_per_request}
