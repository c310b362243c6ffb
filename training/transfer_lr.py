"""The transfer experiment's learning-rate grid (`experiment-transfer --lr-grid`): is each method's learning
rate a fair one?

Every method of the experiment trains with one learning-rate setting: head LR 0.05, a pretrained backbone at
0.1 x that, from scratch everything at 0.05. The grid tries other settings at the fewest images per class
(the goal's row), for every seed: the settings of GRID below, widened past every pick that sat on its edge, so
that each method's pick has a worse setting on both sides. Per method the setting with the best
mean final **validation** accuracy over the seeds is picked (the trees' val split: 10 images per class, apart
from every training image; ties go to the default setting); the test images only score the pick.

The runs of the default setting are the experiment's own (runs/<k>shot-<method>-seed<s>.json, reused); the
others go to runs/lr-grid/<k>shot-<method>-<knob><value>-seed<s>.json. Resumable like the experiment.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from handlers.artifacts import write_json
from training.finetune import sha256_of
from training.transfer import (
    METHOD_NAMES,
    experiment_config,
    fine_tune,
    finetune_recipe,
    pretrain,
    rerun_command,
    verdict,
    write_trees,
)

# method -> (the experiment_config key it varies, its values); the first value is the experiment's default.
GRID: dict[str, tuple[str, tuple[float, ...]]] = {
    "layer4_head": ("backbone_lr_factor", (0.1, 0.3, 1.0, 3.0, 10.0)),
    "full": ("backbone_lr_factor", (0.1, 0.3, 1.0, 3.0, 10.0)),
    "scratch": ("head_lr", (0.05, 0.02, 0.1, 0.2, 0.5)),
    "linear_probe": ("head_lr", (0.05, 0.02, 0.1, 0.3, 1.0)),
}
ORDER = ("layer4_head", "full", "scratch", "linear_probe")  # cheapest grid first; the table's order is METHODS


def setting_name(knob: str, value: float) -> str:
    return f"{knob}{value:g}"


def run_path(out: Path, shots: int, method: str, knob: str, value: float, seed: int, default: float) -> Path:
    """The default setting's run is the experiment's own; every other setting has its own name."""
    if value == default:
        return out / "runs" / f"{shots}shot-{method}-seed{seed}.json"
    return out / "runs" / "lr-grid" / f"{shots}shot-{method}-{setting_name(knob, value)}-seed{seed}.json"


def run_grid(out_dir: str | Path, data_root: str | None = None, quick: bool = False, full: bool = False,
             progress: bool = True, train_missing: bool = True, finetune_steps: int | None = None,
             pretrain_epochs: int | None = None) -> dict[str, Any]:
    """Every (method, setting, seed) of GRID at the fewest images per class, reusing the experiment's trees,
    pretraining and default-setting runs in out_dir; writes lr-grid.json there and returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = experiment_config(quick, full, finetune_steps, pretrain_epochs)
    t0 = time.perf_counter()
    trees = write_trees(out, cfg, data_root)
    pretrain(out, cfg, trees["pretrain"], progress, train_missing)
    base_sha = sha256_of(out / "pretrain.pt")
    (out / "runs" / "lr-grid").mkdir(parents=True, exist_ok=True)
    shots = min(cfg["shots"])
    runs = []
    for method in ORDER:
        knob, values = GRID[method]
        for value in values:
            for seed in cfg["seeds"]:
                recipe = finetune_recipe({**cfg, knob: value}, method, trees["finetune"][f"{shots}-{seed}"], shots,
                                         seed, str(out / "pretrain.pt"))
                path = run_path(out, shots, method, knob, value, seed, cfg[knob])
                labels = {"shots": shots, "method": method, "seed": seed, "knob": knob, "value": value}
                row = fine_tune(recipe, path, base_sha, labels, train_missing, progress)
                if row:
                    runs.append({**row, **labels})  # the experiment's own runs carry no knob: add it
    grid = {"config": cfg, "grid": {m: [knob, list(values)] for m, (knob, values) in GRID.items()},
            "shots": shots, "runs": runs, "test_images": trees["test_images"], "val_images": trees["val_images"],
            "hardware": runs[0]["hardware"] if runs else None,
            "wall_s_this_invocation": round(time.perf_counter() - t0, 1)}
    write_json(out / "lr-grid.json", grid)
    return grid


def final_val_acc(run: dict[str, Any]) -> float:
    """The validation accuracy of the run's final weights (the ones scored on the test images)."""
    return run["history"][-1]["val_acc"]


