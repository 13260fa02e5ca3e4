"""The pipeline loses no detection accuracy: `medtwin run` scores as `medtwin evaluate` does.

A small simulated hospital is imaged; its intact X-rays, with the simulator's
lesion boxes (``truth/lesions.json``, original pixels), become a COCO file that
`medtwin evaluate` reads from the same DICOM files. The two paths share only the
weights and ``model.preprocess``: the pipeline fetches, decodes and batches with
Beam and writes Parquet; evaluate reads files through ``model.readers`` and runs
the torchvision model directly. So the checks below compare independent paths:

* every intact image has one detections row, sized as the stored image;
* the pipeline's boxes and scores are evaluate's, image by image;
* VOC mAP@0.5, COCO AP, box recall/precision and image sensitivity/specificity
  computed from the pipeline's rows against the truth equal evaluate's report;
* boxes are in original pixels: inside the stored image (twice the model
  input's size), and on the truth lesions there, not at half their coordinates.

Research measurements of a research model, not for clinical use.
"""

import json
import math

import numpy as np
import pytest

from model.evaluation import box_iou, coco_metrics, image_level_metrics, voc_map50
from pipelines.cli import main
from pipelines.config import DEFAULT_WEIGHTS
from pipelines.query import connect
from transforms.detect import read_model_info

# 24 patients over 3 hours give 16 intact chest X-rays, 12 with opacities.
SIMULATE = ["--patients", "24", "--devices", "2", "--hours", "3", "--seed", "3", "--sample-seconds", "60",
            "--infected-fraction", "0.5", "--quiet"]
# Rows of every simulated radiograph (`medtwin simulate --image-size`), twice the model input.
IMAGE_ROWS = 512
# The pipeline's box threshold and the model's own (box_score_thresh), so both paths keep the same boxes.
SCORE_THRESHOLD = 0.05
# Image-level call and box recall/precision operating point: evaluate's default.
CALL_THRESHOLD = 0.5
BOX_TOLERANCE_PX = 1e-2
SCORE_TOLERANCE = 1e-4
METRIC_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    """Simulates, runs the pipeline and runs `medtwin evaluate` on the same images.

    Returns {"truth": lesions by SOP UID, "uids": sorted SOP UIDs (COCO image id = index),
    "rows": detections rows by SOP UID, "report": evaluate's report, "evaluated": its
    detections by image id}.
    """
    root = tmp_path_factory.mktemp("imaging")
    hospital_dir, output_dir = root / "in", root / "out"
    assert main(["simulate", "--out", str(hospital_dir), *SIMULATE]) == 0
    assert main(["run", "--input", str(hospital_dir), "--output", str(output_dir), "--demo",
                 "--score_threshold", str(SCORE_THRESHOLD)]) == 0

    truth = json.loads((hospital_dir / "truth" / "lesions.json").read_text())
    uids = sorted(truth)
    annotations = root / "lesions_coco.json"
    annotations.write_text(json.dumps(_coco_annotations(truth, uids)))
    report_path = root / "eval" / "report.json"
    # torchvision pads an evaluate batch to its widest image, rounded up to 32 px; the pipeline
    # pads every image to the model's square input. One batch holding an image wider than
    # 224 px after resizing gives evaluate that same padding, so both feed the model alike.
    assert main(["evaluate", "--weights", DEFAULT_WEIGHTS, "--data", str(annotations), "--format", "coco",
                 "--image-root", str(hospital_dir), "--report", str(report_path),
                 "--batch-size", str(len(uids)), "--score-threshold", str(CALL_THRESHOLD)]) == 0

    evaluated = {image_id: [] for image_id in range(len(uids))}
    for detection in json.loads(report_path.with_name("report.detections.json").read_text()):
        x, y, width, height = detection["bbox"]
        evaluated[detection["image_id"]].append((x, y, x + width, y + height, detection["score"]))
    cursor = connect(str(output_dir)).execute("select * from detections")
    columns = [column[0] for column in cursor.description]
    rows = {row["sop_instance_uid"]: row for row in (dict(zip(columns, values)) for values in cursor.fetchall())}
    return {"truth": truth, "uids": uids, "rows": rows, "report": json.loads(report_path.read_text()),
            "evaluated": evaluated}


