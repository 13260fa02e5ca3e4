"""Imaging path: fetch DICOM files safely, decode them safely; everything else is a dead letter."""

import collections
import datetime as dt
import io
import os
import pathlib
import time
import warnings

import apache_beam as beam
import numpy as np
import pydicom
import pytest
from apache_beam.io.filesystem import FileMetadata, FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp
from PIL import Image
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from model.radiograph import synthesize_chest_xray
from schemas import DEAD_LETTERS as DEAD_LETTERS_TABLE
from schemas import validate
from simulator.dicom import (
    SUPPORTED_TRANSFER_SYNTAXES,
    PatientIdentity,
    StudyInfo,
    stored_values,
    write_chest_radiograph,
)
from transforms import dicom_decode, dicom_fetch
from transforms.dicom_decode import DecodedStudy, DicomReadConfig, DicomRejected, ReadStudies, decode_dicom_bytes
from transforms.dicom_fetch import FetchRejected, check_uri, fetch_bytes

ACQUIRED = dt.datetime(2026, 3, 2, 6, 40, 12, tzinfo=dt.timezone.utc)
PATIENT = PatientIdentity(patient_id="MRN0099001", name="Doe^Jane", birth_date="19700101", sex="F",
                          address="1 Test Street")
LOSSLESS = [ts for ts in SUPPORTED_TRANSFER_SYNTAXES if ts != JPEG2000]


def _study(sop="1.2.826.0.1.3680043.8.498.3", modality="CR"):
    return StudyInfo(study_uid="1.2.826.0.1.3680043.8.498.1", series_uid="1.2.826.0.1.3680043.8.498.2",
                     sop_uid=sop, acquisition_time=ACQUIRED, device_id="XR-1", modality=modality,
                     manufacturer="Sim", model_name="DR-1", institution="Test Hospital", station_name="XR1",
                     accession_number="ACC1", referring_physician="Who^Doctor")


@pytest.fixture(scope="module")
def radiograph():
    return synthesize_chest_xray(np.random.default_rng(5), rows=160, cols=128, bits_stored=12)


def _write(directory, radiograph, name="chest.dcm", **options) -> pathlib.Path:
    path = pathlib.Path(directory) / name
    write_chest_radiograph(path, radiograph, PATIENT, _study(), **options)
    return path


def _config(*prefixes, **overrides):
    return DicomReadConfig(allowed_prefixes=tuple(str(p) for p in prefixes) or ("/",), target_size=64, **overrides)


PERMISSIVE = dict(allowed_modalities=None, require_chest=False, max_pixel_bytes=512 * 1024 * 1024)


def _dataset_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _rejection(data, config) -> DicomRejected:
    with pytest.raises(DicomRejected) as caught:
        decode_dicom_bytes(data, config)
    return caught.value


def _stored(data: bytes, frame=0) -> np.ndarray:
    """The stored values pydicom's decoders give, the array prepare_dicom starts from."""
    ds = pydicom.dcmread(io.BytesIO(data))
    return get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, index=frame)[0]


# --- Real files nobody here wrote ------------------------------------------------------------

REJECTION_KINDS = {
    dicom_fetch.NOT_A_FILE, dicom_decode.NOT_DICOM, dicom_decode.CORRUPT_HEADER,
    dicom_decode.UNSUPPORTED_TRANSFER_SYNTAX, dicom_decode.NO_PIXEL_DATA, dicom_decode.NOT_MONOCHROME,
    dicom_decode.BAD_PIXEL_ATTRIBUTES, dicom_decode.NO_SUCH_FRAME, dicom_decode.TOO_LARGE,
    dicom_decode.TRUNCATED_PIXELS, dicom_decode.CORRUPT_PIXELS, dicom_decode.CODESTREAM_REFUSED,
}


