"""Two small learned early-warning models, saved as safetensors and served through Beam's RunInference.

    device   P(the device fails within `horizon_hours`)        from device-twin features
    patient  P(the patient's deterioration starts within `horizon_hours`, or has started)
             from patient-twin features (label: the simulator's deterioration onset)

Each is a logistic regression (one torch ``nn.Linear`` over the tf.Transform features of
`transforms.features`), trained by `train` on labelled history. A saved model is one
``.safetensors`` file: weights plus metadata (subject, feature names, the features artifact version
it was trained on, alert threshold, horizon, training and validation seeds); its version is a digest
of the file's weights and metadata. No pickle anywhere.

`ScoreRisk` is the serving composite: (row, features | None) -> rows with the risk column
(``deterioration_risk`` or ``failure_risk_model``) and ``risk_model_version``; rows without features
pass through unscored. The model refuses features from another artifact version than its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.coders import PickleCoder
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from transforms.decode import to_micros
from transforms.panes import PendingWindows
from transforms.windowing import WindowPolicy

RISK_COLUMNS = {"patient": "deterioration_risk", "device": "failure_risk_model"}


def _module(n_features: int):
    import torch
    return torch.nn.Linear(n_features, 1)


def train(features: np.ndarray, labels: np.ndarray, *, steps: int = 300, l2: float = 1e-3, seed: int = 0):
    """(N x F float32, N labels 0/1) -> a trained nn.Linear(F, 1) (class-balanced logistic loss, L-BFGS)."""
    import torch
    torch.manual_seed(seed)
    x = torch.from_numpy(np.asarray(features, np.float32))
    y = torch.from_numpy(np.asarray(labels, np.float32))
    positives = float(y.sum())
    if positives == 0 or positives == len(y):
        raise ValueError("training labels hold a single class: more history (seeds, hours) is needed")
    pos_weight = torch.tensor((len(y) - positives) / positives)
    module = _module(x.shape[1])
    optimiser = torch.optim.LBFGS(module.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        logits = module(x).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
        loss = loss + l2 * module.weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return module


def predict(module, features: np.ndarray) -> np.ndarray:
    """N x F features -> N probabilities."""
    import torch
    with torch.no_grad():
        return torch.sigmoid(module(torch.from_numpy(np.asarray(features, np.float32))).squeeze(1)).numpy()


def save(module, path: str, metadata: dict) -> str:
    """Writes `module` and `metadata` (JSON-able) as safetensors; returns the model version."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    version = _version(tensors, metadata)
    save_file(tensors, path, metadata={"medtwin": json.dumps({**metadata, "model_version": version},
                                                              sort_keys=True)})
    return version


def _version(tensors: dict, metadata: dict) -> str:
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        digest.update(name.encode() + tensors[name].numpy().tobytes())
    return "risk-" + digest.hexdigest()[:12]


def load(path: str):
    """A saved model file -> (nn.Linear, metadata); the version is checked against the weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework="pt") as f:
        metadata = json.loads(f.metadata()["medtwin"])
    tensors = load_file(path)
    stated = metadata.pop("model_version")
    if _version(tensors, metadata) != stated:
        raise ValueError(f"{path}: weights or metadata do not match the model version it states")
    module = _module(len(metadata["feature_names"]))
    module.load_state_dict(tensors)
    module.eval()
    return module, {**metadata, "model_version": stated}


def read_metadata(path: str) -> dict:
    """A saved model's metadata (model_version included) without loading torch weights."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["medtwin"])


TRAINING_REPORT = "training.json"


@dataclasses.dataclass(frozen=True)
class LearnedModels:
    """The learned early warning a job applies: a features artifact folder and {subject: .safetensors}."""

    features: str
    models: dict


