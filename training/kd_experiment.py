"""The distillation experiment: a ResNet-18 teacher and three students (LeNet-5, a small CNN, ViT-Tiny), each
student trained alone and distilled from the teacher, all on the same 10,000 Fashion-MNIST training images.

The CNN students learn the teacher's soft targets (T = 4, alpha = 0.5); ViT-Tiny gets DeiT's distillation token
with hard teacher labels (`vit_tiny_distilled`, alpha = 0.5). Sized for the 2-core CPU: the teacher is ResNet-18 at
half width (32) and ViT-Tiny uses 7x7 patches (16 tokens). Every run is resumable (training/runs.py); the raw
results go to reports/efficiency/kd.json, the summary to docs/efficiency/kd.json and the table into
docs/efficiency.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.checkpoint import load_checkpoint
from training.recipe import Recipe
from training.runs import machine, train_or_resume, write_json

DATA = {"dataset": "fashion_mnist", "limit": 10000, "seed": 0, "threads": 2}
TEACHER = {"arch": "resnet18", "model_args": {"width": 32}, "epochs": 10, "batch_size": 128, "optimizer": "sgd",
           "lr": 0.1, "weight_decay": 5e-4, "warmup_epochs": 1.0, "crop_padding": 2, "hflip": True}
CNN = {"epochs": 10, "batch_size": 128, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.05, "warmup_epochs": 0.5,
       "crop_padding": 2, "hflip": True}
VIT = {"model_args": {"patch_size": 7}, "epochs": 10, "batch_size": 128, "optimizer": "adamw", "lr": 1e-3,
       "weight_decay": 0.05, "warmup_epochs": 2.0, "crop_padding": 2, "hflip": True, "grad_clip": 1.0}
SOFT = {"distill": "soft", "kd_alpha": 0.5, "kd_temperature": 4.0}
HARD = {"distill": "hard", "kd_alpha": 0.5}
TEACHER_FILE = "resnet18w32-teacher.pt"
# student -> (run name, recipe values, distilled?) in training order, cheapest first
STUDENTS: dict[str, list[tuple[str, dict[str, Any], bool]]] = {
    "LeNet-5": [("lenet5", {**CNN, "arch": "lenet5"}, False),
                ("lenet5-kd", {**CNN, "arch": "lenet5", **SOFT}, True)],
    "small CNN": [("simple_cnn", {**CNN, "arch": "simple_cnn"}, False),
                  ("simple_cnn-kd", {**CNN, "arch": "simple_cnn", **SOFT}, True)],
    "ViT-Tiny/7": [("vit_tiny", {**VIT, "arch": "vit_tiny"}, False),
                   ("vit_tiny_distilled", {**VIT, "arch": "vit_tiny_distilled", **HARD}, True)],
}
GOAL = 0.5  # the distilled ViT-Tiny should close at least half of its gap to the teacher


def recipes(ckpt_dir: Path) -> dict[str, Recipe]:
    """Every run's recipe by run name (the teacher first)."""
    teacher = str(ckpt_dir / TEACHER_FILE)
    out = {"teacher": Recipe(**DATA, **TEACHER)}
    for runs in STUDENTS.values():
        for name, values, distilled in runs:
            out[name] = Recipe(**DATA, **values, **({"teacher": teacher} if distilled else {}))
    return out


def run(ckpt_dir: str | Path = "checkpoints/efficiency", reports: str | Path = "reports/efficiency",
        docs: str | Path = "docs", only: list[str] | None = None) -> dict[str, Any]:
    """Train (or resume, or reuse) every run, then write the raw and summary JSON and the docs table."""
    ckpt_dir = Path(ckpt_dir)
    plan = recipes(ckpt_dir)
    for name, recipe in plan.items():
        if only and name not in only and name != "teacher":
            continue
        path = ckpt_dir / (TEACHER_FILE if name == "teacher" else f"{name}.pt")
        train_or_resume(recipe, path)
    return report(ckpt_dir, reports, docs)


def report(ckpt_dir: str | Path, reports: str | Path, docs: str | Path) -> dict[str, Any]:
    """Summarise whatever runs have finished (a missing run shows as not run yet)."""
    ckpt_dir, plan = Path(ckpt_dir), recipes(Path(ckpt_dir))
    raw: dict[str, Any] = {}
    for name, recipe in plan.items():
        path = ckpt_dir / (TEACHER_FILE if name == "teacher" else f"{name}.pt")
        if path.is_file() and int((c := load_checkpoint(path)).get("epoch", 0)) >= recipe.epochs:
            m = c["metrics"]
            raw[name] = {"arch": c["arch"], "model_args": c["model_args"], "test_acc": m["test_acc"],
                         "val_acc": m["val_acc"], "train_time_s": round(m["train_time_s"], 1),
                         "params": sum(v.numel() for k, v in c["state_dict"].items() if not _is_buffer(k)),
                         "epochs": c["epoch"], "hardware": m["hardware"], "recipe": c["recipe"],
                         "distillation": m.get("distillation"), "history": m["history"]}
    write_json(Path(reports) / "kd.json", raw)
    summary = summarise(raw)
    summary["machine"] = machine()
    write_json(Path(docs) / "efficiency" / "kd.json", summary)
    from training.docblock import write_doc_block

    write_doc_block(Path(docs) / "efficiency.md", "kd-table", kd_table(summary))
    return summary


