"""The training loop: one recipe in, one self-describing checkpoint out (see training/checkpoint.py)."""

from __future__ import annotations

import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from tqdm import tqdm

from training import distributed
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data import DatasetInfo, Splits, load_dataset, make_loaders, with_unlabeled
from training.distill import make_distiller
from training.ema import WeightEMA, ema_horizon, recalibrate_bn
from training.finetune import FreezePolicy, init_weights, param_groups
from training.models import get_model, model_task
from training.presets import (
    eval_batch,
    imagefolder_train_transform,
    make_preprocess,
    normalize,
    resize_crop,
    train_batch,
)
from training.recipe import Recipe, RecipeError
from training.seg_eval import SegmentationLoss
from training.seg_eval import evaluate as seg_evaluate


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_name() -> str:
    """The CPU model (e.g. 'AMD EPYC 9R14 96-Core Processor'), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return f"{platform.processor() or platform.machine()} CPU"


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def short_run_warning(recipe: Recipe, n_train: int, steps_per_epoch: int, warmup_steps: int) -> str | None:
    """One line when the run is too short for its schedule: no more optimizer steps than the LR warm-up, or
    fewer than the EMA averages over. None when the schedule fits."""
    steps = recipe.epochs * steps_per_epoch
    short = []
    if steps <= warmup_steps:
        short.append(f"the LR warm-up ({warmup_steps} steps, warmup_epochs {recipe.warmup_epochs:g})")
    horizon = ema_horizon(recipe.ema_decay)
    if steps < horizon:
        short.append(f"the EMA horizon ({horizon} steps at ema_decay {recipe.ema_decay:g})")
    if not short:
        return None
    return (f"warning: {steps} optimizer steps ({n_train} images / batch {recipe.batch_size} x {recipe.epochs} "
            f"epoch(s)) are not more than {' or '.join(short)}; expect accuracy far below the recipe's. "
            "Quick runs: more --epochs, a larger --limit or a smaller --batch-size.")


def near_chance_warning(test_acc: float, num_classes: int, short_run: str | None) -> str | None:
    """One line when the test accuracy is below twice chance, with the likely reason."""
    chance = 1.0 / num_classes
    if test_acc >= 2 * chance:
        return None
    why = "the run was too short for its schedule (see the warning above)" if short_run else \
        "check the learning rate and the data (train with more --epochs or a lower --lr)"
    return f"warning: test accuracy {test_acc:.4f} is near chance ({chance:.2f} for {num_classes} classes): {why}."


def make_mixer(recipe: Recipe, num_classes: int) -> T.Transform | None:
    mixers = []
    if recipe.mixup_alpha > 0:
        mixers.append(T.MixUp(alpha=recipe.mixup_alpha, num_classes=num_classes))
    if recipe.cutmix_alpha > 0:
        mixers.append(T.CutMix(alpha=recipe.cutmix_alpha, num_classes=num_classes))
    return T.RandomChoice(mixers) if mixers else None


class Evaluation(NamedTuple):
    loss: float
    acc: float
    preds: torch.Tensor  # top-1 class per image, on the CPU
    conf: torch.Tensor  # its probability


@torch.inference_mode()
def evaluate(model: nn.Module, loader, preprocess: dict[str, Any], device: torch.device,
             autocast: bool = False, channels_last: bool = False) -> Evaluation:
    """Loss, accuracy and top-1 predictions with their probabilities over a loader of uint8 batches."""
    model.eval()
    total, correct, loss_sum, preds, confs = 0, 0, 0.0, [], []
    for x, y in loader:
        y = y.to(device)
        x = eval_batch(x, preprocess, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        conf, pred = logits.softmax(1).max(1)
        correct += (pred == y).sum()
        total += y.numel()
        preds.append(pred)
        confs.append(conf)
    loss, acc = float(loss_sum) / max(1, total), int(correct) / max(1, total)
    if not preds:
        return Evaluation(loss, acc, torch.empty(0, dtype=torch.long), torch.empty(0))
    return Evaluation(loss, acc, torch.cat(preds).cpu(), torch.cat(confs).cpu())


def train(recipe: Recipe, out: str | Path, log_dir: str | Path | None = None,
          resume: str | Path | None = None, progress: bool = True, stop_after_epoch: int | None = None,
          after_backward: Callable[[nn.Module, int], None] | None = None) -> dict[str, Any]:
    """Train per recipe; write the checkpoint to `out` after every epoch (atomically). Returns the checkpoint.
    `stop_after_epoch` ends this run early (the schedule still spans recipe.epochs; `resume` continues it).
    `after_backward(model, step)` runs after each backward pass, before clipping and the optimizer step
    (e.g. training.gradnorm.GradNormRecorder); `step` counts optimizer steps from 0 across resumes.
    Under torchrun each process trains its share of every batch (training/distributed.py); rank 0 writes."""
    ctx = distributed.init(recipe.sync_bn)
    progress = progress and ctx.is_main
    torch.manual_seed(recipe.seed)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    device = ctx.device
    on_cuda = device.type == "cuda"
    autocast = (recipe.amp == "bf16" or (recipe.amp == "auto" and on_cuda)) and not recipe.qat
    channels_last = recipe.channels_last == "on" or (recipe.channels_last == "auto" and on_cuda)

    if model_task(recipe.arch) != recipe.task:
        raise RecipeError(f"{recipe.arch} is a {model_task(recipe.arch)} model; the recipe's task is {recipe.task}")
    info, preprocess, n_train, (train_loader, val_loader, test_loader) = make_data(recipe, device, ctx)
    size = preprocess["size"]
    model_args = {"num_classes": len(info.classes), "in_channels": info.channels, "img_size": size,
                  **recipe.model_args}
    model = get_model(recipe.arch, **model_args)
    init = None if resume else init_weights(model, recipe, list(info.classes))
    if init and progress:
        print(f"starting weights: {init['source']} ({init['tensors']} tensors, head {init['head']})", flush=True)
    distiller = make_distiller(recipe, model, info.classes, preprocess, device, info.name)  # None: no teacher
    if recipe.qat:  # fake-quantised int8 graph from the first step (training/qat.py)
        from training.qat import prepare_qat
        model = prepare_qat(model, preprocess, recipe.arch)
    model = distributed.prepare(model, ctx, recipe.sync_bn).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    freeze = FreezePolicy(model, recipe.freeze, recipe.unfreeze_every)
    freeze.start_epoch(model, 0)
    groups = param_groups(model, recipe.weight_decay, recipe.lr, recipe.backbone_lr_factor,
                          include_frozen=recipe.freeze == "gradual")
    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=recipe.lr)
    steps_per_epoch = len(train_loader)
    total_steps = recipe.epochs * steps_per_epoch
    warmup_steps = max(1, int(recipe.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, warmup_steps))
    ema = WeightEMA(model, recipe.ema_decay) if recipe.ema_decay > 0 else None
    warning = short_run_warning(recipe, n_train, steps_per_epoch, warmup_steps)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    mixer = make_mixer(recipe, len(info.classes))
    criterion = SegmentationLoss(recipe.dice_weight, recipe.label_smoothing) if recipe.task == "segmentation" \
        else nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)

    start_epoch, history, train_time, train_cpu = 0, [], 0.0, 0.0
    if resume:
        state = load_checkpoint(resume, map_location=device)
        if state["arch"] != recipe.arch:
            raise ValueError(f"cannot resume: {resume} holds {state['arch']}, the recipe trains {recipe.arch}")
        if recipe.qat:
            from training.qat import full_state
            model.load_state_dict(full_state(state))
        else:
            model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema_state_dict"):
            ema.load_state_dict(state["ema_state_dict"], updates=int(state.get("ema_updates", sched.last_epoch)))
        start_epoch = int(state["epoch"])
        init = state.get("init")
        history = list(state["metrics"].get("history", []))
        train_time = float(state["metrics"].get("train_time_s", 0.0))
        train_cpu = float(state["metrics"].get("train_cpu_s", 0.0))
        if distiller is not None:
            distiller.resume(state["metrics"])

    writer = None
    if log_dir and ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(log_dir))
    gen = torch.Generator(device=device)

    def model_input(x: torch.Tensor) -> torch.Tensor:
        """A training batch as the model sees it (augmented, not mixed)."""
        if info.in_memory:
            x = x.to(device, non_blocking=True)
            if x.shape[-1] != size or x.shape[-2] != size:  # e.g. 28 px Fashion-MNIST trained at 64 px
                x = resize_crop(x, preprocess)
            x = train_batch(x, preprocess, pad=recipe.crop_padding, flip=recipe.hflip, generator=gen)
        else:
            x = normalize(x.to(device, non_blocking=True), preprocess)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    ckpt: dict[str, Any] = {}
    net = ctx.wrap(model)  # what the training step calls: DistributedDataParallel when distributed
    for epoch in range(start_epoch, recipe.epochs):
        # Per-epoch seeds: a resumed run draws the same augmentations as an uninterrupted one; each process
        # of a distributed run draws its own.
        torch.manual_seed(recipe.seed * 1000 + epoch + ctx.rank * 1_000_003)
        gen.manual_seed(recipe.seed * 1000 + epoch + ctx.rank * 1_000_003)
        if freeze.start_epoch(model, epoch):  # model.train(), this epoch's trainable stages, frozen BN in eval
            net = ctx.wrap(model)
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)  # the same shuffle order whether resumed or not
        t0, cpu0 = time.perf_counter(), time.process_time()
        loss_sum, seen = torch.zeros((), device=device), 0  # summed on the device: no sync per step
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{recipe.epochs}", leave=False,
                   disable=not (progress and sys.stderr.isatty()))
        for x, y in bar:
            y = y.to(device, non_blocking=True)
            x = model_input(x)
            target = y
            if mixer is not None and torch.rand(1).item() < recipe.mix_prob:
                x, target = mixer(x, y)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = (distiller.loss(net, x, target, criterion) if distiller
                        else criterion(net(x).float(), target))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward(model, sched.last_epoch)
            if recipe.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            loss_sum += loss.detach() * y.numel()
            seen += y.numel()
            if not bar.disable and bar.n % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if on_cuda:
            torch.cuda.synchronize()
        train_time += time.perf_counter() - t0
        train_cpu += time.process_time() - cpu0  # CPU seconds of all threads: on a shared machine, what it cost
        eval_model = ema.module if ema is not None else model
        if ema is not None:  # BN statistics measured with the averaged weights, not the raw ones
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                recalibrate_bn(ema.module, (model_input(x) for x, _ in train_loader))
            freeze.copy_frozen_bn(model, ema.module)  # frozen layers keep their pretrained statistics
        val_loss, val_scores = validate(recipe.task, eval_model, val_loader, preprocess, info.classes, device,
                                        autocast, channels_last, ctx)
        score = next(iter(val_scores))  # the headline: acc (classification) or miou (segmentation)
        loss_total, seen_total = ctx.sum(loss_sum, seen)
        row = {"epoch": epoch + 1, "train_loss": loss_total / max(1, seen_total), "val_loss": val_loss,
               **{f"val_{k}": v for k, v in val_scores.items()}, "lr": sched.get_last_lr()[0],
               "train_time_s": train_time}
        if ema is not None:
            row[f"val_{score}_raw"] = validate(recipe.task, model, val_loader, preprocess, info.classes, device,
                                               autocast, channels_last, ctx)[1][score]
        history.append(row)
        if progress:
            raw = f" (raw {row[f'val_{score}_raw']:.4f})" if ema is not None else ""
            scores = "".join(f"  val_{k} {v:.4f}{raw if k == score else ''}" for k, v in val_scores.items())
            print(f"epoch {epoch + 1}/{recipe.epochs}  train_loss {row['train_loss']:.4f}  val_loss {val_loss:.4f}"
                  f"{scores}  time {train_time:.1f}s", flush=True)
        if writer is not None:
            for key in ("train_loss", "val_loss", *(f"val_{k}" for k in val_scores), "lr"):
                writer.add_scalar(key, row[key], epoch + 1)
        final = epoch + 1 == recipe.epochs
        metrics = {"history": history, **{f"val_{k}": v for k, v in val_scores.items()}, "train_time_s": train_time,
                   "train_cpu_s": train_cpu,
                   "hardware": hardware_name(device), "epochs": epoch + 1, "steps": sched.last_epoch,
                   "weights": "ema" if ema is not None else "raw", "warnings": [warning] if warning else [],
                   "processes": ctx.world_size}
        if ema is not None:
            metrics.update({f"val_{score}_ema": val_scores[score], f"val_{score}_raw": row[f"val_{score}_raw"]})
        if distiller is not None:
            metrics["distillation"] = distiller.describe()
        if final:
            tests = test_metrics(recipe.task, eval_model, test_loader, preprocess, info.classes, device, autocast,
                                 channels_last, ctx)
            metrics.update(tests)
            test_score = tests[f"test_{score}"]
            if ema is not None:
                metrics.update({f"test_{score}_ema": test_score,
                                f"test_{score}_raw": validate(recipe.task, model, test_loader, preprocess,
                                                              info.classes, device, autocast, channels_last,
                                                              ctx)[1][score]})
            near_chance = near_chance_warning(test_score, len(info.classes), warning) \
                if recipe.task == "classification" else None
            if near_chance:
                metrics["warnings"].append(near_chance)
                print(near_chance, file=sys.stderr, flush=True)
            scalars = {k: v for k, v in metrics.items() if k.startswith("test_") and isinstance(v, float)}
            if progress:
                print("  ".join(f"{k} {v:.4f}" for k, v in scalars.items()) + f"  train time {train_time:.1f}s",
                      flush=True)
            if writer is not None:
                for key, value in scalars.items():
                    writer.add_scalar(key, value, epoch + 1)
                if recipe.task == "classification":
                    _log_sample_predictions(writer, eval_model, test_loader, preprocess, info.classes, device,
                                            epoch + 1, title=f"{recipe.arch} | {Path(out).name} | test accuracy "
                                            f"{test_score:.2%}")
        ckpt = {
            "arch": recipe.arch, "task": recipe.task,
            "model_args": model_args, "classes": list(info.classes), "preprocess": preprocess,
            "state_dict": _cpu_state(model), "ema_state_dict": _cpu_state(ema.module) if ema is not None else None,
            "metrics": metrics, "recipe": recipe.to_dict(), "dataset": info.name, "epoch": epoch + 1,
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "init": init,
            "ema_updates": ema.updates if ema is not None else 0,
        }
        if recipe.qat:  # float weights under the registry's names + the fake quantisation's state
            from training.qat import checkpoint_entries
            ckpt.update(checkpoint_entries(model, ckpt["state_dict"]))
        if ctx.is_main:
            save_checkpoint(ckpt, out)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    if writer is not None:
        writer.close()
    if not ckpt:  # resumed a finished run: nothing to do
        ckpt = load_checkpoint(resume)
    return ckpt


def make_data(recipe: Recipe, device: torch.device, ctx: Any) -> tuple[DatasetInfo, dict[str, Any], int, tuple]:
    """(dataset info, preprocess, training images per epoch, (train, val, test) loaders) for the recipe."""
    if recipe.task == "segmentation":
        from training import seg_data
        from training.clips import make_config

        if ctx.world_size > 1:
            raise RecipeError("segmentation trains in one process (moving_fmnist frames are drawn per step)")
        info = seg_data.dataset_info(recipe.img_size)
        preprocess = make_preprocess(info.size, info.channels, info.mean, info.std, crop=False)
        cfg = seg_data.limited(make_config(recipe.data_args), recipe.limit)
        return info, preprocess, cfg.train_frames, seg_data.make_loaders(cfg, info.size, recipe.batch_size,
                                                                          recipe.seed, recipe.data_root, device)
    splits = ctx.agree("dataset", lambda: load_dataset(
        recipe.dataset, recipe.data_root, val_fraction=recipe.val_fraction, seed=recipe.seed,
        image_size=recipe.img_size, limit=None if recipe.kd_unlabeled else recipe.limit), _describe)
    if recipe.kd_unlabeled:  # the labelled images a limited load gives, then the unlabelled ones
        splits = with_unlabeled(splits, recipe.limit, recipe.kd_unlabeled)
    info = splits.info
    if info.in_memory and (folder_keys := recipe.folder_only_keys()):
        raise RecipeError(f"{', '.join(folder_keys)}: for folder datasets only; {info.name} is augmented in "
                          "batches (crop_padding, hflip)")
    size = recipe.img_size or info.size
    preprocess = make_preprocess(size, info.channels, info.mean, info.std, resize=recipe.resize or size,
                                 interpolation=recipe.interpolation,
                                 background=recipe.background or info.background)
    transform = None if info.in_memory else imagefolder_train_transform(
        preprocess, size=recipe.train_img_size, scale_min=recipe.crop_scale_min, color_jitter=recipe.color_jitter,
        auto_augment=recipe.auto_augment, random_erasing=recipe.random_erasing)
    return info, preprocess, len(splits.train), make_loaders(
        splits, recipe.batch_size, device, recipe.seed, num_workers=recipe.num_workers, train_transform=transform,
        decoder=recipe.decoder, rank=ctx.rank, world_size=ctx.world_size)


def validate(task: str, model: nn.Module, loader, preprocess: dict[str, Any], classes: list[str],
             device: torch.device, autocast: bool, channels_last: bool, ctx: Any) -> tuple[float, dict[str, float]]:
    """(loss, scores), the headline score first: {"acc"} for classification (averaged over the processes of a
    distributed run), {"miou", "pixel_acc"} for segmentation."""
    if task == "segmentation":
        r = seg_evaluate(model, loader, preprocess, classes, device, autocast, channels_last)
        return r["loss"], {"miou": r["miou"], "pixel_acc": r["pixel_acc"]}
    loss, acc = ctx.mean_by_count(*_scored(evaluate(model, loader, preprocess, device, autocast, channels_last)))
    return loss, {"acc": acc}


def test_metrics(task: str, model: nn.Module, loader, preprocess: dict[str, Any], classes: list[str],
                 device: torch.device, autocast: bool, channels_last: bool, ctx: Any) -> dict[str, Any]:
    """Held-out scores for the checkpoint: test_acc/test_loss, or for segmentation test_miou, test_ap50 (AP@0.5
    of the masks' connected components), test_pixel_acc, test_loss and per-class IoU / AP."""
    if task == "segmentation":
        r = seg_evaluate(model, loader, preprocess, classes, device, autocast, channels_last, detections=True)
        return {"test_miou": r["miou"], "test_ap50": r["ap50"], "test_pixel_acc": r["pixel_acc"],
                "test_loss": r["loss"], "test_per_class_iou": r["per_class_iou"],
                "test_ap50_per_class": r["ap50_per_class"]}
    loss, scores = validate(task, model, loader, preprocess, classes, device, autocast, channels_last, ctx)
    return {"test_acc": scores["acc"], "test_loss": loss}


def _describe(splits: Splits) -> str:
    """What every process of a distributed run must agree on about its dataset."""
    return (f"{splits.info.name}, {len(splits.info.classes)} classes, {len(splits.train)} train / "
            f"{len(splits.val)} val / {len(splits.test)} test images")


def _scored(result: tuple) -> tuple[float, float, int]:
    """(loss, accuracy, number of images) from evaluate()'s result."""
    return result[0], result[1], len(result[2])


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format).clone()
            for k, v in model.state_dict().items()}


def _log_sample_predictions(writer, model, loader, preprocess, classes, device, step, title: str) -> None:
    """The most confident mistakes of the first test batch, each next to a correct image of the class it named."""
    from training.evaluate import predict_probs, sample_grid_figure

    x, y = next(iter(loader))
    conf, pred = predict_probs(model, preprocess, x, device=device).cpu().max(1)
    writer.add_figure("sample_predictions", sample_grid_figure(x, y.cpu(), pred, conf, classes, title, preprocess),
                      step)
