"""Fetch: a DicomReference's ``uri`` -> the bytes of its DICOM file, or a dead letter.

A reference names a file somewhere Beam's `FileSystems` registry can reach
(a local path, ``gs://``, ``s3://``...).  The uri comes from an input stream,
so it is untrusted: a forged reference must not make the pipeline read
``/etc/shadow`` or a 50 GB object.  The checks run in this order, each with its
own dead-letter reason:

1. no ``..`` segment (refused outright, not normalised away), no control
   characters (a NUL would make the OS path calls raise);
2. no glob characters: `FileSystems.match` would expand them into a listing;
3. the uri lies under one of the allowed prefixes, on a path-segment boundary
   (``/data/in`` allows ``/data/in/x.dcm``, not ``/data/input/x.dcm``);
4. local files only: the real path (symlinks resolved) still lies under the real
   path of an allowed local prefix, so a symlink cannot escape;
5. the file exists and is one file;
6. its size, from the match metadata, is within the cap, checked BEFORE reading;
   the read itself is capped too, in case the file grows in between.

Local files are then read through their resolved real path, so the file read is
the one that was checked.  Files are read without decompression
(``CompressionTypes.UNCOMPRESSED``): ``FileSystems.open`` would otherwise
inflate ``*.gz`` names, and the size cap would no longer bound the bytes.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput

from transforms.dead_letters import DEAD_LETTERS, dead_letter
from transforms.panes import as_datetime

STAGE = "fetch_dicom"

# Rejection kinds: the first words of every fetch dead-letter reason.
PARENT_SEGMENT = "'..' segment in uri"
GLOB_CHARACTERS = "glob characters in uri"
CONTROL_CHARACTERS = "control characters in uri"
OUTSIDE_PREFIXES = "uri outside the allowed prefixes"
SYMLINK_ESCAPE = "symlink escapes the allowed prefixes"
NO_FILESYSTEM = "no filesystem for uri"
MISSING = "file not found"
NOT_A_FILE = "not a regular file"
TOO_LARGE = "file over the size cap"
UNREADABLE = "file could not be read"

_GLOB = re.compile(r"[*?\[\]]")


class FetchRejected(Exception):
    """A reference whose file must not or cannot be read.  ``str()`` is the dead-letter reason."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class FetchedDicom(NamedTuple):
    """The reference (pseudonymised, never PHI) and the raw bytes of the file it names."""

    reference: dict
    data: bytes


def check_uri(uri: str, allowed_prefixes: tuple[str, ...]) -> str:
    """The path to read for `uri`, after checks 1-4 of the module docstring.

    Returns `uri` itself for remote filesystems and the resolved real path for
    local files.  Raises FetchRejected.
    """
    if not isinstance(uri, str) or not uri:
        raise FetchRejected(OUTSIDE_PREFIXES, f"uri {uri!r} is empty or not a string")
    if ".." in re.split(r"[/\\]", uri):
        raise FetchRejected(PARENT_SEGMENT, f"{uri!r} names a parent directory")
    if any(ord(character) < 32 or character == "\x7f" for character in uri):
        raise FetchRejected(CONTROL_CHARACTERS, f"{uri!r} contains control characters")
    if _GLOB.search(uri):
        raise FetchRejected(GLOB_CHARACTERS, f"{uri!r} contains one of * ? [ ], which FileSystems would expand")
    matching = [prefix for prefix in allowed_prefixes if _under(uri, prefix)]
    if not matching:
        raise FetchRejected(OUTSIDE_PREFIXES, f"{uri!r} is not under any of {list(allowed_prefixes)}")
    if FileSystems.get_scheme(uri) is not None:
        return uri
    real = os.path.realpath(uri)
    local_prefixes = [p for p in allowed_prefixes if FileSystems.get_scheme(p) is None]
    if not any(_is_within(real, os.path.realpath(prefix)) for prefix in local_prefixes):
        raise FetchRejected(SYMLINK_ESCAPE, f"{uri!r} resolves to {real!r}, outside the real paths of "
                                            f"{local_prefixes}")
    return real


