"""Named detector configurations for chest X-ray opacity detection.

A `DetectorConfig` is a frozen, validated description of everything needed to
build the detector (`model.detector.build_detector`) and to reproduce it from a
checkpoint's JSON (`config_to_dict` / `config_from_dict`). Two are named:

    tiny   ResNet-18 (stem + layer1..layer3) + a 64-channel FPN at 256 px:
           trains from scratch on a CPU and ships in under 20 MB.
    r50    ResNet-50 (all four layers) + a 256-channel FPN at 768 px: the GPU
           configuration.

Design decisions that every configuration shares:

* Grayscale stem. Radiographs have one channel, so the backbone's first
  convolution takes one channel (`in_channels=1`) instead of repeating the
  image three times: the same information for a third of the stem's work. A
  torchvision RGB ResNet state dict still loads: its `conv1` weights are folded
  over the colour axis (see `model.detector.load_backbone_weights`).
* Normalisation. Dataset images are float32 in [0, 1] after windowing
  (`model.preprocess`). They are normalised with mean 0.5 and std 0.25: the
  centre of that range and a round spread for windowed radiographs (the
  synthetic training images measure mean 0.47, std 0.33). BatchNorm right
  after the stem absorbs any residual offset or scale.
* Input size. Dataset images already have their longest side equal to
  `input_size`; the model's transform uses `min_size = max_size = input_size`,
  which leaves such an image unscaled.
* Backbone depth. `backbone_stages` ResNet layers feed the FPN, which adds
  one max-pooled level on top (P2..P5 for three layers, P2..P6 for four).
  `tiny` stops after layer3 (stride 16): ResNet-18's layer4 holds 8.4 M of
  its 11.2 M weights, would put the checkpoint over 45 MB, and works on an
  8 x 8 map at 256 px. Its torchvision state dict still loads (layer4's
  tensors are reported as unused).
* Normalisation layers. Training is from scratch (no pretrained weights are
  reachable), so the backbone's BatchNorm is trained (`norm="batch"`), unlike
  torchvision's default FrozenBatchNorm which only makes sense over pretrained
  statistics. `"group"` (GroupNorm, 32 groups) is the better choice for small
  per-GPU batches; `"frozen_batch"` is for fine-tuning loaded weights.

Cascade R-CNN stages follow the paper (Cai & Vasconcelos, CVPR 2018): IoU
thresholds 0.5 / 0.6 / 0.7, box-coder weights (10,10,5,5) / (20,20,10,10) /
(30,30,15,15) (inverse standard deviations of each stage's regression
targets, which shrink as boxes improve) and stage loss weights 1 / 0.5 / 0.25.
The Faster R-CNN baseline uses stage 0's settings for its single head.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

BACKBONES = ("resnet18", "resnet50")
NORMS = ("batch", "group", "frozen_batch")

# Output channels of ResNet layer1..layer4, the FPN's inputs.
BACKBONE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
}


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Everything that determines a detector's architecture and behaviour.

    Sizes are in pixels of the model's input image (longest side =
    `input_size`). Anchor aspect ratios are height / width, torchvision's
    convention. All fields are JSON-serialisable (tuples become lists).
    """

    name: str
    backbone: str = "resnet18"
    backbone_stages: int = 3
    norm: str = "batch"
    trainable_backbone_layers: int = 5
    backbone_weights: str | None = None
    in_channels: int = 1
    input_size: int = 256
    image_mean: tuple[float, ...] = (0.5,)
    image_std: tuple[float, ...] = (0.25,)
    num_classes: int = 2  # background + "opacity"
    fpn_out_channels: int = 64
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128)
    anchor_aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 500
    rpn_post_nms_top_n_train: int = 500
    rpn_post_nms_top_n_test: int = 200
    rpn_nms_thresh: float = 0.7
    rpn_batch_size_per_image: int = 128
    rpn_positive_fraction: float = 0.5
    roi_output_size: int = 7
    roi_sampling_ratio: int = 2
    representation_size: int = 128
    box_batch_size_per_image: int = 128
    box_positive_fraction: float = 0.25
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    cascade_iou_thresholds: tuple[float, ...] = (0.5, 0.6, 0.7)
    cascade_bbox_reg_weights: tuple[tuple[float, float, float, float], ...] = (
        (10.0, 10.0, 5.0, 5.0),
        (20.0, 20.0, 10.0, 10.0),
        (30.0, 30.0, 15.0, 15.0),
    )
    cascade_stage_loss_weights: tuple[float, ...] = (1.0, 0.5, 0.25)

    def __post_init__(self) -> None:
        _check_types_and_ranges(self)
        _check(self.backbone in BACKBONES, f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        _check(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        _check(self.in_channels == 1, f"the detector uses a grayscale stem (in_channels=1), got {self.in_channels}")
        _check(len(self.image_mean) == self.in_channels == len(self.image_std),
               "image_mean and image_std need one value per input channel")
        _check(all(s > 0 for s in self.image_std), f"image_std must be positive, got {self.image_std}")
        _check(self.backbone_stages in (3, 4), f"backbone_stages must be 3 or 4, got {self.backbone_stages}")
        _check(len(self.anchor_sizes) == self.backbone_stages + 1,
               f"one anchor size per FPN level ({self.backbone_stages + 1}: one per backbone stage and the "
               f"max-pooled top) is needed, got {len(self.anchor_sizes)}")
        stages = len(self.cascade_iou_thresholds)
        _check(stages >= 1, "a cascade needs at least one stage")
        _check(len(self.cascade_bbox_reg_weights) == stages == len(self.cascade_stage_loss_weights),
               "cascade_iou_thresholds, cascade_bbox_reg_weights and cascade_stage_loss_weights "
               f"must all have one entry per stage ({stages})")
        _check(all(len(w) == 4 for w in self.cascade_bbox_reg_weights),
               "each stage's box-coder weights are (wx, wy, ww, wh)")
        _check(list(self.cascade_iou_thresholds) == sorted(self.cascade_iou_thresholds),
               f"cascade IoU thresholds must not decrease, got {self.cascade_iou_thresholds}")
        _check(self.box_positive_fraction > 0.0, "box_positive_fraction must be in (0, 1]")


class ConfigError(AssertionError, ValueError):
    """A `DetectorConfig` value of the wrong type or outside its range.

    Raised explicitly (an `assert` vanishes under ``python -O``), before anything is built: a
    checkpoint's JSON is input, and one value (``input_size: 60000``) decides gigabytes.  It is a
    ValueError for callers that refuse bad input, and an AssertionError as the invariant it was.
    """


# Every numeric field's type and accepted range, checked before a model is built: generous around
# the named configurations (tiny: 256 px, r50: 768 px), far below what would exhaust a worker.
INT_RANGES: dict[str, tuple[int, int]] = {
    "backbone_stages": (3, 4),
    "trainable_backbone_layers": (0, 5),
    "in_channels": (1, 1),
    "input_size": (32, 2048),
    "num_classes": (2, 64),
    "fpn_out_channels": (8, 512),
    "rpn_pre_nms_top_n_train": (1, 10_000),
    "rpn_pre_nms_top_n_test": (1, 10_000),
    "rpn_post_nms_top_n_train": (1, 5_000),
    "rpn_post_nms_top_n_test": (1, 5_000),
    "rpn_batch_size_per_image": (1, 4_096),
    "roi_output_size": (1, 14),
    "roi_sampling_ratio": (0, 8),  # 0: torchvision's adaptive sampling
    "representation_size": (8, 2_048),
    "box_batch_size_per_image": (1, 4_096),
    "box_detections_per_img": (1, 1_000),
}
FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "rpn_nms_thresh": (0.0, 1.0),
    "rpn_positive_fraction": (0.0, 1.0),
    "box_positive_fraction": (0.0, 1.0),
    "box_score_thresh": (0.0, 1.0),
    "box_nms_thresh": (0.0, 1.0),
}
# Tuple fields: (longest, element range).
TUPLE_RANGES: dict[str, tuple[int, tuple[float, float]]] = {
    "image_mean": (1, (-10.0, 10.0)),
    "image_std": (1, (1e-3, 10.0)),
    "anchor_sizes": (5, (4, 2048)),
    "anchor_aspect_ratios": (8, (0.05, 20.0)),
    "cascade_iou_thresholds": (8, (0.0, 1.0)),
    "cascade_stage_loss_weights": (8, (0.0, 100.0)),
}
MAX_STAGES = TUPLE_RANGES["cascade_iou_thresholds"][0]
BOX_WEIGHT_RANGE = (1e-3, 1e4)
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_PATH_CHARS = 4096


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check_types_and_ranges(config: "DetectorConfig") -> None:
    """Refuses any field of the wrong type or outside INT_RANGES / FLOAT_RANGES / TUPLE_RANGES."""
    _check(isinstance(config.name, str) and NAME_PATTERN.fullmatch(config.name) is not None,
           "name must be 1 to 64 letters, digits, '_', '.' or '-'")
    for field in ("backbone", "norm"):
        _check(isinstance(getattr(config, field), str), f"{field} must be a string")
    _check(config.backbone_weights is None
           or (isinstance(config.backbone_weights, str) and 0 < len(config.backbone_weights) <= MAX_PATH_CHARS),
           "backbone_weights must be null or a path")
    for field, (low, high) in INT_RANGES.items():
        value = getattr(config, field)
        _check(_is_int(value) and low <= value <= high,
               f"{field} must be an integer in {low}..{high}, got {_shown(value)}")
    for field, (low, high) in FLOAT_RANGES.items():
        value = getattr(config, field)
        _check(_is_number(value) and low <= value <= high,
               f"{field} must be a number in [{low}, {high}], got {_shown(value)}")
    for field, (longest, (low, high)) in TUPLE_RANGES.items():
        value = getattr(config, field)
        _check(isinstance(value, tuple) and 1 <= len(value) <= longest,
               f"{field} must be a list of 1 to {longest} values, got {_shown(value)}")
        integers = field == "anchor_sizes"
        _check(all((_is_int(v) if integers else _is_number(v)) and low <= v <= high for v in value),
               f"{field} values must be {'integers' if integers else 'numbers'} in [{low}, {high}], "
               f"got {_shown(value)}")
    weights = config.cascade_bbox_reg_weights
    _check(isinstance(weights, tuple) and 1 <= len(weights) <= MAX_STAGES
           and all(isinstance(w, tuple) for w in weights),
           f"cascade_bbox_reg_weights must be a list of 1 to {MAX_STAGES} lists of (wx, wy, ww, wh)")
    low, high = BOX_WEIGHT_RANGE
    _check(all(_is_number(v) and low <= v <= high for w in weights for v in w),
           f"cascade_bbox_reg_weights values must be numbers in [{low}, {high}]")


def _shown(value: Any) -> str:
    """A value for an error message, cut short (a tampered JSON may hold anything)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TINY = DetectorConfig(name="tiny")

_R50 = DetectorConfig(
    name="r50",
    backbone="resnet50",
    backbone_stages=4,
    norm="group",
    input_size=768,
    fpn_out_channels=256,
    anchor_sizes=(32, 64, 128, 256, 512),
    rpn_pre_nms_top_n_train=2000,
    rpn_pre_nms_top_n_test=1000,
    rpn_post_nms_top_n_train=2000,
    rpn_post_nms_top_n_test=1000,
    rpn_batch_size_per_image=256,
    representation_size=1024,
    box_batch_size_per_image=512,
)

def roi_feature_maps(config: DetectorConfig) -> list[str]:
    """Names of the FPN maps RoIs are pooled from: one per backbone stage
    (the max-pooled top level only feeds the RPN, as in torchvision)."""
    return [str(level) for level in range(config.backbone_stages)]


CONFIGS: dict[str, DetectorConfig] = {c.name: c for c in (_TINY, _R50)}


def get_config(name: str, **overrides: Any) -> DetectorConfig:
    """Returns the named configuration, with `overrides` replacing fields.

    Args:
        name: "tiny" or "r50".
        overrides: field values to change, e.g. `backbone_weights="r18.pth"`.
    """
    if name not in CONFIGS:
        raise KeyError(f"unknown detector config {name!r}; known: {sorted(CONFIGS)}")
    return dataclasses.replace(CONFIGS[name], **overrides)


def config_to_dict(config: DetectorConfig) -> dict[str, Any]:
    """The configuration as plain JSON types (tuples become lists)."""
    return json_ready(dataclasses.asdict(config))


def config_from_dict(values: dict[str, Any]) -> DetectorConfig:
    """Rebuilds a configuration written by `config_to_dict`, every value type- and range-checked.

    Unknown keys are an error (a checkpoint from a newer, incompatible
    version); missing keys take today's defaults.  Raises ConfigError (a
    ValueError) for a value of the wrong type or out of range, before
    anything is built.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"a DetectorConfig is a JSON object, got {type(values).__name__}")
    fields = {f.name for f in dataclasses.fields(DetectorConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown DetectorConfig fields {[_shown(k) for k in unknown[:10]]}")
    return DetectorConfig(**{k: as_tuple(v) for k, v in values.items()})


def json_ready(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    return value


def as_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(as_tuple(v) for v in value)
    return value
