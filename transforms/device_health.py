"""Failure risk of one imaging device over one window, judged against the device's own past.

X-ray devices heading for failure show three precursors in the 30-90 minutes
before they fail: the error rate rises far above the device's own norm (bursts
of several errors per 5 minutes, some critical), the X-ray tube overheats
(housing climbing towards 70-85 °C, where healthy tubes run at 35-55 °C under
load), and heartbeats go missing. This module turns one window's features into
evidence (0..1) for each precursor and combines them into a failure risk
(0..1) with a short reason per precursor that contributed.

The device twin calls, once per final window and in event-time order::

    history = record_maintenance(history, maintenance_at)   # only if the window logged a maintenance
    risk = assess_failure_risk(features, history, config)   # judged against the past, not itself
    history = update_history(history, features, window_end, config)

Memory. `DeviceHistory` keeps an EWMA baseline of the error rate (half-life
`RiskConfig.baseline_half_life_hours`) and the device's last few windows
(`RiskConfig.memory_windows` including the one being judged). Error and
missed-heartbeat counts are pooled over those windows and temperature is
averaged over them, so a sustained precursor scores higher than one noisy
window. Windows are remembered while they are recent: the first window after a
silence (no events at all, hence no window) is still pooled with the windows
before the silence. Maintenance (`record_maintenance`) wipes the memory and
restarts the baseline from the healthy prior.

All functions are pure: they return new objects and never modify their inputs.
"""

from __future__ import annotations

import dataclasses
import datetime
import math

# A device that announced it is being serviced is expected to be silent; missed heartbeats are no evidence.
SERVICE_STATUS = "service"
# Statuses in which the device is not working: its error count says nothing about its normal error rate.
NOT_WORKING_STATUSES = ("offline", "service")

_SECONDS_PER_HOUR = 3600.0
_SECONDS_PER_DAY = 86400.0


