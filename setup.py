"""medtwin: streaming digital twins and imaging AI for hospitals, on Apache Beam.

This file is the real install: `pip install -e .[test]` on a workstation, and
`--setup_file ./setup.py` when Dataflow stages the package on its workers.
"""
import setuptools

BEAM_VERSION = "2.77.0"
# Local runners, installed by `make runners` (launch/runners.py): Prism is built from the Beam Go SDK
# module at BEAM_VERSION. Beam's Flink job server comes from Maven Central, which serves no job-server
# jar for any recent Beam and, of the Flink runner itself, only this one (with its dependencies):
# Beam 2.56.0's runner for Flink 1.16 (launch/flink/pom.xml). The Python SDK at BEAM_VERSION talks to
# it through the portable job API.
FLINK_JOB_SERVER_BEAM_VERSION = "2.56.0"
FLINK_VERSION = "1.16"

REQUIRED = [
    "apache-beam[gcp]==2.77.0",  # BEAM_VERSION
    "torch==2.14.1",
    "torchvision==0.29.1",
    "numpy>=1.26",
    "pyarrow>=16",
    "fastavro>=1.9",
    "orjson>=3.9",
    "pydicom>=3.0.2",
    # pydicom pixel-data plugins: JPEG baseline/extended/lossless (libjpeg),
    # JPEG 2000 (openjpeg), RLE; JPEG-LS encode/decode through CharLS.
    "pylibjpeg>=2.0",
    "pylibjpeg-libjpeg>=2.1",
    "pylibjpeg-openjpeg>=2.3",
    "pylibjpeg-rle>=2.0",
    "pyjpegls>=1.3",
    "google-cloud-bigquery>=3.20",
    # `medtwin publish` (pipelines/publish.py): replays a hospital into Kafka topics with event-time
    # record timestamps (librdkafka client; the pipeline itself reads with Beam's Kafka IO).
    "confluent-kafka>=2.4",
    "safetensors>=0.4",
    "duckdb>=1.0",
    "pycocotools>=2.0.7",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    # Findings as DICOM: TID 1500 measurement reports (transforms/structured_report.py).
    "highdicom>=0.28",
    # Learned early warning (transforms/features.py): tf.Transform analyses history in a batch job and the
    # saved transform graph is applied unchanged in the stream. 1.21.0 (TensorFlow 2.21, tfx-bsl 1.21,
    # protobuf 6) resolves beside Beam 2.77 / pyarrow / numpy / torch with none of their versions moved.
    "tensorflow-transform==1.21.0",
]

TEST = [
    "pytest>=8",
    "hypothesis>=6.100",
    "pydicom-data>=1.0",
]

setuptools.setup(
    name="medtwin",
    version="0.1.0",
    description="Streaming digital twins of patients and imaging devices, with "
    "Cascade R-CNN detection of COVID-19 opacities on chest X-rays.",
    python_requires=">=3.10",
    packages=setuptools.find_packages(
        include=["pipelines*", "transforms*", "model*", "schemas*", "launch*", "simulator*"]),
    package_data={"model": ["weights/*.safetensors", "weights/*.json"]},
    install_requires=REQUIRED,
    extras_require={"test": TEST},
    entry_points={"console_scripts": ["medtwin=pipelines.cli:main"]},
)
