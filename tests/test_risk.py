"""Learned risk models (model/risk.py): training, safetensors without pickles, RunInference serving, alerts."""

import datetime as dt
import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to

from model import risk
from transforms.windowing import WindowPolicy

T0 = dt.datetime(2026, 3, 2, 6, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 3)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0.8).astype(np.int64)
    module = risk.train(x, y)
    path = str(tmp_path_factory.mktemp("risk") / "patient_risk.safetensors")
    version = risk.save(module, path, {"subject": "patient", "feature_names": ["a", "b", "c"],
                                       "features_version": "feat-test", "threshold": 0.5, "horizon_hours": 2.0,
                                       "train_seeds": [1], "validation_seeds": [2]})
    return path, version, x, y, module


def test_training_separates_the_classes_and_the_file_round_trips(model_file):
    path, version, x, y, module = model_file
    p = risk.predict(module, x)
    assert p[y == 1].mean() > 0.8 and p[y == 0].mean() < 0.2
    loaded, metadata = risk.load(path)
    np.testing.assert_allclose(risk.predict(loaded, x), p, rtol=1e-6)
    assert metadata["model_version"] == version and metadata["threshold"] == 0.5


def test_the_file_is_safetensors_and_a_changed_weight_is_refused(model_file, tmp_path):
    path, *_ = model_file
    data = open(path, "rb").read()
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_length])   # safetensors: a JSON header, then raw tensor bytes
    assert set(header) == {"__metadata__", "weight", "bias"}
    tampered = bytearray(data)
    tampered[-1] ^= 0xFF
    (tmp_path / "t.safetensors").write_bytes(bytes(tampered))
    with pytest.raises(ValueError, match="do not match"):
        risk.load(str(tmp_path / "t.safetensors"))


def _row(key, minutes, is_final=True):
    start = T0 + dt.timedelta(minutes=minutes)
    return {"patient_key": key, "window_start": start, "window_end": start + dt.timedelta(minutes=1),
            "is_final": is_final, "features_version": "feat-test"}


def test_run_inference_scores_featured_rows_and_passes_the_others(model_file):
    path, version, x, _, module = model_file
    expected = risk.predict(module, x[:4])
    featured = [(_row("p1", i), x[i]) for i in range(4)] + [(_row("p2", 0), None)]
    with beam.Pipeline() as pipeline:
        rows = pipeline | beam.Create(featured) | risk.ScoreRisk("patient", path, "feat-test")
        assert_that(rows | beam.Map(lambda r: (r["patient_key"], r["window_start"],
                                               None if r.get("deterioration_risk") is None
                                               else round(r["deterioration_risk"], 5), r.get("risk_model_version"))),
                    equal_to([("p1", _row("p1", i)["window_start"], round(float(expected[i]), 5), version)
                              for i in range(4)] + [("p2", T0, None, None)]))


def test_a_model_trained_on_other_features_or_subject_is_refused(model_file):
    path, *_ = model_file
    with pytest.raises(ValueError, match="trained on features"):
        risk.ScoreRisk("patient", path, "feat-other")
    with pytest.raises(ValueError, match="not a device one"):
        risk.ScoreRisk("device", path, "feat-test")


@pytest.mark.parametrize("order", (1, -1))
def test_alerts_once_per_episode_at_the_threshold_in_window_order(order):
    rows = [{**_row("p1", m), "deterioration_risk": r} for m, r in
            ((0, 0.2), (10, 0.9), (20, 0.95), (200, 0.8))] + [{**_row("p2", 5), "deterioration_risk": 0.49}]
    with beam.Pipeline() as pipeline:
        alerts = (pipeline | beam.Create([(r["patient_key"], r) for r in rows[::order]], reshuffle=False)
                  | beam.ParDo(risk._RiskAlertsFn("patient", 0.5, "risk-x", WindowPolicy())))
        # p1: one alert for the episode at 10-20 min, at its first window whatever the arrival order, and
        # one at 200 min; p2 none.
        assert_that(alerts | beam.Map(lambda a: (a["kind"], a["subject_id"], a["onset_time"])),
                    equal_to([("deterioration_risk", "p1", T0 + dt.timedelta(minutes=10)),
                              ("deterioration_risk", "p1", T0 + dt.timedelta(minutes=200))]))
