"""Keys and job flags (issue 13 B11, B12, B19): weak keys refused, the key never in the job graph,
numeric flags refused at start with the flag named."""

import argparse
import base64
import bz2
import os
import pickle
import zlib

import apache_beam as beam
import pytest
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2

from pipelines.config import Bounded, JobConfig, add_job_arguments
from pipelines.graph import build_pipeline
from transforms.pseudonymise import (
    DEMO_KEY,
    KEY_ENV,
    KeyReference,
    MissingKeyError,
    Pseudonymiser,
    check_key_strength,
    resolve_key,
    resolve_key_reference,
)

STRONG_KEY = "b12-9f3c2a71d5e84b06a1c7"


def _parser():
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_job_arguments(parser)
    return parser


# ------------------------------------------------------------------ B11: weak keys


@pytest.mark.parametrize("key", [" " * 16, "0" * 16, DEMO_KEY, DEMO_KEY + "-2026", "abababababababab",
                                 "aaaaaaaabbbbbbbbcccccccc", "short"])
def test_b11_weak_keys_are_refused_outside_the_demo(monkeypatch, key):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(MissingKeyError, match="the pseudonymisation key"):
        resolve_key(key, demo=False)
    monkeypatch.setenv(KEY_ENV, key)
    with pytest.raises(MissingKeyError):
        resolve_key(None, demo=False)
    assert resolve_key(key, demo=True) == key  # synthetic data: allowed, with a warning


def test_b11_a_weak_key_is_refused_by_the_cli_with_a_clear_message(monkeypatch, capsys):
    from pipelines.cli import main

    monkeypatch.delenv(KEY_ENV, raising=False)
    assert main(["run", "--input", "x", "--no_imaging", "--pseudonym_key", "0000000000000000"]) != 0
    assert "too predictable" in capsys.readouterr().err


@pytest.mark.parametrize("key", [STRONG_KEY, "test-key-0123456789", os.urandom(24).hex()])
def test_strong_keys_are_accepted(key):
    assert check_key_strength(key, demo=False) == key


def test_a_key_file_reference_is_read_and_checked_at_start(tmp_path):
    good, weak = tmp_path / "key", tmp_path / "weak"
    good.write_text(STRONG_KEY + "\n")
    weak.write_text("0" * 16 + "\n")
    reference = resolve_key_reference(None, demo=False, key_file=str(good))
    assert reference == KeyReference("file", str(good)) and reference.load() == STRONG_KEY
    with pytest.raises(MissingKeyError, match="too predictable"):
        resolve_key_reference(None, demo=False, key_file=str(weak))
    with pytest.raises(MissingKeyError, match="not set"):
        KeyReference("env", "MEDTWIN_NO_SUCH_VARIABLE").load()


# ------------------------------------------------------------------ B12: the key is not in the job graph


def _unwrapped(payload: bytes) -> bytes:
    """A pickled-function payload as Beam's pickler writes it (base64 of bz2 or zlib) -> the pickle itself."""
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError:
        return payload
    for decompress in (bz2.decompress, zlib.decompress):
        try:
            return decompress(data)
        except (OSError, ValueError, zlib.error):
            continue
    return data


def _pickled_payloads(pipeline: beam.Pipeline) -> list[bytes]:
    """Every pickled DoFn / CombineFn / source in the pipeline proto, decoded the way a worker would."""
    proto = pipeline.to_runner_api()
    found = []
    for transform in proto.components.transforms.values():
        spec = transform.spec
        if spec.urn == common_urns.primitives.PAR_DO.urn:
            payload = beam_runner_api_pb2.ParDoPayload.FromString(spec.payload).do_fn.payload
        elif spec.urn == common_urns.composites.COMBINE_PER_KEY.urn:
            payload = beam_runner_api_pb2.CombinePayload.FromString(spec.payload).combine_fn.payload
        else:
            payload = spec.payload
        found.append(_unwrapped(payload))
    found.append(proto.SerializeToString())
    return found


class _HoldsAKey(beam.DoFn):
    def __init__(self, key):
        self.key = key

    def process(self, element):
        yield element


def test_the_graph_scan_finds_a_key_held_by_a_step():
    pipeline = beam.Pipeline()
    _ = pipeline | beam.Create([1]) | beam.ParDo(_HoldsAKey(STRONG_KEY))
    assert any(STRONG_KEY.encode() in payload for payload in _pickled_payloads(pipeline))