def test_every_pydicom_test_file_is_decoded_or_rejected_with_a_reason():
    files = get_testdata_files()
    assert len(files) > 200  # pydicom's own test files and the pydicom-data package
    config = _config(*sorted({os.path.dirname(f) for f in files}), **PERMISSIVE)
    decoded, rejected = {}, collections.Counter()
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the deliberately broken files
        for path in files:
            try:
                data = fetch_bytes(path, config.allowed_prefixes, config.max_file_bytes)
                image = decode_dicom_bytes(data, config)
            except (FetchRejected, DicomRejected) as error:
                assert str(error).startswith(error.kind + ": ") and error.detail
                rejected[error.kind] += 1
                continue
            assert image.image.dtype == np.float32 and max(image.image.shape) == 64
            assert 0.0 <= image.image.min() <= image.image.max() <= 1.0
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            decoded[os.path.basename(path)] = header.file_meta.TransferSyntaxUID
    elapsed = time.perf_counter() - started
    print(f"\n{len(files)} files: {len(decoded)} decoded, rejected {dict(rejected)} in {elapsed:.1f} s")
    assert len(decoded) + sum(rejected.values()) == len(files)
    assert set(rejected) <= REJECTION_KINDS
    assert len(decoded) >= 60 and rejected[dicom_decode.NOT_MONOCHROME] >= 20
    assert {JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
            RLELossless} <= set(decoded.values())
    # The bundled JPEG Baseline files are all colour (see the Pillow-encoded test below for a grey one).
    assert JPEGBaseline8Bit not in set(decoded.values())
    assert elapsed < 30


# Families of one image stored losslessly in several transfer syntaxes.
LOSSLESS_FAMILIES = [
    ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
     "MR_small_bigendian.dcm", "MR_small_implicit.dcm"),
    ("emri_small.dcm", "emri_small_RLE.dcm", "emri_small_big_endian.dcm", "emri_small_jpeg_2k_lossless.dcm",
     "emri_small_jpeg_ls_lossless.dcm"),
    ("RG1_UNCR.dcm", "RG1_J2KR.dcm"),
    ("RG3_UNCR.dcm", "RG3_J2KR.dcm"),
    ("MR2_UNCR.dcm", "MR2_J2KR.dcm"),
]


@pytest.mark.parametrize("family", LOSSLESS_FAMILIES, ids=lambda family: family[0])
def test_lossless_variants_decode_pixel_identical(family):
    config = _config(**PERMISSIVE)
    datas = [pathlib.Path(get_testdata_file(name)).read_bytes() for name in family]
    syntaxes = {pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).file_meta.TransferSyntaxUID for d in datas}
    assert len(syntaxes) == len(family)
    reference_stored, reference_image = _stored(datas[0]), decode_dicom_bytes(datas[0], config).image
    for name, data in zip(family[1:], datas[1:]):
        np.testing.assert_array_equal(_stored(data), reference_stored, err_msg=name)
        np.testing.assert_array_equal(decode_dicom_bytes(data, config).image, reference_image, err_msg=name)


# --- Files the simulator writes ---------------------------------------------------------------

@pytest.mark.parametrize("transfer_syntax", SUPPORTED_TRANSFER_SYNTAXES)
def test_simulated_radiographs_decode_in_every_transfer_syntax_and_monochrome1_is_inverted(
        tmp_path, radiograph, transfer_syntax):
    m2 = _write(tmp_path, radiograph, "m2.dcm", transfer_syntax=transfer_syntax).read_bytes()
    m1 = _write(tmp_path, radiograph, "m1.dcm", photometric="MONOCHROME1",
                transfer_syntax=transfer_syntax).read_bytes()
    config = _config()  # the production defaults: CR/DX/DR, chest
    image2, image1 = decode_dicom_bytes(m2, config), decode_dicom_bytes(m1, config)
    assert image2.original_shape == image1.original_shape == (160, 128)
    assert image2.image.shape == (64, 51) and image2.scale == pytest.approx(64 / 160)
    if transfer_syntax != JPEG2000:
        np.testing.assert_array_equal(_stored(m2), stored_values(radiograph, "MONOCHROME2"))
        np.testing.assert_array_equal(_stored(m1), 4095 - _stored(m2))  # stored the other way round ...
    assert np.abs(image1.image - image2.image).mean() < 0.01  # ... displayed alike, MONOCHROME2 sense
    assert image2.image.std() > 0.1


def test_a_grey_jpeg_baseline_radiograph_decodes(tmp_path, radiograph):
    """JPEG Baseline (PS3.5 A.4.1, 8-bit), encoded by Pillow as a modality's JPEG codec would."""
    ds = pydicom.dcmread(_write(tmp_path, radiograph))
    grey = (radiograph.pixels >> 4).astype(np.uint8)  # 12 -> 8 bits stored
    jpeg = io.BytesIO()
    Image.fromarray(grey).save(jpeg, format="JPEG", quality=95)
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        del ds[keyword]
    stored = _stored(_dataset_bytes(ds))
    assert np.abs(stored.astype(int) - grey).mean() < 2  # lossy, but close
    image = decode_dicom_bytes(_dataset_bytes(ds), _config())
    reference = decode_dicom_bytes(_write(tmp_path, radiograph, "native.dcm").read_bytes(), _config())
    assert image.image.shape == (64, 51)
    assert np.corrcoef(image.image.ravel(), reference.image.ravel())[0, 1] > 0.95


