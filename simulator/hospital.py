"""A whole synthetic hospital on disk, and the truth about it: `simulate`.

`simulate(out_dir, patients=N, devices=M, hours=H, seed=S)` writes

* the four input streams the pipeline reads (layout in `simulator.writers`):
  wearable uploads and nurse observations from `simulator.patients`, device
  logs from `simulator.devices`, DICOM references from `simulator.studies`;
* one DICOM file per chest X-ray under ``OUT/dicom/``;
* ``OUT/truth/``: ``patients.json`` (per patient id: identity, infected,
  severe, onset and full-effect times, targets, baseline), ``lesions.json``
  (per SOP Instance UID of every intact, validly referenced image: path
  relative to OUT, boxes in original pixels, kinds, infected flag, patient),
  ``device_failures.json`` (failures with run-up, failure and recovery times;
  devices overdue for maintenance; preventive maintenance; the roster),
  ``corruption.json`` (every damaged record: stream, kind, source locator,
  record id; see `simulator.corrupt`) and ``manifest.json`` (the arguments,
  records and samples per stream, duplicate and late uploads, studies).

Random streams: every entity draws from its own generator,
``SeedSequence(seed, spawn_key=(domain, index, purpose))``, so a patient's vitals,
uploads and observations depend only on the seed and the patient's index (not
on the number of devices), and a device's plan only on the seed and its index.
Same arguments, same bytes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import os
import time

import numpy as np
from tqdm import tqdm

from schemas.contract import format_timestamp
from simulator import corrupt
from simulator.devices import FAILURE_MODES, DevicePlan, choose_failing, device_events, plan_device
from simulator.patients import Patient, Upload, VitalSeries, make_patient, nurse_observations, phone_uploads, \
    sample_records, simulate_vitals, upload_records
from simulator.studies import Study, lesion_truth, order_study, reference_record, schedule_study, synthesize, \
    write_study
from simulator.writers import Landed, write_stream, write_truth

DEFAULT_START = dt.datetime(2026, 3, 2, 6, 0, tzinfo=dt.timezone.utc)
# The pipeline's allowed lateness (transforms.windowing.WindowPolicy): samples older than this
# when they arrive are too late for their windows.
ALLOWED_LATENESS_S = 2 * 3600
STREAMS = ("wearables", "observations", "device_logs", "dicom_refs")


class _Domain(enum.IntEnum):
    """What a generator is for: the first part of its key after the seed."""

    PATIENT = 1
    DEVICE = 2
    STUDY = 3
    CORRUPTION = 4
    COHORT = 5
    FLEET = 6


class _Purpose(enum.IntEnum):
    """Which draw of an entity a generator serves: the last part of its key."""

    IDENTITY = 0
    VITALS = 1
    PHONE = 2
    NURSE = 3
    ORDER = 4
    SCHEDULE = 5
    IMAGE = 6
    IMAGE_DAMAGE = 7
    PLAN = 8
    LOG = 9
    CHOOSE = 10
    DAMAGE = 11


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """The generator of one entity and purpose: independent of every other key."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(int(k) for k in key)))


@dataclasses.dataclass(frozen=True)
class SimulationSummary:
    """Counts of what `simulate` wrote, and how long it took (seconds)."""

    out_dir: str
    patients: int
    infected: int
    severe: int
    devices: int
    failing_devices: int
    overdue_devices: int
    uploads: int
    samples: int
    duplicate_uploads: int
    late_uploads: int
    too_late_uploads: int
    observations: int
    device_events: int
    studies: int
    corrupted_records: int
    seconds: float


