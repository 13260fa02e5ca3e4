"""One stage of a Cascade R-CNN box head: features -> class logits and box deltas.

Each cascade stage owns its own weights and its own training rules: the IoU a
proposal needs to count as foreground, and the box-coder weights that scale
its regression targets (the inverse standard deviations of the deltas at that
stage, which shrink as the boxes entering the stage get better). Keeping both
on the stage module makes them visible to tests and to anyone reading the
model's `repr`.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import TwoMLPHead


class CascadeStageHead(nn.Module):
    """A two-layer MLP box head with a classifier and class-agnostic box regression.

    Class-agnostic regression (4 outputs, not 4 per class), as in the Cascade
    R-CNN paper and Detectron2: every stage refines the box, whatever its class,
    and the next stage takes the refined box as its proposal.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        resolution: int,
        representation_size: int,
        num_classes: int,
        iou_threshold: float,
        bbox_reg_weights: tuple[float, float, float, float],
        loss_weight: float,
    ):
        """
        Args:
            in_channels: channels of the pooled RoI features (the FPN width).
            resolution: side of the pooled RoI features (RoIAlign output size).
            representation_size: width of the two fully connected layers.
            num_classes: classes including the background (index 0).
            iou_threshold: IoU with a ground-truth box from which a proposal is
                foreground for this stage; below it, background.
            bbox_reg_weights: (wx, wy, ww, wh) of this stage's box coder.
            loss_weight: multiplier of this stage's losses.
        """
        super().__init__()
        assert 0.0 < iou_threshold < 1.0, f"iou_threshold must be in (0, 1), got {iou_threshold}"
        assert len(bbox_reg_weights) == 4, f"bbox_reg_weights are (wx, wy, ww, wh), got {bbox_reg_weights}"
        assert loss_weight >= 0.0, f"loss_weight must be non-negative, got {loss_weight}"
        self.box_head = TwoMLPHead(in_channels * resolution**2, representation_size)
        self.cls_score = nn.Linear(representation_size, num_classes)
        self.bbox_pred = nn.Linear(representation_size, 4)
        self.iou_threshold = float(iou_threshold)
        self.loss_weight = float(loss_weight)
        self.bbox_reg_weights = tuple(float(w) for w in bbox_reg_weights)
        self.box_coder = det_utils.BoxCoder(self.bbox_reg_weights)
        # Below the threshold is background, at or above foreground: no ignored band.
        self.proposal_matcher = det_utils.Matcher(iou_threshold, iou_threshold, allow_low_quality_matches=False)
        self._init_predictor()

    def _init_predictor(self) -> None:
        # Detectron2's FastRCNNOutputLayers initialisation: a small classifier
        # and a smaller regressor, so untrained stages barely move the boxes.
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, roi_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            roi_features: R x C x S x S pooled features.

        Returns:
            class_logits: R x num_classes.
            box_deltas: R x 4, encoded with this stage's box coder.
        """
        representation = self.box_head(roi_features)
        return self.cls_score(representation), self.bbox_pred(representation)

    def classify(self, roi_features: torch.Tensor) -> torch.Tensor:
        """R x C x S x S features -> R x num_classes probabilities (softmax)."""
        class_logits, _ = self(roi_features)
        return class_logits.softmax(dim=-1)

    def decode(self, box_deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Applies R x 4 deltas to R x 4 boxes (x1, y1, x2, y2) -> R x 4 boxes."""
        assert box_deltas.shape == boxes.shape, f"deltas {tuple(box_deltas.shape)} vs boxes {tuple(boxes.shape)}"
        return self.box_coder.decode_single(box_deltas, boxes)

    def encode(self, target_boxes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The R x 4 deltas that take R x 4 `boxes` to R x 4 `target_boxes`."""
        assert target_boxes.shape == boxes.shape, f"targets {tuple(target_boxes.shape)} vs boxes {tuple(boxes.shape)}"
        return self.box_coder.encode_single(target_boxes, boxes)

    def extra_repr(self) -> str:
        return (f"iou_threshold={self.iou_threshold}, bbox_reg_weights={self.bbox_reg_weights}, "
                f"loss_weight={self.loss_weight}")
