"""Re-scoring on a hot model swap: which recent findings a new detector checkpoint changes.

    scored (DecodedStudy, detections row) ──┐
    model updates (ModelMetadata) ──────────┴─ RescoreOnSwap ─► rescored rows (schemas.RESCORED)

`DetectOpacities(..., keep_scored=True)` hands on each image with the row its model gave it;
the model updates are the same PCollection RunInference swaps its model from (`WatchCheckpoints`).
`RescoreOnSwap` keeps the images of the last `RescoreConfig.hours` of event time (relative to the
newest acquisition seen) and, when a checkpoint is swapped in, scores each of them that an older
model scored with the new one and writes a ``rescored`` row for every study whose findings changed:

* the triage decision: the image-level probability crossed ``positive_probability`` (either way);
* the boxes: a new box is the same opacity as a previous one when their IoU is at least
  `SAME_OPACITY_IOU` (pairs matched greedily, highest IoU first); unmatched new boxes were added,
  unmatched previous ones removed, and a matched pair whose IoU is below `UNMOVED_IOU` moved.

Arrival order does not matter: a study whose row an older model scored, arriving after the swap
was seen here (in flight at the swap), is re-scored on arrival; a row already scored by the new
model (RunInference swapped first) is not re-scored. Rows scored by a model newer than the one
swapped in here are left alone until that model's own update arrives. A second swap compares with
the findings of the first.

The new checkpoint is read as RunInference's handler reads it: `checkpoint_problem` (safetensors
only, every check of `model.checkpoint.load_detector`, the running input size), then
`CascadeModelHandler.load_model` (never a pickle). A refused checkpoint re-scores nothing (counted
in ``rescore/checkpoints_refused``).

One key holds every held study (the horizon is one clock for the whole hospital), so re-scoring
runs on one worker at a time; each held study costs its decoded image (input_size² float32:
256 KiB at 256 px) in state. Rows keep only the pseudonymous and allow-listed fields of the
detections rows (UIDs, patient_key, device_id, times, model names and findings).

Metrics (namespace ``rescore``): ``checkpoints_accepted``, ``checkpoints_refused``,
``studies_rescored`` and ``rows_emitted``; distribution ``studies_held``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec
from apache_beam.transforms.window import GlobalWindows, TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from model.evaluation import box_iou
from transforms.decode import to_micros
from transforms.detect import (
    CascadeModelHandler,
    ImageDetections,
    InferenceConfig,
    checkpoint_problem,
    detection_row,
    read_model_info,
)

METRICS_NAMESPACE = "rescore"
SAME_OPACITY_IOU = 0.5
UNMOVED_IOU = 0.9
SCORED, MODEL = "scored", "model"
_KEY = "rescore"  # one key: see the module docstring
_PRUNE_EVERY_US = 3600 * 1_000_000  # held studies past the horizon are dropped at most an hour late
_COPIED = ("sop_instance_uid", "study_instance_uid", "series_instance_uid", "patient_key", "device_id",
           "acquisition_time")


@dataclasses.dataclass(frozen=True)
class RescoreConfig:
    """Attributes:
      inference: the job's detector (its input size, device, batch size and score threshold).
      hours: studies acquired this many hours before the newest one seen, or later, are re-scored.
      positive_probability: image-level probability at or above which an image is positive for triage
        (`transforms.triage.TriageConfig.positive_probability`).
    """

    inference: InferenceConfig
    hours: float = 24.0
    positive_probability: float = 0.5

    def __post_init__(self):
        if isinstance(self.hours, bool) or not isinstance(self.hours, (int, float)) or not 0 < self.hours <= 24 * 30:
            raise ValueError(f"rescore hours must be in (0, 720], got {self.hours!r}")


def _box_array(boxes: Sequence[dict]) -> np.ndarray:
    return np.array([[b["x1"], b["y1"], b["x2"], b["y2"]] for b in boxes], dtype=np.float64).reshape(-1, 4)


def box_changes(previous: Sequence[dict], new: Sequence[dict]) -> tuple[int, int, int]:
    """(added, removed, moved) between two rows' boxes (dicts with x1, y1, x2, y2).

    Pairs with IoU >= SAME_OPACITY_IOU are matched greedily, highest IoU first; a matched pair with
    IoU < UNMOVED_IOU counts as moved.
    """
    iou = box_iou(_box_array(previous), _box_array(new))
    pairs = sorted(((iou[i, j], i, j) for i in range(iou.shape[0]) for j in range(iou.shape[1])
                    if iou[i, j] >= SAME_OPACITY_IOU), reverse=True)
    used_previous, used_new, moved = set(), set(), 0
    for overlap, i, j in pairs:
        if i in used_previous or j in used_new:
            continue
        used_previous.add(i)
        used_new.add(j)
        moved += overlap < UNMOVED_IOU
    return len(new) - len(used_new), len(previous) - len(used_previous), moved


def rescored_row(previous: dict, row: dict, positive_probability: float) -> dict | None:
    """The RESCORED row for one study scored by two models (detections rows), or None if nothing changed."""
    was, now = previous["covid_probability"] >= positive_probability, row["covid_probability"] >= positive_probability
    added, removed, moved = box_changes(previous["boxes"], row["boxes"])
    changes = ([("became_negative", "became_positive")[now]] if was != now else []) + [
        name for name, count in (("boxes_added", added), ("boxes_removed", removed), ("boxes_moved", moved)) if count]
    if not changes:
        return None
    return {
        **{name: row[name] for name in _COPIED},
        "model_name": row["model_name"],
        "previous_model_version": previous["model_version"],
        "model_version": row["model_version"],
        "previous_covid_probability": previous["covid_probability"],
        "covid_probability": row["covid_probability"],
        "previous_positive": was,
        "positive": now,
        "changes": changes,
        "boxes_added": added,
        "boxes_removed": removed,
        "boxes_moved": moved,
        "previous_boxes": list(previous["boxes"]),
        "boxes": list(row["boxes"]),
    }


class _Swap:
    """The model swapped in here: its checked handler and detector, loaded once per DoFn instance."""

    def __init__(self, inference: InferenceConfig, path: str):
        self.path = path
        self.handler = CascadeModelHandler(dataclasses.replace(inference, weights_path=path))
        self.detector = self.handler.load_model()  # checks the weights hash to the JSON's version
        self.info = read_model_info(path)


class _RescoreFn(beam.DoFn):
    """(key, (SCORED, (study, row)) | (MODEL, ModelMetadata)) -> RESCORED rows, at acquisition time."""

    HELD = BagStateSpec("held", PickleCoder())  # (DecodedStudy, its latest detections row)
    # {"path", "version", "retired": versions swapped out, "newest_us", "pruned_us"}
    STATE = ReadModifyWriteStateSpec("state", PickleCoder())

    def __init__(self, config: RescoreConfig):
        self._config = config
        self._horizon_us = int(config.hours * 3600 * 1_000_000)
        self._job_version = read_model_info(config.inference.weights_path).version

    def setup(self):
        self._swap: _Swap | None = None
        self._accepted = Metrics.counter(METRICS_NAMESPACE, "checkpoints_accepted")
        self._refused = Metrics.counter(METRICS_NAMESPACE, "checkpoints_refused")
        self._rescored = Metrics.counter(METRICS_NAMESPACE, "studies_rescored")
        self._rows = Metrics.counter(METRICS_NAMESPACE, "rows_emitted")
        self._held_count = Metrics.distribution(METRICS_NAMESPACE, "studies_held")

    def process(self, element, held=beam.DoFn.StateParam(HELD), state=beam.DoFn.StateParam(STATE)):
        _, (kind, value) = element
        known = state.read() or {"path": None, "version": None, "retired": set(), "newest_us": None,
                                 "pruned_us": None}
        if kind == SCORED:
            yield from self._on_scored(value, known, held)
        else:
            yield from self._on_model(value, known, held)
        state.write(known)

    def _on_scored(self, scored: tuple, known: dict, held) -> Iterable:
        study, row = scored
        taken_us = to_micros(row["acquisition_time"])
        known["newest_us"] = taken_us if known["newest_us"] is None else max(known["newest_us"], taken_us)
        if self._stale(row, known) and self._recent(row, known):  # scored by an older model after the swap
            (study, row), = yield from self._rescore([(study, row)], known)
        held.add((study, row))
        if known["pruned_us"] is None:
            known["pruned_us"] = known["newest_us"]
        elif known["newest_us"] - known["pruned_us"] >= _PRUNE_EVERY_US:
            self._keep(held, [entry for entry in held.read() if self._recent(entry[1], known)])
            known["pruned_us"] = known["newest_us"]

    def _on_model(self, metadata, known: dict, held) -> Iterable:
        path = getattr(metadata, "model_id", None)
        if not path or path == known["path"] or (known["path"] is None and path == self._config.inference.weights_path):
            return
        problem = checkpoint_problem(path, read_model_info(self._config.inference.weights_path).input_size)
        if problem is not None:
            self._refused.inc()
            logging.getLogger(__name__).warning("checkpoint refused, nothing re-scored: %s", problem)
            return
        self._swap = _Swap(self._config.inference, path)
        self._accepted.inc()
        known["retired"] |= {known["version"] or self._job_version}
        known["path"], known["version"] = path, self._swap.info.version
        known["retired"].discard(known["version"])  # a swap back to an earlier checkpoint
        entries = [entry for entry in held.read() if self._recent(entry[1], known)]
        stale = [entry for entry in entries if self._stale(entry[1], known)]
        fresh = yield from self._rescore(stale, known)
        self._keep(held, [entry for entry in entries if not self._stale(entry[1], known)] + fresh)
        known["pruned_us"] = known["newest_us"]

    def _stale(self, row: dict, known: dict) -> bool:
        return known["version"] is not None and row["model_version"] in known["retired"]

    def _recent(self, row: dict, known: dict) -> bool:
        return to_micros(row["acquisition_time"]) > known["newest_us"] - self._horizon_us

    def _keep(self, held, entries: list) -> None:
        held.clear()
        for entry in entries:
            held.add(entry)
        self._held_count.update(len(entries))

    def _rescore(self, entries: list, known: dict):
        """Yields the RESCORED rows of `entries` under the swapped-in model; returns [(study, new row)]."""
        if self._swap is None or self._swap.path != known["path"]:  # state restored on another instance
            self._swap = _Swap(self._config.inference, known["path"])
        swap, inference = self._swap, self._config.inference
        fresh = []
        for start in range(0, len(entries), inference.max_batch_size):
            batch = entries[start: start + inference.max_batch_size]
            results = swap.handler.run_inference([study for study, _ in batch], swap.detector)
            for (study, previous), result in zip(batch, results):
                if not isinstance(result.inference, ImageDetections):  # sized as when it was first scored
                    fresh.append((study, previous))
                    continue
                row = detection_row(study, result.inference, model_name=swap.info.name,
                                    model_version=swap.info.version, score_threshold=inference.score_threshold)
                self._rescored.inc()
                fresh.append((study, row))
                changed = rescored_row(previous, row, self._config.positive_probability)
                if changed is not None:
                    self._rows.inc()
                    yield TimestampedValue(changed, Timestamp.of(to_micros(row["acquisition_time"]) / 1e6))
        return fresh


class RescoreOnSwap(beam.PTransform):
    """{"scored": (DecodedStudy, detections row), "model_updates": ModelMetadata} -> RESCORED rows.

    Both inputs are re-windowed into the global window and joined on one key; each output row keeps
    its study's acquisition time as timestamp.
    """

    def __init__(self, config: RescoreConfig):
        super().__init__()
        self._config = config

    def expand(self, inputs):
        scored = inputs["scored"] | "ScoredStudies" >> beam.Map(lambda pair: (_KEY, (SCORED, pair)))
        updates = inputs["model_updates"] | "ModelUpdates" >> beam.Map(lambda metadata: (_KEY, (MODEL, metadata)))
        return (
            (scored, updates)
            | "StudiesAndSwaps" >> beam.Flatten()
            | "Global" >> beam.WindowInto(GlobalWindows())
            | "Rescore" >> beam.ParDo(_RescoreFn(self._config))
        )
