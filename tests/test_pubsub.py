"""Pub/Sub: event time and retry dedupe on every subscription read, and publishers that stamp both.

No Pub/Sub emulator is available here, so this checks what can be checked without one: the read
transform in the built graph of a `--source pubsub` job (timestamp_attribute, id_label on every
subscription), the messages `medtwin publish --pubsub_project` builds, and the RawRecord a message
becomes (arrival never the wall clock).
"""

import datetime as dt

import apache_beam as beam
import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage, ReadFromPubSub
from apache_beam.utils.timestamp import Timestamp

from pipelines.cli import build_parser
from pipelines.config import JobConfig
from pipelines.graph import ReadStreams
from pipelines.publish import Message, pubsub_message
from transforms.sources import (
    PUBSUB_EVENT_TIME_ATTRIBUTE,
    PUBSUB_ID_ATTRIBUTE,
    STREAMS,
    pubsub_to_raw,
)

UTC = dt.timezone.utc


def _reads(config):
    """Every ReadFromPubSub transform in the graph ReadStreams builds for `config`."""
    pipeline = beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(["--streaming"]))
    pipeline | ReadStreams(config)
    found = []

    class Visitor(beam.pipeline.PipelineVisitor):
        def enter_composite_transform(self, node):
            if isinstance(node.transform, ReadFromPubSub):
                found.append(node.transform)

        def visit_transform(self, node):
            self.enter_composite_transform(node)

    pipeline.visit(Visitor())
    return found


def test_every_subscription_is_read_in_event_time_with_retry_dedupe():
    flags = [f for s in STREAMS for f in (f"--pubsub_{s}", f"projects/ward-project/subscriptions/{s}")]
    args, _ = build_parser().parse_known_args(["run", "--streaming", "--source", "pubsub", "--no_imaging",
                                               "--demo", *flags])
    reads = _reads(JobConfig.from_args(args))
    assert len(reads) == len(STREAMS)
    for read in reads:
        source = read._source
        assert source.timestamp_attribute == PUBSUB_EVENT_TIME_ATTRIBUTE == "event_time"
        assert source.id_label == PUBSUB_ID_ATTRIBUTE == "record_id"
        assert source.with_attributes
    assert sorted(read._source.full_subscription for read in reads) == sorted(
        f"projects/ward-project/subscriptions/{s}" for s in STREAMS)


def test_publish_stamps_event_time_record_id_and_arrival():
    message = Message("wearables", "wearables/date=2026-03-02/wearables-06.jsonl:12", b'{"upload_id": "u"}',
                      dt.datetime(2026, 3, 2, 6, 1, 2, 345000, tzinfo=UTC), dt.datetime(2026, 3, 2, 6, 4, tzinfo=UTC))
    data, attributes = pubsub_message(message)
    assert data == b'{"upload_id": "u"}'
    assert attributes == {"event_time": "2026-03-02T06:01:02.345Z",
                          "record_id": "wearables/date=2026-03-02/wearables-06.jsonl:12",
                          "arrival_time": "2026-03-02T06:04:00.000Z"}
    # What Beam's reader makes of the attribute: the element's timestamp is the record's event time.
    assert Timestamp.from_rfc3339(attributes["event_time"]) == Timestamp.of(message.event_time.timestamp())


def test_a_message_becomes_a_raw_record_with_a_deterministic_arrival():
    event_time = Timestamp.of(dt.datetime(2026, 3, 2, 6, 1, tzinfo=UTC).timestamp())
    stamped = PubsubMessage(b"{}", {"record_id": "r1", "arrival_time": "2026-03-02T06:04:00Z"}, message_id="9",
                            publish_time=dt.datetime(2026, 3, 2, 7, tzinfo=UTC))
    raw = pubsub_to_raw(stamped, "projects/ward-project/subscriptions/s", event_time)
    assert raw.source == "pubsub:projects/ward-project/subscriptions/s#r1"
    assert raw.arrival_time == dt.datetime(2026, 3, 2, 6, 4, tzinfo=UTC)
    published = PubsubMessage(b"{}", {}, message_id="9", publish_time=dt.datetime(2026, 3, 2, 7, tzinfo=UTC))
    assert pubsub_to_raw(published, "s", event_time).arrival_time == dt.datetime(2026, 3, 2, 7, tzinfo=UTC)
    bare = PubsubMessage(b"{}", {}, message_id="9")
    # Neither attribute nor publish time: the element's timestamp, the same on every redelivery (never now()).
    assert pubsub_to_raw(bare, "s", event_time).arrival_time == dt.datetime(2026, 3, 2, 6, 1, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["", "yesterday", "2026-13-40T00:00:00Z"])
def test_an_unreadable_arrival_attribute_falls_back_to_publish_time(bad):
    message = PubsubMessage(b"{}", {"arrival_time": bad}, message_id="9",
                            publish_time=dt.datetime(2026, 3, 2, 7, tzinfo=UTC))
    assert pubsub_to_raw(message, "s", Timestamp(0)).arrival_time == dt.datetime(2026, 3, 2, 7, tzinfo=UTC)
