"""`python -m serving predict-video CLIP --out annotated.mp4`: send a clip to a served segmentation model, read
its streamed answer (NDJSON lines as frames are done) and write the clip again with the masks and boxes drawn in.

Every frame of the clip is written; a frame the sampling skipped shows the latest answer before it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving.server import ServingError

ALPHA = 0.45  # mask opacity over the frame


def request_fields(every: int | None = None, fps: float | None = None, max_frames: int | None = None,
                   masks: str = "rle", stream: bool = True) -> dict[str, str]:
    """The multipart fields of a clip request (TorchServe 0.12 drops query strings on /predictions)."""
    fields = {"masks": masks, "stream": "true" if stream else "false"}
    for name, value in (("every", every), ("fps", fps), ("max_frames", max_frames)):
        if value is not None:
            fields[name] = str(value)
    return fields


def read_answer(response: Any) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(header, frames, end) of a streamed clip answer; a non-200 answer or an error line is a ServingError."""
    if response.status_code != 200:
        try:
            body = response.json()
        except ValueError:
            body = {"message": response.text.strip() or response.reason}
        raise ServingError(f"HTTP {response.status_code}: {body.get('message', body)}")
    header, frames, end = None, [], None
    for raw in response.iter_lines():
        if not raw:
            continue
        line = json.loads(raw)
        if "code" in line:  # a stream that failed part-way ends with the error
            raise ServingError(f"the server stopped after {len(frames)} frames: {line['message']}")
        if header is None:
            header = line
        elif line.get("end"):
            end = line
        else:
            frames.append(line)
    if header is None or end is None:
        raise ServingError("the answer ended early (no header or end line)")
    return header, frames, end


def annotate(frame: torch.Tensor, answer: dict[str, Any], classes: list[str]) -> torch.Tensor:
    """uint8 (3, H, W) frame + one frame's answer -> uint8 (3, H, W) with the mask tinted in and labelled boxes."""
    from torchvision.utils import draw_bounding_boxes

    from handlers.segment import decode_mask
    from training.seg_report import overlay, palette

    colours = palette(len(classes))
    if "mask" in answer:
        labels = torch.from_numpy(decode_mask(answer["mask"]).astype(np.int64))
        frame = (overlay(frame, labels, colours, ALPHA) * 255).round().to(torch.uint8).permute(2, 0, 1)
    dets = answer["detections"]
    if not dets:
        return frame
    boxes = torch.tensor([d["box"] for d in dets], dtype=torch.float32) - torch.tensor([0, 0, 1, 1])
    return draw_bounding_boxes(frame, boxes, labels=[f"{d['label']} {d['score']:.2f}" for d in dets],
                               colors=[tuple(int(255 * c) for c in colours[d["index"]]) for d in dets], width=2)


def write_annotated(clip: Path, out: Path, frames: list[dict[str, Any]], classes: list[str]) -> int:
    """Decode `clip`, draw each frame's latest answer, encode H.264 MP4 at the clip's rate. Returns frames written."""
    import av

    by_index = {f["frame"]: f for f in frames}
    out.parent.mkdir(parents=True, exist_ok=True)
    written, current = 0, None
    with av.open(str(clip)) as src, av.open(str(out), "w") as dst:
        stream = src.streams.video[0]
        rate = stream.average_rate or 30
        w, h = stream.codec_context.width // 2 * 2, stream.codec_context.height // 2 * 2  # yuv420p: even sides
        enc = dst.add_stream("libx264", rate=rate)
        enc.width, enc.height, enc.pix_fmt = w, h, "yuv420p"
        enc.options = {"crf": "20", "preset": "veryfast"}
        for i, frame in enumerate(src.decode(stream)):
            current = by_index.get(i, current)
            rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
            if current is not None:
                rgb = annotate(rgb, current, classes)
            rgb = rgb[:, :h, :w].permute(1, 2, 0).contiguous().numpy()
            dst.mux(enc.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
            written += 1
        dst.mux(enc.encode())
    return written


def predict_video(client: Any, model: str, clip: Path, out: Path, version: str | None = None,
                  **sampling: Any) -> dict[str, Any]:
    """Send `clip` (streamed answer), write the annotated clip to `out`; returns a summary."""
    start = time.perf_counter()
    body = clip.read_bytes()
    r = client.predict(model, None, version, files={"data": (clip.name, body, "application/octet-stream")},
                       data=request_fields(**sampling), stream=True)
    with r:
        header, frames, end = read_answer(r)
    served = time.perf_counter() - start
    classes = [str(c) for c in header["classes"]]
    written = write_annotated(clip, out, frames, classes)
    counts = Counter(d["label"] for f in frames for d in f["detections"])
    return {"clip": str(clip), "out": str(out), "model": header["model"], "version": header["version"],
            "video": header["video"], "frames_answered": len(frames), "frames_written": written,
            "truncated": end["truncated"], "served_s": round(served, 2),
            "served_fps": round(len(frames) / served, 1) if served else None, "detections": dict(counts.most_common())}

