"""Small hand-made inputs for the twin tests."""

import datetime as dt

import typing

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from schemas.contract import BOOL, FLOAT, INT, STRING, TIMESTAMP
from transforms.decode import SampleChunk, to_micros

T0 = dt.datetime(2026, 3, 2, 6, 0, tzinfo=dt.timezone.utc)
_PLACEHOLDERS = {STRING: "x", INT: 0, FLOAT: 0.0, BOOL: False, TIMESTAMP: T0}


def placeholder_row(record, **values) -> dict:
    """A row of `record`: `values`, and None, [] or a placeholder for every other field."""
    def default(field):
        return [] if field.repeated else None if field.nullable else _PLACEHOLDERS[field.type]
    return {field.name: values.get(field.name, default(field)) for field in record.fields}


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def chunk(seconds, *, heart_rate=70.0, spo2=97.0, systolic=120.0, temperature=36.8, respiratory=16.0,
          device="W-1", steps=1.0, stage="awake"):
    """A SampleChunk with one sample per entry of `seconds` (offsets from T0), constant vitals."""
    times = np.array([to_micros(at(s)) for s in seconds], dtype=np.int64)
    n = len(times)
    vitals = np.tile([heart_rate, spo2, systolic, 80.0, temperature, respiratory], (n, 1)).astype(float)
    return SampleChunk(device, times, vitals, np.full(n, steps), tuple([stage] * n))


def timestamped(key, value_chunk):
    return TimestampedValue((key, value_chunk), Timestamp(micros=int(value_chunk.times_us[0])))


def create_timestamped(values):
    """beam.Create for (key, value) TimestampedValues; Create would otherwise type them as TimestampedValue."""
    return beam.Create(values).with_output_types(typing.Tuple[str, typing.Any])


def observation(seconds, consciousness="alert", oxygen=False):
    return {"observation_id": f"o{seconds}", "event_time": at(seconds), "consciousness": consciousness,
            "supplemental_oxygen": oxygen}


def streaming_options() -> PipelineOptions:
    """Pipeline options for a streaming TestPipeline (TestStream sources)."""
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    return options
