"""Masks -> detections on hand-made label maps, and the segmentation metrics (IoU, mIoU, AP@0.5) on hand-made
masks whose answers are known."""

from __future__ import annotations

import pytest
import torch

from training.masks import labels_and_scores, masks_to_detections
from training.seg_eval import SegmentationLoss, SegMetrics, instance_truth

CLASSES = ["background", "a", "b", "c"]


def _labels() -> torch.Tensor:
    lab = torch.zeros(20, 30, dtype=torch.long)
    lab[2:6, 3:9] = 1  # class 1, 4 x 6
    lab[10:18, 20:28] = 1  # class 1 again, apart: a second component
    lab[10:14, 2:5] = 2  # class 2, 4 x 3
    lab[0, 29] = 3  # a single pixel of class 3: below any min_area > 1
    return lab


def test_one_detection_per_connected_component_with_exclusive_boxes():
    dets = masks_to_detections(_labels(), None, min_area=4)
    assert sorted((d["index"], d["box"]) for d in dets) == [
        (1, [3, 2, 9, 6]), (1, [20, 10, 28, 18]), (2, [2, 10, 5, 14])]
    assert all(d["score"] == 1.0 and d["label"] == d["index"] for d in dets)
    named = masks_to_detections(_labels(), None, min_area=1, classes=CLASSES)
    assert sorted(d["label"] for d in named) == ["a", "a", "b", "c"]  # min_area 1 keeps the single pixel


def test_scores_are_mean_class_probabilities_and_sort_the_detections():
    lab = _labels()
    scores = torch.zeros(20, 30)
    scores[2:6, 3:9] = 0.9
    scores[10:18, 20:24], scores[10:18, 24:28] = 0.4, 0.6  # mean 0.5
    scores[10:14, 2:5] = 0.7
    dets = masks_to_detections(lab, scores, min_area=4)
    assert [(d["index"], round(d["score"], 4)) for d in dets] == [(1, 0.9), (2, 0.7), (1, 0.5)]


def test_diagonal_neighbours_are_one_component_and_bad_shapes_are_errors():
    lab = torch.zeros(8, 8, dtype=torch.long)
    lab[torch.arange(8), torch.arange(8)] = 2  # a one-pixel-wide diagonal strap
    assert [d["box"] for d in masks_to_detections(lab, None, min_area=1)] == [[0, 0, 8, 8]]
    assert masks_to_detections(torch.zeros(8, 8, dtype=torch.long), None) == []
    with pytest.raises(ValueError, match=r"labels must be \(H, W\)"):
        masks_to_detections(torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"scores must be \(H, W\)"):
        masks_to_detections(lab, torch.zeros(8, 9))



def test_labels_and_scores_are_the_softmax_argmax_and_its_probability():
    logits = 3 * torch.randn(2, 11, 24, 24, generator=torch.Generator().manual_seed(0))
    logits[0, :, 0, 0] = 80.0  # every class level: the first wins, each at 1/11
    labels, scores = labels_and_scores(logits)
    probs, expected = torch.softmax(logits, dim=1).max(dim=1)
    assert torch.equal(labels, expected) and labels.dtype == torch.long
    assert torch.allclose(scores, probs, rtol=1e-6, atol=0) and float(scores[0, 0, 0]) == pytest.approx(1 / 11)


def test_many_small_components_keep_only_those_of_min_area_in_class_and_raster_order():
    lab = torch.zeros(40, 40, dtype=torch.long)
    lab[:20:2, :20:2] = torch.arange(100).reshape(10, 10) % 3 + 1  # 100 one-pixel components of classes 1-3
    lab[24:34, 0:10], lab[0:8, 26:36], lab[30:38, 26:34] = 2, 1, 2  # and three large garments apart from them
    scores = torch.full((40, 40), 0.5)
    scores[0:8, 26:36] = 0.75
    dets = masks_to_detections(lab, scores, min_area=50)
    assert [(d["index"], d["box"], d["score"]) for d in dets] == [
        (1, [26, 0, 36, 8], 0.75), (2, [0, 24, 10, 34], 0.5), (2, [26, 30, 34, 38], 0.5)]
    assert len(masks_to_detections(lab, None, min_area=1)) == 103

def _logits(pred: torch.Tensor, k: int = 4) -> torch.Tensor:
    return 10.0 * torch.nn.functional.one_hot(pred, k).permute(0, 3, 1, 2).float()


