"""Write a synthetic chest radiograph as a real DICOM Part 10 file.

The file is what a CR reader or DX detector would send to the PACS: a CR Image
(PS3.3 A.2) or Digital X-Ray Image For Presentation (A.26) object, PA chest,
with the patient's identity in it.  The identifying attributes (name, ID,
birth date, address, other IDs, institution, referring physician, accession
number, station) are deliberately real-looking PHI: the pipeline must strip
them, and its tests need something to strip.

Not for clinical use: the images are simulated.

Everything in the file comes from the arguments, so the same inputs give the
same bytes: UIDs come from StudyInfo, dates from its acquisition time, and the
implementation UID is derived from a fixed name.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import uuid

import numpy as np
import pydicom
from pydicom.config import RAISE
from pydicom.datadict import dictionary_VR
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    UID,
)
from pydicom.valuerep import validate_value

from model.radiograph import SyntheticRadiograph

# A UUID-derived UID (PS3.5 B.2) from a name-based UUID: the same on every run and machine.
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:medtwin:simulator.dicom').int}"
IMPLEMENTATION_VERSION_NAME = "MEDTWIN_0_1"
SOP_CLASSES = {"CR": ComputedRadiographyImageStorage, "DX": DigitalXRayImageStorageForPresentation}
DETECTOR_SIDE_MM = 430.0  # a 43 cm cassette/detector spans the longest image side
JPEG2000_LOSSY_RATIO = 10  # compression ratio for JPEG 2000 (lossy), a common CR archive setting

# Native encodings are written by pydicom itself (PS3.5 A.1, A.2, A.5); the
# compressed ones (PS3.5 A.4) need an encoder plugin, named to keep output stable.
_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
_ENCODER_PLUGINS = {RLELossless: "pydicom", JPEGLSLossless: "pyjpegls", JPEG2000Lossless: "pylibjpeg",
                    JPEG2000: "pylibjpeg"}
SUPPORTED_TRANSFER_SYNTAXES: tuple[str, ...] = _NATIVE + tuple(
    uid for uid, plugin in _ENCODER_PLUGINS.items() if plugin in get_encoder(uid).available_plugins)
LOSSY_TRANSFER_SYNTAXES: tuple[str, ...] = (JPEG2000,)


@dataclasses.dataclass(frozen=True)
class PatientIdentity:
    """Who the image is of.  name: DICOM PN "Family^Given"; birth_date: YYYYMMDD; sex: M, F or O."""

    patient_id: str
    name: str
    birth_date: str
    sex: str
    address: str


@dataclasses.dataclass(frozen=True)
class StudyInfo:
    """Where, when and by what the image was taken.  acquisition_time: timezone-aware."""

    study_uid: str
    series_uid: str
    sop_uid: str
    acquisition_time: datetime.datetime
    device_id: str
    modality: str  # "CR" | "DX"
    manufacturer: str
    model_name: str
    institution: str
    station_name: str
    accession_number: str
    referring_physician: str


def write_chest_radiograph(path: str | os.PathLike, radiograph: SyntheticRadiograph, patient: PatientIdentity,
                           study: StudyInfo, *, photometric: str = "MONOCHROME2",
                           transfer_syntax: str = ExplicitVRLittleEndian) -> None:
    """Write `radiograph` to `path` as a PA chest CR or DX Part 10 file.

    radiograph.pixels: (rows, cols) uint16 MONOCHROME2 values, stored as they are
    for MONOCHROME2 and as (2**bits_stored - 1) - value for MONOCHROME1.
    The window (PS3.3 C.11.2) is `display_window(radiograph)`, mirrored for
    MONOCHROME1 so that both display alike.  Raises ValueError for unsupported
    options and for identity or study values DICOM cannot hold.
    """
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(f"transfer syntax {transfer_syntax} cannot be written here; "
                         f"supported: {', '.join(SUPPORTED_TRANSFER_SYNTAXES)}")
    if study.modality not in SOP_CLASSES:
        raise ValueError(f"modality must be CR or DX, got {study.modality!r}")
    if patient.sex not in ("M", "F", "O"):
        raise ValueError(f"sex must be M, F or O, got {patient.sex!r}")
    if study.acquisition_time.utcoffset() is None:
        raise ValueError("acquisition_time must be timezone-aware")

    ds = pydicom.Dataset()
    _file_meta(ds, study, UID(transfer_syntax))
    _sop_common(ds, study)
    _patient(ds, patient, study)
    _study_and_series(ds, study)
    _equipment(ds, study)
    _image(ds, radiograph, photometric, study.modality)
    _encode_pixels(ds, stored_values(radiograph, photometric), UID(transfer_syntax))
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def stored_values(radiograph: SyntheticRadiograph, photometric: str) -> np.ndarray:
    """(rows, cols) uint16 values as stored for `photometric` (PS3.3 C.7.6.3.1.2)."""
    if photometric == "MONOCHROME1":
        return ((2 ** radiograph.bits_stored - 1) - radiograph.pixels.astype(np.int32)).astype(np.uint16)
    return radiograph.pixels.astype(np.uint16, copy=False)


def display_window(radiograph: SyntheticRadiograph) -> tuple[int, int]:
    """(center, width) in MONOCHROME2 stored values: spans the 0.5-99.5 percentiles."""
    low, high = np.percentile(radiograph.pixels[::2, ::2], (0.5, 99.5))
    return int(round((low + high) / 2)), max(2, int(round(high - low)))


def _set(ds: pydicom.Dataset, keyword: str, value) -> None:
    """Set an attribute after checking it fits its VR (length, characters), raising ValueError."""
    validate_value(dictionary_VR(keyword), value, RAISE)
    setattr(ds, keyword, value)


def _file_meta(ds: pydicom.Dataset, study: StudyInfo, transfer_syntax: UID) -> None:
    """PS3.10 7.1 File Meta Information; pydicom adds the group length and the preamble."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = SOP_CLASSES[study.modality]
    _set(meta, "MediaStorageSOPInstanceUID", study.sop_uid)
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta


def _sop_common(ds: pydicom.Dataset, study: StudyInfo) -> None:
    """PS3.3 C.12.1 SOP Common.  UTF-8 (ISO_IR 192) so any name can be written."""
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SOP_CLASSES[study.modality]
    _set(ds, "SOPInstanceUID", study.sop_uid)
    when = study.acquisition_time.astimezone(datetime.timezone.utc)
    ds.InstanceCreationDate, ds.InstanceCreationTime = _da(when), _tm(when)
    ds.TimezoneOffsetFromUTC = "+0000"


def _patient(ds: pydicom.Dataset, patient: PatientIdentity, study: StudyInfo) -> None:
    """PS3.3 C.7.1.1 Patient, C.7.2.2 Patient Study: the identity the pipeline must remove."""
    _set(ds, "PatientName", patient.name)
    _set(ds, "PatientID", patient.patient_id)
    _set(ds, "IssuerOfPatientID", study.institution)
    _set(ds, "PatientBirthDate", patient.birth_date)
    ds.PatientSex = patient.sex
    _set(ds, "PatientAddress", patient.address)
    # Other Patient IDs (0010,1000) is retired but still sent by many modalities,
    # and PS3.15 Table E.1-1 lists both it and its sequence for removal.
    _set(ds, "OtherPatientIDs", patient.patient_id)
    other = pydicom.Dataset()
    _set(other, "PatientID", patient.patient_id)
    _set(other, "IssuerOfPatientID", study.institution)
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    born = datetime.datetime.strptime(patient.birth_date, "%Y%m%d").date()
    on = study.acquisition_time.astimezone(datetime.timezone.utc).date()
    age = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    if age < 0:
        raise ValueError(f"birth date {patient.birth_date} is after the acquisition")
    ds.PatientAge = f"{min(age, 999):03d}Y"


