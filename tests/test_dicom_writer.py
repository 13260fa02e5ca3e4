"""The simulator's DICOM writer: valid Part 10 files, exact pixels, PHI present, same bytes every time."""
import dataclasses
import datetime
import pathlib
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEGLSLossless, JPEG2000Lossless, RLELossless

from model.preprocess import prepare_dicom, prepare_pixels
from model.radiograph import synthesize_chest_xray
from simulator.dicom import (
    IMPLEMENTATION_CLASS_UID,
    LOSSY_TRANSFER_SYNTAXES,
    SUPPORTED_TRANSFER_SYNTAXES,
    PatientIdentity,
    StudyInfo,
    display_window,
    stored_values,
    write_chest_radiograph,
)

PATIENT = PatientIdentity(patient_id="MRN0048213", name="Núñez^Aurelia", birth_date="19600229", sex="F",
                          address="17 Harbour Road, Kingstown KT4 9QP")
STUDY = StudyInfo(
    study_uid="1.2.826.0.1.3680043.8.498.11", series_uid="1.2.826.0.1.3680043.8.498.12",
    sop_uid="1.2.826.0.1.3680043.8.498.13",
    acquisition_time=datetime.datetime(2024, 2, 28, 23, 15, 7, 250000,
                                       tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
    device_id="XR-WARD7-01", modality="DX", manufacturer="Simulated Imaging", model_name="DR-500",
    institution="Kingstown General Hospital", station_name="WARD7XR", accession_number="ACC20240228",
    referring_physician="Okafor^Chidi")
LOSSLESS = [ts for ts in SUPPORTED_TRANSFER_SYNTAXES if ts not in LOSSY_TRANSFER_SYNTAXES]


@pytest.fixture(scope="module")
def radiograph():
    return synthesize_chest_xray(np.random.default_rng(11), rows=192, cols=160, bits_stored=14, num_opacities=1)


def _write(tmp_path, radiograph, name="image.dcm", study=STUDY, **options):
    path = tmp_path / name
    write_chest_radiograph(path, radiograph, PATIENT, study, **options)
    return path


def test_the_encoders_this_venv_has_are_supported():
    for uid in (ExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEG2000):
        assert uid in SUPPORTED_TRANSFER_SYNTAXES


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("transfer_syntax", LOSSLESS)
def test_lossless_round_trip_is_exact(tmp_path, radiograph, transfer_syntax, photometric):
    path = _write(tmp_path, radiograph, photometric=photometric, transfer_syntax=transfer_syntax)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == transfer_syntax
    assert ds.PhotometricInterpretation == photometric
    np.testing.assert_array_equal(ds.pixel_array, stored_values(radiograph, photometric))
    if photometric == "MONOCHROME1":
        np.testing.assert_array_equal(ds.pixel_array, 2 ** 14 - 1 - radiograph.pixels.astype(int))
    # The pipeline's decode of the file equals the training path on the raw radiograph.
    center, width = display_window(radiograph)
    expected = prepare_pixels(radiograph.pixels, bits_stored=14, window_center=center, window_width=width,
                              target_size=96)
    np.testing.assert_allclose(prepare_dicom(ds, target_size=96).image, expected.image, atol=1e-6)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("transfer_syntax", LOSSY_TRANSFER_SYNTAXES)
def test_lossy_round_trip_is_close_and_declared(tmp_path, radiograph, transfer_syntax, photometric):
    ds = pydicom.dcmread(_write(tmp_path, radiograph, photometric=photometric, transfer_syntax=transfer_syntax))
    error = np.abs(ds.pixel_array.astype(int) - stored_values(radiograph, photometric))
    assert error.mean() < 0.01 * 2 ** 14 and error.max() < 0.05 * 2 ** 14
    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionMethod == "ISO_15444_1"
    assert float(ds.LossyImageCompressionRatio) > 2


def test_file_meta_and_preamble(tmp_path, radiograph):
    path = _write(tmp_path, radiograph, transfer_syntax=RLELossless)
    raw = path.read_bytes()
    assert raw[:128] == bytes(128) and raw[128:132] == b"DICM"
    meta = pydicom.dcmread(path).file_meta
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
    assert meta.MediaStorageSOPInstanceUID == STUDY.sop_uid
    assert meta.TransferSyntaxUID == RLELossless
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.FileMetaInformationGroupLength > 0


@pytest.mark.parametrize("modality, sop_class", [("CR", "1.2.840.10008.5.1.4.1.1.1"),
                                                 ("DX", "1.2.840.10008.5.1.4.1.1.1.1")])
def test_sop_class_and_chest_pa_attributes(tmp_path, radiograph, modality, sop_class):
    study = dataclasses.replace(STUDY, modality=modality)
    ds = pydicom.dcmread(_write(tmp_path, radiograph, study=study))
    assert ds.SOPClassUID == sop_class and ds.file_meta.MediaStorageSOPClassUID == sop_class
    assert ds.Modality == modality
    assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition == "PA"
    assert list(ds.ImageType)[:2] == ["ORIGINAL", "PRIMARY"]
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (
        STUDY.study_uid, STUDY.series_uid, STUDY.sop_uid)
    assert ("RescaleType" in ds) == (modality == "DX")
    if modality == "DX":
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert ds.PresentationLUTShape == "IDENTITY"


def test_image_pixel_module(tmp_path, radiograph):
    ds = pydicom.dcmread(_write(tmp_path, radiograph, photometric="MONOCHROME1"))
    assert ds.SamplesPerPixel == 1 and (ds.Rows, ds.Columns) == (192, 160)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 14, 13, 0)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, 0.0)
    assert ds.PresentationLUTShape == "INVERSE"
    center, width = display_window(radiograph)
    assert float(ds.WindowWidth) == width and float(ds.WindowCenter) == 2 ** 14 - center
    assert [float(v) for v in ds.ImagerPixelSpacing] == [float(v) for v in ds.PixelSpacing]
    assert float(ds.PixelSpacing[0]) * 192 == pytest.approx(430, rel=1e-5)  # 43 cm across the long side


