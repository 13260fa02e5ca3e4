"""Decode: raw input records -> validated, pseudonymised records, or dead letters.

Every stream arrives as `RawRecord`s: JSON bytes (files, Pub/Sub, Kafka) or an
already-decoded dict (Avro files), plus where it came from and when it
arrived. Decoding checks each record against `schemas/` and replaces the
patient identifier with its keyed pseudonym. Anything that does not fit goes
to the ``dead_letters`` output with the stage, the reason naming the field,
and an allow-listed payload (`transforms.dead_letters.allowed_payload`: declared
fields only, pseudonyms for identifiers, the raw record's length and keyed digest);
nothing raises and nothing is dropped.

Bounds checked before anything else touches a record: nesting depth
(`transforms.dead_letters.MAX_DEPTH`), every timestamp in the contract's accepted
range (1900-01-01 to 2200-01-01 UTC), and no timestamp more than
`MAX_AHEAD_OF_ARRIVAL` after the record arrived: a sample cannot be taken after it
reached the hospital, and a far-future time would hold a window, a too-late gate or a
watermark open (issue 13, B6). A landed file's records arrived within its hour, and
its `RawRecord.arrival_time` is the start of that hour, hence one hour of the two.

Wearable uploads are the volume stream (one upload carries minutes of 1 Hz
samples), so they are decoded column-wise into `SampleChunk`s, one per
patient and event-time window, validated with numpy in the common case and
sample by sample only when something is wrong. Accounting, per upload:
``len(samples) = samples in chunks + sample-level dead letters``; an upload
rejected as a whole is one dead letter whose ``record_count`` is its number
of samples (1 when the samples cannot be read at all).
"""

from __future__ import annotations

import datetime as dt
import itertools
import operator
from typing import Any, Iterable, NamedTuple, Sequence

import apache_beam as beam
import numpy as np
import orjson
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from schemas import CLINICAL_OBSERVATION, DEVICE_LOG_EVENT, DICOM_REFERENCE, WEARABLE_UPLOAD, RecordDef, SchemaError
from schemas.contract import (
    EARLIEST_TIMESTAMP,
    LATEST_TIMESTAMP,
    TIMESTAMP,
    from_json,
    from_json_fields,
    parse_timestamp,
    validate_fields,
)
from schemas.inputs import SLEEP_STAGES, VITAL_NAMES, VITAL_SAMPLE
from transforms.dead_letters import DEAD_LETTERS, MAX_DEPTH, allowed_payload, dead_letter, within_depth
from transforms.pseudonymise import Pseudonymiser

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
MAX_AHEAD_OF_ARRIVAL = dt.timedelta(hours=2)  # the file's hour + one hour of clock skew
_SAMPLE_FIELDS = {f.name: f for f in VITAL_SAMPLE}
_VITAL_LIMITS = np.array([[_SAMPLE_FIELDS[v].minimum, _SAMPLE_FIELDS[v].maximum] for v in VITAL_NAMES])
_STEPS = _SAMPLE_FIELDS["steps"]
_SLEEP_STAGES_OR_NONE = frozenset((*_SAMPLE_FIELDS["sleep_stage"].choices, None))
_FIELD_NAMES = frozenset(_SAMPLE_FIELDS)
_NUMBER_LIMITS = np.vstack((_VITAL_LIMITS, [[_STEPS.minimum, _STEPS.maximum]]))  # vitals, then steps
_NUMBER_LOW, _NUMBER_HIGH = _NUMBER_LIMITS[:, :1], _NUMBER_LIMITS[:, 1:]  # (7, 1): against (7, n) columns
_INTEGER_KINDS = {int, type(None)}
_NUMBER_KINDS = {int, float, type(None)}


