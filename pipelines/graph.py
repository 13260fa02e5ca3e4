"""The medtwin graph: sources -> decode -> twins and imaging -> alerts -> sinks.

    wearables ──Decode──► chunks ──PatientTwin──► patient_twin, alerts ─────────────┐
    observations ─Decode─────────────┘                                             │
    device_logs ─Decode─► events ──DeviceTwin───► device_twin, alerts ──┐          │
    dicom_refs ──Decode─► refs ──ReadStudies──► images ──DetectOpacities─┴─FlagDeviceQuality─► detections
                                                                 ├─────(+ patient_twin)─TriageAlerts─► alerts
    checkpoints ──WatchCheckpoints─► model updates ──┴─(swap)─RescoreOnSwap──────────────────► rescored
    every stage ───────────────────────────────────────────────────────────────────► dead_letters
                                 all tables ──WriteTables──► Parquet | BigQuery

`build_pipeline(pipeline, config)` adds the whole graph to `pipeline` and
returns the output PCollections by table; it knows nothing of runners
(`pipelines.run` and `launch/` run it). With imaging off (``--no_imaging``)
DICOM references are still decoded, so bad ones still reach dead_letters.
"""

from __future__ import annotations

import apache_beam as beam

from pipelines.config import ImagingConfig, JobConfig
from transforms.dead_letters import DEAD_LETTERS
from transforms.decode import (
    DecodeDeviceEventsFn,
    DecodeDicomReferencesFn,
    DecodeObservationsFn,
    DecodeWearablesFn,
)
from transforms.detect import SCORED, DetectOpacities, WatchCheckpoints
from transforms.dicom_decode import ReadStudies
from transforms.device_twin import DeviceTwin
from transforms.patient_twin import PatientTwin
from transforms.pseudonymise import Pseudonymiser
from transforms.rescore import RescoreOnSwap
from transforms.sinks import WriteTables
from transforms.sources import (
    STREAMS,
    ReadKafkaStream,
    ReadLandedFiles,
    ReadPubSubStream,
    ReplayLandedFiles,
    WatchLandingDirectory,
)
from transforms.triage import FlagDeviceQuality, TriageAlerts
from transforms.wearable_conflicts import FlagWearableConflicts


class ReadStreams(beam.PTransform):
    """The configured source -> {stream: PCollection[RawRecord]} (streams without a source are empty)."""

    def __init__(self, config: JobConfig):
        super().__init__()
        self._source = config.source
        # A replay ends only once every window of every twin has closed (see `replay_stream`).
        self._drain_seconds = max(policy.window_seconds + policy.allowed_lateness_seconds + 2 * policy.tick_seconds
                                  for policy in (config.patient.policy, config.device.policy))

    def expand(self, pipeline):
        source = self._source
        if source.kind == "replay":
            return pipeline | "Replay" >> ReplayLandedFiles(
                source.input_dir, STREAMS, step_seconds=source.replay_step_seconds,
                watermark_lag_seconds=source.replay_watermark_lag_seconds, drain_seconds=self._drain_seconds,
                advance_processing_time=source.replay_test_clock)
        streams = {}
        for stream in STREAMS:
            if source.kind == "files":
                reader = ReadLandedFiles(source.input_dir, stream, source.dates)
            elif source.kind == "watch":
                reader = WatchLandingDirectory(source.input_dir, stream)
            elif source.kind == "pubsub" and stream in source.subscriptions:
                reader = ReadPubSubStream(source.subscriptions[stream])
            elif source.kind == "kafka" and stream in source.topics:
                reader = ReadKafkaStream(source.kafka_bootstrap, source.topics[stream], group_id=source.kafka_group,
                                         expansion_service=source.kafka_expansion_service,
                                         max_read_seconds=source.kafka_max_read_seconds,
                                         read_to_end=source.kafka_read_to_end)
            else:
                streams[stream] = pipeline | f"No_{stream}" >> beam.Create([])
                continue
            streams[stream] = pipeline | f"Read_{stream}" >> reader
        return streams


class DecodeStreams(beam.PTransform):
    """{stream: RawRecord} -> {"chunks", "observations", "device_events", "dicom_refs", "dead_letters"}."""

    def __init__(self, config: JobConfig):
        super().__init__()
        self._config = config

    def expand(self, raw):
        # Only the key's reference travels in the graph; each decoder loads the key in setup().
        pseudonymiser = Pseudonymiser.from_reference(self._config.key_reference)
        decoders = {
            "wearables": ("chunks", DecodeWearablesFn(pseudonymiser, self._config.patient.policy.window_seconds)),
            "observations": ("observations", DecodeObservationsFn(pseudonymiser)),
            "device_logs": ("device_events", DecodeDeviceEventsFn(pseudonymiser)),
            "dicom_refs": ("dicom_refs", DecodeDicomReferencesFn(pseudonymiser)),
        }
        decoded, dead = {}, []
        for stream, (name, decoder) in decoders.items():
            outputs = raw[stream] | f"Decode_{stream}" >> beam.ParDo(decoder).with_outputs(DEAD_LETTERS, main=name)
            decoded[name] = outputs[name]
            dead.append(outputs[DEAD_LETTERS])
        decoded[DEAD_LETTERS] = dead
        return decoded


