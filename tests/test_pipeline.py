"""The whole `medtwin run` on a small simulated hospital with damaged records: nothing is lost.

Accounting, per stream, on the Parquet the job wrote:
  wearable samples in = samples in final patient_twin rows + duplicates removed + dead-lettered samples
  device log events in = events in final device_twin rows + duplicates removed + dead-lettered events
  DICOM references in = detections rows + dead-lettered references (decode, fetch, decode image, detect)
"""

import csv
import io
import json

import orjson
import pytest

from pipelines.cli import main
from pipelines.query import connect
from schemas import WEARABLE_UPLOAD, SchemaError
from schemas.contract import from_json, from_json_fields, validate_fields
from schemas.inputs import VITAL_SAMPLE
from transforms.decode import UnreadableInput
from transforms.sources import landed_records


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    root = tmp_path_factory.mktemp("hospital")
    assert main(["simulate", "--out", str(root / "in"), "--patients", "6", "--devices", "2", "--hours", "1",
                 "--seed", "12", "--corrupt-fraction", "0.03"]) == 0
    assert main(["run", "--input", str(root / "in"), "--output", str(root / "out"), "--demo"]) == 0
    return root


@pytest.fixture(scope="module")
def streamed(hospital, job_endpoints):
    """The same landed files replayed as a stream, on the session's Prism: its output folder.

    (The DirectRunner's streaming replay of this hospital took 95-130 s of the suite; the runner
    matrix, tests/test_runners.py, still runs the DirectRunner in streaming.)"""
    # One model per process: this process already ran the batch job, and acquiring its shared
    # (MultiProcessShared) model again from another job's threads was seen to hang.
    out = hospital / "out-streaming"
    assert main(["run", "--input", str(hospital / "in"), "--output", str(out), "--demo", "--streaming",
                 "--model_per_process", "--runner", "prism", f"--job_endpoint={job_endpoints['prism']}"]) == 0
    return out


def _upload(record):
    """A landed wearables record's parsed upload, or None when it cannot be read or parsed."""
    if isinstance(record.payload, UnreadableInput):
        return None
    try:
        return orjson.loads(record.payload) if isinstance(record.payload, bytes) else record.payload
    except orjson.JSONDecodeError:
        return None


def _samples_in(record) -> int:
    """Samples an upload carried; an upload that cannot be parsed counts as one record."""
    upload = _upload(record)
    samples = upload.get("samples") if isinstance(upload, dict) else None
    return max(len(samples), 1) if isinstance(samples, list) else 1


def _scalar(connection, sql):
    return connection.execute(sql).fetchone()[0]


WEARABLE_DEAD_LETTER_STAGES = ("decode_wearables", "window_wearables")


def _wearable_counts(connection, stages=WEARABLE_DEAD_LETTER_STAGES) -> tuple[int, int, int]:
    """(samples in final patient_twin rows, duplicates they removed, samples dead-lettered at `stages`)."""
    stage_list = ", ".join(f"'{stage}'" for stage in stages)
    return (_scalar(connection, "select sum(sample_count) from patient_twin where is_final"),
            _scalar(connection, "select sum(duplicates_removed) from patient_twin where is_final"),
            _scalar(connection, f"select coalesce(sum(record_count), 0) from dead_letters where stage in ({stage_list})"))


def _doubled_final_windows(connection, table: str, key: str) -> int:
    """How many (subject, window) of `table` have more than one final row."""
    return _scalar(connection, f"select count(*) from (select {key}, window_start from {table} where is_final "
                               f"group by all having count(*) > 1)")


def _distinct_valid_samples(records) -> set:
    """(wearable, event time) of every sample a correct decoder keeps, worked out independently of
    it: valid upload header, valid sample, one per wearable and time."""
    kept = set()
    for record in records:
        upload = _upload(record)
        try:
            header = from_json(WEARABLE_UPLOAD, {**upload, "samples": []})
            samples = upload["samples"]
        except (SchemaError, TypeError, KeyError):
            continue
        for sample in samples if isinstance(samples, list) else ():
            try:
                parsed = from_json_fields(VITAL_SAMPLE, sample, "sample")
                validate_fields(VITAL_SAMPLE, parsed, "sample")
            except SchemaError:
                continue
            kept.add((header["device_id"], parsed["event_time"]))
    return kept


@pytest.mark.parametrize("mode", ["batch", "streaming"])
def test_every_wearable_sample_is_counted_removed_as_duplicate_or_dead_lettered(hospital, streamed, mode):
    records = landed_records(str(hospital / "in"), "wearables")
    samples_in = sum(_samples_in(r) for r in records)
    connection = connect(str(hospital / "out" if mode == "batch" else streamed))
    counted, duplicates, dead = _wearable_counts(connection)
    too_late = _scalar(connection, "select coalesce(sum(record_count), 0) from dead_letters "
                                   "where stage = 'window_wearables'")
    assert dead > 0 and duplicates > 0
    assert samples_in == counted + duplicates + dead
    # Not only do the counts add up: every valid sample is counted once, none twice, none lost
    # (a too-late retry may repeat a sample counted on time, so streaming is a bound).
    distinct = len(_distinct_valid_samples(records))
    assert counted == distinct if mode == "batch" else counted <= distinct <= counted + too_late
    manifest = json.loads((hospital / "in" / "truth" / "manifest.json").read_text())
    if mode == "streaming":
        assert (too_late > 0) == any(u["beyond_allowed_lateness"] for u in manifest["late_uploads"])
    else:
        assert too_late == 0  # a batch job sees every upload that landed, however late


