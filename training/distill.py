"""Knowledge distillation: a trained checkpoint (the teacher) gives every training batch a second target.

Two kinds of target, chosen by the recipe's `distill` key:

- soft (Hinton et al., 2015): the teacher's probabilities at temperature T. The student's loss is
  `(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))`; the T^2
  keeps the soft term's gradients on the scale of the hard one's when T changes.
- hard (DeiT, Touvron et al., 2021): the teacher's top-1 class as a label:
  `(1 - alpha) * CE(student, labels) + alpha * CE(student, argmax teacher)`.

A student with a distillation token (`*_distilled` ViTs) feeds the label term from its class head and the
teacher term from its distillation head; at inference the model averages the two heads. `auto` picks hard for
such students (DeiT's best setting) and soft for the others.

The teacher runs in inference mode (eval, no gradients) on the same augmented batch as the student, so both see
the same view; its logits are not cached because every epoch draws new crops and flips. A teacher trained with
another input size or normalisation gets the batch converted to its own preprocessing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.checkpoint import build_model, load_checkpoint
from training.recipe import Recipe, RecipeError

MODES = ("auto", "soft", "hard")


class DistillError(RecipeError):
    """A teacher that cannot teach this student (other classes, other channels, no teacher for a token)."""


def soft_kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    log_p = F.log_softmax(student.float() / temperature, dim=1)
    log_q = F.log_softmax(teacher.float() / temperature, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2


def hard_kd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's top-1 class."""
    return F.cross_entropy(student.float(), teacher.argmax(dim=1))


def has_distillation_token(model: nn.Module) -> bool:
    return getattr(model, "dist_token", None) is not None


class Teacher:
    """A checkpoint in inference mode that answers student batches (normalised with the student's stats)."""

    def __init__(self, path: str | Path, classes: Sequence[str], preprocess: dict[str, Any],
                 device: torch.device, dataset: str = "") -> None:
        ckpt = load_checkpoint(path, map_location="cpu")
        if list(ckpt["classes"]) != list(classes):
            theirs, ours = list(ckpt["classes"]), list(classes)
            raise DistillError(
                f"teacher {path} predicts {len(theirs)} classes ({_short(theirs)}) but the student learns "
                f"{len(ours)} classes of {dataset or 'its dataset'} ({_short(ours)}); a teacher must be trained on "
                "the same classes in the same order")
        theirs = ckpt["preprocess"]
        if int(theirs["channels"]) != int(preprocess["channels"]):
            raise DistillError(f"teacher {path} takes {theirs['channels']}-channel images, the student "
                               f"{preprocess['channels']}-channel ones")
        self.path, self.arch, self.preprocess = str(path), ckpt["arch"], dict(theirs)
        self.test_acc = ckpt.get("metrics", {}).get("test_acc")
        self.model = build_model(ckpt).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        # conv nets run faster channels_last on CPU and GPU alike (docs/runtimes.md); the teacher only answers
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in self.model.modules())
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.convert = _input_converter(preprocess, self.preprocess)
        self.seconds = 0.0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits (float32) for a batch the student sees. no_grad, not inference_mode: the logits are
        targets in the student's autograd graph."""
        start = time.perf_counter()
        self.model.eval()  # stays in inference mode even if something called .train() on it
        x = self.convert(x)
        logits = self.model(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x).float()
        self.seconds += time.perf_counter() - start
        return logits


