"""Request parsing, shared by every pipeline: a TorchServe request item -> the payload and the request's fields.

TorchServe hands a handler one dict per request: {"data" or "body": payload, <form fields / query params>...}.
`split_item` separates the payload from the small fields (e.g. `topk`); `parse_request` is the image grammar
(raw bytes, base64 JSON, lists, data URLs, and the ecosystem's conventions: TorchServe's `{"data": b64}` and
KServe v1's `{"instances": [{"data": b64}, ...]}`). No TorchServe import.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from handlers.errors import BadInput

# The frontend's max_request_size (archive_configs/config.properties.template; a test keeps them equal): no request
# body is larger, so it is also the default limit for one encoded image and the base of the decoded-pixel budgets.
MAX_REQUEST_BYTES = 16 * 1024 * 1024
_B64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_\r\n")


@dataclass
class ParsedRequest:
    images: list[bytes]       # encoded images, in request order
    topk: int | None = None   # None: the configured default
    multi: bool = False       # answered as {"results": [...]} (a list or {"images": [...]} was sent)
    instances: bool = False   # KServe v1 {"instances": [...]}: answered as {"predictions": [one per instance]}


FIELD_MAX_CHARS = 256  # a request field (form field or query parameter) longer than this is a payload, not an option
FORM_ENCODED = "application/x-www-form-urlencoded"


def check_content_type(content_type: str | None) -> None:
    """Refuse a form-encoded body (curl's default for -d and --data-binary): TorchServe has already split it at
    '&' and '=' and turned '+' into spaces, so neither image bytes nor base64 survive. Raises BadInput (415)."""
    if content_type and content_type.split(";")[0].strip().lower() == FORM_ENCODED:
        raise BadInput(415, "FormEncodedBody", "form-encoded body (curl's default for -d/--data-binary) mangles "
                       "images; resend with -H 'Content-Type: application/octet-stream' (image bytes), text/plain "
                       "(base64) or application/json (JSON)")


def split_item(item: Any, fields: frozenset[str] = frozenset({"topk"})) -> tuple[Any, dict[str, str]]:
    """(payload, {field: text}) of one request item. TorchServe gives {"data" or "body": value, ...} plus one key
    per form field or query parameter; the keys named in `fields` are the request's options (as text)."""
    if not isinstance(item, dict):
        return item, {}
    opts = {}
    for key in fields:
        value = item.get(key)
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value[:FIELD_MAX_CHARS + 1]).decode("latin-1")
        if value is not None:
            opts[key] = value if not isinstance(value, str) else value[:FIELD_MAX_CHARS + 1]
    for key in ("data", "body"):
        if item.get(key) is not None:
            return item[key], opts
    rest = [v for k, v in item.items() if k not in fields and v is not None]
    if len(rest) == 1:
        return rest[0], opts
    if not rest:
        raise BadInput(400, "EmptyBody", "the request body is empty; send image bytes or JSON "
                       '{"image": "<base64>"}')
    names = ", ".join(repr(k)[:20] for k in sorted(item)[:3])
    raise BadInput(400, "MissingImage", f"the body arrived as a form with {len(item)} fields ({names}, ...): "
                   "send image bytes with Content-Type image/* or application/octet-stream (curl --data-binary "
                   "sends form encoding unless told otherwise), or a multipart field named 'data'")


def parse_request(item: Any, max_images: int = 64, max_bytes: int = MAX_REQUEST_BYTES) -> ParsedRequest:
    """One TorchServe request item -> ParsedRequest. Raises BadInput (400/413) with a message for the client.

    Accepted: raw image bytes; JSON {"image": b64} (or {"data": b64}, TorchServe's convention) or
    {"images": [b64, ...]} or [b64, ...] or KServe v1 {"instances": [{"data": b64} or b64, ...]} (bytes, str or
    already decoded by TorchServe), each b64 optionally a data URL; an optional "topk" in the JSON object or as
    a multipart field.
    """
    payload, fields = split_item(item)
    field_topk = fields.get("topk")
    if isinstance(payload, (bytes, bytearray, memoryview)):
        payload = bytes(payload)
        head = payload[:64].lstrip()
        if head[:1] in (b"{", b"["):
            payload = parse_json(payload)
        elif head[:5].lower() == b"data:" or (head and _B64_CHARS.issuperset(head)):
            # a data URL or base64 text sent as application/octet-stream (no image starts with 64 such bytes)
            return ParsedRequest([b64_bytes(payload.decode("latin-1"), max_bytes, "body")], field_topk)
        else:
            if not payload:
                raise BadInput(400, "EmptyBody", "the request body is empty; send image bytes or JSON "
                               '{"image": "<base64>"}')
            return ParsedRequest([payload], field_topk)
    if isinstance(payload, str):
        text = payload.strip()
        if text[:1] in ("{", "["):
            payload = parse_json(text)
        else:  # a text/plain body: one base64 string or data URL
            return ParsedRequest([b64_bytes(text, max_bytes, "body")], field_topk)
    if isinstance(payload, dict):
        topk = payload.get("topk", field_topk)
        for key in ("image", "data"):
            if key in payload:
                return ParsedRequest([b64_bytes(payload[key], max_bytes, key)], topk)
        if "images" in payload:
            return ParsedRequest(_b64_list(payload["images"], max_images, max_bytes, "images"), topk, True)
        if "instances" in payload:
            return ParsedRequest(_instances(payload["instances"], max_images, max_bytes), topk, True, True)
        raise BadInput(400, "MissingImage", 'the JSON has no image; send {"image": "<base64>"} or '
                       '{"images": ["<base64>", ...]} or {"instances": [{"data": "<base64>"}, ...]}')
    if isinstance(payload, list):
        return ParsedRequest(_b64_list(payload, max_images, max_bytes, ""), field_topk, True)
    raise BadInput(400, "MissingImage", "the request has no image; send image bytes or JSON "
                   '{"image": "<base64>"}')


def parse_json(text: str | bytes) -> Any:
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
    return [b64_bytes(s, max_bytes, f"{name}[{i}]") for i, s in enumerate(items)]


def _instances(items: Any, max_images: int, max_bytes: int) -> list[bytes]:
    """KServe v1 instances: each {"data": b64} (TorchServe's KServe convention) or a bare b64 string."""
    if not isinstance(items, list) or not items:
        raise BadInput(400, "MissingImage", 'instances must be a non-empty list like [{"data": "<base64>"}, ...]')
    images = [item.get("data") if isinstance(item, dict) else item for item in items]
    missing = next((i for i, item in enumerate(items) if isinstance(item, dict) and "data" not in item), None)
    if missing is not None:
        raise BadInput(400, "MissingImage", f'instances[{missing}] has no "data"; send {{"data": "<base64>"}}')
    return _b64_list(images, max_images, max_bytes, "instances")


def b64_bytes(text: Any, max_bytes: int, where: str = "image") -> bytes:
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
