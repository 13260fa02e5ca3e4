"""Learned early-warning features with tf.Transform: analysed once over history, applied unchanged everywhere.

The statistics a feature needs (means and deviations, quantile boundaries, a vocabulary) are computed
once, over bounded history, by a batch analysis job (`AnalyseHistory`, run by `medtwin train-risk`
over the twin tables of a batch run or backfill), and saved as tf.Transform's transform graph. The
batch and streaming pipelines load that graph and apply it (`ApplyFeatures`), so a model is served
exactly the features it was trained on.

    history twin rows ──AnalyseHistory──► FEATURES/<version>/{patient,device}/  (transform_fn + metadata)
                                          FEATURES/<version>/manifest.json      (version, rows analysed)
    twin rows ──ApplyFeatures(FEATURES/<version>)──► (row, features) ──► risk models (model/risk.py)
                                             └────► dead_letters (stage features_<subject>)

Features (`SUBJECTS`):
  patient  z-score and decile of each vital's window mean and of the heart-rate and temperature
           trends; z-score of NEWS2.
  device   per device model: z-scores of tube temperature and of the rates per hour of errors,
           missed heartbeats and exposures; uptime; a vocabulary of the error codes seen in history
           (codes become counts per vocabulary entry, unseen codes one out-of-vocabulary count).

An artifact's version is a digest of the rows it analysed and of the feature definitions, so the
same history gives the same version; every row that used an artifact names it (``features_version``).
A row lacking an input (a window with no SpO2, a device without temperature) is neither analysed nor
featured: it passes on with no features, as the rule-based path still scores it. A row whose features
fail to compute is passed on the same way and also yields a dead letter naming the stage and reason
(tf.Transform itself has no exception handling). The analysis needs bounded input (tf.Transform
analysers are global combines), which is why it is a batch job and never part of the stream.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
import threading
from typing import Iterable

import apache_beam as beam
import numpy as np

from transforms.dead_letters import DEAD_LETTERS, dead_letter

PATIENT_VITALS = ("heart_rate_mean", "respiratory_rate_mean", "spo2_mean", "temperature_c_mean")
PATIENT_TRENDS = ("heart_rate_trend", "temperature_trend")
PATIENT_INPUTS = (*PATIENT_VITALS, *PATIENT_TRENDS, "news2_score")
QUANTILE_BUCKETS = 10
# Device readings z-scored per device model; rates are per hour of window.
DEVICE_RATES = {"error_rate": "error_count", "missed_heartbeat_rate": "missed_heartbeats",
                "exposure_rate": "exposure_count"}
DEVICE_INPUTS = ("tube_temperature_max", "uptime_fraction", *DEVICE_RATES.values())
ERROR_CODES_VOCABULARY = "error_codes"
# One out-of-vocabulary bucket for error codes history never saw.
OOV_BUCKETS = 1
SUBJECTS = ("patient", "device")
KEYS = {"patient": "patient_key", "device": "device_id"}
FEATURE_DEFINITION_VERSION = 1
# tf.Transform loads and traces saved models under process-global state; DoFns of one worker process may
# set up on parallel threads.
_TF_LOCK = threading.Lock()


# ---------------------------------------------------------------- raw inputs: twin row -> dense dict


def _window_hours(row: dict) -> float:
    return (row["window_end"] - row["window_start"]).total_seconds() / 3600.0


def raw_inputs(subject: str, row: dict) -> dict | None:
    """A twin row -> the tf.Transform input dict of `subject`, or None when an input is missing."""
    if subject == "patient":
        values = [row.get(name) for name in PATIENT_INPUTS]
        if any(value is None for value in values):
            return None
        return {name: np.float32(value) for name, value in zip(PATIENT_INPUTS, values)}
    values = [row.get(name) for name in DEVICE_INPUTS]
    hours = _window_hours(row)
    if any(value is None for value in values) or hours <= 0:
        return None
    inputs = {"device_model": (row.get("device_model") or "unknown").encode(),
              "tube_temperature_max": np.float32(row["tube_temperature_max"]),
              "uptime_fraction": np.float32(row["uptime_fraction"]),
              "error_codes": [item["code"].encode() for item in row.get("error_counts") or ()
                              for _ in range(int(item["count"]))]}
    for rate, count in DEVICE_RATES.items():
        inputs[rate] = np.float32(row[count] / hours)
    return inputs


def _feature_spec(subject: str) -> dict:
    import tensorflow as tf
    if subject == "patient":
        return {name: tf.io.FixedLenFeature([], tf.float32) for name in PATIENT_INPUTS}
    spec = {name: tf.io.FixedLenFeature([], tf.float32) for name in ("tube_temperature_max", "uptime_fraction",
                                                                     *DEVICE_RATES)}
    spec["device_model"] = tf.io.FixedLenFeature([], tf.string)
    spec["error_codes"] = tf.io.VarLenFeature(tf.string)
    return spec


# ---------------------------------------------------------------- tf.Transform preprocessing functions


def patient_preprocessing_fn(inputs: dict) -> dict:
    """tf.Transform: z-score and decile of each vital and trend; z-score of NEWS2."""
    import tensorflow_transform as tft
    outputs = {}
    for name in (*PATIENT_VITALS, *PATIENT_TRENDS):
        outputs[f"{name}_z"] = tft.scale_to_z_score(inputs[name])
        outputs[f"{name}_q"] = tft.bucketize(inputs[name], QUANTILE_BUCKETS)
    outputs["news2_score_z"] = tft.scale_to_z_score(inputs["news2_score"])
    return outputs


def device_preprocessing_fn(inputs: dict) -> dict:
    """tf.Transform: per-model z-scores of temperature and rates, uptime, error-code vocabulary ids."""
    import tensorflow_transform as tft
    outputs = {"uptime_fraction": inputs["uptime_fraction"]}
    for name in ("tube_temperature_max", *DEVICE_RATES):
        outputs[f"{name}_z"] = tft.scale_to_z_score_per_key(inputs[name], key=inputs["device_model"])
    outputs["error_code_ids"] = tft.compute_and_apply_vocabulary(
        inputs["error_codes"], num_oov_buckets=OOV_BUCKETS, vocab_filename=ERROR_CODES_VOCABULARY)
    return outputs


PREPROCESSING_FNS = {"patient": patient_preprocessing_fn, "device": device_preprocessing_fn}


def feature_names(subject: str, vocabulary_size: int = 0) -> tuple[str, ...]:
    """The order of the model input vector `to_vector` builds (vocabulary_size: device codes)."""
    if subject == "patient":
        return (*(f"{n}_{s}" for n in (*PATIENT_VITALS, *PATIENT_TRENDS) for s in ("z", "q")), "news2_score_z")
    return ("uptime_fraction", *(f"{n}_z" for n in ("tube_temperature_max", *DEVICE_RATES)),
            *(f"error_code_{i}" for i in range(vocabulary_size + OOV_BUCKETS)))


# ---------------------------------------------------------------- analysis (batch, bounded history)


def history_files(history: Iterable[str], subject: str) -> list[str]:
    """The Parquet files of `subject`'s twin table under each run output in `history`, sorted."""
    import glob
    table = f"{subject}_twin"
    return sorted(path for out in history for path in glob.glob(os.path.join(out, table, "**", "*.parquet"),
                                                                 recursive=True))


