"""A real PACS (Orthanc, `make orthanc`) in and out: WADO-RS fetch rules, STOW-RS, the simulate -> pipeline -> SR round trip.

The hospital is simulated into Orthanc (``medtwin simulate --pacs``), the pipeline reads its images
over WADO-RS with credentials from a file reference and stores one SR per image back; every SR is
read back from the output folder and from the PACS and checked against its detections row.
"""

from __future__ import annotations

import glob
import http.server
import io
import json
import os
import pickle
import threading

import fastavro
import pyarrow.dataset as pads
import pydicom
import pytest
from pacs_fixtures import orthanc  # noqa: F401  (session fixture)
from sr_reading import findings_of

from pipelines.cli import main
from transforms.dicom_fetch import MISSING, OUTSIDE_PREFIXES, TOO_LARGE, UNREADABLE, FetchDicomFn, FetchRejected
from transforms.dicomweb import REDIRECT, UNAUTHORISED, CredentialsReference, DicomWebAccess, instance_url


def access_for(server, **kwargs) -> DicomWebAccess:
    return DicomWebAccess(base_urls=(server.dicomweb,), credentials=CredentialsReference.parse(server.credentials),
                          **kwargs)


@pytest.fixture(scope="module")
def hospital(tmp_path_factory, orthanc):  # noqa: F811
    """A small hospital simulated into the PACS and run through the pipeline (batch, DirectRunner)."""
    root = tmp_path_factory.mktemp("pacs-hospital")
    assert main(["simulate", "--out", str(root / "in"), "--patients", "10", "--devices", "2", "--hours", "2",
                 "--seed", "5", "--infected-fraction", "0.6", "--image-size", "256", "--corrupt-fraction", "0.1",
                 "--quiet", "--pacs", orthanc.dicomweb, "--pacs_credentials", orthanc.credentials]) == 0
    assert main(["run", "--input", str(root / "in"), "--output", str(root / "out"), "--demo",
                 "--pacs_url", orthanc.dicomweb, "--pacs_credentials", orthanc.credentials]) == 0
    return root


def references(root) -> list[dict]:
    records = []
    for path in sorted(glob.glob(str(root / "in" / "dicom_refs" / "date=*" / "*.avro"))):
        with open(path, "rb") as handle:
            records.extend(fastavro.reader(handle))
    return records


def table(root, name: str) -> list[dict]:
    return pads.dataset(str(root / "out" / name), format="parquet").to_table().to_pylist()


def intact_study(root) -> dict:
    lesions = json.loads((root / "in" / "truth" / "lesions.json").read_text())
    return next(r for r in references(root) if r["sop_instance_uid"] in lesions)


def test_simulate_stores_the_studies_and_points_references_at_wado_rs(hospital, orthanc):  # noqa: F811
    lesions = json.loads((hospital / "in" / "truth" / "lesions.json").read_text())
    refs = references(hospital)
    by_uid = {r["sop_instance_uid"]: r for r in refs}
    for uid, lesion in lesions.items():
        ref = by_uid[uid]
        assert ref["uri"] == instance_url(orthanc.dicomweb, ref["study_instance_uid"], ref["series_instance_uid"], uid)
    stored = json.loads(orthanc.get("/instances"))
    sr_count = len(glob.glob(str(hospital / "out" / "structured_reports" / "*.dcm")))
    # Every intact image is in the PACS, plus one SR per detections row (damaged images may be there too).
    assert len(stored) >= len(lesions) + sr_count


def test_pipeline_reads_the_pacs_and_accounts_for_every_reference(hospital):
    lesions = json.loads((hospital / "in" / "truth" / "lesions.json").read_text())
    detections = table(hospital, "detections")
    assert {row["sop_instance_uid"] for row in detections} == set(lesions)
    imaging_dead = [d for d in table(hospital, "dead_letters")
                    if d["stage"] in ("decode_dicom_refs", "fetch_dicom", "decode_dicom", "detect", "structured_report")]
    assert not [d for d in imaging_dead if d["stage"] == "structured_report"]
    assert len(detections) + sum(d["record_count"] for d in imaging_dead) == len(references(hospital))


