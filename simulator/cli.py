"""``medtwin simulate``: write a synthetic hospital (streams, DICOM, truth) to a directory.

    medtwin simulate --out /tmp/h --patients 50 --devices 4 --hours 6 --seed 7 --corrupt-fraction 0.01
    medtwin simulate --out /tmp/h --pacs http://127.0.0.1:8042/dicom-web --pacs_credentials file:pacs.credentials

`add_parser` registers the subcommand; `run` calls `simulator.simulate` and
prints what was written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from simulator.hospital import DEFAULT_START, simulate
from simulator.pacs import store_in_pacs
from transforms.dicomweb import CredentialsError, CredentialsReference, DicomWebAccess, DicomWebError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``simulate`` on an argparse subparsers object; returns its parser."""
    parser = subparsers.add_parser(
        "simulate",
        help="write a synthetic hospital: wearable, device-log and DICOM-reference streams, images, truth",
        description="Simulate a hospital: patients wearing vital-sign wearables (some with a COVID-like "
                    "course), nurse observations, X-ray devices (some failing) and chest X-rays. Writes "
                    "OUT/<stream>/date=YYYY-MM-DD/<stream>-HH.(jsonl|avro), OUT/dicom/ and OUT/truth/. "
                    "The same arguments always give the same files.",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    parser.add_argument("--patients", type=int, default=20, metavar="N",
                        help="patients wearing a wearable (default %(default)s)")
    parser.add_argument("--devices", type=int, default=4, metavar="M", help="X-ray devices (default %(default)s)")
    parser.add_argument("--hours", type=float, default=3.0, metavar="H",
                        help="simulated period, hours (default %(default)s)")
    parser.add_argument("--seed", type=int, default=7, metavar="S", help="random seed (default %(default)s)")
    parser.add_argument("--start", type=_utc_time, default=DEFAULT_START, metavar="ISO",
                        help=f"start of the period, ISO-8601, UTC if no offset is given "
                             f"(default {DEFAULT_START:%Y-%m-%dT%H:%M}Z)")
    parser.add_argument("--sample-seconds", type=float, default=5.0, metavar="S",
                        help="wearable sampling interval, seconds, up to 60 (default %(default)s)")
    parser.add_argument("--corrupt-fraction", type=float, default=0.0, metavar="F",
                        help="share of records per stream damaged on purpose, each listed in "
                             "truth/corruption.json (default %(default)s)")
    parser.add_argument("--infected-fraction", type=float, default=0.3, metavar="F",
                        help="share of patients with a COVID-like deterioration during the period "
                             "(default %(default)s)")
    parser.add_argument("--image-size", type=int, default=512, metavar="ROWS",
                        help="rows of each radiograph; columns are 0.85-1.0 times as many "
                             "(default %(default)s)")
    parser.add_argument("--pacs", metavar="URL",
                        help="a DICOMweb root (e.g. http://127.0.0.1:8042/dicom-web, launch/orthanc.sh start): "
                             "store the images there by STOW-RS and point the DICOM references at their "
                             "WADO-RS URLs (simulator/pacs.py)")
    parser.add_argument("--pacs_credentials", metavar="env:NAME|file:PATH",
                        help="where the PACS's user:password is (never on the command line)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def _utc_time(text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 time") from None
    return when.astimezone(dt.timezone.utc) if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def run(args: argparse.Namespace) -> int:
    """Simulate as `args` say; print a summary. Returns 0, or 2 when the arguments are refused."""
    try:
        access = _pacs_access(args)
        summary = simulate(args.out, patients=args.patients, devices=args.devices, hours=args.hours,
                           seed=args.seed, start=args.start, sample_seconds=args.sample_seconds,
                           corrupt_fraction=args.corrupt_fraction, infected_fraction=args.infected_fraction,
                           image_size=args.image_size, progress=not args.quiet)
    except (ValueError, CredentialsError) as error:
        print(f"medtwin simulate: {error}", file=sys.stderr)
        return 2
    print(f"wrote {summary.out_dir} in {summary.seconds:.1f} s")
    print(f"  patients  {summary.patients} ({summary.infected} infected, {summary.severe} severe): "
          f"{summary.uploads} uploads, {summary.samples} samples, {summary.duplicate_uploads} retried, "
          f"{summary.late_uploads} late ({summary.too_late_uploads} beyond the allowed lateness), "
          f"{summary.observations} nurse observations")
    print(f"  devices   {summary.devices} ({summary.failing_devices} failing, {summary.overdue_devices} overdue "
          f"for maintenance): {summary.device_events} log events")
    print(f"  studies   {summary.studies} chest X-rays")
    print(f"  damaged   {summary.corrupted_records} records (truth/corruption.json)")
    if access is not None:
        try:
            stored = store_in_pacs(args.out, access)
        except DicomWebError as error:
            print(f"medtwin simulate: {error}", file=sys.stderr)
            return 1
        print(f"  pacs      {stored.stored} images stored, {stored.refused} refused by the PACS, "
              f"{stored.untouched} references left as they were")
    return 0


def _pacs_access(args: argparse.Namespace) -> DicomWebAccess | None:
    if not args.pacs:
        if args.pacs_credentials:
            raise ValueError("--pacs_credentials without --pacs")
        return None
    credentials = CredentialsReference.parse(args.pacs_credentials) if args.pacs_credentials else None
    access = DicomWebAccess(base_urls=(args.pacs.rstrip("/"),), credentials=credentials)
    access.connect()  # the credentials must be readable before hours are simulated
    return access
