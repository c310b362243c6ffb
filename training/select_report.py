"""The model-selection report: docs/model-selection.md and its Pareto PNG, generated from the JSON that
training/select.py measured (and the distillation and search summaries beside it, when present). Every sentence
that states a figure or a choice is computed here from those numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BUDGETS_MS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)  # latency budgets per image at batch 1
TARGETS = (0.80, 0.85, 0.88, 0.90, 0.92)              # test accuracy targets
LABEL = {"eager": "fp32 eager", "onnx": "fp32 ONNX Runtime", "bf16": "bf16 autocast", "int8": "int8 PTQ (ORT)",
         "qat": "int8 QAT (ORT)"}


def points(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per (checkpoint, runtime) that ran, with its cost per 1,000 inferences at batch 8."""
    price = summary["settings"]["usd_per_hour"]
    out = []
    for m in summary["models"]:
        for runtime, r in m["runtimes"].items():
            if "error" in r:
                continue
            seconds = 1000.0 / r["img_s_b8"]
            out.append({"model": m["name"], "family": m["family"], "arch": m["arch"], "runtime": runtime,
                        "acc": r["acc"], "ms_b1": r["ms_b1"], "ms_b8": r["ms_b8"], "img_s_b8": r["img_s_b8"],
                        "file_mb": r["file_mb"], "s_per_1k": seconds, "usd_per_1k": seconds / 3600 * price,
                        "train_images": m["train_images"]})
    return out


