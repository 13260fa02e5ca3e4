"""Builds the opacity detector from a `DetectorConfig`: Cascade R-CNN or its Faster R-CNN baseline.

    model = build_detector(get_config("tiny"), arch="cascade")
    losses = model(images, targets)          # train mode: a dict of scalar losses
    detections = model.eval()(images)        # eval mode: per image boxes, scores, labels

Both architectures share everything but the RoI heads: a grayscale ResNet +
FPN backbone, the RPN, the multi-scale RoIAlign and torchvision's
`GeneralizedRCNNTransform` (normalisation, batching; no resizing for images
whose longest side already equals `input_size`). The baseline's single box
head uses the cascade's first-stage settings (IoU 0.5, box-coder weights
(10, 10, 5, 5), same MLP width and predictor initialisation), so the cascade's
benefit is measured against the same detector with one stage instead of three.

Inputs are lists of (1, H, W) float tensors in [0, 1]; detections are in the
input image's pixels (x1, y1, x2, y2).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import torch
import torchvision
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from model.cascade_roi_heads import CascadeRoIHeads
from model.configs import BACKBONE_CHANNELS, DetectorConfig, roi_feature_maps

log = logging.getLogger(__name__)

ARCHS = ("cascade", "faster_rcnn")
# The normalisation every torchvision ImageNet classifier was trained with;
# RGB stems loaded from a state dict are folded to grayscale under it.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Prefixes a backbone state dict may carry: DataParallel, or a whole torchvision detector.
STATE_DICT_PREFIXES = ("module.", "backbone.body.")
GROUP_NORM_GROUPS = 32


class BackboneWeightsReport(NamedTuple):
    """What `load_backbone_weights` took from a state dict, and what it could not."""

    loaded: list[str]
    missing: list[str]  # backbone keys the file lacks: they keep their fresh initialisation
    unexpected: list[str]  # file keys the backbone has no place for (e.g. the classifier `fc.*`)
    mismatched: list[str]  # keys present in both with different shapes: not loaded
    notes: list[str]


def build_detector(config: DetectorConfig, *, arch: str = "cascade") -> GeneralizedRCNN:
    """Builds an untrained detector (or one whose backbone is `config.backbone_weights`).

    Args:
        config: the architecture and its hyper-parameters.
        arch: "cascade" (three-stage Cascade R-CNN) or "faster_rcnn" (baseline).

    Returns:
        A torchvision `GeneralizedRCNN`: `model(images, targets)` in train mode
        returns the loss dict (RPN losses plus `loss_classifier_stage{k}` /
        `loss_box_reg_stage{k}` for the cascade, `loss_classifier` /
        `loss_box_reg` for the baseline); in eval mode `model(images)` returns
        per image {"boxes": K x 4, "scores": K, "labels": K}.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    backbone = build_backbone(config)
    roi_heads = CascadeRoIHeads.from_config(config) if arch == "cascade" else build_faster_rcnn_heads(config)
    return GeneralizedRCNN(backbone, build_rpn(config), roi_heads, build_transform(config))