def test_lossless_simulated_files_prepare_to_the_same_image(tmp_path, radiograph):
    images = [decode_dicom_bytes(_write(tmp_path, radiograph, f"{i}.dcm", transfer_syntax=ts).read_bytes(),
                                 _config()).image for i, ts in enumerate(LOSSLESS)]
    for image in images[1:]:
        np.testing.assert_array_equal(image, images[0])


# --- Each rejection, on purpose ----------------------------------------------------------------

def _fetch_rejection(uri, prefixes, max_bytes=1 << 20) -> FetchRejected:
    with pytest.raises(FetchRejected) as caught:
        fetch_bytes(str(uri), tuple(str(p) for p in prefixes), max_bytes)
    return caught.value


def test_fetch_reads_a_file_under_an_allowed_prefix(tmp_path, radiograph):
    (tmp_path / "in").mkdir()
    path = _write(tmp_path / "in", radiograph)
    assert fetch_bytes(str(path), (str(tmp_path / "in"),), 1 << 20) == path.read_bytes()


def test_fetch_rejects_uris_outside_the_allowed_prefixes(tmp_path):
    (tmp_path / "input").mkdir()
    (tmp_path / "input-evil").mkdir()
    (tmp_path / "input-evil" / "x.dcm").write_bytes(b"x")
    error = _fetch_rejection(tmp_path / "input-evil" / "x.dcm", [tmp_path / "input"])  # a prefix, not a directory
    assert error.kind == dicom_fetch.OUTSIDE_PREFIXES
    assert _fetch_rejection("/etc/passwd", [tmp_path / "input"]).kind == dicom_fetch.OUTSIDE_PREFIXES
    assert _fetch_rejection("gs://bucket/dicom/x.dcm", [tmp_path / "input"]).kind == dicom_fetch.OUTSIDE_PREFIXES
    with pytest.raises(FetchRejected, match="outside the allowed prefixes"):
        check_uri("gs://bucket/dicom-evil/x.dcm", ("gs://bucket/dicom",))
    assert check_uri("gs://bucket/dicom/x.dcm", ("gs://bucket/dicom",)) == "gs://bucket/dicom/x.dcm"


def test_fetch_rejects_parent_segments_globs_and_control_characters(tmp_path):
    (tmp_path / "input").mkdir()
    (tmp_path / "secret.dcm").write_bytes(b"x")
    error = _fetch_rejection(f"{tmp_path}/input/../secret.dcm", [tmp_path / "input"])
    assert error.kind == dicom_fetch.PARENT_SEGMENT and "parent directory" in str(error)
    assert _fetch_rejection("gs://bucket/dicom/../x", ["gs://bucket/dicom"]).kind == dicom_fetch.PARENT_SEGMENT
    assert _fetch_rejection(f"{tmp_path}/input/*.dcm", [tmp_path / "input"]).kind == dicom_fetch.GLOB_CHARACTERS
    for forged in ("a\x00b.dcm", "a\nb.dcm"):   # JSON carries \u0000; the OS path calls would raise on it
        assert _fetch_rejection(f"{tmp_path}/input/{forged}", [tmp_path / "input"]).kind == \
            dicom_fetch.CONTROL_CHARACTERS


def test_fetch_rejects_a_symlink_escaping_the_prefix_and_follows_one_inside(tmp_path):
    (tmp_path / "input").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.dcm").write_bytes(b"secret")
    (tmp_path / "input" / "kept.dcm").write_bytes(b"kept")
    (tmp_path / "input" / "escape.dcm").symlink_to(tmp_path / "outside" / "secret.dcm")
    (tmp_path / "input" / "alias.dcm").symlink_to(tmp_path / "input" / "kept.dcm")
    error = _fetch_rejection(tmp_path / "input" / "escape.dcm", [tmp_path / "input"])
    assert error.kind == dicom_fetch.SYMLINK_ESCAPE and "outside" in error.detail
    assert fetch_bytes(str(tmp_path / "input" / "alias.dcm"), (str(tmp_path / "input"),), 100) == b"kept"


