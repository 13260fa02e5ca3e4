"""Imaging devices: a fleet of X-ray rooms, portables and CR readers, and the log each one writes.

Flow: `choose_failing` picks which devices fail; `plan_device` (index, rng) ->
`DevicePlan`: model, thermal constants, error rates, when it was last
serviced, a scheduled preventive maintenance and a `Failure` with its run-up;
`device_events` (plan, the times of the studies it acquires) -> DeviceLogEvent
records, landed a few seconds after they happen.

What a log contains (times in seconds after the simulation start):

* ``heartbeat`` every 30 s, with tube temperature, firmware and config version;
  none while the device is down or being serviced.
* ``status``: ``online`` at connection and after service, ``busy``/``idle``
  around each exam, ``degraded`` in a failure's run-up, ``offline`` at the
  failure, ``service`` while an engineer works on it.
* ``exposure`` per exam (studies of simulated patients plus background work).
  Tube housing temperature rises with each exposure and cools exponentially;
  it also drifts up with time since the last maintenance, which resets it.
* ``error``: healthy devices log ~0-1 error/hour and a few warnings (severity
  ``warning``). In the 30-90 minutes before a failure errors come in bursts,
  more and more of them critical, the tube climbs towards 70-85 °C and
  heartbeats start to go missing.
* ``config_change``: configuration pushes (``CFG-UPDATE``, config version
  bump) and firmware updates at maintenance (``FW-UPDATE``).
* ``maintenance``: preventive (``PM``) or corrective after a failure (``CM``).

Maintenance history. Every ``online`` status event that the device sends at
connection, at its 06:00 self-test and after maintenance carries code
``PM-OK`` (severity info) or ``PM-OVERDUE`` (severity warning, more than
`MAINTENANCE_INTERVAL_DAYS` since the last service) and the message
``last preventive maintenance <ISO-8601 time>; <days> days ago; interval 90 days``,
and the time itself in ``last_maintenance_time``.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import math
import uuid

import numpy as np

from schemas.contract import format_timestamp
from simulator.writers import Landed

HEARTBEAT_INTERVAL_S = 30.0
MAINTENANCE_INTERVAL_DAYS = 90
SELF_TEST_HOUR = 6
FAN_ON_C = 48.0


@dataclasses.dataclass(frozen=True)
class DeviceModel:
    manufacturer: str
    name: str
    modality: str  # CR | DX
    firmware: str
    portable: bool


MODELS = (
    DeviceModel("FUJIFILM Corporation", "FDR Go PLUS", "DX", "V7.1.2", True),
    DeviceModel("Carestream Health", "DRX-1", "DX", "5.7.412", False),
    DeviceModel("Carestream Health", "DRX-Revolution", "DX", "5.7.408", True),
    DeviceModel("Siemens Healthineers", "Ysio Max", "DX", "VF11C", False),
    DeviceModel("Philips", "DigitalDiagnost C90", "DX", "1.3.2", False),
    DeviceModel("Agfa", "CR 30-Xm", "CR", "2.1.0", False),
    DeviceModel("FUJIFILM Corporation", "FCR Capsula XLII", "CR", "A09.2", False),
)

# Failure mode -> (precursor error codes, fatal code, what the engineer replaces).
FAILURE_MODES = {
    "tube": (("E-TUBE-OVERHEAT", "E-TUBE-ARC", "E-ANODE-ROTATION"), "E-TUBE-FAILURE", "X-ray tube insert"),
    "detector": (("E-DETECTOR-COMM", "E-DETECTOR-TEMP", "E-TUBE-OVERHEAT"), "E-DETECTOR-FAILURE",
                 "detector interface board"),
    "generator": (("E-GENERATOR", "E-HV-FAULT", "E-TUBE-OVERHEAT"), "E-GENERATOR-FAILURE",
                  "high-voltage generator module"),
}
MESSAGES = {
    "E-TUBE-OVERHEAT": "tube housing temperature above limit; exposure delayed",
    "E-TUBE-ARC": "tube arcing detected during exposure",
    "E-ANODE-ROTATION": "anode rotation speed below target",
    "E-DETECTOR-COMM": "detector link lost; reconnecting",
    "E-DETECTOR-TEMP": "detector temperature out of range",
    "E-GENERATOR": "generator kV ripple out of tolerance",
    "E-HV-FAULT": "high-voltage fault; exposure aborted",
    "E-NETWORK-TIMEOUT": "PACS association timed out; image queued",
    "E-AEC-CALIB": "automatic exposure control calibration drift",
    "W-DISK-SPACE": "local image cache above 85 %",
    "W-CALIBRATION-DUE": "detector gain calibration due",
    "W-BATTERY-LOW": "wireless detector battery below 20 %",
}
BENIGN_ERRORS = ("E-DETECTOR-COMM", "E-NETWORK-TIMEOUT", "E-AEC-CALIB")
WARNINGS = ("W-DISK-SPACE", "W-CALIBRATION-DUE", "W-BATTERY-LOW")


@dataclasses.dataclass(frozen=True)
class Failure:
    """A failure: errors and heat build from `precursor_start_s` to `failure_s`, when the device
    goes offline; an engineer arrives at `service_s` and it is back at `recovery_s` (None: not
    within the period)."""

    mode: str
    precursor_start_s: float
    failure_s: float
    service_s: float | None
    recovery_s: float | None
    peak_temperature_c: float


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """One device and everything drawn for it. Temperatures °C, rates per hour, times in seconds."""

    index: int
    device_id: str
    model: DeviceModel
    station_name: str
    last_maintenance: dt.datetime
    ambient_c: float
    drift_c_per_day: float
    heat_per_exposure_c: float
    cooling_s: float
    error_rate_per_h: float
    warning_rate_per_h: float
    exams_per_h: float
    failure: Failure | None
    preventive: tuple[float, float] | None

    def overdue_at(self, when: dt.datetime) -> bool:
        return (when - self.last_maintenance) > dt.timedelta(days=MAINTENANCE_INTERVAL_DAYS)

    def down_intervals(self) -> list[tuple[float, float]]:
        """(begin_s, end_s) when the device takes no images and sends no heartbeats."""
        down = []
        if self.failure:
            end = self.failure.recovery_s if self.failure.recovery_s is not None else math.inf
            down.append((self.failure.failure_s, end))
        if self.preventive:
            down.append(self.preventive)
        return down

    def available(self, seconds: float) -> bool:
        return not any(begin <= seconds < end for begin, end in self.down_intervals())


def choose_failing(count: int, hours: float, rng: np.random.Generator) -> set[int]:
    """Indices of the devices that fail: about one in four, at least one when there are two or
    more devices and two or more hours, never all of them (studies need a working device)."""
    failing = int(rng.binomial(count, 0.25))
    if count >= 2 and hours >= 2:
        failing = max(failing, 1)
    failing = min(failing, count - 1)
    return set(rng.choice(count, size=failing, replace=False).tolist()) if failing > 0 else set()


def plan_device(index: int, rng: np.random.Generator, *, start: dt.datetime, hours: float,
                fails: bool) -> DevicePlan:
    """Draw one device. A device that `fails` gets a failure when the period has room for a
    30-minute run-up; the others may get a preventive maintenance."""
    model = MODELS[int(rng.integers(len(MODELS)))]
    place = "PORT" if model.portable else ("CR" if model.modality == "CR" else ("ED", "RAD")[int(rng.integers(2))])
    device_id = f"XR-{place}-{index + 1:02d}"
    period_s = hours * 3600
    failure = _draw_failure(rng, period_s) if fails else None
    preventive = None
    if failure is None and hours >= 1 and rng.random() < min(0.5, 0.08 * hours):
        begin = rng.uniform(0.1, 0.7) * period_s
        preventive = (begin, min(begin + rng.uniform(30, 60) * 60, period_s - 60))
    return DevicePlan(
        index=index, device_id=device_id, model=model, station_name=device_id.replace("-", ""),
        last_maintenance=start - dt.timedelta(days=float(rng.uniform(7, 150))),
        ambient_c=float(rng.uniform(34, 37)), drift_c_per_day=float(rng.uniform(0.01, 0.03)),
        heat_per_exposure_c=float(rng.uniform(0.8, 1.5)), cooling_s=float(rng.uniform(20, 35) * 60),
        error_rate_per_h=float(rng.uniform(0, 1)), warning_rate_per_h=float(rng.uniform(0.1, 0.6)),
        exams_per_h=float(rng.uniform(2, 4) if model.portable else rng.uniform(4, 8)),
        failure=failure, preventive=preventive)


def _draw_failure(rng: np.random.Generator, period_s: float) -> Failure | None:
    latest_failure = period_s - 600
    run_up_room = latest_failure - 300
    if run_up_room < 1800:
        return None
    run_up = rng.uniform(1800, min(5400, run_up_room))
    failure_s = rng.uniform(run_up + 300, latest_failure)
    service_s = recovery_s = None
    if rng.random() < 0.5:
        service_s = failure_s + rng.uniform(45, 120) * 60
        recovery_s = service_s + rng.uniform(30, 90) * 60
        service_s = service_s if service_s < period_s else None
        recovery_s = recovery_s if recovery_s < period_s else None
    mode = sorted(FAILURE_MODES)[int(rng.integers(len(FAILURE_MODES)))]
    return Failure(mode=mode, precursor_start_s=failure_s - run_up, failure_s=failure_s, service_s=service_s,
                   recovery_s=recovery_s, peak_temperature_c=float(rng.uniform(70, 85)))


def device_events(plan: DevicePlan, rng: np.random.Generator, *, start: dt.datetime, hours: float,
                  study_times_s: list[float]) -> list[Landed]:
    """The device's log over the period, landed a few seconds after each event.

    study_times_s: acquisitions of simulated patients' studies on this device (seconds after
    the start); background exams are added here.
    """
    period_s = hours * 3600
    start_hour = start.hour + start.minute / 60 + start.second / 3600
    log = _Log(plan, start, period_s)
    exams = _exams(plan, rng, period_s, start_hour, study_times_s)
    services = _service_completions(plan)
    thermals = _TubeThermals(plan, rng, start, exams, services)
    versions = _versions(plan, rng, period_s, log)

    beats = _heartbeat_times(plan, rng, period_s)
    for t, temperature in zip(beats.tolist(), thermals.at(beats).tolist()):
        log.add(t, "heartbeat", "info", tube_temperature_c=temperature, **versions(t))
    _exam_events(plan, rng, exams, thermals, log)
    for t in _maintenance_report_times(plan, rng, period_s, start_hour, services):
        serviced = max((s for s in services if s <= t), default=None)
        log.maintenance_report(t, serviced, thermals.at_one(t), versions(t))
    _background_errors(plan, rng, period_s, thermals, log)
    _service_events(plan, rng, log)
    if plan.failure:
        _failure_events(plan.failure, rng, thermals, log)
    return log.landed(rng)


class _Log:
    """Collects one device's events, then lands them in time order with ids."""

    def __init__(self, plan: DevicePlan, start: dt.datetime, period_s: float):
        self._plan, self._start, self._period_s, self._events = plan, start, period_s, []

    def add(self, t: float, kind: str, severity: str, **fields) -> None:
        """Record an event at `t` seconds after the start; events outside the period are not logged."""
        if 0 <= t < self._period_s:
            self._events.append((t, kind, severity, fields))

    def maintenance_report(self, t: float, serviced_s: float | None, temperature_c: float, versions: dict) -> None:
        """An ``online`` status event stating when the device was last serviced (see module docstring)."""
        serviced = (self._plan.last_maintenance if serviced_s is None
                    else self._start + dt.timedelta(seconds=serviced_s))
        age = self._start + dt.timedelta(seconds=t) - serviced
        overdue = age > dt.timedelta(days=MAINTENANCE_INTERVAL_DAYS)
        self.add(t, "status", "warning" if overdue else "info", status="online",
                 code="PM-OVERDUE" if overdue else "PM-OK",
                 message=f"last preventive maintenance {format_timestamp(serviced)}; "
                         f"{age.total_seconds() / 86400:.1f} days ago; interval {MAINTENANCE_INTERVAL_DAYS} days",
                 last_maintenance_time=serviced, tube_temperature_c=temperature_c, **versions)

    def landed(self, rng: np.random.Generator) -> list[Landed]:
        out = []
        for t, kind, severity, fields in sorted(self._events, key=lambda e: e[0]):
            event_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
            when = self._start + dt.timedelta(seconds=t)
            record = {"event_id": event_id, "device_id": self._plan.device_id,
                      "device_model": self._plan.model.name, "event_time": when, "kind": kind,
                      "severity": severity, "code": None, "message": None, "status": None,
                      "tube_temperature_c": None, "exposure_count": None, "firmware_version": None,
                      "config_version": None, "last_maintenance_time": None, **fields}
            # The gateway forwards each event within seconds; what has not landed by the end is not written.
            arrival = when + dt.timedelta(microseconds=round(rng.uniform(0.2, 3.0) * 1e6))
            if arrival <= self._start + dt.timedelta(seconds=self._period_s):
                out.append(Landed(arrival=arrival, payload=record, record_id=event_id))
        return out


