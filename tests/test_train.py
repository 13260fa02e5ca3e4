"""Training loop, checkpoints and the `train` CLI, on tiny inputs (a few seconds in all)."""

import argparse
import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import train_cli
from model.checkpoint import load_detector, save_detector, train_state_path, weights_version
from model.configs import CONFIGS, get_config
from model.detector import ARCHS, build_detector
from model.train import (
    FIRST_TEST_SEED,
    LR_SCHEDULES,
    OPTIMIZERS,
    TrainOptions,
    epoch_batches,
    lr_factor,
    random_hflip,
    summarize_losses,
    train,
)

SIZE = 64
CONFIG = get_config("tiny", input_size=SIZE, rpn_post_nms_top_n_train=64, rpn_post_nms_top_n_test=32,
                    box_batch_size_per_image=32)


def fixed_batch():
    generator = torch.Generator().manual_seed(11)
    images = [torch.rand(1, SIZE, SIZE, generator=generator) * 0.4 for _ in range(2)]
    images[0][:, 12:40, 10:34] += 0.5
    images[1][:, 30:56, 20:50] += 0.5
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 34.0, 40.0]]), "labels": torch.ones(1, dtype=torch.int64)},
        {"boxes": torch.tensor([[20.0, 30.0, 50.0, 56.0]]), "labels": torch.ones(1, dtype=torch.int64)},
    ]
    return images, targets