class Imaging(beam.PTransform):
    """{"dicom_refs", "patient_twin", "device_twin"} -> {"detections", "alerts", "dead_letters"[, "rescored"]}.

    Every reference in is one detections row or one dead letter out (fetch_dicom,
    decode_dicom, detect or structured_report); alerts are the triage alerts. With
    ``config.rescore`` (``--model_watch``, ``--rescore_hours``) the watched checkpoints swap the
    model and re-score the recent studies each swap changes (`transforms.rescore`).
    """

    def __init__(self, config: ImagingConfig):
        super().__init__()
        self._config = config

    def expand(self, inputs):
        studies = inputs["dicom_refs"] | "ReadStudies" >> ReadStudies(self._config.read)
        rescore = self._config.rescore
        # One watch feeds both the model swap and the re-scoring.
        updates = (inputs["dicom_refs"].pipeline | "WatchCheckpoints" >> WatchCheckpoints(self._config.inference)
                   if rescore is not None else None)
        # With reports on, each image's findings also become a DICOM SR (folder and/or PACS), named by its row.
        found = studies["images"] | "DetectOpacities" >> DetectOpacities(
            self._config.inference, reports=self._config.reports, model_updates=updates,
            keep_scored=rescore is not None)
        detections = ({"detections": found["detections"], "device_twin": inputs["device_twin"]}
                      | "FlagDeviceQuality" >> FlagDeviceQuality(self._config.triage))
        # Triage does not wait for the device join: it needs only the image and the patient's NEWS2.
        alerts = ({"detections": found["detections"], "patient_twin": inputs["patient_twin"]}
                  | "TriageAlerts" >> TriageAlerts(self._config.triage))
        dead_letters = (studies[DEAD_LETTERS], found[DEAD_LETTERS]) | "ImagingDeadLetters" >> beam.Flatten()
        outputs = {"detections": detections, "alerts": alerts, DEAD_LETTERS: dead_letters}
        if rescore is not None:
            outputs["rescored"] = ({"scored": found[SCORED], "model_updates": updates}
                                   | "RescoreOnSwap" >> RescoreOnSwap(rescore))
        return outputs


def build_pipeline(pipeline: beam.Pipeline, config: JobConfig) -> dict:
    """Adds the medtwin graph, sinks included, to `pipeline`; returns {table: PCollection of rows}.

    ``config.learned`` (``--risk_models``) adds the learned early warning (`model.risk.LearnedEarlyWarning`)
    to the twin rows; None leaves it out.
    """
    raw = pipeline | "ReadStreams" >> ReadStreams(config)
    decoded = raw | "Decode" >> DecodeStreams(config)
    patients = {"chunks": decoded["chunks"], "observations": decoded["observations"]} | "PatientTwin" >> PatientTwin(
        config.patient)
    devices = decoded["device_events"] | "DeviceTwin" >> DeviceTwin(config.device)
    conflicts = decoded["chunks"] | "WearableConflicts" >> FlagWearableConflicts(
        config.patient.policy, Pseudonymiser.from_reference(config.key_reference))
    alerts = [patients["alerts"], devices["alerts"], conflicts]
    dead_letters = [*decoded[DEAD_LETTERS], patients[DEAD_LETTERS], devices[DEAD_LETTERS]]
    tables = {"patient_twin": patients["patient_twin"], "device_twin": devices["device_twin"]}
    if config.learned is not None:
        from model.risk import LearnedEarlyWarning
        scored = tables | "LearnedEarlyWarning" >> LearnedEarlyWarning(
            config.learned.features, config.learned.models,
            policies={"patient": config.patient.policy, "device": config.device.policy})
        tables = {"patient_twin": scored["patient_twin"], "device_twin": scored["device_twin"]}
        alerts += scored["alerts"]
        dead_letters += scored[DEAD_LETTERS]
    if config.imaging is not None:
        imaging = ({"dicom_refs": decoded["dicom_refs"], **tables}
                   | "Imaging" >> Imaging(config.imaging))
        tables["detections"] = imaging["detections"]
        if "rescored" in imaging:
            tables["rescored"] = imaging["rescored"]
        alerts.append(imaging["alerts"])
        dead_letters.append(imaging[DEAD_LETTERS])
    tables["alerts"] = alerts | "AllAlerts" >> beam.Flatten()
    tables[DEAD_LETTERS] = dead_letters | "AllDeadLetters" >> beam.Flatten()
    tables | "WriteTables" >> WriteTables(config.sink)
    return tables
