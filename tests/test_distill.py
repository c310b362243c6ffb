"""Knowledge distillation: the loss values on hand-made logits, the distillation token path, the teacher's
checks and a distilled training run."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.checkpoint import build_model, save_checkpoint
from training.data import FASHION_MNIST_CLASSES
from training.distill import Distiller, DistillError, Teacher, hard_kd_loss, soft_kd_loss
from training.models import get_model, list_models
from training.presets import make_preprocess
from training.recipe import Recipe
from training.train import train

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")
SMALL_VIT = dict(dim=48, depth=2, heads=3, mlp_dim=96)
FMNIST_CLASSES = list(FASHION_MNIST_CLASSES)


def kl(q: list[float], p: list[float]) -> float:
    return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))


def test_soft_loss_is_t_squared_times_the_kl_of_the_softened_distributions():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax at T=1: (0.75, 0.25)
    assert soft_kd_loss(student, teacher, 1.0).item() == pytest.approx(kl([0.75, 0.25], [0.5, 0.5]), rel=1e-5)
    # at T=2 the teacher's logits halve: softmax(ln 3 / 2, 0) = (sqrt 3, 1) / (sqrt 3 + 1); times T^2 = 4
    r3 = math.sqrt(3.0)
    expected = 4 * kl([r3 / (r3 + 1), 1 / (r3 + 1)], [0.5, 0.5])
    assert soft_kd_loss(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-5)
    # batch mean, and zero when the student already matches the teacher
    batch = soft_kd_loss(torch.cat([student, teacher]), torch.cat([teacher, teacher]), 1.0)
    assert batch.item() == pytest.approx(kl([0.75, 0.25], [0.5, 0.5]) / 2, rel=1e-5)
    assert soft_kd_loss(teacher, teacher, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_hard_loss_is_cross_entropy_against_the_teachers_top_class():
    student = torch.tensor([[2.0, 0.0]])
    teacher = torch.tensor([[0.0, 5.0]])  # the teacher says class 1
    assert hard_kd_loss(student, teacher).item() == pytest.approx(math.log(1 + math.e**2), rel=1e-6)


def _checkpoint(path: Path, arch: str = "lenet5", classes: list[str] | None = None, size: int = 28,
                **model_args) -> Path:
    classes = classes or FMNIST_CLASSES
    torch.manual_seed(1)
    args = {"num_classes": len(classes), "in_channels": 1, "img_size": size, **model_args}
    model = get_model(arch, **args).eval()
    save_checkpoint({"arch": arch, "model_args": args, "state_dict": model.state_dict(), "classes": classes,
                     "preprocess": make_preprocess(size, 1, [0.286], [0.353]), "metrics": {"test_acc": 0.5},
                     "recipe": {}}, path)
    return path


def test_the_loss_mixes_labels_and_teacher_by_alpha(tmp_path):
    pre = make_preprocess(28, 1, [0.286], [0.353])
    teacher = Teacher(_checkpoint(tmp_path / "t.pt"), FMNIST_CLASSES, pre, torch.device("cpu"))
    torch.manual_seed(0)
    student = get_model("simple_cnn", width=4, hidden=8)
    x, y = torch.randn(6, 1, 28, 28), torch.arange(6)
    t = teacher(x)
    s = student(x)
    for mode, alpha, kd in (("soft", 0.3, soft_kd_loss(s, t, 2.0)), ("hard", 0.7, hard_kd_loss(s, t))):
        distiller = Distiller(teacher, mode, alpha, 2.0, two_heads=False)
        loss = distiller.loss(student, x, y, F.cross_entropy)
        assert loss.item() == pytest.approx(((1 - alpha) * F.cross_entropy(s, y) + alpha * kd).item(), rel=1e-5)
        # how often the teacher's top-1 was the label, counted over the views it labelled, carried over a resume
        distiller.loss(student, x, y, F.cross_entropy)
        agreed = (t.argmax(dim=1) == y).sum().item()
        described = distiller.describe()
        assert described["teacher_views"] == 12 and described["teacher_label_agreement"] == round(agreed / 6, 6)
        resumed = Distiller(teacher, mode, alpha, 2.0, two_heads=False)
        resumed.resume({"distillation": described})
        resumed.loss(student, x, y, F.cross_entropy)
        assert resumed.describe()["teacher_views"] == 18
        assert resumed.describe()["teacher_label_agreement"] == round(3 * agreed / 18, 6)
    assert Distiller(teacher, "auto", 0.5, 2.0, two_heads=False).mode == "soft"
    assert Distiller(teacher, "auto", 0.5, 2.0, two_heads=True).mode == "hard"


def test_distillation_token_shapes_and_averaged_heads():
    assert {"vit_tiny_distilled", "vit_small_distilled"} <= set(list_models())
    torch.manual_seed(0)
    model = get_model("vit_tiny_distilled", num_classes=7, **SMALL_VIT).eval()
    plain = get_model("vit_tiny", num_classes=7, **SMALL_VIT)
    grid = (28 // 4) ** 2
    assert model.pos_embed.shape == (1, grid + 2, 48) and plain.pos_embed.shape == (1, grid + 1, 48)
    assert model.dist_token.shape == (1, 1, 48) and plain.dist_token is None
    x = torch.randn(3, 1, 28, 28)
    cls, dist = model(x, both_heads=True)
    assert cls.shape == dist.shape == (3, 7)
    assert not torch.allclose(cls, dist)  # two tokens, two heads
    assert torch.allclose(model(x), (cls + dist) / 2, atol=1e-6)  # inference averages the heads


def test_hard_distillation_teaches_the_distillation_head_only(tmp_path):
    """alpha=1: only the teacher's term counts, and it reaches the model through the distillation head."""
    pre = make_preprocess(28, 1, [0.286], [0.353])
    teacher = Teacher(_checkpoint(tmp_path / "t.pt"), FMNIST_CLASSES, pre, torch.device("cpu"))
    student = get_model("vit_tiny_distilled", **SMALL_VIT)
    loss = Distiller(teacher, "hard", 1.0, 1.0, two_heads=True).loss(student, torch.randn(4, 1, 28, 28),
                                                                     torch.arange(4), F.cross_entropy)
    loss.backward()
    assert student.head.weight.grad.abs().sum() == 0
    assert student.head_dist.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())  # the teacher only answers


