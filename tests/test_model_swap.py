"""Hot model swap: a new checkpoint replaces the running model only once it passes its checks, every
row names the model that scored it, and the recent studies a swap changes are listed in ``rescored``.

`CascadeModelHandler.update_model_path` is what RunInference calls when its model-update side
input (`--model_watch` → Beam's `WatchFilePattern`) brings a new file. Here the side input is a
bounded `ModelMetadata` on the DirectRunner, so the real RunInference → update_model_path →
load_model path runs. `RescoreOnSwap` (transforms/rescore.py) is fed rows the old model scored and
the same kind of update, and its rows are checked against the two checkpoints run directly on the
images. Prism 2.77 refuses triggered side inputs in the global window (apache/beam#31438) - see
README, "Hot model swap". The mid-stream swap runs on Flink (the session's job service): a paced
source sends studies, the row of one of them drops a new checkpoint into the watched folder, and
`WatchCheckpoints` hands it on mid-stream. On the Flink job server (2.56) RunInference's model-update
side input keeps its first value (the new checkpoint reaches RescoreOnSwap, but `update_model_path`
is not called again), so the rows keep the old version there; the re-scoring is what puts the new
model's findings of every study, in flight or later, in `rescored`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import threading
import time
from pathlib import Path

import apache_beam as beam
import pytest
import torch
from apache_beam.ml.inference.base import ModelMetadata
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import BeamAssertException
from apache_beam.transforms.periodicsequence import PeriodicImpulse, RebaseMode
from apache_beam.utils.timestamp import Timestamp
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from test_detect import WEIGHTS, cpu_config, synthetic_case

from model.checkpoint import load_detector, save_detector
from pipelines.cli import main
from pipelines.config import JobConfig, add_job_arguments
from pipelines.query import connect
from pipelines.graph import build_pipeline
from transforms.detect import (
    CascadeDetector,
    CascadeModelHandler,
    DetectOpacities,
    ImageDetections,
    checkpoint_problem,
    WatchCheckpoints,
    detection_row,
    read_model_info,
)
from transforms.rescore import RescoreConfig, RescoreOnSwap, box_changes, rescored_row

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"v1": shipped, "v2": retrained (weights nudged, re-saved: a new version), "tampered": v2's JSON
    naming v1's version, "stricter": v1 with every stage's opacity logit lowered by 6 (scores fall: some
    boxes drop under the score threshold, one image falls under the positive threshold, one keeps its
    findings)}."""
    root = tmp_path_factory.mktemp("checkpoints")
    loaded = load_detector(WEIGHTS)
    with torch.no_grad():
        for parameter in list(loaded.model.parameters())[-2:]:  # the last layer: boxes move a little
            parameter.add_(0.05)
    v2 = root / "cascade_v2.safetensors"
    save_detector(loaded.model, loaded.config, loaded.arch, v2)
    tampered = root / "cascade_tampered.safetensors"
    shutil.copy(v2, tampered)
    metadata = json.loads(v2.with_suffix(".json").read_text())
    tampered.with_suffix(".json").write_text(json.dumps({**metadata, "version": read_model_info(WEIGHTS).version,
                                                         "weights_file": tampered.name}))
    stricter = load_detector(WEIGHTS)
    with torch.no_grad():
        for name, parameter in stricter.model.named_parameters():
            if name.endswith("cls_score.bias"):
                parameter[1] -= 6.0
    save_detector(stricter.model, stricter.config, stricter.arch, root / "cascade_stricter.safetensors")
    return {"v1": WEIGHTS, "v2": str(v2), "tampered": str(tampered),
            "stricter": str(root / "cascade_stricter.safetensors")}


