"""Beam options for each engine medtwin runs on, checked before anything is submitted.

Dataflow (Google Cloud). The workers get medtwin from exactly one place: the custom worker
image (``--sdk_container_image``, launch/containers/) when one is given, else the checkout's
``--setup_file``; never both, since a package staged over an image is installed on every worker
start and shadows the image's code. A workload that carries PHI runs under its own service
account (``--service_account_email``), with a customer-managed key for the job's state and
shuffle (``--dataflow_kms_key``), on a private subnetwork, and with no public IPs on the workers
(the default here; ``--use_public_ips`` turns it off). Worker machine type, initial and maximum
workers and the autoscaling algorithm are Beam's ``WorkerOptions``. The imaging step's GPU comes
from the accelerator resource hint of the inference step only (``--gpu``, optionally
``--gpu_machine_type``): Dataflow's right fitting then runs that step on a GPU pool and every
other step on the ordinary workers. The job-wide ``worker_accelerator`` service option is never
set: Dataflow says not to combine it with right fitting, and it would put a GPU on every worker.
The GPU image (launch/containers/Dockerfile.gpu) holds a CUDA build of torch.

Flink. The portable FlinkRunner submits to ``--flink_master`` through Beam's Flink job server,
the jar `make runners` installs (launch/runners.py; nothing is downloaded at run time).
``launch/flink_cluster.sh start`` runs a standalone session cluster on this machine. Python
workers run as Docker containers on the task managers (``--environment_type DOCKER`` with the
worker image), beside them as a worker pool (``EXTERNAL``, ``--environment_config host:port``),
or, on one machine, LOOPBACK/PROCESS. Parallelism and max parallelism are Beam's
``FlinkRunnerOptions``; the checkpointing interval and state backend are options of Beam's Java
``FlinkPipelineOptions`` (``checkpointingInterval``, ``stateBackend``, ``stateBackendStoragePath``),
sent through the portable API under their snake_case names (declared to the Python SDK by
`launch.runners.FlinkFaultToleranceOptions`; ``--checkpointing_mode`` and
``--number_of_execution_retries`` pass through as Beam flags). A streaming job checkpoints every
minute unless told otherwise (Kafka offsets are committed on checkpoints). Kafka sources are
cross-language and also need the Java expansion service.

Local: the DirectRunner, or Beam's PortableRunner with the embedded job service
(`--job_endpoint embed`), which exercises the same portable path as Flink without a cluster.
"""

from __future__ import annotations

import dataclasses
import os
import re

