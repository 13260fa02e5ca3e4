"""BigQuery sink: every output table into a day-partitioned, clustered table of one dataset.

`WriteBigQueryTables(config)` takes ``{table_name: PCollection[row dict]}`` (the
pipeline's tables, ``dead_letters`` included) and writes each to
``PROJECT:DATASET.<table>``; rows BigQuery rejects become ``dead_letters`` rows
(stage ``write_bigquery``, BigQuery's own reason) written with the others.

Layout: each table is created (`ensure_table`) from its `schemas/` record: every
column with its BigQuery type and mode, time-partitioned by DAY on the record's
``partition_field`` and clustered by its ``cluster_fields``, in batch and
streaming alike; ``latest_patient_twin`` / ``latest_device_twin`` views keep the
best pane of each window (as `medtwin query` does over Parquet).

Writes go through a staging table per group of rows, filled by a load job
(JSON, no size limit per row batch, free of streaming-buffer restrictions):

* **batch** groups rows by (table, event day) and *replaces* that day: one
  multi-statement transaction deletes the day's rows and inserts the staging
  table's, so a re-run day or a retried bundle leaves exactly one copy;
* **streaming** flushes with `GroupIntoBatches` (``flush_rows`` /
  ``flush_seconds``, as the Parquet sink) and appends each flush *once*: the
  flush's id (a digest of its rows) is recorded in the ``_medtwin_loads`` ledger
  in the same transaction as the insert, so a retried flush inserts nothing; and
  for tables with a natural key (the twins, detections, alerts) only rows whose
  identity the table lacks that day are inserted, so a restarted job, which groups
  its flushes anew, doubles nothing either.

A load job that BigQuery refuses because of its rows is split in halves and
retried until each refused row is alone; that row becomes a dead letter with the
error BigQuery gave for it, and the rest are written. Any other error (quota,
5xx, network) raises, and the runner retries the bundle.

Why not Beam's `WriteToBigQuery`: FILE_LOADS stages files on GCS and appends
(re-running a day doubled it); STREAMING_INSERTS dedupes only best-effort
(``insertId``), and the emulator's insertAll accepts NULL in REQUIRED columns and
ignores ``insertId``, so neither rejections nor dedup could be tested on it;
STORAGE_WRITE_API is a cross-language Java transform (an expansion service jar
and a Java environment; its Beam-row encoding failed on our timestamps:
``'str' object has no attribute 'micros'``). None of them replaces a partition.
The writers here use `google-cloud-bigquery` only.

Endpoint: `client_for` honours ``BIGQUERY_EMULATOR_HOST`` (``HOST:PORT`` or a
URL, as Google's clients do), with anonymous credentials; otherwise the
workers' default credentials and the real service. The emulator used by the
tests (bqemulator) refuses load jobs into a ``table$YYYYMMDD`` partition, which
is why days are replaced by DML in a transaction rather than a WRITE_TRUNCATE
load into the partition decorator.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import os

import apache_beam as beam
import orjson
from apache_beam.metrics import Metrics
from apache_beam.transforms import window

from schemas import OUTPUT_TABLES, RecordDef, bigquery_schema, to_json
from transforms.dead_letters import DEAD_LETTERS, allowed_payload, dead_letter
from transforms.parquet_sink import ROW_IDENTITY

LOG = logging.getLogger(__name__)
STAGE = "write_bigquery"
EMULATOR_HOST = "BIGQUERY_EMULATOR_HOST"
STAGING_PREFIX = "_medtwin_staging_"
LEDGER = "_medtwin_loads"
MAX_REASON_CHARS = 600
LATEST_VIEWS = {"patient_twin": "patient_key", "device_twin": "device_id"}


def client_for(project: str):
    """A `google.cloud.bigquery.Client` for `project`: the emulator named by ``BIGQUERY_EMULATOR_HOST``
    (anonymous credentials), else BigQuery with the default credentials."""
    from google.cloud import bigquery

    endpoint = os.environ.get(EMULATOR_HOST)
    if not endpoint:
        return bigquery.Client(project=project)
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials

    if "://" not in endpoint:
        endpoint = f"http://{endpoint}"
    return bigquery.Client(project=project, credentials=AnonymousCredentials(),
                           client_options=ClientOptions(api_endpoint=endpoint))


def dataset_of(output: str) -> tuple[str, str]:
    """``project:dataset`` (or ``project.dataset``) -> (project, dataset)."""
    project, _, dataset = output.replace(":", ".", 1).partition(".")
    if not project or not dataset or "." in dataset:
        raise ValueError(f"a BigQuery dataset is 'project:dataset', got {output!r}")
    return project, dataset


def table_resource(record: RecordDef, project: str, dataset: str):
    """The `google.cloud.bigquery.Table` of `record`: schema, DAY partitioning, clustering."""
    from google.cloud import bigquery

    table = bigquery.Table(f"{project}.{dataset}.{record.name}", schema=bigquery_schema(record))
    table.description = record.doc or None
    if record.partition_field:
        table.time_partitioning = bigquery.TimePartitioning(type_=bigquery.TimePartitioningType.DAY,
                                                            field=record.partition_field)
    if record.cluster_fields:
        table.clustering_fields = list(record.cluster_fields)
    return table


def latest_view_sql(table: str, key: str, project: str, dataset: str) -> str:
    return (f"CREATE OR REPLACE VIEW `{project}.{dataset}.latest_{table}` AS\n"
            f"SELECT * FROM `{project}.{dataset}.{table}` WHERE TRUE\n"
            f"QUALIFY ROW_NUMBER() OVER (PARTITION BY {key}, window_start "
            f"ORDER BY is_final DESC, pane_index DESC) = 1")


def ensure_table(client, record: RecordDef, project: str, dataset: str) -> None:
    """Creates the dataset, `record`'s table (and its latest_ view) and the load ledger if missing."""
    from google.cloud import bigquery

    client.create_dataset(bigquery.Dataset(f"{project}.{dataset}"), exists_ok=True)
    client.create_table(table_resource(record, project, dataset), exists_ok=True)
    ledger = bigquery.Table(f"{project}.{dataset}.{LEDGER}", schema=[
        bigquery.SchemaField("load_id", "STRING", mode="REQUIRED"),
        bigquery.SchemaField("table_name", "STRING", mode="REQUIRED"),
        bigquery.SchemaField("loaded_at", "TIMESTAMP", mode="REQUIRED")])
    client.create_table(ledger, exists_ok=True)
    if record.name in LATEST_VIEWS:
        client.query(latest_view_sql(record.name, LATEST_VIEWS[record.name], project, dataset)).result()


