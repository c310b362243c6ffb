"""A latency-aware architecture search over the zoo's knobs (Optuna, multi-objective, with a latency cap).

Each trial picks a family and its knobs — small CNN: width, hidden units; ResNet: depth (18/34), width, attention
(none/SE/CBAM); ViT: width, depth, patch size — then measures the model's CPU latency (batch 1, eager runtime as
served, `threads` threads, median) and, when that is under the cap, trains it briefly (the proxy: `epochs` over
`limit` training images) and scores it on the validation split. Objectives: maximise validation accuracy, minimise
CPU latency (and GPU latency, on a machine with one). A trial over the cap is infeasible (Optuna constraint) and
costs only its latency measurement. TPE (multivariate, grouped for the conditional space) samples; its first
`startup` trials are random.

Output: every trial in <out>/trials.json, the summary (Pareto front, chosen architecture, settings, machine) in
<summary>, the front as a PNG, and the chosen architecture — the most accurate on the front under the cap — as a
recipe (full data, the family's schedule) that trains and serves like any other.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from handlers.artifacts import write_json
from training.recipe import Recipe, RecipeError
from training.runs import machine

FAMILIES = ("cnn", "resnet", "vit")
PROXY = {"cnn": {"optimizer": "adamw", "lr": 3e-3}, "resnet": {"optimizer": "adamw", "lr": 2e-3},
         "vit": {"optimizer": "adamw", "lr": 1e-3, "grad_clip": 1.0}}
FULL = {  # the chosen architecture's recipe: the family's schedule on all the training data
    "cnn": {"epochs": 10, "batch_size": 128, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.05,
            "warmup_epochs": 0.5, "crop_padding": 2, "hflip": True},
    "resnet": {"epochs": 12, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4,
               "warmup_epochs": 1.0, "crop_padding": 2, "hflip": True},
    "vit": {"epochs": 30, "batch_size": 128, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05,
            "warmup_epochs": 3.0, "crop_padding": 2, "hflip": True, "grad_clip": 1.0},
}
SMALLEST = {"cnn": ("simple_cnn", {"width": 8, "hidden": 32}), "resnet": ("resnet18", {"width": 8}),
            "vit": ("vit_tiny", {"dim": 48, "depth": 2, "heads": 3, "mlp_dim": 96, "patch_size": 7})}


class SearchError(RecipeError):
    """Settings the search cannot meet (an impossible latency cap, no feasible trial)."""


@dataclass
class Settings:
    trials: int = 24               # trials at most
    timeout_s: float = 300.0       # no new trial starts after this many seconds
    latency_cap_ms: float = 3.0    # CPU latency at batch 1 a chosen model must stay under
    limit: int = 2000              # proxy training: images per split
    epochs: int = 2                # proxy training: epochs
    batch_size: int = 64
    threads: int = 2               # CPU threads for training and latency
    reps: int = 7                  # timed forward passes per latency (median)
    families: tuple[str, ...] = FAMILIES
    startup: int = 4               # random trials before TPE models the results
    seed: int = 0
    dataset: str = "fashion_mnist"
    data_root: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown or not self.families:
            raise SearchError(f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown) or '(none)'}; "
                              f"choose from {', '.join(FAMILIES)}")
        if self.latency_cap_ms <= 0 or self.trials < 1 or self.limit < 1 or self.epochs < 1:
            raise SearchError("latency_cap_ms, trials, limit and epochs must be > 0")


def suggest(trial: Any, families: tuple[str, ...]) -> tuple[str, str, dict[str, Any]]:
    """(family, registry arch, model_args) for one trial."""
    family = trial.suggest_categorical("family", list(families))
    if family == "cnn":
        return family, "simple_cnn", {"width": trial.suggest_categorical("cnn_width", [8, 16, 32, 64]),
                                      "hidden": trial.suggest_categorical("cnn_hidden", [32, 64, 128, 256])}
    if family == "resnet":
        depth = trial.suggest_categorical("resnet_depth", [18, 34])
        attn = trial.suggest_categorical("resnet_attn", ["none", "se", "cbam"])
        args = {"width": trial.suggest_categorical("resnet_width", [8, 16, 32])}
        return family, f"resnet{depth}", args | ({} if attn == "none" else {"attn": attn})
    dim = trial.suggest_categorical("vit_dim", [48, 96, 192])
    return family, "vit_tiny", {"dim": dim, "heads": 3, "mlp_dim": 2 * dim,
                                "depth": trial.suggest_categorical("vit_depth", [2, 4, 6]),
                                "patch_size": trial.suggest_categorical("vit_patch", [4, 7])}


def latency_ms(arch: str, model_args: dict[str, Any], preprocess: dict[str, Any], threads: int, reps: int,
               device: str = "cpu") -> float:
    """Median batch-1 latency of the model as the eager runtime serves it (channels_last for conv nets)."""
    from handlers.runtimes import prepare_runtime
    from training.models import get_model
    from training.zoo import cpu_latency_ms

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = get_model(arch, num_classes=10, in_channels=preprocess["channels"], img_size=preprocess["size"],
                          **model_args)
        module, _ = prepare_runtime("eager", model, preprocess, device)
        x = torch.randn(1, preprocess["channels"], preprocess["size"], preprocess["size"], device=device)
        if device == "cuda":
            return _cuda_latency_ms(module, x, reps)
        return cpu_latency_ms(module, x, warmup=3, reps=reps)
    finally:
        torch.set_num_threads(previous)


def _cuda_latency_ms(module: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    times = []
    with torch.inference_mode():
        for i in range(reps + 3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            module(x)
            torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - start)
    return 1000.0 * sorted(times)[len(times) // 2]


def check_cap(s: Settings, preprocess: dict[str, Any]) -> dict[str, float]:
    """Latency of the smallest model of each family; an error when even the fastest is over the cap."""
    floor = {f: latency_ms(*SMALLEST[f], preprocess, s.threads, s.reps) for f in s.families}
    fastest = min(floor, key=floor.get)
    if floor[fastest] > s.latency_cap_ms:
        arch, args = SMALLEST[fastest]
        raise SearchError(f"no architecture in the search space runs under {s.latency_cap_ms:g} ms on this CPU: the "
                          f"fastest, {arch} {args}, takes {floor[fastest]:.2f} ms at batch 1 ({s.threads} threads); "
                          "raise --latency-cap-ms")
    return floor


def run_search(s: Settings, out_dir: str | Path = "reports/search", docs: str | Path | None = None,
               recipe_path: str | Path | None = None) -> dict[str, Any]:
    """Run the study (resumed from <out>/study.log when it exists) and write its results: under `out_dir`, and with
    `docs` the summary JSON, the PNG and the table of docs/efficiency.md."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from training.data import load_dataset
    from training.presets import make_preprocess
    from training.train import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = load_dataset(s.dataset, s.data_root, limit=1).info
    preprocess = make_preprocess(info.size, info.channels, info.mean, info.std)
    load_start = [round(v, 2) for v in os.getloadavg()]
    floor = check_cap(s, preprocess)
    gpu = torch.cuda.is_available()

    def objective(trial: Any) -> tuple[float, ...]:
        family, arch, args = suggest(trial, s.families)
        if same := _done_before(trial):  # TPE proposed knobs already scored: reuse, spend nothing
            for k, v in same.user_attrs.items():
                trial.set_user_attr(k, v)
            trial.set_user_attr("repeat_of", same.number)
            trial.set_constraint("cpu_ms_over_cap", same.user_attrs["constraint"][0])
            return tuple(same.values)
        cpu = latency_ms(arch, args, preprocess, s.threads, s.reps)
        trial.set_user_attr("arch", arch)
        trial.set_user_attr("model_args", args)
        trial.set_user_attr("cpu_ms", cpu)
        trial.set_user_attr("constraint", [cpu - s.latency_cap_ms])
        trial.set_constraint("cpu_ms_over_cap", cpu - s.latency_cap_ms)
        extra = (latency_ms(arch, args, preprocess, s.threads, s.reps, "cuda"),) if gpu else ()
        if extra:
            trial.set_user_attr("gpu_ms", extra[0])
        if cpu > s.latency_cap_ms:  # infeasible: not worth training
            return (0.0, cpu, *extra)
        recipe = Recipe(arch=arch, model_args=args, dataset=s.dataset, data_root=s.data_root, limit=s.limit,
                        epochs=s.epochs, batch_size=s.batch_size, warmup_epochs=0.1, crop_padding=0, hflip=True,
                        weight_decay=0.05, threads=s.threads, seed=s.seed, **PROXY[family])
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = train(recipe, Path(tmp) / "trial.pt", progress=False)
        m = ckpt["metrics"]
        trial.set_user_attr("train_time_s", round(m["train_time_s"], 1))
        trial.set_user_attr("params", sum(p.numel() for p in ckpt["state_dict"].values() if p.is_floating_point()))
        return (m["val_acc"], cpu, *extra)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # multivariate and group are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.startup, multivariate=True, group=True)
    storage = JournalStorage(JournalFileBackend(str(out / "study.log")))
    study = optuna.create_study(study_name="latency-aware", storage=storage, load_if_exists=True, sampler=sampler,
                                directions=["maximize", "minimize"] + (["minimize"] if gpu else []))
    done = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    start = time.perf_counter()
    study.optimize(objective, n_trials=max(0, s.trials - done), timeout=s.timeout_s)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    trials = [_row(t) for t in done if "repeat_of" not in t.user_attrs]
    summary = summarise(trials, s, floor, time.perf_counter() - start)
    summary["repeats"] = len(done) - len(trials)
    summary["machine"]["load_average_start"] = load_start
    write_json(out / "trials.json", trials)
    write_json(out / "search.json", summary)
    plot_front(trials, summary, out / "pareto.png")
    if recipe_path:
        summary["recipe"] = str(write_recipe(summary, s, Path(recipe_path)))
    if docs:
        from training.docblock import write_doc_block

        docs = Path(docs)
        write_json(docs / "efficiency" / "search.json", summary)
        plot_front(trials, summary, docs / "efficiency" / "search_pareto.png")
        write_doc_block(docs / "efficiency.md", "search-front", front_table(summary))
    return summary


