"""`medtwin backfill`: re-run history, day by day, with exactly the streaming job's transforms.

    medtwin backfill --input gs://landing --output gs://lake/medtwin --start 2026-03-01 --end 2026-03-07 \\
        --engine dataflow --project P --region R --temp_location gs://B/tmp
    medtwin backfill --input demo/hospital --output demo/out --yesterday --demo

Each day is one batch job over the landed files that *arrived* that day
(``<stream>/date=YYYY-MM-DD``), built by the same `build_pipeline` as the live
job. Output file names are deterministic, so re-running a day replaces its
files instead of duplicating rows. Data that arrived after midnight for the
previous day's windows is in the next day's files and is picked up by that
day's run.

Scheduling: run it daily with ``--yesterday`` from cron, Cloud Scheduler +
a Dataflow Flex Template, or Airflow's BashOperator, e.g. crontab:
``15 2 * * *  medtwin backfill --input ... --output ... --yesterday``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys


def days_between(start: dt.date, end: dt.date) -> list[str]:
    """Inclusive list of ``YYYY-MM-DD`` from start to end."""
    if end < start:
        raise ValueError(f"--end {end} is before --start {start}")
    return [(start + dt.timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def add_parser(subparsers) -> argparse.ArgumentParser:
    from launch.engines import add_engine_arguments
    from pipelines.config import add_job_arguments

    parser = subparsers.add_parser(
        "backfill", help="re-run history with the same transforms (batch, per day)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    when = parser.add_argument_group("days")
    when.add_argument("--start", type=dt.date.fromisoformat, help="first arrival day, YYYY-MM-DD")
    when.add_argument("--end", type=dt.date.fromisoformat, help="last arrival day (inclusive) [--start]")
    when.add_argument("--yesterday", action="store_true", help="just yesterday (UTC), for a daily schedule")
    add_job_arguments(parser)
    add_engine_arguments(parser)
    parser.set_defaults(func=run, accepts_beam_args=True)
    return parser


def run(args: argparse.Namespace) -> int:
    from launch.engines import beam_args, engine_config
    from pipelines.run import execute, job_config_or_exit

    if args.streaming:
        print("medtwin backfill: backfills are batch jobs; drop --streaming", file=sys.stderr)
        return 2
    if args.yesterday:
        start = end = dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)
    elif args.start:
        start, end = args.start, args.end or args.start
    else:
        print("medtwin backfill: give --start [--end] or --yesterday", file=sys.stderr)
        return 2
    try:
        days = days_between(start, end)
        engine = engine_config(args)
    except ValueError as error:
        print(f"medtwin backfill: {error}", file=sys.stderr)
        return 2
    for number, day in enumerate(days, start=1):
        args.dates = (day,)
        config = job_config_or_exit(args, "backfill")
        if config is None:
            return 2
        flags = beam_args(engine, streaming=False) + list(args.beam_args)
        flags = [f.replace(f"--job_name={engine.job_name}", f"--job_name={engine.job_name}-{day}") for f in flags]
        print(f"medtwin backfill: day {number}/{len(days)}: {day}", file=sys.stderr)
        if args.dry_run:
            print(f"medtwin backfill (dry run) {day}: " + " ".join(flags))
            continue
        execute(config, flags)
    return 0