ENGINES = ("direct", "portable", "dataflow", "flink")
SETUP_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
AUTOSCALING = ("THROUGHPUT_BASED", "NONE")
STATE_BACKENDS = ("rocksdb", "filesystem")
STREAMING_CHECKPOINT_MS = 60_000
KMS_KEY = re.compile(r"projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+")
SUBNETWORK = re.compile(r"(https://www\.googleapis\.com/compute/v1/projects/[^/]+/)?regions/[^/]+/subnetworks/[^/]+")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """What an engine needs to accept a job.

    Attributes:
      engine: direct, portable, dataflow or flink.
      job_name: shown in the engine's UI.
      project, region, temp_location: Dataflow.
      sdk_container_image: custom worker image (Dataflow, Flink with Docker).
      gpu: Dataflow accelerator of the inference step, e.g. "nvidia-tesla-t4" (drivers installed by Dataflow).
      gpu_machine_type: Dataflow machine type of the inference step's GPU workers (right fitting).
      service_account_email, dataflow_kms_key, network, subnetwork, use_public_ips: Dataflow security.
      machine_type, num_workers, max_workers, autoscaling_algorithm: Dataflow worker pool.
      flink_master: Flink REST endpoint host:port.
      environment_type: portable/Flink worker environment: DOCKER, PROCESS, EXTERNAL, LOOPBACK.
      parallelism, max_parallelism: Flink (max parallelism bounds later rescaling of keyed state).
      checkpointing_interval: Flink checkpoint interval in ms (None: every minute in streaming, none in batch).
      state_backend, state_backend_storage_path: Flink state backend and its checkpoint storage URI.
    """

    engine: str = "direct"
    job_name: str = "medtwin"
    project: str | None = None
    region: str | None = None
    temp_location: str | None = None
    sdk_container_image: str | None = None
    gpu: str | None = None
    gpu_machine_type: str | None = None
    service_account_email: str | None = None
    dataflow_kms_key: str | None = None
    network: str | None = None
    subnetwork: str | None = None
    use_public_ips: bool = False
    machine_type: str | None = None
    num_workers: int | None = None
    max_workers: int | None = None
    autoscaling_algorithm: str | None = None
    flink_master: str | None = None
    environment_type: str = "LOOPBACK"
    parallelism: int | None = None
    max_parallelism: int | None = None
    checkpointing_interval: int | None = None
    state_backend: str | None = None
    state_backend_storage_path: str | None = None

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose from {', '.join(ENGINES)}")
        if self.engine == "dataflow":
            self._check_dataflow()
        if self.engine == "flink":
            self._check_flink()

    def _check_dataflow(self):
        missing = [name for name in ("project", "region", "temp_location") if not getattr(self, name)]
        if missing:
            raise ValueError(f"Dataflow needs --{' --'.join(missing)}")
        if not self.temp_location.startswith("gs://"):
            raise ValueError(f"Dataflow's --temp_location must be a gs:// path, got {self.temp_location}")
        if not os.path.exists(SETUP_FILE) and not self.sdk_container_image:
            raise ValueError("this medtwin is installed, not a source checkout, so there is no setup.py to "
                             "stage on the workers: give --sdk_container_image with medtwin in it "
                             "(launch/containers/)")
        if self.dataflow_kms_key and not KMS_KEY.fullmatch(self.dataflow_kms_key):
            raise ValueError("--dataflow_kms_key must be projects/P/locations/L/keyRings/R/cryptoKeys/K, "
                             f"got {self.dataflow_kms_key!r}")
        if self.subnetwork:
            if not SUBNETWORK.fullmatch(self.subnetwork):
                raise ValueError("--subnetwork must be regions/REGION/subnetworks/NAME or its full "
                                 f"https://www.googleapis.com/compute/v1/projects/P/... URL, got {self.subnetwork!r}")
            if f"regions/{self.region}/" not in self.subnetwork:
                raise ValueError(f"--subnetwork {self.subnetwork} is not in --region {self.region}")
        if self.gpu_machine_type and not self.gpu:
            raise ValueError("--gpu_machine_type is the machine of the GPU step: give --gpu too")
        if self.autoscaling_algorithm == "NONE" and self.max_workers:
            raise ValueError("--max_workers is an autoscaling ceiling; with --autoscaling_algorithm NONE "
                             "give --num_workers only")
        if self.num_workers and self.max_workers and self.num_workers > self.max_workers:
            raise ValueError(f"--num_workers {self.num_workers} is over --max_workers {self.max_workers}")

    def _check_flink(self):
        if not self.flink_master:
            raise ValueError("Flink needs --flink_master host:port")
        if self.parallelism and self.max_parallelism and self.max_parallelism < self.parallelism:
            raise ValueError(f"--max_parallelism {self.max_parallelism} is below --parallelism {self.parallelism}")
        if self.state_backend and not self.state_backend_storage_path:
            raise ValueError(f"--state_backend {self.state_backend} needs --state_backend_storage_path, a URI "
                             "every task manager reaches (hdfs://, s3://, gs:// or a shared file://)")
        if self.state_backend_storage_path and not self.state_backend:
            raise ValueError("--state_backend_storage_path is where --state_backend checkpoints: give both")


def accelerator_hint(gpu: str | None, machine_type: str | None = None) -> str | None:
    """The Dataflow accelerator resource hint of the inference step (right fitting), or None."""
    if not gpu:
        return None
    machine = f";machine_type:{machine_type}" if machine_type else ""
    return f"type:{gpu};count:1{machine};install-nvidia-driver"


def beam_args(config: EngineConfig, *, streaming: bool, passed: list[str] = ()) -> list[str]:
    """The PipelineOptions flags for `config`; `passed` are the user's own Beam flags (which follow and win)."""
    args = [f"--job_name={config.job_name}"]
    if streaming:
        args.append("--streaming")
    if config.engine == "direct":
        return args + ["--runner=DirectRunner"]
    if config.engine == "portable":
        return args + ["--runner=PortableRunner", "--job_endpoint=embed",
                       f"--environment_type={config.environment_type}"]
    if config.engine == "flink":
        return args + _flink_args(config, streaming, passed)
    return args + _dataflow_args(config, streaming)


def _flink_args(config: EngineConfig, streaming: bool, passed) -> list[str]:
    from launch.runners import installed_path

    given = {arg.split("=", 1)[0] for arg in passed if arg.startswith("--")}
    args = ["--runner=FlinkRunner", f"--flink_master={config.flink_master}",
            f"--environment_type={config.environment_type}"]
    if not given & {"--flink_job_server_jar", "--job_endpoint"}:
        args.append(f"--flink_job_server_jar={installed_path('flink_job_server_jar')}")
    if config.sdk_container_image and config.environment_type == "DOCKER":
        args.append(f"--environment_config={config.sdk_container_image}")
    if config.parallelism:
        args.append(f"--parallelism={config.parallelism}")
    if config.max_parallelism:
        args.append(f"--max_parallelism={config.max_parallelism}")
    interval = config.checkpointing_interval or (STREAMING_CHECKPOINT_MS if streaming else None)
    if interval:
        args.append(f"--checkpointing_interval={interval}")
    if config.state_backend:
        args += [f"--state_backend={config.state_backend}",
                 f"--state_backend_storage_path={config.state_backend_storage_path}"]
    return args


