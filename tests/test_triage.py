"""Detections joined to the twins: device quality flags and combined triage alerts."""

import datetime as dt

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from schemas import ALERTS, DETECTIONS, validate
from transforms.decode import to_micros
from transforms.triage import UNKNOWN_DEVICE_STATE, FlagDeviceQuality, TriageAlerts, TriageConfig
from twin_fixtures import at

CONFIG = TriageConfig()


def detection(seconds, sop, device="XR-1", patient="p" * 32, probability=0.9):
    return {"sop_instance_uid": sop, "study_instance_uid": "1.2", "series_instance_uid": "1.2.3",
            "patient_key": patient, "device_id": device, "acquisition_time": at(seconds),
            "model_name": "cascade/tiny", "model_version": "abc", "covid_probability": probability,
            "boxes": [{"x1": 1.0, "y1": 2.0, "x2": 30.0, "y2": 40.0, "score": probability, "label": "opacity"}],
            "image_rows": 512, "image_columns": 512, "inference_latency_ms": 12.0, "batch_size": 1}


def device_row(start_seconds, *, risk=0.1, due=False, status="idle", device="XR-1"):
    return {"device_id": device, "window_start": at(start_seconds), "window_end": at(start_seconds + 300),
            "is_final": True, "failure_risk": risk, "failure_risk_reasons": ["error burst"] if risk >= 0.6 else [],
            "maintenance_due": due, "days_since_maintenance": 120.0 if due else 10.0, "status": status}


def patient_row(start_seconds, band, score, patient="p" * 32, timing="EARLY"):
    return {"patient_key": patient, "window_start": at(start_seconds), "window_end": at(start_seconds + 60),
            "news2_band": band, "news2_score": score, "pane_timing": timing}


def stamped(row, seconds):
    return TimestampedValue(row, Timestamp(micros=to_micros(at(seconds))))


def test_detections_take_the_state_of_their_device_window_whatever_the_arrival_order():
    detections = [detection(10, "a"), detection(320, "b"), detection(650, "c"), detection(30, "d", device="XR-2")]
    devices = [device_row(0), device_row(300, risk=0.8), device_row(600, due=True, status="degraded")]
    with TestPipeline() as pipeline:
        rows = {"detections": pipeline | "D" >> beam.Create(detections),
                "device_twin": pipeline | "T" >> beam.Create(devices)} | FlagDeviceQuality(CONFIG)
        assert_that(rows | beam.Map(lambda r: (r["sop_instance_uid"], r["quality_flag"], r["quality_reasons"])),
                    equal_to([("a", False, []), ("b", True, ["failure risk 0.80: error burst"]),
                              ("c", True, ["maintenance overdue (120 days since service)", "device status degraded"]),
                              ("d", False, [UNKNOWN_DEVICE_STATE])]))
        assert_that(rows | "Valid" >> beam.Map(lambda r: validate(DETECTIONS, r) is None) | beam.Distinct(),
                    equal_to([True]), label="schema")


def test_streaming_detection_waits_for_the_final_device_row_then_gives_up_at_its_deadline():
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    detections = (TestStream()
                  .add_elements([stamped(detection(10, "a"), 10), stamped(detection(20, "z", device="XR-9"), 20)])
                  .advance_watermark_to(Timestamp(micros=to_micros(at(400))))
                  .advance_watermark_to(Timestamp(micros=to_micros(at(2000))))
                  .advance_watermark_to_infinity())
    with TestPipeline(options=options) as pipeline:
        devices = pipeline | "T" >> beam.Create([stamped(device_row(0, risk=0.9), 960)])
        rows = {"detections": pipeline | detections, "device_twin": devices} | FlagDeviceQuality(CONFIG)
        assert_that(rows | beam.Map(lambda r: (r["sop_instance_uid"], r["quality_flag"])),
                    equal_to([("a", True), ("z", False)]))


def test_one_triage_alert_per_positive_image_near_an_elevated_news2_window():
    detections = [detection(600, "pos"), detection(620, "neg", probability=0.2), detection(9000, "far")]
    windows = [patient_row(0, "low", 1), patient_row(900, "medium", 5), patient_row(960, "high", 7),
               patient_row(960, "high", 7, timing="LATE")]
    with TestPipeline() as pipeline:
        alerts = {"detections": pipeline | "D" >> beam.Create(detections),
                  "patient_twin": pipeline | "P" >> beam.Create(windows)} | TriageAlerts(CONFIG)
        assert_that(alerts | beam.Map(lambda a: (a["alert_id"].split(":")[-1], a["kind"], a["onset_time"])),
                    equal_to([("pos", "triage", at(600))]))
        assert_that(alerts | "Valid" >> beam.Map(lambda a: validate(ALERTS, a) is None), equal_to([True]),
                    label="schema")


def test_triage_matches_whichever_side_arrives_first():
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    stream = (TestStream()
              .add_elements([stamped(("D", detection(100, "early")), 100)])
              .advance_watermark_to(Timestamp(micros=to_micros(at(200))))
              .add_elements([stamped(("P", patient_row(60, "medium", 6)), 120)])
              .advance_watermark_to(Timestamp(micros=to_micros(at(500))))
              .add_elements([stamped(("D", detection(130, "later")), 130)])
              .advance_watermark_to_infinity())
    with TestPipeline(options=options) as pipeline:
        both = pipeline | stream
        alerts = {"detections": both | "OnlyD" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "D" else []),
                  "patient_twin": both | "OnlyP" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "P" else [])
                  } | TriageAlerts(CONFIG)
        assert_that(alerts | beam.Map(lambda a: a["alert_id"].split(":")[-1]), equal_to(["early", "later"]))
    assert dt.timedelta(seconds=CONFIG.triage_window_seconds) >= dt.timedelta(seconds=70)


def test_the_triage_join_keeps_only_what_matching_and_the_alert_need():
    """Its state holds each side for 24 h per patient: summaries, not whole twin or detection rows."""
    from transforms.triage import _image_summary, _window_summary

    from schemas import PATIENT_TWIN

    window = {**{name: None for name in PATIENT_TWIN.names}, **patient_row(900, "medium", 5)}  # a whole row
    image = detection(600, "pos")
    kept_window, kept_image = _window_summary(window), _image_summary(image)
    assert set(kept_window) == {"window_start", "window_end", "news2_score", "news2_band", "pane_timing"}
    assert set(kept_image) == {"sop_instance_uid", "acquisition_time", "covid_probability", "box_count",
                               "model_name", "model_version"}
    assert len(kept_window) < len(window) / 3 and "boxes" not in kept_image
    assert kept_image["box_count"] == len(image["boxes"])
