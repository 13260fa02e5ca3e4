"""The standalone Flink session cluster (launch/flink_cluster.sh) runs the twin as the DirectRunner does.

One cluster for the session: a JobManager and a TaskManager as two JVMs on loopback, started by the
script exactly as a user would (on free ports, its state in a temporary folder), stopped at the end.
The demo-sized hospital is submitted with `medtwin launch --engine flink --flink_master localhost:PORT`
(Beam's Flink job server from `make runners`, LOOPBACK Python workers) and its tables are compared
with the DirectRunner's on the same input, column for column as the runner matrix compares them
(tests/test_runners.py says which columns are left out and why). The cluster's REST API shows the
job ran there, not on an embedded Flink.
"""

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.cli import main
from job_services import free_port as _free_port
from test_runners import PANE_FIELDS, _alerts, _dead_letter_counts, _rows

SCRIPT = Path(__file__).resolve().parent.parent / "launch" / "flink_cluster.sh"


def _script(command: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=300)


def _rest(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.load(response)


@pytest.fixture(scope="session")
def flink_cluster(tmp_path_factory):
    """{"port", "env", "start_s"}: a running session cluster; stopped, and checked stopped, at the end."""
    state = tmp_path_factory.mktemp("flink-cluster")
    port = _free_port()
    env = {**os.environ, "MEDTWIN_FLINK_CLUSTER": str(state), "MEDTWIN_FLINK_REST_PORT": str(port),
           "MEDTWIN_FLINK_RPC_PORT": str(_free_port())}
    started = time.monotonic()
    up = _script("start", env)
    assert up.returncode == 0, up.stderr + "".join(p.read_text()[-3000:] for p in (state / "log").glob("*.log"))
    cluster = {"port": port, "env": env, "state": state, "start_s": time.monotonic() - started}
    try:
        yield cluster
    finally:
        assert _script("stop", env).returncode == 0
        assert _script("status", env).returncode != 0  # both JVMs gone


@pytest.fixture(scope="session")
def hospital_outputs(matrix, flink_cluster):
    """{"direct", "cluster": output folder} of the runner matrix's hospital (it has X-rays with lesions), batch:
    the DirectRunner's run is the matrix's own (tests/runner_matrix.py), run once per session."""
    out = matrix.root / "cluster"
    assert main(["launch", "--input", str(matrix.hospital), "--demo", "--model_per_process", "--output", str(out),
                 "--engine", "flink", "--flink_master", f"localhost:{flink_cluster['port']}",
                 "--job_name", "medtwin-cluster-test"]) == 0
    return {"direct": matrix["direct", "batch"], "cluster": out}


def test_the_cluster_is_a_jobmanager_and_a_taskmanager_jvm_on_loopback(flink_cluster):
    pids = {name: int((flink_cluster["state"] / f"{name}.pid").read_text()) for name in ("jobmanager", "taskmanager")}
    assert pids["jobmanager"] != pids["taskmanager"]
    for name, pid in pids.items():
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        main_class = {"jobmanager": b"org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint",
                      "taskmanager": b"org.apache.flink.runtime.taskexecutor.TaskManagerRunner"}[name]
        assert main_class in command, (name, command)
    overview = _rest(flink_cluster["port"], "/overview")
    assert overview["taskmanagers"] == 1 and overview["flink-version"].startswith("1.16")
    (taskmanager,) = _rest(flink_cluster["port"], "/taskmanagers")["taskmanagers"]
    assert taskmanager["path"].startswith("akka.tcp://flink@127.0.0.1:")  # a separate JVM, reached over RPC
    assert _script("status", flink_cluster["env"]).returncode == 0
    assert _script("start", flink_cluster["env"]).returncode != 0  # a second start is refused


def test_launch_on_the_cluster_gives_the_direct_runners_tables(hospital_outputs, flink_cluster):
    direct, cluster = hospital_outputs["direct"], hospital_outputs["cluster"]
    jobs = _rest(flink_cluster["port"], "/jobs/overview")["jobs"]
    assert [job["state"] for job in jobs if job["name"].startswith("medtwin-cluster-test")] == ["FINISHED"]
    for table in ("patient_twin", "device_twin"):
        expected = _rows(direct, table, leave_out=PANE_FIELDS, where="where is_final")
        assert expected, f"no final {table} rows: nothing compared"
        assert _rows(cluster, table, leave_out=PANE_FIELDS, where="where is_final") == expected, table
    detections = _rows(direct, "detections", leave_out=("inference_latency_ms",))
    assert detections, "no detections: imaging was not exercised"
    assert _rows(cluster, "detections", leave_out=("inference_latency_ms",)) == detections
    assert _alerts(direct) and _alerts(cluster) == _alerts(direct)
    assert _dead_letter_counts(direct) and _dead_letter_counts(cluster) == _dead_letter_counts(direct)
