"""Hostile records (issue 13, record side): every one is a dead letter, none raises, none leaks.

Each test is a reproduction from the issue (B-number in its name). The decoders are called
directly, the way Beam calls `process`, so an exception escaping them fails the test.
"""

import datetime as dt
import io
import pickle

import fastavro
import orjson
import pytest

from schemas import DEAD_LETTERS as DEAD_LETTERS_TABLE
from schemas import DEVICE_LOG_EVENT, avro_schema, validate
from transforms.dead_letters import DEAD_LETTERS, within_depth
from transforms.decode import (
    DecodeDeviceEventsFn,
    DecodeDicomReferencesFn,
    DecodeObservationsFn,
    DecodeWearablesFn,
    RawRecord,
)
from transforms.pseudonymise import Pseudonymiser
from transforms.sources import _arrival_of, records_in_file

KEY = "hostile-test-key-5f1c9a"
PSEUDONYMS = Pseudonymiser(KEY)
ARRIVAL = dt.datetime(2026, 3, 2, 6, tzinfo=dt.timezone.utc)
MRN = "MRN-999999"
PLANTED = (MRN, "999999", "Ada Lovelace", "1815-12-10", "12 St James's Square")


def _observation(**fields):
    record = {"observation_id": "o1", "patient_id": MRN, "event_time": "2026-03-02T06:00:00Z",
              "consciousness": "alert", "supplemental_oxygen": False}
    record.update(fields)
    return record


def _event(**fields):
    record = {"event_id": "e1", "device_id": "XR-1", "device_model": "DRX-1", "event_time": "2026-03-02T06:00:00Z",
              "kind": "heartbeat", "severity": "info"}
    record.update(fields)
    return record


def _reference(**fields):
    record = {"uri": "/landing/dicom/1.2/1.2.3.dcm", "study_instance_uid": "1.2", "series_instance_uid": "1.2.1",
              "sop_instance_uid": "1.2.3", "patient_id": MRN, "device_id": "XR-1", "modality": "DX",
              "acquisition_time": "2026-03-02T06:00:00Z"}
    record.update(fields)
    return record


def _sample(second, **fields):
    return {"event_time": f"2026-03-02T05:59:{second:02d}Z", "heart_rate": 70.0, **fields}


def _upload(samples=None, **fields):
    record = {"upload_id": "u1", "device_id": "W-1", "patient_id": MRN, "upload_time": "2026-03-02T06:00:00Z",
              "samples": samples if samples is not None else [_sample(0), _sample(1)]}
    record.update(fields)
    return record


DECODERS = {
    "observations": (DecodeObservationsFn, _observation),
    "device_logs": (DecodeDeviceEventsFn, _event),
    "dicom_refs": (DecodeDicomReferencesFn, _reference),
    "wearables": (lambda p: DecodeWearablesFn(p, 60), _upload),
}


def _run(stream, payload, arrival=ARRIVAL):
    """Decode one record; -> (decoded outputs, dead letters). Checks the dead letters' contract and accounting."""
    fn = DECODERS[stream][0](PSEUDONYMS)
    outputs = list(fn.process(RawRecord(f"{stream}/x:1", payload, arrival)))
    dead = [o.value for o in outputs if getattr(o, "tag", None) == DEAD_LETTERS]
    good = [o.value for o in outputs if getattr(o, "tag", None) != DEAD_LETTERS]
    for row in dead:
        validate(DEAD_LETTERS_TABLE, row)
    return good, dead


def _records_out(stream, good):
    return sum(len(chunk.times_us) for _, chunk in good) if stream == "wearables" else len(good)


def _assert_no_planted(*rows):
    text = orjson.dumps(rows, default=str).decode()
    for planted in PLANTED:
        assert planted not in text, planted


# ------------------------------------------------------------------ B1: numeric timestamps out of range


@pytest.mark.parametrize("stream, field", [("observations", "event_time"), ("device_logs", "event_time"),
                                           ("dicom_refs", "acquisition_time"), ("wearables", "upload_time")])
@pytest.mark.parametrize("value", [b"1e20", b"-1e20", b"1e300", b"-62135596801", b"253402300800", b"7258118400"])
def test_b1_a_numeric_timestamp_out_of_range_is_a_dead_letter(stream, field, value):
    payload = orjson.dumps(DECODERS[stream][1](**{field: 0})).replace(f'"{field}":0'.encode(), f'"{field}":'.encode() + value)
    good, (dead,) = _run(stream, payload)
    assert good == []
    assert dead["reason"].endswith("outside the accepted range 1900-01-01T00:00:00Z to 2200-01-01T00:00:00Z")


