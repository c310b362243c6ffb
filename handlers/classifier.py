"""TorchServe handler entry file for image classification: a thin adapter over handlers.image.ImagePipeline.

Inside a .mar this file sits at the archive root; see handlers/adapter.py for what the adapter does.
"""

from __future__ import annotations

from handlers.adapter import PipelineHandler
from handlers.image import ImagePipeline


class ImageClassifier(PipelineHandler):
    """Image classification: raw image bytes or base64 JSON in, top-k labels and probabilities out."""

    pipeline_class = ImagePipeline