def test_b12_the_key_never_enters_the_pipeline_graph(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    args = _parser().parse_args(["--input", "/nonexistent", "--no_imaging", "--pseudonym_key", STRONG_KEY])
    config = JobConfig.from_args(args)
    assert config.key_reference == KeyReference("env", KEY_ENV)  # the launcher hands it to local workers by env
    pipeline = beam.Pipeline()
    build_pipeline(pipeline, config)
    payloads = _pickled_payloads(pipeline)
    assert len(payloads) > 20  # every step was looked at, decoders included
    assert any(b"DecodeWearablesFn" in p for p in payloads)
    for payload in payloads:
        assert STRONG_KEY.encode() not in payload
        assert base64.b64encode(STRONG_KEY.encode())[:16] not in payload


def test_b12_workers_load_the_key_in_setup_from_the_reference(monkeypatch):
    from transforms.decode import DecodeObservationsFn

    monkeypatch.setenv("MEDTWIN_B12_KEY", STRONG_KEY)
    fn = pickle.loads(pickle.dumps(DecodeObservationsFn(Pseudonymiser.from_reference(
        KeyReference("env", "MEDTWIN_B12_KEY")))))
    fn.setup()
    assert fn._pseudonymiser.patient_key("MRN-1") == Pseudonymiser(STRONG_KEY).patient_key("MRN-1")
    monkeypatch.setenv("MEDTWIN_B12_KEY", "0" * 16)
    weak = pickle.loads(pickle.dumps(DecodeObservationsFn(Pseudonymiser.from_reference(
        KeyReference("env", "MEDTWIN_B12_KEY")))))
    with pytest.raises(MissingKeyError):
        weak.setup()


# ------------------------------------------------------------------ B19: numeric flags validated at start


@pytest.mark.parametrize("flag, value", [
    ("--expected_sample_seconds", "0"), ("--expected_sample_seconds", "nan"), ("--expected_sample_seconds", "-5"),
    ("--service_interval_days", "0"), ("--service_interval_days", "inf"),
    ("--window", "1000000000000"), ("--window", "0"), ("--window", "-60"), ("--window", "1.5"),
    ("--allowed_lateness", "-1"), ("--device_window", "0"), ("--device_allowed_lateness", "99999999999"),
    ("--early_firing", "0"), ("--gate_tick", "0"), ("--stale_after", "0"), ("--replay_step", "0"),
    ("--replay_watermark_lag", "-1"), ("--inference_batch_size", "0"), ("--inference_max_wait", "0"),
    ("--score_threshold", "1.5"), ("--positive_probability", "-0.1"), ("--triage_window", "0"),
])
def test_b19_out_of_range_flags_are_refused_at_start_naming_the_flag(flag, value):
    with pytest.raises(argparse.ArgumentError) as error:
        _parser().parse_args([f"{flag}={value}"])
    assert flag in str(error.value) and ("must be" in str(error.value) or "is not" in str(error.value))


def test_b19_every_numeric_job_flag_has_a_range():
    parser = _parser()
    numeric = [action for action in parser._actions if action.type not in (None, str)]
    assert {a.dest for a in numeric} >= {"window", "expected_sample_seconds", "service_interval_days", "gate_tick"}
    for action in numeric:
        assert isinstance(action.type, Bounded), action.option_strings
        if action.default is not None:   # None: an optional flag, off unless given
            assert action.type(str(action.default)) == action.default  # every default is inside its range


def test_a_key_given_as_a_value_does_not_outlive_its_command(monkeypatch, tmp_path):
    """The key reaches in-process workers through the environment only while its command runs: the
    next in-process command (a test's, a notebook's) must not pseudonymise with it."""
    from pipelines.cli import main

    monkeypatch.delenv(KEY_ENV, raising=False)
    (tmp_path / "in").mkdir()
    assert main(["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no_imaging",
                 "--pseudonym_key", STRONG_KEY]) == 0
    assert KEY_ENV not in os.environ
    monkeypatch.setenv(KEY_ENV, "the-operators-own-key-2a9f")
    assert main(["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out2"), "--no_imaging",
                 "--pseudonym_key", STRONG_KEY]) == 0
    assert os.environ[KEY_ENV] == "the-operators-own-key-2a9f"
