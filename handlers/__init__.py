"""The inference library: TorchServe-free pipelines (pipeline.py and its stages) and thin TorchServe handlers.

PIPELINES maps each TorchServe handler entry file to the pipeline it adapts, so the archive step can validate a
config's `handler:` options against exactly the options that handler accepts.
"""

from __future__ import annotations

import importlib
from typing import Any

PIPELINES = {"classifier.py": "handlers.image:ImagePipeline"}


def pipeline_class(handler_file: str) -> Any:
    """The pipeline class behind a handler entry file name (e.g. "classifier.py")."""
    try:
        module, name = PIPELINES[handler_file].split(":")
    except KeyError:
        raise KeyError(f"no pipeline for handler {handler_file!r}; known handlers: {', '.join(PIPELINES)}") from None
    return getattr(importlib.import_module(module), name)
