"""DetectOpacities: rows, original-pixel boxes, batching, streaming batch closing, dead letters.

Synthetic radiographs with known lesion boxes go through the shipped tiny cascade.
"""

import datetime as dt
import math
import re
import shutil
import time

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from model.checkpoint import load_detector
from model.evaluation import box_iou
from model.preprocess import boxes_to_original, prepare_pixels
from model.radiograph import synthesize_chest_xray
from schemas import validate
from schemas.outputs import DEAD_LETTERS, DETECTIONS
from transforms.detect import (
    DEFAULT_ACCELERATOR,
    CascadeDetector,
    CascadeModelHandler,
    DetectOpacities,
    InferenceConfig,
    model_input_size,
    read_model_info,
)
from transforms.dicom_decode import DecodedStudy

WEIGHTS = "model/weights/cascade_tiny.safetensors"
BASE_TIME = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.timezone.utc)
# (rows, cols) of stored images: portrait, landscape and square, all at scale != 1.
SOURCE_SHAPES = [(400, 320), (320, 400), (500, 400), (360, 450), (320, 320), (480, 384)]

torch.set_num_threads(1)


def cpu_config(**overrides):
    values = dict(weights_path=WEIGHTS, device="cpu", share_across_processes=False, max_batch_duration_secs=None,
                  max_batch_size=4)
    return InferenceConfig(**{**values, **overrides})


def reference(index):
    return {"uri": f"/pacs/img{index}.dcm", "sop_instance_uid": f"1.2.826.0.1.{index}",
            "study_instance_uid": "1.2.826.0.2", "series_instance_uid": "1.2.826.0.3",
            "patient_key": f"pk-{index % 3}", "device_id": "cr-01", "modality": "CR",
            "acquisition_time": BASE_TIME + dt.timedelta(minutes=index)}


def synthetic_case(index, shape=None, seed=100):
    rows, cols = shape or SOURCE_SHAPES[index % len(SOURCE_SHAPES)]
    radiograph = synthesize_chest_xray(np.random.default_rng(seed + index), rows=rows, cols=cols, num_opacities=2)
    prepared = prepare_pixels(radiograph.pixels, bits_stored=radiograph.bits_stored, target_size=256)
    study = DecodedStudy(reference(index), prepared.image, prepared.scale, prepared.original_shape)
    return study, radiograph


def timestamped(study):
    return TimestampedValue(study, study.reference["acquisition_time"].timestamp())


def with_quality(row):
    return {**row, "quality_flag": False, "quality_reasons": []}


@pytest.fixture(scope="module")
def cases():
    return [synthetic_case(i) for i in range(len(SOURCE_SHAPES))]


@pytest.fixture(scope="module")
def direct_model():
    return load_detector(WEIGHTS).model


# ---------------------------------------------------------------- config


def test_config_rules():
    with pytest.raises(ValueError, match="safetensors"):
        InferenceConfig("model.pt")
    with pytest.raises(ValueError, match="device"):
        InferenceConfig(WEIGHTS, device="tpu")
    with pytest.raises(ValueError, match="larger than max_batch_size"):
        InferenceConfig(WEIGHTS, min_batch_size=9, max_batch_size=8)
    with pytest.raises(ValueError, match="max_batch_duration_secs"):
        InferenceConfig(WEIGHTS, max_batch_duration_secs=0)
    with pytest.raises(ValueError, match="score_threshold"):
        InferenceConfig(WEIGHTS, score_threshold=1.5)
    with pytest.raises(ValueError, match="asks for a GPU"):
        InferenceConfig(WEIGHTS, device="cpu", accelerator=DEFAULT_ACCELERATOR)
    with pytest.raises(ValueError, match="positive integer"):
        InferenceConfig(WEIGHTS, max_batch_size=0)
    assert InferenceConfig(WEIGHTS, device="cpu").accelerator_hint is None
    assert InferenceConfig(WEIGHTS, device="auto").accelerator_hint is None
    assert InferenceConfig(WEIGHTS, device="cuda").accelerator_hint == DEFAULT_ACCELERATOR
    handler = CascadeModelHandler(InferenceConfig(WEIGHTS, device="cuda", accelerator="type:nvidia-l4;count:1"))
    assert handler.get_resource_hints() == {"accelerator": "type:nvidia-l4;count:1"}
    assert CascadeModelHandler(cpu_config()).get_resource_hints() == {}
    assert CascadeModelHandler(cpu_config(max_batch_duration_secs=2)).batch_elements_kwargs() == {
        "min_batch_size": 1, "max_batch_size": 4, "max_batch_duration_secs": 2}


