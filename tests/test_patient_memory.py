"""Batch patient twin: the samples held at once per patient do not grow with the run's length."""

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline

from tests.test_patient_twin import _config
from transforms.patient_twin import BLOCK_SECONDS, PatientTwin
from twin_fixtures import chunk, create_timestamped, timestamped

KEY = "m" * 32


def _batch_run(hours: int) -> dict:
    """PatientTwin (batch) over `hours` of one patient's 1 Hz samples, uploaded a minute at a time
    -> {"rows": rows out, "<distribution>": (max, count) of each of the fold's held-size distributions}."""
    parts = [chunk(range(minute * 60, minute * 60 + 60)) for minute in range(hours * 60)]
    pipeline = TestPipeline(options=PipelineOptions())
    chunks = pipeline | create_timestamped([timestamped(KEY, part) for part in parts])
    observations = pipeline | "NoObservations" >> create_timestamped([])
    out = {"chunks": chunks, "observations": observations} | PatientTwin(_config(False))
    out["patient_twin"] | beam.combiners.Count.Globally() | beam.Map(_remember_rows, hours)
    result = pipeline.run()
    result.wait_until_finish()
    figures = {"rows": _ROWS[hours]}
    for name in ("batch_block_samples_held", "batch_fold_windows_held"):
        (found,) = result.metrics().query(MetricsFilter().with_namespace("patient_twin").with_name(name))[
            "distributions"]
        figures[name] = (found.committed.max, found.committed.count)
    return figures


_ROWS = {}


def _remember_rows(count, hours):
    """Module-level, so the DirectRunner (same process) records into this very dict."""
    _ROWS[hours] = count


def test_samples_held_per_patient_are_the_same_for_one_hour_and_eight():
    one, eight = _batch_run(1), _batch_run(8)
    assert one["rows"] == 60 and eight["rows"] == 480  # every minute judged, nothing lost
    # At most one patient-hour of samples at once, however long the run: the same figure, not x8.
    assert one["batch_block_samples_held"] == (BLOCK_SECONDS, 1)
    assert eight["batch_block_samples_held"] == (BLOCK_SECONDS, 8)
    # The fold holds the windows' statistics (about 1 KB a window), which do grow with the run.
    assert one["batch_fold_windows_held"] == (60, 1)
    assert eight["batch_fold_windows_held"] == (480, 1)
