"""The contract machinery: one definition per record, every other form derived.

A record is declared once as a `RecordDef` (a list of `Field`s). From that
single declaration this module derives

* the Avro schema (`avro_schema`), used with fastavro for the input streams;
* the pyarrow schema (`arrow_schema`), used for Parquet;
* the BigQuery schema (`bigquery_schema`), a list of `SchemaField`s;
* a validator (`validate`) that checks an in-memory record and raises
  `SchemaError` naming the offending field path, e.g.
  ``WearableUpload.samples[3].spo2: 140.0 is above the maximum 100``.

In memory a record is a plain ``dict``; timestamps are timezone-aware
``datetime`` objects in UTC (what fastavro returns for ``timestamp-micros``).
JSON carries them as ISO-8601 strings or as numeric epoch seconds; `from_json`
converts.

Every parse is bounded: a timestamp is accepted only from `EARLIEST_TIMESTAMP`
(1900-01-01T00:00:00Z, inclusive) to `LATEST_TIMESTAMP` (2200-01-01T00:00:00Z,
exclusive), whatever its spelling; anything else is a `SchemaError`, never an
`OverflowError` (``fromtimestamp(1e20)``) nor a date at Python's limits that a
later window computation cannot represent. Error messages quote a value only when
it is a short scalar of a declared, non-identifying, non-enumerated field
(`_shown`), so they never build the repr of a nested object.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from typing import Any, Mapping, Sequence

import pyarrow as pa

STRING = "string"
INT = "int"
FLOAT = "float"
BOOL = "bool"
TIMESTAMP = "timestamp"
RECORD = "record"

_SCALAR_TYPES = (STRING, INT, FLOAT, BOOL, TIMESTAMP)

EARLIEST_TIMESTAMP = dt.datetime(1900, 1, 1, tzinfo=dt.timezone.utc)
LATEST_TIMESTAMP = dt.datetime(2200, 1, 1, tzinfo=dt.timezone.utc)  # exclusive
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
EARLIEST_EPOCH_SECONDS = (EARLIEST_TIMESTAMP - _EPOCH).total_seconds()  # -2208988800
LATEST_EPOCH_SECONDS = (LATEST_TIMESTAMP - _EPOCH).total_seconds()  # 7258118400 (exclusive)
_MAX_TIMESTAMP_CHARS = 64  # an ISO-8601 timestamp with nanoseconds and an offset is 35
_QUOTED_CHARS = 40
_RANGE_TEXT = "outside the accepted range 1900-01-01T00:00:00Z to 2200-01-01T00:00:00Z"


class SchemaError(ValueError):
    """A record does not fit its contract; `path` names the field."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a record.

    Attributes:
      name: column / attribute name.
      type: one of STRING, INT, FLOAT, BOOL, TIMESTAMP, RECORD.
      nullable: the value may be None (Avro union with null, BigQuery NULLABLE).
      repeated: the value is a list of `type` (Avro array, BigQuery REPEATED).
        A repeated field is never null; an absent list is written as [].
      fields: the nested fields when `type` is RECORD.
      record_name: the Avro name of the nested record.
      doc: what the field means, with its unit.
      minimum, maximum: plausible range for numbers; out of range is invalid.
      choices: allowed values for an enumerated string.
      min_length: shortest allowed string (1 for identifiers: never empty).
      identifying: the value identifies a patient (PHI). It is pseudonymised on entry, and a
        validation error names the field and what is wrong with it but never repeats the value
        (errors become dead-letter reasons, which analysts read).
      free_text: the value is needed as it is (a uri), but an integration may put identifying
        text in it (``/pacs/DOE_JANE_MRN0099001/1.dcm``): never quoted in a reason, and a dead
        letter keeps only its keyed digest (as an identifying field's pseudonym).
    """

    name: str
    type: str
    nullable: bool = False
    repeated: bool = False
    fields: tuple["Field", ...] = ()
    record_name: str | None = None
    doc: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    min_length: int = 0
    identifying: bool = False
    free_text: bool = False

    def __post_init__(self):
        assert self.type in _SCALAR_TYPES + (RECORD,), f"unknown type {self.type!r}"
        assert (self.type == RECORD) == bool(self.fields), f"{self.name}: RECORD needs fields"
        assert not (self.repeated and self.nullable), f"{self.name}: repeated fields are never null"


@dataclasses.dataclass(frozen=True)
class RecordDef:
    """A named record: an input message or an output table row.

    Attributes:
      name: the Avro record name and the table name's source.
      fields: the columns, in order.
      doc: what one record is.
      partition_field: TIMESTAMP column a table is partitioned by (by day),
        in BigQuery and as the Hive ``date=`` partition in Parquet.
      cluster_fields: BigQuery clustering columns.
    """

    name: str
    fields: tuple[Field, ...]
    doc: str = ""
    partition_field: str | None = None
    cluster_fields: tuple[str, ...] = ()
    namespace: str = "medtwin"

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name!r}")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]


# ---------------------------------------------------------------- Avro


def _avro_type(f: Field, namespace: str) -> Any:
    if f.type == RECORD:
        item = {
            "type": "record",
            "name": f.record_name or f.name.title().replace("_", ""),
            "namespace": namespace,
            "fields": [_avro_field(sub, namespace) for sub in f.fields],
        }
    elif f.type == TIMESTAMP:
        item = {"type": "long", "logicalType": "timestamp-micros"}
    else:
        item = {STRING: "string", INT: "long", FLOAT: "double", BOOL: "boolean"}[f.type]
    if f.repeated:
        return {"type": "array", "items": item}
    if f.nullable:
        return ["null", item]
    return item


def _avro_field(f: Field, namespace: str) -> dict:
    out = {"name": f.name, "type": _avro_type(f, namespace)}
    if f.doc:
        out["doc"] = f.doc
    if f.nullable:
        out["default"] = None
    elif f.repeated:
        out["default"] = []
    return out


def avro_schema(record: RecordDef) -> dict:
    """The Avro schema (as a dict, ready for fastavro.parse_schema)."""
    return {
        "type": "record",
        "name": record.name,
        "namespace": record.namespace,
        "doc": record.doc,
        "fields": [_avro_field(f, record.namespace) for f in record.fields],
    }


# ---------------------------------------------------------------- Arrow


def _arrow_type(f: Field) -> pa.DataType:
    if f.type == RECORD:
        item = pa.struct([_arrow_field(sub) for sub in f.fields])
    else:
        item = {
            STRING: pa.string(),
            INT: pa.int64(),
            FLOAT: pa.float64(),
            BOOL: pa.bool_(),
            TIMESTAMP: pa.timestamp("us", tz="UTC"),
        }[f.type]
    return pa.list_(pa.field("item", item, nullable=False)) if f.repeated else item


def _arrow_field(f: Field) -> pa.Field:
    # A repeated column itself is never null (an empty list instead).
    return pa.field(f.name, _arrow_type(f), nullable=f.nullable)


def arrow_schema(record: RecordDef) -> pa.Schema:
    """The pyarrow schema for Parquet files of this record."""
    return pa.schema([_arrow_field(f) for f in record.fields], metadata={"medtwin.record": record.name})


# ---------------------------------------------------------------- BigQuery


_BQ_TYPES = {STRING: "STRING", INT: "INT64", FLOAT: "FLOAT64", BOOL: "BOOL", TIMESTAMP: "TIMESTAMP", RECORD: "RECORD"}


def _bq_field(f: Field):
    from google.cloud.bigquery import SchemaField

    mode = "REPEATED" if f.repeated else ("NULLABLE" if f.nullable else "REQUIRED")
    return SchemaField(
        f.name, _BQ_TYPES[f.type], mode=mode, description=f.doc or None, fields=[_bq_field(s) for s in f.fields]
    )


def bigquery_schema(record: RecordDef) -> list:
    """The BigQuery table schema: a list of `google.cloud.bigquery.SchemaField`."""
    return [_bq_field(f) for f in record.fields]


def bigquery_table_options(record: RecordDef) -> dict:
    """Partitioning and clustering for `google.cloud.bigquery.Table` / WriteToBigQuery."""
    options: dict[str, Any] = {}
    if record.partition_field:
        options["timePartitioning"] = {"type": "DAY", "field": record.partition_field}
    if record.cluster_fields:
        options["clustering"] = {"fields": list(record.cluster_fields)}
    return options


def bigquery_schema_json(record: RecordDef) -> dict:
    """The schema in the JSON form `beam.io.WriteToBigQuery(schema=...)` takes."""
    return {"fields": [f.to_api_repr() for f in bigquery_schema(record)]}


# ---------------------------------------------------------------- validation


def _shown(f: Field | None, value: Any) -> str:
    """How an error message quotes a value.

    Only what is known to be safe is quoted: a bool, a number, or the first 40 characters of a
    string of a declared string field that neither identifies a patient nor is enumerated (a value
    not in the allowed set may be anything an integration sent; so may a string sent where a number
    or a timestamp belongs). Containers are never quoted (and never repr'd: a list nested 1,000 deep
    would exhaust the stack), only their type is named.
    """
    if isinstance(value, str) and (f is None or f.type != STRING):
        return "(value withheld)"
    if f is not None and f.identifying:
        return "(value withheld: identifies a patient)"
    if f is not None and f.free_text:
        return "(value withheld: free text)"
    if f is not None and f.choices:
        return "(value withheld: not an allowed value)"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value[:_QUOTED_CHARS])
    return "(value withheld)"


def _check_scalar(f: Field, value: Any, path: str) -> None:
    if f.type == STRING:
        if not isinstance(value, str):
            raise SchemaError(path, f"expected a string, got {type(value).__name__} {_shown(f, value)}")
        if len(value) < f.min_length:
            raise SchemaError(path, "must not be empty" if f.min_length == 1 else f"is shorter than {f.min_length}")
        if f.choices and value not in f.choices:
            allowed = ", ".join(f.choices) if len(f.choices) <= 8 else f"its {len(f.choices)} defined terms"
            raise SchemaError(path, f"is not one of {allowed} (value withheld)")
    elif f.type == BOOL:
        if not isinstance(value, bool):
            raise SchemaError(path, f"expected a boolean, got {type(value).__name__} {_shown(f, value)}")
    elif f.type in (INT, FLOAT):
        number_types = (int,) if f.type == INT else (int, float)
        if isinstance(value, bool) or not isinstance(value, number_types):
            raise SchemaError(path, f"expected {'an integer' if f.type == INT else 'a number'}, "
                              f"got {type(value).__name__} {_shown(f, value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise SchemaError(path, f"{_shown(f, value)} is not a finite number")
        if f.minimum is not None and value < f.minimum:
            raise SchemaError(path, f"{_shown(f, value)} is below the minimum {f.minimum:g}")
        if f.maximum is not None and value > f.maximum:
            raise SchemaError(path, f"{_shown(f, value)} is above the maximum {f.maximum:g}")
    elif f.type == TIMESTAMP:
        if not isinstance(value, dt.datetime) or value.tzinfo is None:
            raise SchemaError(path, "expected a timezone-aware datetime, "
                              f"got {type(value).__name__} {_shown(f, value)}")
        check_timestamp_range(value, path)


def _check_value(f: Field, value: Any, path: str) -> None:
    if f.type == RECORD:
        _check_fields(f.fields, value, path)
    else:
        _check_scalar(f, value, path)


def _check_fields(fields: Sequence[Field], record: Any, path: str) -> None:
    if not isinstance(record, Mapping):
        raise SchemaError(path, f"expected a record, got {type(record).__name__}")
    known = {f.name for f in fields}
    unknown = [name for name in record if name not in known]
    if unknown:
        # Names are withheld too: an integration's key may itself be an identifier.
        raise SchemaError(path, f"has {len(unknown)} field{'s' if len(unknown) > 1 else ''} the schema does not "
                          "declare (names withheld)")
    for f in fields:
        fpath = f"{path}.{f.name}"
        value = record.get(f.name)
        if value is None:
            if f.nullable:
                continue
            raise SchemaError(fpath, "is required but missing")
        if f.repeated:
            if not isinstance(value, (list, tuple)):
                raise SchemaError(fpath, f"expected a list, got {type(value).__name__}")
            for i, item in enumerate(value):
                _check_value(f, item, f"{fpath}[{i}]")
        else:
            _check_value(f, value, fpath)


def validate(record_def: RecordDef, record: Any) -> None:
    """Raise `SchemaError` naming the first field of `record` that breaks the contract."""
    _check_fields(record_def.fields, record, record_def.name)


def validate_fields(fields: Sequence[Field], record: Any, path: str) -> None:
    """`validate` for a nested part of a record (e.g. one sample), reporting under `path`."""
    _check_fields(fields, record, path)


# ---------------------------------------------------------------- JSON


def check_timestamp_range(value: dt.datetime, path: str) -> dt.datetime:
    """`value` (aware) if it lies in [`EARLIEST_TIMESTAMP`, `LATEST_TIMESTAMP`); else SchemaError."""
    if not EARLIEST_TIMESTAMP <= value < LATEST_TIMESTAMP:
        raise SchemaError(path, f"is {_RANGE_TEXT}")
    return value


def parse_timestamp(value: Any, path: str) -> dt.datetime:
    """ISO-8601 (``Z`` or offset; naive means UTC) or epoch seconds -> aware UTC datetime.

    Numeric epoch seconds (int or float, as Unix tools write them) are accepted and documented;
    like strings they must fall in the accepted range (1900-01-01 to 2200-01-01, UTC).
    Raises SchemaError, and only SchemaError, for anything else.
    """
    if isinstance(value, dt.datetime):
        return check_timestamp_range(value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc), path)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # Compared before any conversion: fromtimestamp(1e20) raises OverflowError, NaN ValueError.
        if not (isinstance(value, int) or math.isfinite(value)) or not (
                EARLIEST_EPOCH_SECONDS <= value < LATEST_EPOCH_SECONDS):
            raise SchemaError(path, f"epoch seconds {_RANGE_TEXT}")
        return dt.datetime.fromtimestamp(value, tz=dt.timezone.utc)
    if isinstance(value, str):
        try:
            if len(value) > _MAX_TIMESTAMP_CHARS:
                raise ValueError
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise SchemaError(path, f"{_shown(None, value)} is not an ISO-8601 timestamp") from None
        return check_timestamp_range(parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc), path)
    raise SchemaError(path, f"expected a timestamp, got {type(value).__name__} {_shown(None, value)}")


def format_timestamp(value: dt.datetime) -> str:
    """Aware datetime -> ISO-8601 with microseconds and ``Z``."""
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def from_json_fields(fields: Sequence[Field], obj: Any, path: str) -> Any:
    """JSON values of a (nested) record -> in-memory values: timestamps parsed, integral floats widened."""
    if not isinstance(obj, Mapping):
        return obj  # validate() reports it
    out = dict(obj)
    for f in fields:
        value = obj.get(f.name)
        if value is None:
            continue
        if f.type == TIMESTAMP:
            convert = lambda v, p: parse_timestamp(v, p)  # noqa: E731
        elif f.type == RECORD:
            convert = lambda v, p, f=f: from_json_fields(f.fields, v, p)  # noqa: E731
        elif f.type == FLOAT:
            # JSON has one number type: an integral reading like 37 is a float here.
            convert = lambda v, p: float(v) if isinstance(v, int) and not isinstance(v, bool) else v  # noqa: E731
        else:
            continue
        fpath = f"{path}.{f.name}"
        if f.repeated and isinstance(value, list):
            out[f.name] = [convert(v, f"{fpath}[{i}]") for i, v in enumerate(value)]
        else:
            out[f.name] = convert(value, fpath)
    return out


def from_json(record_def: RecordDef, obj: Any) -> dict:
    """A parsed JSON object -> a validated in-memory record (raises SchemaError)."""
    record = from_json_fields(record_def.fields, obj, record_def.name)
    validate(record_def, record)
    return record


def _to_json_value(f: Field, value: Any) -> Any:
    if value is None:
        return None
    if f.repeated:
        return [_to_json_item(f, v) for v in value]
    return _to_json_item(f, value)


def _to_json_item(f: Field, value: Any) -> Any:
    if f.type == TIMESTAMP:
        return format_timestamp(value)
    if f.type == RECORD:
        return {sub.name: _to_json_value(sub, value.get(sub.name)) for sub in f.fields}
    return value


def to_json(record_def: RecordDef, record: Mapping) -> dict:
    """An in-memory record -> a JSON-serialisable dict (timestamps as ISO-8601)."""
    return {f.name: _to_json_value(f, record.get(f.name)) for f in record_def.fields}