def test_a_teacher_at_another_size_and_normalisation_sees_its_own_input(tmp_path):
    student_pre = make_preprocess(28, 1, [0.5], [0.25])
    path = _checkpoint(tmp_path / "t32.pt", size=32)
    teacher = Teacher(path, FMNIST_CLASSES, student_pre, torch.device("cpu"))
    pixels = torch.rand(2, 1, 28, 28)
    converted = teacher.convert((pixels - 0.5) / 0.25)
    expected = (F.interpolate(pixels, size=(32, 32), mode="bilinear", antialias=True) - 0.286) / 0.353
    assert converted.shape == (2, 1, 32, 32) and torch.allclose(converted, expected, atol=1e-5)


def test_a_teacher_with_other_classes_is_refused(tmp_path):
    path = _checkpoint(tmp_path / "other.pt", classes=["cat", "dog", "bird"])
    with pytest.raises(DistillError, match="predicts 3 classes .*cat, dog, bird.* same classes in the same order"):
        Teacher(path, FMNIST_CLASSES, make_preprocess(28, 1, [0.286], [0.353]), torch.device("cpu"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@needs_fmnist
def test_cli_refuses_a_teacher_with_other_classes_in_one_line(tmp_path):
    path = _checkpoint(tmp_path / "other.pt", classes=["cat", "dog", "bird"])
    p = _cli("train", "--arch", "lenet5", "--epochs", "1", "--limit", "64", "--teacher", str(path),
             "--out", str(tmp_path / "s.pt"), "--no-tensorboard")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "predicts 3 classes" in p.stderr and "10 classes of fashion_mnist" in p.stderr
    assert not (tmp_path / "s.pt").exists()


@needs_fmnist
def test_a_distilled_student_without_a_teacher_is_refused():
    p = _cli("train", "--arch", "vit_tiny_distilled", "--epochs", "1", "--limit", "64", "--no-tensorboard")
    assert p.returncode == 2 and "give --teacher CHECKPOINT" in p.stderr and "Traceback" not in p.stderr


@needs_fmnist
def test_a_distilled_run_records_its_teacher_and_serves_the_averaged_heads(tmp_path):
    teacher = _checkpoint(tmp_path / "t.pt")
    recipe = Recipe(arch="vit_tiny_distilled", model_args=SMALL_VIT, epochs=1, batch_size=32, optimizer="adamw",
                    lr=1e-3, limit=96, teacher=str(teacher), crop_padding=0)
    ckpt = train(recipe, tmp_path / "s.pt", progress=False)
    d = ckpt["metrics"]["distillation"]
    assert (d["teacher"], d["teacher_arch"], d["mode"], d["distillation_token"]) == (str(teacher), "lenet5", "hard",
                                                                                     True)
    model = build_model(ckpt)
    x = torch.randn(2, 1, 28, 28)
    cls, dist = model(x, both_heads=True)
    assert torch.allclose(model(x), (cls + dist) / 2, atol=1e-6)


@needs_fmnist
def test_an_experiment_run_resumes_with_another_thread_count_but_not_another_recipe(tmp_path):
    from dataclasses import replace

    from training.runs import train_or_resume

    recipe = Recipe(arch="lenet5", epochs=2, batch_size=32, limit=64, crop_padding=0, threads=2)
    train(recipe, tmp_path / "r.pt", progress=False, stop_after_epoch=1)
    ckpt = train_or_resume(replace(recipe, threads=1), tmp_path / "r.pt", progress=False)
    assert ckpt["epoch"] == 2 and ckpt["recipe"]["threads"] == 1
    with pytest.raises(ValueError, match="differs in lr"):
        train_or_resume(replace(recipe, lr=recipe.lr / 2), tmp_path / "r.pt", progress=False)


@needs_fmnist
def test_the_teacher_answers_the_augmented_batch_the_student_trains_on(tmp_path, monkeypatch):
    """DeiT: teacher and student see the same view each step (logits of un-augmented images would not match the
    crop and flip the student learns from)."""
    from training.models.vit import ViT

    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
    teacher_call, vit_forward = Teacher.__call__, ViT.forward

    def teacher_spy(self, x):
        seen["teacher"].append(x.clone())
        return teacher_call(self, x)

    def student_spy(self, x, both_heads=False):
        if both_heads:  # training steps only (validation calls the averaged output)
            seen["student"].append(x.clone())
        return vit_forward(self, x, both_heads)

    monkeypatch.setattr(Teacher, "__call__", teacher_spy)
    monkeypatch.setattr(ViT, "forward", student_spy)
    recipe = Recipe(arch="vit_tiny_distilled", model_args=SMALL_VIT, epochs=1, batch_size=32, optimizer="adamw",
                    lr=1e-3, limit=64, teacher=str(_checkpoint(tmp_path / "t.pt")), crop_padding=2, hflip=True)
    train(recipe, tmp_path / "s.pt", progress=False)
    assert len(seen["teacher"]) == len(seen["student"]) == 2
    for t, s in zip(seen["teacher"], seen["student"]):
        assert torch.equal(t, s)
    # augmented: a shifted crop brings in rows of padding (exactly 0 after normalisation; the background of a
    # Fashion-MNIST image normalises to -0.81)
    rows = torch.cat(seen["teacher"]).abs().amax(dim=-1)  # (N, 1, H): the largest value of each row
    assert (rows == 0).any()


@needs_fmnist
def test_with_mixup_the_teacher_labels_the_mixed_view_the_student_trains_on(tmp_path, monkeypatch):
    """Function matching: the teacher labels the MixUp-ed batch itself, not the images before they were mixed."""
    import training.train as train_module

    before, mixed, taught = [], [], []
    make_mixer, teacher_call = train_module.make_mixer, Teacher.__call__

    def mixer_spy(recipe, num_classes):
        mixer = make_mixer(recipe, num_classes)

        def mix(x, y):
            before.append(x.clone())
            out = mixer(x, y)
            mixed.append(out[0].clone())
            return out
        return mix

    def teacher_spy(self, x):
        taught.append(x.clone())
        return teacher_call(self, x)

    monkeypatch.setattr(train_module, "make_mixer", mixer_spy)
    monkeypatch.setattr(Teacher, "__call__", teacher_spy)
    recipe = Recipe(arch="vit_tiny", model_args=SMALL_VIT, epochs=1, batch_size=32, optimizer="adamw", lr=1e-3,
                    limit=64, teacher=str(_checkpoint(tmp_path / "t.pt")), distill="soft", kd_alpha=1.0,
                    kd_temperature=1.0, mixup_alpha=1.0, crop_padding=0, hflip=False)
    ckpt = train(recipe, tmp_path / "s.pt", progress=False)
    assert len(taught) == len(mixed) == 2
    for t, m, b in zip(taught, mixed, before):
        assert torch.equal(t, m) and not torch.equal(m, b)
    # a mixed batch has no single true label, so no agreement is counted
    assert ckpt["metrics"]["distillation"]["teacher_label_agreement"] is None


def test_with_a_transfer_set_the_labels_term_covers_the_labelled_images_only(tmp_path):
    from training.data import UNLABELED

    pre = make_preprocess(28, 1, [0.286], [0.353])
    teacher = Teacher(_checkpoint(tmp_path / "t.pt"), FMNIST_CLASSES, pre, torch.device("cpu"))
    torch.manual_seed(0)
    student = get_model("simple_cnn", width=4, hidden=8)
    x, y = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, UNLABELED, UNLABELED, UNLABELED])
    t, s = teacher(x), student(x)
    distiller = Distiller(teacher, "soft", 0.3, 2.0, two_heads=False, unlabeled=True)
    expected = 0.7 * F.cross_entropy(s[:3], y[:3]) + 0.3 * soft_kd_loss(s, t, 2.0)  # the teacher's term: all six
    assert distiller.loss(student, x, y, F.cross_entropy).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distiller.describe()["teacher_views"] == 3  # agreement counts the images with a label only
    hidden = torch.full_like(y, UNLABELED)  # a batch of unlabelled images only: the teacher's term alone
    loss = distiller.loss(student, x, hidden, F.cross_entropy)
    assert loss.item() == pytest.approx((0.3 * soft_kd_loss(s, t, 2.0)).item(), rel=1e-5)
    loss.backward()  # and it still trains the student
    assert all(p.grad is not None for p in student.parameters())