class _TubeThermals:
    """Tube housing temperature (°C) at any time: ambient, plus drift since the last service,
    plus the decaying heat of every exposure so far, plus a failure's run-up, plus sensor noise."""

    def __init__(self, plan: DevicePlan, rng: np.random.Generator, start: dt.datetime,
                 exams: list[tuple[float, int]], services: list[float]):
        self._plan, self._rng, self._services = plan, rng, services
        # Heat left over from work before the period, then the excess just after each exposure
        # (exams are in time order): what was there, cooled since the last one, plus this one.
        self._times = np.array([0.0] + [t for t, _ in exams])
        excess = [rng.uniform(0, 6)]
        for (t, views), previous in zip(exams, self._times[:-1].tolist()):
            excess.append(excess[-1] * math.exp(-(t - previous) / plan.cooling_s) + views * plan.heat_per_exposure_c)
        self._excess = np.array(excess)
        self._serviced_before_s = (start - plan.last_maintenance).total_seconds()

    def at(self, times: np.ndarray) -> np.ndarray:
        """(n,) seconds after the start -> (n,) °C rounded to 0.1."""
        p, times = self._plan, np.asarray(times, dtype=np.float64)
        last = np.searchsorted(self._times, times, side="right") - 1
        heat = self._excess[last] * np.exp(-(times - self._times[last]) / p.cooling_s)
        since_service = times + self._serviced_before_s
        for done in self._services:  # maintenance resets the drift
            since_service = np.where(times >= done, times - done, since_service)
        temperature = p.ambient_c + p.drift_c_per_day * since_service / 86400 + heat
        # The housing fan switches on at FAN_ON_C and halves any further rise.
        temperature = np.where(temperature > FAN_ON_C, FAN_ON_C + (temperature - FAN_ON_C) / 2, temperature)
        f = p.failure
        if f:
            run_up = np.clip((times - f.precursor_start_s) / (f.failure_s - f.precursor_start_s), 0, 1)
            run_up = np.where(times < f.failure_s, run_up * run_up * (3 - 2 * run_up), 0.0)
            temperature += (f.peak_temperature_c - temperature) * run_up
        return np.round(temperature + self._rng.normal(0, 0.3, times.shape), 1)

    def at_one(self, t: float) -> float:
        return float(self.at(np.array([t]))[0])


