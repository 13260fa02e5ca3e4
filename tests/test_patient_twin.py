"""The patient twin: window statistics, NEWS2, panes, finality, lateness, alerts."""

import random

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.coders import TimestampCoder
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from schemas import ALERTS as ALERTS_TABLE
from schemas import DEAD_LETTERS as DEAD_LETTERS_TABLE
from schemas import PATIENT_TWIN, SchemaError, validate
from transforms.decode import to_micros
from transforms.patient_twin import PatientTwin, PatientTwinConfig
from transforms.vital_stats import CollectWindowedSamplesFn, VitalStatsFn, summarise, window_statistics
from transforms.windowing import WindowPolicy, timer_time
from twin_fixtures import at, chunk, create_timestamped, observation, streaming_options, timestamped

PANE_FIELDS = ("pane_index", "pane_timing", "is_final")


def _config(streaming, lateness=120):
    return PatientTwinConfig(policy=WindowPolicy(window_seconds=60, allowed_lateness_seconds=lateness,
                                                 early_firing_seconds=10, streaming=streaming, tick_seconds=60),
                             expected_sample_seconds=5.0, stale_after_seconds=600)


def _schema_errors(table, row):
    try:
        validate(table, row)
    except SchemaError as error:
        yield str(error)


def _assert_valid(rows, table, label):
    """Every row of `rows` fits `table`; a failure lists the offending fields."""
    errors = rows | f"Validate {label}" >> beam.FlatMap(lambda row: _schema_errors(table, row))
    assert_that(errors, equal_to([]), label=f"{label} fit the schema")


def test_window_statistics_remove_duplicates_per_wearable():
    first = chunk([0, 5, 10], heart_rate=60.0)
    retry = chunk([5, 10, 15], heart_rate=90.0)          # same wearable: 5 and 10 are duplicates
    other = chunk([5], heart_rate=100.0, device="W-2")   # another wearable at the same time is not
    stats = summarise([first, retry, other])
    assert stats["sample_count"] == 5
    assert stats["duplicates_removed"] == 2
    assert stats["heart_rate_min"] == 60.0 and stats["heart_rate_max"] == 100.0
    assert stats["heart_rate_mean"] == pytest.approx((60 + 60 + 60 + 90 + 100) / 5)
    assert stats["heart_rate_last"] == 90.0  # the sample at 15 s
    assert stats["first_sample_us"] == to_micros(at(0))


def test_a_retry_after_compaction_is_still_a_duplicate_of_its_own_wearable():
    combine = VitalStatsFn()
    accumulator = combine.create_accumulator()
    for sent in (chunk([0, 5], heart_rate=60.0), chunk([5], heart_rate=100.0, device="W-2"),
                 chunk([5], heart_rate=60.0)):
        accumulator = combine.add_input(accumulator, sent)
    accumulator = combine.compact(accumulator)                     # a streaming runner may compact any time
    accumulator = combine.add_input(accumulator, chunk([0, 5], heart_rate=60.0))   # the first upload, retried
    stats = combine.extract_output(combine.compact(accumulator))
    assert stats["sample_count"] == 3 and stats["duplicates_removed"] == 3
    assert stats == summarise([chunk([0, 5], heart_rate=60.0), chunk([5], heart_rate=100.0, device="W-2"),
                               chunk([5], heart_rate=60.0), chunk([0, 5], heart_rate=60.0)])


@pytest.mark.parametrize("seed", range(20))
def test_batch_and_streaming_statistics_keep_the_same_copy_of_a_conflicting_retry(seed):
    rng = random.Random(seed)
    sent = [chunk([0, 5, 10], heart_rate=60.0), chunk([5, 10], heart_rate=90.0, stage="rem"),
            chunk([10], heart_rate=90.0, stage=None), chunk([5], heart_rate=100.0, device="W-2"),
            chunk([0, 5], heart_rate=60.0, spo2=95.0)]
    rng.shuffle(sent)
    # Streaming: any arrival order, compacted at any point.
    combine = VitalStatsFn()
    accumulator = combine.create_accumulator()
    for index, part in enumerate(sent):
        accumulator = combine.add_input(accumulator, part)
        if rng.random() < 0.5:
            accumulator = combine.compact(accumulator)
    streaming = combine.extract_output(accumulator)
    # Batch: the same chunks collected per patient, in another order, partly pre-combined.
    collect = CollectWindowedSamplesFn(WindowPolicy(window_seconds=60))
    rng.shuffle(sent)
    halves = [collect.create_accumulator(), collect.create_accumulator()]
    for index, part in enumerate(sent):
        halves[index % 2] = collect.add_input(halves[index % 2], part)
    halves = [collect.compact(half) if rng.random() < 0.5 else half for half in halves]
    (window,) = window_statistics(collect.extract_output(collect.merge_accumulators(halves)))
    assert window == (to_micros(at(0)), streaming)
    assert streaming["heart_rate_min"] == 60.0 and streaming["spo2_min"] == 95.0


