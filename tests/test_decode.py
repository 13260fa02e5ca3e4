"""Decode: raw records -> validated, pseudonymised records; everything else is a dead letter."""

import datetime as dt
import pickle

import apache_beam as beam
import numpy as np
import orjson
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas import DEAD_LETTERS as DEAD_LETTERS_TABLE
from schemas import validate
from transforms.dead_letters import DEAD_LETTERS
from transforms.decode import (
    DecodeDeviceEventsFn,
    DecodeObservationsFn,
    DecodeWearablesFn,
    RawRecord,
    UnreadableInput,
    to_micros,
)
from transforms.pseudonymise import DEMO_KEY, KeyReference, Pseudonymiser

KEY = "test-key-0123456789"
ARRIVAL = dt.datetime(2026, 3, 2, 6, 30, tzinfo=dt.timezone.utc)
PSEUDONYMS = Pseudonymiser(KEY)


def _upload(samples, **overrides):
    upload = {"upload_id": "u1", "device_id": "W-7", "patient_id": "MRN-000042",
              "upload_time": "2026-03-02T06:30:00Z", "samples": samples}
    upload.update(overrides)
    return orjson.dumps(upload)


def _sample(second, **vitals):
    return {"event_time": f"2026-03-02T06:{second // 60:02d}:{second % 60:02d}.000000Z", **vitals}


def _decode_wearables(payloads, window_seconds=60):
    fn = DecodeWearablesFn(PSEUDONYMS, window_seconds)
    outputs = []
    for i, payload in enumerate(payloads):
        outputs.extend(fn.process(RawRecord(f"f.jsonl:{i + 1}", payload, ARRIVAL)))
    chunks = [o for o in outputs if not hasattr(o, "tag")]  # TimestampedValue((key, chunk))
    dead = [o.value for o in outputs if hasattr(o, "tag")]
    assert all(o.tag == DEAD_LETTERS for o in outputs if hasattr(o, "tag"))
    for row in dead:
        validate(DEAD_LETTERS_TABLE, row)
    return chunks, dead


def test_clean_upload_is_split_into_window_chunks_column_wise():
    samples = [_sample(s, heart_rate=60.0 + s, spo2=97, steps=3) for s in range(50, 130, 10)]
    chunks, dead = _decode_wearables([_upload(samples)])
    assert dead == []
    assert [len(c.value[1].times_us) for c in chunks] == [1, 6, 1]  # 06:00:50 | 06:01:00-50 | 06:02:00
    key, chunk = chunks[1].value
    assert key == PSEUDONYMS.patient_key("MRN-000042") and key != "MRN-000042"
    assert chunk.device_id == "W-7"
    assert chunks[1].timestamp.micros == chunk.times_us[0]
    np.testing.assert_array_equal(chunk.vitals[:, 0], [120.0, 130, 140, 150, 160, 170])  # heart rate
    assert np.isnan(chunk.vitals[:, 2]).all()  # systolic absent
    assert chunk.vitals[0, 1] == 97.0  # integral JSON spo2 read as float
    np.testing.assert_array_equal(chunk.steps, np.full(6, 3.0))


def test_bad_samples_are_dead_letters_and_the_rest_is_kept():
    samples = [_sample(0, heart_rate=70.0), _sample(5, spo2=140.0), _sample(10, heart_rate="fast"),
               _sample(15, sleep_stage="coma"), {"heart_rate": 70.0}, _sample(20, heart_rate=True),
               _sample(25, heart_rate=71.0)]
    chunks, dead = _decode_wearables([_upload(samples)])
    kept = sum(len(c.value[1].times_us) for c in chunks)
    assert kept == 2
    assert kept + len(dead) == len(samples)  # nothing lost
    reasons = sorted(d["reason"] for d in dead)
    assert reasons == sorted([
        "WearableUpload.samples[1].spo2: 140.0 is above the maximum 100",
        "WearableUpload.samples[2].heart_rate: expected a number, got str (value withheld)",
        "WearableUpload.samples[3].sleep_stage: is not one of awake, light, deep, rem (value withheld)",
        "WearableUpload.samples[4].event_time: is required but missing",
        "WearableUpload.samples[5].heart_rate: expected a number, got bool True",
    ])
    assert all(d["stage"] == "decode_wearables" and d["source"] == "f.jsonl:1" for d in dead)
    assert all("MRN-000042" not in d["payload"] for d in dead)
    assert dead[0]["event_time"] == dt.datetime(2026, 3, 2, 6, 0, 5, tzinfo=dt.timezone.utc)


