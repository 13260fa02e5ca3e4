"""The runner matrix's hospital and its runs: one small simulated hospital, each (runner, mode) run once.

`RunnerMatrix` simulates the hospital when built and runs a (runner, mode) job the first time a
test asks for its output folder, so a session that needs only some cells (tests/test_flink_cluster.py
needs the DirectRunner's batch tables) pays only for those. The session fixture is ``matrix``
(tests/conftest.py).
"""

import datetime as dt
import json
from pathlib import Path

from pipelines.cli import main

RUNNERS = ("direct", "prism", "flink")
MODES = ("batch", "streaming")

# One patient's uploads are cut out of this span: a real sensor silence mid-run (one stale alert).
SILENCE = (dt.datetime(2026, 3, 2, 6, 20, tzinfo=dt.timezone.utc), dt.datetime(2026, 3, 2, 6, 45, tzinfo=dt.timezone.utc))


def silence_one_wearable(hospital: Path, silence: tuple) -> None:
    """Drops one patient's uploads in `silence` (start, end); the simulator's corrupt lines stay."""
    files = sorted((hospital / "wearables").rglob("*.jsonl"))
    first = json.loads(files[0].read_text().splitlines()[0])["patient_id"]
    for path in files:
        kept = []
        for line in path.read_text().splitlines():
            try:
                upload = json.loads(line)
                uploaded = dt.datetime.fromisoformat(upload["upload_time"].replace("Z", "+00:00"))
                if upload["patient_id"] == first and silence[0] <= uploaded < silence[1]:
                    continue
            except (ValueError, KeyError, TypeError, AttributeError):
                pass
            kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))


class RunnerMatrix:
    """``matrix[runner, mode]`` -> the output folder of `medtwin run` on the matrix hospital (`hospital`)."""

    def __init__(self, root: Path, job_endpoints: dict):
        self.root = root
        self.hospital = root / "in"
        self._endpoints = job_endpoints
        self._outputs = {}
        assert main(["simulate", "--out", str(self.hospital), "--patients", "6", "--devices", "2", "--hours", "1",
                     "--seed", "7", "--corrupt-fraction", "0.01"]) == 0
        silence_one_wearable(self.hospital, SILENCE)

    def __getitem__(self, cell: tuple[str, str]) -> Path:
        if cell not in self._outputs:
            runner, mode = cell
            out = self.root / f"{runner}-{mode}"
            argv = ["run", "--input", str(self.hospital), "--output", str(out), "--demo", "--runner", runner,
                    "--model_per_process"]
            if mode == "streaming":
                argv.append("--streaming")
            if runner in self._endpoints:
                argv.append(f"--job_endpoint={self._endpoints[runner]}")
            assert main(argv) == 0, cell
            self._outputs[cell] = out
        return self._outputs[cell]
