"""tf.Transform features (transforms/features.py): analysed over history, applied in batch and streaming.

One small simulated hospital is run in batch; its twin tables are the history. The analysis job runs
on the DirectRunner, Prism and Flink (the session's job services, tests/conftest.py); the statistics
each applies are compared with numpy over the same final rows, in batch on all three, in streaming
on the DirectRunner (a TestStream) and through `medtwin run --streaming` on Prism and Flink.
"""

import datetime as dt
import json
import os
import shutil

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to

from launch.runners import runner_args as launch_runner_args
from pipelines.cli import main
from pipelines.query import connect
from transforms import features as F
from transforms.dead_letters import DEAD_LETTERS


def runner_args(runner: str, endpoints: dict) -> list[str]:
    """Beam flags for a job on `runner` through the session's job services (none for the DirectRunner),
    as `medtwin run --runner` gives them."""
    if runner == "direct":
        return []
    endpoint = [f"--job_endpoint={endpoints[runner]}"]
    return launch_runner_args(runner, endpoint) + endpoint


@pytest.fixture(scope="session")
def history(tmp_path_factory):
    root = tmp_path_factory.mktemp("feature-history")
    assert main(["simulate", "--out", str(root / "h"), "--patients", "4", "--devices", "4", "--hours", "2",
                 "--seed", "21"]) == 0
    assert main(["run", "--input", str(root / "h"), "--output", str(root / "out"), "--demo", "--no_imaging"]) == 0
    return str(root / "out")


@pytest.fixture(scope="session")
def artifacts(history, job_endpoints, tmp_path_factory):
    """{runner: path}: the same history analysed on each runner of the matrix."""
    root = tmp_path_factory.mktemp("features")
    return {runner: F.analyse_history([history], str(root / runner), runner_args(runner, job_endpoints))
            for runner in ("direct", "prism", "flink")}


def _final_rows(history: str, table: str) -> list[dict]:
    connection = connect(history)
    cursor = connection.execute(f"select * exclude (date) from {table} where is_final order by all")
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, values)) for values in cursor.fetchall()]
    for row in rows:
        for name in ("window_start", "window_end"):
            row[name] = row[name].astimezone(dt.timezone.utc)
    return rows


