"""Input streams: what arrives from wearables, imaging devices and the PACS.

Ranges are physiological or physical plausibility limits, not clinical
thresholds: a reading outside them is a sensor or transport fault and goes to
the dead-letter table, never into a twin.
"""

from schemas.contract import BOOL, FLOAT, INT, RECORD, STRING, TIMESTAMP, Field, RecordDef

SLEEP_STAGES = ("awake", "light", "deep", "rem")

VITAL_SAMPLE = (
    Field("event_time", TIMESTAMP, doc="When the sensor took the sample (event time)."),
    Field("heart_rate", FLOAT, nullable=True, minimum=20, maximum=250, doc="Heart rate, beats per minute."),
    Field("spo2", FLOAT, nullable=True, minimum=50, maximum=100, doc="Peripheral oxygen saturation, percent."),
    Field("systolic_bp", FLOAT, nullable=True, minimum=40, maximum=260, doc="Systolic blood pressure, mmHg."),
    Field("diastolic_bp", FLOAT, nullable=True, minimum=20, maximum=160, doc="Diastolic blood pressure, mmHg."),
    Field("temperature_c", FLOAT, nullable=True, minimum=30, maximum=43, doc="Skin-corrected body temperature, °C."),
    Field("respiratory_rate", FLOAT, nullable=True, minimum=3, maximum=60, doc="Breaths per minute."),
    Field("steps", INT, nullable=True, minimum=0, maximum=1000, doc="Steps since the previous sample."),
    Field("sleep_stage", STRING, nullable=True, choices=SLEEP_STAGES, doc="Sleep stage from the wearable."),
)

VITAL_NAMES = ("heart_rate", "spo2", "systolic_bp", "diastolic_bp", "temperature_c", "respiratory_rate")

WEARABLE_UPLOAD = RecordDef(
    name="WearableUpload",
    doc="One batched upload from a patient's wearable: many samples, sent when the phone syncs.",
    fields=(
        Field("upload_id", STRING, min_length=1, doc="Unique per upload attempt; retries reuse it."),
        Field("device_id", STRING, min_length=1, doc="Wearable serial number."),
        Field("patient_id", STRING, min_length=1, identifying=True,
              doc="Hospital patient identifier (PHI: pseudonymised on entry)."),
        Field("upload_time", TIMESTAMP, doc="When the upload reached the hospital (processing time)."),
        Field("samples", RECORD, repeated=True, fields=VITAL_SAMPLE, record_name="VitalSample",
              doc="The samples in this upload, in any order."),
    ),
)

DEVICE_EVENT_KINDS = ("heartbeat", "status", "config_change", "error", "maintenance", "exposure")
SEVERITIES = ("info", "warning", "error", "critical")
DEVICE_STATUSES = ("online", "idle", "busy", "degraded", "offline", "service")

DEVICE_LOG_EVENT = RecordDef(
    name="DeviceLogEvent",
    doc="One log event from an imaging device (X-ray, CT) or its gateway.",
    fields=(
        Field("event_id", STRING, min_length=1, doc="Unique id of the event."),
        Field("device_id", STRING, min_length=1, doc="Imaging device (modality) id."),
        Field("device_model", STRING, min_length=1, doc="Vendor model name."),
        Field("event_time", TIMESTAMP, doc="When the device logged the event (event time)."),
        Field("kind", STRING, choices=DEVICE_EVENT_KINDS, doc="What the event is."),
        Field("severity", STRING, choices=SEVERITIES, doc="Log severity."),
        Field("code", STRING, nullable=True, doc="Vendor error or status code."),
        Field("message", STRING, nullable=True, doc="Free-text log message (never PHI)."),
        Field("status", STRING, nullable=True, choices=DEVICE_STATUSES, doc="Reported state, on status events."),
        Field("tube_temperature_c", FLOAT, nullable=True, minimum=-20, maximum=200,
              doc="X-ray tube housing temperature, °C."),
        Field("exposure_count", INT, nullable=True, minimum=0, doc="Exposures in this event (exposure events)."),
        Field("firmware_version", STRING, nullable=True, doc="Firmware version reported by the device."),
        Field("config_version", STRING, nullable=True, doc="Configuration version reported by the device."),
        Field("last_maintenance_time", TIMESTAMP, nullable=True,
              doc="When the device's last preventive maintenance was completed, as the device reports it."),
    ),
)