def _service_completions(plan: DevicePlan) -> list[float]:
    """Seconds after the start at which a maintenance (preventive or corrective) completed."""
    done = []
    if plan.preventive:
        done.append(plan.preventive[1])
    if plan.failure and plan.failure.recovery_s is not None:
        done.append(plan.failure.recovery_s)
    return sorted(done)


def _exams(plan: DevicePlan, rng: np.random.Generator, period_s: float, start_hour: float,
           study_times_s: list[float]) -> list[tuple[float, int]]:
    """(time_s, views) of every exam, in time order: the given studies (one PA view each) and
    background work (1-3 views), three times busier 08:00-20:00, none while the device is down."""
    count = rng.poisson(plan.exams_per_h * period_s / 3600)
    times, views, chance = rng.uniform(0, period_s, count), rng.integers(1, 4, count), rng.random(count)
    clock = (start_hour + times / 3600) % 24
    keep = chance < np.where((clock >= 8) & (clock < 20), 1.0, 0.35)
    background = [(t, v) for t, v, k in zip(times.tolist(), views.tolist(), keep.tolist())
                  if k and plan.available(t)]
    return sorted(background + [(float(t), 1) for t in study_times_s])


def _versions(plan: DevicePlan, rng: np.random.Generator, period_s: float, log: _Log):
    """Log configuration pushes (about one per 12 h) and a firmware update at half of the
    preventive maintenances; return a function: seconds -> {firmware_version, config_version}."""
    firmware, revision = plan.model.firmware, int(rng.integers(1, 9))
    timeline = [(-math.inf, firmware, revision)]
    pushes = [t for t in rng.uniform(0, period_s, rng.poisson(period_s / (12 * 3600))).tolist() if plan.available(t)]
    update_at = plan.preventive[1] - 30 if plan.preventive and rng.random() < 0.5 else None
    for t in sorted(pushes + ([update_at] if update_at is not None else [])):
        if t == update_at:
            old, firmware = firmware, f"{firmware}-SP{int(rng.integers(1, 5))}"
            code, message = "FW-UPDATE", f"firmware updated from {old} to {firmware}"
        else:
            revision += 1
            code, message = "CFG-UPDATE", "exposure presets updated by PACS administrator"
        timeline.append((t, firmware, revision))
        log.add(t, "config_change", "info", code=code, message=message, firmware_version=firmware,
                config_version=f"cfg-{revision}")
    times = [t for t, _, _ in timeline]

    def at(t: float) -> dict:
        _, fw, rev = timeline[bisect.bisect_right(times, t) - 1]
        return {"firmware_version": fw, "config_version": f"cfg-{rev}"}

    return at


