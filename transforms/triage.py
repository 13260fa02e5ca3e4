"""Imaging meets the twins: device quality flags on detections, and combined triage alerts.

    detections (no quality fields) ─┐
    final device_twin rows ─────────┴─ FlagDeviceQuality ─► detections rows (quality_flag, quality_reasons)
    detections (no quality fields) ─┐
    patient_twin rows (any pane) ───┴─ TriageAlerts ──────► triage alerts

Both joins are stateful DoFns keyed by device or patient, so they work the same
on a bounded batch and on an unbounded stream:

* A detection waits for the **final** row of its device's window that holds
  the acquisition time (degraded = failure risk over the alert threshold,
  overdue maintenance, or a degraded/offline/service status), at most until that row
  must have come (window end + lateness + one gate tick); a device with no row
  by then is flagged unknown, not degraded.
* A triage alert is raised once per image when a positive image
  (``covid_probability`` >= threshold) and a medium/high NEWS2 window of the
  same patient lie within `triage_window_seconds` of each other, in whichever
  order they arrive. Early panes count: an elevated band is worth acting on
  before the window closes.
"""

from __future__ import annotations

import dataclasses
import json

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindows

from transforms.decode import to_micros
from transforms.device_health import NOT_WORKING_STATUSES, RiskConfig
from transforms.device_twin import DeviceTwinConfig
from transforms.patient_twin import ELEVATED_BAND_LEVELS
from transforms.windowing import WindowPolicy, timer_time

DETECTION, DEVICE_WINDOW, PATIENT_WINDOW = "detection", "device_window", "patient_window"
DEGRADED_STATUSES = ("degraded", *NOT_WORKING_STATUSES)
UNKNOWN_DEVICE_STATE = "device state unknown: no device_twin row for the acquisition window"
ELEVATED_BANDS = tuple(ELEVATED_BAND_LEVELS)
MEMORY_SECONDS = 24 * 3600   # how far back each join remembers the other side


@dataclasses.dataclass(frozen=True)
class TriageConfig:
    """Attributes:
      device_policy: the device twin's window policy (which window holds an acquisition, and
        when its final row is due).
      risk_threshold: failure risk at or above which the device counts as degraded.
      positive_probability: image-level COVID probability at or above which an image is positive.
      triage_window_seconds: how close in event time image and elevated NEWS2 must be.
    """

    device_policy: WindowPolicy = DeviceTwinConfig().policy
    risk_threshold: float = RiskConfig().alert_threshold
    positive_probability: float = 0.5
    triage_window_seconds: int = 3600


def degradation_reasons(device_row: dict, risk_threshold: float) -> list[str]:
    """Why a final device_twin row says the device was degraded (empty: it was not)."""
    reasons = []
    if device_row["failure_risk"] >= risk_threshold:
        reasons.append(f"failure risk {device_row['failure_risk']:.2f}: " + "; ".join(device_row["failure_risk_reasons"]))
    if device_row["maintenance_due"]:
        days = device_row["days_since_maintenance"]
        reasons.append("maintenance overdue" + (f" ({days:.0f} days since service)" if days is not None else ""))
    if device_row["status"] in DEGRADED_STATUSES:
        reasons.append(f"device status {device_row['status']}")
    return reasons


