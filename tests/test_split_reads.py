"""Batch reads in ranges (issue 14 item 1): a big landed file is planned into ranges on record
boundaries, spread by a Reshuffle, and each range gives exactly the records a whole-file read gives.

Ranges are checked against `records_in_file` (the whole-file reader the replay and the watch use)
record by record, names included, for JSON Lines (CRLF, a lone CR, empty lines), Avro with and
without deflate, and files that must be read whole (damaged, compressed, outside the layout, small).
The pipeline check runs `ReadLandedFiles` on the session's Prism with tiny ranges.
"""

from __future__ import annotations

import gzip
import io
import json
import os

import apache_beam as beam
import fastavro
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from transforms.decode import UnreadableInput
from transforms.landed_files import avro_claimed_records
from transforms.sources import ReadLandedFiles, plan_file_ranges, records_in_file, records_in_range

SCHEMA = fastavro.parse_schema({"type": "record", "name": "Event", "fields": [
    {"name": "device_id", "type": "string"}, {"name": "n", "type": "long"}]})


def _landed(root, stream="device_logs", hour=7, ext="jsonl"):
    folder = root / stream / "date=2026-03-02"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{stream}-{hour:02d}.{ext}"


def _jsonl_bytes(lines=300):
    parts = []
    for n in range(lines):
        parts.append(json.dumps({"device_id": f"xr-{n % 3}", "n": n, "pad": "x" * (n % 17)}).encode())
        parts.append(b"\r\n" if n % 7 == 0 else b"\n")
        if n % 50 == 0:
            parts.append(b"\n")        # an empty line: numbered, not a record
        if n == 123:
            parts.append(b"\r")        # a lone CR: a line break to bytes.splitlines
    return b"".join(parts)


def _avro_bytes(records=400, codec="null"):
    handle = io.BytesIO()
    fastavro.writer(handle, SCHEMA, [{"device_id": f"xr-{n % 3}", "n": n} for n in range(records)],
                    codec=codec, sync_interval=100)
    return handle.getvalue()


def _metadata(path):
    return FileSystems.match([str(path)])[0].metadata_list[0]


def _read_in_ranges(path, root, split_bytes):
    ranges = plan_file_ranges(_metadata(path), split_bytes)
    return ranges, [record for file_range in ranges for record in records_in_range(file_range, str(root))]


def _whole(path, root):
    return list(records_in_file(str(path), path.read_bytes(), str(root)))


def _comparable(records):
    return [(r.source, r.payload if not isinstance(r.payload, UnreadableInput) else repr(r.payload),
             r.arrival_time) for r in records]


@pytest.mark.parametrize("split_bytes", [64, 1000, 4096])
def test_json_lines_ranges_end_on_newlines_and_give_the_whole_files_records(tmp_path, split_bytes):
    path = _landed(tmp_path)
    data = _jsonl_bytes()
    path.write_bytes(data)
    ranges, records = _read_in_ranges(path, tmp_path, split_bytes)
    assert len(ranges) >= len(data) // (split_bytes + 200)
    assert ranges[0].start == 0 and ranges[-1].end == len(data)
    assert all(a.end == b.start for a, b in zip(ranges, ranges[1:]))
    assert all(data[r.end - 1:r.end] == b"\n" for r in ranges[:-1])
    assert _comparable(records) == _comparable(_whole(path, tmp_path))
    assert len(records) == 300 and records[-1].source.endswith(f":{len(data.splitlines())}")


@pytest.mark.parametrize("codec", ["null", "deflate"])
def test_avro_ranges_hold_whole_blocks_and_give_the_whole_files_records(tmp_path, codec):
    path = _landed(tmp_path, ext="avro")
    path.write_bytes(_avro_bytes(codec=codec))
    ranges, records = _read_in_ranges(path, tmp_path, 300)
    assert len(ranges) > 2
    assert all(a.end == b.start for a, b in zip(ranges, ranges[1:])) and ranges[-1].end == path.stat().st_size
    assert sum(r.claimed for r in ranges) == 400
    assert _comparable(records) == _comparable(_whole(path, tmp_path))
    assert [r.payload["n"] for r in records] == list(range(400))


def test_files_that_cannot_be_split_are_read_whole_as_before(tmp_path):
    damaged = _landed(tmp_path, hour=1, ext="avro")
    damaged.write_bytes(_avro_bytes()[:-700])                      # cut short: the whole-file reader counts the rest
    packed = _landed(tmp_path, hour=2)
    packed.write_bytes(gzip.compress(_jsonl_bytes()))               # compressed, named .jsonl: one counted dead letter
    outside = tmp_path / "device_logs" / "date=2026-03-02" / "extra" / "device_logs-03.jsonl"
    outside.parent.mkdir()
    outside.write_bytes(_jsonl_bytes())                             # a subfolder: outside the layout
    small = _landed(tmp_path, hour=4)
    small.write_bytes(_jsonl_bytes(5))                              # no bigger than one range
    for path in (damaged, packed, outside, small):
        ranges, records = _read_in_ranges(path, tmp_path, 64 if path != small else 1 << 20)
        assert [(r.start, r.end) for r in ranges] == [(0, None)], path
        assert _comparable(records) == _comparable(_whole(path, tmp_path)), path
    _, damaged_records = _read_in_ranges(damaged, tmp_path, 64)
    lost = [r.payload for r in damaged_records if isinstance(r.payload, UnreadableInput)]
    assert len(lost) == 1 and len(damaged_records) - 1 + lost[0].record_count == avro_claimed_records(damaged.read_bytes())


def test_read_landed_files_on_prism_reads_every_record_once_in_ranges(tmp_path, prism_flags):
    _landed(tmp_path, hour=5).write_bytes(_jsonl_bytes())
    _landed(tmp_path, hour=6, ext="avro").write_bytes(_avro_bytes(codec="deflate"))
    expected = sorted(r.source for path in sorted((tmp_path / "device_logs").rglob("*-0*.*"))
                      for r in _whole(path, tmp_path))
    out = tmp_path / "sources.txt"
    options = PipelineOptions(prism_flags)
    with beam.Pipeline(options=options) as pipeline:
        _ = (pipeline
             | ReadLandedFiles(str(tmp_path), "device_logs", split_bytes=512)
             | beam.Map(lambda record: record.source)
             | beam.io.WriteToText(str(out), shard_name_template=""))
    assert sorted(out.read_text().splitlines()) == expected
    assert len(expected) == 700 and len(set(expected)) == 700
    assert os.path.getsize(_landed(tmp_path, hour=5)) > 10 * 512  # so the read was in many ranges
