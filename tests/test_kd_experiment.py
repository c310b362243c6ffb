"""The distillation experiment (training/kd_experiment.py): its runs' recipes, the table and the verdict generated
from the figures, and the table of every ViT schedule."""

from __future__ import annotations

import pytest

from handlers.artifacts import write_json


def _run(arch: str, acc: float, epochs: int, distilled: str = "") -> dict:
    return {"arch": arch, "model_args": {}, "test_acc": acc, "val_acc": acc, "params": 1000,
            "train_time_s": 60.0 * epochs, "epochs": epochs, "recipe": {"threads": 1},
            "history": [{"val_acc": acc}] * epochs,
            "distillation": {"mode": distilled, "teacher_time_s": 6.0 * epochs, "teacher_label_agreement": 0.8125}
            if distilled else None}


def test_vit_epochs_train_both_vits_longer_beside_the_profiles_other_runs(tmp_path):
    from training.kd_experiment import PROFILES, recipes, run_path, sizes

    plan = recipes(tmp_path, "quick", threads=1, vit_epochs=12)
    assert plan["vit_tiny"].epochs == plan["vit_tiny_distilled"].epochs == plan["vit_tiny-kd"].epochs == 12
    assert plan["lenet5"].epochs == PROFILES["quick"]["cnn_epochs"]
    assert plan["vit_tiny_distilled"].teacher == str(tmp_path / "quick" / "resnet18-teacher.pt")
    assert run_path(tmp_path, "quick", "vit_tiny_distilled", 12).name == "vit_tiny_distilled-12ep.pt"
    assert run_path(tmp_path, "quick", "vit_tiny-kd", 12).name == "vit_tiny-kd-12ep.pt"
    assert run_path(tmp_path, "quick", "lenet5", 12).name == "lenet5.pt"
    default = PROFILES["quick"]["vit_epochs"]
    assert run_path(tmp_path, "quick", "vit_tiny", default).name == "vit_tiny.pt"  # the profile's own run
    assert sizes("quick", 12)["vit_epochs"] == 12 and PROFILES["quick"]["vit_epochs"] == default
    with pytest.raises(ValueError, match="vit_epochs must be at least 1"):
        sizes("quick", 0)



def test_teacher_epochs_train_a_longer_teacher_that_only_the_distilled_runs_learn_from(tmp_path):
    from training.kd_experiment import PROFILES, recipes, run_path, sizes, summarise, summary_file

    plan = recipes(tmp_path, "quick", threads=1, vit_epochs=12, teacher_epochs=40)
    teacher = tmp_path / "quick" / "resnet18-teacher-40ep.pt"
    assert plan["teacher"].epochs == 40 and run_path(tmp_path, "quick", "teacher", 12, 40) == teacher
    assert plan["vit_tiny-kd"].teacher == plan["lenet5-kd"].teacher == str(teacher)
    assert run_path(tmp_path, "quick", "vit_tiny-kd", 12, 40).name == "vit_tiny-kd-12ep-teacher40ep.pt"
    assert run_path(tmp_path, "quick", "lenet5-kd", 12, 40).name == "lenet5-kd-teacher40ep.pt"
    # the students alone do not depend on the teacher: the runs already trained are reused
    assert run_path(tmp_path, "quick", "vit_tiny", 12, 40).name == "vit_tiny-12ep.pt"
    assert run_path(tmp_path, "quick", "lenet5", 12, 40).name == "lenet5.pt"
    own = PROFILES["quick"]["teacher_epochs"]
    assert run_path(tmp_path, "quick", "teacher", 12, own).name == "resnet18-teacher.pt"
    assert summary_file(summarise({}, "quick", vit_epochs=12, teacher_epochs=40)) == "kd-12ep-teacher40ep.json"
    assert summary_file(summarise({}, "quick", vit_epochs=12, teacher_epochs=own)) == "kd-12ep.json"
    with pytest.raises(ValueError, match="teacher_epochs must be at least 1"):
        sizes("quick", 12, 0)


