"""The patient twin: windowed vital signs, NEWS2, running baselines, and patient alerts.

In:  ``chunks``        PCollection[(patient_key, SampleChunk)], event-timestamped (from decode);
     ``observations``  PCollection[(patient_key, ClinicalObservation)] (consciousness, oxygen).
Out: ``patient_twin``  rows of `schemas.PATIENT_TWIN` (one per pane, plus the final row per window);
     ``alerts``        rows of `schemas.ALERTS` (NEWS2 band onsets, stale sensors);
     ``dead_letters``  samples too late for their window.

NEWS2 needs consciousness and supplemental oxygen, which no wearable measures.
They come from the latest nurse observation at or before the window end (no
older than `observation_max_age_hours`); without one they are listed in
``news2_missing`` and never assumed normal.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from transforms.dead_letters import DEAD_LETTERS
from transforms.decode import SampleChunk, to_micros
from transforms.news2 import score_news2
from transforms.panes import PANE, AttachPane, PendingWindows, as_datetime, final_pane_fields, window_fields
from transforms.twin_state import VersionedStateCoder
from transforms.vital_stats import CollectWindowedSamplesFn, VitalStatsFn, window_statistics
from transforms.windowing import HORIZON, ApplyWindowPolicy, HoldUntilTheDataPasses, WindowPolicy, timer_time

ALERTS = "alerts"
STALE_KIND = "sensor_stale"
OBSERVATION = "observation"
ELEVATED_BAND_LEVELS = {"medium": 2, "high": 3}
OBSERVATIONS_KEPT = 64  # newest nurse observations a patient's history keeps (hourly: over two days)


@dataclasses.dataclass(frozen=True)
class PatientTwinConfig:
    """Patient-twin settings (window policy aside, all clinical or sensor assumptions).

    Attributes:
      policy: how wearable samples are windowed (default 1 minute, 2 hours lateness).
      expected_sample_seconds: the wearable's nominal sampling interval, for completeness.
      baseline_half_life_hours: half-life of the exponentially weighted baselines.
      stale_after_seconds: a sensor silent this long is stale.
      observation_max_age_hours: older nurse observations are not used for NEWS2.
      retention_days: streaming: a patient silent this long (event time) is forgotten: its state
        is cleared (a discharged patient costs nothing); one who comes back starts new baselines.
    """

    policy: WindowPolicy = WindowPolicy()
    expected_sample_seconds: float = 5.0
    baseline_half_life_hours: float = 6.0
    stale_after_seconds: int = 600
    observation_max_age_hours: float = 12.0
    retention_days: float = 7.0


HISTORY_LAYOUT = 1  # bump when a PatientHistory field changes meaning (transforms/twin_state.py)


@dataclasses.dataclass
class PatientHistory:
    """What one patient's twin remembers across windows (state of `PatientStateFn`)."""

    baseline_heart_rate: float | None = None
    baseline_temperature_c: float | None = None
    last_final_sample_us: int | None = None   # newest sample of the finalised windows
    newest_sample_us: int | None = None       # newest sample seen in any pane
    stale_alerted_us: int | None = None       # the newest sample a sensor_stale alert was raised after
    news2_alerted_level: int = 0              # 2 medium, 3 high: the episode's alerted level
    news2_last_elevated_us: int | None = None  # window start of the latest medium/high window
    observations: list = dataclasses.field(default_factory=list)  # [(event_us, consciousness, oxygen)]


def _describe_chunk(key, chunk: SampleChunk):
    payload = {"patient_key": key, "device_id": chunk.device_id, "samples": len(chunk.times_us),
               "first_sample": as_datetime(chunk.times_us[0]).isoformat(),
               "last_sample": as_datetime(chunk.times_us[-1]).isoformat()}
    return payload, len(chunk.times_us)


