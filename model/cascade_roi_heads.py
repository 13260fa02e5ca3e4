"""Cascade R-CNN RoI heads (Cai & Vasconcelos, CVPR 2018) on torchvision's detection parts.

A drop-in replacement for torchvision's `RoIHeads` inside `GeneralizedRCNN`:
same call, `(features, proposals, image_shapes, targets)`, same results. Three
box stages run one after another; each is trained at a stricter IoU (0.5, 0.6,
0.7 by default) on the boxes the previous stage refined, so later stages learn
to polish already good boxes instead of starving for high-IoU examples.

Training, per stage k (Detectron2's `CascadeROIHeads`, with the paper's stage
loss weights):
    proposals_0 = RPN proposals + ground truth, matched at IoU_0, sampled
                  (`batch_size_per_image`, `positive_fraction`);
    proposals_k = stage k-1's refined boxes, detached and clipped, empty ones
                  and those refined from appended ground truth dropped,
                  + the ground truth again, all matched at IoU_k (not
                  resampled, as in Detectron2);
    loss_k      = weight_k * (cross-entropy + smooth-L1 on foreground deltas).
Gradients reach stage k's proposals from nowhere: the boxes are detached, so
stage k's loss cannot push stage k-1's regressor. Re-appending the ground truth
at every stage (MMDetection's rule, after the paper's per-stage proposal
targets) guarantees each stage foreground at its IoU; dropping the refined
copies of the previous stage's appended ground truth keeps one copy per box
instead of one more per stage.

Inference: stage k regresses stage k-1's output boxes; the final boxes are the
last stage's. The score of a final box is the mean over all stages of their
class probabilities, each stage's classifier applied to the same RoI features:
those of the boxes entering the last stage. This is the paper's ensemble as
the authors' released Caffe test networks compute it (the stage-1 and stage-2
classifiers re-run on the stage-3 RoIs, then averaged). Detectron2 and MMDetection average instead each stage's
probabilities on its own input boxes, which differ from stage to stage; the
paper's form scores every final box with all three classifiers on one and the
same region, at the cost of two more MLP heads on the last stage's RoIs.
Scores then go through a threshold, NMS and a per-image cap.

No gradient rescaling of the shared RoI features (Detectron2's
`_ScaleGradient`): the stage loss weights 1 / 0.5 / 0.25 play that role here,
as in the paper and MMDetection.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from model.box_heads import CascadeStageHead
from model.configs import DetectorConfig, roi_feature_maps

# torchvision's Fast R-CNN box loss: smooth L1 with this beta, summed over
# foreground RoIs and divided by all sampled RoIs.
SMOOTH_L1_BETA = 1.0 / 9.0
# Detectron2's `nonempty` threshold for refined boxes used as proposals.
MIN_PROPOSAL_SIZE = 1e-3


class CascadeStageOutput(NamedTuple):
    """What one stage saw and produced, for all images of the batch.

    R is the total number of RoIs over the batch, R_i those of image i.
    """

    proposals: list[torch.Tensor]  # R_i x 4 boxes the stage classified and regressed
    roi_features: torch.Tensor  # R x C x S x S pooled features of `proposals`
    class_logits: torch.Tensor  # R x num_classes
    box_deltas: torch.Tensor  # R x 4
    refined_boxes: list[torch.Tensor]  # R_i x 4, proposals moved by box_deltas, clipped
    labels: list[torch.Tensor] | None  # R_i class targets (0 = background); training only
    matched_gt_boxes: list[torch.Tensor] | None  # R_i x 4 ground truth per proposal; training only
    is_ground_truth: list[torch.Tensor] | None  # R_i bool, appended ground-truth boxes; training only


class CascadeRoIHeads(nn.Module):
    """Multi-stage box heads with rising IoU thresholds (see the module docstring)."""

    def __init__(
        self,
        *,
        box_roi_pool: MultiScaleRoIAlign,
        stages: list[CascadeStageHead],
        batch_size_per_image: int,
        positive_fraction: float,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
    ):
        """
        Args:
            box_roi_pool: pools R x C x S x S features for boxes on the FPN maps.
            stages: the cascade's stage heads, in order; IoU thresholds must not decrease.
            batch_size_per_image: RoIs sampled per image for the first stage.
            positive_fraction: largest share of foreground among those RoIs.
            score_thresh: detections with a lower ensemble score are dropped.
            nms_thresh: IoU above which NMS suppresses the lower-scored box.
            detections_per_img: most detections kept per image.
        """
        super().__init__()
        assert len(stages) >= 1, "a cascade needs at least one stage"
        thresholds = [stage.iou_threshold for stage in stages]
        assert thresholds == sorted(thresholds), f"stage IoU thresholds must not decrease, got {thresholds}"
        num_classes = {stage.cls_score.out_features for stage in stages}
        assert len(num_classes) == 1, f"all stages must predict the same classes, got {sorted(num_classes)}"
        self.box_roi_pool = box_roi_pool
        self.stages = nn.ModuleList(stages)
        self.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    @classmethod
    def from_config(cls, config: DetectorConfig) -> "CascadeRoIHeads":
        """Builds the heads for a detector whose FPN has `config.fpn_out_channels` channels."""
        stages = [
            CascadeStageHead(
                in_channels=config.fpn_out_channels,
                resolution=config.roi_output_size,
                representation_size=config.representation_size,
                num_classes=config.num_classes,
                iou_threshold=iou,
                bbox_reg_weights=weights,
                loss_weight=loss_weight,
            )
            for iou, weights, loss_weight in zip(
                config.cascade_iou_thresholds,
                config.cascade_bbox_reg_weights,
                config.cascade_stage_loss_weights,
                strict=True,
            )
        ]
        return cls(
            box_roi_pool=MultiScaleRoIAlign(
                featmap_names=roi_feature_maps(config),
                output_size=config.roi_output_size,
                sampling_ratio=config.roi_sampling_ratio,
            ),
            stages=stages,
            batch_size_per_image=config.box_batch_size_per_image,
            positive_fraction=config.box_positive_fraction,
            score_thresh=config.box_score_thresh,
            nms_thresh=config.box_nms_thresh,
            detections_per_img=config.box_detections_per_img,
        )

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """
        Args:
            features: FPN maps by name, each B x C x H_l x W_l.
            proposals: per image, R_i x 4 RPN proposals (x1, y1, x2, y2).
            image_shapes: per image, (height, width) of the padded batch's image.
            targets: per image, {"boxes": G_i x 4 float, "labels": G_i int64};
                required in training.

        Returns:
            In training, `([], losses)` with `loss_classifier_stage{k}` and
            `loss_box_reg_stage{k}` for every stage k, already multiplied by the
            stage's loss weight. In eval, `(detections, {})` with per image
            {"boxes": K_i x 4, "scores": K_i, "labels": K_i}.
        """
        if self.training:
            self._check_targets(targets)
        outputs = self.run_cascade(features, proposals, image_shapes, targets)
        if self.training:
            return [], self._losses(outputs)
        scores = self._ensemble_scores(outputs)
        return self._postprocess_detections(outputs[-1].refined_boxes, scores, image_shapes), {}

    def run_cascade(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> list[CascadeStageOutput]:
        """Runs every stage; in training, labels each stage's proposals first.

        Args: as `forward`.

        Returns:
            One `CascadeStageOutput` per stage, in order.
        """
        outputs: list[CascadeStageOutput] = []
        for index in range(self.num_stages):
            if index > 0:
                previous = outputs[-1]
                proposals = self._create_proposals_from_boxes(
                    previous.refined_boxes, image_shapes, exclude=previous.is_ground_truth
                )
            labels = matched_gt_boxes = is_ground_truth = None
            if self.training:
                assert targets is not None, "training needs targets"
                proposals, labels, matched_gt_boxes, is_ground_truth = self._match_and_label_boxes(
                    proposals, index, targets, subsample=index == 0
                )
            output = self._run_stage(features, proposals, image_shapes, index)
            outputs.append(output._replace(labels=labels, matched_gt_boxes=matched_gt_boxes,
                                           is_ground_truth=is_ground_truth))
        return outputs

    def _run_stage(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        stage_index: int,
    ) -> CascadeStageOutput:
        """Pools, classifies and regresses one stage's proposals.

        Args:
            features: FPN maps by name.
            proposals: per image, R_i x 4 boxes.
            image_shapes: per image, (height, width), to clip refined boxes.
            stage_index: which stage's head to run.

        Returns:
            The stage's output, with `labels`, `matched_gt_boxes` and
            `is_ground_truth` unset.
        """
        stage = self.stages[stage_index]
        roi_features = self.box_roi_pool(features, proposals, image_shapes)
        class_logits, box_deltas = stage(roi_features)
        # Boxes are decoded in float32 even under autocast: fp16 loses whole
        # pixels at radiograph coordinates.
        decoded = stage.decode(box_deltas.float(), torch.cat(proposals).float())
        refined = [
            box_ops.clip_boxes_to_image(boxes, shape)
            for boxes, shape in zip(decoded.split([len(p) for p in proposals]), image_shapes, strict=True)
        ]
        return CascadeStageOutput(
            proposals=proposals,
            roi_features=roi_features,
            class_logits=class_logits,
            box_deltas=box_deltas,
            refined_boxes=refined,
            labels=None,
            matched_gt_boxes=None,
            is_ground_truth=None,
        )

    def _create_proposals_from_boxes(
        self,
        boxes: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        *,
        exclude: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Turns one stage's refined boxes into the next stage's proposals.

        Args:
            boxes: per image, R_i x 4 refined boxes.
            image_shapes: per image, (height, width).
            exclude: per image, R_i bool: boxes to leave out (in training, those
                refined from appended ground truth, which is appended afresh).

        Returns:
            Per image, R'_i x 4 boxes: detached (no gradient flows back into the
            previous stage through its boxes) and clipped; in training, excluded
            boxes and boxes thinner than `MIN_PROPOSAL_SIZE` are dropped
            (R'_i <= R_i), at inference all are kept (R'_i == R_i).
        """
        proposals = []
        for index, (boxes_in_image, shape) in enumerate(zip(boxes, image_shapes, strict=True)):
            boxes_in_image = box_ops.clip_boxes_to_image(boxes_in_image.detach(), shape)
            if self.training:
                widths = boxes_in_image[:, 2] - boxes_in_image[:, 0]
                heights = boxes_in_image[:, 3] - boxes_in_image[:, 1]
                keep = (widths > MIN_PROPOSAL_SIZE) & (heights > MIN_PROPOSAL_SIZE)
                if exclude is not None:
                    keep &= ~exclude[index]
                boxes_in_image = boxes_in_image[keep]
            proposals.append(boxes_in_image)
        return proposals

    @torch.no_grad()
    def _match_and_label_boxes(
        self,
        proposals: list[torch.Tensor],
        stage_index: int,
        targets: list[dict[str, torch.Tensor]],
        *,
        subsample: bool,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Appends the ground truth, matches at the stage's IoU and labels.

        Args:
            proposals: per image, R_i x 4 boxes.
            stage_index: whose IoU threshold decides foreground.
            targets: per image, {"boxes": G_i x 4, "labels": G_i}.
            subsample: keep only a balanced sample of foreground and
                background (the first stage); later stages keep all boxes.

        Returns:
            proposals: per image, P_i x 4 (P_i = R_i + G_i, or the sample).
            labels: per image, P_i int64; 0 = background.
            matched_gt_boxes: per image, P_i x 4; the ground truth each
                proposal is compared with (zeros for an image without any).
            is_ground_truth: per image, P_i bool; True for appended ground truth.
        """
        matcher = self.stages[stage_index].proposal_matcher
        all_boxes, all_labels, all_matched, all_is_gt = [], [], [], []
        for proposals_in_image, target in zip(proposals, targets, strict=True):
            gt_boxes = target["boxes"].to(proposals_in_image.dtype)
            gt_labels = target["labels"]
            boxes = torch.cat([proposals_in_image, gt_boxes])
            if gt_boxes.numel() == 0:
                labels = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
                matched = torch.zeros_like(boxes)
            else:
                matched_idxs = matcher(box_ops.box_iou(gt_boxes, boxes))
                clamped = matched_idxs.clamp(min=0)
                labels = gt_labels[clamped].to(torch.int64)
                labels[matched_idxs < 0] = 0
                matched = gt_boxes[clamped]
            is_gt = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
            is_gt[len(proposals_in_image):] = True
            all_boxes.append(boxes)
            all_labels.append(labels)
            all_matched.append(matched)
            all_is_gt.append(is_gt)
        if subsample:
            positives, negatives = self.fg_bg_sampler(all_labels)
            keep = [torch.where(pos | neg)[0] for pos, neg in zip(positives, negatives, strict=True)]
            all_boxes = [b[k] for b, k in zip(all_boxes, keep, strict=True)]
            all_labels = [b[k] for b, k in zip(all_labels, keep, strict=True)]
            all_matched = [b[k] for b, k in zip(all_matched, keep, strict=True)]
            all_is_gt = [b[k] for b, k in zip(all_is_gt, keep, strict=True)]
        return all_boxes, all_labels, all_matched, all_is_gt

    def _losses(self, outputs: list[CascadeStageOutput]) -> dict[str, torch.Tensor]:
        """Weighted classification and box losses of every stage.

        Returns:
            {"loss_classifier_stage{k}": scalar, "loss_box_reg_stage{k}": scalar}.
        """
        losses = {}
        for index, (stage, output) in enumerate(zip(self.stages, outputs, strict=True)):
            assert output.labels is not None and output.matched_gt_boxes is not None, "losses need labelled proposals"
            classification, box_regression = self._stage_losses(stage, output)
            losses[f"loss_classifier_stage{index}"] = stage.loss_weight * classification
            losses[f"loss_box_reg_stage{index}"] = stage.loss_weight * box_regression
        return losses

    @staticmethod
    def _stage_losses(stage: CascadeStageHead, output: CascadeStageOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted cross-entropy over all RoIs and smooth-L1 over foreground RoIs.

        The box loss is summed over foreground RoIs and divided by all RoIs
        (torchvision's `fastrcnn_loss`), so the two losses keep their usual
        balance and the Faster R-CNN baseline's numbers are comparable.
        """
        labels = torch.cat(output.labels)
        class_logits = output.class_logits.float()
        if labels.numel() == 0:  # no RoI at all: nothing to learn, keep the graph
            zero = class_logits.sum() * 0.0 + output.box_deltas.sum() * 0.0
            return zero, zero
        classification = F.cross_entropy(class_logits, labels)
        foreground = torch.where(labels > 0)[0]
        proposals = torch.cat(output.proposals)[foreground]
        targets = stage.encode(torch.cat(output.matched_gt_boxes)[foreground], proposals)
        box_regression = F.smooth_l1_loss(
            output.box_deltas.float()[foreground], targets, beta=SMOOTH_L1_BETA, reduction="sum"
        ) / labels.numel()
        return classification, box_regression

    def _ensemble_scores(self, outputs: list[CascadeStageOutput]) -> torch.Tensor:
        """Mean class probabilities of all stages on the last stage's RoI features.

        Returns:
            R x num_classes probabilities for the last stage's R proposals
            (whose refined boxes are the detections).
        """
        last = outputs[-1]
        probabilities = [stage.classify(last.roi_features).float() for stage in self.stages[:-1]]
        probabilities.append(last.class_logits.float().softmax(dim=-1))
        return torch.stack(probabilities).mean(dim=0)

    def _postprocess_detections(
        self,
        boxes: list[torch.Tensor],
        scores: torch.Tensor,
        image_shapes: list[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        """Threshold, per-class NMS and top-k, per image.

        Args:
            boxes: per image, R_i x 4 final (class-agnostic) boxes.
            scores: R x num_classes probabilities, rows in `boxes` order.
            image_shapes: per image, (height, width).

        Returns:
            Per image, {"boxes": K_i x 4, "scores": K_i, "labels": K_i int64},
            highest score first.
        """
        results = []
        num_classes = scores.shape[1]
        for boxes_in_image, scores_in_image, shape in zip(
            boxes, scores.split([len(b) for b in boxes]), image_shapes, strict=True
        ):
            boxes_in_image = box_ops.clip_boxes_to_image(boxes_in_image, shape)
            foreground = scores_in_image[:, 1:]
            labels = torch.arange(1, num_classes, device=scores.device).expand_as(foreground)
            flat_boxes = boxes_in_image.unsqueeze(1).expand(-1, num_classes - 1, 4).reshape(-1, 4)
            flat_scores, flat_labels = foreground.reshape(-1), labels.reshape(-1)
            keep = torch.where(flat_scores > self.score_thresh)[0]
            flat_boxes, flat_scores, flat_labels = flat_boxes[keep], flat_scores[keep], flat_labels[keep]
            keep = box_ops.remove_small_boxes(flat_boxes, min_size=1e-2)
            flat_boxes, flat_scores, flat_labels = flat_boxes[keep], flat_scores[keep], flat_labels[keep]
            keep = box_ops.batched_nms(flat_boxes, flat_scores, flat_labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": flat_boxes[keep], "scores": flat_scores[keep], "labels": flat_labels[keep]})
        return results

    @staticmethod
    def _check_targets(targets: list[dict[str, torch.Tensor]] | None) -> None:
        assert targets is not None, "training needs targets"
        for target in targets:
            assert target["boxes"].is_floating_point(), f"target boxes must be float, got {target['boxes'].dtype}"
            assert target["labels"].dtype == torch.int64, f"target labels must be int64, got {target['labels'].dtype}"
            assert target["boxes"].shape[-1:] == (4,) and target["boxes"].dim() == 2, (
                f"target boxes must be G x 4, got {tuple(target['boxes'].shape)}")