def test_window_spans_the_image_values(radiograph):
    center, width = display_window(radiograph)
    # C.11.2.1.2.1: LINEAR maps [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2] onto the display range.
    bottom, top = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    p1, p99 = np.percentile(radiograph.pixels, (1, 99))
    assert bottom - 1 <= p1 and p99 <= top + 1
    assert width <= int(radiograph.pixels.max()) - int(radiograph.pixels.min()) + 1


def test_identifying_attributes_are_really_there(tmp_path, radiograph):
    ds = pydicom.dcmread(_write(tmp_path, radiograph))
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Núñez^Aurelia"
    assert ds.PatientID == "MRN0048213" and ds.OtherPatientIDs == "MRN0048213"
    assert ds.OtherPatientIDsSequence[0].PatientID == "MRN0048213"
    assert ds.PatientBirthDate == "19600229" and ds.PatientSex == "F"
    assert ds.PatientAge == "063Y"  # 29 Feb 1960 to 28 Feb 2024 (UTC): the birthday has not come
    assert ds.PatientAddress == PATIENT.address
    assert ds.InstitutionName == STUDY.institution
    assert str(ds.ReferringPhysicianName) == "Okafor^Chidi"
    assert ds.AccessionNumber == "ACC20240228" and ds.StationName == "WARD7XR"
    assert ds.DeviceSerialNumber == "XR-WARD7-01"


def test_times_are_the_acquisition_time_in_utc(tmp_path, radiograph):
    ds = pydicom.dcmread(_write(tmp_path, radiograph))
    # 23:15:07.25 at UTC+2 is 21:15:07.25 UTC the same day.
    assert ds.AcquisitionDateTime == "20240228211507.250000+0000"
    assert (ds.StudyDate, ds.StudyTime) == ("20240228", "211507.250000")
    assert ds.AcquisitionDate == ds.SeriesDate == ds.ContentDate == "20240228"


@pytest.mark.parametrize("transfer_syntax", SUPPORTED_TRANSFER_SYNTAXES)
def test_writing_twice_gives_identical_bytes(tmp_path, radiograph, transfer_syntax):
    first = _write(tmp_path, radiograph, "a.dcm", transfer_syntax=transfer_syntax, photometric="MONOCHROME1")
    second = _write(tmp_path, radiograph, "b.dcm", transfer_syntax=transfer_syntax, photometric="MONOCHROME1")
    assert first.read_bytes() == second.read_bytes()


def test_another_process_writes_the_same_bytes(tmp_path, radiograph):
    # Catches anything drawn per process (random UIDs, clocks) that one process would not show.
    here = _write(tmp_path, radiograph, "here.dcm")
    there = tmp_path / "there.dcm"
    script = (
        "import sys, numpy as np\n"
        "sys.path[:0] = sys.argv[3:]\n"
        "import test_dicom_writer as t\n"
        "from model.radiograph import synthesize_chest_xray\n"
        "from simulator.dicom import write_chest_radiograph\n"
        "image = synthesize_chest_xray(np.random.default_rng(11), rows=192, cols=160, bits_stored=14,"
        " num_opacities=1)\n"
        "write_chest_radiograph(sys.argv[1], image, t.PATIENT, t.STUDY)\n"
    )
    tests_dir, root = pathlib.Path(__file__).parent, pathlib.Path(__file__).parent.parent
    subprocess.run([sys.executable, "-c", script, str(there), "", str(tests_dir), str(root)], check=True)
    assert here.read_bytes() == there.read_bytes()


def test_different_instance_gives_different_bytes(tmp_path, radiograph):
    other = dataclasses.replace(STUDY, sop_uid="1.2.826.0.1.3680043.8.498.14")
    assert _write(tmp_path, radiograph, "a.dcm").read_bytes() != _write(
        tmp_path, radiograph, "b.dcm", study=other).read_bytes()


@pytest.mark.parametrize("change, message", [
    (dict(photometric="RGB"), "photometric"),
    (dict(transfer_syntax="1.2.840.10008.1.2.4.50"), "cannot be written"),
    (dict(study=dataclasses.replace(STUDY, modality="CT")), "modality"),
    (dict(study=dataclasses.replace(STUDY, acquisition_time=datetime.datetime(2024, 1, 1))), "timezone"),
    (dict(study=dataclasses.replace(STUDY, station_name="A-STATION-NAME-TOO-LONG")), "16"),
])
def test_invalid_inputs_raise(tmp_path, radiograph, change, message):
    study = change.pop("study", STUDY)
    with pytest.raises(ValueError, match=message):
        write_chest_radiograph(tmp_path / "x.dcm", radiograph, PATIENT, study, **change)


def test_invalid_patient_raises(tmp_path, radiograph):
    with pytest.raises(ValueError, match="sex"):
        write_chest_radiograph(tmp_path / "x.dcm", radiograph, dataclasses.replace(PATIENT, sex="X"), STUDY)
    with pytest.raises(ValueError, match="after the acquisition"):
        write_chest_radiograph(tmp_path / "x.dcm", radiograph,
                               dataclasses.replace(PATIENT, birth_date="20300101"), STUDY)