@functools.lru_cache(maxsize=16)
def _statistics_fields(pane_fields: tuple[str, ...]) -> tuple[str, ...]:
    """The fields of a pane that go into its row as they are: not the ``*_us`` times, not the pane's own."""
    return tuple(name for name in pane_fields
                 if not name.endswith("_us") and name not in ("pane_index", "pane_timing", "is_last"))


class PatientStateFn(beam.DoFn):
    """(patient_key, ("pane", stats) | ("observation", obs)) -> patient_twin rows, and alerts.

    Provisional rows (streaming panes) go out at once, judged against the history so far;
    each window's final row goes out when it expires, in window order, and only then updates
    the history, so final rows do not depend on arrival order.
    """

    PENDING = ReadModifyWriteStateSpec("pending", PickleCoder())
    HISTORY = ReadModifyWriteStateSpec("history", VersionedStateCoder(PatientHistory, HISTORY_LAYOUT))
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)
    STALE = TimerSpec("stale", TimeDomain.WATERMARK)
    RETENTION = TimerSpec("retention", TimeDomain.WATERMARK)

    def __init__(self, config: PatientTwinConfig):
        self._config = config
        self._policy = config.policy
        window_hours = self._policy.window_seconds / 3600
        self._baseline_weight = 1 - 0.5 ** (window_hours / config.baseline_half_life_hours)
        self._stale_us = config.stale_after_seconds * 1_000_000
        self._retention_us = int(config.retention_days * 86400 * 1_000_000)
        self._forgotten = Metrics.counter("patient_twin", "patients_forgotten_after_retention")

    def process(self, element, pending_state=beam.DoFn.StateParam(PENDING),
                history_state=beam.DoFn.StateParam(HISTORY), expiry=beam.DoFn.TimerParam(EXPIRY),
                stale=beam.DoFn.TimerParam(STALE), retention=beam.DoFn.TimerParam(RETENTION)):
        key, (kind, payload) = element
        history = history_state.read() or PatientHistory()
        if kind == OBSERVATION:
            self._remember_observation(history, payload)
            history_state.write(history)
            return
        pending = PendingWindows(self._policy, pending_state.read())
        pane = payload
        provisional = not pane["is_last"]
        if provisional:
            row, alerts = self._judge(key, pane, history, {"pane_index": pane["pane_index"],
                                                           "pane_timing": pane["pane_timing"], "is_final": False},
                                      earlier_panes=pending.panes_before(pane["window_start_us"]))
            yield row
            yield from (TaggedOutput(ALERTS, alert) for alert in alerts)
        pending.add(pane, emitted=provisional)
        pending_state.write(pending.entries)
        expiry.set(Timestamp(micros=pending.next_expiry_us()))
        if self._policy.streaming and (history.newest_sample_us is None
                                       or pane["last_sample_us"] > history.newest_sample_us):
            # Samples after a silence can arrive before the watermark reached the stale timer: the
            # silence is then known from the data, and the timer moves on to the new samples.
            if (history.newest_sample_us is not None
                    and pane["first_sample_us"] - history.newest_sample_us > self._stale_us):
                yield from (TaggedOutput(ALERTS, alert) for alert in self._stale_once(key, history))
            history.newest_sample_us = pane["last_sample_us"]
            stale.set(timer_time(history.newest_sample_us + self._stale_us))
            retention.set(timer_time(history.newest_sample_us + self._retention_us))
        history_state.write(history)

    @on_timer(EXPIRY)
    def on_expiry(self, key=beam.DoFn.KeyParam, fired=beam.DoFn.TimestampParam,
                  pending_state=beam.DoFn.StateParam(PENDING), history_state=beam.DoFn.StateParam(HISTORY),
                  expiry=beam.DoFn.TimerParam(EXPIRY)):
        pending = PendingWindows(self._policy, pending_state.read())
        history = history_state.read() or PatientHistory()
        for entry in pending.pop_due(fired.micros):
            pane = entry["pane"]
            row, alerts = self._judge(key, pane, history, final_pane_fields(entry))
            at = pending.expiry_us(pane["window_start_us"])
            yield TimestampedValue(row, Timestamp(micros=at))
            yield from (TaggedOutput(ALERTS, TimestampedValue(alert, Timestamp(micros=at))) for alert in alerts)
            self._learn(history, row, pane)
        pending_state.write(pending.entries)
        history_state.write(history)
        if pending.next_expiry_us() is not None:
            expiry.set(Timestamp(micros=pending.next_expiry_us()))

    @on_timer(STALE)
    def on_stale(self, key=beam.DoFn.KeyParam, fired=beam.DoFn.TimestampParam,
                 history_state=beam.DoFn.StateParam(HISTORY)):
        history = history_state.read() or PatientHistory()
        if history.newest_sample_us is not None and history.newest_sample_us + self._stale_us <= fired.micros:
            yield from (TaggedOutput(ALERTS, TimestampedValue(alert, Timestamp(micros=fired.micros)))
                        for alert in self._stale_once(key, history))
            history_state.write(history)

    @on_timer(RETENTION)
    def on_retention(self, fired=beam.DoFn.TimestampParam, pending_state=beam.DoFn.StateParam(PENDING),
                     history_state=beam.DoFn.StateParam(HISTORY), retention=beam.DoFn.TimerParam(RETENTION)):
        history = history_state.read()
        if history is None or history.newest_sample_us is None \
                or history.newest_sample_us + self._retention_us > fired.micros:
            return
        pending = PendingWindows(self._policy, pending_state.read())
        if pending.entries:   # windows still to finalise first (a runner may fire this timer before theirs)
            retention.set(timer_time(max(fired.micros + 1000, *(pending.expiry_us(s) for s in pending.entries))))
            return
        history_state.clear()
        pending_state.clear()
        self._forgotten.inc()

    def _stale_once(self, key, history: PatientHistory):
        """The sensor_stale alert for the silence after ``history.newest_sample_us``, unless raised already."""
        if history.stale_alerted_us != history.newest_sample_us:
            history.stale_alerted_us = history.newest_sample_us
            yield self._stale_alert(key, history.newest_sample_us)

    # -- one window ---------------------------------------------------------------------------

    def _judge(self, key, pane, history: PatientHistory, pane_fields: dict, *,
               earlier_panes: list[dict] = ()) -> tuple[dict, list[dict]]:
        """The twin row for `pane` and the alerts it raises (one per onset: the history remembers).

        earlier_panes: panes of earlier windows that are not final yet (a provisional row's); a
        final row has none, as windows are finalised in order.
        """
        before = [p["last_sample_us"] for p in earlier_panes]
        if history.last_final_sample_us is not None:
            before.append(history.last_final_sample_us)
        previous_sample_us = max(before, default=None)
        row = self._row(key, pane, history, pane_fields, previous_sample_us)
        alerts = []
        band_level = ELEVATED_BAND_LEVELS.get(row["news2_band"], 0)
        if band_level > history.news2_alerted_level:
            history.news2_alerted_level = band_level
            alerts.append(self._news2_alert(key, row))
        if band_level:
            history.news2_last_elevated_us = max(history.news2_last_elevated_us or 0, pane["window_start_us"])
        if not self._policy.streaming and row["stale"]:
            alerts.append(self._stale_alert(key, previous_sample_us))
        return row, alerts

    def _row(self, key, pane, history: PatientHistory, pane_fields: dict, previous_sample_us: int | None) -> dict:
        consciousness, oxygen = self._observation_at(history, pane["window_end_us"])
        news2 = score_news2(
            respiratory_rate=pane["respiratory_rate_mean"], spo2=pane["spo2_mean"],
            systolic_bp=pane["systolic_bp_mean"], heart_rate=pane["heart_rate_mean"],
            temperature_c=pane["temperature_c_mean"], consciousness=consciousness, supplemental_oxygen=oxygen,
        )
        expected = self._policy.window_seconds / self._config.expected_sample_seconds
        stats = {name: pane[name] for name in _statistics_fields(tuple(pane))}
        gap_us = pane["first_sample_us"] - previous_sample_us if previous_sample_us is not None else None
        return {
            "patient_key": key,
            **window_fields(pane),
            **pane_fields,
            **stats,
            "completeness": min(1.0, pane["sample_count"] / expected),
            "consciousness": consciousness,
            "supplemental_oxygen": oxygen,
            "news2_score": news2.score,
            "news2_band": news2.band,
            "news2_missing": list(news2.missing),
            "baseline_heart_rate": history.baseline_heart_rate,
            "baseline_temperature_c": history.baseline_temperature_c,
            "heart_rate_trend": _difference(pane["heart_rate_mean"], history.baseline_heart_rate),
            "temperature_trend": _difference(pane["temperature_c_mean"], history.baseline_temperature_c),
            "gap_before_seconds": gap_us / 1_000_000 if gap_us is not None else None,
            "stale": gap_us is not None and gap_us > self._stale_us,
        }

    def _learn(self, history: PatientHistory, row: dict, pane: dict) -> None:
        """Folds a final window into the baselines, and ends a NEWS2 episode on a calmer later window."""
        history.baseline_heart_rate = self._ewma(history.baseline_heart_rate, pane["heart_rate_mean"])
        history.baseline_temperature_c = self._ewma(history.baseline_temperature_c, pane["temperature_c_mean"])
        history.last_final_sample_us = max(history.last_final_sample_us or 0, pane["last_sample_us"])
        calmer = row["news2_band"] not in ELEVATED_BAND_LEVELS
        if calmer and pane["window_start_us"] > (history.news2_last_elevated_us or -1):
            history.news2_alerted_level = 0

    def _ewma(self, baseline: float | None, value: float | None) -> float | None:
        if value is None:
            return baseline
        if baseline is None:
            return value
        return baseline + self._baseline_weight * (value - baseline)

    # -- observations --------------------------------------------------------------------------

    def _remember_observation(self, history: PatientHistory, observation: dict) -> None:
        entry = (to_micros(observation["event_time"]), observation.get("consciousness"),
                 observation.get("supplemental_oxygen"))
        history.observations = sorted(history.observations + [entry])[-OBSERVATIONS_KEPT:]

    def _observation_at(self, history: PatientHistory, at_us: int):
        """(consciousness, supplemental_oxygen) from the latest observations at or before `at_us`."""
        oldest = at_us - int(self._config.observation_max_age_hours * 3600 * 1_000_000)
        consciousness = oxygen = None
        for event_us, level, on_oxygen in history.observations:
            if event_us > at_us:
                break
            if event_us < oldest:
                continue
            consciousness = level if level is not None else consciousness
            oxygen = on_oxygen if on_oxygen is not None else oxygen
        return consciousness, oxygen

    # -- alerts --------------------------------------------------------------------------------

    def _news2_alert(self, key, row) -> dict:
        evidence = {name: row[name] for name in (
            "news2_score", "news2_band", "news2_missing", "respiratory_rate_mean", "spo2_mean", "systolic_bp_mean",
            "heart_rate_mean", "temperature_c_mean", "consciousness", "supplemental_oxygen", "pane_index", "is_final")}
        onset = row["window_start"]
        return {
            "alert_id": f"news2_band:{key}:{onset.isoformat()}:{row['news2_band']}",
            "kind": "news2_band", "subject_type": "patient", "subject_id": key,
            "severity": "urgent" if row["news2_band"] == "high" else "warning",
            "onset_time": onset, "window_end": row["window_end"],
            "message": f"NEWS2 {row['news2_score']} ({row['news2_band']} clinical risk)"
                       + (f"; not measured: {', '.join(row['news2_missing'])}" if row["news2_missing"] else ""),
            "evidence": json.dumps(evidence, default=str, sort_keys=True),
        }

    def _stale_alert(self, key, last_sample_us: int) -> dict:
        onset = as_datetime(last_sample_us + self._stale_us)
        minutes = self._config.stale_after_seconds / 60
        return {
            "alert_id": f"sensor_stale:{key}:{onset.isoformat()}",
            "kind": STALE_KIND, "subject_type": "patient", "subject_id": key, "severity": "warning",
            "onset_time": onset, "window_end": None,
            "message": f"no wearable sample for more than {minutes:g} minutes",
            "evidence": json.dumps({"last_sample": as_datetime(last_sample_us).isoformat(),
                                    "stale_after_seconds": self._config.stale_after_seconds}),
        }


