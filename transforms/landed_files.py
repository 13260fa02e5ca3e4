"""Landed files as the sources read them: the layout check, and counting what a damaged or foreign file held.

A landed file is ``<stream>/date=YYYY-MM-DD/<name>-HH.(jsonl|avro)`` under the input
directory (`layout_arrival`).  Everything else found under a stream's folder (no hour, a
date or hour that does not exist, a subfolder, another extension, a compressed file) is
not read as records but leaves a trace: one `UnreadableInput` whose ``record_count`` is
what the file held, as far as it can be counted without trusting it (`count_records`).
Damaged Avro is counted the same way, by the record counts its blocks claim
(`avro_claimed_records`), so ``records in = records out + dead letters`` holds when a file
is cut short: the records read are out, the rest are in one dead letter.

Every count is bounded: compressed data is inflated at most `MAX_INFLATED_BYTES`, in
chunks, counting without keeping; an Avro header or block that does not parse ends the walk.
Reasons quote no file name (a name is input: ``observations-DOE_JANE.jsonl``).
"""

from __future__ import annotations

import bz2
import datetime as dt
import io
import lzma
import re
import zlib
from typing import NamedTuple

import fastavro

LANDED_EXTENSIONS = ("jsonl", "avro")
_LAYOUT = re.compile(r"(?:^|/)date=(\d{4}-\d{2}-\d{2})/[^/]*?-(\d{2})\.(jsonl|avro)$")
_DAY = re.compile(r"(?:^|/)date=(\d{4}-\d{2}-\d{2})/")
MAX_INFLATED_BYTES = 256 << 20  # most bytes inflated to count a compressed file's records
_CHUNK = 1 << 20
_AVRO_MAGIC = b"Obj\x01"
_SYNC_BYTES = 16
_MAGICS = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))


class FileCount(NamedTuple):
    """What a file held, as counted without trusting it."""

    records: int  # at least 1: a file that held nothing countable still stands for one input
    exact: bool  # False: a lower bound (inflation cap reached, or a layout that could not be walked)


def layout_arrival(path: str) -> dt.datetime | None:
    """Start of a landed file's hour from its path, or None when the path is outside the landing layout.

    ``.../wearables/date=2026-03-02/wearables-06.jsonl`` -> 2026-03-02T06:00Z; a missing hour, a
    date that does not exist (``2026-13-45``) or an hour outside 00..23 is None, never an exception.
    """
    match = _LAYOUT.search(path.replace("\\", "/"))
    if not match or int(match.group(2)) > 23:
        return None
    day = _real_day(match.group(1))
    return None if day is None else day + dt.timedelta(hours=int(match.group(2)))


def partition_day(path: str) -> dt.datetime | None:
    """Midnight of the ``date=`` folder a path lies in, when that folder names a real day."""
    match = _DAY.search(path.replace("\\", "/"))
    return _real_day(match.group(1)) if match else None


def _real_day(text: str) -> dt.datetime | None:
    """Midnight UTC of a ``YYYY-MM-DD`` that names a real day, else None (``2026-13-45``)."""
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        return None
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc)


def is_completion_marker(path: str, suffix: str) -> bool:
    """``<landed file><suffix>`` (an empty ``.done`` marker): expected beside landed files, not input."""
    return path.endswith(suffix) and layout_arrival(path[:-len(suffix)]) is not None


def stream_of(path: str) -> str:
    """The folder above a path's last ``date=`` folder (the stream), or ``"?"``."""
    parts = path.replace("\\", "/").split("/")
    dates = [i for i, part in enumerate(parts) if part.startswith("date=")]
    return parts[dates[-1] - 1] if dates and dates[-1] > 0 and re.fullmatch(r"[A-Za-z_]{1,40}", parts[dates[-1] - 1]) \
        else "?"


def why_outside_layout(path: str) -> str:
    """Why a file under a stream's folder is not a landed file, naming the rule, never the file."""
    parts = path.replace("\\", "/").split("/")
    dates = [i for i, part in enumerate(parts) if part.startswith("date=")]
    if not dates:
        return "a file outside the date=YYYY-MM-DD folders"
    if dates[-1] != len(parts) - 2:
        return "a file in a subfolder of a date= folder"
    if partition_day(path) is None:
        return "a file in a date= folder that names no real day"
    name = parts[-1]
    if compressed_kind_by_name(name):
        return f"a {compressed_kind_by_name(name)}-compressed file"
    if not name.endswith(tuple(f".{ext}" for ext in LANDED_EXTENSIONS)):
        return "a file with an extension other than .jsonl or .avro"
    return f"a file name other than {stream_of(path)}-HH.(jsonl|avro) with an hour 00..23"