def test_valid_samples_in_any_timestamp_form_and_unhashable_stages_do_not_stop_the_decoder():
    samples = [_sample(0, heart_rate=70.0), {"event_time": "2026-03-02T06:00:05+00:00", "heart_rate": 72},
               {"event_time": "2026-03-02T06:00:10", "heart_rate": 73.0}, _sample(15, sleep_stage=["rem"])]
    chunks, dead = _decode_wearables([_upload(samples)])
    (chunk,) = [c.value[1] for c in chunks]
    np.testing.assert_array_equal(chunk.vitals[:, 0], [70.0, 72.0, 73.0])
    assert chunk.times_us[-1] - chunk.times_us[0] == 10_000_000  # a naive time is UTC, as the schema says
    assert [d["reason"] for d in dead] == ["WearableUpload.samples[3].sleep_stage: expected a string, got list "
                                           "(value withheld: not an allowed value)"]


def test_timestamps_the_schema_refuses_are_dead_letters_on_the_fast_path_too():
    forged = ["2026-03-02T06:00:10+01:00Z", "+12026-03-02T06:00:15Z", "12026-03-02T06:00:20Z"]
    samples = [_sample(0, heart_rate=70.0), _sample(5, heart_rate=71.0),
               *({"event_time": when, "heart_rate": 72.0} for when in forged)]
    chunks, dead = _decode_wearables([_upload(samples)])
    (chunk,) = [c.value[1] for c in chunks]
    np.testing.assert_array_equal(chunk.vitals[:, 0], [70.0, 71.0])
    assert [d["reason"].split(":")[0] for d in dead] == [f"WearableUpload.samples[{i}].event_time" for i in (2, 3, 4)]


def test_a_misplaced_z_is_not_taken_for_the_zone_of_another_sample():
    # As many Zs as samples, but one has two and another none; cut the last character of each
    # and numpy would read both. Each is judged on its own: neither is ISO-8601.
    samples = [{"event_time": "2026-03-02T06:00:00ZZ", "heart_rate": 70.0},
               {"event_time": "2026-03-02T06:00:011", "heart_rate": 71.0}, _sample(2, heart_rate=72.0)]
    chunks, dead = _decode_wearables([_upload(samples)])
    (chunk,) = [c.value[1] for c in chunks]
    np.testing.assert_array_equal(chunk.vitals[:, 0], [72.0])
    assert [d["reason"].split(":")[0] for d in dead] == [f"WearableUpload.samples[{i}].event_time" for i in (0, 1)]


def test_a_chunk_pickles_compactly_and_back():
    samples = [_sample(s, heart_rate=60.0 + s, spo2=97, steps=3, sleep_stage="light") for s in range(0, 30, 10)]
    samples[1]["sleep_stage"] = None
    (chunk,) = [c.value[1] for c in _decode_wearables([_upload(samples)])[0]]
    copy = pickle.loads(pickle.dumps(chunk))
    assert copy.device_id == chunk.device_id and copy.sleep_stages == ("light", None, "light")
    for name in ("times_us", "vitals", "steps"):
        np.testing.assert_array_equal(getattr(copy, name), getattr(chunk, name))
        assert getattr(copy, name).dtype == getattr(chunk, name).dtype