def summarize_grid(grid: dict[str, Any]) -> dict[str, Any]:
    """Per (method, setting): val and test accuracy per seed, their means; per method the pick (the best mean
    final val accuracy among settings every seed has finished; ties to the default setting)."""
    cfg, seeds = grid["config"], grid["config"]["seeds"]
    settings, picked = {}, {}
    for method in cfg["methods"]:
        knob, values = grid["grid"][method]
        rows = []
        for value in values:
            done = sorted((r for r in grid["runs"] if r["method"] == method and r["value"] == value),
                          key=lambda r: r["seed"])
            tests, vals = [r["test_acc"] for r in done], [final_val_acc(r) for r in done]
            rows.append({"knob": knob, "value": value, "default": value == cfg[knob], "n": len(done),
                         "seeds": [r["seed"] for r in done], "val_accs": vals, "test_accs": tests,
                         "val_mean": statistics.fmean(vals) if vals else None,
                         "test_mean": statistics.fmean(tests) if tests else None,
                         "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                         "train_time_s": statistics.fmean(r["train_time_s"] for r in done) if done else None})
        settings[method] = rows
        complete = [r for r in rows if r["n"] == len(seeds)]
        if complete:  # max keeps the first of equals, and the default comes first
            best = max(sorted(complete, key=lambda r: not r["default"]), key=lambda r: r["val_mean"])
            picked[method] = best["value"]
    loads = [x for r in grid["runs"] for x in r.get("loadavg", [])]
    return {"config": cfg, "shots": grid["shots"], "grid": grid["grid"], "settings": settings, "picked": picked,
            "test_images": grid["test_images"], "val_images": grid["val_images"], "hardware": grid["hardware"],
            "runs_done": len(grid["runs"]), "runs_planned": len(seeds) * sum(len(v) for _, v in grid["grid"].values()),
            "train_time_s_total": sum(r["train_time_s"] for r in grid["runs"]),
            "loadavg_min": min(loads, default=None), "loadavg_max": max(loads, default=None)}


def _as_cell(row: dict[str, Any]) -> dict[str, Any]:
    return {"n": row["n"], "mean": row["test_mean"], "accs": row["test_accs"], "seeds": row["seeds"]}


def picked_verdict(summary: dict[str, Any]) -> str:
    """The goal's verdict (transfer.verdict) on the picked settings of layer4 + head and from scratch."""
    k, picked = summary["shots"], summary["picked"]
    if "layer4_head" not in picked or "scratch" not in picked:
        return f"At {k} images per class the grid of layer4 + head or from scratch has not finished: no pick yet."
    rows = {m: next(r for r in summary["settings"][m] if r["value"] == picked[m]) for m in ("layer4_head", "scratch")}
    return verdict({"config": {"shots": [k]}, "cells": {f"{k}/{m}": _as_cell(r) for m, r in rows.items()}})


def _pct(x: float | None, std: float | None = None, n: int = 0) -> str:
    if x is None:
        return "not run"
    return f"{100 * x:.1f}" + (f" ± {100 * std:.1f}" if std is not None and n > 1 else "")


def markdown_grid(summary: dict[str, Any]) -> str:
    """The figures block `transfer-lr` of docs/training.md, generated from docs/transfer-lr.json."""
    cfg, k, n = summary["config"], summary["shots"], len(summary["config"]["seeds"])
    rows = ["| method | setting | val acc (%) | test acc (%) | per seed, test (%) | picked |", "|---" * 6 + "|"]
    for method in cfg["methods"]:
        for r in summary["settings"][method]:
            name = f"{r['knob']} {r['value']:g}"
            cells = [_pct(r["val_mean"]), _pct(r["test_mean"], r["test_std"], r["n"])]
            if 0 < r["n"] < n:
                cells = [f"{c} (n={r['n']})" for c in cells]
            seeds = ", ".join(f"{100 * a:.1f}" for a in r["test_accs"]) or "-"
            final = all(x["n"] == n for x in summary["settings"][method])
            mark = ("**yes**" if final else "so far") if summary["picked"].get(method) == r["value"] else ""
            rows.append(f"| {METHOD_NAMES[method]} | {name}{' (default)' if r['default'] else ''} | "
                        f"{' | '.join(cells)} | {seeds} | {mark} |")
    edge = [f"{METHOD_NAMES[m]} ({summary['grid'][m][0]} {v:g})" for m, v in summary["picked"].items()
            if len(summary["grid"][m][1]) > 1 and v in (max(summary["grid"][m][1]), min(summary["grid"][m][1]))]
    default = {m: next(r for r in summary["settings"][m] if r["default"]) for m in ("layer4_head", "scratch")}
    default_verdict = verdict({"config": {"shots": [k]},
                               "cells": {f"{k}/{m}": _as_cell(r) for m, r in default.items()}})
    done = summary["runs_done"], summary["runs_planned"]
    partial = [] if done[0] == done[1] else [
        f"{done[0]} of the {done[1]} planned runs have finished (the others show as not run or with their n); "
        "a method is picked only among settings every seed has finished (so far: not every setting has); "
        f"`{rerun_command(cfg)} --lr-grid` resumes the others.", ""]
    return "\n".join([
        f"At {k} images per class, {n} seeds: mean final validation accuracy on the {summary['val_images']} val "
        f"images (the pick) and test accuracy on the {summary['test_images']} test images (mean ± std):",
        "",
        *rows,
        "",
        *partial,
        *([f"Picked at the edge of its grid, so a setting beyond it may do better still: {', '.join(edge)}.", ""]
          if edge else []),
        f"Default settings: {default_verdict}",
        "",
        f"Picked settings{'' if done[0] == done[1] else ' (so far)'}: {picked_verdict(summary)}",
        "",
        f"Training loop of the grid's runs (the default settings' included): "
        f"{summary['train_time_s_total'] / 60:.0f} min on {summary['hardware']} "
        f"at the lowest priority beside other work (1-minute load average {summary['loadavg_min']}-"
        f"{summary['loadavg_max']} at the runs' starts and ends). Figures: [transfer-lr.json](transfer-lr.json).",
    ])


def write_grid_docs(summary: dict[str, Any], docs_dir: str | Path) -> None:
    """docs/transfer-lr.json and the `transfer-lr` block in docs/training.md."""
    from training.docblock import write_doc_block

    docs = Path(docs_dir)
    write_json(docs / "transfer-lr.json", summary)
    write_doc_block(docs / "training.md", "transfer-lr", markdown_grid(summary))