def _too_late_subjects(connection, stage: str, key: str) -> set:
    payloads = connection.execute(f"select payload from dead_letters where stage = '{stage}'").fetchall()
    return {json.loads(payload)[key] for (payload,) in payloads}


def _final_rows(connection, table: str, key: str, leave_out: set) -> list:
    columns = [name for (name,) in connection.execute(
        f"select column_name from (describe {table}) where column_name not in ('pane_index', 'pane_timing')"
    ).fetchall()]
    rows = connection.execute(f"select {', '.join(columns)} from {table} where is_final").fetchall()
    return sorted((row for row in rows if row[columns.index(key)] not in leave_out), key=repr)


def test_batch_and_streaming_agree_on_every_final_row_no_too_late_record_touched(hospital, streamed):
    # Streaming dead-letters what comes after the allowed lateness; batch counts everything that
    # landed. Patients and devices that no such record touched must get the same final rows.
    batch, stream = connect(str(hospital / "out")), connect(str(streamed))
    for table, key, stage in (("patient_twin", "patient_key", "window_wearables"),
                              ("device_twin", "device_id", "window_device_logs")):
        touched = _too_late_subjects(stream, stage, key)
        batch_rows = _final_rows(batch, table, key, touched)
        assert batch_rows, f"every subject of {table} was touched by too-late data: nothing compared"
        assert batch_rows == _final_rows(stream, table, key, touched), table


def test_every_device_event_is_in_a_window_or_dead_lettered(hospital):
    events_in = len(landed_records(str(hospital / "in"), "device_logs"))
    connection = connect(str(hospital / "out"))
    counted = _scalar(connection, "select sum(event_count) from device_twin where is_final")
    duplicates = _scalar(connection, "select sum(duplicates_removed) from device_twin where is_final")
    dead = _scalar(connection, "select sum(record_count) from dead_letters "
                               "where stage in ('decode_device_logs', 'window_device_logs')")
    assert events_in == counted + duplicates + dead


def test_every_dicom_reference_is_a_detection_or_dead_lettered(hospital):
    references_in = len(landed_records(str(hospital / "in"), "dicom_refs"))
    connection = connect(str(hospital / "out"))
    detections = _scalar(connection, "select count(*) from detections")
    flags = connection.execute("select distinct quality_flag from detections").fetchall()
    dead = _scalar(connection, "select sum(record_count) from dead_letters where stage in "
                               "('decode_dicom_refs', 'fetch_dicom', 'decode_dicom', 'detect')")
    assert detections > 0 and flags
    assert references_in == detections + dead


def test_a_streaming_replay_loses_no_dicom_reference(hospital, streamed):
    # A partial inference batch held for a flush timer would be dropped at the end of a replay.
    references_in = len(landed_records(str(hospital / "in"), "dicom_refs"))
    connection = connect(str(streamed))
    detections = _scalar(connection, "select count(*) from detections")
    dead = _scalar(connection, "select sum(record_count) from dead_letters where stage in "
                               "('decode_dicom_refs', 'fetch_dicom', 'decode_dicom', 'detect')")
    assert detections == _scalar(connect(str(hospital / "out")), "select count(*) from detections")
    assert references_in == detections + dead


def test_every_damaged_record_the_simulator_made_is_a_dead_letter(hospital):
    damaged = json.loads((hospital / "in" / "truth" / "corruption.json").read_text())["records"]
    connection = connect(str(hospital / "out"))
    sources = {row[0] for row in connection.execute("select source from dead_letters").fetchall()}
    assert damaged and {record["source"] for record in damaged} <= sources


def test_no_protected_health_information_in_any_table(hospital):
    patients = json.loads((hospital / "in" / "truth" / "patients.json").read_text()).values()
    identifiers = [value for p in patients for key, value in p["identity"].items() if key != "sex"]
    identifiers += [p["identity"]["name"].replace("^", " ") for p in patients]
    connection = connect(str(hospital / "out"))
    for table in ("patient_twin", "device_twin", "detections", "alerts", "dead_letters"):
        text = json.dumps(connection.execute(f"select * from {table}").fetchall(), default=str)
        assert not [identifier for identifier in identifiers if identifier in text], table


def test_query_prints_csv_an_analyst_can_read_back(hospital, capsys):
    sql = "select kind, count(*) as alerts from alerts group by kind order by kind"
    expected = connect(str(hospital / "out")).execute(sql).fetchall()
    assert expected
    for argv in ([str(hospital / "out"), sql, "--csv"], [str(hospital / "out"), "--csv", sql]):
        assert main(["query", *argv]) == 0
        printed = list(csv.reader(io.StringIO(capsys.readouterr().out)))
        assert printed == [["kind", "alerts"], *[[kind, str(count)] for kind, count in expected]]
