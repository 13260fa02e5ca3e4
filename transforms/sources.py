"""Sources: every way an input stream reaches the pipeline, all ending as `RawRecord`s.

* `ReadLandedFiles`   batch: the files of one stream under ``DIR/<stream>/date=*/``
  (JSON Lines ``*.jsonl`` or Avro ``*.avro``), as written by the simulator or a
  landing bucket; big files in ranges spread over the workers.
* `ReplayLandedFiles` local streaming: the same files replayed in arrival order
  through a `TestStream`, the watermark trailing arrival time by a fixed lag, so
  early, on-time, late and too-late data happen as they would live (DirectRunner).
* `WatchLandingDirectory` local/live streaming: files picked up once complete (a
  ``.done`` marker beside each), read whole, once.
* `ReadPubSubStream`  Dataflow: a Pub/Sub subscription, message data = one JSON
  record, timestamp = its ``event_time`` attribute, retries dropped by ``record_id``.
* `ReadKafkaStream`   Flink/Prism: a Kafka topic (Beam's cross-language Kafka IO),
  value = one JSON record, timestamp = record timestamp = event time.

Decoding (`transforms.decode`) is the same for all of them.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import re
from typing import Iterable, Iterator, NamedTuple

import apache_beam as beam
import fastavro
from apache_beam.coders import BytesCoder, FastPrimitivesCoder
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from transforms.decode import MAX_AHEAD_OF_ARRIVAL, RawRecord, UnreadableInput, to_micros
from transforms.landed_files import (
    avro_blocks,
    avro_claimed_records,
    avro_inflation_problem,
    compressed_kind,
    count_records,
    is_completion_marker,
    layout_arrival,
    partition_day,
    stream_of,
    why_outside_layout,
)

STREAMS = ("wearables", "observations", "device_logs", "dicom_refs")


def arrival_from_path(path: str) -> dt.datetime:
    """``.../date=2026-03-02/wearables-06.jsonl`` -> 2026-03-02T06:00Z (start of the file's hour).

    Raises ValueError for a path outside the layout (`transforms.landed_files.layout_arrival`
    says None instead).
    """
    arrival = layout_arrival(path)
    if arrival is None:
        raise ValueError("the path is not in the landing layout "
                         "<stream>/date=YYYY-MM-DD/<stream>-HH.(jsonl|avro) (HH 00..23)")
    return arrival


def stream_pattern(input_dir: str, stream: str, extension: str, date: str = "*") -> str:
    """Glob of one stream's landed files: all days, or one ``YYYY-MM-DD``."""
    return FileSystems.join(input_dir, stream, f"date={date}", f"*.{extension}")


def records_in_file(path: str, data: bytes, relative_to: str = "",
                    fallback_arrival: dt.datetime | None = None) -> Iterator[RawRecord]:
    """One file found under a stream's folder -> its RawRecords (JSONL: one per non-empty line;
    Avro: one per record).  Never raises.

    What cannot be read as records is one RawRecord whose payload is an `UnreadableInput`
    counting what it held (`transforms.landed_files.count_records`), so the decoder
    dead-letters it and ``records in = out + dead letters`` holds:
    * a file outside the landing layout (no hour, no such date or hour, a subfolder, another
      extension, compressed): all of its records, at its ``date=`` day if that is real, else at
      `fallback_arrival` (the listing's time); its name is withheld from the source and reason;
    * an Avro file damaged part way: the records before the damage are yielded, the dead letter
      counts the rest of what its blocks claimed.
    """
    arrival = layout_arrival(path)
    name = os.path.relpath(path, relative_to) if relative_to else path
    if arrival is None or compressed_kind(data[:8]) is not None:
        counted = count_records(data)
        reason = (f"{why_outside_layout(name) if arrival is None else 'a compressed file'} ("
                  f"{compressed_kind(data[:8]) + ' data, ' if compressed_kind(data[:8]) else ''}"
                  f"{'' if counted.exact else 'at least '}{counted.records} record(s); name withheld): not read")
        when = arrival or partition_day(name) or fallback_arrival or _EPOCH
        source = f"{stream_of(name)}/(file outside the landing layout, {len(data)} bytes)"
        yield RawRecord(source, UnreadableInput(reason, counted.records, stage="read_files"), when)
        return
    if path.endswith(".jsonl"):
        yield from _jsonl_records(name, data, arrival)
        return
    refused = avro_inflation_problem(data)
    if refused is not None:
        claimed = avro_claimed_records(data)
        yield RawRecord(name, UnreadableInput(f"Avro file not read: {refused}; its blocks claimed "
                                              f"{claimed or 0} record(s)", max(claimed or 0, 1)), arrival)
        return
    yield from _avro_records(name, data, arrival)


def _jsonl_records(name: str, data: bytes, arrival: dt.datetime, first: int = 1) -> Iterator[RawRecord]:
    """JSON Lines -> one RawRecord per non-empty line, named ``<name>:<line number>`` from `first`."""
    for number, line in enumerate(data.splitlines(), start=first):
        if line.strip():
            yield RawRecord(f"{name}:{number}", line, arrival)


def _avro_records(name: str, data: bytes, arrival: dt.datetime, first: int = 1,
                  claimed: int | None = None) -> Iterator[RawRecord]:
    """An Avro container (or a file header and some of its blocks) -> one RawRecord per record, named
    ``<name>#<record number>`` from `first`; damage part way is one dead letter counting the rest of
    what the blocks claimed (`claimed`, or the container's own walk)."""
    read = 0
    try:
        for read, record in enumerate(fastavro.reader(io.BytesIO(data)), start=1):
            yield RawRecord(f"{name}#{first - 1 + read}", record, arrival)
    except Exception as error:  # fastavro raises many exception types on damaged files
        claimed = avro_claimed_records(data) if claimed is None else claimed
        lost = max((claimed or 0) - read, 1)
        yield RawRecord(name, UnreadableInput(
            f"unreadable Avro file from record {first + read}: {type(error).__name__}; "
            f"{'its blocks claimed ' + str(claimed) + ' record(s)' if claimed is not None else 'no readable header'}",
            lost), arrival)


# ------------------------------------------------------------------------------- batch reads in ranges

DEFAULT_SPLIT_BYTES = 64 << 20  # a landed file bigger than this is read in ranges of about this size
_SCAN_BYTES = 8 << 20           # how much of a JSON Lines file the planner reads at a time


class FileRange(NamedTuple):
    """What one read covers: a whole landed file (``end`` None), or its records between two offsets.

    JSON Lines ranges start after a newline and end after one; Avro ranges hold whole blocks and
    are read behind the file's header (``header_end`` bytes). ``first`` numbers the range's first
    line or record as a whole-file read would, so record names do not depend on the split;
    ``claimed`` is what an Avro range's blocks claim.
    """

    path: str
    listed: dt.datetime | None = None  # the listing's time: the arrival of a file outside the layout
    start: int = 0
    end: int | None = None
    first: int = 1
    header_end: int = 0
    claimed: int = 0


def plan_file_ranges(metadata, split_bytes: int = DEFAULT_SPLIT_BYTES) -> list[FileRange]:
    """A listed file (Beam `FileMetadata`) -> the FileRanges that read it: one for a file of at most
    `split_bytes`, one outside the landing layout, compressed, damaged or refused (`records_in_file`
    reads those whole and counts them); else ranges of about `split_bytes` on record boundaries.

    Memory: a JSON Lines file is scanned `_SCAN_BYTES` at a time, about one range held at once; an
    Avro file is held whole while its blocks are walked and checked (`avro_inflation_problem`).
    """
    whole = [FileRange(metadata.path, _listed_time(metadata))]
    if metadata.size_in_bytes <= split_bytes or layout_arrival(metadata.path) is None:
        return whole
    read = _jsonl_ranges if metadata.path.endswith(".jsonl") else _avro_ranges
    return read(metadata.path, split_bytes) or whole


def _jsonl_ranges(path: str, split_bytes: int) -> list[FileRange] | None:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        buffer = bytearray(handle.read(_SCAN_BYTES))
        if compressed_kind(bytes(buffer[:8])) is not None:
            return None
        ranges, start, first = [], 0, 1
        while True:
            cut = buffer.find(b"\n", split_bytes - 1) + 1 if len(buffer) >= split_bytes else 0
            if not cut:
                chunk = handle.read(_SCAN_BYTES)
                if chunk:
                    buffer += chunk
                    continue
                if buffer:
                    ranges.append(FileRange(path, None, start, start + len(buffer), first))
                return ranges
            ranges.append(FileRange(path, None, start, start + cut, first))
            first += len(bytes(buffer[:cut]).splitlines())  # the numbering of `_jsonl_records` on the whole
            start += cut
            del buffer[:cut]


def _avro_ranges(path: str, split_bytes: int) -> list[FileRange] | None:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        data = handle.read()
    layout = avro_blocks(data)
    if compressed_kind(data[:8]) is not None or layout is None or not layout.whole or avro_inflation_problem(data):
        return None
    ranges, first = [], 1
    for block in layout.blocks:
        current = ranges[-1] if ranges else None
        if current is None or current.end - current.start >= split_bytes:
            ranges.append(FileRange(path, None, block[0], block[1], first, layout.header_end, block[2]))
        else:
            ranges[-1] = current._replace(end=block[1], claimed=current.claimed + block[2])
        first += block[2]
    return ranges


def records_in_range(file_range: FileRange, relative_to: str = "") -> Iterator[RawRecord]:
    """A FileRange -> its RawRecords, as `records_in_file` gives them for the whole file. Never raises."""
    path = file_range.path
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        if file_range.end is None:
            yield from records_in_file(path, handle.read(), relative_to, file_range.listed)
            return
        header = handle.read(file_range.header_end)
        handle.seek(file_range.start)
        data = handle.read(file_range.end - file_range.start)
    name = os.path.relpath(path, relative_to) if relative_to else path
    arrival = layout_arrival(path)
    if path.endswith(".jsonl"):
        yield from _jsonl_records(name, data, arrival, file_range.first)
    else:
        yield from _avro_records(name, header + data, arrival, file_range.first, file_range.claimed)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def timestamped_at_arrival(records: Iterable[RawRecord]) -> Iterator[TimestampedValue]:
    """RawRecords -> the same, each timestamped at its arrival time."""
    arrival = stamp = None
    for record in records:
        if record.arrival_time != arrival:  # the records of one file share one arrival: one Timestamp
            arrival, stamp = record.arrival_time, Timestamp(micros=to_micros(record.arrival_time))
        yield TimestampedValue(record, stamp)


class ReadLandedFiles(beam.PTransform):
    """Batch: every file under DIR/<stream>/ -> RawRecord, timestamped at arrival.

    Landed files (``date=*/<name>-HH.(jsonl|avro)``) are read as records; any other file there
    (a subfolder, another extension, a compressed file, a name without an hour or with a date
    that does not exist) is one counted dead letter (`records_in_file`), never silence or a
    crash.  Completion markers (``.done``) are expected and skipped.  Files are read as stored
    (no decompression by name).  `dates` (``YYYY-MM-DD`` strings) limits the read to those
    arrival days' folders, for backfills.

    A file bigger than `split_bytes` is planned into ranges on record boundaries
    (`plan_file_ranges`: JSON Lines after a newline, Avro in whole blocks) and a Reshuffle spreads
    the ranges over the workers, where each is read and, fused with the read, decoded: one big
    hourly upload is parsed by many workers, not one. Records are named as a whole-file read
    names them (line or record number), whatever the split. Hand-made rather than Beam's
    ``ReadAllFromText(with_filename=True)`` / ``ReadAllFromAvro``: those give lines without their
    numbers, raise on a damaged Avro block, and do not count a compressed or misplaced file as
    one dead letter; the ranges here are planned once per file (no dynamic splitting).
    """

    def __init__(self, input_dir: str, stream: str, dates: tuple[str, ...] | None = None, *,
                 split_bytes: int = DEFAULT_SPLIT_BYTES):
        super().__init__()
        self._input_dir = input_dir
        self._stream = stream
        self._dates = dates
        self._split_bytes = split_bytes

    def expand(self, pipeline):
        root, split_bytes = self._input_dir, self._split_bytes
        patterns = stream_listing_patterns(root, self._stream, self._dates)
        return (
            pipeline
            | "Patterns" >> beam.Create(patterns)
            | "Match" >> fileio.MatchAll(empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
            | "NotMarkers" >> beam.Filter(lambda m: not is_completion_marker(m.path, COMPLETION_SUFFIX))
            | "PlanRanges" >> beam.FlatMap(plan_file_ranges, split_bytes)
            | "SpreadRanges" >> beam.Reshuffle()
            | "RecordsAtArrival" >> beam.FlatMap(lambda r: timestamped_at_arrival(records_in_range(r, root)))
        )


def stream_listing_patterns(input_dir: str, stream: str, dates: tuple[str, ...] | None = None) -> list[str]:
    """Globs listing every file under a stream's folder (Beam's ``**`` crosses folders), or under
    the named days' ``date=`` folders."""
    if not dates:
        return [FileSystems.join(input_dir, stream, "**")]
    return [FileSystems.join(input_dir, stream, f"date={date}", "**") for date in dates]


def _listed_time(metadata) -> dt.datetime | None:
    seconds = getattr(metadata, "last_updated_in_seconds", None)
    if not isinstance(seconds, (int, float)) or not 0 < seconds < 7.2e9:
        return None
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)


def landed_records(input_dir: str, stream: str) -> list[RawRecord]:
    """All RawRecords of a stream, read eagerly, in arrival order (for replay).

    As `ReadLandedFiles`, every file under the stream's folder leaves records or a counted dead
    letter; one outside the layout is replayed at the earliest landed file's arrival (a file
    time could be anything, and would stretch the replay).
    """
    listed = FileSystems.match(stream_listing_patterns(input_dir, stream))[0].metadata_list
    paths = sorted(m.path for m in listed if not is_completion_marker(m.path, COMPLETION_SUFFIX))
    arrivals = [arrival for arrival in map(layout_arrival, paths) if arrival is not None]
    earliest = min(arrivals) if arrivals else None
    records = []
    for path in paths:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            records.extend(records_in_file(path, handle.read(), input_dir, earliest))
    return sorted(records, key=lambda r: r.arrival_time)


# How far a record's own time may refine its file's arrival in a replay: a record stamped outside
# [file hour - 1 day, file hour + MAX_AHEAD_OF_ARRIVAL] is replayed at its file's arrival instead, so one
# far-future (or far-past) upload_time cannot drag the replay clock for years of empty steps (issue 13, B15).
_REPLAY_EARLIEST_BEFORE_ARRIVAL = dt.timedelta(days=1)


def _arrival_of(record: RawRecord) -> dt.datetime:
    """Finer arrival than the file's hour: the record's own upload/event/observation time if it has one
    and it is plausible for that file (timezone-aware, in the accepted range, near the file's hour)."""
    payload = record.payload
    arrival = record.arrival_time
    if isinstance(payload, UnreadableInput):
        return arrival
    if isinstance(payload, dict):
        value = payload.get("event_time") or payload.get("acquisition_time")
    else:
        match = re.search(rb'"(upload_time|event_time)"\s*:\s*"([^"]{1,64})"', bytes(payload))
        if not match:
            return arrival
        try:
            value = dt.datetime.fromisoformat(match.group(2).decode("ascii").replace("Z", "+00:00"))
        except (ValueError, UnicodeDecodeError):
            return arrival
    if not isinstance(value, dt.datetime) or value.tzinfo is None:
        return arrival
    if not arrival - _REPLAY_EARLIEST_BEFORE_ARRIVAL <= value <= arrival + MAX_AHEAD_OF_ARRIVAL:
        return arrival
    return value


# Python's own element coder, the one Beam would use between two Python steps for (stream, RawRecord).
REPLAY_CODER = FastPrimitivesCoder()


def decode_replayed(encoded: bytes) -> tuple[str, RawRecord]:
    """A replayed element's bytes -> (stream, RawRecord)."""
    stream, record = REPLAY_CODER.decode(encoded)
    return stream, RawRecord(*record)


def replay_stream(input_dir: str, streams: tuple[str, ...], *, step_seconds: int,
                  watermark_lag_seconds: int, drain_seconds: int = 0,
                  advance_processing_time: bool = True) -> TestStream:
    """A TestStream of (stream, RawRecord) in arrival order.

    Records are released in steps of `step_seconds` of arrival time; after each step the
    watermark moves to (step end - `watermark_lag_seconds`), the way a Pub/Sub watermark trails
    publish time. Processing time advances with the steps, so early panes fire; with
    `advance_processing_time` off (Flink refuses TestStream processing-time advances) the
    runner's own clock runs, and early panes fire by wall-clock time.

    Elements travel as bytes (`REPLAY_CODER`; `decode_replayed` reads them back): a portable
    runner such as Flink runs the TestStream in Java, which can hold only elements of a coder
    every SDK knows.

    After the last record, `drain_seconds` of event time pass before the input ends, as they
    would on a live stream: windows close and stateful steps emit their final rows while the
    watermark is still finite. (The DirectRunner does not hold the watermark for output of
    timers, so rows emitted only at the end of time would be dropped as late downstream.)
    """
    tagged = []
    for stream in streams:
        for record in landed_records(input_dir, stream):
            arrival = _arrival_of(record)
            tagged.append((arrival, stream, record._replace(arrival_time=arrival)))
    tagged.sort(key=lambda item: (item[0], item[1], item[2].source))
    events = TestStream(coder=BytesCoder()).with_output_types(bytes)
    if not tagged:
        return events.advance_watermark_to_infinity()
    step = dt.timedelta(seconds=step_seconds)
    start = tagged[0][0].replace(microsecond=0)  # TestStream watermarks must be whole milliseconds
    index = 0
    while index < len(tagged):
        step_end = start + step
        batch = []
        while index < len(tagged) and tagged[index][0] < step_end:
            arrival, stream, record = tagged[index]
            batch.append(TimestampedValue(REPLAY_CODER.encode((stream, record)), Timestamp(micros=to_micros(arrival))))
            index += 1
        if batch:
            events = events.add_elements(batch)
        watermark = step_end - dt.timedelta(seconds=watermark_lag_seconds)
        events = events.advance_watermark_to(Timestamp(micros=to_micros(watermark)))
        if advance_processing_time:
            events = events.advance_processing_time(step_seconds)
        start = step_end
    if drain_seconds:
        events = events.advance_watermark_to(Timestamp(micros=to_micros(start + dt.timedelta(seconds=drain_seconds))))
    return events.advance_watermark_to_infinity()


class ReplayLandedFiles(beam.PTransform):
    """Local streaming: landed files -> {stream: PCollection[RawRecord]} replayed in arrival order."""

    def __init__(self, input_dir: str, streams: tuple[str, ...] = STREAMS, *, step_seconds: int = 60,
                 watermark_lag_seconds: int = 600, drain_seconds: int = 0, advance_processing_time: bool = True):
        super().__init__()
        self._advance_processing_time = advance_processing_time
        self._drain = drain_seconds
        self._input_dir = input_dir
        self._streams = streams
        self._step_seconds = step_seconds
        self._lag = watermark_lag_seconds

    def expand(self, pipeline):
        replay = pipeline | "Replay" >> replay_stream(
            self._input_dir, self._streams, step_seconds=self._step_seconds, watermark_lag_seconds=self._lag,
            drain_seconds=self._drain, advance_processing_time=self._advance_processing_time)
        replay = replay | "Decode" >> beam.Map(decode_replayed)
        return {
            stream: replay | f"Only_{stream}" >> beam.Filter(lambda item, s=stream: item[0] == s)
            | f"Record_{stream}" >> beam.Map(lambda item: item[1])
            for stream in self._streams
        }


# A landed file is complete when its completion marker exists: the uploader writes the data file, closes it,
# then writes an empty ``<file>.done`` beside it (as gsutil/Storage Transfer "_SUCCESS"-style markers do).
COMPLETION_SUFFIX = ".done"


class WatchLandingDirectory(beam.PTransform):
    """Live streaming: complete files of one stream under DIR/<stream>/date=*/ -> RawRecord as they land.

    Completion rule: a file is read only once ``<file>.done`` exists (`COMPLETION_SUFFIX`); the
    uploader writes that empty marker after closing the data file. Beam's `fileio.MatchContinuously`
    on the data files would match a file the moment it appears and never again, so a file still
    being written would be read once, half read; here it watches the markers instead (each matched
    once: MatchContinuously keeps the paths it has seen in state) and reads the data file each
    names, whole. Arrival is the file's partition hour (`arrival_from_path`): deterministic,
    whatever the wall clock.

    Flows: nothing in -> RawRecord out, timestamped at arrival. `stop_timestamp` (seconds since the
    epoch, wall clock) ends the watch for tests and demos; the default watches for as long as the job runs.
    """

    def __init__(self, input_dir: str, stream: str, *, interval_seconds: float = 10.0,
                 stop_timestamp: float | None = None):
        super().__init__()
        self._input_dir = input_dir
        self._stream = stream
        self._interval = interval_seconds
        self._stop = stop_timestamp

    def expand(self, pipeline):
        from apache_beam.utils.timestamp import MAX_TIMESTAMP

        root = self._input_dir
        markers = [
            pipeline | f"WatchMarkers_{ext}" >> fileio.MatchContinuously(
                stream_pattern(root, self._stream, ext) + COMPLETION_SUFFIX, interval=self._interval,
                start_timestamp=Timestamp.now(),  # its default is fixed when Beam's fileio is imported
                stop_timestamp=MAX_TIMESTAMP if self._stop is None else Timestamp.of(self._stop))
            for ext in ("jsonl", "avro")
        ]
        return (
            markers
            | "BothFormats" >> beam.Flatten()
            | "CompleteFile" >> beam.Map(lambda marker: marker.path[: -len(COMPLETION_SUFFIX)])
            | "Records" >> beam.FlatMap(lambda path: timestamped_at_arrival(records_in_file(path, _read(path), root)))
        )


def _read(path: str) -> bytes:
    with FileSystems.open(path) as handle:
        return handle.read()


# Pub/Sub attributes every publisher sets (`medtwin publish --pubsub_project` does): the record's event
# time, from which Pub/Sub sets each element's timestamp and the watermark, and a unique id from which it
# drops a publisher's retries (`ReadFromPubSub(timestamp_attribute=..., id_label=...)`).
PUBSUB_EVENT_TIME_ATTRIBUTE = "event_time"
PUBSUB_ID_ATTRIBUTE = "record_id"
PUBSUB_ARRIVAL_ATTRIBUTE = "arrival_time"


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


def _iso_attribute(attributes: dict, name: str) -> dt.datetime | None:
    try:
        return _utc(dt.datetime.fromisoformat(attributes[name].replace("Z", "+00:00")))
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def pubsub_to_raw(message, subscription: str, timestamp=None) -> RawRecord:
    """A `PubsubMessage` (data = one JSON record) -> RawRecord.

    Arrival, deterministic on every redelivery: the publisher's ``arrival_time`` attribute, else the
    service's publish time, else the element's timestamp (its ``event_time`` attribute, read by
    `ReadFromPubSub(timestamp_attribute=...)`). The source names the publisher's record id.
    """
    attributes = message.attributes or {}
    arrival = _iso_attribute(attributes, PUBSUB_ARRIVAL_ATTRIBUTE)
    if arrival is None and message.publish_time is not None:
        arrival = _utc(message.publish_time)
    if arrival is None:
        arrival = timestamp.to_utc_datetime(has_tz=True)
    message_id = attributes.get(PUBSUB_ID_ATTRIBUTE) or message.message_id or ""
    return RawRecord(f"pubsub:{subscription}#{message_id}", message.data, arrival)


class ReadPubSubStream(beam.PTransform):
    """Dataflow: a Pub/Sub subscription -> RawRecord. Flag: ``--pubsub_<stream>=projects/P/subscriptions/S``.

    Element timestamps and the watermark follow the ``event_time`` attribute (event time, not publish
    time: a wearable uploading minutes of samples at once does not make them late), and messages that
    repeat a ``record_id`` (a publisher's retry) are dropped by the service-side dedupe of `id_label`.
    """

    def __init__(self, subscription: str):
        super().__init__()
        self._subscription = subscription

    def expand(self, pipeline):
        subscription = self._subscription
        return (
            pipeline
            | "ReadPubSub" >> beam.io.ReadFromPubSub(
                subscription=subscription, with_attributes=True,
                timestamp_attribute=PUBSUB_EVENT_TIME_ATTRIBUTE, id_label=PUBSUB_ID_ATTRIBUTE)
            | "ToRawRecord" >> beam.Map(
                lambda message, ts=beam.DoFn.TimestampParam: pubsub_to_raw(message, subscription, ts))
        )


# Kafka header every producer of medtwin's topics sets (`medtwin publish` does): when the record reached
# the hospital (ISO 8601). The record's own timestamp is its event time (CreateTime).
KAFKA_ARRIVAL_HEADER = "arrival_time"
KAFKA_GROUP = "medtwin"


def _kafka_arrival(record) -> dt.datetime:
    for header in getattr(record, "headers", None) or ():
        key = header.key if hasattr(header, "key") else header[0]
        value = header.value if hasattr(header, "value") else header[1]
        if key == KAFKA_ARRIVAL_HEADER and value:
            arrival = _iso_attribute({"a": bytes(value).decode("ascii", "replace")}, "a")
            if arrival is not None:
                return arrival
    return dt.datetime.fromtimestamp(record.timestamp / 1000, tz=dt.timezone.utc)


def kafka_to_raw(record, topic: str) -> RawRecord:
    """A Kafka record (``with_metadata=True``: value, partition, offset, timestamp ms, headers) -> RawRecord.

    Arrival: the ``arrival_time`` header, else the record timestamp (its event time): both set by the
    producer, so the same on every re-read.
    """
    # A record without a value is a compaction tombstone, not a message: a dead letter, not a crash.
    payload = record.value if record.value is not None else UnreadableInput("Kafka record without a value (tombstone)")
    return RawRecord(f"kafka:{topic}/{record.partition}@{record.offset}", payload, _kafka_arrival(record))


def kafka_backlog(bootstrap_servers: str, topic: str, group_id: str, timeout_seconds: float = 30) -> int:
    """Records of `topic` that consumer group `group_id` has yet to read, summed over partitions: from
    its committed offset (the earliest retained one where it has none) to the end, at this moment."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": group_id,
                         "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_seconds).topics[topic]
        if metadata.error is not None:
            raise ValueError(f"Kafka topic {topic}: {metadata.error}")
        partitions = [TopicPartition(topic, p) for p in metadata.partitions]
        backlog = 0
        for committed in consumer.committed(partitions, timeout=timeout_seconds):
            low, high = consumer.get_watermark_offsets(committed, timeout=timeout_seconds)
            start = committed.offset if committed.offset >= 0 else low  # negative: the group has none
            backlog += max(0, high - max(start, low))
        return backlog
    finally:
        consumer.close()


class ReadKafkaStream(beam.PTransform):
    """Flink/Prism: a Kafka topic -> RawRecord. Flags: ``--kafka_bootstrap host:9092 --kafka_<stream>=topic``.

    Beam's Kafka IO (cross-language, `expansion_service`; see launch/kafka/local.py):
      * timestamps: ``CreateTime``, the record timestamp the producer set to the record's event time;
        the watermark follows those timestamps (not the wall clock) while the reader has a backlog,
        so catching up on hours of backlog makes nothing late;
      * consumer group `group_id` (default ``medtwin``), offsets committed to Kafka only when the
        runner finalizes the bundle that read them (``commit_offset_in_finalize``); a group with no
        committed offset starts at the earliest one (``auto.offset.reset=earliest``), so a restarted
        job resumes where the last finalized bundle ended;
      * a bounded read, so the job ends and every window closes: `read_to_end` reads the backlog the
        group has at launch (`kafka_backlog`, Beam's ``max_num_records``) and stops; `max_read_seconds`
        stops after that long (whichever comes first). For catch-up jobs, tests and demos.
    """

    def __init__(self, bootstrap_servers: str, topic: str, *, group_id: str = KAFKA_GROUP,
                 expansion_service: str | None = None, max_read_seconds: int | None = None,
                 read_to_end: bool = False):
        super().__init__()
        self._bootstrap = bootstrap_servers
        self._topic = topic
        self._group = group_id
        self._expansion_service = expansion_service
        self._max_read_seconds = max_read_seconds
        self._read_to_end = read_to_end

    def expand(self, pipeline):
        from apache_beam.io.kafka import ReadFromKafka

        topic = self._topic
        max_records = kafka_backlog(self._bootstrap, topic, self._group) if self._read_to_end else None
        if max_records == 0:  # nothing to read: Beam's bounded Kafka read would wait out its time limit
            return pipeline | "NothingInKafka" >> beam.Create([], reshuffle=False).with_output_types(RawRecord)
        return (
            pipeline
            | "ReadKafka" >> ReadFromKafka(
                consumer_config={"bootstrap.servers": self._bootstrap, "group.id": self._group,
                                 "auto.offset.reset": "earliest", "enable.auto.commit": "false"},
                topics=[topic], with_metadata=True, commit_offset_in_finalize=True,
                timestamp_policy=ReadFromKafka.create_time_policy, max_read_time=self._max_read_seconds,
                max_num_records=max_records, expansion_service=self._expansion_service)
            | "ToRawRecord" >> beam.Map(lambda record: kafka_to_raw(record, topic))
        )
