"""The degradation experiment (He et al. 2016, section 4.2, fig. 6): CIFAR-style plain nets get worse in
*training* error as they get deeper, ResNets get better; per-layer gradient norms show what happens inside.

    python -m training experiment-depth                       # recipe depth_cpu -> reports/depth/depth_cpu/
    python -m training experiment-depth --recipe depth_gpu --gradnorm-every 20 --data-root data/fashion-mnist \
        --nets plain20 plain56 plain110 resnet20 resnet56 resnet110

The nets train round-robin, one epoch each in turn, so an interrupted run has every net at the same epoch and
the report (rewritten after each round) compares like with like; run the command again to continue.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from handlers.artifacts import write_json
from training.checkpoint import build_model
from training.data import TensorLoader, TensorSplit, load_dataset
from training.experiments.defaults import GRADNORM_EVERY, NETS, TRAIN_EVAL_IMAGES
from training.experiments.plots import depth_curves, gradnorm_profiles
from training.experiments.runs import Run, environment, publish, result_recipe, usage, usage_text
from training.gradnorm import mean_norms
from training.models import get_model, list_models
from training.recipe import Recipe, load_recipe
from training.train import evaluate, pick_device

EXPLODING, VANISHING = 10.0, 0.1  # first-layer / last-conv gradient-norm ratios beyond which we name the trend


class TrainErrorScorer:
    """The training error as the paper plots it: the share of training images the current weights get wrong
    (eval mode, no augmentation), on the first `n` images of the run's training split (a seeded random order)."""

    def __init__(self, n: int = TRAIN_EVAL_IMAGES):
        self.n, self._splits = n, {}

    def __call__(self, ckpt: dict[str, Any]) -> dict[str, float]:
        recipe = Recipe(**ckpt["recipe"])
        key = (recipe.dataset, recipe.data_root, recipe.val_fraction, recipe.seed, recipe.img_size, recipe.limit)
        if key not in self._splits:
            train = load_dataset(recipe.dataset, recipe.data_root, val_fraction=recipe.val_fraction,
                                 seed=recipe.seed, image_size=recipe.img_size, limit=recipe.limit).train
            self._splits = {key: TensorSplit(train.images[:self.n], train.labels[:self.n])}
        device = pick_device()
        autocast = recipe.amp == "bf16" or (recipe.amp == "auto" and device.type == "cuda")
        loader = TensorLoader(self._splits[key], 512, device=device)
        result = evaluate(build_model(ckpt).to(device), loader, ckpt["preprocess"], device, autocast=autocast)
        return {"train_err": 1.0 - result.acc, "train_eval_loss": result.loss,
                "train_eval_images": len(self._splits[key])}


