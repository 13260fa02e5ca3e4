"""GCS for real: fake-gcs-server (behind a fault-injecting proxy) reached through STORAGE_EMULATOR_HOST.

What was broken (issue 12) and the test that shows each fixed:
  any GCS error while fetching a DICOM file, 429/503 included, became a permanent dead letter
      -> test_transient_failures_are_retried_with_backoff, test_a_slow_answer_is_a_timeout_and_retried,
         test_a_persisting_transient_failure_fails_the_bundle_not_a_dead_letter
  permanent failures said only "could not be looked up: BeamIOError"
      -> test_permanent_failures_are_dead_letters_naming_the_status
gs:// inputs, DICOM uris and Parquet output through the whole pipeline, re-run in place
      -> test_pipeline_reads_gs_inputs_and_dicom_uris
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


# ---------------------------------------------------------------- the pipeline on gs://


def _download(root: str, folder: Path) -> dict:
    """Copies every object under `root` (gs://...) into `folder`; returns {relative name: bytes digest}."""
    import hashlib

    found = {}
    for uri in object_store.list_objects(root + "/"):
        relative = uri[len(root) + 1:]
        data = object_store.read_object(uri, 1 << 30)
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
        found[relative] = hashlib.sha256(data).hexdigest()
    return found


def _upload_hospital(local: Path, root: str) -> None:
    """Copies a simulated hospital to `root` (gs://...), its DICOM references pointing into `root`."""
    import fastavro

    bucket_name, prefix = object_store.split_gcs_uri(root + "/x")[0], root.split("/", 3)[3]
    bucket = object_store.storage_client().bucket(bucket_name)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        relative = path.relative_to(local).as_posix()
        data = path.read_bytes()
        if relative.startswith("dicom_refs/") and relative.endswith(".avro"):
            reader = fastavro.reader(open(path, "rb"))
            records = [{**r, "uri": r["uri"].replace(str(local), root)} for r in reader]
            out = __import__("io").BytesIO()
            fastavro.writer(out, reader.writer_schema, records, codec="deflate")
            data = out.getvalue()
        bucket.blob(f"{prefix}/{relative}").upload_from_string(data)


def test_pipeline_reads_gs_inputs_and_dicom_uris(gcs, tmp_path):
    from pipelines.cli import main
    from pipelines.query import connect

    local = tmp_path / "in"
    assert main(["simulate", "--out", str(local), "--patients", "6", "--devices", "2", "--hours", "1", "--seed", "7",
                 "--quiet"]) == 0
    assert main(["run", "--input", str(local), "--output", str(tmp_path / "local-out"), "--demo",
                 "--model_per_process"]) == 0
    root = f"gs://{BUCKET}/hospital"
    _upload_hospital(local, root)
    dicoms = sorted(p.name for p in (local / "dicom").rglob("*.dcm"))
    assert len(dicoms) == 2
    gcs.fail(dicoms[0], status=503, times=2)  # transient: retried, then read
    gcs.fail(dicoms[1], status=403)  # permanent: a dead letter
    lake = f"gs://{BUCKET}/lake"
    assert main(["run", "--input", root, "--output", lake, "--demo", "--model_per_process"]) == 0
    assert gcs.hits(dicoms[0]) >= 3 and gcs.hits(dicoms[1]) >= 1
    first = _download(lake, tmp_path / "gs-out")
    assert first and not [name for name in first if "_temporary" in name]  # committed, scratch gone
    # A re-run replaces each day's partition whole: the same objects, nothing added, nothing left over;
    # the same bytes but where a run's own time is written (inference latency, the SR's creation time).
    assert main(["run", "--input", root, "--output", lake, "--demo", "--model_per_process"]) == 0
    again = _download(lake, tmp_path / "gs-out-again")
    assert sorted(again) == sorted(first)
    timed = ("detections/", "structured_reports/")
    assert {k: v for k, v in again.items() if not k.startswith(timed)} == {
        k: v for k, v in first.items() if not k.startswith(timed)}
    local_db, gs_db = connect(str(tmp_path / "local-out")), connect(str(tmp_path / "gs-out"))
    for table in ("patient_twin", "device_twin", "alerts"):
        expected = local_db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        assert expected > 0 and gs_db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == expected, table
    assert gs_db.execute("SELECT count(*) FROM detections").fetchone()[0] == 1  # the X-ray read after two 503s
    local_dead = local_db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    dead = [dict(zip(("stage", "reason"), row)) for row in gs_db.execute("SELECT stage, reason FROM dead_letters").fetchall()]
    assert len(dead) == local_dead + 1
    assert [d["reason"] for d in dead if d["stage"] == "fetch_dicom"] == [
        "access denied: the store refused access to the object (HTTP 403)"]
