"""Evaluation: hand-computed VOC/COCO/image-level cases, the model loop, the CLI."""

import argparse
import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from model.datasets import detection_item
from model.evaluate_cli import DATA_FORMATS, add_parser, format_table, write_report
from model.evaluation import (
    box_iou,
    coco_metrics,
    evaluate_detector,
    image_level_metrics,
    normal_film_metrics,
    operating_threshold,
    recall_by_kind,
    voc_average_precision,
    voc_map50,
)
from model.preprocess import PreparedImage
from model.readers import FORMATS


def truth(image_id, boxes, labels=None):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return {"image_id": image_id, "boxes": boxes, "labels": np.ones(len(boxes), int) if labels is None else labels}


def detected(image_id, boxes, scores, labels=None):
    entry = truth(image_id, boxes, labels)
    return {**entry, "scores": np.asarray(scores, dtype=np.float64)}


A, B, C, D = [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10], [40, 40, 60, 60]
# Image 1 holds A and B, image 2 C and D, image 3 nothing.
GROUND_TRUTH = [truth(1, [A, B]), truth(2, [C, D]), truth(3, [])]


def test_box_iou_by_hand():
    # Overlap 5x10 = 50, union 100 + 100 - 50 = 150.
    iou = box_iou(np.array([[0.0, 0, 10, 10]]), np.array([[5.0, 0, 15, 10], [20.0, 20, 30, 30]]))
    np.testing.assert_allclose(iou, [[1 / 3, 0.0]])


def test_perfect_predictions_score_one_everywhere():
    predictions = [detected(1, [A, B], [0.9, 0.8]), detected(2, [C, D], [0.7, 0.95])]

    assert voc_map50(predictions, GROUND_TRUTH) == 1.0
    coco = coco_metrics(predictions, GROUND_TRUTH)
    # All four boxes are 10x10 or 20x20: small (area < 32²); no medium or large truth.
    assert coco["coco_ap"] == coco["coco_ap50"] == coco["coco_ap75"] == coco["coco_ap_small"] == 1.0
    assert math.isnan(coco["coco_ap_medium"]) and math.isnan(coco["coco_ap_large"])
    image_level = image_level_metrics(predictions, GROUND_TRUTH, score_threshold=0.5)
    assert image_level["sensitivity"] == image_level["specificity"] == 1.0


def test_voc_ap_with_false_positive_ranked_first_a_duplicate_and_a_miss():
    predictions = [
        detected(3, [[0, 0, 10, 10]], [0.9]),  # FP: image 3 has no truth
        detected(1, [A, [1, 0, 11, 10], B], [0.8, 0.7, 0.5]),  # TP on A; duplicate of A (IoU 90/110); TP on B
        detected(2, [C], [0.6]),  # TP on C; D is never found
    ]
    # Ranked: FP(.9) TP(.8) FP-dup(.7) TP(.6) TP(.5); 4 truth boxes.
    #   precision 0, 1/2, 1/3, 2/4, 3/5    recall 0, 1/4, 1/4, 2/4, 3/4
    # The envelope (max precision at this recall or beyond) is 3/5 up to recall 3/4, so
    #   AP = (1/4)(3/5) + (1/4)(3/5) + (1/4)(3/5) = 0.45
    # (uninterpolated it would be (1/4)(1/2 + 1/2 + 3/5) = 0.40).
    assert voc_map50(predictions, GROUND_TRUTH) == pytest.approx(0.45)


