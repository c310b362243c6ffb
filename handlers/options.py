"""Handler options: the `handler:` mapping of an archive config, checked before a worker starts (the archive step
and the TorchServe adapter both call these), and the decode limits among them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from handlers.decode import DecodeLimits


def check_options(cfg: Mapping[str, Any] | None, options: Mapping[str, type]) -> dict[str, Any]:
    """Validate a handler-options mapping against `options` (name -> type): unknown keys or wrong types raise
    ValueError saying what to fix."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(options))
    if unknown:
        raise ValueError(f"unknown handler option(s) {unknown}; known: {sorted(options)}")
    for key, typ in options.items():
        if key in cfg and (not isinstance(cfg[key], typ) or (typ is int and isinstance(cfg[key], bool))):
            raise ValueError(f"handler option {key!r} must be {typ.__name__}, got {cfg[key]!r}")
    return cfg


# handler option -> DecodeLimits field
LIMIT_OPTIONS = {"max_image_pixels": "max_pixels", "max_image_bytes": "max_bytes", "jpeg_draft": "jpeg_draft",
                 "max_request_pixels": "max_request_pixels", "max_batch_pixels": "max_batch_pixels"}


def decode_limits(options: Mapping[str, Any]) -> DecodeLimits:
    """The limits among handler options -> DecodeLimits (defaults for the others); ValueError when they do not fit
    together. The archive step calls it too, so a config with inconsistent limits fails there, not in a worker."""
    return DecodeLimits(**{LIMIT_OPTIONS[k]: v for k, v in options.items() if k in LIMIT_OPTIONS})
