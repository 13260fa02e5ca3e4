"""Failure risk of imaging devices: precursors, memory, adapting baselines, maintenance."""

import copy
import dataclasses
import datetime
import math
import pickle

import pytest

from transforms.device_health import (
    DeviceHistory,
    RiskAssessment,
    RiskConfig,
    WindowFeatures,
    assess_failure_risk,
    maintenance_status,
    poisson_surprise,
    record_maintenance,
    update_history,
)

T0 = datetime.datetime(2024, 3, 4, 8, 0, tzinfo=datetime.timezone.utc)
WINDOW = datetime.timedelta(minutes=5)
CONFIG = RiskConfig()
EXPECTED_BEATS = 10  # 5-minute window, a heartbeat every 30 s


def window(errors=0, critical=0, missed=0, temperature=45.0, status="busy", seconds=300.0) -> WindowFeatures:
    return WindowFeatures(
        window_seconds=seconds, error_count=errors, critical_count=critical, warning_count=0,
        heartbeat_count=EXPECTED_BEATS - missed, missed_heartbeats=missed,
        max_heartbeat_gap_s=30.0 * (missed + 1), tube_temperature_max=temperature,
        tube_temperature_mean=None if temperature is None else temperature - 5.0, exposure_count=4, status=status)


def run(windows, history=None, start=T0):
    """Judges then learns each window in order -> (assessments, history, end of the last window)."""
    history = history or DeviceHistory()
    end = start
    assessments = []
    for features in windows:
        end += WINDOW
        assessments.append(assess_failure_risk(features, history, CONFIG))
        history = update_history(history, features, end, CONFIG)
    return assessments, history, end


def healthy_day(windows=288):
    """A healthy device: one error an hour, tube 35-55 °C with load, a heartbeat jittering out now and then."""
    return [window(errors=int(i % 12 == 5), missed=int(i % 7 == 1), temperature=35.0 + (i * 7) % 21,
                   status=("busy", "idle", "online")[i % 3]) for i in range(windows)]


@pytest.fixture(scope="module")
def healthy():
    """(history, end) of a device after a healthy hour."""
    _, history, end = run(healthy_day(12))
    return history, end


def test_healthy_device_scores_zero_with_no_reasons():
    assessments, history, _ = run(healthy_day())
    assert {(a.failure_risk, a.reasons) for a in assessments} == {(0.0, ())}
    assert history.error_rate_baseline_per_h == pytest.approx(1.0, abs=0.5)
    assert history.tube_temperature_baseline_c == pytest.approx(37.0, abs=0.5)   # the mean of 30-50 °C means


# One window of each precursor alone, after a healthy hour, and the reason it gives.
PRECURSORS = [
    (window(errors=4, critical=1), "error rate 16.0/h over 15 min vs baseline 0.5/h, 1 critical"),
    (window(temperature=76.0), "tube temperature 76 °C over 65 °C (1 of the last 3 windows; usual 37 °C)"),
    (window(missed=4), "4 heartbeats missed in 15 min, longest gap 150 s"),
]


@pytest.mark.parametrize("features,reason", PRECURSORS)
def test_each_precursor_alone_raises_the_score_with_its_reason(healthy, features, reason):
    history, _ = healthy
    assessment = assess_failure_risk(features, history, CONFIG)
    assert 0.1 < assessment.failure_risk < CONFIG.alert_threshold  # one window alone is not yet an alert
    assert assessment.reasons == (reason,)


@pytest.mark.parametrize("features", [features for features, _ in PRECURSORS])
def test_a_sustained_precursor_scores_higher_and_crosses_the_alert_threshold(healthy, features):
    history, end = healthy
    assessments, _, _ = run([features] * 4, history, end)
    risks = [a.failure_risk for a in assessments]
    assert risks[1] > risks[0]
    assert max(risks[:3]) >= CONFIG.alert_threshold