def to_bigquery_row(table: RecordDef, row: dict) -> dict:
    """An output row -> its JSON load form: every column of `table` in order, timestamps as
    ISO-8601 UTC with microseconds (``2026-03-02T06:00:00.000000Z``), repeated fields as lists."""
    return to_json(table, row)


def rows_digest(table: RecordDef, rows: list[dict]) -> str:
    """A digest of a group's JSON rows, independent of their order (a retried group has the same)."""
    lines = sorted(orjson.dumps(row, option=orjson.OPT_SORT_KEYS) for row in rows)
    digest = hashlib.sha256(table.name.encode())
    for line in lines:
        digest.update(line + b"\n")
    return digest.hexdigest()[:24]


class RowsRefused(Exception):
    """A load job BigQuery refused because of its rows; ``str()`` is BigQuery's reason."""


class BigQueryTableWriter:
    """Staging loads and the two commits (replace a day, append a flush once) for one table."""

    def __init__(self, client, record: RecordDef, project: str, dataset: str):
        self._client, self._record = client, record
        self._project, self._dataset = project, dataset
        self._columns = ", ".join(f"`{name}`" for name in record.names)

    def _id(self, name: str) -> str:
        return f"{self._project}.{self._dataset}.{name}"

    def _load(self, table_id: str, rows: list[dict]) -> None:
        """Loads `rows` into `table_id`, replacing its contents. Raises RowsRefused for row errors."""
        from google.api_core.exceptions import BadRequest
        from google.cloud import bigquery

        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.NEWLINE_DELIMITED_JSON, schema=bigquery_schema(self._record),
            write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
            create_disposition=bigquery.CreateDisposition.CREATE_IF_NEEDED, max_bad_records=0)
        data = b"\n".join(orjson.dumps(row) for row in rows) + b"\n"
        try:
            job = self._client.load_table_from_file(io.BytesIO(data), table_id, job_config=config, rewind=True)
            job.result()
        except BadRequest as error:
            messages = [e.get("message", "") for e in (getattr(error, "errors", None) or [])] or [error.message]
            raise RowsRefused("; ".join(m for m in messages if m)[:MAX_REASON_CHARS]) from None

    def stage(self, name: str, rows: list[dict]) -> tuple[list[dict], list[tuple[dict, str]]]:
        """Loads `rows` into the staging table `name`; returns (rows loaded, [(row, reason)] refused).

        A refused load is split in halves (loaded into a probe table) until each refused row is
        alone, so the rows loaded are exactly the rows BigQuery accepts on their own.
        """
        try:
            self._load(self._id(name), rows)
            return rows, []
        except RowsRefused:
            pass
        good, refused = self._bisect(name + "_probe", rows)
        self._client.delete_table(self._id(name + "_probe"), not_found_ok=True)
        if good:
            self._load(self._id(name), good)
        return good, refused

    def _bisect(self, probe: str, rows: list[dict]) -> tuple[list[dict], list[tuple[dict, str]]]:
        try:
            self._load(self._id(probe), rows)
            return rows, []
        except RowsRefused as error:
            if len(rows) == 1:
                return [], [(rows[0], str(error))]
        half = len(rows) // 2
        good_a, refused_a = self._bisect(probe, rows[:half])
        good_b, refused_b = self._bisect(probe, rows[half:])
        return good_a + good_b, refused_a + refused_b

    def replace_day(self, day: str, staging: str | None) -> None:
        """Replaces the event day `day` (``YYYY-MM-DD``) of the table with the staging table's rows
        (none when `staging` is None), in one transaction."""
        field = self._record.partition_field
        insert = (f"INSERT INTO `{self._id(self._record.name)}` ({self._columns}) "
                  f"SELECT {self._columns} FROM `{self._id(staging)}`;\n" if staging else "")
        self._script(
            f"DELETE FROM `{self._id(self._record.name)}` WHERE `{field}` >= TIMESTAMP '{day} 00:00:00+00' "
            f"AND `{field}` < TIMESTAMP_ADD(TIMESTAMP '{day} 00:00:00+00', INTERVAL 1 DAY);\n" + insert)

    def append_once(self, load_id: str, staging: str) -> None:
        """Appends the staging table's rows unless the ledger already holds `load_id`, and records it.

        Tables with a natural key (`parquet_sink.ROW_IDENTITY`: the twins, detections, alerts) get only
        the rows whose identity the table lacks on that day, so a restarted job, whose flushes group
        rows anew, adds nothing already there (a twin's final row once per window, whatever its pane).
        """
        not_loaded = f"NOT EXISTS (SELECT 1 FROM `{self._id(LEDGER)}` WHERE load_id = '{load_id}')"
        selected = ", ".join(f"s.`{name}`" for name in self._record.names)
        self._script(
            f"INSERT INTO `{self._id(self._record.name)}` ({self._columns}) "
            f"SELECT {selected} FROM `{self._id(staging)}` AS s WHERE {not_loaded}{self._not_held()};\n"
            f"INSERT INTO `{self._id(LEDGER)}` (load_id, table_name, loaded_at) "
            f"SELECT '{load_id}', '{self._record.name}', CURRENT_TIMESTAMP() FROM (SELECT 1) WHERE {not_loaded};\n")

    def _not_held(self) -> str:
        """`` AND NOT EXISTS (...)``: the staging row ``s`` has no row of the same identity in the table."""
        columns = ROW_IDENTITY.get(self._record.name)
        if columns is None:
            return ""
        field = self._record.partition_field
        same = [f"DATE(t.`{field}`) = DATE(s.`{field}`)"] + [
            "(s.`is_final` OR t.`pane_index` = s.`pane_index`)" if name == "pane_index" and "is_final" in columns
            else f"t.`{name}` = s.`{name}`" for name in columns]
        return f" AND NOT EXISTS (SELECT 1 FROM `{self._id(self._record.name)}` AS t WHERE {' AND '.join(same)})"

    def _script(self, statements: str) -> None:
        self._client.query(f"BEGIN TRANSACTION;\n{statements}COMMIT TRANSACTION;").result()

    def drop(self, name: str) -> None:
        self._client.delete_table(self._id(name), not_found_ok=True)