def fetch_bytes(uri: str, allowed_prefixes: tuple[str, ...], max_bytes: int) -> bytes:
    """The contents of the file `uri` names, after every check in the module docstring.

    Raises FetchRejected; never reads more than ``max_bytes + 1`` bytes.
    """
    path = check_uri(uri, allowed_prefixes)
    try:
        results = FileSystems.match([path])
    except Exception as error:  # ValueError for an unknown scheme, BeamIOError for a failed listing
        if FileSystems.get_scheme(path) is not None and isinstance(error, ValueError):
            raise FetchRejected(NO_FILESYSTEM, f"{uri!r}: {error}") from None
        raise FetchRejected(UNREADABLE,
                            f"{uri!r}: could not look it up: {type(error).__name__}: {error}") from None
    found = [m for m in results[0].metadata_list if m.path == path]
    if not found:
        raise FetchRejected(MISSING, f"{uri!r} does not exist")
    if FileSystems.get_scheme(path) is None and not os.path.isfile(path):
        raise FetchRejected(NOT_A_FILE, f"{uri!r} is not a regular file")
    size = found[0].size_in_bytes
    if size > max_bytes:
        raise FetchRejected(TOO_LARGE, f"{uri!r} is {size} bytes, over the cap of {max_bytes}")
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            data = handle.read(max_bytes + 1)
    except Exception as error:  # any filesystem's read errors
        raise FetchRejected(UNREADABLE, f"{uri!r}: {type(error).__name__}: {error}") from None
    if len(data) > max_bytes:
        raise FetchRejected(TOO_LARGE, f"{uri!r} grew past the cap of {max_bytes} bytes while being read")
    return data


def _under(uri: str, prefix: str) -> bool:
    """Whether `uri` is `prefix` or inside it, on a path-segment boundary."""
    if FileSystems.get_scheme(prefix) is None:
        if FileSystems.get_scheme(uri) is not None:
            return False
        return _is_within(os.path.abspath(uri), os.path.abspath(prefix))
    if FileSystems.get_scheme(uri) != FileSystems.get_scheme(prefix):
        return False
    return uri == prefix or uri.startswith(prefix if prefix.endswith("/") else prefix + "/")


def _is_within(path: str, directory: str) -> bool:
    try:
        return os.path.commonpath([path, directory]) == directory
    except ValueError:  # different drives, or a mix of absolute and relative paths
        return False


class FetchDicomFn(beam.DoFn):
    """DicomReference dict -> FetchedDicom (main output) or a dead letter (``DEAD_LETTERS``).

    Outputs keep the reference's timestamp (its acquisition time); dead letters are
    recorded under it too, and their payload is the pseudonymised reference.
    """

    def __init__(self, allowed_prefixes: tuple[str, ...], max_bytes: int):
        self._allowed_prefixes = tuple(allowed_prefixes)
        self._max_bytes = int(max_bytes)
        self._fetched = Metrics.counter(STAGE, "files_fetched")
        self._bytes = Metrics.counter(STAGE, "bytes_read")

    def process(self, reference: dict, timestamp=beam.DoFn.TimestampParam):
        try:
            data = fetch_bytes(reference.get("uri"), self._allowed_prefixes, self._max_bytes)
        except FetchRejected as error:
            yield TaggedOutput(DEAD_LETTERS, reference_dead_letter(STAGE, str(error), reference, timestamp))
            return
        self._fetched.inc()
        self._bytes.inc(len(data))
        yield FetchedDicom(reference, data)


def reference_dead_letter(stage: str, reason: str, reference: dict, timestamp) -> dict:
    """A dead letter for a DicomReference, recorded under its acquisition time (the element's timestamp)."""
    event_time = reference.get("acquisition_time")
    if not isinstance(event_time, dt.datetime):
        event_time = None
    recorded_at = event_time or as_datetime(max(timestamp.micros, 0))
    return dead_letter(stage, reason, reference, recorded_at=recorded_at, source=reference.get("source"),
                       event_time=event_time)
