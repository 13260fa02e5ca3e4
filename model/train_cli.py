"""`medtwin train`: train the opacity detector (Cascade R-CNN or the Faster R-CNN baseline).

    # CPU, synthetic radiographs (train seed 0, validation seed 1):
    medtwin train --config tiny --arch cascade --data synthetic --train-images 600 --val-images 100 \\
        --epochs 10 --batch-size 8 --out runs/cascade_tiny
    # the baseline on the same data and schedule:
    medtwin train --config tiny --arch faster_rcnn --data synthetic ... --out runs/faster_tiny
    # real annotations on a GPU, mixed precision:
    medtwin train --config r50 --data siim-covid19/ --format siim --val-images 500 --device cuda
    # carry on after an interruption:
    medtwin train ... --resume runs/cascade_tiny/last.safetensors

Each epoch writes `epoch_NNN.safetensors` and `last.safetensors` (each with a
JSON beside it, and the training state for --resume), `best.safetensors` when
the validation VOC mAP@0.5 improves, and a line of `metrics.jsonl`. Synthetic
seeds of 9000 and above are kept for held-out test sets (`medtwin evaluate
--synthetic-seed 9001`). Models trained here are research models, not for
clinical use.
"""

from __future__ import annotations

import argparse
import json
import sys

# Mirrors model.configs.CONFIGS, model.detector.ARCHS and model.train's choices
# (tests keep them equal); written out so `--help` does not import torch.
CONFIG_NAMES = ("tiny", "r50")
ARCH_NAMES = ("cascade", "faster_rcnn")
DATA_FORMATS = ("coco", "siim", "rsna")
LR_SCHEDULES = ("cosine", "step")
OPTIMIZERS = ("adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `train` on the `medtwin` command's subparsers."""
    parser = subparsers.add_parser(
        "train",
        help="train the chest X-ray opacity detector",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--config", choices=CONFIG_NAMES, default="tiny", help="detector configuration (default tiny)")
    model.add_argument("--arch", choices=ARCH_NAMES, default="cascade", help="cascade or the faster_rcnn baseline")
    model.add_argument("--input-size", type=int, help="longest image side in px (default: the config's)")

    data = parser.add_argument_group("data")
    data.add_argument("--data", default="synthetic", help="'synthetic', or a COCO JSON / SIIM or RSNA root")
    data.add_argument("--format", choices=DATA_FORMATS, help="layout of --data when it is a path")
    data.add_argument("--train-images", type=int, default=200,
                      help="training images (synthetic: drawn; real: at most this many, 0 = all)")
    data.add_argument("--val-images", type=int, default=50, help="validation images (default 50)")
    data.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")

    schedule = parser.add_argument_group("optimisation")
    schedule.add_argument("--epochs", type=int, default=10)
    schedule.add_argument("--batch-size", type=int, default=4)
    schedule.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3, for AdamW)")
    schedule.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine",
                          help="after linear warm-up: cosine to zero, or x0.1 at 2/3 and 8/9 of the run")
    schedule.add_argument("--warmup-steps", type=int, default=100)
    schedule.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                          help="adamw (default; learns much faster from scratch here) or sgd (momentum 0.9)")
    schedule.add_argument("--weight-decay", type=float, default=1e-4)
    schedule.add_argument("--clip-grad-norm", type=float, default=10.0, help="0 disables clipping")
    schedule.add_argument("--hflip", type=float, default=0.5, help="probability of a left-right flip")

    run_group = parser.add_argument_group("run")
    run_group.add_argument("--seed", type=int, default=0, help="synthetic train seed (validation: seed + 1)")
    run_group.add_argument("--out", default="runs/detector", help="folder for checkpoints and metrics.jsonl")
    run_group.add_argument("--resume", help="continue from this checkpoint (.safetensors) and its training state")
    run_group.add_argument("--eval-every", type=int, default=1, help="validate every K epochs (and after the last)")
    run_group.add_argument("--device", choices=DEVICES, default="auto", help="auto = cuda when available")
    run_group.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar (for log files)")
    determinism = run_group.add_mutually_exclusive_group()
    determinism.add_argument("--deterministic", dest="deterministic", action="store_true", default=None,
                             help="deterministic kernels (default on CPU)")
    determinism.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                             help="allow non-deterministic kernels (default on CUDA)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Trains as the parsed arguments say and prints where the checkpoints went."""
    if args.data != "synthetic" and args.format is None:
        raise SystemExit("medtwin train: error: --data PATH needs --format (coco, siim or rsna)")
    from model.train import TrainOptions, train

    try:
        options = TrainOptions(
            config=args.config,
            arch=args.arch,
            data=args.data,
            format=args.format,
            train_images=args.train_images,
            val_images=args.val_images,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            lr_schedule=args.lr_schedule,
            warmup_steps=args.warmup_steps,
            optimizer=args.optimizer,
            weight_decay=args.weight_decay,
            clip_grad_norm=args.clip_grad_norm,
            hflip=args.hflip,
            seed=args.seed,
            out=args.out,
            resume=args.resume,
            eval_every=args.eval_every,
            device=args.device,
            threads=args.threads,
            workers=args.workers,
            deterministic=args.deterministic,
            progress=not args.no_progress,
            input_size=args.input_size,
        )
    except AssertionError as error:
        raise SystemExit(f"medtwin train: error: {error}") from error
    summary = train(options)
    last = summary["history"][-1] if summary["history"] else {}
    print(json.dumps({"out": summary["out"], "best": summary["best"], "last": summary["last"],
                      "epochs_run": summary["epochs_run"], "wall_time_s": round(summary["wall_time_s"], 1),
                      "eval_kind": summary["eval_kind"], "final_val": last.get("val")}, indent=2))
    print("Research model trained on the data above; not for clinical use.")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m model.train_cli ...`: the `train` subcommand on its own."""
    parser = argparse.ArgumentParser(prog="python -m model.train_cli")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