@pytest.mark.parametrize("seed", range(10))
def test_statistics_with_gaps_are_the_same_per_window_and_per_patient_block(seed):
    """Windows with missing readings (a vital absent in some samples or a whole window, steps and
    stages absent): the batch block's statistics equal each window's own, float for float, and
    what a plain loop over the readings present gives."""
    rng = np.random.default_rng(seed)
    policy = WindowPolicy(window_seconds=60)
    chunks = []
    for window in range(4):
        base = np.arange(window * 60, window * 60 + 60, 5)
        for upload in np.array_split(base, int(rng.integers(1, 4))):
            sent = chunk(upload.tolist(), device=str(rng.choice(["W-1", "W-2"])))
            vitals = sent.vitals + rng.normal(0, 3, sent.vitals.shape).round(1)
            vitals[rng.random(vitals.shape) < 0.3] = np.nan
            if window == 2:
                vitals[:, 2] = np.nan  # no blood pressure at all in this window
            steps = np.where(rng.random(len(upload)) < 0.5, np.nan, sent.steps)
            stages = tuple(None if rng.random() < 0.4 else "light" for _ in upload)
            chunks.append(sent._replace(vitals=vitals, steps=steps, sleep_stages=stages))
    chunks.append(chunks[1])  # a retried upload
    collect = CollectWindowedSamplesFn(policy)
    block = collect.extract_output(collect.merge_accumulators(
        [collect.compact([c for c in chunks[::2]]), list(chunks[1::2])]))
    by_window = dict(window_statistics(block))
    assert sorted(by_window) == [to_micros(at(60 * w)) for w in range(4)]
    for start, stats in by_window.items():
        alone = [c for c in chunks if policy.window_start_us(int(c.times_us[0])) == start]
        assert stats == summarise(alone)
        merged = {}
        for c in alone:  # one copy per (wearable, time): retries here repeat samples exactly
            for i, t in enumerate(c.times_us.tolist()):
                merged[(c.device_id, t)] = (c.vitals[i], c.steps[i], c.sleep_stages[i])
        ordered = [merged[k] for k in sorted(merged, key=lambda k: (k[1], k[0]))]
        assert stats["sample_count"] == len(ordered)
        for column, name in enumerate(("heart_rate", "spo2", "systolic_bp")):
            present = [v[column] for v, _, _ in ordered if not np.isnan(v[column])]
            if present:
                assert stats[f"{name}_mean"] == pytest.approx(sum(present) / len(present), rel=1e-12)
                assert (stats[f"{name}_min"], stats[f"{name}_max"]) == (min(present), max(present))
                assert stats[f"{name}_last"] == present[-1]
            else:
                assert stats[f"{name}_mean"] is stats[f"{name}_last"] is None
        steps = [s for _, s, _ in ordered if not np.isnan(s)]
        assert stats["steps_total"] == (int(sum(steps)) if steps else None)
        named = [stage for _, _, stage in ordered if stage is not None]
        assert stats["sleep_stage_last"] == (named[-1] if named else None)
    assert by_window[to_micros(at(120))]["systolic_bp_mean"] is None


def test_batch_rows_are_final_with_news2_baselines_and_one_alert_per_onset():
    key = "p" * 32
    chunks = [
        timestamped(key, chunk(range(0, 60, 5))),                                      # calm
        timestamped(key, chunk(range(60, 120, 5), heart_rate=135.0, spo2=89.0, respiratory=26.0,
                               temperature=39.5)),                                   # high
        timestamped(key, chunk(range(120, 180, 5), heart_rate=135.0, spo2=89.0, respiratory=26.0,
                               temperature=39.5)),                                   # still high: no new alert
    ]
    observations = [TimestampedValue((key, observation(-30)), Timestamp(micros=to_micros(at(-30))))]
    with TestPipeline() as pipeline:
        out = {"chunks": pipeline | "Chunks" >> create_timestamped(chunks),
               "observations": pipeline | "Obs" >> create_timestamped(observations)} | PatientTwin(_config(False))
        rows = out["patient_twin"]
        assert_that(rows | beam.Map(lambda r: (r["window_start"], r["sample_count"], r["is_final"],
                                               r["news2_band"], r["consciousness"])),
                    equal_to([(at(0), 12, True, "low", "alert"), (at(60), 12, True, "high", "alert"),
                              (at(120), 12, True, "high", "alert")]), label="rows")
        _assert_valid(rows, PATIENT_TWIN, "schema")
        assert_that(rows | beam.Filter(lambda r: r["window_start"] == at(120))
                    | beam.Map(lambda r: (r["baseline_heart_rate"] > 70, round(r["heart_rate_trend"], 3) > 0)),
                    equal_to([(True, True)]), label="baseline")
        assert_that(out["alerts"] | beam.Map(lambda a: (a["kind"], a["severity"], a["onset_time"])),
                    equal_to([("news2_band", "urgent", at(60))]), label="alerts")
        _assert_valid(out["alerts"], ALERTS_TABLE, "alert schema")


