"""The typed configuration of one medtwin job, validated before any graph is built.

`JobConfig.from_args` turns the `medtwin run` flags into one object and
rejects conflicting choices up front (e.g. Pub/Sub without streaming, a
replay without an input directory, a production run without a
pseudonymisation key). `pipelines.graph.build_pipeline` only reads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path

from launch.engines import accelerator_hint
from launch.runners import has_test_clock, runner_kind
from transforms.detect import DEVICES, InferenceConfig, model_input_size
from transforms.device_twin import DeviceTwinConfig
from transforms.patient_twin import PatientTwinConfig
from transforms.pseudonymise import KeyReference, resolve_key_reference
from transforms.rescore import RescoreConfig
from transforms.sinks import SinkConfig
from transforms.dicom_decode import DicomReadConfig
from transforms.dicomweb import CredentialsReference, DicomWebAccess
from transforms.structured_report import FOLDER as STRUCTURED_REPORTS
from transforms.structured_report import ReportConfig
from transforms.sources import STREAMS
from transforms.triage import TriageConfig
from transforms.windowing import WindowPolicy

FAIL_ONCE_ENV = "MEDTWIN_TEST_FAIL_ONCE_DIR"  # tests only: see transforms.parquet_sink.FailOncePerBundle
SOURCES = ("files", "replay", "watch", "pubsub", "kafka")
DEFAULT_WEIGHTS = str(Path(__file__).resolve().parent.parent / "model" / "weights" / "cascade_tiny.safetensors")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Where the input streams come from.

    Attributes:
      kind: files (batch), replay (local streaming of landed files), watch (new files as they
        land), pubsub (Dataflow), kafka (Flink).
      input_dir: landed files root, for files/replay/watch.
      subscriptions: stream -> Pub/Sub subscription, for pubsub.
      kafka_bootstrap, topics: Kafka servers and stream -> topic, for kafka.
      kafka_group, kafka_expansion_service, kafka_max_read_seconds, kafka_read_to_end: the consumer group
        whose committed offsets a restarted job resumes from; Beam's Kafka IO expansion service (None:
        Beam's default jar); bounded reads for catch-up jobs, tests and demos (see
        `transforms.sources.ReadKafkaStream`).
      replay_step_seconds, replay_watermark_lag_seconds: replay pacing (see `ReplayLandedFiles`).
      replay_test_clock: the replay advances processing time with its steps; off on runners
        that refuse it (Flink), where the live clock runs (`launch.runners.has_test_clock`).
      dates: arrival days to read (``YYYY-MM-DD``), for backfills; None reads every day.
    """

    kind: str = "files"
    input_dir: str | None = None
    dates: tuple | None = None
    subscriptions: dict = dataclasses.field(default_factory=dict)
    kafka_bootstrap: str | None = None
    kafka_group: str = "medtwin"
    kafka_expansion_service: str | None = None
    kafka_max_read_seconds: int | None = None
    kafka_read_to_end: bool = False
    topics: dict = dataclasses.field(default_factory=dict)
    replay_step_seconds: int = 60
    replay_watermark_lag_seconds: int = 600
    replay_test_clock: bool = True


@dataclasses.dataclass(frozen=True)
class ImagingConfig:
    """The imaging path: DICOM fetch and decode, opacity detection, device quality flags, triage."""

    read: DicomReadConfig
    inference: InferenceConfig
    triage: TriageConfig
    reports: ReportConfig | None = None  # DICOM SRs of the findings: folder beside the tables and/or the PACS
    rescore: RescoreConfig | None = None  # --model_watch with --rescore_hours: re-score recent studies on a swap

    def __post_init__(self):
        if self.read.target_size != model_input_size(self.inference):
            raise ValueError(f"images decoded to {self.read.target_size} px, but {self.inference.weights_path} "
                             f"expects {model_input_size(self.inference)} px")