class RawRecord(NamedTuple):
    """One input record as it arrived.

    Attributes:
      source: where it came from, e.g. ``wearables/date=2026-03-02/wearables-06.jsonl:17``
        or ``pubsub:projects/p/subscriptions/s``.
      payload: JSON bytes, a dict already decoded from Avro, or `UnreadableInput`.
      arrival_time: when it reached the hospital (file partition hour, Pub/Sub publish time).
    """

    source: str
    payload: "bytes | dict | UnreadableInput"
    arrival_time: dt.datetime


class UnreadableInput(NamedTuple):
    """The payload of a RawRecord the source could not read (a damaged Avro file, an unexpected file name).

    Attributes:
      reason: why, quoting nothing the input said.
      record_count: how many input records it stands for (what a damaged file claimed to hold).
      stage: the dead letter's stage when not the decoder's own (e.g. ``read_wearables``).
    """

    reason: str
    record_count: int = 1
    stage: str | None = None


class SampleChunk(NamedTuple):
    """The samples of one upload that fall into one event-time window, column-wise.

    Attributes:
      device_id: the wearable that took them.
      times_us: (n,) int64 event times, microseconds since the epoch, ascending.
      vitals: (n, 6) float64 in `schemas.inputs.VITAL_NAMES` order, NaN where absent.
      steps: (n,) float64 steps since the previous sample, NaN where absent.
      sleep_stages: n sleep stages (str or None).

    Beam's default coder pickles chunks (between stages, and twice through a local shuffle), so a
    chunk pickles as its raw column buffers: about three times faster than numpy's own pickling.
    The arrays of an unpickled chunk are read-only views of those buffers.
    """

    device_id: str
    times_us: np.ndarray
    vitals: np.ndarray
    steps: np.ndarray
    sleep_stages: tuple

    def __reduce__(self):
        try:
            stages = bytes(map(STAGE_CODES.__getitem__, self.sleep_stages))
        except (KeyError, TypeError):  # not a schema stage: keep them as they are
            stages = tuple(self.sleep_stages)
        return _chunk_from_buffers, (
            self.device_id, np.ascontiguousarray(self.times_us, dtype=np.int64).tobytes(),
            np.ascontiguousarray(self.vitals, dtype=np.float64).tobytes(),
            np.ascontiguousarray(self.steps, dtype=np.float64).tobytes(), stages)


_EARLIEST_US = (EARLIEST_TIMESTAMP - EPOCH) // dt.timedelta(microseconds=1)
_LATEST_US = (LATEST_TIMESTAMP - EPOCH) // dt.timedelta(microseconds=1)  # exclusive
STAGES_BY_CODE = (*SLEEP_STAGES, None)  # sleep stages as small integer codes
STAGE_CODES = {stage: code for code, stage in enumerate(STAGES_BY_CODE)}


def _chunk_from_buffers(device_id: str, times: bytes, vitals: bytes, steps: bytes, stages: bytes | tuple):
    """The inverse of `SampleChunk.__reduce__`."""
    if isinstance(stages, bytes):
        stages = tuple(map(STAGES_BY_CODE.__getitem__, stages))
    return SampleChunk(device_id, np.frombuffer(times, dtype=np.int64),
                       np.frombuffer(vitals, dtype=np.float64).reshape(-1, len(VITAL_NAMES)),
                       np.frombuffer(steps, dtype=np.float64), stages)


def to_micros(value: dt.datetime) -> int:
    return (value - EPOCH) // dt.timedelta(microseconds=1)


def _parse(raw: RawRecord) -> Any:
    return raw.payload if isinstance(raw.payload, dict) else orjson.loads(raw.payload)