def test_iou_and_miou_on_hand_made_masks():
    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target[0, :, :5] = 1  # left half class 1 (50 px), right half background (50 px)
    pred = torch.zeros_like(target)
    pred[0, :, :4] = 1  # 40 px predicted class 1, all correct; 10 px of class 1 missed
    pred[0, 0, 9] = 2  # one background pixel called class 2
    m = SegMetrics(CLASSES)
    m.update(_logits(pred), target)
    r = m.compute()
    assert r["per_class_iou"]["a"] == pytest.approx(40 / 50)
    assert r["per_class_iou"]["background"] == pytest.approx(49 / 60)  # 49 right of 50, plus 10 predicted extra
    assert r["per_class_iou"]["b"] == 0.0
    assert r["pixel_acc"] == pytest.approx(89 / 100)
    assert r["miou"] == pytest.approx(sum(r["per_class_iou"].values()) / 4)


def test_ap50_of_component_boxes_against_instance_boxes():
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    inst = torch.zeros_like(masks)
    masks[:, 4:14, 4:14], inst[:, 4:14, 4:14] = 1, 1  # frame 0 and 1: a class-1 garment, 10 x 10
    masks[:, 20:30, 18:28], inst[:, 20:30, 18:28] = 2, 2  # and a class-2 garment
    masks[:, 0:2, 30:32], inst[:, 0:2, 30:32] = 3, 3  # and a 4-pixel sliver: crowd, counts neither way
    assert instance_truth(masks[0], inst[0], min_area=16)["iscrowd"].tolist() == [0, 0, 1]
    perfect = SegMetrics(CLASSES, detections=True, min_area=16)
    perfect.update(_logits(masks), masks, inst)
    assert perfect.compute()["ap50"] == pytest.approx(1.0)
    pred = masks.clone()
    pred[1, 20:30, 18:28] = 3  # frame 1: the class-2 garment called class 3
    pred[0, 4:14, 9:14] = 0  # frame 0: half of the class-1 garment missed: box IoU 0.5 ... still a hit
    pred[1, 4:14, 4:14] = 0
    pred[1, 4:8, 4:8] = 1  # frame 1: only a 4 x 4 corner found: IoU 0.16, a miss and a false positive
    r = SegMetrics(CLASSES, detections=True, min_area=16)
    r.update(_logits(pred), masks, inst)
    out = r.compute()
    assert out["ap50_per_class"]["b"] == pytest.approx(0.5, abs=0.02)  # found in one frame of two
    assert out["ap50_per_class"]["a"] == pytest.approx(0.5, abs=0.02)
    assert out["ap50"] < 1.0


def test_the_mIoU_loss_is_split_between_masks_and_classes():
    masks = torch.zeros(1, 10, 10, dtype=torch.long)
    inst = torch.zeros_like(masks)
    for k, cols in enumerate([slice(0, 3), slice(4, 7), slice(8, 10)], start=1):
        masks[0, :, cols], inst[0, :, cols] = k, k  # garments of classes a (30 px), b (30 px), c (20 px)
    wrong_class = masks.clone()
    wrong_class[0, :, 4:7] = 3  # exact masks, the b garment called c
    m = SegMetrics(CLASSES)
    m.update(_logits(wrong_class), masks, inst)
    r = m.compute()
    assert r["errors"]["fg_iou"] == 1.0 and r["errors"]["class_right_on_found"] == pytest.approx(50 / 80)
    assert r["errors"]["miou_true_classes"] == pytest.approx(1.0)  # the masks lose nothing
    assert r["miou"] == pytest.approx((1 + 1 + 0 + 20 / 50) / 4)
    assert r["errors"]["miou_true_masks"] == pytest.approx(r["miou"])  # with true masks, b still votes c
    short = masks.clone()
    short[0, :, 4] = 0  # right classes, a third of the b garment missed
    short[0, 0, 3] = 1  # and one background pixel called a
    m = SegMetrics(CLASSES)
    m.update(_logits(short), masks, inst)
    r = m.compute()
    assert r["errors"]["fg_iou"] == pytest.approx(70 / 81) and r["errors"]["class_right_on_found"] == 1.0
    assert r["errors"]["miou_true_masks"] == pytest.approx(1.0)  # the classes lose nothing
    assert r["errors"]["miou_true_classes"] == pytest.approx(r["miou"]) and r["miou"] < 0.9


def test_dice_term_is_zero_for_a_perfect_prediction():
    target = torch.randint(0, 4, (2, 8, 8))
    logits = 50.0 * torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float()
    assert SegmentationLoss(dice_weight=1.0)(logits, target) == pytest.approx(0.0, abs=1e-4)
    wrong = SegmentationLoss(dice_weight=1.0)(torch.zeros(2, 4, 8, 8, requires_grad=True), target)
    assert wrong > SegmentationLoss()(torch.zeros(2, 4, 8, 8), target)  # the Dice term adds to the CE
