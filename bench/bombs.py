"""Peak memory of the decode stage on the hostile DICOM corpus, against benign decodes.

    nice -n 10 python bench/bombs.py                    # every file in tests/corpus/dicom
    python bench/bombs.py --target-size 1024 --json out.json

Each file is decoded by `transforms.dicom_decode.decode_dicom_bytes` (the pipeline's decode:
Part 10 parse, header checks, codestream checks, then pydicom's pixel decode and
`prepare_dicom`) in a fresh Python process, one per file, with every module the decode needs
imported before the file is read.  A process reports its peak resident set (``VmHWM``, reset with
``/proc/self/clear_refs`` after the imports) and the outcome (decoded, or the rejection kind), so a
figure is the memory the decode of that one file took, not the interpreter's.  Before issue 13's
B10 fix, ``bomb_jp2_box_60000.dcm`` drove this to 21.6 GB and the 16,384-component codestream to
22.5 GB; both are now refused before any pixel is decoded.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus" / "dicom"
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys
from transforms.dicom_decode import DicomReadConfig, DicomRejected, decode_dicom_bytes
import model.preprocess, pydicom, numpy  # everything the decode imports, before the file

def hwm():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

path, target = sys.argv[1], int(sys.argv[2])
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")
base = hwm()
data = open(path, "rb").read()
try:
    decode_dicom_bytes(data, DicomReadConfig(allowed_prefixes=(path,), target_size=target))
    outcome = "decoded"
except DicomRejected as error:
    outcome = "refused: " + error.kind
print(json.dumps({"outcome": outcome, "peak_kib": hwm(), "growth_kib": hwm() - base, "bytes": len(data)}))
"""


def measure(path: pathlib.Path, target_size: int) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(path), str(target_size)], capture_output=True,
                            text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode != 0:
        return {"outcome": f"crashed (exit {result.returncode})", "peak_kib": None, "growth_kib": None,
                "bytes": path.stat().st_size}
    return json.loads(result.stdout.strip().splitlines()[-1])


def benign_radiograph(path: pathlib.Path) -> pathlib.Path:
    """A 1024 x 1024 12-bit synthetic chest radiograph, as the simulator writes them."""
    import datetime as dt

    import numpy as np

    from model.radiograph import synthesize_chest_xray
    from simulator.dicom import PatientIdentity, StudyInfo, write_chest_radiograph

    study = StudyInfo(study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5",
                      acquisition_time=dt.datetime(2026, 3, 2, tzinfo=dt.timezone.utc), device_id="XR-1",
                      modality="DX", manufacturer="Sim", model_name="DR", institution="General", station_name="XR1",
                      accession_number="A1", referring_physician="R^P")
    patient = PatientIdentity(patient_id="P1", name="X^Y", birth_date="19700101", sex="F", address="-")
    write_chest_radiograph(path, synthesize_chest_xray(np.random.default_rng(0), rows=1024, cols=1024), patient,
                           study)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-size", type=int, default=256, help="model input size (the tiny model's 256)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    rows = {path.name: measure(path, args.target_size) for path in sorted(CORPUS.glob("*.dcm"))}
    with tempfile.TemporaryDirectory() as scratch:  # the benign reference: a real-sized radiograph
        reference = benign_radiograph(pathlib.Path(scratch) / "benign_1024x1024_12bit.dcm")
        rows[f"valid_{reference.name}"] = measure(reference, args.target_size)
    print(f"{'file':<36} {'bytes':>10} {'peak RSS MiB':>13} {'decode growth MiB':>18}  outcome")
    for name, row in rows.items():
        peak = "-" if row["peak_kib"] is None else f"{row['peak_kib'] / 1024:.1f}"
        growth = "-" if row["growth_kib"] is None else f"{row['growth_kib'] / 1024:.1f}"
        print(f"{name:<36} {row['bytes']:>10,} {peak:>13} {growth:>18}  {row['outcome']}")
    for kind in ("bomb", "valid"):
        growths = [r["growth_kib"] for n, r in rows.items() if n.startswith(kind) and r["growth_kib"] is not None]
        if growths:
            print(f"{kind}: largest decode growth {max(growths) / 1024:.1f} MiB over {len(growths)} files")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
