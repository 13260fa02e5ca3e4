"""Object store reads with transient/permanent error classes: ``gs://`` objects through google-cloud-storage.

`read_object(uri, max_bytes, policy)` -> the object's bytes, size-capped, or one of:

* `ObjectRefused` (permanent: the object is missing (404), access is denied (401/403), it is over
  the cap, or the request is refused for another 4xx): the caller makes a dead letter of it;
  ``str()`` names the HTTP status and never the uri;
* `TransientStoreError` (429, 408, 5xx, connection errors, timeouts) once `RetryPolicy` has
  retried them with exponential backoff (Beam's `FuzzedExponentialIntervals`) and they persist:
  the caller lets it propagate so the runner retries the bundle (Dataflow: indefinitely in
  streaming, four times in batch), never a dead letter: a storage outage loses nothing.

Beam's GCS filesystem (`apache_beam.io.gcp.gcsio`) retries inside google-cloud-storage's own
deadline (two minutes), then surfaces every failure alike as a ``BeamIOError``, so a caller cannot
tell a 503 that outlived the deadline from a 403. This module calls the same client library with
the library's retry off (``retry=None``) and retries here: its own timeout per request, its own
backoff, and the HTTP status kept for the reason.

Emulators: google-cloud-storage honours ``STORAGE_EMULATOR_HOST`` (a URL,
``http://127.0.0.1:4443``), as does Beam's filesystem; with it set the client is anonymous.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

from apache_beam.metrics import Metrics
from apache_beam.utils.retry import FuzzedExponentialIntervals

EMULATOR_HOST = "STORAGE_EMULATOR_HOST"
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_clients = threading.local()


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How hard a transient failure is retried before the bundle is failed.

    Attributes:
      attempts: requests in all (the first and its retries).
      initial_delay_s, max_delay_s: the backoff between them (doubling, fuzzed by half).
      timeout_s: each request's connect/read timeout; a request that takes longer is transient.
    """

    attempts: int = 6
    initial_delay_s: float = 0.5
    max_delay_s: float = 16.0
    timeout_s: float = 30.0


class ObjectRefused(Exception):
    """A permanent failure; ``str()`` is a reason quoting no uri (``access denied (HTTP 403)``)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class TransientStoreError(Exception):
    """A transient failure that outlived the retries; the bundle should fail and be retried."""


def split_gcs_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("gs://"):
        raise ValueError("not a gs:// uri")
    bucket, _, name = uri[len("gs://"):].partition("/")
    if not bucket or not name:
        raise ObjectRefused("not an object", "the uri names no bucket and object (uri withheld)")
    return bucket, name


def storage_client():
    """One google-cloud-storage client per thread: anonymous on an emulator, else default credentials."""
    client = getattr(_clients, "client", None)
    if client is None:
        from google.cloud import storage

        client = storage.Client.create_anonymous_client() if os.environ.get(EMULATOR_HOST) else storage.Client()
        _clients.client = client
    return client


def _status(error: Exception) -> int | None:
    code = getattr(error, "code", None)
    if isinstance(code, int):
        return code
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(error: Exception) -> bool:
    import requests

    status = _status(error)
    if status is not None:
        return status in TRANSIENT_STATUS
    return isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                              ConnectionError, TimeoutError))


def _refusal(error: Exception) -> ObjectRefused:
    status = _status(error)
    if status == 404:
        return ObjectRefused("file not found", "no object at the uri (HTTP 404; uri withheld)")
    if status in (401, 403):
        return ObjectRefused("access denied", f"the store refused access to the object (HTTP {status})")
    return ObjectRefused("request refused", f"the store refused the request (HTTP {status}, "
                                            f"{type(error).__name__})")


def with_retries(call, policy: RetryPolicy, what: str):
    """``call()``, retrying transient failures per `policy`; raises ObjectRefused or TransientStoreError."""
    delays = iter(FuzzedExponentialIntervals(policy.initial_delay_s, policy.attempts - 1,
                                             factor=2, max_delay_secs=policy.max_delay_s))
    retried = Metrics.counter("object_store", "transient_retries")
    while True:
        try:
            return call()
        except ObjectRefused:
            raise
        except Exception as error:  # classified below: only the client's and the transport's errors
            if not _is_transient(error):
                if _status(error) is None:
                    raise
                raise _refusal(error) from None
            delay = next(delays, None)
            if delay is None:
                raise TransientStoreError(f"{what}: transient failure persisted after {policy.attempts} attempts "
                                          f"(HTTP {_status(error) or type(error).__name__})") from None
            retried.inc()
            time.sleep(delay)


def read_object(uri: str, max_bytes: int, policy: RetryPolicy = RetryPolicy()) -> bytes:
    """The bytes of the ``gs://`` object `uri`, checked against `max_bytes` before (its metadata) and
    while (a ranged read of at most ``max_bytes + 1`` bytes) reading."""
    bucket_name, name = split_gcs_uri(uri)
    bucket = storage_client().bucket(bucket_name)
    timeout = policy.timeout_s

    def metadata():
        blob = bucket.get_blob(name, timeout=timeout, retry=None)
        if blob is None:
            raise ObjectRefused("file not found", "no object at the uri (HTTP 404; uri withheld)")
        return blob

    blob = with_retries(metadata, policy, "object metadata")
    if blob.size is not None and blob.size > max_bytes:
        raise ObjectRefused("file over the size cap", f"the object is {blob.size} bytes, over the cap of {max_bytes}")
    data = with_retries(lambda: blob.download_as_bytes(start=0, end=max_bytes, timeout=timeout, retry=None,
                                                       checksum=None), policy, "object read")
    if len(data) > max_bytes:
        raise ObjectRefused("file over the size cap", f"the object grew past the cap of {max_bytes} bytes")
    return data


def list_objects(prefix: str, policy: RetryPolicy = RetryPolicy()) -> list[str]:
    """The ``gs://`` uris of every object whose name starts with `prefix` (a ``gs://bucket/name`` prefix)."""
    bucket_name, _, name = prefix[len("gs://"):].partition("/")
    bucket = storage_client().bucket(bucket_name)
    blobs = with_retries(lambda: list(bucket.list_blobs(prefix=name, timeout=policy.timeout_s, retry=None)),
                         policy, "object listing")
    return [f"gs://{bucket_name}/{blob.name}" for blob in blobs]


