"""Decode: raw input records -> validated, pseudonymised records, or dead letters.

Every stream arrives as `RawRecord`s: JSON bytes (files, Pub/Sub, Kafka) or an
already-decoded dict (Avro files), plus where it came from and when it
arrived. Decoding checks each record against `schemas/` and replaces the
patient identifier with its keyed pseudonym. Anything that does not fit goes
to the ``dead_letters`` output with the stage, the reason naming the field,
and the pseudonymised payload; nothing raises and nothing is dropped.

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

from schemas import CLINICAL_OBSERVATION, DEVICE_LOG_EVENT, DICOM_REFERENCE, WEARABLE_UPLOAD, SchemaError
from schemas.contract import from_json, from_json_fields, parse_timestamp, validate_fields
from schemas.inputs import SLEEP_STAGES, VITAL_NAMES, VITAL_SAMPLE
from transforms.dead_letters import DEAD_LETTERS, dead_letter
from transforms.pseudonymise import Pseudonymiser

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
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
    """The payload of a RawRecord the source could not read at all (e.g. a damaged Avro file)."""

    reason: str


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


_AFTER_YEAR_9999_US = int(np.datetime64("10000-01-01T00:00:00", "us").astype(np.int64))
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


def _scrubbed(raw: RawRecord, pseudonymiser: Pseudonymiser) -> str:
    """The payload as text for a dead letter, every patient identifier in it pseudonymised."""
    if isinstance(raw.payload, dict):
        payload = dict(raw.payload)
        if payload.get("patient_id") is not None:
            payload["patient_id"] = pseudonymiser.scrub_value(payload["patient_id"])
        return orjson.dumps(payload, default=str, option=orjson.OPT_SORT_KEYS).decode()
    if isinstance(raw.payload, str):
        return pseudonymiser.scrub_text(raw.payload)
    if isinstance(raw.payload, (bytes, bytearray, memoryview)):
        return pseudonymiser.scrub_text(bytes(raw.payload).decode("utf-8", errors="replace"))
    return ""  # UnreadableInput: nothing was read


_READABLE_PAYLOADS = (bytes, bytearray, memoryview, str, dict)


class _DecodeFn(beam.DoFn):
    """Shared plumbing: parse, and turn any failure into a dead letter."""

    stage = "decode"

    def __init__(self, pseudonymiser: Pseudonymiser):
        self._pseudonymiser = pseudonymiser
        self._decoded = Metrics.counter(self.stage, "records_decoded")

    def _reject(self, raw: RawRecord, reason: str, *, record_count: int = 1, event_time=None):
        return TaggedOutput(DEAD_LETTERS, dead_letter(
            self.stage, reason, _scrubbed(raw, self._pseudonymiser), source=raw.source,
            recorded_at=raw.arrival_time, event_time=event_time, record_count=record_count,
        ))

    def process(self, raw: RawRecord):
        if isinstance(raw.payload, UnreadableInput):
            yield self._reject(raw, raw.payload.reason)
            return
        if not isinstance(raw.payload, _READABLE_PAYLOADS):  # a source bug; still no crash, no drop
            yield self._reject(raw, f"unreadable payload: {type(raw.payload).__name__}")
            return
        try:
            obj = _parse(raw)
        except orjson.JSONDecodeError as error:
            yield self._reject(raw, f"invalid JSON: {error}")
            return
        try:
            yield from self.decode(raw, obj)
        except SchemaError as error:
            count = len(obj["samples"]) if isinstance(obj, dict) and isinstance(obj.get("samples"), list) else 1
            yield self._reject(raw, str(error), record_count=max(count, 1))

    def decode(self, raw: RawRecord, obj: Any) -> Iterable:
        raise NotImplementedError


class DecodeDeviceEventsFn(_DecodeFn):
    """RawRecord -> (device_id, DeviceLogEvent dict) timestamped at event_time."""

    stage = "decode_device_logs"

    def decode(self, raw, obj):
        event = from_json(DEVICE_LOG_EVENT, obj)
        self._decoded.inc()
        yield TimestampedValue((event["device_id"], event), Timestamp(micros=to_micros(event["event_time"])))


class DecodeObservationsFn(_DecodeFn):
    """RawRecord -> (patient_key, ClinicalObservation without patient_id) at event_time."""

    stage = "decode_observations"

    def decode(self, raw, obj):
        observation = from_json(CLINICAL_OBSERVATION, obj)
        key = self._pseudonymiser.patient_key(observation.pop("patient_id"))
        self._decoded.inc()
        yield TimestampedValue((key, observation), Timestamp(micros=to_micros(observation["event_time"])))


class DecodeDicomReferencesFn(_DecodeFn):
    """RawRecord -> DicomReference with ``patient_key`` in place of ``patient_id``, at acquisition time.

    The reference also keeps ``source`` (where it was read), so a later stage that rejects the
    image names the same input in its dead letter.
    """

    stage = "decode_dicom_refs"

    def decode(self, raw, obj):
        reference = from_json(DICOM_REFERENCE, obj)
        reference["patient_key"] = self._pseudonymiser.patient_key(reference.pop("patient_id"))
        reference["source"] = raw.source
        self._decoded.inc()
        yield TimestampedValue(reference, Timestamp(micros=to_micros(reference["acquisition_time"])))


class DecodeWearablesFn(_DecodeFn):
    """RawRecord -> (patient_key, SampleChunk) per event-time window, timestamped at the chunk's first sample.

    Invalid samples become one dead letter each; the rest of the upload is kept.
    """

    stage = "decode_wearables"

    def __init__(self, pseudonymiser: Pseudonymiser, window_seconds: int):
        super().__init__(pseudonymiser)
        self._window_us = int(window_seconds * 1_000_000)
        self._samples = Metrics.counter(self.stage, "samples_decoded")

    def decode(self, raw, obj):
        if not isinstance(obj, dict):
            raise SchemaError("WearableUpload", f"expected a record, got {type(obj).__name__}")
        header = from_json(WEARABLE_UPLOAD, {**obj, "samples": []})
        samples = obj.get("samples")
        if not isinstance(samples, list):
            raise SchemaError("WearableUpload.samples", f"expected a list, got {type(samples).__name__}")
        if not samples:  # nothing to count in a twin: still one input record, so a dead letter
            raise SchemaError("WearableUpload.samples", "is empty: an upload carries at least one sample")
        key = self._pseudonymiser.patient_key(header["patient_id"])
        good, bad = _columns(samples)
        for index, reason in bad:
            yield self._reject_sample(raw, header, samples[index], reason)
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

    def _reject_sample(self, raw, header, sample, reason):
        payload = {"upload_id": header["upload_id"], "device_id": header["device_id"],
                   "patient_id": self._pseudonymiser.scrub_value(header["patient_id"]), "sample": sample}
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


def _columns(samples: list) -> tuple[tuple | None, list[tuple[int, str]]]:
    """Samples -> ((times_us, vitals, steps, stages) or None when none is valid, [(index, reason)])."""
    try:
        return _fast_columns(samples), []
    except _NeedsSampleBySample:
        pass
    valid, rejected = [], []
    for index, sample in enumerate(samples):
        path = f"WearableUpload.samples[{index}]"
        try:
            record = from_json_fields(VITAL_SAMPLE, sample, path)
            validate_fields(VITAL_SAMPLE, record, path)
        except SchemaError as error:
            rejected.append((index, str(error)))
        else:
            valid.append(record)  # parsed: aware datetimes, finite numbers, known stages (the fast path takes them all)
    return _fast_columns(valid), rejected


def _fast_columns(samples: list) -> tuple | None:
    """Column-wise conversion of well-formed samples; raises _NeedsSampleBySample on anything else.

    Returns (times_us (n,), vitals (n, 6), steps (n,), sleep stages (n-tuple)), or None for no samples.
    """
    if not samples:
        return None
    columns = _sample_columns(samples)
    times = _times_us(columns["event_time"])
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
        if times.max() >= _AFTER_YEAR_9999_US:  # a five-digit year: not ISO-8601 for the schema either
            raise _NeedsSampleBySample
        return times
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