def _raw_bytes(payload: Any) -> bytes | None:
    """The record as it arrived, as bytes (an Avro record canonically re-serialised), for its digest."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8", errors="replace")
    if isinstance(payload, dict):
        try:  # orjson is C and depth-limited: no RecursionError on a hostile record
            return orjson.dumps(payload, default=str, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
        except (orjson.JSONEncodeError, TypeError):
            return None
    return None


def check_not_ahead(value: dt.datetime, latest: dt.datetime, path: str) -> None:
    """SchemaError when `value` is later than `latest` (arrival + `MAX_AHEAD_OF_ARRIVAL`)."""
    if value > latest:
        raise SchemaError(path, "is more than 2 hours after the record arrived (a time in the future)")


def _check_times(record_def: RecordDef, record: dict, latest: dt.datetime) -> None:
    """No top-level timestamp of a decoded record lies after `latest`."""
    for f in record_def.fields:
        if f.type == TIMESTAMP and record.get(f.name) is not None:
            check_not_ahead(record[f.name], latest, f"{record_def.name}.{f.name}")


_READABLE_PAYLOADS = (bytes, bytearray, memoryview, str, dict)
_NOT_PARSED = object()


class _DecodeFn(beam.DoFn):
    """Shared plumbing: parse, bound, and turn any failure into a dead letter."""

    stage = "decode"
    record_def: RecordDef

    def __init__(self, pseudonymiser: Pseudonymiser):
        self._pseudonymiser = pseudonymiser
        self._decoded = Metrics.counter(self.stage, "records_decoded")
        self._unknown_dropped = Metrics.counter(self.stage, "unknown_fields_dropped")
        self._unexpected = Metrics.counter(self.stage, "unexpected_errors")

    def setup(self):
        self._pseudonymiser.load()  # the key, from its reference: never part of the pickled DoFn

    def _payload(self, raw: RawRecord, obj: Any, fields=None) -> dict:
        """The allow-listed dead-letter payload: declared fields of `obj`, the raw record's length and digest."""
        payload: dict[str, Any] = {}
        if obj is not _NOT_PARSED and isinstance(obj, dict) and within_depth(obj):
            kept, dropped = allowed_payload(fields or self.record_def.fields, obj, self._pseudonymiser.scrub_value)
            payload.update(kept)
            if dropped:
                payload["unknown_fields_dropped"] = dropped
                self._unknown_dropped.inc(dropped)
        data = _raw_bytes(raw.payload)
        if data is not None:
            payload["raw_length"] = len(data)
            payload["raw_digest"] = self._pseudonymiser.digest(data)
        return payload

    def _reject(self, raw: RawRecord, reason: str, *, record_count: int = 1, event_time=None, obj: Any = _NOT_PARSED,
                stage: str | None = None):
        return TaggedOutput(DEAD_LETTERS, dead_letter(
            stage or self.stage, reason, self._payload(raw, obj), source=raw.source,
            recorded_at=raw.arrival_time, event_time=event_time, record_count=record_count,
        ))

    def process(self, raw: RawRecord):
        if isinstance(raw.payload, UnreadableInput):
            unreadable = raw.payload
            yield self._reject(raw, unreadable.reason, record_count=max(int(unreadable.record_count), 1),
                               stage=unreadable.stage)
            return
        if not isinstance(raw.payload, _READABLE_PAYLOADS):  # a source bug; still no crash, no drop
            yield self._reject(raw, f"unreadable payload: {type(raw.payload).__name__}")
            return
        try:
            obj = _parse(raw)
        except orjson.JSONDecodeError as error:  # orjson's message names a position, never the content
            yield self._reject(raw, f"invalid JSON: {error}")
            return
        if not self.shallow_enough(obj):
            yield self._reject(raw, f"{self.record_def.name}: nested deeper than {MAX_DEPTH} levels")
            return
        latest = raw.arrival_time + MAX_AHEAD_OF_ARRIVAL
        try:
            yield from self.decode(raw, obj, latest)
        except SchemaError as error:
            yield self._reject(raw, str(error), record_count=_records_in(obj), obj=obj)
        except (ArithmeticError, ValueError, TypeError, KeyError, IndexError, RecursionError) as error:
            # Defence in depth: a record that breaks the decoder in a way no check foresaw is still a
            # dead letter (the message is not quoted: it might quote the input).
            self._unexpected.inc()
            yield self._reject(raw, f"{self.record_def.name}: could not be decoded ({type(error).__name__})",
                               record_count=_records_in(obj))

    def shallow_enough(self, obj: Any) -> bool:
        return within_depth(obj)

    def decode(self, raw: RawRecord, obj: Any, latest: dt.datetime) -> Iterable:
        raise NotImplementedError


