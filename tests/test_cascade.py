"""Cascade R-CNN heads, the detector builder and configs: structure, golden values, inference rules."""

import dataclasses

import pytest
import torch
import torchvision

from model.box_heads import CascadeStageHead
from model.cascade_roi_heads import CascadeRoIHeads
from model.configs import CONFIGS, config_from_dict, config_to_dict, get_config
from model.detector import IMAGENET_MEAN, IMAGENET_STD, build_backbone, build_detector, load_backbone_weights

SIZE = 64
# Small and fast, but every part of the real `tiny` detector is there.
CONFIG = get_config(
    "tiny",
    input_size=SIZE,
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=64,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=32,
    box_batch_size_per_image=32,
)


def tiny_batch():
    """Two seeded 64 x 64 images: one with two bright 'opacities', one negative."""
    generator = torch.Generator().manual_seed(7)
    images = [torch.rand(1, SIZE, SIZE, generator=generator) * 0.5 for _ in range(2)]
    boxes = torch.tensor([[8.0, 10.0, 30.0, 34.0], [36.0, 20.0, 58.0, 50.0]])
    for x1, y1, x2, y2 in boxes.int().tolist():
        images[0][:, y1:y2, x1:x2] += 0.4
    targets = [
        {"boxes": boxes, "labels": torch.ones(2, dtype=torch.int64)},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


def seeded_detector(arch="cascade", config=CONFIG):
    torch.manual_seed(0)
    return build_detector(config, arch=arch)


def cascade_outputs(model, images, targets=None):
    """The steps of GeneralizedRCNN.forward, keeping the per-stage outputs."""
    image_list, targets = model.transform(images, targets)
    features = model.backbone(image_list.tensors)
    proposals, _ = model.rpn(image_list, features, targets)
    outputs = model.roi_heads.run_cascade(features, proposals, image_list.image_sizes, targets)
    return outputs, features, image_list, targets


# ---------------------------------------------------------------- structure


def test_stages_have_their_own_iou_thresholds_box_coders_and_loss_weights():
    heads = seeded_detector().roi_heads
    assert isinstance(heads, CascadeRoIHeads) and heads.num_stages == 3
    assert [s.iou_threshold for s in heads.stages] == [0.5, 0.6, 0.7]
    assert [(s.proposal_matcher.high_threshold, s.proposal_matcher.low_threshold) for s in heads.stages] == [
        (0.5, 0.5), (0.6, 0.6), (0.7, 0.7)]
    assert [tuple(s.box_coder.weights) for s in heads.stages] == [
        (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)]
    assert [s.loss_weight for s in heads.stages] == [1.0, 0.5, 0.25]
    # Class-agnostic regression: 4 deltas per RoI whatever the number of classes.
    assert all(s.bbox_pred.out_features == 4 and s.cls_score.out_features == 2 for s in heads.stages)
    # Each stage has its own weights.
    pointers = {p.data_ptr() for s in heads.stages for p in s.parameters()}
    assert len(pointers) == sum(1 for s in heads.stages for _ in s.parameters())


def test_stage_head_rejects_bad_settings():
    common = dict(in_channels=8, resolution=7, representation_size=16, num_classes=2,
                  bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), loss_weight=1.0)
    with pytest.raises(AssertionError, match="iou_threshold"):
        CascadeStageHead(iou_threshold=1.2, **common)
    stages = [CascadeStageHead(iou_threshold=t, **common) for t in (0.7, 0.5)]
    with pytest.raises(AssertionError, match="must not decrease"):
        CascadeRoIHeads(box_roi_pool=None, stages=stages, batch_size_per_image=8, positive_fraction=0.25,
                        score_thresh=0.05, nms_thresh=0.5, detections_per_img=10)


