"""Synthetic chest radiographs: determinism, value ranges, and honest opacity labels."""

import numpy as np
import pytest

from model import radiograph
from model.radiograph import OPACITY_KINDS, Opacity, SyntheticRadiograph, synthesize_chest_xray


def _twins(seed: int, rows: int, cols: int, num_opacities: int):
    """The same anatomy and noise without and with opacities (the rng draws opacities last)."""
    plain = synthesize_chest_xray(np.random.default_rng(seed), rows=rows, cols=cols)
    sick = synthesize_chest_xray(np.random.default_rng(seed), rows=rows, cols=cols,
                                 num_opacities=num_opacities)
    return plain, sick


def _lung_depth(seed: int, rows: int, cols: int) -> np.ndarray:
    """The lung map the generator drew for this seed (anatomy is the rng's first draw)."""
    anatomy = radiograph._draw_anatomy(np.random.default_rng(seed))
    return radiograph._lung_depth(anatomy, radiograph._Grid.make(anatomy, rows, cols))


def test_same_seed_same_image_and_labels():
    first = synthesize_chest_xray(np.random.default_rng(7), num_opacities=3)
    second = synthesize_chest_xray(np.random.default_rng(7), num_opacities=3)
    other = synthesize_chest_xray(np.random.default_rng(8), num_opacities=3)
    np.testing.assert_array_equal(first.pixels, second.pixels)
    assert first.opacities == second.opacities
    assert not np.array_equal(first.pixels, other.pixels)


@pytest.mark.parametrize("rows, cols, bits", [(512, 512, 12), (512, 448, 16), (200, 320, 10), (96, 80, 8)])
def test_shape_dtype_and_range(rows, cols, bits):
    image = synthesize_chest_xray(np.random.default_rng(rows + cols), rows=rows, cols=cols,
                                  bits_stored=bits, num_opacities=2)
    assert image.pixels.shape == (rows, cols)
    assert image.pixels.dtype == np.uint16
    assert image.bits_stored == bits
    top = 2 ** bits - 1
    assert int(image.pixels.max()) <= top
    # A radiograph, not a flat field: it spans most of the stored range.
    assert int(image.pixels.max()) - int(image.pixels.min()) > 0.7 * top


def test_monochrome2_sense_background_dark_mediastinum_bright():
    image = synthesize_chest_xray(np.random.default_rng(3), rows=256, cols=256).pixels.astype(float)
    corner = image[:20, :20].mean()          # air above the shoulders
    mediastinum = image[110:150, 120:136].mean()
    lung = image[100:140, 50:80].mean()
    assert corner < lung < mediastinum


def test_no_opacities_means_no_boxes():
    image = synthesize_chest_xray(np.random.default_rng(1), rows=128, cols=128)
    assert image.opacities == ()
    assert image.boxes.shape == (0, 4) and image.boxes.dtype == np.float32


def test_boxes_property_matches_opacities():
    image = synthesize_chest_xray(np.random.default_rng(2), rows=256, cols=256, num_opacities=3)
    assert len(image.opacities) == 3
    assert image.boxes.dtype == np.float32
    np.testing.assert_array_equal(image.boxes, np.array([o.box for o in image.opacities], np.float32))
    assert {o.kind for o in image.opacities} <= set(OPACITY_KINDS)


@pytest.mark.parametrize("rows, cols", [(512, 512), (512, 448), (256, 384)])
def test_boxes_inside_image_with_plausible_sizes(rows, cols):
    for seed in range(6):
        image = synthesize_chest_xray(np.random.default_rng(seed), rows=rows, cols=cols, num_opacities=3)
        for x1, y1, x2, y2 in image.boxes:
            assert 0 <= x1 < x2 <= cols and 0 <= y1 < y2 <= rows
            assert 0.05 * cols <= x2 - x1 <= 0.4 * cols


def test_opacities_are_in_the_lungs_and_denser_than_the_same_anatomy_without():
    rows, cols = 320, 288
    gains = {kind: [] for kind in OPACITY_KINDS}
    for seed in range(12):
        plain, sick = _twins(seed, rows, cols, num_opacities=2)
        lung = _lung_depth(seed, rows, cols) > 0
        added = sick.pixels.astype(float) - plain.pixels
        for opacity in sick.opacities:
            x1, y1, x2, y2 = map(int, opacity.box)
            inside = (slice(y1, y2), slice(x1, x2))
            assert lung[inside].mean() > 0.6, f"seed {seed}: box {opacity.box} mostly outside the lungs"
            # Where the image got markedly denser, there is lung (a pixel of detector blur aside).
            strong = added[inside] > 0.5 * added[inside].max()
            assert np.mean(lung[inside][strong]) > 0.95
            gains[opacity.kind].append(added[inside].mean() / 2 ** sick.bits_stored)
        far_from_boxes = np.ones((rows, cols), bool)
        for x1, y1, x2, y2 in sick.boxes.astype(int):
            far_from_boxes[max(0, 2 * y1 - y2):2 * y2 - y1, max(0, 2 * x1 - x2):2 * x2 - x1] = False
        assert np.abs(added[far_from_boxes]).mean() < 0.002 * 2 ** sick.bits_stored
    assert min(gains["ground_glass"]) > 0.02
    assert min(gains["consolidation"]) > 0.05
    assert np.mean(gains["consolidation"]) > 1.5 * np.mean(gains["ground_glass"])


def test_opacities_favour_lower_and_peripheral_zones():
    lower = peripheral = total = 0
    for seed in range(50):
        image = synthesize_chest_xray(np.random.default_rng(seed), rows=192, cols=192, num_opacities=2)
        anatomy = radiograph._draw_anatomy(np.random.default_rng(seed))
        for x1, y1, x2, y2 in image.boxes / 192:
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            lower += cy > (anatomy.apex_y + min(anatomy.dome_y)) / 2
            peripheral += abs(cx - anatomy.midline - anatomy.tilt * (cy - 0.5)) > anatomy.cage / 2
            total += 1
    assert lower / total > 0.6
    assert peripheral / total > 0.6


def test_box_is_tight_around_the_added_density():
    rows, cols = 256, 256
    for seed in range(8):
        plain, sick = _twins(seed, rows, cols, num_opacities=1)
        added = sick.pixels.astype(float) - plain.pixels
        peak = added.max()
        x1, y1, x2, y2 = sick.boxes.astype(int)[0]
        # Every edge of the box runs through real density ...
        edges = (added[y1, x1:x2], added[y2 - 1, x1:x2], added[y1:y2, x1], added[y1:y2, x2 - 1])
        assert all(edge.max() > 0.1 * peak for edge in edges), f"seed {seed}: box not tight"
        # ... and beyond it (two pixels of detector blur aside) there is no dense part left out.
        outside = np.ones((rows, cols), bool)
        outside[max(0, y1 - 2):y2 + 2, max(0, x1 - 2):x2 + 2] = False
        assert added[outside].max() < 0.4 * peak, f"seed {seed}: density outside the box"


def test_invalid_arguments_raise():
    with pytest.raises(ValueError):
        synthesize_chest_xray(np.random.default_rng(0), bits_stored=17)
    with pytest.raises(ValueError):
        synthesize_chest_xray(np.random.default_rng(0), rows=32)


def test_dataclasses_are_frozen():
    image = SyntheticRadiograph(pixels=np.zeros((2, 2), np.uint16), bits_stored=12,
                                opacities=(Opacity(box=(0.0, 0.0, 1.0, 1.0), kind="consolidation"),))
    with pytest.raises(AttributeError):
        image.bits_stored = 16
    np.testing.assert_array_equal(image.boxes, [[0, 0, 1, 1]])