def simulate(out_dir: str | os.PathLike, *, patients: int, devices: int, hours: float, seed: int,
             start: dt.datetime = DEFAULT_START, sample_seconds: float = 5.0, corrupt_fraction: float = 0.0,
             infected_fraction: float = 0.3, image_size: int = 512, progress: bool = True) -> SimulationSummary:
    """Simulate `hours` from `start` (aware) of `patients` wearers and `devices` X-ray devices into
    `out_dir` (new or empty). sample_seconds: wearable sampling interval, s (0 < s <= 60);
    corrupt_fraction: share of records damaged per stream; infected_fraction: share of patients
    with a COVID-like course; image_size: DICOM rows. Returns the counts written."""
    _check(out_dir, patients, devices, hours, start, sample_seconds, corrupt_fraction, infected_fraction, image_size)
    began = time.perf_counter()
    start = start.astimezone(dt.timezone.utc)  # the hospital clock is UTC
    arguments = {"out_dir": str(out_dir), "patients": patients, "devices": devices, "hours": hours, "seed": seed,
                 "start": format_timestamp(start), "sample_seconds": sample_seconds,
                 "corrupt_fraction": corrupt_fraction, "infected_fraction": infected_fraction,
                 "image_size": image_size}
    with tqdm(total=patients + devices, desc="simulate", unit="entity", disable=not progress) as bar:
        roster = _roster(patients, seed, start, hours, infected_fraction)
        landed, duplicates, late = _patient_streams(roster, seed, start, hours, sample_seconds, bar)
        fleet = _fleet(devices, seed, start, hours)
        studies = _studies(roster, fleet, seed, start, hours, image_size)
        landed["device_logs"] = _device_logs(fleet, studies, seed, start, hours, bar)
        counts = {stream: len(landed[stream]) for stream in ("wearables", "observations", "device_logs")}
        damage = {stream: corrupt.choose(rng_for(seed, _Domain.CORRUPTION, i, _Purpose.CHOOSE),
                                         counts.get(stream, len(studies)), corrupt_fraction, corrupt.KINDS[stream])
                  for i, stream in enumerate(STREAMS)}
        bar.total += len(studies)
        landed["dicom_refs"], lesions = _imaging(out_dir, studies, damage["dicom_refs"], seed, bar)
        samples = sum(len(upload.payload["samples"]) for upload in landed["wearables"])
        damaged = _damage_records(landed, damage, seed)
        sources = {stream: write_stream(out_dir, stream, landed[stream], seed=seed) for stream in STREAMS}

    corruption = sorted((_corruption_entry(stream, kind, detail, landed[stream][index], sources[stream][index])
                         for stream, index, kind, detail in damaged),
                        key=lambda e: (e["stream"], e["file"], e["position"]))
    manifest = _manifest(arguments, start, hours, landed, sources, studies, damage, samples, duplicates, late)
    write_truth(out_dir, "patients", _patients_truth(roster, start))
    write_truth(out_dir, "lesions", lesions)
    write_truth(out_dir, "device_failures", _devices_truth(fleet, start))
    write_truth(out_dir, "corruption", {"fraction": corrupt_fraction, "records": corruption})
    write_truth(out_dir, "manifest", manifest)
    return SimulationSummary(
        out_dir=str(out_dir), patients=patients, infected=sum(p.course is not None for p in roster),
        severe=sum(bool(p.course and p.course.severe) for p in roster), devices=devices,
        failing_devices=sum(plan.failure is not None for plan in fleet),
        overdue_devices=sum(plan.overdue_at(start) for plan in fleet),
        uploads=len(landed["wearables"]), samples=samples, duplicate_uploads=len(duplicates), late_uploads=len(late),
        too_late_uploads=sum(u["beyond_allowed_lateness"] for u in late),
        observations=len(landed["observations"]), device_events=len(landed["device_logs"]), studies=len(studies),
        corrupted_records=len(corruption), seconds=time.perf_counter() - began)