class _WriteGroupFn(beam.DoFn):
    """(day, rows) -> the dead letters of rows BigQuery refused; the accepted rows are committed:
    batch replaces the day, streaming appends the group once (see the module docstring)."""

    def __init__(self, record: RecordDef, output: str, *, replace_days: bool):
        self._record = record
        self._output = output
        self._replace_days = replace_days
        self._written = Metrics.counter("sink", f"{record.name}_rows")

    def setup(self):
        project, dataset = dataset_of(self._output)
        client = client_for(project)
        ensure_table(client, self._record, project, dataset)
        self._writer = BigQueryTableWriter(client, self._record, project, dataset)

    def process(self, element):
        day, rows = element
        rows = [to_bigquery_row(self._record, row) for row in rows]
        load_id = rows_digest(self._record, rows)
        staging = f"{STAGING_PREFIX}{self._record.name}_{day.replace('-', '')}_{load_id}"
        good, refused = self._writer.stage(staging, rows)
        if self._replace_days:
            self._writer.replace_day(day, staging if good else None)
        elif good:
            self._writer.append_once(load_id, staging)
        self._writer.drop(staging)
        self._written.inc(len(good))
        for row, reason in refused:
            yield self._dead_letter(row, reason)

    def _dead_letter(self, row: dict, reason: str) -> dict:
        payload, _ = allowed_payload(self._record.fields, row, lambda value: value)  # output rows hold pseudonyms
        when = row.get(self._record.partition_field)
        try:
            recorded_at = dt.datetime.fromisoformat(str(when).replace("Z", "+00:00"))
        except ValueError:
            recorded_at = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
        return dead_letter(STAGE, f"BigQuery refused a {self._record.name} row: {reason}",
                           {"table": self._record.name, **payload}, recorded_at=recorded_at,
                           source=self._record.name, event_time=recorded_at)