def _study_and_series(ds: pydicom.Dataset, study: StudyInfo) -> None:
    """PS3.3 C.7.2.1 General Study, C.7.3.1 General Series, C.7.10.1 General Acquisition,
    C.8.1.1 CR Series / C.8.11.1 DX Series.  All times are the acquisition time, in UTC."""
    when = study.acquisition_time.astimezone(datetime.timezone.utc)
    _set(ds, "StudyInstanceUID", study.study_uid)
    _set(ds, "SeriesInstanceUID", study.series_uid)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = _da(when)
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = _tm(when)
    ds.AcquisitionDateTime = _da(when) + _tm(when) + "+0000"
    _set(ds, "AccessionNumber", study.accession_number)
    _set(ds, "StudyID", study.accession_number)
    _set(ds, "ReferringPhysicianName", study.referring_physician)
    ds.StudyDescription = "XR CHEST PA"
    ds.Modality = study.modality
    ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber = 1, 1, 1
    ds.SeriesDescription = "CHEST PA"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    if study.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = "U"  # C.8.11.2: unpaired body part
        chest = pydicom.Dataset()
        chest.CodeValue, chest.CodingSchemeDesignator, chest.CodeMeaning = "43799004", "SCT", "Chest"
        ds.AnatomicRegionSequence = Sequence([chest])


def _equipment(ds: pydicom.Dataset, study: StudyInfo) -> None:
    """PS3.3 C.7.5.1 General Equipment: the device id travels as its serial number."""
    _set(ds, "Manufacturer", study.manufacturer)
    _set(ds, "ManufacturerModelName", study.model_name)
    _set(ds, "DeviceSerialNumber", study.device_id)
    _set(ds, "InstitutionName", study.institution)
    _set(ds, "StationName", study.station_name)


def _image(ds: pydicom.Dataset, radiograph: SyntheticRadiograph, photometric: str, modality: str) -> None:
    """PS3.3 C.7.6.1 General Image, C.7.6.3 Image Pixel, C.11.1 Modality LUT, C.11.2 VOI LUT,
    and for DX C.8.11.3 DX Image and C.8.11.4 DX Detector."""
    rows, cols = radiograph.pixels.shape
    bits = radiograph.bits_stored
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]  # PA: rows run to the patient's left, columns to the feet
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    center, width = display_window(radiograph)
    if photometric == "MONOCHROME1":
        # C.11.2.1.2.1 puts a LINEAR window between integers: mirroring x -> top - x maps
        # center c to top + 1 - c, which gives exactly the inverted display.
        center = (2 ** bits - 1) + 1 - center
    ds.WindowCenter, ds.WindowWidth = str(center), str(width)
    ds.VOILUTFunction = "LINEAR"
    spacing = f"{DETECTOR_SIDE_MM / max(rows, cols):.6f}"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    if modality == "DX":
        ds.RescaleType = "US"  # C.8.11.3: unspecified units
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
        # Stored values grow with attenuation (log of transmitted intensity, negated)
        # in MONOCHROME2, so higher values mean less beam intensity: sign -1.
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
        ds.DetectorType = "SCINTILLATOR"


def _encode_pixels(ds: pydicom.Dataset, stored: np.ndarray, transfer_syntax: UID) -> None:
    """Pixel Data in `transfer_syntax`; lossy encodings are declared (PS3.3 C.7.6.1.1.5)."""
    ds.LossyImageCompression = "00"
    if not transfer_syntax.is_compressed:
        ds.PixelData = stored.astype("<u2").tobytes()
        return
    options = {"j2k_cr": [JPEG2000_LOSSY_RATIO]} if transfer_syntax in LOSSY_TRANSFER_SYNTAXES else {}
    # The SOP Instance UID is the caller's: the device compressed at acquisition.
    ds.compress(transfer_syntax, stored, encoding_plugin=_ENCODER_PLUGINS[transfer_syntax],
                generate_instance_uid=False, **options)
    if transfer_syntax in LOSSY_TRANSFER_SYNTAXES:
        ds.LossyImageCompression = "01"
        compressed = sum(len(frame) for frame in generate_frames(ds.PixelData, number_of_frames=1))
        ds.LossyImageCompressionRatio = f"{stored.nbytes / compressed:.4f}"
        ds.LossyImageCompressionMethod = "ISO_15444_1"


def _da(when: datetime.datetime) -> str:
    return when.strftime("%Y%m%d")


def _tm(when: datetime.datetime) -> str:
    return when.strftime("%H%M%S") + (f".{when.microsecond:06d}" if when.microsecond else "")
