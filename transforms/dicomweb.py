"""DICOMweb (PS3.18) for the pipeline: WADO-RS instance retrieval under the fetch stage's rules, STOW-RS store.

A DicomReference's ``uri`` may be a WADO-RS instance URL (PS3.18 10.4.1.1.1)::

    http://127.0.0.1:8042/dicom-web/studies/{study}/series/{series}/instances/{sop}

It comes from an input stream, so it is as untrusted as a file path, and `DicomWebClient.retrieve`
applies the same rules as `transforms.dicom_fetch` does to files, each refusal a `FetchRejected`
with the file rules' kinds (reasons never quote the URL: it carries UIDs and, on some PACS,
patient names):

1. http or https only; no user info, query or fragment; no control characters;
2. scheme, host and port equal one allow-listed base URL's, and the path is that base's path
   followed by exactly ``studies/<uid>/series/<uid>/instances/<uid>`` (PS3.5 9.1 UIDs: digits and
   dots, at most 64 characters), so no ``..`` and nothing else on the server can be named;
3. the answer's Content-Length, when sent, is within the cap BEFORE any byte of the body is read,
   and the body is read in chunks up to the cap (a chunked answer has no length);
4. redirects are refused, not followed (a 3xx could point anywhere: the allow-list would mean nothing);
5. transient failures (connection refused or reset, timeouts, 429, 502, 503, 504) are retried
   with exponential back-off, up to ``retries`` times; others are dead letters at once.

Credentials come from a `CredentialsReference` (``env:NAME`` or ``file:PATH`` holding ``user:password``),
like the pseudonym key's `KeyReference`: only the reference travels in the pipeline graph; the
secret is read on the worker in `DicomWebAccess.connect` (a DoFn's ``setup``), kept in the client's
Authorization header, and never logged, pickled or put in a reason.

`DicomWebClient.store` posts Part 10 instances to ``<base>/studies`` (STOW-RS, PS3.18 10.5) and
checks the answer's Failed SOP Sequence (0008,1198): an instance the PACS did not keep is an error.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import os
import re
import socket
import time
import uuid
from urllib.parse import urlsplit

import pydicom

from transforms.dicom_fetch import (
    CONTROL_CHARACTERS,
    MISSING,
    OUTSIDE_PREFIXES,
    TOO_LARGE,
    UNREADABLE,
    FetchRejected,
)

CREDENTIAL_KINDS = ("env", "file")
# Rejection kinds of WADO-RS only (the others are the file rules' kinds).
REDIRECT = "redirect refused"
UNAUTHORISED = "PACS refused the credentials"
NOT_DICOM_PART = "WADO-RS answer is not one DICOM instance"

_UID = r"[0-9]+(?:\.[0-9]+)*"
_INSTANCE_PATH = re.compile(rf"studies/({_UID})/series/({_UID})/instances/({_UID})")
_TRANSIENT_STATUS = (429, 502, 503, 504)
_TRANSIENT_ERRORS = (ConnectionError, socket.timeout, TimeoutError, http.client.RemoteDisconnected,
                     http.client.IncompleteRead)
# Room for the multipart framing around one instance (boundary lines, part headers).
_MULTIPART_ALLOWANCE = 64 * 1024
_CHUNK = 1 << 20


class CredentialsError(Exception):
    """A credentials reference that cannot be read; the message names the reference, never a secret."""


class DicomWebError(Exception):
    """A STOW-RS store that failed; the message names no UID and no URL."""


class PacsUnavailable(DicomWebError):
    """The PACS could not be reached, or kept failing transiently, through every retry."""


@dataclasses.dataclass(frozen=True)
class CredentialsReference:
    """Where a worker finds the PACS's ``user:password``: ``env:NAME`` or ``file:PATH``. Holds no secret."""

    kind: str
    name: str

    def __post_init__(self):
        if self.kind not in CREDENTIAL_KINDS:
            raise ValueError(f"unknown credentials reference kind {self.kind!r}; choose from "
                             f"{', '.join(CREDENTIAL_KINDS)}")
        if not self.name:
            raise ValueError(f"credentials reference {self.kind}: needs a name")

    @classmethod
    def parse(cls, text: str) -> "CredentialsReference":
        """``env:NAME`` or ``file:PATH`` -> the reference (ValueError otherwise)."""
        kind, _, name = (text or "").partition(":")
        return cls(kind, name)

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"

    def load(self) -> tuple[str, str]:
        """(user, password) from the variable or file (first line); CredentialsError when unusable."""
        if self.kind == "env":
            value = os.environ.get(self.name, "")
        else:
            try:
                with open(self.name, encoding="utf-8") as handle:
                    value = handle.readline(4096).rstrip("\r\n")
            except OSError as error:
                raise CredentialsError(f"PACS credentials {self}: {error.strerror}") from None
        user, colon, password = value.partition(":")
        if not colon or not user or not password:
            raise CredentialsError(f"PACS credentials {self}: not set, or not in the form user:password")
        return user, password