def depth_experiment(recipe: str = "depth_cpu", out_dir: str | Path | None = None, nets: tuple[str, ...] = NETS,
                     overrides: dict[str, Any] | None = None, gradnorm_every: int = GRADNORM_EVERY,
                     train_eval_images: int = TRAIN_EVAL_IMAGES, docs_dir: str | Path | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Train `nets` with one recipe (only the arch differs), resumably; write <name>.json, the two plots and
    results.md to `out_dir` after every round, and publish them into `docs_dir` when every net has finished."""
    base = load_recipe(recipe, overrides)
    unknown = [net for net in nets if net not in list_models()]
    if unknown:
        raise ValueError(f"unknown nets {unknown}; known models: {', '.join(list_models())}")
    name = Path(recipe).stem
    out = Path(out_dir or f"reports/depth/{name}")
    scorer = TrainErrorScorer(train_eval_images)
    runs = [Run(net, dataclasses.replace(base, arch=net), out / "runs", gradnorm_every=gradnorm_every,
                epoch_metrics=scorer) for net in nets]
    for run in runs:
        run.load()  # a record of another recipe fails here, before anything trains
    summary: dict[str, Any] = {}
    for epoch in range(1, base.epochs + 1):
        pending = [run for run in runs if run.epochs_done() < epoch]
        for run in pending:
            run.advance(epoch, progress=progress)
        if pending or epoch == base.epochs:
            summary = report(name, base, runs, out)
    if docs_dir is not None:
        name = summary["recipe_name"]
        publish(summary, out, Path(docs_dir), [f"{name}_curves.png", f"{name}_gradnorms.png"],
                markdown(summary, image_dir="experiments"))
    return summary


def report(name: str, base: Recipe, runs: list[Run], out: Path) -> dict[str, Any]:
    """Summarise the records into <name>.json, the plots and results.md in `out`; returns the summary."""
    records = {run.name: run.load() for run in runs}
    summary = summarize(name, base, {k: v for k, v in records.items() if v is not None})
    write_json(out / f"{name}.json", summary)
    depth_curves(summary, out / f"{name}_curves.png")
    gradnorm_profiles(summary, out / f"{name}_gradnorms.png")
    (out / "results.md").write_text(markdown(summary, image_dir=".") + "\n")
    print(table(summary), flush=True)
    return summary


def summarize(name: str, base: Recipe, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures the docs show, from the runs' records."""
    nets = {}
    for net, rec in records.items():
        model = get_model(rec["arch"], **rec["model_args"])
        steps_per_epoch = rec["steps"] // rec["epochs_done"]
        grads = rec["gradnorms"] or {"records": [], "layers": [], "every": 0}
        per_epoch = [{"epoch": e, "mean": _sig(mean_norms(grads["records"], (e - 1) * steps_per_epoch,
                                                             e * steps_per_epoch))}
                     for e in range(1, rec["epochs_done"] + 1)]
        extra = {m["epoch"]: m for m in rec["epoch_metrics"]}
        nets[net] = {
            "skip": model.layer1[0].skip, "layers": len(grads["layers"]),
            "params": sum(p.numel() for p in model.parameters()), "epochs_done": rec["epochs_done"],
            "history": [{"epoch": h["epoch"], "train_loss": h["train_loss"],
                         "train_err": extra[h["epoch"]]["train_err"], "val_err": 1.0 - h["val_acc"], "lr": h["lr"],
                         "train_time_s": h["train_time_s"]} for h in rec["history"]],
            "test_err": 1.0 - rec["metrics"]["test_acc"] if "test_acc" in rec["metrics"] else None,
            "train_time_s": rec["metrics"]["train_time_s"], "wall_s": rec["wall_s"],
            "cpu_s": sum(m.get("cpu_s", 0.0) for m in rec["epoch_metrics"]),
            "hardware": rec["metrics"]["hardware"],
            "gradnorms": {"every": grads["every"], "layers": grads["layers"], "per_epoch": per_epoch},
            "train_eval_images": rec["epoch_metrics"][-1].get("train_eval_images") if rec["epoch_metrics"] else None,
        }
    done = [n["epochs_done"] for n in nets.values()]
    summary = {"experiment": "depth", "recipe_name": name, "recipe": {k: v for k, v in result_recipe(base).items()
                                                                      if k != "arch"},
               "epochs": base.epochs, "epochs_done": min(done, default=0),
               "complete": bool(done) and min(done) == base.epochs, "nets": nets,
               "usage": usage(list(records.values())), "environment": environment(),
               "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    summary["verdicts"] = verdicts(summary)
    return summary


def _sig(values: list[float] | None) -> list[float] | None:
    return None if values is None else [float(f"{v:.4g}") for v in values]


def compare_training_error(deep: dict[str, Any], shallow: dict[str, Any]) -> str:
    """"higher", "lower" (deep vs shallow, at every epoch of the second half of the epochs both finished) or
    "not separated" (the curves cross or touch there)."""
    n = min(len(deep["history"]), len(shallow["history"]))
    pairs = [(d["train_err"], s["train_err"]) for d, s in zip(deep["history"][n // 2:n], shallow["history"][n // 2:n])]
    if pairs and all(d > s for d, s in pairs):
        return "higher"
    if pairs and all(d < s for d, s in pairs):
        return "lower"
    return "not separated"


def gradient_ratio(net: dict[str, Any], epoch: int = 1) -> float | None:
    """How the gradient norm changes from the output end to the input end during `epoch`: the geometric mean of
    the per-layer norms over the first quarter of the conv layers over that of the last quarter (the classifier,
    the last layer, left out). Above 1: larger towards the input."""
    rows = [p["mean"] for p in net["gradnorms"]["per_epoch"] if p["epoch"] == epoch and p["mean"]]
    if not rows or len(rows[0]) < 3:
        return None
    convs = rows[0][:-1]
    if min(convs) <= 0:
        return None
    q = max(1, len(convs) // 4)
    first, last = (sum(math.log(n) for n in part) / q for part in (convs[:q], convs[-q:]))
    return math.exp(first - last)


def verdicts(summary: dict[str, Any]) -> list[str]:
    """Sentences generated from the figures: the depth trend per family and the gradient-norm profile."""
    nets, out = summary["nets"], []
    paper = {("plain", 56): "higher", ("resnet", 56): "lower", ("resnet", 110): "lower"}
    met = []
    for family in ("plain", "resnet"):
        shallow = nets.get(f"{family}20")
        for depth in (56, 110):
            deep = nets.get(f"{family}{depth}")
            if shallow is None or deep is None or not deep["history"]:
                continue
            trend = compare_training_error(deep, shallow)
            final_d, final_s = deep["history"][-1]["train_err"], shallow["history"][-1]["train_err"]
            what = {"higher": "deeper is worse", "lower": "deeper is better",
                    "not separated": "this run cannot separate them"}[trend]
            word = {"higher": "higher than", "lower": "lower than", "not separated": "not consistently apart from"}
            out.append(f"{family}{depth}'s training error is {word[trend]} {family}20's over the second half of "
                       f"training (final {100 * final_d:.2f} % vs {100 * final_s:.2f} %): {what}.")
            if (family, depth) in paper:
                met.append(trend == paper[(family, depth)])
    if met:
        state = "reproduced" if all(met) else ("partly reproduced" if any(met) else "not reproduced")
        out.append(f"The paper's pattern (plain56 above plain20, resnet56 and resnet110 below resnet20 in training "
                   f"error) is {state} here ({sum(met)} of {len(met)} comparisons).")
    for net, r in nets.items():
        shapes = [f"{_profile(ratio)} in epoch {e}" for e in sorted({1, r["epochs_done"]})
                  if (ratio := gradient_ratio(r, e)) is not None]
        if shapes:
            out.append(f"{net}: from the last quarter of the conv layers to the first, the weight-gradient norm "
                       f"{'; '.join(shapes)}.")
    return out


def _profile(ratio: float) -> str:
    if ratio > EXPLODING:
        return f"grows {ratio:.3g}x (exploding towards the input)"
    if ratio < VANISHING:
        return f"shrinks to {ratio:.3g}x (vanishing towards the input)"
    return f"stays within a factor of 10 ({ratio:.3g}x)"


def table(summary: dict[str, Any]) -> str:
    rows = ["| net | skips | weighted layers | params | train error | train loss | val error | test error | "
            "gradient norm, first / last quarter of the convs: epoch 1 → last | CPU time (s) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for net, r in summary["nets"].items():
        last = r["history"][-1] if r["history"] else {}
        ratios = " → ".join(f"{x:.3g}" for e in sorted({1, r["epochs_done"]})
                            if (x := gradient_ratio(r, e)) is not None) or "—"
        test = "—" if r["test_err"] is None else f"{100 * r['test_err']:.2f} %"
        rows.append(f"| {net} | {'yes' if r['skip'] else 'no'} | {r['layers']} | {r['params'] / 1e6:.2f} M | "
                    f"{100 * last.get('train_err', float('nan')):.2f} % | {last.get('train_loss', float('nan')):.4f} | "
                    f"{100 * last.get('val_err', float('nan')):.2f} % | {test} | "
                    f"{ratios} | {r['cpu_s']:.0f} |")
    return "\n".join(rows)


def markdown(summary: dict[str, Any], image_dir: str) -> str:
    """The generated docs block: what ran, the table, the plots, the verdicts."""
    r, name = summary["recipe"], summary["recipe_name"]
    hardware = sorted({n["hardware"] for n in summary["nets"].values()})
    status = "all nets finished" if summary["complete"] else \
        f"partial: {summary['epochs_done']} of {summary['epochs']} epochs so far (rerun to continue)"
    data = f"{r['limit']} training images" if r.get("limit") else "the full training split"
    scored = ", ".join(sorted({str(n["train_eval_images"]) for n in summary["nets"].values()}))
    lines = [
        f"Recipe `{name}`: {r['dataset']}, {data}, {summary['epochs']} epochs, batch {r['batch_size']}, "
        f"{r['optimizer']} lr {r['lr']:g} (warm-up {r['warmup_epochs']:g} epoch, cosine), weight decay "
        f"{r['weight_decay']:g}, amp {r['amp']}, seed {r['seed']}; one run per net. Measured {summary['generated']} "
        f"on {', '.join(hardware)} ({status}); {usage_text(summary['usage'])} (torch "
        f"{summary['environment']['torch']}). Training error: {scored} training images scored in eval "
        f"mode after each epoch; figures from [{name}.json]({image_dir}/{name}.json).",
        "", table(summary), "",
        f"![training and validation error per epoch]({image_dir}/{name}_curves.png)",
        f"![per-layer gradient norms]({image_dir}/{name}_gradnorms.png)", "",
        *[f"- {v}" for v in summary["verdicts"]],
    ]
    return "\n".join(lines)