def test_only_checked_checkpoints_replace_the_model(checkpoints, tmp_path):
    size = read_model_info(WEIGHTS).input_size
    assert checkpoint_problem(checkpoints["v2"], size) is None
    assert "ValueError" in checkpoint_problem(checkpoints["tampered"], size)
    assert "input size" in checkpoint_problem(checkpoints["v2"], size * 2)
    assert checkpoint_problem(str(tmp_path / "absent.safetensors"), size) is not None
    (tmp_path / "model.pt").write_bytes(b"\x80\x04")
    assert checkpoint_problem(str(tmp_path / "model.pt"), size) == "not a .safetensors checkpoint"

    handler = CascadeModelHandler(cpu_config())
    v1 = handler.model_id
    handler.update_model_path(checkpoints["tampered"])
    assert handler.model_id == v1 and handler.load_model().version == read_model_info(WEIGHTS).version
    handler.update_model_path(checkpoints["v2"])
    v2 = read_model_info(checkpoints["v2"]).version
    assert handler.model_id.endswith("@" + v2) and v2 != read_model_info(WEIGHTS).version
    assert handler.load_model().version == v2


@pytest.mark.parametrize("update, expected", [("v2", "v2"), ("tampered", "v1")])
def test_rows_name_the_model_runinference_swapped_in(checkpoints, update, expected):
    studies = [synthetic_case(i)[0] for i in range(3)]
    version = read_model_info(checkpoints[expected]).version
    with TestPipeline() as pipeline:
        updates = pipeline | "Update" >> beam.Create([ModelMetadata(model_id=checkpoints[update],
                                                                    model_name=update)])
        images = pipeline | "Images" >> beam.Create(studies)
        found = images | DetectOpacities(cpu_config(), model_updates=updates)
        assert_that(found["detections"] | beam.Map(lambda row: (row["sop_instance_uid"], row["model_version"])),
                    equal_to([(s.reference["sop_instance_uid"], version) for s in studies]))
        assert_that(found["dead_letters"], equal_to([]), label="NoDeadLetters")