def test_model_input_size_comes_from_the_checkpoint_json():
    info = read_model_info(WEIGHTS)
    assert model_input_size(cpu_config()) == model_input_size(WEIGHTS) == info.input_size == 256
    assert info.name == "cascade_tiny" and len(info.version) == 12


def test_a_worker_without_the_launchers_path_loads_the_shipped_checkpoint_of_that_name(tmp_path):
    # The job was built on a machine that had the weights at tmp_path; the worker has only its package.
    launcher_copy = tmp_path / "cascade_tiny.safetensors"
    launcher_copy.write_bytes(open(WEIGHTS, "rb").read())
    (tmp_path / "cascade_tiny.json").write_bytes(open(WEIGHTS.replace(".safetensors", ".json"), "rb").read())
    handler = CascadeModelHandler(cpu_config(weights_path=str(launcher_copy)))
    launcher_copy.unlink()
    assert handler.load_model().version == read_model_info(WEIGHTS).version

    other = tmp_path / "mine.safetensors"
    other.write_bytes(b"")
    (tmp_path / "mine.json").write_bytes(open(WEIGHTS.replace(".safetensors", ".json"), "rb").read())
    handler = CascadeModelHandler(cpu_config(weights_path=str(other)))
    other.unlink()
    with pytest.raises(FileNotFoundError, match="bake the weights into the worker image"):
        handler.load_model()


def test_a_worker_with_other_weights_than_the_job_was_built_for_refuses_to_load(tmp_path):
    job_path = tmp_path / "detector.safetensors"
    shutil.copyfile(WEIGHTS, job_path)
    shutil.copyfile(WEIGHTS.replace(".safetensors", ".json"), tmp_path / "detector.json")
    handler = CascadeModelHandler(cpu_config(weights_path=str(job_path)))
    # What the worker finds under the job's path: another checkpoint (its own manifest beside it).
    shutil.copyfile("model/weights/faster_rcnn_tiny.safetensors", job_path)
    shutil.copyfile("model/weights/faster_rcnn_tiny.json", tmp_path / "detector.json")
    with pytest.raises(ValueError, match="the job was built for"):
        handler.load_model()


