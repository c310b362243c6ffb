"""The transfer experiment (`make experiment-transfer`): does a pretrained backbone help with little data?

Fashion-MNIST stands in for ImageNet and a user's small dataset. A ResNet-50 is pretrained on classes 0-4
(T-shirt, trouser, pullover, dress, coat), then fine-tuned on classes 5-9 (sandal, shirt, sneaker, bag, ankle
boot) with 10, 20 and 50 images per class, four ways: from scratch, linear probe, layer4 + head (the
`resnet50_finetune_imagefolder` recipe's default) and full fine-tuning; every run is scored on the same
held-out test images. Both datasets are written as real ImageFolder trees (PNG files), so the runs go
through the same loader, augmentation and checkpoints as a user's photos.

Resumable: the trees, the pretraining checkpoint and one JSON per fine-tuning run are reused when present.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from handlers.artifacts import write_json
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data import FASHION_MNIST_CLASSES, load_dataset
from training.finetune import sha256_of
from training.recipe import Recipe, RecipeError, load_recipe, make_recipe
from training.samples import slug
from training.train import hardware_name, train

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
SHOTS = (10, 20, 50)
METHODS = ("scratch", "linear_probe", "layer4_head", "full")
FINETUNE_RECIPE = "resnet50_finetune_imagefolder"
AUGMENT_KEYS = ("crop_scale_min", "auto_augment", "color_jitter", "random_erasing")  # the same in both stages
BACKGROUND = [0, 0, 0]  # the trees hold Fashion-MNIST's white-on-black items: served transparency goes on black


# `--full`: more pretraining and twice the test images (hours on 2 shared cores).
FULL_SIZE = {"pretrain_per_class": 5000, "pretrain_epochs": 4, "test_per_class": 400}


def experiment_config(quick: bool = False, full: bool = False, finetune_steps: int | None = None,
                      pretrain_epochs: int | None = None) -> dict[str, Any]:
    """Every knob of the experiment in one place (recorded in the results). `quick` shrinks it for tests,
    `full` enlarges it (FULL_SIZE); `finetune_steps`, when given, sets the optimizer steps of every fine-tuning
    run over any profile (the pretraining, and so its cached checkpoint, does not depend on it);
    `pretrain_epochs` the pretraining's epochs (a new pretraining, and so every fine-tuning run again)."""
    cfg = {
        "profile": "default",  # default | full | quick: the command-line flag that gave this configuration
        "arch": "resnet50", "width": 16, "img_size": 28,  # ResNet-50's bottleneck 3-4-6-3 at a quarter width
        # Sized for a shared 2-core CPU; FULL_SIZE is the longer run (`--full`).
        "pretrain_per_class": 1000, "pretrain_epochs": 6, "pretrain_batch": 128, "pretrain_lr": 0.1,
        "val_per_class": 10, "test_per_class": 200,
        "shots": list(SHOTS), "methods": list(METHODS), "seeds": [0, 1, 2],
        "finetune_steps": 300, "finetune_batch": 16, "head_lr": 0.05, "backbone_lr_factor": 0.1,
        # 28 px augmentation: crops of at least half the area, no TrivialAugmentWide (its translations reach
        # 32 px, more than the whole image); the recipe's flip, random erasing and label smoothing stay.
        # Pretraining and fine-tuning both use these (AUGMENT_KEYS), so frozen features see what they learnt on.
        "crop_scale_min": 0.5, "auto_augment": "none", "color_jitter": 0.0, "random_erasing": 0.1,
    }
    if full:
        cfg.update(FULL_SIZE, profile="full")
    if quick:
        cfg.update(profile="quick", width=4, pretrain_per_class=16, pretrain_epochs=1, pretrain_batch=16,
                   test_per_class=4, val_per_class=2, shots=[2], seeds=[0], finetune_steps=2, finetune_batch=4)
    if finetune_steps is not None:
        if finetune_steps < 1:
            raise ValueError(f"finetune_steps must be at least 1, got {finetune_steps}")
        cfg["finetune_steps"] = finetune_steps
    if pretrain_epochs is not None:
        if pretrain_epochs < 1:
            raise ValueError(f"pretrain_epochs must be at least 1, got {pretrain_epochs}")
        cfg["pretrain_epochs"] = pretrain_epochs
    return cfg


