"""Hostile landed files (issue 13 B5, B16, B20): an odd name, a damaged Avro file, a compressed file,
a subfolder or another extension is a counted dead letter, never a crash and never silence; the
count covers what the file held, so records in = records out + dead letters."""

import bz2
import datetime as dt
import gzip
import io
import json
import tracemalloc
import zlib

import apache_beam as beam
import fastavro
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from schemas import DEVICE_LOG_EVENT, avro_schema
from transforms.decode import UnreadableInput
from transforms.landed_files import (
    MAX_AVRO_BLOCK_BYTES,
    MAX_INFLATED_BYTES,
    avro_claimed_records,
    avro_inflation_problem,
    count_records,
    layout_arrival,
)
from transforms.sources import ReadLandedFiles, landed_records, records_in_file

DAY = "2026-03-02"
MRN = "MRN0099001"


def _events(n):
    return [{"event_id": f"e{i}", "device_id": "XR-1", "device_model": "DRX-1",
             "event_time": dt.datetime(2026, 3, 2, 6, i % 60, tzinfo=dt.timezone.utc), "kind": "heartbeat",
             "severity": "info"} for i in range(n)]


def _jsonl(n):
    return b"".join(json.dumps({"upload_id": f"u{i}", "upload_time": "2026-03-02T06:05:00Z"}).encode() + b"\n"
                    for i in range(n))


def _accounted(records):
    """(records read, records counted by dead letters)."""
    out = sum(1 for r in records if not isinstance(r.payload, UnreadableInput))
    dead = sum(r.payload.record_count for r in records if isinstance(r.payload, UnreadableInput))
    return out, dead


@pytest.mark.parametrize("name", [
    "observations.jsonl", "observations-99.jsonl", "observations--99.jsonl", "observations-24.avro",
    f"observations-{MRN}.jsonl",
])
def test_an_oddly_named_file_is_a_counted_dead_letter_not_a_crash(name):
    path = f"/in/observations/date={DAY}/{name}"
    (record,) = records_in_file(path, _jsonl(7), "/in")
    assert isinstance(record.payload, UnreadableInput) and record.payload.record_count == 7
    assert record.arrival_time == dt.datetime(2026, 3, 2, tzinfo=dt.timezone.utc)
    assert MRN not in record.source + record.payload.reason and name not in record.source + record.payload.reason


def test_a_date_that_does_not_exist_is_a_dead_letter_at_the_listing_time():
    listed = dt.datetime(2026, 3, 2, 9, tzinfo=dt.timezone.utc)
    (record,) = records_in_file("/in/observations/date=2026-13-45/observations-06.jsonl", _jsonl(3), "/in", listed)
    assert record.payload.record_count == 3 and "names no real day" in record.payload.reason
    assert record.arrival_time == listed
    assert layout_arrival("/in/observations/date=2026-02-30/observations-06.jsonl") is None


@pytest.mark.parametrize("block, cut", [(None, 30), (None, 400), (None, 3000), (16, 30), (16, 200)])
def test_a_truncated_avro_file_is_counted_by_what_its_blocks_claimed(block, cut):
    # Cut inside the last block: its header survives and claims its records. (A cut exactly at a
    # block boundary leaves a valid, shorter file: Avro containers hold no total to check against.)
    data = _avro(144, block) if block else _avro(144)
    assert avro_claimed_records(data) == 144
    records = list(records_in_file(f"/in/device_logs/date={DAY}/device_logs-06.avro", data[:-cut], "/in"))
    out, dead = _accounted(records)
    assert out + dead == 144 and dead >= 1
    assert "its blocks claimed 144 record(s)" in records[-1].payload.reason


def _avro(n, block=None):
    buffer = io.BytesIO()
    options = {"sync_interval": block * 60} if block else {}
    fastavro.writer(buffer, fastavro.parse_schema(avro_schema(DEVICE_LOG_EVENT)), _events(n), **options)
    return buffer.getvalue()


@pytest.mark.parametrize("compress, suffix", [(gzip.compress, ".jsonl"), (gzip.compress, ".jsonl.gz"),
                                              (bz2.compress, ".jsonl.bz2"), (gzip.compress, ".avro")])
def test_a_compressed_file_is_counted_by_the_records_it_holds(compress, suffix):
    data = compress(_avro(50) if suffix == ".avro" else _jsonl(50))
    (record,) = records_in_file(f"/in/wearables/date={DAY}/wearables-06{suffix}", data, "/in")
    assert isinstance(record.payload, UnreadableInput) and record.payload.record_count == 50


def test_a_gzip_bomb_is_counted_within_the_inflation_cap():
    data = gzip.compress(b"\n" * (MAX_INFLATED_BYTES + (4 << 20)), compresslevel=9)
    counted = count_records(data)
    assert not counted.exact and counted.records <= MAX_INFLATED_BYTES


def _zigzag(value: int) -> bytes:
    value, out = (value << 1) ^ (value >> 63), b""
    while value > 0x7F:
        out, value = out + bytes([(value & 0x7F) | 0x80]), value >> 7
    return out + bytes([value])


