"""Chest X-ray studies: who is imaged, when, on which device, and what each study leaves behind.

Flow:

* `order_study` (Patient) -> an `Order` or None. Infected patients are imaged
  once they have deteriorated (half-way through their course, plus 15-60
  minutes for the portable to come), with 1-2 opacities, 3-4 when severe;
  others are imaged now and then (no opacities).
* `schedule_study` (Order, fleet) -> a `Study` on a device that is up at the
  time (waiting in 10-minute steps when none is), with its DICOM parameters:
  CR or DX from the device, MONOCHROME1/2, 12/14/16 bits stored, any supported
  transfer syntax (JPEG 2000 and JPEG-LS included), `image_size` rows and
  0.85-1.0 times as many columns.
* `synthesize` + `write_study` -> ``OUT/dicom/<study_uid>/<sop_uid>.dcm`` and its
  lesion truth; `reference_record` -> the DicomReference the PACS router sends
  5 seconds to 5 minutes after acquisition (uri: the file's absolute path).

UIDs are ``2.25`` UUID-derived UIDs (PS3.5 B.2) of name-based UUIDs (`name_uid`)
of the seed and the patient id, so a seed always gives the same UIDs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import uuid

import numpy as np

from model.radiograph import SyntheticRadiograph, synthesize_chest_xray
from schemas.contract import format_timestamp
from simulator.devices import DevicePlan
from simulator.dicom import SUPPORTED_TRANSFER_SYNTAXES, StudyInfo, write_chest_radiograph
from simulator.patients import Patient
from simulator.writers import Landed

INSTITUTION = "Northgate General Hospital"
REFERRING_PHYSICIANS = ("Okafor^Adaeze^^Dr", "Lindqvist^Erik^^Dr", "Brennan^Siobhan^^Dr", "Raman^Kavitha^^Dr",
                        "Hughes^Gareth^^Dr")
WAIT_STEP_S = 600.0
REFERENCE_DELAY_S = (5.0, 300.0)


@dataclasses.dataclass(frozen=True)
class Order:
    """A chest X-ray requested for `patient` at `requested_s` seconds after the start."""

    patient: Patient
    requested_s: float
    opacities: int


@dataclasses.dataclass(frozen=True)
class Study:
    """One acquired chest radiograph and how it is stored."""

    patient: Patient
    device: DevicePlan
    info: StudyInfo
    acquisition_s: float
    reference_delay_s: float
    opacities: int
    rows: int
    cols: int
    bits_stored: int
    photometric: str
    transfer_syntax: str

    @property
    def path(self) -> str:
        """The file, relative to OUT."""
        return f"dicom/{self.info.study_uid}/{self.info.sop_uid}.dcm"


def name_uid(*names: str) -> str:
    """A UID that is always the same for the same names: ``2.25.`` + the integer of a name-based
    (SHA-1) UUID (PS3.5 B.2), at most 44 characters of the 64 a UI may hold."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:medtwin:' + ':'.join(names)).int}"


def order_study(patient: Patient, rng: np.random.Generator, *, hours: float) -> Order | None:
    """The patient's chest X-ray request in the period, if any."""
    course = patient.course
    if course is not None:
        deteriorated = course.onset_s + course.ramp_s * rng.uniform(0.5, 0.8)
        opacities = int(rng.integers(3, 5) if course.severe else rng.integers(1, 3))
        return Order(patient, deteriorated + rng.uniform(15, 60) * 60, opacities)
    if rng.random() < min(0.5, 0.15 * hours):
        return Order(patient, rng.uniform(0, hours * 3600), 0)
    return None


def schedule_study(order: Order, fleet: list[DevicePlan], rng: np.random.Generator, *, seed: int,
                   start: dt.datetime, hours: float, image_size: int) -> Study | None:
    """Put the order on a device that is up, or None if none is before the period ends
    (the reference must also land within the period)."""
    delay = rng.uniform(*REFERENCE_DELAY_S)
    t = order.requested_s
    while t + delay <= hours * 3600:
        ready = [device for device in fleet if device.available(t)]
        if ready:
            device = ready[int(rng.integers(len(ready)))]
            return _study(order, device, t, delay, rng, seed=seed, start=start, image_size=image_size)
        t += WAIT_STEP_S
    return None