def test_box_changes_match_opacities_by_iou():
    box = lambda x1, y1, x2, y2: {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": 0.9, "label": "opacity"}
    previous = [box(0, 0, 10, 10), box(50, 50, 60, 60), box(100, 100, 110, 110)]
    new = [box(0, 0, 10, 10), box(51, 50, 61, 60), box(200, 200, 210, 210)]  # same, moved (IoU 0.82), other
    assert box_changes(previous, new) == (1, 1, 1)
    assert box_changes(previous, previous) == (0, 0, 0)
    assert box_changes([], new) == (3, 0, 0) and box_changes(previous, []) == (0, 3, 0)
    assert box_changes([box(0, 0, 10, 10)], [box(0, 0, 10, 9.5)]) == (0, 0, 0)  # IoU 0.95: not moved
    unchanged = {"covid_probability": 0.7, "boxes": previous, "model_version": "a"}
    assert rescored_row(unchanged, {**unchanged, "covid_probability": 0.6, "model_version": "b"}, 0.5) is None


POSITIVE = 0.5
OLD_STUDY = 6  # acquired two days before the others: outside a 24 h re-scoring horizon


def _studies():
    studies = [synthetic_case(i)[0] for i in range(OLD_STUDY + 1)]
    old = studies[OLD_STUDY]
    reference = {**old.reference, "acquisition_time": old.reference["acquisition_time"] - dt.timedelta(days=2)}
    return studies[:OLD_STUDY] + [old._replace(reference=reference)]


def _scored_directly(studies, weights):
    """Detections rows of `weights` run on the images outside Beam (CascadeDetector.detect)."""
    info = read_model_info(weights)
    found, _ = CascadeDetector(weights, device="cpu").detect([study.image for study in studies])
    return [detection_row(study, ImageDetections(boxes, scores, 0.0, len(studies)), model_name=info.name,
                          model_version=info.version, score_threshold=cpu_config().score_threshold)
            for study, (boxes, scores) in zip(studies, found)]


def _comparable(row):
    """A rescored row without the float noise of a batch's padding: probabilities and boxes rounded."""
    rounded = lambda boxes: [{**b, **{k: round(b[k], 3) for k in ("x1", "y1", "x2", "y2", "score")}} for b in boxes]
    return {**row, "covid_probability": round(row["covid_probability"], 4),
            "previous_covid_probability": round(row["previous_covid_probability"], 4),
            "boxes": rounded(row["boxes"]), "previous_boxes": rounded(row["previous_boxes"])}


@contextlib.contextmanager
def _rescored(checkpoints, studies, *, swap, seen_by_runinference):
    """RESCORED rows of a pipeline whose rows were scored by v1 (or by `swap`, when RunInference saw it
    too) and whose RescoreOnSwap sees `swap`; also the (sop, model_version) of every detections row."""
    config = cpu_config()
    with TestPipeline() as pipeline:
        update = ModelMetadata(model_id=checkpoints[swap], model_name=swap)
        images = pipeline | "Images" >> beam.Create(studies)
        detect_updates = pipeline | "DetectUpdate" >> beam.Create([update]) if seen_by_runinference else None
        found = images | DetectOpacities(config, model_updates=detect_updates, keep_scored=True)
        updates = pipeline | "RescoreUpdate" >> beam.Create([update])
        rescored = ({"scored": found["scored"], "model_updates": updates}
                    | RescoreOnSwap(RescoreConfig(config, hours=24, positive_probability=POSITIVE)))
        yield found, rescored | "Comparable" >> beam.Map(_comparable)  # the pipeline runs when the block ends


def test_rescored_lists_exactly_the_recent_studies_the_swap_changes(checkpoints):
    studies = _studies()
    before, after = _scored_directly(studies, checkpoints["v1"]), _scored_directly(studies, checkpoints["stricter"])
    changed = [rescored_row(old, new, POSITIVE) for old, new in zip(before[:OLD_STUDY], after[:OLD_STUDY])]
    expected = [_comparable(row) for row in changed if row is not None]
    # The oracle has every kind of study: unchanged, boxes only, a triage decision, and an old changed one.
    assert 0 < len(expected) < OLD_STUDY and rescored_row(before[OLD_STUDY], after[OLD_STUDY], POSITIVE)
    assert any("became_negative" in row["changes"] and not row["positive"] for row in expected)
    assert {row["previous_model_version"] for row in expected} == {read_model_info(checkpoints["v1"]).version}
    with _rescored(checkpoints, studies, swap="stricter", seen_by_runinference=False) as (found, rescored):
        v1 = read_model_info(checkpoints["v1"]).version
        assert_that(found["detections"] | beam.Map(lambda row: (row["sop_instance_uid"], row["model_version"])),
                    equal_to([(s.reference["sop_instance_uid"], v1) for s in studies]), label="RowsBeforeTheSwap")
        assert_that(rescored, equal_to(expected))


@pytest.mark.parametrize("swap, seen_by_runinference", [("tampered", False), ("stricter", True), ("v1", False)])
def test_nothing_is_rescored_by_a_refused_checkpoint_or_the_model_that_scored_the_rows(
        checkpoints, swap, seen_by_runinference):
    with _rescored(checkpoints, _studies()[:3], swap=swap, seen_by_runinference=seen_by_runinference) as (_, rescored):
        assert_that(rescored, equal_to([]))


# The mid-stream swap on Flink: studies 0..SWAP_AT one a second; the row of SWAP_AT drops the stricter
# checkpoint into the watched folder; after a pause of PAUSE_SECONDS, studies up to FLINK_STUDIES - 1.
FLINK_STUDIES, SWAP_AT, PAUSE_SECONDS = 6, 1, 8
WATCH_SECONDS = 30  # the watch (1 s polls) ends this long after the job starts, and with it the job


def _paced_indices() -> list:
    """PeriodicImpulse data, one item a second: study indices, None during the pause."""
    return [*range(SWAP_AT + 1), *[None] * PAUSE_SECONDS, *range(SWAP_AT + 1, FLINK_STUDIES)]


class _DropCheckpointFn(beam.DoFn):
    """Test step: when the row of study SWAP_AT comes, copies `checkpoint` (JSON first, then weights, each
    renamed into place) into `folder` under a new name; idempotent, so a retried bundle changes nothing."""

    def __init__(self, checkpoint: str, folder: str):
        self._checkpoint, self._folder = checkpoint, folder

    def process(self, row):
        if row["sop_instance_uid"] == synthetic_case(SWAP_AT)[0].reference["sop_instance_uid"]:
            source = Path(self._checkpoint)
            for suffix in (".json", ".safetensors"):
                target = Path(self._folder) / f"b_swapped{suffix}"
                shutil.copy(source.with_suffix(suffix), target.with_suffix(".partial"))
                os.replace(target.with_suffix(".partial"), target)
        yield row


def _check_swap_mid_stream(before: list, after: list):
    """assert_that matcher over ("row", index, version) and ("rescored", row): the rows of a prefix of the
    studies (SWAP_AT included) carry v1, the rest (none on the Flink job server 2.56: see the module
    docstring) the swapped-in version, and rescored lists exactly the v1-scored studies whose findings
    the swap changes."""
    def check(elements):
        versions = [version for _, _, version in sorted(e for e in elements if e[0] == "row")]
        old, new = before[0]["model_version"], after[0]["model_version"]
        swapped = versions.index(new) if new in versions else len(versions)
        if len(versions) != FLINK_STUDIES or versions != [old] * swapped + [new] * (FLINK_STUDIES - swapped) \
                or swapped <= SWAP_AT:
            raise BeamAssertException(f"not one swap mid-stream after study {SWAP_AT}: {versions}")
        expected = [rescored_row(b, a, POSITIVE) for b, a in zip(before[:swapped], after[:swapped])]
        expected = sorted((_comparable(row) for row in expected if row is not None), key=repr)
        got = sorted((e[1] for e in elements if e[0] == "rescored"), key=repr)
        if not expected or got != expected:
            raise BeamAssertException(f"rescored {got} != {expected}")
    return check


def test_a_checkpoint_swapped_in_mid_stream_on_flink_scores_the_later_studies_and_rescores_the_earlier(
        checkpoints, job_endpoints, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for suffix in (".json", ".safetensors"):  # the watch needs a checkpoint at launch: v1 under a watched name
        shutil.copy(Path(WEIGHTS).with_suffix(suffix), models / f"a_shipped{suffix}")
    studies = [synthetic_case(i)[0] for i in range(FLINK_STUDIES)]
    before, after = _scored_directly(studies, checkpoints["v1"]), _scored_directly(studies, checkpoints["stricter"])
    config = cpu_config(max_batch_duration_secs=1, model_watch=str(models / "*.safetensors"),
                        model_watch_interval_secs=1, model_watch_stop_seconds=WATCH_SECONDS)
    options = PipelineOptions(["--runner=FlinkRunner", f"--job_endpoint={job_endpoints['flink']}",
                               "--environment_type=LOOPBACK", "--streaming"])
    with beam.Pipeline(options=options) as pipeline:
        images = (pipeline
                  | "Paced" >> PeriodicImpulse(fire_interval=1, data=_paced_indices(), rebase=RebaseMode.REBASE_ALL,
                                               start_timestamp=Timestamp.now(),
                                               stop_timestamp=Timestamp.now() + len(_paced_indices()) - 0.5)
                  | "NotPaused" >> beam.Filter(lambda index: index is not None)
                  | "Study" >> beam.Map(lambda index: synthetic_case(index)[0]))
        updates = pipeline | "WatchCheckpoints" >> WatchCheckpoints(config)
        found = images | DetectOpacities(config, model_updates=updates, keep_scored=True)
        rows = found["detections"] | "DropCheckpoint" >> beam.ParDo(
            _DropCheckpointFn(checkpoints["stricter"], str(models)))
        rescored = ({"scored": found["scored"], "model_updates": updates}
                    | RescoreOnSwap(RescoreConfig(config, hours=24, positive_probability=POSITIVE)))
        sops = {study.reference["sop_instance_uid"]: index for index, study in enumerate(studies)}
        observed = (rows | "Versions" >> beam.Map(lambda row: ("row", sops[row["sop_instance_uid"]],
                                                              row["model_version"])),
                    rescored | "Rescored" >> beam.Map(lambda row: ("rescored", _comparable(row)))
                    ) | "Observed" >> beam.Flatten()
        assert_that(observed, _check_swap_mid_stream(before, after))
        assert_that(found["dead_letters"], equal_to([]), label="NoDeadLetters")


@pytest.mark.parametrize("flags, rescored", [([], True), (["--rescore_hours", "0"], False)])
def test_medtwin_run_with_a_model_watch_writes_the_rescored_table(tmp_path, flags, rescored):
    parser = argparse.ArgumentParser()
    add_job_arguments(parser)
    parser.add_argument("--runner", default="flink")
    args = parser.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--demo", "--streaming",
                              "--model_watch", str(tmp_path / "*.safetensors"), "--model_watch_stop_seconds", "30",
                              *flags])
    config = JobConfig.from_args(args)
    assert config.imaging.inference.model_watch_stop_seconds == 30
    assert (config.imaging.rescore is not None) is rescored
    tables = build_pipeline(beam.Pipeline(), config)
    assert ("rescored" in tables) is rescored