def _write_images(folder: Path, images: torch.Tensor, labels: torch.Tensor, classes: tuple[int, ...]) -> None:
    for c in classes:
        (folder / slug(FASHION_MNIST_CLASSES[c])).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels.tolist())):
        Image.fromarray(img[0].numpy(), "L").save(folder / slug(FASHION_MNIST_CLASSES[label]) / f"{i:05d}.png")


def _pick(labels: torch.Tensor, classes: tuple[int, ...], per_class: int, rng: np.random.Generator,
          exclude: set[int] | None = None) -> list[int]:
    """`per_class` random indices of each class (never from `exclude`), in a seeded order."""
    out = []
    for c in classes:
        pool = [i for i in torch.nonzero(labels == c).flatten().tolist() if not exclude or i not in exclude]
        if len(pool) < per_class:
            raise ValueError(f"class {c} has {len(pool)} images, {per_class} needed")
        out += rng.permutation(pool)[:per_class].tolist()
    return out


def write_trees(out: Path, cfg: dict[str, Any], data_root: str | None = None) -> dict[str, Any]:
    """pretrain/{train,val,test}/<class>/ (classes 0-4) and finetune/<k>shot-seed<s>/{train,val,test}/<class>/
    (classes 5-9). Shots are drawn from Fashion-MNIST's training images (nested: the 10 images of a seed are
    among its 20 and 50); val images are disjoint from every shot; test is Fashion-MNIST's own test split,
    the same images for every run. Returns where everything is."""
    done = out / "trees.json"
    shape = {k: cfg[k] for k in ("pretrain_per_class", "val_per_class", "test_per_class", "shots", "seeds")}
    if done.is_file() and json.loads(done.read_text()).get("shape") == shape:
        return json.loads(done.read_text())
    for stale in ("pretrain", "finetune"):  # trees of another shape: rewrite them
        shutil.rmtree(out / stale, ignore_errors=True)
    splits = load_dataset("fashion_mnist", data_root, val_fraction=0.0, seed=0)
    train_x, train_y = splits.train.images, splits.train.labels
    test_x, test_y = splits.test.images, splits.test.labels
    rng = np.random.default_rng(0)
    pre = _pick(train_y, PRETRAIN_CLASSES, cfg["pretrain_per_class"] + cfg["val_per_class"], rng)
    n_val = cfg["val_per_class"]
    per = cfg["pretrain_per_class"] + n_val
    pre_val = [i for k in range(len(PRETRAIN_CLASSES)) for i in pre[k * per:k * per + n_val]]
    pre_train = sorted(set(pre) - set(pre_val))
    _write_images(out / "pretrain" / "train", train_x[pre_train], train_y[pre_train], PRETRAIN_CLASSES)
    _write_images(out / "pretrain" / "val", train_x[pre_val], train_y[pre_val], PRETRAIN_CLASSES)
    pre_test = _pick(test_y, PRETRAIN_CLASSES, cfg["test_per_class"], rng)
    _write_images(out / "pretrain" / "test", test_x[pre_test], test_y[pre_test], PRETRAIN_CLASSES)
    val = _pick(train_y, TARGET_CLASSES, n_val, rng)
    test = _pick(test_y, TARGET_CLASSES, cfg["test_per_class"], rng)
    trees = {}
    for seed in cfg["seeds"]:
        shots = _pick(train_y, TARGET_CLASSES, max(cfg["shots"]), np.random.default_rng(1000 + seed), set(val))
        for k in cfg["shots"]:
            chosen = [i for c in range(len(TARGET_CLASSES)) for i in shots[c * max(cfg["shots"]):][:k]]
            root = out / "finetune" / f"{k}shot-seed{seed}"
            _write_images(root / "train", train_x[chosen], train_y[chosen], TARGET_CLASSES)
            _write_images(root / "val", train_x[val], train_y[val], TARGET_CLASSES)
            _write_images(root / "test", test_x[test], test_y[test], TARGET_CLASSES)
            trees[f"{k}-{seed}"] = str(root)
    info = {"shape": shape, "pretrain": str(out / "pretrain"), "finetune": trees, "test_images": len(test),
            "val_images": len(val), "pretrain_images": len(pre_train)}
    write_json(done, info)
    return info


