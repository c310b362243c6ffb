"""Resumable training runs for the experiments, and the files they write.

A `Run` trains one recipe through `training.train.train`, one epoch per call, and keeps a JSON record next to
its checkpoint: the per-epoch history, extra per-epoch metrics the experiment measures, the gradient-norm
records. The record names the checkpoint that matches it (`<name>-e<epoch>.pt`); the previous checkpoint is
deleted only after the record points at the new one, so a run killed at any moment resumes from a consistent
pair and redoes at most one epoch. A record made with another recipe is an error, never silently mixed in.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from handlers.artifacts import write_json
from training.docblock import write_doc_block
from training.gradnorm import GradNormRecorder
from training.recipe import Recipe
from training.train import train

# Recipe keys that change how fast a run goes or where its data lives, not what it computes.
NOT_RESULT_KEYS = ("data_root", "threads", "num_workers")


def result_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe keys that decide a run's results."""
    return {k: v for k, v in recipe.to_dict().items() if k not in NOT_RESULT_KEYS}


def environment() -> dict[str, Any]:
    """Software and machine facts recorded with every experiment's results."""
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "cuda": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None}


class Run:
    """One recipe trained in `folder` as `<name>.json` + `<name>-e<epoch>.pt`. `epoch_metrics(checkpoint)`
    adds measurements after each epoch; `gradnorm_every` > 0 records per-layer gradient norms."""

    def __init__(self, name: str, recipe: Recipe, folder: str | os.PathLike, *, gradnorm_every: int = 0,
                 epoch_metrics: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
        self.name, self.recipe, self.folder = name, recipe, Path(folder)
        self.gradnorm_every, self.epoch_metrics = gradnorm_every, epoch_metrics
        self.path = self.folder / f"{name}.json"

    def load(self) -> dict[str, Any] | None:
        """The run's record (None before its first epoch). Raises ValueError when it was made differently."""
        if not self.path.is_file():
            return None
        try:
            record = json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path} is not valid JSON ({e}); delete it to retrain {self.name}") from None
        old = {"gradnorm_every": record.get("gradnorm_every"), **record.get("recipe", {})}
        new = json.loads(json.dumps({"gradnorm_every": self.gradnorm_every, **result_recipe(self.recipe)}))
        # a recipe key added after the record was made counts as unchanged while it keeps its default
        defaults = json.loads(json.dumps(result_recipe(Recipe())))  # factory defaults ({} for data_args) too
        diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items()
                if old.get(k, defaults.get(k, old.get(k))) != v]
        if diff:
            raise ValueError(f"{self.path} was trained differently ({'; '.join(diff[:4])}); use another "
                             f"--out-dir or delete {self.folder} to start over")
        return record

    def epochs_done(self) -> int:
        record = self.load()
        return 0 if record is None else int(record["epochs_done"])

    def done(self) -> bool:
        return self.epochs_done() >= self.recipe.epochs

    def advance(self, until_epoch: int | None = None, progress: bool = True) -> dict[str, Any]:
        """Train up to `until_epoch` (default: the recipe's last), resuming where the record ends."""
        until = min(until_epoch or self.recipe.epochs, self.recipe.epochs)
        record = self.load() or {
            "name": self.name, "recipe": result_recipe(self.recipe), "gradnorm_every": self.gradnorm_every,
            "epochs_done": 0, "steps": 0, "checkpoint": None, "history": [], "epoch_metrics": [],
            "metrics": {}, "gradnorms": None, "wall_s": 0.0, "environment": environment()}
        recorder = GradNormRecorder(self.gradnorm_every) if self.gradnorm_every else None
        if recorder is not None and record["gradnorms"]:
            recorder.load_state_dict(record["gradnorms"], before_step=record["steps"])
        while record["epochs_done"] < until:
            epoch = record["epochs_done"] + 1
            previous = self.folder / record["checkpoint"] if record["checkpoint"] else None
            out = self.folder / f"{self.name}-e{epoch}.pt"
            if progress:
                print(f"== {self.name}: epoch {epoch}/{self.recipe.epochs}", file=sys.stderr, flush=True)
            start, cpu_start = time.perf_counter(), time.process_time()
            ckpt = train(self.recipe, out, resume=previous, progress=progress, stop_after_epoch=epoch,
                         after_backward=recorder)
            extra = self.epoch_metrics(ckpt) if self.epoch_metrics is not None else {}
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            m = ckpt["metrics"]
            record.update(epochs_done=epoch, steps=m["steps"], checkpoint=out.name, history=m["history"],
                          arch=ckpt["arch"], model_args=ckpt["model_args"],
                          metrics={k: v for k, v in m.items() if k != "history"},
                          wall_s=record["wall_s"] + wall)
            # CPU time is what the epoch cost whatever else ran; the load average says how shared the machine was
            record["epoch_metrics"].append({"epoch": epoch, **extra, "cpu_s": cpu, "wall_s": wall,
                                            "load_avg_1m": os.getloadavg()[0]})
            if recorder is not None:
                record["gradnorms"] = recorder.state_dict()
            write_json(self.path, record)
            if previous is not None and previous != out:
                previous.unlink(missing_ok=True)
        return record


def publish(summary: dict[str, Any], out: Path, docs_dir: Path, images: list[str], text: str) -> None:
    """A finished experiment into the docs: its summary JSON and `images` (from `out`) to docs_dir/experiments/,
    `text` as its generated block in docs_dir/training.md."""
    name = summary["recipe_name"]
    if not summary.get("complete"):
        raise ValueError(f"not publishing {name} to the docs before it has finished: run the command again")
    target = docs_dir / "experiments"
    target.mkdir(parents=True, exist_ok=True)
    write_json(target / f"{name}.json", summary)
    for image in images:
        (target / image).write_bytes((out / image).read_bytes())
    write_doc_block(docs_dir / "training.md", name, text)


def usage(records: list[dict[str, Any]]) -> dict[str, Any]:
    """CPU seconds, wall seconds and the load average sampled after each epoch, over some runs' records."""
    epochs = [m for r in records for m in r["epoch_metrics"]]
    loads = [m["load_avg_1m"] for m in epochs if "load_avg_1m" in m]
    return {"cpu_s": sum(m.get("cpu_s", 0.0) for m in epochs), "wall_s": sum(r["wall_s"] for r in records),
            "load_avg_mean": statistics.fmean(loads) if loads else None, "load_avg_max": max(loads, default=None),
            "cpus": os.cpu_count()}


def usage_text(u: dict[str, Any]) -> str:
    """One sentence for the docs from `usage`."""
    text = f"{u['cpu_s'] / 3600:.2f} CPU hours, {u['wall_s'] / 3600:.1f} h of wall time for all runs together"
    if u["load_avg_mean"] is not None:
        text += (f"; load average after each epoch {u['load_avg_mean']:.1f} on average, {u['load_avg_max']:.1f} at "
                 f"most, on {u['cpus']} cores")
        if u["load_avg_mean"] > 0.75 * u["cpus"]:
            text += " (a shared machine: wall times are upper bounds)"
    return text