def test_inference_step_alone_carries_the_accelerator_hint():
    pipeline = beam.Pipeline()
    images = pipeline | beam.Create([])
    _ = images | DetectOpacities(cpu_config(device="cuda"))
    hinted = []

    class Visitor(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            if node.resource_hints:
                hinted.append(node.full_label)

    pipeline.visit(Visitor())
    assert hinted and all("BeamML_RunInference" in label for label in hinted), hinted


# ---------------------------------------------------------------- accuracy


def test_rows_validate_and_boxes_are_in_original_pixels(cases, direct_model):
    studies = [study for study, _ in cases]
    expected = {}
    for study, radiograph in cases:
        with torch.inference_mode():
            output = direct_model([torch.from_numpy(study.image)[None]])[0]
        keep = output["scores"].numpy() >= 0.05
        expected[study.reference["sop_instance_uid"]] = (
            boxes_to_original(output["boxes"].numpy()[keep], study.scale), output["scores"].numpy()[keep],
            radiograph, study)

    def check(rows):
        assert len(rows) == len(cases)
        consolidation_ious = []
        for row in rows:
            validate(DETECTIONS, with_quality(row))
            boxes_direct, scores_direct, radiograph, study = expected[row["sop_instance_uid"]]
            assert (row["image_rows"], row["image_columns"]) == radiograph.pixels.shape
            assert row["model_name"] == "cascade_tiny" and row["acquisition_time"] == study.reference["acquisition_time"]
            boxes = np.array([[b["x1"], b["y1"], b["x2"], b["y2"]] for b in row["boxes"]]).reshape(-1, 4)
            scores = np.array([b["score"] for b in row["boxes"]])
            assert row["covid_probability"] == pytest.approx(scores.max() if len(scores) else 0.0)
            # The pipeline is the model: same boxes and scores as calling it directly.
            if study.image.shape[0] == study.image.shape[1]:  # no padding difference at all: exact
                np.testing.assert_allclose(boxes, boxes_direct, atol=1e-3)
                np.testing.assert_allclose(scores, scores_direct, atol=1e-5)
            else:  # the model pads to 32, the pipeline to the square: border convolutions differ a little
                confident = scores_direct >= 0.3  # weak boxes near the NMS and score cut-offs may swap
                iou = box_iou(boxes_direct[confident].astype(float), boxes.astype(float))
                assert (iou.max(axis=1) > 0.98).all()
                matched = scores[iou.argmax(axis=1)]
                np.testing.assert_allclose(matched, scores_direct[confident], atol=0.02)
            for opacity, truth in zip(radiograph.opacities, radiograph.boxes):
                if opacity.kind == "consolidation":
                    iou = box_iou(truth[None].astype(float), boxes.astype(float)) if len(boxes) else np.zeros((1, 1))
                    consolidation_ious.append(float(iou.max()))
        assert len(consolidation_ious) >= 4
        assert np.mean(np.array(consolidation_ious) >= 0.5) >= 0.75, consolidation_ious

    with TestPipeline() as pipeline:
        out = (pipeline | beam.Create([timestamped(s) for s in studies])
               | DetectOpacities(cpu_config()))
        assert_that(out["detections"], check)
        assert_that(out["dead_letters"], equal_to([]), label="NoDeadLetters")
        times = out["detections"] | beam.Map(
            lambda row, t=beam.DoFn.TimestampParam: (row["sop_instance_uid"], t.micros))
        assert_that(times, equal_to([(s.reference["sop_instance_uid"],
                                      int(s.reference["acquisition_time"].timestamp() * 1e6)) for s in studies]),
                    label="TimestampsAreAcquisitionTimes")


def test_mixed_sizes_in_one_batch_give_the_one_by_one_detections(cases):
    detector = CascadeDetector(WEIGHTS, device="cpu")
    images = [study.image for study, _ in cases[:4]]  # 256x204, 204x256, 256x204, 204x256
    assert len({image.shape for image in images}) == 2
    batched, _ = detector.detect(images)
    for image, (boxes, scores) in zip(images, batched):
        [(alone_boxes, alone_scores)], _ = detector.detect([image])
        np.testing.assert_allclose(boxes, alone_boxes, atol=1e-3)
        np.testing.assert_allclose(scores, alone_scores, atol=1e-5)
        assert (boxes[:, 2] <= image.shape[1]).all() and (boxes[:, 3] <= image.shape[0]).all()


def test_model_transform_does_not_resize_model_sized_images(direct_model):
    images = [torch.rand(1, 256, 204), torch.rand(1, 180, 256)]
    batch, _ = direct_model.transform(images)
    assert batch.image_sizes == [(256, 204), (180, 256)]


# ---------------------------------------------------------------- streaming


def _log_event(path, kind, value):
    # A file, not a module global: Beam pickles the lambdas (and what they reference) by value.
    with open(path, "a") as log:
        log.write(f"{kind} {value}\n")
    return value


def streaming_run(processing_time_advance, log_path):
    """3 images, then `processing_time_advance` of processing time, then 2 more images.

    Returns the order of arrivals ("in") and rows ("row"), and the rows' batch sizes.
    """
    log_path = str(log_path)
    studies = [synthetic_case(i, shape=(320, 320))[0] for i in range(5)]
    stream = TestStream().advance_watermark_to(0).add_elements([timestamped(s) for s in studies[:3]])
    stream = stream.advance_processing_time(processing_time_advance)
    stream = stream.add_elements([timestamped(s) for s in studies[3:]]).advance_watermark_to_infinity()
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    with TestPipeline(options=options) as pipeline:
        images = (pipeline | stream
                  | "Arrive" >> beam.Map(lambda s: _log_event(log_path, "in", s.reference["sop_instance_uid"]) and s))
        out = images | DetectOpacities(cpu_config(min_batch_size=8, max_batch_size=8, max_batch_duration_secs=2))
        _ = out["detections"] | "Leave" >> beam.Map(lambda r: _log_event(log_path, "row", r["batch_size"]))
    events = [line.split() for line in open(log_path).read().splitlines()]
    return [kind for kind, _ in events], [int(value) for kind, value in events if kind == "row"]


def test_partial_batch_closes_after_max_batch_duration_in_streaming(tmp_path):
    # Beam 2.77's stateful BatchElements sets its buffering timer (TimeDomain.REAL_TIME) at
    # time.time() + max_batch_duration_secs, while the DirectRunner under TestStream compares
    # processing-time timers with a TestClock that starts at 0 (runners/direct/clock.py).
    # So the TestClock must be advanced past wall-clock time + the duration to fire it.
    kinds, sizes = streaming_run(math.ceil(time.time()) + 3600, tmp_path / "events")
    assert kinds == ["in"] * 3 + ["row"] * 3 + ["in"] * 2 + ["row"] * 2
    assert sizes == [3, 3, 3, 2, 2]


def test_direct_runner_does_not_fire_the_duration_on_a_small_processing_time_advance(tmp_path):
    # Documents the DirectRunner behaviour above: 10 s of TestStream processing time is
    # 10 s after epoch 0, far before the timer, so the half-full batch waits for the end of
    # the window (watermark to infinity) and no row appears before the later images arrive.
    kinds, sizes = streaming_run(10, tmp_path / "events")
    assert kinds == ["in"] * 5 + ["row"] * 5
    assert len(sizes) == 5 and set(sizes) <= {2, 3, 5}


# ---------------------------------------------------------------- failures


def test_bad_images_become_dead_letters_and_counts_add_up(cases):
    good = [study for study, _ in cases[:2]]
    bad = [good[0]._replace(reference=reference(10), image=np.zeros((0, 0), np.float32)),
           good[0]._replace(reference=reference(11), image=np.full((256, 200), np.nan, np.float32)),
           good[0]._replace(reference=reference(12), image=np.zeros((128, 100), np.float32)),
           good[0]._replace(reference=reference(13), image=np.zeros((256,), np.float32))]

    def check_dead(rows):
        assert len(rows) == len(bad)
        for row in rows:
            validate(DEAD_LETTERS, row)
            assert row["stage"] == "detect" and row["reason"].startswith("image refused")
            assert "patient_id" not in row["payload"] and "pk-" in row["payload"]
        reasons = " ".join(row["reason"] for row in rows)
        for words in ("empty image", "non-finite", "model input size 256", "2-D array"):
            assert words in reasons

    pipeline = TestPipeline()
    out = pipeline | beam.Create([timestamped(s) for s in good + bad]) | DetectOpacities(cpu_config())
    assert_that(out["detections"] | beam.Map(lambda r: r["sop_instance_uid"]),
                equal_to([s.reference["sop_instance_uid"] for s in good]))
    assert_that(out["dead_letters"], check_dead, label="DeadLetters")
    result = pipeline.run()
    result.wait_until_finish()
    metrics = result.metrics().query(MetricsFilter().with_namespace("detect"))
    counters = {m.key.metric.name: m.committed for m in metrics["counters"]}
    assert counters["images_refused"] == len(bad) and counters["detections_emitted"] == len(good)
    batch_sizes = {m.key.metric.name: m.committed for m in metrics["distributions"]}["batch_size"]
    assert batch_sizes.sum == len(good) and batch_sizes.max <= 4


class _BrokenDetector:
    def detect(self, images):
        raise RuntimeError("CUDA error: device-side assert triggered")


class _BrokenHandler(CascadeModelHandler):
    def load_model(self):
        return _BrokenDetector()


def test_a_model_that_raises_dead_letters_its_whole_batch(cases):
    studies = [study for study, _ in cases[:3]]
    config = cpu_config()

    def check_dead(rows):
        assert sorted(row["event_time"] for row in rows) == [s.reference["acquisition_time"] for s in studies]
        for row in rows:
            validate(DEAD_LETTERS, row)
            assert row["stage"] == "detect"
            assert re.fullmatch(r"inference failed for a batch of [123]: "
                                r"RuntimeError\('CUDA error: device-side assert triggered'\)", row["reason"])

    with TestPipeline() as pipeline:
        out = (pipeline | beam.Create([timestamped(s) for s in studies])
               | DetectOpacities(config, handler=_BrokenHandler(config)))
        assert_that(out["detections"], equal_to([]))
        assert_that(out["dead_letters"], check_dead, label="DeadLetters")


def test_model_shared_across_processes_gives_the_same_rows(cases):
    studies = [study for study, _ in cases[4:6]]
    detector = CascadeDetector(WEIGHTS, device="cpu")
    expected = []
    for study in studies:
        [(boxes, scores)], _ = detector.detect([study.image])
        expected.append((study.reference["sop_instance_uid"],
                         np.round(boxes_to_original(boxes[scores >= 0.05], study.scale).astype(np.float64), 2).tolist()))

    with TestPipeline() as pipeline:
        out = (pipeline | beam.Create(studies)
               | DetectOpacities(cpu_config(share_across_processes=True, model_copies=1)))
        found = out["detections"] | beam.Map(lambda r: (r["sop_instance_uid"], np.round(
            [[b["x1"], b["y1"], b["x2"], b["y2"]] for b in r["boxes"]], 2).reshape(-1, 4).tolist()))
        assert_that(found, equal_to(expected))
