"""`medtwin train-risk`: the learned early-warning models, trained on backfilled history.

    medtwin train-risk --history runs/ --simulate --train_seeds 101-104 --validation_seeds 105 --out risk/

History is a folder of simulated hospitals, one per seed: ``HISTORY/seed-N/hospital`` (`medtwin
simulate`, with its truth) and ``HISTORY/seed-N/out`` (the batch pipeline's tables over it, as a
backfill writes them). ``--simulate`` makes the missing ones (simulate, then one batch run).

Steps: tf.Transform analyses the training seeds' twin tables (`transforms.features.analyse_history`,
artifact under OUT/features/<version>); every final twin row of the training seeds is featured with
that artifact and labelled from the simulator's truth; one logistic regression per subject is
trained (`model.risk.train`); its alert threshold is chosen on the validation seeds (the threshold
that flags the most validation events, and among those raises the fewest false alarms); both are
saved as OUT/patient_risk.safetensors and OUT/device_risk.safetensors, with OUT/training.json.

Labels: device rows are positive when the device fails within ``--device_horizon`` hours after the
window end; rows after a failure are left out (the device is down or in service). Patient rows are
positive when the simulator's deterioration onset is at most ``--patient_horizon`` hours after the
window end (so also once it has begun).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import sys

import numpy as np

SUBJECTS = ("patient", "device")


def parse_seeds(text: str) -> list[int]:
    """"1,2,5-7" -> [1, 2, 5, 6, 7]."""
    seeds = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds += list(range(int(low), int(high or low) + 1))
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seed repeated in {text!r}")
    return seeds


def seed_dirs(history: str, seed: int) -> tuple[str, str]:
    """(hospital, out) folders of `seed` in `history`."""
    return os.path.join(history, f"seed-{seed}", "hospital"), os.path.join(history, f"seed-{seed}", "out")


def add_history_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--simulate", action="store_true", help="simulate and run the seeds that are missing")
    parser.add_argument("--patients", type=int, default=8, help="patients per simulated seed [%(default)s]")
    parser.add_argument("--devices", type=int, default=8, help="devices per simulated seed [%(default)s]")
    parser.add_argument("--hours", type=float, default=6.0, help="hours per simulated seed [%(default)s]")


def ensure_history(history: str, seeds: list[int], args: argparse.Namespace) -> None:
    """Simulates (with --simulate) every seed of `history` that has no hospital yet; refuses otherwise."""
    from pipelines.cli import main as medtwin
    for seed in seeds:
        hospital, out = seed_dirs(history, seed)
        if os.path.isdir(os.path.join(hospital, "truth")):
            continue
        if not args.simulate:
            raise SystemExit(f"medtwin: {hospital} is missing (add --simulate to make it)")
        with contextlib.redirect_stdout(io.StringIO()):
            assert medtwin(["simulate", "--out", hospital, "--patients", str(args.patients), "--devices",
                            str(args.devices), "--hours", str(args.hours), "--seed", str(seed)]) == 0


def ensure_runs(history: str, seeds: list[int]) -> None:
    """Runs the batch pipeline (no imaging, demo key) over every seed's hospital that has no output yet."""
    from pipelines.cli import main as medtwin
    for seed in seeds:
        hospital, out = seed_dirs(history, seed)
        if not os.path.isdir(os.path.join(out, "patient_twin")):
            with contextlib.redirect_stdout(io.StringIO()):
                assert medtwin(["run", "--input", hospital, "--output", out, "--demo", "--no_imaging"]) == 0


def final_rows(out: str, table: str) -> list[dict]:
    """The final rows of `table` in a run output, timestamps in UTC."""
    from pipelines.query import connect
    cursor = connect(out).execute(f"select * exclude (date) from {table} where is_final order by all")
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, values)) for values in cursor.fetchall()]
    for row in rows:
        for name in ("window_start", "window_end"):
            row[name] = row[name].astimezone(dt.timezone.utc)
    return rows


def _time(text: str | None) -> dt.datetime | None:
    from schemas.contract import parse_timestamp
    return None if text is None else parse_timestamp(text, "truth")


def truth(hospital: str) -> dict:
    """A simulated hospital's truth -> {"failures": {device: time}, "deterioration": {patient_key: (onset,
    full effect)}, "patients": [keys], "devices": [ids], "hours": simulated hours}.

    Patients are keyed by the pseudonym the pipeline writes (the demo key)."""
    from transforms.pseudonymise import DEMO_KEY, Pseudonymiser
    base = os.path.join(hospital, "truth")
    with open(os.path.join(base, "device_failures.json")) as f:
        devices = json.load(f)
    with open(os.path.join(base, "patients.json")) as f:
        patients = json.load(f)
    with open(os.path.join(base, "manifest.json")) as f:
        manifest = json.load(f)
    pseudonym = Pseudonymiser(DEMO_KEY).patient_key
    return {
        "failures": {f["device_id"]: _time(f["failure_time"]) for f in devices["failures"]},
        "devices": [d["device_id"] for d in devices["devices"]],
        "deterioration": {pseudonym(pid): (_time(p["onset"]), _time(p["full_effect"]))
                          for pid, p in patients.items() if p["infected"]},
        "patients": [pseudonym(pid) for pid in patients],
        "hours": float(manifest["arguments"]["hours"]),
    }