def artifact_version(files: dict[str, list[str]]) -> str:
    """The version of an artifact analysed over `files` ({subject: paths}): a digest of their bytes and
    of the feature definitions, so the same history gives the same version."""
    digest = hashlib.sha256(f"definitions {FEATURE_DEFINITION_VERSION}".encode())
    for subject in SUBJECTS:
        for path in files[subject]:
            with open(path, "rb") as f:
                digest.update(subject.encode() + hashlib.sha256(f.read()).digest())
    return "feat-" + digest.hexdigest()[:12]


class _RawInputsFn(beam.DoFn):
    """Final twin rows -> tf.Transform input dicts; rows missing an input are counted, not analysed."""

    def __init__(self, subject: str):
        self._subject = subject

    def process(self, row: dict):
        if not row.get("is_final"):
            return
        inputs = raw_inputs(self._subject, row)
        if inputs is None:
            beam.metrics.Metrics.counter("features", f"{self._subject}_incomplete").inc()
            return
        yield inputs


def analyse_history(history: Iterable[str], features_root: str, beam_args: list[str] | None = None) -> str:
    """History -> FEATURES_ROOT/<version>/ (returned): tf.Transform's transform_fn per subject + manifest.json.

    history: run outputs (``medtwin run``/``medtwin backfill`` batch output folders); their
    patient_twin and device_twin Parquet files are read by one Beam batch job (DirectRunner unless
    `beam_args` say otherwise), final rows only (one per window), and analysed by tf.Transform's
    AnalyzeDataset. An artifact of the same version already there is kept.
    """
    import shutil

    import tensorflow_transform.beam as tft_beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    history = list(history)
    files = {subject: history_files(history, subject) for subject in SUBJECTS}
    for subject, paths in files.items():
        if not paths:
            raise ValueError(f"no {subject}_twin files under the history given")
    version = artifact_version(files)
    out = os.path.join(features_root, version)
    if os.path.isdir(out):
        return out
    os.makedirs(features_root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{version}-", dir=features_root)
    # One job per subject: tf.Transform traces its saved models under a process-global tracker, and a
    # portable runner's LOOPBACK worker runs independent bundles (here: two subjects') on parallel threads.
    for subject in SUBJECTS:
        with beam.Pipeline(options=PipelineOptions(beam_args or [])) as pipeline:
            with tft_beam.Context(temp_dir=os.path.join(staging, "tmp", subject), force_tf_compat_v1=False):
                metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(
                    _feature_spec(subject)))
                raw = (pipeline
                       | f"Files_{subject}" >> beam.Create(files[subject])
                       | f"Read_{subject}" >> beam.io.ReadAllFromParquet()
                       | f"Inputs_{subject}" >> beam.ParDo(_RawInputsFn(subject)))
                transform_fn = (raw, metadata) | f"Analyse_{subject}" >> tft_beam.AnalyzeDataset(
                    PREPROCESSING_FNS[subject])
                _ = transform_fn | f"Write_{subject}" >> tft_beam.WriteTransformFn(os.path.join(staging, subject))
    manifest = {"version": version, "feature_definition_version": FEATURE_DEFINITION_VERSION,
                "history_files": {s: len(files[s]) for s in SUBJECTS},
                "created": dt.datetime.now(dt.timezone.utc).isoformat()}
    with open(os.path.join(staging, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    shutil.rmtree(os.path.join(staging, "tmp"), ignore_errors=True)
    os.rename(staging, out)
    return out


# ---------------------------------------------------------------- apply (batch and streaming)


class FeatureArtifactManifest:
    """An artifact's manifest.json, read without loading TensorFlow: `version`, `manifest`."""

    def __init__(self, path: str):
        with open(os.path.join(path, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.version = self.manifest["version"]


def tft_output(path: str, subject: str):
    """tf.Transform's TFTransformOutput of `subject` in the artifact at `path`."""
    import tensorflow_transform as tft
    return tft.TFTransformOutput(os.path.join(path, subject))


class FeatureArtifact(FeatureArtifactManifest):
    """A loaded artifact: `transform(subject, [inputs]) -> [feature dict]`, `version`, vocabulary size."""

    def __init__(self, path: str):
        super().__init__(path)
        with _TF_LOCK:
            self._outputs = {s: tft_output(path, s) for s in SUBJECTS}
        self.vocabulary_size = self._outputs["device"].vocabulary_size_by_name(ERROR_CODES_VOCABULARY)
        self._layers = {}

    def names(self, subject: str) -> tuple[str, ...]:
        return feature_names(subject, self.vocabulary_size)

    def transform(self, subject: str, batch: list[dict]) -> np.ndarray:
        """Raw input dicts -> float32 array, one row per input, columns `names(subject)`."""
        import tensorflow as tf
        with _TF_LOCK:
            if subject not in self._layers:
                self._layers[subject] = self._outputs[subject].transform_features_layer()
        tensors = {}
        for name, spec in _feature_spec(subject).items():
            if isinstance(spec, tf.io.VarLenFeature):
                tensors[name] = tf.ragged.constant([x[name] for x in batch], dtype=tf.string,
                                                   ragged_rank=1).to_sparse()
            else:
                tensors[name] = tf.constant([x[name] for x in batch], dtype=spec.dtype)
        out = self._layers[subject](tensors)
        columns = []
        if subject == "patient":
            for name in (*PATIENT_VITALS, *PATIENT_TRENDS):
                columns += [out[f"{name}_z"].numpy(), out[f"{name}_q"].numpy() / (QUANTILE_BUCKETS - 1)]
            columns.append(out["news2_score_z"].numpy())
            return np.stack(columns, axis=1).astype(np.float32)
        columns = [out["uptime_fraction"].numpy(),
                   *(out[f"{n}_z"].numpy() for n in ("tube_temperature_max", *DEVICE_RATES))]
        dense = np.stack(columns, axis=1).astype(np.float32)
        ids = out["error_code_ids"]
        counts = np.zeros((len(batch), self.vocabulary_size + OOV_BUCKETS), np.float32)
        if isinstance(ids, tf.SparseTensor):
            rows, values = ids.indices.numpy()[:, 0], ids.values.numpy()
        else:   # RaggedTensor
            rows, values = ids.value_rowids().numpy(), ids.flat_values.numpy()
        np.add.at(counts, (rows, values), 1.0)
        return np.concatenate([dense, counts], axis=1)


class _ApplyFeaturesFn(beam.DoFn):
    """Batches of twin rows -> (row, features or None) and dead letters (stage features_<subject>)."""

    def __init__(self, subject: str, artifact_path: str):
        self._subject, self._path = subject, artifact_path
        self._artifact = None

    def setup(self):
        self._artifact = FeatureArtifact(self._path)

    def process(self, rows: list[dict]):
        subject, artifact = self._subject, self._artifact
        inputs = [raw_inputs(subject, row) for row in rows]
        usable = [i for i, x in enumerate(inputs) if x is not None]
        features = {}
        if usable:
            try:
                matrix = artifact.transform(subject, [inputs[i] for i in usable])
                if not np.isfinite(matrix).all():
                    raise ValueError("non-finite feature")
                features = dict(zip(usable, matrix))
            except Exception:   # tf.Transform has no exception handling: judge rows one by one
                for i in usable:
                    try:
                        vector = artifact.transform(subject, [inputs[i]])[0]
                        if not np.isfinite(vector).all():
                            raise ValueError("a feature is not finite")
                        features[i] = vector
                    except Exception as error:  # noqa: BLE001 - any failure is this row's dead letter
                        row = rows[i]
                        yield beam.pvalue.TaggedOutput(DEAD_LETTERS, dead_letter(
                            f"features_{subject}", f"feature transform failed: {type(error).__name__}",
                            {KEYS[subject]: row[KEYS[subject]], "window_start": row["window_start"].isoformat(),
                             "features_version": artifact.version},
                            recorded_at=row["window_start"], event_time=row["window_start"]))
        for i, row in enumerate(rows):
            vector = features.get(i)
            yield ({**row, "features_version": artifact.version}, vector) if vector is not None else (row, None)


class ApplyFeatures(beam.PTransform):
    """Twin rows of `subject` -> {"featured": (row, float32 vector | None), "dead_letters"}.

    A featured row carries ``features_version``; a row without a vector passes on unchanged.
    """

    def __init__(self, subject: str, artifact_path: str, batch_size: int = 256):
        super().__init__()
        assert subject in SUBJECTS, subject
        self._subject, self._path, self._batch_size = subject, artifact_path, batch_size

    def expand(self, rows):
        outputs = (rows
                   | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self._batch_size)
                   | "Transform" >> beam.ParDo(_ApplyFeaturesFn(self._subject, self._path)).with_outputs(
                       DEAD_LETTERS, main="featured"))
        return {"featured": outputs["featured"], DEAD_LETTERS: outputs[DEAD_LETTERS]}
