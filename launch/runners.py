"""The local runners `make runners` installs, and the Beam flags that select each one.

    medtwin run --runner direct   # Beam's Python DirectRunner (default: the quickest demo)
    medtwin run --runner prism    # Beam's portable Prism runner (Go), as `make runners` built it
    medtwin run --runner flink    # Beam's Flink job server on an embedded Flink cluster ([local])
    medtwin run --runner flink --flink_master localhost:8081   # a running Flink 1.16 session cluster
    # (launch/flink_cluster.sh start|stop|status runs one on this machine: JobManager and TaskManager JVMs)

`make runners` builds Prism with ``go install`` from the Beam Go SDK module at the
Beam version setup.py pins, and assembles Beam's Flink job server from Maven
Central (launch/flink/pom.xml); it writes ``.runners/runners.json`` naming what
it installed, which is all this module reads: nothing is downloaded at run time.

Beam's own runner names pass through too (``--runner PrismRunner``,
``--runner FlinkRunner``, ``--runner DataflowRunner``...); for Prism and Flink the
installed binaries are filled in unless ``--prism_location`` or
``--flink_job_server_jar`` is given, and ``--job_endpoint host:port`` points any
of them at a job service that is already running (the tests start one per session).

Fault tolerance on Flink (Beam's Java FlinkPipelineOptions, declared in `FlinkFaultToleranceOptions` so
the Python SDK sends them; FlinkRunner drops options it does not know):

    medtwin run --runner flink --streaming ... --checkpointing_interval 30000 \
        --state_backend rocksdb --state_backend_storage_path file:///var/lib/medtwin/checkpoints

checkpoints every 30 s the twins' state and the Kafka read positions together (exactly-once state);
a failed task restarts from the last checkpoint (`--number_of_execution_retries`). Without
`--checkpointing_interval` Flink takes no checkpoint and a restart starts from the committed offsets.

Python workers run in the LOOPBACK environment here (no Docker engine): the SDK
harness is this process. In production, Flink task managers start workers with
``--environment_type DOCKER --environment_config IMAGE`` (the worker images of
launch/containers/) or ``--environment_type EXTERNAL --environment_config host:port``
for a worker pool beside each task manager.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from apache_beam.options.pipeline_options import PipelineOptions

RUNNERS = ("direct", "prism", "flink")
# Prism 2.77 splits any bundle that reports no progress for a while ("SDF split", on every stage, not
# only splittable DoFns). Splitting a stateful stage's bundle hands the residual elements of a key to
# a new bundle while the primary still runs that key: the new bundle reads the key's state from
# before the primary's writes, and whichever persists last wins. Seen here as final twin rows of
# consecutive windows missing (the expiry state of one patient lost) in about 3 of 4 streaming runs
# when two jobs share the machine (tests/test_runners.py matrix, tests/test_features.py). Jobs on
# Prism therefore run without runner-initiated splits; nothing medtwin runs needs them.
PRISM_NO_SPLITS = "--experiments=prism_disable_sdf_split"
BEAM_NAMES = {"DirectRunner": "direct", "PrismRunner": "prism", "FlinkRunner": "flink"}
RUNNERS_DIR = Path(os.environ.get("MEDTWIN_RUNNERS", Path(__file__).resolve().parent.parent / ".runners"))
MANIFEST = RUNNERS_DIR / "runners.json"


class FlinkFaultToleranceOptions(PipelineOptions):
    """Flink checkpointing and state backend (Beam's FlinkPipelineOptions, by their snake_case names)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--checkpointing_interval", type=int, default=None,
                            help="Flink: milliseconds between checkpoints of state and source positions [none]")
        parser.add_argument("--checkpointing_mode", choices=("EXACTLY_ONCE", "AT_LEAST_ONCE"), default=None,
                            help="Flink: checkpoint barriers aligned (exactly once) or not [EXACTLY_ONCE]")
        parser.add_argument("--state_backend", choices=("rocksdb", "filesystem"), default=None,
                            help="Flink: where operator state lives between checkpoints [heap]")
        parser.add_argument("--state_backend_storage_path", default=None,
                            help="Flink: checkpoint storage URI for --state_backend (file://, gs://, hdfs://)")
        parser.add_argument("--number_of_execution_retries", type=int, default=None,
                            help="Flink: restarts of a failed job from its last checkpoint [Flink's default]")


class RunnerNotInstalled(RuntimeError):
    """A local runner was asked for that `make runners` has not installed."""


def installed() -> dict:
    """What `make runners` installed: ``{"prism": path, "flink_job_server_jar": path, versions...}``."""
    try:
        return json.loads(MANIFEST.read_text())
    except FileNotFoundError:
        raise RunnerNotInstalled(f"no local runners installed ({MANIFEST} is missing): run `make runners`") from None


def installed_path(name: str) -> str:
    """The installed artefact `name` ("prism" or "flink_job_server_jar"), checked to exist."""
    path = installed().get(name)
    if not path or not Path(path).is_file():
        raise RunnerNotInstalled(f"{name} is not installed (looked for {path!r}): run `make runners`")
    return path


def runner_kind(runner: str | None) -> str | None:
    """direct / prism / flink for medtwin's or Beam's name of a local runner; None for any other runner."""
    if runner is None:
        return "direct"
    return runner if runner in RUNNERS else BEAM_NAMES.get(runner)


def runner_args(runner: str, beam_args: list[str]) -> list[str]:
    """The Beam flags that run a job on `runner`, before the user's own `beam_args` (which win)."""
    given = {arg.split("=", 1)[0] for arg in beam_args if arg.startswith("--")}
    kind = runner_kind(runner)
    if kind is None:  # DataflowRunner, PortableRunner, ...: Beam's flags as typed
        return [f"--runner={runner}"]
    if kind == "direct":
        return ["--runner=DirectRunner"]
    args = ["--runner=PrismRunner" if kind == "prism" else "--runner=FlinkRunner"]
    if "--environment_type" not in given:
        args.append("--environment_type=LOOPBACK")
    if kind == "prism":
        args.append(PRISM_NO_SPLITS)
    if "--job_endpoint" in given:
        return args
    if kind == "prism" and "--prism_location" not in given:
        args.append(f"--prism_location={installed_path('prism')}")
    if kind == "flink":
        if "--flink_job_server_jar" not in given:
            args.append(f"--flink_job_server_jar={installed_path('flink_job_server_jar')}")
        if "--flink_master" not in given:
            args.append("--flink_master=[local]")
    return args


def has_test_clock(runner: str | None) -> bool:
    """Whether a TestStream replay may advance processing time on `runner`.

    Flink's runner refuses TestStream processing-time advances ("Advancing Processing time is
    not supported by the Flink Runner"): there a replay runs on the live clock, early panes fire
    by wall-clock time and a partial inference batch is flushed by `--inference_max_wait`.
    """
    return runner_kind(runner) != "flink"