def test_the_verdict_of_a_longer_teacher_names_its_epochs_and_its_command():
    from training.kd_experiment import kd_table, schedules_table, summarise

    raw = {"teacher": _run("resnet18", 0.86, 40), "vit_tiny": _run("vit_tiny", 0.80, 12),
           "vit_tiny-kd": _run("vit_tiny", 0.82, 12, distilled="soft")}
    summary = summarise(raw, "quick", vit_epochs=12, teacher_epochs=40)
    table = kd_table(summary)
    assert "the teacher 40 epochs (`--teacher-epochs`), the CNN students" in table
    assert "--profile quick --teacher-epochs 40 --threads 1 --vit-epochs 24 --only vit_tiny vit_tiny-kd" in table
    old = summarise({**raw, "teacher": _run("resnet18", 0.80, 8)}, "quick", vit_epochs=12)
    rows = schedules_table([old, summary])
    assert "| `quick` | 12 (192) | 80.00 (8) | 80.00 | 82.00 |" in rows
    assert "| `quick` | 12 (192) | 86.00 (40) | 80.00 | 82.00 |" in rows
    assert "[kd-12ep-teacher40ep.json](efficiency/kd-12ep-teacher40ep.json)" in rows
    assert rows.count("80.00 % after 12 epochs") == 1  # the student alone once, however many teachers

def test_vit_tiny_learns_soft_targets_like_the_cnn_students_with_the_same_recipe_as_alone(tmp_path):
    from training.kd_experiment import recipes

    plan = recipes(tmp_path, "quick", threads=1, vit_epochs=12)
    soft, alone, cnn = plan["vit_tiny-kd"], plan["vit_tiny"], plan["lenet5-kd"]
    assert (soft.arch, soft.distill) == ("vit_tiny", "soft")  # no distillation token
    assert (soft.kd_alpha, soft.kd_temperature) == (cnn.kd_alpha, cnn.kd_temperature)
    assert soft.teacher == plan["vit_tiny_distilled"].teacher == str(tmp_path / "quick" / "resnet18-teacher.pt")
    kd_fields = ("teacher", "distill", "kd_alpha", "kd_temperature")
    assert {k: v for k, v in soft.to_dict().items() if k not in kd_fields} == {
        k: v for k, v in alone.to_dict().items() if k not in kd_fields}


def test_the_kd_verdict_is_generated_from_the_figures():
    from training.kd_experiment import kd_table, summarise

    raw = {"teacher": _run("resnet18", 0.80, 8), "vit_tiny": _run("vit_tiny", 0.70, 12),
           "vit_tiny_distilled": _run("vit_tiny_distilled", 0.72, 12, distilled="hard")}
    summary = summarise(raw, "quick", vit_epochs=12)
    row = next(r for r in summary["students"] if r["run"] == "vit_tiny_distilled")
    assert (row["gap_pt"], row["gain_pt"], row["gap_closed"]) == (10.0, 2.0, 0.2)
    assert summary["size"]["vit_epochs"] == 12 and summary["vit_epochs_option"] == 12
    table = kd_table(summary)
    assert "the ViTs 12 (`--vit-epochs`, every ViT run)" in table
    assert "| ViT-Tiny/7 | 0.00 M | 70.00 |  | soft targets, T = 4 | | | | distilled run not run yet |" in table
    assert "(soft targets, T = 4, `vit_tiny-kd`) has not run: it does not count towards the goal" in table
    assert ("(distillation token, hard labels, `vit_tiny_distilled`: 72.00 %, alone 70.00 %) closes 20 % of its "
            "10.00-point gap to the teacher: short of the goal (≥ 50 %) by 3.00 points") in table
    # sqrt((0.7 * 0.3 + 0.72 * 0.28) / 2000) = 1.43 points
    assert row["gain_se_pt"] == 1.43 and "standard error is about 1.43 points (2,000 test images" in table
    assert "60 s per epoch on 1 thread(s), 10 % of it in the teacher" in table
    assert "The teacher's top-1 was the true label on 81.2 % of the training views" in table
    assert 'KD_ARGS="--profile quick --threads 1 --vit-epochs 24 --only vit_tiny vit_tiny_distilled"' in table
    assert "the student alone's peaked at 70.0 % in epoch 1 and ended at 70.0 %" in table
    unfinished = {"vit_tiny_distilled": {"epochs_done": 3, "epochs": 12, "val_acc": [0.5, 0.6, 0.65]}}
    waiting = kd_table(summarise({k: raw[k] for k in ("teacher", "vit_tiny")}, "quick", unfinished, 12))
    assert ("(distillation token, hard labels, `vit_tiny_distilled`) did not finish (3 of 12 epochs ran), so it does "
            "not count towards the goal. At epoch 3 of the same schedule, on the validation split: distilled 65.00 %, "
            "alone 70.00 % (-5.00 points)") in waiting
    assert "No distilled ViT has finished: the goal is not measured." in waiting
    raw["vit_tiny_distilled"]["test_acc"] = 0.69
    assert ("ends 1.00 points below the student alone, closing none of its 10.00-point gap to the teacher: short "
            "of the goal (≥ 50 %) by 6.00 points") in kd_table(summarise(raw, "quick", vit_epochs=12))
    raw["vit_tiny_distilled"]["test_acc"] = 0.76
    assert "closes 60 % of its 10.00-point gap to the teacher: the goal (≥ 50 %) is met." in kd_table(
        summarise(raw, "quick", vit_epochs=12))


