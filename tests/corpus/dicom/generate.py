"""Regenerate the hostile DICOM corpus beside this file: ``python tests/corpus/dicom/generate.py``.

Every file is a small chest CR (64 x 64, 12 bits) written by the simulator, then
altered the way an attacker or a broken modality would: codestreams whose own
header claims far more than the DICOM header (decompression bombs), layouts a
codec reader must not guess at, and damaged RLE headers.  Beside the bombs are
valid files of each codec, which must still decode.  `MANIFEST.json` lists each
file with what must become of it: ``decoded`` or the first words of its
dead-letter reason (a `transforms.dicom_decode` rejection kind).

The patient in every file is invented, but planted like real PHI (name, MRN,
birth date, address, institution): `PLANTED` lists the strings that must never
appear in a dead-letter reason.  Nothing here is for clinical use.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import pathlib
import struct
import sys

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    RLELossless,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
)

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from model.radiograph import synthesize_chest_xray  # noqa: E402
from simulator.dicom import PatientIdentity, StudyInfo, write_chest_radiograph  # noqa: E402

PATIENT = PatientIdentity(patient_id="MRN7700431", name="Bombadil^Tom", birth_date="19561103", sex="M",
                          address="7 Withywindle Lane")
INSTITUTION = "Barrow Downs Infirmary"
PLANTED = ("MRN7700431", "Bombadil", "19561103", "Withywindle", "Barrow Downs")
SIZE = 64
BOMB_SIDE = 60000

# Rejection kinds (transforms.dicom_decode), spelled here so the corpus does not import the code it tests.
CODESTREAM_REFUSED = "compressed frame refused"
TOO_LARGE = "pixel data over the cap"
UNSUPPORTED = "unsupported transfer syntax"


def _study():
    return StudyInfo(study_uid="1.2.826.0.1.3680043.8.498.77.1", series_uid="1.2.826.0.1.3680043.8.498.77.2",
                     sop_uid="1.2.826.0.1.3680043.8.498.77.3",
                     acquisition_time=dt.datetime(2026, 3, 2, 6, 40, tzinfo=dt.timezone.utc), device_id="XR-9",
                     modality="CR", manufacturer="Sim", model_name="DR-1", institution=INSTITUTION,
                     station_name="XR9", accession_number="ACC77", referring_physician="Goldberry^River")


def _radiograph():
    return synthesize_chest_xray(np.random.default_rng(77), rows=SIZE, cols=SIZE, bits_stored=12)


def _dataset(transfer_syntax=ExplicitVRLittleEndian) -> pydicom.Dataset:
    buffer = io.BytesIO()
    write_chest_radiograph(buffer, _radiograph(), PATIENT, _study(), transfer_syntax=transfer_syntax)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _with_frame(ds: pydicom.Dataset, frame: bytes, syntax=None) -> bytes:
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    return _bytes(ds)


def _frame(ds: pydicom.Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _j2k() -> tuple[pydicom.Dataset, bytes]:
    ds = _dataset(JPEG2000Lossless)
    return ds, _frame(ds)


def _patch_siz(codestream: bytes, *, side: int | None = None, tile: int | None = None,
               ssiz: int | None = None) -> bytes:
    data = bytearray(codestream)
    if side is not None:
        data[8:16] = struct.pack(">II", side, side)        # Xsiz, Ysiz
    if tile is not None:
        data[24:32] = struct.pack(">II", tile, tile)       # XTsiz, YTsiz
    if ssiz is not None:
        data[42] = ssiz                                   # Ssiz of component 0
    return bytes(data)


def _many_components(codestream: bytes, components: int) -> bytes:
    """The SIZ segment rewritten with `components` 12-bit components (Lsiz = 38 + 3 Csiz)."""
    lsiz = struct.unpack(">H", codestream[4:6])[0]
    rest = codestream[4 + lsiz:]
    siz = bytearray(codestream[6:4 + 38])
    siz[-2:] = struct.pack(">H", components)
    return codestream[:4] + struct.pack(">H", 38 + 3 * components) + bytes(siz) + b"\x0b\x01\x01" * components + rest


def _resized(ds: pydicom.Dataset, side: int) -> pydicom.Dataset:
    ds.Rows = ds.Columns = side
    return ds


def _box(kind: bytes, content: bytes) -> bytes:
    return struct.pack(">I", 8 + len(content)) + kind + content


def _jp2(codestream: bytes, rows: int, columns: int, *, with_codestream=True) -> bytes:
    """A JP2 file (ISO/IEC 15444-1 Annex I): signature, ftyp, jp2h (ihdr, colr greyscale), jp2c."""
    ihdr = struct.pack(">IIHBBBB", rows, columns, 1, 11, 7, 0, 0)
    colr = struct.pack(">BBBI", 1, 0, 0, 17)
    boxes = (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + _box(b"ftyp", b"jp2 " + b"\x00" * 4 + b"jp2 ")
             + _box(b"jp2h", _box(b"ihdr", ihdr) + _box(b"colr", colr)))
    return boxes + (_box(b"jp2c", codestream) if with_codestream else b"")


def _jpeg_baseline() -> tuple[pydicom.Dataset, bytes]:
    ds = _dataset()
    grey = (_radiograph().pixels >> 4).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="JPEG", quality=95)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        if keyword in ds:
            del ds[keyword]
    return ds, buffer.getvalue()


def _patch_sof(codestream: bytes, markers: set[int], *, height: int, width: int) -> bytes:
    """The first SOF (one of `markers`) with its Y and X replaced."""
    data, position = bytearray(codestream), 2
    while True:
        marker, length = data[position + 1], struct.unpack(">H", data[position + 2:position + 4])[0]
        if marker in markers:
            data[position + 5:position + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        position += 2 + length


def _jpeg_lossless_frame(height: int, width: int) -> bytes:
    """SOI, SOF3 (16 bits), a DHT, SOS (predictor 1) and a few bytes of scan: a frame header to read."""
    sof = struct.pack(">BHHB", 16, height, width, 1) + b"\x01\x11\x00"
    dht = b"\x00" + bytes([0, 1] + [0] * 14) + b"\x00"
    sos = b"\x01\x01\x00\x01\x00\x00"
    return (b"\xff\xd8" + b"\xff\xc3" + struct.pack(">H", 2 + len(sof)) + sof
            + b"\xff\xc4" + struct.pack(">H", 2 + len(dht)) + dht
            + b"\xff\xda" + struct.pack(">H", 2 + len(sos)) + sos + b"\x00" * 16 + b"\xff\xd9")


def _insert_after_sof(codestream: bytes, marker: int, segment: bytes) -> bytes:
    position = 2
    while True:
        found, length = codestream[position + 1], struct.unpack(">H", codestream[position + 2:position + 4])[0]
        position += 2 + length
        if found == marker:
            return codestream[:position] + segment + codestream[position:]


def _rle_with(header_words: list[int]) -> bytes:
    ds = _dataset(RLELossless)
    frame = bytearray(_frame(ds))
    words = list(struct.unpack("<16I", frame[:64]))
    for i, value in enumerate(header_words):
        if value is not None:
            words[i] = value
    frame[:64] = struct.pack("<16I", *words)
    return _with_frame(ds, bytes(frame))


def _deflate_bomb(inflated_bytes: int) -> bytes:
    ds = _dataset()
    ds.add_new(0x00091010, "OB", b"\x00" * inflated_bytes)  # a private element of zeros: inflates huge
    ds.add_new(0x00090010, "LO", "MEDTWIN CORPUS")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return _bytes(ds)


def corpus() -> dict[str, tuple[bytes, str, str]]:
    """name -> (file bytes, expected outcome, what the file is)."""
    j2k_ds, j2k = _j2k()
    jpeg_ds, jpeg = _jpeg_baseline()
    jls_ds = _dataset(JPEGLSLossless)
    jls = _frame(jls_ds)
    native = _dataset()
    huge_native = _dataset()
    huge_native.Rows = huge_native.Columns = BOMB_SIDE
    lse_oversize = b"\xff\xf8" + struct.pack(">HBB", 12, 4, 4) + struct.pack(">II", 100000, 100000)
    files = {
        # --- valid: must decode
        "valid_native.dcm": (_bytes(native), "decoded", "Explicit VR Little Endian"),
        "valid_deflate.dcm": (_bytes(_dataset(DeflatedExplicitVRLittleEndian)), "decoded", "Deflated Explicit VR"),
        "valid_rle.dcm": (_bytes(_dataset(RLELossless)), "decoded", "RLE Lossless"),
        "valid_j2k_lossless.dcm": (_bytes(_j2k()[0]), "decoded", "JPEG 2000 lossless codestream"),
        "valid_j2k_lossy.dcm": (_bytes(_dataset(JPEG2000)), "decoded", "JPEG 2000 lossy codestream"),
        "valid_jp2_box.dcm": (_with_frame(_j2k()[0], _jp2(j2k, SIZE, SIZE)), "decoded",
                              "JPEG 2000 codestream inside a JP2 file (ihdr agrees)"),
        "valid_htj2k.dcm": (_with_frame(_j2k()[0], j2k, HTJ2K), "decoded",
                            "a Part 1 codestream under the HTJ2K syntax (HTJ2K decoders read Part 1)"),
        "valid_jpeg_baseline.dcm": (_with_frame(_jpeg_baseline()[0], jpeg, JPEGBaseline8Bit), "decoded",
                                    "JPEG baseline, 8 bits, Pillow"),
        "valid_jpeg_ls.dcm": (_bytes(_dataset(JPEGLSLossless)), "decoded", "JPEG-LS lossless"),
        # --- JPEG 2000 bombs and layouts not understood
        "bomb_j2k_siz_60000.dcm": (_with_frame(_j2k()[0], _patch_siz(j2k, side=BOMB_SIDE)), CODESTREAM_REFUSED,
                                   "SIZ claims 60000 x 60000 under Rows x Columns 64 x 64"),
        "bomb_jp2_box_60000.dcm": (_with_frame(_j2k()[0], _jp2(_patch_siz(j2k, side=BOMB_SIDE), BOMB_SIDE,
                                                                BOMB_SIDE)), CODESTREAM_REFUSED,
                                   "the reported bomb: a JP2 file whose ihdr and SIZ claim 60000 x 60000"),
        "bomb_jp2_ihdr_disagrees.dcm": (_with_frame(_j2k()[0], _jp2(j2k, BOMB_SIDE, BOMB_SIDE)),
                                        CODESTREAM_REFUSED, "JP2 ihdr claims 60000 x 60000, SIZ 64 x 64"),
        "bomb_jp2_no_codestream.dcm": (_with_frame(_j2k()[0], _jp2(j2k, SIZE, SIZE, with_codestream=False)),
                                       CODESTREAM_REFUSED, "JP2 boxes without a jp2c box"),
        "bomb_j2k_16384_components.dcm": (_with_frame(_j2k()[0], _many_components(j2k, 16384)),
                                          CODESTREAM_REFUSED, "SIZ with 16,384 components"),
        "bomb_j2k_tiles_1x1.dcm": (_with_frame(_resized(_j2k()[0], 4096), _patch_siz(j2k, side=4096, tile=1)),
                                   CODESTREAM_REFUSED, "a 4096 x 4096 image (32 MiB, under the cap) in 1 x 1 tiles: "
                                   "16 M tiles of decoder bookkeeping"),
        "bomb_j2k_38_bit.dcm": (_with_frame(_j2k()[0], _patch_siz(j2k, ssiz=37)), CODESTREAM_REFUSED,
                                "38-bit samples under Bits Allocated 16"),
        "bomb_j2k_not_a_codestream.dcm": (_with_frame(_j2k()[0], b"\x00\x01" + j2k[2:]), CODESTREAM_REFUSED,
                                          "neither SOC+SIZ nor a JP2 signature: the old check said 'unknown'"),
        "bomb_htj2k_siz_60000.dcm": (_with_frame(_j2k()[0], _patch_siz(j2k, side=BOMB_SIDE), HTJ2K),
                                     CODESTREAM_REFUSED, "HTJ2K syntax, SIZ claims 60000 x 60000"),
        "bomb_j2k_part2_syntax.dcm": (_with_frame(_j2k()[0], j2k, JPEG2000MCLossless), UNSUPPORTED,
                                      "JPEG 2000 Part 2 multi-component: no decoder, no reader"),
        # --- JPEG and JPEG-LS bombs
        "bomb_jpeg_baseline_sof_60000.dcm": (
            _with_frame(_jpeg_baseline()[0], _patch_sof(jpeg, {0xC0}, height=BOMB_SIDE, width=BOMB_SIDE),
                        JPEGBaseline8Bit), CODESTREAM_REFUSED, "SOF0 claims 60000 x 60000"),
        "bomb_jpeg_dnl_height.dcm": (
            _with_frame(_jpeg_baseline()[0], _patch_sof(jpeg, {0xC0}, height=0, width=SIZE), JPEGBaseline8Bit),
            CODESTREAM_REFUSED, "SOF0 height 0: set later by a DNL marker"),
        "bomb_jpeg_no_sof.dcm": (_with_frame(_jpeg_baseline()[0], b"\xff\xd8\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"
                                             + b"\x00" * 32 + b"\xff\xd9", JPEGBaseline8Bit),
                                 CODESTREAM_REFUSED, "a scan with no frame header before it"),
        "bomb_jpeg_hierarchical.dcm": (_with_frame(_jpeg_baseline()[0], b"\xff\xd8\xff\xde\x00\x0b\x08"
                                                   + struct.pack(">HH", BOMB_SIDE, BOMB_SIDE) + b"\x01\x01\x11\x00"
                                                   + jpeg[2:], JPEGBaseline8Bit),
                                       CODESTREAM_REFUSED, "hierarchical JPEG: DHP claims 60000 x 60000"),
        "bomb_jpeg_lossless_sof3_60000.dcm": (_with_frame(_dataset(), _jpeg_lossless_frame(BOMB_SIDE, BOMB_SIDE),
                                                          JPEGLosslessSV1), CODESTREAM_REFUSED,
                                              "SOF3 claims 60000 x 60000 (JPEG Lossless SV1)"),
        "bomb_jpeg_lossless_p14_60000.dcm": (_with_frame(_dataset(), _jpeg_lossless_frame(BOMB_SIDE, BOMB_SIDE),
                                                         JPEGLossless), CODESTREAM_REFUSED,
                                             "SOF3 claims 60000 x 60000 (JPEG Lossless P14)"),
        "bomb_jpeg_ls_sof55_60000.dcm": (_with_frame(jls_ds, _patch_sof(jls, {0xF7}, height=BOMB_SIDE,
                                                                        width=BOMB_SIDE)),
                                         CODESTREAM_REFUSED, "SOF55 claims 60000 x 60000"),
        "bomb_jpeg_ls_lse_oversize.dcm": (_with_frame(_dataset(JPEGLSLossless),
                                                      _insert_after_sof(jls, 0xF7, lse_oversize)),
                                          CODESTREAM_REFUSED, "an LSE oversize-dimension segment: 100000 x 100000"),
        "bomb_jpeg_ls_in_jpeg_syntax.dcm": (_with_frame(_dataset(), jls, JPEGLosslessSV1), CODESTREAM_REFUSED,
                                            "a JPEG-LS frame under a JPEG lossless syntax"),
        # --- RLE
        "bomb_rle_15_segments.dcm": (_rle_with([15] + [64 + i for i in range(15)]), CODESTREAM_REFUSED,
                                     "15 segments for a 16-bit grey image (2 needed)"),
        "bomb_rle_offset_outside.dcm": (_rle_with([None, None, 0x7FFFFFFF]), CODESTREAM_REFUSED,
                                        "a segment offset far past the end of the frame"),
        "bomb_rle_zero_segments.dcm": (_rle_with([0]), CODESTREAM_REFUSED, "no segments"),
        # --- native and deflate
        "bomb_native_60000.dcm": (_bytes(huge_native), TOO_LARGE, "Rows x Columns 60000 x 60000, 2 kB of pixels"),
        "bomb_deflate_96mib.dcm": (_deflate_bomb(96 * 1024 * 1024), TOO_LARGE,
                                   "a deflated dataset that inflates to 96 MiB"),
    }
    return files


def main() -> None:
    manifest = {"planted": list(PLANTED), "files": {}}
    for old in HERE.glob("*.dcm"):
        old.unlink()
    for name, (data, expected, about) in sorted(corpus().items()):
        (HERE / name).write_bytes(data)
        manifest["files"][name] = {"expect": expected, "about": about, "bytes": len(data)}
    (HERE / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(manifest['files'])} files, {sum(f['bytes'] for f in manifest['files'].values())} bytes")


if __name__ == "__main__":
    main()
