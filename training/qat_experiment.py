"""Post-training quantization vs quantization-aware training, side by side, for LeNet-5 and ResNet-18.

Each base is a float checkpoint of the distillation experiment (training/kd_experiment.py: LeNet-5 alone and the
ResNet-18 teacher of the same profile). From it:

- PTQ: the `int8` runtime on the base (ONNX Runtime static int8, 64 calibration images of the training split);
- QAT: `QAT_EPOCHS` more epochs with fake quantisation (`qat: true`, `init_from` the base, a tenth of the base's
  learning rate), served by the `qat` runtime (the converted pt2e graph as QDQ ONNX on ONNX Runtime);
- the control: the same extra epochs without fake quantisation, then PTQ, so QAT's gain is not just more training.

Accuracy is the whole test split through each runtime; latency the model forward at batch 1 and 8 (2 threads),
measured in one process by training/select.py. Raw results in reports/efficiency/qat.json, the summary in
docs/efficiency/qat.json, the table in docs/efficiency.md.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from handlers.artifacts import write_json
from training.kd_experiment import recipes, run_path
from training.recipe import Recipe
from training.runs import machine, train_or_resume

BASES = {"LeNet-5": "lenet5", "ResNet-18": "teacher"}  # kd_experiment run names
QAT_EPOCHS = 1


def plan(ckpt_dir: Path, profile: str = "full",
         threads: int | None = None) -> dict[str, dict[str, tuple[Recipe, Path]]]:
    """model -> {base: (recipe, path), qat: (recipe, path), control: (recipe, path)}."""
    kd = recipes(ckpt_dir, profile, threads)
    out = {}
    for label, run in BASES.items():
        base, base_path = kd[run], run_path(ckpt_dir, profile, run)
        if base.model_args.get("width"):
            label = f"{label} (width {base.model_args['width']})"
        more = replace(base, init_from=str(base_path), epochs=QAT_EPOCHS, lr=base.lr / 10, warmup_epochs=0.1)
        out[label] = {"base": (base, base_path),
                      "qat": (replace(more, qat=True), base_path.with_name(f"{base_path.stem}-qat.pt")),
                      "control": (more, base_path.with_name(f"{base_path.stem}-more.pt"))}
    return out


def run(ckpt_dir: str | Path = "checkpoints/efficiency", reports: str | Path = "reports/efficiency",
        docs: str | Path = "docs", train_only: bool = False, reps: int = 30,
        profile: str = "full", measure_only: bool = False, threads: int | None = None) -> dict[str, Any] | None:
    """Train what is missing (the bases come from `make experiment-kd`) with `threads` training threads, then
    measure and write the table; `measure_only` trains nothing and measures the runs that have finished."""
    ckpt_dir = Path(ckpt_dir)
    for runs in ([] if measure_only else plan(ckpt_dir, profile, threads).values()):
        base_recipe, base_path = runs["base"]
        train_or_resume(base_recipe, base_path)
        for key in ("qat", "control"):
            train_or_resume(*runs[key])
    if train_only:
        return None
    return measure(ckpt_dir, reports, docs, reps, profile)


def measure(ckpt_dir: Path, reports: str | Path, docs: str | Path, reps: int, profile: str) -> dict[str, Any]:
    from training.docblock import write_doc_block
    from training.select import Settings
    from training.select import measure as measure_runtimes

    rows = []
    for label, runs in plan(ckpt_dir, profile).items():
        paths = {k: str(p) for k, (r, p) in runs.items() if _finished(p, r)}
        if "base" not in paths:
            continue
        got = measure_runtimes(Settings(checkpoints=list(paths.values()), runtimes=("eager", "int8", "qat"),
                                        reps=reps))
        by_path = {m["checkpoint"]: m for m in got["models"]}
        base, qat, control = (by_path.get(paths.get(k, ""), NOT_RUN) for k in ("base", "qat", "control"))
        rows.append({"model": label, "params": base["params"], "base": base, "qat": qat, "control": control,
                     "epochs": base["epochs"],
                     "qat_fake_quant_acc": qat.get("test_acc"), "machine": got["machine"]})
    raw = {"rows": rows}
    write_json(Path(reports) / "qat.json", raw)
    summary = {"rows": [_brief(r) for r in rows], "qat_epochs": QAT_EPOCHS, "profile": profile, "machine": machine(),
               "measured": rows[0]["machine"] if rows else None}
    write_json(Path(docs) / "efficiency" / "qat.json", summary)
    write_doc_block(Path(docs) / "efficiency.md", "qat-table", qat_table(summary))
    return summary


NOT_RUN: dict[str, Any] = {"runtimes": {}}  # a side whose training has not finished


def _finished(path: Path, recipe: Recipe) -> bool:
    from training.checkpoint import load_checkpoint

    return path.is_file() and int(load_checkpoint(path).get("epoch", 0)) >= recipe.epochs


def _side(m: dict[str, Any], runtime: str) -> dict[str, Any]:
    r = m["runtimes"].get(runtime, {"error": "not run: its training did not finish"})
    return {k: r.get(k) for k in ("acc", "ms_b1", "ms_b8", "file_mb", "convs", "error")}


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {"model": r["model"], "params": r["params"], "fp32": _side(r["base"], "eager"),
            "ptq": _side(r["base"], "int8"), "control_fp32": _side(r["control"], "eager"),
            "control_ptq": _side(r["control"], "int8"), "qat": _side(r["qat"], "qat"), "epochs": r["epochs"],
            "qat_fake_quant_acc": r["qat_fake_quant_acc"]}


def qat_table(summary: dict[str, Any]) -> str:
    """Markdown, generated from the summary JSON."""
    if not summary["rows"]:
        return "_Awaiting a run: `make experiment-qat`._"
    m = summary["measured"]
    lines = ["| model | side | runtime, precision | test acc % | Δ vs fp32 pt | ms b=1 | ms b=8 | × fp32 speed b=8 | "
             "file MB |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    verdicts = []
    for r in summary["rows"]:
        fp32 = r["fp32"]
        n = summary["qat_epochs"]
        sides = [(f"fp32, {r['epochs']} epochs", "eager, fp32 PyTorch", fp32),
                 ("PTQ of it", "int8 ONNX Runtime, 64 calibration images", r["ptq"]),
                 (f"fp32 + {n} epoch(s)", "eager, fp32 PyTorch", r["control_fp32"]),
                 (f"PTQ of fp32 + {n} epoch(s)", "int8 ONNX Runtime", r["control_ptq"]),
                 (f"QAT, + {n} epoch(s) from the fp32", "int8 ONNX Runtime (converted pt2e graph)", r["qat"])]
        for side, runtime, x in sides:
            if x.get("error"):
                lines.append(f"| {r['model']} | {side} | {runtime} | — ({x['error']}) | | | | | |")
                continue
            lines.append(f"| {r['model']} | {side} | {runtime} | {100 * x['acc']:.2f} | "
                         f"{100 * (x['acc'] - fp32['acc']):+.2f} | {x['ms_b1']:.3f} | {x['ms_b8']:.3f} | "
                         f"{fp32['ms_b8'] / x['ms_b8']:.2f} | {x['file_mb']:.2f} |")
        if not (r["qat"].get("error") or r["control_ptq"].get("error")):
            diff = 100 * (r["qat"]["acc"] - r["control_ptq"]["acc"])
            verdicts.append(f"- {r['model']}: QAT scores {abs(diff):.2f} points {'above' if diff >= 0 else 'below'} "
                            f"PTQ after the same extra training ({100 * r['qat']['acc']:.2f} vs "
                            f"{100 * r['control_ptq']['acc']:.2f} %), and "
                            f"{100 * (r['qat']['acc'] - r['ptq']['acc']):+.2f} against PTQ of the base; int8 runs "
                            f"{fp32['ms_b8'] / r['qat']['ms_b8']:.1f}x (QAT) and "
                            f"{fp32['ms_b8'] / r['ptq']['ms_b8']:.1f}x (PTQ) the fp32 speed at batch 8.")
        if r["control_ptq"].get("error") and not (r["qat"].get("error") or r["ptq"].get("error")):
            verdicts.append(f"- {r['model']}: QAT {100 * r['qat']['acc']:.2f} % vs PTQ of the base "
                            f"{100 * r['ptq']['acc']:.2f} %; the control (the same extra epoch in float, then PTQ) did "
                            "not finish, so how much of the difference is the extra training is not measured.")
        elif r["qat"].get("error"):
            verdicts.append(f"- {r['model']}: the QAT run did not finish: QAT is not measured for it.")
        if not (r["control_fp32"].get("error") or fp32.get("error")):
            noise = abs(r["control_fp32"]["ms_b8"] / fp32["ms_b8"] - 1)
            verdicts.append(f"- {r['model']}: the two fp32 rows run the same computation; their batch-8 latencies "
                            f"differ by {100 * noise:.0f} %, the noise of this measurement at this load.")
        if (q := r["qat"].get("convs")) and (p := r["ptq"].get("convs")) and not q["float"] + p["float"]:
            verdicts.append(f"- {r['model']}: ONNX Runtime runs every convolution of the QAT and PTQ graphs as int8 "
                            "kernels (QLinearConv).")
        elif q and p:
            verdicts.append(f"- {r['model']}: ONNX Runtime runs {q['int8']} of the QAT graph's "
                            f"{q['int8'] + q['float']} convolutions as int8 kernels (QLinearConv) and {p['int8']} "
                            f"of PTQ's {p['int8'] + p['float']}; the others run in float between "
                            "quantize/dequantize pairs it could not fuse.")
    lines += ["", *verdicts, "", f"Measured {m['date']} on {m['hardware']} ({m['cores']} cores), every runtime with "
              f"{m['threads']} threads, median of {m['reps']} forward passes; load average "
              f"{m['load_average_start'][0]:g} before and {m['load_average'][0]:g} after (other jobs' niced training "
              "ran beside the measurement, which ran at normal priority: latencies are upper bounds); accuracy on the "
              f"whole test split ({m['test_images']:,} images) through each runtime. Source: "
              "[efficiency/qat.json](efficiency/qat.json)."]
    return "\n".join(lines)
