"""`medtwin publish`: replay a landed hospital into Kafka topics or Pub/Sub topics, in event-time order.

    medtwin publish --input demo/hospital --kafka_bootstrap 127.0.0.1:9092            # topics medtwin-<stream>
    medtwin publish --input demo/hospital --pubsub_project my-project --topic_prefix ward7-
    medtwin run --streaming --source kafka --kafka_bootstrap 127.0.0.1:9092 \\
        --kafka_wearables medtwin-wearables --kafka_observations medtwin-observations ...

Every landed record (``<stream>/date=*/…``, as `medtwin simulate` writes) becomes one message whose
value is the record's JSON, stamped the way the pipeline's sources read it
(transforms/sources.py):

  * event time: the earliest time the record carries (a wearable upload's first sample, an event's
    or observation's ``event_time``, an image's ``acquisition_time``), else its arrival. Kafka: the
    record timestamp (CreateTime); Pub/Sub: the ``event_time`` attribute (``timestamp_attribute``).
  * arrival: when the record reached the hospital (an upload's ``upload_time``, else the file's
    hour). Kafka: the ``arrival_time`` header; Pub/Sub: the ``arrival_time`` attribute.
  * record id: the record's landed position (``wearables/date=…/wearables-06.jsonl:12``), no
    patient data. Kafka: the key; Pub/Sub: the ``record_id`` attribute (``id_label``), so a
    publisher's retry of the same record is dropped by the reader.

Messages go out sorted by event time across all streams, so a reader's watermark, which follows
record timestamps, never passes data still to come from the replay. Records that cannot be parsed
are published as they landed (at their arrival): the pipeline dead-letters them, as it would live.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
from typing import Iterable

import orjson

STREAM_TIME_FIELDS = {"observations": "event_time", "device_logs": "event_time", "dicom_refs": "acquisition_time"}


@dataclasses.dataclass(frozen=True)
class Message:
    """One landed record, ready for a broker."""

    stream: str
    record_id: str
    value: bytes
    event_time: dt.datetime
    arrival_time: dt.datetime


def _parse_time(value) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else None
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else None


def record_event_time(stream: str, payload) -> dt.datetime | None:
    """The earliest event time a landed record carries, or None when it has none that parses."""
    if isinstance(payload, (bytes, bytearray)):
        try:
            payload = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
    if not isinstance(payload, dict):
        return None
    if stream == "wearables":
        samples = payload.get("samples")
        times = [t for t in (_parse_time(s.get("event_time")) for s in samples if isinstance(s, dict))
                 if t is not None] if isinstance(samples, list) else []
        return min(times) if times else _parse_time(payload.get("upload_time"))
    return _parse_time(payload.get(STREAM_TIME_FIELDS[stream]))


def _value(payload) -> bytes:
    from transforms.decode import UnreadableInput

    if isinstance(payload, UnreadableInput):
        return b""  # an unreadable landed file: an empty message, dead-lettered by the decoder
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    return orjson.dumps(payload, default=str)  # an Avro record: its fields as JSON


def landed_messages(input_dir: str, streams: Iterable[str]) -> list[Message]:
    """Every landed record of `streams` as a Message, sorted by (event time, stream, record id)."""
    from transforms.sources import _arrival_of, landed_records

    messages = []
    for stream in streams:
        for record in landed_records(input_dir, stream):
            arrival = _arrival_of(record)
            event_time = record_event_time(stream, record.payload) or arrival
            messages.append(Message(stream, record.source, _value(record.payload), event_time, arrival))
    return sorted(messages, key=lambda m: (m.event_time, m.stream, m.record_id))


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def epoch_millis(value: dt.datetime) -> int:
    return (value - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(milliseconds=1)


def kafka_record(message: Message) -> dict:
    """Keyword arguments of confluent_kafka's ``Producer.produce`` (topic aside) for `message`."""
    from transforms.sources import KAFKA_ARRIVAL_HEADER

    return {"key": message.record_id.encode(), "value": message.value, "timestamp": epoch_millis(message.event_time),
            "headers": [(KAFKA_ARRIVAL_HEADER, _iso(message.arrival_time).encode())]}


