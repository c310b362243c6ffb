"""The distillation experiment: a ResNet-18 teacher and three students (LeNet-5, a small CNN, ViT-Tiny), each
student trained alone and distilled from the teacher, all on the same seeded subset of Fashion-MNIST.

Every student learns the teacher's soft targets (T = 4, alpha = 0.5); ViT-Tiny is also distilled DeiT's way, a
distillation token with hard teacher labels (`vit_tiny_distilled`, alpha = 0.5), and by function matching
(`vit_tiny-fm`: the teacher's soft targets only, T = 1, on MixUp-ed views); ViT-Tiny uses 7x7 patches (16
tokens). Two sizes (PROFILES): `full` (10,000 images, a half-width ResNet-18 teacher, 10 epochs each: hours on 2
cores) and `quick` (2,000 images per split, a quarter-width teacher, a few epochs: under an hour). `vit_epochs`
(`--vit-epochs N`) trains every ViT run, alone and distilled, for N epochs instead of the profile's, beside the
profile's teacher and CNN runs (their checkpoints are named `<run>-<N>ep.pt`). Every run is resumable
(training/runs.py) and lives under <checkpoints>/<profile>/; the raw results go to reports/efficiency/kd.json,
the summary (with the profile that ran) to docs/efficiency/kd.json and the table into docs/efficiency.md; each
ViT schedule's summary is also kept as docs/efficiency/kd-<N>ep.json, and a second table sets every schedule's
distilled ViTs side by side.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from handlers.artifacts import write_json
from training.checkpoint import load_checkpoint
from training.recipe import Recipe
from training.runs import machine, train_or_resume

# limit caps every split (train, val, test); teacher_* and *_epochs size the runs
PROFILES: dict[str, dict[str, Any]] = {
    "full": {"limit": 10000, "teacher_width": 32, "teacher_epochs": 10, "cnn_epochs": 10, "vit_epochs": 10,
             "teacher_opt": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4}},
    "quick": {"limit": 2000, "teacher_width": 16, "teacher_epochs": 8, "cnn_epochs": 8, "vit_epochs": 5,
              "teacher_opt": {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05}},
}
DATA = {"dataset": "fashion_mnist", "seed": 0, "threads": 2}
AUGMENT = {"batch_size": 128, "crop_padding": 2, "hflip": True}
CNN = {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.05, "warmup_epochs": 0.5}
VIT = {"model_args": {"patch_size": 7}, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 2.0,
       "grad_clip": 1.0}
SOFT = {"distill": "soft", "kd_alpha": 0.5, "kd_temperature": 4.0}
HARD = {"distill": "hard", "kd_alpha": 0.5}
# function matching (Beyer et al., 2022, "a good teacher is patient and consistent"): the teacher's soft targets
# only (no label term), at T = 1, on the MixUp-ed view the student trains on; it pays off with long schedules
FM = {"distill": "soft", "kd_alpha": 1.0, "kd_temperature": 1.0, "mixup_alpha": 1.0}
# a transfer set (Hinton et al., 2015): this many more training images whose labels the student never sees, for the
# teacher's term only; such a run trains as many optimizer steps as the student alone (fewer, larger epochs)
UNLABELED = {"kd_unlabeled": 8000}
TEACHER_FILE = "resnet18-teacher.pt"
# student -> (run name, recipe values, distilled?) in training order, cheapest first: the student alone, then its
# distilled variants
STUDENTS: dict[str, list[tuple[str, dict[str, Any], bool]]] = {
    "LeNet-5": [("lenet5", {**CNN, "arch": "lenet5"}, False),
                ("lenet5-kd", {**CNN, "arch": "lenet5", **SOFT}, True)],
    "small CNN": [("simple_cnn", {**CNN, "arch": "simple_cnn"}, False),
                  ("simple_cnn-kd", {**CNN, "arch": "simple_cnn", **SOFT}, True)],
    "ViT-Tiny/7": [("vit_tiny", {**VIT, "arch": "vit_tiny"}, False),
                   ("vit_tiny-kd", {**VIT, "arch": "vit_tiny", **SOFT}, True),
                   ("vit_tiny_distilled", {**VIT, "arch": "vit_tiny_distilled", **HARD}, True),
                   ("vit_tiny-fm", {**VIT, "arch": "vit_tiny", **FM}, True),
                   ("vit_tiny-kd-unlabeled", {**VIT, "arch": "vit_tiny", **SOFT, **UNLABELED}, True),
                   ("vit_tiny_distilled-unlabeled", {**VIT, "arch": "vit_tiny_distilled", **HARD, **UNLABELED},
                    True)],
}
VIT_RUNS = {name for runs in STUDENTS.values() for name, values, _ in runs if values["arch"].startswith("vit")}
DISTILLED = {name for runs in STUDENTS.values() for name, _, distilled in runs if distilled}
GOAL = 0.5  # the best distilled ViT-Tiny should close at least half of its gap to the teacher


def recipes(ckpt_dir: Path, profile: str = "full", threads: int | None = None,
            vit_epochs: int | None = None, teacher_epochs: int | None = None) -> dict[str, Recipe]:
    """Every run's recipe by run name (the teacher first); `threads` overrides DATA's training threads,
    `vit_epochs` the profile's epochs of every ViT run, `teacher_epochs` the teacher's."""
    size = sizes(profile, vit_epochs, teacher_epochs)
    data = {**DATA, "limit": size["limit"], **({"threads": threads} if threads else {})}
    # zero_init_residual off: experiment-qat trains the same recipe with qat, which folds the BatchNorm scales
    teacher_args = {"width": size["teacher_width"], "zero_init_residual": False}
    out = {"teacher": Recipe(**data, **AUGMENT, **size["teacher_opt"], arch="resnet18", model_args=teacher_args,
                             epochs=size["teacher_epochs"], warmup_epochs=1.0)}
    for runs in STUDENTS.values():
        for name, values, distilled in runs:
            epochs = size["vit_epochs" if values["arch"].startswith("vit") else "cnn_epochs"]
            teacher = ({"teacher": str(run_path(ckpt_dir, profile, "teacher", teacher_epochs=teacher_epochs))}
                       if distilled else {})
            if values.get("kd_unlabeled"):  # the same optimizer steps over labelled + unlabelled images
                share = size["limit"] / (size["limit"] + values["kd_unlabeled"])
                values = {**values, "warmup_epochs": values["warmup_epochs"] * share}
                epochs = max(1, round(epochs * share))
            out[name] = Recipe(**data, **AUGMENT, **values, epochs=epochs, **teacher)
    return out


def sizes(profile: str, vit_epochs: int | None = None, teacher_epochs: int | None = None) -> dict[str, Any]:
    """The profile's sizes, with `vit_epochs` and `teacher_epochs` (when given) in place of its own."""
    given = {"vit_epochs": vit_epochs, "teacher_epochs": teacher_epochs}
    for key, value in given.items():
        if value is not None and value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}")
    return {**PROFILES[profile], **{k: v for k, v in given.items() if v}}


