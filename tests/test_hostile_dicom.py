"""The hostile DICOM corpus (tests/corpus/dicom, made by its generate.py) replayed through decode.

Each bomb's codestream claims far more than its DICOM header; none may reach a
pixel decoder (a spy stands in for `prepare_dicom` and refuses to decode them,
so a regression shows up as a failed test, not as a machine out of memory).
Every file ends as a decoded image or as a dead letter with a reason, and no
reason quotes the PHI planted in the files.
"""

import dataclasses
import io
import json
import os
import pathlib
import resource

import apache_beam as beam
import numpy as np
import pydicom
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.timestamp import Timestamp

from model import preprocess
from transforms import dicom_decode
from transforms.capped_process import CappedProcess, ChildFailed, address_space_limit
from transforms.dicom_decode import DecodeDicomFn, DicomReadConfig, DicomRejected, ReadStudies, decode_dicom_bytes
from transforms.dicom_fetch import FetchedDicom

CORPUS = pathlib.Path(__file__).parent / "corpus" / "dicom"
MANIFEST = json.loads((CORPUS / "MANIFEST.json").read_text())
FILES = sorted(MANIFEST["files"])


def _config():
    return DicomReadConfig(allowed_prefixes=(str(CORPUS),), target_size=64)


class _DecoderSpy:
    """prepare_dicom for the valid files; for a bomb it records the call and decodes nothing."""

    def __init__(self, expected: str):
        self.expected, self.calls = expected, 0

    def __call__(self, ds, **kwargs):
        self.calls += 1
        if self.expected != "decoded":
            raise RuntimeError("a bomb reached the pixel decoder")
        return preprocess.prepare_dicom(ds, **kwargs)


def test_the_corpus_covers_every_codec_and_is_small():
    about = " ".join(entry["about"] for entry in MANIFEST["files"].values())
    for codec in ("JPEG 2000", "JP2", "HTJ2K", "JPEG baseline", "SOF3", "JPEG-LS", "SOF55", "RLE", "deflated",
                  "16,384 components", "60000 x 60000"):
        assert codec in about, codec
    assert all(entry["bytes"] < 128 * 1024 for entry in MANIFEST["files"].values())
    assert {entry["expect"] for entry in MANIFEST["files"].values()} >= {"decoded", dicom_decode.CODESTREAM_REFUSED,
                                                                        dicom_decode.TOO_LARGE}
    assert sorted(path.name for path in CORPUS.glob("*.dcm")) == FILES


@pytest.mark.parametrize("name", FILES)
def test_each_corpus_file_decodes_or_is_refused_before_any_pixel_is_decoded(name, monkeypatch):
    expected = MANIFEST["files"][name]["expect"]
    spy = _DecoderSpy(expected)
    monkeypatch.setattr(dicom_decode, "prepare_dicom", spy)
    data = (CORPUS / name).read_bytes()
    try:
        image = decode_dicom_bytes(data, _config())
    except DicomRejected as error:
        assert expected != "decoded", f"{name}: {error}"
        assert error.kind == expected and str(error).startswith(expected + ": ") and error.detail
        assert spy.calls == 0, f"{name} reached the pixel decoder"
        for planted in MANIFEST["planted"]:
            assert planted not in str(error)
        return
    assert expected == "decoded", f"{name} decoded; expected {expected}"
    assert image.original_shape == (64, 64) and image.image.shape == (64, 64) and image.image.std() > 0.05


def test_the_corpus_through_read_studies_is_images_plus_dead_letters():
    references = [{"uri": str(CORPUS / name), "sop_instance_uid": name, "source": "corpus", "patient_key": "k"}
                  for name in FILES]
    expected_images = sorted(n for n in FILES if MANIFEST["files"][n]["expect"] == "decoded")
    expected_dead = sorted(MANIFEST["files"][n]["expect"] for n in FILES if MANIFEST["files"][n]["expect"] != "decoded")
    with TestPipeline() as pipeline:
        out = pipeline | beam.Create(references) | ReadStudies(_config())
        assert_that(out["images"] | "Sop" >> beam.Map(lambda study: study.reference["sop_instance_uid"]),
                    equal_to(expected_images), label="Images")

        assert_that(out["dead_letters"] | "Kind" >> beam.Map(lambda letter: letter["reason"].split(":")[0]),
                    equal_to(expected_dead), label="DeadLetters")


def test_a_decoder_panic_is_a_rejection_not_the_end_of_the_worker():
    # Found by `make fuzz`: valid_rle.dcm with six bytes changed and cut at 20,178 bytes makes
    # pylibjpeg-rle's Rust decoder panic (pyo3's PanicException, a BaseException, not an Exception).
    data = bytearray((CORPUS / "valid_rle.dcm").read_bytes())
    for position, value in [(465, 210), (118842, 164), (3937, 142), (173, 127), (5653, 13), (9635, 215)]:
        data[position % len(data)] = value
    with pytest.raises(DicomRejected, match="PanicException") as rejected:
        decode_dicom_bytes(bytes(data[:20178]), _config())
    assert rejected.value.kind == dicom_decode.CORRUPT_PIXELS


