"""Safe decoding of fetched chest X-rays into model inputs.

`ReadStudies` is the imaging path from a DicomReference to a `DecodedStudy`::

    references -> FetchDicomFiles -> DecodeDicomImages -> images (DecodedStudy)
                        |                   |
                        +-------------------+-> CollectDeadLetters -> dead_letters

Fetching (`transforms.dicom_fetch`) keeps the reader inside the allowed
prefixes and under a file-size cap.  Decoding (`decode_dicom_bytes`) trusts
nothing in the file: the header is checked before any pixel is decoded, so a
forged Rows/Columns cannot make a worker allocate gigabytes, and the pixels are
then prepared by `model.preprocess.prepare_dicom`, the same function the
detector is trained with.  Every refusal is a `DicomRejected` whose message
starts with one of the kinds below and becomes a dead letter; nothing raises
out of the DoFns and nothing is dropped: references in = images + dead letters.

Not for clinical use: the output feeds an AI detector whose findings are labelled as such.
"""

from __future__ import annotations

import dataclasses
import io
import math
import zlib
from typing import NamedTuple

import apache_beam as beam
import numpy as np
import pydicom
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from pydicom.errors import InvalidDicomError
from pydicom.encaps import get_frame
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels import get_decoder
from pydicom.uid import DeflatedExplicitVRLittleEndian, UID

from model.preprocess import MONOCHROME, PreparedImage, prepare_dicom
from transforms.capped_process import CappedProcess, ChildFailed
from transforms.dead_letters import DEAD_LETTERS
from transforms.dicom_codestream import UNDERSTOOD_SYNTAXES, CodestreamRefused, check_frame
from transforms.dicom_fetch import FetchDicomFn, FetchedDicom, reference_dead_letter

STAGE = "decode_dicom"
DEFAULT_MODALITIES = ("CR", "DX", "DR")
MIB = 1024 * 1024
# Room for the non-pixel attributes of a deflated dataset when bounding its inflated size.
_HEADER_ALLOWANCE = 16 * MIB
# (7FE0,0010) Pixel Data as it appears in little- and big-endian files.
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")

# Rejection kinds: the first words of every decode dead-letter reason.
NOT_DICOM = "not a DICOM Part 10 file"
CORRUPT_HEADER = "corrupt DICOM header"
UNSUPPORTED_TRANSFER_SYNTAX = "unsupported transfer syntax"
NO_PIXEL_DATA = "no pixel data"
WRONG_MODALITY = "modality not allowed"
NOT_CHEST = "body part is not chest"
NOT_MONOCHROME = "not a monochrome image"
BAD_PIXEL_ATTRIBUTES = "invalid Image Pixel attributes"
NO_SUCH_FRAME = "frame not in image"
TOO_LARGE = "pixel data over the cap"
TRUNCATED_PIXELS = "truncated pixel data"
CORRUPT_PIXELS = "pixel data could not be decoded"
CODESTREAM_REFUSED = "compressed frame refused"


class DecodedStudy(NamedTuple):
    """One image ready for the detector, with the reference that named it.

    reference: the decoded DicomReference (uri, study/series/SOP instance UIDs,
        patient_key, device_id, modality, acquisition_time); never raw PHI.
    image: (H, W) float32 in [0, 1], MONOCHROME2 sense, max(H, W) == the model's input size.
    scale: resized pixel coordinate = original pixel coordinate * scale.
    original_shape: (rows, columns) of the stored image.
    """

    reference: dict
    image: np.ndarray
    scale: float
    original_shape: tuple[int, int]


