"""Commands for hints: an error that says "train it first" names the exact command, recipe and path filled in."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shown_path(path: str | os.PathLike) -> str:
    """`path` as typed in a command run from the project root: relative to it when inside it."""
    p = Path(path)
    try:
        return str(p.absolute().relative_to(ROOT))
    except ValueError:
        return str(p)


def python_command() -> str:
    """The interpreter to put in a command: the project's `.venv/bin/python` when that is what runs (as the
    README writes it), else `python`."""
    exe = Path(sys.executable)
    if exe.parent.parent.name == ".venv" and exe.parent.parent.parent.resolve() == ROOT.resolve():
        return ".venv/bin/python"
    return "python"


def project_command(args: str) -> str:
    """`<python> -m <args>` run from the project root (`cd <root> && ` first when the caller is elsewhere)."""
    cmd = f"{python_command()} -m {args}"
    return cmd if Path.cwd().resolve() == ROOT.resolve() else f"cd {ROOT} && {cmd}"


def recipe_for(arch: str, dataset: str) -> str | None:
    """The shipped recipe that trains `arch` on `dataset` (`default` first when several do)."""
    from training.recipe import RECIPES_DIR, RecipeError, load_recipe

    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    for name in sorted(names, key=lambda n: n != "default"):
        try:
            r = load_recipe(name)
        except RecipeError:
            continue
        if (r.arch, r.dataset) == (arch, dataset):
            return name
    return None


# Checkpoints an experiment writes (not one recipe's run): their name -> the command that writes them.
EXPERIMENT_CHECKPOINTS = {"resnet50-fmnist-transfer": "training experiment-transfer --checkpoint-out {path}"}


def train_args(checkpoint: str | os.PathLike) -> str:
    """`training ...` arguments that write `checkpoint`. Checkpoints are named <arch>-<dataset>.pt by
    default, which names the recipe; an experiment's checkpoint names its experiment; any other name gets the
    demo recipe."""
    if (experiment := EXPERIMENT_CHECKPOINTS.get(Path(checkpoint).stem)) is not None:
        return experiment.format(path=shown_path(checkpoint))
    arch, _, dataset = Path(checkpoint).stem.partition("-")
    recipe = recipe_for(arch, dataset) or "default"
    return f"training train --recipe {recipe} --out {shown_path(checkpoint)}"


def train_command(checkpoint: str | os.PathLike) -> str:
    """The command that writes `checkpoint` (see train_args)."""
    return project_command(train_args(checkpoint))