def partition_day(record: RecordDef, row: dict) -> str:
    value = row.get(record.partition_field)
    if not isinstance(value, dt.datetime):
        return "1970-01-01"  # BigQuery refuses the row (a REQUIRED timestamp); it becomes a dead letter
    return value.astimezone(dt.timezone.utc).date().isoformat()


class WriteBigQueryTable(beam.PTransform):
    """rows of one table -> BigQuery ``project:dataset.<table>``; returns the dead letters of rows
    BigQuery refused."""

    def __init__(self, record: RecordDef, config):
        super().__init__()
        self._record = record
        self._config = config

    def expand(self, rows):
        record, config = self._record, self._config
        # One group per day (batch) or per flush (streaming), whatever windows the rows were made in.
        rows = rows | "GlobalWindow" >> beam.WindowInto(window.GlobalWindows())
        keyed = rows | "ByDay" >> beam.Map(lambda row: (partition_day(record, row), row))
        groups = (keyed | "FlushEvery" >> beam.GroupIntoBatches(
            config.flush_rows, max_buffering_duration_secs=config.flush_seconds)
            if config.streaming else keyed | "GroupDays" >> beam.GroupByKey())
        return groups | "LoadAndCommit" >> beam.ParDo(
            _WriteGroupFn(record, config.output, replace_days=not config.streaming))


class _LogRefusedDeadLetterFn(beam.DoFn):
    """A dead letter BigQuery refused (a bug: they are built to the schema): logged and counted."""

    def process(self, row):
        Metrics.counter("sink", "dead_letters_refused_by_bigquery").inc()
        LOG.error("BigQuery refused a dead letter of stage %s: %s", row.get("stage"), row.get("reason"))
        yield row


class WriteBigQueryTables(beam.PTransform):
    """``{table_name: PCollection[row]}`` -> every table in BigQuery; rows BigQuery refuses join
    ``dead_letters``. Returns the dead letters BigQuery refused itself (logged; expected empty)."""

    def __init__(self, config):
        super().__init__()
        self._config = config

    def expand(self, tables: dict):
        refused = [rows | f"Write_{name}" >> WriteBigQueryTable(OUTPUT_TABLES[name], self._config)
                   for name, rows in tables.items() if name != DEAD_LETTERS]
        dead = ([tables[DEAD_LETTERS] | "DeadLettersGlobal" >> beam.WindowInto(window.GlobalWindows())]
                if DEAD_LETTERS in tables else [])
        all_dead = (*dead, *refused) | "WithRefusedRows" >> beam.Flatten()
        return (all_dead
                | f"Write_{DEAD_LETTERS}" >> WriteBigQueryTable(OUTPUT_TABLES[DEAD_LETTERS], self._config)
                | "LogRefusedDeadLetters" >> beam.ParDo(_LogRefusedDeadLetterFn()))