def _heartbeat_times(plan: DevicePlan, rng: np.random.Generator, period_s: float) -> np.ndarray:
    """Every 30 s with a little jitter, none while down; in a failure's run-up more and more
    go missing (up to 60 % just before it)."""
    beats = rng.uniform(0, HEARTBEAT_INTERVAL_S) + np.arange(0, period_s, HEARTBEAT_INTERVAL_S)
    beats = np.clip(beats + rng.normal(0, 0.4, beats.size), 0, None)
    beats = beats[beats < period_s]
    keep = np.array([plan.available(t) for t in beats.tolist()], dtype=bool)
    f = plan.failure
    if f:
        run_up = np.clip((beats - f.precursor_start_s) / (f.failure_s - f.precursor_start_s), 0, 1)
        keep &= rng.random(beats.size) >= 0.6 * run_up ** 2
    return beats[keep]


def _exam_events(plan: DevicePlan, rng: np.random.Generator, exams: list[tuple[float, int]],
                 thermals: _TubeThermals, log: _Log) -> None:
    """An exposure event per exam, framed by busy/idle status events when exams do not overlap."""
    previous_idle = -math.inf
    for t, views in exams:
        log.add(t, "exposure", "info", message=f"exam complete: {views} view(s)", exposure_count=views,
                tube_temperature_c=thermals.at_one(t + 1))
        busy, idle = t - rng.uniform(60, 180), t + rng.uniform(45, 200)
        if busy > previous_idle and plan.available(busy) and plan.available(idle):
            log.add(busy, "status", "info", status="busy", message="exam started")
            log.add(idle, "status", "info", status="idle", message="ready")
            previous_idle = idle