def test_failure_run_up_crosses_the_alert_threshold_within_a_few_windows(healthy):
    history, end = healthy
    # The tube heats, errors come in bursts with some critical, heartbeats start to go missing.
    run_up = [window(errors=2, missed=1, temperature=60.0), window(errors=3, critical=1, missed=2, temperature=66.0),
              window(errors=3, missed=2, temperature=70.0), window(errors=4, critical=1, missed=3, temperature=74.0),
              window(errors=5, critical=2, missed=4, temperature=79.0)]
    assessments, _, _ = run(run_up, history, end)
    risks = [a.failure_risk for a in assessments]
    assert risks[0] < CONFIG.alert_threshold
    first_alert = next(i for i, risk in enumerate(risks) if risk >= CONFIG.alert_threshold)
    assert first_alert <= 2
    assert all(risk >= CONFIG.alert_threshold for risk in risks[first_alert:])
    assert risks == sorted(risks)
    final = assessments[-1].reasons
    assert len(final) == 3 and final[0].startswith("error rate")   # the strongest evidence comes first
    # usual: the weighted mean of the window-mean temperatures so far, the run-up's included
    assert "tube temperature 79 °C over 65 °C (3 of the last 3 windows; usual 44 °C)" in final


def test_three_precursors_in_full_combine_as_independent_causes(healthy):
    history, end = healthy
    storm = window(errors=8, critical=4, missed=EXPECTED_BEATS - 1, temperature=85.0)
    assessments, _, _ = run([storm] * 3, history, end)
    assert assessments[-1].failure_risk == pytest.approx(1 - (1 - CONFIG.precursor_weight) ** 3)


def test_one_noisy_window_is_forgotten_after_the_memory(healthy):
    history, end = healthy
    assessments, _, _ = run([window(errors=3, critical=1)] + healthy_day(4), history, end)
    assert assessments[0].failure_risk > 0
    assert assessments[CONFIG.memory_windows].failure_risk == 0.0
    assert assessments[CONFIG.memory_windows].reasons == ()


def test_chatty_device_is_flagged_at_first_then_its_baseline_adapts():
    # 24 errors an hour, always: alarming against the healthy prior, normal for this device after a while.
    assessments, history, _ = run([window(errors=2)] * 288)
    assert max(a.failure_risk for a in assessments[:6]) >= CONFIG.alert_threshold
    assert {(a.failure_risk, a.reasons) for a in assessments[-144:]} == {(0.0, ())}
    assert history.error_rate_baseline_per_h > 12.0


def test_device_that_always_logs_two_errors_an_hour_is_never_alerted_and_learns_its_rate():
    pattern = ([window(errors=2)] + [window()] * 11) * 72   # 2 errors in one window an hour, for three days
    assessments, history, _ = run(pattern)
    assert max(a.failure_risk for a in assessments) < CONFIG.alert_threshold
    assert history.error_rate_baseline_per_h == pytest.approx(2.0, abs=0.3)


def test_baseline_learns_only_while_the_device_works(healthy):
    history, end = healthy
    offline = dataclasses.replace(window(missed=EXPECTED_BEATS, temperature=None), status="offline")
    _, after, _ = run([offline] * 6, history, end)
    assert after.error_rate_baseline_per_h == history.error_rate_baseline_per_h


def test_missed_heartbeats_during_announced_service_are_no_evidence(healthy):
    history, _ = healthy
    silent = window(missed=EXPECTED_BEATS, temperature=None)
    assert assess_failure_risk(dataclasses.replace(silent, status="service"), history, CONFIG) == \
        RiskAssessment(0.0, ())
    assert assess_failure_risk(dataclasses.replace(silent, status="offline"), history, CONFIG).failure_risk > 0


def test_maintenance_starts_a_clean_baseline(healthy):
    history, end = healthy
    burst = [window(errors=6, critical=2, missed=3, temperature=78.0)] * 3
    _, worn, end = run(burst, history, end)
    assert worn.error_rate_baseline_per_h > CONFIG.healthy_error_rate_per_h
    serviced_at = end + datetime.timedelta(minutes=1)
    serviced = record_maintenance(worn, serviced_at)
    assert serviced == DeviceHistory(last_window_end=end, last_maintenance=serviced_at)
    calm = window()
    assert assess_failure_risk(calm, serviced, CONFIG) == RiskAssessment(0.0, ())
    assert assess_failure_risk(calm, worn, CONFIG).failure_risk > 0   # without the service, the burst is remembered


def test_the_window_holding_the_maintenance_is_neither_learned_nor_remembered(healthy):
    history, end = healthy
    service_window = window(errors=6, critical=2, temperature=78.0, status="online")   # errors before the fix
    serviced = record_maintenance(history, end + datetime.timedelta(minutes=2))
    assert assess_failure_risk(service_window, serviced, CONFIG).failure_risk > 0
    learned = update_history(serviced, service_window, end + WINDOW, CONFIG)
    assert learned == dataclasses.replace(serviced, last_window_end=end + WINDOW)
    assert assess_failure_risk(window(), learned, CONFIG) == RiskAssessment(0.0, ())