def _other(profile: str, key: str, epochs: int | None) -> bool:
    """Whether `epochs` was given and differs from the profile's own `key`."""
    return bool(epochs) and epochs != PROFILES[profile][key]


def run_path(ckpt_dir: Path, profile: str, name: str, vit_epochs: int | None = None,
             teacher_epochs: int | None = None) -> Path:
    """The run's checkpoint; a ViT run trained for other than the profile's epochs is `<run>-<N>ep.pt`; a teacher
    trained for other than the profile's epochs is `resnet18-teacher-<N>ep.pt`, and every run distilled from it
    carries `-teacher<N>ep` too."""
    folder = Path(ckpt_dir) / profile
    other_teacher = _other(profile, "teacher_epochs", teacher_epochs)
    if name == "teacher":
        return folder / (TEACHER_FILE.replace(".pt", f"-{teacher_epochs}ep.pt") if other_teacher else TEACHER_FILE)
    stem = f"{name}-{vit_epochs}ep" if name in VIT_RUNS and _other(profile, "vit_epochs", vit_epochs) else name
    return folder / (f"{stem}-teacher{teacher_epochs}ep.pt" if other_teacher and name in DISTILLED else f"{stem}.pt")


def summary_file(summary: dict[str, Any]) -> str:
    """The name a summary is kept under, one per schedule: `kd-<ViT epochs>ep[-teacher<N>ep].json`."""
    size, profile = summary["size"], summary["profile"]
    teacher = (f"-teacher{size['teacher_epochs']}ep" if _other(profile, "teacher_epochs", size["teacher_epochs"])
               else "")
    return f"kd-{size['vit_epochs']}ep{teacher}.json"


