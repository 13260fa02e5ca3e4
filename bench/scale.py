"""Benchmark: `medtwin run` on simulated hospitals of growing size, batch and streaming, per runner.

For each size, `simulator.simulate` writes a hospital of `--patients` wearers sampling at 1 Hz
for `--minutes`, with X-ray devices in proportion (one per `--patients-per-device`, as 1,000
devices serve 100,000 patients). Each (runner, mode) then runs the whole job on it as a child
process (`medtwin run --demo`), while a sampler reads /proc every 0.2 s:

* samples_per_s: wearable samples written by the simulator / wall seconds of the job;
* cpu_s_per_million: CPU seconds of the job's processes (the child and its descendants, from
  wait4; on Flink also the job server's JVM, from /proc) per million samples;
* peak_rss_mb: the largest sum of resident memory of those processes at one sample;
* state_bytes_per_patient: what each added patient adds to that peak, against the smallest size
  of the same runner and mode ((peak - smallest's peak) / (patients - smallest's patients)); for
  the smallest size, its peak over its patients (an upper bound, mostly the fixed cost of Beam,
  torch and the model): memory per patient, state included, as seen from outside the job;
* max_key_share: the largest patient's share of the wearable samples in the input (the hottest
  patient key of the twin).

Flink runs on the installed job server (`launch.runners.installed_path`), started once per bench
run with an embedded `[local]` cluster, with ``--parallelism=2``; the DirectRunner is the
reference. Figures are printed as a table, one row per size and runner/mode, then the growth
of each figure from the smallest size to each larger one (a ratio; 1.0 = constant).
The defaults are small because the machine they were measured on has 2 shared cores.

    python bench/scale.py                                   # 200 1000 patients x 10 min, direct and flink
    python bench/scale.py --sizes 200 1000 5000 --minutes 30 --runner flink
    python bench/scale.py --sizes 20 --minutes 2 --runner direct --modes batch
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COLUMNS = ("patients", "samples_per_s", "cpu_s_per_million", "peak_rss_mb", "state_bytes_per_patient",
           "max_key_share")
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> tuple[int, float, int] | None:
    """(parent pid, CPU seconds, resident bytes) of a live process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS, int(fields[21]) * _PAGE


def _tree(roots: set[int]) -> dict[int, tuple[int, float, int]]:
    """The live processes under `roots` (roots included): pid -> `_stat`."""
    stats = {int(name): _stat(int(name)) for name in os.listdir("/proc") if name.isdigit()}
    stats = {pid: stat for pid, stat in stats.items() if stat is not None}
    children = collections.defaultdict(list)
    for pid, (parent, _, _) in stats.items():
        children[parent].append(pid)
    found, todo = {}, [pid for pid in roots if pid in stats]
    while todo:
        pid = todo.pop()
        found[pid] = stats[pid]
        todo.extend(children[pid])
    return found


class _Sampler(threading.Thread):
    """Peak summed RSS of the processes under `roots`, and the CPU seconds of `extra` (not children)."""

    def __init__(self, roots: set[int], extra: set[int]):
        super().__init__(daemon=True)
        self._roots, self._extra = roots, extra
        self._done = threading.Event()
        self.peak_rss = 0
        self.extra_cpu_start = self._extra_cpu()

    def _extra_cpu(self) -> float:
        return sum(stat[1] for stat in _tree(self._extra).values())

    def run(self):
        while not self._done.is_set():
            self.peak_rss = max(self.peak_rss, sum(stat[2] for stat in _tree(self._roots | self._extra).values()))
            self._done.wait(0.2)

    def finish(self) -> float:
        """Stops sampling; returns the CPU seconds `extra` used meanwhile."""
        self._done.set()
        self.join()
        return self._extra_cpu() - self.extra_cpu_start