def _check(out_dir, patients, devices, hours, start, sample_seconds, corrupt_fraction, infected_fraction,
           image_size) -> None:
    problems = []
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        problems.append(f"{out_dir} is not empty: simulate into a new or empty directory")
    if patients < 1 or devices < 1:
        problems.append("patients and devices must be at least 1")
    if not 0 < hours <= 24 * 14:
        problems.append(f"hours must be in (0, 336], got {hours}")
    if start.utcoffset() is None:
        problems.append("start must be timezone-aware")
    if not 0 < sample_seconds <= 60:
        problems.append(f"sample_seconds must be in (0, 60], got {sample_seconds}")
    for name, value in (("corrupt_fraction", corrupt_fraction), ("infected_fraction", infected_fraction)):
        if not 0 <= value <= 1:
            problems.append(f"{name} must be in [0, 1], got {value}")
    if image_size < 64:
        problems.append(f"image_size must be at least 64, got {image_size}")
    if problems:
        raise ValueError("; ".join(problems))


def _roster(count: int, seed: int, start: dt.datetime, hours: float, infected_fraction: float) -> list[Patient]:
    """The patients; round(infected_fraction * count) are infected, a quarter of those (at least
    one) severely."""
    infected = round(infected_fraction * count)
    severe = max(1, round(infected / 4)) if infected else 0
    order = rng_for(seed, _Domain.COHORT).permutation(count).tolist()
    rank = {index: position for position, index in enumerate(order)}
    return [make_patient(i, rng_for(seed, _Domain.PATIENT, i, _Purpose.IDENTITY), seed=seed, start=start, hours=hours,
                         infected=rank[i] < infected, severe=rank[i] < severe) for i in range(count)]


def _patient_streams(roster: list[Patient], seed: int, start: dt.datetime, hours: float, sample_seconds: float,
                     bar: tqdm) -> tuple[dict[str, list[Landed]], list[dict], list[dict]]:
    """Every patient's uploads and observations -> ({stream: landed records}, retried uploads, late uploads)."""
    landed: dict[str, list[Landed]] = {"wearables": [], "observations": []}
    duplicates, late = [], []
    for patient in roster:
        keys = (seed, _Domain.PATIENT, patient.index)
        series = simulate_vitals(patient, rng_for(*keys, _Purpose.VITALS), start=start, hours=hours,
                                 sample_seconds=sample_seconds)
        uploads = phone_uploads(patient, series, rng_for(*keys, _Purpose.PHONE), hours=hours)
        landed["wearables"] += upload_records(patient, sample_records(series, start), uploads, start)
        duplicates += _duplicate_uploads(patient, uploads)
        late += _late_uploads(patient, series, uploads, start)
        landed["observations"] += nurse_observations(patient, rng_for(*keys, _Purpose.NURSE), start=start,
                                                     hours=hours)
        bar.update()
    return landed, duplicates, late


def _fleet(count: int, seed: int, start: dt.datetime, hours: float) -> list[DevicePlan]:
    failing = choose_failing(count, hours, rng_for(seed, _Domain.FLEET))
    return [plan_device(j, rng_for(seed, _Domain.DEVICE, j, _Purpose.PLAN), start=start, hours=hours,
                        fails=j in failing) for j in range(count)]


def _studies(roster: list[Patient], fleet: list[DevicePlan], seed: int, start: dt.datetime, hours: float,
             image_size: int) -> list[Study]:
    studies = []
    for patient in roster:
        keys = (seed, _Domain.STUDY, patient.index)
        order = order_study(patient, rng_for(*keys, _Purpose.ORDER), hours=hours)
        study = order and schedule_study(order, fleet, rng_for(*keys, _Purpose.SCHEDULE), seed=seed, start=start,
                                         hours=hours, image_size=image_size)
        if study:
            studies.append(study)
    return studies


def _device_logs(fleet: list[DevicePlan], studies: list[Study], seed: int, start: dt.datetime, hours: float,
                 bar: tqdm) -> list[Landed]:
    logs = []
    for plan in fleet:
        logs += device_events(plan, rng_for(seed, _Domain.DEVICE, plan.index, _Purpose.LOG), start=start,
                              hours=hours, study_times_s=[s.acquisition_s for s in studies if s.device is plan])
        bar.update()
    return logs


