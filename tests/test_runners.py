"""The runner matrix: one small simulated hospital through direct, prism and flink, batch and streaming.

Each real runner's job service is started once for the session (Prism's binary, Beam's Flink job
server on an embedded Flink cluster, both from `make runners`) and every job is submitted to it
with `--job_endpoint`, exactly as `medtwin run --runner prism|flink` would, minus the start-up.
Nothing here is skipped: without `make runners` the fixtures fail.

What must be identical across runners: every final patient_twin and device_twin row, every
detections row, the dead-letter counts by stage and reason, and (batch) every alert. Columns that
legitimately differ are left out, each with its reason:
  pane_index, pane_timing    which non-final panes a window had depends on the runner's bundles
  inference_latency_ms       wall-clock time of the model call
  batch_size                 how many images shared the model call: streaming batches follow bundles
  alert evidence's pane fields   a streaming alert names the pane that first raised it
Streaming sensor_stale alerts are compared between the two real runners only: the DirectRunner
does not hold the gate's output watermark for its pending tick timer, so its watermark runs up to
a tick ahead of Prism's and Flink's and fires stale timers that a later upload would have cancelled.
For the same reason a streaming detection's device-quality join can give up on the device's final
row before it arrives there ('device state unknown'); the DirectRunner's streaming detections are
compared with that one exception, the real runners' exactly.
"""

import datetime as dt
import json

import pytest

from pipelines.query import connect
from runner_matrix import MODES, RUNNERS, SILENCE
from transforms.triage import UNKNOWN_DEVICE_STATE

PANE_FIELDS = ("pane_index", "pane_timing")
RUNTIME_DETECTION_FIELDS = ("inference_latency_ms", "batch_size")


def _rows(out, table: str, *, leave_out=(), where: str = "") -> list:
    connection = connect(str(out))
    columns = [name for (name,) in connection.execute(f"select column_name from (describe {table})").fetchall()
               if name not in leave_out]
    rows = connection.execute(f"select {', '.join(columns)} from {table} {where}").fetchall()
    return sorted(rows, key=repr)


def _alerts(out, *, kinds_left_out=()) -> list:
    rows = []
    for row in _rows(out, "alerts"):
        *fields, evidence, date = row
        evidence = {k: v for k, v in json.loads(evidence).items() if k not in ("pane_index", "is_final")}
        rows.append((*fields, evidence, date))
    return sorted((r for r in rows if r[1] not in kinds_left_out), key=repr)


def _dead_letter_counts(out) -> list:
    return connect(str(out)).execute(
        "select stage, reason, sum(record_count) from dead_letters group by all order by all").fetchall()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("runner", ("prism", "flink"))
def test_final_twin_rows_detections_and_dead_letters_equal_the_direct_runners(matrix, runner, mode):
    direct, real = matrix["direct", mode], matrix[runner, mode]
    for table in ("patient_twin", "device_twin"):
        expected = _rows(direct, table, leave_out=PANE_FIELDS, where="where is_final")
        assert expected, f"no final {table} rows: nothing compared"
        assert _rows(real, table, leave_out=PANE_FIELDS, where="where is_final") == expected, table
    assert _dead_letter_counts(real) == _dead_letter_counts(direct)
    if mode == "batch":
        detections = _rows(direct, "detections", leave_out=RUNTIME_DETECTION_FIELDS)
        assert detections, "no detections: imaging was not exercised"
        assert _rows(real, "detections", leave_out=RUNTIME_DETECTION_FIELDS) == detections


def test_streaming_detections_are_the_same_on_prism_and_flink(matrix):
    prism = _rows(matrix["prism", "streaming"], "detections", leave_out=RUNTIME_DETECTION_FIELDS)
    assert prism, "no streaming detections: imaging was not exercised"
    assert _rows(matrix["flink", "streaming"], "detections", leave_out=RUNTIME_DETECTION_FIELDS) == prism