def test_b1_a_numeric_sample_time_out_of_range_is_a_sample_dead_letter():
    good, (dead,) = _run("wearables", orjson.dumps(_upload([_sample(0), {"event_time": 1e20, "heart_rate": 70.0}])))
    assert dead["reason"] == ("WearableUpload.samples[1].event_time: epoch seconds outside the accepted range "
                              "1900-01-01T00:00:00Z to 2200-01-01T00:00:00Z")
    assert _records_out("wearables", good) == 1


def test_b1_numeric_epoch_seconds_in_range_are_accepted_as_documented():
    epoch = (dt.datetime(2026, 3, 2, 5, 59, 30, tzinfo=dt.timezone.utc) - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc))
    ((_, event),), dead = _run("device_logs", orjson.dumps(_event(event_time=epoch.total_seconds())))
    assert dead == [] and event["event_time"] == dt.datetime(2026, 3, 2, 5, 59, 30, tzinfo=dt.timezone.utc)


# ------------------------------------------------------------------ B2: nesting near orjson's limit


def _nested(depth):
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("stream", sorted(DECODERS))
@pytest.mark.parametrize("depth", [980, 1023])
def test_b2_json_nested_near_orjsons_limit_is_a_dead_letter_not_a_recursion_error(stream, depth):
    record = orjson.dumps(DECODERS[stream][1](extra=0))
    payload = record.replace(b'"extra":0', b'"extra":' + _nested(depth))
    good, (dead,) = _run(stream, payload)
    assert good == [] and "nested deeper than 32 levels" in dead["reason"]
    _assert_no_planted(dead)


@pytest.mark.parametrize("stream, field", [("observations", "consciousness"), ("device_logs", "message"),
                                           ("dicom_refs", "modality"), ("wearables", "device_id")])
def test_b2_deep_nesting_in_a_declared_field_is_a_dead_letter(stream, field):
    payload = orjson.dumps(DECODERS[stream][1](**{field: 0})).replace(f'"{field}":0'.encode(),
                                                                      f'"{field}":'.encode() + _nested(1000))
    good, (dead,) = _run(stream, payload)
    assert good == [] and "nested deeper" in dead["reason"]


def test_b2_deep_nesting_inside_one_sample_rejects_that_sample_only():
    payload = orjson.dumps(_upload([_sample(0), _sample(1, heart_rate=0)])).replace(
        b'"heart_rate":0', b'"heart_rate":' + _nested(1000))
    good, (dead,) = _run("wearables", payload)
    assert _records_out("wearables", good) == 1
    assert dead["reason"] == "WearableUpload.samples[1].heart_rate: expected a number, got list (value withheld)"


def test_depth_is_measured_without_recursion():
    deep = []
    for _ in range(100_000):
        deep = [deep]
    assert not within_depth(deep) and within_depth({"a": [{"b": 1}]}, 3) and not within_depth({"a": [{"b": []}]}, 3)


# ------------------------------------------------------------------ B3: dates at Python's limits


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "1899-12-31T23:59:59Z",
                                  "2200-01-01T00:00:00Z"])
@pytest.mark.parametrize("stream, field", [("observations", "event_time"), ("device_logs", "event_time"),
                                           ("device_logs", "last_maintenance_time"),
                                           ("dicom_refs", "acquisition_time"), ("wearables", "upload_time")])
def test_b3_dates_outside_the_accepted_range_are_dead_letters(stream, field, when):
    good, (dead,) = _run(stream, orjson.dumps(DECODERS[stream][1](**{field: when})))
    assert good == [] and dead["reason"].endswith("outside the accepted range 1900-01-01T00:00:00Z to "
                                                  "2200-01-01T00:00:00Z")


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"])
def test_b3_sample_times_at_pythons_limits_are_sample_dead_letters(when):
    good, (dead,) = _run("wearables", orjson.dumps(_upload([_sample(0), {"event_time": when, "heart_rate": 70.0}])))
    assert _records_out("wearables", good) == 1 and "outside the accepted range" in dead["reason"]


