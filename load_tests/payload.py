"""What one load-test request is made of, and what counts as its success. No locust import (see shapes.py)."""

from __future__ import annotations

import glob
import json
import mimetypes
from pathlib import Path

EXPECT = ("predictions", "labels", "detections")  # what a good answer body holds (check_body)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def find_images(spec: str) -> list[Path]:
    """A folder (its image files) or a glob pattern -> sorted image paths."""
    path = Path(spec)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    return sorted(Path(p) for p in glob.glob(spec) if Path(p).suffix.lower() in IMAGE_EXTS)


def load_images(spec: str) -> list[tuple[str, bytes, str]]:
    """(file name, bytes, Content-Type from the extension) for every image `spec` names."""
    return [(p.name, p.read_bytes(), mimetypes.guess_type(p.name)[0] or "application/octet-stream")
            for p in find_images(spec)]


def multipart(name: str, data: bytes, ctype: str, fields: dict[str, str]) -> tuple[bytes, str]:
    """A multipart/form-data body: the image as field "data" plus text fields. TorchServe passes each form
    field to the handler as its own key (URL query parameters never reach a handler), which is how our
    handler receives a per-request "topk"."""
    boundary = "----loadtest7d1f0e2b9c"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="{name}"\r\n'
                 f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def read_token(path: str | Path) -> str:
    """The inference key from a TorchServe key_file.json ({"inference": {"key": ...}, ...})."""
    try:
        return json.loads(Path(path).read_text())["inference"]["key"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"cannot read the inference key from {path} ({e}); is TorchServe running "
                         "(`make serve`) and is this its key_file.json?") from None


def check_body(status: int, text: str, expect: str = "predictions", topk: int = 0) -> str | None:
    """None when the answer is a success, else why it is a failure (shown in locust's failure table).

    expect="predictions": our handler's {"predictions": [...]} (or {"results": [...]} for a multi-image body);
    expect="labels": the stock TorchServe handler's {"label": probability, ...}; expect="detections": a
    segmentation model's frame answer ({"kind": "frame", "detections": [...], ...}, the list may be empty).
    topk > 0: exactly that many predictions (the per-request topk reached the handler).
    """
    if status != 200:
        return f"HTTP {status}: {text[:120]}"
    try:
        body = json.loads(text)
    except ValueError:
        return "HTTP 200 but the body is not JSON"
    if expect == "labels":
        ok = isinstance(body, dict) and body and all(isinstance(v, (int, float)) for v in body.values())
        return None if ok else "HTTP 200 but the body has no {label: probability} map"
    if expect == "detections":
        ok = isinstance(body, dict) and isinstance(body.get("detections"), list)
        return None if ok else "HTTP 200 but the body has no detections list"
    preds = body.get("predictions") or body.get("results") if isinstance(body, dict) else None
    if not preds:
        return "HTTP 200 but the body has no predictions"
    if topk and "predictions" in body and len(preds) != topk:
        return f"HTTP 200 but {len(preds)} predictions instead of topk={topk}"
    return None
