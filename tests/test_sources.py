"""Sources: landed files, replay, Pub/Sub and Kafka messages all become RawRecords."""

import collections
import datetime as dt
import io

import apache_beam as beam
import fastavro
import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import ElementEvent, WatermarkEvent
from apache_beam.testing.util import assert_that, equal_to

from schemas import DEVICE_LOG_EVENT, avro_schema
from transforms.dead_letters import DEAD_LETTERS
from transforms.decode import DecodeWearablesFn, UnreadableInput
from transforms.pseudonymise import DEMO_KEY, Pseudonymiser
from transforms.sources import (
    ReadLandedFiles,
    arrival_from_path,
    decode_replayed,
    kafka_to_raw,
    pubsub_to_raw,
    records_in_file,
    replay_stream,
)

DAY = "2026-03-02"


def _event(i, minute):
    return {"event_id": f"e{i}", "device_id": "XR-1", "device_model": "DRX-1",
            "event_time": dt.datetime(2026, 3, 2, 6, minute, tzinfo=dt.timezone.utc), "kind": "heartbeat",
            "severity": "info"}


@pytest.fixture()
def landed(tmp_path):
    wearables = tmp_path / "wearables" / f"date={DAY}"
    wearables.mkdir(parents=True)
    (wearables / "wearables-06.jsonl").write_text(
        '{"upload_id": "u1", "upload_time": "2026-03-02T06:05:00Z"}\n\n{"upload_id": "u2", "upload_time": '
        '"2026-03-02T06:20:00Z"}\n')
    (wearables / "wearables-07.jsonl").write_text('{"upload_id": "u3", "upload_time": "2026-03-02T07:01:00Z"}\n')
    logs = tmp_path / "device_logs" / f"date={DAY}"
    logs.mkdir(parents=True)
    buffer = io.BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(avro_schema(DEVICE_LOG_EVENT)), [_event(1, 1), _event(2, 2)])
    (logs / "device_logs-06.avro").write_bytes(buffer.getvalue())
    (logs / "device_logs-07.avro").write_bytes(buffer.getvalue()[:-30])  # damaged at the end
    return tmp_path


def test_arrival_comes_from_the_partition_path():
    assert arrival_from_path(f"/x/wearables/date={DAY}/wearables-06.jsonl") == dt.datetime(
        2026, 3, 2, 6, tzinfo=dt.timezone.utc)
    with pytest.raises(ValueError, match="landing layout"):
        arrival_from_path("/x/wearables/today.jsonl")


def test_a_damaged_avro_file_keeps_what_it_can_and_reports_the_rest(landed):
    path = str(landed / "device_logs" / f"date={DAY}" / "device_logs-07.avro")
    records = list(records_in_file(path, open(path, "rb").read(), str(landed)))
    assert isinstance(records[-1].payload, UnreadableInput)
    assert "unreadable Avro file" in records[-1].payload.reason
    assert all(isinstance(r.payload, dict) for r in records[:-1])


def test_read_landed_files_reads_every_line_and_record(landed):
    with TestPipeline() as pipeline:
        wearables = pipeline | "W" >> ReadLandedFiles(str(landed), "wearables")
        assert_that(wearables | beam.Map(lambda r: r.source),
                    equal_to([f"wearables/date={DAY}/wearables-06.jsonl:1", f"wearables/date={DAY}/wearables-06.jsonl:3",
                              f"wearables/date={DAY}/wearables-07.jsonl:1"]), label="lines")
        one_day = pipeline | "D" >> ReadLandedFiles(str(landed), "device_logs", dates=("2026-03-01",))
        assert_that(one_day, equal_to([]), label="date filter")


def test_replay_releases_records_in_arrival_order_with_a_trailing_watermark(landed):
    stream = replay_stream(str(landed), ("wearables",), step_seconds=600, watermark_lag_seconds=300)
    elements, watermarks = [], []
    for event in stream._events:
        if isinstance(event, ElementEvent):
            elements.append([decode_replayed(tv.value)[1].source.rsplit(":", 1)[1] for tv in event.timestamped_values])
        elif isinstance(event, WatermarkEvent):
            watermarks.append(event.new_watermark)
    assert elements == [["1"], ["3"], ["1"]]  # 06:05 | 06:20 | 07:01
    first = dt.datetime(2026, 3, 2, 6, 5, tzinfo=dt.timezone.utc)
    assert watermarks[0].micros == int((first + dt.timedelta(seconds=300) - dt.datetime(
        1970, 1, 1, tzinfo=dt.timezone.utc)).total_seconds() * 1_000_000)
    assert watermarks == sorted(watermarks)


def test_pubsub_messages_become_raw_records():
    published = dt.datetime(2026, 3, 2, 6, 0, 3, tzinfo=dt.timezone.utc)
    message = PubsubMessage(b'{"upload_id": "u1"}', {"stream": "wearables"}, message_id="42", publish_time=published)
    raw = pubsub_to_raw(message, "projects/p/subscriptions/wearables")
    assert raw.source == "pubsub:projects/p/subscriptions/wearables#42"
    assert raw.payload == b'{"upload_id": "u1"}' and raw.arrival_time == published


def test_kafka_records_become_raw_records():
    Record = collections.namedtuple("Record", "key value partition offset timestamp")
    raw = kafka_to_raw(Record(b"k", b'{"event_id": "e"}', 3, 1207, 1772431200000), "device_logs")
    assert raw.source == "kafka:device_logs/3@1207"
    assert raw.arrival_time == dt.datetime(2026, 3, 2, 6, 0, tzinfo=dt.timezone.utc)


def test_a_kafka_tombstone_is_a_dead_letter_not_a_crash():
    Record = collections.namedtuple("Record", "key value partition offset timestamp")
    raw = kafka_to_raw(Record(b"k", None, 0, 9, 1772431200000), "wearables")
    (output,) = DecodeWearablesFn(Pseudonymiser(DEMO_KEY), 60).process(raw)
    assert output.tag == DEAD_LETTERS
    assert output.value["reason"] == "Kafka record without a value (tombstone)"
    assert output.value["source"] == "kafka:wearables/0@9"

