"""Findings as DICOM SR without a PACS: the folder copy beside the tables, its content and its privacy.

A file-based batch run writes one de-identified SR per detections row into OUTPUT/structured_reports;
each is read back and checked against its row (tests/sr_reading.py), and none carries any identifying
value of its source image (names, MRN, birth date, accession number, referring physician, institution).
The PACS copies (the source's identity kept) are checked in tests/test_pacs.py.
"""

from __future__ import annotations

import glob
import json

import pyarrow.dataset as pads
import pydicom
import pytest
from sr_reading import findings_of

from pipelines.cli import main
from transforms.structured_report import build_report, report_uids

IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "ReferringPhysicianName",
               "InstitutionName", "StationName", "OtherPatientIDs")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr")
    assert main(["simulate", "--out", str(root / "in"), "--patients", "10", "--devices", "2", "--hours", "2",
                 "--seed", "5", "--infected-fraction", "0.6", "--image-size", "256", "--quiet"]) == 0
    assert main(["run", "--input", str(root / "in"), "--output", str(root / "out"), "--demo"]) == 0
    return root


def test_one_sr_per_row_matching_it(run):
    rows = pads.dataset(str(run / "out" / "detections"), format="parquet").to_table().to_pylist()
    files = sorted(glob.glob(str(run / "out" / "structured_reports" / "*.dcm")))
    assert len(rows) == len(json.loads((run / "in" / "truth" / "lesions.json").read_text())) > 0
    assert {f"{row['sr_sop_instance_uid']}.dcm" for row in rows} == {path.rsplit("/", 1)[1] for path in files}
    assert any(row["boxes"] for row in rows), "some findings to compare"
    for row in rows:
        sr = pydicom.dcmread(str(run / "out" / "structured_reports" / f"{row['sr_sop_instance_uid']}.dcm"))
        assert findings_of(sr) == findings_of(row)
        assert sr.PatientID == row["patient_key"]


def test_folder_copies_carry_no_identifying_value_of_their_source(run):
    checked = 0
    for path in glob.glob(str(run / "in" / "dicom" / "*" / "*.dcm")):
        source = pydicom.dcmread(path, stop_before_pixels=True)
        _, sr_uid = report_uids(source.SOPInstanceUID, source.StudyInstanceUID,
                                pads.dataset(str(run / "out" / "detections"), format="parquet")
                                .to_table().to_pylist()[0]["model_version"])
        report = run / "out" / "structured_reports" / f"{sr_uid}.dcm"
        if not report.exists():
            continue
        data, checked = report.read_bytes(), checked + 1
        assert len(str(source.PatientName)) >= 4 and len(source.PatientID) >= 4
        for keyword in IDENTIFYING:
            value = str(source.get(keyword, "") or "")
            if len(value) >= 4:
                assert value.encode() not in data, f"{keyword} of the source is in its SR folder copy"
    assert checked > 0


def test_the_same_image_and_model_always_give_the_same_sr_uid(run):
    path = sorted(glob.glob(str(run / "in" / "dicom" / "*" / "*.dcm")))[0]
    source = pydicom.dcmread(path, stop_before_pixels=True)
    row = {"sop_instance_uid": source.SOPInstanceUID, "model_name": "cascade_tiny", "model_version": "v1",
           "boxes": [], "covid_probability": 0.0}
    first, again = build_report(source, row), build_report(source, row)
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert build_report(source, {**row, "model_version": "v2"}).SOPInstanceUID != first.SOPInstanceUID
    assert findings_of(first) == findings_of(row)
