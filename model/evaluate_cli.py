"""`medtwin evaluate`: score a detector checkpoint on a held-out set.

    medtwin evaluate --weights detector.safetensors --synthetic-seed 9001 --num-images 200 \\
        --report out/eval.json
    medtwin evaluate --weights detector.safetensors --data siim-covid19/ --format siim
    medtwin evaluate --weights detector.safetensors --data annotations/val.json --format coco \\
        --image-root images/ --device cuda

Synthetic test sets must use a seed other than the training seed and the
validation seed (training seed + 1), or they repeat training images (see
``model.datasets``). The report's metrics are research measurements of a
research model, not for clinical use.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

# Mirrors model.readers.FORMATS (a test keeps them equal); written out so
# `--help` does not import torch.
DATA_FORMATS = ("coco", "siim", "rsna")
DISCLAIMER = "Research output of a research model; not for clinical use."
# Report rows in the order the table prints them.
TABLE_ROWS = (
    ("voc_map50", "VOC mAP@0.5 (SIIM metric)"),
    ("coco_ap", "COCO AP@[.5:.95]"),
    ("coco_ap50", "COCO AP@.5"),
    ("coco_ap75", "COCO AP@.75"),
    ("coco_ap_small", "COCO AP small"),
    ("coco_ap_medium", "COCO AP medium"),
    ("coco_ap_large", "COCO AP large"),
    ("sensitivity", "image sensitivity"),
    ("specificity", "image specificity"),
    ("score_threshold", "image score threshold"),
    ("recall_ground_glass", "ground-glass box recall (IoU 0.3)"),
    ("recall_consolidation", "consolidation box recall (IoU 0.3)"),
    ("normal_flagged_share", "normal films with a box >= threshold"),
    ("boxes_per_normal_film", "boxes >= threshold per normal film"),
    ("operating_threshold", "threshold flagging <= 1 normal in 20"),
    ("num_images", "images"),
    ("positive_images", "  with opacity"),
    ("negative_images", "  without opacity"),
    ("true_positive_images", "true positive images"),
    ("false_negative_images", "false negative images"),
    ("true_negative_images", "true negative images"),
    ("false_positive_images", "false positive images"),
    ("num_ground_truth_boxes", "ground-truth boxes"),
    ("num_detections", "detections (all scores)"),
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `evaluate` on the `medtwin` command's subparsers."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score a detector checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--weights", type=Path, required=True, help="detector checkpoint (.safetensors)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--synthetic-seed", type=int, help="evaluate on synthetic radiographs drawn with this seed")
    source.add_argument("--data", type=Path, help="annotated images: a COCO JSON, or a SIIM/RSNA dataset root")
    parser.add_argument("--num-images", type=int, default=200, help="synthetic images to draw (default 200)")
    parser.add_argument("--format", choices=DATA_FORMATS, help="layout of --data")
    parser.add_argument("--image-root", type=Path, help="coco: folder file_name is relative to (default: the JSON's)")
    parser.add_argument("--report", type=Path, help="write the report JSON here, and the detections beside it")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="image-level call threshold (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Loads the checkpoint, evaluates it, prints the table and writes the report."""
    _check_arguments(args)
    from model.checkpoint import load_detector
    from model.evaluation import evaluate_detector

    loaded = load_detector(args.weights, device=args.device)
    dataset, description = build_dataset(args, image_size=loaded.config.input_size)
    report, detections = evaluate_detector(
        loaded.model,
        dataset,
        batch_size=args.batch_size,
        device=args.device,
        score_threshold=args.score_threshold,
        num_workers=args.workers,
    )
    report = {
        **report,
        "weights": str(args.weights),
        "arch": loaded.arch,
        "version": loaded.version,
        "dataset": description,
        "disclaimer": DISCLAIMER,
    }
    print(format_table(report))
    if args.report is not None:
        detections_path = write_report(report, detections, args.report)
        print(f"report: {args.report}\ndetections: {detections_path}")
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    if args.data is not None and args.format is None:
        raise SystemExit("medtwin evaluate: error: --data needs --format (coco, siim or rsna)")
    if args.synthetic_seed is not None and args.num_images < 1:
        raise SystemExit("medtwin evaluate: error: --num-images must be at least 1")
    if args.image_root is not None and args.format != "coco":
        raise SystemExit("medtwin evaluate: error: --image-root applies to --format coco only")
    if args.batch_size < 1:
        raise SystemExit("medtwin evaluate: error: --batch-size must be at least 1")


def build_dataset(args: argparse.Namespace, *, image_size: int):
    """Returns (dataset, a JSON-ready description of it) for the parsed arguments."""
    if args.synthetic_seed is not None:
        from model.datasets import SyntheticChestXrayDataset

        dataset = SyntheticChestXrayDataset(seed=args.synthetic_seed, num_images=args.num_images, image_size=image_size)
        return dataset, {"synthetic_seed": args.synthetic_seed, "num_images": args.num_images, "image_size": image_size}
    from model.readers import load_dataset

    dataset = load_dataset(args.data, args.format, image_size=image_size, image_root=args.image_root)
    description = {"data": str(args.data), "format": args.format, "num_images": len(dataset), "image_size": image_size}
    if args.image_root is not None:
        description["image_root"] = str(args.image_root)
    return dataset, description


def write_report(report: dict, detections: list[dict], report_path: Path) -> Path:
    """Writes ``detections`` (COCO results JSON) beside ``report_path`` as
    ``<stem>.detections.json``, then the report naming it. NaN metrics are
    written as null, which strict JSON readers accept. Returns the detections path."""
    report_path = Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    detections_path = report_path.with_name(f"{report_path.stem}.detections.json")
    detections_path.write_text(json.dumps(detections))
    with_file = {**report, "detections_file": detections_path.name}
    json_ready = {
        key: None if isinstance(value, float) and math.isnan(value) else value for key, value in with_file.items()
    }
    report_path.write_text(json.dumps(json_ready, indent=2, allow_nan=False) + "\n")
    return detections_path


def format_table(report: dict) -> str:
    """The report's metrics and counts as an aligned two-column table."""
    width = max(len(label) for _, label in TABLE_ROWS)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for key, label in TABLE_ROWS:
        value = report.get(key)
        if value is None:
            continue
        if isinstance(value, float):
            text = "n/a" if math.isnan(value) else f"{value:.4f}"
        else:
            text = str(value)
        lines.append(f"{label:<{width}}  {text}")
    lines.append(DISCLAIMER)
    return "\n".join(lines)
