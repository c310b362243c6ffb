"""Segmentation metrics and reports, with maintained implementations: per-class IoU and mIoU
(torchmetrics MulticlassJaccardIndex) and detection AP@0.5 of the boxes of the predicted masks' connected
components (training.masks, the served post-processing) against the ground-truth instance boxes
(torchmetrics MeanAveragePrecision on the pycocotools backend). Ground-truth instances smaller than the
detector's min_area are marked crowd: neither a miss nor a false positive.

With instance maps the metrics also split what the mIoU loses between the masks and the classes: foreground IoU
(object vs background, whatever the class), the share of the object pixels found as objects that carry the right
class, the mIoU the predicted masks would score with every found object pixel given its true class
(`miou_true_classes`: what the masks allow) and the mIoU the true masks would score with each instance given the
class the model votes for it (`miou_true_masks`: its summed object-class probabilities over the instance's
pixels; what the classes allow).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassJaccardIndex

from training.clips import instance_boxes
from training.masks import DEFAULT_MIN_AREA, masks_to_detections
from training.presets import eval_batch
from training.seg_data import FrameSet


class SegMetrics:
    """Accumulates pixel loss and accuracy, per-class IoU and (with instance maps) AP@0.5 over batches."""

    def __init__(self, classes: Sequence[str], detections: bool = False, min_area: int = DEFAULT_MIN_AREA):
        self.classes, self.min_area = list(classes), min_area
        self.jaccard = MulticlassJaccardIndex(len(classes), average="none", validate_args=False)
        self.map = None
        if detections:
            from torchmetrics.detection import MeanAveragePrecision

            self.map = MeanAveragePrecision(box_format="xyxy", iou_thresholds=[0.5], class_metrics=True,
                                            backend="pycocotools")
        self.loss_sum, self.correct, self.pixels = 0.0, 0, 0
        self.true_classes = MulticlassJaccardIndex(len(classes), average="none", validate_args=False)
        self.true_masks = MulticlassJaccardIndex(len(classes), average="none", validate_args=False)
        self.fg_inter, self.fg_union, self.found, self.found_right = 0, 0, 0, 0

    def update(self, logits: torch.Tensor, masks: torch.Tensor, instances: torch.Tensor | None = None) -> None:
        """logits (N, K, h, w) (resized to the masks' size when they differ), masks and instances (N, H, W)."""
        logits, masks = logits.float().cpu(), masks.long().cpu()
        if logits.shape[-2:] != masks.shape[-2:]:
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        self.loss_sum += float(F.cross_entropy(logits, masks, reduction="sum"))
        pred = logits.argmax(1)
        self.correct += int((pred == masks).sum())
        self.pixels += masks.numel()
        self.jaccard.update(pred, masks)
        if instances is None:
            return
        probs = logits.softmax(1)
        self._split_errors(pred, probs, masks, instances.long().cpu())
        if self.map is not None:
            scores = probs.gather(1, pred.unsqueeze(1)).squeeze(1)
            preds = [_as_map_input(masks_to_detections(p, q, self.min_area)) for p, q in zip(pred, scores)]
            self.map.update(preds, [instance_truth(m, i, self.min_area) for m, i in zip(masks, instances.long().cpu())])

    def _split_errors(self, pred: torch.Tensor, probs: torch.Tensor, masks: torch.Tensor,
                      instances: torch.Tensor) -> None:
        fg_pred, fg_true = pred > 0, masks > 0
        found = fg_pred & fg_true
        self.fg_inter += int(found.sum())
        self.fg_union += int((fg_pred | fg_true).sum())
        self.found += int(found.sum())
        self.found_right += int((pred[found] == masks[found]).sum())
        self.true_classes.update(torch.where(found, masks, pred), masks)
        n, k = probs.shape[:2]
        slots = int(instances.max()) + 1
        index = (torch.arange(n).view(n, 1, 1) * slots + instances).view(-1)
        votes = torch.zeros(n * slots, k).index_add_(0, index, probs.permute(0, 2, 3, 1).reshape(-1, k))
        label = votes[:, 1:].argmax(1) + 1  # the object class each instance gets most probability for
        self.true_masks.update(torch.where(instances > 0, label[index].view_as(masks), 0), masks)

    def compute(self) -> dict[str, Any]:
        iou = self.jaccard.compute().tolist()
        out: dict[str, Any] = {
            "loss": self.loss_sum / max(1, self.pixels), "pixel_acc": self.correct / max(1, self.pixels),
            "miou": sum(iou) / len(iou), "miou_objects": sum(iou[1:]) / max(1, len(iou) - 1),
            "per_class_iou": dict(zip(self.classes, iou))}
        if self.fg_union:
            out["errors"] = {"fg_iou": self.fg_inter / self.fg_union,
                             "class_right_on_found": self.found_right / max(1, self.found),
                             "miou_true_classes": float(self.true_classes.compute().mean()),
                             "miou_true_masks": float(self.true_masks.compute().mean())}
        if self.map is not None:
            r = self.map.compute()
            out["ap50"] = float(r["map_50"])
            out["ap50_per_class"] = {self.classes[int(k)]: float(v) if v >= 0 else None  # -1: no such instance
                                     for k, v in zip(r["classes"].view(-1), r["map_per_class"].view(-1))}
        return out


def instance_truth(mask: torch.Tensor, inst: torch.Tensor, min_area: int = DEFAULT_MIN_AREA) -> dict[str, torch.Tensor]:
    """Ground truth of one frame: a box and class per visible instance, iscrowd where it shows fewer than
    min_area pixels (too small to count either way)."""
    ids = int(inst.max())
    boxes, visible = instance_boxes(inst[None], ids)
    fg = inst > 0
    area = torch.bincount(inst.view(-1), minlength=ids + 1)[1:]
    labels = torch.zeros(ids, dtype=torch.long).scatter_reduce(0, inst[fg] - 1, mask[fg].long(), "amax")
    keep = visible[0]
    return {"boxes": boxes[0, keep].float(), "labels": labels[keep], "iscrowd": (area[keep] < min_area).long()}


def _as_map_input(dets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor([d["box"] for d in dets], dtype=torch.float32).view(-1, 4),
            "scores": torch.tensor([d["score"] for d in dets], dtype=torch.float32),
            "labels": torch.tensor([d["index"] for d in dets], dtype=torch.long)}


@torch.inference_mode()
def predict_logits(model: nn.Module, frames: torch.Tensor, preprocess: dict[str, Any], device: torch.device | str,
                   autocast: bool = False, channels_last: bool = False) -> torch.Tensor:
    """(N, K, size, size) float logits for uint8 frames, through the checkpoint's eval transform."""
    x = eval_batch(frames, preprocess, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        return model(x).float()


def evaluate(model: nn.Module, sets: FrameSet | Iterable[FrameSet], preprocess: dict[str, Any], classes: Sequence[str],
             device: torch.device | str = "cpu", autocast: bool = False, channels_last: bool = False,
             detections: bool = False) -> dict[str, Any]:
    """Metrics over one or more FrameSets (AP@0.5 only with detections=True and instance maps)."""
    model.eval()
    metrics = SegMetrics(classes, detections)
    for fs in [sets] if isinstance(sets, FrameSet) else sets:
        for i in range(0, len(fs.frames), fs.batch_size):
            part = slice(i, i + fs.batch_size)
            logits = predict_logits(model, fs.frames[part], preprocess, device, autocast, channels_last)
            metrics.update(logits, fs.masks[part], None if fs.instances is None else fs.instances[part])
    return metrics.compute()


def run_eval(ckpt: dict[str, Any], checkpoint: str | Path, out_dir: str | Path, data_root: str | None = None,
             limit: int | None = None, clips_dir: str | Path | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Score a segmentation checkpoint on the held-out test clips it was trained for (or on the MP4 clips in
    clips_dir, decoded); write metrics.json and overlays.png (predictions next to the ground truth)."""
    from training.checkpoint import build_model
    from training.clips import make_config, read_clip
    from training.seg_data import limited, test_set
    from training.seg_report import overlay_figure
    from training.train import pick_device

    recipe, pre, classes = ckpt["recipe"], ckpt["preprocess"], list(ckpt["classes"])
    device = pick_device()
    model = build_model(ckpt).to(device)
    if clips_dir is not None:
        paths = sorted(Path(clips_dir).glob("*.mp4"))[:limit]
        if not paths:
            raise FileNotFoundError(f"no .mp4 clips in {clips_dir} (write some with python -m training clips)")
        sets, source = [], f"{len(paths)} MP4 clips in {clips_dir}"
        for p in paths:
            frames, _, maps = read_clip(p)
            sets.append(FrameSet(frames, maps["masks"], maps["instances"], batch_size))
    else:
        cfg = limited(make_config(recipe.get("data_args")), limit)
        sets = [test_set(cfg, pre["size"], batch_size, data_root or recipe.get("data_root"))]
        source = f"{cfg.test_clips} test clips x {cfg.clip_frames} frames (seeds 0..{cfg.test_clips - 1}), generated"
    result = evaluate(model, sets, pre, classes, device, detections=True)
    trained = ckpt["metrics"]
    result = {"checkpoint": str(checkpoint), "arch": ckpt["arch"], "task": "segmentation", "data": source,
              "frames": sum(len(s.frames) for s in sets), "img_size": pre["size"], **result,
              "training": {"train_time_s": trained.get("train_time_s"), "train_cpu_s": trained.get("train_cpu_s"),
                           "hardware": trained.get("hardware"), "epochs": trained.get("epochs"),
                           "steps": trained.get("steps"),
                           "val_miou": [row.get("val_miou") for row in trained.get("history", [])]},
              "init": ckpt.get("init"), "recipe": ckpt["recipe"]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = sets[0]
    pick = torch.linspace(0, len(shown.frames) - 1, min(4, len(shown.frames))).long()
    logits = predict_logits(model, shown.frames[pick], pre, device)
    title = f"{ckpt['arch']}  {Path(checkpoint).name}  mIoU {result['miou']:.3f}  AP@0.5 {result['ap50']:.3f}"
    overlay_figure(shown.frames[pick], logits, shown.masks[pick].long(), shown.instances[pick].long(), classes,
                   title).savefig(out / "overlays.png", dpi=100)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def summary_lines(r: dict[str, Any]) -> list[str]:
    """The CLI's printout of a segmentation result."""
    lines = [f"{r['arch']}: mIoU {r['miou']:.4f} (objects only {r['miou_objects']:.4f}), AP@0.5 {r['ap50']:.4f}, "
             f"pixel accuracy {r['pixel_acc']:.4f} on {r['frames']} frames ({r['data']})",
             f"  {'class':<14}{'IoU':>8}{'AP@0.5':>9}"]
    for name, iou in r["per_class_iou"].items():
        ap = r.get("ap50_per_class", {}).get(name)
        lines.append(f"  {name:<14}{iou:>8.4f}{'' if ap is None else f'{ap:>9.4f}'}")
    if "errors" in r:
        e = r["errors"]
        lines.append(f"  where the mIoU is lost: foreground IoU {e['fg_iou']:.4f}, right class on "
                     f"{100 * e['class_right_on_found']:.1f} % of the object pixels found; mIoU with the true classes "
                     f"{e['miou_true_classes']:.4f}, with the true masks {e['miou_true_masks']:.4f}")
    return lines


class SegmentationLoss(nn.Module):
    """Per-pixel cross-entropy plus `dice_weight` x soft Dice loss (1 - mean over classes of 2|P∩T| / (|P| + |T|),
    over the whole batch): the Dice term weighs every class equally, however few pixels it covers."""

    def __init__(self, dice_weight: float = 0.0, label_smoothing: float = 0.0):
        super().__init__()
        self.dice_weight, self.label_smoothing = dice_weight, label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        if self.dice_weight:
            probs = logits.softmax(1)
            onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
            inter, total = (probs * onehot).sum((0, 2, 3)), (probs + onehot).sum((0, 2, 3))
            loss = loss + self.dice_weight * (1 - (2 * inter / total.clamp(min=1e-6)).mean())
        return loss