def test_the_kd_verdict_takes_the_best_distilled_vit_and_shows_the_other():
    from training.kd_experiment import kd_table, summarise

    raw = {"teacher": _run("resnet18", 0.80, 8), "vit_tiny": _run("vit_tiny", 0.70, 12),
           "vit_tiny-kd": _run("vit_tiny", 0.76, 12, distilled="soft"),
           "vit_tiny_distilled": _run("vit_tiny_distilled", 0.69, 12, distilled="hard")}
    summary = summarise(raw, "quick", vit_epochs=12)
    vit = [r for r in summary["students"] if r["student"].startswith("ViT")]
    assert [(r["run"], r["mode"], r.get("gain_pt")) for r in vit] == [
        ("vit_tiny-kd", "soft", 6.0), ("vit_tiny_distilled", "hard", -1.0), ("vit_tiny-fm", "soft", None),
        ("vit_tiny-kd-unlabeled", "soft", None), ("vit_tiny_distilled-unlabeled", "hard", None)]
    table = kd_table(summary)
    assert ("The best distilled ViT-Tiny/7 (soft targets, T = 4, `vit_tiny-kd`: 76.00 %, alone 70.00 %) closes 60 % "
            "of its 10.00-point gap to the teacher: the goal (≥ 50 %) is met.") in table
    # sqrt((0.7 * 0.3 + 0.76 * 0.24) / 2000) = 1.40 points; sqrt((0.7 * 0.3 + 0.69 * 0.31) / 2000) = 1.46 points
    assert "Its gain's standard error is about 1.40 points (2,000 test images per accuracy)" in table
    assert ("The other way, distillation token, hard labels (`vit_tiny_distilled`): 69.00 %, -1.00 points (gap "
            "closed -10 %, standard error about 1.46 points).") in table
    assert "| 70.00 | 76.00 | soft targets, T = 4 | +6.00 |" in table
    assert "| 70.00 | 69.00 | distillation token, hard labels | -1.00 |" in table
    raw["vit_tiny-kd"]["test_acc"] = 0.71  # now the hard labels lead: the verdict follows the figures
    table = kd_table(summarise(raw, "quick", vit_epochs=12))
    assert ("The best distilled ViT-Tiny/7 (soft targets, T = 4, `vit_tiny-kd`: 71.00 %, alone 70.00 %) closes 10 % "
            "of its 10.00-point gap to the teacher: short of the goal (≥ 50 %) by 4.00 points") in table
    raw["vit_tiny_distilled"]["test_acc"] = 0.73
    table = kd_table(summarise(raw, "quick", vit_epochs=12))
    assert "The best distilled ViT-Tiny/7 (distillation token, hard labels, `vit_tiny_distilled`: 73.00 %" in table
    assert "The other way, soft targets, T = 4 (`vit_tiny-kd`): 71.00 %, +1.00 points (gap closed 10 %" in table
    assert "--vit-epochs 24 --only vit_tiny vit_tiny_distilled\"` (about 0.8 h of training at that speed)" in table


