"""`medtwin run`: the twin (and imaging) pipeline on a local runner, or any runner Beam knows.

    medtwin run --input demo/hospital --output demo/out --demo               # batch, DirectRunner
    medtwin run --input demo/hospital --output demo/out --demo --streaming   # replayed as a stream
    medtwin run --input demo/hospital --output demo/out --demo --runner prism   # Beam's Prism runner
    medtwin run --input demo/hospital --output demo/out --demo --runner flink   # embedded Flink
    medtwin run ... --runner DataflowRunner --project P --region R ...        # see launch/

`--runner` takes direct, prism or flink (installed by `make runners`, see
launch/runners.py) or any Beam runner name. Unknown flags go to Beam's
PipelineOptions. The job prints what it wrote.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

LOG = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from pipelines.config import add_job_arguments

    parser = subparsers.add_parser(
        "run", help="run the twin pipeline", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser)
    parser.add_argument("--runner", default="direct",
                        help="direct, prism, flink, or a Beam runner name (PrismRunner, FlinkRunner, "
                             "DataflowRunner, ...) [%(default)s]")
    parser.set_defaults(func=run, accepts_beam_args=True)
    return parser


def pipeline_options(beam_args: list[str], *, streaming: bool):
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    options = PipelineOptions(beam_args)
    options.view_as(StandardOptions).streaming = streaming
    return options


def execute(config, beam_args: list[str]) -> None:
    """Builds the graph for `config` and runs it to completion with `beam_args`."""
    import apache_beam as beam

    from pipelines.graph import build_pipeline

    started = time.monotonic()
    print(f"medtwin: {config.source.kind} source, {'streaming' if config.streaming else 'batch'}, "
          f"writing {config.sink.kind} to {config.sink.output}", file=sys.stderr)
    with beam.Pipeline(options=pipeline_options(beam_args, streaming=config.streaming)) as pipeline:
        build_pipeline(pipeline, config)
    print(f"medtwin: finished in {time.monotonic() - started:.1f} s", file=sys.stderr)


def job_config_or_exit(args: argparse.Namespace, command: str):
    """The validated JobConfig, or None after printing why not."""
    from pipelines.config import JobConfig
    from transforms.pseudonymise import MissingKeyError

    try:
        return JobConfig.from_args(args)
    except (ValueError, MissingKeyError) as error:
        print(f"medtwin {command}: {error}", file=sys.stderr)
        return None


def run(args: argparse.Namespace) -> int:
    from launch.runners import RunnerNotInstalled, runner_args
    from pipelines.query import print_summary

    config = job_config_or_exit(args, "run")
    if config is None:
        return 2
    try:
        flags = runner_args(args.runner, args.beam_args) + list(args.beam_args)
    except RunnerNotInstalled as error:
        print(f"medtwin run: {error}", file=sys.stderr)
        return 2
    execute(config, flags)
    if config.sink.kind == "parquet" and "://" not in config.sink.output:
        print_summary(config.sink.output)
    return 0