def compressed_kind_by_name(name: str) -> str | None:
    for suffix, kind in ((".gz", "gzip"), (".bz2", "bzip2"), (".xz", "xz"), (".zst", "zstd"), (".zip", "zip")):
        if name.endswith(suffix):
            return kind
    return None


def compressed_kind(data: bytes) -> str | None:
    """The compression a file's first bytes announce, if any."""
    for magic, kind in _MAGICS:
        if data.startswith(magic):
            return kind
    return None


def count_records(data: bytes) -> FileCount:
    """How many records a foreign or damaged file held: Avro by its blocks' counts, compressed files
    by what they inflate to (bounded), anything else by its non-empty lines."""
    kind = compressed_kind(data)
    if kind is not None:
        return _count_compressed(data, kind)
    if data.startswith(_AVRO_MAGIC):
        claimed = avro_claimed_records(data)
        return FileCount(max(claimed, 1), exact=claimed >= 1) if claimed is not None else FileCount(1, False)
    lines = sum(1 for line in data.splitlines() if line.strip())
    return FileCount(max(lines, 1), exact=lines >= 1)


def _count_compressed(data: bytes, kind: str) -> FileCount:
    if kind == "zstd":  # no decompressor in the standard library: counted as one, as a lower bound
        return FileCount(1, exact=False)
    inflater = {"gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), "bzip2": bz2.BZ2Decompressor,
                "xz": lzma.LZMADecompressor}[kind]()
    head, newlines, inflated, last = b"", 0, 0, b"\n"
    source = io.BytesIO(data)
    try:
        while inflated < MAX_INFLATED_BYTES:
            if kind == "gzip":
                chunk = inflater.decompress(inflater.unconsumed_tail or source.read(_CHUNK), _CHUNK)
                if not chunk and not inflater.unconsumed_tail and source.tell() >= len(data):
                    break
            else:
                if inflater.eof:
                    break
                chunk = inflater.decompress(source.read(_CHUNK) if inflater.needs_input else b"", _CHUNK)
                if not chunk and source.tell() >= len(data) and inflater.needs_input:
                    break
            if len(head) < (1 << 16):
                head += chunk[:(1 << 16) - len(head)]
            newlines += chunk.count(b"\n")
            inflated += len(chunk)
            last = chunk[-1:] or last
    except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError):
        return FileCount(max(newlines, 1), exact=False)
    exact = inflated < MAX_INFLATED_BYTES
    if head.startswith(_AVRO_MAGIC):
        if not exact:
            return FileCount(1, exact=False)
        claimed = avro_claimed_records(_inflate_whole(data, kind))
        return FileCount(max(claimed or 1, 1), exact=bool(claimed))
    records = newlines + (0 if last == b"\n" else 1)
    return FileCount(max(records, 1), exact=exact and records >= 1)


def _inflate_whole(data: bytes, kind: str) -> bytes:
    """Only after `_count_compressed` saw it inflate to under MAX_INFLATED_BYTES."""
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, MAX_INFLATED_BYTES)
    return (bz2.BZ2Decompressor() if kind == "bzip2" else lzma.LZMADecompressor()).decompress(
        data, MAX_INFLATED_BYTES)


class AvroBlocks(NamedTuple):
    """An Avro container's layout: where its header ends and where each block lies."""

    header_end: int                        # bytes of magic, metadata and sync marker
    blocks: tuple[tuple[int, int, int], ...]  # (start, end, claimed record count) of each block walked
    whole: bool                            # every block parsed and ended in the sync marker, up to the file's end


