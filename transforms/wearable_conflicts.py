"""One wearable under two patients at once: its samples in one window arrive with more than one patient id.

A duplicate sample is the same wearable at the same sample time *for the same patient* (an upload
retried): it is counted once (`transforms.vital_stats`). The same wearable's samples under two
patient ids are not a retry but a conflict in the wearable-to-patient association (a device moved
to another bed without being re-paired, a mislabelled upload). A pipeline cannot know which
association is right, so both patients' twins keep the samples they were sent (records in = out +
dead letters still holds per patient), and each such wearable and window raises one
``wearable_conflict`` alert for the people who own the association to resolve.

The wearable is named by a keyed pseudonym (a wearable's serial number is a device identifier, one
of HIPAA's eighteen); the patients by their patient keys.
"""

from __future__ import annotations

import json

import apache_beam as beam
from apache_beam.transforms import trigger, window

from transforms.panes import as_datetime
from transforms.pseudonymise import Pseudonymiser
from transforms.windowing import WindowPolicy

KIND = "wearable_conflict"
_WEARABLE_CONTEXT = "wearable\x1f"  # a wearable's pseudonym never equals a patient's for the same string


class _ConflictAlertFn(beam.DoFn):
    """(wearable serial, [patient_key, ...]) in one event-time window -> a ``wearable_conflict`` alert
    when the window holds more than one patient key; nothing otherwise."""

    def __init__(self, pseudonymiser: Pseudonymiser, window_seconds: int):
        self._pseudonymiser = pseudonymiser
        self._window_seconds = window_seconds

    def setup(self):
        self._pseudonymiser.load()

    def process(self, grouped, window=beam.DoFn.WindowParam):
        serial, patient_keys = grouped
        patients = sorted(set(patient_keys))
        if len(patients) < 2:
            return
        wearable = self._pseudonymiser.patient_key(_WEARABLE_CONTEXT + serial)
        onset = as_datetime(window.start.micros)
        yield {
            "alert_id": f"{KIND}:{wearable}:{onset.isoformat()}",
            "kind": KIND, "subject_type": "device", "subject_id": wearable, "severity": "warning",
            "onset_time": onset, "window_end": as_datetime(window.end.micros),
            "message": f"one wearable's samples arrived under {len(patients)} patients in one window: "
                       "check the wearable's patient association",
            "evidence": json.dumps({"patient_keys": patients, "window_seconds": self._window_seconds}),
        }


class FlagWearableConflicts(beam.PTransform):
    """(patient_key, SampleChunk) timestamped at the chunk's first sample -> ``wearable_conflict`` alerts,
    in the global window as every other alert.

    Windows are the patient twin's (`policy`): fixed, of ``window_seconds``. In streaming the windows
    accept data up to the policy's allowed lateness and fire again, accumulating, for late data, so a
    second patient arriving late still raises the alert; a repeat of an alert has the same ``alert_id``
    and the sinks keep it once.
    """

    def __init__(self, policy: WindowPolicy, pseudonymiser: Pseudonymiser):
        super().__init__()
        self._policy = policy
        self._pseudonymiser = pseudonymiser

    def expand(self, chunks):
        policy = self._policy
        windowing = dict(allowed_lateness=policy.allowed_lateness_seconds,
                         trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
                         accumulation_mode=trigger.AccumulationMode.ACCUMULATING) if policy.streaming else {}
        return (
            chunks
            | "WearableAndPatient" >> beam.MapTuple(lambda patient_key, chunk: (chunk.device_id, patient_key))
            .with_output_types(tuple[str, str])
            | "TwinWindows" >> beam.WindowInto(window.FixedWindows(policy.window_seconds), **windowing)
            | "PatientsPerWearable" >> beam.GroupByKey()
            | "ConflictAlerts" >> beam.ParDo(_ConflictAlertFn(self._pseudonymiser, policy.window_seconds))
            | "AsTheOtherAlerts" >> beam.WindowInto(window.GlobalWindows())  # they join the other alerts
        )
