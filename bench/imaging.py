"""Throughput of the whole imaging path on the local runner against a bare model loop.

    nice -n 10 python bench/imaging.py                          # 64 images, batch 1 and 8, CPU
    python bench/imaging.py --images 128 --batch-sizes 1 8 32 --device cuda

Both sides read the same DICOM files, written once into a temporary directory
by `simulator.dicom.write_chest_radiograph` (synthetic chest radiographs of
512-1024 rows, portrait and landscape, 12-bit, with opacities):

* pipeline: references -> `ReadStudies` (fetch, header checks, pydicom decode,
  `prepare_dicom`) -> `DetectOpacities` (RunInference with the cascade) on
  Beam's local runner, batches fixed at the given size
  (min_batch_size = max_batch_size, no max_batch_duration_secs: a bounded run).
  Timed from `Pipeline.run()` to the end of `wait_until_finish()`, so it
  includes the runner's start-up and the model load;
* bare loop: plain Python in the same process, with the model loaded
  beforehand: read the file, `pydicom.dcmread`, `prepare_dicom`, then the
  model on lists of `batch` images under `torch.inference_mode()`.

Both sides use `torch.set_num_threads(--threads)`. The table gives images/s of
each side, their ratio (target >= 0.8) and where the bare loop's time goes.
The pipeline pads every image to the model's square input (batch-independent
detections, see transforms/detect.py) where the bare loop lets torchvision pad
to a multiple of 32, so the pipeline does a little more model work per image.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import apache_beam as beam
import numpy as np
import pydicom
import torch
from apache_beam.options.pipeline_options import PipelineOptions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.checkpoint import load_detector  # noqa: E402
from model.preprocess import prepare_dicom  # noqa: E402
from model.radiograph import synthesize_chest_xray  # noqa: E402
from simulator.dicom import PatientIdentity, StudyInfo, write_chest_radiograph  # noqa: E402
from pipelines.config import DEFAULT_WEIGHTS  # noqa: E402
from transforms.detect import DetectOpacities, InferenceConfig, model_input_size  # noqa: E402
from transforms.dicom_decode import DicomReadConfig, ReadStudies  # noqa: E402

BENCH_SEED = 5151
START = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.timezone.utc)


def write_studies(directory: Path, count: int) -> list[dict]:
    """Writes `count` chest radiographs as DICOM files; returns their (pseudonymised) references."""
    rng = np.random.default_rng(BENCH_SEED)
    references = []
    for index in range(count):
        rows = int(rng.integers(512, 1025))
        cols = int(round(rows * rng.uniform(0.8, 1.2)))
        radiograph = synthesize_chest_xray(rng, rows=rows, cols=cols, num_opacities=int(rng.integers(0, 3)))
        uid = f"1.2.826.0.1.3680043.10.9999.{index + 1}"
        acquired = START + dt.timedelta(minutes=index)
        patient = PatientIdentity(patient_id=f"P{index:05d}", name="Bench^Patient", birth_date="19700101",
                                  sex="O", address="nowhere")
        study = StudyInfo(study_uid=f"{uid}.1", series_uid=f"{uid}.2", sop_uid=f"{uid}.3",
                          acquisition_time=acquired, device_id="cr-bench", modality="CR", manufacturer="medtwin",
                          model_name="sim", institution="bench", station_name="bench", accession_number=f"A{index}",
                          referring_physician="Bench^Doctor")
        path = directory / f"img{index:05d}.dcm"
        write_chest_radiograph(path, radiograph, patient, study)
        references.append({"uri": str(path), "study_instance_uid": study.study_uid,
                           "series_instance_uid": study.series_uid, "sop_instance_uid": study.sop_uid,
                           "patient_key": f"pk{index:05d}", "device_id": study.device_id, "modality": "CR",
                           "acquisition_time": acquired})
    return references


def run_pipeline(references: list[dict], directory: Path, weights: str, batch: int, device: str,
                 share: bool) -> tuple[float, int]:
    """Seconds for the whole imaging path, and the detections it wrote (must equal the images)."""
    read_config = DicomReadConfig(allowed_prefixes=(str(directory),), target_size=model_input_size(weights))
    inference = InferenceConfig(weights, device=device, min_batch_size=batch, max_batch_size=batch,
                                max_batch_duration_secs=None, share_across_processes=share)
    pipeline = beam.Pipeline(options=PipelineOptions([]))
    studies = (pipeline | "References" >> beam.Create(references) | "ReadStudies" >> ReadStudies(read_config))
    out = studies["images"] | "DetectOpacities" >> DetectOpacities(inference)
    counted = out["detections"] | "Count" >> beam.combiners.Count.Globally()
    result_path = directory / f"count-{batch}.txt"
    _ = counted | "Record" >> beam.Map(lambda n, path=str(result_path): Path(path).write_text(str(n)))
    start = time.perf_counter()
    pipeline.run().wait_until_finish()
    elapsed = time.perf_counter() - start
    return elapsed, int(result_path.read_text())


def run_bare(paths: list[str], model: torch.nn.Module, target_size: int, batch: int,
             device: str) -> tuple[float, float, float]:
    """(total, decode + preprocess, model) seconds of the plain loop."""
    decode_s = model_s = 0.0
    for first in range(0, len(paths), batch):
        start = time.perf_counter()
        images = []
        for path in paths[first:first + batch]:
            data = Path(path).read_bytes()
            prepared = prepare_dicom(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)), target_size=target_size)
            images.append(torch.from_numpy(prepared.image)[None].to(device))
        middle = time.perf_counter()
        with torch.inference_mode():
            outputs = model(images)
        _ = [output["boxes"].cpu() for output in outputs]
        end = time.perf_counter()
        decode_s += middle - start
        model_s += end - middle
    return decode_s + model_s, decode_s, model_s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="DICOM files to write and read")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both sides")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS)
    parser.add_argument("--share-across-processes", action="store_true",
                        help="pipeline: one model per machine via Beam MultiProcessShared (a model server process)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    target_size = model_input_size(args.weights)
    model = load_detector(args.weights, device=args.device).model

    with tempfile.TemporaryDirectory(prefix="medtwin-bench-") as tmp:
        directory = Path(tmp)
        start = time.perf_counter()
        references = write_studies(directory, args.images)
        print(f"wrote {args.images} DICOM files in {time.perf_counter() - start:.1f} s; "
              f"torch threads {torch.get_num_threads()}, device {args.device}")
        paths = [ref["uri"] for ref in references]
        run_bare(paths[: max(args.batch_sizes)], model, target_size, max(args.batch_sizes), args.device)  # warm-up
        rows = []
        for batch in args.batch_sizes:
            pipeline_s, detections = run_pipeline(references, directory, args.weights, batch, args.device,
                                                  args.share_across_processes)
            if detections != args.images:
                raise SystemExit(f"pipeline wrote {detections} detections for {args.images} images")
            bare_s, decode_s, model_s = run_bare(paths, model, target_size, batch, args.device)
            rows.append((batch, args.images / pipeline_s, args.images / bare_s, bare_s / pipeline_s,
                         100 * decode_s / bare_s, 100 * model_s / bare_s))
    print(f"{'batch':>5} {'pipeline img/s':>15} {'bare img/s':>11} {'ratio':>6} {'bare decode+prep %':>19} "
          f"{'bare model %':>13}")
    for batch, pipeline_rate, bare_rate, ratio, decode_pct, model_pct in rows:
        print(f"{batch:>5} {pipeline_rate:>15.2f} {bare_rate:>11.2f} {ratio:>6.2f} {decode_pct:>19.1f} "
              f"{model_pct:>13.1f}")


if __name__ == "__main__":
    main()
