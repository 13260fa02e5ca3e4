"""Damage: a fraction of the inputs broken the ways real feeds break, every one listed in the truth.

Kinds per stream (`KINDS`):

* ``wearables`` (JSON Lines): ``truncated_json`` (the line cut short),
  ``wrong_type`` (``"heart_rate": "fast"``), ``missing_id`` / ``empty_id``
  (upload, patient or wearable id absent or ""), ``out_of_range`` (SpO2 140,
  heart rate 400, ...), ``unknown_enum`` (sleep stage "napping"). The last
  three damage one sample: the pipeline should reject that sample and keep
  the rest of the upload (``samples_affected`` 1); the others lose the upload.
* ``observations`` (JSON Lines): the same, without ``out_of_range`` (no numbers).
* ``device_logs`` (Avro, which cannot carry a wrong type or broken syntax):
  ``empty_id``, ``out_of_range`` (tube at 250 °C, -1 exposures),
  ``unknown_enum`` (kind "reboot", severity "fatal", status "rebooting").
* ``dicom_refs`` (Avro): ``empty_id`` in the reference, or the image itself:
  ``truncated_dicom`` (file cut to 30-70 %), ``not_dicom`` (a PNG screenshot
  saved as .dcm), ``missing_file`` (nothing at the uri) and
  ``wrong_modality`` (a small valid CT slice; the reference says CT).

`choose` picks which records, `damage_record` damages a copy of one,
`write_damaged_image` writes a damaged image file.
"""

from __future__ import annotations

import copy
import io
import os

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from simulator.dicom import IMPLEMENTATION_CLASS_UID, PatientIdentity, StudyInfo
from simulator.studies import name_uid
from simulator.writers import json_line

IMAGE_KINDS = ("truncated_dicom", "not_dicom", "missing_file", "wrong_modality")
KINDS = {
    "wearables": ("truncated_json", "wrong_type", "missing_id", "empty_id", "out_of_range", "unknown_enum"),
    "observations": ("truncated_json", "wrong_type", "missing_id", "empty_id", "unknown_enum"),
    "device_logs": ("empty_id", "out_of_range", "unknown_enum"),
    "dicom_refs": ("empty_id",) + IMAGE_KINDS,
}
SAMPLE_KINDS = ("wrong_type", "out_of_range", "unknown_enum")  # wearables: damage one sample only

_IDS = {
    "wearables": ("upload_id", "patient_id", "device_id"),
    "observations": ("observation_id", "patient_id"),
    "device_logs": ("event_id", "device_id", "device_model"),
    "dicom_refs": ("patient_id", "sop_instance_uid", "study_instance_uid", "device_id"),
}
_WRONG_TYPES = {
    "wearables": (("heart_rate", "fast"), ("spo2", "normal"), ("steps", "many")),
    "observations": (("supplemental_oxygen", "yes"), ("event_time", "yesterday evening")),
}
_OUT_OF_RANGE = {
    "wearables": (("spo2", 140.0), ("heart_rate", 400.0), ("temperature_c", 45.5), ("respiratory_rate", 0.0),
                  ("steps", 5000)),
    "device_logs": (("tube_temperature_c", 250.0), ("tube_temperature_c", -45.0)),
}
_UNKNOWN_ENUMS = {
    "wearables": (("sleep_stage", "napping"),),
    "observations": (("consciousness", "drowsy"),),
    "device_logs": (("kind", "reboot"), ("severity", "fatal"), ("status", "rebooting")),
}


def choose(rng: np.random.Generator, count: int, fraction: float, kinds: tuple[str, ...]) -> dict[int, str]:
    """Which of `count` records to damage, and how: round(fraction * count) records (at least one
    when fraction > 0 and there are records), kinds dealt in turn from a random first kind."""
    if fraction <= 0 or count == 0:
        return {}
    damaged = min(count, max(1, round(fraction * count)))
    chosen = np.sort(rng.choice(count, size=damaged, replace=False)).tolist()
    first = int(rng.integers(len(kinds)))
    order = rng.permutation(damaged).tolist()
    return {index: kinds[(first + turn) % len(kinds)] for index, turn in zip(chosen, order)}


