"""Opacity detection on decoded chest X-rays: a Beam `RunInference` over the Cascade R-CNN.

`DetectOpacities` is the imaging path's model step::

    images (DecodedStudy) -> RunInference(CascadeModelHandler) -> ToDetectionRows -> [StructuredReports] -> detections
                                   |  failed batches                  |  refused images     |  SR failures
                                   +----------------------------------+---------------------+-> dead_letters

With a `ReportConfig`, each row's findings also become a DICOM SR (`transforms.structured_report`),
stored to the PACS and/or written beside the tables, and the row names it (``sr_sop_instance_uid``).

Every image in is one detection row or one dead letter out (stage ``detect``).  An image
the model cannot take (not 2-D, empty, non-finite, or not sized for the model) is refused
on its own; an exception from the model fails its batch, whose images all become dead
letters through `RunInference.with_exception_handling()`.

AI output, not for clinical use: rows carry the model's name and weights version.

Model loading and sharing.  `CascadeModelHandler.load_model` reads the safetensors
checkpoint once per worker VM (``share_across_processes=True``: Beam's
``MultiProcessShared`` keeps ``model_copies`` copies for all SDK processes of the VM, which
is what a GPU wants) or once per SDK process (False).  The shared object is a `CascadeDetector`,
whose `detect` takes and returns plain numpy, so calls through the cross-process proxy
pickle only arrays.

Batching.  ``batch_elements_kwargs`` gives `BatchElements` min/max batch size and
``max_batch_duration_secs``.  With a duration Beam 2.77 switches to a stateful batcher
(``_pardo_stateful_batch_elements``): elements are keyed by a per-process UUID, a
REAL_TIME timer is set to ``time.time() + max_batch_duration_secs`` when a batch's first
element arrives, and the batch is flushed when it is full, when that timer fires, or at
the end of the window; so a streaming pipeline never waits on a half-full batch for
longer than the duration.  (On the DirectRunner the timer is compared with the runner's
clock, which under TestStream is a TestClock starting at epoch 0, not wall time: see
tests/test_detect.py for what that means in tests.)

Padding.  torchvision's `GeneralizedRCNNTransform` pads every image of a batch to the
batch's largest size (rounded up to 32).  The backbone's convolutions and the RPN see
that padding, so detections of an image would depend on its batch neighbours.  Images
are therefore always padded here, in pixel space, to the same square (``input_size``
rounded up to 32) with the normalisation mean (0 after normalisation, as torchvision
pads), and the model's stages are called on that canvas with each image's real size
(`CascadeDetector._forward_on_canvas`), as torchvision's transform would tell them: the
RPN clips proposals to the image, not the canvas, so the detections equal those of
training and `medtwin evaluate` (tests/test_imaging_accuracy.py).  Boxes are clipped
back to each image's real extent.

Running on Dataflow with a GPU.  With ``device="cuda"`` (or an explicit ``accelerator``)
only the inference step carries the resource hint
``accelerator="type:nvidia-tesla-t4;count:1;install-nvidia-driver"``, so Dataflow runs
that step on GPU workers and the rest of the graph on ordinary ones (right fitting)::

    medtwin launch --engine dataflow --project P --region R --temp_location gs://B/tmp ... \\
        --gpu nvidia-tesla-t4 \\
        --sdk_container_image REGION-docker.pkg.dev/PROJECT/REPO/medtwin-gpu:TAG

which adds ``--experiments=use_runner_v2`` and gives the inference step that accelerator
hint; it never sets the job-wide ``worker_accelerator`` service option, which Dataflow says
not to combine with right fitting (tests/test_launch.py).

``use_runner_v2`` is required for GPUs and resource hints; ``install-nvidia-driver``
makes Dataflow install the driver on the VM; the custom container must hold a CUDA
build of torch/torchvision matching that driver (and this package).  That
service option would put GPUs on every worker; with the resource hint alone only the
hinted step gets them.  Use ``--number_of_worker_harness_threads``
or ``--experiments=no_use_multiple_sdk_containers`` to keep one model copy per GPU.
On CUDA the forward pass runs under ``torch.autocast`` (float16).

Metrics (namespace ``detect``): RunInference's own ``num_inferences``,
``inference_batch_latency_micro_secs``, ``inference_request_batch_size``,
``load_model_latency_milli_secs`` and ``failed_batches_counter``; added here the
distributions ``batch_size`` (images per model call, refused images excluded),
``model_latency_ms`` (model time per batch) and ``images_per_ks`` (images per 1000 s of
model time, per batch: Beam distributions hold integers, so images/s x 1000), and the
counters ``images_refused``, ``detections_emitted`` and ``boxes_emitted``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.coders import FloatCoder
from apache_beam.io.fileio import EmptyMatchTreatment, MatchAll
from apache_beam.ml.inference.base import ModelHandler, ModelMetadata, PredictionResult, RunInference
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms import trigger
from apache_beam.transforms.periodicsequence import PeriodicImpulse, RebaseMode
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.window import GlobalWindows, TimestampedValue
from apache_beam.utils.timestamp import Timestamp

import model as model_package
from model.checkpoint import load_detector, read_detector_metadata
from model.configs import config_from_dict
from model.preprocess import boxes_to_original
from transforms.dead_letters import DEAD_LETTERS
from transforms.dicom_decode import DecodedStudy
from transforms.dicom_fetch import reference_dead_letter
from transforms.structured_report import ReportConfig, WriteStructuredReports

STAGE = "detect"
METRICS_NAMESPACE = "detect"
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_ACCELERATOR = "type:nvidia-tesla-t4;count:1;install-nvidia-driver"
OPACITY_LABEL_NAME = "opacity"
SCORED = "scored"  # DetectOpacities' output of (DecodedStudy, row) pairs, for re-scoring
# torchvision's GeneralizedRCNNTransform pads batches to a multiple of this.
SIZE_DIVISIBLE = 32


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """How the detector runs.

    weights_path: the detector's .safetensors file (its .json beside it).
    device: "auto" (CUDA when available, else CPU), "cpu" or "cuda".
    min_batch_size, max_batch_size: images per model call (`BatchElements`).
    max_batch_duration_secs: longest a partial batch waits in streaming; None: no limit
        (Beam then batches per bundle, the fastest choice for batch pipelines).
    score_threshold: boxes scoring below it are not written.
    share_across_processes: one model per worker VM (Beam MultiProcessShared) instead of
        one per SDK process.
    model_copies: models kept when shared (e.g. one per GPU).
    accelerator: the Dataflow resource hint of the inference step; None means
        DEFAULT_ACCELERATOR when device == "cuda", and no hint otherwise.
    autocast: float16 autocast on CUDA (ignored on CPU).
    model_watch: streaming only: a glob of .safetensors checkpoints (e.g. ``models/*.safetensors``) watched
        by `WatchCheckpoints` every ``model_watch_interval_secs``; the newest file becomes
        RunInference's model-update side input and replaces the model without a restart once it passes
        `checkpoint_problem` (files must get new names: the watch ignores rewrites of a name).
    model_watch_stop_seconds: the watch stops looking this many seconds (wall clock) after the job
        starts, so a stream can end (tests, demos); None watches for as long as the job runs.
    """

    weights_path: str
    device: str = "auto"
    min_batch_size: int = 1
    max_batch_size: int = 8
    max_batch_duration_secs: float | None = 5
    score_threshold: float = 0.05
    share_across_processes: bool = True
    model_copies: int = 1
    accelerator: str | None = None
    autocast: bool = True
    model_watch: str | None = None
    model_watch_interval_secs: float = 60.0
    model_watch_stop_seconds: float | None = None

    def __post_init__(self):
        if not isinstance(self.weights_path, str) or not self.weights_path.endswith(".safetensors"):
            raise ValueError(f"weights_path must name a .safetensors file, got {self.weights_path!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        for name in ("min_batch_size", "max_batch_size", "model_copies"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.min_batch_size > self.max_batch_size:
            raise ValueError(f"min_batch_size {self.min_batch_size} is larger than max_batch_size "
                             f"{self.max_batch_size}")
        duration = self.max_batch_duration_secs
        if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))
                                     or not math.isfinite(duration) or duration <= 0):
            raise ValueError(f"max_batch_duration_secs must be a positive number of seconds or None, got {duration!r}")
        threshold = self.score_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {threshold!r}")
        if self.model_watch is not None and (not isinstance(self.model_watch, str)
                                             or not self.model_watch.endswith(".safetensors")):
            raise ValueError(f"model_watch must be a glob of .safetensors files, got {self.model_watch!r}")
        stop = self.model_watch_stop_seconds
        if stop is not None and (isinstance(stop, bool) or not isinstance(stop, (int, float))
                                 or not math.isfinite(stop) or stop <= 0):
            raise ValueError(f"model_watch_stop_seconds must be a positive number of seconds or None, got {stop!r}")
        if self.accelerator is not None:
            if self.device == "cpu":
                raise ValueError(f"accelerator {self.accelerator!r} asks for a GPU but device is 'cpu'")
            if not isinstance(self.accelerator, str) or not self.accelerator.startswith("type:"):
                raise ValueError("accelerator must be a Dataflow accelerator string such as "
                                 f"{DEFAULT_ACCELERATOR!r}, got {self.accelerator!r}")

    @property
    def accelerator_hint(self) -> str | None:
        """The accelerator resource hint of the inference step, or None for CPU workers."""
        if self.accelerator is not None:
            return self.accelerator
        return DEFAULT_ACCELERATOR if self.device == "cuda" else None


class ModelInfo(NamedTuple):
    """What the checkpoint's JSON says, read without building the model."""

    name: str  # "<arch>_<config name>", e.g. "cascade_tiny"
    version: str  # weights hash, checked against the weights when they are loaded
    input_size: int  # longest image side the model expects: the decode stage's target_size


def read_model_info(weights_path: str) -> ModelInfo:
    """Reads the checkpoint JSON beside `weights_path` (no weights loaded)."""
    metadata = read_detector_metadata(weights_path)
    config = config_from_dict(metadata["config"])
    return ModelInfo(name=f"{metadata['arch']}_{config.name}", version=str(metadata["version"]),
                     input_size=int(config.input_size))


def model_input_size(config: InferenceConfig | str) -> int:
    """The `target_size` the decode stage must use for this detector (its config's input_size)."""
    weights_path = config.weights_path if isinstance(config, InferenceConfig) else config
    return read_model_info(weights_path).input_size


class ImageDetections(NamedTuple):
    """The model's findings on one image, in the model input's (resized) pixels.

    boxes: (K, 4) float32 x1, y1, x2, y2, clipped to the image; scores: (K,) float32.
    """

    boxes: np.ndarray
    scores: np.ndarray
    latency_ms: float  # model time of the whole batch
    batch_size: int  # images in that model call


class InferenceRefused(NamedTuple):
    """An image the handler would not give the model; ``reason`` is the dead-letter reason."""

    reason: str


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; "cuda" without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device on this worker")
    return device


class CascadeDetector:
    """The loaded detector: numpy images in, numpy boxes out (safe to proxy across processes)."""

    def __init__(self, weights_path: str, *, device: str = "auto", autocast: bool = True):
        import torch

        self.device = resolve_device(device)
        loaded = load_detector(weights_path, device=self.device)
        self._model = loaded.model
        self.version = loaded.version
        self.input_size = int(loaded.config.input_size)
        self._pad_value = float(loaded.config.image_mean[0])
        self._canvas = int(math.ceil(self.input_size / SIZE_DIVISIBLE) * SIZE_DIVISIBLE)
        self._autocast = autocast and self.device == "cuda"
        self._torch = torch

    def detect(self, images: Sequence[np.ndarray]) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
        """Runs the model once on a batch.

        Args:
            images: B arrays (H, W) float32 in [0, 1] with max(H, W) == input_size.

        Returns:
            ([(boxes K x 4, scores K)] per image in resized pixels, model milliseconds).
        """
        torch = self._torch
        start = time.perf_counter()
        batch = np.full((len(images), 1, self._canvas, self._canvas), self._pad_value, dtype=np.float32)
        for index, image in enumerate(images):
            batch[index, 0, : image.shape[0], : image.shape[1]] = image
        tensor = torch.from_numpy(batch).to(self.device, non_blocking=True)
        sizes = [(int(image.shape[0]), int(image.shape[1])) for image in images]
        # float16 autocast only on CUDA: torchvision's RoIAlign and NMS have autocast kernels.
        mixed = torch.autocast("cuda", dtype=torch.float16) if self._autocast else contextlib.nullcontext()
        with torch.inference_mode(), mixed:
            outputs = self._forward_on_canvas(tensor, sizes)
        results = [_clipped(output, image.shape) for output, image in zip(outputs, images)]
        return results, (time.perf_counter() - start) * 1000.0


    def _forward_on_canvas(self, canvas, sizes: list[tuple[int, int]]) -> list[dict]:
        """GeneralizedRCNN's forward on an already padded (B, 1, S, S) batch, told each image's real size.

        The model's own forward would take every image to be S x S, so the RPN would keep
        proposals running into the padding (clipped to the canvas, not the image) and the
        detections would differ from training and `medtwin evaluate`, which see the real sizes.
        """
        from torchvision.models.detection.image_list import ImageList

        model = self._model
        normalised = (canvas - model.transform.image_mean[0]) / model.transform.image_std[0]
        batch = ImageList(normalised, sizes)
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        found, _ = model.roi_heads(features, proposals, batch.image_sizes)
        return model.transform.postprocess(found, batch.image_sizes, batch.image_sizes)


def worker_weights_path(weights_path: str) -> str:
    """The checkpoint to load here: `weights_path` if this machine has it, else the checkpoint of the
    same name shipped inside this machine's installed `model` package.

    A job launched from a checkout names the launcher's absolute path (the default ``--weights``);
    its workers installed the package (``--setup_file`` or the worker image) elsewhere.
    `CascadeModelHandler.load_model` then checks the version is the one the job was built for.
    """
    if Path(weights_path).is_file():
        return weights_path
    shipped = Path(model_package.__file__).resolve().parent / "weights" / Path(weights_path).name
    if shipped.is_file():
        return str(shipped)
    raise FileNotFoundError(f"{weights_path}: not on this worker, and the installed model package ships no "
                            f"{Path(weights_path).name}; bake the weights into the worker image")


def _clipped(output: dict, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Boxes clipped to the real (H, W) image; boxes left with no area (all padding) dropped."""
    boxes = output["boxes"].float().cpu().numpy().reshape(-1, 4)
    scores = output["scores"].float().cpu().numpy().reshape(-1)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, shape[1])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, shape[0])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep].astype(np.float32), scores[keep].astype(np.float32)


def image_problem(image: Any, input_size: int) -> str | None:
    """Why an image cannot go to the model, or None."""
    if not isinstance(image, np.ndarray) or image.ndim != 2:
        return f"image must be a 2-D array, got {type(image).__name__} of shape {getattr(image, 'shape', None)}"
    if image.size == 0:
        return f"empty image of shape {image.shape}"
    if max(image.shape) != input_size:
        return (f"image of shape {image.shape}: the longest side must equal the model input size {input_size} "
                "(decode with target_size = model_input_size(config))")
    if not np.isfinite(image).all():
        return "image has non-finite pixel values"
    return None


def checkpoint_problem(weights_path: str, input_size: int) -> str | None:
    """Why the checkpoint at `weights_path` must not replace a running model, or None.

    It must load as `model.checkpoint.load_detector` loads (safetensors only, JSON and header agreeing,
    every config value checked, weights hashing to their version, fitting the architecture) and take
    images of the running model's `input_size` (the decode stage resizes to it).
    """
    if not isinstance(weights_path, str) or not weights_path.endswith(".safetensors"):
        return "not a .safetensors checkpoint"
    try:
        info = read_model_info(weights_path)
        if info.input_size != input_size:
            return f"input size {info.input_size}, the running model's is {input_size}"
        load_detector(weights_path, device="cpu")
    except Exception as error:  # ValueError/ConfigError from the checks, OSError for a missing file
        return f"{type(error).__name__}: {error}"
    return None


class CascadeModelHandler(ModelHandler[DecodedStudy, PredictionResult, CascadeDetector]):
    """RunInference handler: DecodedStudy -> PredictionResult(inference=ImageDetections | InferenceRefused)."""

    def __init__(self, config: InferenceConfig):
        super().__init__()
        self._config = config
        self._weights_path = config.weights_path
        info = read_model_info(config.weights_path)
        self._info = info
        self._share_across_processes = config.share_across_processes
        self._model_copies = config.model_copies

    def load_model(self) -> CascadeDetector:
        detector = CascadeDetector(worker_weights_path(self._weights_path), device=self._config.device,
                                   autocast=self._config.autocast)
        if detector.version != self._info.version:
            raise ValueError(f"the worker's {self._weights_path} is version {detector.version}, the job was "
                             f"built for {self._info.version}: ship the same weights to the workers")
        return detector

    def update_model_path(self, model_path: str | None = None) -> None:
        """RunInference's model update (its ``model_metadata_pcoll`` side input): take `model_path` only
        if it passes `checkpoint_problem`; a refused checkpoint keeps the current model (counted in
        ``detect/checkpoints_refused``), so a bad upload never stops the stream."""
        if not model_path or model_path == self._weights_path:
            return
        problem = checkpoint_problem(model_path, self._info.input_size)
        if problem is not None:
            Metrics.counter(METRICS_NAMESPACE, "checkpoints_refused").inc()
            logging.getLogger(__name__).warning("new detector checkpoint refused, the current model stays: %s",
                                                problem)
            return
        Metrics.counter(METRICS_NAMESPACE, "checkpoints_accepted").inc()
        self._weights_path = model_path
        self._info = read_model_info(model_path)

    def run_inference(self, batch: Sequence[DecodedStudy], model: CascadeDetector,
                      inference_args: dict | None = None) -> Iterable[PredictionResult]:
        problems = [image_problem(study.image, self._info.input_size) for study in batch]
        accepted = [study.image.astype(np.float32, copy=False) for study, problem in zip(batch, problems)
                    if problem is None]
        found, latency_ms = model.detect(accepted) if accepted else ([], 0.0)
        if accepted:
            self._record_batch(len(accepted), latency_ms)
        results = iter(found)
        for study, problem in zip(batch, problems):
            if problem is not None:
                Metrics.counter(METRICS_NAMESPACE, "images_refused").inc()
                yield PredictionResult(study, InferenceRefused(problem), self.model_id)
            else:
                boxes, scores = next(results)
                yield PredictionResult(study, ImageDetections(boxes, scores, latency_ms, len(accepted)),
                                       self.model_id)

    @property
    def model_id(self) -> str:
        return f"{self._info.name}@{self._info.version}"

    @staticmethod
    def _record_batch(size: int, latency_ms: float) -> None:
        Metrics.distribution(METRICS_NAMESPACE, "batch_size").update(size)
        Metrics.distribution(METRICS_NAMESPACE, "model_latency_ms").update(int(round(latency_ms)))
        if latency_ms > 0:
            Metrics.distribution(METRICS_NAMESPACE, "images_per_ks").update(int(round(size * 1e6 / latency_ms)))

    def get_num_bytes(self, batch: Sequence[DecodedStudy]) -> int:
        return sum(getattr(study.image, "nbytes", 0) for study in batch)

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE

    def batch_elements_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"min_batch_size": self._config.min_batch_size,
                                  "max_batch_size": self._config.max_batch_size}
        if self._config.max_batch_duration_secs is not None:
            kwargs["max_batch_duration_secs"] = self._config.max_batch_duration_secs
        return kwargs

    def get_resource_hints(self) -> dict:
        hint = self._config.accelerator_hint
        return {"accelerator": hint} if hint else {}

    def share_model_across_processes(self) -> bool:
        return self._share_across_processes

    def model_copies(self) -> int:
        return self._model_copies


def _timestamp_of(study: DecodedStudy, fallback: Timestamp) -> Timestamp:
    acquired = study.reference.get("acquisition_time") if isinstance(study.reference, dict) else None
    if isinstance(acquired, dt.datetime):
        if acquired.tzinfo is None:
            acquired = acquired.replace(tzinfo=dt.timezone.utc)
        return Timestamp.from_utc_datetime(acquired.astimezone(dt.timezone.utc))
    return fallback


def _reference_of(study: Any) -> dict:
    reference = getattr(study, "reference", None)
    return reference if isinstance(reference, dict) else {"element": type(study).__name__}


def detection_row(study: DecodedStudy, found: ImageDetections, *, model_name: str, model_version: str,
                  score_threshold: float) -> dict:
    """One DETECTIONS row (without quality_flag / quality_reasons) for one image.

    Boxes go back to original pixels (``boxes_to_original``), clipped to the stored image.
    covid_probability is image-level: the highest kept box score, 0.0 with no box above
    the threshold (the detector has no separate image classifier).
    """
    keep = found.scores >= score_threshold
    boxes = boxes_to_original(found.boxes[keep], study.scale)
    rows, columns = (int(n) for n in study.original_shape)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, columns)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, rows)
    scores = found.scores[keep]
    reference = study.reference
    return {
        "sop_instance_uid": reference["sop_instance_uid"],
        "study_instance_uid": reference["study_instance_uid"],
        "series_instance_uid": reference["series_instance_uid"],
        "patient_key": reference["patient_key"],
        "device_id": reference["device_id"],
        "acquisition_time": reference["acquisition_time"],
        "model_name": model_name,
        "model_version": model_version,
        "boxes": [{"x1": float(b[0]), "y1": float(b[1]), "x2": float(b[2]), "y2": float(b[3]),
                   "score": float(s), "label": OPACITY_LABEL_NAME} for b, s in zip(boxes, scores)],
        "covid_probability": float(scores.max()) if len(scores) else 0.0,
        "image_rows": rows,
        "image_columns": columns,
        "inference_latency_ms": float(found.latency_ms),
        "batch_size": int(found.batch_size),
        "sr_sop_instance_uid": None,  # set by WriteStructuredReports when reports are on
    }


class ToDetectionRowsFn(beam.DoFn):
    """PredictionResult -> detection row (main) or dead letter, timestamped at acquisition time.

    keep_scored: also emit (DecodedStudy, row) on the ``scored`` output (re-scoring on a model swap).
    """

    def __init__(self, info: ModelInfo, score_threshold: float, *, with_reference: bool = False,
                 keep_scored: bool = False):
        self._info = info
        self._threshold = score_threshold
        self._with_reference = with_reference  # emit (reference, row) for the SR step
        self._keep_scored = keep_scored
        self._rows = Metrics.counter(METRICS_NAMESPACE, "detections_emitted")
        self._boxes = Metrics.counter(METRICS_NAMESPACE, "boxes_emitted")

    def process(self, result: PredictionResult, timestamp=beam.DoFn.TimestampParam):
        study = result.example
        at = _timestamp_of(study, timestamp)
        if isinstance(result.inference, InferenceRefused):
            yield TaggedOutput(DEAD_LETTERS, TimestampedValue(
                reference_dead_letter(STAGE, f"image refused: {result.inference.reason}",
                                      _reference_of(study), at), at))
            return
        model_name, model_version = _model_of(result, self._info)
        try:
            row = detection_row(study, result.inference, model_name=model_name,
                                model_version=model_version, score_threshold=self._threshold)
        except Exception as error:  # a reference missing a field the row needs, a bad scale...
            yield TaggedOutput(DEAD_LETTERS, TimestampedValue(
                # the error's text may quote a reference value: only its type is named
                reference_dead_letter(STAGE, f"detection row could not be built ({type(error).__name__})",
                                      _reference_of(study), at), at))
            return
        self._rows.inc()
        self._boxes.inc(len(row["boxes"]))
        if self._keep_scored:
            yield TaggedOutput(SCORED, TimestampedValue((study, row), at))
        yield TimestampedValue((study.reference, row) if self._with_reference else row, at)


def _model_of(result: PredictionResult, info: ModelInfo) -> tuple[str, str]:
    """(name, version) of the model that scored `result` (its ``name@version`` model_id: after a hot
    swap, the new model's), else the job's."""
    name, at, version = str(result.model_id or "").rpartition("@")
    return (name, version) if at and name and version else (info.name, info.version)


class FailedBatchToDeadLettersFn(beam.DoFn):
    """(failed batch, (exception type, repr, traceback)) from RunInference -> one dead letter per image.

    The reason names the exception, not its traceback (which stays in the worker logs).
    """

    def process(self, failure, timestamp=beam.DoFn.TimestampParam):
        batch, (_, error_repr, _) = failure
        reason = f"inference failed for a batch of {len(batch)}: {error_repr}"
        for study in batch:
            at = _timestamp_of(study, timestamp)
            yield TimestampedValue(reference_dead_letter(STAGE, reason, _reference_of(study), at), at)


class _NewestCheckpointFn(beam.DoFn):
    """(key, FileMetadata) -> ModelMetadata for each matched file newer (mtime) than every one before it."""

    NEWEST = ReadModifyWriteStateSpec("newest", FloatCoder())

    def process(self, element, newest=beam.DoFn.StateParam(NEWEST)):
        _, match = element
        seen = newest.read()
        if seen is None or match.last_updated_in_seconds > seen:
            newest.write(match.last_updated_in_seconds)
            yield ModelMetadata(model_id=match.path, model_name=Path(match.path).stem)


class WatchCheckpoints(beam.PTransform):
    """pipeline -> PCollection[ModelMetadata]: each checkpoint matching ``config.model_watch`` that is newer
    (mtime) than those before it, looked for every ``model_watch_interval_secs``, in the global window,
    re-fired as new files come (what Beam's `WatchFilePattern` gives RunInference).

    The polls are a `PeriodicImpulse` rebased to when the job starts, each matching the whole glob
    (`MatchAll`). Not `WatchFilePattern`: its `MatchContinuously` counts polls to its stop time from
    when Beam's fileio was imported, and on the Flink job server (2.56) those polls ran back to back
    (90 polls of a 90 s watch in 3 s, tests/test_model_swap.py) so the watch ended before any new file.
    ``model_watch_stop_seconds`` ends the watch that long after the job starts; None: never.
    """

    def __init__(self, config: InferenceConfig):
        super().__init__()
        if config.model_watch is None:
            raise ValueError("WatchCheckpoints needs InferenceConfig.model_watch")
        self._config = config

    def expand(self, pipeline):
        config, start = self._config, Timestamp.now()
        stop = config.model_watch_stop_seconds
        polls = (PeriodicImpulse(start_timestamp=start, fire_interval=config.model_watch_interval_secs,
                                 rebase=RebaseMode.REBASE_START) if stop is None
                 else PeriodicImpulse(start_timestamp=start, stop_timestamp=start + stop,
                                      fire_interval=config.model_watch_interval_secs, rebase=RebaseMode.REBASE_ALL))
        return (
            pipeline
            | "Polls" >> polls
            | "Glob" >> beam.Map(lambda _: config.model_watch)
            | "MatchCheckpoints" >> MatchAll(EmptyMatchTreatment.DISALLOW)  # a job starts with a model to watch
            | "OneKey" >> beam.Map(lambda match: ("checkpoints", match))
            | "NewestOnly" >> beam.ParDo(_NewestCheckpointFn())
            | "Refired" >> beam.WindowInto(GlobalWindows(), trigger=trigger.Repeatedly(trigger.AfterProcessingTime(1)),
                                           accumulation_mode=trigger.AccumulationMode.DISCARDING)
        )


class DetectOpacities(beam.PTransform):
    """PCollection[DecodedStudy] -> {"detections": rows, "dead_letters": rows[, "scored": pairs]}.

    Detection rows have every DETECTIONS field but quality_flag / quality_reasons (added by
    the join with the device twin) and keep the acquisition time as their timestamp.
    images in = detections + dead letters.  reports: None, or where each image's SR goes.
    model_updates: RunInference's model-update side input (ModelMetadata whose model_id is a
    checkpoint path); by default `WatchCheckpoints` of ``config.model_watch``, or none.
    keep_scored: also return "scored", each image with its row (before any SR), for `transforms.rescore`.
    """

    def __init__(self, config: InferenceConfig, *, handler: ModelHandler | None = None,
                 reports: ReportConfig | None = None, model_updates: beam.PCollection | None = None,
                 keep_scored: bool = False):
        super().__init__()
        self._config = config
        self._handler = handler or CascadeModelHandler(config)
        self._info = read_model_info(config.weights_path)
        self._reports = reports
        self._model_updates = model_updates  # PCollection[ModelMetadata]; None: config.model_watch, if any
        self._keep_scored = keep_scored

    def expand(self, images):
        updates = self._model_updates
        if updates is None and self._config.model_watch is not None:
            # Hot swap: the newest checkpoint matching the glob, as RunInference's model-update side input.
            updates = images.pipeline | "WatchCheckpoints" >> WatchCheckpoints(self._config)
        inferred, failed = images | "RunInference" >> RunInference(
            self._handler, model_metadata_pcoll=updates).with_exception_handling()
        rows = inferred | "ToDetectionRows" >> beam.ParDo(
            ToDetectionRowsFn(self._info, self._config.score_threshold, with_reference=self._reports is not None,
                              keep_scored=self._keep_scored)
        ).with_outputs(DEAD_LETTERS, SCORED, main="rows")
        failed_rows = failed.failed_inferences | "FailedBatchesToDeadLetters" >> beam.ParDo(
            FailedBatchToDeadLettersFn())
        dead = [rows[DEAD_LETTERS], failed_rows]
        detections = rows.rows
        if self._reports is not None:
            reported = rows.rows | "StructuredReports" >> WriteStructuredReports(self._reports)
            detections = reported["detections"]
            dead.append(reported[DEAD_LETTERS])
        dead_letters = dead | "CollectDeadLetters" >> beam.Flatten()
        found = {"detections": detections, "dead_letters": dead_letters}
        return {**found, SCORED: rows[SCORED]} if self._keep_scored else found
