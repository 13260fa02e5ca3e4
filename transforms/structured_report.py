"""Findings as DICOM: one TID 1500 measurement report (Comprehensive SR, via highdicom) per processed image.

`WriteStructuredReports` takes the detector's (reference, row) pairs and gives back each row with
``sr_sop_instance_uid`` set, or a dead letter (stage ``structured_report``)::

    (reference, row) -> ReadSourceHeader -> build SR -> STOW-RS to the PACS -> write folder copy -> row
                                |                            |                     |
                                +----------------------------+---------------------+-> dead_letters

What an SR holds (PS3.16 TID 1500 "Measurement Report"):

- for each kept opacity box, a TID 1410 planar ROI group: the box as a closed SCOORD POLYLINE
  (PS3.3 C.18.6.1.2: column\\row image coordinates, 0\\0 the top-left corner of the top-left pixel,
  which is how the table's boxes are measured, x2/y2 exclusive), finding type "Lung opacity"
  (private coding scheme ``99MEDTWIN``, PS3.16 8.2), its score as "Probability" (DCM 122157, UCUM 1);
- one TID 1501 image-level group: the image's COVID-like opacity probability, the table's
  ``covid_probability``;
- every group's algorithm identification (TID 4019: family "Artificial Intelligence", name and
  version = the row's model_name and model_version), and a device observer naming the model;
- the source instance as evidence and as every region's source image;
- Series Description "... RESEARCH USE ONLY - NOT FOR CLINICAL USE"; Verification Flag UNVERIFIED.

Identity and pseudonymisation.  An SR the PACS files beside the image must carry that image's
Patient and Study modules (PS3.3 C.7.1.1, C.7.2.1: an instance of a study has the study's patient),
so the SR stored to the PACS is built from the source instance's own header, read by the worker
from where the image came from (the PACS's WADO-RS ``/metadata``, or the file, under the same
confinement rules as the fetch).  It adds no identifying attribute the source did not have.  That
header never enters a PCollection: it is read, used and dropped inside this DoFn, like the pixel
bytes in the fetch.  The copy written beside the tables, in ``<output>/structured_reports/``, is
the same report de-identified by PS3.15 Annex E's Basic Profile with the Retain UIDs Option
(113100, 113110): Patient ID replaced by the row's ``patient_key``, names, birth date, sex,
accession number, study id, dates and times emptied, Patient Identity Removed = YES.  The outputs
hold pseudonyms only; the PACS holds what it already held.  Both copies have the same SOP Instance
UID, derived from the source SOP Instance UID and the model version, so a retried or re-run image
replaces its SR instead of adding one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import uuid

import apache_beam as beam
import highdicom as hd
import numpy as np
import pydicom
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from pydicom.sr.codedict import codes

from transforms import object_store
from transforms.dead_letters import DEAD_LETTERS
from transforms.dicom_fetch import FetchRejected, fetch_bytes, reference_dead_letter
from transforms.dicomweb import DicomWebAccess, DicomWebError

STAGE = "structured_report"
FOLDER = "structured_reports"
SERIES_NUMBER = 9016
SERIES_DESCRIPTION = "medtwin AI opacities - RESEARCH USE ONLY, NOT FOR CLINICAL USE"  # LO: 64 characters at most
MANUFACTURER = "medtwin"
OPACITY = hd.sr.CodedConcept("opacity", "99MEDTWIN", "Lung opacity")
COVID_OPACITY_PROBABILITY = hd.sr.CodedConcept("covid-probability", "99MEDTWIN",
                                               "Probability of COVID-like lung opacity")
PROBABILITY = codes.DCM.Probability
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
PROCEDURE = codes.SCT.ChestImaging
# PS3.15 Annex E: attributes emptied in the folder copy (Basic Profile actions Z / X for these).
DEIDENTIFIED_EMPTY = ("PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                      "ReferringPhysicianName", "StudyDate", "StudyTime")
HEADER_BYTES = 4 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """Where SRs go and how the source header is read.

    folder: directory (local or any FileSystems prefix) for the de-identified copies; None: none written.
    pacs: the DICOMweb access to STOW-RS the SRs to (its first base URL) and to read WADO-RS sources
        from; None: SRs are not stored to a PACS.
    allowed_prefixes, max_file_bytes: the fetch stage's rules, for sources that are files.
    """

    folder: str | None
    pacs: DicomWebAccess | None
    allowed_prefixes: tuple[str, ...]
    max_file_bytes: int

    def __post_init__(self):
        if self.folder is None and self.pacs is None:
            raise ValueError("a ReportConfig needs a folder, a PACS or both")


def report_uids(source_sop_uid: str, study_uid: str, model_version: str) -> tuple[str, str]:
    """(SR series UID, SR SOP Instance UID): ``2.25.<int>`` UIDs (PS3.5 B.2) derived from the source and
    the model version, so the same image under the same model always has the same SR."""
    def uid(*parts: str) -> str:
        digest = hashlib.sha256("\x00".join(("medtwin-sr", *parts)).encode()).digest()[:16]
        return f"2.25.{int.from_bytes(digest, 'big')}"
    return uid("series", study_uid, model_version), uid("instance", source_sop_uid, model_version)


def build_report(source: pydicom.Dataset, row: dict) -> hd.sr.ComprehensiveSR:
    """The TID 1500 report of `row`'s findings on the image whose header is `source` (see module docstring)."""
    model_name, model_version = row["model_name"], row["model_version"]
    series_uid, sop_uid = report_uids(source.SOPInstanceUID, source.StudyInstanceUID, model_version)
    algorithm = hd.sr.AlgorithmIdentification(name=model_name, version=model_version)
    groups = []
    for index, box in enumerate(row["boxes"], start=1):
        x1, y1, x2, y2 = (float(box[k]) for k in ("x1", "y1", "x2", "y2"))
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float64),
            source_image=hd.sr.SourceImageForRegion.from_source_image(source))
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(identifier=f"opacity {index}",
                                                         uid=_derived_uid(sop_uid, str(index))),
            referenced_region=region, finding_type=OPACITY, algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=PROBABILITY, value=float(box["score"]), unit=NO_UNITS,
                                            algorithm_id=algorithm)]))
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(identifier="image", uid=_derived_uid(sop_uid, "image")),
        finding_type=OPACITY, algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=[hd.sr.Measurement(name=COVID_OPACITY_PROBABILITY, value=float(row["covid_probability"]),
                                        unit=NO_UNITS, algorithm_id=algorithm)]))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_derived_uid("device", model_name, model_version), name=model_name, manufacturer_name=MANUFACTURER,
            model_name=model_name, serial_number=model_version))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE, imaging_measurements=groups)
    sr = hd.sr.ComprehensiveSR(evidence=[source], content=report[0], series_instance_uid=series_uid,
                               series_number=SERIES_NUMBER, sop_instance_uid=sop_uid, instance_number=1,
                               manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False)
    sr.SeriesDescription = SERIES_DESCRIPTION
    sr.ManufacturerModelName = model_name
    sr.SoftwareVersions = model_version
    return sr


