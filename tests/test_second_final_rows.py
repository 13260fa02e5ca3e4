"""A window final in a table stays final (issue 11 item 5): a later streaming job's final row for it
is never written as a second final row. If it stands for other records than the row there (a job
after a drain saw samples of a window the drain had finalised early) it becomes a dead letter with
a reason and its record count; the same final row again (a replay) adds nothing.

Runs the streaming Parquet sink (`WriteParquetTables`) as three jobs into one folder, on the
DirectRunner and on the session's Prism.
"""

from __future__ import annotations

import datetime as dt
import json

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.query import connect
from schemas import PATIENT_TWIN
from transforms.dead_letters import DEAD_LETTERS
from transforms.parquet_sink import WriteParquetTables
from transforms.sinks import SinkConfig
from twin_fixtures import T0, placeholder_row


def _pane(key: str, minute: int, samples: int, *, final: bool = True, pane_index: int = 2) -> dict:
    start = T0 + dt.timedelta(minutes=minute)
    return placeholder_row(PATIENT_TWIN, patient_key=key, window_start=start, window_end=start + dt.timedelta(minutes=1),
                           pane_index=pane_index, pane_timing="LATE" if final else "EARLY", is_final=final,
                           sample_count=samples)


FIRST = [_pane("K1", 0, 12), _pane("K1", 1, 12), _pane("K2", 0, 12), _pane("K1", 0, 7, final=False, pane_index=0)]
# After a drain: K1's window 0 again as it was, K1's window 1 with 5 samples the first job never saw
# (its final row had 12 others), K2's window 1 for the first time, and a provisional row again.
SECOND = [_pane("K1", 0, 12, pane_index=3), _pane("K1", 1, 5), _pane("K2", 1, 9),
          _pane("K1", 0, 7, final=False, pane_index=0)]


def _job(out, rows, options, job_id):
    config = SinkConfig(output=str(out), streaming=True, job_id=job_id, flush_rows=100, flush_seconds=1)
    with beam.Pipeline(options=options) as pipeline:
        tables = {"patient_twin": pipeline | "Rows" >> beam.Create(rows),
                  DEAD_LETTERS: pipeline | "NoDeadLetters" >> beam.Create([])}
        _ = tables | WriteParquetTables(config)


def _finals(out):
    return connect(str(out)).execute(
        "select patient_key, minute(window_start), sample_count from patient_twin where is_final order by all"
    ).fetchall()


def _dead_letters(out):
    return connect(str(out)).execute(
        "select stage, reason, payload, record_count from dead_letters order by all").fetchall()


@pytest.fixture(params=("direct", "prism"))
def options(request):
    if request.param == "direct":
        return PipelineOptions(runner="DirectRunner")
    return PipelineOptions(request.getfixturevalue("prism_flags"))


def test_a_later_jobs_final_row_for_a_final_window_is_a_dead_letter_not_a_second_row(tmp_path, options):
    out = tmp_path / "out"
    _job(out, FIRST, options, "20260302T070000-aaaaaaaa")
    _job(out, SECOND, options, "20260302T090000-bbbbbbbb")
    assert _finals(out) == [("K1", 0, 12), ("K1", 1, 12), ("K2", 0, 12), ("K2", 1, 9)]
    [(stage, reason, payload, count)] = _dead_letters(out)
    assert (stage, count) == ("sink_patient_twin", 5)
    assert "of patient_key K1 is final already (12 sample_count in the patient_twin row written by job " \
           "20260302T070000-aaaaaaaa); this final row of 5 is not written" in reason
    assert json.loads(payload) == {"patient_key": "K1", "window_start": "2026-03-02T06:01:00+00:00",
                                   "sample_count": 5, "final_sample_count": 12,
                                   "written_by": "job 20260302T070000-aaaaaaaa"}
    provisional = connect(str(out)).execute("select count(*) from patient_twin where not is_final").fetchone()
    assert provisional == (1,)

    # The second job restarted and replaying the same rows adds nothing: no row, no dead letter twice.
    _job(out, SECOND, options, "20260302T100000-cccccccc")
    assert _finals(out) == [("K1", 0, 12), ("K1", 1, 12), ("K2", 0, 12), ("K2", 1, 9)]
    assert len(_dead_letters(out)) == 1