class _FlagDeviceQualityFn(beam.DoFn):
    """(device_id, (kind, row)) -> detection rows with quality_flag and quality_reasons."""

    STATE = ReadModifyWriteStateSpec("state", PickleCoder())   # {"windows": {start_us: reasons}, "waiting": [...]}
    DEADLINE = TimerSpec("deadline", TimeDomain.WATERMARK)

    def __init__(self, config: TriageConfig):
        self._config = config
        policy = config.device_policy
        self._window_us = policy.window_seconds * 1_000_000
        self._final_after_us = (policy.allowed_lateness_seconds + policy.tick_seconds) * 1_000_000 + 1  # just after

    def _window_start(self, row: dict) -> int:
        return self._config.device_policy.window_start_us(to_micros(row["acquisition_time"]))

    def _deadline_us(self, row: dict) -> int:
        return self._window_start(row) + self._window_us + self._final_after_us

    def process(self, element, state=beam.DoFn.StateParam(STATE), deadline=beam.DoFn.TimerParam(DEADLINE)):
        _, (kind, row) = element
        known = state.read() or {"windows": {}, "waiting": []}
        if kind == DEVICE_WINDOW:
            start = to_micros(row["window_start"])
            known["windows"][start] = degradation_reasons(row, self._config.risk_threshold)
            ready = [d for d in known["waiting"] if self._window_start(d) == start]
            known["waiting"] = [d for d in known["waiting"] if self._window_start(d) != start]
            yield from (self._flagged(d, known["windows"][start]) for d in ready)
            newest = max(known["windows"])
            known["windows"] = {s: r for s, r in known["windows"].items() if s > newest - MEMORY_SECONDS * 1_000_000}
        elif self._window_start(row) in known["windows"]:
            yield self._flagged(row, known["windows"][self._window_start(row)])
        else:
            known["waiting"].append(row)
            deadline.set(timer_time(min(self._deadline_us(d) for d in known["waiting"])))
        state.write(known)

    @on_timer(DEADLINE)
    def on_deadline(self, fired=beam.DoFn.TimestampParam, state=beam.DoFn.StateParam(STATE),
                    deadline=beam.DoFn.TimerParam(DEADLINE)):
        known = state.read() or {"windows": {}, "waiting": []}
        due = [d for d in known["waiting"] if self._deadline_us(d) <= fired.micros]
        known["waiting"] = [d for d in known["waiting"] if self._deadline_us(d) > fired.micros]
        for row in due:
            yield beam.window.TimestampedValue(self._flagged(row, None), fired)
        if known["waiting"]:
            deadline.set(timer_time(min(self._deadline_us(d) for d in known["waiting"])))
        state.write(known)

    @staticmethod
    def _flagged(row: dict, reasons: list[str] | None) -> dict:
        return {**row, "quality_flag": bool(reasons), "quality_reasons": reasons if reasons is not None
                else [UNKNOWN_DEVICE_STATE]}


# What the triage join keeps of each side for its 24 hours: only what matching and the alert need.
_WINDOW_FIELDS = ("window_start", "window_end", "news2_score", "news2_band", "pane_timing")


def _window_summary(row: dict) -> dict:
    """An elevated patient_twin row -> the fields the triage join keeps of it."""
    return {name: row[name] for name in _WINDOW_FIELDS}


def _image_summary(detection: dict) -> dict:
    """A positive detections row -> the fields the triage join keeps of it (boxes as a count)."""
    return {"sop_instance_uid": detection["sop_instance_uid"], "acquisition_time": detection["acquisition_time"],
            "covid_probability": detection["covid_probability"], "box_count": len(detection["boxes"]),
            "model_name": detection["model_name"], "model_version": detection["model_version"]}