def test_missing_parameters_are_listed_not_assumed():
    key = "q" * 32
    with TestPipeline() as pipeline:
        out = {"chunks": pipeline | "Chunks" >> create_timestamped([timestamped(key, chunk(range(0, 60, 5)))]),
               "observations": pipeline | "Obs" >> beam.Create([])} | PatientTwin(_config(False))
        assert_that(out["patient_twin"] | beam.Map(lambda r: r["news2_missing"]),
                    equal_to([["supplemental_oxygen", "consciousness"]]))


def _stream(key):
    """Two windows; an early pane, on-time panes, a late pane, and a sample too late for any pane."""
    return (
        TestStream()
        .add_elements([timestamped(key, chunk([5, 10]))])
        .advance_processing_time(15)                                       # early pane for [0, 60)
        .add_elements([timestamped(key, chunk([20]))])
        .advance_watermark_to(Timestamp(micros=to_micros(at(70))))       # on-time pane for [0, 60)
        .add_elements([timestamped(key, chunk([30], heart_rate=80.0)),  # late, within lateness
                       timestamped(key, chunk([65, 70]))])
        .advance_watermark_to(Timestamp(micros=to_micros(at(400))))      # [0,60) closed at 180 (+60 tick)
        .add_elements([timestamped(key, chunk([40], heart_rate=200.0))])  # too late
        .advance_watermark_to_infinity()
    )


def test_streaming_panes_finality_and_too_late_dead_letters():
    key = "s" * 32
    with TestPipeline(options=streaming_options()) as pipeline:
        out = {"chunks": pipeline | _stream(key),
               "observations": pipeline | "Obs" >> beam.Create([])} | PatientTwin(_config(True))
        first_window = out["patient_twin"] | beam.Filter(lambda r: r["window_start"] == at(0))
        assert_that(first_window | beam.Map(lambda r: (r["pane_index"], r["pane_timing"], r["is_final"],
                                                       r["sample_count"])),
                    equal_to([(0, "EARLY", False, 2), (1, "ON_TIME", False, 3), (2, "LATE", False, 4),
                              (3, "LATE", True, 4)]), label="panes")
        assert_that(out["dead_letters"] | beam.Map(lambda d: (d["stage"], d["record_count"],
                                                              d["reason"].startswith("too late"))),
                    equal_to([("window_wearables", 1, True)]), label="too late")
        _assert_valid(out["dead_letters"], DEAD_LETTERS_TABLE, "dl schema")


_COLLECTED: dict = {}


def _collect(tag, row):
    """Module-level, so the DirectRunner (same process) appends to this very dict."""
    _COLLECTED.setdefault(tag, []).append(row)


def _final_without_pane_fields(rows):
    return sorted(tuple(sorted((k, str(v)) for k, v in r.items() if k not in PANE_FIELDS))
                  for r in rows if r["is_final"])


def _run_twin(streaming, parts, key, config, observations=()):
    """PatientTwin over `parts` (chunks in arrival order; streaming: the watermark follows each
    chunk's last sample; an int part moves the watermark to that many microseconds) -> (patient_twin
    rows, alerts), collected."""
    tags = (("rows", streaming), ("alerts", streaming))
    for tag in tags:
        _COLLECTED.pop(tag, None)
    options = streaming_options() if streaming else PipelineOptions()
    with TestPipeline(options=options) as pipeline:
        if streaming:
            source = TestStream()
            for part in parts:
                if isinstance(part, int):
                    source = source.advance_watermark_to(Timestamp(micros=part))
                    continue
                source = source.add_elements([timestamped(key, part)]).advance_processing_time(20)
                source = source.advance_watermark_to(Timestamp(micros=int(part.times_us[-1])))
            chunks = pipeline | source.advance_watermark_to_infinity()
        else:
            chunks = pipeline | create_timestamped([timestamped(key, part) for part in parts])
        nurse = [TimestampedValue((key, o), Timestamp(micros=to_micros(o["event_time"]))) for o in observations]
        out = {"chunks": chunks, "observations": pipeline | "Obs" >> create_timestamped(nurse)} | PatientTwin(config)
        out["patient_twin"] | "Rows" >> beam.Map(lambda row, tag=tags[0]: _collect(tag, row))
        out["alerts"] | "Alerts" >> beam.Map(lambda alert, tag=tags[1]: _collect(tag, alert))
    return _COLLECTED.get(tags[0], []), _COLLECTED.get(tags[1], [])


