"""`medtwin run`: the twin (and imaging) pipeline on the DirectRunner, or any runner Beam knows.

    medtwin run --input demo/hospital --output demo/out --demo               # batch, DirectRunner
    medtwin run --input demo/hospital --output demo/out --demo --streaming   # replayed as a stream
    medtwin run ... --runner DataflowRunner --project P --region R ...        # see launch/

Unknown flags go to Beam's PipelineOptions. The job prints what it wrote.
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
    parser.set_defaults(func=run, accepts_beam_args=True)
    return parser


def pipeline_options(beam_args: list[str], *, streaming: bool):
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    options = PipelineOptions(beam_args)
    options.view_as(StandardOptions).streaming = streaming
    return options


def run(args: argparse.Namespace) -> int:
    import apache_beam as beam

    from pipelines.config import JobConfig
    from pipelines.graph import build_pipeline
    from pipelines.query import print_summary
    from transforms.pseudonymise import MissingKeyError

    try:
        config = JobConfig.from_args(args)
    except (ValueError, MissingKeyError) as error:
        print(f"medtwin run: {error}", file=sys.stderr)
        return 2
    started = time.monotonic()
    print(f"medtwin run: {config.source.kind} source, {'streaming' if config.streaming else 'batch'}, "
          f"writing {config.sink.kind} to {config.sink.output}", file=sys.stderr)
    with beam.Pipeline(options=pipeline_options(args.beam_args, streaming=config.streaming)) as pipeline:
        build_pipeline(pipeline, config)
    print(f"medtwin run: finished in {time.monotonic() - started:.1f} s", file=sys.stderr)
    if config.sink.kind == "parquet" and "://" not in config.sink.output:
        print_summary(config.sink.output)
    return 0
