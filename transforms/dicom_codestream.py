"""What a compressed DICOM frame says it holds, read from its own codestream before decoding.

A codec allocates from its codestream's header, not from the DICOM header: a
2 kB frame whose JPEG 2000 SIZ marker claims 60000 x 60000 pixels, or 16,384
components, makes OpenJPEG reserve tens of gigabytes however honest Rows and
Columns are.  `frame_parameters` therefore reads rows, columns, components and
bit depth from the codestream of every encapsulated transfer syntax pydicom's
plugins decode, and refuses (`CodestreamRefused`) anything it does not fully
understand: it fails closed, never "unknown, let it through".

    JPEG 2000, HTJ2K (PS3.5 A.4.4, A.4.11)   ISO/IEC 15444-1 A.5.1 SIZ, first marker after SOC;
                                             a JP2 file (15444-1 Annex I) is walked box by box
                                             to its one jp2c box, and its ihdr must agree
    JPEG baseline/extended/lossless (A.4.1-3) ISO/IEC 10918-1 B.2.2 SOFn before the first SOS;
                                             hierarchical (DHP) and DNL-defined heights refused
    JPEG-LS (A.4.3)                          ISO/IEC 14495-1 C.2.2 SOF55; LSE oversize-dimension
                                             segments (14495-1 C.2.4.1.4) refused
    RLE Lossless (A.4.2, Annex G)            the 64-byte header: 1..15 segments, offsets 64 first,
                                             increasing, inside the frame; the frame size is
                                             Rows x Columns x Samples x Bits Allocated by definition

`check_frame` compares the result with the DICOM header: the codestream must
be exactly Rows x Columns with Samples per Pixel components of at most Bits
Allocated bits, so the decoder's allocation is bounded by the same pixel cap
as the header.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    RLELossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

JPEG2000_SYNTAXES = frozenset({JPEG2000, JPEG2000Lossless, HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL})
JPEG_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1})
JPEG_LS_SYNTAXES = frozenset({JPEGLSLossless, JPEGLSNearLossless})
RLE_SYNTAXES = frozenset({RLELossless})
UNDERSTOOD_SYNTAXES = JPEG2000_SYNTAXES | JPEG_SYNTAXES | JPEG_LS_SYNTAXES | RLE_SYNTAXES

MAX_TILES = 65535          # ISO/IEC 15444-1 A.4.2: Isot is 0..65534
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_SOC, _SIZ = b"\xff\x4f", b"\xff\x51"
# ISO/IEC 10918-1 Table B.1: SOF markers (C4 DHT, C8 JPG and CC DAC are not frames).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOF55, _LSE, _DHP, _DNL, _SOS, _SOI, _EOI = 0xF7, 0xF8, 0xDE, 0xDC, 0xDA, 0xD8, 0xD9
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0..7: no length field


class CodestreamRefused(Exception):
    """A frame whose codestream is not understood or does not match its DICOM header (the reason)."""


class FrameParameters(NamedTuple):
    """What a codestream declares: rows x columns pixels, `components` samples of `precision` bits,
    in `tiles` tiles (JPEG 2000; 1 otherwise)."""

    rows: int
    columns: int
    components: int
    precision: int
    tiles: int = 1


def frame_parameters(syntax: str, codestream: bytes, *, bits_allocated: int = 0,
                     samples_per_pixel: int = 1, rows: int = 0, columns: int = 0) -> FrameParameters:
    """The parameters `codestream` (one frame of Pixel Data in transfer syntax `syntax`) declares.

    RLE has no dimensions of its own: its header is checked against the DICOM
    ones passed in (PS3.5 G.2: one segment per byte of each sample).
    Raises CodestreamRefused for a syntax or layout this module does not understand.
    """
    if syntax in JPEG2000_SYNTAXES:
        return _jpeg2000_parameters(codestream)
    if syntax in JPEG_SYNTAXES or syntax in JPEG_LS_SYNTAXES:
        return _jpeg_parameters(codestream, jpeg_ls=syntax in JPEG_LS_SYNTAXES)
    if syntax in RLE_SYNTAXES:
        _check_rle_header(codestream, segments=samples_per_pixel * math.ceil(bits_allocated / 8))
        return FrameParameters(rows, columns, samples_per_pixel, bits_allocated)
    raise CodestreamRefused(f"transfer syntax {syntax} has no codestream reader here")


def check_frame(syntax: str, codestream: bytes, *, rows: int, columns: int, samples_per_pixel: int,
                bits_allocated: int, max_bytes: int) -> FrameParameters:
    """`frame_parameters`, then refuse any disagreement with the DICOM header or the pixel cap."""
    found = frame_parameters(syntax, codestream, bits_allocated=bits_allocated,
                             samples_per_pixel=samples_per_pixel, rows=rows, columns=columns)
    if (found.rows, found.columns) != (rows, columns):
        raise CodestreamRefused(f"the codestream is {found.rows} x {found.columns}, "
                                f"the header's Rows x Columns {rows} x {columns}")
    if found.components != samples_per_pixel:
        raise CodestreamRefused(f"the codestream has {found.components} component(s), "
                                f"the header's Samples per Pixel {samples_per_pixel}")
    if found.precision > bits_allocated:
        raise CodestreamRefused(f"the codestream has {found.precision}-bit samples, "
                                f"over the header's Bits Allocated {bits_allocated}")
    if found.tiles > MAX_TILES:
        raise CodestreamRefused(f"the JPEG 2000 codestream has {found.tiles} tiles, over {MAX_TILES}")
    decoded = found.rows * found.columns * found.components * math.ceil(found.precision / 8)
    if decoded > max_bytes:
        raise CodestreamRefused(f"the codestream decodes to {decoded} bytes, over the cap of {max_bytes}")
    return found


# ---------------------------------------------------------------- JPEG 2000


def _jpeg2000_parameters(data: bytes) -> FrameParameters:
    if data[:12] == _JP2_SIGNATURE:
        codestream, header = _jp2_codestream(data)
        found = _siz_parameters(codestream)
        if header is not None and header[:4] != found[:4]:
            raise CodestreamRefused(f"the JP2 ihdr box says {header[:4]}, its codestream's SIZ "
                                    f"{found[:4]} (rows, columns, components, bits)")
        return found
    return _siz_parameters(data)


def _jp2_codestream(data: bytes) -> tuple[bytes, FrameParameters | None]:
    """The contents of the one jp2c box of a JP2 file, and what its ihdr box says (or None)."""
    codestream, header = None, None
    for box, content in _boxes(data, 0, len(data)):
        if box == b"jp2h":
            for inner, inner_content in _boxes(data, *content):
                if inner == b"ihdr":
                    header = _ihdr_parameters(data[inner_content[0]:inner_content[1]])
        elif box == b"jp2c":
            if codestream is not None:
                raise CodestreamRefused("the JP2 file has more than one jp2c (codestream) box")
            codestream = data[content[0]:content[1]]
    if codestream is None:
        raise CodestreamRefused("the JP2 file has no jp2c (codestream) box")
    return codestream, header


def _boxes(data: bytes, start: int, end: int):
    """(type, (content start, content end)) of each box between `start` and `end` (15444-1 I.4)."""
    position = start
    while position < end:
        if end - position < 8 and not data[position:end].strip(b"\x00"):
            return  # PS3.5 A.4: a fragment is padded with a zero byte to an even length
        if end - position < 8:
            raise CodestreamRefused("a JP2 box header runs past the end of its container")
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        header = 8
        if length == 1:
            if end - position < 16:
                raise CodestreamRefused("a JP2 box's extended length runs past the end of its container")
            length, header = struct.unpack(">Q", data[position + 8:position + 16])[0], 16
        elif length == 0:
            length = end - position
        if length < header or position + length > end:
            raise CodestreamRefused(f"a JP2 {_printable(kind)} box of {length} bytes does not fit its container")
        yield kind, (position + header, position + length)
        position += length


def _ihdr_parameters(content: bytes) -> FrameParameters:
    if len(content) != 14:
        raise CodestreamRefused(f"the JP2 ihdr box has {len(content)} bytes, not 14")
    height, width, components, bpc = struct.unpack(">IIHB", content[:11])
    if bpc == 0xFF:
        raise CodestreamRefused("the JP2 ihdr box gives per-component depths (bpcc), not read here")
    return FrameParameters(height, width, components, (bpc & 0x7F) + 1)


def _siz_parameters(codestream: bytes) -> FrameParameters:
    """ISO/IEC 15444-1 A.5.1: SOC, then SIZ (Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz,
    XTOsiz, YTOsiz, Csiz, then Ssiz, XRsiz, YRsiz per component)."""
    if codestream[:2] != _SOC or codestream[2:4] != _SIZ:
        raise CodestreamRefused("not a JPEG 2000 codestream (no SOC followed by SIZ) nor a JP2 file")
    if len(codestream) < 4 + 38:
        raise CodestreamRefused("the JPEG 2000 SIZ marker segment is truncated")
    lsiz, _rsiz, xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz, csiz = struct.unpack(
        ">HHIIIIIIIIH", codestream[4:4 + 38])
    if not 1 <= csiz <= 16384 or lsiz != 38 + 3 * csiz or len(codestream) < 4 + lsiz:
        raise CodestreamRefused(f"the JPEG 2000 SIZ segment declares {csiz} component(s) in {lsiz} bytes")
    if not (xsiz > xosiz and ysiz > yosiz and xtsiz and ytsiz and xtosiz <= xosiz and ytosiz <= yosiz
            and xtosiz + xtsiz > xosiz and ytosiz + ytsiz > yosiz):
        raise CodestreamRefused("the JPEG 2000 SIZ segment's image and tile grid are inconsistent")
    tiles = math.ceil((xsiz - xtosiz) / xtsiz) * math.ceil((ysiz - ytosiz) / ytsiz)
    precisions = set()
    for i in range(csiz):
        ssiz, xrsiz, yrsiz = codestream[4 + 38 + 3 * i:4 + 41 + 3 * i]
        if xrsiz != 1 or yrsiz != 1:
            raise CodestreamRefused("a JPEG 2000 component is subsampled (XRsiz/YRsiz not 1)")
        precision = (ssiz & 0x7F) + 1
        if precision > 38:
            raise CodestreamRefused(f"a JPEG 2000 component has {precision}-bit samples (at most 38)")
        precisions.add(precision)
    return FrameParameters(ysiz - yosiz, xsiz - xosiz, csiz, max(precisions), tiles)


# ---------------------------------------------------------------- JPEG and JPEG-LS


def _jpeg_parameters(codestream: bytes, *, jpeg_ls: bool) -> FrameParameters:
    """The frame header of a JPEG (10918-1 B.2.2) or JPEG-LS (14495-1 C.2.2) codestream: the
    markers are walked from SOI to the first SOS, and exactly one SOF of the right family must
    come before it."""
    kind = "JPEG-LS" if jpeg_ls else "JPEG"
    if codestream[:2] != b"\xff\xd8":
        raise CodestreamRefused(f"not a {kind} codestream (no SOI marker)")
    position, found = 2, None
    while True:
        marker, position = _next_marker(codestream, position, kind)
        if marker == _SOS:
            break
        if marker in _STANDALONE:
            continue
        if marker in (_SOI, _EOI):
            raise CodestreamRefused(f"the {kind} codestream has {_marker_name(marker)} before its first scan")
        if len(codestream) < position + 2:
            raise CodestreamRefused(f"the {kind} {_marker_name(marker)} segment is truncated")
        length = struct.unpack(">H", codestream[position:position + 2])[0]
        segment = codestream[position + 2:position + length]
        if length < 2 or len(segment) != length - 2:
            raise CodestreamRefused(f"the {kind} {_marker_name(marker)} segment's length {length} is wrong")
        position += length
        if marker == _DHP:
            raise CodestreamRefused("hierarchical JPEG (DHP marker) is not supported")
        if marker == _LSE and jpeg_ls and segment[:1] != b"\x01":
            # ID 1 is preset coding parameters; 2/3 mapping tables and 4 oversize dimensions
            # (which can replace the SOF's 16-bit width and height) are not read here.
            raise CodestreamRefused(f"JPEG-LS LSE segment of type {segment[:1].hex() or 'none'} is not supported")
        if marker in _JPEG_SOF or marker == _SOF55:
            if (marker == _SOF55) != jpeg_ls:
                raise CodestreamRefused(f"a {_marker_name(marker)} frame in a {kind} transfer syntax")
            if found is not None:
                raise CodestreamRefused(f"the {kind} codestream has more than one frame header")
            found = _sof_parameters(segment, kind)
    if found is None:
        raise CodestreamRefused(f"the {kind} codestream has no frame header (SOF) before its first scan")
    return found


def _next_marker(codestream: bytes, position: int, kind: str) -> tuple[int, int]:
    """The marker at `position` (fill bytes 0xFF skipped) and the position after it."""
    if codestream[position:position + 1] != b"\xff":
        raise CodestreamRefused(f"the {kind} codestream has no marker where one is due (offset {position})")
    while codestream[position:position + 1] == b"\xff":
        position += 1
    if position >= len(codestream):
        raise CodestreamRefused(f"the {kind} codestream ends before its first scan")
    return codestream[position], position + 1


def _sof_parameters(segment: bytes, kind: str) -> FrameParameters:
    """SOFn / SOF55 without its length: P, Y, X, Nf, then Nf x (C, H/V, Tq)."""
    if len(segment) < 6:
        raise CodestreamRefused(f"the {kind} frame header is truncated")
    precision, height, width, components = struct.unpack(">BHHB", segment[:6])
    if len(segment) != 6 + 3 * components or components < 1:
        raise CodestreamRefused(f"the {kind} frame header declares {components} component(s) in "
                                f"{len(segment) + 2} bytes")
    if height == 0 or width == 0:
        raise CodestreamRefused(f"the {kind} frame header gives {height} x {width} (a height set later "
                                "by a DNL marker is not supported)")
    if not 2 <= precision <= 16:
        raise CodestreamRefused(f"the {kind} frame header gives {precision}-bit samples")
    return FrameParameters(height, width, components, precision)


# ---------------------------------------------------------------- RLE


def _check_rle_header(frame: bytes, *, segments: int) -> None:
    """PS3.5 G.5: 16 little-endian uint32: the number of segments, then 15 offsets (0 if unused)."""
    if len(frame) < 64:
        raise CodestreamRefused(f"the RLE frame has {len(frame)} bytes, less than its 64-byte header")
    header = struct.unpack("<16I", frame[:64])
    count, offsets = header[0], header[1:]
    if not 1 <= count <= 15:
        raise CodestreamRefused(f"the RLE header declares {count} segments (1 to 15 allowed)")
    if count != segments:
        raise CodestreamRefused(f"the RLE header declares {count} segment(s); Samples per Pixel and "
                                f"Bits Allocated need {segments}")
    used = offsets[:count]
    if used[0] != 64 or any(b <= a for a, b in zip(used, used[1:])) or used[-1] >= len(frame):
        raise CodestreamRefused("the RLE segment offsets do not start at 64, increase and lie inside the frame")
    if any(offsets[count:]):
        raise CodestreamRefused("the RLE header has offsets for segments it does not declare")


def _marker_name(marker: int) -> str:
    return f"0xFF{marker:02X} marker"


def _printable(kind: bytes) -> str:
    text = kind.decode("latin-1")
    return repr(text) if text.isalnum() else kind.hex()
