"""Session fixtures every test module shares: one Prism and one Flink job service per test session,
and the runner matrix's hospital and runs.

Starting a runner costs seconds (Prism) to a minute (the Flink JVM on 2 busy cores), so they are
started once, here, and every module that submits jobs asks for ``job_endpoints``.

Every test also finds the pseudonymisation key variable as the session began: a key a test hands
to in-process workers through it must not pseudonymise a later test's runs (`restore_key_variable`).
"""

import os
import subprocess

import pytest

from job_services import free_port, wait_for_port
from launch.runners import installed_path
from runner_matrix import RunnerMatrix
from transforms.pseudonymise import KEY_ENV


@pytest.fixture(autouse=True)
def restore_key_variable():
    """``MEDTWIN_PSEUDONYM_KEY`` after each test as it was before it (`resolve_key_reference` sets it)."""
    before = os.environ.get(KEY_ENV)
    yield
    if before is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = before


@pytest.fixture(scope="session")
def job_endpoints(tmp_path_factory):
    """{runner: ``--job_endpoint`` value}: one Prism and one Flink job service for the session."""
    logs = tmp_path_factory.mktemp("job-services")
    prism_port, flink_port = free_port(), free_port()
    commands = {
        "prism": [installed_path("prism"), "--job_port", str(prism_port), "--serve_http=false"],
        "flink": ["java", "-jar", installed_path("flink_job_server_jar"), "--flink-master", "[local]",
                  "--job-port", str(flink_port), "--artifact-port", "0", "--expansion-port", "0",
                  "--artifacts-dir", str(logs / "artifacts")],
    }
    processes = {name: subprocess.Popen(command, stdout=open(logs / f"{name}.log", "wb"), stderr=subprocess.STDOUT)
                 for name, command in commands.items()}
    try:
        wait_for_port(prism_port, processes["prism"])
        wait_for_port(flink_port, processes["flink"])
        yield {"prism": f"localhost:{prism_port}", "flink": f"localhost:{flink_port}"}
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture(scope="session")
def prism_flags(job_endpoints) -> list[str]:
    """Beam flags of a job on the session's Prism, as `medtwin run --runner prism` gives them."""
    from launch.runners import runner_args

    endpoint = [f"--job_endpoint={job_endpoints['prism']}"]
    return runner_args("prism", endpoint) + endpoint


@pytest.fixture(scope="session")
def matrix(tmp_path_factory, job_endpoints):
    """The runner matrix (tests/runner_matrix.py): ``matrix[runner, mode]`` is that run's output folder."""
    return RunnerMatrix(tmp_path_factory.mktemp("matrix"), job_endpoints)