def test_recording_the_same_or_an_older_maintenance_changes_nothing(healthy):
    history, end = healthy
    serviced = record_maintenance(history, end)
    _, learned, _ = run(healthy_day(3), serviced, end)
    assert record_maintenance(learned, end) is learned
    assert record_maintenance(learned, end - datetime.timedelta(days=1)) is learned


def test_a_maintenance_reported_after_the_windows_it_precedes_keeps_what_was_learned(healthy):
    history, end = healthy
    _, learned, end = run([window(errors=6, critical=2)], history, end)
    reported = record_maintenance(learned, end - datetime.timedelta(days=30))
    assert reported == dataclasses.replace(learned, last_maintenance=end - datetime.timedelta(days=30))
    assert record_maintenance(reported, end + datetime.timedelta(minutes=1)).recent == ()


def test_memory_forgets_windows_older_than_its_span(healthy):
    history, end = healthy
    _, burst, end = run([window(errors=6, critical=2)], history, end)
    later = end + datetime.timedelta(hours=1)
    after_silence = update_history(burst, window(), later, CONFIG)
    assert [w.window_end for w in after_silence.recent] == [later]


def test_windows_must_be_learned_in_order(healthy):
    history, end = healthy
    with pytest.raises(ValueError, match="event-time order"):
        update_history(history, window(), end, CONFIG)


def test_assessment_and_learning_are_deterministic_and_pure(healthy):
    history, end = healthy
    sequence = healthy_day(6) + [window(errors=4, critical=1, missed=2, temperature=70.0)] * 3
    snapshot = copy.deepcopy(history)
    first = run(sequence, history, end)
    second = run(sequence, history, end)
    assert first == second
    assert history == snapshot
    revived = pickle.loads(pickle.dumps(first[1]))
    assert revived == first[1]
    probe = window(errors=3, temperature=68.0)
    assert assess_failure_risk(probe, revived, CONFIG) == assess_failure_risk(probe, first[1], CONFIG)


@pytest.mark.parametrize("last,at,days,due", [
    (None, T0, None, True),                                                          # no service on record
    (T0, T0, 0.0, False),
    (T0, T0 + datetime.timedelta(days=1.5), 1.5, False),
    (T0, T0 + datetime.timedelta(days=90) - datetime.timedelta(seconds=1), 90 - 1 / 86400, False),
    (T0, T0 + datetime.timedelta(days=90), 90.0, True),                              # due once the interval elapsed
    (T0, T0 + datetime.timedelta(days=120), 120.0, True),
    (T0 + datetime.timedelta(minutes=3), T0, 0.0, False),                            # device clock ahead
])
def test_maintenance_status(last, at, days, due):
    days_since, maintenance_due = maintenance_status(last, at, 90.0)
    assert maintenance_due is due
    assert days_since == (None if days is None else pytest.approx(days))


def test_maintenance_status_rejects_a_non_positive_interval():
    with pytest.raises(ValueError, match="service_interval_days"):
        maintenance_status(T0, T0, 0)


@pytest.mark.parametrize("count,expected", [(1, 0.125), (2, 0.125), (3, 1.0), (5, 2.5)])
def test_poisson_surprise_matches_the_closed_form_tail(count, expected):
    below = sum(math.exp(-expected) * expected ** k / math.factorial(k) for k in range(count))
    assert poisson_surprise(count, expected) == pytest.approx(-math.log10(1 - below), rel=1e-9)


def test_poisson_surprise_is_zero_at_or_below_expectation_and_finite_far_above():
    assert poisson_surprise(2, 2.0) == 0.0
    assert poisson_surprise(0, 0.5) == 0.0
    assert 300 < poisson_surprise(200, 1.0) < math.inf


def test_invalid_config_and_features_are_rejected():
    with pytest.raises(ValueError, match="overheat_full_c"):
        RiskConfig(overheat_c=65.0, overheat_full_c=60.0)
    with pytest.raises(ValueError, match="critical_count"):
        window(errors=1, critical=2)
    with pytest.raises(ValueError, match="window_seconds"):
        window(seconds=0.0)
