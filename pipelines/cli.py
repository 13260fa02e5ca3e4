"""The `medtwin` command line: one entry point, a subcommand per job.

    medtwin simulate  --out DIR ...            a synthetic hospital: streams, DICOM, truth
    medtwin run       --input DIR --output OUT the twin + imaging pipeline (DirectRunner by default)
    medtwin query     OUT "SQL"                DuckDB over the Parquet tables
    medtwin report    --patient P OUT          one patient as a PNG: vitals, NEWS2, alerts, X-rays
    medtwin train     ...                      train the detector
    medtwin evaluate  ...                      score a detector checkpoint
    medtwin train-risk --history DIR ...       learned early-warning models (tf.Transform features)
    medtwin backtest  --input DIR --report OUT every alert source scored against the simulator's truth
    medtwin backfill  ...                      re-run history with the same transforms
    medtwin launch    ...                      submit the pipeline to Dataflow or Flink
    medtwin publish   --input DIR --kafka_bootstrap HOST:PORT   replay landed streams into Kafka (or Pub/Sub)

Each subcommand lives beside the code it drives and registers itself through
an ``add_parser(subparsers)`` function that sets ``func`` on its parser; heavy
imports (Beam, torch) happen inside ``func`` so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from transforms.pseudonymise import KEY_ENV

# The module of every subcommand, in the order `--help` lists them.
SUBCOMMAND_MODULES = (
    "simulator.cli",
    "pipelines.run",
    "pipelines.query",
    "pipelines.report",
    "model.train_cli",
    "model.evaluate_cli",
    "pipelines.train_risk",
    "pipelines.backtest",
    "launch.backfill",
    "launch.submit",
    "pipelines.publish",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtwin",
        description="Streaming digital twins of patients and imaging devices, with chest X-ray detection.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    for command_parser in subparsers.choices.values():
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Flags medtwin does not know (--runner, --project, ...) belong to Beam's PipelineOptions;
    # only the commands that build a pipeline accept them.
    argv = sys.argv[1:] if argv is None else argv
    args, beam_args = parser.parse_known_args(argv)
    if beam_args and not getattr(args, "accepts_beam_args", False):
        # argparse leaves a positional after an option (`query OUT --csv "SQL"`) unparsed: parse the
        # command's own arguments again, intermixed, which also rejects anything truly unknown.
        own = args.command_parser.parse_intermixed_args(argv[argv.index(args.command) + 1:])
        args, beam_args = argparse.Namespace(**{**vars(args), **vars(own)}), []
    args.beam_args = beam_args
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A --pseudonym_key value reaches in-process workers through the environment
    # (`transforms.pseudonymise.resolve_key_reference`); it must not outlive the command, or the
    # next in-process command would pseudonymise with it.
    key_before = os.environ.get(KEY_ENV)
    try:
        return int(args.func(args) or 0)
    finally:
        if key_before is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = key_before


if __name__ == "__main__":
    sys.exit(main())
