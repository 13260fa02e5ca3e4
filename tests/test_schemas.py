"""The contract: Avro, Arrow and BigQuery forms agree, and bad records are named."""

import datetime as dt
import io

import fastavro
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    DEVICE_LOG_EVENT,
    INPUT_STREAMS,
    OUTPUT_TABLES,
    WEARABLE_UPLOAD,
    SchemaError,
    arrow_schema,
    avro_schema,
    bigquery_schema,
    bigquery_table_options,
    from_json,
    to_json,
    validate,
)
from schemas.contract import BOOL, FLOAT, INT, RECORD, STRING, TIMESTAMP

ALL_RECORDS = {**INPUT_STREAMS, **OUTPUT_TABLES}

# Normalised column form: (name, type, nullable, repeated, nested columns).
AVRO_TYPES = {"string": STRING, "long": INT, "double": FLOAT, "boolean": BOOL}
BQ_TYPES = {"STRING": STRING, "INT64": INT, "FLOAT64": FLOAT, "BOOL": BOOL, "TIMESTAMP": TIMESTAMP, "RECORD": RECORD}


def _from_definition(fields):
    return [(f.name, f.type, f.nullable, f.repeated, _from_definition(f.fields)) for f in fields]


def _avro_item(t):
    if isinstance(t, dict) and t.get("type") == "record":
        return RECORD, _from_avro(t["fields"])
    if isinstance(t, dict) and t.get("logicalType") == "timestamp-micros":
        assert t["type"] == "long"
        return TIMESTAMP, []
    return AVRO_TYPES[t], []


def _from_avro(fields):
    out = []
    for f in fields:
        t, nullable, repeated = f["type"], False, False
        if isinstance(t, list):
            assert t[0] == "null" and len(t) == 2, f
            t, nullable = t[1], True
        if isinstance(t, dict) and t.get("type") == "array":
            t, repeated = t["items"], True
        kind, nested = _avro_item(t)
        out.append((f["name"], kind, nullable, repeated, nested))
    return out


def _arrow_item(t):
    if pa.types.is_struct(t):
        return RECORD, _from_arrow(list(t))
    if pa.types.is_timestamp(t):
        assert t.unit == "us" and t.tz == "UTC"
        return TIMESTAMP, []
    return {pa.string(): STRING, pa.int64(): INT, pa.float64(): FLOAT, pa.bool_(): BOOL}[t], []


def _from_arrow(fields):
    out = []
    for f in fields:
        t, repeated = f.type, False
        if pa.types.is_list(t):
            t, repeated = t.value_type, True
        kind, nested = _arrow_item(t)
        out.append((f.name, kind, f.nullable, repeated, nested))
    return out


def _from_bigquery(fields):
    return [
        (f.name, BQ_TYPES[f.field_type], f.mode == "NULLABLE", f.mode == "REPEATED", _from_bigquery(f.fields))
        for f in fields
    ]


@pytest.mark.parametrize("name", sorted(ALL_RECORDS))
def test_derived_schemas_agree_with_the_definition(name):
    record = ALL_RECORDS[name]
    expected = _from_definition(record.fields)
    assert _from_avro(avro_schema(record)["fields"]) == expected
    assert _from_arrow(arrow_schema(record)) == expected
    assert _from_bigquery(bigquery_schema(record)) == expected
    fastavro.parse_schema(avro_schema(record))  # Avro accepts it


@pytest.mark.parametrize("name", sorted(OUTPUT_TABLES))
def test_output_tables_are_partitioned_and_clustered_by_real_columns(name):
    table = OUTPUT_TABLES[name]
    options = bigquery_table_options(table)
    partition = options["timePartitioning"]["field"]
    assert table.field(partition).type == TIMESTAMP
    for column in options["clustering"]["fields"]:
        table.field(column)  # raises KeyError if absent


def test_no_output_table_has_a_direct_identifier():
    phi_words = ("patient_id", "patient_name", "birth", "address")
    for table in OUTPUT_TABLES.values():
        for column in table.names:
            assert not any(word in column for word in phi_words), (table.name, column)


T0 = dt.datetime(2026, 3, 2, 6, 0, tzinfo=dt.timezone.utc)


def _upload(**overrides):
    upload = {
        "upload_id": "u-1", "device_id": "W-1", "patient_id": "MRN-000001", "upload_time": T0,
        "samples": [{"event_time": T0, "heart_rate": 72.0, "spo2": 97.0}],
    }
    upload.update(overrides)
    return upload


def test_a_valid_upload_passes_both_validators():
    upload = _upload()
    validate(WEARABLE_UPLOAD, upload)
    assert fastavro.validation.validate(upload, fastavro.parse_schema(avro_schema(WEARABLE_UPLOAD)))