def read_models_folder(folder: str) -> LearnedModels:
    """The folder `medtwin train-risk --out` wrote -> LearnedModels; ValueError, naming what is missing
    or inconsistent, if it is not one (checked at launch, before any worker starts)."""
    try:
        with open(os.path.join(folder, TRAINING_REPORT)) as f:
            training = json.load(f)
        features = os.path.normpath(os.path.join(folder, training["features"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--risk_models {folder}: not a folder written by medtwin train-risk "
                         f"({type(error).__name__}: {error})") from None
    models = {}
    for subject in RISK_COLUMNS:
        path = os.path.join(folder, f"{subject}_risk.safetensors")
        if not os.path.isfile(path):
            raise ValueError(f"--risk_models {folder}: no {subject}_risk.safetensors")
        stated = read_metadata(path).get("features_version")
        if stated != training.get("features_version"):
            raise ValueError(f"--risk_models {folder}: {subject} model was trained on features {stated}, "
                             f"the folder's features are {training.get('features_version')}")
        models[subject] = path
    if not os.path.isdir(features):
        raise ValueError(f"--risk_models {folder}: features artifact {features} is missing")
    return LearnedModels(features=features, models=models)


class LoadedRiskModel:
    """What RunInference shares between threads (it must be weak-referenceable): module and metadata."""

    def __init__(self, module, metadata: dict):
        self.module, self.metadata = module, metadata


class RiskModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
    """RunInference handler: feature vectors -> PredictionResult(vector, probability, model version)."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def load_model(self) -> "LoadedRiskModel":
        return LoadedRiskModel(*load(self._path))

    def run_inference(self, batch: Sequence[np.ndarray], model, inference_args=None) -> Iterable[PredictionResult]:
        probabilities = predict(model.module, np.stack(batch))
        return [PredictionResult(example, float(p), model.metadata["model_version"])
                for example, p in zip(batch, probabilities)]

    def get_metrics_namespace(self) -> str:
        return "medtwin_risk"


def _joined(subject: str):
    column = RISK_COLUMNS[subject]

    def join(keyed):
        row, result = keyed
        return {**row, column: result.inference, "risk_model_version": result.model_id}
    return join


class ScoreRisk(beam.PTransform):
    """(row, features | None) of `subject` -> rows with the risk column and risk_model_version.

    The model file's metadata must name the features artifact the rows were featured with.
    """

    def __init__(self, subject: str, model_path: str, features_version: str):
        super().__init__()
        metadata = read_metadata(model_path)
        if metadata["subject"] != subject:
            raise ValueError(f"{model_path} is a {metadata['subject']} model, not a {subject} one")
        if metadata["features_version"] != features_version:
            raise ValueError(f"{model_path} was trained on features {metadata['features_version']}, "
                             f"not {features_version}")
        self._subject, self._path = subject, model_path

    def expand(self, featured):
        parts = featured | "HasFeatures" >> beam.Partition(lambda pair, _: 0 if pair[1] is not None else 1, 2)
        scored = (parts[0]
                  | "Infer" >> RunInference(KeyedModelHandler(RiskModelHandler(self._path)))
                  | "Join" >> beam.Map(_joined(self._subject)))
        unscored = parts[1] | "Unscored" >> beam.Map(lambda pair: pair[0])
        return (scored, unscored) | "Rows" >> beam.Flatten()


# ---------------------------------------------------------------- in the twin pipeline

ALERT_KINDS = {"patient": "deterioration_risk", "device": "device_failure_model"}
# Risk above threshold within this much event time of an earlier alert on the same subject is the same
# episode: no second alert.
ALERT_REFRACTORY_SECONDS = 3600


class _RiskAlertsFn(beam.DoFn):
    """(subject id, scored final row) -> an alert when risk >= the model's threshold and the subject had no
    alert in the refractory period before; the onsets raised are kept in state (a day of them).

    Rows are judged in window order whatever order they arrive in (RunInference's batches and the
    shuffle to this step reorder them): a row above the threshold is held until the watermark passes
    the moment its twin finalised the window (`PendingWindows.expiry_us` of the twin's policy), by
    which time every earlier final row of the subject has arrived, and the held rows are then taken
    in window order.
    """

    HELD = BagStateSpec("held", PickleCoder())  # (release µs, window start, window end, risk, features version)
    ONSETS = BagStateSpec("onsets", beam.coders.FloatCoder())
    RELEASE = TimerSpec("release", TimeDomain.WATERMARK)

    def __init__(self, subject: str, threshold: float, model_version: str, policy: WindowPolicy):
        self._subject, self._threshold, self._version = subject, threshold, model_version
        self._windows = PendingWindows(policy)

    def process(self, keyed, held=beam.DoFn.StateParam(HELD), release=beam.DoFn.TimerParam(RELEASE)):
        _, row = keyed
        risk = row.get(RISK_COLUMNS[self._subject])
        if risk is None or risk < self._threshold or not row.get("is_final"):
            return
        start_us = to_micros(row["window_start"])
        held.add((self._windows.expiry_us(start_us), row["window_start"], row["window_end"], risk,
                  row.get("features_version")))
        release.set(Timestamp(micros=min(entry[0] for entry in held.read())))

    @on_timer(RELEASE)
    def on_release(self, subject_id=beam.DoFn.KeyParam, fired=beam.DoFn.TimestampParam,
                   held=beam.DoFn.StateParam(HELD), onsets=beam.DoFn.StateParam(ONSETS),
                   release=beam.DoFn.TimerParam(RELEASE)):
        entries = list(held.read())
        due = sorted((entry for entry in entries if entry[0] <= fired.micros), key=lambda entry: entry[1])
        later = [entry for entry in entries if entry[0] > fired.micros]
        held.clear()
        for entry in later:
            held.add(entry)
        if later:
            release.set(Timestamp(micros=min(entry[0] for entry in later)))
        for _, onset, window_end, risk, features_version in due:
            alert = self._alert(subject_id, onset, window_end, risk, features_version, onsets)
            if alert is not None:
                yield TimestampedValue(alert, fired)

    def _alert(self, subject_id, onset, window_end, risk, features_version, onsets) -> dict | None:
        at = onset.timestamp()
        raised = list(onsets.read())
        if any(abs(at - t) < ALERT_REFRACTORY_SECONDS for t in raised):
            return None
        onsets.clear()
        for t in [*(t for t in raised if at - t < 86400), at]:
            onsets.add(t)
        kind = ALERT_KINDS[self._subject]
        what = "deterioration" if self._subject == "patient" else "device failure"
        return {
            "alert_id": f"{kind}:{subject_id}:{onset.isoformat()}",
            "kind": kind, "subject_type": self._subject, "subject_id": subject_id,
            "severity": "warning", "onset_time": onset, "window_end": window_end,
            "message": f"learned {what} risk {risk:.2f} >= {self._threshold:.2f} (model {self._version})",
            "evidence": json.dumps({RISK_COLUMNS[self._subject]: risk, "threshold": self._threshold,
                                    "risk_model_version": self._version,
                                    "features_version": features_version}, sort_keys=True),
        }


class LearnedEarlyWarning(beam.PTransform):
    """{"patient_twin", "device_twin"} rows -> the same tables with features_version, the learned risk and
    risk_model_version on every row that could be featured, plus "alerts" and "dead_letters".

    features: a features artifact folder (transforms.features); models: {"patient"|"device": .safetensors}
    (`read_models_folder` reads both from a `medtwin train-risk` folder); policies: {"patient"|"device":
    the twin's WindowPolicy}, which says when each final row was emitted (alerts follow window order).
    """

    def __init__(self, features: str, models: dict[str, str], policies: dict[str, WindowPolicy]):
        super().__init__()
        self._features, self._models, self._policies = features, dict(models), dict(policies)

    def expand(self, tables):
        from transforms.dead_letters import DEAD_LETTERS
        from transforms.features import KEYS, ApplyFeatures, FeatureArtifactManifest

        version = FeatureArtifactManifest(self._features).version
        out, alerts, dead = {}, [], []
        for subject, table in (("patient", "patient_twin"), ("device", "device_twin")):
            if subject not in self._models:
                out[table] = tables[table]
                continue
            metadata = read_metadata(self._models[subject])
            featured = tables[table] | f"Features_{subject}" >> ApplyFeatures(subject, self._features)
            scored = featured["featured"] | f"Risk_{subject}" >> ScoreRisk(subject, self._models[subject], version)
            out[table] = scored
            alerts.append(scored
                          | f"Key_{subject}" >> beam.Map(lambda row, key=KEYS[subject]: (row[key], row))
                          | f"Global_{subject}" >> beam.WindowInto(beam.window.GlobalWindows())
                          | f"Alerts_{subject}" >> beam.ParDo(_RiskAlertsFn(
                              subject, metadata["threshold"], metadata["model_version"], self._policies[subject])))
            dead.append(featured[DEAD_LETTERS])
        out["alerts"] = alerts
        out[DEAD_LETTERS] = dead
        return out
