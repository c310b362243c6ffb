"""TorchServe handler entry file for segmentation of frames and clips: a thin adapter over
handlers.segment.SegmentPipeline (one endpoint; an image body is a frame, an MP4/WebM/MKV body a clip).

Inside a .mar this file sits at the archive root; see handlers/adapter.py for what the adapter does.
"""

from __future__ import annotations

from handlers.adapter import PipelineHandler
from handlers.segment import SegmentPipeline


class Segmenter(PipelineHandler):
    """Frames or clips in; per frame detections (label, score, box) and the mask (RLE or PNG) out."""

    pipeline_class = SegmentPipeline
