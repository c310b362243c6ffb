"""The transfer experiment's pipeline at a tiny scale (trees, pretraining, the four fine-tuning methods,
resuming, the generated figures), and a fine-tuned checkpoint served through the archive and the handler's
pipeline like any other."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from tests.datagen import write_fashion_mnist
from tests.torchserve import tiny_archive
from training.checkpoint import build_model, load_checkpoint, save_checkpoint
from training.cli import main
from training.commands import train_args
from training.presets import eval_batch
from training.transfer import (
    METHODS,
    experiment_config,
    finetune_recipe,
    markdown,
    pretrain,
    pretrain_recipe,
    rerun_command,
    run_experiment,
    summarize,
    verdict,
    write_docs,
)

TARGET = ["ankle-boot", "bag", "sandal", "shirt", "sneaker"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transfer")
    fm = write_fashion_mnist(tmp / "fm", n_train=400, n_test=60)
    return tmp, fm, run_experiment(tmp / "exp", data_root=str(fm), quick=True, progress=False,
                                   serve_checkpoint=tmp / "served.pt")


def test_quick_experiment_runs_every_method_resumes_and_writes_its_figures(quick, tmp_path, capsys):
    _, fm, results = quick
    out = Path(results["trees"]["pretrain"]).parent
    tree = Path(results["trees"]["finetune"]["2-0"])
    assert sorted(p.name for p in (tree / "train").iterdir()) == TARGET
    assert [len(list((tree / "train" / c).iterdir())) for c in TARGET] == [2] * 5
    assert sorted(p.name for p in (Path(results["trees"]["pretrain"]) / "train").iterdir()) == \
        ["coat", "dress", "pullover", "t-shirt-top", "trouser"]
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == set(METHODS)
    assert runs["scratch"]["init"] is None
    assert runs["layer4_head"]["init"]["head"] == "new" and runs["full"]["init"]["source"] == str(out / "pretrain.pt")

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    again = run_experiment(out, data_root=str(fm), quick=True, progress=False)  # everything is reused
    assert again["runs"] == results["runs"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == stamps

    summary = summarize(results)
    assert summary["cells"]["2/layer4_head"]["n"] == 1
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "training.md").write_text("# T\n<!-- transfer-figures:begin -->\nold\n<!-- transfer-figures:end -->\n")
    write_docs(summary, docs)
    page = (docs / "training.md").read_text()
    assert "old" not in page and markdown(summary) in page
    assert "from scratch by" in page and "layer4 + head" in page and (docs / "transfer.png").stat().st_size > 1000
    assert summary["runs_done"] == summary["runs_planned"] == 4 and summary["wall_s_total"] > 0
    assert summary["loadavg_max"] >= summary["loadavg_min"] >= 0

    # Reporting what has finished: a run that is missing shows as not run, and no verdict is made without it.
    (out / "runs" / "2shot-scratch-seed0.json").unlink()
    part = summarize(run_experiment(out, data_root=str(fm), quick=True, progress=False, train_missing=False))
    assert part["runs_done"] == 3 and part["cells"]["2/scratch"]["n"] == 0
    md = markdown(part)
    assert "| not run |" in md and "3 of the 4 planned runs have finished" in md
    assert "`python -m training experiment-transfer --quick` resumes the others" in md
    assert "the goal is not measured yet" in md and "from scratch by" not in md
    write_docs(part, docs)  # the plot leaves the missing point out
    args = ["experiment-transfer", "--quick", "--out-dir", str(out), "--data-root", str(fm), "--report-only"]
    assert main(args) == 0
    assert "2 images/class  scratch       not run (n=0)" in capsys.readouterr().out


def test_pretraining_stored_before_a_recipe_key_existed_is_reused_and_another_configuration_is_not(quick, tmp_path):
    _, _, results = quick
    cfg, tree = experiment_config(quick=True), results["trees"]["pretrain"]
    state = load_checkpoint(Path(tree).parent / "pretrain.pt")
    del state["recipe"]["qat"]  # written before Recipe had the key: the default is what that run did
    save_checkpoint(state, tmp_path / "pretrain.pt")
    reused, _ = pretrain(tmp_path, cfg, tree, progress=False, train_missing=False)
    assert reused["epoch"] == cfg["pretrain_epochs"]
    for key, value in (("lr", 2 * state["recipe"]["lr"]), ("no_such_key", 1)):
        save_checkpoint({**state, "recipe": {**state["recipe"], key: value}}, tmp_path / "pretrain.pt")
        with pytest.raises(FileNotFoundError, match="has not finished"):
            pretrain(tmp_path, cfg, tree, progress=False, train_missing=False)


def test_finetune_steps_from_the_command_line_retrains_the_fine_tuning_and_reuses_the_pretraining(quick, tmp_path,
                                                                                                    capsys):
    _, fm, results = quick
    out = tmp_path / "exp"
    shutil.copytree(Path(results["trees"]["pretrain"]).parent, out)  # its trees.json points at the same trees
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    pretrained = (out / "pretrain.pt").stat().st_mtime_ns
    assert results["config"]["finetune_steps"] == 2 and {r["epochs"] for r in results["runs"]} == {1}

    args = ["experiment-transfer", "--quick", "--out-dir", str(out), "--data-root", str(fm), "--finetune-steps", "4"]
    assert main(args) == 0
    stored = json.loads((out / "results.json").read_text())
    assert stored["config"]["finetune_steps"] == 4
    assert json.loads((out / "summary.json").read_text())["config"]["finetune_steps"] == 4
    assert {r["epochs"] for r in stored["runs"]} == {2}  # 2 images x 5 classes / batch 4 = 2 steps per epoch
    after = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert len(after) == 4 and all(after[name] != before.get(name) for name in after)  # every run trained again
    assert (out / "pretrain.pt").stat().st_mtime_ns == pretrained  # the pretraining was reused

    assert main([*args[:-1], "0"]) == 2
    assert "finetune_steps must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("full", [False, True])
def test_pretraining_sees_the_preprocessing_and_augmentation_of_every_fine_tuning_run(full):
    cfg = experiment_config(full=full)
    pre = pretrain_recipe(cfg, "/trees/pretrain")
    same = ("arch", "model_args", "dataset", "img_size", "resize", "train_img_size", "interpolation", "background",
            "hflip", "crop_scale_min", "auto_augment", "color_jitter", "random_erasing", "label_smoothing",
            "mixup_alpha", "cutmix_alpha")
    for method in METHODS:
        tuned = finetune_recipe(cfg, method, "/trees/finetune", 10, 0, "/pretrain.pt")
        assert {k: getattr(tuned, k) for k in same} == {k: getattr(pre, k) for k in same}, method
    assert (pre.color_jitter, pre.random_erasing) == (0.0, 0.1)  # the shipped fine-tuning recipe's


def test_a_full_run_with_only_the_fewest_images_done_reports_the_goal_and_shows_the_rest_as_not_run():
    cfg = experiment_config(full=True)
    runs = [{"shots": 10, "method": m, "seed": s, "test_acc": 0.5 + 0.1 * (m == "layer4_head") + 0.01 * s,
             "train_time_s": 60.0, "wall_s": 70.0, "loadavg": [1.0, 2.0], "history": [{"train_loss": 0.8}],
             "recipe": {"label_smoothing": 0.1}} for s in cfg["seeds"] for m in METHODS]
    runs.append({**runs[0], "shots": 20, "test_acc": 0.7, "train_time_s": 90.0})  # the next row has begun
    results = {"config": cfg, "trees": {"test_images": 2000}, "runs": runs, "hardware": "CPU", "torch": "2",
               "pretrain": {"test_acc": 0.9, "train_time_s": 3000.0, "wall_s": 3100.0, "loadavg": [1.5]}}
    md = markdown(summarize(results))
    assert "| 10 | 51.0 ± 1.0 | 51.0 ± 1.0 | 61.0 ± 1.0 | 51.0 ± 1.0 |" in md
    assert "| 20 | 70.0 (n=1) | not run | not run | not run |" in md and "| 50 | not run |" in md
    assert "13 of the 36 planned runs have finished; `python -m training experiment-transfer --full` resumes" in md
    assert "layer4 + head beats from scratch by 10.0 points (per seed: +10.0, +10.0, +10.0" in md
    assert "4 epochs on 5000 images per class" in md and "one fine-tuning run at 10 images per class" in md
    assert "full fine-tuning): 60 / 60 / 60 / 60 s." in md  # the times of the row every method has finished


def test_the_full_profile_keeps_its_state_apart_from_the_default_one(monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    def stop(out_dir, **kwargs):
        seen.append((str(out_dir), kwargs["full"]))
        raise Stop  # where the state goes is all this test needs

    monkeypatch.setattr("training.transfer.run_experiment", stop)
    for args in (["--full"], [], ["--full", "--out-dir", "elsewhere"]):
        with pytest.raises(Stop):
            main(["experiment-transfer", *args])
    assert seen == [("reports/transfer-full", True), ("reports/transfer", False), ("elsewhere", True)]


def test_pretrain_epochs_from_the_command_line_pretrains_again_and_is_named_in_the_resume_command(quick, tmp_path,
                                                                                                 capsys):
    _, fm, results = quick
    out = tmp_path / "exp"
    shutil.copytree(Path(results["trees"]["pretrain"]).parent, out)
    args = ["experiment-transfer", "--quick", "--out-dir", str(out), "--data-root", str(fm), "--pretrain-epochs"]
    assert main([*args, "2"]) == 0
    assert load_checkpoint(out / "pretrain.pt")["epoch"] == 2
    stored = json.loads((out / "results.json").read_text())
    assert stored["config"]["pretrain_epochs"] == 2 and len(stored["pretrain"]["history"]) == 2
    new_base = {r["pretrain_sha256"] for r in stored["runs"]}  # every run fine-tuned the new pretraining
    assert len(new_base) == 1 and results["runs"][0]["pretrain_sha256"] not in new_base
    assert rerun_command({**experiment_config(full=True), "pretrain_epochs": 12}) == \
        "python -m training experiment-transfer --full --pretrain-epochs 12"
    assert main([*args, "0"]) == 2
    assert "pretrain_epochs must be at least 1, got 0" in capsys.readouterr().err


def test_the_verdict_pairs_the_seeds_and_says_how_far_the_gap_is_from_the_goal():
    cells = {"10/layer4_head": {"n": 2, "mean": 0.56, "accs": [0.52, 0.60], "seeds": [0, 1]},
             "10/scratch": {"n": 2, "mean": 0.50, "accs": [0.49, 0.51], "seeds": [0, 1]}}
    summary = {"config": {"shots": [10, 20]}, "cells": cells}
    assert verdict(summary) == ("At 10 images per class, layer4 + head beats from scratch by 6.0 points "
                                "(per seed: +3.0, +9.0; goal: >= 10): **not met**, 4.0 points short.")
    cells["10/layer4_head"].update(mean=0.62, accs=[0.64, 0.60], seeds=[1, 0])  # paired by seed, not by order
    assert verdict(summary).endswith("beats from scratch by 12.0 points (per seed: +13.0, +11.0; goal: >= 10): "
                                     "**met**.")
    cells["10/layer4_head"].update(mean=0.61, accs=[0.58, 0.64], seeds=[0, 1])
    assert verdict(summary).endswith("(per seed: +9.0, +13.0; goal: >= 10): **met** on the mean (1 of 2 seeds short "
                                     "of it on their own).")
    cells["10/layer4_head"].update(mean=0.43, accs=[0.40, 0.46], seeds=[0, 1])  # below from scratch: "trails"
    assert verdict(summary) == ("At 10 images per class, layer4 + head trails from scratch by 7.0 points "
                                "(per seed: -9.0, -5.0; goal: >= 10): **not met**, 17.0 points short.")
    cells["10/scratch"].update(n=1, mean=0.49, accs=[0.49], seeds=[0])
    assert "per seed" not in verdict(summary)


def test_a_fine_tuned_checkpoint_archives_and_serves_like_any_other(quick, tmp_path):
    tmp, _, results = quick
    ckpt_path = tmp / "served.pt"  # a copy of the layer4 + head run with the most images per class
    assert load_checkpoint(ckpt_path)["init"]["source"].endswith("pretrain.pt")
    entry = tiny_archive(tmp_path / "store", tmp_path / "configs", "fmnist-transfer", "1.0", ckpt_path)
    assert entry["arch"] == "resnet50" and (tmp_path / "store" / "fmnist-transfer-1.0.mar").is_file()

    from handlers.image import ImagePipeline

    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["preprocess"]["channels"] == 3 and ckpt["classes"] == TARGET
    png = sorted((Path(results["trees"]["finetune"]["2-0"]) / "test" / "bag").iterdir())[0].read_bytes()
    status, body = ImagePipeline.from_file(ckpt_path, topk=1).handle_requests([{"body": png}])[0]
    # What `python -m training eval` computes for the same file: decode as the loader does, then eval_batch.
    x = pil_to_tensor(Image.open(io.BytesIO(png)).convert("RGB"))
    with torch.no_grad():
        probs = build_model(ckpt)(eval_batch([x], ckpt["preprocess"])).softmax(1)[0]
    assert status == 200
    [top] = body["predictions"]
    assert top["label"] == TARGET[int(probs.argmax())] and abs(top["probability"] - float(probs.max())) < 1e-4


def test_the_served_checkpoints_hint_names_the_experiment():
    """archive --all skips a config whose checkpoint is missing and says what writes it."""
    from serving.config import load_config

    root = Path(__file__).resolve().parents[1]
    ckpt = load_config(root / "archive_configs/fmnist-transfer-resnet50/1.0.yaml").checkpoint
    assert train_args(ckpt) == "training experiment-transfer --checkpoint-out checkpoints/resnet50-fmnist-transfer.pt"


def test_the_docs_figures_are_generated_from_the_committed_summary():
    docs = Path(__file__).resolve().parents[1] / "docs"
    page = (docs / "training.md").read_text()
    block = page.split("<!-- transfer-figures:begin -->\n")[1].split("\n<!-- transfer-figures:end -->")[0]
    if not (docs / "transfer.json").is_file():
        assert block.startswith("Not measured yet")
        return
    assert block == markdown(json.loads((docs / "transfer.json").read_text()))
    assert (docs / "transfer.png").is_file()