@dataclasses.dataclass(frozen=True)
class DicomWebAccess:
    """What a job may reach over DICOMweb: allow-listed base URLs and where the credentials are.

    base_urls: DICOMweb roots, e.g. ``http://127.0.0.1:8042/dicom-web`` (no trailing slash needed).
    credentials: None for a PACS without authentication.
    timeout_s: per connection attempt and per read; retries: extra attempts on transient failures;
    backoff_s: first wait between attempts, doubled each time.
    """

    base_urls: tuple[str, ...]
    credentials: CredentialsReference | None = None
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 0.5

    def __post_init__(self):
        if not isinstance(self.base_urls, tuple) or not self.base_urls:
            raise ValueError("base_urls must be a non-empty tuple of http(s) URLs")
        for url in self.base_urls:
            parts = urlsplit(url) if isinstance(url, str) else None
            if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.username
                    or parts.password or parts.query or parts.fragment or ".." in parts.path.split("/")):
                raise ValueError("a DICOMweb base URL must be http(s)://host[:port]/path, without user info, "
                                 f"query or '..': got {url!r}")
        if not self.timeout_s > 0 or self.retries < 0 or self.backoff_s < 0:
            raise ValueError("timeout_s must be positive, retries and backoff_s non-negative")

    def connect(self) -> "DicomWebClient":
        """A client with the credentials read here (on the worker)."""
        header = None
        if self.credentials is not None:
            user, password = self.credentials.load()
            header = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        return DicomWebClient(self, header)


def is_dicomweb_uri(uri) -> bool:
    """Whether `uri` is an http(s) URL (read over DICOMweb, never through FileSystems)."""
    return isinstance(uri, str) and uri[:8].lower().startswith(("http://", "https://"))


def instance_url(base_url: str, study_uid: str, series_uid: str, sop_uid: str) -> str:
    """The WADO-RS URL of one instance under `base_url`."""
    return f"{base_url.rstrip('/')}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"


