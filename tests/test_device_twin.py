"""DeviceTwin: windowed device health, maintenance from the device's own reports, deduplicated alerts."""

import datetime as dt
import importlib.util
from pathlib import Path

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from schemas import DEVICE_TWIN, SchemaError, validate
from simulator.hospital import simulate
from transforms.dead_letters import DEAD_LETTERS
from transforms.decode import DecodeDeviceEventsFn, to_micros
from transforms.device_stats import heartbeat_features, summarise_device_window
from transforms.device_twin import DeviceTwin, DeviceTwinConfig
from transforms.pseudonymise import DEMO_KEY, Pseudonymiser
from transforms.sources import ReadLandedFiles
from transforms.windowing import WindowPolicy
from twin_fixtures import T0, at, create_timestamped, streaming_options

DEVICE = "XR-1"
DEVICE_ALERTS_BENCH = Path(__file__).resolve().parent.parent / "bench" / "device_alerts.py"


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
    with TestPipeline(options=streaming_options()) as pipeline:
        out = pipeline | stream | DeviceTwin(config)
        first = out["device_twin"] | beam.Filter(lambda r: r["window_start"] == T0)
        assert_that(first | beam.Map(lambda r: (r["pane_timing"], r["is_final"], r["error_count"])),
                    equal_to([("EARLY", False, 0), ("ON_TIME", False, 0), ("LATE", False, 1), ("LATE", True, 1)]),
                    label="panes")
        assert_that(out["dead_letters"] | beam.Map(lambda d: (d["stage"], d["reason"].split(":")[0],
                                                              '"E-TOO-LATE"' in d["payload"])),
                    equal_to([("window_device_logs", "too late", True)]), label="too late")


# -- at-least-once delivery ------------------------------------------------------------------------

def test_window_summary_counts_a_redelivered_event_once_whatever_the_arrival_order():
    events = [record(0), record(10, "error", "error", code="E-1"), record(20, "exposure", exposure_count=2),
              record(30)]
    copies = [record(10, "error", "error", code="E-1"), record(20, "exposure", exposure_count=2),
              record(10, "error", "error", code="E-1", message="redelivered")]   # same id, other content
    summaries = [summarise_device_window(order) for order in (events + copies, copies[::-1] + events[::-1])]
    assert summaries[0] == summaries[1]
    summary = summaries[0]
    assert summary["event_count"] == 4 and summary["duplicates_removed"] == 3
    assert summary["error_count"] == 1 and summary["exposure_count"] == 2
    assert summary["error_counts"] == [{"code": "E-1", "count": 1, "severity": "error"}]


def _redelivery_events():
    """A window [0, 300) with an error and an exposure; and those two delivered again."""
    originals = heartbeats(0, 300) + [event(100, "error", "error", code="E-1"),
                                      event(150, "exposure", exposure_count=3)]
    return originals, originals[-2:]


def _counts(row):
    return (row["pane_timing"], row["is_final"], row["event_count"], row["duplicates_removed"], row["error_count"],
            row["error_counts"][0]["count"], row["exposure_count"])


def test_a_redelivered_event_is_counted_once_in_batch():
    originals, copies = _redelivery_events()
    with TestPipeline() as pipeline:
        out = pipeline | create_timestamped(copies + originals) | DeviceTwin(_config())
        assert_that(_final_rows(out) | beam.Map(_counts), equal_to([("ON_TIME", True, 12, 2, 1, 1, 3)]))


def test_a_redelivered_event_in_a_later_pane_is_counted_once_in_streaming():
    originals, copies = _redelivery_events()
    stream = (
        TestStream()
        .add_elements(originals)
        .advance_watermark_to(Timestamp(micros=to_micros(at(310))))     # on time: each event once
        .add_elements(copies)                                           # redelivered: a late pane
        .advance_watermark_to(Timestamp(micros=to_micros(at(900))))     # [0, 300) closes at 660
        .add_elements(copies[:1])                                       # redelivered again: too late
        .advance_watermark_to_infinity()
    )
    with TestPipeline(options=streaming_options()) as pipeline:
        out = pipeline | stream | DeviceTwin(_config(streaming=True))
        # 15 events delivered = 12 counted in the final row + 2 duplicates removed + 1 too late.
        assert_that(out["device_twin"] | beam.Map(_counts),
                    equal_to([("ON_TIME", False, 12, 0, 1, 1, 3), ("LATE", False, 12, 2, 1, 1, 3),
                              ("LATE", True, 12, 2, 1, 1, 3)]), label="panes")
        assert_that(out["dead_letters"] | beam.Map(lambda d: (d["stage"], d["record_count"])),
                    equal_to([("window_device_logs", 1)]), label="too late")


# -- firmware and configuration versions -----------------------------------------------------------