def same_recipe(stored: dict[str, Any] | None, recipe: Recipe) -> bool:
    """Whether a recipe stored in a checkpoint or run file is `recipe`. Keys added to Recipe since it was
    stored take their defaults (what the run did), so earlier work of the same configuration is reused."""
    if not isinstance(stored, dict):
        return False
    try:
        return make_recipe(stored).to_dict() == recipe.to_dict()
    except (RecipeError, TypeError, ValueError):  # a key since removed, or a value no longer valid
        return False


def _load1() -> float:
    return round(os.getloadavg()[0], 2)


def pretrain_recipe(cfg: dict[str, Any], tree: str) -> Recipe:
    """ResNet-50 on classes 0-4, with the preprocessing (size, resize, background) and augmentation the
    fine-tuning runs use."""
    return make_recipe({
        "arch": cfg["arch"], "dataset": "imagefolder", "data_root": tree, "img_size": cfg["img_size"],
        "resize": cfg["img_size"], "model_args": {"width": cfg["width"]}, "epochs": cfg["pretrain_epochs"],
        "batch_size": cfg["pretrain_batch"], "optimizer": "sgd", "lr": cfg["pretrain_lr"], "weight_decay": 5e-4,
        "warmup_epochs": 0.5, "label_smoothing": 0.1, "background": BACKGROUND, "seed": 0,
        **{k: cfg[k] for k in AUGMENT_KEYS}})


