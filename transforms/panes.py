"""Pane bookkeeping shared by the patient and device twins.

After a windowed combine, `AttachPane` turns each (key, stats) pane into
(key, ("pane", stats + window and pane fields)) in the global window, so one
stateful DoFn per key can see every pane of every window of that key.

`PendingWindows` is the state those DoFns keep: the latest pane of each window
that is not final yet. A window becomes final when the watermark passes its
expiry (window end + allowed lateness + gate tick in streaming; the end of
input in batch): the DoFn re-emits the latest pane with ``is_final`` true and
the next pane index. Finalising in window order makes the cross-window state
(baselines, histories) independent of arrival order, so batch and streaming
runs agree on final rows.
"""

from __future__ import annotations

import datetime as dt

import apache_beam as beam
from apache_beam.transforms import window as beam_window
from apache_beam.utils.windowed_value import PaneInfoTiming

from transforms.windowing import WindowPolicy

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
PANE = "pane"

_TIMING_NAMES = {
    PaneInfoTiming.EARLY: "EARLY",
    PaneInfoTiming.ON_TIME: "ON_TIME",
    PaneInfoTiming.LATE: "LATE",
    PaneInfoTiming.UNKNOWN: "UNKNOWN",
}


def as_datetime(micros: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=int(micros))


class _AttachPaneFn(beam.DoFn):
    def __init__(self, streaming: bool):
        self._streaming = streaming

    def process(self, element, window=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam):
        key, stats = element
        if stats is None:
            # A pane of no elements, as Flink's runner emits for some windows (seen in the runner
            # matrix, tests/test_runners.py). It adds nothing; the window is finalised by the twin's
            # expiry timer from the panes it has already seen.
            return
        timing = _TIMING_NAMES.get(pane.timing, "UNKNOWN")
        yield key, (PANE, {
            **stats,
            "window_start_us": window.start.micros,
            "window_end_us": window.end.micros,
            "pane_index": pane.index,
            "pane_timing": "ON_TIME" if not self._streaming and timing == "UNKNOWN" else timing,
            # A batch pane holds all the data there will ever be for its window.
            "is_last": pane.is_last or not self._streaming,
        })


class AttachPane(beam.PTransform):
    """(key, stats) per window pane -> (key, ("pane", stats with window/pane fields)), globally windowed.

    Panes whose stats are None (no elements: see `_AttachPaneFn`) are dropped.
    """

    def __init__(self, streaming: bool):
        super().__init__()
        self._streaming = streaming

    def expand(self, stats):
        return (
            stats
            | "WindowAndPaneFields" >> beam.ParDo(_AttachPaneFn(self._streaming))
            | "IntoGlobalWindow" >> beam.WindowInto(beam_window.GlobalWindows())
        )


class PendingWindows:
    """The latest pane of each not-yet-final window of one key (kept in a ReadModifyWriteState).

    Each entry: ``{"pane": dict, "emitted": bool}``; ``emitted`` says whether a provisional row
    for the window has gone out already, so the final row takes the next pane index.
    """

    def __init__(self, policy: WindowPolicy, entries: dict | None = None):
        self._policy = policy
        self.entries: dict[int, dict] = entries or {}

    def expiry_us(self, window_start_us: int) -> int:
        """When a window's final row is due: after the last moment a late pane could still arrive."""
        end = window_start_us + self._policy.window_seconds * 1_000_000
        if not self._policy.streaming:
            return end
        return end + (self._policy.allowed_lateness_seconds + self._policy.tick_seconds) * 1_000_000

    def add(self, pane: dict, *, emitted: bool) -> None:
        start = pane["window_start_us"]
        current = self.entries.get(start)
        if current is None or pane["pane_index"] >= current["pane"]["pane_index"]:
            self.entries[start] = {"pane": pane, "emitted": emitted or bool(current and current["emitted"])}

    def pop_due(self, now_us: int) -> list[dict]:
        """Entries whose expiry is at or before `now_us`, in window order, removed from the set."""
        due = sorted(start for start in self.entries if self.expiry_us(start) <= now_us)
        return [self.entries.pop(start) for start in due]

    def panes_before(self, window_start_us: int) -> list[dict]:
        """The latest panes of the pending windows that start before `window_start_us`, in window order.

        A provisional row is judged with these beside what the final windows taught the state.
        """
        return [self.entries[start]["pane"] for start in sorted(self.entries) if start < window_start_us]

    def next_expiry_us(self) -> int | None:
        return min((self.expiry_us(start) for start in self.entries), default=None)


def final_pane_fields(entry: dict) -> dict:
    """Pane fields of the final row for a pending entry."""
    pane = entry["pane"]
    return {
        "pane_index": pane["pane_index"] + 1 if entry["emitted"] else pane["pane_index"],
        "pane_timing": pane["pane_timing"],
        "is_final": True,
    }


def window_fields(pane: dict) -> dict:
    return {"window_start": as_datetime(pane["window_start_us"]), "window_end": as_datetime(pane["window_end_us"])}
