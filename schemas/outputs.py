"""Output tables: what analysts query in BigQuery or, locally, in DuckDB over Parquet.

No table carries a direct patient identifier: patients appear only as
``patient_key``, a keyed hash (see `transforms.pseudonymise`). Names, birth
dates and addresses are never written anywhere.
"""

from schemas.contract import BOOL, FLOAT, INT, RECORD, STRING, TIMESTAMP, Field, RecordDef
from schemas.inputs import VITAL_NAMES

PANE_TIMINGS = ("EARLY", "ON_TIME", "LATE", "UNKNOWN")
NEWS2_BANDS = ("low", "low-medium", "medium", "high")

_WINDOW = (
    Field("window_start", TIMESTAMP, doc="Start of the event-time window (inclusive)."),
    Field("window_end", TIMESTAMP, doc="End of the event-time window (exclusive)."),
    Field("pane_index", INT, doc="0 for the first result of this window, +1 for each refinement."),
    Field("pane_timing", STRING, choices=PANE_TIMINGS, doc="EARLY (before the watermark), ON_TIME or LATE."),
    Field("is_final", BOOL, doc="No more panes will follow for this window (batch, or past allowed lateness)."),
)


def _vital_stats() -> tuple[Field, ...]:
    fields = []
    for vital in VITAL_NAMES:
        for stat in ("mean", "min", "max", "last"):
            fields.append(Field(f"{vital}_{stat}", FLOAT, nullable=True, doc=f"{stat} of {vital} in the window."))
    return tuple(fields)


def _learned(risk: str, doc: str) -> tuple[Field, ...]:
    """The learned early-warning columns (null unless the job applies features and a risk model)."""
    return (
        Field("features_version", STRING, nullable=True,
              doc="tf.Transform features artifact the row was featured with."),
        Field(risk, FLOAT, nullable=True, minimum=0, maximum=1, doc=doc),
        Field("risk_model_version", STRING, nullable=True, doc="Version of the risk model that scored the row."),
    )


PATIENT_TWIN = RecordDef(
    name="patient_twin",
    doc="A patient's vital signs and NEWS2 over one event-time window (one row per pane).",
    partition_field="window_start",
    cluster_fields=("patient_key",),
    fields=(
        Field("patient_key", STRING, min_length=1, doc="Keyed pseudonym of the patient id."),
        *_WINDOW,
        Field("sample_count", INT, doc="Distinct samples in the window."),
        Field("duplicates_removed", INT, doc="Samples dropped as duplicates (same wearable, same sample time)."),
        Field("completeness", FLOAT, minimum=0, maximum=1,
              doc="Samples received / samples expected at the nominal sampling rate."),
        *_vital_stats(),
        Field("steps_total", INT, nullable=True, doc="Steps in the window."),
        Field("sleep_stage_last", STRING, nullable=True, doc="Last reported sleep stage."),
        Field("consciousness", STRING, nullable=True, doc="Latest ACVPU observation at or before the window end."),
        Field("supplemental_oxygen", BOOL, nullable=True, doc="Latest oxygen observation at or before the window end."),
        Field("news2_score", INT, nullable=True, doc="NEWS2 aggregate over the parameters present."),
        Field("news2_band", STRING, nullable=True, choices=NEWS2_BANDS, doc="NEWS2 clinical risk band."),
        Field("news2_missing", STRING, repeated=True, doc="NEWS2 parameters absent from this window."),
        Field("baseline_heart_rate", FLOAT, nullable=True, doc="Patient's running baseline heart rate (EWMA)."),
        Field("baseline_temperature_c", FLOAT, nullable=True, doc="Patient's running baseline temperature."),
        Field("heart_rate_trend", FLOAT, nullable=True, doc="Heart rate change vs baseline, bpm."),
        Field("temperature_trend", FLOAT, nullable=True, doc="Temperature change vs baseline, °C."),
        Field("gap_before_seconds", FLOAT, nullable=True,
              doc="Seconds from the patient's previous sample to this window's first (null: none before)."),
        Field("stale", BOOL, doc="No sample arrived for longer than the stale threshold before this window."),
        *_learned("deterioration_risk", "Learned probability that the patient's deterioration starts within the "
                  "model's horizon or has started (model/risk.py; simulator-trained, not clinical evidence)."),
    ),
)

ERROR_COUNT = (
    Field("code", STRING, doc="Vendor error code."),
    Field("severity", STRING, doc="Severity."),
    Field("count", INT, doc="Occurrences in the window."),
)

