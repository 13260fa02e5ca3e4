"""Sinks: every output table to Parquet (local or gs://, Hive-partitioned by day) or BigQuery (cloud).

`WriteTables(sink)` is the one interface the pipeline sees: it takes
``{table_name: PCollection[row dict]}`` and writes each table with the schema
derived from `schemas/`.

Parquet: `transforms.parquet_sink` (``OUT/<table>/date=YYYY-MM-DD/``), with its commit
protocol: job-unique temporary files moved into place only once written; a batch job replaces
the (table, day) partitions it owns whole; a streaming job appends files named by its job id,
adding only rows the partition does not hold yet.

BigQuery: `WriteToBigQuery` with the derived schema, day partitioning and
clustering (`schemas.bigquery_table_options`), created if needed, appended.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

import apache_beam as beam

from schemas import OUTPUT_TABLES, RecordDef, bigquery_schema, bigquery_table_options
from schemas.contract import TIMESTAMP
from transforms.parquet_sink import WriteParquetTables, partition_date  # noqa: F401 (partition_date: re-exported)


def new_job_id() -> str:
    """A job id unique to this run: UTC start second and a random suffix (``20260302T021500-1a2b3c4d``)."""
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


@dataclasses.dataclass(frozen=True)
class SinkConfig:
    """Where tables go.

    Attributes:
      kind: "parquet" (local or gs:// directory) or "bigquery".
      output: the Parquet root directory, or the BigQuery dataset as ``project:dataset``.
      streaming: flush groups as rows come instead of once at the end.
      shards: Parquet files per day and flush (parallelism of the write).
      flush_rows, flush_seconds: a streaming group is written after this many rows or this much
        processing time, whichever comes first.
      owned_dates: batch: the event days (``YYYY-MM-DD``) whose partitions this job replaces (a
        backfill's days); rows of other days are not written. None: every day the job's rows fall on.
      job_id: names the job's temporary folder and its streaming files; unique per job run.
      fail_once_dir: tests only: write steps fail once per bundle (`parquet_sink.FailOncePerBundle`).
    """

    kind: str = "parquet"
    output: str = "out"
    streaming: bool = False
    shards: int = 1
    flush_rows: int = 5000
    flush_seconds: int = 60
    owned_dates: tuple | None = None
    job_id: str = dataclasses.field(default_factory=new_job_id)
    fail_once_dir: str | None = None

    def __post_init__(self):
        if self.kind not in ("parquet", "bigquery"):
            raise ValueError(f"unknown sink kind {self.kind!r}: use 'parquet' or 'bigquery'")
        if self.kind == "bigquery" and ":" not in self.output and "." not in self.output:
            raise ValueError(f"a BigQuery output is 'project:dataset', got {self.output!r}")


def to_bigquery_row(table: RecordDef, row: dict) -> dict:
    """A row with timestamps as BigQuery-accepted strings (the JSON load/insert format)."""
    out = dict(row)
    for field in table.fields:
        if field.type == TIMESTAMP and out.get(field.name) is not None:
            out[field.name] = out[field.name].astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f UTC")
    return {name: out.get(name) for name in table.names}


class WriteBigQueryTable(beam.PTransform):
    """rows of one table -> BigQuery ``project:dataset.table`` (day-partitioned, clustered)."""

    def __init__(self, table: RecordDef, config: SinkConfig):
        super().__init__()
        self._table = table
        self._config = config

    def expand(self, rows):
        from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery
        from google.cloud.bigquery import SchemaField

        table = self._table
        schema = {"fields": [SchemaField.to_api_repr(f) for f in bigquery_schema(table)]}
        return (
            rows
            | "TimestampsAsText" >> beam.Map(lambda row: to_bigquery_row(table, row))
            | "WriteToBigQuery" >> WriteToBigQuery(
                table=f"{self._config.output}.{table.name}",
                schema=schema,
                additional_bq_parameters=bigquery_table_options(table),
                create_disposition=BigQueryDisposition.CREATE_IF_NEEDED,
                write_disposition=BigQueryDisposition.WRITE_APPEND,
                method=(WriteToBigQuery.Method.STORAGE_WRITE_API if self._config.streaming
                        else WriteToBigQuery.Method.FILE_LOADS),
            )
        )


class WriteTables(beam.PTransform):
    """``{table_name: PCollection[row]}`` -> every table written to the configured sink."""

    def __init__(self, config: SinkConfig):
        super().__init__()
        self._config = config

    def expand(self, tables: dict):
        if self._config.kind == "parquet":
            return tables | "Parquet" >> WriteParquetTables(self._config)
        return {name: rows | f"Write_{name}" >> WriteBigQueryTable(OUTPUT_TABLES[name], self._config)
                for name, rows in tables.items()}
