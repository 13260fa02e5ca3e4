"""Identifying text in uris and DICOM header values (issue 13 B9): never quoted in a dead-letter reason
or payload, nor on the report picture (value withheld)."""

import datetime as dt
import io

import numpy as np
import orjson
import pydicom
import pytest

from transforms.decode import DecodeDicomReferencesFn, RawRecord
from transforms.dicom_decode import DicomReadConfig, DicomRejected, decode_dicom_bytes
from transforms.dicom_fetch import FetchRejected, fetch_bytes, reference_dead_letter
from transforms.pseudonymise import DEMO_KEY, Pseudonymiser

MRN, NAME = "MRN0099001", "DOE^JANE"
PLANTED = (MRN, MRN[3:], NAME, "DOE", "JANE")
T0 = dt.datetime(2026, 3, 2, 6, tzinfo=dt.timezone.utc)
SOP = "1.2.826.0.1.3680043.8.498.778"


def _clean(text):
    return not any(planted in text for planted in PLANTED)


def _xray(path, **attributes):
    from model.radiograph import synthesize_chest_xray
    from simulator.dicom import PatientIdentity, StudyInfo, write_chest_radiograph

    study = StudyInfo(study_uid="1.2.3", series_uid="1.2.3.4", sop_uid=SOP, acquisition_time=T0, device_id="XR-1",
                      modality="DX", manufacturer="Sim", model_name="DR", institution="General",
                      station_name="XR1", accession_number="ACC1", referring_physician="Who^Doctor")
    patient = PatientIdentity(patient_id=MRN, name=NAME, birth_date="19700101", sex="F", address="1 Main Street")
    write_chest_radiograph(path, synthesize_chest_xray(np.random.default_rng(3), rows=64, cols=64), patient, study)
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        if keyword == "TransferSyntaxUID":
            ds.file_meta.TransferSyntaxUID = value
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)
    return path


HOSTILE_HEADERS = [
    {"Modality": MRN},
    {"BodyPartExamined": NAME},
    {"PhotometricInterpretation": f"{NAME} {MRN}"},
    {"TransferSyntaxUID": f"1.2.{MRN[3:]}"},
]


def _config(tmp_path):
    return DicomReadConfig(allowed_prefixes=(str(tmp_path),), target_size=64, allowed_modalities=("DX", "CR"))


@pytest.mark.parametrize("attributes", HOSTILE_HEADERS, ids=lambda a: next(iter(a)))
def test_dicom_rejections_quote_no_header_value(tmp_path, attributes):
    path = _xray(tmp_path / f"{SOP}.dcm", **attributes)
    with pytest.raises(DicomRejected) as caught:
        decode_dicom_bytes(path.read_bytes(), _config(tmp_path))
    assert _clean(str(caught.value)) and "withheld" in str(caught.value)


def test_a_non_integer_pixel_attribute_is_not_quoted(tmp_path):
    path = _xray(tmp_path / f"{SOP}.dcm")
    data = path.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    ds["Rows"].VR, ds.Rows = "LO", MRN  # an integration that writes text where a number belongs
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(DicomRejected) as caught:
        decode_dicom_bytes(buffer.getvalue(), _config(tmp_path))
    assert _clean(str(caught.value))


@pytest.mark.parametrize("attributes", HOSTILE_HEADERS, ids=lambda a: next(iter(a)))
def test_the_report_picture_names_no_header_value(tmp_path, attributes):
    from pipelines.report import index_images, load_xray

    (tmp_path / "1.2.3").mkdir()
    _xray(tmp_path / "1.2.3" / f"{SOP}.dcm", **attributes)
    detection = {"sop_instance_uid": SOP, "acquisition_time": T0, "covid_probability": 0.5, "boxes": []}
    panel = load_xray(detection, index_images(str(tmp_path)), str(tmp_path), 64)
    assert panel.image is None and _clean(panel.missing_reason)


URI = f"/pacs/{NAME.replace('^', '_')}_{MRN}/1.dcm"


def test_fetch_reasons_and_reference_dead_letters_quote_no_uri(tmp_path):
    with pytest.raises(FetchRejected) as caught:
        fetch_bytes(URI, (str(tmp_path),), 1 << 20)
    assert _clean(str(caught.value))

    class Stamp:
        micros = 0

    reference = {"uri": URI, "sop_instance_uid": SOP, "patient_key": "p-1", "acquisition_time": T0,
                 "source": "dicom_refs/date=2026-03-02/dicom_refs-06.avro#1"}
    row = reference_dead_letter("fetch_dicom", str(caught.value), reference, Stamp())
    assert _clean(orjson.dumps(row, default=str).decode()) and "uri withheld" in row["payload"]


def test_a_decoded_reference_dead_letter_keeps_only_a_digest_of_its_uri():
    record = {"uri": URI, "study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.4", "sop_instance_uid": SOP,
              "patient_id": MRN, "device_id": "XR-1", "modality": "DX", "acquisition_time": "not a time"}
    raw = RawRecord("dicom_refs/date=2026-03-02/dicom_refs-06.jsonl:1", orjson.dumps(record), T0)
    fn = DecodeDicomReferencesFn(Pseudonymiser(DEMO_KEY))
    fn.setup()
    outputs = list(fn.process(raw))
    assert len(outputs) == 1 and outputs[0].tag == "dead_letters"
    text = orjson.dumps(outputs[0].value, default=str).decode()
    assert _clean(text) and "uri" in outputs[0].value["payload"]
