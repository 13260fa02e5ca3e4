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
  alert evidence's pane fields   a streaming alert names the pane that first raised it
Streaming sensor_stale alerts are compared between the two real runners only: the DirectRunner
does not hold the gate's output watermark for its pending tick timer, so its watermark runs up to
a tick ahead of Prism's and Flink's and fires stale timers that a later upload would have cancelled.
"""

import json
import socket
import subprocess
import time

import pytest

from launch.runners import installed_path
from pipelines.cli import main
from pipelines.query import connect

RUNNERS = ("direct", "prism", "flink")
MODES = ("batch", "streaming")
PANE_FIELDS = ("pane_index", "pane_timing")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"job service exited with {process.returncode}"
        with socket.socket() as probe:
            if probe.connect_ex(("localhost", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"no job service on port {port} after {seconds} s")


@pytest.fixture(scope="session")
def job_endpoints(tmp_path_factory):
    """{runner: ``--job_endpoint`` value}: one Prism and one Flink job service for the session."""
    logs = tmp_path_factory.mktemp("job-services")
    prism_port, flink_port = _free_port(), _free_port()
    commands = {
        "prism": [installed_path("prism"), "--job_port", str(prism_port), "--serve_http=false"],
        "flink": ["java", "-jar", installed_path("flink_job_server_jar"), "--flink-master", "[local]",
                  "--job-port", str(flink_port), "--artifact-port", "0", "--expansion-port", "0",
                  "--artifacts-dir", str(logs / "artifacts")],
    }
    processes = {name: subprocess.Popen(command, stdout=open(logs / f"{name}.log", "wb"), stderr=subprocess.STDOUT)
                 for name, command in commands.items()}
    try:
        _wait_for_port(prism_port, processes["prism"])
        _wait_for_port(flink_port, processes["flink"])
        yield {"prism": f"localhost:{prism_port}", "flink": f"localhost:{flink_port}"}
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture(scope="session")
def matrix(tmp_path_factory, job_endpoints):
    """{(runner, mode): output folder} for the same hospital."""
    root = tmp_path_factory.mktemp("matrix")
    hospital = root / "in"
    assert main(["simulate", "--out", str(hospital), "--patients", "6", "--devices", "2", "--hours", "1",
                 "--seed", "7", "--corrupt-fraction", "0.01"]) == 0
    outputs = {}
    for mode in MODES:
        for runner in RUNNERS:
            out = root / f"{runner}-{mode}"
            argv = ["run", "--input", str(hospital), "--output", str(out), "--demo", "--runner", runner,
                    "--model_per_process"]
            if mode == "streaming":
                argv.append("--streaming")
            if runner in job_endpoints:
                argv.append(f"--job_endpoint={job_endpoints[runner]}")
            assert main(argv) == 0, (runner, mode)
            outputs[runner, mode] = out
    return outputs


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
        detections = _rows(direct, "detections", leave_out=("inference_latency_ms",))
        assert detections, "no detections: imaging was not exercised"
        assert _rows(real, "detections", leave_out=("inference_latency_ms",)) == detections


@pytest.mark.xfail(strict=True, reason="open (issue 11): streaming detections rows differ between the "
                   "DirectRunner and Prism/Flink; not yet diagnosed")
@pytest.mark.parametrize("runner", ("prism", "flink"))
def test_streaming_detections_equal_the_direct_runners(matrix, runner):
    detections = _rows(matrix["direct", "streaming"], "detections", leave_out=("inference_latency_ms",))
    assert detections
    assert _rows(matrix[runner, "streaming"], "detections", leave_out=("inference_latency_ms",)) == detections


@pytest.mark.parametrize("runner", ("prism", "flink"))
def test_batch_alerts_are_the_same_on_every_runner(matrix, runner):
    assert _alerts(matrix["direct", "batch"])
    assert _alerts(matrix[runner, "batch"]) == _alerts(matrix["direct", "batch"])


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