def _avro_bomb(inflated_bytes: int, codec: str = "deflate") -> bytes:
    """A well-formed Avro container whose one block (claiming 3 records) inflates to `inflated_bytes`."""
    buffer = io.BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(avro_schema(DEVICE_LOG_EVENT)), [], codec="deflate")
    handle = io.BytesIO(buffer.getvalue())
    fastavro.reader(handle)
    header = buffer.getvalue()[:handle.tell()]
    if codec != "deflate":
        header = header.replace(b"\x0edeflate", _zigzag(len(codec)) + codec.encode())
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = b"".join(squeezer.compress(bytes(1 << 20)) for _ in range(inflated_bytes >> 20)) + squeezer.flush()
    return header + _zigzag(3) + _zigzag(len(block)) + block + header[-16:]


def test_an_avro_deflate_bomb_is_refused_before_any_block_is_inflated_whole():
    data = _avro_bomb(MAX_AVRO_BLOCK_BYTES + (8 << 20))
    assert len(data) < 100_000 and avro_claimed_records(data) == 3
    tracemalloc.start()
    try:
        (record,) = records_in_file(f"/in/device_logs/date={DAY}/device_logs-06.avro", data, "/in")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak   # fastavro alone would hold the 72 MiB block
    assert isinstance(record.payload, UnreadableInput) and record.payload.record_count == 3
    assert "a compression bomb" in record.payload.reason and "claimed 3 record(s)" in record.payload.reason
    # A block under the cap is read as usual: the cap refuses bombs, not files.
    assert avro_inflation_problem(_avro(144)) is None and avro_inflation_problem(_avro_bomb(2 << 20)) is None


@pytest.mark.parametrize("codec, named", [("snappy", "'snappy'"), ("MRN0099001", "(value withheld)")])
def test_an_avro_codec_medtwin_does_not_read_is_refused_by_name_only_when_known(codec, named):
    (record,) = records_in_file(f"/in/device_logs/date={DAY}/device_logs-06.avro", _avro_bomb(1 << 20, codec), "/in")
    assert isinstance(record.payload, UnreadableInput) and record.payload.record_count == 3
    assert f"Avro codec {named} is not accepted" in record.payload.reason and MRN not in record.payload.reason


def _land(root, relative, data):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def landing(tmp_path):
    _land(tmp_path, f"wearables/date={DAY}/wearables-06.jsonl", _jsonl(4))
    _land(tmp_path, f"wearables/date={DAY}/wearables-06.jsonl.done", b"")  # a completion marker: expected
    _land(tmp_path, f"wearables/date={DAY}/late/wearables-07.jsonl", _jsonl(3))  # a subfolder
    _land(tmp_path, f"wearables/date={DAY}/wearables-08.json", _jsonl(2))  # another extension
    _land(tmp_path, f"wearables/date={DAY}/wearables-09.jsonl.gz", gzip.compress(_jsonl(5)))
    _land(tmp_path, f"wearables/date={DAY}/wearables.jsonl", _jsonl(6))  # no hour
    _land(tmp_path, "wearables/date=2026-13-45/wearables-06.jsonl", _jsonl(1))
    _land(tmp_path, "wearables/stray.jsonl", _jsonl(1))  # outside the date= folders
    return tmp_path


EXPECTED_READ, EXPECTED_DEAD = 4, 3 + 2 + 5 + 6 + 1 + 1


def test_every_file_under_a_stream_leaves_records_or_a_counted_dead_letter(landing):
    with TestPipeline() as pipeline:
        records = pipeline | ReadLandedFiles(str(landing), "wearables")
        counts = (records | beam.Map(lambda r: ("dead", r.payload.record_count) if isinstance(r.payload, UnreadableInput)
                                     else ("read", 1)) | beam.CombinePerKey(sum))
        assert_that(counts, equal_to([("read", EXPECTED_READ), ("dead", EXPECTED_DEAD)]))


def test_a_backfill_of_a_day_with_an_odd_file_does_not_fail(landing):
    with TestPipeline() as pipeline:
        records = pipeline | ReadLandedFiles(str(landing), "wearables", dates=(DAY,))
        counts = (records | beam.Map(lambda r: ("dead", r.payload.record_count) if isinstance(r.payload, UnreadableInput)
                                     else ("read", 1)) | beam.CombinePerKey(sum))
        assert_that(counts, equal_to([("read", EXPECTED_READ), ("dead", 3 + 2 + 5 + 6)]))


def test_the_replay_reads_the_same_and_stays_on_the_landed_clock(landing):
    records = landed_records(str(landing), "wearables")
    assert _accounted(records) == (EXPECTED_READ, EXPECTED_DEAD)
    assert all(r.arrival_time >= dt.datetime(2026, 3, 2, tzinfo=dt.timezone.utc) for r in records)
    assert max(r.arrival_time for r in records) < dt.datetime(2026, 3, 3, tzinfo=dt.timezone.utc)


def test_the_simulator_lands_byte_identical_avro_for_the_same_seed(tmp_path):
    # issue 13, item 8: fastavro's default sync marker is random; the simulator derives it from the seed.
    from simulator.writers import Landed, write_stream

    landed = [Landed(dt.datetime(2026, 3, 2, 6, 30, tzinfo=dt.timezone.utc), event, event["event_id"])
              for event in _events(30)]
    files = []
    for run, seed in (("a", 7), ("b", 7), ("c", 8)):
        write_stream(tmp_path / run, "device_logs", landed, seed=seed)
        files.append((tmp_path / run / f"device_logs/date={DAY}/device_logs-06.avro").read_bytes())
    assert files[0] == files[1] and files[0] != files[2]
