"""The hospital simulator: same seed same bytes, records that fit the contract unless listed as
damaged, believable physiology and devices, and DICOM files that read back."""

import argparse
import collections
import datetime as dt
import io
import os
import time
import warnings

import fastavro
import numpy as np
import orjson
import pydicom
import pytest
from pydicom.errors import InvalidDicomError

from schemas import INPUT_STREAMS, SchemaError, avro_schema, from_json, validate
from simulator import DEFAULT_START, simulate
from simulator.cli import add_parser
from simulator.corrupt import IMAGE_KINDS, KINDS, damage_record, write_damaged_image
from simulator.dicom import PatientIdentity, StudyInfo
from simulator.patients import make_patient, simulate_vitals
from transforms.news2 import score_news2
from transforms.sources import records_in_file

SMALL = dict(patients=6, devices=3, hours=3.0, image_size=128, corrupt_fraction=0.1, progress=False)
SEED = 11
STREAM_DIRS = ("wearables", "observations", "device_logs", "dicom_refs", "truth", "dicom")
UTC = dt.timezone.utc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four simulations: seed 11 damaged twice (into the same path, the first moved aside), seed 12
    damaged, and seed 11 undamaged."""
    base = tmp_path_factory.mktemp("hospital")
    began = time.perf_counter()
    simulate(base / "run", seed=SEED, **SMALL)
    print(f"\nsimulate({SMALL}) took {time.perf_counter() - began:.2f} s")
    (base / "run").rename(base / "first")
    simulate(base / "run", seed=SEED, **SMALL)
    simulate(base / "other", seed=SEED + 1, **SMALL)
    simulate(base / "clean", seed=SEED, **(SMALL | {"corrupt_fraction": 0.0}))
    return {name: base / name for name in ("run", "first", "other", "clean")}


@pytest.fixture(scope="module")
def run(runs):
    """The damaged simulation."""
    return runs["run"]


@pytest.fixture(scope="module")
def clean(runs):
    """The same hospital undamaged."""
    return runs["clean"]


def _truth(root, name):
    return orjson.loads((root / "truth" / f"{name}.json").read_bytes())


def _files(root, folder):
    return sorted(p.relative_to(root).as_posix() for p in (root / folder).rglob("*") if p.is_file())


def _records(root, stream):
    """RawRecords of one stream read the way the pipeline reads them (source, payload, arrival)."""
    records = []
    for relative in _files(root, stream):
        records += records_in_file(str(root / relative), (root / relative).read_bytes(), str(root))
    return records


def _damaged(root):
    return {entry["source"]: entry for entry in _truth(root, "corruption")["records"]}


def _valid(root, stream):
    """The undamaged records of a stream, decoded and checked by the contract."""
    damaged = _damaged(root)
    out = []
    for raw in _records(root, stream):
        if raw.source in damaged:
            continue
        payload = orjson.loads(raw.payload) if isinstance(raw.payload, bytes) else raw.payload
        out.append(from_json(INPUT_STREAMS[stream], payload))
    return out


def _parse(ts):
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_the_same_bytes(runs):
    for folder in STREAM_DIRS:
        names = _files(runs["run"], folder)
        assert names and names == _files(runs["first"], folder), folder
        for name in names:
            assert (runs["run"] / name).read_bytes() == (runs["first"] / name).read_bytes(), name


def test_another_seed_gives_other_data(runs):
    assert _truth(runs["run"], "patients").keys() != _truth(runs["other"], "patients").keys()
    ours = b"".join((runs["run"] / n).read_bytes() for n in _files(runs["run"], "device_logs"))
    theirs = b"".join((runs["other"] / n).read_bytes() for n in _files(runs["other"], "device_logs"))
    assert ours != theirs


def test_patient_data_do_not_depend_on_the_devices(tmp_path):
    small = dict(patients=2, hours=1.0, seed=3, image_size=64, infected_fraction=0.0, progress=False)
    simulate(tmp_path / "one", devices=1, **small)
    simulate(tmp_path / "three", devices=3, **small)
    for folder in ("wearables", "observations"):
        assert _files(tmp_path / "one", folder) == _files(tmp_path / "three", folder)
        for name in _files(tmp_path / "one", folder):
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes()


# ---------------------------------------------------------------- contract and damage


@pytest.mark.parametrize("stream", sorted(INPUT_STREAMS))
def test_records_fit_the_contract_unless_listed_as_damaged(run, stream):
    damaged = _damaged(run)
    seen = set()
    for raw in _records(run, stream):
        entry = damaged.get(raw.source)
        if entry is None or entry["kind"] in IMAGE_KINDS:  # a damaged image has a valid reference
            payload = orjson.loads(raw.payload) if isinstance(raw.payload, bytes) else raw.payload
            validate(INPUT_STREAMS[stream], from_json(INPUT_STREAMS[stream], payload))
        else:
            with pytest.raises((orjson.JSONDecodeError, SchemaError)):
                payload = orjson.loads(raw.payload) if isinstance(raw.payload, bytes) else raw.payload
                from_json(INPUT_STREAMS[stream], payload)
        seen.add(raw.source)
    listed = {source for source, entry in damaged.items() if entry["stream"] == stream}
    assert listed <= seen
    manifest = _truth(run, "manifest")["streams"][stream]
    assert manifest["records"] == len(seen) and manifest["corrupted"] == len(listed)
    assert len(listed) == max(1, round(SMALL["corrupt_fraction"] * len(seen)))


@pytest.mark.parametrize("stream", sorted(INPUT_STREAMS))
def test_damage_touches_exactly_the_listed_records(run, clean, stream):
    damaged = _damaged(run)
    ours, intact = _records(run, stream), _records(clean, stream)
    assert [r.source for r in ours] == [r.source for r in intact]
    for raw, original in zip(ours, intact):
        payload, expected = raw.payload, original.payload
        if stream == "dicom_refs":  # the uri names the run's own folder
            payload, expected = dict(payload, uri=None), dict(expected, uri=None)
        kind = damaged.get(raw.source, {}).get("kind")
        assert (payload != expected) == (kind is not None and kind not in set(IMAGE_KINDS) - {"wrong_modality"})


@pytest.mark.parametrize("stream", ["device_logs", "dicom_refs"])
def test_avro_files_carry_the_contract_schema_and_round_trip(run, stream):
    schema = fastavro.parse_schema(avro_schema(INPUT_STREAMS[stream]))
    for name in _files(run, stream):
        with open(run / name, "rb") as handle:
            reader = fastavro.reader(handle)
            assert fastavro.parse_schema(reader.writer_schema) == schema
            records = list(reader)
        buffer = io.BytesIO()
        fastavro.writer(buffer, schema, records)
        buffer.seek(0)
        assert list(fastavro.reader(buffer)) == records


@pytest.mark.parametrize("stream, kind", [(s, k) for s, kinds in KINDS.items() for k in kinds
                                          if k not in IMAGE_KINDS])
def test_every_kind_of_record_damage_breaks_the_contract(clean, stream, kind):
    raw = _records(clean, stream)[0]
    original = orjson.loads(raw.payload) if isinstance(raw.payload, bytes) else raw.payload
    before = orjson.dumps(original, option=orjson.OPT_PASSTHROUGH_DATETIME, default=str)
    for seed in range(5):
        damaged, detail = damage_record(stream, original, kind, np.random.default_rng(seed))
        with pytest.raises((orjson.JSONDecodeError, SchemaError)):
            from_json(INPUT_STREAMS[stream], orjson.loads(damaged) if isinstance(damaged, bytes) else damaged)
        if stream == "wearables":
            expected = 1 if kind in ("wrong_type", "out_of_range", "unknown_enum") else len(original["samples"])
            assert detail["samples_affected"] == expected
    assert orjson.dumps(original, option=orjson.OPT_PASSTHROUGH_DATETIME, default=str) == before


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_every_kind_of_image_damage_is_unreadable_or_not_a_radiograph(clean, tmp_path, kind):
    sop, lesion = next(iter(_truth(clean, "lesions").items()))
    intact = (clean / lesion["path"]).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(intact))
    patient = PatientIdentity(ds.PatientID, str(ds.PatientName), ds.PatientBirthDate, ds.PatientSex,
                              ds.PatientAddress)
    study = StudyInfo(ds.StudyInstanceUID, ds.SeriesInstanceUID, sop, _parse(lesion["acquisition_time"]),
                      lesion["device_id"], ds.Modality, ds.Manufacturer, ds.ManufacturerModelName,
                      ds.InstitutionName, ds.StationName, ds.AccessionNumber, str(ds.ReferringPhysicianName))
    path = str(tmp_path / "image.dcm")
    write_damaged_image(path, kind, np.random.default_rng(0), dicom_bytes=intact, preview=ds.pixel_array,
                        patient=patient, study=study)
    _assert_image_damage(path, kind)


def _assert_image_damage(path, kind):
    if kind == "missing_file":
        assert not os.path.exists(path)
    elif kind == "not_dicom":
        with pytest.raises(InvalidDicomError):
            pydicom.dcmread(path)
    elif kind == "truncated_dicom":
        with warnings.catch_warnings(), pytest.raises(Exception):
            warnings.simplefilter("ignore")
            pydicom.dcmread(path).pixel_array
    else:
        ds = pydicom.dcmread(path)
        assert ds.Modality == "CT" and ds.pixel_array.shape == (64, 64)


def test_damaged_images_in_the_run_are_as_listed(run):
    entries = [e for e in _truth(run, "corruption")["records"] if e["stream"] == "dicom_refs"]
    assert entries
    for entry in entries:
        if entry["kind"] in IMAGE_KINDS:
            _assert_image_damage(entry["uri"], entry["kind"])
        assert entry["record_id"] not in _truth(run, "lesions")


# ---------------------------------------------------------------- layout


@pytest.mark.parametrize("stream", sorted(INPUT_STREAMS))
def test_records_land_in_their_arrival_hour_in_arrival_order(run, stream):
    damaged = _damaged(run)
    end = DEFAULT_START + dt.timedelta(hours=SMALL["hours"])
    by_file = collections.defaultdict(list)
    for raw in _records(run, stream):
        if raw.source in damaged:
            continue
        record = orjson.loads(raw.payload) if isinstance(raw.payload, bytes) else raw.payload
        # Arrival: upload_time for uploads; others arrive seconds to minutes after they happen.
        when = record.get("upload_time") or record.get("event_time") or record["acquisition_time"]
        when = _parse(when) if isinstance(when, str) else when
        hour = raw.arrival_time  # the start of the file's hour
        slack = dt.timedelta(minutes=16 if stream != "wearables" else 0)
        assert hour - slack <= when < hour + dt.timedelta(hours=1), raw.source
        assert DEFAULT_START <= when <= end
        by_file[raw.source.rsplit(":" if stream in ("wearables", "observations") else "#", 1)[0]].append(when)
    if stream == "wearables":
        assert all(times == sorted(times) for times in by_file.values())


def test_streams_carry_no_patient_identity_but_the_id(clean):
    identities = [p["identity"] for p in _truth(clean, "patients").values()]
    streams = b"".join((clean / name).read_bytes() for stream in INPUT_STREAMS for name in _files(clean, stream))
    for identity in identities:
        for field in ("name", "address"):
            assert identity[field].encode() not in streams
        assert identity["patient_id"].encode() in streams


# ---------------------------------------------------------------- patients


def test_infected_patients_end_hotter_faster_breathing_and_less_saturated(clean):
    patients = _truth(clean, "patients")
    end = DEFAULT_START + dt.timedelta(hours=SMALL["hours"])
    last = collections.defaultdict(list)
    for upload in _valid(clean, "wearables"):
        last[upload["patient_id"]] += [s for s in upload["samples"]
                                       if s["event_time"] >= end - dt.timedelta(minutes=20)]
    means = {pid: {v: np.nanmean([s.get(v) if s.get(v) is not None else np.nan for s in samples])
                   for v in ("temperature_c", "respiratory_rate", "spo2", "heart_rate")}
             for pid, samples in last.items() if samples}
    infected = [pid for pid, p in patients.items() if p["infected"] and _parse(p["full_effect"]) < end and pid in means]
    healthy = [pid for pid, p in patients.items() if not p["infected"] and pid in means]
    assert infected and healthy
    for pid in infected:
        assert means[pid]["temperature_c"] > 38.2 > max(means[h]["temperature_c"] for h in healthy)
        assert means[pid]["respiratory_rate"] > 21 > max(means[h]["respiratory_rate"] for h in healthy)
        assert means[pid]["spo2"] < 93 < min(means[h]["spo2"] for h in healthy)
        assert means[pid]["heart_rate"] > np.mean([means[h]["heart_rate"] for h in healthy])


def test_severe_patients_reach_news2_of_seven_and_healthy_ones_stay_low(clean):
    patients = _truth(clean, "patients")
    end = DEFAULT_START + dt.timedelta(hours=SMALL["hours"])
    samples = collections.defaultdict(list)
    for upload in _valid(clean, "wearables"):
        samples[upload["patient_id"]] += [s for s in upload["samples"]
                                          if s["event_time"] >= end - dt.timedelta(minutes=15)]
    scores = {}
    for pid, recent in samples.items():
        readings = {v: [s[v] for s in recent if s.get(v) is not None]
                    for v in ("respiratory_rate", "spo2", "systolic_bp", "heart_rate", "temperature_c")}
        median = {v: float(np.median(values)) if values else None for v, values in readings.items()}
        scores[pid] = score_news2(**median, consciousness=None, supplemental_oxygen=None).score
    severe = [pid for pid, p in patients.items()
              if p["severe"] and _parse(p["full_effect"]) < end - dt.timedelta(minutes=15) and pid in scores]
    assert severe
    assert all(scores[pid] >= 7 for pid in severe)
    assert all(scores[pid] <= 4 for pid, p in patients.items() if not p["infected"] and pid in scores)


def test_nurses_give_oxygen_once_saturation_falls(clean):
    patients = _truth(clean, "patients")
    observations = _valid(clean, "observations")
    assert observations
    for observation in observations:
        patient = patients[observation["patient_id"]]
        if not patient["infected"] and observation["supplemental_oxygen"] is not None:
            assert observation["supplemental_oxygen"] is False
    severe_on_oxygen = [o for o in observations if patients[o["patient_id"]]["severe"] and o["supplemental_oxygen"]]
    assert severe_on_oxygen


def test_heart_rate_dips_at_night_while_asleep():
    start = dt.datetime(2026, 3, 2, 0, 0, tzinfo=UTC)
    patient = make_patient(5, np.random.default_rng(1), seed=1, start=start, hours=24, infected=False, severe=False)
    series = simulate_vitals(patient, np.random.default_rng(2), start=start, hours=24, sample_seconds=10)
    hour = series.seconds / 3600
    night, afternoon = (hour >= 2) & (hour < 5), (hour >= 14) & (hour < 17)
    heart_rate = series.vitals[:, 0]
    assert np.nanmean(heart_rate[night]) < np.nanmean(heart_rate[afternoon]) - 5
    stages = collections.Counter(series.sleep_stages[night].tolist())
    assert stages[2] > 0 and stages[3] > 0  # deep and REM sleep at night
    assert set(series.sleep_stages[afternoon].tolist()) == {0}
    assert series.steps[afternoon].sum() > 10 * series.steps[night].sum()


def test_retried_and_late_uploads_are_as_the_manifest_says(clean):
    manifest = _truth(clean, "manifest")
    damaged = _damaged(clean)
    copies = collections.Counter()
    uploads = {}
    for raw in _records(clean, "wearables"):
        if raw.source in damaged:
            copies[damaged[raw.source]["record_id"]] += 1
            continue
        upload = from_json(INPUT_STREAMS["wearables"], orjson.loads(raw.payload))
        copies[upload["upload_id"]] += 1
        uploads.setdefault(upload["upload_id"], []).append(upload)
    retried = {d["upload_id"]: d for d in manifest["duplicate_uploads"]}
    assert retried and {uid for uid, n in copies.items() if n == 2} == set(retried)
    assert max(copies.values()) == 2
    for uid, same in uploads.items():
        if len(same) == 2:
            assert same[0]["samples"] == same[1]["samples"] and len(same[0]["samples"]) == retried[uid]["samples"]
            assert same[1]["upload_time"] > same[0]["upload_time"]

    late = {entry["upload_id"]: entry for entry in manifest["late_uploads"]}
    assert any(e["beyond_allowed_lateness"] for e in late.values())
    assert any(not e["beyond_allowed_lateness"] for e in late.values())
    for uid, same in uploads.items():
        lateness = (same[0]["upload_time"] - min(s["event_time"] for s in same[0]["samples"])).total_seconds()
        if uid in late:
            assert lateness == pytest.approx(late[uid]["lateness_seconds"], abs=1e-3)
            assert late[uid]["beyond_allowed_lateness"] == (lateness > manifest["allowed_lateness_seconds"])
        else:
            assert lateness < 15 * 60


# ---------------------------------------------------------------- devices


def _device_events(run):
    events = collections.defaultdict(list)
    for event in _valid(run, "device_logs"):
        events[event["device_id"]].append(event)
    return events


def test_failing_devices_run_hot_and_err_then_fall_silent(clean):
    truth = _truth(clean, "device_failures")
    events = _device_events(clean)
    end = DEFAULT_START + dt.timedelta(hours=SMALL["hours"])
    assert truth["failures"]
    for failure in truth["failures"]:
        begin, failed = _parse(failure["precursor_start"]), _parse(failure["failure_time"])
        back = _parse(failure["recovery_time"]) if failure["recovery_time"] else end
        assert dt.timedelta(minutes=30) <= failed - begin <= dt.timedelta(minutes=90)
        mine = events[failure["device_id"]]
        run_up = [e for e in mine if begin <= e["event_time"] < failed]
        errors = [e for e in run_up if e["severity"] in ("error", "critical")]
        assert len(errors) >= 5 and any(e["severity"] == "critical" for e in errors)
        assert {e["code"] for e in errors} & set(failure["precursor_codes"])
        assert max(e["tube_temperature_c"] for e in run_up if e["tube_temperature_c"] is not None) > 65
        beats = [e["event_time"] for e in mine if e["kind"] == "heartbeat"]
        last_quarter_hour = [t for t in beats if failed - dt.timedelta(minutes=15) <= t < failed]
        assert len(last_quarter_hour) < 27  # a heartbeat every 30 s would be 30
        offline = [e for e in mine if e["status"] == "offline"]
        assert len(offline) == 1 and offline[0]["event_time"] == failed
        # Down: only the engineer's arrival and the repair are logged until the device is back.
        silent = [e for e in mine if failed < e["event_time"] < back]
        assert all(e["code"] in ("CM-START", "CM") for e in silent)
        assert not [t for t in beats if failed <= t < back]


def test_healthy_devices_stay_cool_and_mostly_quiet(clean):
    truth = _truth(clean, "device_failures")
    failing = {f["device_id"] for f in truth["failures"]}
    healthy = {d: e for d, e in _device_events(clean).items() if d not in failing}
    assert healthy
    for device, mine in healthy.items():
        temperatures = [e["tube_temperature_c"] for e in mine if e["tube_temperature_c"] is not None]
        assert 33 <= min(temperatures) and max(temperatures) <= 56, device
        errors = [e for e in mine if e["severity"] in ("error", "critical")]
        assert len(errors) <= 3 * SMALL["hours"], device
        serviced = sum((_parse(m["end"]) - _parse(m["begin"])).total_seconds()
                       for m in truth["preventive_maintenance"] if m["device_id"] == device)
        beats = [e for e in mine if e["kind"] == "heartbeat"]
        assert len(beats) >= (SMALL["hours"] * 3600 - serviced) / 30 - 2


def test_devices_state_their_maintenance_history(clean):
    truth = _truth(clean, "device_failures")
    overdue = {d["device_id"] for d in truth["maintenance_overdue"]}
    for device, mine in _device_events(clean).items():
        reports = [e for e in mine if e["code"] in ("PM-OK", "PM-OVERDUE")]
        assert reports, device
        assert (reports[0]["code"] == "PM-OVERDUE") == (device in overdue)
        last = next(d["last_maintenance"] for d in truth["devices"] if d["device_id"] == device)
        assert last in reports[0]["message"]


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("name", ["clean", "other"])
def test_dicom_files_decode_and_lesion_boxes_lie_inside(runs, name):
    lesions = _truth(runs[name], "lesions")
    references = {r["sop_instance_uid"]: r for r in _valid(runs[name], "dicom_refs")}
    assert lesions and set(lesions) <= set(references)
    for sop, lesion in lesions.items():
        ds = pydicom.dcmread(references[sop]["uri"])
        pixels = ds.pixel_array
        assert pixels.shape == (lesion["rows"], lesion["columns"]) == (SMALL["image_size"], ds.Columns)
        assert (ds.SOPInstanceUID, ds.PatientID, ds.Modality) == (sop, lesion["patient_id"], lesion["modality"])
        assert ds.Modality in ("CR", "DX") and ds.BitsStored == lesion["bits_stored"]
        assert references[sop]["acquisition_time"] < _parse(lesion["acquisition_time"]) + dt.timedelta(seconds=1)
        assert bool(lesion["boxes"]) == lesion["infected"]
        for x1, y1, x2, y2 in lesion["boxes"]:
            assert 0 <= x1 < x2 <= ds.Columns and 0 <= y1 < y2 <= ds.Rows


def test_both_infected_and_healthy_patients_are_imaged(runs):
    lesions = [lesion for name in ("clean", "other") for lesion in _truth(runs[name], "lesions").values()]
    assert {lesion["infected"] for lesion in lesions} == {True, False}


# ---------------------------------------------------------------- size


def test_a_fifty_patient_day_shift_is_quick_and_summarised_truthfully(tmp_path):
    began = time.perf_counter()
    summary = simulate(tmp_path / "h", patients=50, devices=4, hours=6, seed=7, progress=False)
    print(f"\nsimulate(patients=50, devices=4, hours=6, seed=7) took {time.perf_counter() - began:.1f} s")
    manifest = _truth(tmp_path / "h", "manifest")
    assert summary.uploads == manifest["streams"]["wearables"]["records"]
    assert summary.samples == manifest["streams"]["wearables"]["samples"]
    assert summary.device_events == manifest["streams"]["device_logs"]["records"]
    assert summary.studies == manifest["studies"]["total"] == len(_files(tmp_path / "h", "dicom"))
    assert (summary.duplicate_uploads, summary.late_uploads) == (len(manifest["duplicate_uploads"]),
                                                                 len(manifest["late_uploads"]))
    assert summary.infected == round(0.3 * 50) and summary.failing_devices >= 1


# ---------------------------------------------------------------- command line


def test_cli_simulates_and_refuses_a_directory_in_use(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    argv = ["simulate", "--out", str(tmp_path / "h"), "--patients", "2", "--devices", "1", "--hours", "0.5",
            "--image-size", "64", "--start", "2026-03-02T10:00:00+01:00", "--quiet"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert "2 (" in capsys.readouterr().out
    assert _truth(tmp_path / "h", "manifest")["period"]["start"] == "2026-03-02T09:00:00.000000Z"
    args = parser.parse_args(argv)
    assert args.func(args) == 2
    assert "is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [dict(hours=0), dict(patients=0), dict(corrupt_fraction=1.5),
                                 dict(sample_seconds=120), dict(image_size=32)])
def test_impossible_arguments_are_refused(tmp_path, bad):
    arguments = dict(patients=1, devices=1, hours=1.0, seed=1, progress=False) | bad
    with pytest.raises(ValueError):
        simulate(tmp_path / "h", **arguments)
