"""Beam options for each engine medtwin runs on.

Dataflow (Google Cloud): launched from a source checkout, the package is staged
with ``--setup_file``, so workers run the launching code; launched from an
installed medtwin (the worker image itself, as launch/schedule/ does) there is no
setup.py to stage and the ``--sdk_container_image`` must hold the package.
Streaming jobs read Pub/Sub and write BigQuery. The imaging step's GPU pool
comes from a resource hint on that step only (see the imaging path), served by
``--dataflow_service_options=worker_accelerator=type:...;count:1;install-nvidia-driver``
and a custom ``--sdk_container_image`` with a CUDA build of torch
(launch/containers/Dockerfile.gpu; CPU workers: launch/containers/Dockerfile).

Flink: the portable FlinkRunner submits to ``--flink_master`` through a Beam
job server (downloaded as a jar on first use, so it needs Maven Central from
the launching machine); Python workers run as Docker containers or as
processes on the task managers (``--environment_type``). Kafka sources are
cross-language and also need the Java expansion service.

Local: the DirectRunner, or Beam's PortableRunner with the embedded job
service (`--job_endpoint embed`), which exercises the same portable path as
Flink without a cluster.
"""

from __future__ import annotations

import dataclasses
import os

ENGINES = ("direct", "portable", "dataflow", "flink")
SETUP_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """What an engine needs to accept a job.

    Attributes:
      engine: direct, portable, dataflow or flink.
      job_name: shown in the engine's UI.
      project, region, temp_location: Dataflow.
      sdk_container_image: custom worker image (Dataflow, Flink with Docker).
      gpu: Dataflow accelerator, e.g. "nvidia-tesla-t4" (drivers installed by Dataflow).
      max_workers: Dataflow autoscaling ceiling.
      flink_master: Flink REST endpoint host:port.
      environment_type: portable/Flink worker environment: DOCKER, PROCESS, LOOPBACK.
    """

    engine: str = "direct"
    job_name: str = "medtwin"
    project: str | None = None
    region: str | None = None
    temp_location: str | None = None
    sdk_container_image: str | None = None
    gpu: str | None = None
    max_workers: int | None = None
    flink_master: str | None = None
    environment_type: str = "LOOPBACK"

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose from {', '.join(ENGINES)}")
        if self.engine == "dataflow":
            missing = [name for name in ("project", "region", "temp_location") if not getattr(self, name)]
            if missing:
                raise ValueError(f"Dataflow needs --{' --'.join(missing)}")
            if not self.temp_location.startswith("gs://"):
                raise ValueError(f"Dataflow's --temp_location must be a gs:// path, got {self.temp_location}")
            if not os.path.exists(SETUP_FILE) and not self.sdk_container_image:
                raise ValueError("this medtwin is installed, not a source checkout, so there is no setup.py to "
                                 "stage on the workers: give --sdk_container_image with medtwin in it "
                                 "(launch/containers/)")
        if self.engine == "flink" and not self.flink_master:
            raise ValueError("Flink needs --flink_master host:port")


def beam_args(config: EngineConfig, *, streaming: bool) -> list[str]:
    """The PipelineOptions flags for `config`."""
    args = [f"--job_name={config.job_name}"]
    if streaming:
        args.append("--streaming")
    if config.engine == "direct":
        return args + ["--runner=DirectRunner"]
    if config.engine == "portable":
        return args + ["--runner=PortableRunner", "--job_endpoint=embed",
                       f"--environment_type={config.environment_type}"]
    if config.engine == "flink":
        args += ["--runner=FlinkRunner", f"--flink_master={config.flink_master}",
                 f"--environment_type={config.environment_type}"]
        if config.sdk_container_image:
            args.append(f"--environment_config={config.sdk_container_image}")
        return args
    args += ["--runner=DataflowRunner", f"--project={config.project}", f"--region={config.region}",
             f"--temp_location={config.temp_location}", *_package_args(), "--experiments=use_runner_v2"]
    if config.sdk_container_image:
        args.append(f"--sdk_container_image={config.sdk_container_image}")
    if config.max_workers:
        args.append(f"--max_num_workers={config.max_workers}")
    if config.gpu:
        args.append(f"--dataflow_service_options=worker_accelerator=type:{config.gpu};count:1;install-nvidia-driver")
    if streaming:
        args.append("--enable_streaming_engine")
    return args


def _package_args() -> list[str]:
    """How Dataflow workers get medtwin: the checkout's setup.py if launched from one, else the image's copy."""
    return [f"--setup_file={SETUP_FILE}"] if os.path.exists(SETUP_FILE) else []


def add_engine_arguments(parser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--engine", choices=ENGINES, default="direct", help="where to run [%(default)s]")
    group.add_argument("--job_name", default="medtwin", help="job name [%(default)s]")
    group.add_argument("--project", help="Dataflow: Google Cloud project")
    group.add_argument("--region", help="Dataflow: region, e.g. europe-west4")
    group.add_argument("--temp_location", help="Dataflow: gs:// staging and temp path")
    group.add_argument("--sdk_container_image", help="custom worker image (see launch/containers/)")
    group.add_argument("--gpu", help="Dataflow: accelerator type for the imaging step, e.g. nvidia-tesla-t4")
    group.add_argument("--max_workers", type=int, help="Dataflow: autoscaling ceiling")
    group.add_argument("--flink_master", help="Flink: REST endpoint host:port")
    group.add_argument("--environment_type", default="LOOPBACK", choices=("DOCKER", "PROCESS", "LOOPBACK"),
                       help="portable/Flink worker environment [%(default)s]")
    group.add_argument("--dry_run", action="store_true", help="print the engine flags and the job; submit nothing")


def engine_config(args) -> EngineConfig:
    return EngineConfig(
        engine=args.engine, job_name=args.job_name, project=args.project, region=args.region,
        temp_location=args.temp_location, sdk_container_image=args.sdk_container_image, gpu=args.gpu,
        max_workers=args.max_workers, flink_master=args.flink_master, environment_type=args.environment_type)
