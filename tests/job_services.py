"""Helpers for the job services the tests start (Prism, Flink's job server): ports, readiness, and
streaming jobs submitted without waiting for them."""

import socket
import subprocess
import time

import apache_beam as beam


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 120) -> None:
    """Returns once `port` accepts connections; fails if `process` exits or `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"job service exited with {process.returncode}"
        with socket.socket() as probe:
            if probe.connect_ex(("localhost", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"no job service on port {port} after {seconds} s")


def start_streaming_job(argv: list[str], runner: str = "prism"):
    """Submits `medtwin run ARGV` (``--job_endpoint`` among them) and returns at once with its
    PipelineResult, for a test to cancel it mid-stream (`PipelineResult.cancel()`)."""
    from launch.runners import runner_args
    from pipelines.cli import build_parser
    from pipelines.config import JobConfig
    from pipelines.graph import build_pipeline
    from pipelines.run import pipeline_options

    args, beam_args = build_parser().parse_known_args(argv)
    config = JobConfig.from_args(args)
    pipeline = beam.Pipeline(options=pipeline_options(runner_args(runner, beam_args) + beam_args, streaming=True))
    build_pipeline(pipeline, config)
    return pipeline.run()


def table_files(out) -> list:
    """The Parquet files of every table under `out` (not those still under ``_temporary``)."""
    return [path for path in out.glob("*/date=*/*.parquet") if "_temporary" not in path.parts]
