"""``medtwin simulate --pacs URL``: the simulated hospital's images stored in a PACS, references pointing there.

After `simulator.simulate` has written OUT (images under OUT/dicom, DicomReference records in
OUT/dicom_refs/.../*.avro), `store_in_pacs` sends every image a reference names to the PACS by
STOW-RS and rewrites that reference's ``uri`` to the instance's WADO-RS URL::

    <base>/studies/<study uid>/series/<series uid>/instances/<sop uid>

built from the reference's own UIDs.  Records keep their place in their file (the locators in
truth/corruption.json stay right) and the files are rewritten with their schema, codec and sync
marker.  What is left alone: references whose uri names no file under OUT/dicom (damaged on
purpose: the pipeline must refuse them as before) and references whose UIDs are not UIDs.  An
image the PACS refuses to store (some damaged files) still gets its WADO-RS URL: the PACS then
answers 404 and the pipeline records a dead letter, as it would for any instance a PACS lacks.
The images stay in OUT/dicom as the ground truth's pixels.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

import fastavro

from transforms.dicomweb import DicomWebAccess, DicomWebError, PacsUnavailable, instance_url

_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


@dataclasses.dataclass(frozen=True)
class PacsSummary:
    stored: int  # images the PACS kept
    refused: int  # images the PACS would not store (their references still point at it)
    untouched: int  # references left as they were (no image under OUT/dicom, or UIDs that are not UIDs)


def store_in_pacs(out_dir: str | os.PathLike, access: DicomWebAccess) -> PacsSummary:
    """STOW-RS the images of OUT's DicomReferences to ``access.base_urls[0]``; point the references there."""
    client = access.connect()
    base = access.base_urls[0]
    images = os.path.realpath(os.path.join(out_dir, "dicom"))
    stored = refused = untouched = 0
    for path in sorted(glob.glob(os.path.join(out_dir, "dicom_refs", "date=*", "*.avro"))):
        with open(path, "rb") as handle:
            reader = fastavro.reader(handle)
            schema, codec, records = reader.writer_schema, reader.codec, list(reader)
            handle.seek(0)
            marker = _sync_marker(handle.read())
        for record in records:
            uri, uids = record.get("uri"), [record.get(k) for k in ("study_instance_uid", "series_instance_uid",
                                                                      "sop_instance_uid")]
            file = os.path.realpath(uri) if isinstance(uri, str) and uri else ""
            if (not file.startswith(images + os.sep) or not os.path.isfile(file)
                    or not all(isinstance(u, str) and len(u) <= 64 and _UID.fullmatch(u) for u in uids)):
                untouched += 1
                continue
            with open(file, "rb") as image:
                data = image.read()
            try:
                client.store([data], base)
                stored += 1
            except PacsUnavailable:
                raise
            except DicomWebError:  # the PACS would not keep this (damaged) image
                refused += 1
            record["uri"] = instance_url(base, *uids)
        with open(path + ".tmp", "wb") as handle:
            fastavro.writer(handle, fastavro.parse_schema(schema), records, codec=codec, sync_marker=marker)
        os.replace(path + ".tmp", path)
    return PacsSummary(stored=stored, refused=refused, untouched=untouched)


def _sync_marker(data: bytes) -> bytes:
    """The 16-byte sync marker of an Avro object container file: it ends the header and every block."""
    return data[-16:]