def test_broken_uploads_are_one_dead_letter_each_without_the_patient_id():
    broken_json = _upload([_sample(0, heart_rate=70.0)])[:-7]
    missing_id = _upload([_sample(0), _sample(5)], patient_id="")
    not_an_object = b"[1, 2, 3]"
    no_samples = _upload([])
    chunks, dead = _decode_wearables([broken_json, missing_id, not_an_object, no_samples])
    assert chunks == []
    assert [d["reason"].split(":")[0] for d in dead] == ["invalid JSON", "WearableUpload.patient_id", "WearableUpload",
                                                         "WearableUpload.samples"]
    assert [d["record_count"] for d in dead] == [1, 2, 1, 1]
    # Unparsable text keeps only its length and keyed digest; a parsed record its declared fields.
    assert orjson.loads(dead[0]["payload"]) == {"raw_length": len(broken_json),
                                                "raw_digest": PSEUDONYMS.digest(broken_json)}
    assert "MRN-000042" not in dead[0]["payload"]
    assert orjson.loads(dead[3]["payload"])["patient_id"] == "pk:" + PSEUDONYMS.patient_key("MRN-000042")
    assert all(d["recorded_at"] == ARRIVAL for d in dead)


@pytest.mark.parametrize("patient_id, reason", [
    (b'["MRN-000042"]', "ClinicalObservation.patient_id: expected a string, got list "
                        "(value withheld: identifies a patient)"),
    (b"42000042", "ClinicalObservation.patient_id: expected a string, got int (value withheld: identifies a patient)"),
    (b'{"mrn": "MRN-000042", "site": "MRN-000043"}', "ClinicalObservation.patient_id: expected a string, got dict "
                                                     "(value withheld: identifies a patient)"),
    (b'"MRN-0000', "invalid JSON"),  # a line cut inside the identifier
])
def test_no_form_of_patient_id_reaches_a_dead_letter(patient_id, reason):
    payload = b'{"observation_id": "o1", "event_time": "2026-03-02T06:00:00Z", "patient_id": ' + patient_id
    payload += b"}" if reason != "invalid JSON" else b""
    (output,) = DecodeObservationsFn(PSEUDONYMS).process(RawRecord("observations.jsonl:1", payload, ARRIVAL))
    assert output.tag == DEAD_LETTERS
    assert output.value["reason"].startswith(reason)
    letter = orjson.dumps(output.value, default=str).decode()
    assert "MRN-0000" not in letter and "42" not in output.value["reason"] and "42000042" not in letter
    kept = orjson.loads(output.value["payload"])
    assert kept["raw_length"] == len(payload) and kept["raw_digest"] == PSEUDONYMS.digest(payload)
    assert set(kept) <= {"observation_id", "event_time", "patient_id", "raw_length", "raw_digest"}


def test_a_decoded_record_with_a_non_string_patient_id_is_scrubbed_too():
    avro_like = {"observation_id": "o1", "event_time": dt.datetime(2026, 3, 2, 6, tzinfo=dt.timezone.utc),
                 "patient_id": ["MRN-000042"]}
    (output,) = DecodeObservationsFn(PSEUDONYMS).process(RawRecord("o.avro#1", avro_like, ARRIVAL))
    assert output.tag == DEAD_LETTERS
    assert "MRN-000042" not in output.value["payload"] and "MRN-000042" not in output.value["reason"]
    assert output.value["reason"] == ("ClinicalObservation.patient_id: expected a string, "
                                      "got list (value withheld: identifies a patient)")


def test_a_payload_of_no_readable_type_is_a_dead_letter_not_a_crash():
    (output,) = DecodeDeviceEventsFn(PSEUDONYMS).process(RawRecord("kafka:t/0@1", None, ARRIVAL))
    assert output.tag == DEAD_LETTERS and output.value["reason"] == "unreadable payload: NoneType"


def test_unreadable_input_is_a_dead_letter_with_the_source_reason():
    fn = DecodeDeviceEventsFn(PSEUDONYMS)
    (output,) = fn.process(RawRecord("device_logs/x.avro", UnreadableInput("unreadable Avro file: EOFError"), ARRIVAL))
    assert output.tag == DEAD_LETTERS and output.value["reason"] == "unreadable Avro file: EOFError"