def damage_record(stream: str, payload: dict, kind: str, rng: np.random.Generator) -> tuple[dict | bytes, dict]:
    """A damaged copy of one record (`payload` is left as it was) and what was done.

    payload: JSON-ready dict for JSON streams, in-memory record for Avro streams.
    Returns (damaged payload, or the bytes of a truncated line; detail) where detail holds
    ``field``, and for wearables ``sample_index`` (None when the whole upload is hit) and
    ``samples_affected``. Image kinds leave the reference valid except ``wrong_modality``.
    """
    record = copy.deepcopy(payload)
    detail: dict = {"field": None}
    if kind == "truncated_json":
        line = json_line(record)
        damaged: dict | bytes = line[:int(len(line) * rng.uniform(0.3, 0.9))]
    elif kind in ("missing_id", "empty_id"):
        field = _pick(rng, _IDS[stream])
        if kind == "missing_id":
            del record[field]
        else:
            record[field] = ""
        detail["field"], damaged = field, record
    elif kind in ("wrong_type", "out_of_range", "unknown_enum"):
        table = {"wrong_type": _WRONG_TYPES, "out_of_range": _OUT_OF_RANGE, "unknown_enum": _UNKNOWN_ENUMS}[kind]
        choices = table[stream]
        if stream == "device_logs" and kind == "out_of_range" and record["kind"] == "exposure":
            choices = (("exposure_count", -1),)
        field, value = _pick(rng, choices)
        target = record
        if stream == "wearables":
            detail["sample_index"] = int(rng.integers(len(record["samples"])))
            target = record["samples"][detail["sample_index"]]
        target[field] = value
        detail["field"], damaged = field, record
    elif kind == "wrong_modality":
        record["modality"] = "CT"
        detail["field"], damaged = "modality", record
    elif kind in IMAGE_KINDS:
        damaged = record
    else:
        raise ValueError(f"no damage of kind {kind!r} for {stream}")
    if stream == "wearables":
        samples = len(payload["samples"])
        detail.setdefault("sample_index", None)
        detail["samples_affected"] = 1 if kind in SAMPLE_KINDS else samples
    return damaged, detail


def write_damaged_image(path: str, kind: str, rng: np.random.Generator, *, dicom_bytes: bytes,
                        preview: np.ndarray, patient: PatientIdentity, study: StudyInfo) -> None:
    """Put a damaged image at `path` (or nothing, for missing_file).

    dicom_bytes: the intact Part 10 file (for truncated_dicom); preview: (rows, cols) uint16
    MONOCHROME2 pixels (for not_dicom); patient and study: the identity and UIDs a CT slice
    sent by mistake would still carry (wrong_modality).
    """
    if kind == "missing_file":
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "truncated_dicom":
        data = dicom_bytes[:int(len(dicom_bytes) * rng.uniform(0.3, 0.7))]
    elif kind == "not_dicom":
        scaled = (preview.astype(np.float64) * (255.0 / max(int(preview.max()), 1))).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(scaled).save(buffer, format="PNG")
        data = buffer.getvalue()
    elif kind == "wrong_modality":
        data = ct_slice_bytes(patient, study, rng)
    else:
        raise ValueError(f"{kind!r} is not an image damage")
    with open(path, "wb") as handle:
        handle.write(data)


def ct_slice_bytes(patient: PatientIdentity, study: StudyInfo, rng: np.random.Generator, size: int = 64) -> bytes:
    """A small valid CT Image Storage file (PS3.3 A.3): one axial slice of a water phantom with
    air-filled 'lungs', signed 12-bit values, Hounsfield units through the rescale (C.8.2.1)."""
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    hounsfield = np.full((size, size), -1000.0)
    hounsfield[(x / 0.9) ** 2 + (y / 0.7) ** 2 < 1] = 0.0
    for side in (-0.4, 0.4):
        hounsfield[((x - side) / 0.3) ** 2 + (y / 0.45) ** 2 < 1] = -850.0
    stored = np.rint(hounsfield + 1024 + rng.normal(0, 8, hounsfield.shape)).astype(np.int16)

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = study.sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, study.sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study.study_uid, study.series_uid
    ds.FrameOfReferenceUID = name_uid(study.sop_uid, "frame-of-reference")
    ds.PatientName, ds.PatientID = patient.name, patient.patient_id
    ds.PatientBirthDate, ds.PatientSex = patient.birth_date, patient.sex
    when = study.acquisition_time
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = study.accession_number, "", "1"
    ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "CT", "Unknown", 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [-250, -250, 0], [1, 0, 0, 0, 1, 0]
    ds.SliceThickness, ds.PixelSpacing, ds.KVP = 5, [500 / size, 500 / size], 120
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.PixelData = stored.astype("<i2").tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _pick(rng: np.random.Generator, options: tuple):
    return options[int(rng.integers(len(options)))]
