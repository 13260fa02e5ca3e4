"""bench/scale.py on a tiny hospital on the DirectRunner: the table's columns and consistent figures."""

import json
import subprocess
import sys
from pathlib import Path

from bench.scale import COLUMNS

ROOT = Path(__file__).resolve().parent.parent


def test_scale_bench_prints_one_row_per_size_with_positive_consistent_figures(tmp_path):
    rows_file = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--sizes", "3", "6", "--minutes", "3",
                           "--runner", "direct", "--modes", "batch", "--json", str(rows_file)],
                          capture_output=True, text=True, timeout=600, check=True)
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["runner", "mode", *COLUMNS]
    assert "growth from the smallest size" in done.stdout
    rows = json.loads(rows_file.read_text())
    assert [(row["runner"], row["mode"], row["patients"]) for row in rows] == [("direct", "batch", 3),
                                                                              ("direct", "batch", 6)]
    for row in rows:
        assert all(row[name] > 0 for name in COLUMNS if name != "state_bytes_per_patient"), row
        assert 1 / row["patients"] <= row["max_key_share"] <= 1, row  # the hottest patient: at least a fair share
        # The job is at least a Python interpreter with Beam: tens of MB, not bytes or terabytes.
        assert 50 < row["peak_rss_mb"] < 64 * 1024, row
    assert rows[0]["state_bytes_per_patient"] == rows[0]["peak_rss_mb"] * 2**20 / 3
    # Each table line carries the row's own figures.
    for line, row in zip(lines[1:3], rows):
        assert [float(value) for value in line.split()[2:]] == [float(f"{row[name]:.4g}") for name in COLUMNS]
