"""Scores the opacity detector: box metrics (VOC, COCO) and image-level triage.

The metric functions take one dict per image; arrays may be numpy or CPU tensors:

    ground_truth  {"image_id": int, "boxes": (N, 4), "labels": (N,) int}
    predictions   {"image_id": int, "boxes": (K, 4), "scores": (K,), "labels": (K,) int}

Boxes are x1, y1, x2, y2 in continuous pixel coordinates of one common frame
(``evaluate_detector`` uses the stored image's). Image ids in ``ground_truth``
are unique and define the image set; an image without a predictions entry had
no detections, and predictions for an unknown image are an error. No score
threshold is applied for the box metrics: AP integrates over every operating
point, so all detections count. The score threshold only decides the
image-level call.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model.datasets import collate_detection
from model.preprocess import boxes_to_original

# VOC2010+ counts a detection as correct when IoU >= 0.5 (VOCevaldet.m:
# `ovmax >= minoverlap`), which is the SIIM-FISABIO-RSNA challenge's "mAP at
# IoU > 0.5"; the two differ only at IoU exactly 0.5.
VOC_IOU_THRESHOLD = 0.5
# COCOeval.stats order (pycocotools cocoeval.py, summarize()): the first six
# are AP@[.5:.95], AP@.5, AP@.75, and AP@[.5:.95] for small/medium/large areas.
COCO_STAT_NAMES = ("coco_ap", "coco_ap50", "coco_ap75", "coco_ap_small", "coco_ap_medium", "coco_ap_large")


@dataclass(frozen=True)
class _ImageBoxes:
    boxes: np.ndarray  # (N, 4) float64
    labels: np.ndarray  # (N,) int64
    scores: np.ndarray  # (N,) float64; ones for ground truth


def _numpy(value, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _image_boxes(entry: Mapping, *, scored: bool) -> _ImageBoxes:
    image_id = entry["image_id"]
    boxes = _numpy(entry["boxes"], np.float64)
    boxes = boxes.reshape(0, 4) if boxes.size == 0 else boxes
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"image {image_id}: boxes must be (N, 4), got shape {boxes.shape}")
    labels = _numpy(entry["labels"], np.int64)
    scores = _numpy(entry["scores"], np.float64) if scored else np.ones(len(boxes))
    if labels.ndim != 1 or scores.ndim != 1:
        raise ValueError(f"image {image_id}: labels and scores must be 1-D, got {labels.shape} and {scores.shape}")
    if not len(boxes) == len(labels) == len(scores):
        raise ValueError(
            f"image {image_id}: {len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores should agree"
        )
    return _ImageBoxes(boxes, labels, scores)


def _index(
    predictions: Sequence[Mapping], ground_truth: Sequence[Mapping]
) -> tuple[dict[int, _ImageBoxes], dict[int, _ImageBoxes]]:
    """Returns (predictions, ground truth) by image id, every ground-truth image
    present in both (an image without predictions gets an empty entry)."""
    truth: dict[int, _ImageBoxes] = {}
    for entry in ground_truth:
        if entry["image_id"] in truth:
            raise ValueError(f"ground truth lists image {entry['image_id']} twice")
        truth[entry["image_id"]] = _image_boxes(entry, scored=False)
    empty = _ImageBoxes(np.zeros((0, 4)), np.zeros(0, dtype=np.int64), np.zeros(0))
    detected: dict[int, _ImageBoxes] = dict.fromkeys(truth, empty)
    seen: set[int] = set()
    for entry in predictions:
        image_id = entry["image_id"]
        if image_id not in truth:
            raise ValueError(f"predictions for image {image_id}, which is not in the ground truth")
        if image_id in seen:
            raise ValueError(f"predictions list image {image_id} twice")
        seen.add(image_id)
        detected[image_id] = _image_boxes(entry, scored=True)
    return detected, truth


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of (A, 4) and (B, 4) x1, y1, x2, y2 boxes -> (A, B).

    Continuous coordinates (area = width * height), as COCO computes it; the
    VOC devkit's "+1" belongs to its inclusive integer pixel indices.
    """
    top_left = np.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = np.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    intersection = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a = np.prod(boxes_a[:, 2:] - boxes_a[:, :2], axis=1)
    area_b = np.prod(boxes_b[:, 2:] - boxes_b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def all_point_interpolated_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+ average precision (devkit VOCap.m) from a ranked list's curve.

    ``recall`` and ``precision`` (D,) are taken after each of the D ranked
    detections. Precision is replaced by its running maximum to the right (the
    best precision at this recall or beyond), and AP is the area under that
    envelope summed at every point where recall changes -- all points, not the
    VOC2007 11 sampled recalls.
    """
    recall_points = np.concatenate(([0.0], recall, [1.0]))
    envelope = np.concatenate(([0.0], precision, [0.0]))
    envelope = np.maximum.accumulate(envelope[::-1])[::-1]
    steps = np.flatnonzero(recall_points[1:] != recall_points[:-1])
    return float(np.sum((recall_points[steps + 1] - recall_points[steps]) * envelope[steps + 1]))


def voc_average_precision(
    predictions: Sequence[Mapping], ground_truth: Sequence[Mapping], *, iou_threshold: float = VOC_IOU_THRESHOLD
) -> dict[int, float]:
    """VOC2010+ all-point interpolated AP per class that has ground truth.

    Detections of a class are ranked by descending score (ties keep input
    order) and matched greedily: each goes to the ground-truth box of its image
    it overlaps most; it is a true positive if that IoU >= ``iou_threshold`` and
    the box is not yet taken, otherwise a false positive -- a duplicate stays a
    false positive even when another box overlaps it less (VOCevaldet.m).

    Returns:
        {label: AP in [0, 1]} for every label present in the ground truth.
    """
    detected, truth = _index(predictions, ground_truth)
    classes = sorted({int(label) for entry in truth.values() for label in entry.labels})
    return {label: _class_average_precision(label, detected, truth, iou_threshold) for label in classes}


def _class_average_precision(
    label: int, detected: dict[int, _ImageBoxes], truth: dict[int, _ImageBoxes], iou_threshold: float
) -> float:
    truth_boxes = {image_id: entry.boxes[entry.labels == label] for image_id, entry in truth.items()}
    taken = {image_id: np.zeros(len(boxes), dtype=bool) for image_id, boxes in truth_boxes.items()}
    num_truth = sum(len(boxes) for boxes in truth_boxes.values())

    ranked = [
        (score, image_id, box)
        for image_id, entry in detected.items()
        for box, score in zip(entry.boxes[entry.labels == label], entry.scores[entry.labels == label])
    ]
    ranked.sort(key=lambda detection: -detection[0])
    is_true_positive = np.zeros(len(ranked), dtype=bool)
    for rank, (_, image_id, box) in enumerate(ranked):
        candidates = truth_boxes[image_id]
        if not len(candidates):
            continue
        overlaps = box_iou(box[None], candidates)[0]
        best = int(np.argmax(overlaps))
        if overlaps[best] >= iou_threshold and not taken[image_id][best]:
            taken[image_id][best] = True
            is_true_positive[rank] = True

    true_positives = np.cumsum(is_true_positive)
    recall = true_positives / num_truth
    precision = true_positives / np.arange(1, len(ranked) + 1)
    return all_point_interpolated_ap(recall, precision)


def voc_map50(predictions: Sequence[Mapping], ground_truth: Sequence[Mapping]) -> float:
    """Mean over classes of VOC2010+ AP at IoU 0.5, the SIIM-FISABIO-RSNA
    study-image metric. With the one opacity class this is its AP. NaN when
    the ground truth has no boxes at all (precision is undefined)."""
    per_class = voc_average_precision(predictions, ground_truth)
    return float(np.mean(list(per_class.values()))) if per_class else math.nan


def coco_metrics(predictions: Sequence[Mapping], ground_truth: Sequence[Mapping]) -> dict[str, float]:
    """COCO box AP through pycocotools, with objects built in memory.

    Returns:
        ``coco_ap`` (AP@[.5:.95]), ``coco_ap50``, ``coco_ap75``,
        ``coco_ap_small``/``_medium``/``_large`` (area < 32², < 96², larger,
        in the boxes' pixel units); NaN where no ground truth qualifies
        (pycocotools reports -1). As COCO defines them, each image counts its
        100 highest-scoring detections.
    """
    detected, truth = _index(predictions, ground_truth)
    classes = sorted(
        {int(label) for entry in (*truth.values(), *detected.values()) for label in entry.labels}
    )
    images = [{"id": int(image_id)} for image_id in truth]
    categories = [{"id": label} for label in classes]
    truth_coco = _in_memory_coco(images, categories, _coco_annotations(truth, scored=False))
    detected_coco = _in_memory_coco(images, categories, _coco_annotations(detected, scored=True))

    evaluator = COCOeval(truth_coco, detected_coco, iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {
        name: math.nan if value < 0 else float(value)
        for name, value in zip(COCO_STAT_NAMES, evaluator.stats)
    }


def _coco_annotations(entries: dict[int, _ImageBoxes], *, scored: bool) -> list[dict]:
    annotations = []
    for image_id, entry in entries.items():
        for box, label, score in zip(entry.boxes, entry.labels, entry.scores):
            width, height = float(box[2] - box[0]), float(box[3] - box[1])
            annotation = {
                # COCOeval marks unmatched with id 0, so ids must start at 1.
                "id": len(annotations) + 1,
                "image_id": int(image_id),
                "category_id": int(label),
                "bbox": [float(box[0]), float(box[1]), width, height],
                "area": width * height,
                "iscrowd": 0,
            }
            if scored:
                annotation["score"] = float(score)
            annotations.append(annotation)
    return annotations


def _in_memory_coco(images: list[dict], categories: list[dict], annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


def image_level_metrics(
    predictions: Sequence[Mapping], ground_truth: Sequence[Mapping], score_threshold: float
) -> dict:
    """Image-level triage: does the image show any opacity?

    An image is called positive when its highest box score is >= the
    threshold, and is truly positive when it has any ground-truth box.

    Returns:
        ``sensitivity`` TP / (TP + FN) and ``specificity`` TN / (TN + FP)
        (NaN without positive, resp. negative, images), the four cell counts
        ``true_positive_images``, ``false_negative_images``,
        ``true_negative_images``, ``false_positive_images``, and
        ``positive_images``, ``negative_images``, ``num_images``.
    """
    detected, truth = _index(predictions, ground_truth)
    image_ids = list(truth)
    called = np.array([detected[i].scores.size > 0 and detected[i].scores.max() >= score_threshold for i in image_ids])
    actual = np.array([len(truth[i].boxes) > 0 for i in image_ids])
    true_positive = int(np.sum(called & actual))
    false_negative = int(np.sum(~called & actual))
    true_negative = int(np.sum(~called & ~actual))
    false_positive = int(np.sum(called & ~actual))
    positives, negatives = true_positive + false_negative, true_negative + false_positive
    return {
        "sensitivity": true_positive / positives if positives else math.nan,
        "specificity": true_negative / negatives if negatives else math.nan,
        "true_positive_images": true_positive,
        "false_negative_images": false_negative,
        "true_negative_images": true_negative,
        "false_positive_images": false_positive,
        "positive_images": positives,
        "negative_images": negatives,
        "num_images": len(image_ids),
    }


def recall_by_kind(
    predictions: Sequence[Mapping], ground_truth: Sequence[Mapping], *, score_threshold: float,
    iou_threshold: float = 0.3,
) -> dict[str, float]:
    """Box recall per opacity kind: the share of ground-truth boxes of each kind that some predicted
    box scoring >= `score_threshold` overlaps with IoU >= `iou_threshold`.

    Ground-truth entries carry ``kinds`` (one name per box, e.g. ``ground_glass``); entries without
    it are not counted. Returns ``{"recall_<kind>": recall}`` (NaN for a kind with no box) and
    ``{"boxes_<kind>": count}``.
    """
    detected, truth = _index(predictions, ground_truth)
    kinds = {entry["image_id"]: tuple(entry.get("kinds") or ()) for entry in ground_truth}
    found, total = {}, {}
    for image_id, expected in truth.items():
        if len(kinds[image_id]) != len(expected.boxes):
            continue
        predicted = detected[image_id]
        kept = predicted.boxes[predicted.scores >= score_threshold]
        overlaps = box_iou(expected.boxes, kept) if len(kept) and len(expected.boxes) else None
        for index, kind in enumerate(kinds[image_id]):
            total[kind] = total.get(kind, 0) + 1
            hit = overlaps is not None and bool((overlaps[index] >= iou_threshold).any())
            found[kind] = found.get(kind, 0) + int(hit)
    report = {}
    for kind in sorted(total):
        report[f"recall_{kind}"] = found[kind] / total[kind]
        report[f"boxes_{kind}"] = total[kind]
    return report


def normal_film_metrics(
    predictions: Sequence[Mapping], ground_truth: Sequence[Mapping], score_threshold: float
) -> dict[str, float]:
    """Films without any opacity: the share with a box scoring >= `score_threshold`
    (``normal_flagged_share``) and the mean number of such boxes per film (``boxes_per_normal_film``);
    NaN without normal films."""
    detected, truth = _index(predictions, ground_truth)
    normal = [image_id for image_id, expected in truth.items() if len(expected.boxes) == 0]
    if not normal:
        return {"normal_flagged_share": math.nan, "boxes_per_normal_film": math.nan}
    counts = [int(np.sum(detected[image_id].scores >= score_threshold)) for image_id in normal]
    return {"normal_flagged_share": sum(c > 0 for c in counts) / len(normal),
            "boxes_per_normal_film": sum(counts) / len(normal)}


def operating_threshold(
    predictions: Sequence[Mapping], ground_truth: Sequence[Mapping], *, max_normal_flagged: float = 0.05
) -> float:
    """The lowest image-level score threshold that flags at most `max_normal_flagged` of the normal
    films (a film is flagged when its best box scores >= the threshold): choose it on validation,
    report the test set at it. Never below the lowest score the model gave any box (when so few
    normal films have a box at all that any box may count, that is the threshold). NaN without
    normal films.
    """
    detected, truth = _index(predictions, ground_truth)
    best = sorted((float(detected[image_id].scores.max()) if detected[image_id].scores.size else 0.0
                   for image_id, expected in truth.items() if len(expected.boxes) == 0), reverse=True)
    if not best:
        return math.nan
    lowest = min((float(entry.scores.min()) for entry in detected.values() if entry.scores.size), default=0.0)
    allowed = int(math.floor(max_normal_flagged * len(best) + 1e-9))
    if allowed >= len(best):
        return lowest
    # Just above the (allowed + 1)-th best normal score: that film and all below it are not flagged.
    return max(float(np.nextafter(best[allowed], np.inf)), lowest)


def evaluate_detector(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    score_threshold: float = 0.5,
    progress: bool = True,
    num_workers: int = 0,
) -> tuple[dict, list[dict]]:
    """Runs ``model`` over ``dataset`` and scores it in original pixel coordinates.

    Args:
        model: a torchvision-style detector already on ``device``; in eval mode
            ``model(list of (1, H, W) tensors)`` returns per image
            {"boxes": (K, 4) x1, y1, x2, y2 in input pixels, "scores": (K,),
            "labels": (K,)}. Its train/eval mode is restored afterwards.
        dataset: yields the shared detection items (``model.datasets``).

    Returns:
        ``(report, detections)``. ``report`` holds ``voc_map50``, the
        ``coco_metrics`` keys, ``sensitivity``, ``specificity``, the
        image-level counts, the per-kind box recall at IoU 0.3
        (``recall_ground_glass``, ``recall_consolidation``: `recall_by_kind`, for
        datasets whose targets name each box's kind), the normal films flagged
        and their boxes (`normal_film_metrics`), the ``operating_threshold`` that
        flags at most 1 normal film in 20 on this set (`operating_threshold`),
        ``num_ground_truth_boxes``, ``num_detections`` and ``score_threshold``. ``detections`` are COCO results: one dict per box,
        {"image_id", "bbox": [x, y, w, h] in the stored image's pixels,
        "score", "category_id"}, in dataset order then model order.
    """
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_detection, num_workers=num_workers
    )
    predictions, ground_truth = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, targets in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
                outputs = model([image.to(device) for image in images])
                for output, target in zip(outputs, targets, strict=True):
                    predictions.append(_to_original(output, target, scored=True))
                    ground_truth.append(_to_original(target, target, scored=False))
    finally:
        model.train(was_training)

    report = {
        "voc_map50": voc_map50(predictions, ground_truth),
        **coco_metrics(predictions, ground_truth),
        **image_level_metrics(predictions, ground_truth, score_threshold),
        **recall_by_kind(predictions, ground_truth, score_threshold=score_threshold),
        **normal_film_metrics(predictions, ground_truth, score_threshold),
        "operating_threshold": operating_threshold(predictions, ground_truth),
        "num_ground_truth_boxes": sum(len(entry["boxes"]) for entry in ground_truth),
        "num_detections": sum(len(entry["boxes"]) for entry in predictions),
        "score_threshold": score_threshold,
    }
    return report, _coco_results(predictions)


def _to_original(boxes_entry: Mapping, target: Mapping, *, scored: bool) -> dict:
    """Moves an output or target to numpy with boxes in the stored image's pixels."""
    boxes = boxes_entry["boxes"].detach().cpu().numpy().astype(np.float64).reshape(-1, 4)
    entry = {
        "image_id": target["image_id"],
        "boxes": np.asarray(boxes_to_original(boxes, target["scale"]), dtype=np.float64).reshape(-1, 4),
        "labels": boxes_entry["labels"].detach().cpu().numpy().astype(np.int64),
    }
    if not scored and "kinds" in target:
        entry["kinds"] = tuple(target["kinds"])
    if scored:
        entry["scores"] = boxes_entry["scores"].detach().cpu().numpy().astype(np.float64)
    return entry


def _coco_results(predictions: list[dict]) -> list[dict]:
    return [
        {
            "image_id": int(entry["image_id"]),
            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
            "score": float(score),
            "category_id": int(label),
        }
        for entry in predictions
        for box, score, label in zip(entry["boxes"], entry["scores"], entry["labels"])
    ]
