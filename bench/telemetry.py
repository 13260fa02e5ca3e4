"""Benchmark: wearable telemetry through decode -> validate -> window -> patient twin.

A load of `--patients` wearables sampling at 1 Hz for `--minutes`, landed as
JSON Lines files of uploads of `--upload-seconds` samples each (the layout the
simulator writes), goes through two implementations in the same process:

* **reference**: a plain-Python loop that reads the files, parses each upload,
  validates every sample against the schema's ranges, removes duplicates,
  groups samples per patient and 1-minute window and computes the same
  aggregates and NEWS2;
* **pipeline**: medtwin's own transforms (`ReadLandedFiles` ->
  `DecodeWearablesFn` -> `PatientTwin`) in a batch Beam pipeline on the local
  DirectRunner.

It prints samples/s of each, their ratio (pipeline / reference; >= 1.0 is the
target), whether both counted the same samples, and the process's peak RSS.
Ratios, not absolute numbers, are what compare across these noisy machines.
Importing Beam and the transforms (about a second, once per process) happens
before the clock starts, as the reference's imports do; it is printed apart.

    python bench/telemetry.py                       # 2,000 patients x 10 min (1.2 M samples)
    python bench/telemetry.py --patients 200 --minutes 5
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
from schemas.inputs import VITAL_NAMES, VITAL_SAMPLE  # noqa: E402
from transforms.news2 import score_news2  # noqa: E402

START = dt.datetime(2026, 3, 2, 6, 0, tzinfo=dt.timezone.utc)
WINDOW_SECONDS = 60
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


def land(uploads: list[bytes], root: Path, files: int = 8) -> None:
    """Uploads -> root/wearables/date=.../wearables-NN.jsonl, `files` files."""
    folder = root / "wearables" / f"date={START.date().isoformat()}"
    folder.mkdir(parents=True)
    for index in range(files):
        (folder / f"wearables-{index:02d}.jsonl").write_bytes(b"\n".join(uploads[index::files]) + b"\n")


def reference(root: Path) -> int:
    """The plain-Python loop; returns the number of (deduplicated) samples in the windows."""
    windows: dict = collections.defaultdict(dict)   # (patient, window) -> {(device, time): sample}
    lines = (line for path in sorted(root.glob("wearables/date=*/*.jsonl"))
             for line in path.read_bytes().splitlines() if line.strip())
    for line in lines:
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


def pipeline(root: Path, beam_args: list[str]) -> int:
    """medtwin's transforms on the DirectRunner; returns the samples counted in final twin rows."""
    import apache_beam as beam
    from apache_beam.metrics import Metrics
    from apache_beam.options.pipeline_options import PipelineOptions

    from transforms.dead_letters import DEAD_LETTERS
    from transforms.decode import DecodeWearablesFn
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
    result = p.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_name("samples_counted"))["counters"]
    return sum(counter.committed for counter in counters)


def _import_pipeline_modules() -> None:
    import apache_beam  # noqa: F401
    import apache_beam.runners.portability.fn_api_runner  # noqa: F401  (the local runner, imported on first run)

    import transforms.decode  # noqa: F401
    import transforms.patient_twin  # noqa: F401
    import transforms.sources  # noqa: F401


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--upload-seconds", type=int, default=60, help="samples per upload [%(default)s]")
    parser.add_argument("--seed", type=int, default=0)
    args, beam_args = parser.parse_known_args(argv)
    beam_args = beam_args or ["--direct_num_workers=1"]

    uploads = make_uploads(args.patients, args.minutes, args.upload_seconds, args.seed)
    samples = sum(line.count(b'"event_time"') for line in uploads)
    root = Path(tempfile.mkdtemp(prefix="medtwin-bench-"))
    land(uploads, root)
    count = len(uploads)
    del uploads
    print(f"load: {args.patients} patients x {args.minutes} min at 1 Hz, {count:,} uploads, "
          f"{samples:,} samples (duplicates included)")
    started = time.perf_counter()
    _import_pipeline_modules()
    print(f"  {'import Beam + transforms':<30} {time.perf_counter() - started:7.1f} s  (once per process; not timed)")
    results = {}
    runs = (("reference (plain Python)", lambda: reference(root)),
            ("pipeline (Beam, DirectRunner)", lambda: pipeline(root, beam_args)))
    for name, run in runs:
        started = time.perf_counter()
        counted = run()
        seconds = time.perf_counter() - started
        results[name] = (counted, seconds)
        print(f"  {name:<30} {seconds:7.1f} s  {samples / seconds:>10,.0f} samples/s  counted {counted:,}")
    (ref_count, ref_s), (pipe_count, pipe_s) = results.values()
    print(f"ratio pipeline/reference throughput: {ref_s / pipe_s:.2f}x   same samples counted: {ref_count == pipe_count}")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    shutil.rmtree(root)
    return 0 if ref_count == pipe_count else 1


if __name__ == "__main__":
    sys.exit(main())
