"""bench/telemetry.py at a tiny size: its reference loop and the pipeline count the same records.

The benchmark's ratio only means something if both sides do the same work; this runs both on a
small load (with retried uploads and a few device errors) and checks the counts they report.
"""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "telemetry.py"


@pytest.fixture(scope="module")
def telemetry():
    spec = importlib.util.spec_from_file_location("bench_telemetry", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_and_pipeline_count_the_same_samples_and_device_events(telemetry, tmp_path):
    uploads = telemetry.make_uploads(patients=12, minutes=3, upload_seconds=60, seed=3)
    device_logs = telemetry.make_device_logs(devices=3, minutes=12, seed=3)
    telemetry.land(uploads, tmp_path)
    telemetry.land(device_logs, tmp_path, "device_logs", files=2)
    retried = len(uploads) - len(set(uploads))
    assert retried > 0, "the load must contain retried uploads (duplicates) to check deduplication"

    reference = telemetry.reference(tmp_path)
    pipeline = telemetry.pipeline(tmp_path, ["--direct_num_workers=1"])

    assert reference == pipeline
    assert reference == (12 * 3 * 60, len(device_logs))  # every sample once, duplicates removed; every event


def test_main_prints_the_ratio_and_exits_0_when_the_counts_agree(telemetry, capsys):
    assert telemetry.main(["--patients", "10", "--minutes", "2", "--devices", "2", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("ratio pipeline/reference throughput") == 2
    assert "ratios over 2 pairs: median" in out and "same samples and events counted: True" in out
