"""The windowing policy, in one place: event-time windows, triggers, lateness, and too-late data.

`ApplyWindowPolicy` takes a keyed, event-timestamped PCollection and returns
it windowed for aggregation, plus a dead-letter PCollection of elements that
arrived later than the allowed lateness.

Why a gate: Beam drops data that reaches a window after
``window end + allowed lateness`` without telling anyone, and a Python DoFn
cannot read the watermark to catch it first (apache/beam#23379). The gate is a
stateful DoFn over a few shards whose event-time "tick" timers fire every
``tick_seconds`` as the watermark passes. A fired tick at T proves the
watermark reached T, so an element whose window expired at or before T is
too late, and becomes a dead letter. A pending tick at T + tick also *holds*
the gate's output watermark at or below it, so an element the gate lets
through can be at most one tick behind: windows therefore keep
``allowed_lateness + tick`` before Beam would drop anything, and nothing the
gate forwards is ever dropped. Data between ``allowed_lateness`` and
``allowed_lateness + tick`` late may still be aggregated as a late pane; data
beyond that is always a dead letter. A shard ticks while the watermark is within reach of its
newest data (window + lateness + one tick past it: until then an element could
still be too late only by that much), then rests until its next element re-arms
it, so an idle shard costs nothing and the end of the input or a drain (the
watermark jumps to the end of time) ends in a few ticks per shard even on a
runner that fires timers strictly in order; a timer at the end of time also
stops them. While a shard rests, its closed-through time stays where it
stopped: an element it then sees is checked against that, and one that is
later than that yet behind the real watermark is the residual below (a shard
rests only after a whole lateness without data).
Shards: ``gate_shards`` (flag ``--gate_shards``, default 64) keys spread the
stream's elements, so no shard is a hot key of the stream. Residual: a
shard's very first element arrives before its first tick, when nothing is
known; it is forwarded, and if it was already later than the lateness the
window drops it (Beam counts it; on Dataflow, ``droppedDueToLateness``).

Data horizon: the gate also emits, per shard, the newest event time it has let
through, whenever that moves on by ``HORIZON_STEP_SECONDS`` (output ``horizon``: a
handful of elements per shard and minute). The watermark alone cannot tell a
silence from the end of the input: when a bounded input is exhausted or a
streaming job is drained, it jumps to the end of time and fires every pending
event-time timer. What the data itself has reached can: a silence that ends
after the newest event anyone sent is no silence (`HoldUntilTheDataPasses`).

Panes: early panes every ``early_firing_seconds`` of processing time, one
on-time pane when the watermark passes the window end, a late pane for each
late arrival; accumulating, so each pane is a complete refinement and the
latest pane of a window is its best answer.

Batch has no panes, triggers or lateness, so a transform may skip Beam's
windows and assign the same fixed windows itself with
`WindowPolicy.window_start_us` (the batch patient twin does: its statistics
are combined per patient, far cheaper per window on the Python SDK).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import zlib
from typing import Any, Callable

import apache_beam as beam
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms import trigger, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Duration, Timestamp

from transforms.dead_letters import DEAD_LETTERS, dead_letter

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
HORIZON = "horizon"
HORIZON_STEP_SECONDS = 10


@dataclasses.dataclass(frozen=True)
class WindowPolicy:
    """How one stream is windowed.

    Attributes:
      window_seconds: fixed event-time window length.
      allowed_lateness_seconds: how long after a window's end its late data is still accepted.
      early_firing_seconds: processing-time delay between early panes (streaming only).
      streaming: unbounded input; enables early/late panes and the too-late gate.
      tick_seconds: resolution of the gate's watermark tracking (also the lateness slack).
      gate_shards: stateful shards of the gate (its parallelism); each one ticks independently.
    """

    window_seconds: int = 60
    allowed_lateness_seconds: int = 2 * 3600
    early_firing_seconds: int = 30
    streaming: bool = False
    tick_seconds: int = 300
    gate_shards: int = 64

    def __post_init__(self):
        if self.window_seconds <= 0:
            raise ValueError(f"window_seconds must be positive, got {self.window_seconds}")
        if self.allowed_lateness_seconds < 0:
            raise ValueError(f"allowed_lateness_seconds must be >= 0, got {self.allowed_lateness_seconds}")
        if self.tick_seconds <= 0:
            raise ValueError(f"tick_seconds must be positive, got {self.tick_seconds}")
        if self.gate_shards <= 0:
            raise ValueError(f"gate_shards must be positive, got {self.gate_shards}")

    def window_start_us(self, timestamp_us: int) -> int:
        """Start of the fixed window holding `timestamp_us` (as `window.FixedWindows` assigns it)."""
        size = self.window_seconds * 1_000_000
        return timestamp_us - timestamp_us % size

    def window_expiry_us(self, timestamp_us: int) -> int:
        """The event time at which the window holding `timestamp_us` stops accepting data."""
        size = self.window_seconds * 1_000_000
        return (timestamp_us // size + 1) * size + self.allowed_lateness_seconds * 1_000_000


def timer_time(micros: int) -> Timestamp:
    """When to set an event-time timer that must not fire before `micros`.

    Beam timers keep whole milliseconds (the Fn API's timer coder drops the rest), so a timer
    set at 06:10:41.350442 would fire at .350000, before the moment it waits for.
    """
    return Timestamp(micros=-(-micros // 1000) * 1000)


def _shard(key: Any, shards: int) -> int:
    return zlib.crc32(repr(key).encode("utf-8")) % shards


@beam.typehints.with_input_types(tuple[int, Any])
@beam.typehints.with_output_types(tuple[Any, Any])
class _TooLateGateFn(beam.DoFn):
    """(shard, (key, value)) -> (key, value), or a ``too late`` dead letter. See the module docstring."""

    CLOSED_THROUGH = ReadModifyWriteStateSpec("closed_through_us", VarIntCoder())
    NEWEST = ReadModifyWriteStateSpec("newest_reported_us", VarIntCoder())
    STARTED = ReadModifyWriteStateSpec("started", VarIntCoder())
    ENDED = ReadModifyWriteStateSpec("ended", VarIntCoder())
    TICK = TimerSpec("tick", TimeDomain.WATERMARK)
    END_OF_INPUT = TimerSpec("end_of_input", TimeDomain.WATERMARK)

    def __init__(self, policy: WindowPolicy, stage: str, describe: Callable[[Any, Any], tuple[Any, int]]):
        self._policy = policy
        self._stage = stage
        self._describe = describe
        self._tick_us = policy.tick_seconds * 1_000_000

    def process(self, element, timestamp=beam.DoFn.TimestampParam,
                closed_state=beam.DoFn.StateParam(CLOSED_THROUGH), started=beam.DoFn.StateParam(STARTED),
                newest=beam.DoFn.StateParam(NEWEST),
                tick=beam.DoFn.TimerParam(TICK), end_of_input=beam.DoFn.TimerParam(END_OF_INPUT)):
        _, (key, value) = element
        micros = timestamp.micros
        closed_through = closed_state.read()
        if closed_through is not None and self._policy.window_expiry_us(micros) <= closed_through:
            yield self._too_late(key, value, micros, closed_through)
            return
        if not started.read():
            started.write(1)
            tick.set(Timestamp(micros=(micros // self._tick_us + 1) * self._tick_us))
            end_of_input.set(GlobalWindow().max_timestamp())
        reported = newest.read()
        if reported is None or micros >= reported + HORIZON_STEP_SECONDS * 1_000_000:
            newest.write(micros)
            yield TaggedOutput(HORIZON, micros)
        yield key, value

    @on_timer(TICK)
    def on_tick(self, fired=beam.DoFn.TimestampParam, closed_state=beam.DoFn.StateParam(CLOSED_THROUGH),
                ended=beam.DoFn.StateParam(ENDED), started=beam.DoFn.StateParam(STARTED),
                newest=beam.DoFn.StateParam(NEWEST), tick=beam.DoFn.TimerParam(TICK)):
        closed_state.write(fired.micros)
        reported = newest.read()
        within_reach = reported is not None and fired.micros <= self._policy.window_expiry_us(
            reported + HORIZON_STEP_SECONDS * 1_000_000) + self._tick_us
        if within_reach and not ended.read():
            tick.set(Timestamp(micros=fired.micros + self._tick_us))
        else:
            started.clear()   # rest: the next element re-arms the tick

    @on_timer(END_OF_INPUT)
    def on_end_of_input(self, ended=beam.DoFn.StateParam(ENDED)):
        ended.write(1)  # the watermark reached the end of time: a bounded input is done, stop ticking

    def _too_late(self, key, value, micros: int, closed_through: int) -> TaggedOutput:
        payload, count = self._describe(key, value)
        expiry = self._policy.window_expiry_us(micros)
        return TaggedOutput(DEAD_LETTERS, dead_letter(
            self._stage,
            f"too late: event time {_iso(micros)} is in a window that closed at {_iso(expiry)} "
            f"(allowed lateness {self._policy.allowed_lateness_seconds} s); the watermark had passed "
            f"{_iso(closed_through)}",
            payload, recorded_at=EPOCH + dt.timedelta(microseconds=closed_through),
            event_time=EPOCH + dt.timedelta(microseconds=micros), record_count=count,
        ))


def _iso(micros: int) -> str:
    return (EPOCH + dt.timedelta(microseconds=micros)).isoformat()


class ApplyWindowPolicy(beam.PTransform):
    """Keyed, timestamped elements -> the same, windowed per `WindowPolicy`; too-late ones to dead letters.

    Returns a dict: ``{"windowed": PCollection[(key, value)], "dead_letters": PCollection[dict],
    "horizon": PCollection[int]}`` (horizon: event times in microseconds that the data has
    reached, see the module docstring; empty in batch).
    `describe(key, value) -> (payload, record_count)` builds the dead-letter payload (already
    free of identifiers) and says how many input records the element stands for.
    """

    def __init__(self, policy: WindowPolicy, *, stage: str, describe: Callable[[Any, Any], tuple[Any, int]]):
        super().__init__()
        self._policy = policy
        self._stage = stage
        self._describe = describe

    def expand(self, keyed):
        policy = self._policy
        if policy.streaming:
            gated = (
                keyed
                | "ShardForGate" >> beam.Map(lambda kv, n=policy.gate_shards: (_shard(kv[0], n), kv))
                | "DeadLetterTooLate" >> beam.ParDo(_TooLateGateFn(policy, self._stage, self._describe))
                .with_outputs(DEAD_LETTERS, HORIZON, main="on_time")
            )
            keyed, too_late, horizon = gated.on_time, gated[DEAD_LETTERS], gated[HORIZON]
            windowing = dict(
                trigger=trigger.AfterWatermark(
                    early=trigger.AfterProcessingTime(policy.early_firing_seconds),
                    late=trigger.AfterCount(1)),
                accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
                allowed_lateness=Duration(seconds=policy.allowed_lateness_seconds + policy.tick_seconds),
            )
        else:
            too_late = keyed.pipeline | "NoTooLateInBatch" >> beam.Create([])
            horizon = keyed.pipeline | "NoHorizonInBatch" >> beam.Create([])
            windowing = {}
        windowed = keyed | "FixedWindows" >> beam.WindowInto(window.FixedWindows(policy.window_seconds), **windowing)
        return {"windowed": windowed, DEAD_LETTERS: too_late, HORIZON: horizon}


class _HoldUntilTheDataPassesFn(beam.DoFn):
    """(0, ("horizon", micros) | ("held", (due_us, element))) -> the held elements, once the data passes due_us.

    One key: horizons are a few per gate shard and ``HORIZON_STEP_SECONDS``, held elements rare.
    What is still held when the input ends is dropped and counted, never emitted.
    """

    REACHED = ReadModifyWriteStateSpec("reached_us", VarIntCoder())
    HELD = ReadModifyWriteStateSpec("held", PickleCoder())
    END_OF_INPUT = TimerSpec("end_of_input", TimeDomain.WATERMARK)

    def __init__(self, what: str):
        self._dropped = Metrics.counter("windowing", f"{what}_dropped_past_the_data")

    def process(self, element, reached_state=beam.DoFn.StateParam(REACHED), held_state=beam.DoFn.StateParam(HELD),
                end_of_input=beam.DoFn.TimerParam(END_OF_INPUT)):
        _, (kind, value) = element
        reached, held = reached_state.read(), held_state.read() or []
        if kind == HORIZON:
            reached = value if reached is None else max(reached, value)
            reached_state.write(reached)
        else:
            held.append(value)
            end_of_input.set(GlobalWindow().max_timestamp())
        due = [item for item in held if reached is not None and item[0] <= reached]
        if due:
            held = [item for item in held if reached is None or item[0] > reached]
            yield from (item for _, item in sorted(due, key=lambda pair: pair[0]))
        held_state.write(held)

    @on_timer(END_OF_INPUT)
    def on_end_of_input(self, held_state=beam.DoFn.StateParam(HELD)):
        self._dropped.inc(len(held_state.read() or []))
        held_state.clear()


class HoldUntilTheDataPasses(beam.PTransform):
    """Elements due at an event time -> the same elements, only once some data has reached that time.

    For what a watermark timer concludes from silence (a stale sensor): when the watermark jumps
    to the end of time at the end of a bounded input or a drain, every pending timer fires although
    nothing was silent; held here, those conclusions never come out. Input: a dict with
    ``"elements"`` (any element), ``"due_us"`` (element -> the event time it is about, µs) and
    ``"horizon"`` (`ApplyWindowPolicy`'s horizon output). Output: the elements, in the global window.
    """

    def __init__(self, due_us: Callable[[Any], int], *, what: str):
        super().__init__()
        self._due_us = due_us
        self._what = what

    def expand(self, inputs):
        held = (inputs["elements"]
                | "HeldInGlobalWindow" >> beam.WindowInto(window.GlobalWindows())
                | "Hold" >> beam.Map(lambda element, due=self._due_us: (0, ("held", (due(element), element)))))
        reached = (inputs[HORIZON]
                   | "HorizonInGlobalWindow" >> beam.WindowInto(window.GlobalWindows())
                   | "Reached" >> beam.Map(lambda micros: (0, (HORIZON, micros))))
        return (
            (held, reached)
            | "Flatten" >> beam.Flatten()
            | "ReleasePastTheData" >> beam.ParDo(_HoldUntilTheDataPassesFn(self._what))
        )
