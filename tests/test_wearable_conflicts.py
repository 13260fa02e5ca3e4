"""One wearable's samples under two patient ids: both twins keep them, and one alert per window says so.

A simulated hospital gets one upload copied under another patient's id (a new upload id: not a retry).
Batch on the DirectRunner and streaming on Prism must agree: a ``wearable_conflict`` alert for each
window the copied samples fall in, naming the wearable by a keyed pseudonym (never its serial) and
both patients by their keys; every sample still counted (records in = twin samples + duplicates +
dead letters), the copied ones under each patient.
"""

import datetime as dt
import json

import orjson
import pytest

from pipelines.cli import main
from pipelines.query import connect
from transforms.pseudonymise import DEMO_KEY, Pseudonymiser
from transforms.sources import landed_records
from transforms.wearable_conflicts import KIND

import test_pipeline as accounting  # its counting helpers, as a module: none of its fixtures come along

WINDOW_S = 60  # the default --window


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    """(input folder, the copied upload, the other patient's id)."""
    root = tmp_path_factory.mktemp("conflict") / "in"
    assert main(["simulate", "--out", str(root), "--patients", "3", "--devices", "1", "--hours", "1",
                 "--seed", "5", "--corrupt-fraction", "0"]) == 0
    path = sorted((root / "wearables").rglob("*.jsonl"))[0]
    lines = path.read_text().splitlines()
    uploads = [orjson.loads(line) for line in lines]
    first = uploads[len(uploads) // 2]
    other = next(u["patient_id"] for u in uploads if u["patient_id"] != first["patient_id"])
    copied = {**first, "patient_id": other, "upload_id": first["upload_id"] + "-copy"}
    path.write_text("".join(line + "\n" for line in lines) + orjson.dumps(copied).decode() + "\n")
    return root, first, other


@pytest.fixture(scope="module")
def outputs(hospital, tmp_path_factory, job_endpoints):
    root = tmp_path_factory.mktemp("conflict-out")
    common = ["--input", str(hospital[0]), "--demo", "--no_imaging"]
    assert main(["run", *common, "--output", str(root / "batch")]) == 0
    assert main(["run", *common, "--output", str(root / "prism"), "--streaming", "--runner", "prism",
                 f"--job_endpoint={job_endpoints['prism']}"]) == 0
    return {"batch": root / "batch", "prism": root / "prism"}


def _windows(upload) -> set:
    times = [dt.datetime.fromisoformat(s["event_time"].replace("Z", "+00:00")) for s in upload["samples"]]
    return {dt.datetime.fromtimestamp(t.timestamp() // WINDOW_S * WINDOW_S, dt.timezone.utc) for t in times}


@pytest.mark.parametrize("run", ["batch", "prism"])
def test_each_window_of_the_copied_samples_raises_one_conflict_alert(hospital, outputs, run):
    _, upload, other = hospital
    keys = Pseudonymiser(DEMO_KEY)
    rows = connect(str(outputs[run])).execute(
        "select subject_type, subject_id, onset_time, evidence from alerts where kind = ? order by onset_time",
        [KIND]).fetchall()
    assert {row[2].astimezone(dt.timezone.utc) for row in rows} == _windows(upload)
    assert len(rows) == len(_windows(upload))  # once each, whatever the panes
    wearable = keys.patient_key("wearable\x1f" + upload["device_id"])
    assert {(row[0], row[1]) for row in rows} == {("device", wearable)}
    patients = sorted([keys.patient_key(upload["patient_id"]), keys.patient_key(other)])
    assert all(json.loads(row[3])["patient_keys"] == patients for row in rows)


@pytest.mark.parametrize("run", ["batch", "prism"])
def test_both_patients_keep_the_samples_and_the_accounting_holds(hospital, outputs, run):
    root, upload, other = hospital
    records = landed_records(str(root), "wearables")
    connection = connect(str(outputs[run]))
    counted, duplicates, dead = accounting._wearable_counts(connection)
    assert sum(accounting._samples_in(r) for r in records) == counted + duplicates + dead
    # Per patient the copy is new data, not a duplicate: counted once more than (wearable, time) pairs.
    assert counted == len(accounting._distinct_valid_samples(records)) + len(upload["samples"])


def test_no_wearable_serial_reaches_any_table(hospital, outputs):
    serial = hospital[1]["device_id"]
    for run in outputs.values():
        for path in run.rglob("*.parquet"):
            assert serial.encode() not in path.read_bytes(), path