def _derived_uid(*parts: str) -> str:
    digest = hashlib.sha256("\x00".join(("medtwin-sr-item", *parts)).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def deidentified_header(source: pydicom.Dataset, patient_key: str) -> pydicom.Dataset:
    """`source` under PS3.15 E.1 (Basic Profile, Retain UIDs Option), patient id := `patient_key`.

    Only what an SR takes from its evidence is kept (an allow-list): UIDs, SOP Class, Modality, the
    Image Pixel description (no pixels) and the emptied Patient/Study attributes.
    """
    header = pydicom.Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows",
                    "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
                    "HighBit", "PixelRepresentation"):
        if keyword in source:
            setattr(header, keyword, source.get(keyword))
    for keyword in DEIDENTIFIED_EMPTY:
        setattr(header, keyword, "")
    header.PatientID = patient_key
    return header


def mark_deidentified(sr: pydicom.Dataset) -> None:
    """PS3.3 C.7.1.1: Patient Identity Removed and the method, with its PS3.16 CID 7050 codes."""
    sr.PatientIdentityRemoved = "YES"
    sr.DeidentificationMethod = "PS3.15 E.1 Basic Profile, Retain UIDs; PatientID = pseudonym"
    sr.DeidentificationMethodCodeSequence = [
        hd.sr.CodedConcept("113100", "DCM", "Basic Application Confidentiality Profile"),
        hd.sr.CodedConcept("113110", "DCM", "Retain UIDs Option")]


