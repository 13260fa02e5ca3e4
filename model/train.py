"""Training loop for the opacity detector (Cascade R-CNN or the Faster R-CNN baseline).

    options = TrainOptions(config="tiny", arch="cascade", train_images=600, epochs=12, out="runs/c")
    summary = train(options)        # checkpoints in runs/c, metrics in runs/c/metrics.jsonl

What one run does:

* Data. `data="synthetic"` draws radiographs with `model.datasets`: training
  images from seed `seed`, validation images from `seed + 1`
  (`SYNTHETIC_SPLIT_OFFSETS`). Seeds from `FIRST_TEST_SEED` up are kept for
  held-out test sets (`medtwin evaluate --synthetic-seed 9001`), so a run whose
  splits would reach them is refused. Synthetic images are generated once and
  kept in memory. Otherwise `data` is a path read by `model.readers` in
  `format`; a permutation drawn from `seed` picks `val_images` for validation
  and up to `train_images` of the rest for training.
* Optimisation. AdamW (or SGD with momentum), linear warm-up then cosine decay
  or steps (x0.1 at 2/3 and 8/9 of the run), gradient-norm clipping, random
  horizontal flips. On CUDA, mixed precision (`torch.autocast` float16 with a
  `GradScaler`).
* Reproducibility. Shuffling and flips come from generators seeded by
  (seed, epoch); the global RNG (the RPN's and box sampler's draws) is seeded
  once and saved in every checkpoint; on CPU `torch.use_deterministic_algorithms`
  is on. The same seed gives the same weights, and `resume` continues a run
  exactly as if it had not stopped.
* Evaluation. Every `eval_every` epochs on the validation split: with
  `model.evaluation.evaluate_detector` (VOC mAP@0.5, COCO AP, ...) when that
  module is importable, otherwise the validation loss (and the log says so).
* Checkpoints. After every epoch `epoch_NNN.safetensors` (+ `.json`, + the
  training state for resuming) and `last.*`; `best.*` whenever the
  validation metric improves (VOC mAP@0.5, or lowest validation loss).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from model.checkpoint import load_detector, load_training_state, save_detector, save_training_state, train_state_path
from model.configs import DetectorConfig, get_config
from model.datasets import SyntheticChestXrayDataset, collate_detection
from model.detector import ARCHS, build_detector

log = logging.getLogger(__name__)

SYNTHETIC_SPLIT_OFFSETS = {"train": 0, "val": 1}
FIRST_TEST_SEED = 9000
LR_SCHEDULES = ("cosine", "step")
OPTIMIZERS = ("adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda")
WARMUP_START_FACTOR = 0.001
STEP_MILESTONES = (2 / 3, 8 / 9)
# Metrics copied from the evaluation report into the log and checkpoints.
REPORTED_METRICS = ("voc_map50", "coco_ap", "coco_ap50", "coco_ap75", "sensitivity", "specificity")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """One training run; the CLI (`medtwin train`) maps its flags onto these fields."""

    config: str = "tiny"
    arch: str = "cascade"
    data: str = "synthetic"
    format: str | None = None
    train_images: int = 200
    val_images: int = 50
    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clip_grad_norm: float = 10.0
    hflip: float = 0.5
    seed: int = 0
    out: str = "runs/detector"
    resume: str | None = None
    eval_every: int = 1
    device: str = "auto"
    threads: int | None = None
    workers: int = 0
    deterministic: bool | None = None  # None: on for CPU, off for CUDA
    progress: bool = True
    input_size: int | None = None  # overrides the config's

    def __post_init__(self) -> None:
        assert self.arch in ARCHS, f"arch must be one of {ARCHS}, got {self.arch!r}"
        assert self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"
        assert self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"
        assert self.device in DEVICES, f"device must be one of {DEVICES}"
        assert self.epochs >= 1 and self.batch_size >= 1 and self.eval_every >= 1, (
            "epochs, batch_size and eval_every must be at least 1")
        assert self.train_images >= 1 or self.data != "synthetic", "synthetic training needs train_images >= 1"
        assert self.val_images >= 0, "val_images must be >= 0"
        assert self.lr > 0, f"lr must be positive, got {self.lr}"
        assert 0.0 <= self.hflip <= 1.0, f"hflip is a probability, got {self.hflip}"
        assert self.seed >= 0, f"seed must be >= 0, got {self.seed}"
        if self.data == "synthetic":
            last_seed = self.seed + max(SYNTHETIC_SPLIT_OFFSETS.values())
            assert last_seed < FIRST_TEST_SEED, (
                f"synthetic seeds {self.seed}..{last_seed} would reach {FIRST_TEST_SEED}+, "
                "which are kept for held-out test sets")
        else:
            assert self.format is not None, "real data (a path) needs format: coco, siim or rsna"


def train(options: TrainOptions) -> dict[str, Any]:
    """Runs the training described by `options`; returns a summary.

    Returns:
        {"out", "best", "last", "epochs_run", "history", "wall_time_s", "eval_kind"}
        with `history` one dict of losses and metrics per epoch.
    """
    device = resolve_device(options.device)
    with determinism(options, device):
        return _train(options, device)


def _train(options: TrainOptions, device: torch.device) -> dict[str, Any]:
    resumed = load_detector(options.resume) if options.resume else None
    config, arch = _config_and_arch(options, resumed)
    torch.manual_seed(options.seed)
    model = build_detector(config, arch=arch) if resumed is None else resumed.model
    model.to(device)
    train_set, val_set, data_description = build_splits(options, config, progress=options.progress)
    steps_per_epoch = math.ceil(len(train_set) / options.batch_size)
    optimizer = build_optimizer(model, options)
    scheduler = build_scheduler(optimizer, options, total_steps=steps_per_epoch * options.epochs)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None

    progress = {"epoch": 0, "step": 0, "best_value": None, "history": [], "wall_time_s": 0.0}
    if options.resume:
        restored = load_training_state(train_state_path(options.resume), optimizer=optimizer,
                                       scheduler=scheduler, scaler=scaler)
        progress = restored.progress
        _set_rng_states(restored.rng_states, device)
        log.info("resumed from %s after epoch %d", options.resume, progress["epoch"])

    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    eval_kind = evaluation_kind()
    context = {
        "options": dataclasses.asdict(options),
        "data": data_description,
        "device": str(device),
        "torch": torch.__version__,
        "eval_kind": eval_kind,
    }
    for epoch in range(progress["epoch"], options.epochs):
        started = time.perf_counter()
        losses = train_one_epoch(model, train_set, optimizer, scheduler, scaler, options=options, epoch=epoch,
                                 device=device)
        record = {"epoch": epoch + 1, "step": progress["step"] + steps_per_epoch, "train": losses,
                  "lr": scheduler.get_last_lr()[0]}
        if len(val_set) and ((epoch + 1) % options.eval_every == 0 or epoch + 1 == options.epochs):
            record["val"] = validate(model, val_set, kind=eval_kind, options=options, device=device)
        progress["wall_time_s"] += time.perf_counter() - started
        record["wall_time_s"] = round(progress["wall_time_s"], 1)
        improved = _improves(record.get("val"), progress["best_value"], eval_kind)
        if improved:
            progress["best_value"] = _score(record["val"], eval_kind)
        progress.update(epoch=epoch + 1, step=record["step"], history=progress["history"] + [record])
        _save_epoch(out, model, config, arch, optimizer, scheduler, scaler, progress, context, record, improved,
                    device)
        _print_epoch(record, options.epochs, eval_kind)
    return {
        "out": str(out),
        "best": str(out / "best.safetensors") if (out / "best.safetensors").exists() else None,
        "last": str(out / "last.safetensors"),
        "epochs_run": progress["epoch"],
        "history": progress["history"],
        "wall_time_s": progress["wall_time_s"],
        "eval_kind": eval_kind,
    }


def train_one_epoch(
    model: torch.nn.Module,
    dataset: Dataset,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    *,
    options: TrainOptions,
    epoch: int,
    device: torch.device,
) -> dict[str, float]:
    """One pass over `dataset` in the order drawn for (seed, epoch).

    Returns:
        Mean over the epoch's steps of every loss, of each stage's total
        (`stage{k}`), of the RPN's (`rpn`) and of their sum (`loss`).
    """
    model.train()
    loader = DataLoader(dataset, batch_sampler=epoch_batches(len(dataset), options.batch_size, options.seed, epoch),
                        collate_fn=collate_detection, num_workers=options.workers)
    flips = torch.Generator().manual_seed(_epoch_seed(options.seed, epoch, stream=1))
    totals: dict[str, float] = {}
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{options.epochs}", unit="batch", disable=not options.progress,
               dynamic_ncols=True)
    for step, (images, targets) in enumerate(bar, start=1):
        images, targets = random_hflip(images, targets, probability=options.hflip, generator=flips)
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=scaler is not None):
            loss_dict = model(images, targets)
        summary = summarize_losses(loss_dict)
        if not math.isfinite(summary["loss"]):
            raise FloatingPointError(f"epoch {epoch + 1} step {step}: non-finite loss {summary}")
        _optimizer_step(sum(loss_dict.values()), model, optimizer, scaler, options.clip_grad_norm)
        scheduler.step()
        for key, value in summary.items():
            totals[key] = totals.get(key, 0.0) + value
        bar.set_postfix({k: f"{v / step:.3f}" for k, v in totals.items() if k == "loss" or "_" not in k})
    return {key: value / max(len(loader), 1) for key, value in totals.items()}


def summarize_losses(loss_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """Float losses plus per-stage (`stage{k}`), RPN (`rpn`) and overall (`loss`) sums.

    Cascade keys end in `_stage{k}`; the baseline's single head counts as stage 0.
    """
    values = {key: float(value.detach()) for key, value in loss_dict.items()}
    summary = dict(values)
    summary["rpn"] = values.get("loss_objectness", 0.0) + values.get("loss_rpn_box_reg", 0.0)
    for key, value in values.items():
        if key in ("loss_objectness", "loss_rpn_box_reg"):
            continue
        stage = key.rsplit("_stage", 1)[1] if "_stage" in key else "0"
        summary[f"stage{stage}"] = summary.get(f"stage{stage}", 0.0) + value
    summary["loss"] = sum(values.values())
    return summary


def _optimizer_step(loss, model, optimizer, scaler, clip_grad_norm: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if scaler is None:
        loss.backward()
        if clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()


def random_hflip(
    images: list[torch.Tensor], targets: list[dict], *, probability: float, generator: torch.Generator
) -> tuple[list[torch.Tensor], list[dict]]:
    """Mirrors each image left-right with `probability`, boxes with it.

    Args:
        images: per image, 1 x H x W.
        targets: per image, {"boxes": G x 4 (x1, y1, x2, y2), ...}.
        generator: one draw per image, whatever the outcome, so the sequence
            of decisions depends only on the generator's seed.
    """
    draws = torch.rand(len(images), generator=generator)
    flipped_images, flipped_targets = [], []
    for image, target, draw in zip(images, targets, draws, strict=True):
        if draw < probability:
            width = image.shape[-1]
            boxes = target["boxes"]
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            image, target = image.flip(-1), {**target, "boxes": boxes}
        flipped_images.append(image)
        flipped_targets.append(target)
    return flipped_images, flipped_targets


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's shuffled batches of indices; the last may be smaller."""
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch, stream=0)))
    return [order[i:i + batch_size].tolist() for i in range(0, num_items, batch_size)]


