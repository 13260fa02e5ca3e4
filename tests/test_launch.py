"""`medtwin launch`: the production settings it gives Dataflow and Flink, checked against Beam itself.

Every flag `--dry_run` prints is parsed back by Beam 2.77's own PipelineOptions (WorkerOptions,
GoogleCloudOptions, SetupOptions, FlinkRunnerOptions), so a misspelt or renamed option fails here,
not on the cluster. The Flink options that only Beam's Java runner knows (checkpointing interval,
state backend; declared to the Python SDK by `launch.runners.FlinkFaultToleranceOptions`, since
FlinkRunner sends only declared options) are checked against the FlinkPipelineOptions class of the
job server `make runners` installed. The GPU is checked in the pipeline graph: only the inference step's environment asks for
an accelerator, and nothing asks for one job-wide.
"""

import glob
import re
import zipfile

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import (FlinkRunnerOptions, GoogleCloudOptions, PipelineOptions,
                                                  SetupOptions, WorkerOptions)
from apache_beam.transforms.resources import AcceleratorHint

from launch import engines
from launch.runners import FlinkFaultToleranceOptions, installed_path
from pipelines.cli import build_parser, main
from pipelines.config import JobConfig
from pipelines.graph import build_pipeline

DATAFLOW = ["--engine", "dataflow", "--project", "p", "--region", "europe-west4", "--temp_location", "gs://b/tmp"]
SECURE = ["--service_account_email", "medtwin-worker@p.iam.gserviceaccount.com",
          "--dataflow_kms_key", "projects/p/locations/europe-west4/keyRings/medtwin/cryptoKeys/dataflow",
          "--network", "medtwin", "--subnetwork", "regions/europe-west4/subnetworks/medtwin",
          "--machine_type", "n2-standard-4", "--num_workers", "2", "--max_workers", "20",
          "--autoscaling_algorithm", "THROUGHPUT_BASED"]
IMAGE = "europe-west4-docker.pkg.dev/p/medtwin/medtwin-gpu:abc123"


def _dry_run(capsys, *argv) -> tuple[list[str], str]:
    """(the Beam flags, the inference step's hint line) printed by `medtwin launch ... --dry_run`."""
    assert main(["launch", "--input", "gs://landing", "--demo", *argv, "--dry_run"]) == 0
    flags_line, hint_line = capsys.readouterr().out.splitlines()
    return flags_line.split(": ", 1)[1].split(), hint_line.split("resource hint: accelerator=", 1)[1]


def _unknown_to_beam(flags: list[str]) -> dict:
    """The options in `flags` that no Python PipelineOptions class declares."""
    options = PipelineOptions(flags)
    known = options.get_all_options()
    return {k: v for k, v in options.get_all_options(retain_unknown_options=True).items() if k not in known}


def test_dataflow_security_and_worker_settings_are_beams_own_options(capsys):
    flags, _ = _dry_run(capsys, *DATAFLOW, *SECURE)
    assert _unknown_to_beam(flags) == {}
    options = PipelineOptions(flags)
    cloud, workers = options.view_as(GoogleCloudOptions), options.view_as(WorkerOptions)
    assert cloud.service_account_email == "medtwin-worker@p.iam.gserviceaccount.com"
    assert cloud.dataflow_kms_key == "projects/p/locations/europe-west4/keyRings/medtwin/cryptoKeys/dataflow"
    assert (workers.network, workers.subnetwork) == ("medtwin", "regions/europe-west4/subnetworks/medtwin")
    assert workers.use_public_ips is False  # PHI: private workers unless --use_public_ips
    assert (workers.machine_type, workers.num_workers, workers.max_num_workers) == ("n2-standard-4", 2, 20)
    assert workers.autoscaling_algorithm == "THROUGHPUT_BASED"
    public, _ = _dry_run(capsys, *DATAFLOW, "--use_public_ips")
    assert PipelineOptions(public).view_as(WorkerOptions).use_public_ips is None  # Beam's default: public


def test_the_gpu_is_a_hint_on_the_inference_step_never_job_wide(capsys, tmp_path):
    gpu = ["--gpu", "nvidia-tesla-t4", "--gpu_machine_type", "n1-standard-8"]
    flags, hint = _dry_run(capsys, *DATAFLOW, *gpu, "--sdk_container_image", IMAGE)
    options = PipelineOptions(flags)
    assert not options.view_as(GoogleCloudOptions).dataflow_service_options  # no worker_accelerator
    assert "--resource_hint" not in " ".join(flags) and "worker_accelerator" not in " ".join(flags)
    assert "use_runner_v2" in options.view_as(beam.options.pipeline_options.DebugOptions).experiments
    assert hint == "type:nvidia-tesla-t4;count:1;machine_type:n1-standard-8;install-nvidia-driver"

    args, _ = build_parser().parse_known_args(["launch", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                                               "--demo", *DATAFLOW, *gpu])
    pipeline = beam.Pipeline()
    build_pipeline(pipeline, JobConfig.from_args(args))  # built, never run
    proto = pipeline.to_runner_api()
    with_gpu = {env_id for env_id, env in proto.components.environments.items()
                if AcceleratorHint.urn in env.resource_hints}
    assert {proto.components.environments[e].resource_hints[AcceleratorHint.urn] for e in with_gpu} == {hint.encode()}
    on_gpu = [t.unique_name for t in proto.components.transforms.values() if t.environment_id in with_gpu]
    on_cpu = [t.unique_name for t in proto.components.transforms.values()
              if t.environment_id and t.environment_id not in with_gpu]
    assert on_gpu and all("/RunInference" in name for name in on_gpu), on_gpu
    assert any(name.startswith("Decode") for name in on_cpu)  # the rest of the graph stays on CPU workers