def test_batch_and_streaming_agree_on_final_rows():
    key = "b" * 32
    parts = [chunk([5, 10]), chunk([20]), chunk([30], heart_rate=80.0), chunk([65, 70]),
             chunk(range(130, 175, 5), heart_rate=125.0, spo2=91.0)]
    results = {streaming: _final_without_pane_fields(_run_twin(streaming, parts, key, _config(streaming))[0])
               for streaming in (False, True)}
    assert len(results[False]) == 3
    assert results[False] == results[True]


@pytest.mark.parametrize("micros", [1772432141350442, 1772432141350000, 1772432141350001, 1772432141350999])
def test_a_timer_set_for_a_sub_millisecond_moment_does_not_fire_before_it(micros):
    # The Fn API's timer coder keeps milliseconds: a stale timer set at the raw sample time plus
    # the silence would come back before it and the staleness check would never pass.
    coder = TimestampCoder()
    fired = coder.decode(coder.encode(timer_time(micros))).micros
    assert micros <= fired < micros + 1000 and fired % 1000 == 0


@pytest.mark.parametrize("streaming", [False, True])
def test_only_the_window_after_a_silence_is_stale_and_says_how_long_it_was(streaming):
    # 25 minutes of samples every 10 s, silence for 15 minutes (stale after 10), then a window more.
    # Lateness (20 min) exceeds the stale threshold: provisional rows of windows whose predecessors
    # are not final yet must still measure the gap from the sample just before them.
    key = "g" * 32
    parts = [chunk(range(start, start + 60, 10)) for start in range(0, 1500, 60)] + [chunk(range(2400, 2460, 10))]
    rows, alerts = _run_twin(streaming, parts, key, _config(streaming, lateness=1200))
    stale = {(row["window_start"], row["gap_before_seconds"]) for row in rows if row["stale"]}
    assert stale == {(at(2400), 2400 - 1490)}
    assert {row["gap_before_seconds"] for row in rows if row["window_start"] == at(0)} == {None}
    assert {row["gap_before_seconds"] for row in rows if at(0) < row["window_start"] < at(2400)} == {10.0}
    assert sum(row["is_final"] for row in rows) == 26
    onsets = [alert["onset_time"] for alert in alerts if alert["kind"] == "sensor_stale"]
    # Streaming's stale timer also fires when the recording ends (the watermark jumps to the end of
    # time), but no data ever reached 2450 + 600: the end of the input is no silence, as in batch.
    assert sorted(onsets) == [at(1490 + 600)]


def test_streaming_raises_one_news2_alert_for_a_window_whatever_its_panes():
    key = "h" * 32
    sick = dict(heart_rate=135.0, spo2=89.0, respiratory=26.0, temperature=39.5)
    parts = [chunk([5, 10], **sick), chunk([20], **sick), chunk([30], **sick), chunk(range(65, 120, 5), **sick)]
    rows, alerts = _run_twin(True, parts, key, _config(True))
    assert len({(row["window_start"], row["pane_index"]) for row in rows}) >= 5  # several panes per window
    assert {row["news2_band"] for row in rows} == {"high"}
    assert [(alert["kind"], alert["onset_time"]) for alert in alerts if alert["kind"] == "news2_band"] == [
        ("news2_band", at(0))]


def test_batch_uses_the_observation_before_each_window_however_many_follow():
    # A nurse records "voice" just before the first window, then "alert" every 10 minutes for 12 h:
    # more observations than the history keeps; the first window must still see "voice".
    key = "o" * 32
    observations = [observation(-30, consciousness="voice")] + [observation(600 * i) for i in range(1, 73)]
    parts = [chunk(range(0, 60, 5)), chunk(range(43_200, 43_260, 5))]
    rows, _ = _run_twin(False, parts, key, _config(False), observations)
    assert sorted((row["window_start"], row["consciousness"]) for row in rows) == [
        (at(0), "voice"), (at(43_200), "alert")]


def test_the_temperature_trend_is_the_change_from_the_running_baseline():
    key = "t" * 32
    parts = [chunk(range(0, 60, 5), temperature=36.8), chunk(range(60, 120, 5), temperature=38.3)]
    rows, _ = _run_twin(False, parts, key, _config(False))
    trends = {row["window_start"]: row["temperature_trend"] for row in rows}
    assert trends[at(0)] is None and trends[at(60)] == pytest.approx(1.5)
