"""Sinks: every output table to Parquet (local or gs://, Hive-partitioned by day) or BigQuery (cloud).

`WriteTables(sink)` is the one interface the pipeline sees: it takes
``{table_name: PCollection[row dict]}`` and writes each table with the schema
derived from `schemas/`.

Parquet: `transforms.parquet_sink` (``OUT/<table>/date=YYYY-MM-DD/``), with its commit
protocol: job-unique temporary files moved into place only once written; a batch job replaces
the (table, day) partitions it owns whole; a streaming job appends files named by its job id,
adding only rows the partition does not hold yet.

BigQuery: `transforms.bigquery` (tables from `schemas/`, day-partitioned and clustered;
batch replaces each event day, streaming appends each flush once; rows BigQuery refuses
become dead letters with its reason).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

import apache_beam as beam

from transforms.bigquery import WriteBigQueryTables
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
      shards: streaming: Parquet flush groups per day (parallelism of the write).
      max_rows_per_file: batch: a day's partition is written in files of about this many rows
        (their number from the day's size: `parquet_sink.shards_for`); one write step holds one file's rows.
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
    max_rows_per_file: int = 250_000
    flush_rows: int = 5000
    flush_seconds: int = 60
    owned_dates: tuple | None = None
    job_id: str = dataclasses.field(default_factory=new_job_id)
    fail_once_dir: str | None = None

    def __post_init__(self):
        if self.kind not in ("parquet", "bigquery"):
            raise ValueError(f"unknown sink kind {self.kind!r}: use 'parquet' or 'bigquery'")
        if self.shards < 1 or self.max_rows_per_file < 1:
            raise ValueError(f"shards and max_rows_per_file must be at least 1, got {self.shards}, "
                             f"{self.max_rows_per_file}")
        if self.kind == "bigquery" and ":" not in self.output and "." not in self.output:
            raise ValueError(f"a BigQuery output is 'project:dataset', got {self.output!r}")


class WriteTables(beam.PTransform):
    """``{table_name: PCollection[row]}`` -> every table written to the configured sink."""

    def __init__(self, config: SinkConfig):
        super().__init__()
        self._config = config

    def expand(self, tables: dict):
        if self._config.kind == "parquet":
            return tables | "Parquet" >> WriteParquetTables(self._config)
        return tables | "BigQuery" >> WriteBigQueryTables(self._config)