def _complete(subject: str, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    pairs = [(row, F.raw_inputs(subject, row)) for row in rows]
    return [r for r, x in pairs if x is not None], [x for _, x in pairs if x is not None]


@pytest.mark.parametrize("runner", ("prism", "flink"))
def test_analysis_on_a_real_runner_gives_the_same_version_as_on_the_direct_runner(artifacts, runner):
    assert artifacts["direct"].rsplit("/", 1)[-1] == artifacts[runner].rsplit("/", 1)[-1]
    assert F.FeatureArtifact(artifacts[runner]).version.startswith("feat-")


@pytest.mark.parametrize("runner", ("direct", "prism", "flink"))
def test_patient_z_scores_and_deciles_equal_numpy_over_the_history(history, artifacts, runner):
    rows, inputs = _complete("patient", _final_rows(history, "patient_twin"))
    assert len(rows) > 100, "too little history to compare"
    artifact = F.FeatureArtifact(artifacts[runner])
    applied = artifact.transform("patient", inputs)
    names = artifact.names("patient")
    for name in (*F.PATIENT_VITALS, *F.PATIENT_TRENDS, "news2_score"):
        x = np.array([row[name] for row in rows], np.float64)
        np.testing.assert_allclose(applied[:, names.index(f"{name}_z")], (x - x.mean()) / x.std(),
                                   rtol=1e-3, atol=1e-3, err_msg=name)
        if name == "news2_score":
            continue
        boundaries = np.quantile(x, np.arange(1, F.QUANTILE_BUCKETS) / F.QUANTILE_BUCKETS)
        expected = np.searchsorted(boundaries, x, side="right")
        got = np.rint(applied[:, names.index(f"{name}_q")] * (F.QUANTILE_BUCKETS - 1)).astype(int)
        # tf.Transform's quantiles are an approximate sketch: values next to a boundary may fall either side.
        assert np.abs(got - expected).max() <= 1, name
        assert (got == expected).mean() >= 0.9, name


@pytest.mark.parametrize("runner", ("direct", "prism", "flink"))
def test_device_z_scores_per_model_rates_and_error_vocabulary_equal_numpy(history, artifacts, runner):
    rows, inputs = _complete("device", _final_rows(history, "device_twin"))
    assert len(rows) > 20, "too little history to compare"
    artifact = F.FeatureArtifact(artifacts[runner])
    applied = artifact.transform("device", inputs)
    names = artifact.names("device")
    models = np.array([row["device_model"] or "unknown" for row in rows])
    assert len(set(models)) > 1, "one device model only: per-model statistics not exercised"
    hours = np.array([(r["window_end"] - r["window_start"]).total_seconds() / 3600 for r in rows])
    raw = {"tube_temperature_max": np.array([r["tube_temperature_max"] for r in rows], np.float64),
           **{rate: np.array([r[count] for r in rows], np.float64) / hours
              for rate, count in F.DEVICE_RATES.items()}}
    for name, x in raw.items():
        expected = np.empty_like(x)
        for model in set(models):
            group = x[models == model]
            std = group.std()
            expected[models == model] = (group - group.mean()) / std if std > 0 else group - group.mean()
        np.testing.assert_allclose(applied[:, names.index(f"{name}_z")], expected, rtol=1e-3, atol=1e-3,
                                   err_msg=name)
    codes = [item["code"] for r in rows for item in (r["error_counts"] or []) for _ in range(item["count"])]
    assert codes, "no error codes in history: vocabulary not exercised"
    vocabulary = [v.decode() for v in F.tft_output(artifacts[runner], "device").vocabulary_by_name(
        F.ERROR_CODES_VOCABULARY)]
    assert sorted(vocabulary) == sorted(set(codes))
    frequencies = [codes.count(code) for code in vocabulary]
    assert frequencies == sorted(frequencies, reverse=True)   # tf.Transform orders by frequency
    for row, vector in zip(rows, applied):
        counts = vector[names.index("error_code_0"):]
        expected = np.zeros(len(vocabulary) + F.OOV_BUCKETS)
        for item in row["error_counts"] or []:
            expected[vocabulary.index(item["code"])] += item["count"]
        np.testing.assert_array_equal(counts, expected)


def _close_to(expected):
    """assert_that matcher: the same (key, window, version) summaries, vectors within float32 noise (a
    batch of other rows can change the last bits)."""
    def match(actual):
        actual, wanted = sorted(actual, key=lambda s: s[:3]), sorted(expected, key=lambda s: s[:3])
        assert [s[:3] for s in actual] == [s[:3] for s in wanted]
        for got, want in zip(actual, wanted):
            assert (got[3] is None) == (want[3] is None), got[:3]
            if got[3] is not None:
                np.testing.assert_allclose(got[3], want[3], rtol=1e-4, atol=1e-4, err_msg=str(got[:3]))
    return match


def _apply(subject, rows, artifact_path, beam_args, streaming=False):
    """ApplyFeatures over `rows` in a pipeline -> (sorted (key, window_start, version, vector) list, dead letters)."""
    key = F.KEYS[subject]

    def summary(pair):
        row, vector = pair
        return (row[key], row["window_start"].isoformat(), row.get("features_version"),
                None if vector is None else tuple(vector.tolist()))

    options = PipelineOptions(beam_args)
    options.view_as(StandardOptions).streaming = streaming
    return summary, options


@pytest.mark.parametrize("runner", ("direct", "prism", "flink"))
def test_batch_pipeline_applies_the_artifact_and_names_its_version(history, artifacts, job_endpoints, runner):
    rows = _final_rows(history, "patient_twin")[:300]
    artifact = F.FeatureArtifact(artifacts["direct"])
    complete, inputs = _complete("patient", rows)
    vectors = artifact.transform("patient", inputs)
    summary, options = _apply("patient", rows, artifacts[runner], runner_args(runner, job_endpoints))
    expected = [summary(({**row, "features_version": artifact.version}, vector))
                for row, vector in zip(complete, vectors)]
    expected += [summary((row, None)) for row in rows if F.raw_inputs("patient", row) is None]
    with beam.Pipeline(options=options) as pipeline:
        out = pipeline | beam.Create(rows) | F.ApplyFeatures("patient", artifacts[runner])
        assert_that(out["featured"] | beam.Map(summary), _close_to(expected))
        assert_that(out[DEAD_LETTERS], equal_to([]), label="NoDeadLetters")


def test_streaming_pipeline_applies_the_same_features(history, artifacts):
    rows = _final_rows(history, "device_twin")
    artifact = F.FeatureArtifact(artifacts["direct"])
    complete, inputs = _complete("device", rows)
    vectors = artifact.transform("device", inputs)
    summary, options = _apply("device", rows, artifacts["direct"], [], streaming=True)
    expected = [summary(({**row, "features_version": artifact.version}, vector))
                for row, vector in zip(complete, vectors)]
    expected += [summary((row, None)) for row in rows if F.raw_inputs("device", row) is None]
    stream = TestStream()
    for row in sorted(rows, key=lambda r: r["window_end"]):
        stream = stream.add_elements([beam.window.TimestampedValue(row, row["window_end"].timestamp())])
    stream = stream.advance_watermark_to_infinity()
    with beam.Pipeline(options=options) as pipeline:
        out = pipeline | stream | F.ApplyFeatures("device", artifacts["direct"])
        assert_that(out["featured"] | beam.Map(summary), _close_to(expected))


def test_a_row_whose_features_fail_is_a_dead_letter_and_passes_on_unfeatured(history, artifacts):
    rows = _complete("patient", _final_rows(history, "patient_twin"))[0][:5]
    broken = {**rows[0], "heart_rate_mean": float("inf")}
    with beam.Pipeline() as pipeline:
        out = pipeline | beam.Create([broken, *rows[1:]]) | F.ApplyFeatures("patient", artifacts["direct"])
        assert_that(out["featured"] | beam.Map(lambda pair: (pair[0]["window_start"], pair[1] is None,
                                                             pair[0].get("features_version") is not None)),
                    equal_to([(broken["window_start"], True, False)]
                             + [(r["window_start"], False, True) for r in rows[1:]]))
        assert_that(out[DEAD_LETTERS] | beam.Map(lambda d: (d["stage"], d["reason"], d["record_count"])),
                    equal_to([("features_patient", "feature transform failed: ValueError", 1)]), label="Dead")


@pytest.fixture(scope="session")
def models_folder(history, artifacts, tmp_path_factory):
    """A `medtwin train-risk`-shaped folder: both risk models trained on the history's featured rows."""
    from model import risk
    from pipelines.train_risk import truth

    folder = tmp_path_factory.mktemp("risk-models")
    artifact = F.FeatureArtifact(artifacts["direct"])
    facts = truth(history.rsplit("/", 1)[0] + "/h")
    for subject in F.SUBJECTS:
        rows, inputs = _complete(subject, _final_rows(history, f"{subject}_twin"))
        x = artifact.transform(subject, inputs)
        key = F.KEYS[subject]
        events = facts["failures"] if subject == "device" else {k: v[0] for k, v in facts["deterioration"].items()}
        y = [int(r[key] in events and r["window_end"] + dt.timedelta(hours=1) >= events[r[key]]) for r in rows]
        if len(set(y)) < 2:   # a hospital this small may lack an event: any two classes will do here
            y = [int(i % 2) for i in range(len(rows))]
        risk.save(risk.train(x, np.array(y)), str(folder / f"{subject}_risk.safetensors"),
                  {"subject": subject, "feature_names": list(artifact.names(subject)),
                   "features_version": artifact.version, "threshold": 0.5, "horizon_hours": 1.0,
                   "train_seeds": [21], "validation_seeds": []})
    (folder / risk.TRAINING_REPORT).write_text(json.dumps({
        "features": os.path.relpath(artifacts["direct"], folder), "features_version": artifact.version,
        "train_seeds": [21], "validation_seeds": []}))
    return str(folder)


@pytest.fixture(scope="session")
def scored_batch(history, models_folder, tmp_path_factory):
    """The batch run (`pipelines.backtest.run_seed`: ``--risk_models``) over the history's hospital."""
    from pipelines.backtest import run_seed

    out = str(tmp_path_factory.mktemp("scored-batch") / "out")
    run_seed(history.rsplit("/", 1)[0] + "/h", out, models_folder)
    return out


def test_the_twin_pipeline_with_learned_models_names_versions_and_scores_every_featured_row(
        artifacts, models_folder, scored_batch):
    """Every featured twin row names the artifact and model versions, and its risk equals the model
    applied to the artifact's features outside Beam."""
    from model import risk
    from pipelines.train_risk import final_rows

    artifact = F.FeatureArtifact(artifacts["direct"])
    for subject in F.SUBJECTS:
        module, metadata = risk.load(f"{models_folder}/{subject}_risk.safetensors")
        rows = final_rows(scored_batch, f"{subject}_twin")
        complete, inputs = _complete(subject, rows)
        assert complete and all(r["features_version"] == artifact.version for r in complete)
        assert all(r["risk_model_version"] == metadata["model_version"] for r in complete)
        column = risk.RISK_COLUMNS[subject]
        np.testing.assert_allclose([r[column] for r in complete],
                                   risk.predict(module, artifact.transform(subject, inputs)), atol=1e-4)
        assert all(r[column] is None and r["features_version"] is None for r in rows
                   if F.raw_inputs(subject, r) is None)


def _scores(out: str, subject: str) -> list:
    from model.risk import RISK_COLUMNS

    key = F.KEYS[subject]
    rows = connect(out).execute(
        f"select {key}, window_start, features_version, risk_model_version, {RISK_COLUMNS[subject]} "
        f"from {subject}_twin where is_final order by all").fetchall()
    return [(*row[:4], None if row[4] is None else round(row[4], 4)) for row in rows]


@pytest.mark.parametrize("runner", ("prism", "flink"))
def test_medtwin_run_streaming_with_risk_models_scores_as_the_batch_run(
        history, models_folder, scored_batch, job_endpoints, runner, tmp_path):
    """`medtwin run --streaming --risk_models` on a real runner: every final twin row carries the same
    versions and risk as the batch run's, and the learned alerts are the same."""
    out = str(tmp_path / "out")
    assert main(["run", "--streaming", "--input", history.rsplit("/", 1)[0] + "/h", "--output", out, "--demo",
                 "--no_imaging", "--risk_models", models_folder, "--runner", runner,
                 f"--job_endpoint={job_endpoints[runner]}", "--model_per_process"]) == 0
    for subject in F.SUBJECTS:
        expected = _scores(scored_batch, subject)
        assert any(row[4] is not None for row in expected), subject
        assert _scores(out, subject) == expected, subject
    from model.risk import ALERT_KINDS

    kinds = ", ".join(f"'{kind}'" for kind in ALERT_KINDS.values())
    learned = f"select subject_id, kind, onset_time from alerts where kind in ({kinds}) order by all"
    assert connect(out).execute(learned).fetchall() == connect(scored_batch).execute(learned).fetchall()


def test_risk_models_that_are_not_a_train_risk_folder_are_refused_at_launch(models_folder, tmp_path):
    from model.risk import read_models_folder

    assert read_models_folder(models_folder).models.keys() == set(F.SUBJECTS)
    with pytest.raises(ValueError, match="not a folder written by medtwin train-risk"):
        read_models_folder(str(tmp_path))
    copy = tmp_path / "copy"
    shutil.copytree(models_folder, copy)
    report = json.loads((copy / "training.json").read_text())
    report["features"] = os.path.join(models_folder, report["features"])   # absolute: the copy lies elsewhere
    (copy / "training.json").write_text(json.dumps({**report, "features_version": "another"}))
    with pytest.raises(ValueError, match="was trained on features"):
        read_models_folder(str(copy))
    assert main(["run", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--demo", "--no_imaging",
                 "--risk_models", str(tmp_path)]) == 2