class DicomRejected(Exception):
    """A file that is not a usable chest X-ray.  ``str()`` is the dead-letter reason."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail

    def __reduce__(self):  # raised in the capped decode process, re-raised here
        return DicomRejected, (self.kind, self.detail)


@dataclasses.dataclass(frozen=True)
class DicomReadConfig:
    """How references are fetched and decoded.

    allowed_prefixes: where files may be read from (local directories, ``gs://bucket/dir``...);
        the pipeline passes ``--dicom_allowed_prefixes``, by default its input directory.
    target_size: longest side of the model input, in pixels.
    frame: which frame of a multi-frame image to use.
    allowed_modalities: accepted (0008,0060) Modality values; None accepts any.
    require_chest: refuse images whose Body Part Examined says something other than CHEST.
    max_file_bytes: largest file fetched (checked before reading).
    max_pixel_bytes: largest declared pixel data, Rows x Columns x frames x bytes per sample
        x Samples per Pixel, checked before decoding.
    decode_headroom_bytes: decode in a child process whose address space is capped at its size
        after imports plus this many bytes (`transforms.capped_process`: defence in depth behind
        the codestream checks); None decodes in the worker's own process.
    dicomweb: a `transforms.dicomweb.DicomWebAccess` when references may be WADO-RS URLs
        (allow-listed base URLs, a credentials reference); None refuses http(s) uris.
    """

    allowed_prefixes: tuple[str, ...]
    target_size: int
    frame: int = 0
    allowed_modalities: tuple[str, ...] | None = DEFAULT_MODALITIES
    require_chest: bool = True
    max_file_bytes: int = 128 * MIB
    max_pixel_bytes: int = 64 * MIB
    decode_headroom_bytes: int | None = 1024 * MIB
    dicomweb: object | None = None

    def __post_init__(self):
        if not isinstance(self.allowed_prefixes, tuple) or not self.allowed_prefixes:
            raise ValueError("allowed_prefixes must be a non-empty tuple of strings, "
                             f"got {self.allowed_prefixes!r}")
        for prefix in self.allowed_prefixes:
            if not isinstance(prefix, str) or not prefix.strip():
                raise ValueError(f"allowed_prefixes must hold non-empty strings, got {prefix!r}")
            if ".." in prefix.replace("\\", "/").split("/"):
                raise ValueError(f"allowed prefix {prefix!r} must not contain '..'")
        for name in ("target_size", "max_file_bytes", "max_pixel_bytes", "decode_headroom_bytes"):
            value = getattr(self, name)
            if value is None and name == "decode_headroom_bytes":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.frame, bool) or not isinstance(self.frame, int) or self.frame < 0:
            raise ValueError(f"frame must be a non-negative integer, got {self.frame!r}")
        if self.allowed_modalities is not None and (
                not isinstance(self.allowed_modalities, tuple) or not self.allowed_modalities
                or not all(isinstance(m, str) and m for m in self.allowed_modalities)):
            raise ValueError("allowed_modalities must be None (any) or a non-empty tuple of strings, "
                             f"got {self.allowed_modalities!r}")


def _reraise_interrupts(error: BaseException) -> None:
    """Decoding catches BaseException: beside Python's exceptions, the Rust plugins (pylibjpeg-rle)
    panic on some malformed streams with pyo3's PanicException, a BaseException, and one file must
    not end the worker. An interrupt or an exit is never swallowed."""
    if isinstance(error, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        raise error


def decode_dicom_bytes(data: bytes, config: DicomReadConfig) -> PreparedImage:
    """The bytes of a DICOM Part 10 file -> the prepared model input of frame ``config.frame``.

    Raises DicomRejected, with one of this module's kinds, for anything that is not a
    decodable monochrome image within the configured limits.
    """
    ds = read_dataset(data, config)
    try:
        check_header(ds, config, data)
    except DicomRejected:
        raise
    except BaseException as error:  # pydicom converts raw elements on first access, and that can fail
        _reraise_interrupts(error)
        raise DicomRejected(CORRUPT_HEADER, f"{type(error).__name__} (message withheld)") from None
    try:
        prepared = prepare_dicom(ds, target_size=config.target_size, frame=config.frame)
    except MemoryError:  # past the capped decode process's address space (`decode_headroom_bytes`)
        raise DicomRejected(TOO_LARGE, "decoding needed more memory than the decoder's cap") from None
    except BaseException as error:  # plugins raise ValueError, RuntimeError, OSError, pyo3 panics...
        _reraise_interrupts(error)
        raise DicomRejected(CORRUPT_PIXELS, f"{type(error).__name__} (message withheld)") from None
    if not np.isfinite(prepared.image).all():
        raise DicomRejected(CORRUPT_PIXELS, "the prepared image has non-finite values")
    return prepared


def read_dataset(data: bytes, config: DicomReadConfig) -> pydicom.Dataset:
    """Parse a Part 10 file (PS3.10 7.1: 128-byte preamble, ``DICM``, File Meta group).

    Raw datasets without the Part 10 header are refused rather than guessed at with
    ``force=True``: a PACS export is Part 10, and forcing turns any bytes into a dataset.
    """
    stream = io.BytesIO(data)
    try:
        read_preamble(stream, False)
        meta = _read_file_meta_info(stream)
        syntax = meta.get("TransferSyntaxUID")  # pydicom converts the raw value here, and that can fail
    except InvalidDicomError:
        raise DicomRejected(NOT_DICOM, "no 'DICM' prefix after the 128-byte preamble") from None
    except Exception as error:  # a damaged File Meta group
        raise DicomRejected(CORRUPT_HEADER, f"File Meta Information: {type(error).__name__} (message withheld)") from None
    if not syntax:
        raise DicomRejected(UNSUPPORTED_TRANSFER_SYNTAX, "the File Meta Information has no Transfer Syntax UID")
    if not isinstance(syntax, str):  # e.g. several values, backslash-separated: (0002,0010) has VM 1
        raise DicomRejected(CORRUPT_HEADER, f"the Transfer Syntax UID is a {type(syntax).__name__}, not one UID")
    if UID(syntax) == DeflatedExplicitVRLittleEndian:
        _check_inflated_size(stream.read(), config.max_pixel_bytes + _HEADER_ALLOWANCE)
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except Exception as error:  # pydicom raises many types on damaged elements
        raise DicomRejected(CORRUPT_HEADER, f"{type(error).__name__} (message withheld)") from None


def _check_inflated_size(deflated: bytes, limit: int) -> None:
    """A Deflated dataset (PS3.5 A.5) is inflated whole by pydicom: bound it first (zip bombs)."""
    inflater, pending, inflated = zlib.decompressobj(-zlib.MAX_WBITS), deflated, 0
    try:  # counted in 1 MiB pieces, none kept: the check itself never holds the inflated dataset
        while pending and inflated <= limit:
            inflated += len(inflater.decompress(pending, 1 << 20))
            pending = inflater.unconsumed_tail
    except zlib.error as error:
        raise DicomRejected(CORRUPT_HEADER, f"deflated dataset: {error}") from None
    if inflated > limit:
        raise DicomRejected(TOO_LARGE, f"the deflated dataset inflates to more than {limit} bytes")


def check_header(ds: pydicom.Dataset, config: DicomReadConfig, data: bytes = b"") -> None:
    """Every check that needs no pixel decoding; raises DicomRejected.

    data: the file's bytes, to tell a truncated Pixel Data element (pydicom stops
    reading at the end of the file and leaves the element out) from an absent one.
    """
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomRejected(UNSUPPORTED_TRANSFER_SYNTAX,
                            f"{_syntax_shown(syntax)} has no pixel decoder") from None
    if not decoder.is_available:
        raise DicomRejected(UNSUPPORTED_TRANSFER_SYNTAX, f"{_syntax_shown(syntax)}: no decoder plugin installed")
    modality = str(ds.get("Modality", "") or "").strip()
    if config.allowed_modalities is not None and modality not in config.allowed_modalities:
        raise DicomRejected(WRONG_MODALITY, f"Modality {'(value withheld)' if modality else '(absent)'} is not one of "
                                            f"{list(config.allowed_modalities)}")
    # Body Part Examined (0018,0015) is Type 3 (optional) in the General Series module: many
    # CR/DX exports leave it out or empty, so only a present value naming another part is refused.
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if config.require_chest and body_part and body_part != "CHEST":
        raise DicomRejected(NOT_CHEST, "Body Part Examined names another part than CHEST (value withheld)")
    if "PixelData" not in ds:
        if any(tag in data for tag in _PIXEL_DATA_TAGS):
            raise DicomRejected(TRUNCATED_PIXELS, "the file has a Pixel Data (7FE0,0010) element that ends "
                                                  "before its declared length or delimiter")
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        raise DicomRejected(NO_PIXEL_DATA, f"the dataset has {other[0]}, which is not supported" if other
                            else "the dataset has no Pixel Data (7FE0,0010)")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    samples = _int_attribute(ds, "SamplesPerPixel", default=1)
    if photometric not in MONOCHROME or samples != 1:
        raise DicomRejected(NOT_MONOCHROME, f"Photometric Interpretation {_photometric_shown(photometric)} "
                                            f"with {samples} sample(s) per pixel")
    rows, columns = _int_attribute(ds, "Rows"), _int_attribute(ds, "Columns")
    bits = _int_attribute(ds, "BitsAllocated")
    frames = _int_attribute(ds, "NumberOfFrames", default=1) or 1
    if rows < 1 or columns < 1 or bits < 1 or frames < 1:
        raise DicomRejected(BAD_PIXEL_ATTRIBUTES, f"Rows {rows}, Columns {columns}, Bits Allocated {bits}, "
                                                  f"Number of Frames {frames}")
    if config.frame >= frames:
        raise DicomRejected(NO_SUCH_FRAME, f"frame {config.frame} requested from an image with {frames} frame(s)")
    declared = rows * columns * frames * math.ceil(bits / 8) * samples
    if declared > config.max_pixel_bytes:
        raise DicomRejected(TOO_LARGE, f"{rows} x {columns} x {frames} frame(s) x {math.ceil(bits / 8)} byte(s) "
                                       f"= {declared} bytes, over the cap of {config.max_pixel_bytes}")
    if syntax.is_encapsulated:
        _check_codestream(syntax, ds.PixelData, config, frames, rows, columns, samples, bits)
    if not syntax.is_compressed:
        # PS3.5 8.1.1: native Pixel Data is the frames one after another (1-bit data packed).
        expected = math.ceil(rows * columns * frames * samples * bits / 8)
        if len(ds.PixelData) < expected:
            raise DicomRejected(TRUNCATED_PIXELS, f"{len(ds.PixelData)} bytes of native Pixel Data, "
                                                  f"{rows} x {columns} x {frames} frame(s) need {expected}")


def _check_codestream(syntax: UID, pixel_data: bytes, config: DicomReadConfig, frames: int, rows: int,
                      columns: int, samples: int, bits: int) -> None:
    """Refuse a compressed frame whose own codestream is not understood or disagrees with the header.

    Codecs allocate from the codestream (JPEG SOF, JPEG 2000 SIZ), not from the DICOM header, so
    the frame to decode must declare exactly Rows x Columns x Samples per Pixel, at most Bits
    Allocated deep (`transforms.dicom_codestream`, which fails closed on any layout it cannot read).
    """
    if syntax not in UNDERSTOOD_SYNTAXES:
        raise DicomRejected(UNSUPPORTED_TRANSFER_SYNTAX, f"{_syntax_shown(syntax)}: its codestream is not "
                                                         "checked before decoding, so it is not decoded")
    try:
        codestream = get_frame(pixel_data, config.frame, number_of_frames=frames)
    except Exception as error:  # a damaged Basic Offset Table or item tags
        raise DicomRejected(CORRUPT_PIXELS, f"frame {config.frame} cannot be found: {type(error).__name__}") \
            from None
    try:
        check_frame(syntax, codestream, rows=rows, columns=columns, samples_per_pixel=samples,
                    bits_allocated=bits, max_bytes=config.max_pixel_bytes)
    except CodestreamRefused as error:
        raise DicomRejected(CODESTREAM_REFUSED, f"frame {config.frame}: {error}") from None


def _int_attribute(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is not None:
            return default
        raise DicomRejected(BAD_PIXEL_ATTRIBUTES, f"{keyword} is missing")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DicomRejected(BAD_PIXEL_ATTRIBUTES, f"{keyword} is not an integer (value withheld)") from None


# PS3.3 C.7.6.3.1.2: the defined terms of Photometric Interpretation, the only values a reason quotes.
PHOTOMETRIC_TERMS = frozenset(("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK",
                               "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT",
                               "YBR_RCT", "XYB"))


def _photometric_shown(value: str) -> str:
    if not value:
        return "(absent)"
    return repr(value) if value in PHOTOMETRIC_TERMS else "(value withheld)"


def _syntax_shown(syntax: UID) -> str:
    """A Transfer Syntax UID pydicom knows, with its name; any other (input text) withheld."""
    if syntax.is_transfer_syntax and syntax.name != str(syntax):
        return f"{syntax} ({syntax.name})"
    return "a Transfer Syntax UID this code does not know (value withheld)"


class DecodeDicomFn(beam.DoFn):
    """FetchedDicom -> DecodedStudy (main output) or a dead letter (``DEAD_LETTERS``), same timestamp.

    Decodes in a capped child process (one per DoFn instance) unless ``decode_headroom_bytes`` is None.
    """

    def __init__(self, config: DicomReadConfig):
        self._config = config
        self._decoded = Metrics.counter(STAGE, "images_decoded")
        self._child = None

    def setup(self):
        if self._config.decode_headroom_bytes is not None:
            self._child = CappedProcess(__name__, self._config.decode_headroom_bytes)

    def teardown(self):
        if self._child is not None:
            self._child.close()

    def _decode(self, data: bytes) -> PreparedImage:
        if self._child is None:
            return decode_dicom_bytes(data, self._config)
        try:
            return self._child.call(decode_dicom_bytes, data, self._config)
        except ChildFailed:
            Metrics.counter(STAGE, "capped_decoder_restarts").inc()
            raise DicomRejected(TOO_LARGE, "the capped decode process died (memory cap)") from None

    def process(self, fetched: FetchedDicom, timestamp=beam.DoFn.TimestampParam):
        try:
            prepared = self._decode(fetched.data)
        except DicomRejected as error:
            yield TaggedOutput(DEAD_LETTERS,
                               reference_dead_letter(STAGE, str(error), fetched.reference, timestamp))
            return
        self._decoded.inc()
        yield DecodedStudy(fetched.reference, prepared.image, prepared.scale, prepared.original_shape)


class ReadStudies(beam.PTransform):
    """PCollection[DicomReference dict] -> {"images": PCollection[DecodedStudy], "dead_letters": ...}.

    Elements keep their timestamps (the acquisition time).  Metrics: ``fetch_dicom/files_fetched``,
    ``fetch_dicom/bytes_read``, ``decode_dicom/images_decoded`` and ``dead_letters/<stage>``.
    """

    def __init__(self, config: DicomReadConfig):
        super().__init__()
        self._config = config

    def expand(self, references):
        fetched = references | "FetchDicomFiles" >> beam.ParDo(
            FetchDicomFn(self._config.allowed_prefixes, self._config.max_file_bytes, self._config.dicomweb)
        ).with_outputs(DEAD_LETTERS, main="files")
        decoded = fetched.files | "DecodeDicomImages" >> beam.ParDo(
            DecodeDicomFn(self._config)).with_outputs(DEAD_LETTERS, main="images")
        dead_letters = (fetched[DEAD_LETTERS], decoded[DEAD_LETTERS]) | "CollectDeadLetters" >> beam.Flatten()
        return {"images": decoded.images, "dead_letters": dead_letters}