class DicomWebClient:
    """WADO-RS retrieve and STOW-RS store against the access's base URLs (see the module docstring)."""

    def __init__(self, access: DicomWebAccess, authorization: str | None):
        self._access = access
        self._authorization = authorization
        self._bases = [urlsplit(url) for url in access.base_urls]

    def __repr__(self) -> str:  # never the Authorization header
        return f"DicomWebClient({len(self._bases)} base URL(s), credentials={self._access.credentials})"

    def __reduce__(self):
        raise TypeError("a DicomWebClient holds credentials and is not pickled; pickle its DicomWebAccess")

    def handles(self, uri) -> bool:
        return is_dicomweb_uri(uri)

    def check_url(self, uri: str):
        """The allow-listed base `uri` lies under, with the instance path (rules 1-2); FetchRejected."""
        if any(ord(c) < 32 or c == "\x7f" for c in uri):
            raise FetchRejected(CONTROL_CHARACTERS, "the uri contains control characters (uri withheld)")
        try:
            parts = urlsplit(uri)
            port = parts.port
        except ValueError:
            raise FetchRejected(OUTSIDE_PREFIXES, "the uri is not a well-formed URL (uri withheld)") from None
        if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
            raise FetchRejected(OUTSIDE_PREFIXES, "the URL carries user info, a query or a fragment (uri withheld)")
        for base in self._bases:
            same_origin = (parts.scheme == base.scheme and parts.hostname == base.hostname
                           and (port or _default_port(parts.scheme)) == (base.port or _default_port(base.scheme)))
            root = base.path.rstrip("/") + "/"
            if same_origin and parts.path.startswith(root) and _INSTANCE_PATH.fullmatch(parts.path[len(root):]):
                if all(len(uid) <= 64 for uid in _INSTANCE_PATH.fullmatch(parts.path[len(root):]).groups()):
                    return base, parts.path
        raise FetchRejected(OUTSIDE_PREFIXES, f"the URL is not a WADO-RS instance URL under any of the "
                                              f"{len(self._bases)} allowed DICOMweb base URL(s) (uri withheld)")

    def retrieve(self, uri: str, max_bytes: int) -> bytes:
        """The Part 10 bytes of the instance `uri` names (WADO-RS); FetchRejected; reads at most the cap."""
        content_type, body = self._get(uri, "", 'multipart/related; type="application/dicom"; transfer-syntax=*',
                                       max_bytes + _MULTIPART_ALLOWANCE)
        data = _single_dicom_part(content_type, body)
        if len(data) > max_bytes:
            raise FetchRejected(TOO_LARGE, f"the instance is {len(data)} bytes, over the cap of {max_bytes}")
        return data

    def retrieve_metadata(self, uri: str, max_bytes: int) -> pydicom.Dataset:
        """The header of the instance `uri` names, from WADO-RS ``<uri>/metadata`` (DICOM JSON, PS3.18 F),
        bulk data (the pixels) left out; FetchRejected."""
        _, body = self._get(uri, "/metadata", "application/dicom+json", max_bytes)
        try:
            document = json.loads(body)
            attributes = {tag: value for tag, value in document[0].items()
                          if not (isinstance(value, dict) and ("BulkDataURI" in value or "InlineBinary" in value))}
            return pydicom.Dataset.from_json(attributes)
        except Exception as error:  # not JSON, not a list of one dataset, an attribute pydicom refuses
            raise FetchRejected(NOT_DICOM_PART, f"the metadata answer is not a DICOM JSON dataset: "
                                                f"{type(error).__name__}") from None

    def _get(self, uri: str, suffix: str, accept: str, limit: int) -> tuple[str, bytes]:
        """GET `uri` + `suffix` after rules 1-2, body capped at `limit` (rules 3-5) -> (content type, body)."""
        base, path = self.check_url(uri)
        headers = {"Accept": accept, "Accept-Encoding": "identity"}

        def attempt(connection):
            connection.request("GET", path + suffix, headers=self._headers(headers))
            response = connection.getresponse()
            status = response.status
            if status in _TRANSIENT_STATUS:
                return _Transient(status)
            _raise_for_status(status)
            length = response.getheader("Content-Length")
            if length is not None and (not length.strip().isdigit() or int(length) > limit):
                raise FetchRejected(TOO_LARGE, f"the PACS announces {length.strip()[:20]} bytes, over the cap of "
                                               f"{limit}")
            body = _read_capped(response, limit)
            if body is None:
                raise FetchRejected(TOO_LARGE, f"the answer ran past the cap of {limit} bytes while being read")
            return response.getheader("Content-Type", ""), body

        return self._with_retries(base, attempt)

    def store(self, instances: list[bytes], base_url: str | None = None) -> None:
        """STOW-RS the Part 10 `instances` to ``<base_url>/studies`` (default: the first base URL).

        Raises DicomWebError when the PACS refuses the request or lists a failed instance.
        """
        base = urlsplit(base_url) if base_url else self._bases[0]
        if base not in self._bases:
            raise DicomWebError("STOW-RS target is not one of the allowed DICOMweb base URLs")
        boundary = uuid.uuid4().hex
        body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + instance + b"\r\n"
                        for instance in instances) + f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": "application/dicom+json", "Content-Length": str(len(body))}
        path = base.path.rstrip("/") + "/studies"

        def attempt(connection):
            connection.request("POST", path, body=body, headers=self._headers(headers))
            response = connection.getresponse()
            if response.status in _TRANSIENT_STATUS:
                return _Transient(response.status)
            answer = _read_capped(response, 16 * 1024 * 1024) or b""
            if response.status not in (200, 202):
                raise DicomWebError(f"STOW-RS answered HTTP {response.status}")
            return answer

        try:
            answer = self._with_retries(base, attempt)
        except FetchRejected as error:
            raise PacsUnavailable(f"STOW-RS failed: {error}") from None
        failed = _failed_sop_count(answer)
        if failed:
            raise DicomWebError(f"STOW-RS: the PACS refused {failed} of {len(instances)} instance(s)")

    def _headers(self, headers: dict) -> dict:
        if self._authorization is not None:
            return {**headers, "Authorization": self._authorization}
        return headers

    def _with_retries(self, base, attempt):
        """Runs ``attempt(connection)`` until it returns something other than `_Transient`, retrying on
        transient statuses and connection errors with exponential back-off; FetchRejected at the end."""
        wait, last = self._access.backoff_s, "no attempt"
        for number in range(self._access.retries + 1):
            if number:
                time.sleep(wait)
                wait *= 2
            connection_class = http.client.HTTPSConnection if base.scheme == "https" else http.client.HTTPConnection
            connection = connection_class(base.hostname, base.port, timeout=self._access.timeout_s)
            try:
                outcome = attempt(connection)
            except _TRANSIENT_ERRORS as error:
                last = type(error).__name__
                continue
            except OSError as error:  # DNS failure, TLS errors...
                raise FetchRejected(UNREADABLE, f"the PACS could not be reached: {type(error).__name__}") from None
            finally:
                connection.close()
            if isinstance(outcome, _Transient):
                last = f"HTTP {outcome.status}"
                continue
            return outcome
        raise FetchRejected(UNREADABLE, f"the PACS failed {self._access.retries + 1} attempt(s), last: {last}")


