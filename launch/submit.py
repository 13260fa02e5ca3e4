"""`medtwin launch`: submit the twin pipeline to Dataflow or Flink (or run it portably here).

    # Dataflow, batch over a landing bucket, the inference step alone on T4 GPUs (right fitting),
    # private workers under their own service account, state encrypted with the hospital's key
    medtwin launch --engine dataflow --project P --region europe-west4 --temp_location gs://B/tmp \\
        --input gs://landing --output gs://lake --gpu nvidia-tesla-t4 --gpu_machine_type n1-standard-8 \\
        --sdk_container_image europe-west4-docker.pkg.dev/P/medtwin/medtwin-gpu:TAG \\
        --service_account_email medtwin-worker@P.iam.gserviceaccount.com \\
        --dataflow_kms_key projects/P/locations/europe-west4/keyRings/medtwin/cryptoKeys/dataflow \\
        --subnetwork regions/europe-west4/subnetworks/medtwin --machine_type n2-standard-4 --max_workers 20

    # Flink, streaming from Kafka, RocksDB state checkpointed every 30 s
    medtwin launch --engine flink --flink_master flink-jm:8081 --environment_type DOCKER \\
        --sdk_container_image .../medtwin-worker:TAG --parallelism 8 --max_parallelism 128 \\
        --checkpointing_interval 30000 --state_backend rocksdb --state_backend_storage_path s3://B/ckpt \\
        --streaming --source kafka --kafka_bootstrap kafka:9092 --kafka_wearables wearables ...

    # the demo hospital on a Flink session cluster on this machine (launch/flink_cluster.sh)
    launch/flink_cluster.sh start
    medtwin launch --engine flink --flink_master localhost:8081 --input demo/hospital \\
        --output demo/out-cluster --demo
    launch/flink_cluster.sh stop

    # locally through Beam's portable job service (the path Flink takes, without a cluster)
    medtwin launch --engine portable --input demo/hospital --output demo/out-portable --demo

`--dry_run` prints the Beam flags that would be used (and the inference step's resource hint)
and submits nothing.
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
    from launch.runners import RunnerNotInstalled
    from pipelines.run import execute, job_config_or_exit

    config = job_config_or_exit(args, "launch")
    if config is None:
        return 2
    try:
        engine = engine_config(args)
        flags = beam_args(engine, streaming=config.streaming, passed=args.beam_args) + list(args.beam_args)
    except (ValueError, RunnerNotInstalled) as error:
        print(f"medtwin launch: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("medtwin launch (dry run): " + " ".join(flags))
        hint = config.imaging.inference.accelerator_hint if config.imaging else None
        print(f"medtwin launch (dry run): inference step resource hint: accelerator={hint or 'none (CPU)'}")
        return 0
    execute(config, flags)
    return 0
