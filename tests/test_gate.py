"""The too-late gate's ticks: they follow the data, and stop within reach of it.

The DoFn's methods are driven directly with in-memory state and timers, as a runner that fires
timers strictly in order would: after the end of the input (the watermark at the end of time) every
re-armed tick fires at once, so the chain must end by itself.
"""

from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from transforms.windowing import HORIZON, HORIZON_STEP_SECONDS, WindowPolicy, _TooLateGateFn

POLICY = WindowPolicy(window_seconds=60, allowed_lateness_seconds=1200, tick_seconds=300, streaming=True)
T0 = 1_772_431_200_000_000   # 2026-03-02 06:00 UTC


class _State:
    def __init__(self):
        self.value = None

    def read(self):
        return self.value

    def write(self, value):
        self.value = value

    def clear(self):
        self.value = None


class _Timer:
    def __init__(self):
        self.at = None

    def set(self, timestamp):
        self.at = timestamp

    def clear(self):
        self.at = None


def _gate():
    fn = _TooLateGateFn(POLICY, "window_test", lambda key, value: (value, 1))
    states = {name: _State() for name in ("closed", "started", "ended", "newest")}
    timers = {"tick": _Timer(), "end": _Timer()}
    return fn, states, timers


def _send(fn, states, timers, micros, value="x"):
    return list(fn.process((0, ("key", value)), timestamp=Timestamp(micros=micros),
                           closed_state=states["closed"], started=states["started"], newest=states["newest"],
                           tick=timers["tick"], end_of_input=timers["end"]))


def _fire_ticks_in_order(fn, states, timers, limit=100_000) -> int:
    """Fires the tick timer until it is no longer armed (the watermark at the end of time)."""
    fired = 0
    while timers["tick"].at is not None and fired < limit:
        at, timers["tick"].at = timers["tick"].at, None
        fn.on_tick(fired=at, closed_state=states["closed"], ended=states["ended"], started=states["started"],
                   newest=states["newest"], tick=timers["tick"])
        fired += 1
    return fired


def test_ticks_end_within_reach_of_the_data_when_timers_fire_in_order():
    fn, states, timers = _gate()
    for second in range(0, 600, 5):
        _send(fn, states, timers, T0 + second * 1_000_000)
    assert timers["end"].at == GlobalWindow().max_timestamp()
    fired = _fire_ticks_in_order(fn, states, timers)
    # From the first tick after the data to its window's expiry plus one tick: a handful, not 3e10.
    reach_us = POLICY.window_expiry_us(T0 + (595 + HORIZON_STEP_SECONDS) * 1_000_000) + 300_000_000
    assert 0 < fired <= (reach_us - T0) // 300_000_000 + 1
    assert states["closed"].value >= POLICY.window_expiry_us(T0 + 595 * 1_000_000)


def test_a_resting_shard_wakes_on_its_next_element_and_still_refuses_what_it_closed():
    fn, states, timers = _gate()
    _send(fn, states, timers, T0)
    _fire_ticks_in_order(fn, states, timers)
    closed = states["closed"].value
    assert timers["tick"].at is None and states["started"].value is None   # resting
    # Later data re-arms the tick; data from a window closed before the rest is a dead letter.
    later = closed + 3600 * 1_000_000
    assert [out for out in _send(fn, states, timers, later) if not hasattr(out, "tag")] == [("key", "x")]
    assert timers["tick"].at is not None
    refused = _send(fn, states, timers, T0, value="old")
    assert [out.tag for out in refused] == ["dead_letters"]


def test_the_gate_reports_the_newest_event_time_once_per_step():
    fn, states, timers = _gate()
    reported = []
    for second in range(0, 60):
        reported += [out.value for out in _send(fn, states, timers, T0 + second * 1_000_000)
                     if getattr(out, "tag", None) == HORIZON]
    assert reported == [T0 + second * 1_000_000 for second in range(0, 60, HORIZON_STEP_SECONDS)]