class _Transient:
    def __init__(self, status: int):
        self.status = status


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _raise_for_status(status: int) -> None:
    if 300 <= status < 400:
        raise FetchRejected(REDIRECT, f"the PACS answered HTTP {status}; redirects are not followed")
    if status in (401, 403):
        raise FetchRejected(UNAUTHORISED, f"HTTP {status}")
    if status in (404, 410):
        raise FetchRejected(MISSING, f"the PACS has no such instance (HTTP {status})")
    if status != 200:
        raise FetchRejected(UNREADABLE, f"the PACS answered HTTP {status}")


def _read_capped(response, limit: int) -> bytes | None:
    """At most `limit` bytes of the body, read in chunks; None when there are more."""
    chunks, total = [], 0
    while True:
        chunk = response.read(min(_CHUNK, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            return None


def _single_dicom_part(content_type: str, body: bytes) -> bytes:
    """The one application/dicom part of a multipart/related answer (RFC 2387); FetchRejected otherwise."""
    media, _, parameters = content_type.partition(";")
    if media.strip().lower() != "multipart/related":
        raise FetchRejected(NOT_DICOM_PART, f"content type {media.strip()[:40]!r}, not multipart/related")
    match = re.search(r'boundary="?([^";]{1,70})"?', parameters)
    if not match:
        raise FetchRejected(NOT_DICOM_PART, "multipart answer without a boundary")
    delimiter = b"--" + match.group(1).encode("latin-1")
    pieces = body.split(delimiter)
    # pieces: preamble, part..., "--" epilogue
    parts = [piece for piece in pieces[1:] if not piece.startswith(b"--")]
    if len(parts) != 1 or not pieces[-1].startswith(b"--"):
        raise FetchRejected(NOT_DICOM_PART, f"{len(parts)} part(s) in the answer, or no closing boundary")
    head, separator, content = parts[0].partition(b"\r\n\r\n")
    if not separator:
        raise FetchRejected(NOT_DICOM_PART, "a part without a header/body separator")
    part_type = next((line.split(b":", 1)[1].strip().lower() for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-type:")), b"")
    if not part_type.startswith(b"application/dicom"):
        raise FetchRejected(NOT_DICOM_PART, "the part is not application/dicom")
    return content[:-2] if content.endswith(b"\r\n") else content


def _failed_sop_count(answer: bytes) -> int:
    """Items in the STOW-RS answer's Failed SOP Sequence (0008,1198); a non-JSON answer counts as none failed
    only when empty."""
    if not answer.strip():
        return 0
    try:
        document = json.loads(answer)
    except ValueError:
        raise DicomWebError("STOW-RS answer is not DICOM JSON") from None
    failed = document.get("00081198", {}).get("Value", []) if isinstance(document, dict) else []
    return len(failed)