def test_fetch_rejects_missing_files_and_directories(tmp_path):
    (tmp_path / "input" / "sub").mkdir(parents=True)
    assert _fetch_rejection(tmp_path / "input" / "gone.dcm", [tmp_path / "input"]).kind == dicom_fetch.MISSING
    assert _fetch_rejection(tmp_path / "input" / "sub", [tmp_path / "input"]).kind == dicom_fetch.NOT_A_FILE


def test_fetch_checks_the_size_cap_before_reading(tmp_path, monkeypatch):
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "big.dcm").write_bytes(b"\0" * 5000)
    opened = []
    monkeypatch.setattr(FileSystems, "open", staticmethod(lambda *a, **k: opened.append(a)))
    error = _fetch_rejection(tmp_path / "input" / "big.dcm", [tmp_path / "input"], max_bytes=4999)
    assert error.kind == dicom_fetch.TOO_LARGE and "5000 bytes, over the cap of 4999" in error.detail
    assert opened == []


class _MemoryFileSystem(FileSystem):
    """A remote-style filesystem (``memtest://``, no directories, no real paths) for the registry path.

    Beam finds FileSystem subclasses by scheme, so defining it registers it, as gcsio does for gs://.
    """

    files: dict = {}
    opened: list = []

    @classmethod
    def scheme(cls):
        return "memtest"

    def has_dirs(self):
        return False

    def exists(self, path):
        return path in self.files

    def metadata(self, path):
        return FileMetadata(path, len(self.files[path]), 0.0)

    def size(self, path):
        return len(self.files[path])

    def open(self, path, mime_type="application/octet-stream", compression_type=None):
        self.opened.append(path)
        return io.BytesIO(self.files[path])

    def _list(self, dir_or_prefix):
        return [self.metadata(path) for path in self.files if path.startswith(dir_or_prefix)]

    def join(self, basepath, *paths):
        return "/".join((basepath.rstrip("/"), *paths))

    def split(self, path):
        return tuple(path.rsplit("/", 1))

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError

    mkdirs = create = copy = rename = delete = last_updated = _unsupported


def test_fetch_goes_through_the_filesystem_registry_for_remote_uris(monkeypatch):
    data = pathlib.Path(get_testdata_file("MR_small.dcm")).read_bytes()
    monkeypatch.setattr(_MemoryFileSystem, "files", {"memtest://bucket/dicom/a.dcm": data})
    monkeypatch.setattr(_MemoryFileSystem, "opened", [])
    prefixes = ("memtest://bucket/dicom",)
    assert fetch_bytes("memtest://bucket/dicom/a.dcm", prefixes, len(data)) == data
    assert _MemoryFileSystem.opened == ["memtest://bucket/dicom/a.dcm"]
    error = _fetch_rejection("memtest://bucket/dicom/a.dcm", prefixes, max_bytes=len(data) - 1)
    assert error.kind == dicom_fetch.TOO_LARGE and _MemoryFileSystem.opened == ["memtest://bucket/dicom/a.dcm"]
    assert _fetch_rejection("memtest://bucket/dicom/b.dcm", prefixes).kind == dicom_fetch.MISSING
    assert _fetch_rejection("memtest://bucket/dicom-x/a.dcm", prefixes).kind == dicom_fetch.OUTSIDE_PREFIXES
    assert _fetch_rejection("nosuch://bucket/a.dcm", ["nosuch://bucket"]).kind == dicom_fetch.NO_FILESYSTEM
    assert decode_dicom_bytes(data, _config(**PERMISSIVE)).original_shape == (64, 64)