@needs_fmnist
def test_a_transfer_set_adds_training_images_with_hidden_labels_after_the_limited_ones():
    from training.data import UNLABELED, load_dataset, with_unlabeled

    limited = load_dataset("fashion_mnist", limit=40)
    splits = with_unlabeled(load_dataset("fashion_mnist"), 40, 25)
    assert torch.equal(splits.train.images[:40], limited.train.images)  # the labelled images are the same
    assert torch.equal(splits.train.labels[:40], limited.train.labels)
    assert len(splits.train) == 65 and (splits.train.labels[40:] == UNLABELED).all()
    assert not any(torch.equal(splits.train.images[i], img) for i in range(40, 65) for img in limited.train.images)
    for part in ("val", "test"):  # scored on the same images as a limited run
        assert torch.equal(getattr(splits, part).images, getattr(limited, part).images)


@needs_fmnist
def test_a_distilled_run_with_a_transfer_set_trains_on_more_images(tmp_path):
    from training.recipe import RecipeError

    teacher = str(_checkpoint(tmp_path / "t.pt"))
    recipe = Recipe(arch="lenet5", epochs=1, batch_size=32, limit=64, kd_unlabeled=96, teacher=teacher,
                    crop_padding=0)
    ckpt = train(recipe, tmp_path / "s.pt", progress=False)
    assert ckpt["metrics"]["distillation"]["teacher_views"] == 64  # 160 images seen, 64 of them with a label
    with pytest.raises(RecipeError, match="needs a teacher and a limit"):
        Recipe(arch="lenet5", limit=64, kd_unlabeled=96)
    with pytest.raises(RecipeError, match="cannot mix images"):
        Recipe(arch="lenet5", limit=64, kd_unlabeled=96, teacher=teacher, mixup_alpha=1.0)
