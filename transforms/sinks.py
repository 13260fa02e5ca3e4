"""Sinks: every output table to Parquet (local, Hive-partitioned by day) or BigQuery (cloud).

`WriteTables(sink)` is the one interface the pipeline sees: it takes
``{table_name: PCollection[row dict]}`` and writes each table with the schema
derived from `schemas/`.

Parquet layout: ``OUT/<table>/date=YYYY-MM-DD/part-<shard>-<n>.parquet``,
the date taken from the table's partition column. Beam's `fileio` cannot be
used here because its final rename does not create the ``date=`` folders; this
writer groups rows per (date, shard) and writes each group with pyarrow
through `FileSystems` (local paths, ``gs://``). In batch a group is the whole
day's shard (``part-<shard>-000000``). In streaming, `GroupIntoBatches` in the
global window flushes a group after `flush_rows` rows or `flush_seconds` of
processing time, whichever comes first, and at the end of a bounded input: each
flush is a new file named by a digest of its rows, so files are never
rewritten while readers read them and a retried flush rewrites the same file.
(Event-time windows would name files by time, but rows emitted by the twins'
timers may carry timestamps behind the runner's watermark, and the
DirectRunner would drop them as late. A processing-time trigger on a global
window would do the flushing too, but Prism 2.77 panics on one:
"assignment to entry in nil map" in its aggregate stage's processing-time
bundle.) File names are deterministic, so a retried bundle or a re-run backfill
overwrites instead of duplicating.

BigQuery: `WriteToBigQuery` with the derived schema, day partitioning and
clustering (`schemas.bigquery_table_options`), created if needed, appended.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import zlib

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import window

from schemas import OUTPUT_TABLES, RecordDef, arrow_schema, bigquery_schema, bigquery_table_options
from schemas.contract import TIMESTAMP


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
    """

    kind: str = "parquet"
    output: str = "out"
    streaming: bool = False
    shards: int = 1
    flush_rows: int = 5000
    flush_seconds: int = 60

    def __post_init__(self):
        if self.kind not in ("parquet", "bigquery"):
            raise ValueError(f"unknown sink kind {self.kind!r}: use 'parquet' or 'bigquery'")
        if self.kind == "bigquery" and ":" not in self.output and "." not in self.output:
            raise ValueError(f"a BigQuery output is 'project:dataset', got {self.output!r}")


def partition_date(table: RecordDef, row: dict) -> str:
    value = row[table.partition_field]
    return value.astimezone(dt.timezone.utc).date().isoformat()


class _WriteParquetGroupFn(beam.DoFn):
    """((date, shard), rows) -> the path of the Parquet file written with them."""

    def __init__(self, table: RecordDef, root: str, *, digest_names: bool):
        self._table = table
        self._root = root
        self._digest_names = digest_names

    def setup(self):
        self._schema = arrow_schema(self._table)

    def process(self, element):
        (date, shard), rows = element
        order = [self._table.partition_field, *self._table.cluster_fields]
        rows = sorted(rows, key=lambda r: tuple("" if r.get(c) is None else str(r.get(c)) for c in order))
        table = pa.Table.from_pylist(rows, schema=self._schema)
        path = FileSystems.join(self._root, self._table.name, f"date={date}",
                                f"part-{shard:03d}-{self._file_name(table)}.parquet")
        with FileSystems.create(path) as handle:
            pq.write_table(table, handle, compression="zstd")
        beam.metrics.Metrics.counter("sink", f"{self._table.name}_rows").inc(len(rows))
        yield path

    def _file_name(self, table: pa.Table) -> str:
        """Batch: the day's one file per shard. Streaming: a digest of the flush's rows (a day has many)."""
        if not self._digest_names:
            return "000000"
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]


class WriteParquetTable(beam.PTransform):
    """rows of one table -> Parquet files; returns the PCollection of written paths."""

    def __init__(self, table: RecordDef, config: SinkConfig):
        super().__init__()
        self._table = table
        self._config = config

    def expand(self, rows):
        config, table = self._config, self._table
        if config.streaming:
            rows = rows | "GlobalWindow" >> beam.WindowInto(window.GlobalWindows())
        keyed = rows | "ByDateAndShard" >> beam.Map(lambda row: (
            (partition_date(table, row), _shard(row, table, config.shards)), row))
        if not config.streaming:
            return (keyed
                    | "GroupFiles" >> beam.GroupByKey()
                    | "WriteParquet" >> beam.ParDo(_WriteParquetGroupFn(table, config.output, digest_names=False)))
        return (keyed
                | "FlushEvery" >> beam.GroupIntoBatches(
                    config.flush_rows, max_buffering_duration_secs=config.flush_seconds)
                | "WriteParquet" >> beam.ParDo(_WriteParquetGroupFn(table, config.output, digest_names=True)))


def _shard(row: dict, table: RecordDef, shards: int) -> int:
    if shards == 1:
        return 0
    key = "|".join(str(row.get(c)) for c in table.cluster_fields)
    return zlib.crc32(key.encode("utf-8")) % shards


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
        writer = WriteParquetTable if self._config.kind == "parquet" else WriteBigQueryTable
        return {name: rows | f"Write_{name}" >> writer(OUTPUT_TABLES[name], self._config)
                for name, rows in tables.items()}
