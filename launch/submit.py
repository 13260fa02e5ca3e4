"""`medtwin launch`: submit the twin pipeline to Dataflow or Flink (or run it portably here).

    # Dataflow, streaming from Pub/Sub into BigQuery, imaging step on T4 GPUs
    medtwin launch --engine dataflow --project P --region europe-west4 --temp_location gs://B/tmp \\
        --streaming --source pubsub --pubsub_wearables projects/P/subscriptions/wearables ... \\
        --bigquery_dataset P:medtwin --gpu nvidia-tesla-t4 \\
        --sdk_container_image REGION-docker.pkg.dev/P/medtwin/medtwin-gpu:TAG   # launch/containers/

    # Flink, streaming from Kafka
    medtwin launch --engine flink --flink_master flink-jm:8081 --environment_type DOCKER \\
        --streaming --source kafka --kafka_bootstrap kafka:9092 --kafka_wearables wearables ...

    # locally through Beam's portable job service (the path Flink takes, without a cluster)
    medtwin launch --engine portable --input demo/hospital --output demo/out-portable --demo

`--dry_run` prints the Beam flags that would be used and submits nothing.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    from launch.engines import add_engine_arguments
    from pipelines.config import add_job_arguments

    parser = subparsers.add_parser(
        "launch", help="submit the pipeline to Dataflow or Flink", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser)
    add_engine_arguments(parser)
    parser.set_defaults(func=run, accepts_beam_args=True)
    return parser


def run(args: argparse.Namespace) -> int:
    from launch.engines import beam_args, engine_config
    from pipelines.run import execute, job_config_or_exit

    config = job_config_or_exit(args, "launch")
    if config is None:
        return 2
    try:
        engine = engine_config(args)
    except ValueError as error:
        print(f"medtwin launch: {error}", file=sys.stderr)
        return 2
    flags = beam_args(engine, streaming=config.streaming) + list(args.beam_args)
    if args.dry_run:
        print("medtwin launch (dry run): " + " ".join(flags))
        return 0
    execute(config, flags)
    return 0
