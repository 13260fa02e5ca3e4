"""Backtest scoring (pipelines/backtest.py): known answers for events, lead times, PPV and burden; the report."""

import datetime as dt
import json

import pytest

from pipelines import backtest
from pipelines.cli import main
from pipelines.train_risk import parse_seeds

T0 = dt.datetime(2026, 3, 2, 6, tzinfo=dt.timezone.utc)
H = dt.timedelta(hours=1)


def _at(minutes):
    return T0 + dt.timedelta(minutes=minutes)


FACTS = {"failures": {"d1": _at(120), "d2": _at(200)}, "devices": ["d1", "d2", "d3", "d4"],
         "deterioration": {"p1": (_at(60), _at(180))}, "patients": ["p1", "p2"], "hours": 6.0}


def test_device_events_lead_times_ppv_and_false_alarms_known_answer():
    alerts = [("d1", _at(70)), ("d1", _at(100)),   # true, 50 min lead (first alert counts)
              ("d2", _at(20)),                      # exactly the 3 h horizon before: true, 180 min lead
              ("d3", _at(30)),                      # device without failure: false alarm
              ("d1", _at(10)),                      # 110 min before, inside 3 h: true, lead becomes 110
              ("d1", _at(130))]                     # after the failure: not counted
    result = backtest.score("device", [(alerts, FACTS)], 3.0)
    assert result["events"] == 2 and result["flagged"] == 2
    assert result["lead_time_median_s"] == pytest.approx((110 + 180) / 2 * 60)
    assert result["ppv"] == pytest.approx(4 / 5)
    device_days = 4 * 6 / 24
    assert result["alerts_per_day"] == pytest.approx(5 / device_days)
    assert result["false_alarms_per_day"] == pytest.approx(1 / device_days)


def test_patient_alerts_after_onset_count_with_a_negative_lead_and_early_ones_are_false():
    alerts = [("p1", _at(75)), ("p1", _at(-30)), ("p2", _at(10))]
    result = backtest.score("patient", [(alerts, FACTS)], 1.0)
    assert result["flagged"] == 1 and result["lead_time_median_s"] == -15 * 60
    assert result["ppv"] == pytest.approx(1 / 3)   # -30 min is 90 min before onset: outside 1 h


def test_offline_alerts_one_per_episode():
    rows = [{"device_id": "d1", "window_start": _at(m)} for m in (0, 5, 10, 100, 105)]
    alerts = backtest.offline_alerts("device", rows, [0.9, 0.9, 0.2, 0.8, 0.9], 0.5)
    assert alerts == [("d1", _at(0)), ("d1", _at(100))]


def test_bootstrap_interval_holds_the_estimate():
    seeds = [([("d1", _at(60))], FACTS), ([("d2", _at(190)), ("d3", _at(5))], FACTS), ([], FACTS)]
    point = backtest.score("device", seeds, 3.0)
    intervals = backtest.bootstrap("device", seeds, 3.0, draws=200)
    low, high = intervals["ppv_ci"]
    assert low <= point["ppv"] <= high
    low, high = intervals["alerts_per_day_ci"]
    assert low <= point["alerts_per_day"] <= high


def test_report_markdown_and_plot(tmp_path):
    source = {"name": "device rule (failure_risk)", "subject": "device", "threshold": None,
              **backtest.score("device", [([("d1", _at(60))], FACTS)], 3.0),
              **backtest.bootstrap("device", [([("d1", _at(60))], FACTS)], 3.0, draws=10)}
    report = {"test_seeds": [201], "train_seeds": [101], "validation_seeds": [105], "features_version": "feat-x",
              "models": {}, "horizons_hours": {"device": 3.0}, "sources": [source]}
    text = backtest.markdown(report)
    assert "| device rule (failure_risk) | device | 2 | 1 | 60" in text and "not clinical evidence" in text
    backtest.plot(report, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_test_seeds_that_trained_or_validated_a_model_are_refused(tmp_path, capsys):
    (tmp_path / "training.json").write_text(json.dumps({"train_seeds": [1, 2], "validation_seeds": [3]}))
    assert main(["backtest", "--input", str(tmp_path), "--seeds", "3-4", "--models", str(tmp_path),
                 "--report", str(tmp_path / "r")]) == 2
    assert "[3] were used to train or validate" in capsys.readouterr().err
    assert parse_seeds("1,4-6") == [1, 4, 5, 6]
