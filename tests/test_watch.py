"""The watch source reads a landed file only once it is complete, whole and once, at a fixed arrival.

It runs on Prism (the session's job service, LOOPBACK workers in this process): the DirectRunner
does not wait out an SDF's deferred polls, so its watch ends at once, before any file lands.

A file is written in two halves with a pause between them while the pipeline watches; its
completion marker lands after the second half. Every line must come out exactly once, and a file
that never got its marker must not be read at all.
"""

import datetime as dt
import json
import threading
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from transforms.sources import COMPLETION_SUFFIX, WatchLandingDirectory

LINES = [json.dumps({"upload_id": f"u{i}", "samples": []}) for i in range(6)]


def _append(record, path):
    # The DirectRunner runs in this process: an unbounded PCollection is easiest seen through a file.
    with open(path, "a") as out:
        out.write(json.dumps([record.source, record.payload.decode(), record.arrival_time.isoformat()]) + "\n")


def _watch(root, out, seconds, prism_flags):
    """Runs the watch on Prism for `seconds` of wall clock; each record's (source, arrival) goes to `out`."""
    options = PipelineOptions(prism_flags, streaming=True)
    with beam.Pipeline(options=options) as pipeline:
        (pipeline
         | WatchLandingDirectory(str(root), "wearables", interval_seconds=0.5, stop_timestamp=time.time() + seconds)
         | beam.Map(_append, str(out)))
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_a_file_written_in_two_halves_is_read_once_whole(tmp_path, prism_flags):
    day = tmp_path / "in" / "wearables" / "date=2026-03-02"
    day.mkdir(parents=True)
    landing = day / "wearables-06.jsonl"
    never_completed = day / "wearables-07.jsonl"
    never_completed.write_text(LINES[0] + "\n")

    def upload():
        with open(landing, "w") as handle:
            handle.write("\n".join(LINES[:3]) + "\n")
            handle.flush()
            time.sleep(3)  # the watcher polls several times while the file is half written
            handle.write("\n".join(LINES[3:]) + "\n")
        (day / ("wearables-06.jsonl" + COMPLETION_SUFFIX)).touch()

    writer = threading.Thread(target=upload)
    writer.start()
    try:
        records = _watch(tmp_path / "in", tmp_path / "out.txt", seconds=8, prism_flags=prism_flags)
    finally:
        writer.join()
    assert sorted(payload for _, payload, _ in records) == sorted(LINES)  # once each: no half read, no re-read
    assert {source.rsplit(":", 1)[0] for source, _, _ in records} == {"wearables/date=2026-03-02/wearables-06.jsonl"}
    # Arrival is the file's partition hour, not the wall clock.
    assert {arrival for _, _, arrival in records} == {dt.datetime(2026, 3, 2, 6, tzinfo=dt.timezone.utc).isoformat()}