@dataclasses.dataclass(frozen=True)
class JobConfig:
    source: SourceConfig
    sink: SinkConfig
    patient: PatientTwinConfig
    device: DeviceTwinConfig
    imaging: ImagingConfig | None  # None: DICOM references are decoded, checked and counted; no image is read
    key_reference: KeyReference  # where workers read the pseudonymisation key; never the key itself
    streaming: bool
    learned: "LearnedModels | None" = None  # --risk_models: the learned early warning (model.risk); None: rules only

    def __post_init__(self):
        kind = self.source.kind
        if kind not in SOURCES:
            raise ValueError(f"unknown source {kind!r}; choose from {', '.join(SOURCES)}")
        if kind in ("files", "replay", "watch") and not self.source.input_dir:
            raise ValueError(f"--source {kind} needs --input DIR")
        if kind in ("replay", "watch", "pubsub", "kafka") and not self.streaming:
            raise ValueError(f"--source {kind} is unbounded: add --streaming")
        if kind == "files" and self.streaming:
            raise ValueError("--streaming with landed files: use --source replay (or watch)")
        if kind == "pubsub" and not self.source.subscriptions:
            raise ValueError("--source pubsub needs at least one --pubsub_<stream> subscription")
        if kind == "kafka" and not (self.source.kafka_bootstrap and self.source.topics):
            raise ValueError("--source kafka needs --kafka_bootstrap and at least one --kafka_<stream> topic")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "JobConfig":
        streaming = bool(args.streaming)
        source_kind = args.source or ("replay" if streaming else "files")
        runner = getattr(args, "runner", None) or getattr(args, "engine", None)
        test_clock = has_test_clock(runner)
        if (source_kind == "kafka" and runner_kind(runner) == "prism"
                and not (args.kafka_read_to_end or args.kafka_max_read_seconds)):
            raise ValueError("Prism cannot run an unbounded Kafka read: Beam's Kafka IO then requires stable input "
                             "(beam:requirement:pardo:stable_input:v1), which Prism refuses; bound it with "
                             "--kafka_read_to_end or --kafka_max_read_seconds, or run on Flink or Dataflow")
        patient_policy = WindowPolicy(
            window_seconds=args.window, allowed_lateness_seconds=args.allowed_lateness,
            early_firing_seconds=args.early_firing, streaming=streaming, tick_seconds=args.gate_tick,
            gate_shards=args.gate_shards)
        device_policy = WindowPolicy(
            window_seconds=args.device_window, allowed_lateness_seconds=args.device_allowed_lateness,
            early_firing_seconds=args.early_firing, streaming=streaming,
            tick_seconds=min(args.gate_tick, args.device_window), gate_shards=args.gate_shards)
        device = DeviceTwinConfig(policy=device_policy, service_interval_days=args.service_interval_days)
        config = cls(
            source=SourceConfig(
                kind=source_kind, input_dir=args.input,
                subscriptions={s: getattr(args, f"pubsub_{s}") for s in STREAMS if getattr(args, f"pubsub_{s}")},
                kafka_bootstrap=args.kafka_bootstrap, kafka_group=args.kafka_group,
                kafka_expansion_service=args.kafka_expansion_service,
                kafka_max_read_seconds=args.kafka_max_read_seconds, kafka_read_to_end=args.kafka_read_to_end,
                topics={s: getattr(args, f"kafka_{s}") for s in STREAMS if getattr(args, f"kafka_{s}")},
                replay_step_seconds=args.replay_step, replay_watermark_lag_seconds=args.replay_watermark_lag,
                replay_test_clock=test_clock,
                dates=getattr(args, "dates", None)),
            sink=SinkConfig(kind="bigquery" if args.bigquery_dataset else "parquet",
                            output=args.bigquery_dataset or args.output, streaming=streaming,
                            owned_dates=getattr(args, "owned_dates", None),
                            # tests only: the Parquet write steps fail once per bundle (bundle retries)
                            fail_once_dir=os.environ.get(FAIL_ONCE_ENV) or None),
            patient=PatientTwinConfig(policy=patient_policy, expected_sample_seconds=args.expected_sample_seconds,
                                      stale_after_seconds=args.stale_after, retention_days=args.retention_days),
            device=device,
            imaging=None,
            key_reference=resolve_key_reference(
                args.pseudonym_key, demo=args.demo, key_file=getattr(args, "pseudonym_key_file", None),
                key_secret=getattr(args, "pseudonym_key_secret", None)),
            streaming=streaming,
            learned=_learned_models(getattr(args, "risk_models", None)),
        )
        if args.no_imaging:
            return config
        # Built once the sources are known to be valid, so their errors come first.
        return dataclasses.replace(config, imaging=_imaging_config(args, config.source, device, streaming))


def _learned_models(folder: str | None):
    if folder is None:
        return None
    from model.risk import read_models_folder

    return read_models_folder(folder)


