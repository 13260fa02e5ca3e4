"""A streaming job cancelled mid-stream on Prism, then run again over the same input (issue 11 item 4).

A cancel stops a job where it is: no drain, the watermark does not jump to the end of time, so no
window is finalised early and no timer fires for the rest of the data. What it has written must
stay readable (every file in a table is a whole Parquet file: flushes land by rename) and hold no
window twice; the job run again replays the input from the start into the same output and the
tables end as an uninterrupted run's: every final twin row equal to the batch run's (batch and
streaming final rows are equal, tests/test_runners.py), none doubled, no alert twice.

The job is cancelled through Beam's own `PipelineResult.cancel()` on the job service, as an operator
cancels a Flink or Dataflow job.
"""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest
from apache_beam.runners.runner import PipelineState

import test_pipeline as accounting  # its counting helpers, as a module: none of its fixtures come along
from job_services import start_streaming_job, table_files
from pipelines.cli import main
from pipelines.query import connect

TWINS = {"patient_twin": "patient_key", "device_twin": "device_id"}
PANE_FIELDS = ("pane_index", "pane_timing", "date")


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    root = tmp_path_factory.mktemp("cancel")
    assert main(["simulate", "--out", str(root / "in"), "--patients", "3", "--devices", "1", "--hours", "1",
                 "--seed", "21", "--corrupt-fraction", "0.01", "--quiet"]) == 0
    assert main(["run", "--input", str(root / "in"), "--output", str(root / "batch"), "--demo", "--no_imaging"]) == 0
    return root


def _streaming_argv(hospital, job_endpoint):
    return ["run", "--input", str(hospital / "in"), "--output", str(hospital / "out"), "--demo", "--no_imaging",
            "--streaming", "--runner", "prism", f"--job_endpoint={job_endpoint}"]


def _final_rows(out, table):
    connection = connect(str(out))
    columns = [name for (name,) in connection.execute(f"select column_name from (describe {table})").fetchall()
               if name not in PANE_FIELDS]
    return connection.execute(f"select {', '.join(columns)} from {table} where is_final order by all").fetchall()


def _doubled_windows(out, table):
    return accounting._doubled_final_windows(connect(str(out)), table, TWINS[table])


def test_a_cancelled_stream_run_again_ends_as_an_uninterrupted_run(hospital, job_endpoints):
    out = hospital / "out"
    result = start_streaming_job(_streaming_argv(hospital, job_endpoints["prism"]))
    deadline = time.monotonic() + 300
    while not table_files(out) and time.monotonic() < deadline and not PipelineState.is_terminal(result.state):
        time.sleep(0.5)
    assert not PipelineState.is_terminal(result.state), "the stream ended before anything was written"
    assert table_files(out), "nothing was flushed within 300 s"
    result.cancel()
    with pytest.raises(RuntimeError, match="CANCELLED"):  # the portable runner raises for every end but DONE
        result.wait_until_finish()
    assert result.state == PipelineState.CANCELLED

    left = table_files(out)
    assert all(pq.read_metadata(path).num_rows >= 0 for path in left)  # whole Parquet files only
    assert all(_doubled_windows(out, table) == 0 for table in TWINS)
    cut_short = len(_final_rows(out, "patient_twin")) < len(_final_rows(hospital / "batch", "patient_twin"))
    assert cut_short, "the cancel came after the last window was final: nothing was left to finish"

    assert main(_streaming_argv(hospital, job_endpoints["prism"])) == 0
    for table in TWINS:
        assert _final_rows(out, table) == _final_rows(hospital / "batch", table), table
        assert _doubled_windows(out, table) == 0, table
    connection = connect(str(out))
    assert connection.execute("select count(*) - count(distinct alert_id) from alerts").fetchone()[0] == 0