def _study(order: Order, device: DevicePlan, t: float, delay: float, rng: np.random.Generator, *, seed: int,
           start: dt.datetime, image_size: int) -> Study:
    patient = order.patient
    entropy = f"{seed}:{patient.patient_id}:chest-xray"
    modality = device.model.modality
    monochrome1_chance = 0.6 if modality == "CR" else 0.2  # CR readers often store MONOCHROME1
    info = StudyInfo(
        study_uid=name_uid(entropy, "study"), series_uid=name_uid(entropy, "series"), sop_uid=name_uid(entropy, "sop"),
        acquisition_time=start + dt.timedelta(seconds=t),
        device_id=device.device_id, modality=modality, manufacturer=device.model.manufacturer,
        model_name=device.model.name, institution=INSTITUTION, station_name=device.station_name,
        accession_number=f"A{int(rng.integers(10 ** 8, 10 ** 9))}",
        referring_physician=REFERRING_PHYSICIANS[int(rng.integers(len(REFERRING_PHYSICIANS)))],
    )
    return Study(
        patient=patient, device=device, info=info, acquisition_s=t, reference_delay_s=delay,
        opacities=order.opacities, rows=image_size, cols=max(64, int(round(image_size * rng.uniform(0.85, 1.0)))),
        bits_stored=int(rng.choice([12, 14, 16])),
        photometric="MONOCHROME1" if rng.random() < monochrome1_chance else "MONOCHROME2",
        transfer_syntax=SUPPORTED_TRANSFER_SYNTAXES[int(rng.integers(len(SUPPORTED_TRANSFER_SYNTAXES)))],
    )


def synthesize(study: Study, rng: np.random.Generator) -> SyntheticRadiograph:
    """The study's radiograph, with its opacities."""
    return synthesize_chest_xray(rng, rows=study.rows, cols=study.cols, bits_stored=study.bits_stored,
                                 num_opacities=study.opacities)


def write_study(out_dir: str | os.PathLike, study: Study, radiograph: SyntheticRadiograph) -> str:
    """Write the DICOM file; returns its absolute path."""
    path = os.path.abspath(os.path.join(out_dir, study.path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_chest_radiograph(path, radiograph, study.patient.identity, study.info, photometric=study.photometric,
                           transfer_syntax=study.transfer_syntax)
    return path


def lesion_truth(study: Study, radiograph: SyntheticRadiograph) -> dict:
    """What the detector should find: boxes (x1, y1, x2, y2 original pixels, x2/y2 exclusive) and kinds."""
    return {
        "path": study.path, "study_instance_uid": study.info.study_uid,
        "series_instance_uid": study.info.series_uid, "patient_id": study.patient.patient_id,
        "device_id": study.device.device_id, "modality": study.info.modality,
        "acquisition_time": format_timestamp(study.info.acquisition_time),
        "rows": study.rows, "columns": study.cols, "bits_stored": study.bits_stored,
        "photometric": study.photometric, "transfer_syntax": str(study.transfer_syntax),
        "infected": study.patient.course is not None,
        "boxes": [[float(v) for v in opacity.box] for opacity in radiograph.opacities],
        "kinds": [opacity.kind for opacity in radiograph.opacities],
    }


def reference_record(study: Study, out_dir: str | os.PathLike) -> Landed:
    """The DicomReference for the study, landed `reference_delay_s` after acquisition."""
    info = study.info
    record = {
        "uri": os.path.abspath(os.path.join(out_dir, study.path)),
        "study_instance_uid": info.study_uid, "series_instance_uid": info.series_uid,
        "sop_instance_uid": info.sop_uid, "patient_id": study.patient.patient_id,
        "device_id": study.device.device_id, "modality": info.modality, "acquisition_time": info.acquisition_time,
    }
    arrival = info.acquisition_time + dt.timedelta(seconds=study.reference_delay_s)
    return Landed(arrival=arrival, payload=record, record_id=info.sop_uid)