def _records_in(obj: Any) -> int:
    """How many input records a whole-record dead letter stands for: an upload's samples, else 1."""
    if isinstance(obj, dict) and isinstance(obj.get("samples"), list):
        return max(len(obj["samples"]), 1)
    return 1


class DecodeDeviceEventsFn(_DecodeFn):
    """RawRecord -> (device_id, DeviceLogEvent dict) timestamped at event_time."""

    stage = "decode_device_logs"
    record_def = DEVICE_LOG_EVENT

    def decode(self, raw, obj, latest):
        event = from_json(DEVICE_LOG_EVENT, obj)
        _check_times(DEVICE_LOG_EVENT, event, latest)
        self._decoded.inc()
        yield TimestampedValue((event["device_id"], event), Timestamp(micros=to_micros(event["event_time"])))


class DecodeObservationsFn(_DecodeFn):
    """RawRecord -> (patient_key, ClinicalObservation without patient_id) at event_time."""

    stage = "decode_observations"
    record_def = CLINICAL_OBSERVATION

    def decode(self, raw, obj, latest):
        observation = from_json(CLINICAL_OBSERVATION, obj)
        _check_times(CLINICAL_OBSERVATION, observation, latest)
        key = self._pseudonymiser.patient_key(observation.pop("patient_id"))
        self._decoded.inc()
        yield TimestampedValue((key, observation), Timestamp(micros=to_micros(observation["event_time"])))


class DecodeDicomReferencesFn(_DecodeFn):
    """RawRecord -> DicomReference with ``patient_key`` in place of ``patient_id``, at acquisition time.

    The reference also keeps ``source`` (where it was read), so a later stage that rejects the
    image names the same input in its dead letter.
    """

    stage = "decode_dicom_refs"
    record_def = DICOM_REFERENCE

    def decode(self, raw, obj, latest):
        reference = from_json(DICOM_REFERENCE, obj)
        _check_times(DICOM_REFERENCE, reference, latest)
        reference["patient_key"] = self._pseudonymiser.patient_key(reference.pop("patient_id"))
        reference["source"] = raw.source
        self._decoded.inc()
        yield TimestampedValue(reference, Timestamp(micros=to_micros(reference["acquisition_time"])))