def test_every_sr_is_in_the_folder_and_the_pacs_and_matches_its_row(hospital, orthanc):  # noqa: F811
    client = access_for(orthanc).connect()
    lesions = json.loads((hospital / "in" / "truth" / "lesions.json").read_text())
    rows = table(hospital, "detections")
    assert rows and all(row["sr_sop_instance_uid"] for row in rows)
    for row in rows:
        folder_copy = pydicom.dcmread(str(hospital / "out" / "structured_reports" / f"{row['sr_sop_instance_uid']}.dcm"))
        series_uid = folder_copy.SeriesInstanceUID
        pacs_copy = pydicom.dcmread(io.BytesIO(client.retrieve(
            instance_url(orthanc.dicomweb, row["study_instance_uid"], series_uid, row["sr_sop_instance_uid"]),
            1 << 24)))
        for sr in (folder_copy, pacs_copy):
            assert findings_of(sr) == findings_of(row), "the SR says what the row says"
            assert sr.StudyInstanceUID == row["study_instance_uid"]
        # The PACS copy files under the real patient; the folder copy holds only the pseudonym.
        assert pacs_copy.PatientID == lesions[row["sop_instance_uid"]]["patient_id"]
        assert folder_copy.PatientID == row["patient_key"] and folder_copy.PatientIdentityRemoved == "YES"
        assert str(folder_copy.PatientName) == "" and folder_copy.PatientBirthDate == ""


def test_wado_rs_fetch_rules(hospital, orthanc):  # noqa: F811
    ref = intact_study(hospital)
    uri = ref["uri"]
    client = access_for(orthanc, retries=0).connect()
    data = client.retrieve(uri, 1 << 24)
    with open(os.path.join(hospital, "in", "dicom", ref["study_instance_uid"], f"{ref['sop_instance_uid']}.dcm"),
              "rb") as handle:
        assert data == handle.read(), "WADO-RS gives back the bytes STOW-RS stored"

    def refused(uri_, max_bytes=1 << 24, using=client):
        with pytest.raises(FetchRejected) as caught:
            using.retrieve(uri_, max_bytes)
        assert uri_ not in str(caught.value) and orthanc.password not in str(caught.value)
        return caught.value.kind

    assert refused(uri, max_bytes=1000) == TOO_LARGE  # Content-Length, before reading
    assert refused(uri + "?x=1") == OUTSIDE_PREFIXES
    assert refused(uri.replace("/dicom-web/", "/dicom-web/../")) == OUTSIDE_PREFIXES
    assert refused(uri.replace("/instances/", "/instances/1.2/frames/")) == OUTSIDE_PREFIXES
    assert refused(orthanc.url + "/instances") == OUTSIDE_PREFIXES  # Orthanc's own API, not a WADO-RS URL
    assert refused(uri.replace("127.0.0.1", "localhost")) == OUTSIDE_PREFIXES  # another host name
    assert refused(uri.replace("http://", "http://medtwin:x@")) == OUTSIDE_PREFIXES
    assert refused(uri.rsplit("/", 1)[0] + "/1.2.3.4") == MISSING
    anonymous = DicomWebAccess(base_urls=(orthanc.dicomweb,), retries=0).connect()
    assert refused(uri, using=anonymous) == UNAUTHORISED


def test_redirects_are_refused_and_transient_errors_retried():
    hits = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            if len(hits) <= 2:
                self.send_response(503)
                self.send_header("Content-Length", "0")
            else:
                self.send_response(302)
                self.send_header("Location", "http://127.0.0.1:1/elsewhere")
                self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        client = DicomWebAccess(base_urls=(base,), retries=3, backoff_s=0.01).connect()
        with pytest.raises(FetchRejected) as caught:
            client.retrieve(instance_url(base, "1.2", "1.2.3", "1.2.3.4"), 1 << 20)
        assert caught.value.kind == REDIRECT and len(hits) == 3
        hits.clear()
        client = DicomWebAccess(base_urls=(base,), retries=1, backoff_s=0.01).connect()
        with pytest.raises(FetchRejected) as caught:
            client.retrieve(instance_url(base, "1.2", "1.2.3", "1.2.3.4"), 1 << 20)
        assert caught.value.kind == UNREADABLE and "HTTP 503" in str(caught.value) and len(hits) == 2
    finally:
        server.shutdown()


def test_credentials_stay_out_of_the_graph_and_the_logs(orthanc, tmp_path, monkeypatch):  # noqa: F811
    access = access_for(orthanc)
    fetch = FetchDicomFn((str(tmp_path),), 1 << 20, access)
    assert orthanc.password.encode() not in pickle.dumps(fetch), "only the reference is in the graph"
    fetch.setup()
    assert orthanc.password not in repr(fetch._wado)
    with pytest.raises(TypeError):
        pickle.dumps(fetch._wado)
    monkeypatch.setenv("MEDTWIN_TEST_PACS", "no-colon")
    with pytest.raises(Exception) as caught:
        DicomWebAccess(base_urls=(orthanc.dicomweb,), credentials=CredentialsReference("env", "MEDTWIN_TEST_PACS")
                       ).connect()
    assert "no-colon" not in str(caught.value)