def front(pts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point beats on both accuracy and batch-1 latency, fastest first."""
    keep = [p for p in pts if not any(o["acc"] >= p["acc"] and o["ms_b1"] <= p["ms_b1"]
                                      and (o["acc"] > p["acc"] or o["ms_b1"] < p["ms_b1"]) for o in pts)]
    return sorted(keep, key=lambda p: p["ms_b1"])


def best_under(pts: list[dict[str, Any]], budget_ms: float) -> dict[str, Any] | None:
    fits = [p for p in pts if p["ms_b1"] <= budget_ms]
    return max(fits, key=lambda p: (p["acc"], -p["ms_b1"])) if fits else None


def fastest_reaching(pts: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    fits = [p for p in pts if p["acc"] >= target]
    return min(fits, key=lambda p: (p["ms_b1"], -p["acc"])) if fits else None


def _name(p: dict[str, Any]) -> str:
    return f"{p['model']} ({LABEL.get(p['runtime'], p['runtime'])})"


def _choice(label: str, p: dict[str, Any] | None, none: str) -> str:
    if p is None:
        return f"| {label} | {none} | | | |"
    return f"| {label} | {_name(p)} | {100 * p['acc']:.2f} | {p['ms_b1']:.3f} | {p['usd_per_1k']:.6f} |"


def family_lines(pts: list[dict[str, Any]]) -> list[str]:
    """CNN vs ResNet vs ViT: each family's most accurate and fastest point, and how they compare."""
    lines = []
    best = {}
    for fam in ("CNN", "ResNet", "ViT"):
        own = [p for p in pts if p["family"] == fam]
        if not own:
            lines.append(f"- **{fam}**: no checkpoint measured.")
            continue
        top = max(own, key=lambda p: p["acc"])
        quick = min(own, key=lambda p: p["ms_b1"])
        best[fam] = top
        lines.append(f"- **{fam}**: most accurate {_name(top)} at {100 * top['acc']:.2f} %, {top['ms_b1']:.2f} ms; "
                     f"fastest {_name(quick)} at {quick['ms_b1']:.3f} ms, {100 * quick['acc']:.2f} %.")
    if len(best) >= 2:
        order = sorted(best.values(), key=lambda p: -p["acc"])
        a, b = order[0], order[1]
        lines.append(f"- The most accurate family here is {a['family']} ({100 * a['acc']:.2f} %), "
                     f"{100 * (a['acc'] - b['acc']):.2f} points above {b['family']}'s best, at "
                     f"{a['ms_b1'] / b['ms_b1']:.1f}x its batch-1 latency.")
    return lines


def data_lines(summary: dict[str, Any], kd: dict[str, Any] | None, transfer: dict[str, Any] | None) -> list[str]:
    """What the data volume changes, from the distillation and transfer results that exist."""
    sizes = sorted({m["train_images"] for m in summary["models"]})
    lines = [f"- Training images behind these checkpoints: {', '.join(f'{n:,}' for n in sizes)}."]
    if kd and kd.get("teacher"):
        t = kd["teacher"]
        for r in kd["students"]:
            a, d = r.get("alone"), r.get("distilled")
            if a and d and r.get("gap_pt") is not None:
                how = f" ({r['how']})" if r.get("how") else ""
                lines.append(f"- {r['student']} on {kd['data']['limit']:,} images: {100 * a['test_acc']:.2f} % "
                             f"alone, {100 * d['test_acc']:.2f} % distilled{how} from the {t['arch']} teacher "
                             f"({100 * t['test_acc']:.2f} %): {r['gain_pt']:+.2f} points.")
    if transfer:
        lines += transfer_lines(transfer)
    else:
        lines.append("- The transfer experiment (pretrained backbone vs from scratch with 10-50 images per class, "
                     "[training.md](training.md#the-transfer-experiment)) has no committed figures yet, so how each "
                     "family scales with the number of images is not measured here.")
    return lines


def noise_lines(summary: dict[str, Any]) -> list[str]:
    """Checkpoints of one architecture run the same computation: the spread of their latencies on one runtime is
    the measurement's noise, the smallest difference the page can tell apart."""
    groups: dict[tuple[str, str, str], list[tuple[float, str]]] = {}
    for m in summary["models"]:
        for runtime, r in m["runtimes"].items():
            if "error" not in r:
                key = (m["arch"], json.dumps(m["model_args"], sort_keys=True), runtime)
                groups.setdefault(key, []).append((r["ms_b1"], m["name"]))
    spreads = [(max(g)[0] / min(g)[0], min(g), max(g), k[2]) for k, g in groups.items() if len(g) > 1]
    if not spreads:
        return []
    ratio, lo, hi, runtime = max(spreads)
    return ["", f"Checkpoints of one architecture run the same computation, yet their batch-1 latency on one runtime "
            f"differs by up to {ratio:.1f}x here ({lo[1]} {lo[0]:.3f} ms vs {hi[1]} {hi[0]:.3f} ms, "
            f"{LABEL.get(runtime, runtime)}): a smaller latency difference between two models is within this "
            "measurement's spread on this loaded machine."]


METHODS = {"scratch": "from scratch", "linear_probe": "linear probe", "layer4_head": "layer4 + head",
           "full": "full fine-tuning"}


def transfer_lines(transfer: dict[str, Any]) -> list[str]:
    """Pretrained backbone vs from scratch per number of images per class, from docs/transfer.json."""
    c = transfer["config"]
    out = [f"- Transfer ([training.md](training.md#the-transfer-experiment)): a {c['arch']} at width {c['width']} "
           f"pretrained on half the classes ({100 * transfer['pretrain_test_acc']:.1f} % on them), fine-tuned on the "
           f"other half with {c['finetune_steps']} optimizer steps whatever the number of images, mean of "
           f"{len(c['seeds'])} seeds on {transfer['test_images']:,} test images:"]
    for shots in c["shots"]:
        cells = {m: transfer["cells"].get(f"{shots}/{m}") for m in c["methods"]}
        done = {m: x for m, x in cells.items() if x and x.get("n") == len(c["seeds"])}  # the mean the header says
        scratch = done.get("scratch")
        pre = {m: x for m, x in done.items() if m != "scratch"}
        if not (scratch and pre):
            out.append(f"  - {shots} images per class: not all runs finished.")
            continue
        best = max(pre, key=lambda m: pre[m]["mean"])
        gain = 100 * (pre[best]["mean"] - scratch["mean"])
        out.append(f"  - {shots} images per class: from scratch {100 * scratch['mean']:.1f} %, the best pretrained "
                   f"start ({METHODS.get(best, best)}) {100 * pre[best]['mean']:.1f} % ({gain:+.1f} points).")
    return out


def page(summary: dict[str, Any], kd: dict[str, Any] | None = None, transfer: dict[str, Any] | None = None,
         search: dict[str, Any] | None = None, png: str = "model-selection.png") -> str:
    m, s = summary["machine"], summary["settings"]
    pts = points(summary)
    out = ["# Model selection", "",
           "Which trained model, served with which runtime, for a latency budget, an accuracy target and the data "
           "at hand. Generated by `python -m training select` (`make model-report`) from "
           "[model-selection.json](model-selection.json); do not edit by hand.", "",
           f"Measured {m['date']} on {m['hardware']} ({m['cores']} cores), {s['threads']} threads, torch "
           f"{m['torch']}; load average {m['load_average_start'][0]:g} before and {m['load_average'][0]:g} after "
           "(other jobs' niced training ran beside the measurement, which ran at normal priority: latencies are "
           "upper bounds). "
           f"Accuracy: {m['dataset']} test split ({m['test_images']:,} images) through each runtime. Latency: the "
           f"model forward on a prepared batch, median of {s['reps']} after warm-up. Cost: machine-seconds per "
           f"1,000 inferences at batch 8, priced at an assumed ${s['usd_per_hour']:.2f} per machine-hour "
           "(`--usd-per-hour`).", "", f"![accuracy vs latency]({png})", "", "## Checkpoints", "",
           "| model | family | params (M) | GFLOPs | weights MB | train images | epochs | test acc % | "
           "GPU ms b=1 / 8 | served req/s |", "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for mod in summary["models"]:
        gpu = f"{mod['gpu']['ms_b1']:.2f} / {mod['gpu']['ms_b8']:.2f}" if mod.get("gpu") else "—"
        out.append(f"| {mod['name']} | {mod['family']} | {mod['params'] / 1e6:.3f} | {mod['gflops']:.4f} | "
                   f"{mod['weights_mb']:.2f} | {mod['train_images']:,} | {mod['epochs']} | "
                   f"{100 * (mod['test_acc'] or 0):.2f} | {gpu} | — |")
    out += ["", ("GPU: " + m["gpu"]) if m.get("gpu") else "GPU columns are empty: no GPU on the measuring machine.",
            "Served req/s: TorchServe throughput was measured for ResNet-18 at 224 px ([benchmarks.md]"
            "(benchmarks.md)), not for these 28 px checkpoints.", "", "## Per runtime", "",
            "| model | runtime | acc % | ms b=1 | ms b=8 | img/s b=8 | file MB | s per 1k | $ per 1k |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    on_front = {(p["model"], p["runtime"]) for p in front(pts)}
    for p in sorted(pts, key=lambda p: (p["model"], p["ms_b1"])):
        star = " *" if (p["model"], p["runtime"]) in on_front else ""
        out.append(f"| {p['model']}{star} | {LABEL[p['runtime']]} | {100 * p['acc']:.2f} | {p['ms_b1']:.3f} | "
                   f"{p['ms_b8']:.3f} | {p['img_s_b8']:.0f} | {p['file_mb']:.2f} | {p['s_per_1k']:.2f} | "
                   f"{p['usd_per_1k']:.6f} |")
    errors = [(mod["name"], rt, r["error"]) for mod in summary["models"] for rt, r in mod["runtimes"].items()
              if "error" in r]
    out += ["", "\\* on the Pareto front (nothing else is both more accurate and faster at batch 1)."]
    out += [f"- {n} does not run on {rt}: {e}" for n, rt, e in errors]
    out += noise_lines(summary)
    out += ["", "## Under a latency budget (batch 1)", "", "| budget | best choice | acc % | ms | $ per 1k |",
            "|---:|---|---:|---:|---:|"]
    out += [_choice(f"{b:g} ms", best_under(pts, b), "nothing measured fits") for b in BUDGETS_MS]
    out += ["", "## For an accuracy target", "", "| target | fastest that reaches it | acc % | ms | $ per 1k |",
            "|---:|---|---:|---:|---:|"]
    out += [_choice(f"{100 * t:.0f} %", fastest_reaching(pts, t), "none of these") for t in TARGETS]
    out += ["", "## CNN vs ResNet vs ViT", "", *family_lines(pts), "", "## Data volume", "",
            *data_lines(summary, kd, transfer)]
    if search:
        c = search["chosen"]
        out += ["", "## Architecture search", "",
                f"The search's choice under {search['settings']['latency_cap_ms']:g} ms: {c['arch']} "
                f"{c['model_args']} ({c['cpu_ms']:.2f} ms, {100 * c['val_acc']:.2f} % after its proxy training); "
                "see [efficiency.md](efficiency.md#architecture-search)."]
    return "\n".join(out) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points(summary)
    colors = {"CNN": "tab:blue", "ResNet": "tab:orange", "ViT": "tab:green"}
    markers = {"eager": "o", "onnx": "s", "bf16": "^", "int8": "D", "qat": "P"}
    fig, ax = plt.subplots(figsize=(8, 5))
    for p in pts:
        ax.scatter(p["ms_b1"], 100 * p["acc"], c=colors[p["family"]], marker=markers[p["runtime"]], alpha=0.8)
    f = front(pts)
    ax.step([p["ms_b1"] for p in f], [100 * p["acc"] for p in f], where="post", c="black", lw=1)
    for p in f:
        ax.annotate(f"{p['model']}\n{p['runtime']}", (p["ms_b1"], 100 * p["acc"]), fontsize=7,
                    textcoords="offset points", xytext=(4, -10))
    for fam, c in colors.items():
        ax.scatter([], [], c=c, label=fam)
    for rt, mk in markers.items():
        ax.scatter([], [], c="grey", marker=mk, label=LABEL[rt])
    ax.set(xscale="log", xlabel="CPU latency, batch 1 (ms, log scale)", ylabel="test accuracy (%)",
           title=f"Accuracy vs latency per runtime ({summary['machine']['date']}); line: Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")  # the slow, less accurate ViTs sit bottom right
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(summary: dict[str, Any], docs: Path) -> Path:
    """docs/model-selection.{json,md,png}, with the distillation, transfer and search summaries when present."""
    from handlers.artifacts import write_json

    def read(name: str) -> dict[str, Any] | None:
        p = docs / name
        return json.loads(p.read_text()) if p.is_file() else None

    write_json(docs / "model-selection.json", summary)
    plot(summary, docs / "model-selection.png")
    text = page(summary, read("efficiency/kd.json"), read("transfer.json"), read("efficiency/search.json"))
    (docs / "model-selection.md").write_text(text)
    return docs / "model-selection.md"
