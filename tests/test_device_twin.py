"""DeviceTwin: windowed device health, maintenance from the device's own reports, deduplicated alerts."""

import datetime as dt

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from schemas import DEVICE_TWIN, SchemaError, validate
from transforms.decode import to_micros
from transforms.device_stats import heartbeat_features, summarise_device_window
from transforms.device_twin import DeviceTwin, DeviceTwinConfig
from transforms.windowing import WindowPolicy
from twin_fixtures import T0, at, create_timestamped

DEVICE = "XR-1"


def record(seconds, kind="heartbeat", severity="info", **fields):
    """A DeviceLogEvent dict of DEVICE at T0 + seconds."""
    values = {"event_id": f"{kind}-{seconds}", "device_id": DEVICE, "device_model": "DRX", "event_time": at(seconds),
              "kind": kind, "severity": severity, "code": None, "message": None, "status": None,
              "tube_temperature_c": 40.0 if kind == "heartbeat" else None, "exposure_count": None,
              "firmware_version": "1.0", "config_version": "c1", "last_maintenance_time": None}
    values.update(fields)
    return values


def event(seconds, kind="heartbeat", severity="info", **fields):
    """`record` keyed by device and timestamped at its event time, as decode emits it."""
    values = record(seconds, kind, severity, **fields)
    return TimestampedValue((DEVICE, values), Timestamp(micros=to_micros(values["event_time"])))


def heartbeats(start, end, **fields):
    return [event(s, **fields) for s in range(start, end, 30)]


def _config(streaming=False):
    return DeviceTwinConfig(policy=WindowPolicy(window_seconds=300, allowed_lateness_seconds=300, tick_seconds=60,
                                                early_firing_seconds=30, streaming=streaming))


def _final_rows(out):
    return out["device_twin"] | beam.Filter(lambda row: row["is_final"])


def test_window_summary_counts_errors_by_code_and_takes_the_reported_maintenance():
    serviced = T0 - dt.timedelta(days=100)
    events = [record(0, "status", status="online", code="PM-OVERDUE", last_maintenance_time=serviced),
              record(10, "error", "error", code="E-1"), record(20, "error", "critical", code="E-1"),
              record(25, "error", "error", code="E-2"), record(30, "exposure", exposure_count=2)]
    summary = summarise_device_window(events)
    assert summary["error_count"] == 3 and summary["critical_count"] == 1
    assert summary["error_counts"] == [{"code": "E-1", "count": 1, "severity": "critical"},
                                       {"code": "E-1", "count": 1, "severity": "error"},
                                       {"code": "E-2", "count": 1, "severity": "error"}]
    assert summary["exposure_count"] == 2
    assert summary["maintenance_at"] == serviced


def test_heartbeat_features_measure_gaps_misses_and_uptime():
    start, end = to_micros(at(0)), to_micros(at(300))
    beats = [to_micros(at(s)) for s in (0, 30, 60, 90, 240, 270)]
    features = heartbeat_features(beats, start, end, 30, down_since_us=None)
    assert features["heartbeat_count"] == 6
    assert features["missed_heartbeats"] == 4
    assert features["max_heartbeat_gap_s"] == 150
    assert features["uptime_fraction"] == 180 / 300
    down = heartbeat_features(beats, start, end, 30, down_since_us=to_micros(at(60)))
    assert down["uptime_fraction"] == 60 / 300


def test_overdue_maintenance_and_a_failure_run_up_raise_one_alert_each():
    """Healthy 30 min, then a 15-min error burst with overheating and missed heartbeats, then quiet again."""
    serviced = T0 - dt.timedelta(days=120)
    events = [event(0, "status", "warning", status="online", code="PM-OVERDUE", last_maintenance_time=serviced)]
    events += heartbeats(0, 1800)
    burst = range(1800, 2700)
    events += [event(s, tube_temperature_c=80.0) for s in burst[::90]]                   # every third beat
    events += [event(s + 5, "error", "critical" if s % 120 == 0 else "error", code="E-TUBE-OVERHEAT")
               for s in burst[::60]]
    events += heartbeats(2700, 3600)
    with TestPipeline() as pipeline:
        out = pipeline | create_timestamped(events) | DeviceTwin(_config())
        rows = _final_rows(out)
        assert_that(rows | beam.Map(lambda r: r["maintenance_due"]) | beam.Distinct(), equal_to([True]),
                    label="due")
        assert_that(rows | "WindowCount" >> beam.combiners.Count.Globally(), equal_to([12]), label="windows")
        errors = rows | beam.Map(lambda r: (r["window_start"], r["error_count"] > 0, r["failure_risk"] >= 0.6))
        assert_that(errors | beam.Filter(lambda e: e[1]) | beam.Map(lambda e: e[2]) | "Risky" >> beam.Distinct(),
                    equal_to([True]), label="burst windows are risky")
        assert_that(out["alerts"] | beam.Map(lambda a: (a["kind"], a["onset_time"])),
                    equal_to([("maintenance_overdue", at(0)), ("device_failure_risk", at(1800))]), label="alerts")
        errors = rows | "SchemaErrors" >> beam.FlatMap(_schema_errors)
        assert_that(errors, equal_to([]), label="schema")


def _schema_errors(row):
    try:
        validate(DEVICE_TWIN, row)
    except SchemaError as error:
        yield str(error)


def test_streaming_panes_and_events_too_late_for_their_window():
    config = _config(streaming=True)
    stream = (
        TestStream()
        .add_elements(heartbeats(0, 120))
        .advance_processing_time(40)                                     # early pane of [0, 300)
        .add_elements(heartbeats(120, 300))
        .advance_watermark_to(Timestamp(micros=to_micros(at(310))))     # on time
        .add_elements([event(100, "error", "error", code="E-LATE")])      # late, within lateness
        .advance_watermark_to(Timestamp(micros=to_micros(at(900))))     # [0, 300) closes at 600 (+60 tick)
        .add_elements([event(200, "error", "error", code="E-TOO-LATE")])  # too late
        .advance_watermark_to_infinity()
    )
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with TestPipeline(options=options) as pipeline:
        out = pipeline | stream | DeviceTwin(config)
        first = out["device_twin"] | beam.Filter(lambda r: r["window_start"] == T0)
        assert_that(first | beam.Map(lambda r: (r["pane_timing"], r["is_final"], r["error_count"])),
                    equal_to([("EARLY", False, 0), ("ON_TIME", False, 0), ("LATE", False, 1), ("LATE", True, 1)]),
                    label="panes")
        assert_that(out["dead_letters"] | beam.Map(lambda d: (d["stage"], d["reason"].split(":")[0],
                                                              '"E-TOO-LATE"' in d["payload"])),
                    equal_to([("window_device_logs", "too late", True)]), label="too late")
