"""The transfer experiment's learning-rate grid: each method's setting is picked on the val images (never the
test images), the experiment's own runs are reused as the default setting, the others are resumable under
names of their own, and the docs block is generated from the committed figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.datagen import write_fashion_mnist
from training.cli import main
from training.transfer import experiment_config, run_experiment
from training.transfer_lr import GRID, markdown_grid, picked_verdict, run_grid, summarize_grid


def _run(method: str, value: float, seed: int, val: float, test: float) -> dict:
    return {"method": method, "value": value, "seed": seed, "test_acc": test, "train_time_s": 1.0,
            "history": [{"val_acc": 0.0}, {"val_acc": val}], "loadavg": [1.0, 1.0]}


def _grid(runs: list[dict]) -> dict:
    cfg = {**experiment_config(full=True), "seeds": [0, 1]}
    return {"config": cfg, "grid": {m: [k, list(v)] for m, (k, v) in GRID.items()}, "shots": 10, "runs": runs,
            "test_images": 2000, "val_images": 50, "hardware": "CPU"}


def test_the_pick_is_the_best_final_val_accuracy_not_the_best_test_accuracy():
    runs = [_run(m, GRID[m][1][0], s, 0.6, 0.6) for m in GRID for s in (0, 1)]  # every default setting
    runs += [_run("layer4_head", 0.3, s, 0.7, 0.5) for s in (0, 1)]  # best on val, worst on test
    runs += [_run("layer4_head", 1.0, s, 0.5, 0.9) for s in (0, 1)]  # best on test, worst on val
    runs += [_run("full", 0.3, s, 0.6, 0.9) for s in (0, 1)]  # a tie on val with the default: the default stays
    runs += [_run("scratch", 0.1, 0, 0.9, 0.9)]  # one seed of two: not a candidate yet
    summary = summarize_grid(_grid(runs))
    assert summary["picked"] == {"layer4_head": 0.3, "full": 0.1, "scratch": 0.05, "linear_probe": 0.05}
    # The verdict scores the picks on test: layer4 + head 50 % against from scratch 60 %.
    assert picked_verdict(summary).startswith("At 10 images per class, layer4 + head trails from scratch by 10.0")
    md = markdown_grid(summary)
    assert "| layer4 + head | backbone_lr_factor 0.3 | 70.0 | 50.0 ± 0.0 | 50.0, 50.0 | so far |" in md  # 3.0 to run
    assert "| from scratch | head_lr 0.1 | 90.0 (n=1) | 90.0 (n=1) | 90.0 |  |" in md
    assert "15 of the 40 planned runs have finished" in md
    # The default of full fine-tuning is the lowest of its grid; the others' picks lie inside theirs.
    assert "Picked at the edge of its grid, so a setting beyond it may do better still: full fine-tuning " \
        "(backbone_lr_factor 0.1)." in md
    assert "`python -m training experiment-transfer --full --lr-grid` resumes the others" in md

    # Val accuracy is read at the end of training (the weights scored on test), not at its best epoch.
    late = [{**r, "history": [{"val_acc": 1.0}, *r["history"]]} if r["value"] == 1.0 else r for r in runs]
    assert summarize_grid(_grid(late))["picked"]["layer4_head"] == 0.3


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transfer-lr")
    fm = write_fashion_mnist(tmp / "fm", n_train=400, n_test=60)
    run_experiment(tmp / "exp", data_root=str(fm), quick=True, progress=False)
    return tmp / "exp", fm


def test_the_grid_reuses_the_experiments_runs_names_its_own_and_resumes(quick, tmp_path, capsys):
    out, fm = quick
    own = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    grid = run_grid(out, data_root=str(fm), quick=True, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == own  # the defaults were reused
    names = sorted(p.name for p in (out / "runs" / "lr-grid").glob("*.json"))
    assert names == ["2shot-full-backbone_lr_factor0.3-seed0.json", "2shot-full-backbone_lr_factor1-seed0.json",
                     "2shot-full-backbone_lr_factor10-seed0.json", "2shot-full-backbone_lr_factor3-seed0.json",
                     "2shot-layer4_head-backbone_lr_factor0.3-seed0.json",
                     "2shot-layer4_head-backbone_lr_factor1-seed0.json",
                     "2shot-layer4_head-backbone_lr_factor10-seed0.json",
                     "2shot-layer4_head-backbone_lr_factor3-seed0.json", "2shot-linear_probe-head_lr0.02-seed0.json",
                     "2shot-linear_probe-head_lr0.1-seed0.json", "2shot-linear_probe-head_lr0.3-seed0.json",
                     "2shot-linear_probe-head_lr1-seed0.json",
                     "2shot-scratch-head_lr0.02-seed0.json", "2shot-scratch-head_lr0.1-seed0.json",
                     "2shot-scratch-head_lr0.2-seed0.json", "2shot-scratch-head_lr0.5-seed0.json"]
    by = {(r["method"], r["value"]): r["recipe"] for r in grid["runs"]}
    assert by[("layer4_head", 1.0)]["backbone_lr_factor"] == 1.0 and by[("layer4_head", 1.0)]["lr"] == 0.05
    assert by[("scratch", 0.1)]["lr"] == 0.1 and by[("scratch", 0.1)]["init_from"] is None
    assert len(grid["runs"]) == 20

    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.pt")}
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "training.md").write_text("# T\n<!-- transfer-lr:begin -->\nold\n<!-- transfer-lr:end -->\n")
    args = ["experiment-transfer", "--quick", "--lr-grid", "--out-dir", str(out), "--data-root", str(fm)]
    assert main([*args, "--docs", str(docs)]) == 0  # everything is reused
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.pt")} == stamps
    summary = json.loads((docs / "transfer-lr.json").read_text())
    assert set(summary["picked"]) == set(GRID) and summary["runs_done"] == summary["runs_planned"] == 20
    page = (docs / "training.md").read_text()
    assert "old" not in page and markdown_grid(summary) in page
    assert "Picked settings: At 2 images" in page  # every run has finished: not "so far"
    assert "Picked settings" in capsys.readouterr().out


def test_the_docs_lr_grid_figures_are_generated_from_the_committed_summary():
    docs = Path(__file__).resolve().parents[1] / "docs"
    page = (docs / "training.md").read_text()
    block = page.split("<!-- transfer-lr:begin -->\n")[1].split("\n<!-- transfer-lr:end -->")[0]
    assert block == markdown_grid(json.loads((docs / "transfer-lr.json").read_text()))
