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

Local files are read by `read_regular_file`: the resolved real path is opened
with ``O_NOFOLLOW | O_NONBLOCK`` (a link swapped in after the check is refused,
a FIFO cannot block the worker), and the open descriptor itself must be a
regular file with ONE name (``st_nlink == 1``: a hard link inside the prefix to
a file outside it is indistinguishable from the file itself, so any file with a
second name is refused), under the cap, and still inside the prefix (Linux:
``/proc/self/fd``).  The checks and the read are on the same descriptor, so the
file read is the file checked.  Remote files are read without decompression
(``CompressionTypes.UNCOMPRESSED``): ``FileSystems.open`` would otherwise
inflate ``*.gz`` names, and the size cap would no longer bound the bytes.
``gs://`` objects are read by `transforms.object_store`: 429, 408, 5xx and timeouts
are retried with backoff and, if they persist, fail the bundle (retried by the
runner, never a dead letter); 404 and 403 are dead letters naming the status.

Reasons never quote the uri or a path: a uri is input, and hospital paths carry
names and record numbers (``/pacs/DOE_JANE_MRN0099001/...``).
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import stat
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput

from transforms.dead_letters import DEAD_LETTERS, dead_letter
from transforms.object_store import ObjectRefused, RetryPolicy, read_object
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
HARD_LINK = "file has more than one name (hard link)"
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
        raise FetchRejected(OUTSIDE_PREFIXES, f"the uri is empty or not a string ({type(uri).__name__})")
    if ".." in re.split(r"[/\\]", uri):
        raise FetchRejected(PARENT_SEGMENT, "the uri names a parent directory (uri withheld)")
    if any(ord(character) < 32 or character == "\x7f" for character in uri):
        raise FetchRejected(CONTROL_CHARACTERS, "the uri contains control characters (uri withheld)")
    if _GLOB.search(uri):
        raise FetchRejected(GLOB_CHARACTERS, "the uri contains one of * ? [ ], which FileSystems would expand "
                                             "(uri withheld)")
    matching = [prefix for prefix in allowed_prefixes if _under(uri, prefix)]
    if not matching:
        raise FetchRejected(OUTSIDE_PREFIXES, f"the uri is under none of the {len(allowed_prefixes)} allowed "
                                              "prefix(es) (uri withheld)")
    if FileSystems.get_scheme(uri) is not None:
        return uri
    real = os.path.realpath(uri)
    local_prefixes = [p for p in allowed_prefixes if FileSystems.get_scheme(p) is None]
    if not any(_is_within(real, os.path.realpath(prefix)) for prefix in local_prefixes):
        raise FetchRejected(SYMLINK_ESCAPE, "the uri resolves through a symbolic link to a path outside the "
                                            "real paths of the allowed prefixes (uri withheld)")
    return real


def fetch_bytes(uri: str, allowed_prefixes: tuple[str, ...], max_bytes: int,
                retry: RetryPolicy = RetryPolicy()) -> bytes:
    """The contents of the file `uri` names, after every check in the module docstring.

    Raises FetchRejected; never reads more than ``max_bytes + 1`` bytes. ``gs://`` objects are read
    by `transforms.object_store` (`retry`); a transient failure that outlives it raises
    `TransientStoreError`, which is not a dead letter: the runner retries the bundle.
    """
    path = check_uri(uri, allowed_prefixes)
    if FileSystems.get_scheme(path) is None:
        real_prefixes = [os.path.realpath(p) for p in allowed_prefixes if FileSystems.get_scheme(p) is None]
        return read_regular_file(path, max_bytes, within=real_prefixes)
    if FileSystems.get_scheme(path) == "gs":  # transient errors retried, then raised (the bundle is retried)
        try:
            return read_object(path, max_bytes, retry)
        except ObjectRefused as error:
            raise FetchRejected(error.kind, error.detail) from None
    try:
        results = FileSystems.match([path])
    except Exception as error:  # ValueError for an unknown scheme, BeamIOError for a failed listing
        if isinstance(error, ValueError):
            raise FetchRejected(NO_FILESYSTEM, f"no filesystem is registered for the scheme "
                                               f"{_scheme_for_reason(path)}") from None
        raise FetchRejected(UNREADABLE, f"the file could not be looked up: {type(error).__name__}") from None
    found = [m for m in results[0].metadata_list if m.path == path]
    if not found:
        raise FetchRejected(MISSING, "no file at the uri (uri withheld)")
    size = found[0].size_in_bytes
    if size > max_bytes:
        raise FetchRejected(TOO_LARGE, f"the file is {size} bytes, over the cap of {max_bytes}")
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            data = handle.read(max_bytes + 1)
    except Exception as error:  # any filesystem's read errors
        raise FetchRejected(UNREADABLE, f"reading failed: {type(error).__name__}") from None
    if len(data) > max_bytes:
        raise FetchRejected(TOO_LARGE, f"the file grew past the cap of {max_bytes} bytes while being read")
    return data