def pretrain(out: Path, cfg: dict[str, Any], tree: str, progress: bool = True,
             train_missing: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """ResNet-50 on classes 0-4 (resumes an interrupted run; reuses a finished one). Returns the checkpoint and
    the wall time and load averages of its training, summed over the invocations that trained it."""
    recipe = pretrain_recipe(cfg, tree)
    path, wall_file = out / "pretrain.pt", out / "pretrain-wall.json"
    resume, wall = None, {"wall_s": 0.0, "loadavg": []}
    if path.is_file():
        state = load_checkpoint(path)
        if same_recipe(state["recipe"], recipe):  # else another configuration's: train anew
            if wall_file.is_file():
                wall = json.loads(wall_file.read_text())
            if state["epoch"] >= recipe.epochs:
                return state, wall
            resume = path
    if not train_missing:
        raise FileNotFoundError(f"{path}: the pretraining of this configuration has not finished; nothing to report")
    t, load = time.perf_counter(), _load1()
    state = train(recipe, path, resume=resume, progress=progress)
    wall = {"wall_s": wall["wall_s"] + time.perf_counter() - t, "loadavg": [*wall["loadavg"], load, _load1()]}
    write_json(wall_file, wall)
    return state, wall


def finetune_recipe(cfg: dict[str, Any], method: str, tree: str, shots: int, seed: int,
                    pretrained: str) -> Recipe:
    """The shipped fine-tuning recipe, resized for this experiment; `method` picks the starting weights and
    the freeze policy. Every method gets the same head LR, schedule length (in steps) and augmentation."""
    steps_per_epoch = max(1, 5 * shots // cfg["finetune_batch"])
    epochs = max(1, round(cfg["finetune_steps"] / steps_per_epoch))
    overrides: dict[str, Any] = {
        "data_root": tree, "img_size": cfg["img_size"], "resize": cfg["img_size"], "arch": cfg["arch"],
        "model_args": {"width": cfg["width"]}, "epochs": epochs, "batch_size": cfg["finetune_batch"],
        "lr": cfg["head_lr"], "warmup_epochs": 0.1 * epochs, "seed": seed, "num_workers": 0,
        "pretrained_weights": None, "init_from": pretrained, "backbone_lr_factor": cfg["backbone_lr_factor"],
        "freeze": {"scratch": "none", "full": "none"}.get(method, method),
        "background": BACKGROUND, **{k: cfg[k] for k in AUGMENT_KEYS},
    }
    if method == "scratch":
        overrides.update(init_from=None, backbone_lr_factor=1.0)
    return load_recipe(FINETUNE_RECIPE, overrides)


def fine_tune(recipe: Recipe, path: Path, base_sha: str, labels: dict[str, Any], train_missing: bool = True,
              progress: bool = True) -> dict[str, Any] | None:
    """One fine-tuning run, recorded in `path` (JSON; its checkpoint beside it, .pt): reused when `path` holds
    the same recipe on the same pretraining, else trained (None when `train_missing` is False). The record
    holds `labels`, test accuracy, the per-epoch history (val accuracy included), wall time and load."""
    key = {"recipe": recipe.to_dict(), "pretrain_sha256": base_sha}
    done = json.loads(path.read_text()) if path.is_file() else {}
    if done.get("pretrain_sha256") == base_sha and same_recipe(done.get("recipe"), recipe):
        return done
    if not train_missing:
        return None
    if progress:
        print(f"== {path.stem}", flush=True)
    t, load = time.perf_counter(), _load1()
    ck = train(recipe, path.with_suffix(".pt"), progress=False)
    m = ck["metrics"]
    row = {**labels, "test_acc": m["test_acc"], "train_time_s": m["train_time_s"],
           "wall_s": round(time.perf_counter() - t, 1), "loadavg": [load, _load1()], "epochs": recipe.epochs,
           "history": m["history"], "init": ck.get("init"), "hardware": m["hardware"], **key}
    write_json(path, row)
    if progress:
        print(f"   test accuracy {m['test_acc']:.4f} ({m['train_time_s']:.0f} s)", flush=True)
    return row


def run_experiment(out_dir: str | Path, data_root: str | None = None, quick: bool = False,
                   progress: bool = True, serve_checkpoint: str | Path | None = None,
                   full: bool = False, train_missing: bool = True,
                   finetune_steps: int | None = None, pretrain_epochs: int | None = None) -> dict[str, Any]:
    """Trees, pretraining, every (shots, method, seed) fine-tuning run; writes results.json in out_dir.
    Each run records its wall time and the 1-minute load average before and after it. `train_missing` False:
    report what has finished, train nothing. `serve_checkpoint`: where to copy the model that is archived and
    served (layer4 + head, first seed, the most images per class that finished;
    archive_configs/fmnist-transfer-resnet50). `finetune_steps`: see experiment_config; a run stored with
    another step count (another recipe) is trained again, the pretraining is reused. `pretrain_epochs`: see
    experiment_config (a pretraining of another length replaces the one in out_dir)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = experiment_config(quick, full, finetune_steps, pretrain_epochs)
    t0 = time.perf_counter()
    trees = write_trees(out, cfg, data_root)
    base, wall = pretrain(out, cfg, trees["pretrain"], progress, train_missing)
    base_sha = sha256_of(out / "pretrain.pt")
    runs_dir = out / "runs"
    runs_dir.mkdir(exist_ok=True)
    runs = []
    fewest = min(cfg["shots"])  # the goal's cells first (every seed), then every cell once before the next seed
    order = [(fewest, s) for s in cfg["seeds"]] + [(k, s) for s in cfg["seeds"] for k in cfg["shots"] if k != fewest]
    for shots, seed in order:
        for method in sorted(cfg["methods"], key=lambda m: m not in ("layer4_head", "scratch")):  # goal pair first
            path = runs_dir / f"{shots}shot-{method}-seed{seed}.json"
            recipe = finetune_recipe(cfg, method, trees["finetune"][f"{shots}-{seed}"], shots, seed,
                                     str(out / "pretrain.pt"))
            row = fine_tune(recipe, path, base_sha, {"shots": shots, "method": method, "seed": seed},
                            train_missing, progress)
            if row:
                runs.append(row)
    pm = base["metrics"]
    results = {"config": cfg, "trees": trees, "pretrain": {"test_acc": pm["test_acc"], "history": pm["history"],
               "train_time_s": pm["train_time_s"], **wall}, "runs": runs,
               "hardware": hardware_name(torch.device("cpu")), "torch": torch.__version__,
               "wall_s_this_invocation": round(time.perf_counter() - t0, 1)}
    write_json(out / "results.json", results)
    finished = [r["shots"] for r in runs if r["method"] == "layer4_head" and r["seed"] == cfg["seeds"][0]]
    if serve_checkpoint and finished:
        best = runs_dir / f"{max(finished)}shot-layer4_head-seed{cfg['seeds'][0]}.pt"
        save_checkpoint(load_checkpoint(best), serve_checkpoint)
    return results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The small summary committed under docs/: mean, std and n of test accuracy per (shots, method)."""
    cells = {}
    for shots in results["config"]["shots"]:
        for method in results["config"]["methods"]:
            done = [r for r in results["runs"] if r["shots"] == shots and r["method"] == method]
            accs, times = [r["test_acc"] for r in done], [r["train_time_s"] for r in done]
            losses = [r["history"][-1]["train_loss"] for r in done]
            cells[f"{shots}/{method}"] = {
                "shots": shots, "method": method, "n": len(accs), "mean": statistics.fmean(accs) if accs else None,
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "accs": accs,
                "seeds": [r["seed"] for r in done], "train_time_s": statistics.fmean(times) if times else None,
                "final_train_loss": statistics.fmean(losses) if losses else None}
    cfg, pre, runs = results["config"], results["pretrain"], results["runs"]
    total_train = pre["train_time_s"] + sum(r["train_time_s"] for r in runs)
    loads = pre.get("loadavg", []) + [x for r in runs for x in r.get("loadavg", [])]
    return {"config": cfg, "hardware": results["hardware"], "torch": results["torch"],
            "pretrain_test_acc": pre["test_acc"], "pretrain_train_time_s": pre["train_time_s"],
            "train_time_s_total": total_train,
            "wall_s_total": pre.get("wall_s", 0.0) + sum(r.get("wall_s", 0.0) for r in runs),
            "loadavg_min": min(loads, default=None), "loadavg_max": max(loads, default=None),
            "runs_done": len(runs), "runs_planned": len(cfg["shots"]) * len(cfg["methods"]) * len(cfg["seeds"]),
            "test_images": results["trees"]["test_images"], "cells": cells,
            "train_loss_floor": loss_floor(runs[0]["recipe"]["label_smoothing"]) if runs else None}


def loss_floor(label_smoothing: float, classes: int = len(TARGET_CLASSES)) -> float:
    """The lowest training loss there is with label smoothing: the entropy of the smoothed target."""
    hit, miss = 1 - label_smoothing + label_smoothing / classes, label_smoothing / classes
    return -(hit * math.log(hit) + (classes - 1) * miss * math.log(miss)) if miss else 0.0


METHOD_NAMES = {"scratch": "from scratch", "linear_probe": "linear probe", "layer4_head": "layer4 + head",
                "full": "full fine-tuning"}
GOAL_POINTS = 10.0  # layer4 + head must beat from scratch by this many points at the fewest images per class


def verdict(summary: dict[str, Any]) -> str:
    """The goal's outcome, computed from the figures."""
    k = min(summary["config"]["shots"])
    if summary["cells"][f"{k}/layer4_head"]["n"] == 0 or summary["cells"][f"{k}/scratch"]["n"] == 0:
        return f"At {k} images per class the runs have not finished: the goal is not measured yet."
    tuned, scratch = summary["cells"][f"{k}/layer4_head"], summary["cells"][f"{k}/scratch"]
    gap = 100 * (tuned["mean"] - scratch["mean"])
    base = dict(zip(scratch["seeds"], scratch["accs"]))  # the same training images per seed: paired gaps
    paired = [100 * (acc - base[seed]) for seed, acc in zip(tuned["seeds"], tuned["accs"]) if seed in base]
    seeds = f"per seed: {', '.join(f'{g:+.1f}' for g in paired)}; " if len(paired) > 1 else ""
    short = sum(1 for g in paired if g < GOAL_POINTS) if len(paired) > 1 else 0
    met = f"**not met**, {GOAL_POINTS - gap:.1f} points short" if gap < GOAL_POINTS else (
        "**met**" if not short else f"**met** on the mean ({short} of {len(paired)} seeds short of it on their own)")
    verb = "beats" if gap >= 0 else "trails"
    return (f"At {k} images per class, layer4 + head {verb} from scratch by {abs(gap):.1f} points "
            f"({seeds}goal: >= {GOAL_POINTS:.0f}): {met}.")


def markdown(summary: dict[str, Any]) -> str:
    """The figures block of docs/training.md, generated from docs/transfer.json."""
    cfg, cells = summary["config"], summary["cells"]
    n = max(c["n"] for c in cells.values())

    def cell(c: dict[str, Any]) -> str:
        if not c["n"]:
            return "not run"
        spread = f" ± {100 * c['std']:.1f}" if c["n"] > 1 else ""  # one seed has no spread to show
        return f"{100 * c['mean']:.1f}{spread}" + (f" (n={c['n']})" if c["n"] < n else "")

    head = "| images per class | " + " | ".join(METHOD_NAMES[m] for m in cfg["methods"]) + " |"
    rows = [head, "|---" * (len(cfg["methods"]) + 1) + "|"]
    for k in cfg["shots"]:
        vals = [cells[f"{k}/{m}"] for m in cfg["methods"]]
        rows.append(f"| {k} | " + " | ".join(cell(c) for c in vals) + " |")
    most = max([k for k in cfg["shots"] if all(cells[f"{k}/{m}"]["n"] for m in cfg["methods"])]
               or [k for k in cfg["shots"] if any(cells[f"{k}/{m}"]["n"] for m in cfg["methods"])] or cfg["shots"])
    times = " / ".join(f"{c['train_time_s']:.0f}" if c["n"] else "not run"
                       for c in (cells[f"{most}/{m}"] for m in cfg["methods"]))
    done = summary["runs_done"], summary["runs_planned"]
    partial = [] if done[0] == done[1] else [f"{done[0]} of the {done[1]} planned runs have finished; "
                                             f"`{rerun_command(cfg)}` resumes the others.", ""]
    return "\n".join([
        f"Test accuracy (%) on the same {summary['test_images']} held-out test images (Fashion-MNIST test split, "
        f"classes 5-9), mean ± std over {n} seeds (each seed draws its own training images and initialises "
        "its own head):",
        "",
        *rows,
        "",
        *partial,
        verdict(summary),
        "",
        *fit_line(summary),
        f"Pretraining ({cfg['arch']} at width {cfg['width']}, {cfg['img_size']} px, {cfg['pretrain_epochs']} "
        f"epochs on {cfg['pretrain_per_class']} images per class of classes 0-4): "
        f"{100 * summary['pretrain_test_acc']:.1f} % test accuracy on those classes, "
        f"{summary['pretrain_train_time_s'] / 60:.1f} min of training. Training time of one fine-tuning run at "
        f"{most} images per class ({' / '.join(METHOD_NAMES[m] for m in cfg['methods'])}): "
        f"{times} s. All training together: {summary['train_time_s_total'] / 60:.0f} min of training loop, "
        f"{summary['wall_s_total'] / 60:.0f} min wall time with evaluation, on {summary['hardware']} "
        f"(torch {summary['torch']}) at the lowest priority beside other work: 1-minute load average "
        f"{summary['loadavg_min']}-{summary['loadavg_max']} at the runs' starts and ends. "
        "Figures: [transfer.json](transfer.json).",
        "",
        "![transfer learning curves](transfer.png)",
    ])


def rerun_command(cfg: dict[str, Any]) -> str:
    """The command that resumes (or repeats) the experiment of `cfg`."""
    name = cfg.get("profile", "default")
    cmd = "python -m training experiment-transfer" + ("" if name == "default" else f" --{name}")
    profile = experiment_config(quick=name == "quick", full=name == "full")
    for key in ("pretrain_epochs", "finetune_steps"):
        if cfg[key] != profile[key]:
            cmd += f" --{key.replace('_', '-')} {cfg[key]}"
    return cmd


def fit_line(summary: dict[str, Any]) -> list[str]:
    """How far the runs at the fewest images per class got on their own training images (their final
    training loss against the lowest there is): tells an underfit schedule from a weak backbone."""
    k, floor = min(summary["config"]["shots"]), summary.get("train_loss_floor")
    cells = [summary["cells"][f"{k}/{m}"] for m in summary["config"]["methods"]]
    if floor is None or not all(c.get("final_train_loss") is not None for c in cells):
        return []
    names = " / ".join(METHOD_NAMES[m] for m in summary["config"]["methods"])
    losses = " / ".join(f"{c['final_train_loss']:.2f}" for c in cells)
    gap = min(c["final_train_loss"] for c in cells) - floor
    state = ("every method ends well above it: the schedule stops before the runs fit their own training images"
             if gap > 0.25 else "the runs fit their training images")
    return [f"Final training loss at {k} images per class ({names}, mean over seeds): {losses}; with label "
            f"smoothing the lowest possible is {floor:.2f}, so {state}.", ""]


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, cells = summary["config"], summary["cells"]
    n = max(c["n"] for c in cells.values())
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in cfg["methods"]:  # cells every seed has finished (the table also shows the others)
        ks = [k for k in cfg["shots"] if cells[f"{k}/{m}"]["n"] == n]
        ys = [100 * cells[f"{k}/{m}"]["mean"] for k in ks]
        errs = [100 * cells[f"{k}/{m}"]["std"] for k in ks]
        ax.errorbar(ks, ys, yerr=errs, marker="o", capsize=3, label=METHOD_NAMES[m],
                    linestyle="--" if m == "scratch" else "-")
    ax.set(xscale="log", xlabel="training images per class", ylabel="test accuracy (%)",
           title="Fine-tuning on Fashion-MNIST classes 5-9 after pretraining on 0-4")
    ax.set_xticks(cfg["shots"], [str(k) for k in cfg["shots"]])
    ax.minorticks_off()
    ax.set_xlim(min(cfg["shots"]) * 0.85, max(cfg["shots"]) * 1.15)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_docs(summary: dict[str, Any], docs_dir: str | Path) -> None:
    """docs/transfer.json (the figures), docs/transfer.png and the figures block in docs/training.md."""
    from training.docblock import write_doc_block

    docs = Path(docs_dir)
    write_json(docs / "transfer.json", summary)
    plot(summary, docs / "transfer.png")
    write_doc_block(docs / "training.md", "transfer-figures", markdown(summary))