def _version_events():
    """[0, 300) reports 1.0/c1; [300, 600) pushes config c2 at 400; [600, 900) reports no versions;
    [900, 1200) reports only firmware 1.1, at 1005."""
    silent = {"firmware_version": None, "config_version": None}
    return (heartbeats(0, 300) + heartbeats(300, 400)
            + [event(400, "config_change", code="CFG-UPDATE", config_version="c2")]
            + heartbeats(410, 600, config_version="c2")
            + heartbeats(600, 900, **silent) + heartbeats(900, 1200, **silent)
            + [event(1005, "status", status="online", firmware_version="1.1", config_version=None)])


VERSIONS_PER_WINDOW = [(at(0), "1.0", "c1", None), (at(300), "1.0", "c2", at(400)),
                       (at(600), "1.0", "c2", at(400)), (at(900), "1.1", "c2", at(1005))]


def _versions(row):
    return row["window_start"], row["firmware_version"], row["config_version"], row["config_changed_at"]


def test_versions_and_their_last_change_carry_into_windows_that_report_none_in_batch():
    with TestPipeline() as pipeline:
        out = pipeline | create_timestamped(_version_events()) | DeviceTwin(_config())
        assert_that(_final_rows(out) | beam.Map(_versions), equal_to(VERSIONS_PER_WINDOW))


def test_a_later_window_cannot_change_the_versions_of_an_earlier_final_row_in_streaming():
    # Every window's early pane, the last window's firmware report included, comes before any window is final.
    stream = (
        TestStream()
        .add_elements(_version_events())
        .advance_processing_time(40)
        .advance_watermark_to(Timestamp(micros=to_micros(at(2000))))   # all closed: [900, 1200) at 1860
        .advance_watermark_to_infinity()
    )
    with TestPipeline(options=streaming_options()) as pipeline:
        out = pipeline | stream | DeviceTwin(_config(streaming=True))
        assert_that(_final_rows(out) | beam.Map(_versions), equal_to(VERSIONS_PER_WINDOW), label="final")
        early = out["device_twin"] | beam.Filter(lambda row: row["pane_timing"] == "EARLY")
        assert_that(early | "EarlyVersions" >> beam.Map(_versions), equal_to(VERSIONS_PER_WINDOW), label="early")


# -- on the simulator's hospital -------------------------------------------------------------------

def _bench(path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_device_the_simulator_fails_is_alerted_before_its_failure(tmp_path):
    device_alerts = _bench(DEVICE_ALERTS_BENCH)
    simulate(tmp_path, patients=1, devices=4, hours=3, seed=4, image_size=64, progress=False)
    failures = device_alerts.failure_times(tmp_path)
    assert len(failures) >= 1, "seed 4 must make at least one device fail"   # it makes three of the four fail

    def none_missed(alerts):
        leads, misses, _ = device_alerts.judge(alerts, failures, horizon=dt.timedelta(hours=3))
        assert misses == 0 and len(leads) == len(failures), f"failures {failures}, alerts {sorted(alerts)}"

    with TestPipeline() as pipeline:
        decoded = (pipeline | ReadLandedFiles(str(tmp_path), "device_logs")
                   | beam.ParDo(DecodeDeviceEventsFn(Pseudonymiser(DEMO_KEY)))
                   .with_outputs(DEAD_LETTERS, main="events"))
        out = decoded.events | DeviceTwin()
        risk_alerts = (out["alerts"] | beam.Filter(lambda alert: alert["kind"] == "device_failure_risk")
                       | beam.Map(lambda alert: (alert["subject_id"], alert["onset_time"])))
        assert_that(risk_alerts, none_missed)


# -- maintenance reported after the fact ------------------------------------------------------------

def _late_report_events():
    """[0, 300) has no service on record; [300, 600) reports a service done at 100 s, in [0, 300)."""
    return heartbeats(0, 300), heartbeats(300, 600) + [event(310, "status", status="online",
                                                             last_maintenance_time=at(100))]


MAINTENANCE_PER_WINDOW = [(at(0), None), (at(300), at(100))]


def _maintenance(row):
    return row["window_start"], row["last_maintenance"]


def test_a_service_reported_in_a_later_window_counts_from_that_window_in_batch():
    first, second = _late_report_events()
    with TestPipeline() as pipeline:
        out = pipeline | create_timestamped(second + first) | DeviceTwin(_config())
        assert_that(_final_rows(out) | beam.Map(_maintenance), equal_to(MAINTENANCE_PER_WINDOW))


def test_a_later_window_reporting_an_old_service_cannot_change_an_earlier_final_row_in_streaming():
    first, second = _late_report_events()
    stream = (
        TestStream()
        .add_elements(first)
        .advance_watermark_to(Timestamp(micros=to_micros(at(310))))   # [0, 300) on time, not final until 660
        .add_elements(second)
        .advance_watermark_to(Timestamp(micros=to_micros(at(610))))   # [300, 600) on time
        .advance_watermark_to(Timestamp(micros=to_micros(at(2000))))  # both final
        .advance_watermark_to_infinity()
    )
    with TestPipeline(options=streaming_options()) as pipeline:
        out = pipeline | stream | DeviceTwin(_config(streaming=True))
        assert_that(_final_rows(out) | beam.Map(_maintenance), equal_to(MAINTENANCE_PER_WINDOW))
