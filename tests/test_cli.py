"""The medtwin command line: every subcommand has help; job flags are validated before any graph."""

import apache_beam as beam
import pytest

from pipelines.cli import SUBCOMMAND_MODULES, build_parser, main
from pipelines.config import JobConfig
from pipelines.graph import build_pipeline


COMMANDS = ["simulate", "run", "query", "report", "train", "evaluate", "backfill", "launch", "publish", "train-risk",
            "backtest"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert command in capsys.readouterr().out


def test_the_parser_knows_every_module_and_each_module_one_command():
    subparsers = next(action for action in build_parser()._actions if action.choices and "run" in action.choices)
    assert sorted(subparsers.choices) == sorted(COMMANDS)
    assert len(SUBCOMMAND_MODULES) == len(COMMANDS)


@pytest.mark.parametrize("argv, message", [
    (["run", "--demo"], "--source files needs --input DIR"),
    (["run", "--input", "x", "--demo", "--source", "pubsub", "--streaming"], "needs at least one --pubsub_"),
    (["run", "--input", "x", "--demo", "--source", "replay"], "is unbounded: add --streaming"),
    (["run", "--demo", "--streaming", "--source", "pubsub", "--pubsub_wearables", "s"],
     "reads DICOM files from elsewhere: name where with --dicom_allowed_prefixes"),
    (["run", "--input", "x", "--demo", "--weights", "none.safetensors"], "--weights none.safetensors: no such file"),
    (["run", "--input", "x"], "no pseudonymisation key"),
    (["launch", "--input", "x", "--demo", "--engine", "dataflow", "--project", "p", "--region", "r",
      "--temp_location", "/tmp"], "must be a gs:// path"),
    (["backfill", "--input", "x", "--demo", "--start", "2026-03-02", "--end", "2026-03-01"], "is before --start"),
])
def test_conflicting_job_flags_are_refused_with_a_reason(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("MEDTWIN_PSEUDONYM_KEY", raising=False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def _job_config(argv):
    args, _ = build_parser().parse_known_args(argv)
    return JobConfig.from_args(args)


def test_imaging_defaults_follow_the_input_the_weights_and_the_mode(tmp_path):
    batch = _job_config(["run", "--input", str(tmp_path), "--demo"]).imaging
    assert batch.read.allowed_prefixes == (str(tmp_path),)
    assert batch.read.target_size == 256  # from cascade_tiny.json
    assert batch.inference.max_batch_duration_secs is None and batch.inference.accelerator_hint is None
    streaming = _job_config(["run", "--input", str(tmp_path), "--demo", "--streaming", "--source", "watch",
                             "--inference_max_wait", "2", "--dicom_allowed_prefixes", "gs://pacs/cxr"]).imaging
    assert streaming.inference.max_batch_duration_secs == 2
    assert streaming.read.allowed_prefixes == ("gs://pacs/cxr",)
    replay = _job_config(["run", "--input", str(tmp_path), "--demo", "--streaming"]).imaging
    assert replay.inference.max_batch_duration_secs is None  # a replay's clock never fires the flush timer
    assert _job_config(["run", "--input", str(tmp_path), "--demo", "--no_imaging"]).imaging is None


def test_the_graph_has_a_detections_table_unless_imaging_is_off(tmp_path):
    def tables(*flags):
        config = _job_config(["run", "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--demo", *flags])
        return set(build_pipeline(beam.Pipeline(), config))  # built, never run

    assert tables() == {"patient_twin", "device_twin", "detections", "alerts", "dead_letters"}
    assert tables("--no_imaging") == {"patient_twin", "device_twin", "alerts", "dead_letters"}


def test_a_launch_gpu_puts_its_accelerator_on_the_inference_step():
    imaging = _job_config(["launch", "--input", "gs://landing", "--demo", "--engine", "dataflow", "--project", "p",
                           "--region", "r", "--temp_location", "gs://b/tmp", "--gpu", "nvidia-l4"]).imaging
    assert imaging.inference.accelerator_hint == "type:nvidia-l4;count:1;install-nvidia-driver"


def test_unknown_flags_are_beam_options_only_for_pipeline_commands(capsys):
    with pytest.raises(SystemExit):
        main(["query", "out", "--runner", "DataflowRunner"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_dataflow_launch_dry_run_prints_the_engine_flags(capsys):
    assert main(["launch", "--input", "gs://landing", "--demo", "--engine", "dataflow", "--project", "p",
                 "--region", "europe-west4", "--temp_location", "gs://b/tmp", "--gpu", "nvidia-tesla-t4",
                 "--dry_run"]) == 0
    flags = capsys.readouterr().out
    for expected in ("--runner=DataflowRunner", "--setup_file=", "--project=p",
                     "resource hint: accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"):
        assert expected in flags
    assert "worker_accelerator" not in flags  # the GPU is the inference step's hint only (tests/test_launch.py)


def test_backfill_runs_one_job_per_arrival_day(capsys):
    assert main(["backfill", "--input", "x", "--demo", "--start", "2026-03-01", "--end", "2026-03-03",
                 "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[4].rstrip(":") for line in out.splitlines()] == ["2026-03-01", "2026-03-02", "2026-03-03"]
    assert "--job_name=medtwin-2026-03-02" in out