def seeded_loss(model, images, targets):
    """The training loss with the samplers' draws fixed, so two calls differ only by the weights."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(123)
        return float(sum(model(images, targets).values()))


@pytest.mark.parametrize("arch", ARCHS)
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(arch):
    torch.manual_seed(0)
    model = build_detector(CONFIG, arch=arch).train()
    images, targets = fixed_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = seeded_loss(model, images, targets)
    for _ in range(8):
        optimizer.zero_grad()
        sum(model(images, targets).values()).backward()
        optimizer.step()
    after = seeded_loss(model, images, targets)
    assert after < 0.7 * before, (before, after)


# ---------------------------------------------------------------- checkpoints


def test_save_load_round_trip_gives_identical_eval_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_detector(CONFIG, arch="cascade")
    with torch.no_grad():  # not the initial state: predictors that actually score and move boxes
        for stage in model.roi_heads.stages:
            stage.cls_score.bias.copy_(torch.tensor([0.0, 2.0]))
            stage.bbox_pred.bias.uniform_(-0.2, 0.2)
    model.eval()
    images, _ = fixed_batch()
    path = tmp_path / "cascade.safetensors"
    version = save_detector(model, CONFIG, "cascade", path, extra={"epoch": 3})
    loaded = load_detector(path)
    assert (loaded.arch, loaded.config, loaded.version, loaded.extra) == ("cascade", CONFIG, version, {"epoch": 3})
    assert len(version) == 12 and version == weights_version(model.state_dict())
    assert not loaded.model.training
    with torch.inference_mode():
        expected, actual = model(images), loaded.model(images)
    assert len(expected[0]["boxes"]) > 0
    for a, b in zip(expected, actual):
        assert all(torch.equal(a[key], b[key]) for key in ("boxes", "scores", "labels"))
    metadata = json.loads(path.with_suffix(".json").read_text())
    assert metadata["format"] == "medtwin-detector" and metadata["config"]["name"] == "tiny"


def test_checkpoints_other_than_safetensors_with_matching_json_are_refused(tmp_path):
    torch.manual_seed(0)
    model = build_detector(CONFIG, arch="faster_rcnn")
    with pytest.raises(ValueError, match="pickle-based files"):
        save_detector(model, CONFIG, "faster_rcnn", tmp_path / "model.pt")
    with pytest.raises(ValueError, match="pickle-based files"):
        load_detector(tmp_path / "model.pth")
    path = tmp_path / "baseline.safetensors"
    save_detector(model, CONFIG, "faster_rcnn", path)
    assert load_detector(path).arch == "faster_rcnn"

    state = load_file(str(path))
    state["roi_heads.box_predictor.cls_score.bias"] += 1.0
    save_file(state, str(path))  # weights changed behind the JSON's back
    with pytest.raises(ValueError, match="the JSON belongs to other weights"):
        load_detector(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(ValueError, match="must sit beside its weights"):
        load_detector(path)


# ---------------------------------------------------------------- the training loop


def options(tmp_path, name, **overrides):
    values = dict(config="tiny", input_size=SIZE, train_images=4, val_images=2, epochs=2, batch_size=2, lr=1e-3,
                  warmup_steps=2, threads=1, seed=5, progress=False, out=str(tmp_path / name))
    return TrainOptions(**{**values, **overrides})


def test_training_is_deterministic_and_resume_continues_identically(tmp_path):
    straight = train(options(tmp_path, "straight"))
    again = train(options(tmp_path, "again"))
    # As if the straight run had stopped after its first epoch.
    after_first_epoch = tmp_path / "straight" / "epoch_001.safetensors"
    resumed = train(options(tmp_path, "resumed", resume=str(after_first_epoch)))

    versions = [load_detector(s["last"]).version for s in (straight, again, resumed)]
    assert versions[0] == versions[1] == versions[2]
    assert load_detector(after_first_epoch).version != versions[0]  # the second epoch did change the weights
    assert [h["train"] for h in resumed["history"]] == [h["train"] for h in straight["history"]]
    assert not (tmp_path / "resumed" / "epoch_001.safetensors").exists()  # epoch 1 was not run again

    history = straight["history"]
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["step"] == 4
    assert {"stage0", "stage1", "stage2", "rpn", "loss"} <= set(history[0]["train"])
    assert straight["eval_kind"] == "detection_metrics" and "voc_map50" in history[-1]["val"]
    extra = load_detector(straight["last"]).extra
    assert extra["data"]["seeds"] == {"train": 5, "val": 6} and extra["epoch"] == 2
    assert train_state_path(straight["last"]).exists()
    lines = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_faster_rcnn_trains_through_the_loop(tmp_path):
    summary = train(options(tmp_path, "baseline", arch="faster_rcnn", epochs=1, val_images=0))
    assert load_detector(summary["last"]).arch == "faster_rcnn"
    assert summary["best"] is None and "val" not in summary["history"][0]
    assert set(summary["history"][0]["train"]) >= {"loss_classifier", "stage0", "rpn", "loss"}


def test_resume_refuses_a_different_architecture(tmp_path):
    first = train(options(tmp_path, "c", epochs=1, val_images=0))
    with pytest.raises(ValueError, match="is a cascade 'tiny' checkpoint"):
        train(options(tmp_path, "c", arch="faster_rcnn", resume=first["last"], val_images=0))


def test_synthetic_seeds_may_not_reach_the_held_out_test_seeds():
    with pytest.raises(AssertionError, match="kept for held-out test sets"):
        TrainOptions(seed=FIRST_TEST_SEED - 1)
    with pytest.raises(AssertionError, match="needs format"):
        TrainOptions(data="/data/siim")


# ---------------------------------------------------------------- pieces of the loop


def test_lr_factor_warms_up_then_decays():
    cosine = [lr_factor(s, schedule="cosine", total_steps=100, warmup_steps=10) for s in (0, 5, 10, 50, 100)]
    assert cosine[0] == pytest.approx(0.001) and cosine[1] == pytest.approx(0.5005 * (0.5 + 0.5 * math.cos(0.05 * math.pi)))
    assert cosine[2] == pytest.approx(0.5 * (1 + math.cos(0.1 * math.pi))) and cosine[3] == pytest.approx(0.5)
    assert cosine[4] == pytest.approx(0.0, abs=1e-12)
    step = [lr_factor(s, schedule="step", total_steps=90, warmup_steps=0) for s in (0, 59, 60, 79, 80)]
    assert step == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])


def test_summarize_losses_groups_by_stage_and_rpn():
    losses = {"loss_classifier_stage0": 1.0, "loss_box_reg_stage0": 0.5, "loss_classifier_stage1": 0.25,
              "loss_box_reg_stage1": 0.125, "loss_objectness": 2.0, "loss_rpn_box_reg": 0.0625}
    summary = summarize_losses({k: torch.tensor(v) for k, v in losses.items()})
    assert (summary["stage0"], summary["stage1"], summary["rpn"]) == (1.5, 0.375, 2.0625)
    assert summary["loss"] == sum(losses.values())
    baseline = summarize_losses({"loss_classifier": torch.tensor(1.0), "loss_box_reg": torch.tensor(0.5)})
    assert baseline["stage0"] == 1.5


def test_random_hflip_mirrors_boxes_with_the_image():
    image = torch.zeros(1, 4, 10)
    image[:, :, 1:3] = 1.0
    target = {"boxes": torch.tensor([[1.0, 0.0, 3.0, 4.0]]), "labels": torch.ones(1, dtype=torch.int64)}
    (flipped,), (flipped_target,) = random_hflip([image], [target], probability=1.0,
                                                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(flipped_target["boxes"], torch.tensor([[7.0, 0.0, 9.0, 4.0]]))
    assert torch.equal(flipped[0, 0].nonzero().flatten(), torch.tensor([7, 8]))
    (same,), _ = random_hflip([image], [target], probability=0.0, generator=torch.Generator().manual_seed(0))
    assert same is image


def test_epoch_batches_cover_every_item_once_in_a_seeded_order():
    batches = epoch_batches(10, 4, seed=3, epoch=0)
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(sum(batches, [])) == list(range(10))
    assert batches == epoch_batches(10, 4, seed=3, epoch=0) != epoch_batches(10, 4, seed=3, epoch=1)


# ---------------------------------------------------------------- CLI


def cli_parser():
    parser = argparse.ArgumentParser(prog="medtwin")
    train_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_help_works_and_choices_match_the_code(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_parser().parse_args(["train", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--config", "--arch", "--data", "--format", "--train-images", "--val-images", "--epochs",
                 "--batch-size", "--lr", "--lr-schedule", "--seed", "--out", "--resume", "--eval-every", "--device"):
        assert flag in help_text
    assert train_cli.CONFIG_NAMES == tuple(CONFIGS) and train_cli.ARCH_NAMES == ARCHS
    assert train_cli.LR_SCHEDULES == LR_SCHEDULES and train_cli.OPTIMIZERS == OPTIMIZERS


def test_cli_maps_flags_onto_a_training_run(tmp_path, capsys):
    args = cli_parser().parse_args(["train", "--arch", "faster_rcnn", "--input-size", str(SIZE), "--train-images",
                                    "2", "--val-images", "0", "--epochs", "1", "--batch-size", "2", "--threads", "1",
                                    "--no-progress", "--device", "cpu", "--out", str(tmp_path / "cli")])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "not for clinical use" in printed and (tmp_path / "cli" / "last.safetensors").exists()
    args = cli_parser().parse_args(["train", "--data", "/somewhere"])
    with pytest.raises(SystemExit, match="needs --format"):
        args.func(args)
