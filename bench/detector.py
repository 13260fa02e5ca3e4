"""Inference throughput of the tiny Cascade R-CNN against its Faster R-CNN baseline.

    python bench/detector.py                      # CPU, batch 1 and 8
    python bench/detector.py --device cuda --batch-sizes 1 8 32
    python bench/detector.py --weights model/weights   # the shipped checkpoints instead of fresh ones

Both detectors are built from the same config (`tiny` unless --config), put in
eval mode and timed under `torch.inference_mode()` on synthetic radiographs
at the config's input size: `--warmup` untimed batches, then `--repeats`
timed ones; the table gives the median images/s and the ratio of the
cascade's time per image to the baseline's (the paper reports about
1.2-1.25x for Cascade R-CNN over Faster R-CNN with a ResNet/FPN backbone).

Both architectures see the same `post_nms_top_n_test` proposals per image.
Untrained detectors score every RoI near 0.5, so NMS and the per-image cap
work on as many boxes as they ever will; `--weights` times the shipped,
trained checkpoints instead. The timing covers the whole
`GeneralizedRCNN.forward` (normalisation, backbone, RPN, RoI heads,
post-processing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.checkpoint import load_detector  # noqa: E402
from model.configs import get_config  # noqa: E402
from model.datasets import SyntheticChestXrayDataset  # noqa: E402
from model.detector import ARCHS, build_detector  # noqa: E402

BENCH_SEED = 4242  # images only: far from training seeds, never scored
SHIPPED = {"cascade": "cascade_tiny.safetensors", "faster_rcnn": "faster_rcnn_tiny.safetensors"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed batches; the median is reported (default 7)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--weights", type=Path, help="folder holding the shipped checkpoints")
    return parser.parse_args(argv)


def detector(arch: str, args: argparse.Namespace) -> torch.nn.Module:
    if args.weights is not None:
        return load_detector(args.weights / SHIPPED[arch], device=args.device).model
    torch.manual_seed(0)
    return build_detector(get_config(args.config), arch=arch).to(args.device).eval()


def images_per_second(model: torch.nn.Module, images: list[torch.Tensor], *, warmup: int, repeats: int,
                      device: str) -> float:
    """Median images/s of `model(images)` over `repeats` timed calls after `warmup` untimed ones."""
    times = []
    with torch.inference_mode():
        for index in range(warmup + repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            model(images)
            if device == "cuda":
                torch.cuda.synchronize()
            if index >= warmup:
                times.append(time.perf_counter() - started)
    return len(images) / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = get_config(args.config)
    largest = max(args.batch_sizes)
    dataset = SyntheticChestXrayDataset(seed=BENCH_SEED, num_images=largest, image_size=config.input_size,
                                        source_size=(config.input_size, config.input_size))
    pool = [dataset[i][0].to(args.device) for i in range(largest)]
    models = {arch: detector(arch, args) for arch in ARCHS}
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"config {config.name} ({config.input_size} px), {device_name}, torch {torch.__version__}, "
          f"median of {args.repeats} after {args.warmup} warm-up, "
          f"{'shipped weights' if args.weights else 'untrained weights'}")
    print(f"{'batch':>5}  {'cascade img/s':>13}  {'faster_rcnn img/s':>17}  {'cascade/faster time':>19}")
    for batch_size in args.batch_sizes:
        rates = {arch: images_per_second(model, pool[:batch_size], warmup=args.warmup, repeats=args.repeats,
                                         device=args.device)
                 for arch, model in models.items()}
        ratio = rates["faster_rcnn"] / rates["cascade"]
        print(f"{batch_size:>5}  {rates['cascade']:>13.2f}  {rates['faster_rcnn']:>17.2f}  {ratio:>18.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