@pytest.mark.parametrize("image", [None, IMAGE])
def test_dataflow_workers_get_medtwin_from_the_image_or_the_setup_file_never_both(capsys, image):
    flags, _ = _dry_run(capsys, *DATAFLOW, *(["--sdk_container_image", image] if image else []))
    options = PipelineOptions(flags)
    staged, pulled = options.view_as(SetupOptions).setup_file, options.view_as(WorkerOptions).sdk_container_image
    assert (staged, pulled) == ((None, image) if image else (engines.SETUP_FILE, None))


def _java_option_getters() -> set[str]:
    """The getters of Beam's Java FlinkPipelineOptions in the installed job server's runner jar."""
    lib = installed_path("flink_job_server_jar").rsplit("/", 1)[0] + "/lib"
    (runner,) = glob.glob(f"{lib}/beam-runners-flink-*.jar")
    with zipfile.ZipFile(runner) as jar:
        constants = jar.read("org/apache/beam/runners/flink/FlinkPipelineOptions.class")
    return {name.decode() for name in re.findall(rb"(?:get|is)[A-Z]\w+", constants)}


def test_flink_parallelism_checkpoints_and_rocksdb_reach_beams_flink_options(capsys):
    flags, hint = _dry_run(capsys, "--engine", "flink", "--flink_master", "flink-jm:8081", "--streaming",
                           "--source", "replay", "--parallelism", "4", "--max_parallelism", "128",
                           "--checkpointing_interval", "30000", "--state_backend", "rocksdb",
                           "--state_backend_storage_path", "s3://b/checkpoints")
    assert _unknown_to_beam(flags) == {}  # FlinkRunner sends declared options only
    options = PipelineOptions(flags)
    flink = options.view_as(FlinkRunnerOptions)
    assert (flink.flink_master, flink.parallelism, flink.max_parallelism) == ("flink-jm:8081", 4, 128)
    assert flink.flink_job_server_jar == installed_path("flink_job_server_jar")  # nothing downloaded
    java_only = {name: value for name, value in options.view_as(FlinkFaultToleranceOptions).get_all_options().items()
                 if name in ("checkpointing_interval", "state_backend", "state_backend_storage_path")}
    assert java_only == {"checkpointing_interval": 30000, "state_backend": "rocksdb",
                         "state_backend_storage_path": "s3://b/checkpoints"}
    # The portable API hands them to Java as camelCase options: each must be a FlinkPipelineOptions getter.
    getters = _java_option_getters()
    for name in java_only:
        camel = "".join(part.title() for part in name.split("_"))
        assert f"get{camel}" in getters, (name, sorted(getters))
    assert hint == "none (CPU)"


def test_a_flink_stream_checkpoints_every_minute_unless_told_and_a_batch_does_not(capsys):
    stream, _ = _dry_run(capsys, "--engine", "flink", "--flink_master", "jm:8081", "--streaming", "--source", "replay")
    batch, _ = _dry_run(capsys, "--engine", "flink", "--flink_master", "jm:8081")
    interval = {flags: PipelineOptions(list(flags)).view_as(FlinkFaultToleranceOptions).checkpointing_interval
                for flags in (tuple(stream), tuple(batch))}
    assert interval == {tuple(stream): engines.STREAMING_CHECKPOINT_MS, tuple(batch): None}


def test_a_flink_docker_environment_runs_the_worker_image(capsys):
    flags, _ = _dry_run(capsys, "--engine", "flink", "--flink_master", "jm:8081", "--environment_type", "DOCKER",
                        "--sdk_container_image", IMAGE)
    portable = PipelineOptions(flags).view_as(beam.options.pipeline_options.PortableOptions)
    assert (portable.environment_type, portable.environment_config) == ("DOCKER", IMAGE)


@pytest.mark.parametrize("argv, message", [
    ([*DATAFLOW, "--dataflow_kms_key", "my-key"], "--dataflow_kms_key must be projects/P/locations/L"),
    ([*DATAFLOW, "--subnetwork", "medtwin"], "--subnetwork must be regions/REGION/subnetworks/NAME"),
    ([*DATAFLOW, "--subnetwork", "regions/us-central1/subnetworks/s"], "is not in --region europe-west4"),
    ([*DATAFLOW, "--autoscaling_algorithm", "NONE", "--max_workers", "5"], "with --autoscaling_algorithm NONE"),
    ([*DATAFLOW, "--num_workers", "9", "--max_workers", "5"], "--num_workers 9 is over --max_workers 5"),
    ([*DATAFLOW, "--gpu_machine_type", "n1-standard-8"], "give --gpu too"),
    (["--engine", "flink"], "Flink needs --flink_master"),
    (["--engine", "flink", "--flink_master", "jm:8081", "--state_backend", "rocksdb"],
     "needs --state_backend_storage_path"),
    (["--engine", "flink", "--flink_master", "jm:8081", "--parallelism", "8", "--max_parallelism", "4"],
     "--max_parallelism 4 is below --parallelism 8"),
])
def test_conflicting_launch_settings_are_refused_with_a_reason(argv, message, capsys):
    assert main(["launch", "--input", "gs://landing", "--demo", *argv, "--dry_run"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--num_workers", "--max_workers", "--parallelism", "--max_parallelism"])
def test_a_zero_worker_or_parallelism_count_is_refused_when_parsed(flag, capsys):
    with pytest.raises(SystemExit):
        main(["launch", "--input", "gs://landing", "--demo", "--engine", "flink", "--flink_master", "jm:8081",
              flag, "0", "--dry_run"])
    assert f"argument {flag}: must be an integer from 1" in capsys.readouterr().err