def labelled(subject: str, rows: list[dict], facts: dict, horizon: dt.timedelta):
    """Rows of one seed -> (rows kept, labels 0/1) per the module's label definitions."""
    kept, labels = [], []
    for row in rows:
        end = row["window_end"]
        if subject == "device":
            failed_at = facts["failures"].get(row["device_id"])
            if failed_at is not None and row["window_start"] >= failed_at:
                continue
            labels.append(int(failed_at is not None and end + horizon >= failed_at))
        else:
            onset = facts["deterioration"].get(row["patient_key"], (None, None))[0]
            labels.append(int(onset is not None and end + horizon >= onset))
        kept.append(row)
    return kept, np.array(labels, np.int64)


def featured(subject: str, rows: list[dict], artifact):
    """Rows -> (rows that could be featured, their feature matrix)."""
    from transforms.features import raw_inputs
    pairs = [(row, raw_inputs(subject, row)) for row in rows]
    pairs = [(row, x) for row, x in pairs if x is not None]
    if not pairs:
        return [], np.zeros((0, len(artifact.names(subject))), np.float32)
    return [row for row, _ in pairs], artifact.transform(subject, [x for _, x in pairs])


def choose_threshold(subject: str, scored: list[tuple[list[dict], np.ndarray, dict]], horizon_hours: float):
    """Validation seeds' (rows, risks, truth) -> (threshold, its validation score): the threshold that flags
    the most events, and among those raises the fewest false alarms per subject-day."""
    from pipelines.backtest import offline_alerts, score
    best = None
    for threshold in np.round(np.arange(0.05, 1.0, 0.05), 2):
        seeds = [(offline_alerts(subject, rows, risks, float(threshold)), facts) for rows, risks, facts in scored]
        result = score(subject, seeds, horizon_hours)
        key = (result["flagged"], -result["false_alarms_per_day"], threshold)
        if best is None or key > best[0]:
            best = (key, float(threshold), result)
    return best[1], best[2]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train-risk", help="train the learned early-warning models on history",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", required=True, help="folder of seed-N/{hospital,out}")
    parser.add_argument("--train_seeds", type=parse_seeds, required=True, help="e.g. 101-104")
    parser.add_argument("--validation_seeds", type=parse_seeds, required=True, help="e.g. 105")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--patient_horizon", type=float, default=2.0, help="hours [%(default)s]")
    parser.add_argument("--device_horizon", type=float, default=1.5, help="hours [%(default)s]")
    add_history_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from model import risk
    from transforms.features import FeatureArtifact, analyse_history

    if set(args.train_seeds) & set(args.validation_seeds):
        print("medtwin train-risk: training and validation seeds overlap", file=sys.stderr)
        return 2
    seeds = args.train_seeds + args.validation_seeds
    ensure_history(args.history, seeds, args)
    ensure_runs(args.history, seeds)
    os.makedirs(args.out, exist_ok=True)
    artifact_path = analyse_history([seed_dirs(args.history, s)[1] for s in args.train_seeds],
                                    os.path.join(args.out, "features"))
    artifact = FeatureArtifact(artifact_path)
    horizons = {"patient": args.patient_horizon, "device": args.device_horizon}
    report = {"features_version": artifact.version, "features": os.path.relpath(artifact_path, args.out),
              "train_seeds": args.train_seeds, "validation_seeds": args.validation_seeds, "models": {}}
    for subject in SUBJECTS:
        table = f"{subject}_twin"
        horizon = dt.timedelta(hours=horizons[subject])
        per_seed = {}
        for seed in seeds:
            hospital, out = seed_dirs(args.history, seed)
            facts = truth(hospital)
            rows, x = featured(subject, final_rows(out, table), artifact)
            rows_kept, y = labelled(subject, rows, facts, horizon)
            keep = {id(r) for r in rows_kept}
            mask = np.array([id(r) in keep for r in rows], bool)
            per_seed[seed] = (rows, x, mask, y, facts)
        x_train = np.concatenate([per_seed[s][1][per_seed[s][2]] for s in args.train_seeds])
        y_train = np.concatenate([per_seed[s][3] for s in args.train_seeds])
        module = risk.train(x_train, y_train)
        validation = [(per_seed[s][0], risk.predict(module, per_seed[s][1]), per_seed[s][4])
                      for s in args.validation_seeds]
        threshold, validation_score = choose_threshold(subject, validation, 3.0 if subject == "device"
                                                       else horizons[subject])
        metadata = {"subject": subject, "feature_names": list(artifact.names(subject)),
                    "features_version": artifact.version, "threshold": threshold,
                    "horizon_hours": horizons[subject], "train_seeds": args.train_seeds,
                    "validation_seeds": args.validation_seeds,
                    "train_rows": int(len(y_train)), "train_positives": int(y_train.sum())}
        version = risk.save(module, os.path.join(args.out, f"{subject}_risk.safetensors"), metadata)
        report["models"][subject] = {**metadata, "model_version": version, "validation": validation_score}
        print(f"{subject}: {len(y_train)} training rows ({int(y_train.sum())} positive), threshold {threshold:.2f} "
              f"on validation: {validation_score['flagged']}/{validation_score['events']} flagged, "
              f"{validation_score['false_alarms_per_day']:.2f} false alarms per {subject}-day; model {version}")
    with open(os.path.join(args.out, risk.TRAINING_REPORT), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True, default=str)
    return 0