def _difference(value: float | None, baseline: float | None) -> float | None:
    return value - baseline if value is not None and baseline is not None else None


BLOCK_SECONDS = 3600  # batch: a patient's samples are combined about an hour (whole windows) at a time


def _patient_block(policy: WindowPolicy, block_us: int):
    """(patient_key, SampleChunk) -> ((patient_key, block start), chunk): the hour of the chunk's window."""
    def keyed(element):
        key, chunk = element
        window_start_us = policy.window_start_us(int(chunk.times_us[0]))
        return (key, window_start_us - window_start_us % block_us), chunk
    return keyed


class BlockWindowStatisticsFn(beam.DoFn):
    """Batch: ((patient_key, block start), WindowedSamples) -> (patient_key, (window_start_us, stats)) per window.

    A block holds at most `BLOCK_SECONDS` of one patient's samples, however long the run: the
    ``batch_block_samples_held`` distribution records how many samples each block held.
    """

    def __init__(self):
        self._held = Metrics.distribution("patient_twin", "batch_block_samples_held")

    def process(self, element):
        (key, _), samples = element
        self._held.update(len(samples.times_us))
        for start_us, stats in window_statistics(samples):
            yield key, (start_us, stats)


class FoldPatientTimelineFn(beam.DoFn):
    """Batch: (patient_key, [(window_start_us, stats)]), with all observations by patient -> rows and alerts.

    In batch every window is complete and every observation is known up front, so one call per
    patient judges the patient's windows in order with `PatientStateFn`'s own rules, from the
    statistics `BlockWindowStatisticsFn` computed (the rules of `VitalStatsFn`). Memory: the
    windows' statistics (about 1 KB a window), not their samples; the ``batch_fold_windows_held``
    distribution records how many windows each call held.
    """

    def __init__(self, config: PatientTwinConfig):
        self._rules = PatientStateFn(config)
        self._policy = config.policy
        self._held = Metrics.distribution("patient_twin", "batch_fold_windows_held")

    def process(self, element, observations):
        key, windows = element
        windows = sorted(windows, key=lambda window: window[0])
        self._held.update(len(windows))
        history = PatientHistory()
        # Observations are remembered as the timeline reaches them, as a stream would deliver them:
        # the history keeps a bounded number, which must be those around the window being judged.
        pending = collections.deque(sorted(observations[key], key=lambda observation: observation["event_time"]))
        for start_us, stats in windows:
            pane = _batch_pane(stats, start_us, self._policy)
            window_end = as_datetime(pane["window_end_us"])
            while pending and pending[0]["event_time"] <= window_end:
                self._rules._remember_observation(history, pending.popleft())
            row, alerts = self._rules._judge(key, pane, history, final_pane_fields({"pane": pane, "emitted": False}))
            at = Timestamp(micros=pane["window_end_us"])
            yield TimestampedValue(row, at)
            yield from (TaggedOutput(ALERTS, TimestampedValue(alert, at)) for alert in alerts)
            self._rules._learn(history, row, pane)


