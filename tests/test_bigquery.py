"""The BigQuery sink against a real BigQuery API: bqemulator, started once per session.

What was broken (issue 12) and the test that shows each fixed:
  the streaming path could not encode its rows ('str' object has no attribute 'micros')
      -> test_streaming_run_writes_every_table
  auto-created streaming tables were clustered but not day-partitioned
      -> test_tables_are_created_from_schemas_day_partitioned_and_clustered[streaming],
         test_streaming_run_writes_every_table
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
from schemas import OUTPUT_TABLES, SWAP_TABLES, bigquery_schema
from schemas.contract import BOOL, FLOAT, INT, RECORD, STRING, TIMESTAMP
from transforms import bigquery as bq
from transforms.dead_letters import DEAD_LETTERS
from transforms.sinks import SinkConfig

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "medtwin-test"
T0 = dt.datetime(2026, 3, 2, 6, 0, tzinfo=dt.timezone.utc)
_counter = iter(range(10**6))

JOB_TABLES = [name for name in OUTPUT_TABLES if name not in SWAP_TABLES]  # what a job without --model_watch writes


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


def test_a_restarted_jobs_flushes_add_only_rows_the_table_lacks(emulator_env):
    """A restarted streaming job groups its rows into other flushes (other ids than the ledger's): rows
    whose identity the table holds on that day are not inserted again; a twin's final row is one per
    window whatever its pane index, provisional rows one per pane."""
    dataset = _dataset()
    fn = bq._WriteGroupFn(OUTPUT_TABLES["patient_twin"], f"{PROJECT}:{dataset}", replace_days=False)
    fn.setup()
    day = T0.date().isoformat()
    start = T0 + dt.timedelta(minutes=1)

    def pane(key, index, final, samples=12):
        return _row("patient_twin", 1, patient_key=key, window_start=start, pane_index=index, is_final=final,
                    sample_count=samples)

    assert list(fn.process((day, [pane("K1", 0, False), pane("K1", 2, True)]))) == []
    # The restarted job: the same provisional row, the same window final at another pane index, a new key.
    assert list(fn.process((day, [pane("K1", 0, False), pane("K1", 3, True), pane("K1", 1, False),
                                  pane("K2", 2, True, samples=9)]))) == []
    assert _select(dataset, "SELECT patient_key, pane_index, is_final, sample_count FROM {d}.patient_twin "
                            "ORDER BY 1, 2") == [("K1", 0, False, 12), ("K1", 1, False, 12), ("K1", 2, True, 12),
                                                 ("K2", 2, True, 9)]


# ---------------------------------------------------------------- medtwin run against the emulator


@pytest.fixture(scope="session")
def hospital(tmp_path_factory):
    from pipelines.cli import main

    root = tmp_path_factory.mktemp("bq-hospital")
    assert main(["simulate", "--out", str(root / "in"), "--patients", "6", "--devices", "2", "--hours", "1",
                 "--seed", "7", "--corrupt-fraction", "0.03", "--quiet"]) == 0  # 2 X-rays, 12 damaged records
    return root


def _run(hospital, *extra) -> None:
    from pipelines.cli import main

    assert main(["run", "--input", str(hospital / "in"), "--demo", "--model_per_process", *extra]) == 0


@pytest.fixture(scope="session")
def emulator_session(bigquery_emulator):  # noqa: F811
    """BIGQUERY_EMULATOR_HOST for the session's `medtwin run`s (in this process, as the DirectRunner)."""
    previous = os.environ.get("BIGQUERY_EMULATOR_HOST")
    os.environ["BIGQUERY_EMULATOR_HOST"] = bigquery_emulator
    yield bigquery_emulator
    if previous is None:
        os.environ.pop("BIGQUERY_EMULATOR_HOST", None)
    else:
        os.environ["BIGQUERY_EMULATOR_HOST"] = previous


@pytest.fixture(scope="session")
def runs(hospital, emulator_session):
    """The same hospital to Parquet and to the emulator's dataset ``batch``, both in batch."""
    # No SR folder, as with a BigQuery sink (detections.sr_sop_instance_uid is null in both).
    _run(hospital, "--output", str(hospital / "parquet"), "--no_structured_reports")
    _run(hospital, "--bigquery_dataset", f"{PROJECT}:batch")
    return {"parquet": hospital / "parquet", "first_batch": {name: _table_rows("batch", name)
                                                             for name in JOB_TABLES}}


@pytest.fixture(scope="session")
def rerun(runs, hospital):
    _run(hospital, "--bigquery_dataset", f"{PROJECT}:batch")  # the same day again
    return runs


@pytest.fixture(scope="session")
def streaming_run(runs, hospital, job_endpoints):
    """The hospital streamed to the dataset ``streaming`` on the session's Prism, twice: the second
    job is a restart replaying the same input into the same tables."""
    # 15-minute replay steps: the same panes' finals in a quarter of the steps
    for _ in range(2):
        _run(hospital, "--streaming", "--replay_step", "900", "--bigquery_dataset", f"{PROJECT}:streaming",
             "--runner", "prism", f"--job_endpoint={job_endpoints['prism']}")
    return runs


def _normal(value):
    if isinstance(value, float):
        return None if math.isnan(value) else float(f"{value:.9g}")
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc)
    if isinstance(value, (list, tuple)):
        return tuple(_normal(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _normal(v)) for k, v in value.items()))
    return value