def test_baseline_shares_everything_but_the_roi_heads():
    cascade, faster = seeded_detector("cascade"), seeded_detector("faster_rcnn")
    assert isinstance(faster.roi_heads, torchvision.models.detection.roi_heads.RoIHeads)
    assert faster.roi_heads.proposal_matcher.high_threshold == 0.5
    assert tuple(faster.roi_heads.box_coder.weights) == (10.0, 10.0, 5.0, 5.0)
    shared = {k: v.shape for k, v in cascade.state_dict().items() if not k.startswith("roi_heads.")}
    assert shared == {k: v.shape for k, v in faster.state_dict().items() if not k.startswith("roi_heads.")}
    assert cascade.backbone.body.conv1.in_channels == 1


# ---------------------------------------------------------------- golden values

# Recorded once from this implementation (torch 2.14.1, CPU). They guard against
# silent changes: a different sampler, matcher, box coder, loss normalisation or
# initialisation order moves them. If a change is intended, re-record and say why.
GOLDEN_LOSSES = {
    "loss_classifier_stage0": 0.7290068,
    "loss_box_reg_stage0": 0.0552930,
    "loss_classifier_stage1": 0.3428478,
    "loss_box_reg_stage1": 0.0000100,
    "loss_classifier_stage2": 0.1796909,
    "loss_box_reg_stage2": 0.0000095,
    "loss_objectness": 0.6972342,
    "loss_rpn_box_reg": 0.0088551,
}
# Per stage: RoIs per image (training) and foreground RoIs in the batch.
GOLDEN_STAGE_ROIS = [([32, 32], 3), ([32, 32], 2), ([32, 32], 2)]


def test_training_losses_and_stage_shapes_match_recorded_values():
    model = seeded_detector().train()
    images, targets = tiny_batch()
    torch.manual_seed(1)
    losses = model(images, targets)
    assert set(losses) == set(GOLDEN_LOSSES)
    for key, value in GOLDEN_LOSSES.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-3, abs=1e-6), key

    torch.manual_seed(1)
    outputs, *_ = cascade_outputs(model, images, targets)
    recorded = [([len(p) for p in o.proposals], int(sum((l > 0).sum() for l in o.labels))) for o in outputs]
    assert recorded == GOLDEN_STAGE_ROIS
    for output in outputs:
        rois = sum(len(p) for p in output.proposals)
        assert output.roi_features.shape == (rois, CONFIG.fpn_out_channels, 7, 7)
        assert output.class_logits.shape == (rois, 2) and output.box_deltas.shape == (rois, 4)
        assert [b.shape for b in output.refined_boxes] == [p.shape for p in output.proposals]
    # Same seed, same losses, whether through GeneralizedRCNN.forward or step by step.
    manual = model.roi_heads._losses(outputs)
    for key, value in manual.items():
        assert value.item() == pytest.approx(losses[key].item(), rel=1e-6)


def test_later_stages_train_on_the_previous_stages_detached_boxes_plus_ground_truth():
    model = seeded_detector().train()
    images, targets = tiny_batch()
    torch.manual_seed(1)
    outputs, *_ = cascade_outputs(model, images, targets)
    for previous, current in zip(outputs, outputs[1:]):
        for refined, was_gt, proposals, target in zip(
            previous.refined_boxes, previous.is_ground_truth, current.proposals, targets
        ):
            assert refined.requires_grad and not proposals.requires_grad
            kept = refined.detach()[~was_gt]  # refined copies of appended ground truth are replaced
            kept = kept[((kept[:, 2] - kept[:, 0]) > 1e-3) & ((kept[:, 3] - kept[:, 1]) > 1e-3)]
            assert torch.equal(proposals, torch.cat([kept, target["boxes"]]))
            assert int(was_gt.sum()) <= len(target["boxes"])
    # A later stage's loss cannot reach an earlier stage's regressor.
    losses = model.roi_heads._losses(outputs)
    (losses["loss_classifier_stage1"] + losses["loss_box_reg_stage1"]).backward()
    stage0, stage1 = model.roi_heads.stages[0], model.roi_heads.stages[1]
    assert stage0.bbox_pred.weight.grad is None and stage0.cls_score.weight.grad is None
    assert stage1.bbox_pred.weight.grad.abs().sum() > 0
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0  # the shared features do learn