def _imaging_config(args: argparse.Namespace, source: SourceConfig, device: DeviceTwinConfig,
                    streaming: bool) -> ImagingConfig:
    source_kind = source.kind
    prefixes = tuple(args.dicom_allowed_prefixes or ())
    if not prefixes:
        if source_kind not in ("files", "replay", "watch") or not args.input:
            raise ValueError(f"--source {source_kind} reads DICOM files from elsewhere: name where with "
                             "--dicom_allowed_prefixes (or add --no_imaging)")
        prefixes = (args.input,)
    if not Path(args.weights).is_file():  # read here, to size the decoded images, and shipped to workers
        raise ValueError(f"--weights {args.weights}: no such file (train one with `medtwin train`)")
    inference = InferenceConfig(
        weights_path=args.weights, device=args.inference_device, max_batch_size=args.inference_batch_size,
        # A batch job batches per bundle; a stream must not hold a half-full batch for long. A replay on
        # a test clock batches per bundle too: its clock never reaches Beam's wall-clock flush timer, so
        # a partial batch would wait for the end of the stream, where the DirectRunner drops timer output.
        max_batch_duration_secs=(args.inference_max_wait if streaming and not (
            source_kind == "replay" and source.replay_test_clock) else None),
        score_threshold=args.score_threshold, share_across_processes=not args.model_per_process,
        model_watch=_model_watch(args, streaming), model_watch_interval_secs=args.model_watch_interval,
        model_watch_stop_seconds=args.model_watch_stop_seconds,
        # `medtwin launch --gpu TYPE`: the inference step alone asks for that accelerator.
        accelerator=accelerator_hint(getattr(args, "gpu", None), getattr(args, "gpu_machine_type", None)))
    pacs = (DicomWebAccess(base_urls=tuple(url.rstrip("/") for url in args.pacs_url),
                           credentials=CredentialsReference.parse(args.pacs_credentials) if args.pacs_credentials
                           else None) if args.pacs_url else None)
    if args.pacs_credentials and not pacs:
        raise ValueError("--pacs_credentials without --pacs_url")
    read = DicomReadConfig(allowed_prefixes=prefixes, target_size=model_input_size(inference), dicomweb=pacs,
                           decode_headroom_bytes=args.decode_memory_mib * 1024 * 1024 or None)
    folder = (None if args.no_structured_reports or args.bigquery_dataset
              else os.path.join(args.output, STRUCTURED_REPORTS))
    return ImagingConfig(
        read=read,
        reports=ReportConfig(folder=folder, pacs=pacs, allowed_prefixes=prefixes,
                             max_file_bytes=read.max_file_bytes) if folder or pacs else None,
        inference=inference,
        rescore=(RescoreConfig(inference, hours=args.rescore_hours, positive_probability=args.positive_probability)
                 if inference.model_watch and args.rescore_hours else None),
        # An image is flagged by the same device risk that raises a device alert.
        triage=TriageConfig(device_policy=device.policy, risk_threshold=device.risk.alert_threshold,
                            positive_probability=args.positive_probability,
                            triage_window_seconds=args.triage_window))


class Bounded:
    """An argparse ``type=`` that reads a number and refuses it outside [low, high] (finite only),
    so a value that would crash a job mid-run (a zero window, a zero service interval) is refused
    at start, argparse naming the flag: ``argument --window: must be an integer from 1 to 86400``."""

    def __init__(self, kind: type, low: float, high: float, unit: str = ""):
        self.kind, self.low, self.high, self.unit = kind, low, high, unit
        self.__name__ = kind.__name__  # argparse names the type in its messages

    def __call__(self, text: str):
        noun = "an integer" if self.kind is int else "a number"
        span = f"{noun} from {self.low:g} to {self.high:g}{' ' + self.unit if self.unit else ''}"
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {span}") from None
        if not (math.isfinite(value) and self.low <= value <= self.high):
            raise argparse.ArgumentTypeError(f"must be {span}, got {text[:40]}")
        return value


_DAY = 86_400
SECONDS = Bounded(int, 1, _DAY, "seconds")  # windows, ticks, steps: one second to one day
LATENESS = Bounded(int, 0, 30 * _DAY, "seconds")
PROBABILITY = Bounded(float, 0.0, 1.0)