def move_object(source: str, destination: str, policy: RetryPolicy = RetryPolicy()) -> None:
    """Copies the ``gs://`` object `source` to `destination`, then deletes `source`.

    GCS has no rename. Beam's filesystem moves objects with batch requests (one HTTP multipart
    call for many copies or deletes); this makes one request per object, each retried on its own,
    which every GCS endpoint answers (the emulator cannot answer batches). A retried copy writes
    the same object again; the delete of a source that is gone already counts as done.
    """
    source_bucket, source_name = split_gcs_uri(source)
    target_bucket, target_name = split_gcs_uri(destination)
    client = storage_client()
    bucket = client.bucket(source_bucket)
    with_retries(lambda: bucket.copy_blob(bucket.blob(source_name), client.bucket(target_bucket), target_name,
                                          timeout=policy.timeout_s, retry=None), policy, "object copy")
    delete_object(source, policy)


def delete_object(uri: str, policy: RetryPolicy = RetryPolicy()) -> None:
    """Deletes the ``gs://`` object `uri`; one that is not there counts as deleted."""
    bucket_name, name = split_gcs_uri(uri)
    blob = storage_client().bucket(bucket_name).blob(name)
    try:
        with_retries(lambda: blob.delete(timeout=policy.timeout_s, retry=None), policy, "object delete")
    except ObjectRefused as refused:
        if refused.kind != "file not found":
            raise


def replace_file(source: str, destination: str) -> None:
    """Moves the file `source` onto `destination` (replacing it) on any Beam filesystem: an atomic
    rename on a local disk, `move_object` on ``gs://`` (one request per object, no batch), Beam's
    `FileSystems` rename elsewhere."""
    from apache_beam.io.filesystems import FileSystems

    if source.startswith("gs://"):
        move_object(source, destination)
    elif FileSystems.get_scheme(destination) is None:
        os.makedirs(os.path.dirname(destination) or ".", exist_ok=True)
        os.replace(source, destination)
    else:
        if FileSystems.exists(destination):
            FileSystems.delete([destination])
        FileSystems.rename([source], [destination])


def delete_files(paths: list[str]) -> None:
    """Deletes files on any Beam filesystem (``gs://``: `delete_object` each); missing ones count as deleted."""
    from apache_beam.io.filesystems import FileSystems

    others = []
    for path in paths:
        if path.startswith("gs://"):
            delete_object(path)
        else:
            others.append(path)
    others = [path for path in others if FileSystems.exists(path)]
    if others:
        FileSystems.delete(others)
