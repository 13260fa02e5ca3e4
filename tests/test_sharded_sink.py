"""Batch Parquet files sized from the data (issue 14 item 2): a day is written in
``ceil(rows / max_rows_per_file)`` files, rows spread by identity, so one write step holds about
one file's rows whatever the day's size; every row once, and a re-run writes the same bytes.

Runs `WriteParquetTables` on the session's Prism (and the DirectRunner) over alerts of two days.
"""

from __future__ import annotations

import datetime as dt
import hashlib

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from transforms.parquet_sink import WriteParquetTables, shards_for
from transforms.sinks import SinkConfig

DAY_ONE, DAY_TWO = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc), dt.datetime(2026, 3, 2, tzinfo=dt.timezone.utc)
MAX_ROWS = 40


def _alerts():
    """1,000 alerts on day one and 30 on day two."""
    rows = []
    for n, day in [(n, DAY_ONE) for n in range(1000)] + [(n, DAY_TWO) for n in range(30)]:
        onset = day + dt.timedelta(seconds=60 * n)
        rows.append({"alert_id": f"sensor_stale:p{n % 97}:{onset.isoformat()}", "kind": "sensor_stale",
                     "subject_type": "patient", "subject_id": f"p{n % 97}", "severity": "warning",
                     "onset_time": onset, "window_end": None, "message": "no samples", "evidence": "{}"})
    return rows


def _write(out, options):
    config = SinkConfig(output=str(out), max_rows_per_file=MAX_ROWS)
    with beam.Pipeline(options=options) as pipeline:
        _ = {"alerts": pipeline | beam.Create(_alerts())} | WriteParquetTables(config)
    return {path.relative_to(out).as_posix(): path for path in sorted((out / "alerts").rglob("*.parquet"))}


@pytest.fixture(scope="module")
def prism_options(prism_flags):
    return PipelineOptions(prism_flags)


def test_files_per_day_follow_the_days_size_and_hold_every_row_once(tmp_path, prism_options):
    files = _write(tmp_path / "out", prism_options)
    day_one = [name for name in files if "date=2026-03-01" in name]
    day_two = [name for name in files if "date=2026-03-02" in name]
    assert len(day_one) == shards_for(1000, MAX_ROWS) == 25
    assert day_two == ["alerts/date=2026-03-02/part-000-of-001.parquet"]
    assert all(name.endswith(f"-of-{len(day_one):03d}.parquet") for name in day_one)
    sizes = [pq.read_metadata(path).num_rows for name, path in files.items() if name in day_one]
    assert max(sizes) <= 2 * MAX_ROWS and min(sizes) > 0  # spread by identity: about MAX_ROWS each
    ids = [row for path in files.values() for row in pq.read_table(path, columns=["alert_id"]).column(0).to_pylist()]
    assert sorted(ids) == sorted(row["alert_id"] for row in _alerts())


def test_a_rerun_on_another_runner_writes_the_same_bytes(tmp_path, prism_options):
    def digests(files):
        return {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()}

    prism = digests(_write(tmp_path / "prism", prism_options))
    assert digests(_write(tmp_path / "direct", PipelineOptions(runner="DirectRunner"))) == prism
    assert len(prism) == 26


def test_a_file_size_below_one_row_is_refused():
    with pytest.raises(ValueError, match="max_rows_per_file"):
        SinkConfig(max_rows_per_file=0)
