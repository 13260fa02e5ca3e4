"""Hostile checkpoints (issue 13 B18): the config a detector is built from travels inside the weights
file, the JSON beside it must agree, and every value is range-checked before anything is built."""

import json
import resource
import shutil

import pytest

from model.checkpoint import read_detector_metadata, load_detector, save_detector
from model.configs import ConfigError, config_from_dict, config_to_dict, get_config
from model.detector import build_detector
from transforms.detect import read_model_info

SHIPPED = "model/weights/cascade_tiny"


@pytest.fixture
def shipped(tmp_path):
    for suffix in (".safetensors", ".json"):
        shutil.copy(SHIPPED + suffix, tmp_path / f"cascade_tiny{suffix}")
    return tmp_path / "cascade_tiny.safetensors"


def _edit_json(weights, **config):
    path = weights.with_suffix(".json")
    metadata = json.loads(path.read_text())
    metadata["config"].update(config)
    path.write_text(json.dumps(metadata))


def _peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_the_shipped_checkpoints_carry_their_config_and_load(shipped):
    loaded = load_detector(shipped)
    assert loaded.version == read_model_info(str(shipped)).version == "ed8b8fe9f0d7"
    assert loaded.config.input_size == 256


def test_a_tampered_input_size_is_refused_with_the_field_and_its_range_before_anything_is_built(shipped):
    _edit_json(shipped, input_size=60000)
    before = _peak_kib()
    with pytest.raises(ConfigError, match=r"input_size must be an integer in 32\.\.2048, got 60000"):
        load_detector(shipped)
    with pytest.raises(ConfigError, match=r"input_size must be an integer in 32\.\.2048, got 60000"):
        read_model_info(str(shipped))  # the launcher, building the job from the JSON, refuses it too
    assert _peak_kib() - before < 200 << 10  # the 60000-px transform never ran (the old code: killed for memory)


def test_a_json_edited_within_the_ranges_is_refused_because_the_weights_file_carries_the_config(shipped):
    _edit_json(shipped, input_size=1024, box_score_thresh=0.9)
    with pytest.raises(ValueError, match="the config in cascade_tiny.json differs from the one in the weights file"):
        load_detector(shipped)


def test_config_values_are_range_checked_even_when_the_json_and_weights_agree(tmp_path):
    config = get_config("tiny", input_size=64, fpn_out_channels=8, representation_size=8)
    path = tmp_path / "m.safetensors"
    save_detector(build_detector(config), config, "cascade", path)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as weights:
        header = weights.metadata()
    forged = header["config"].replace('"input_size":64', '"input_size":60000')
    assert forged != header["config"]
    save_file(load_file(str(path)), str(path), metadata={**header, "config": forged})
    _edit_json(path, input_size=60000)  # a consistent forgery: both sides say 60000
    with pytest.raises(ConfigError, match=r"input_size must be an integer in 32\.\.2048, got 60000"):
        read_detector_metadata(path)
    with pytest.raises(ConfigError, match="input_size"):
        load_detector(path)
    _edit_json(path, input_size=64)  # the JSON put back: the weights file's own copy is still checked
    with pytest.raises(ValueError, match="differs from the one in the weights file"):
        load_detector(path)


@pytest.mark.parametrize("field, value, message", [
    ("input_size", 60000, "input_size must be an integer in 32..2048"),
    ("input_size", 256.0, "input_size must be an integer"),
    ("input_size", True, "input_size must be an integer"),
    ("fpn_out_channels", 1 << 20, "fpn_out_channels must be an integer"),
    ("representation_size", -1, "representation_size must be an integer"),
    ("rpn_post_nms_top_n_test", 10**12, "rpn_post_nms_top_n_test"),
    ("box_detections_per_img", 0, "box_detections_per_img"),
    ("box_score_thresh", float("nan"), "box_score_thresh must be a number"),
    ("rpn_nms_thresh", 7, "rpn_nms_thresh must be a number in"),
    ("anchor_sizes", [16, 32, 64, 10**9], "anchor_sizes values"),
    ("anchor_aspect_ratios", [1.0] * 1000, "anchor_aspect_ratios must be a list of 1 to 8"),
    ("image_std", [0.0], "image_std"),
    ("cascade_iou_thresholds", ["0.5", 0.6, 0.7], "cascade_iou_thresholds values"),
    ("cascade_bbox_reg_weights", [[1e30, 1, 1, 1]] * 3, "cascade_bbox_reg_weights values"),
    ("name", "x" * 10_000, "name must be"),
    ("backbone", ["resnet18"], "backbone must be a string"),
])
def test_every_config_value_is_type_and_range_checked(field, value, message):
    values = {**config_to_dict(get_config("tiny")), field: value}
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config_from_dict(values)


def test_checks_do_not_vanish_under_python_dash_o():
    import subprocess
    import sys

    code = ("from model.configs import get_config\n"
            "try:\n    get_config('tiny', input_size=60000)\nexcept ValueError as e:\n    print('refused', e)\n")
    result = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("refused input_size must be an integer in 32..2048")


def test_a_json_that_is_not_an_object_or_too_deep_is_refused(shipped):
    json_path = shipped.with_suffix(".json")
    json_path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="not valid JSON|is an object"):
        read_detector_metadata(shipped)
    json_path.write_text("[]")
    with pytest.raises(ValueError, match="is an object"):
        read_detector_metadata(shipped)


def test_a_weights_file_without_its_config_is_refused(tmp_path, shipped):
    from safetensors.torch import load_file, save_file

    state = load_file(str(shipped))
    metadata = json.loads(shipped.with_suffix(".json").read_text())
    save_file(state, str(shipped), metadata={"format": "medtwin-detector", "version": metadata["version"],
                                             "arch": "cascade"})
    with pytest.raises(ValueError, match="does not carry its own format, version and config"):
        load_detector(shipped)