def _done_before(trial: Any) -> Any:
    """The earliest finished trial with the same knobs, or None."""
    import optuna

    done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return next((t for t in done if t.params == trial.params and "constraint" in t.user_attrs), None)


def _row(t: Any) -> dict[str, Any]:
    a = t.user_attrs
    feasible = a["constraint"][0] <= 0
    return {"number": t.number, "family": t.params["family"], "arch": a["arch"], "model_args": a["model_args"],
            "val_acc": t.values[0] if feasible else None, "cpu_ms": round(a["cpu_ms"], 3),
            "gpu_ms": a.get("gpu_ms"), "feasible": feasible, "params": a.get("params"),
            "train_time_s": a.get("train_time_s")}


def pareto_front(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Feasible trials no other feasible trial beats on both accuracy and CPU latency, fastest first."""
    ok = [t for t in trials if t["feasible"]]
    front = [t for t in ok if not any(o["val_acc"] >= t["val_acc"] and o["cpu_ms"] <= t["cpu_ms"]
                                      and (o["val_acc"] > t["val_acc"] or o["cpu_ms"] < t["cpu_ms"]) for o in ok)]
    return sorted(front, key=lambda t: t["cpu_ms"])


def summarise(trials: list[dict[str, Any]], s: Settings, floor: dict[str, float], seconds: float) -> dict[str, Any]:
    front = pareto_front(trials)
    if not front:
        raise SearchError(f"none of the {len(trials)} trials ran under the {s.latency_cap_ms:g} ms cap (fastest "
                          f"trial {min((t['cpu_ms'] for t in trials), default=math.nan):.2f} ms): raise "
                          "--latency-cap-ms or run more --trials")
    chosen = max(front, key=lambda t: (t["val_acc"], -t["cpu_ms"]))
    return {"settings": asdict(s), "smallest_per_family_ms": floor, "trials": len(trials),
            "feasible": sum(t["feasible"] for t in trials), "search_s": round(seconds, 1), "front": front,
            "chosen": chosen, "gpu": torch.cuda.is_available(), "machine": machine()}


def front_table(summary: dict[str, Any]) -> str:
    """The Pareto front as Markdown, generated from the summary JSON."""
    s, m, c = summary["settings"], summary["machine"], summary["chosen"]
    n = summary.get("repeats")
    repeats = f"; {n} more proposals repeated earlier knobs and reused their results" if n else ""
    lines = [f"{summary['trials']} trials ({summary['feasible']} under the {s['latency_cap_ms']:g} ms cap{repeats}) in "
             f"{summary['search_s'] / 60:.1f} min; proxy: {s['epochs']} epoch(s) on {s['limit']} training images, "
             f"scored on {s['limit']} validation images; latency: batch 1, eager runtime, {s['threads']} threads, "
             f"median of {s['reps']}. Measured {m['date']} on {m['hardware']} (load average "
             f"{m.get('load_average_start', ['?'])[0]} at the start, {m['load_average'][0]:g} at the end; other jobs' "
             "niced training ran beside the search, which ran at normal priority: latencies are upper bounds).", "",
             "| | family | arch | knobs | val acc % | CPU ms (b=1) | params (M) |", "|---|---|---|---|---:|---:|---:|"]
    for t in summary["front"]:
        star = "**chosen**" if t["number"] == c["number"] else ""
        knobs = ", ".join(f"{k} {v}" for k, v in t["model_args"].items())
        params = f"{t['params'] / 1e6:.3f}" if t.get("params") else ""
        lines.append(f"| {star} | {t['family']} | {t['arch']} | {knobs} | {100 * t['val_acc']:.2f} | "
                     f"{t['cpu_ms']:.2f} | {params} |")
    gpu = "" if summary["gpu"] else " No GPU on this machine: no GPU latency objective."
    where = f" Recipe: `{summary['recipe']}`." if summary.get("recipe") else ""
    lines += ["", f"![Pareto front](efficiency/search_pareto.png){where}{gpu} Source: "
              "[efficiency/search.json](efficiency/search.json)."]
    return "\n".join(lines)


def write_recipe(summary: dict[str, Any], s: Settings, path: Path) -> Path:
    """The chosen architecture as a recipe (full data, its family's schedule), its evidence in the header."""
    import yaml

    c = summary["chosen"]
    m = summary["machine"]
    values = {"arch": c["arch"], "model_args": c["model_args"], "dataset": s.dataset, **FULL[c["family"]]}
    Recipe(**values)  # validates before anything is written
    header = (f"# Found by `make search` ({summary['trials']} trials, {summary['search_s'] / 60:.0f} min) on "
              f"{m['date']}, {m['hardware']}:\n# the most accurate architecture on the Pareto front under "
              f"{s.latency_cap_ms:g} ms CPU latency at batch 1 ({s.threads} threads, eager runtime).\n"
              f"# Proxy score: {100 * c['val_acc']:.2f} % validation accuracy after {s.epochs} epoch(s) on "
              f"{s.limit} images; latency {c['cpu_ms']:.2f} ms.\n# Evidence: docs/efficiency.md (Architecture "
              "search), docs/efficiency/search.json.\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(values, sort_keys=False))
    return path


def plot_front(trials: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"cnn": "tab:blue", "resnet": "tab:orange", "vit": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, color in colors.items():
        pts = [t for t in trials if t["family"] == family and t["feasible"]]
        ax.scatter([t["cpu_ms"] for t in pts], [100 * t["val_acc"] for t in pts], c=color, label=family, alpha=0.7)
    over = [t for t in trials if not t["feasible"]]
    if over:
        ax.scatter([t["cpu_ms"] for t in over], [0] * len(over), marker="x", c="grey", label="over the cap")
    front = summary["front"]
    ax.step([t["cpu_ms"] for t in front], [100 * t["val_acc"] for t in front], where="post", c="black", lw=1,
            label="Pareto front")
    c = summary["chosen"]
    ax.scatter([c["cpu_ms"]], [100 * c["val_acc"]], marker="*", s=250, c="red", label="chosen", zorder=5)
    ax.axvline(summary["settings"]["latency_cap_ms"], ls="--", c="red", lw=1, label="latency cap")
    ax.set(xscale="log", xlabel="CPU latency, batch 1 (ms, log scale)", ylabel="validation accuracy after proxy (%)",
           title=f"Architecture search: {summary['trials']} trials ({summary['machine']['date']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")  # the infeasible crosses sit along the bottom
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
