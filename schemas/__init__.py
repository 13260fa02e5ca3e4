"""The one contract for every record medtwin reads or writes.

Inputs (`schemas.inputs`) and output tables (`schemas.outputs`) are declared
once; Avro, pyarrow and BigQuery schemas and the validator are derived from
those declarations by `schemas.contract`.
"""

from schemas.contract import (
    Field,
    RecordDef,
    SchemaError,
    arrow_schema,
    avro_schema,
    bigquery_schema,
    bigquery_table_options,
    from_json,
    to_json,
    validate,
)
from schemas.inputs import (
    CLINICAL_OBSERVATION,
    DEVICE_LOG_EVENT,
    DICOM_REFERENCE,
    INPUT_STREAMS,
    WEARABLE_UPLOAD,
)
from schemas.outputs import ALERTS, DEAD_LETTERS, DETECTIONS, DEVICE_TWIN, OUTPUT_TABLES, PATIENT_TWIN, RESCORED, SWAP_TABLES

__all__ = [
    "Field", "RecordDef", "SchemaError", "arrow_schema", "avro_schema", "bigquery_schema",
    "bigquery_table_options", "from_json", "to_json", "validate",
    "CLINICAL_OBSERVATION", "DEVICE_LOG_EVENT", "DICOM_REFERENCE", "INPUT_STREAMS", "WEARABLE_UPLOAD",
    "ALERTS", "DEAD_LETTERS", "DETECTIONS", "DEVICE_TWIN", "OUTPUT_TABLES", "PATIENT_TWIN", "RESCORED", "SWAP_TABLES",
]