def test_avro_records_decode_like_json():
    event_time = dt.datetime(2026, 3, 2, 6, 1, tzinfo=dt.timezone.utc)
    avro_record = {"event_id": "e1", "device_id": "XR-1", "device_model": "DRX-1", "event_time": event_time,
                   "kind": "heartbeat", "severity": "info", "code": None, "message": None, "status": None,
                   "tube_temperature_c": 41.5, "exposure_count": None, "firmware_version": None,
                   "config_version": None}
    (output,) = DecodeDeviceEventsFn(PSEUDONYMS).process(RawRecord("d.avro#1", avro_record, ARRIVAL))
    assert output.value == ("XR-1", avro_record)
    assert output.timestamp.micros == to_micros(event_time)


def test_observations_are_keyed_by_pseudonym_in_a_pipeline(monkeypatch):
    monkeypatch.setenv("MEDTWIN_TEST_KEY", KEY)
    shipped = Pseudonymiser.from_reference(KeyReference("env", "MEDTWIN_TEST_KEY"))
    raw = [
        RawRecord("o.jsonl:1", orjson.dumps({"observation_id": "o1", "patient_id": "MRN-1",
                                             "event_time": "2026-03-02T06:00:00Z", "consciousness": "alert",
                                             "supplemental_oxygen": False}), ARRIVAL),
        RawRecord("o.jsonl:2", b'{"observation_id": "o2", "patient_id": "MRN-1", "event_time": "soon"}', ARRIVAL),
    ]
    with TestPipeline() as pipeline:
        outputs = (pipeline | beam.Create(raw)
                   | beam.ParDo(DecodeObservationsFn(shipped)).with_outputs(DEAD_LETTERS, main="ok"))
        assert_that(outputs.ok | beam.Map(lambda kv: (kv[0], kv[1]["consciousness"])),
                    equal_to([(PSEUDONYMS.patient_key("MRN-1"), "alert")]), label="decoded")
        assert_that(outputs[DEAD_LETTERS] | beam.Map(lambda d: d["reason"]),
                    equal_to(["ClinicalObservation.event_time: (value withheld) is not an ISO-8601 timestamp"]), label="dead")


def test_pseudonyms_depend_on_the_key():
    assert Pseudonymiser("another-key-0123456").patient_key("MRN-1") != PSEUDONYMS.patient_key("MRN-1")
    assert len(PSEUDONYMS.patient_key("MRN-1")) == 32


def test_a_pseudonym_is_the_keyed_hash_and_a_pickled_pseudonymiser_carries_neither_key_nor_identifier(monkeypatch):
    import hashlib
    import hmac

    monkeypatch.setenv("MEDTWIN_TEST_KEY", KEY)
    pseudonymiser = Pseudonymiser.from_reference(KeyReference("env", "MEDTWIN_TEST_KEY"))
    expected = hmac.new(KEY.encode(), b"MRN-000042", hashlib.sha256).hexdigest()[:32]
    assert pseudonymiser.patient_key("MRN-000042") == expected
    assert pseudonymiser.patient_key("MRN-000042") == expected  # remembered, not recomputed differently
    shipped = pickle.dumps(pseudonymiser)
    assert b"MRN-000042" not in shipped and expected.encode() not in shipped and KEY.encode() not in shipped
    assert pickle.loads(shipped).patient_key("MRN-000042") == expected


def test_a_pseudonymiser_holding_a_real_key_refuses_to_be_pickled():
    with pytest.raises(pickle.PicklingError):
        pickle.dumps(Pseudonymiser(KEY))
    assert pickle.loads(pickle.dumps(Pseudonymiser(DEMO_KEY))).patient_key("MRN-1") == \
        Pseudonymiser(DEMO_KEY).patient_key("MRN-1")


@pytest.mark.parametrize("key, demo, ok", [(None, True, True), (None, False, False), ("short", True, True),
                                           ("short", False, False)])
def test_a_key_is_required_outside_the_demo(monkeypatch, key, demo, ok):
    from transforms.pseudonymise import MissingKeyError, resolve_key

    monkeypatch.delenv("MEDTWIN_PSEUDONYM_KEY", raising=False)
    if ok:
        assert resolve_key(key, demo=demo)
    else:
        with pytest.raises(MissingKeyError):
            resolve_key(key, demo=demo)