def _is_buffer(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """Per student: alone, distilled, the teacher, and the share of the alone-to-teacher gap distillation closed."""
    teacher = raw.get("teacher")
    rows = []
    for student, runs in STUDENTS.items():
        alone, distilled = (raw.get(name) for name, _, _ in runs)
        row: dict[str, Any] = {"student": student, "alone": _brief(alone), "distilled": _brief(distilled),
                               "mode": ((distilled or {}).get("distillation") or {}).get("mode")}
        if teacher and alone and distilled:
            gap = teacher["test_acc"] - alone["test_acc"]
            row["gap_pt"] = round(100 * gap, 2)
            row["gain_pt"] = round(100 * (distilled["test_acc"] - alone["test_acc"]), 2)
            row["gap_closed"] = round((distilled["test_acc"] - alone["test_acc"]) / gap, 3) if gap > 0 else None
        rows.append(row)
    return {"teacher": _brief(teacher), "students": rows, "goal_gap_closed": GOAL,
            "data": {**DATA, "note": "10,000 training images (seeded subset), full 10,000-image test split"}}


def _brief(run: dict[str, Any] | None) -> dict[str, Any] | None:
    if not run:
        return None
    keys = ("arch", "model_args", "test_acc", "params", "train_time_s", "epochs")
    out = {k: run[k] for k in keys}
    if run.get("distillation"):
        out["teacher_time_s"] = run["distillation"]["teacher_time_s"]
    return out


def kd_table(summary: dict[str, Any]) -> str:
    """The Markdown table and verdict, generated from the summary JSON."""
    t = summary["teacher"]
    if not t:
        return "_Awaiting a run: `make experiment-kd`._"
    lines = [f"Teacher: {t['arch']} {_args(t)} — **{100 * t['test_acc']:.2f} %** test accuracy, "
             f"{t['params'] / 1e6:.2f} M parameters, {t['epochs']} epochs, {t['train_time_s'] / 60:.0f} min.", "",
             "| student | params | alone % | distilled % | how | gain pt | gap to teacher pt | gap closed | "
             "train min (alone / distilled, teacher share) |", "|---|---:|---:|---:|---|---:|---:|---:|---|"]
    verdicts = []
    for r in summary["students"]:
        a, d = r["alone"], r["distilled"]
        if not (a and d):
            lines.append(f"| {r['student']} | | {_pct(a)} | {_pct(d)} | | | | | awaiting a run |")
            continue
        how = "distillation token, hard labels" if r["mode"] == "hard" else "soft targets, T = 4"
        closed = "—" if r.get("gap_closed") is None else f"{100 * r['gap_closed']:.0f} %"
        share = f"{100 * d.get('teacher_time_s', 0) / max(d['train_time_s'], 1e-9):.0f} %"
        lines.append(f"| {r['student']} | {a['params'] / 1e6:.2f} M | {_pct(a)} | {_pct(d)} | {how} | "
                     f"{r['gain_pt']:+.2f} | {r['gap_pt']:.2f} | {closed} | {a['train_time_s'] / 60:.0f} / "
                     f"{d['train_time_s'] / 60:.0f} ({share}) |")
        if r["student"].startswith("ViT") and r.get("gap_closed") is not None:
            goal = summary["goal_gap_closed"]
            if r["gap_closed"] >= goal:
                verdicts.append(f"The distilled {r['student']} closes {100 * r['gap_closed']:.0f} % of its "
                                f"{r['gap_pt']:.2f}-point gap to the teacher: the goal (≥ {100 * goal:.0f} %) is met.")
            else:
                short = goal * r["gap_pt"] - r["gain_pt"]
                verdicts.append(f"The distilled {r['student']} closes {100 * r['gap_closed']:.0f} % of its "
                                f"{r['gap_pt']:.2f}-point gap to the teacher: short of the goal "
                                f"(≥ {100 * goal:.0f} %) by {short:.2f} points of test accuracy.")
    m = summary.get("machine", {})
    lines += ["", *verdicts, "", f"Measured {m.get('date', '?')} on {m.get('hardware', '?')} ({m.get('cores')} cores, "
              "shared with other jobs: times are upper bounds); one run each, seed 0. Source: "
              "[efficiency/kd.json](efficiency/kd.json)."]
    return "\n".join(lines)


def _pct(run: dict[str, Any] | None) -> str:
    return "" if not run else f"{100 * run['test_acc']:.2f}"


def _args(run: dict[str, Any]) -> str:
    extra = {k: v for k, v in run["model_args"].items() if k not in ("num_classes", "in_channels", "img_size")}
    return "(" + ", ".join(f"{k} {v}" for k, v in extra.items()) + ")" if extra else ""