def run(ckpt_dir: str | Path = "checkpoints/efficiency", reports: str | Path = "reports/efficiency",
        docs: str | Path = "docs", only: list[str] | None = None, profile: str = "full",
        threads: int | None = None, vit_epochs: int | None = None,
        teacher_epochs: int | None = None) -> dict[str, Any]:
    """Train (or resume, or reuse) every run (or those in `only`, the teacher first when one needs it) with
    `threads` training threads (default DATA's), then write the raw and summary JSON and the docs table."""
    plan = recipes(Path(ckpt_dir), profile, threads, vit_epochs, teacher_epochs)
    for name, recipe in plan.items():
        if only and name not in only and not (name == "teacher" and any(plan[n].teacher for n in only)):
            continue
        train_or_resume(recipe, run_path(Path(ckpt_dir), profile, name, vit_epochs, teacher_epochs))
    return report(ckpt_dir, reports, docs, profile, vit_epochs, teacher_epochs)


def report(ckpt_dir: str | Path, reports: str | Path, docs: str | Path, profile: str = "full",
           vit_epochs: int | None = None, teacher_epochs: int | None = None) -> dict[str, Any]:
    """Summarise whatever runs have finished (a missing run shows as not run yet)."""
    plan = recipes(Path(ckpt_dir), profile, vit_epochs=vit_epochs, teacher_epochs=teacher_epochs)
    raw: dict[str, Any] = {}
    unfinished: dict[str, Any] = {}  # run -> its validation accuracy per epoch so far
    for name, recipe in plan.items():
        path = run_path(Path(ckpt_dir), profile, name, vit_epochs, teacher_epochs)
        if path.is_file() and int((c := load_checkpoint(path)).get("epoch", 0)) < recipe.epochs:
            unfinished[name] = {"epochs_done": c["epoch"], "epochs": recipe.epochs,
                                "val_acc": [h["val_acc"] for h in c["metrics"]["history"]]}
        elif path.is_file():
            m = c["metrics"]
            raw[name] = {"arch": c["arch"], "model_args": c["model_args"], "test_acc": m["test_acc"],
                         "val_acc": m["val_acc"], "train_time_s": round(m["train_time_s"], 1),
                         "params": sum(v.numel() for k, v in c["state_dict"].items() if not _is_buffer(k)),
                         "epochs": c["epoch"], "hardware": m["hardware"], "recipe": c["recipe"],
                         "distillation": m.get("distillation"), "history": m["history"]}
    write_json(Path(reports) / "kd.json", {**raw, "unfinished": unfinished})
    summary = summarise(raw, profile, unfinished, vit_epochs, teacher_epochs)
    summary["machine"] = machine()
    folder = Path(docs) / "efficiency"
    write_json(folder / "kd.json", summary)
    write_json(folder / summary_file(summary), summary)  # one per schedule (ViT and teacher epochs), kept
    from training.docblock import write_doc_block

    write_doc_block(Path(docs) / "efficiency.md", "kd-table", kd_table(summary))
    write_doc_block(Path(docs) / "efficiency.md", "kd-schedules", schedules_table(schedules(folder)))
    return summary