def test_cli_refuses_zero_vit_epochs_in_one_line(tmp_path, capsys):
    from training.cli import main

    code = main(["experiment-kd", "--profile", "quick", "--vit-epochs", "0", "--report-only",
                 "--checkpoints", str(tmp_path), "--reports", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "error: vit_epochs must be at least 1, got 0"


def test_function_matching_is_the_alone_recipe_with_mixup_and_the_teacher_only(tmp_path):
    from training.kd_experiment import how, recipes, run_path

    plan = recipes(tmp_path, "quick", threads=1, vit_epochs=12)
    fm, alone = plan["vit_tiny-fm"], plan["vit_tiny"]
    assert (fm.arch, fm.distill, fm.kd_alpha, fm.kd_temperature, fm.mixup_alpha) == ("vit_tiny", "soft", 1, 1, 1)
    assert fm.epochs == alone.epochs == 12 and fm.teacher == plan["vit_tiny-kd"].teacher and alone.mixup_alpha == 0
    changed = ("teacher", "distill", "kd_alpha", "kd_temperature", "mixup_alpha")
    assert {k: v for k, v in fm.to_dict().items() if k not in changed} == {
        k: v for k, v in alone.to_dict().items() if k not in changed}
    assert run_path(tmp_path, "quick", "vit_tiny-fm", 12).name == "vit_tiny-fm-12ep.pt"
    assert how(fm.to_dict()) == "function matching: MixUp views, soft targets, T = 1, teacher only (α = 1)"


def test_the_verdict_names_function_matching_when_it_leads():
    from training.kd_experiment import kd_table, summarise

    raw = {"teacher": _run("resnet18", 0.80, 8), "vit_tiny": _run("vit_tiny", 0.70, 12),
           "vit_tiny-kd": _run("vit_tiny", 0.71, 12, distilled="soft"),
           "vit_tiny-fm": _run("vit_tiny", 0.76, 12, distilled="soft")}
    table = kd_table(summarise(raw, "quick", vit_epochs=12))
    assert ("The best distilled ViT-Tiny/7 (function matching: MixUp views, soft targets, T = 1, teacher only "
            "(α = 1), `vit_tiny-fm`: 76.00 %, alone 70.00 %) closes 60 % of its 10.00-point gap to the teacher: the "
            "goal (≥ 50 %) is met.") in table
    assert "The other way, soft targets, T = 4 (`vit_tiny-kd`): 71.00 %, +1.00 points" in table
    assert "(distillation token, hard labels, `vit_tiny_distilled`) has not run" in table


def test_every_vit_schedule_is_kept_and_tabled_side_by_side(tmp_path):
    from training.kd_experiment import report, schedules, schedules_table, summarise

    teacher = _run("resnet18", 0.80, 8)
    short = summarise({"teacher": teacher, "vit_tiny": _run("vit_tiny", 0.77, 36),
                       "vit_tiny-kd": _run("vit_tiny", 0.76, 36, distilled="soft")}, "quick", vit_epochs=36)
    long = summarise({"teacher": teacher, "vit_tiny": _run("vit_tiny", 0.775, 80),
                      "vit_tiny-fm": _run("vit_tiny", 0.79, 80, distilled="soft")}, "quick", vit_epochs=80)
    write_json(tmp_path / "kd-80ep.json", long)
    write_json(tmp_path / "kd-36ep.json", short)
    write_json(tmp_path / "kd.json", long)  # the latest table's source, not a schedule of its own
    found = schedules(tmp_path)
    assert [s["size"]["vit_epochs"] for s in found] == [36, 80]
    # -1.00 / 3.00 = -33 %, sqrt((0.77 * 0.23 + 0.76 * 0.24) / 2000) = 1.34; 1.50 / 2.50 = 60 %, 1.30
    assert schedules_table(found).splitlines()[2:] == [
        "| `quick` | 36 (576) | 80.00 (8) | 77.00 | 76.00 | soft targets, T = 4 (`vit_tiny-kd`) | -1.00 (± 1.34) "
        "| -33 % | [kd-36ep.json](efficiency/kd-36ep.json) |",
        "| `quick` | 80 (1280) | 80.00 (8) | 77.50 | 79.00 | function matching: MixUp views, soft targets, T = 1, "
        "teacher only (α = 1) (`vit_tiny-fm`) | +1.50 (± 1.30) | 60 % | [kd-80ep.json](efficiency/kd-80ep.json) |", "",
        "The ViT-Tiny/7 alone by schedule: 77.00 % after 36 epochs (`quick`); 77.50 % after 80 epochs (`quick`)."]
    # report() keeps its schedule's summary and writes both tables, with or without finished runs
    report(tmp_path / "ckpt", tmp_path / "reports", tmp_path / "docs", "quick", 12)
    assert (tmp_path / "docs" / "efficiency" / "kd-12ep.json").is_file()
    page = (tmp_path / "docs" / "efficiency.md").read_text()
    assert "<!-- kd-table:begin -->" in page and "_No ViT schedule has a finished distilled run yet._" in page


def test_the_verdict_says_when_the_gap_to_the_teacher_is_within_noise():
    from training.kd_experiment import kd_table, summarise

    raw = {"teacher": _run("resnet18", 0.80, 8), "vit_tiny": _run("vit_tiny", 0.79, 60),
           "vit_tiny-fm": _run("vit_tiny", 0.795, 60, distilled="soft")}
    summary = summarise(raw, "quick", vit_epochs=60)
    row = next(r for r in summary["students"] if r["run"] == "vit_tiny-fm")
    # sqrt((0.8 * 0.2 + 0.79 * 0.21) / 2000) = 1.28 points, more than half the 1.00-point gap
    assert (row["gap_pt"], row["gap_se_pt"], row["gap_closed"]) == (1.0, 1.28, 0.5)
    table = kd_table(summary)
    assert "closes 50 % of its 1.00-point gap to the teacher: the goal (≥ 50 %) is met." in table
    assert ("The gap itself, 1.00 points with a standard error of about 1.28, is within two standard errors of "
            "zero") in table
    raw["vit_tiny"]["test_acc"] = 0.70  # a 10-point gap is not noise
    assert "The gap itself" not in kd_table(summarise(raw, "quick", vit_epochs=60))


def test_a_transfer_set_run_trains_as_many_steps_as_the_student_alone_on_more_images(tmp_path):
    from training.kd_experiment import how, recipes

    plan = recipes(tmp_path, "quick", threads=1, vit_epochs=60)
    alone, soft, more = plan["vit_tiny"], plan["vit_tiny-kd"], plan["vit_tiny-kd-unlabeled"]
    assert more.kd_unlabeled == 8000 and soft.kd_unlabeled == alone.kd_unlabeled == 0
    steps = [-(-n // r.batch_size) * r.epochs for n, r in ((2000, alone), (10000, more))]
    assert (more.epochs, steps) == (12, [960, 948])  # 2,000 labelled + 8,000 unlabelled images an epoch
    assert more.warmup_epochs == pytest.approx(alone.warmup_epochs / 5)
    changed = ("kd_unlabeled", "epochs", "warmup_epochs")
    assert {k: v for k, v in more.to_dict().items() if k not in changed} == {
        k: v for k, v in soft.to_dict().items() if k not in changed}
    hard = plan["vit_tiny_distilled-unlabeled"]
    assert (hard.distill, hard.kd_unlabeled, hard.teacher) == ("hard", 8000, soft.teacher)
    assert how(more.to_dict()) == "soft targets, T = 4, + 8,000 unlabelled images"