def pubsub_message(message: Message) -> tuple[bytes, dict]:
    """(data, attributes) of the Pub/Sub message for `message`."""
    from transforms.sources import PUBSUB_ARRIVAL_ATTRIBUTE, PUBSUB_EVENT_TIME_ATTRIBUTE, PUBSUB_ID_ATTRIBUTE

    return message.value, {PUBSUB_EVENT_TIME_ATTRIBUTE: _iso(message.event_time),
                           PUBSUB_ID_ATTRIBUTE: message.record_id,
                           PUBSUB_ARRIVAL_ATTRIBUTE: _iso(message.arrival_time)}


def create_kafka_topics(bootstrap: str, topics: list[str]) -> None:
    """Creates `topics` (broker defaults for partitions and replication) unless they exist, so a
    reader of a stream that had no record finds an empty topic, not a missing one."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until every future has its answer
    futures = admin.create_topics([NewTopic(t) for t in topics])
    for future in futures.values():
        try:
            future.result(timeout=60)
        except KafkaException as error:
            if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def publish_kafka(bootstrap: str, messages: list[Message], prefix: str, streams: Iterable[str]) -> dict:
    """Produces `messages` in order to ``<prefix><stream>``; waits for every ack; {topic: count}."""
    from confluent_kafka import KafkaException, Producer

    create_kafka_topics(bootstrap, [prefix + stream for stream in streams])

    # Idempotent producer: a retried send is written once, in order, per partition.
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                         "linger.ms": 20})
    failures = []
    counts = {prefix + stream: 0 for stream in streams}

    def delivered(error, _record):
        if error is not None:
            failures.append(error)

    for message in messages:
        topic = prefix + message.stream
        while True:
            try:
                producer.produce(topic, on_delivery=delivered, **kafka_record(message))
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.5)
        counts[topic] = counts.get(topic, 0) + 1
    if producer.flush(120) or failures:
        raise KafkaException(failures[0] if failures else "messages still unacknowledged after 120 s")
    return counts


def publish_pubsub(project: str, messages: list[Message], prefix: str) -> dict:
    """Publishes `messages` in order to ``projects/<project>/topics/<prefix><stream>``; {topic: count}."""
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    futures, counts = [], {}
    for message in messages:
        topic = publisher.topic_path(project, prefix + message.stream)
        data, attributes = pubsub_message(message)
        futures.append(publisher.publish(topic, data, **attributes))
        counts[topic] = counts.get(topic, 0) + 1
    for future in futures:
        future.result(timeout=120)
    return counts


def add_parser(subparsers) -> argparse.ArgumentParser:
    from transforms.sources import STREAMS

    parser = subparsers.add_parser(
        "publish", help="replay landed streams into Kafka or Pub/Sub topics, in event-time order",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="landed files root (as `medtwin simulate --out` wrote)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--kafka_bootstrap", metavar="HOST:PORT", help="Kafka bootstrap servers")
    target.add_argument("--pubsub_project", metavar="PROJECT", help="Google Cloud project of the Pub/Sub topics")
    parser.add_argument("--topic_prefix", default="medtwin-", help="topic = prefix + stream [%(default)s]")
    parser.add_argument("--streams", nargs="+", choices=STREAMS, default=list(STREAMS),
                        help="streams to publish [all]")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    messages = landed_messages(args.input, args.streams)
    if args.kafka_bootstrap:
        counts = publish_kafka(args.kafka_bootstrap, messages, args.topic_prefix, args.streams)
    else:
        counts = publish_pubsub(args.pubsub_project, messages, args.topic_prefix)
    for topic, count in sorted(counts.items()):
        print(f"{topic}\t{count}")
    if messages:
        print(f"medtwin publish: {len(messages)} records, event time {_iso(messages[0].event_time)} .. "
              f"{_iso(messages[-1].event_time)}", file=sys.stderr)
    return 0