class DecodeWearablesFn(_DecodeFn):
    """RawRecord -> (patient_key, SampleChunk) per event-time window, timestamped at the chunk's first sample.

    Invalid samples become one dead letter each; the rest of the upload is kept.
    """

    stage = "decode_wearables"
    record_def = WEARABLE_UPLOAD

    def __init__(self, pseudonymiser: Pseudonymiser, window_seconds: int):
        super().__init__(pseudonymiser)
        self._window_us = int(window_seconds * 1_000_000)
        self._samples = Metrics.counter(self.stage, "samples_decoded")

    def shallow_enough(self, obj):
        # The samples are read column-wise (only scalars pass) or one by one with bounded messages and
        # payloads; the rest of the upload is bounded here, without a walk over every sample.
        if not isinstance(obj, dict):
            return within_depth(obj)
        return within_depth({name: value for name, value in obj.items() if name != "samples"}, MAX_DEPTH - 1)

    def decode(self, raw, obj, latest):
        if not isinstance(obj, dict):
            raise SchemaError("WearableUpload", f"expected a record, got {type(obj).__name__}")
        header = from_json(WEARABLE_UPLOAD, {**obj, "samples": []})
        _check_times(WEARABLE_UPLOAD, header, latest)
        samples = obj.get("samples")
        if not isinstance(samples, list):
            raise SchemaError("WearableUpload.samples", f"expected a list, got {type(samples).__name__}")
        if not samples:  # nothing to count in a twin: still one input record, so a dead letter
            raise SchemaError("WearableUpload.samples", "is empty: an upload carries at least one sample")
        key = self._pseudonymiser.patient_key(header["patient_id"])
        good, bad = _columns(samples, to_micros(latest))
        for index, reason in bad:
            yield self._reject_sample(raw, header, index, samples[index], reason)
        if good is None:
            return
        times, vitals, steps, stages = good
        self._decoded.inc()
        self._samples.inc(len(times))
        if not (times[1:] >= times[:-1]).all():
            order = np.argsort(times, kind="stable")
            times, vitals, steps = times[order], vitals[order], steps[order]
            stages = tuple(stages[i] for i in order)
        windows = times // self._window_us
        if windows[0] == windows[-1]:  # the usual upload: all in one window
            chunk = SampleChunk(header["device_id"], times, vitals, steps, stages)
            yield TimestampedValue((key, chunk), Timestamp(micros=int(times[0])))
            return
        starts = np.flatnonzero(np.r_[True, windows[1:] != windows[:-1]])
        for begin, end in zip(starts.tolist(), [*starts[1:].tolist(), len(times)]):
            chunk = SampleChunk(header["device_id"], times[begin:end], vitals[begin:end], steps[begin:end],
                                stages[begin:end])
            yield TimestampedValue((key, chunk), Timestamp(micros=int(times[begin])))

    def _reject_sample(self, raw, header, index, sample, reason):
        kept, dropped = allowed_payload(VITAL_SAMPLE, sample if within_depth(sample, MAX_DEPTH - 2) else None,
                                        self._pseudonymiser.scrub_value)
        payload = {"upload_id": header["upload_id"][:200], "device_id": header["device_id"][:200],
                   "patient_id": self._pseudonymiser.scrub_value(header["patient_id"]), "sample_index": index,
                   "sample": kept if isinstance(sample, dict) else f"(value withheld: {type(sample).__name__})"}
        if dropped:
            payload["unknown_fields_dropped"] = dropped
            self._unknown_dropped.inc(dropped)
        data = _raw_bytes(raw.payload)
        if data is not None:
            payload["raw_length"], payload["raw_digest"] = len(data), self._pseudonymiser.digest(data)
        event_time = None
        if isinstance(sample, dict) and sample.get("event_time") is not None:
            try:
                event_time = parse_timestamp(sample["event_time"], "event_time")
            except SchemaError:
                pass
        return TaggedOutput(DEAD_LETTERS, dead_letter(
            self.stage, reason, payload, source=raw.source, recorded_at=raw.arrival_time, event_time=event_time))


class _NeedsSampleBySample(Exception):
    """The fast column-wise path met something it does not handle; validate sample by sample."""


def _columns(samples: list, latest_us: int) -> tuple[tuple | None, list[tuple[int, str]]]:
    """Samples -> ((times_us, vitals, steps, stages) or None when none is valid, [(index, reason)]).

    `latest_us`: no sample may be later (arrival + `MAX_AHEAD_OF_ARRIVAL`, microseconds).
    """
    try:
        return _fast_columns(samples, latest_us), []
    except _NeedsSampleBySample:
        pass
    latest = EPOCH + dt.timedelta(microseconds=latest_us)
    valid, rejected = [], []
    for index, sample in enumerate(samples):
        path = f"WearableUpload.samples[{index}]"
        try:
            record = from_json_fields(VITAL_SAMPLE, sample, path)
            validate_fields(VITAL_SAMPLE, record, path)
            check_not_ahead(record["event_time"], latest, f"{path}.event_time")
        except SchemaError as error:
            rejected.append((index, str(error)))
        else:
            valid.append(record)  # parsed: aware datetimes, finite numbers, known stages (the fast path takes them all)
    return _fast_columns(valid, latest_us), rejected