def _drop_after_first_report(reports: Path, checkpoint: str, folder: Path, job: threading.Thread) -> None:
    """Copies `checkpoint` into `folder` once the job has written its first SR (so RunInference has its first
    model), or gives up when the job ends first."""
    while job.is_alive() and not any(reports.rglob("*.dcm")):
        time.sleep(0.5)
    if job.is_alive():
        for suffix in (".json", ".safetensors"):
            shutil.copy(Path(checkpoint).with_suffix(suffix), folder / f"b_swapped{suffix}.partial")
            os.replace(folder / f"b_swapped{suffix}.partial", folder / f"b_swapped{suffix}")


def test_medtwin_run_on_flink_lists_what_a_swap_changes_in_the_rescored_table(checkpoints, job_endpoints, tmp_path):
    hospital, out, models = tmp_path / "in", tmp_path / "out", tmp_path / "models"
    assert main(["simulate", "--out", str(hospital), "--patients", "4", "--devices", "1", "--hours", "2",
                 "--seed", "7", "--infected-fraction", "0.5", "--quiet"]) == 0
    models.mkdir()
    for suffix in (".json", ".safetensors"):
        shutil.copy(Path(WEIGHTS).with_suffix(suffix), models / f"a_shipped{suffix}")
    argv = ["run", "--input", str(hospital), "--output", str(out), "--demo", "--streaming", "--runner", "flink",
            f"--job_endpoint={job_endpoints['flink']}", "--model_per_process", "--model_watch",
            str(models / "*.safetensors"), "--model_watch_interval", "1", "--model_watch_stop_seconds", "40"]
    codes = []
    job = threading.Thread(target=lambda: codes.append(main(argv)))
    job.start()
    _drop_after_first_report(out / "structured_reports", checkpoints["stricter"], models, job)
    job.join()
    assert codes == [0]
    connection = connect(str(out))
    detections = {row[0]: row[1:] for row in connection.execute(
        "SELECT sop_instance_uid, model_version, covid_probability, boxes FROM detections").fetchall()}
    rescored = connection.execute("SELECT sop_instance_uid, previous_model_version, previous_covid_probability, "
                                  "previous_boxes, model_version FROM rescored").fetchall()
    v1, stricter = read_model_info(WEIGHTS).version, read_model_info(checkpoints["stricter"]).version
    assert len(detections) >= 2 and rescored, (detections, rescored)
    for sop, *previous, version in rescored:  # each names the row the old model wrote
        assert version == stricter and detections[sop] == tuple(previous) and previous[0] == v1