def test_decode_rejects_non_dicom_and_truncated_files():
    config = _config(**PERMISSIVE)
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert _rejection(noise, config).kind == dicom_decode.NOT_DICOM
    assert _rejection(b"", config).kind == dicom_decode.NOT_DICOM
    native = pathlib.Path(get_testdata_file("CT_small.dcm")).read_bytes()
    error = _rejection(native[: len(native) // 2], config)
    assert error.kind == dicom_decode.TRUNCATED_PIXELS and "need 32768" in error.detail
    rle = pathlib.Path(get_testdata_file("MR_small_RLE.dcm")).read_bytes()
    assert _rejection(rle[: len(rle) // 2], config).kind == dicom_decode.TRUNCATED_PIXELS
    assert _rejection(rle[: len(rle) - 300], config).kind == dicom_decode.TRUNCATED_PIXELS  # no delimiter
    ds = pydicom.dcmread(io.BytesIO(rle))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([b"\xff" * 64 + frame[64:]])  # a garbled RLE header (PS3.5 G.5)
    error = _rejection(_dataset_bytes(ds), config)
    assert error.kind == dicom_decode.CODESTREAM_REFUSED and "RLE header declares" in error.detail


def test_decode_rejects_the_wrong_modality_and_other_body_parts(tmp_path, radiograph):
    ct = pathlib.Path(get_testdata_file("CT_small.dcm")).read_bytes()
    error = _rejection(ct, _config())
    # The reason names the attribute, never the header's own (untrusted, free-text) value.
    assert error.kind == dicom_decode.WRONG_MODALITY and error.detail.startswith("Modality (value withheld)")
    assert "CT" not in error.detail
    ds = pydicom.dcmread(_write(tmp_path, radiograph))
    ds.BodyPartExamined = "HAND"
    assert _rejection(_dataset_bytes(ds), _config()).kind == dicom_decode.NOT_CHEST
    del ds.BodyPartExamined  # Type 3: absent is accepted
    assert decode_dicom_bytes(_dataset_bytes(ds), _config()).original_shape == (160, 128)


def test_a_forged_huge_header_is_rejected_before_any_pixel_is_decoded(tmp_path, radiograph, monkeypatch):
    ds = pydicom.dcmread(_write(tmp_path, radiograph))
    ds.Rows, ds.Columns = 60000, 60000
    decoded = []
    monkeypatch.setattr(dicom_decode, "prepare_dicom", lambda *a, **k: decoded.append(a))
    error = _rejection(_dataset_bytes(ds), _config())
    assert error.kind == dicom_decode.TOO_LARGE and "60000 x 60000 x 1 frame(s) x 2 byte(s)" in error.detail
    assert decoded == []


def test_a_codestream_larger_than_its_header_is_rejected_before_decoding(tmp_path, radiograph, monkeypatch):
    ds = pydicom.dcmread(_write(tmp_path, radiograph, transfer_syntax=JPEG2000Lossless))
    codestream = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    assert codestream[:4] == b"\xff\x4f\xff\x51"  # SOC, SIZ (ISO/IEC 15444-1 A.5.1)
    codestream[8:16] = (60000).to_bytes(4, "big") * 2  # Xsiz, Ysiz
    ds.PixelData = encapsulate([bytes(codestream)])
    decoded = []
    monkeypatch.setattr(dicom_decode, "prepare_dicom", lambda *a, **k: decoded.append(a))
    error = _rejection(_dataset_bytes(ds), _config())
    assert error.kind == dicom_decode.CODESTREAM_REFUSED
    assert "the codestream is 60000 x 60000, the header's Rows x Columns 160 x 128" in error.detail
    assert decoded == []


def test_a_deflate_bomb_is_rejected_before_inflating_it_whole(tmp_path, radiograph, monkeypatch):
    data = _write(tmp_path, radiograph, transfer_syntax=DeflatedExplicitVRLittleEndian).read_bytes()
    assert decode_dicom_bytes(data, _config()).original_shape == (160, 128)
    monkeypatch.setattr(dicom_decode, "_HEADER_ALLOWANCE", 0)
    error = _rejection(data, _config(max_pixel_bytes=1000))
    assert error.kind == dicom_decode.TOO_LARGE and "inflates to more than 1000 bytes" in error.detail


def test_decode_rejects_colour_missing_pixels_unknown_syntaxes_and_absent_frames(tmp_path, radiograph):
    permissive = _config(**PERMISSIVE)
    colour = pathlib.Path(get_testdata_file("SC_rgb.dcm")).read_bytes()
    assert "'RGB' with 3 sample(s)" in str(_rejection(colour, permissive))
    rtplan = pathlib.Path(get_testdata_file("rtplan.dcm")).read_bytes()
    assert _rejection(rtplan, permissive).kind == dicom_decode.NO_PIXEL_DATA
    ds = pydicom.dcmread(_write(tmp_path, radiograph))
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: no image decoder
    error = _rejection(_dataset_bytes(ds), permissive)
    assert error.kind == dicom_decode.UNSUPPORTED_TRANSFER_SYNTAX and "MPEG2" in error.detail
    chest = _write(tmp_path, radiograph, "chest2.dcm").read_bytes()
    assert _rejection(chest, _config(frame=1)).kind == dicom_decode.NO_SUCH_FRAME


@pytest.mark.parametrize("overrides, message", [
    (dict(allowed_prefixes=()), "allowed_prefixes"),
    (dict(allowed_prefixes=["/data"]), "allowed_prefixes"),
    (dict(allowed_prefixes=("/data/../etc",)), "'..'"),
    (dict(target_size=0), "target_size"),
    (dict(frame=-1), "frame"),
    (dict(allowed_modalities=()), "allowed_modalities"),
    (dict(max_file_bytes=0), "max_file_bytes"),
    (dict(max_pixel_bytes=1.5), "max_pixel_bytes"),
])
def test_config_is_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        DicomReadConfig(**{"allowed_prefixes": ("/data",), "target_size": 64, **overrides})


# --- The composite ---------------------------------------------------------------------------

def _reference(uri, sop, minute, modality="CR"):
    return {"uri": str(uri), "study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.4",
            "sop_instance_uid": sop, "patient_key": "ab" * 16, "device_id": "XR-1", "modality": modality,
            "acquisition_time": ACQUIRED + dt.timedelta(minutes=minute), "source": f"dicom_refs.jsonl:{minute}"}


def test_read_studies_routes_images_and_dead_letters_and_keeps_timestamps(tmp_path, radiograph):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _write(inbox, radiograph, "m2.dcm")
    _write(inbox, radiograph, "m1.dcm", photometric="MONOCHROME1", transfer_syntax=RLELossless)
    (inbox / "ct.dcm").write_bytes(pathlib.Path(get_testdata_file("CT_small.dcm")).read_bytes())
    references = [_reference(inbox / "m2.dcm", "good-m2", 1), _reference(inbox / "m1.dcm", "good-m1", 2),
                  _reference(inbox / "ct.dcm", "ct", 3, "CT"), _reference(inbox / "gone.dcm", "missing", 4),
                  _reference("/etc/passwd", "outside", 5)]

    def micros(minute):
        return Timestamp.from_utc_datetime(ACQUIRED + dt.timedelta(minutes=minute)).micros

    pipeline = TestPipeline()
    read = (pipeline
            | beam.Create(references)
            | beam.Map(lambda r: TimestampedValue(r, Timestamp.from_utc_datetime(r["acquisition_time"])))
            | ReadStudies(_config(inbox)))
    images = read["images"] | "Images" >> beam.Map(
        lambda s, ts=beam.DoFn.TimestampParam: (isinstance(s, DecodedStudy), s.reference["sop_instance_uid"],
                                                s.image.shape, s.original_shape, ts.micros))
    assert_that(images, equal_to([(True, "good-m2", (64, 51), (160, 128), micros(1)),
                                  (True, "good-m1", (64, 51), (160, 128), micros(2))]), label="CheckImages")

    def summary(row, ts=beam.DoFn.TimestampParam):
        validate(DEAD_LETTERS_TABLE, row)
        assert "MRN" not in row["payload"] and "ab" * 16 in row["payload"]
        return (row["stage"], row["reason"].split(":")[0], row["source"], row["recorded_at"], ts.micros)

    dead = read["dead_letters"] | "DeadLetters" >> beam.Map(summary)
    assert_that(dead, equal_to([
        ("decode_dicom", dicom_decode.WRONG_MODALITY, "dicom_refs.jsonl:3", ACQUIRED + dt.timedelta(minutes=3),
         micros(3)),
        ("fetch_dicom", dicom_fetch.MISSING, "dicom_refs.jsonl:4", ACQUIRED + dt.timedelta(minutes=4), micros(4)),
        ("fetch_dicom", dicom_fetch.OUTSIDE_PREFIXES, "dicom_refs.jsonl:5", ACQUIRED + dt.timedelta(minutes=5),
         micros(5)),
    ]), label="CheckDeadLetters")
    result = pipeline.run()
    result.wait_until_finish()

    def counter(namespace, name):
        found = result.metrics().query(MetricsFilter().with_namespace(namespace).with_name(name))["counters"]
        return sum(c.committed for c in found)

    files = [inbox / "m2.dcm", inbox / "m1.dcm", inbox / "ct.dcm"]
    assert counter("fetch_dicom", "files_fetched") == 3
    assert counter("fetch_dicom", "bytes_read") == sum(f.stat().st_size for f in files)
    assert counter("decode_dicom", "images_decoded") == 2
    assert counter("dead_letters", "fetch_dicom") + counter("dead_letters", "decode_dicom") == 3
    assert counter("decode_dicom", "images_decoded") + 3 == len(references)  # in = images + rejected