@dataclasses.dataclass(frozen=True)
class RiskConfig:
    """Every threshold of the failure-risk score.

    Attributes:
      heartbeat_interval_s: devices send a heartbeat every this many seconds (30 s); used upstream to
        count missed heartbeats.
      missed_heartbeat_tolerance: missed heartbeats per window that are no evidence (1: a heartbeat
        jittering across a window edge reads as one missed in one window).
      missed_heartbeats_full: missed heartbeats beyond the tolerance, pooled over the memory, that are
        full evidence (6: three minutes of silence).
      healthy_error_rate_per_h: error events per hour of a healthy device (0.5, the middle of the
        0-1/h seen in healthy devices): the baseline a new or just-serviced device starts from, and
        the floor of any learned baseline, so a quiet device is not alarmed by its first error.
      error_rise_factor: the pooled error rate must be at least this multiple of the baseline to
        count (3x); smaller rises are ordinary variation with load.
      error_surprise_start, error_surprise_full: evidence of an error rise grows from 0 to 1 as the
        chance of seeing that many errors at the baseline rate (Poisson) falls from 10^-3 to 10^-7;
        these are its -log10. At 288 windows a day, 10^-3 happens by chance every few days and 10^-7
        not in a device's lifetime.
      critical_error_evidence: evidence per critical error in the memory (0.25: four critical
        errors in 15 minutes are full evidence whatever the device's baseline).
      overheat_c: tube housing temperature above which heat is evidence (65 °C: 10 °C above the
        hottest healthy tube under load).
      overheat_full_c: tube temperature that is full evidence (75 °C, the middle of the 70-85 °C
        range seen before failures).
      single_window_share: weight of the judged window's temperature against the mean over the
        memory (0.5: one hot window counts, a run of hot windows counts more).
      memory_windows: windows pooled, including the one judged (3: 15 minutes at the 5-minute
        default window, a fraction of the 30-90 minute run-up to a failure).
      baseline_half_life_hours: half-life of the error-rate baseline (12 h: through a 90-minute
        run-up at 48 errors/h the baseline only reaches ~4/h, so the burst stays surprising, while a
        device that steadily logs 24 errors/h stops being flagged within about 7 hours).
      precursor_weight: risk from one precursor at full evidence (0.7). Precursors combine as
        independent causes, risk = 1 - prod(1 - weight * evidence), so one precursor in full is
        over the alert threshold and all three give 0.97.
      alert_threshold: failure risk at or above which the twin raises an alert (0.6).
    """

    heartbeat_interval_s: float = 30.0
    missed_heartbeat_tolerance: int = 1
    missed_heartbeats_full: int = 6
    healthy_error_rate_per_h: float = 0.5
    error_rise_factor: float = 3.0
    error_surprise_start: float = 3.0
    error_surprise_full: float = 7.0
    critical_error_evidence: float = 0.25
    overheat_c: float = 65.0
    overheat_full_c: float = 75.0
    single_window_share: float = 0.5
    memory_windows: int = 3
    baseline_half_life_hours: float = 12.0
    precursor_weight: float = 0.7
    alert_threshold: float = 0.6

    def __post_init__(self):
        checks = {
            "heartbeat_interval_s must be > 0": self.heartbeat_interval_s > 0,
            "missed_heartbeat_tolerance must be >= 0": self.missed_heartbeat_tolerance >= 0,
            "missed_heartbeats_full must be >= 1": self.missed_heartbeats_full >= 1,
            "healthy_error_rate_per_h must be > 0": self.healthy_error_rate_per_h > 0,
            "error_rise_factor must be >= 1": self.error_rise_factor >= 1,
            "error_surprise_full must exceed error_surprise_start":
                self.error_surprise_full > self.error_surprise_start,
            "critical_error_evidence must be in [0, 1]": 0 <= self.critical_error_evidence <= 1,
            "overheat_full_c must exceed overheat_c": self.overheat_full_c > self.overheat_c,
            "single_window_share must be in [0, 1]": 0 <= self.single_window_share <= 1,
            "memory_windows must be >= 1": self.memory_windows >= 1,
            "baseline_half_life_hours must be > 0": self.baseline_half_life_hours > 0,
            "precursor_weight must be in (0, 1]": 0 < self.precursor_weight <= 1,
            "alert_threshold must be in (0, 1]": 0 < self.alert_threshold <= 1,
        }
        broken = [rule for rule, holds in checks.items() if not holds]
        if broken:
            raise ValueError("invalid RiskConfig: " + "; ".join(broken))


@dataclasses.dataclass(frozen=True)
class WindowFeatures:
    """What one window of a device's log says about its health.

    Attributes:
      window_seconds: window length, s (> 0).
      error_count: error events (severity error or critical).
      critical_count: critical events (a subset of `error_count`).
      warning_count: warning events.
      heartbeat_count: heartbeats received.
      missed_heartbeats: expected heartbeats (one every `RiskConfig.heartbeat_interval_s`) that did not arrive.
      max_heartbeat_gap_s: longest silence between heartbeats, window edges included, s; None if unknown.
      tube_temperature_max: hottest tube housing reading, °C; None without readings.
      tube_temperature_mean: mean tube housing reading, °C; None without readings.
      exposure_count: exposures taken.
      status: last status reported in the window ("online", "idle", "busy", "degraded", "offline",
        "service"), or None.
    """

    window_seconds: float
    error_count: int
    critical_count: int
    warning_count: int
    heartbeat_count: int
    missed_heartbeats: int
    max_heartbeat_gap_s: float | None
    tube_temperature_max: float | None
    tube_temperature_mean: float | None
    exposure_count: int
    status: str | None

    def __post_init__(self):
        if not self.window_seconds > 0:
            raise ValueError(f"window_seconds must be > 0, got {self.window_seconds!r}")
        counts = ("error_count", "critical_count", "warning_count", "heartbeat_count", "missed_heartbeats",
                  "exposure_count")
        negative = [name for name in counts if getattr(self, name) < 0]
        if negative:
            raise ValueError(f"counts must be >= 0: {', '.join(negative)}")
        if self.critical_count > self.error_count:
            raise ValueError(f"critical_count {self.critical_count} exceeds error_count {self.error_count}: "
                             "critical events are error events")


