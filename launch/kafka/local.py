"""A local Kafka broker and Beam's Kafka IO services, as `make kafka` installed them.

    with KafkaBroker(workdir) as broker:        # KRaft broker+controller on a free loopback port
        broker.bootstrap                        # "127.0.0.1:PORT"
    with KafkaIOServices(workdir) as kafka_io:  # Beam 2.73 expansion service + Java worker pool
        kafka_io.expansion_service              # "localhost:PORT", for ReadFromKafka(expansion_service=...)

`KafkaBroker` formats a fresh KRaft log directory (one node, both roles) and starts
``kafka.Kafka`` from the jars launch/kafka/pom.xml copied; stopping it kills the JVM
(a test may also `kill()` it to see a crash). `KafkaIOServices` starts the two JVMs a
cross-language ReadFromKafka needs without Docker: an expansion service whose expanded
transforms carry an EXTERNAL environment pointing at a Java SDK harness worker pool
(launch/kafka/io/pom.xml says why Beam 2.73). The runner (Prism or Flink) asks that pool
to start a Java worker for the Kafka read, and a Python worker (LOOPBACK) for the rest.

Nothing is downloaded here; a missing install raises `RunnerNotInstalled` naming `make kafka`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

from launch.runners import RUNNERS_DIR, RunnerNotInstalled

KAFKA_VERSION = "4.1.1"
KAFKA_IO_BEAM_VERSION = "2.73.0"
BROKER_DIR = RUNNERS_DIR / "kafka" / f"kafka-{KAFKA_VERSION}"
KAFKA_IO_DIR = RUNNERS_DIR / "kafka" / f"beam-io-{KAFKA_IO_BEAM_VERSION}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{what}: nothing listening on port {port} after {seconds} s")


def _classpath(folder: Path) -> str:
    lib = folder / "lib"
    if not lib.is_dir() or not any(lib.glob("*.jar")):
        raise RunnerNotInstalled(f"{lib} is missing: run `make kafka`")
    return str(lib / "*")


def _java(classpath: str, main: str, *args: str, heap: str = "384m") -> list[str]:
    return ["java", f"-Xmx{heap}", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp", classpath, main, *args]


class _Service:
    """One JVM started by `start()`, logging to a file, stopped on exit."""

    process: subprocess.Popen | None = None

    def _spawn(self, command: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})})

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


class KafkaBroker(_Service):
    """One KRaft Kafka node (broker + controller) on 127.0.0.1, its log under `workdir`."""

    def __init__(self, workdir: Path, *, partitions: int = 2):
        self.workdir = Path(workdir)
        self.port, self._controller_port = free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._partitions = partitions
        self._classpath = _classpath(BROKER_DIR)

    def _properties(self) -> Path:
        logs = self.workdir / "kraft-logs"
        path = self.workdir / "server.properties"
        path.write_text("\n".join([
            "process.roles=broker,controller", "node.id=1",
            f"controller.quorum.bootstrap.servers=127.0.0.1:{self._controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self._controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names=CONTROLLER", "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={logs}", f"num.partitions={self._partitions}",
            "offsets.topic.replication.factor=1", "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1", "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1", "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0", "auto.create.topics.enable=true",
            # Record timestamps are the producer's (event time), never rewritten by the broker.
            "log.message.timestamp.type=CreateTime",
            "log.message.timestamp.before.max.ms=9223372036854775807",
            "log.message.timestamp.after.max.ms=9223372036854775807",
            "log.retention.hours=-1", "", ""]))
        return path

    def start(self) -> "KafkaBroker":
        self.workdir.mkdir(parents=True, exist_ok=True)
        properties = self._properties()
        log = self.workdir / "broker.log"
        if not (self.workdir / "kraft-logs" / "meta.properties").exists():
            cluster_id = uuid.uuid4().hex[:22]
            subprocess.run(_java(self._classpath, "kafka.tools.StorageTool", "format", "-t", cluster_id,
                                 "-c", str(properties), "--standalone", heap="256m"),
                           check=True, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        self.process = self._spawn(_java(self._classpath, "kafka.Kafka", str(properties), heap="512m"), log)
        wait_for_port(self.port, self.process, "Kafka broker")
        return self


class KafkaIOServices(_Service):
    """Beam's Kafka IO expansion service and the Java SDK worker pool its transforms run in."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.expansion_port, self.pool_port = free_port(), free_port()
        self.expansion_service = f"localhost:{self.expansion_port}"
        self._classpath = _classpath(KAFKA_IO_DIR)
        self.pool: subprocess.Popen | None = None

    def start(self) -> "KafkaIOServices":
        self.workdir.mkdir(parents=True, exist_ok=True)
        pool_address = f"localhost:{self.pool_port}"
        # The pool serves at its options' default environment config (Environments.getExternalServiceAddress).
        options = {"options": {"defaultEnvironmentType": "EXTERNAL", "defaultEnvironmentConfig": pool_address}}
        self.pool = self._spawn(
            _java(self._classpath, "org.apache.beam.fn.harness.ExternalWorkerService", heap="768m"),
            self.workdir / "java-worker-pool.log", env={"PIPELINE_OPTIONS": json.dumps(options)})
        self.process = self._spawn(
            _java(self._classpath, "org.apache.beam.sdk.expansion.service.ExpansionService",
                  str(self.expansion_port), "--defaultEnvironmentType=EXTERNAL",
                  f"--defaultEnvironmentConfig={pool_address}"),
            self.workdir / "expansion-service.log")
        wait_for_port(self.pool_port, self.pool, "Java SDK worker pool")
        wait_for_port(self.expansion_port, self.process, "Kafka IO expansion service")
        return self

    def stop(self) -> None:
        super().stop()
        if self.pool is not None and self.pool.poll() is None:
            self.pool.terminate()
            self.pool.wait(timeout=30)
