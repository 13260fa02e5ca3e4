"""Land the simulated streams as files, the way a landing bucket holds them.

Layout under OUT (what `transforms.sources` reads):

    wearables/date=YYYY-MM-DD/wearables-HH.jsonl         WearableUpload, JSON Lines
    observations/date=YYYY-MM-DD/observations-HH.jsonl   ClinicalObservation, JSON Lines
    device_logs/date=YYYY-MM-DD/device_logs-HH.avro      DeviceLogEvent, Avro (deflate)
    dicom_refs/date=YYYY-MM-DD/dicom_refs-HH.avro        DicomReference, Avro (deflate)
    dicom/<study_uid>/<sop_uid>.dcm                      the images (`simulator.studies`)
    truth/*.json                                         ground truth (`simulator.hospital`)

``date`` and ``HH`` are the UTC day and hour in which a record *arrived*, not
when it happened: a late upload lands in the hour it reached the hospital.
Within a file records are in arrival order. JSON lines are compact, keys in
schema order, timestamps ISO-8601 with microseconds and ``Z``; a damaged
record may be any bytes on its line. Avro files carry the schema derived by
`schemas.avro_schema`.

Records are located the way the pipeline names its sources: ``<file>:<line>``
(1-based) for JSON Lines and ``<file>#<n>`` (1-based record) for Avro, the file
relative to OUT.

Same inputs, same bytes: JSON comes from orjson (insertion-ordered keys,
shortest round-trip floats), Avro from fastavro with a sync marker derived
from the seed and the file name, and truth JSON is written with sorted keys.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import os
from typing import Any

import fastavro
import orjson

from schemas import INPUT_STREAMS, avro_schema

JSON_STREAMS = ("wearables", "observations")
AVRO_STREAMS = ("device_logs", "dicom_refs")


@dataclasses.dataclass(frozen=True)
class Landed:
    """One record as it lands.

    arrival: aware UTC datetime it reached the hospital (picks the file).
    payload: JSON streams: a JSON-ready dict (timestamps already ISO strings) or the raw
      bytes of a damaged line; Avro streams: the in-memory record (aware datetimes).
    record_id: the record's own id (upload_id, event_id, observation_id, SOP Instance UID),
      kept here even when damage removes it from the payload.
    """

    arrival: dt.datetime
    payload: dict | bytes
    record_id: str


def json_line(payload: dict) -> bytes:
    """A JSON-ready dict -> one compact JSON line, without the newline."""
    return orjson.dumps(payload)


def partition_path(stream: str, arrival: dt.datetime) -> str:
    """The file (relative to OUT) a record of `stream` arriving at `arrival` lands in."""
    when = arrival.astimezone(dt.timezone.utc)
    extension = "jsonl" if stream in JSON_STREAMS else "avro"
    return f"{stream}/date={when:%Y-%m-%d}/{stream}-{when:%H}.{extension}"


def write_stream(out_dir: str | os.PathLike, stream: str, landed: list[Landed], *, seed: int) -> list[str]:
    """Write one stream's records into its hourly files.

    Returns the source locator of each record, in the order of `landed`.
    """
    order = sorted(range(len(landed)), key=lambda i: landed[i].arrival)
    sources: list[str] = [""] * len(landed)
    for relative, group in itertools.groupby(order, key=lambda i: partition_path(stream, landed[i].arrival)):
        indices = list(group)
        path = os.path.join(out_dir, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if stream in JSON_STREAMS:
            lines = [p if isinstance(p, bytes) else json_line(p) for p in (landed[i].payload for i in indices)]
            with open(path, "wb") as handle:
                handle.write(b"".join(line + b"\n" for line in lines))
            separator = ":"
        else:
            schema = fastavro.parse_schema(avro_schema(INPUT_STREAMS[stream]))
            marker = hashlib.blake2b(f"medtwin:{seed}:{relative}".encode(), digest_size=16).digest()
            with open(path, "wb") as handle:
                fastavro.writer(handle, schema, [landed[i].payload for i in indices], codec="deflate",
                                sync_marker=marker)
            separator = "#"
        for number, i in enumerate(indices, start=1):
            sources[i] = f"{relative}{separator}{number}"
    return sources


def write_truth(out_dir: str | os.PathLike, name: str, content: Any) -> str:
    """Write OUT/truth/<name>.json (sorted keys, UTF-8) and return its path."""
    path = os.path.join(out_dir, "truth", f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=1, sort_keys=True, ensure_ascii=False)
        handle.write("\n")
    return path