# Columns that differ between two runs of the same input: the model call's wall time and batch.
VARIES = {"detections": ("inference_latency_ms", "batch_size")}


def _columns(table: str) -> str:
    return ", ".join(n for n in OUTPUT_TABLES[table].names if n not in VARIES.get(table, ()))


def _table_rows(dataset: str, table: str) -> list:
    rows = _select(dataset, f"SELECT {_columns(table)} FROM {{d}}.{table}")
    return sorted((tuple(_normal(v) for v in row) for row in rows), key=repr)


def _duckdb_rows(out: Path, sql: str) -> list:
    connection = connect(str(out), timezone="UTC")
    return sorted((tuple(_normal(v) for v in row) for row in connection.execute(sql).fetchall()), key=repr)


def _bigquery_rows(dataset: str, sql: str) -> list:
    from google.cloud import bigquery

    config = bigquery.QueryJobConfig(default_dataset=f"{PROJECT}.{dataset}")
    rows = _client().query(sql, job_config=config).result()
    return sorted((tuple(_normal(v) for v in row.values()) for row in rows), key=repr)


def _readme_queries(section: str) -> list[str]:
    """The SQL statements of the first ```sql block under the README heading `section`."""
    text = (ROOT / "README.md").read_text()
    body = text[text.index(f"\n## {section}\n"):]
    block = re.search(r"```sql\n(.*?)```", body, re.S).group(1)
    lines = [line for line in block.splitlines() if not line.lstrip().startswith("--")]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]


def test_batch_run_writes_every_table_like_parquet(runs):
    for name in JOB_TABLES:
        parquet = _duckdb_rows(runs["parquet"], f"SELECT {_columns(name)} FROM {name}")
        assert parquet, name
        assert _table_rows("batch", name) == parquet, name


def test_medtwin_run_twice_gives_the_same_tables(rerun):
    for name in JOB_TABLES:
        assert _table_rows("batch", name) == rerun["first_batch"][name], name


def test_streaming_run_writes_every_table(streaming_run):
    """The streaming path (rows encoded, flushed, appended once) holds every final row batch holds,
    once although the job ran twice."""
    for name, key in (("patient_twin", "patient_key"), ("device_twin", "device_id")):
        final = f"SELECT * EXCEPT (pane_index, pane_timing) FROM {{d}}.{name} WHERE is_final"
        assert _select("streaming", f"SELECT count(*) FROM ({final})") == _select(
            "batch", f"SELECT count(*) FROM ({final})")
        assert _select("streaming", f"SELECT count(*) FROM {{d}}.latest_{name}") == _select(
            "batch", f"SELECT count(*) FROM {{d}}.latest_{name}"), name
        doubled = (f"SELECT {key}, window_start, pane_index FROM {{d}}.{name} WHERE NOT is_final "
                   f"GROUP BY 1, 2, 3 HAVING count(*) > 1")
        assert _select("streaming", f"SELECT count(*) FROM ({doubled})") == [(0,)], name
    assert _select("streaming", "SELECT count(*) FROM {d}.detections") == _select(
        "batch", "SELECT count(*) FROM {d}.detections")
    assert _select("streaming", "SELECT count(*) - count(DISTINCT alert_id) FROM {d}.alerts") == [(0,)]
    assert _select("streaming", "SELECT count(*) FROM {d}.dead_letters")[0][0] > 0
    for name in JOB_TABLES:
        record = OUTPUT_TABLES[name]
        table = _client().get_table(f"{PROJECT}.streaming.{name}")
        assert (table.time_partitioning.type_, table.time_partitioning.field) == ("DAY", record.partition_field)
        assert table.clustering_fields == list(record.cluster_fields)


def test_readme_analyst_queries_agree_with_duckdb_over_parquet(runs):
    duckdb_queries, bigquery_queries = _readme_queries("Analysts: DuckDB"), _readme_queries("BigQuery")
    assert len(duckdb_queries) == len(bigquery_queries) == 5
    answered = 0
    for duck_sql, bq_sql in zip(duckdb_queries, bigquery_queries):
        expected = _duckdb_rows(runs["parquet"], duck_sql)
        assert _bigquery_rows("batch", bq_sql) == expected, bq_sql
        answered += bool(expected)
    assert answered >= 3  # the hospital is big enough for most queries to return rows