def _model_watch(args: argparse.Namespace, streaming: bool) -> str | None:
    """--model_watch, refused where it cannot work: batch jobs, and Prism, which does not run triggered
    side inputs in the global window (apache/beam#31438), the kind RunInference's model updates are."""
    if not args.model_watch:
        return None
    if not streaming:
        raise ValueError("--model_watch swaps models in a running stream: add --streaming")
    if runner_kind(getattr(args, "runner", None)) == "prism":
        raise ValueError("--model_watch cannot run on Prism: it refuses RunInference's model-update side input "
                         "(a triggered side input in the global window, apache/beam#31438); use Flink or Dataflow")
    return args.model_watch


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a twin job (shared by `medtwin run`, `backfill` and `launch`).

    Every numeric flag has a documented range (`Bounded`), checked when the flags are parsed.
    """
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--input", help="landed files root: <stream>/date=YYYY-MM-DD/<stream>-HH.(jsonl|avro)")
    io.add_argument("--output", default="out", help="Parquet output root (local path or gs://) [%(default)s]")
    io.add_argument("--bigquery_dataset", help="write to BigQuery project:dataset instead of Parquet")
    io.add_argument("--source", choices=SOURCES,
                    help="files (default in batch), replay (default with --streaming), watch, pubsub, kafka")
    io.add_argument("--streaming", action="store_true", help="unbounded sources; early/on-time/late panes")
    for stream in STREAMS:
        io.add_argument(f"--pubsub_{stream}", metavar="SUBSCRIPTION",
                        help=f"Pub/Sub subscription of {stream} (projects/P/subscriptions/S)")
        io.add_argument(f"--kafka_{stream}", metavar="TOPIC", help=f"Kafka topic of {stream}")
    io.add_argument("--kafka_bootstrap", help="Kafka bootstrap servers, host:port[,host:port]")
    io.add_argument("--kafka_group", default="medtwin",
                    help="Kafka consumer group: offsets are committed to it as bundles finalize, a restart resumes "
                         "from them, a new group starts at the earliest offset [%(default)s]")
    io.add_argument("--kafka_expansion_service", metavar="HOST:PORT",
                    help="Beam Kafka IO expansion service (launch/kafka/local.py starts one) [Beam's own jar]")
    io.add_argument("--kafka_max_read_seconds", type=SECONDS, metavar="S",
                    help="stop reading Kafka after S seconds, then close every window (tests, demos)")
    io.add_argument("--kafka_read_to_end", action="store_true",
                    help="read each topic's backlog at launch (from the group's committed offsets) and stop, "
                         "then close every window: a catch-up job, tests, demos")
    io.add_argument("--replay_step", type=SECONDS, default=60,
                    help="replay: seconds of arrival per step, 1-86400 [%(default)s]")
    io.add_argument("--replay_watermark_lag", type=Bounded(int, 0, 7 * _DAY, "seconds"), default=600,
                    help="replay: watermark trails arrival by this many seconds, 0-604800 [%(default)s]")

    twin = parser.add_argument_group("twins")
    twin.add_argument("--window", type=SECONDS, default=60, help="patient window, seconds, 1-86400 [%(default)s]")
    twin.add_argument("--allowed_lateness", type=LATENESS, default=7200,
                      help="patient data accepted this long after its window ends, seconds, 0-2592000 [%(default)s]")
    twin.add_argument("--device_window", type=SECONDS, default=300,
                      help="device window, seconds, 1-86400 [%(default)s]")
    twin.add_argument("--device_allowed_lateness", type=LATENESS, default=600,
                      help="device log lateness, seconds, 0-2592000 [%(default)s]")
    twin.add_argument("--early_firing", type=SECONDS, default=30,
                      help="streaming: processing seconds between early panes, 1-86400 [%(default)s]")
    twin.add_argument("--gate_tick", type=SECONDS, default=300,
                      help="streaming: too-late gate resolution and lateness slack, seconds, 1-86400 [%(default)s]")
    twin.add_argument("--gate_shards", type=Bounded(int, 1, 4096, "shards"), default=64,
                      help="streaming: keys of the too-late gate (its parallelism; a few timers each per tick), "
                           "1-4096 [%(default)s]")
    twin.add_argument("--expected_sample_seconds", type=Bounded(float, 0.01, 3600, "seconds"), default=5.0,
                      help="wearable sampling interval, for completeness, 0.01-3600 [%(default)s]")
    twin.add_argument("--stale_after", type=Bounded(int, 1, 30 * _DAY, "seconds"), default=600,
                      help="sensor stale after this silence, s, 1-2592000 [%(default)s]")
    twin.add_argument("--retention_days", type=Bounded(float, 1, 3650, "days"), default=7.0,
                      help="streaming: a patient silent this long is forgotten (state cleared), 1-3650 [%(default)s]")
    twin.add_argument("--service_interval_days", type=Bounded(float, 0.01, 3650, "days"), default=90.0,
                      help="device maintenance due after this many days, 0.01-3650 [%(default)s]")

    twin.add_argument("--risk_models", metavar="DIR",
                      help="add the learned early warning: the folder `medtwin train-risk --out` wrote (tf.Transform "
                           "features and both risk models); their scores join the twin rows and raise alerts")

    imaging = parser.add_argument_group("imaging")
    imaging.add_argument("--no_imaging", action="store_true",
                         help="skip reading DICOM images (references are still decoded and checked)")
    imaging.add_argument("--weights", default=DEFAULT_WEIGHTS,
                         help="detector checkpoint, .safetensors with its .json beside it [model/weights/cascade_tiny]")
    imaging.add_argument("--dicom_allowed_prefixes", nargs="+", metavar="PREFIX",
                         help="directories or gs:// prefixes DICOM uris may point into [--input]")
    imaging.add_argument("--decode_memory_mib", type=Bounded(int, 0, 65536, "MiB"), default=1024,
                         help="decode each image in a child process whose address space may grow this much past "
                              "its start (defence in depth behind the codestream checks); 0 decodes in the "
                              "worker itself, 0-65536 [%(default)s]")
    imaging.add_argument("--pacs_url", nargs="+", metavar="URL",
                         help="DICOMweb roots references may point into (WADO-RS); SRs are stored to the first "
                              "(STOW-RS), e.g. http://127.0.0.1:8042/dicom-web")
    imaging.add_argument("--pacs_credentials", metavar="env:NAME|file:PATH",
                         help="where the workers read the PACS's user:password (never the secret itself)")
    imaging.add_argument("--no_structured_reports", action="store_true",
                         help="write no DICOM SR copies into OUTPUT/structured_reports (still stored to --pacs_url)")
    imaging.add_argument("--model_watch", metavar="GLOB",
                         help="streaming: watch this glob of .safetensors checkpoints; the newest replaces the model "
                              "without a restart once it passes its checks (new files need new names)")
    imaging.add_argument("--model_watch_interval", type=Bounded(float, 1, 86400, "seconds"), default=60.0,
                         help="seconds between looks for a new checkpoint, 1-86400 [%(default)s]")
    imaging.add_argument("--model_watch_stop_seconds", type=Bounded(float, 1, 30 * _DAY, "seconds"),
                         help="stop watching for checkpoints this many seconds after launch, so the stream can "
                              "end (tests, demos), 1-2592000 [watch for as long as the job runs]")
    imaging.add_argument("--rescore_hours", type=Bounded(float, 0, 720, "hours"), default=24.0,
                         help="with --model_watch: when a checkpoint is swapped in, re-score the studies of the "
                              "last H hours of event time (before the newest study) and list the changed findings "
                              "in the rescored table; 0: off, 0-720 [%(default)s]")
    imaging.add_argument("--inference_device", choices=DEVICES, default="auto",
                         help="auto: CUDA when the worker has it, else CPU [%(default)s]")
    imaging.add_argument("--inference_batch_size", type=Bounded(int, 1, 256), default=8,
                         help="images per model call, 1-256 [%(default)s]")
    imaging.add_argument("--inference_max_wait", type=Bounded(float, 0.01, 3600, "seconds"), default=5.0,
                         help="streaming: longest a partial batch waits, seconds, 0.01-3600 [%(default)s]")
    imaging.add_argument("--model_per_process", action="store_true",
                         help="load one model per SDK process instead of one per worker VM")
    imaging.add_argument("--score_threshold", type=PROBABILITY, default=0.05,
                         help="boxes scoring below this are not written, 0-1 [%(default)s]")
    imaging.add_argument("--positive_probability", type=PROBABILITY, default=0.5,
                         help="image COVID probability counted positive for triage, 0-1 [%(default)s]")
    imaging.add_argument("--triage_window", type=Bounded(int, 1, 7 * _DAY, "seconds"), default=3600,
                         help="positive image and medium/high NEWS2 this close raise a triage alert, s, 1-604800 "
                              "[%(default)s]")

    privacy = parser.add_argument_group("privacy")
    privacy.add_argument("--pseudonym_key",
                         help="HMAC key for patient pseudonyms (or env MEDTWIN_PSEUDONYM_KEY); local workers read it "
                              "from that variable, never from the job graph")
    privacy.add_argument("--pseudonym_key_file", metavar="PATH",
                         help="a file on every worker holding the key (e.g. a mounted secret)")
    privacy.add_argument("--pseudonym_key_secret", metavar="projects/P/secrets/S/versions/V",
                         help="a Secret Manager version holding the key, read by the workers in setup()")
    privacy.add_argument("--demo", action="store_true",
                         help="synthetic data: allow running with the public demo pseudonym key")