def _batch_pane(stats: dict, window_start_us: int, policy: WindowPolicy) -> dict:
    """A batch window's only pane, with the fields `AttachPane` gives it: on time, index 0, the last."""
    return {**stats, "window_start_us": window_start_us,
            "window_end_us": window_start_us + policy.window_seconds * 1_000_000,
            "pane_index": 0, "pane_timing": "ON_TIME", "is_last": True}


class PatientTwin(beam.PTransform):
    """Wearable chunks + nurse observations -> patient_twin rows, patient alerts, too-late dead letters.

    Streaming: chunks are windowed (`ApplyWindowPolicy`), combined per window (`VitalStatsFn`) and
    judged pane by pane with state and timers (`PatientStateFn`). Batch: each patient's chunks are
    combined an hour at a time into a block before the shuffle, each chunk in the fixed window of
    its first sample, its event timestamp (`CollectWindowedSamplesFn`); each block gives its
    windows' statistics (`BlockWindowStatisticsFn`), and a patient's windows are folded in order
    in one call with the patient's observations (`FoldPatientTimelineFn`); nothing can be too late.
    Samples held at once: one patient-hour, whatever the run's length.
    Both give the same final rows.
    """

    def __init__(self, config: PatientTwinConfig = PatientTwinConfig()):
        super().__init__()
        self._config = config

    def expand(self, inputs):
        policy = self._config.policy
        observations = inputs["observations"]
        if not policy.streaming:
            # Whole windows per block: a window's chunks all meet in one block.
            block_us = policy.window_seconds * 1_000_000 * max(1, BLOCK_SECONDS // policy.window_seconds)
            windows = (
                inputs["chunks"]
                | "ByPatientHour" >> beam.Map(_patient_block(policy, block_us))
                | "CollectPerPatientHour" >> beam.CombinePerKey(CollectWindowedSamplesFn(policy))
                | "WindowStatistics" >> beam.ParDo(BlockWindowStatisticsFn())
                | "WindowsPerPatient" >> beam.GroupByKey()
            )
            # Nurse observations are few (a handful per patient and day): a side input, looked up by patient.
            outputs = windows | "FoldTimeline" >> beam.ParDo(
                FoldPatientTimelineFn(self._config), observations=beam.pvalue.AsMultiMap(observations),
            ).with_outputs(ALERTS, main="patient_twin")
            too_late = windows.pipeline | "NoTooLateInBatch" >> beam.Create([])
            return {"patient_twin": outputs.patient_twin, ALERTS: outputs[ALERTS], DEAD_LETTERS: too_late}
        windowed = inputs["chunks"] | "WindowSamples" >> ApplyWindowPolicy(
            policy, stage="window_wearables", describe=_describe_chunk)
        panes = (
            windowed["windowed"]
            | "VitalStatsPerWindow" >> beam.CombinePerKey(VitalStatsFn())
            | "AttachPane" >> AttachPane(policy.streaming)
        )
        observations = observations | "TagObservations" >> beam.Map(lambda kv: (kv[0], (OBSERVATION, kv[1])))
        timeline = (panes, observations) | "PanesAndObservations" >> beam.Flatten()
        outputs = timeline | "PatientState" >> beam.ParDo(PatientStateFn(self._config)).with_outputs(
            ALERTS, main="patient_twin")
        # A stale timer also fires when the input ends or the job drains: such alerts never come out.
        stale, other = outputs[ALERTS] | "StaleOrNot" >> beam.Partition(
            lambda alert, _: 1 - (alert["kind"] == STALE_KIND), 2)
        stale = {"elements": stale, HORIZON: windowed[HORIZON]} | "StaleOnlyWithinTheData" >> HoldUntilTheDataPasses(
            lambda alert: to_micros(alert["onset_time"]), what="sensor_stale_alerts")
        alerts = (stale, other) | "PatientAlerts" >> beam.Flatten()
        return {"patient_twin": outputs.patient_twin, ALERTS: alerts, DEAD_LETTERS: windowed[DEAD_LETTERS]}