def test_positives_get_scarcer_as_the_iou_threshold_rises_on_the_same_boxes():
    heads = seeded_detector().train().roi_heads
    _, targets = tiny_batch()
    gt = targets[0]["boxes"]
    shifted = gt + torch.tensor([[4.0], [3.0]])  # IoU with its own box 0.517 and 0.636
    proposals = [torch.cat([gt, shifted]), torch.zeros(0, 4)]
    counts = []
    for stage in range(3):
        _, labels, _, _ = heads._match_and_label_boxes(proposals, stage, targets, subsample=False)
        counts.append(int((labels[0] > 0).sum()))
    # Appended ground truth and the exact copies always match; the shifted boxes as the IoU allows.
    assert counts == [6, 5, 4]


# ---------------------------------------------------------------- inference


def test_inference_scores_are_the_mean_of_all_stage_probabilities_on_the_last_stage_features():
    config = dataclasses.replace(CONFIG, box_score_thresh=0.0, box_nms_thresh=1.0, box_detections_per_img=1000)
    model = seeded_detector(config=config).eval()
    images, _ = tiny_batch()
    with torch.no_grad():
        detections = model(images)
        outputs, *_ = cascade_outputs(model, images)
        last = outputs[-1]
        expected = torch.stack([
            torch.softmax(stage.cls_score(stage.box_head(last.roi_features)), dim=-1) for stage in model.roi_heads.stages
        ]).mean(dim=0)[:, 1]
        last_stage_only = torch.softmax(last.class_logits, dim=-1)[:, 1]
    assert not torch.allclose(expected, last_stage_only)  # the ensemble is not a no-op here
    for detection, boxes, scores in zip(detections, last.refined_boxes, expected.split([len(p) for p in last.proposals])):
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1e-2) & ((boxes[:, 3] - boxes[:, 1]) >= 1e-2)
        order = scores[keep].argsort(descending=True, stable=True)
        assert torch.allclose(detection["scores"], scores[keep][order], atol=1e-6)
        assert torch.allclose(detection["boxes"], boxes[keep][order], atol=1e-4)


def test_inference_boxes_come_from_the_last_stage_regressing_the_previous_stages_boxes():
    model = seeded_detector().eval()
    images, _ = tiny_batch()
    with torch.no_grad():
        for stage in model.roi_heads.stages:  # make every stage move boxes visibly
            stage.bbox_pred.bias.copy_(torch.tensor([0.5, 0.2, 0.1, -0.1]))
        outputs, _, image_list, _ = cascade_outputs(model, images)
    for previous, current in zip(outputs, outputs[1:]):
        assert all(torch.equal(p, r) for p, r in zip(current.proposals, previous.refined_boxes))
    stage = model.roi_heads.stages[-1]
    expected = stage.decode(outputs[-1].box_deltas, torch.cat(outputs[-1].proposals))
    expected = torchvision.ops.clip_boxes_to_image(expected, image_list.image_sizes[0])
    assert torch.allclose(torch.cat(outputs[-1].refined_boxes), expected)
    assert not torch.allclose(outputs[-1].refined_boxes[0], outputs[-2].refined_boxes[0])


def test_eval_output_format():
    model = seeded_detector().eval()
    images, _ = tiny_batch()
    images[1] = images[1][:, :, :48]  # a narrower image: boxes stay inside it
    with torch.inference_mode():
        detections = model(images)
    assert len(detections) == 2
    for detection, image in zip(detections, images):
        count = len(detection["boxes"])
        assert detection["boxes"].shape == (count, 4) and detection["scores"].shape == (count,)
        assert detection["labels"].dtype == torch.int64 and bool((detection["labels"] == 1).all())
        assert count <= CONFIG.box_detections_per_img
        assert bool((detection["scores"][:-1] >= detection["scores"][1:]).all())
        assert bool((detection["boxes"][:, 2] <= image.shape[-1]).all() and (detection["boxes"] >= 0).all())


