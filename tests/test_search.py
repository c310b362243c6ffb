"""The latency-aware architecture search: two trials end to end on tiny settings, the Pareto front, the recipe it
writes, resuming, and the impossible latency cap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from handlers.image import ImagePipeline
from tests.torchserve import gray_png
from training.recipe import load_recipe
from training.search import SearchError, Settings, pareto_front, run_search
from training.train import train

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")


def test_the_front_keeps_what_nothing_beats_on_both_objectives():
    trials = [{"number": i, "val_acc": acc, "cpu_ms": ms, "feasible": ok}
              for i, (acc, ms, ok) in enumerate([(0.80, 1.0, True), (0.85, 2.0, True), (0.84, 3.0, True),
                                                 (0.90, 9.0, False), (0.85, 2.5, True), (0.86, 4.0, True)])]
    assert [t["number"] for t in pareto_front(trials)] == [0, 1, 5]  # 2 and 4 are beaten by 1; 3 is over the cap


@needs_fmnist
def test_two_trials_end_to_end_write_a_front_a_png_and_a_recipe_that_trains(tmp_path):
    s = Settings(trials=2, timeout_s=600, latency_cap_ms=1000.0, limit=64, epochs=1, families=("cnn", "vit"),
                 startup=2, reps=1)
    summary = run_search(s, tmp_path / "search", docs=tmp_path / "docs", recipe_path=tmp_path / "found.yaml")
    trials = json.loads((tmp_path / "search" / "trials.json").read_text())
    assert len(trials) == 2 and all(t["feasible"] and 0 <= t["val_acc"] <= 1 and t["cpu_ms"] > 0 for t in trials)
    assert summary["chosen"] in summary["front"] and summary["chosen"]["arch"] in ("simple_cnn", "vit_tiny")
    assert json.loads((tmp_path / "docs" / "efficiency" / "search.json").read_text())["chosen"] == summary["chosen"]
    assert (tmp_path / "docs" / "efficiency" / "search_pareto.png").stat().st_size > 10_000
    page = (tmp_path / "docs" / "efficiency.md").read_text()
    assert "<!-- search-front:begin -->" in page and "**chosen**" in page
    recipe = load_recipe(str(tmp_path / "found.yaml"))  # a recipe like any other, its evidence in the header
    assert (recipe.arch, recipe.model_args) == (summary["chosen"]["arch"], summary["chosen"]["model_args"])
    assert recipe.limit is None and "# Found by `make search`" in (tmp_path / "found.yaml").read_text()
    # it trains and serves like any other recipe (here for one short epoch)
    ckpt = train(load_recipe(str(tmp_path / "found.yaml"), {"limit": 64, "epochs": 1}), tmp_path / "found.pt",
                 progress=False)
    pipe = ImagePipeline(ckpt)
    answers = pipe.handle_requests([{"body": gray_png()}])
    assert answers[0][0] == 200 and len(answers[0][1]["predictions"]) == 5
    again = run_search(s, tmp_path / "search")  # resumed from its journal: the two trials are done
    assert again["trials"] == 2 and again["chosen"] == summary["chosen"]


def test_settings_refuse_unknown_families():
    with pytest.raises(SearchError, match="unknown family mlp; choose from cnn, resnet, vit"):
        Settings(families=("mlp",))


@needs_fmnist
def test_an_impossible_latency_cap_is_one_clear_cli_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "training", "search", "--latency-cap-ms", "0.001", "--out-dir",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "no architecture in the search space runs under 0.001 ms on this CPU: the fastest" in lines[0]
    assert "raise --latency-cap-ms" in lines[0]
    assert not (tmp_path / "trials.json").exists()


def test_knobs_proposed_again_are_found_and_not_rerun():
    import optuna

    from training.search import _done_before, suggest

    study = optuna.create_study(directions=["maximize", "minimize"])
    knobs = {"family": "cnn", "cnn_width": 8, "cnn_hidden": 32}
    for values in (knobs, knobs, knobs | {"cnn_width": 16}):
        study.enqueue_trial(values)
    first = study.ask()
    suggest(first, ("cnn",))
    assert _done_before(first) is None  # nothing finished yet
    first.set_user_attr("constraint", [-1.0])
    study.tell(first, (0.5, 0.2))
    again = study.ask()
    suggest(again, ("cnn",))
    assert again.params == knobs and _done_before(again).number == first.number
    other = study.ask()
    suggest(other, ("cnn",))
    assert other.params["cnn_width"] == 16 and _done_before(other) is None