def _imaging(out_dir, studies: list[Study], damage: dict[int, str], seed: int,
             bar: tqdm) -> tuple[list[Landed], dict[str, dict]]:
    """Write each study's image (damaged where `damage` says, by study index) -> (references,
    lesion truth of the intact ones by SOP Instance UID)."""
    references, lesions = [], {}
    for k, study in enumerate(studies):
        references.append(reference_record(study, out_dir))
        entry = _store_image(out_dir, study, damage.get(k), seed)
        if entry is not None:
            lesions[study.info.sop_uid] = entry
        bar.update()
    return references, lesions


def _store_image(out_dir, study: Study, kind: str | None, seed: int) -> dict | None:
    """Write the study's file, damaged when `kind` is an image damage; returns its lesion truth,
    or None when the image or its reference is damaged (the pipeline should not score it)."""
    keys = (seed, _Domain.STUDY, study.patient.index)
    radiograph = synthesize(study, rng_for(*keys, _Purpose.IMAGE))
    path = write_study(out_dir, study, radiograph)
    if kind is None:
        return lesion_truth(study, radiograph)
    if kind in corrupt.IMAGE_KINDS:
        with open(path, "rb") as handle:
            intact = handle.read()
        os.remove(path)
        corrupt.write_damaged_image(path, kind, rng_for(*keys, _Purpose.IMAGE_DAMAGE),
                                    dicom_bytes=intact, preview=radiograph.pixels, patient=study.patient.identity,
                                    study=study.info)
    return None


def _damage_records(landed: dict[str, list[Landed]], damage: dict[str, dict[int, str]],
                    seed: int) -> list[tuple[str, int, str, dict]]:
    """Replace the chosen records by damaged copies, in place -> (stream, index, kind, detail) each."""
    damaged = []
    for i, stream in enumerate(STREAMS):
        rng = rng_for(seed, _Domain.CORRUPTION, i, _Purpose.DAMAGE)
        for index, kind in damage[stream].items():
            original = landed[stream][index]
            payload, detail = corrupt.damage_record(stream, original.payload, kind, rng)
            landed[stream][index] = dataclasses.replace(original, payload=payload)
            damaged.append((stream, index, kind, detail))
    return damaged


def _corruption_entry(stream: str, kind: str, detail: dict, record: Landed, source: str) -> dict:
    separator = ":" if stream in ("wearables", "observations") else "#"
    file, position = source.rsplit(separator, 1)
    entry = {"stream": stream, "kind": kind, "source": source, "file": file, "position": int(position),
             "record_id": record.record_id, **detail}
    if stream == "dicom_refs":
        entry["uri"] = record.payload["uri"]
    return entry


def _duplicate_uploads(patient: Patient, uploads: list[Upload]) -> list[dict]:
    """The retried deliveries: same upload_id and samples as an upload that already arrived."""
    first_arrival = {u.upload_id: u.arrival_s for u in uploads if not u.is_retry}
    return [{"upload_id": u.upload_id, "patient_id": patient.patient_id, "samples": u.stop - u.first,
             "retry_delay_seconds": round(u.arrival_s - first_arrival[u.upload_id], 6)}
            for u in uploads if u.is_retry]


def _late_uploads(patient: Patient, series: VitalSeries, uploads: list[Upload], start: dt.datetime) -> list[dict]:
    """The first delivery after each offline episode: how late its samples are on arrival."""
    late = []
    for u in uploads:
        if u.offline_s <= 0 or u.is_retry:
            continue
        age = u.arrival_s - series.seconds[u.first:u.stop]
        late.append({
            "upload_id": u.upload_id, "patient_id": patient.patient_id,
            "upload_time": format_timestamp(start + dt.timedelta(seconds=u.arrival_s)),
            "oldest_sample": format_timestamp(
                start + dt.timedelta(microseconds=int(np.rint(series.seconds[u.first] * 1e6)))),
            "samples": u.stop - u.first, "offline_seconds": round(u.offline_s, 3),
            "lateness_seconds": round(float(age.max()), 3),
            "samples_beyond_allowed_lateness": int((age > ALLOWED_LATENESS_S).sum()),
            "beyond_allowed_lateness": bool(age.max() > ALLOWED_LATENESS_S),
        })
    return late