def test_b3_avro_datetimes_at_pythons_limits_are_dead_letters():
    for when in (dt.datetime.min.replace(tzinfo=dt.timezone.utc), dt.datetime(9999, 12, 31, tzinfo=dt.timezone.utc)):
        record = {**_event(), "event_time": when, "last_maintenance_time": None}
        good, (dead,) = _run("device_logs", record)
        assert good == [] and "outside the accepted range" in dead["reason"]


# ------------------------------------------------------------------ B4: a deeply nested Avro record


def _recursive_avro(depth):
    schema = avro_schema(DEVICE_LOG_EVENT)
    schema["fields"].append({"name": "nested", "type": ["null", {
        "type": "record", "name": "Node", "fields": [{"name": "child", "type": ["null", "Node"]}]}], "default": None})
    node = None
    for _ in range(depth):
        node = {"child": node}
    record = {**_event(), "event_time": ARRIVAL - dt.timedelta(minutes=1), "nested": node}
    buffer = io.BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(schema), [record])
    return buffer.getvalue()


@pytest.mark.parametrize("depth", [200, 400, 1000])  # the old decoder crashed from 255 levels (orjson's limit)
def test_b4_a_deeply_nested_avro_record_is_a_dead_letter(depth):
    (raw,) = records_in_file("device_logs/date=2026-03-02/device_logs-06.avro", _recursive_avro(depth))
    fn = DecodeDeviceEventsFn(PSEUDONYMS)
    (output,) = fn.process(raw)
    assert output.tag == DEAD_LETTERS and "nested deeper than 32 levels" in output.value["reason"]


# ------------------------------------------------------------------ B6 / B15: far-future times


@pytest.mark.parametrize("stream, field", [("observations", "event_time"), ("device_logs", "event_time"),
                                           ("dicom_refs", "acquisition_time"), ("wearables", "upload_time")])
def test_b6_a_far_future_event_time_is_a_dead_letter_at_decode(stream, field):
    good, (dead,) = _run(stream, orjson.dumps(DECODERS[stream][1](**{field: "2100-01-01T00:00:00Z"})))
    assert good == [] and "more than 2 hours after the record arrived" in dead["reason"]


def test_b6_a_far_future_sample_is_a_dead_letter_and_cannot_hold_a_window_open():
    samples = [{"event_time": "2100-01-01T00:00:00Z", "heart_rate": 70.0}, _sample(0), _sample(1)]
    good, (dead,) = _run("wearables", orjson.dumps(_upload(samples)))
    assert dead["reason"] == ("WearableUpload.samples[0].event_time: is more than 2 hours after the record arrived "
                              "(a time in the future)")
    (_, chunk), = good
    assert chunk.times_us.max() < int((ARRIVAL - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)).total_seconds() * 1e6)
    assert len(chunk.times_us) + 1 == len(samples)


def test_b6_times_within_the_skew_allowance_are_kept():
    # A landed file's records arrived within its hour: a sample 90 minutes after the hour's start is fine.
    good, dead = _run("observations", orjson.dumps(_observation(event_time="2026-03-02T07:30:00Z")))
    assert dead == [] and len(good) == 1


@pytest.mark.parametrize("upload_time", ["2027-03-02T06:00:00Z", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z",
                                         "2026-03-02T06:00:00", "not a time"])
def test_b15_a_replay_arrival_never_comes_from_an_out_of_range_upload_time(upload_time):
    raw = RawRecord("wearables/x:1", orjson.dumps(_upload(upload_time=upload_time)), ARRIVAL)
    assert _arrival_of(raw) == ARRIVAL


def test_b15_a_plausible_upload_time_still_refines_the_replay_arrival():
    raw = RawRecord("wearables/x:1", orjson.dumps(_upload(upload_time="2026-03-02T06:17:00Z")), ARRIVAL)
    assert _arrival_of(raw) == dt.datetime(2026, 3, 2, 6, 17, tzinfo=dt.timezone.utc)
    avro = {**_event(), "event_time": dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc)}
    assert _arrival_of(RawRecord("device_logs/x#1", avro, ARRIVAL)) == ARRIVAL


# ------------------------------------------------------------------ B7 / B8: PHI in dead letters