def test_a_duplicate_stays_false_even_when_another_truth_box_overlaps_it():
    # VOC matches a detection only to its best-overlapping truth box; once that is
    # taken, the detection is a false positive although it overlaps the second box (IoU 0.6).
    ground_truth = [truth(1, [[0, 0, 10, 10], [0, 0, 10, 6]])]
    predictions = [detected(1, [[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8])]
    # Ranked TP, FP: recall 1/2, 1/2, precision 1, 1/2 -> AP = 1/2 * 1.
    assert voc_map50(predictions, ground_truth) == pytest.approx(0.5)


def test_voc_is_computed_per_class_and_averaged():
    ground_truth = [truth(1, [A, B], labels=np.array([1, 2]))]
    predictions = [detected(1, [B, A, B], [0.9, 0.8, 0.7], labels=np.array([2, 1, 1]))]
    # Class 1: its detection on B (0.7) is a false positive after the TP on A: AP 1.
    # Class 2: a single TP: AP 1. A class-1 box on B must not count for class 2.
    assert voc_average_precision(predictions, ground_truth) == {1: 1.0, 2: 1.0}
    predictions = [detected(1, [A, B], [0.9, 0.8], labels=np.array([2, 2]))]
    # Class 1 found nothing (AP 0); class 2: FP then TP -> 1/2.
    assert voc_average_precision(predictions, ground_truth) == {1: 0.0, 2: 0.5}
    assert voc_map50(predictions, ground_truth) == pytest.approx(0.25)


def test_coco_ap50_agrees_with_voc_on_a_simple_case():
    shifted = [[2, 0, 12, 10]]  # IoU with A or C is 80/120 = 2/3: a hit at 0.5, a miss at 0.75
    predictions = [
        detected(1, [A, [70, 70, 80, 80], B], [0.9, 0.8, 0.7]),
        detected(2, shifted, [0.6]),
    ]
    # Ranked TP FP TP TP over 4 truth: precision 1, 1/2, 2/3, 3/4; recall 1/4, 1/4, 1/2, 3/4.
    # VOC all-point: 1/4 * 1 + 1/2 * 3/4 = 0.625. COCO samples 101 recalls: 26 at
    # precision 1, 50 at 3/4 -> 63.5/101 = 0.6287.
    voc = voc_map50(predictions, GROUND_TRUTH)
    coco = coco_metrics(predictions, GROUND_TRUTH)
    assert voc == pytest.approx(0.625)
    assert coco["coco_ap50"] == pytest.approx(63.5 / 101)
    assert coco["coco_ap50"] == pytest.approx(voc, abs=0.01)
    # At 0.75 the shifted box misses: TP FP TP over 4 -> 26 * 1 + 25 * 2/3 over 101.
    assert coco["coco_ap75"] == pytest.approx((26 + 25 * 2 / 3) / 101)


def test_no_detections_scores_zero_and_no_truth_is_undefined():
    assert voc_map50([], GROUND_TRUTH) == 0.0
    assert coco_metrics([], GROUND_TRUTH)["coco_ap"] == 0.0
    negatives_only = [truth(5, [])]
    assert math.isnan(voc_map50([detected(5, [A], [0.9])], negatives_only))
    assert math.isnan(coco_metrics([detected(5, [A], [0.9])], negatives_only)["coco_ap"])


def test_image_level_confusion_table():
    ground_truth = [truth(1, [A]), truth(2, [A]), truth(3, [A]), truth(4, []), truth(5, []), truth(6, [])]
    predictions = [
        detected(1, [A, B], [0.2, 0.9]),  # max 0.9 >= 0.5 and has truth: TP
        detected(2, [A], [0.3]),  # below threshold: FN
        detected(3, [], []),  # nothing: FN
        detected(4, [B], [0.2]),  # TN
        # image 5 has no entry: TN
        detected(6, [B], [0.5]),  # exactly at threshold counts as called: FP
    ]
    metrics = image_level_metrics(predictions, ground_truth, score_threshold=0.5)
    assert metrics == {
        "sensitivity": pytest.approx(1 / 3),
        "specificity": pytest.approx(2 / 3),
        "true_positive_images": 1,
        "false_negative_images": 2,
        "true_negative_images": 2,
        "false_positive_images": 1,
        "positive_images": 3,
        "negative_images": 3,
        "num_images": 6,
    }


def test_inconsistent_inputs_are_rejected():
    with pytest.raises(ValueError, match="predictions for image 9, which is not in the ground truth"):
        voc_map50([detected(9, [A], [0.9])], GROUND_TRUTH)
    with pytest.raises(ValueError, match="ground truth lists image 1 twice"):
        voc_map50([], [truth(1, [A]), truth(1, [])])
    with pytest.raises(ValueError, match="image 1: 1 boxes, 1 labels and 2 scores"):
        coco_metrics([detected(1, [A], [0.9, 0.1])], GROUND_TRUTH)
    with pytest.raises(ValueError, match=r"image 2: boxes must be \(N, 4\), got shape \(4,\)"):
        voc_map50([], [{"image_id": 2, "boxes": np.array(A, float), "labels": np.ones(1, int)}])


class ScriptedDetector(torch.nn.Module):
    """Returns prepared outputs in call order, checking how it is called."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        assert not self.training and torch.is_inference_mode_enabled()
        assert all(image.shape == (1, 100, 50) for image in images)
        batch, self.outputs = self.outputs[: len(images)], self.outputs[len(images):]
        return batch


def scripted_output(boxes, scores):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": boxes, "scores": torch.tensor(scores), "labels": torch.ones(len(boxes), dtype=torch.int64)}


def half_scale_dataset():
    """Three 200x100 (rows x cols) images prepared at scale 0.5 to 100x50."""
    def item(image_id, boxes_original):
        prepared = PreparedImage(image=np.zeros((100, 50), np.float32), scale=0.5, original_shape=(200, 100))
        return detection_item(prepared, np.array(boxes_original, np.float32).reshape(-1, 4), image_id)

    return [item(10, [[20, 20, 60, 60]]), item(11, []), item(12, [[10, 10, 50, 50]])]


def test_evaluate_detector_maps_boxes_back_and_scores_them():
    model = ScriptedDetector([
        scripted_output([[10, 10, 30, 30], [0, 0, 5, 5]], [0.9, 0.3]),  # hit on image 10, low-score FP
        scripted_output([[40, 40, 45, 48]], [0.6]),  # FP on the negative image 11
        scripted_output([], []),  # image 12's opacity is missed
    ])
    model.train()

    report, detections = evaluate_detector(model, half_scale_dataset(), batch_size=2, progress=False)

    assert model.training and model.outputs == []
    # Resized boxes / 0.5 -> original: [20, 20, 60, 60] (hit), [0, 0, 10, 10], [80, 80, 90, 96].
    assert detections == [
        {"image_id": 10, "bbox": [20.0, 20.0, 40.0, 40.0], "score": pytest.approx(0.9), "category_id": 1},
        {"image_id": 10, "bbox": [0.0, 0.0, 10.0, 10.0], "score": pytest.approx(0.3), "category_id": 1},
        {"image_id": 11, "bbox": [80.0, 80.0, 10.0, 16.0], "score": pytest.approx(0.6), "category_id": 1},
    ]
    # Ranked TP(.9) FP(.6) FP(.3) over 2 truth boxes: VOC AP = 1/2 * 1.
    # COCO: recall 1/2 at precision 1 for every IoU threshold (the hit is exact):
    # 51 of 101 recall samples. Both truth boxes are 40x40 = 1600 px² (medium);
    # the FPs are small and ignored in the medium range; no small or large truth.
    # Image level at 0.5: image 10 TP, 11 FP, 12 FN.
    assert report == {
        "voc_map50": pytest.approx(0.5),
        "coco_ap": pytest.approx(51 / 101),
        "coco_ap50": pytest.approx(51 / 101),
        "coco_ap75": pytest.approx(51 / 101),
        "coco_ap_small": pytest.approx(math.nan, nan_ok=True),
        "coco_ap_medium": pytest.approx(51 / 101),
        "coco_ap_large": pytest.approx(math.nan, nan_ok=True),
        "sensitivity": 0.5,
        "specificity": 0.0,
        "true_positive_images": 1,
        "false_negative_images": 1,
        "true_negative_images": 0,
        "false_positive_images": 1,
        "positive_images": 2,
        "negative_images": 1,
        "num_images": 3,
        # The negative image 11 has one box >= 0.5; only a threshold above its 0.6 flags no normal film.
        "normal_flagged_share": 1.0,
        "boxes_per_normal_film": 1.0,
        "operating_threshold": pytest.approx(0.6),
        "num_ground_truth_boxes": 2,
        "num_detections": 3,
        "score_threshold": 0.5,
    }


def test_cli_formats_match_readers():
    assert DATA_FORMATS == FORMATS


def test_cli_run_evaluates_a_checkpoint_and_writes_report(tmp_path, monkeypatch, capsys):
    from PIL import Image

    Image.fromarray(np.zeros((200, 100), np.uint8)).save(tmp_path / "a.png")
    coco = {
        "images": [{"id": 4, "file_name": "a.png"}],
        "annotations": [{"id": 1, "image_id": 4, "category_id": 1, "bbox": [20, 20, 40, 40]}],
        "categories": [{"id": 1, "name": "opacity"}],
    }
    (tmp_path / "val.json").write_text(json.dumps(coco))
    loaded = types.SimpleNamespace(
        model=ScriptedDetector([scripted_output([[10, 10, 30, 30]], [0.8])]),
        config=types.SimpleNamespace(input_size=100),
        arch="cascade_rcnn_test",
        version=3,
    )
    requested = []
    fake_checkpoint = types.ModuleType("model.checkpoint")
    fake_checkpoint.load_detector = lambda path, device: requested.append((path, device)) or loaded
    monkeypatch.setitem(sys.modules, "model.checkpoint", fake_checkpoint)

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args([
        "evaluate", "--weights", str(tmp_path / "w.safetensors"), "--data", str(tmp_path / "val.json"),
        "--format", "coco", "--report", str(tmp_path / "out" / "eval.json"), "--score-threshold", "0.7",
    ])
    assert args.func(args) == 0

    assert requested == [(tmp_path / "w.safetensors", "cpu")]
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["voc_map50"] == 1.0 and report["sensitivity"] == 1.0 and report["specificity"] is None
    assert report["score_threshold"] == 0.7 and report["arch"] == "cascade_rcnn_test"
    assert report["dataset"]["format"] == "coco" and "not for clinical use" in report["disclaimer"]
    assert report["detections_file"] == "eval.detections.json"
    detections = json.loads((tmp_path / "out" / "eval.detections.json").read_text())
    assert detections == [{"image_id": 4, "bbox": [20.0, 20.0, 40.0, 40.0], "score": pytest.approx(0.8),
                           "category_id": 1}]
    printed = capsys.readouterr().out
    assert "VOC mAP@0.5 (SIIM metric)" in printed and "1.0000" in printed and "n/a" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "x.json"], "--data needs --format"),
        (["--synthetic-seed", "9001", "--image-root", "imgs"], "--image-root applies to --format coco only"),
        (["--synthetic-seed", "9001", "--num-images", "0"], "--num-images must be at least 1"),
    ],
)
def test_cli_rejects_inconsistent_arguments(argv, message):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["evaluate", "--weights", "w.safetensors", *argv])
    with pytest.raises(SystemExit, match=message):
        args.func(args)


def test_report_json_writes_nan_as_null_and_table_skips_missing(tmp_path):
    detections_path = write_report({"voc_map50": math.nan, "num_images": 2}, [], tmp_path / "r.json")
    assert detections_path == tmp_path / "r.detections.json" and json.loads(detections_path.read_text()) == []
    assert json.loads((tmp_path / "r.json").read_text()) == {
        "voc_map50": None, "num_images": 2, "detections_file": "r.detections.json"}
    table = format_table({"voc_map50": 0.25, "num_images": 2})
    assert "0.2500" in table and "images" in table and "COCO" not in table


def _entry(image_id, boxes, scores=None, kinds=None):
    entry = {"image_id": image_id, "boxes": np.array(boxes, dtype=np.float64).reshape(-1, 4),
             "labels": np.ones(len(boxes), dtype=np.int64)}
    if scores is not None:
        entry["scores"] = np.array(scores, dtype=np.float64)
    if kinds is not None:
        entry["kinds"] = tuple(kinds)
    return entry


def test_recall_by_kind_counts_each_kinds_boxes_found_at_iou_03_above_the_threshold():
    truth = [_entry(1, [[0, 0, 10, 10], [50, 50, 70, 70]], kinds=["ground_glass", "consolidation"]),
             _entry(2, [[0, 0, 20, 20]], kinds=["ground_glass"])]
    predicted = [_entry(1, [[0, 0, 10, 6], [50, 50, 70, 70]], [0.9, 0.4]),  # IoU 0.6 hit; a hit below 0.5
                 _entry(2, [[10, 10, 30, 30]], [0.8])]                        # IoU 100/700 < 0.3: a miss
    assert recall_by_kind(predicted, truth, score_threshold=0.5) == {
        "recall_consolidation": 0.0, "boxes_consolidation": 1, "recall_ground_glass": 0.5, "boxes_ground_glass": 2}
    assert recall_by_kind(predicted, truth, score_threshold=0.3)["recall_consolidation"] == 1.0


def test_the_operating_threshold_flags_at_most_one_normal_film_in_twenty():
    truth = [_entry(i, []) for i in range(40)] + [_entry(40, [[0, 0, 10, 10]])]
    best = [0.95, 0.9, 0.7] + [0.1] * 37   # three normal films look positive
    predicted = [_entry(i, [[0, 0, 5, 5]], [score]) for i, score in enumerate(best)] + [
        _entry(40, [[0, 0, 10, 10]], [0.99])]
    threshold = operating_threshold(predicted, truth)
    assert 0.7 < threshold <= 0.7 + 1e-9                 # 2 of 40 flagged (0.95, 0.9): 1 in 20
    assert normal_film_metrics(predicted, truth, threshold) == {"normal_flagged_share": 0.05,
                                                                  "boxes_per_normal_film": 0.05}
    assert math.isnan(operating_threshold(predicted[40:], truth[40:]))  # no normal film