@dataclasses.dataclass(frozen=True)
class WindowSummary:
    """The part of a past window the risk score remembers.

    Attributes:
      window_end: end of the window (exclusive), aware datetime; None for the window being judged.
      window_seconds: window length, s.
      error_count: error events (error or critical).
      critical_count: critical events.
      missed_heartbeats: missed heartbeats, 0 when the device announced service.
      tube_temperature_max: hottest tube reading, °C, or None.
    """

    window_end: datetime.datetime | None
    window_seconds: float
    error_count: int
    critical_count: int
    missed_heartbeats: int
    tube_temperature_max: float | None


@dataclasses.dataclass
class DeviceHistory:
    """What the risk score carries from one window of a device to the next (small and picklable).

    Attributes:
      error_rate_baseline_per_h: EWMA of the error rate in windows the device was working, errors/h;
        None until learned (the healthy prior is used).
      tube_temperature_baseline_c: exponentially weighted mean of the window-mean tube temperature
        (same half-life), °C, or None; quoted in reasons as the device's usual temperature.
      tube_temperature_weight: windows behind that mean, each decaying with the half-life; it makes
        the mean unbiased by the first reading (an idle tube at start-up is not "usual" for hours).
      recent: the latest windows, oldest first (at most `RiskConfig.memory_windows` - 1).
      last_window_end: end of the latest window learned, or None.
      last_maintenance: time of the latest maintenance recorded, or None.
    """

    error_rate_baseline_per_h: float | None = None
    tube_temperature_baseline_c: float | None = None
    tube_temperature_weight: float = 0.0
    recent: tuple[WindowSummary, ...] = ()
    last_window_end: datetime.datetime | None = None
    last_maintenance: datetime.datetime | None = None


@dataclasses.dataclass(frozen=True)
class RiskAssessment:
    """Failure risk of one window.

    Attributes:
      failure_risk: 0..1; at or above `RiskConfig.alert_threshold` the device needs attention.
      reasons: one short reason per precursor that contributed, strongest first; empty when the risk is 0.
    """

    failure_risk: float
    reasons: tuple[str, ...]


def assess_failure_risk(features: WindowFeatures, history: DeviceHistory,
                        config: RiskConfig = RiskConfig()) -> RiskAssessment:
    """One window's features, judged against the device's history -> failure risk and reasons.

    Args:
      features: the window being judged.
      history: the device's history before this window (`update_history` has not seen it yet).
      config: thresholds.

    Returns:
      `RiskAssessment`: risk = 1 - prod(1 - precursor_weight * evidence) over the error-rate,
      tube-temperature and heartbeat evidence, each 0..1, with a reason for each evidence above 0.
    """
    remembered = history.recent[-(config.memory_windows - 1):] if config.memory_windows > 1 else ()
    windows = (*remembered, _summarise(features, None))
    evidence = [
        _error_evidence(windows, history.error_rate_baseline_per_h, config),
        _temperature_evidence(windows, history.tube_temperature_baseline_c, config),
        _heartbeat_evidence(windows, features.max_heartbeat_gap_s, config),
    ]
    calm = 1.0
    for strength, _ in evidence:
        calm *= 1.0 - config.precursor_weight * strength
    # Strongest evidence first; ties keep the order errors, temperature, heartbeats.
    contributing = sorted((-strength, order, reason) for order, (strength, reason) in enumerate(evidence)
                          if strength > 0)
    return RiskAssessment(failure_risk=min(1.0, max(0.0, 1.0 - calm)),
                          reasons=tuple(reason for _, _, reason in contributing))


