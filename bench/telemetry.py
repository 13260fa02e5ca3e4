"""Benchmark: telemetry through decode -> validate -> window -> patient and device twins.

A load of `--patients` wearables sampling at 1 Hz for `--minutes`, landed as
JSON Lines files of uploads of `--upload-seconds` samples each (the layout the
simulator writes), and the logs of `--devices` imaging devices over the same
minutes (a heartbeat every 30 s, status, exposures, warnings and errors with
tube temperatures), go through two implementations in the same process:

* **reference**: a plain-Python loop that reads the files, parses each upload,
  validates every sample against the schema's ranges, removes duplicates,
  groups samples per patient and 1-minute window and computes the same
  aggregates and NEWS2; and groups device events per device and 5-minute
  window into event, error and exposure counts and tube-temperature statistics;
* **pipeline**: medtwin's own transforms (`ReadLandedFiles` ->
  `DecodeWearablesFn` -> `PatientTwin`, and `DecodeDeviceEventsFn` ->
  `DeviceTwin`) in one batch Beam pipeline on the local DirectRunner.

It prints samples/s of each (wearable samples: device events are well under
1 % of the records), their ratio (pipeline / reference; >= 1.0 is the target),
the CPU seconds of each, whether both counted the same samples and device
events, and the process's peak RSS.
Ratios, not absolute numbers, are what compare across these noisy machines.
Importing Beam and the transforms (about a second, once per process) happens
before the clock starts, as the reference's imports do; it is printed apart.

    python bench/telemetry.py                       # 2,000 patients x 10 min (1.2 M samples)
    python bench/telemetry.py --patients 200 --minutes 5
    python bench/telemetry.py --repeats 5               # five alternating pairs: median, min, max ratio
    python bench/telemetry.py --direct_running_mode=multi_processing --direct_num_workers=2

Unknown flags go to Beam's PipelineOptions (default: one in-process worker).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.contract import parse_timestamp  # noqa: E402
from schemas.inputs import DEVICE_EVENT_KINDS, DEVICE_LOG_EVENT, SEVERITIES, VITAL_NAMES, VITAL_SAMPLE  # noqa: E402
from transforms.news2 import score_news2  # noqa: E402

START = dt.datetime(2026, 3, 2, 6, 0, tzinfo=dt.timezone.utc)
WINDOW_SECONDS = 60
DEVICE_WINDOW_SECONDS = 300  # the device twin's default window
_TUBE = DEVICE_LOG_EVENT.field("tube_temperature_c")
_LIMITS = {f.name: (f.minimum, f.maximum) for f in VITAL_SAMPLE if f.name in VITAL_NAMES}


def make_uploads(patients: int, minutes: int, upload_seconds: int, seed: int) -> list[bytes]:
    """JSON uploads in arrival order; every 50th upload is sent twice (a retry: duplicates)."""
    rng = np.random.default_rng(seed)
    uploads = []
    for offset in range(0, minutes * 60, upload_seconds):
        for patient in range(patients):
            n = upload_seconds
            base = START + dt.timedelta(seconds=offset, milliseconds=patient % 1000)
            heart = rng.normal(75, 8, n).round()
            spo2 = np.clip(rng.normal(96, 1.5, n).round(), 70, 100)
            samples = [{
                "event_time": (base + dt.timedelta(seconds=i)).isoformat().replace("+00:00", "Z"),
                "heart_rate": float(heart[i]), "spo2": float(spo2[i]), "systolic_bp": 120.0,
                "diastolic_bp": 80.0, "temperature_c": 36.8, "respiratory_rate": 16.0,
                "steps": 0, "sleep_stage": "awake"} for i in range(n)]
            upload = orjson.dumps({
                "upload_id": f"u-{patient}-{offset}", "device_id": f"WB-{patient}", "patient_id": f"MRN-{patient}",
                "upload_time": (base + dt.timedelta(seconds=n)).isoformat(), "samples": samples})
            uploads.append(upload)
            if (offset // upload_seconds + patient) % 50 == 0:
                uploads.append(upload)
    return uploads


def make_device_logs(devices: int, minutes: int, seed: int) -> list[bytes]:
    """JSON device log events, device by device: heartbeats every 30 s with the tube temperature,
    a status every 5 minutes, an exposure about every 90 s, and a warning or error now and then."""
    rng = np.random.default_rng(seed + 1)
    events = []
    for device in range(devices):
        def event(second: float, kind: str, severity: str = "info", **fields) -> None:
            when = START + dt.timedelta(seconds=second)
            events.append(orjson.dumps({
                "event_id": f"d{device}-{len(events)}", "device_id": f"XR-{device:02d}", "device_model": "DR-1",
                "event_time": when.isoformat().replace("+00:00", "Z"), "kind": kind, "severity": severity,
                **fields}))
        for second in range(0, minutes * 60, 30):
            event(second, "heartbeat", tube_temperature_c=round(float(rng.normal(45, 5)), 1))
            if second % 300 == 0:
                event(second + 1, "status", status="online")
            if rng.random() < 1 / 3:
                event(second + 2, "exposure", exposure_count=int(rng.integers(1, 4)))
            if rng.random() < 0.05:
                severity = "warning" if rng.random() < 0.7 else "error"
                event(second + 3, "error", severity, code=f"E{int(rng.integers(100, 104))}")
    return events


def land(records: list[bytes], root: Path, stream: str = "wearables", files: int = 8) -> None:
    """Records -> root/<stream>/date=.../<stream>-NN-HH.jsonl, `files` files, all landed in START's hour
    (the decoder refuses event times more than 2 h after a file's arrival hour)."""
    folder = root / stream / f"date={START.date().isoformat()}"
    folder.mkdir(parents=True)
    for index in range(files):
        (folder / f"{stream}-{index:02d}-{START.hour:02d}.jsonl").write_bytes(b"\n".join(records[index::files]) + b"\n")


def _landed_lines(root: Path, stream: str):
    return (line for path in sorted(root.glob(f"{stream}/date=*/*.jsonl"))
            for line in path.read_bytes().splitlines() if line.strip())


def reference(root: Path) -> tuple[int, int]:
    """The plain-Python loop; returns the (deduplicated) samples and the device events in the windows."""
    return reference_wearables(root), reference_devices(root)


def reference_wearables(root: Path) -> int:
    windows: dict = collections.defaultdict(dict)   # (patient, window) -> {(device, time): sample}
    for line in _landed_lines(root, "wearables"):
        upload = orjson.loads(line)
        for sample in upload["samples"]:
            when = parse_timestamp(sample["event_time"], "event_time")
            if any(sample.get(name) is not None and not low <= sample[name] <= high
                   for name, (low, high) in _LIMITS.items()):
                continue
            window = int(when.timestamp()) // WINDOW_SECONDS
            windows[(upload["patient_id"], window)][(upload["device_id"], when)] = sample
    counted = 0
    for samples in windows.values():
        ordered = [samples[k] for k in sorted(samples, key=lambda k: k[1])]
        stats = {}
        for name in VITAL_NAMES:
            values = [s[name] for s in ordered if s.get(name) is not None]
            stats[name] = (sum(values) / len(values), min(values), max(values), values[-1]) if values else None
        score_news2(respiratory_rate=stats["respiratory_rate"][0], spo2=stats["spo2"][0],
                    systolic_bp=stats["systolic_bp"][0], heart_rate=stats["heart_rate"][0],
                    temperature_c=stats["temperature_c"][0], consciousness=None, supplemental_oxygen=None)
        counted += len(ordered)
    return counted


def reference_devices(root: Path) -> int:
    windows: dict = collections.defaultdict(list)   # (device, window) -> events
    for line in _landed_lines(root, "device_logs"):
        event = orjson.loads(line)
        event["event_time"] = parse_timestamp(event["event_time"], "event_time")
        temperature = event.get("tube_temperature_c")
        if (event["kind"] not in DEVICE_EVENT_KINDS or event["severity"] not in SEVERITIES
                or temperature is not None and not _TUBE.minimum <= temperature <= _TUBE.maximum):
            continue
        window = int(event["event_time"].timestamp()) // DEVICE_WINDOW_SECONDS
        windows[(event["device_id"], window)].append(event)
    rows, counted = [], 0
    for events in windows.values():
        events.sort(key=lambda e: (e["event_time"], e["event_id"]))
        errors = collections.Counter((e.get("code"), e["severity"]) for e in events
                                     if e["severity"] in ("error", "critical"))
        temperatures = [e["tube_temperature_c"] for e in events if e.get("tube_temperature_c") is not None]
        statuses = [e["status"] for e in events if e.get("status") is not None]
        rows.append({
            "errors": errors, "exposures": sum(e.get("exposure_count") or 0 for e in events),
            "warnings": sum(e["severity"] == "warning" for e in events),
            "heartbeats": sum(e["kind"] == "heartbeat" for e in events),
            "temperature": (sum(temperatures) / len(temperatures), max(temperatures)) if temperatures else None,
            "status": statuses[-1] if statuses else None})
        counted += len(events)
    return counted


def pipeline(root: Path, beam_args: list[str]) -> tuple[int, int]:
    """medtwin's transforms on the DirectRunner; returns the samples and the device events counted
    in final twin rows."""
    import apache_beam as beam
    from apache_beam.metrics import Metrics
    from apache_beam.options.pipeline_options import PipelineOptions

    from transforms.dead_letters import DEAD_LETTERS
    from transforms.decode import DecodeDeviceEventsFn, DecodeWearablesFn
    from transforms.device_twin import DeviceTwin
    from transforms.patient_twin import PatientTwin, PatientTwinConfig
    from transforms.pseudonymise import DEMO_KEY, Pseudonymiser
    from transforms.sources import ReadLandedFiles
    from transforms.windowing import WindowPolicy

    from apache_beam.metrics.metric import MetricsFilter

    config = PatientTwinConfig(policy=WindowPolicy(window_seconds=WINDOW_SECONDS))
    p = beam.Pipeline(options=PipelineOptions(beam_args))
    decoded = (
        p | "Uploads" >> ReadLandedFiles(str(root), "wearables")
        | "Decode" >> beam.ParDo(DecodeWearablesFn(Pseudonymiser(DEMO_KEY), WINDOW_SECONDS))
        .with_outputs(DEAD_LETTERS, main="chunks")
    )
    observations = p | "NoObservations" >> beam.Create([])
    twins = {"chunks": decoded.chunks, "observations": observations} | PatientTwin(config)
    twins["patient_twin"] | "CountSamples" >> beam.Map(
        lambda row: Metrics.counter("bench", "samples_counted").inc(row["sample_count"]))
    devices = (
        p | "DeviceLogs" >> ReadLandedFiles(str(root), "device_logs")
        | "DecodeDeviceLogs" >> beam.ParDo(DecodeDeviceEventsFn(Pseudonymiser(DEMO_KEY)))
        .with_outputs(DEAD_LETTERS, main="events")
    )
    device_twins = devices.events | DeviceTwin()
    device_twins["device_twin"] | "CountEvents" >> beam.Map(
        lambda row: Metrics.counter("bench", "device_events_counted").inc(row["event_count"]))
    result = p.run()
    result.wait_until_finish()

    def counted(name: str) -> int:
        return sum(counter.committed for counter in result.metrics().query(MetricsFilter().with_name(name))["counters"])
    return counted("samples_counted"), counted("device_events_counted")


def _import_pipeline_modules() -> None:
    import apache_beam  # noqa: F401
    import apache_beam.runners.portability.fn_api_runner  # noqa: F401  (the local runner, imported on first run)

    import transforms.decode  # noqa: F401
    import transforms.device_twin  # noqa: F401
    import transforms.patient_twin  # noqa: F401
    import transforms.sources  # noqa: F401


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--upload-seconds", type=int, default=60, help="samples per upload [%(default)s]")
    parser.add_argument("--devices", type=int, default=30, help="imaging devices logging [%(default)s]")
    parser.add_argument("--repeats", type=int, default=1,
                        help="reference/pipeline pairs to run, alternating; the median ratio is printed [%(default)s]")
    parser.add_argument("--seed", type=int, default=0)
    args, beam_args = parser.parse_known_args(argv)
    beam_args = beam_args or ["--direct_num_workers=1"]

    uploads = make_uploads(args.patients, args.minutes, args.upload_seconds, args.seed)
    samples = sum(line.count(b'"event_time"') for line in uploads)
    device_logs = make_device_logs(args.devices, args.minutes, args.seed)
    root = Path(tempfile.mkdtemp(prefix="medtwin-bench-"))
    land(uploads, root)
    land(device_logs, root, "device_logs")
    print(f"load: {args.patients} patients x {args.minutes} min at 1 Hz, {len(uploads):,} uploads, "
          f"{samples:,} samples (duplicates included); {args.devices} devices, {len(device_logs):,} log events")
    del uploads, device_logs
    started = time.perf_counter()
    _import_pipeline_modules()
    print(f"  {'import Beam + transforms':<30} {time.perf_counter() - started:7.1f} s  (once per process; not timed)")
    runs = (("reference (plain Python)", lambda: reference(root)),
            ("pipeline (Beam, DirectRunner)", lambda: pipeline(root, beam_args)))
    ratios, agree = [], True
    for _ in range(args.repeats):
        results = []
        for name, run in runs:
            started, cpu_started = time.perf_counter(), time.process_time()
            counted = run()
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            results.append((counted, seconds))
            print(f"  {name:<30} {seconds:7.1f} s  {samples / seconds:>10,.0f} samples/s  CPU {cpu:5.1f} s  "
                  f"counted {counted[0]:,} samples, {counted[1]:,} device events")
        (ref_counted, ref_s), (pipe_counted, pipe_s) = results
        ratios.append(ref_s / pipe_s)
        agree &= ref_counted == pipe_counted
        print(f"ratio pipeline/reference throughput: {ratios[-1]:.2f}x   same samples and events counted: "
              f"{ref_counted == pipe_counted}")
    if args.repeats > 1:
        print(f"ratios over {args.repeats} pairs: median {np.median(ratios):.2f}x, "
              f"min {min(ratios):.2f}x, max {max(ratios):.2f}x")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    shutil.rmtree(root)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
