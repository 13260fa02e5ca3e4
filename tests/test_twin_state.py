"""Twin state survives a pipeline update, and a patient silent past the retention is forgotten."""

import dataclasses
import pickle

import pytest

from tests.test_patient_twin import _config, _run_twin
from tests.twin_fixtures import at, chunk
from transforms.decode import to_micros
from transforms.device_twin import STATE_LAYOUT, DeviceState
from transforms.patient_twin import HISTORY_LAYOUT, PatientHistory
from transforms.twin_state import StateLayoutError, VersionedStateCoder


def test_state_round_trips_by_field_not_by_class():
    coder = VersionedStateCoder(PatientHistory, HISTORY_LAYOUT)
    history = PatientHistory(baseline_heart_rate=72.5, newest_sample_us=10, observations=[(1, "A", False)])
    assert coder.decode(coder.encode(history)) == history
    stored = pickle.loads(coder.encode(history))
    assert stored["layout"] == HISTORY_LAYOUT and stored["baseline_heart_rate"] == 72.5
    device = VersionedStateCoder(DeviceState, STATE_LAYOUT)
    assert device.decode(device.encode(DeviceState(risk_alerted=True))) == DeviceState(risk_alerted=True)


def test_a_release_that_adds_a_field_reads_the_old_state():
    @dataclasses.dataclass
    class NextHistory(PatientHistory):
        respiratory_baseline: float | None = None
        alerts_sent: list = dataclasses.field(default_factory=list)

    old = VersionedStateCoder(PatientHistory, HISTORY_LAYOUT).encode(PatientHistory(baseline_temperature_c=37.1))
    upgraded = VersionedStateCoder(NextHistory, HISTORY_LAYOUT).decode(old)
    assert upgraded.baseline_temperature_c == 37.1
    assert upgraded.respiratory_baseline is None and upgraded.alerts_sent == []
    # and the other way: state written by the newer release, read by this one (a field it drops)
    newer = VersionedStateCoder(NextHistory, HISTORY_LAYOUT).encode(NextHistory(respiratory_baseline=16.0))
    assert VersionedStateCoder(PatientHistory, HISTORY_LAYOUT).decode(newer) == PatientHistory()


def test_state_pickled_before_layouts_existed_still_decodes():
    legacy = pickle.dumps(PatientHistory(news2_alerted_level=2))
    assert VersionedStateCoder(PatientHistory, HISTORY_LAYOUT).decode(legacy).news2_alerted_level == 2


def test_a_newer_layout_is_refused_not_misread():
    newer = VersionedStateCoder(PatientHistory, HISTORY_LAYOUT + 1).encode(PatientHistory())
    with pytest.raises(StateLayoutError, match="roll forward"):
        VersionedStateCoder(PatientHistory, HISTORY_LAYOUT).decode(newer)


def _final_baselines(config, parts, key):
    rows, _ = _run_twin(True, parts, key, config)
    return {row["window_start"]: row["baseline_heart_rate"] for row in rows if row["is_final"]}


def test_a_patient_silent_past_the_retention_comes_back_with_new_baselines():
    before = [chunk(range(start, start + 60, 10), heart_rate=110.0) for start in range(0, 300, 60)]
    back = [chunk(range(4000, 4060, 10), heart_rate=60.0)]
    forgetful = dataclasses.replace(_config(True), retention_days=1800 / 86400)   # 30 minutes
    quiet = to_micros(at(3900))   # the watermark passes the retention before the patient is back
    returned = _final_baselines(forgetful, before + [quiet] + back, "r" * 32)
    fresh = _final_baselines(forgetful, back, "f" * 32)
    remembered = _final_baselines(_config(True), before + [quiet] + back, "m" * 32)   # retention: 7 days
    (window,) = fresh
    assert returned[window] == fresh[window]
    assert remembered[window] != fresh[window]   # the old baseline would still weigh in