# DICOM PS3.3 C.7.3.1.1.1 Modality: the defined terms, the retired ones still met in archives, and DR
# (a vendor spelling of DX). Anything else is refused as not understood, never quoted.
MODALITIES = (
    "ANN", "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CFM", "CR", "CT", "CTPROTOCOL", "DG", "DMS", "DOC", "DX",
    "ECG", "EEG", "EMG", "EOG", "EPS", "ES", "FID", "GM", "HC", "HD", "IO", "IOL", "IVOCT", "IVUS", "KER", "KO",
    "LEN", "LS", "M3D", "MG", "MR", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPTBSV", "OPTENF", "OPV", "OSS",
    "OT", "PA", "PLAN", "POS", "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE", "RTIMAGE", "RTINTENT",
    "RTPLAN", "RTRAD", "RTRECORD", "RTSEGANN", "RTSTRUCT", "RWV", "SEG", "SM", "SMR", "SR", "SRF", "STAIN",
    "TEXTUREMAP", "TG", "US", "VA", "XA", "XAPROTOCOL", "XC",
    "CD", "CF", "CP", "CS", "DD", "DF", "DM", "DS", "EC", "FA", "FS", "LP", "MA", "MS", "OPR", "ST", "VF",
    "DR",
)

DICOM_REFERENCE = RecordDef(
    name="DicomReference",
    doc="A pointer to a newly stored image, with the metadata the PACS router knows.",
    fields=(
        Field("uri", STRING, min_length=1, free_text=True,
              doc="Where the DICOM Part 10 file is (local path, gs://...)."),
        Field("study_instance_uid", STRING, min_length=1, doc="(0020,000D)"),
        Field("series_instance_uid", STRING, min_length=1, doc="(0020,000E)"),
        Field("sop_instance_uid", STRING, min_length=1, doc="(0008,0018)"),
        Field("patient_id", STRING, min_length=1, identifying=True,
              doc="(0010,0020) Patient ID (PHI: pseudonymised on entry)."),
        Field("device_id", STRING, min_length=1, doc="The imaging device that acquired it."),
        Field("modality", STRING, min_length=1, choices=MODALITIES,
              doc="(0008,0060) a DICOM defined term, e.g. CR, DX."),
        Field("acquisition_time", TIMESTAMP, doc="Acquisition date/time (event time)."),
    ),
)

CONSCIOUSNESS_LEVELS = ("alert", "new_confusion", "voice", "pain", "unresponsive")

CLINICAL_OBSERVATION = RecordDef(
    name="ClinicalObservation",
    doc="A nurse's bedside observation: the NEWS2 parameters a wearable cannot measure.",
    fields=(
        Field("observation_id", STRING, min_length=1, doc="Unique id of the observation."),
        Field("patient_id", STRING, min_length=1, identifying=True,
              doc="Hospital patient identifier (PHI: pseudonymised on entry)."),
        Field("event_time", TIMESTAMP, doc="When the observation was made."),
        Field("consciousness", STRING, nullable=True, choices=CONSCIOUSNESS_LEVELS, doc="ACVPU level."),
        Field("supplemental_oxygen", BOOL, nullable=True, doc="Patient is on supplemental oxygen."),
    ),
)

INPUT_STREAMS = {
    "wearables": WEARABLE_UPLOAD,
    "device_logs": DEVICE_LOG_EVENT,
    "dicom_refs": DICOM_REFERENCE,
    "observations": CLINICAL_OBSERVATION,
}