def _fast_columns(samples: list, latest_us: int) -> tuple | None:
    """Column-wise conversion of well-formed samples; raises _NeedsSampleBySample on anything else.

    Returns (times_us (n,), vitals (n, 6), steps (n,), sleep stages (n-tuple)), or None for no samples.
    """
    if not samples:
        return None
    columns = _sample_columns(samples)
    times = _times_us(columns["event_time"])
    if times.min() < _EARLIEST_US or times.max() >= _LATEST_US or times.max() > latest_us:
        raise _NeedsSampleBySample  # out of the accepted range, or in the future: judged one by one
    if not set(map(type, columns["steps"])) <= _INTEGER_KINDS:
        raise _NeedsSampleBySample
    numbers = _numbers([*(columns[name] for name in VITAL_NAMES), columns["steps"]])  # (7, n)
    if np.any((numbers < _NUMBER_LOW) | (numbers > _NUMBER_HIGH)):  # an absent reading (NaN) compares false
        raise _NeedsSampleBySample
    stages = columns["sleep_stage"]
    try:
        known = set(stages) <= _SLEEP_STAGES_OR_NONE  # only the schema's strings (or None) are equal to those
    except TypeError:  # unhashable: a list or an object is no stage either
        known = False
    if not known:
        raise _NeedsSampleBySample
    return times, np.ascontiguousarray(numbers[:-1].T), numbers[-1], tuple(stages)


def _sample_columns(samples: list) -> dict[str, Sequence]:
    """Samples (dicts of known fields only) -> field name -> its n values, None where absent."""
    if set(map(type, samples)) != {dict}:
        raise _NeedsSampleBySample
    names = tuple(samples[0])
    if not _FIELD_NAMES.issuperset(names):
        raise _NeedsSampleBySample
    if len(names) > 1 and set(map(len, samples)) == {len(names)}:
        try:  # the usual upload: every sample has the same fields (then only those)
            present = dict(zip(names, zip(*map(operator.itemgetter(*names), samples))))
        except KeyError:
            present = None
        if present is not None:
            absent = (None,) * len(samples)
            return {name: present.get(name, absent) for name in _SAMPLE_FIELDS}
    if not all(map(_FIELD_NAMES.issuperset, samples)):
        raise _NeedsSampleBySample
    return {name: [sample.get(name) for sample in samples] for name in _SAMPLE_FIELDS}


def _times_us(values: Sequence) -> np.ndarray:
    """Event times -> (n,) int64 microseconds: ISO-8601 strings ending in Z, or aware datetimes."""
    kinds = set(map(type, values))
    if kinds == {str}:
        stripped = [v[:-1] for v in values]
        body = "".join(stripped)
        # n Zs in all, none left once each value's last character is gone: every value ended in Z.
        # numpy would also take an offset or a signed year, which the schema refuses.
        if ("".join(values).count("Z") != len(values) or "Z" in body or "+" in body
                or body.count("-") != 2 * len(values)):
            raise _NeedsSampleBySample
        try:
            times = np.array(stripped, dtype="datetime64[us]").astype(np.int64)
        except ValueError:
            raise _NeedsSampleBySample from None
        return times  # a five-digit year, or any year out of range, is refused by the caller
    if all(isinstance(v, dt.datetime) and v.tzinfo is not None for v in values):
        return np.array([to_micros(v) for v in values], dtype=np.int64)
    raise _NeedsSampleBySample


def _numbers(columns: list[Sequence]) -> np.ndarray:
    """Columns of readings -> (columns, n) float64 with NaN for None.

    Anything but finite ints, floats or None needs the slow path: a string, a bool, an infinity,
    a NaN reading posing as a number.
    """
    seen = set(map(type, itertools.chain.from_iterable(columns)))
    if not seen <= _NUMBER_KINDS:
        raise _NeedsSampleBySample
    array = np.array(columns, dtype=np.float64)  # None -> NaN
    absent = sum(column.count(None) for column in columns) if type(None) in seen else 0
    if np.count_nonzero(~np.isfinite(array)) != absent:
        raise _NeedsSampleBySample
    return array
