"""Fuzz targets for every decoder (issue 13, item 7), with Hypothesis (atheris is not installable here).

Each target feeds generated hostile input to one decoder and checks the same three properties:
no exception escapes, every input record is accounted for (records out + the record counts of
the dead letters cover what went in), and no planted identifier reaches any output.

    .venv/bin/python -m pytest -q tests/fuzz                      # short run: the suite's profile
    make fuzz                                                      # long run (HYPOTHESIS_PROFILE=fuzz)

Targets: wearable JSON, observation JSON, DICOM reference JSON, device-log Avro files (damaged by
truncation and byte flips), the DICOM header check and pixel decode (the hostile corpus's files,
mutated).  The pixel decode runs in this process: its memory is bounded by the decoder's own caps
(`bench/bombs.py` measures them); the long run should be started under ``ulimit -v``.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import pathlib

import fastavro
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import DEVICE_LOG_EVENT, avro_schema
from schemas.contract import SchemaError, parse_timestamp
from transforms.dead_letters import DEAD_LETTERS
from transforms.decode import (
    DecodeDeviceEventsFn,
    DecodeDicomReferencesFn,
    DecodeObservationsFn,
    DecodeWearablesFn,
    RawRecord,
    UnreadableInput,
)
from transforms.dicom_decode import DicomReadConfig, DicomRejected, decode_dicom_bytes
from transforms.pseudonymise import Pseudonymiser
from transforms.landed_files import avro_claimed_records
from transforms.sources import records_in_file

# The suite's run is the same examples every time (a CI run must not fail by chance); `make fuzz` explores.
settings.register_profile("suite", max_examples=60, deadline=None, suppress_health_check=list(HealthCheck),
                          derandomize=True)
settings.register_profile("fuzz", max_examples=5_000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

PSEUDONYMS = Pseudonymiser("fuzz-test-key-8c1d2e7a")
ARRIVAL = dt.datetime(2026, 3, 2, 6, tzinfo=dt.timezone.utc)
MRN = "MRN0424242"
PLANTED = (MRN, "0424242", "Grace Hopper", "1906-12-09")
CORPUS = pathlib.Path(__file__).parent.parent / "corpus" / "dicom"

RECORDS = {
    "wearables": {"upload_id": "u1", "device_id": "W-1", "patient_id": MRN, "upload_time": "2026-03-02T06:00:00Z",
                  "samples": [{"event_time": "2026-03-02T05:59:00Z", "heart_rate": 70.0},
                              {"event_time": "2026-03-02T05:59:30Z", "heart_rate": 71.0, "spo2": 97.0}]},
    "observations": {"observation_id": "o1", "patient_id": MRN, "event_time": "2026-03-02T06:00:00Z",
                     "consciousness": "alert", "supplemental_oxygen": False},
    "dicom_refs": {"uri": f"/landing/dicom/{MRN}/1.dcm", "study_instance_uid": "1.2", "series_instance_uid": "1.2.1",
                   "sop_instance_uid": "1.2.3", "patient_id": MRN, "device_id": "XR-1", "modality": "DX",
                   "acquisition_time": "2026-03-02T06:00:00Z"},
}
DECODERS = {
    "wearables": lambda: DecodeWearablesFn(PSEUDONYMS, 60),
    "observations": lambda: DecodeObservationsFn(PSEUDONYMS),
    "dicom_refs": lambda: DecodeDicomReferencesFn(PSEUDONYMS),
    "device_logs": lambda: DecodeDeviceEventsFn(PSEUDONYMS),
}

# Values an integration or an attacker might send, the planted identifiers among them.
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.sampled_from(PLANTED), st.sampled_from(["1e20", "0001-01-01T00:00:00Z",
                                                                     "9999-12-31T23:59:59Z", "2100-01-01T00:00:00Z"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(["name", "birth_date", "patient_id", "patient\\u005fid", "mrn", "x"]), inner, max_size=3),
    max_leaves=12)
# Fields a mutation may change without making a planted identifier legitimately kept (a declared,
# non-identifying free-text field such as device_id keeps its value in a dead letter, by design).
IDENTIFIER_SAFE_KEYS = {"wearables": ("upload_time", "samples", "patient_id", "name", "mrn", "birth_date"),
                        "observations": ("event_time", "patient_id", "consciousness", "name", "mrn", "birth_date",
                                         "respiratory_rate", "supplemental_oxygen"),
                        "dicom_refs": ("acquisition_time", "patient_id", "uri", "modality", "name", "mrn")}


TIMESTAMP_KEYS = ("upload_time", "event_time", "acquisition_time")


def _decode(stream, payload, legitimate=()):
    """One RawRecord through its decoder -> (outputs, dead letters); the accounting of one input.
    `legitimate`: planted strings the record carries as valid data (a date sent as a timestamp)."""
    outputs = list(DECODERS[stream]().process(RawRecord(f"{stream}/fuzz:1", payload, ARRIVAL)))
    dead = [o.value for o in outputs if getattr(o, "tag", None) == DEAD_LETTERS]
    good = [o.value for o in outputs if getattr(o, "tag", None) != DEAD_LETTERS]
    assert good or dead, "an input record vanished"
    # A decoded reference keeps its uri to fetch the file (it reaches no table); everything else is checked.
    kept = [{k: v for k, v in g.items() if k != "uri"} if isinstance(g, dict) else repr(g) for g in good]
    text = orjson.dumps([dead, kept], default=str).decode()
    for planted in set(PLANTED) - set(legitimate):
        assert planted not in text.replace(PSEUDONYMS.scrub_value(MRN), ""), planted
    return good, dead


def _valid_timestamp(value) -> bool:
    try:
        parse_timestamp(value, "fuzz")
    except SchemaError:
        return False
    return True


def _samples_out(good):
    return sum(len(chunk.times_us) for _, chunk in good)


@given(stream=st.sampled_from(sorted(RECORDS)), changes=st.data())
def test_json_decoders_survive_mutated_records(stream, changes):
    record = dict(RECORDS[stream])
    for key in changes.draw(st.lists(st.sampled_from(IDENTIFIER_SAFE_KEYS[stream]), max_size=4, unique=True)):
        record[key] = changes.draw(VALUES)
    # A planted date sent as a valid event time is an event time to the pipeline, kept as one.
    legitimate = [record[k] for k in TIMESTAMP_KEYS if isinstance(record.get(k), str) and _valid_timestamp(record[k])]
    # The stdlib writes integers of any size (orjson stops at 64 bits): the decoder must take them too.
    good, dead = _decode(stream, json.dumps(record, default=str).encode(), legitimate)
    if stream == "wearables" and isinstance(record.get("samples"), list) and not dead:
        assert _samples_out(good) == len(record["samples"])


@given(stream=st.sampled_from(sorted(RECORDS)), data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_json_decoders_survive_arbitrary_bytes(stream, data):
    _decode(stream, data)


@given(depth=st.integers(900, 1100), stream=st.sampled_from(sorted(RECORDS)))
def test_json_decoders_survive_deep_nesting(depth, stream):
    _decode(stream, b'{"samples":' + b"[" * depth + b"]" * depth + b"}")


def _avro_file(n=40):
    buffer = io.BytesIO()
    events = [{"event_id": f"e{i}", "device_id": "XR-1", "device_model": "DRX-1",
               "event_time": ARRIVAL - dt.timedelta(minutes=1), "kind": "heartbeat", "severity": "info"}
              for i in range(n)]
    fastavro.writer(buffer, fastavro.parse_schema(avro_schema(DEVICE_LOG_EVENT)), events, sync_interval=600)
    return buffer.getvalue()


AVRO = _avro_file()


@given(cut=st.integers(0, len(AVRO)), flips=st.lists(st.tuples(st.integers(0, len(AVRO) - 1), st.integers(0, 255)),
                                                      max_size=6))
def test_device_log_avro_files_survive_damage(cut, flips):
    data = bytearray(AVRO[:cut] if cut else AVRO)
    for position, value in flips:
        if position < len(data):
            data[position] = value
    records = list(records_in_file("/in/device_logs/date=2026-03-02/device_logs-06.avro", bytes(data), "/in"))
    # Cut right after the header, a container is whole and holds no block: nothing to account for.
    assert records or avro_claimed_records(bytes(data)) == 0, "a file vanished"
    for record in records:
        good, dead = _decode("device_logs", record.payload)
        if isinstance(record.payload, UnreadableInput):
            assert not good and sum(d["record_count"] for d in dead) == record.payload.record_count
    if not flips:  # truncation alone: what the surviving blocks claimed is accounted for
        readable = sum(1 for r in records if not isinstance(r.payload, UnreadableInput))
        lost = sum(r.payload.record_count for r in records if isinstance(r.payload, UnreadableInput))
        claimed = avro_claimed_records(bytes(data))
        if claimed is not None:  # (+1: a cut inside the last sync marker, after its records were read)
            assert claimed <= readable + lost <= claimed + 1


DICOM_FILES = sorted(CORPUS.glob("*.dcm"))


@given(index=st.integers(0, len(DICOM_FILES) - 1), flips=st.lists(
    st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8), cut=st.integers(0, 1 << 20))
def test_dicom_header_check_and_decode_fail_closed(index, flips, cut):
    data = bytearray(DICOM_FILES[index].read_bytes())
    for position, value in flips:
        data[position % len(data)] = value
    if cut < len(data):
        data = data[:max(cut, 132)]
    try:
        prepared = decode_dicom_bytes(bytes(data), DicomReadConfig(allowed_prefixes=(str(CORPUS),), target_size=64))
    except DicomRejected as error:
        assert str(error)
    else:
        assert prepared.image.shape[0] <= 64 and prepared.image.shape[1] <= 64