def schedules(folder: Path) -> list[dict[str, Any]]:
    """The summaries kept per schedule (`kd-<N>ep[-teacher<M>ep].json`), shortest schedule first."""
    found = [json.loads(f.read_text()) for f in Path(folder).glob("kd-*ep.json")]
    return sorted(found, key=lambda s: (s["profile"], s["size"]["vit_epochs"], s["size"]["teacher_epochs"]))


def schedules_table(summaries: list[dict[str, Any]]) -> str:
    """Every finished distilled ViT of every schedule beside the student alone trained for as many epochs."""
    lines = ["| profile | ViT epochs (steps) | teacher % (epochs) | alone % | distilled % | how | gain pt (± SE) "
             "| gap closed | source |", "|---|---:|---:|---:|---:|---|---:|---:|---|"]
    alone: list[str] = []  # the ViT alone by schedule, whether or not a distilled run finished beside it
    for s in summaries:
        size = s["size"]
        steps = -(-size["limit"] // AUGMENT["batch_size"]) * size["vit_epochs"]
        source = f"[{summary_file(s)}](efficiency/{summary_file(s)})"
        vit = [r for r in s["students"] if r["student"].startswith("ViT")]
        seen = f"{_pct(vit[0]['alone'])} % after {size['vit_epochs']} epochs (`{s['profile']}`)" if vit else ""
        if vit and vit[0]["alone"] and seen not in alone:
            alone.append(seen)
        for r in vit:
            if r.get("gain_pt") is not None:
                closed = "—" if r.get("gap_closed") is None else f"{100 * r['gap_closed']:.0f} %"
                lines.append(f"| `{s['profile']}` | {size['vit_epochs']} ({steps}) | {_pct(s['teacher'])} "
                             f"({size['teacher_epochs']}) | "
                             f"{_pct(r['alone'])} | {_pct(r['distilled'])} | {r['how']} (`{r['run']}`) | "
                             f"{r['gain_pt']:+.2f} (± {r['gain_se_pt']:.2f}) | {closed} | {source} |")
    table = "\n".join(lines) if len(lines) > 2 else "_No ViT schedule has a finished distilled run yet._"
    return table + (f"\n\nThe ViT-Tiny/7 alone by schedule: {'; '.join(alone)}." if alone else "")


def _is_buffer(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def summarise(raw: dict[str, Any], profile: str = "full", unfinished: dict[str, Any] | None = None,
              vit_epochs: int | None = None, teacher_epochs: int | None = None) -> dict[str, Any]:
    """One row per distilled run (a student with two ways of distilling has two rows): the student alone, distilled,
    and the share of the alone-to-teacher gap distillation closed. A distilled run that has not finished is compared
    at the epoch it reached, on the validation split, with the student alone at the same epoch of the same schedule
    (`partial`)."""
    unfinished = unfinished or {}
    teacher = raw.get("teacher")
    rows = []
    for student, ((alone_name, _, _), *variants) in STUDENTS.items():
        for name, values, _ in variants:
            rows.append(_row(student, name, values, teacher, raw.get(alone_name), raw.get(name),
                             unfinished.get(name), profile))
    return {"teacher": _brief(teacher), "students": rows, "goal_gap_closed": GOAL, "profile": profile,
            "size": sizes(profile, vit_epochs, teacher_epochs), "vit_epochs_option": vit_epochs,
            "teacher_epochs_option": teacher_epochs,
            "data": {**DATA, "limit": PROFILES[profile]["limit"]}}


def how(values: dict[str, Any]) -> str:
    """How a distilled run learns from the teacher, in words (the table's `how` column)."""
    unlabeled = (f", + {values['kd_unlabeled']:,} unlabelled images" if values.get("kd_unlabeled") else "")
    if values["distill"] == "hard":
        return "distillation token, hard labels" + unlabeled
    soft = f"soft targets, T = {values['kd_temperature']:g}"
    if values.get("mixup_alpha"):
        return f"function matching: MixUp views, {soft}, teacher only (α = {values['kd_alpha']:g})"
    return soft + unlabeled


def _row(student: str, name: str, values: dict[str, Any], teacher: dict[str, Any] | None,
         alone: dict[str, Any] | None, distilled: dict[str, Any] | None, d: dict[str, Any] | None,
         profile: str) -> dict[str, Any]:
    """One distilled run beside its student alone; `d` is the distilled run's progress when it has not finished."""
    row: dict[str, Any] = {"student": student, "run": name, "mode": values["distill"], "how": how(values),
                           "alone": _brief(alone), "distilled": _brief(distilled)}
    if teacher and alone and distilled:
        gap = teacher["test_acc"] - alone["test_acc"]
        row["gap_pt"] = round(100 * gap, 2)
        row["gain_pt"] = round(100 * (distilled["test_acc"] - alone["test_acc"]), 2)
        row["gap_closed"] = round((distilled["test_acc"] - alone["test_acc"]) / gap, 3) if gap > 0 else None
        n = PROFILES[profile]["limit"]
        row["gain_se_pt"] = round(100 * _difference_se(alone["test_acc"], distilled["test_acc"], n), 2)
        row["gap_se_pt"] = round(100 * _difference_se(teacher["test_acc"], alone["test_acc"], n), 2)
    elif teacher and alone and d and d["val_acc"] and d["epochs"] == alone["epochs"]:
        k = len(d["val_acc"])
        a_k, d_k = alone["history"][k - 1]["val_acc"], d["val_acc"][-1]
        row["partial"] = {"epoch": k, "of": d["epochs"], "alone_val": a_k, "distilled_val": d_k,
                          "teacher_val": teacher["val_acc"], "gain_pt": round(100 * (d_k - a_k), 2)}
    return row


def _difference_se(a: float, b: float, n: int) -> float:
    """Standard error of the difference of two accuracies on n test images each (binomial, as if independent)."""
    return math.sqrt((a * (1 - a) + b * (1 - b)) / n)


def _brief(run: dict[str, Any] | None) -> dict[str, Any] | None:
    if not run:
        return None
    keys = ("arch", "model_args", "test_acc", "params", "train_time_s", "epochs")
    out = {k: run[k] for k in keys} | {"threads": run["recipe"].get("threads"),
                                       "val_history": [h["val_acc"] for h in run["history"]]}
    if run.get("distillation"):
        out["teacher_time_s"] = run["distillation"]["teacher_time_s"]
        out["teacher_label_agreement"] = run["distillation"].get("teacher_label_agreement")
    return out


def kd_table(summary: dict[str, Any]) -> str:
    """The Markdown table and verdict, generated from the summary JSON."""
    t = summary["teacher"]
    if not t:
        return "_Awaiting a run: `make experiment-kd`._"
    size = summary["size"]
    lines = [f"Profile `{summary['profile']}`: {size['limit']:,} images in each of the train, validation and test "
             f"splits (seeded subsets); the teacher {size['teacher_epochs']} epochs"
             f"{' (`--teacher-epochs`)' if summary.get('teacher_epochs_option') else ''}, the CNN students "
             f"{size['cnn_epochs']}, the ViTs {size['vit_epochs']}"
             f"{' (`--vit-epochs`, every ViT run)' if summary.get('vit_epochs_option') else ''}.", "",
             f"Teacher: {t['arch']} {_args(t)} — **{100 * t['test_acc']:.2f} %** test accuracy, "
             f"{t['params'] / 1e6:.2f} M parameters, {t['epochs']} epochs, {t['train_time_s'] / 60:.0f} min.", "",
             "| student | params | alone % | distilled % | how | gain pt | gap to teacher pt | gap closed | "
             "train min (alone / distilled, teacher share) |", "|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in summary["students"]:
        a, d = r["alone"], r["distilled"]
        if not (a and d):
            lines.append(f"| {r['student']} | {a['params'] / 1e6:.2f} M | {_pct(a)} | {_pct(d)} | {r['how']} | | | | "
                         f"distilled run {'not finished' if r.get('partial') else 'not run yet'} |" if a else
                         f"| {r['student']} | | | | {r['how']} | | | | not run |")
            continue
        closed = "—" if r.get("gap_closed") is None else f"{100 * r['gap_closed']:.0f} %"
        share = f"{100 * d.get('teacher_time_s', 0) / max(d['train_time_s'], 1e-9):.0f} %"
        lines.append(f"| {r['student']} | {a['params'] / 1e6:.2f} M | {_pct(a)} | {_pct(d)} | {r['how']} | "
                     f"{r['gain_pt']:+.2f} | {r['gap_pt']:.2f} | {closed} | {a['train_time_s'] / 60:.0f} / "
                     f"{d['train_time_s'] / 60:.0f} ({share}) |")
    verdicts = _vit_verdicts(summary)
    m = summary.get("machine", {})
    load = m.get("load_average", ["?"])[0]
    lines += ["", *verdicts, "", f"Measured {m.get('date', '?')} on {m.get('hardware', '?')} ({m.get('cores')} cores, "
              f"shared with other jobs — load average {load} when the table was written: times are upper bounds); "
              f"{_threads(summary)}; one run each, seed 0. Source: [efficiency/kd.json](efficiency/kd.json)."]
    return "\n".join(lines)


def _vit_verdicts(summary: dict[str, Any]) -> list[str]:
    """The goal's verdict on the best finished distilled ViT (named by how it was distilled), then the other ways."""
    rows = [r for r in summary["students"] if r["student"].startswith("ViT")]
    done = [r for r in rows if r.get("gap_closed") is not None]
    if not done:
        waiting = [_unmeasured(r) for r in rows if r.get("gap_pt") is None]
        return [" ".join(waiting + ["No distilled ViT has finished: the goal is not measured."])] if waiting else []
    goal, size = summary["goal_gap_closed"], summary["size"]
    best = max(done, key=lambda r: r["gain_pt"])
    closes = (f"closes {100 * best['gap_closed']:.0f} % of" if best["gain_pt"] >= 0 else
              f"ends {-best['gain_pt']:.2f} points below the student alone, closing none of")
    out = [f"The best distilled {best['student']} ({best['how']}, `{best['run']}`: {_pct(best['distilled'])} %, "
           f"alone {_pct(best['alone'])} %) {closes} its {best['gap_pt']:.2f}-point gap to the teacher: "
           + (f"the goal (≥ {100 * goal:.0f} %) is met." if best["gap_closed"] >= goal else
              f"short of the goal (≥ {100 * goal:.0f} %) by {goal * best['gap_pt'] - best['gain_pt']:.2f} points "
              "of test accuracy."),
           f"Its gain's standard error is about {best['gain_se_pt']:.2f} points ({size['limit']:,} test images per "
           "accuracy)."]
    if best["gap_pt"] < 2 * best.get("gap_se_pt", 0):
        out.append(f"The gap itself, {best['gap_pt']:.2f} points with a standard error of about "
                   f"{best['gap_se_pt']:.2f}, is within two standard errors of zero: at this schedule the student "
                   "alone is level with the teacher within noise, so the share of the gap closed rests on noise.")
    for r in rows:
        if r is not best and r in done:
            out.append(f"The other way, {r['how']} (`{r['run']}`): {_pct(r['distilled'])} %, {r['gain_pt']:+.2f} "
                       f"points (gap closed {100 * r['gap_closed']:.0f} %, standard error about "
                       f"{r['gain_se_pt']:.2f} points).")
        elif r is not best:
            out.append(_unmeasured(r))
    if best["gap_closed"] < goal:
        out.append(_longer(summary, best))
    return [" ".join(out)]


def _unmeasured(r: dict[str, Any]) -> str:
    """A distilled ViT run that has not finished (its progress at the epoch it reached) or has not run."""
    name = f"The distilled {r['student']} ({r['how']}, `{r['run']}`)"
    if q := r.get("partial"):
        return (f"{name} did not finish ({q['epoch']} of {q['of']} epochs ran), so it does not count towards the "
                f"goal. At epoch {q['epoch']} of the same schedule, on the validation split: distilled "
                f"{100 * q['distilled_val']:.2f} %, alone {100 * q['alone_val']:.2f} % ({q['gain_pt']:+.2f} points); "
                f"the teacher ended at {100 * q['teacher_val']:.2f} %.")
    return f"{name} has not run: it does not count towards the goal."


def _longer(summary: dict[str, Any], best: dict[str, Any]) -> str:
    """Where the best distilled run's time went, and the command that trains it and the student alone for twice
    the ViT epochs."""
    distilled, alone = best["distilled"], best["alone"]
    size, profile, epochs = summary["size"], summary["profile"], distilled["epochs"]
    steps = -(-size["limit"] // AUGMENT["batch_size"]) * epochs
    curve = ", ".join(f"{100 * v:.1f}" for v in distilled.get("val_history", []))
    alone_val = alone.get("val_history") or [0.0]
    peak = max(range(len(alone_val)), key=alone_val.__getitem__)
    per_epoch = distilled["train_time_s"] / max(epochs, 1)
    teacher = 100 * distilled.get("teacher_time_s", 0) / max(distilled["train_time_s"], 1e-9)
    threads = distilled.get("threads") or summary["data"]["threads"]
    profile_arg = ("" if profile == "full" else f"--profile {profile} ") + (
        f"--teacher-epochs {t} " if (t := summary.get("teacher_epochs_option")) else "")
    agreement = distilled.get("teacher_label_agreement")
    targets = ("" if agreement is None else f"The teacher's top-1 was the true label on {100 * agreement:.1f} % "
               "of the training views it labelled. ")
    return (f"{targets}Each ViT trained {epochs} epochs, {steps} optimizer steps (the best distilled run's validation "
            f"accuracy by epoch: {curve} %; the student alone's peaked at {100 * alone_val[peak]:.1f} % in epoch "
            f"{peak + 1} and ended at {100 * alone_val[-1]:.1f} %); the distilled run's training took "
            f"{per_epoch:.0f} s per epoch on {threads} thread(s), {teacher:.0f} % of it in the teacher. Twice the ViT "
            f"epochs for these two runs: `make experiment-kd KD_ARGS=\"{profile_arg}--threads {threads} --vit-epochs "
            f"{2 * epochs} --only vit_tiny {best['run']}\"` (about {4 * epochs * per_epoch / 3600:.1f} h of training "
            "at that speed).")


def _threads(summary: dict[str, Any]) -> str:
    """The training threads: the profile's, and the runs that finished with another count (a resumed run)."""
    usual = summary["data"]["threads"]
    runs = {"the teacher": summary["teacher"]}
    for r in summary["students"]:
        runs |= {f"{r['student']} alone": r["alone"], f"`{r['run']}`": r["distilled"]}
    other = [f"{name} {run['threads']}" for name, run in runs.items()
             if run and run.get("threads") not in (None, usual)]
    return f"{usual} training threads per run" + (f", except these (threads when the run finished, at nice 19: "
                                                   f"{', '.join(other)})" if other else "")


def _pct(run: dict[str, Any] | None) -> str:
    return "" if not run else f"{100 * run['test_acc']:.2f}"


def _args(run: dict[str, Any]) -> str:
    extra = {k: v for k, v in run["model_args"].items() if k not in ("num_classes", "in_channels", "img_size")}
    return "(" + ", ".join(f"{k} {v}" for k, v in extra.items()) + ")" if extra else ""