def _maintenance_report_times(plan: DevicePlan, rng: np.random.Generator, period_s: float, start_hour: float,
                              services: list[float]) -> list[float]:
    """When the device states its maintenance history: on connecting, at its daily self-test and
    when back from any maintenance; never while down or failing."""
    first_self_test = ((SELF_TEST_HOUR - start_hour) % 24) * 3600
    self_tests = np.arange(first_self_test, period_s, 86400).tolist()
    times = [rng.uniform(1, 30)] + [t for t in self_tests if t > 600] + services
    f = plan.failure
    failing = (lambda t: f.precursor_start_s <= t < f.failure_s) if f else (lambda t: False)
    return [t for t in times if t < period_s and plan.available(t) and not failing(t)]


def _background_errors(plan: DevicePlan, rng: np.random.Generator, period_s: float, thermals: _TubeThermals,
                       log: _Log) -> None:
    """Errors at the device's healthy rate and warnings, at random times while it is up."""
    for rate, codes, severity in ((plan.error_rate_per_h, BENIGN_ERRORS, "error"),
                                  (plan.warning_rate_per_h, WARNINGS, "warning")):
        for t in rng.uniform(0, period_s, rng.poisson(rate * period_s / 3600)).tolist():
            code = codes[int(rng.integers(len(codes)))]
            if plan.available(t):
                log.add(t, "error", severity, code=code, message=MESSAGES[code],
                        tube_temperature_c=thermals.at_one(t))