def test_faster_rcnn_baseline_builds_and_trains_a_step():
    model = seeded_detector("faster_rcnn").train()
    images, targets = tiny_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.roi_heads.box_predictor.cls_score.weight.detach().clone()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    optimizer.step()
    assert not torch.equal(before, model.roi_heads.box_predictor.cls_score.weight)
    with torch.inference_mode():
        detections = model.eval()(images)
    assert len(detections) == 2 and detections[0]["boxes"].shape[1] == 4


# ---------------------------------------------------------------- backbone weights


def test_rgb_torchvision_weights_fold_to_an_equivalent_grayscale_stem(tmp_path):
    torch.manual_seed(3)
    rgb = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        rgb.bn1.running_mean.uniform_(-0.5, 0.5)
        rgb.bn1.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "resnet18.pth"
    torch.save(rgb.state_dict(), path)

    model = build_detector(dataclasses.replace(CONFIG, backbone_weights=str(path)), arch="cascade")
    body = model.backbone.body
    assert torch.equal(body.layer2[0].conv1.weight, rgb.layer2[0].conv1.weight)
    # A gray image through the RGB stem (ImageNet-normalised per channel) and through
    # ours (the config's normalisation) gives the same bn1 output away from the border.
    gray = torch.rand(1, 1, 32, 32)
    rgb_input = (gray.expand(1, 3, 32, 32) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)
    ours = (gray - CONFIG.image_mean[0]) / CONFIG.image_std[0]
    rgb.eval(), body.eval()
    with torch.no_grad():
        expected = rgb.bn1(rgb.conv1(rgb_input))[..., 2:-2, 2:-2]
        actual = body.bn1(body.conv1(ours))[..., 2:-2, 2:-2]
    assert torch.allclose(actual, expected, atol=1e-4)


def test_backbone_weights_report_partial_keys_and_refuse_foreign_files(tmp_path):
    body = build_backbone(CONFIG).body  # conv1 .. layer3 of a ResNet-18
    state = {f"backbone.body.{k}": v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()
             if not k.startswith("layer1.")}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    report = load_backbone_weights(body, path, image_mean=(0.5,), image_std=(0.3,))
    assert report.missing and all(k.startswith("layer1.") for k in report.missing)
    assert {"fc.weight", "fc.bias", "layer4.0.conv1.weight"} <= set(report.unexpected)
    assert "conv1.weight" in report.loaded and "layer3.1.bn2.running_var" in report.loaded
    assert report.notes and "folded to grayscale" in report.notes[0]
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="none of its 1 tensors fit"):
        load_backbone_weights(body, tmp_path / "foreign.pth", image_mean=(0.5,), image_std=(0.3,))


# ---------------------------------------------------------------- configs


def test_named_configs_round_trip_through_json_and_validate():
    assert set(CONFIGS) == {"tiny", "r50"}
    tiny, r50 = get_config("tiny"), get_config("r50")
    assert (tiny.backbone, tiny.in_channels, r50.backbone, r50.backbone_stages) == ("resnet18", 1, "resnet50", 4)
    assert 256 <= tiny.input_size <= 320 and 512 <= r50.input_size <= 1024
    for config in (tiny, r50):
        assert config_from_dict(config_to_dict(config)) == config
    with pytest.raises(KeyError, match="unknown detector config"):
        get_config("huge")
    with pytest.raises(AssertionError, match="one entry per stage"):
        get_config("tiny", cascade_stage_loss_weights=(1.0, 0.5))
    with pytest.raises(AssertionError, match="one anchor size per FPN level"):
        get_config("tiny", anchor_sizes=(16, 32, 64, 128, 256))
    with pytest.raises(ValueError, match="unknown DetectorConfig fields"):
        config_from_dict({**config_to_dict(tiny), "colour": "blue"})