def _coco_annotations(truth: dict, uids: list[str]) -> dict:
    """The simulator's lesions as a COCO detection file; file names are relative to the hospital."""
    images = [{"id": image_id, "file_name": truth[uid]["path"], "height": truth[uid]["rows"],
               "width": truth[uid]["columns"]} for image_id, uid in enumerate(uids)]
    boxes = [(image_id, box) for image_id, uid in enumerate(uids) for box in truth[uid]["boxes"]]
    annotations = [{"id": number, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                    "bbox": [x1, y1, x2 - x1, y2 - y1]}
                   for number, (image_id, (x1, y1, x2, y2)) in enumerate(boxes, start=1)]
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "opacity"}]}


def _pipeline_boxes(row: dict) -> np.ndarray:
    """(K, 5) x1, y1, x2, y2, score of a detections row, highest score first."""
    boxes = np.array([[b["x1"], b["y1"], b["x2"], b["y2"], b["score"]] for b in row["boxes"]]).reshape(-1, 5)
    return boxes[np.argsort(-boxes[:, 4], kind="stable")]


def _evaluated_boxes(entries: list) -> np.ndarray:
    boxes = np.array(entries, dtype=np.float64).reshape(-1, 5)
    return boxes[np.argsort(-boxes[:, 4], kind="stable")]


def _ground_truth(hospital) -> list[dict]:
    """The simulator's boxes (original pixels) in ``model.evaluation``'s form, image id = index."""
    entries = []
    for image_id, uid in enumerate(hospital["uids"]):
        boxes = np.asarray(hospital["truth"][uid]["boxes"], dtype=np.float64).reshape(-1, 4)
        entries.append({"image_id": image_id, "boxes": boxes, "labels": np.ones(len(boxes), dtype=np.int64)})
    return entries


def _predictions(boxes_by_image: dict[int, np.ndarray]) -> list[dict]:
    return [{"image_id": image_id, "boxes": boxes[:, :4], "scores": boxes[:, 4],
             "labels": np.ones(len(boxes), dtype=np.int64)} for image_id, boxes in boxes_by_image.items()]


def _pipeline_predictions(hospital) -> list[dict]:
    return _predictions({image_id: _pipeline_boxes(hospital["rows"][uid])
                         for image_id, uid in enumerate(hospital["uids"])})


def _box_recall_precision(predictions: list[dict], ground_truth: list[dict], score_threshold: float) -> dict:
    """Box recall and precision at IoU 0.5 of the boxes scoring at least ``score_threshold``,
    each truth box matched at most once, highest score first (VOC's greedy matching)."""
    truth_boxes = {entry["image_id"]: entry["boxes"] for entry in ground_truth}
    matched = kept = 0
    for entry in predictions:
        order = np.argsort(-entry["scores"], kind="stable")
        boxes = entry["boxes"][order][entry["scores"][order] >= score_threshold]
        candidates = truth_boxes[entry["image_id"]]
        taken = np.zeros(len(candidates), dtype=bool)
        for box in boxes:
            overlaps = box_iou(box[None], candidates)[0]
            if len(overlaps) and overlaps.max() >= 0.5 and not taken[overlaps.argmax()]:
                taken[overlaps.argmax()] = True
        matched, kept = matched + int(taken.sum()), kept + len(boxes)
    total = sum(len(boxes) for boxes in truth_boxes.values())
    return {"recall": matched / total, "precision": matched / kept if kept else math.nan}


def _same(a: float | None, b: float | None) -> bool:
    """Metric equality; a report writes NaN as null."""
    a, b = (math.nan if v is None else v for v in (a, b))
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= METRIC_TOLERANCE


def test_the_hospital_has_positive_and_negative_images_larger_than_the_model_input(hospital):
    truth = hospital["truth"].values()
    input_size = read_model_info(DEFAULT_WEIGHTS).input_size
    assert 10 <= len(truth) <= 20
    assert sum(bool(t["boxes"]) for t in truth) >= 5 and sum(not t["boxes"] for t in truth) >= 3
    # A scale bug (boxes left in model-input pixels) would put every box in the top-left quarter.
    assert all(t["rows"] == IMAGE_ROWS == 2 * input_size for t in truth)
    # The widest image fills the model input's width, so evaluate's one batch is padded to the full square.
    assert max(t["columns"] for t in truth) * input_size / IMAGE_ROWS > input_size - 32


