"""Hot model swap, the part that is built: a new checkpoint replaces the running model only once it
passes its checks, and every row names the model that scored it.

`CascadeModelHandler.update_model_path` is what RunInference calls when its model-update side
input (`--model_watch` → Beam's `WatchFilePattern`) brings a new file. Here the side input is a
bounded `ModelMetadata` on the DirectRunner, so the real RunInference → update_model_path →
load_model path runs; what a streaming runner adds (the file watch, the swap mid-stream, re-scoring
the last hours into a `rescored` table) is not built yet: Prism 2.77 refuses triggered side inputs
in the global window (apache/beam#31438) - see README, "Hot model swap".
"""

from __future__ import annotations

import json
import shutil

import apache_beam as beam
import pytest
import torch
from apache_beam.ml.inference.base import ModelMetadata
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from test_detect import WEIGHTS, cpu_config, synthetic_case

from model.checkpoint import load_detector, save_detector
from transforms.detect import CascadeModelHandler, DetectOpacities, checkpoint_problem, read_model_info

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"v1": shipped, "v2": retrained (weights nudged, re-saved: a new version), "tampered": v2's JSON
    naming v1's version}."""
    root = tmp_path_factory.mktemp("checkpoints")
    loaded = load_detector(WEIGHTS)
    with torch.no_grad():
        for parameter in list(loaded.model.parameters())[-2:]:  # the last layer: boxes move a little
            parameter.add_(0.05)
    v2 = root / "cascade_v2.safetensors"
    save_detector(loaded.model, loaded.config, loaded.arch, v2)
    tampered = root / "cascade_tampered.safetensors"
    shutil.copy(v2, tampered)
    metadata = json.loads(v2.with_suffix(".json").read_text())
    tampered.with_suffix(".json").write_text(json.dumps({**metadata, "version": read_model_info(WEIGHTS).version,
                                                         "weights_file": tampered.name}))
    return {"v1": WEIGHTS, "v2": str(v2), "tampered": str(tampered)}


def test_only_checked_checkpoints_replace_the_model(checkpoints, tmp_path):
    size = read_model_info(WEIGHTS).input_size
    assert checkpoint_problem(checkpoints["v2"], size) is None
    assert "ValueError" in checkpoint_problem(checkpoints["tampered"], size)
    assert "input size" in checkpoint_problem(checkpoints["v2"], size * 2)
    assert checkpoint_problem(str(tmp_path / "absent.safetensors"), size) is not None
    (tmp_path / "model.pt").write_bytes(b"\x80\x04")
    assert checkpoint_problem(str(tmp_path / "model.pt"), size) == "not a .safetensors checkpoint"

    handler = CascadeModelHandler(cpu_config())
    v1 = handler.model_id
    handler.update_model_path(checkpoints["tampered"])
    assert handler.model_id == v1 and handler.load_model().version == read_model_info(WEIGHTS).version
    handler.update_model_path(checkpoints["v2"])
    v2 = read_model_info(checkpoints["v2"]).version
    assert handler.model_id.endswith("@" + v2) and v2 != read_model_info(WEIGHTS).version
    assert handler.load_model().version == v2


@pytest.mark.parametrize("update, expected", [("v2", "v2"), ("tampered", "v1")])
def test_rows_name_the_model_runinference_swapped_in(checkpoints, update, expected):
    studies = [synthetic_case(i)[0] for i in range(3)]
    version = read_model_info(checkpoints[expected]).version
    with TestPipeline() as pipeline:
        updates = pipeline | "Update" >> beam.Create([ModelMetadata(model_id=checkpoints[update],
                                                                    model_name=update)])
        images = pipeline | "Images" >> beam.Create(studies)
        found = images | DetectOpacities(cpu_config(), model_updates=updates)
        assert_that(found["detections"] | beam.Map(lambda row: (row["sop_instance_uid"], row["model_version"])),
                    equal_to([(s.reference["sop_instance_uid"], version) for s in studies]))
        assert_that(found["dead_letters"], equal_to([]), label="NoDeadLetters")