def _manifest(arguments: dict, start: dt.datetime, hours: float, landed: dict, sources: dict, studies: list[Study],
              damage: dict, samples: int, duplicates: list[dict], late: list[dict]) -> dict:
    streams = {}
    for stream in STREAMS:
        separator = ":" if stream in ("wearables", "observations") else "#"
        streams[stream] = {"records": len(landed[stream]), "corrupted": len(damage[stream]),
                           "files": sorted({s.rsplit(separator, 1)[0] for s in sources[stream]})}
    streams["wearables"]["samples"] = samples  # in every upload record, retries included, before damage
    return {
        "arguments": arguments,
        "period": {"start": format_timestamp(start), "end": format_timestamp(start + dt.timedelta(hours=hours))},
        "allowed_lateness_seconds": ALLOWED_LATENESS_S,
        "streams": streams,
        "duplicate_uploads": duplicates,
        "late_uploads": late,
        "studies": {"total": len(studies), "positive": sum(s.opacities > 0 for s in studies),
                    "negative": sum(s.opacities == 0 for s in studies)},
    }


def _patients_truth(roster: list[Patient], start: dt.datetime) -> dict:
    def at(seconds: float) -> str:
        return format_timestamp(start + dt.timedelta(seconds=seconds))

    truth = {}
    for p in roster:
        c = p.course
        truth[p.patient_id] = {
            "index": p.index, "wearable_id": p.wearable_id, "identity": dataclasses.asdict(p.identity),
            "baseline": {k: round(v, 3) for k, v in dataclasses.asdict(p.baseline).items()},
            "infected": c is not None, "severe": bool(c and c.severe),
            "onset": at(c.onset_s) if c else None, "full_effect": at(c.onset_s + c.ramp_s) if c else None,
            "targets": None if c is None else {
                "peak_temperature_c": round(c.peak_temperature_c, 2),
                "peak_respiratory_rate": round(c.peak_respiratory_rate, 1),
                "nadir_spo2": round(c.nadir_spo2, 1), "heart_rate_rise": round(c.heart_rate_rise, 1),
                "systolic_drop": round(c.systolic_drop, 1), "becomes_confused": c.becomes_confused},
        }
    return truth


def _devices_truth(fleet: list[DevicePlan], start: dt.datetime) -> dict:
    def at(seconds: float | None) -> str | None:
        return None if seconds is None else format_timestamp(start + dt.timedelta(seconds=seconds))

    failures = [{"device_id": d.device_id, "mode": d.failure.mode, "precursor_start": at(d.failure.precursor_start_s),
                 "failure_time": at(d.failure.failure_s), "service_time": at(d.failure.service_s),
                 "recovery_time": at(d.failure.recovery_s),
                 "peak_tube_temperature_c": round(d.failure.peak_temperature_c, 1),
                 "precursor_codes": list(FAILURE_MODES[d.failure.mode][0]),
                 "fatal_code": FAILURE_MODES[d.failure.mode][1]}
                for d in fleet if d.failure]
    overdue = [{"device_id": d.device_id, "last_maintenance": format_timestamp(d.last_maintenance),
                "days_since_maintenance_at_start": round((start - d.last_maintenance).total_seconds() / 86400, 3)}
               for d in fleet if d.overdue_at(start)]
    return {
        "failures": failures,
        "maintenance_overdue": overdue,
        "preventive_maintenance": [{"device_id": d.device_id, "begin": at(d.preventive[0]), "end": at(d.preventive[1])}
                                   for d in fleet if d.preventive],
        "devices": [{"device_id": d.device_id, "manufacturer": d.model.manufacturer, "model": d.model.name,
                     "modality": d.model.modality, "last_maintenance": format_timestamp(d.last_maintenance),
                     "overdue_at_start": d.overdue_at(start)} for d in fleet],
    }