def test_every_intact_image_has_one_detections_row_sized_as_stored(hospital):
    rows, truth = hospital["rows"], hospital["truth"]
    assert set(rows) == set(truth)
    for uid, row in rows.items():
        assert (row["image_rows"], row["image_columns"]) == (truth[uid]["rows"], truth[uid]["columns"]), uid


def test_pipeline_boxes_and_scores_are_those_of_medtwin_evaluate(hospital):
    for image_id, uid in enumerate(hospital["uids"]):
        pipeline = _pipeline_boxes(hospital["rows"][uid])
        evaluated = _evaluated_boxes(hospital["evaluated"][image_id])
        assert pipeline.shape == evaluated.shape, f"{uid}: pipeline {pipeline.tolist()} evaluate {evaluated.tolist()}"
        np.testing.assert_allclose(pipeline[:, 4], evaluated[:, 4], atol=SCORE_TOLERANCE, rtol=0, err_msg=uid)
        np.testing.assert_allclose(pipeline[:, :4], evaluated[:, :4], atol=BOX_TOLERANCE_PX, rtol=0, err_msg=uid)
        evaluated_probability = evaluated[0, 4] if len(evaluated) else 0.0
        assert abs(hospital["rows"][uid]["covid_probability"] - evaluated_probability) <= SCORE_TOLERANCE, uid


def test_pipeline_metrics_against_truth_equal_the_evaluate_report(hospital):
    report, ground_truth = hospital["report"], _ground_truth(hospital)
    predictions = _pipeline_predictions(hospital)
    scored = {"voc_map50": voc_map50(predictions, ground_truth), **coco_metrics(predictions, ground_truth),
              **image_level_metrics(predictions, ground_truth, CALL_THRESHOLD)}

    assert report["num_images"] == len(hospital["uids"])
    assert report["num_detections"] == sum(len(entry["boxes"]) for entry in predictions)
    different = {key: (value, report[key]) for key, value in scored.items() if not _same(value, report[key])}
    assert not different, f"pipeline vs evaluate: {different}"
    # The detector finds the simulated lesions, so equal metrics are not two empty results agreeing.
    assert report["voc_map50"] > 0.5 and report["sensitivity"] > 0.5


def test_pipeline_box_recall_and_precision_equal_those_of_the_evaluate_detections(hospital):
    ground_truth = _ground_truth(hospital)
    evaluated = _predictions({image_id: _evaluated_boxes(entries)
                              for image_id, entries in hospital["evaluated"].items()})
    pipeline = _box_recall_precision(_pipeline_predictions(hospital), ground_truth, CALL_THRESHOLD)

    assert pipeline == pytest.approx(_box_recall_precision(evaluated, ground_truth, CALL_THRESHOLD))
    assert pipeline["recall"] > 0.5 and pipeline["precision"] > 0.5


def test_boxes_are_in_original_pixels_of_the_stored_image(hospital):
    ground_truth, predictions = _ground_truth(hospital), _pipeline_predictions(hospital)
    for uid, row in hospital["rows"].items():
        boxes = _pipeline_boxes(row)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all(), uid
        assert (boxes[:, 2] <= row["image_columns"]).all() and (boxes[:, 3] <= row["image_rows"]).all(), uid
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all(), uid
    input_size = read_model_info(DEFAULT_WEIGHTS).input_size
    in_model_pixels = [{**entry, "boxes": entry["boxes"] * input_size / IMAGE_ROWS} for entry in predictions]

    # Confident boxes sit on the truth lesions in the stored image's pixels; shrunk to the
    # model input's pixels they would miss them.
    assert _box_recall_precision(predictions, ground_truth, CALL_THRESHOLD)["recall"] > 0.5
    assert _box_recall_precision(in_model_pixels, ground_truth, CALL_THRESHOLD)["recall"] < 0.2