def read_regular_file(path: str, max_bytes: int, *, within: list[str] | None = None) -> bytes:
    """The bytes of the local regular file `path`, read through one descriptor that was checked.

    `path` must not be a symbolic link (``O_NOFOLLOW``); the descriptor must be a regular file
    (a FIFO, device or directory is refused, and ``O_NONBLOCK`` means opening a FIFO cannot
    block), with one name (``st_nlink == 1``), at most `max_bytes`, and, when `within` names
    real directory paths, lie inside one of them.  Never reads more than ``max_bytes + 1`` bytes.
    Raises FetchRejected; its reasons quote no path.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        raise FetchRejected(MISSING, "no file at the uri (uri withheld)") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise FetchRejected(SYMLINK_ESCAPE, "the file is a symbolic link, which is not followed") from None
        raise FetchRejected(UNREADABLE, f"the file could not be opened: {errno.errorcode.get(error.errno, 'error')}") \
            from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise FetchRejected(NOT_A_FILE, f"the uri names a {_file_type(status.st_mode)}, not a regular file")
        if status.st_nlink != 1:
            raise FetchRejected(HARD_LINK, f"the file has {status.st_nlink} names; a hard link can bring in a file "
                                           "from outside the allowed prefixes, so files with more than one name "
                                           "are refused")
        if within is not None and not any(_is_within(_descriptor_path(descriptor, path), d) for d in within):
            raise FetchRejected(SYMLINK_ESCAPE, "the opened file lies outside the allowed directories")
        if status.st_size > max_bytes:
            raise FetchRejected(TOO_LARGE, f"the file is {status.st_size} bytes, over the cap of {max_bytes}")
        chunks, remaining = [], max_bytes + 1
        while remaining > 0:
            chunk = os.read(descriptor, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as error:
        raise FetchRejected(UNREADABLE, f"reading failed: {errno.errorcode.get(error.errno, 'error')}") from None
    finally:
        os.close(descriptor)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise FetchRejected(TOO_LARGE, f"the file grew past the cap of {max_bytes} bytes while being read")
    return data


def _descriptor_path(descriptor: int, path: str) -> str:
    """The real path of an open file: what the kernel opened (Linux), else the resolved `path`."""
    try:
        return os.readlink(f"/proc/self/fd/{descriptor}")
    except OSError:
        return os.path.realpath(path)


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _scheme_for_reason(path: str) -> str:
    scheme = FileSystems.get_scheme(path) or ""
    return repr(scheme) if re.fullmatch(r"[a-z][a-z0-9+.-]{0,15}", scheme) else "(withheld)"


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
    recorded under it too, and their payload is the pseudonymised reference.  A WADO-RS
    uri is read by `transforms.dicomweb` when the DoFn is given a DicomWebAccess.
    """

    def __init__(self, allowed_prefixes: tuple[str, ...], max_bytes: int, dicomweb=None):
        self._allowed_prefixes = tuple(allowed_prefixes)
        self._max_bytes = int(max_bytes)
        # transforms.dicomweb.DicomWebAccess (allow-listed base URLs, a credentials reference) or None:
        # http(s) uris are WADO-RS URLs, read by its client under the same rules; None refuses them.
        self._dicomweb = dicomweb
        self._wado = None
        self._fetched = Metrics.counter(STAGE, "files_fetched")
        self._bytes = Metrics.counter(STAGE, "bytes_read")

    def setup(self):
        # The PACS credentials are read here, on the worker: never in the pipeline graph.
        self._wado = self._dicomweb.connect() if self._dicomweb is not None else None

    def process(self, reference: dict, timestamp=beam.DoFn.TimestampParam):
        uri = reference.get("uri")
        try:
            if self._wado is not None and self._wado.handles(uri):
                data = self._wado.retrieve(uri, self._max_bytes)
            else:
                data = fetch_bytes(uri, self._allowed_prefixes, self._max_bytes)
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
    uri = reference.get("uri")
    if "uri" in reference:  # a hospital path may name the patient (issue 13, B9); `source` locates the record
        reference = {**reference, "uri": f"(uri withheld: {len(uri) if isinstance(uri, str) else 0} characters)"}
    return dead_letter(stage, reason, reference, recorded_at=recorded_at, source=reference.get("source"),
                       event_time=event_time)
