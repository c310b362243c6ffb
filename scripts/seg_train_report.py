"""Figures of segmentation training runs for docs/video.md, from what the runs themselves wrote:

    .venv/bin/python scripts/seg_train_report.py \
        --run reports/seg/cpu64/metrics.json reports/seg/cpu64_train.log vit_seg_tiny_moving_fmnist_cpu64 --docs

Per run: `metrics.json` from `python -m training eval --out-dir D` (test mIoU, AP@0.5, pixel accuracy, and the
training cost the checkpoint recorded: wall and CPU seconds, epochs, steps, val mIoU per epoch), the run's log
(the `uptime` lines written before and after it: the load average of the shared machine) and the recipe name.
Writes reports/seg_training.json (with --docs also docs/video_training.json and its block in docs/video.md);
the verdict against the mIoU goal and the command that finishes a stopped schedule are generated, not typed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.video_docs import publish  # noqa: E402

GOAL_MIOU = 0.85  # the goal for the best model on held-out clips


def log_loads(path: Path) -> list[list[float]]:
    """Every `load average: a, b, c` line of a log, in order."""
    return [[float(x) for x in m] for m in re.findall(r"load average: ([\d.]+), ([\d.]+), ([\d.]+)", path.read_text())]


def log_time(path: Path) -> dict[str, float]:
    """Wall and CPU seconds of the whole run, from `/usr/bin/time -v` in its log, summed over its parts when it was
    resumed (one block per part; empty when there is none)."""
    text = path.read_text()
    walls = re.findall(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    cpu = [float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)]
    if not walls or len(cpu) != 2 * len(walls):
        return {}
    seconds = 0.0
    for wall in walls:
        part = 0.0
        for field in wall.split(":"):
            part = part * 60 + float(field)
        seconds += part
    return {"run_wall_s": seconds, "run_cpu_s": sum(cpu), "stopped": "terminated by signal" in text,
            "parts": len(walls)}


def classifier_run(path: str) -> dict[str, Any] | None:
    """What the classifier checkpoint a run started from recorded about its own training (None: file gone)."""
    if not Path(path).is_file():
        return None
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    m, r = ckpt["metrics"], ckpt["recipe"]
    return {"arch": ckpt["arch"], "dataset": r.get("dataset"), "test_acc": m.get("test_acc"),
            "epochs": m.get("epochs"), "steps": m.get("steps"), "batch_size": r.get("batch_size"),
            "train_time_s": m.get("train_time_s"), "train_cpu_s": m.get("train_cpu_s")}


def run_entry(metrics: Path, log: Path, recipe: str) -> dict[str, Any]:
    m = json.loads(metrics.read_text())
    loads = log_loads(log)
    r, t = m["recipe"], m["training"]
    init = m.get("init")
    if init:
        init = {k: init.get(k) for k in ("source", "backbone", "adapted", "head")}
        init["classifier"] = classifier_run(init["source"]) if init["backbone"] else None
    return {"recipe_name": recipe, "arch": m["arch"], "img_size": m["img_size"], "model_args": r["model_args"],
            "init": init,
            "eval": {k: m[k] for k in ("miou", "miou_objects", "ap50", "pixel_acc", "per_class_iou", "frames", "data",
                                       "errors") if k in m},
            "training": {**t, "epochs_planned": r["epochs"], "batch_size": r["batch_size"],
                         "frames_per_epoch": r["data_args"].get("train_frames"),
                         "frames_seen": (t["steps"] or 0) * r["batch_size"]},
            "run": log_time(log), "load_start": loads[0] if loads else None,
            "load_end": loads[-1] if len(loads) > 1 else None,
            "checkpoint": m["checkpoint"], "recipe": r}


def _load(x: list[float] | None) -> str:
    return "–" if x is None else f"{x[0]:.1f}"


def label(run: dict[str, Any]) -> str:
    """The model as the tables name it: its arch, and what its backbone started from when not from scratch."""
    init = run.get("init")
    return f"`{run['arch']}`" + (f" from `{init['backbone'] or Path(init['source']).stem}`" if init else "")


def comparison(result: dict[str, Any]) -> list[str]:
    """Per run started from a classifier: what that classifier cost, and its validation mIoU against the run
    from scratch with the same frames and batch at the same step counts."""
    lines = []
    runs = result["runs"]
    for run in runs:
        init, t = run.get("init"), run["training"]
        if not init or not init.get("classifier"):
            continue
        c = init["classifier"]
        total = (t["train_time_s"] + c["train_time_s"]) / 60
        lines += ["", f"`{run['recipe_name']}` started its backbone from `{init['source']}`: a `{c['arch']}` "
                  f"{c['dataset']} classifier ({c['epochs']} epoch(s), {c['steps']:,} steps of {c['batch_size']}, "
                  f"{c['train_time_s'] / 60:.1f} min of training steps, test accuracy {c['test_acc']:.3f})"
                  + (f", first conv adapted ({', '.join(init['adapted'])})" if init.get("adapted") else "")
                  + f"; classifier and segmentation training together: {total:.1f} min of training steps."]
        key = ("arch", "img_size")
        same = [o for o in runs if not o.get("init") and all(o[k] == run[k] for k in key)
                and (o["training"]["batch_size"], o["training"]["frames_per_epoch"])
                == (t["batch_size"], t["frames_per_epoch"])]
        for other in same:
            a, b = t["val_miou"], other["training"]["val_miou"]
            n = min(len(a), len(b))
            steps = t["steps"] // max(1, t["epochs"])
            at = sorted({1, max(1, n // 4), max(1, n // 2), n})
            lines += ["", f"Step for step against `{other['recipe_name']}` (from scratch, the same frames and batch), "
                      "validation mIoU from the classifier vs from scratch: "
                      + "; ".join(f"{e * steps:,} steps {a[e - 1]:.3f} vs {b[e - 1]:.3f}" for e in at) + "."]
    return lines


def losses(result: dict[str, Any]) -> list[str]:
    """Where each run's mIoU is lost: its masks (object vs background) or its classes (training.seg_eval)."""
    runs = [r for r in result["runs"] if r["eval"].get("errors")]
    if not runs:
        return []
    lines = ["", "Where the mIoU is lost (`python -m training eval`, the same test frames): foreground IoU is object "
             "vs background whatever the class; \"right class\" the share of the object pixels found as objects that "
             "carry their true class; the last two columns score the model's masks with every found object pixel "
             "given its true class, and the true masks with each garment given the class the model votes for it "
             "(its summed class probabilities over the garment's pixels).", "",
             "| model | mIoU | foreground IoU | right class | mIoU with the true classes | mIoU with the true masks |",
             "|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        e = run["eval"]["errors"]
        lines.append(f"| {label(run)} | {run['eval']['miou']:.3f} | {e['fg_iou']:.3f} | "
                     f"{100 * e['class_right_on_found']:.1f} % | {e['miou_true_classes']:.3f} | "
                     f"{e['miou_true_masks']:.3f} |")
    best = max(runs, key=lambda r: r["eval"]["miou"])
    e, goal, miou = best["eval"]["errors"], result["goal_miou"], best["eval"]["miou"]
    classes, masks = e["miou_true_classes"], e["miou_true_masks"]  # right classes alone; right masks alone
    reach = [name for name, v in (("the classes", classes), ("the masks", masks)) if v >= goal]
    lines += ["", f"For the best model, {label(best)}: with the true classes its masks would score {classes:.3f}; "
              f"with the true masks its classes would score {masks:.3f}. "
              + (f"The goal of {goal} is within reach by correcting {reach[0]} alone. " if reach else
                 f"The goal of {goal} needs both better. ")
              + f"The {'classes' if classes > masks else 'masks'} lose more: right classes alone would gain "
              f"{classes - miou:.3f}, right masks alone {masks - miou:.3f}."]
    return lines


def markdown(result: dict[str, Any]) -> str:
    lines = ["| model | frames | trained | wall | CPU | load (1 min) start → end | val mIoU per epoch | test mIoU | "
             "mIoU objects | AP@0.5 | pixel acc. |", "|" + "---|" * 11]
    for run in result["runs"]:
        t, e = run["training"], run["eval"]
        patch = run["model_args"].get("patch_size")
        val = ", ".join(f"{v:.3f}" for v in t["val_miou"])
        lines.append(
            f"| {label(run)}{f' /{patch}' if patch else ''} | {run['img_size']} px | {t['epochs']}/"
            f"{t['epochs_planned']} epochs, {t['frames_seen']:,} frames | {t['train_time_s'] / 60:.1f} min | "
            f"{t['train_cpu_s'] / 60:.1f} min | {_load(run['load_start'])} → {_load(run['load_end'])} | {val} | "
            f"{e['miou']:.3f} | {e['miou_objects']:.3f} | {e['ap50']:.3f} | {e['pixel_acc']:.3f} |")
    for run in result["runs"]:
        if run["run"]:
            lines += ["", f"`{run['recipe_name']}` as a whole (validation and, when it was stopped, the unfinished "
                      f"epoch included; {run['training']['hardware']}): {run['run']['run_wall_s'] / 60:.1f} min of "
                      f"wall time, {run['run']['run_cpu_s'] / 60:.1f} CPU min"
                      + (f" in {run['run']['parts']} parts (resumed)" if run["run"].get("parts", 1) > 1 else "")
                      + (", stopped" if run["run"]["stopped"] else "")
                      + "; the table's wall and CPU columns count the finished epochs' training steps."]
    classes = list(result["runs"][0]["eval"]["per_class_iou"])
    if classes:
        lines += ["", "| class | " + " | ".join(f"IoU {label(run)}" for run in result["runs"]) + " |",
                  "|---|" + "---:|" * len(result["runs"])]
        lines += [f"| {c} | " + " | ".join(f"{run['eval']['per_class_iou'].get(c, float('nan')):.3f}"
                                            for run in result["runs"]) + " |" for c in classes]
    lines += comparison(result) + losses(result)
    best = max(result["runs"], key=lambda r: r["eval"]["miou"])
    miou, goal = best["eval"]["miou"], result["goal_miou"]
    low = sorted((v, c) for c, v in best["eval"]["per_class_iou"].items() if v < goal)
    verdict = (f"Verdict: {label(best)} reaches the mIoU goal of {goal} ({miou:.3f})." if miou >= goal else
               f"Verdict: the goal (mIoU >= {goal} on held-out clips) is missed by {goal - miou:.3f} "
               f"(best {label(best)}: {miou:.3f} on {best['eval']['frames']} test frames)"
               + (f"; {len(low)} of {len(best['eval']['per_class_iou'])} classes score an IoU under {goal}: "
                  + ", ".join(f"{c} {v:.3f}" for v, c in low) if low else "") + ".")
    lines += ["", verdict]
    for run in result["runs"]:
        t = run["training"]
        if t["epochs"] < t["epochs_planned"]:
            rate, cpu = t["frames_seen"] / t["train_time_s"], t["train_cpu_s"] / t["frames_seen"]
            left = (t["epochs_planned"] - t["epochs"]) * t["frames_per_epoch"]
            lines += ["", f"`{run['recipe_name']}` stopped after {t['epochs']} of {t['epochs_planned']} epochs "
                      f"(the learning rate had not decayed yet). The rest of its schedule is {left:,} frames: about "
                      f"{left / rate / 60:.0f} min at this run's {rate:.1f} frames/s, or {left * cpu / 60:.0f} CPU "
                      f"minutes at its {cpu:.3f} CPU s per frame (about {left * cpu / 60 / result['cpus']:.0f} min "
                      f"on {result['cpus']} idle cores). It is one command away:",
                      "", "```bash", f"nice -n 19 .venv/bin/python -m training train --recipe {run['recipe_name']} "
                      f"--out {run['checkpoint']} --resume {run['checkpoint']}", "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs=3, action="append", required=True, metavar=("METRICS_JSON", "LOG", "RECIPE"))
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "seg_training.json")
    p.add_argument("--docs", action="store_true", help="also docs/video_training.json and its block in video.md")
    a = p.parse_args(argv)
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "goal_miou": GOAL_MIOU,
              "runs": [run_entry(Path(m), Path(log), name) for m, log, name in a.run]}
    publish(result, a.out, "video-training", markdown(result), a.docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