@pytest.mark.parametrize(
    "record, path, message",
    [
        (_upload(patient_id=""), "WearableUpload.patient_id", "must not be empty"),
        (_upload(device_id=None), "WearableUpload.device_id", "required"),
        (_upload(upload_time="yesterday"), "WearableUpload.upload_time", "timezone-aware datetime"),
        (_upload(samples=[{"event_time": T0, "spo2": 140.0}]), "WearableUpload.samples[0].spo2", "above the maximum"),
        (_upload(samples=[{"event_time": T0, "heart_rate": "fast"}]), "WearableUpload.samples[0].heart_rate",
         "expected a number"),
        (_upload(samples=[{"event_time": T0, "steps": 1.5}]), "WearableUpload.samples[0].steps", "expected an integer"),
        (_upload(samples=[{"event_time": T0, "sleep_stage": "coma"}]), "WearableUpload.samples[0].sleep_stage",
         "not one of"),
        (_upload(samples=[{"event_time": T0, "heart_rate": float("nan")}]), "WearableUpload.samples[0].heart_rate",
         "not a finite number"),
        (_upload(samples=[{"heart_rate": 60.0}]), "WearableUpload.samples[0].event_time", "required"),
        (_upload(samples={"event_time": T0}), "WearableUpload.samples", "expected a list"),
        (_upload(colour="red"), "WearableUpload", "1 field the schema does not declare (names withheld)"),
    ],
)
def test_a_record_that_does_not_fit_is_rejected_naming_the_field(record, path, message):
    with pytest.raises(SchemaError) as error:
        validate(WEARABLE_UPLOAD, record)
    assert error.value.path == path
    assert message in str(error.value)


def test_booleans_are_not_numbers():
    with pytest.raises(SchemaError, match="heart_rate"):
        validate(WEARABLE_UPLOAD, _upload(samples=[{"event_time": T0, "heart_rate": True}]))


def test_json_round_trip():
    upload = _upload()
    as_json = to_json(WEARABLE_UPLOAD, upload)
    assert as_json["upload_time"] == "2026-03-02T06:00:00.000000Z"
    back = from_json(WEARABLE_UPLOAD, as_json)
    assert back["upload_time"] == T0
    assert back["samples"][0]["heart_rate"] == 72.0
    assert back["samples"][0]["spo2"] == 97.0


def test_from_json_reads_integral_readings_as_floats_and_rejects_bad_timestamps():
    raw = to_json(WEARABLE_UPLOAD, _upload())
    raw["samples"][0]["heart_rate"] = 72
    assert isinstance(from_json(WEARABLE_UPLOAD, raw)["samples"][0]["heart_rate"], float)
    raw["upload_time"] = "not-a-time"
    with pytest.raises(SchemaError, match="WearableUpload.upload_time"):
        from_json(WEARABLE_UPLOAD, raw)


_readings = st.one_of(st.none(), st.floats(min_value=20, max_value=250))
_samples = st.lists(
    st.fixed_dictionaries({
        "event_time": st.datetimes(min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2030, 1, 1),
                                   timezones=st.just(dt.timezone.utc)),
        "heart_rate": _readings,
        "steps": st.one_of(st.none(), st.integers(0, 1000)),
        "sleep_stage": st.one_of(st.none(), st.sampled_from(["awake", "light", "deep", "rem"])),
    }),
    max_size=5,
)


@settings(max_examples=40, deadline=None)
@given(samples=_samples, patient=st.text(min_size=1, max_size=12))
def test_valid_uploads_survive_an_avro_round_trip(samples, patient):
    upload = _upload(samples=samples, patient_id=patient)
    validate(WEARABLE_UPLOAD, upload)
    schema = fastavro.parse_schema(avro_schema(WEARABLE_UPLOAD))
    buffer = io.BytesIO()
    fastavro.writer(buffer, schema, [upload])
    buffer.seek(0)
    (back,) = list(fastavro.reader(buffer))
    validate(WEARABLE_UPLOAD, back)
    assert [s["event_time"] for s in back["samples"]] == [s["event_time"] for s in samples]
    assert [s["heart_rate"] for s in back["samples"]] == [s["heart_rate"] for s in samples]


def test_device_events_reject_unknown_kinds():
    event = {
        "event_id": "e1", "device_id": "XR-1", "device_model": "DRX", "event_time": T0,
        "kind": "explosion", "severity": "info",
    }
    with pytest.raises(SchemaError, match=r"DeviceLogEvent.kind: is not one of heartbeat, .* \(value withheld\)"):
        validate(DEVICE_LOG_EVENT, event)


def test_the_data_model_document_is_current():
    import pathlib

    from schemas.docs import render_markdown

    document = pathlib.Path(__file__).parent.parent / "docs" / "DATA_MODEL.md"
    assert document.read_text() == render_markdown(), "run: python -m schemas.docs > docs/DATA_MODEL.md"