def simulate(root: Path, patients: int, minutes: float, patients_per_device: int, seed: int) -> tuple[int, float]:
    """A 1 Hz hospital under `root` -> (wearable samples, largest patient's share of them)."""
    from simulator.hospital import simulate as write_hospital

    summary = write_hospital(root, patients=patients, devices=max(1, patients // patients_per_device),
                             hours=minutes / 60, seed=seed, sample_seconds=1.0, image_size=128, progress=False)
    per_patient = collections.Counter()
    for path in (root / "wearables").rglob("*.jsonl"):
        for line in path.read_bytes().splitlines():
            upload = json.loads(line)
            per_patient[upload["patient_id"]] += len(upload["samples"])
    if not per_patient:
        raise ValueError(f"{patients} patients x {minutes:g} min landed no wearable upload: simulate longer")
    return summary.samples, max(per_patient.values()) / sum(per_patient.values())


def run_job(hospital: Path, out: Path, runner: str, mode: str, endpoint: str | None,
            jvm: int | None) -> tuple[float, float, int]:
    """`medtwin run` of `hospital` as a child process -> (wall s, CPU s, peak RSS bytes)."""
    argv = [sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main(sys.argv[1:]))",
            "run", "--input", str(hospital), "--output", str(out), "--demo", "--runner", runner,
            "--model_per_process"]
    if mode == "streaming":
        argv.append("--streaming")
    if endpoint:
        argv += [f"--job_endpoint={endpoint}", "--parallelism=2"]
    began = time.perf_counter()
    child = subprocess.Popen(argv, cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL,
                             stderr=open(out.parent / f"{out.name}.log", "wb"))
    sampler = _Sampler({child.pid}, {jvm} if jvm else set())
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - began
    jvm_cpu = sampler.finish()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"{runner} {mode} failed ({child.returncode}): see {out.parent / out.name}.log")
    return wall, usage.ru_utime + usage.ru_stime + jvm_cpu, max(sampler.peak_rss, usage.ru_maxrss * 1024)


def start_flink(logs: Path) -> tuple[subprocess.Popen, str]:
    """The installed Flink job server (embedded cluster), ready -> (process, job endpoint)."""
    from launch.runners import installed_path
    from tests.job_services import free_port, wait_for_port

    port = free_port()
    process = subprocess.Popen(
        ["java", "-jar", installed_path("flink_job_server_jar"), "--flink-master", "[local]", "--job-port",
         str(port), "--artifact-port", "0", "--expansion-port", "0", "--artifacts-dir", str(logs / "artifacts")],
        stdout=open(logs / "flink.log", "wb"), stderr=subprocess.STDOUT)
    wait_for_port(port, process)
    return process, f"localhost:{port}"


def measure(sizes, minutes, runners, modes, patients_per_device, seed, root: Path) -> list[dict]:
    """One row per (size, runner, mode): `COLUMNS` plus ``runner`` and ``mode``."""
    flink = start_flink(root) if "flink" in runners else None
    rows, smallest_rss = [], {}
    try:
        for patients in sizes:
            hospital = root / f"hospital-{patients}"
            samples, key_share = simulate(hospital, patients, minutes, patients_per_device, seed)
            for runner in runners:
                for mode in modes:
                    out = root / f"out-{patients}-{runner}-{mode}"
                    endpoint, jvm = (flink[1], flink[0].pid) if runner == "flink" else (None, None)
                    wall, cpu, rss = run_job(hospital, out, runner, mode, endpoint, jvm)
                    smallest = smallest_rss.setdefault((runner, mode), (patients, rss))
                    per_patient = ((rss - smallest[1]) / (patients - smallest[0]) if patients > smallest[0]
                                   else rss / patients)
                    rows.append({"runner": runner, "mode": mode, "patients": patients,
                                 "samples_per_s": samples / wall, "cpu_s_per_million": cpu / samples * 1e6,
                                 "peak_rss_mb": rss / 2**20, "state_bytes_per_patient": per_patient,
                                 "max_key_share": key_share})
                    shutil.rmtree(out)
            shutil.rmtree(hospital)
    finally:
        if flink:
            flink[0].terminate()
            flink[0].wait(timeout=60)
    return rows


def table(rows: list[dict]) -> str:
    """The figures, one line per row, then each figure's growth from the smallest size (per runner/mode)."""
    head = f"{'runner':<8}{'mode':<11}" + "".join(f"{name:>25}" for name in COLUMNS)
    lines = [head] + [f"{row['runner']:<8}{row['mode']:<11}" + "".join(f"{row[name]:>25.4g}" for name in COLUMNS)
                      for row in rows]
    lines += ["", "growth from the smallest size (ratio; 1.0 = constant)", head]
    first = {}
    for row in rows:
        base = first.setdefault((row["runner"], row["mode"]), row)
        lines.append(f"{row['runner']:<8}{row['mode']:<11}"
                     + "".join(f"{row[name] / base[name]:>25.3f}" for name in COLUMNS))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000], help="patients per hospital")
    parser.add_argument("--minutes", type=float, default=10.0, help="simulated minutes of 1 Hz data")
    parser.add_argument("--runner", nargs="+", default=["direct", "flink"], choices=["direct", "flink"])
    parser.add_argument("--modes", nargs="+", default=["batch", "streaming"], choices=["batch", "streaming"])
    parser.add_argument("--patients-per-device", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="medtwin-scale-") as root:
        rows = measure(sorted(args.sizes), args.minutes, args.runner, args.modes, args.patients_per_device,
                       args.seed, Path(root))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
