"""The ImageNet folder layout: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (what `dataset: imagefolder` reads).

ImageNet's validation images come flat (val/ILSVRC2012_val_00000001.JPEG, ...) with a separate ground-truth
file. `reorganise_val` sorts them into val/<wnid>/ from any of the usual ground-truth files:

- `LOC_val_solution.csv` (header `ImageId,PredictionString`; the first token of the prediction is the wnid);
- a text file of `<file name> <wnid>` lines (what most preparation scripts write);
- the devkit's `ILSVRC2012_validation_ground_truth.txt` (one ILSVRC2012_ID per line, in file-name order), with
  the devkit's `meta.mat` beside it (ID -> wnid; read with scipy).

Nothing is lost: every flat image must have a label before anything moves (else the run stops and names the
unlabelled files), images move with os.replace within the folder (or are copied / symlinked), and a rerun
after an interruption moves only what is still flat.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path
from typing import Any

from training.data import IMAGE_EXTENSIONS, DatasetError

_SAFE_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHOW = 5


def _devkit_wnids(meta: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid for the 1000 leaf synsets of the devkit's meta.mat (as torchvision reads it)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DatasetError(f"reading {meta} needs scipy (pip install scipy)") from None
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    return {int(s[0]): str(s[1]) for s in synsets if int(s[4]) == 0}  # fields: ID, WNID, words, gloss, children


def read_ground_truth(path: str | Path) -> dict[str, str]:
    """Image key (file name without extension) -> wnid, from one of the formats above."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"ground-truth file not found: {path}")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise DatasetError(f"{path} is empty")
    if lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        rows = list(csv.reader(lines[1:]))
        return {r[0].strip(): r[1].split()[0] for r in rows if len(r) >= 2 and r[1].split()}
    if all(ln.isdigit() for ln in lines):
        meta = path.with_name("meta.mat")
        if not meta.is_file():
            raise DatasetError(f"{path} holds class IDs; their wnids come from the devkit's meta.mat, expected at "
                               f"{meta}")
        wnids = _devkit_wnids(meta)
        unknown = sorted({int(ln) for ln in lines} - set(wnids))
        if unknown:
            raise DatasetError(f"{path}: class IDs {unknown[:_SHOW]} are not in {meta}")
        return {f"ILSVRC2012_val_{i:08d}": wnids[int(ln)] for i, ln in enumerate(lines, start=1)}
    out = {}
    for n, ln in enumerate(lines, start=1):
        parts = re.split(r"[\s,]+", ln)
        if len(parts) < 2:
            raise DatasetError(f"{path}:{n}: expected '<file name> <wnid>', got {ln!r}")
        out[Path(parts[0]).stem] = parts[1]
    return out


def reorganise_val(val_dir: str | Path, ground_truth: str | Path, mode: str = "move") -> dict[str, Any]:
    """Sort the flat images of `val_dir` into val_dir/<wnid>/ (mode move | copy | link). Returns counts."""
    if mode not in ("move", "copy", "link"):
        raise ValueError(f"mode must be move, copy or link, got {mode!r}")
    val = Path(val_dir)
    if not val.is_dir():
        raise DatasetError(f"val folder not found: {val}")
    labels = read_ground_truth(ground_truth)
    bad = sorted({w for w in labels.values() if not _SAFE_LABEL.match(w)})
    if bad:
        raise DatasetError(f"{ground_truth}: labels that cannot be folder names: {bad[:_SHOW]}")
    flat = sorted(p for p in val.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    unlabelled = [p.name for p in flat if p.stem not in labels]
    if unlabelled:
        raise DatasetError(f"{len(unlabelled)} images in {val} have no label in {ground_truth} (e.g. "
                           f"{', '.join(unlabelled[:_SHOW])}); nothing was moved")
    for p in flat:
        target = val / labels[p.stem] / p.name
        target.parent.mkdir(exist_ok=True)
        if mode == "move":
            os.replace(p, target)
        elif mode == "copy":
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(p, tmp)
            os.replace(tmp, target)
        elif not target.exists():
            target.symlink_to(p.resolve())
    folders = [d for d in val.iterdir() if d.is_dir()]
    placed = {f.stem for d in folders for f in d.iterdir() if f.stem in labels}
    return {"images": len(placed), "sorted_now": len(flat), "classes": len(folders),
            "labels_without_image": len(set(labels) - placed)}