def _epoch_seed(seed: int, epoch: int, *, stream: int) -> int:
    return (seed * 1_000_003 + epoch) * 4 + stream


def build_optimizer(model: torch.nn.Module, options: TrainOptions) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters; no weight decay on norms and biases."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": options.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if options.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=options.lr, momentum=options.momentum)
    return torch.optim.AdamW(groups, lr=options.lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, options: TrainOptions, *, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate factor: linear warm-up, then cosine to zero or steps."""
    warmup_steps = min(options.warmup_steps, max(total_steps // 4, 1))

    def factor(step: int) -> float:
        return lr_factor(step, schedule=options.lr_schedule, total_steps=total_steps, warmup_steps=warmup_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lr_factor(step: int, *, schedule: str, total_steps: int, warmup_steps: int) -> float:
    """The multiplier of the base learning rate at optimiser step `step` (0-based)."""
    warmup = 1.0
    if step < warmup_steps:
        alpha = step / warmup_steps
        warmup = WARMUP_START_FACTOR * (1 - alpha) + alpha
    if schedule == "step":
        return warmup * 0.1 ** sum(step >= int(m * total_steps) for m in STEP_MILESTONES)
    progress = min(step / max(total_steps, 1), 1.0)
    return warmup * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_splits(options: TrainOptions, config: DetectorConfig, *, progress: bool = False
                 ) -> tuple[Dataset, Dataset, dict]:
    """Training and validation datasets, and a JSON description of where they came from."""
    if options.data == "synthetic":
        seeds = {split: options.seed + offset for split, offset in SYNTHETIC_SPLIT_OFFSETS.items()}
        sizes = {"train": options.train_images, "val": options.val_images}
        splits = {
            split: _in_memory(SyntheticChestXrayDataset(seed=seeds[split], num_images=sizes[split],
                                                        image_size=config.input_size), f"synthetic {split}",
                              progress=progress)
            for split in ("train", "val")
        }
        return splits["train"], splits["val"], {"data": "synthetic", "seeds": seeds, "num_images": sizes,
                                                "image_size": config.input_size}
    from model.readers import load_dataset

    dataset = load_dataset(Path(options.data), options.format, image_size=config.input_size)
    assert len(dataset) > options.val_images, (
        f"{options.data}: {len(dataset)} images, not more than val_images={options.val_images}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(options.seed)).tolist()
    val_indices = order[: options.val_images]
    train_indices = order[options.val_images:][: options.train_images or None]
    description = {"data": options.data, "format": options.format, "split_seed": options.seed,
                   "num_images": {"train": len(train_indices), "val": len(val_indices)},
                   "image_size": config.input_size}
    return Subset(dataset, train_indices), Subset(dataset, val_indices), description


def _in_memory(dataset: Dataset, description: str, *, progress: bool) -> list:
    """Draws every item once; synthetic images cost tens of ms each to make."""
    return [dataset[i] for i in tqdm(range(len(dataset)), desc=description, unit="image", leave=False,
                                     disable=not progress)]


def evaluation_kind() -> str:
    """"detection_metrics" when `model.evaluation` is importable, else "val_loss"."""
    try:
        importlib.import_module("model.evaluation")
    except ImportError as error:
        log.warning("model.evaluation is not importable (%s): validating with the loss only", error)
        return "val_loss"
    return "detection_metrics"


def validate(model: torch.nn.Module, dataset: Dataset, *, kind: str, options: TrainOptions,
             device: torch.device) -> dict[str, float]:
    """Scores the model on the validation split: `REPORTED_METRICS`, or the validation losses."""
    if kind == "detection_metrics":
        from model.evaluation import evaluate_detector

        report, _ = evaluate_detector(model, dataset, batch_size=options.batch_size, device=device, progress=False)
        return {key: float(report[key]) for key in REPORTED_METRICS if key in report}
    return validation_loss(model, dataset, options=options, device=device)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, dataset: Dataset, *, options: TrainOptions,
                    device: torch.device) -> dict[str, float]:
    """Mean training losses on `dataset` with normalisation statistics frozen.

    The model runs in train mode (the only mode that computes losses) with its
    BatchNorm layers in eval mode; the global RNG the samplers draw from is
    forked, so validating does not change the training that follows.
    """
    was_training = model.training
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    loader = DataLoader(dataset, batch_size=options.batch_size, shuffle=False, collate_fn=collate_detection)
    totals: dict[str, float] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for images, targets in loader:
            targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
            summary = summarize_losses(model([image.to(device) for image in images], targets))
            for key, value in summary.items():
                totals[key] = totals.get(key, 0.0) + value
    model.train(was_training)
    return {f"val_{key}": value / max(len(loader), 1) for key, value in totals.items()}


def _score(val: dict[str, float], kind: str) -> float:
    return val["voc_map50"] if kind == "detection_metrics" else -val["val_loss"]


def _improves(val: dict[str, float] | None, best: float | None, kind: str) -> bool:
    if val is None:
        return False
    score = _score(val, kind)
    return math.isfinite(score) and (best is None or score > best)


def _save_epoch(out: Path, model, config, arch, optimizer, scheduler, scaler, progress, context, record, improved,
                device) -> None:
    extra = {**context, "epoch": record["epoch"], "step": record["step"], "metrics": record.get("val"),
             "train_losses": record["train"], "wall_time_s": record["wall_time_s"]}
    epoch_path = out / f"epoch_{record['epoch']:03d}.safetensors"
    for path in (epoch_path, out / "last.safetensors") + ((out / "best.safetensors",) if improved else ()):
        save_detector(model, config, arch, path, extra=extra)
    for path in (epoch_path, out / "last.safetensors"):
        save_training_state(train_state_path(path), optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                            progress=progress, rng_states=_rng_states(device))
    with open(out / "metrics.jsonl", "a") as log_file:
        log_file.write(json.dumps(record) + "\n")


def _print_epoch(record: dict, epochs: int, kind: str) -> None:
    train_losses = " ".join(f"{k}={v:.4f}" for k, v in record["train"].items() if k == "loss" or "_" not in k)
    val = record.get("val")
    val_text = "" if val is None else " | val " + " ".join(f"{k}={v:.4f}" for k, v in val.items()
                                                            if kind == "detection_metrics" or "_" not in k[4:])
    tqdm.write(f"epoch {record['epoch']}/{epochs} ({record['wall_time_s']:.0f} s) train {train_losses}{val_text}")


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["torch_cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in states:
        torch.cuda.set_rng_state(states["torch_cuda"], device)


def _config_and_arch(options: TrainOptions, resumed) -> tuple[DetectorConfig, str]:
    if resumed is None:
        overrides = {} if options.input_size is None else {"input_size": options.input_size}
        return get_config(options.config, **overrides), options.arch
    if resumed.arch != options.arch or resumed.config.name != options.config:
        raise ValueError(f"--resume {options.resume} is a {resumed.arch} {resumed.config.name!r} checkpoint, "
                         f"but this run asks for {options.arch} {options.config!r}")
    resumed.model.train()
    return resumed.config, resumed.arch


def resolve_device(name: str) -> torch.device:
    """"auto" picks CUDA when present; "cuda" without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    return torch.device(name)


@contextlib.contextmanager
def determinism(options: TrainOptions, device: torch.device) -> Iterator[None]:
    """Thread count and deterministic kernels (default: on for CPU, off for CUDA) for
    the duration of a run; the process's previous settings are restored after it."""
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    deterministic = options.deterministic if options.deterministic is not None else device.type == "cpu"
    if deterministic and device.type == "cuda":
        # cuBLAS needs a fixed workspace for reproducible matrix products.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=device.type == "cuda")
    torch.backends.cudnn.benchmark = not deterministic
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1], warn_only=previous[2])
        torch.backends.cudnn.benchmark = previous[3]
