"""Synthetic detection dataset: reproducible per (seed, index), shaped and labelled as promised."""

import pytest
import torch

from model.datasets import OPACITY_LABEL, SyntheticChestXrayDataset, collate_detection

SMALL = {"image_size": 48, "source_size": (96, 72)}


def assert_items_equal(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        assert torch.equal(a[1][key], b[1][key]) if isinstance(a[1][key], torch.Tensor) else a[1][key] == b[1][key]


def test_items_are_reproducible_per_seed_and_index_in_any_order():
    first = SyntheticChestXrayDataset(seed=5, num_images=4, **SMALL)
    second = SyntheticChestXrayDataset(seed=5, num_images=4, **SMALL)
    late = [first[i] for i in range(4)][2]
    assert_items_equal(second[2], late)  # index 2 drawn first here, third there

    other_seed = SyntheticChestXrayDataset(seed=6, num_images=4, **SMALL)
    assert not torch.equal(other_seed[2][0], late[0])
    assert not torch.equal(first[3][0], late[0])


def test_item_shapes_ranges_and_boxes_inside_the_image():
    dataset = SyntheticChestXrayDataset(seed=11, num_images=6, positive_fraction=1.0, **SMALL)
    for index, (image, target) in enumerate(dataset):
        assert image.dtype == torch.float32 and image.shape == (1, 48, 36)
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
        boxes = target["boxes"]
        assert boxes.dtype == torch.float32 and boxes.shape[1] == 4 and 1 <= len(boxes) <= 4
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= 36).all() and (boxes[:, 1::2] <= 48).all()
        assert target["labels"].dtype == torch.int64 and (target["labels"] == OPACITY_LABEL).all()
        assert target["labels"].shape == (len(boxes),)
        assert target["image_id"] == index and target["orig_size"] == (96, 72) and target["scale"] == 0.5
    assert index == 5  # iteration stops at len() through IndexError


def test_boxes_are_the_source_boxes_times_scale():
    # image_size does not touch the random draws: the same radiograph at two sizes.
    full = SyntheticChestXrayDataset(seed=3, num_images=2, positive_fraction=1.0, image_size=96, source_size=(96, 72))
    half = SyntheticChestXrayDataset(seed=3, num_images=2, positive_fraction=1.0, **SMALL)
    _, full_target = full[1]
    _, half_target = half[1]
    assert full_target["scale"] == 1.0 and half_target["scale"] == 0.5
    torch.testing.assert_close(half_target["boxes"], full_target["boxes"] * 0.5)


def test_monochrome1_is_stored_inverted_and_prepared_back():
    monochrome1 = SyntheticChestXrayDataset(seed=8, num_images=1, **SMALL)
    monochrome1.PHOTOMETRIC_CHOICES = ("MONOCHROME1",)
    monochrome2 = SyntheticChestXrayDataset(seed=8, num_images=1, **SMALL)
    monochrome2.PHOTOMETRIC_CHOICES = ("MONOCHROME2",)
    inverted, target_1 = monochrome1[0]
    plain, target_2 = monochrome2[0]
    # The robust window is symmetric under inversion, so both give the same image.
    torch.testing.assert_close(inverted, plain, atol=1e-5, rtol=0)
    assert torch.equal(target_1["boxes"], target_2["boxes"])


def test_default_source_sizes_are_realistic_and_varied():
    dataset = SyntheticChestXrayDataset(seed=2, num_images=3, image_size=32)
    sizes = [dataset[i][1]["orig_size"] for i in range(3)]
    for rows, cols in sizes:
        assert 512 <= rows <= 1024 and 0.8 <= cols / rows <= 1.2
    assert len(set(sizes)) == 3


def test_positive_fraction_is_roughly_honoured():
    def positives(fraction):
        dataset = SyntheticChestXrayDataset(
            seed=21, num_images=40, image_size=32, positive_fraction=fraction, source_size=(64, 64)
        )
        return sum(len(target["boxes"]) > 0 for _, target in dataset)

    assert 16 <= positives(0.6) <= 32  # Binomial(40, 0.6): mean 24, sd 3.1
    assert positives(0.0) == 0
    assert positives(1.0) == 40


def test_collate_keeps_lists():
    dataset = SyntheticChestXrayDataset(seed=1, num_images=2, **SMALL)
    images, targets = collate_detection([dataset[0], dataset[1]])
    assert [image.shape for image in images] == [(1, 48, 36)] * 2
    assert [target["image_id"] for target in targets] == [0, 1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"seed": -1}, "seed must be >= 0"),
        ({"num_images": -2}, "num_images must be >= 0"),
        ({"image_size": 0}, "image_size must be >= 1"),
        ({"positive_fraction": 1.5}, r"positive_fraction must be in \[0, 1\]"),
        ({"source_size": (64,)}, "source_size must be"),
    ],
)
def test_invalid_arguments_are_rejected(overrides, message):
    arguments = {"seed": 0, "num_images": 1, "image_size": 32, **overrides}
    with pytest.raises(ValueError, match=message):
        SyntheticChestXrayDataset(**arguments)


def test_out_of_range_index_raises():
    dataset = SyntheticChestXrayDataset(seed=0, num_images=1, **SMALL)
    for index in (1, -1):
        with pytest.raises(IndexError, match=f"index {index} out of range for 1 images"):
            dataset[index]