DEVICE_TWIN = RecordDef(
    name="device_twin",
    doc="An imaging device's health over one event-time window (one row per pane).",
    partition_field="window_start",
    cluster_fields=("device_id",),
    fields=(
        Field("device_id", STRING, min_length=1, doc="Imaging device id."),
        Field("device_model", STRING, nullable=True, doc="Vendor model."),
        *_WINDOW,
        Field("event_count", INT, doc="Distinct log events in the window."),
        Field("duplicates_removed", INT,
              doc="Events dropped as repeats of an event_id already in the window (at-least-once delivery)."),
        Field("status", STRING, nullable=True, doc="Last reported status."),
        Field("uptime_fraction", FLOAT, minimum=0, maximum=1, doc="Share of the window with heartbeats and not offline."),
        Field("heartbeat_count", INT, doc="Heartbeats received."),
        Field("max_heartbeat_gap_s", FLOAT, nullable=True, doc="Longest gap between heartbeats (incl. window edges), s."),
        Field("missed_heartbeats", INT, doc="Expected heartbeats that did not arrive."),
        Field("error_count", INT, doc="Error events."),
        Field("error_counts", RECORD, repeated=True, fields=ERROR_COUNT, record_name="ErrorCount",
              doc="Errors by code and severity."),
        Field("exposure_count", INT, doc="Exposures taken."),
        Field("tube_temperature_mean", FLOAT, nullable=True, doc="Mean tube temperature, °C."),
        Field("tube_temperature_max", FLOAT, nullable=True, doc="Max tube temperature, °C."),
        Field("firmware_version", STRING, nullable=True,
              doc="Firmware version last reported before the window end (in this window, else an earlier one)."),
        Field("config_version", STRING, nullable=True,
              doc="Configuration version last reported before the window end (in this window, else an earlier one)."),
        Field("config_changed_at", TIMESTAMP, nullable=True,
              doc="Latest firmware or configuration change at or before the window end: a config_change event, "
                  "or a reported version differing from the one known before; None until one is seen."),
        Field("last_maintenance", TIMESTAMP, nullable=True, doc="Most recent maintenance known at window end."),
        Field("days_since_maintenance", FLOAT, nullable=True, doc="Days from last maintenance to window end."),
        Field("maintenance_due", BOOL, doc="Service interval exceeded."),
        Field("failure_risk", FLOAT, minimum=0, maximum=1, doc="Failure-risk score."),
        Field("failure_risk_reasons", STRING, repeated=True, doc="Why the score is what it is."),
        *_learned("failure_risk_model", "Learned probability that the device fails within the model's horizon "
                  "(model/risk.py; simulator-trained)."),
    ),
)

BOX = (
    Field("x1", FLOAT, doc="Left, in original image pixels."),
    Field("y1", FLOAT, doc="Top, in original image pixels."),
    Field("x2", FLOAT, doc="Right (exclusive), in original image pixels."),
    Field("y2", FLOAT, doc="Bottom (exclusive), in original image pixels."),
    Field("score", FLOAT, minimum=0, maximum=1, doc="Detection confidence."),
    Field("label", STRING, doc="Finding label, e.g. 'opacity'."),
)

DETECTIONS = RecordDef(
    name="detections",
    doc="AI findings on one chest X-ray (not for clinical use).",
    partition_field="acquisition_time",
    cluster_fields=("patient_key", "device_id"),
    fields=(
        Field("sop_instance_uid", STRING, min_length=1, doc="(0008,0018) kept for linkage back to the PACS."),
        Field("study_instance_uid", STRING, min_length=1, doc="(0020,000D)"),
        Field("series_instance_uid", STRING, min_length=1, doc="(0020,000E)"),
        Field("patient_key", STRING, min_length=1, doc="Keyed pseudonym of the patient id."),
        Field("device_id", STRING, min_length=1, doc="Acquiring device."),
        Field("acquisition_time", TIMESTAMP, doc="Acquisition time."),
        Field("model_name", STRING, doc="Detector architecture and config."),
        Field("model_version", STRING, doc="Weights version (hash)."),
        Field("boxes", RECORD, repeated=True, fields=BOX, record_name="Box", doc="Detected opacities."),
        Field("covid_probability", FLOAT, minimum=0, maximum=1, doc="Image-level probability of COVID-like opacity."),
        Field("image_rows", INT, doc="Original image rows."),
        Field("image_columns", INT, doc="Original image columns."),
        Field("inference_latency_ms", FLOAT, doc="Model time for the batch, ms."),
        Field("batch_size", INT, doc="Images in the inference batch."),
        Field("quality_flag", BOOL, doc="The acquiring device was degraded at acquisition time."),
        Field("quality_reasons", STRING, repeated=True, doc="Why the quality flag is set."),
        Field("sr_sop_instance_uid", STRING, nullable=True,
              doc="SOP Instance UID of the DICOM SR (TID 1500) holding these findings, in the output's "
                  "structured_reports/ folder and stored to the PACS; null when reports are off."),
    ),
)

RESCORE_CHANGES = ("became_positive", "became_negative", "boxes_added", "boxes_removed", "boxes_moved")