class _TriageFn(beam.DoFn):
    """(patient_key, (kind, summary)) -> one triage alert per positive image with elevated NEWS2 nearby.

    Its state holds, per patient and for `MEMORY_SECONDS`, the summaries `_window_summary` and
    `_image_summary` make, not whole rows.
    """

    # {"elevated": {start_us: row}, "positive": {sop: detection}, "alerted": {sop: acquisition_us}}
    STATE = ReadModifyWriteStateSpec("state", PickleCoder())

    def __init__(self, config: TriageConfig):
        self._config = config
        self._near_us = config.triage_window_seconds * 1_000_000

    def process(self, element, state=beam.DoFn.StateParam(STATE)):
        key, (kind, row) = element
        known = state.read() or {"elevated": {}, "positive": {}, "alerted": {}}
        if kind == PATIENT_WINDOW:
            known["elevated"][to_micros(row["window_start"])] = row
        elif row["sop_instance_uid"] not in known["alerted"]:
            known["positive"][row["sop_instance_uid"]] = row
        for sop, detection in list(known["positive"].items()):
            match = self._nearest_elevated(detection, known["elevated"])
            if match is not None:
                known["alerted"][sop] = to_micros(detection["acquisition_time"])
                del known["positive"][sop]
                yield self._alert(key, detection, match)
        self._forget_old(known)
        state.write(known)

    def _nearest_elevated(self, detection: dict, elevated: dict) -> dict | None:
        taken_us = to_micros(detection["acquisition_time"])
        near = [(abs(start - taken_us), start) for start in elevated if abs(start - taken_us) <= self._near_us]
        return elevated[min(near)[1]] if near else None

    def _forget_old(self, known: dict) -> None:
        times = [*known["elevated"], *(to_micros(d["acquisition_time"]) for d in known["positive"].values())]
        if not times:
            return
        horizon = max(times) - MEMORY_SECONDS * 1_000_000
        known["elevated"] = {s: r for s, r in known["elevated"].items() if s > horizon}
        known["positive"] = {u: d for u, d in known["positive"].items() if to_micros(d["acquisition_time"]) > horizon}
        known["alerted"] = {u: taken for u, taken in known["alerted"].items() if taken > horizon}

    def _alert(self, key: str, detection: dict, window: dict) -> dict:
        onset = detection["acquisition_time"]
        evidence = {
            "sop_instance_uid": detection["sop_instance_uid"], "covid_probability": detection["covid_probability"],
            "boxes": detection["box_count"], "news2_score": window["news2_score"], "news2_band": window["news2_band"],
            "news2_window_start": window["window_start"], "pane_timing": window["pane_timing"],
            "model": f"{detection['model_name']}@{detection['model_version']}",
        }
        return {
            "alert_id": f"triage:{key}:{detection['sop_instance_uid']}",
            "kind": "triage", "subject_type": "patient", "subject_id": key, "severity": "urgent",
            "onset_time": onset, "window_end": window["window_end"],
            "message": (f"COVID-like opacity on chest X-ray (p={detection['covid_probability']:.2f}, AI, not for "
                        f"clinical use) with NEWS2 {window['news2_score']} ({window['news2_band']}) "
                        f"at {window['window_start']:%H:%M}"),
            "evidence": json.dumps(evidence, default=str, sort_keys=True),  # as the other alert kinds
        }


class FlagDeviceQuality(beam.PTransform):
    """{"detections": rows without quality fields, "device_twin": rows} -> complete detections rows."""

    def __init__(self, config: TriageConfig):
        super().__init__()
        self._config = config

    def expand(self, inputs):
        detections = inputs["detections"] | "ByDevice" >> beam.Map(lambda d: (d["device_id"], (DETECTION, d)))
        windows = (inputs["device_twin"]
                   | "FinalDeviceRows" >> beam.Filter(lambda r: r["is_final"])
                   | "DeviceWindows" >> beam.Map(lambda r: (r["device_id"], (DEVICE_WINDOW, r))))
        return (
            (detections, windows)
            | "DetectionsAndDeviceWindows" >> beam.Flatten()
            | "Global" >> beam.WindowInto(GlobalWindows())
            | "FlagQuality" >> beam.ParDo(_FlagDeviceQualityFn(self._config))
        )


class TriageAlerts(beam.PTransform):
    """{"detections": rows, "patient_twin": rows} -> triage alert rows (schemas.ALERTS)."""

    def __init__(self, config: TriageConfig):
        super().__init__()
        self._config = config

    def expand(self, inputs):
        threshold = self._config.positive_probability
        positives = (inputs["detections"]
                     | "Positive" >> beam.Filter(lambda d: d["covid_probability"] >= threshold)
                     | "ByPatient" >> beam.Map(lambda d: (d["patient_key"], (DETECTION, _image_summary(d)))))
        elevated = (inputs["patient_twin"]
                    | "Elevated" >> beam.Filter(lambda r: r["news2_band"] in ELEVATED_BANDS)
                    | "PatientWindows" >> beam.Map(lambda r: (r["patient_key"], (PATIENT_WINDOW, _window_summary(r)))))
        return (
            (positives, elevated)
            | "ImagesAndNews2" >> beam.Flatten()
            | "Global" >> beam.WindowInto(GlobalWindows())
            | "Triage" >> beam.ParDo(_TriageFn(self._config))
        )