def update_history(history: DeviceHistory, features: WindowFeatures, window_end: datetime.datetime,
                   config: RiskConfig = RiskConfig()) -> DeviceHistory:
    """Folds a judged window into the device's history; call after `assess_failure_risk` for that window.

    Args:
      history: the history the window was judged against.
      features: the window.
      window_end: its end (exclusive); windows must come in event-time order.
      config: thresholds (memory length, baseline half-life, healthy prior).

    Returns:
      A new `DeviceHistory`. The error-rate baseline learns only from windows in which the device
      was working (heartbeats arrived and it was not offline or in service): a silent device's zero
      errors say nothing about its normal rate. The window in which a maintenance was recorded
      mixes the device before and after the service, so it is neither learned nor remembered.

    Raises:
      ValueError: `window_end` is not after the latest window learned.
    """
    if history.last_window_end is not None and window_end <= history.last_window_end:
        raise ValueError(f"windows must be learned in event-time order: {window_end.isoformat()} is not after "
                         f"{history.last_window_end.isoformat()}")
    window_start = window_end - datetime.timedelta(seconds=features.window_seconds)
    if history.last_maintenance is not None and window_start <= history.last_maintenance < window_end:
        return dataclasses.replace(history, last_window_end=window_end)
    decay = 0.5 ** (features.window_seconds / (config.baseline_half_life_hours * _SECONDS_PER_HOUR))
    error_baseline = history.error_rate_baseline_per_h
    if features.heartbeat_count > 0 and features.status not in NOT_WORKING_STATUSES:
        rate = features.error_count / (features.window_seconds / _SECONDS_PER_HOUR)
        # Seeded with the healthy prior on purpose: one early error must not make 12/h the norm.
        start = config.healthy_error_rate_per_h if error_baseline is None else error_baseline
        error_baseline = start + (1.0 - decay) * (rate - start)
    temperature_baseline = history.tube_temperature_baseline_c
    temperature_weight = history.tube_temperature_weight
    if features.tube_temperature_mean is not None:
        temperature_weight = decay * temperature_weight + 1.0
        previous = features.tube_temperature_mean if temperature_baseline is None else temperature_baseline
        temperature_baseline = previous + (features.tube_temperature_mean - previous) / temperature_weight
    memory_start = window_end - datetime.timedelta(seconds=(config.memory_windows - 1) * features.window_seconds)
    remembered = [window for window in (*history.recent, _summarise(features, window_end))
                  if window.window_end > memory_start]
    return dataclasses.replace(
        history,
        error_rate_baseline_per_h=error_baseline,
        tube_temperature_baseline_c=temperature_baseline,
        tube_temperature_weight=temperature_weight,
        recent=tuple(remembered[-(config.memory_windows - 1):]) if config.memory_windows > 1 else (),
        last_window_end=window_end,
    )


def record_maintenance(history: DeviceHistory, when: datetime.datetime) -> DeviceHistory:
    """A maintenance at `when` -> a history that starts afresh: healthy prior baseline, no memory.

    Recording the same or an earlier maintenance again returns `history` unchanged, so replaying a
    window cannot wipe what was learned since. A first report of a maintenance that ended before the
    windows already learned (a device stating its service date at start-up) only notes the date:
    the windows learned since then were after the service, so they stay.
    """
    if history.last_maintenance is not None and when <= history.last_maintenance:
        return history
    if history.last_window_end is not None and when < history.last_window_end:
        return dataclasses.replace(history, last_maintenance=when)
    return DeviceHistory(last_window_end=history.last_window_end, last_maintenance=when)


def maintenance_status(last_maintenance: datetime.datetime | None, at: datetime.datetime,
                       service_interval_days: float) -> tuple[float | None, bool]:
    """(last maintenance, now, service interval in days) -> (days since maintenance, maintenance due).

    Maintenance is due once the interval has fully elapsed (days since >= interval). A device with
    no maintenance on record is due, with days None: an unknown service history is not assumed
    recent. A maintenance time after `at` (device clock ahead of the window) counts as just serviced
    (0 days).

    Raises:
      ValueError: `service_interval_days` is not positive.
    """
    if not service_interval_days > 0:
        raise ValueError(f"service_interval_days must be > 0, got {service_interval_days!r}")
    if last_maintenance is None:
        return None, True
    days_since = max(0.0, (at - last_maintenance).total_seconds() / _SECONDS_PER_DAY)
    return days_since, days_since >= service_interval_days


# -- evidence per precursor -------------------------------------------------------------------------


def _summarise(features: WindowFeatures, window_end: datetime.datetime | None) -> WindowSummary:
    missed = 0 if features.status == SERVICE_STATUS else features.missed_heartbeats
    return WindowSummary(window_end=window_end, window_seconds=features.window_seconds,
                         error_count=features.error_count, critical_count=features.critical_count,
                         missed_heartbeats=missed, tube_temperature_max=features.tube_temperature_max)