def _service_events(plan: DevicePlan, rng: np.random.Generator, log: _Log) -> None:
    """Service status and maintenance events for a preventive maintenance or a repair."""
    if plan.preventive:
        begin, end = plan.preventive
        log.add(begin, "status", "info", status="service", code="PM-START",
                message="preventive maintenance started")
        log.add(end - 60, "maintenance", "info", code="PM",
                message="preventive maintenance completed: tube seasoning, detector calibration, "
                        f"generator check; next due in {MAINTENANCE_INTERVAL_DAYS} days")
    f = plan.failure
    if f and f.service_s is not None:
        log.add(f.service_s, "status", "info", status="service", code="CM-START",
                message="field service engineer on site")
    if f and f.recovery_s is not None:
        part = FAILURE_MODES[f.mode][2]
        log.add(f.recovery_s - rng.uniform(60, 300), "maintenance", "info", code="CM",
                message=f"corrective maintenance completed: replaced {part}")


def _failure_events(f: Failure, rng: np.random.Generator, thermals: _TubeThermals, log: _Log) -> None:
    """The run-up and the failure: bursts of 2-5 errors every 3-9 minutes (closer together and
    more often critical as the failure nears), a ``degraded`` status half way, a fatal critical
    error and the ``offline`` status at the failure time."""
    codes, fatal, _ = FAILURE_MODES[f.mode]
    run_up = f.failure_s - f.precursor_start_s
    burst = f.precursor_start_s + rng.uniform(0, 180)
    while burst < f.failure_s - 30:
        progress = (burst - f.precursor_start_s) / run_up
        for t in np.sort(burst + rng.uniform(0, 60, int(rng.integers(2, 6)))).tolist():
            code = codes[int(rng.integers(len(codes)))]
            severity = "critical" if rng.random() < 0.1 + 0.5 * progress else "error"
            if t < f.failure_s - 15:
                log.add(t, "error", severity, code=code, message=MESSAGES[code], tube_temperature_c=thermals.at_one(t))
        burst += rng.uniform(3, 9) * 60 * (1 - 0.5 * progress)
    halfway = f.precursor_start_s + run_up / 2
    log.add(halfway, "status", "warning", status="degraded", code=codes[0],
            message="self-test: degraded performance", tube_temperature_c=thermals.at_one(halfway))
    last_gasp = f.failure_s - rng.uniform(1, 10)
    log.add(last_gasp, "error", "critical", code=fatal, message="fatal fault: exposure disabled",
            tube_temperature_c=thermals.at_one(last_gasp))
    log.add(f.failure_s, "status", "critical", status="offline", code=fatal, message="device offline")
