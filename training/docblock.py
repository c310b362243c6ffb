"""Generated blocks in Markdown pages: figures written from their JSON, between begin/end markers."""

from __future__ import annotations

import re
from pathlib import Path


def write_doc_block(path: Path, name: str, body: str) -> None:
    """Replace the text between <!-- name:begin --> and <!-- name:end --> in `path` (appended if missing)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.is_file() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