PHI_PAYLOADS = {
    "escaped key": b'{"observation_id": "o1", "patient\\u005fid": "MRN-999999", "event_time": "soon"}',
    "nested list": b'{"observation_id": "o1", "patient_id": [["MRN-999999"], "x"], "event_time": "soon"}',
    "nested object": b'{"observation_id": "o1", "patient_id": {"a": {"b": "MRN-999999"}}, "event_time": "soon"}',
    "raw CR in a string": b'{"observation_id": "o1", "patient_id": "MRN-99\r9999", "event_time": "soon"}',
    "raw CR in a token": b'{"observation_id": "o1", "patient_id": MRN-99\r9999, "event_time": "soon"}',
    "unknown fields": orjson.dumps(_observation(name="Ada Lovelace", birth_date="1815-12-10",
                                                address="12 St James's Square", mrn=MRN, consciousness="drowsy")),
    "identifier as a key": b'{"observation_id": "o1", "patient_id": "x", "MRN-999999": 1, "event_time": "soon"}',
    "identifier in an enumerated field": orjson.dumps(_observation(consciousness=MRN)),
    "identifier in a wrongly typed field": orjson.dumps(_observation(supplemental_oxygen=[MRN, "Ada Lovelace"])),
}


@pytest.mark.parametrize("name", sorted(PHI_PAYLOADS))
def test_b7_b8_no_identifier_reaches_a_dead_letter(name):
    good, (dead,) = _run("observations", PHI_PAYLOADS[name])
    assert good == []
    _assert_no_planted(dead)
    payload = orjson.loads(dead["payload"])
    assert payload["raw_length"] == len(PHI_PAYLOADS[name])
    assert payload["raw_digest"] == PSEUDONYMS.digest(PHI_PAYLOADS[name])


def test_b7_an_escaped_identifier_key_is_pseudonymised_like_the_plain_one():
    _, (dead,) = _run("observations", PHI_PAYLOADS["escaped key"])
    assert orjson.loads(dead["payload"])["patient_id"] == "pk:" + PSEUDONYMS.patient_key(MRN)


def test_b7_a_patient_id_inside_a_wearable_sample_is_dropped():
    samples = [_sample(0), _sample(1, patient_id=MRN, name="Ada Lovelace")]
    good, (dead,) = _run("wearables", orjson.dumps(_upload(samples)))
    assert _records_out("wearables", good) == 1
    assert dead["reason"] == "WearableUpload.samples[1]: has 2 fields the schema does not declare (names withheld)"
    payload = orjson.loads(dead["payload"])
    assert payload["unknown_fields_dropped"] == 2 and set(payload["sample"]) == {"event_time", "heart_rate"}
    _assert_no_planted(dead)


def test_b8_unknown_fields_are_dropped_and_counted_declared_ones_kept():
    _, (dead,) = _run("observations", PHI_PAYLOADS["unknown fields"])
    assert dead["reason"] == "ClinicalObservation: has 4 fields the schema does not declare (names withheld)"
    payload = orjson.loads(dead["payload"])
    assert payload["unknown_fields_dropped"] == 4
    assert payload["observation_id"] == "o1" and payload["supplemental_oxygen"] is False
    assert payload["consciousness"] == "(value withheld: not an allowed value)"
    assert payload["patient_id"] == "pk:" + PSEUDONYMS.patient_key(MRN)


def test_b8_unknown_fields_of_an_avro_writer_schema_are_dropped():
    schema = avro_schema(DEVICE_LOG_EVENT)
    schema["fields"] += [{"name": "patient_name", "type": "string"}, {"name": "mrn", "type": "string"}]
    record = {**_event(), "event_time": ARRIVAL, "patient_name": "Ada Lovelace", "mrn": MRN}
    buffer = io.BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(schema), [record])
    (raw,) = records_in_file("device_logs/date=2026-03-02/device_logs-06.avro", buffer.getvalue())
    (output,) = DecodeDeviceEventsFn(PSEUDONYMS).process(raw)
    assert output.tag == DEAD_LETTERS
    _assert_no_planted(output.value)
    assert orjson.loads(output.value["payload"])["unknown_fields_dropped"] == 2


def test_reasons_never_quote_a_container_or_an_identifier():
    payload = orjson.dumps(_event(device_id=["Ada Lovelace"], event_time={"when": MRN}))
    _, (dead,) = _run("device_logs", payload)
    assert dead["reason"] == "DeviceLogEvent.event_time: expected a timestamp, got dict (value withheld)"
    _assert_no_planted(dead)


def test_a_pickled_decoder_holds_no_key():
    from transforms.pseudonymise import KeyReference

    fn = DecodeObservationsFn(Pseudonymiser.from_reference(KeyReference("env", "MEDTWIN_PSEUDONYM_KEY")))
    assert KEY.encode() not in pickle.dumps(fn)