def avro_blocks(data: bytes) -> AvroBlocks | None:
    """An Avro container's blocks, walking block headers only; None when the file header does not parse.

    Avro object container (Avro 1.11 spec, "Object Container Files"): magic ``Obj\x01``, a metadata
    map, a 16-byte sync marker, then blocks of (long count, long size, size bytes, sync).  A block
    whose count can be read is listed even when its data is cut short; the walk ends at the first
    header that does not parse or a sync marker that does not match (``whole`` is then False).
    """
    reader = _Reader(data)
    try:
        if reader.take(4) != _AVRO_MAGIC:
            return None
        while True:  # the metadata map: blocks of key/value pairs, ended by a count of 0
            count = reader.long()
            if count == 0:
                break
            if count < 0:
                reader.long()  # the block's byte size
                count = -count
            for _ in range(count):
                reader.skip(reader.long())
                reader.skip(reader.long())
        sync = reader.take(_SYNC_BYTES)
    except ValueError:
        return None
    header_end, blocks = reader.position, []
    walked = header_end  # the end of the last block that ended in the sync marker
    while reader.position < len(data):
        start = reader.position
        try:
            count = reader.long()
            size = reader.long()
        except ValueError:
            break
        if count < 0 or size < 0:
            break
        end = reader.position + size + _SYNC_BYTES
        blocks.append((start, end, count))
        if end > len(data) or data[end - _SYNC_BYTES:end] != sync:
            break  # cut short or damaged: this block's count is what it claimed
        reader.position = walked = end
    return AvroBlocks(header_end, tuple(blocks), walked == len(data))


def avro_claimed_records(data: bytes) -> int | None:
    """The sum of the record counts an Avro container's blocks claim (`avro_blocks`); None when
    the file header itself does not parse."""
    layout = avro_blocks(data)
    return None if layout is None else sum(count for _, _, count in layout.blocks)


MAX_AVRO_BLOCK_BYTES = 64 << 20  # most bytes one Avro block may inflate to (ours: a few hundred KiB)
AVRO_CODECS = ("null", "deflate")  # what medtwin reads; the spec's others are refused by name
_OTHER_AVRO_CODECS = ("snappy", "bzip2", "xz", "zstandard", "lz4")
_INFLATE_STEP = 1 << 20


def avro_inflation_problem(data: bytes) -> str | None:
    """Why the Avro container `data` must not be decoded, or None: every block of a ``deflate`` file
    inflates to at most `MAX_AVRO_BLOCK_BYTES`, measured 1 MiB at a time before fastavro inflates any
    block whole (a 1 MiB block of zeros would grow to 1 GiB); a codec other than `AVRO_CODECS` is
    refused, named only when it is one of the spec's. A header or block that does not parse is
    left to the decoder, which dead-letters it as damaged.
    """
    handle = io.BytesIO(data)
    try:
        codec = fastavro.reader(handle).codec  # reads the header only
    except Exception:  # noqa: BLE001 - fastavro raises many types on damaged headers
        return None
    if codec not in AVRO_CODECS:
        named = repr(codec) if codec in _OTHER_AVRO_CODECS else "(value withheld)"
        return f"Avro codec {named} is not accepted (only {' or '.join(AVRO_CODECS)})"
    if codec == "null":
        return None  # blocks are stored as they are: no bigger than the file
    reader = _Reader(data)
    reader.position = handle.tell()
    while reader.position < len(data):
        try:
            reader.long()  # the block's record count
            size = reader.long()
            block = reader.take(size)
            reader.take(_SYNC_BYTES)
        except ValueError:
            return None
        inflater, inflated = zlib.decompressobj(-zlib.MAX_WBITS), 0
        try:
            while block:
                inflated += len(inflater.decompress(block, _INFLATE_STEP))
                if inflated > MAX_AVRO_BLOCK_BYTES:
                    return (f"an Avro block of {size} bytes inflates to more than {MAX_AVRO_BLOCK_BYTES >> 20} MiB: "
                            "a compression bomb")
                block = inflater.unconsumed_tail
        except zlib.error:
            return None
    return None


class _Reader:
    """Avro's zig-zag varint longs and byte runs over a bytes object, raising ValueError past its end."""

    def __init__(self, data: bytes):
        self.data, self.position = data, 0

    def take(self, size: int) -> bytes:
        if size < 0 or self.position + size > len(self.data):
            raise ValueError("past the end")
        chunk = self.data[self.position:self.position + size]
        self.position += size
        return chunk

    def skip(self, size: int) -> None:
        self.take(size)

    def long(self) -> int:
        shift, value = 0, 0
        while True:
            if self.position >= len(self.data) or shift > 63:
                raise ValueError("bad varint")
            byte = self.data[self.position]
            self.position += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return (value >> 1) ^ -(value & 1)
            shift += 7