def test_streaming_detections_on_the_direct_runner_differ_only_by_an_unknown_device_state(matrix):
    """The DirectRunner fires the quality join's deadline before the device's final row arrives.

    Without a watermark hold for the device twin's pending expiry timer, the join's deadline
    (just after that row is due) can fire first, so the detection is flagged 'device state
    unknown'. Everything else in the row, the model's output included, must be identical.
    """
    quality = ("quality_flag", "quality_reasons")
    real = {row[0]: row for row in _rows(matrix["prism", "streaming"], "detections",
                                         leave_out=RUNTIME_DETECTION_FIELDS)}
    columns = [name for (name,) in connect(str(matrix["prism", "streaming"])).execute(
        "select column_name from (describe detections)").fetchall() if name not in RUNTIME_DETECTION_FIELDS]
    direct = _rows(matrix["direct", "streaming"], "detections", leave_out=RUNTIME_DETECTION_FIELDS)
    assert sorted(real) == sorted(row[0] for row in direct)
    for row in direct:
        fields, expected = dict(zip(columns, row)), dict(zip(columns, real[row[0]]))
        if fields["quality_reasons"] != expected["quality_reasons"]:
            assert fields["quality_reasons"] == [UNKNOWN_DEVICE_STATE], fields["sop_instance_uid"]
        assert {k: v for k, v in fields.items() if k not in quality} == \
               {k: v for k, v in expected.items() if k not in quality}


@pytest.mark.parametrize("runner", ("prism", "flink"))
def test_batch_alerts_are_the_same_on_every_runner(matrix, runner):
    assert _alerts(matrix["direct", "batch"])
    assert _alerts(matrix[runner, "batch"]) == _alerts(matrix["direct", "batch"])


@pytest.mark.parametrize("runner", ("prism", "flink"))
def test_streaming_raises_the_batch_stale_alerts_and_none_at_the_end_of_input(matrix, runner):
    # The watermark jumps to the end of time when the replay ends and fires every patient's stale
    # timer; only the silence cut into the hospital (SILENCE) is one.
    batch = [alert for alert in _alerts(matrix["direct", "batch"]) if alert[1] == "sensor_stale"]
    assert len(batch) == 1 and SILENCE[0] < batch[0][5].astimezone(dt.timezone.utc) < SILENCE[1], batch
    streaming = [alert for alert in _alerts(matrix[runner, "streaming"]) if alert[1] == "sensor_stale"]
    assert [alert[0] for alert in streaming] == [alert[0] for alert in batch]


def test_streaming_alerts_are_the_same_on_prism_and_flink(matrix):
    prism = _alerts(matrix["prism", "streaming"])
    assert prism and prism == _alerts(matrix["flink", "streaming"])
    # Apart from the DirectRunner's early stale timers (see the module docstring), direct agrees too.
    assert (_alerts(matrix["direct", "streaming"], kinds_left_out=("sensor_stale",))
            == _alerts(matrix["prism", "streaming"], kinds_left_out=("sensor_stale",)))


@pytest.mark.parametrize("runner", RUNNERS)
def test_no_window_has_two_final_rows(matrix, runner):
    for table, key in (("patient_twin", "patient_key"), ("device_twin", "device_id")):
        doubled = connect(str(matrix[runner, "streaming"])).execute(
            f"select {key}, window_start, count(*) from {table} where is_final group by all having count(*) > 1"
        ).fetchall()
        assert doubled == [], (table, doubled)


@pytest.mark.parametrize("extra", ([], ["--job_endpoint=localhost:8073"]))
def test_prism_jobs_run_without_runner_initiated_splits(extra):
    """Prism 2.77 splits slow bundles of any stage, stateful ones included, and the split-off elements of
    a key then read the key's state from before the bundle still running it (launch/runners.py): every
    job medtwin sends to Prism, through its own binary or a job service, asks for no splits."""
    from apache_beam.options.pipeline_options import DebugOptions, PipelineOptions

    from launch.runners import runner_args

    for runner in ("prism", "PrismRunner"):
        options = PipelineOptions(runner_args(runner, extra) + extra)
        assert "prism_disable_sdf_split" in options.view_as(DebugOptions).experiments, runner
    flink = PipelineOptions(runner_args("flink", extra) + extra).view_as(DebugOptions).experiments or []
    assert "prism_disable_sdf_split" not in flink