def part10_bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def read_source_header(uri: str, config: ReportConfig, client) -> pydicom.Dataset:
    """The source image's header (no pixels): WADO-RS metadata for a PACS uri, else the file, under the
    fetch rules.  Raises FetchRejected, or ValueError for a header pydicom cannot read."""
    if client is not None and client.handles(uri):
        return client.retrieve_metadata(uri, HEADER_BYTES)
    data = fetch_bytes(uri, config.allowed_prefixes, config.max_file_bytes)
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


class WriteStructuredReportFn(beam.DoFn):
    """(reference, detection row) -> the row with ``sr_sop_instance_uid`` (main) or a dead letter.

    The row keeps its element timestamp (the acquisition time).
    """

    def __init__(self, config: ReportConfig):
        self._config = config
        self._client = None
        self._written = Metrics.counter(STAGE, "reports_written")
        self._stored = Metrics.counter(STAGE, "reports_stored")

    def setup(self):
        self._client = self._config.pacs.connect() if self._config.pacs is not None else None
        if self._config.folder is not None and not FileSystems.exists(self._config.folder):
            FileSystems.mkdirs(self._config.folder)

    def process(self, element, timestamp=beam.DoFn.TimestampParam):
        reference, row = element
        try:
            source = read_source_header(reference.get("uri"), self._config, self._client)
            if str(source.get("SOPInstanceUID", "")) != row["sop_instance_uid"]:
                raise ValueError("the source header's SOP Instance UID is not the reference's")
            sr = build_report(source, row)
            if self._client is not None:
                self._client.store([part10_bytes(sr)])
                self._stored.inc()
            if self._config.folder is not None:
                copy = build_report(deidentified_header(source, row["patient_key"]), row)
                mark_deidentified(copy)
                self._write(copy)
                self._written.inc()
        except (FetchRejected, DicomWebError) as error:
            yield TaggedOutput(DEAD_LETTERS, reference_dead_letter(STAGE, f"SR: {error}", reference, timestamp))
            return
        except Exception as error:  # a header pydicom or highdicom cannot use
            yield TaggedOutput(DEAD_LETTERS, reference_dead_letter(
                STAGE, f"SR could not be built: {type(error).__name__}", reference, timestamp))
            return
        yield {**row, "sr_sop_instance_uid": str(sr.SOPInstanceUID)}

    def _write(self, sr: pydicom.Dataset) -> None:
        """Temp name, then rename into place: a retried bundle replaces the file, never halves it."""
        final = FileSystems.join(self._config.folder, f"{sr.SOPInstanceUID}.dcm")
        temporary = FileSystems.join(self._config.folder, f".{sr.SOPInstanceUID}.{uuid.uuid4().hex}.tmp")
        with FileSystems.create(temporary) as handle:
            handle.write(part10_bytes(sr))
        object_store.replace_file(temporary, final)


class WriteStructuredReports(beam.PTransform):
    """PCollection[(reference, detection row)] -> {"detections": rows with sr_sop_instance_uid, "dead_letters"}."""

    def __init__(self, config: ReportConfig):
        super().__init__()
        self._config = config

    def expand(self, pairs):
        written = pairs | "WriteReport" >> beam.ParDo(WriteStructuredReportFn(self._config)).with_outputs(
            DEAD_LETTERS, main="detections")
        return {"detections": written.detections, DEAD_LETTERS: written[DEAD_LETTERS]}