RESCORED = RecordDef(
    name="rescored",
    doc="A recent study whose AI findings changed when a new detector checkpoint was swapped into the "
        "running stream (one row per study and swap; not for clinical use).",
    partition_field="acquisition_time",
    cluster_fields=("patient_key", "model_version"),
    fields=(
        Field("sop_instance_uid", STRING, min_length=1, doc="(0008,0018) of the re-scored image."),
        Field("study_instance_uid", STRING, min_length=1, doc="(0020,000D)"),
        Field("series_instance_uid", STRING, min_length=1, doc="(0020,000E)"),
        Field("patient_key", STRING, min_length=1, doc="Keyed pseudonym of the patient id."),
        Field("device_id", STRING, min_length=1, doc="Acquiring device."),
        Field("acquisition_time", TIMESTAMP, doc="Acquisition time."),
        Field("model_name", STRING, doc="Detector architecture and config of the new checkpoint."),
        Field("previous_model_version", STRING, doc="Weights version that scored the study before the swap."),
        Field("model_version", STRING, doc="Weights version swapped in, which re-scored it."),
        Field("previous_covid_probability", FLOAT, minimum=0, maximum=1,
              doc="Image-level probability under the previous model."),
        Field("covid_probability", FLOAT, minimum=0, maximum=1, doc="Image-level probability under the new model."),
        Field("previous_positive", BOOL, doc="Positive for triage under the previous model (probability at or "
                                             "above --positive_probability)."),
        Field("positive", BOOL, doc="Positive for triage under the new model."),
        Field("changes", STRING, repeated=True, choices=RESCORE_CHANGES,
              doc="What changed: the triage decision (became_positive / became_negative) and the boxes."),
        Field("boxes_added", INT, minimum=0, doc="New boxes matching no previous box (IoU < 0.5)."),
        Field("boxes_removed", INT, minimum=0, doc="Previous boxes matching no new box."),
        Field("boxes_moved", INT, minimum=0, doc="Matched boxes whose IoU with their previous box is below 0.9."),
        Field("previous_boxes", RECORD, repeated=True, fields=BOX, record_name="PreviousBox",
              doc="Opacities under the previous model."),
        Field("boxes", RECORD, repeated=True, fields=BOX, record_name="Box", doc="Opacities under the new model."),
    ),
)

ALERT_KINDS = ("news2_band", "device_failure_risk", "maintenance_overdue", "sensor_stale", "triage",
               "deterioration_risk", "device_failure_model", "wearable_conflict")
ALERT_SEVERITIES = ("info", "warning", "urgent")

ALERTS = RecordDef(
    name="alerts",
    doc="One alert per onset of a condition (not one per pane), with its evidence.",
    partition_field="onset_time",
    cluster_fields=("kind", "subject_id"),
    fields=(
        Field("alert_id", STRING, min_length=1, doc="Deterministic id: kind, subject and onset."),
        Field("kind", STRING, choices=ALERT_KINDS, doc="What condition started."),
        Field("subject_type", STRING, choices=("patient", "device"), doc="Whom it concerns."),
        Field("subject_id", STRING, min_length=1,
              doc="patient_key or device_id; for wearable_conflict, the wearable's keyed pseudonym."),
        Field("severity", STRING, choices=ALERT_SEVERITIES, doc="How urgent."),
        Field("onset_time", TIMESTAMP, doc="Event time the condition started (window start)."),
        Field("window_end", TIMESTAMP, nullable=True, doc="End of the window that raised it."),
        Field("message", STRING, doc="Human-readable summary."),
        Field("evidence", STRING, doc="JSON object with the values that raised it."),
    ),
)

DEAD_LETTERS = RecordDef(
    name="dead_letters",
    doc="Every input the pipeline could not use, with where and why. Nothing is dropped silently.",
    partition_field="recorded_at",
    cluster_fields=("stage",),
    fields=(
        Field("stage", STRING, min_length=1, doc="Pipeline stage that rejected it, e.g. decode_wearables."),
        Field("reason", STRING, min_length=1, doc="Why, naming the field where there is one."),
        Field("source", STRING, nullable=True, doc="Stream or file it came from."),
        Field("payload", STRING, doc="The input, pseudonymised and truncated."),
        Field("record_count", INT, minimum=1, doc="Input records this dead letter stands for (e.g. samples in a chunk)."),
        Field("event_time", TIMESTAMP, nullable=True, doc="Event time of the input, when known."),
        Field("recorded_at", TIMESTAMP, doc="Event time the dead letter was recorded under."),
    ),
)

OUTPUT_TABLES = {
    "patient_twin": PATIENT_TWIN,
    "device_twin": DEVICE_TWIN,
    "detections": DETECTIONS,
    "alerts": ALERTS,
    "rescored": RESCORED,
    "dead_letters": DEAD_LETTERS,
}
# Written only by a streaming job that swaps models (--model_watch): every other job leaves them empty.
SWAP_TABLES = ("rescored",)