def test_a_transfer_syntax_with_several_values_is_a_corrupt_header():
    # Found by `make fuzz`: a byte flip made (0002,0010) two values; pydicom's UID() raised TypeError.
    data = bytearray((CORPUS / "valid_deflate.dcm").read_bytes())
    start = data.index(b"\x02\x00\x10\x00")  # (0002,0010) Transfer Syntax UID, explicit VR "UI"
    length = int.from_bytes(data[start + 6:start + 8], "little")
    value = bytes(data[start + 8:start + 8 + length])
    cut = value.index(b".", 4)
    data[start + 8:start + 8 + length] = value[:cut] + b"\\" + value[cut + 1:]
    with pytest.raises(DicomRejected, match="not one UID") as rejected:
        decode_dicom_bytes(bytes(data), _config())
    assert rejected.value.kind == dicom_decode.CORRUPT_HEADER


def test_a_transfer_syntax_of_an_unknown_value_representation_is_a_corrupt_header():
    # Found by `make fuzz`: a zero byte at offset 235 and a cut at 238 left (0002,0010) with VR "U\0".
    data = bytearray((CORPUS / FILES[0]).read_bytes())
    data[235] = 0
    with pytest.raises(DicomRejected, match="File Meta Information") as rejected:
        decode_dicom_bytes(bytes(data[:238]), _config())
    assert rejected.value.kind == dicom_decode.CORRUPT_HEADER


def _exit_now():
    os._exit(3)


def test_the_capped_decode_process_refuses_allocations_past_its_headroom():
    child = CappedProcess("transforms.dicom_decode", 64 * dicom_decode.MIB)
    try:
        limit = child.call(address_space_limit)
        assert limit not in (resource.RLIM_INFINITY, address_space_limit())  # capped; this process is not
        child.call(np.ones, 16 << 20, np.uint8)  # 16 MiB: inside the headroom
        with pytest.raises(MemoryError):
            child.call(np.ones, 256 << 20, np.uint8)
        with pytest.raises(ChildFailed):
            child.call(_exit_now)
        assert abs(child.call(address_space_limit) - limit) < 16 << 20  # a fresh child, capped the same way
    finally:
        child.close()


def _summary(output):
    if hasattr(output, "tag"):
        return output.tag, output.value["reason"]
    return output.image.tobytes(), output.scale, output.original_shape


def test_a_decode_past_its_cap_is_too_large_and_the_capped_decoder_matches_the_in_process_one():
    names = [name for name in FILES if MANIFEST["files"][name]["expect"] != "decoded"][:3] + [
        name for name in FILES if MANIFEST["files"][name]["expect"] == "decoded"][:3]
    capped, direct = DecodeDicomFn(_config()), DecodeDicomFn(dataclasses.replace(_config(), decode_headroom_bytes=None))
    tiny = DecodeDicomFn(dataclasses.replace(_config(), decode_headroom_bytes=24 << 20))
    for fn in (capped, direct, tiny):
        fn.setup()
    try:
        for name in names:
            fetched = FetchedDicom({"uri": str(CORPUS / name), "sop_instance_uid": name, "patient_key": "k"},
                                   (CORPUS / name).read_bytes())
            outputs = [[_summary(out) for out in fn.process(fetched, timestamp=Timestamp(0))] for fn in (capped, direct)]
            assert outputs[0] == outputs[1], name
        # A 2048 x 2048 radiograph decodes within the default cap, not within 24 MiB of headroom.
        ds = pydicom.dcmread(CORPUS / "valid_native.dcm")
        ds.Rows = ds.Columns = 2048
        ds.PixelData = np.random.default_rng(0).integers(0, 4096, (2048, 2048), dtype=np.uint16).tobytes()
        buffer = io.BytesIO()
        ds.save_as(buffer)
        big = FetchedDicom({"uri": "big.dcm", "sop_instance_uid": "big", "patient_key": "k"}, buffer.getvalue())
        (decoded,) = capped.process(big, timestamp=Timestamp(0))
        assert decoded.original_shape == (2048, 2048)
        (rejected,) = tiny.process(big, timestamp=Timestamp(0))
        assert rejected.value["reason"].startswith(dicom_decode.TOO_LARGE + ": "), rejected.value["reason"]
        small = FetchedDicom(big.reference, (CORPUS / "valid_native.dcm").read_bytes())
        (decoded,) = tiny.process(small, timestamp=Timestamp(0))  # the decoder lives on for the next image
        assert decoded.original_shape == (64, 64)
    finally:
        for fn in (capped, direct, tiny):
            fn.teardown()