def _error_evidence(windows, learned_baseline_per_h: float | None, config: RiskConfig) -> tuple[float, str]:
    """Pooled errors vs the baseline rate: how improbable that many errors would be (Poisson), or criticals."""
    errors = sum(window.error_count for window in windows)
    criticals = sum(window.critical_count for window in windows)
    seconds = sum(window.window_seconds for window in windows)
    hours = seconds / _SECONDS_PER_HOUR
    baseline = max(config.healthy_error_rate_per_h,
                   config.healthy_error_rate_per_h if learned_baseline_per_h is None else learned_baseline_per_h)
    rate = errors / hours
    rise = 0.0
    if errors and rate >= config.error_rise_factor * baseline:
        surprise = poisson_surprise(errors, baseline * hours)
        rise = _ramp(surprise, config.error_surprise_start, config.error_surprise_full)
    evidence = max(rise, min(1.0, criticals * config.critical_error_evidence))
    reason = f"error rate {rate:.1f}/h over {seconds / 60:.0f} min vs baseline {baseline:.1f}/h"
    if criticals:
        reason += f", {criticals} critical"
    return evidence, reason


def _temperature_evidence(windows, baseline_c: float | None, config: RiskConfig) -> tuple[float, str]:
    """Heat of the judged window, blended with the mean heat of the memory: a run of hot windows counts more."""
    def heat(temperature):
        return _ramp(temperature, config.overheat_c, config.overheat_full_c)

    readings = [window.tube_temperature_max for window in windows if window.tube_temperature_max is not None]
    now = windows[-1].tube_temperature_max
    heat_now = heat(now) if now is not None else 0.0
    heat_sustained = sum(map(heat, readings)) / len(readings) if readings else 0.0
    evidence = config.single_window_share * heat_now + (1.0 - config.single_window_share) * heat_sustained
    hot = [temperature for temperature in readings if temperature > config.overheat_c]
    shown = now if now is not None and now > config.overheat_c else max(hot, default=config.overheat_c)
    reason = f"tube temperature {shown:.0f} °C over {config.overheat_c:.0f} °C"
    details = [f"{len(hot)} of the last {len(windows)} windows"] if len(windows) > 1 else []
    if baseline_c is not None:
        details.append(f"usual {baseline_c:.0f} °C")
    return evidence, reason + (f" ({'; '.join(details)})" if details else "")


def _heartbeat_evidence(windows, max_gap_s: float | None, config: RiskConfig) -> tuple[float, str]:
    """Missed heartbeats beyond the per-window tolerance, pooled over the memory."""
    excess = sum(max(0, window.missed_heartbeats - config.missed_heartbeat_tolerance) for window in windows)
    missed = sum(window.missed_heartbeats for window in windows)
    minutes = sum(window.window_seconds for window in windows) / 60
    reason = f"{missed} heartbeats missed in {minutes:.0f} min"
    if max_gap_s is not None:
        reason += f", longest gap {max_gap_s:.0f} s"
    return min(1.0, excess / config.missed_heartbeats_full), reason


def poisson_surprise(count: int, expected: float) -> float:
    """-log10 P(N >= count) for N ~ Poisson(expected): 0 when the count is not above expectation.

    Computed in log space from the first term of the upper tail, whose later terms shrink
    geometrically once count > expected, so it neither underflows nor cancels.
    """
    if expected <= 0:
        raise ValueError(f"expected count must be > 0, got {expected!r}")
    if count <= expected:
        return 0.0
    log_first = count * math.log(expected) - expected - math.lgamma(count + 1)
    tail, term, k = 1.0, 1.0, count
    while term > 1e-17 * tail:
        k += 1
        term *= expected / k
        tail += term
    return -(log_first + math.log(tail)) / math.log(10.0)


def _ramp(value: float, start: float, full: float) -> float:
    """0 at or below `start`, 1 at or above `full`, linear between."""
    return min(1.0, max(0.0, (value - start) / (full - start)))