def _input_converter(student: dict[str, Any], teacher: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Student-normalised batch -> teacher-normalised batch at the teacher's size (identity when they agree)."""
    same = (int(student["size"]) == int(teacher["size"])
            and list(student["mean"]) == list(teacher["mean"]) and list(student["std"]) == list(teacher["std"]))
    if same:
        return lambda x: x

    def stats(pre: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(pre["mean"], device=device).view(1, -1, 1, 1),
                torch.tensor(pre["std"], device=device).view(1, -1, 1, 1))

    def convert(x: torch.Tensor) -> torch.Tensor:
        s_mean, s_std = stats(student, x.device)
        t_mean, t_std = stats(teacher, x.device)
        pixels = x * s_std + s_mean  # back to 0..1 pixels (training.presets.normalize, inverted)
        if pixels.shape[-1] != int(teacher["size"]) or pixels.shape[-2] != int(teacher["size"]):
            size = int(teacher["size"])
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return (pixels - t_mean) / t_std
    return convert


def _short(names: Sequence[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


class Distiller:
    """The training loss with a teacher: `loss(net, x, target, criterion)` replaces `criterion(net(x), target)`."""

    def __init__(self, teacher: Teacher, mode: str, alpha: float, temperature: float, two_heads: bool,
                 unlabeled: bool = False) -> None:
        self.teacher, self.alpha, self.temperature, self.two_heads = teacher, alpha, temperature, two_heads
        self.unlabeled = unlabeled  # the batches may hold images with a hidden label (training.data.UNLABELED)
        self.mode = ("hard" if two_heads else "soft") if mode == "auto" else mode
        # training views the teacher labelled, and those where its top-1 was the true label (how noisy its targets are)
        self.views, self.agreed = 0, torch.zeros((), dtype=torch.long)

    def loss(self, net: nn.Module, x: torch.Tensor, target: torch.Tensor,
             criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """With a transfer set (`unlabeled`), the labels' term covers the batch's labelled images only (a hidden
        label is UNLABELED), the teacher's term all of them."""
        teacher = self.teacher(x)
        if self.two_heads:
            cls, dist = net(x, both_heads=True)
        else:
            cls = dist = net(x)
        kd = hard_kd_loss(dist, teacher) if self.mode == "hard" else soft_kd_loss(dist, teacher, self.temperature)
        if target.ndim != 1:  # a mixed batch's soft targets have no single true label
            return (1 - self.alpha) * criterion(cls.float(), target) + self.alpha * kd
        if self.unlabeled:  # the labels' term over the images that have one (this syncs with the device)
            known = target >= 0
            views = int(known.sum())
            labels = criterion(cls[known].float(), target[known]) if views else cls.sum() * 0
        else:  # no host sync per step
            views, labels = target.numel(), criterion(cls.float(), target)
        right = teacher.argmax(dim=1) == target  # how noisy the teacher's targets are, where the label is known
        self.agreed, self.views = self.agreed.to(target.device) + right.sum(), self.views + views
        return (1 - self.alpha) * labels + self.alpha * kd

    def resume(self, metrics: dict[str, Any]) -> None:
        """Carry the teacher time and label agreement of the epochs before a resume, as the training time is."""
        before = metrics.get("distillation") or {}
        self.teacher.seconds = float(before.get("teacher_time_s", 0.0))
        self.views = int(before.get("teacher_views", 0))
        self.agreed = torch.tensor(round(self.views * (before.get("teacher_label_agreement") or 0.0)))

    def describe(self) -> dict[str, Any]:
        """What the checkpoint's metrics record about the distillation."""
        return {"teacher": self.teacher.path, "teacher_arch": self.teacher.arch,
                "teacher_test_acc": self.teacher.test_acc, "mode": self.mode, "alpha": self.alpha,
                "temperature": self.temperature, "distillation_token": self.two_heads,
                "teacher_time_s": round(self.teacher.seconds, 1), "teacher_views": self.views,
                "teacher_label_agreement": round(int(self.agreed) / self.views, 6) if self.views else None}


def make_distiller(recipe: Recipe, model: nn.Module, classes: Sequence[str], preprocess: dict[str, Any],
                   device: torch.device, dataset: str = "") -> Distiller | None:
    """The recipe's distillation, or None without a teacher. A student with a distillation token needs one."""
    two_heads = has_distillation_token(model)
    if not recipe.teacher:
        if two_heads:
            raise DistillError(f"{recipe.arch} has a distillation token and learns from a teacher: give --teacher "
                               f"CHECKPOINT (or train {recipe.arch.removesuffix('_distilled')} without one)")
        return None
    if two_heads and recipe.qat:
        raise DistillError(f"{recipe.arch}'s two heads do not survive QAT's export: distill it first, then train "
                           "the result with qat (its output averages the heads)")
    teacher = Teacher(recipe.teacher, classes, preprocess, device, dataset)
    return Distiller(teacher, recipe.distill, recipe.kd_alpha, recipe.kd_temperature, two_heads,
                     unlabeled=recipe.kd_unlabeled > 0)
