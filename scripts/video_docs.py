"""How the video figure scripts publish a result: its JSON (reports/ by default) and, with --docs, the committed
copy docs/<name>.json and the block `<!-- name:begin/end -->` in docs/video.md that the result's Markdown fills
(tests/test_video.py checks that the block is exactly what the committed JSON generates)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from handlers.artifacts import write_json
from load_tests.reliability import write_doc_block

ROOT = Path(__file__).resolve().parents[1]


def publish(result: dict[str, Any], out: Path, name: str, markdown: str, docs: bool) -> None:
    write_json(out, result)
    if docs:
        write_json(ROOT / "docs" / f"{name.replace('-', '_')}.json", result)
        write_doc_block(ROOT / "docs" / "video.md", name, markdown)
    print(markdown)