def _dataflow_args(config: EngineConfig, streaming: bool) -> list[str]:
    args = ["--runner=DataflowRunner", f"--project={config.project}", f"--region={config.region}",
            f"--temp_location={config.temp_location}", "--experiments=use_runner_v2"]
    # One source of the workers' code: the image if given, else the checkout's setup.py.
    args.append(f"--sdk_container_image={config.sdk_container_image}" if config.sdk_container_image
                else f"--setup_file={SETUP_FILE}")
    optional = {"--service_account_email": config.service_account_email,
                "--dataflow_kms_key": config.dataflow_kms_key, "--network": config.network,
                "--subnetwork": config.subnetwork, "--machine_type": config.machine_type,
                "--num_workers": config.num_workers, "--max_num_workers": config.max_workers,
                "--autoscaling_algorithm": config.autoscaling_algorithm}
    args += [f"{flag}={value}" for flag, value in optional.items() if value]
    if not config.use_public_ips:
        args.append("--no_use_public_ips")
    if streaming:
        args.append("--enable_streaming_engine")
    return args


def add_engine_arguments(parser) -> None:
    from pipelines.config import Bounded

    count = Bounded(int, 1, 100_000)
    group = parser.add_argument_group("engine")
    group.add_argument("--engine", choices=ENGINES, default="direct", help="where to run [%(default)s]")
    group.add_argument("--job_name", default="medtwin", help="job name [%(default)s]")
    group.add_argument("--sdk_container_image", help="custom worker image (see launch/containers/); on Dataflow "
                       "it replaces --setup_file staging")
    group.add_argument("--environment_type", default="LOOPBACK",
                       choices=("DOCKER", "PROCESS", "EXTERNAL", "LOOPBACK"),
                       help="portable/Flink worker environment [%(default)s]")
    group.add_argument("--dry_run", action="store_true", help="print the engine flags and the job; submit nothing")
    dataflow = parser.add_argument_group("Dataflow")
    dataflow.add_argument("--project", help="Google Cloud project")
    dataflow.add_argument("--region", help="region, e.g. europe-west4")
    dataflow.add_argument("--temp_location", help="gs:// staging and temp path")
    dataflow.add_argument("--gpu", help="accelerator of the inference step only, e.g. nvidia-tesla-t4")
    dataflow.add_argument("--gpu_machine_type", help="machine type of the inference step's GPU workers")
    dataflow.add_argument("--service_account_email", help="the workers' service account (least privilege)")
    dataflow.add_argument("--dataflow_kms_key", help="Cloud KMS key (CMEK) for the job's state and shuffle: "
                          "projects/P/locations/L/keyRings/R/cryptoKeys/K")
    dataflow.add_argument("--network", help="VPC network of the workers")
    dataflow.add_argument("--subnetwork", help="regions/REGION/subnetworks/NAME (or its full URL)")
    dataflow.add_argument("--use_public_ips", action="store_true",
                          help="give workers public IPs (default: none, --no_use_public_ips; the subnetwork "
                               "needs Private Google Access)")
    dataflow.add_argument("--machine_type", help="worker machine type, e.g. n2-standard-4")
    dataflow.add_argument("--num_workers", type=count, help="initial number of workers")
    dataflow.add_argument("--max_workers", type=count, help="autoscaling ceiling (--max_num_workers)")
    dataflow.add_argument("--autoscaling_algorithm", choices=AUTOSCALING, help="THROUGHPUT_BASED or NONE")
    flink = parser.add_argument_group("Flink")
    flink.add_argument("--flink_master", help="REST endpoint host:port (launch/flink_cluster.sh start: localhost:8081)")
    flink.add_argument("--parallelism", type=count, help="default parallelism of the job's operators")
    flink.add_argument("--max_parallelism", type=count, help="key groups: the most the job can be rescaled to")
    flink.add_argument("--checkpointing_interval", type=Bounded(int, 100, 86_400_000, "ms"),
                       help=f"checkpoint every N ms (streaming default {STREAMING_CHECKPOINT_MS})")
    flink.add_argument("--state_backend", choices=STATE_BACKENDS, help="rocksdb for state larger than memory")
    flink.add_argument("--state_backend_storage_path", help="checkpoint storage URI of the state backend")


def engine_config(args) -> EngineConfig:
    names = [field.name for field in dataclasses.fields(EngineConfig)]
    return EngineConfig(**{name: getattr(args, name) for name in names})