def build_backbone(config: DetectorConfig) -> BackboneWithFPN:
    """A ResNet with a one-channel stem, its first `backbone_stages` layers
    wrapped in an FPN (P2..P5 for three layers, P2..P6 for four)."""
    resnet = getattr(torchvision.models, config.backbone)(weights=None, norm_layer=_norm_layer(config.norm))
    resnet.conv1 = nn.Conv2d(config.in_channels, resnet.conv1.out_channels, kernel_size=7, stride=2, padding=3,
                             bias=False)
    nn.init.kaiming_normal_(resnet.conv1.weight, mode="fan_out", nonlinearity="relu")
    backbone = BackboneWithFPN(
        resnet,
        return_layers={f"layer{k}": str(k - 1) for k in range(1, config.backbone_stages + 1)},
        in_channels_list=list(BACKBONE_CHANNELS[config.backbone][: config.backbone_stages]),
        out_channels=config.fpn_out_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    # `body` keeps the ResNet's names up to the last used layer, so a classifier's
    # state dict loads into it and its unused layers (fc, layer4) show as unexpected.
    if config.backbone_weights is not None:
        load_backbone_weights(backbone.body, config.backbone_weights, image_mean=config.image_mean,
                              image_std=config.image_std)
    _freeze_layers(backbone.body, config.trainable_backbone_layers)
    return backbone


def build_rpn(config: DetectorConfig) -> RegionProposalNetwork:
    """One anchor size per FPN level, every aspect ratio at each."""
    anchors = AnchorGenerator(
        sizes=tuple((size,) for size in config.anchor_sizes),
        aspect_ratios=(tuple(config.anchor_aspect_ratios),) * len(config.anchor_sizes),
    )
    return RegionProposalNetwork(
        anchors,
        RPNHead(config.fpn_out_channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=config.rpn_batch_size_per_image,
        positive_fraction=config.rpn_positive_fraction,
        pre_nms_top_n={"training": config.rpn_pre_nms_top_n_train, "testing": config.rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": config.rpn_post_nms_top_n_train, "testing": config.rpn_post_nms_top_n_test},
        nms_thresh=config.rpn_nms_thresh,
    )


def build_transform(config: DetectorConfig) -> GeneralizedRCNNTransform:
    """Normalises and batches; `min_size = max_size = input_size` leaves dataset images unscaled."""
    return GeneralizedRCNNTransform(
        min_size=config.input_size,
        max_size=config.input_size,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )


def build_faster_rcnn_heads(config: DetectorConfig) -> RoIHeads:
    """torchvision's single-stage RoI heads with the cascade's first-stage settings."""
    resolution = config.roi_output_size
    predictor = FastRCNNPredictor(config.representation_size, config.num_classes)
    # The cascade stages' initialisation (Detectron2's), so only the cascade differs.
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)
    return RoIHeads(
        MultiScaleRoIAlign(roi_feature_maps(config), output_size=resolution,
                           sampling_ratio=config.roi_sampling_ratio),
        TwoMLPHead(config.fpn_out_channels * resolution**2, config.representation_size),
        predictor,
        fg_iou_thresh=config.cascade_iou_thresholds[0],
        bg_iou_thresh=config.cascade_iou_thresholds[0],
        batch_size_per_image=config.box_batch_size_per_image,
        positive_fraction=config.box_positive_fraction,
        bbox_reg_weights=config.cascade_bbox_reg_weights[0],
        score_thresh=config.box_score_thresh,
        nms_thresh=config.box_nms_thresh,
        detections_per_img=config.box_detections_per_img,
    )


def load_backbone_weights(
    resnet: nn.Module,
    path: str | Path,
    *,
    image_mean: tuple[float, ...],
    image_std: tuple[float, ...],
) -> BackboneWeightsReport:
    """Loads a local torchvision ResNet state dict into the grayscale ResNet body `resnet`.

    The file is read with `torch.load(weights_only=True)` (tensors only, no
    pickled code). An RGB stem (`conv1.weight` of shape 64 x 3 x 7 x 7) is
    folded to one channel exactly, assuming the ImageNet normalisation the
    torchvision weights were trained under: a gray pixel x, fed to the RGB
    network as (x - m_c) / s_c in each channel c, and to ours as
    (x - m) / s, gives the same conv1 output (away from the zero-padded
    border) with weights W' = sum_c W_c * s / s_c, up to a per-channel
    constant that is moved into bn1's running mean.

    Args:
        resnet: a torchvision ResNet, or the detector's `backbone.body` (its
            layers up to the last the FPN uses), with a one-channel `conv1`.
        path: the state dict file (.pth / .pt).
        image_mean, image_std: the detector's one-channel normalisation.

    Returns:
        What was loaded, missing, unexpected or mismatched; also logged.

    Raises:
        ValueError: the file holds no state dict, or nothing in it fits.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    state = {_strip_prefixes(k): v for k, v in state.items()}
    notes = []
    if "conv1.weight" in state and state["conv1.weight"].shape[1] == 3:
        state, note = _fold_rgb_stem(state, resnet, image_mean=image_mean, image_std=image_std)
        notes.append(note)
    own = resnet.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    report = BackboneWeightsReport(
        loaded=sorted(fitting),
        missing=sorted(set(own) - set(state)),
        unexpected=sorted(set(state) - set(own)),
        mismatched=sorted(k for k in state if k in own and own[k].shape != state[k].shape),
        notes=notes,
    )
    if not fitting:
        raise ValueError(f"{path}: none of its {len(state)} tensors fit the {len(own)} of the backbone; "
                         f"is it a torchvision ResNet state dict? first keys: {sorted(state)[:5]}")
    resnet.load_state_dict(fitting, strict=False)
    log.info("backbone weights %s: loaded %d of %d tensors", path, len(fitting), len(own))
    if report.missing or report.mismatched:
        log.warning("backbone weights %s: partial load; missing (kept fresh) %s; shape mismatch (kept fresh) %s",
                    path, report.missing, report.mismatched)
    if report.unexpected:
        log.info("backbone weights %s: ignored keys with no place in the backbone: %s", path, report.unexpected)
    for note in notes:
        log.info("backbone weights %s: %s", path, note)
    return report


def _fold_rgb_stem(
    state: dict[str, torch.Tensor],
    resnet: nn.Module,
    *,
    image_mean: tuple[float, ...],
    image_std: tuple[float, ...],
) -> tuple[dict[str, torch.Tensor], str]:
    """Replaces a 3-channel conv1 by its grayscale equivalent (see `load_backbone_weights`)."""
    weight = state["conv1.weight"].float()  # O x 3 x k x k
    mean, std = float(image_mean[0]), float(image_std[0])
    rgb_mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    rgb_std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    folded = (weight * std / rgb_std).sum(dim=1, keepdim=True)
    offset = (weight * (mean - rgb_mean) / rgb_std).sum(dim=(1, 2, 3))  # O
    state = dict(state, **{"conv1.weight": folded.to(state["conv1.weight"].dtype)})
    if "bn1.running_mean" in state and hasattr(resnet.bn1, "running_mean"):
        state["bn1.running_mean"] = state["bn1.running_mean"] - offset.to(state["bn1.running_mean"].dtype)
        return state, "RGB conv1 folded to grayscale; its constant offset moved into bn1.running_mean"
    return state, ("RGB conv1 folded to grayscale; bn1 keeps no running mean here, so a per-channel "
                   "constant offset (mean shift) could not be absorbed")


def _strip_prefixes(key: str) -> str:
    for prefix in STATE_DICT_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _norm_layer(norm: str):
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "frozen_batch":
        return FrozenBatchNorm2d
    assert norm == "group", f"unknown norm {norm!r}"
    return lambda channels: nn.GroupNorm(GROUP_NORM_GROUPS, channels)


def _freeze_layers(resnet: nn.Module, trainable_layers: int) -> None:
    """torchvision's rule: train the last `trainable_layers` of (conv1, layer1..layer4)."""
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, parameter in resnet.named_parameters():
        if not any(name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)
