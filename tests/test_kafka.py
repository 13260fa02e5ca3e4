"""Kafka for real: a KRaft broker, `medtwin publish`, and the pipeline reading with Beam's Kafka IO on Prism.

One broker and one pair of Kafka IO JVMs (expansion service + Java SDK worker pool, launch/kafka/local.py)
start for the session, as `make kafka` installed them; nothing here is skipped or mocked.

What is checked:
  * `medtwin publish` writes every landed record once, its Kafka timestamp the earliest event time
    the record carries (worked out here from the raw JSON, not by the publisher's code), its arrival
    in a header, each partition in event-time order;
  * `medtwin run --source kafka --runner prism` reads them with ReadFromKafka (CreateTime): a whole
    backlog read at once dead-letters nothing as too late (the watermark follows event time, not the
    wall clock, which would make every historical sample too late), every wearable sample is in a
    final row, a duplicate removed or a dead letter, the final rows equal a batch run's over the
    same files, and the consumer group's committed offsets reach the end of every partition;
  * a job killed once its group has committed every offset, before every window is final, and
    started again (replaying the topics under a new group, as a job whose state was not restored
    must) ends with the batch run's final rows, none twice, and the samples still add up.
"""

import datetime as dt
import time

import orjson
import pytest
from apache_beam.runners.runner import PipelineState
from confluent_kafka import Consumer, TopicPartition

import test_pipeline as accounting  # its counting helpers, as a module: none of its fixtures come along
from job_services import start_streaming_job, table_files
from launch.kafka.local import KafkaBroker, KafkaIOServices
from pipelines.cli import main
from pipelines.query import connect
from transforms.sources import KAFKA_ARRIVAL_HEADER, STREAMS, kafka_backlog, landed_records

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="session")
def kafka(tmp_path_factory):
    """(broker, Kafka IO services), up for the session."""
    root = tmp_path_factory.mktemp("kafka")
    with KafkaBroker(root / "broker") as broker, KafkaIOServices(root / "io") as kafka_io:
        yield broker, kafka_io


@pytest.fixture(scope="session")
def prism(job_endpoints):
    """``--job_endpoint`` of the session's Prism job service (tests/conftest.py)."""
    return job_endpoints["prism"]


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    root = tmp_path_factory.mktemp("kafka-hospital")
    assert main(["simulate", "--out", str(root / "in"), "--patients", "4", "--devices", "1", "--hours", "1",
                 "--seed", "5", "--corrupt-fraction", "0.03", "--quiet"]) == 0
    assert main(["run", "--input", str(root / "in"), "--output", str(root / "batch"), "--demo", "--no_imaging"]) == 0
    return root


def _consume(bootstrap, topics, group):
    """Every record of `topics` from the earliest offset: [(topic, partition, timestamp ms, headers, value, key)]."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                         "enable.auto.commit": False})
    consumer.subscribe(topics)
    records, idle = [], 0
    while idle < 10:
        message = consumer.poll(1.0)
        if message is None:
            idle += 1
            continue
        assert message.error() is None, message.error()
        idle = 0
        records.append((message.topic(), message.partition(), message.timestamp()[1],
                        dict(message.headers() or []), message.value(), message.key().decode()))
    consumer.close()
    return records


def _earliest_time_in(stream, value):
    """The earliest event time in a landed record's JSON, read here independently; None if it has none."""
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    if stream == "wearables":
        samples = record.get("samples") if isinstance(record.get("samples"), list) else []
        times = []
        for sample in samples:
            try:
                times.append(dt.datetime.fromisoformat(sample["event_time"].replace("Z", "+00:00")))
            except (TypeError, KeyError, ValueError, AttributeError):
                pass
        return min(times) if times else None
    field = {"observations": "event_time", "device_logs": "event_time", "dicom_refs": "acquisition_time"}[stream]
    try:
        return dt.datetime.fromisoformat(record[field].replace("Z", "+00:00"))
    except (TypeError, KeyError, ValueError, AttributeError):
        return None


def test_publish_writes_every_record_once_at_its_event_time(kafka, hospital):
    broker, _ = kafka
    assert main(["publish", "--input", str(hospital / "in"), "--kafka_bootstrap", broker.bootstrap,
                 "--topic_prefix", "p1-"]) == 0
    records = _consume(broker.bootstrap, [f"p1-{s}" for s in STREAMS], "check-publish")
    for stream in STREAMS:
        landed = landed_records(str(hospital / "in"), stream)
        published = [r for r in records if r[0] == f"p1-{stream}"]
        # Each landed record once, keyed by where it landed; JSON lines byte for byte.
        assert sorted(r[5] for r in published) == sorted(r.source for r in landed), stream
        by_key = {r[5]: r[4] for r in published}
        assert all(by_key[r.source] == r.payload for r in landed if isinstance(r.payload, bytes)), stream
        for _, _, millis, headers, value, _ in published:
            assert KAFKA_ARRIVAL_HEADER in headers
            earliest = _earliest_time_in(stream, value)
            if earliest is not None and earliest.tzinfo is not None:
                assert millis == (earliest - EPOCH) // dt.timedelta(milliseconds=1)
    for topic, partition in {(r[0], r[1]) for r in records}:
        stamps = [r[2] for r in records if (r[0], r[1]) == (topic, partition)]
        assert stamps == sorted(stamps), f"{topic}/{partition} is not in event-time order"


def _committed_and_end(bootstrap, group, topics):
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    partitions = [TopicPartition(t, p) for t in topics
                  for p in consumer.list_topics(t, timeout=10).topics[t].partitions]
    committed = {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(partitions, timeout=30)}
    end = {(tp.topic, tp.partition): consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions}
    consumer.close()
    return committed, end


def _kafka_argv(kafka, prism, prefix, group, out, *extra):
    """`medtwin run` reading the topics ``<prefix><stream>`` as consumer `group`, on the session's Prism."""
    broker, kafka_io = kafka
    topics = [flag for s in STREAMS for flag in (f"--kafka_{s}", f"{prefix}{s}")]
    return ["run", "--streaming", "--source", "kafka", "--kafka_bootstrap", broker.bootstrap, *topics,
            "--kafka_group", group, "--kafka_expansion_service", kafka_io.expansion_service,
            "--runner", "prism", "--job_endpoint", prism, "--no_imaging", "--demo", "--output", str(out), *extra]


@pytest.fixture(scope="module")
def from_kafka(kafka, prism, hospital):
    """The pipeline's output folder after reading the published hospital from Kafka on Prism."""
    broker, _ = kafka
    assert main(["publish", "--input", str(hospital / "in"), "--kafka_bootstrap", broker.bootstrap,
                 "--topic_prefix", "p2-"]) == 0
    out = hospital / "from-kafka"
    assert main(_kafka_argv(kafka, prism, "p2-", "medtwin-test", out, "--kafka_read_to_end")) == 0
    return out


def test_a_kafka_backlog_read_at_once_loses_nothing_and_dead_letters_nothing_as_too_late(hospital, from_kafka):
    records = landed_records(str(hospital / "in"), "wearables")
    samples_in = sum(accounting._samples_in(r) for r in records)
    connection = connect(str(from_kafka))
    counted, duplicates, dead = accounting._wearable_counts(connection)
    too_late = accounting._scalar(connection, "select coalesce(sum(record_count), 0) from dead_letters "
                                  "where stage in ('window_wearables', 'window_device_logs')")
    assert too_late == 0  # the wall-clock watermark dead-lettered 6,651 of 6,699 samples here
    assert dead > 0  # the simulator's damaged records, each a dead letter
    assert samples_in == counted + duplicates + dead
    assert counted == len(accounting._distinct_valid_samples(records))
    # Every window got its on-time pane: none only late (the issue: 527 of 557 windows only late).
    windows, only_late = connection.execute(
        "select count(*), count(*) filter (where not on_time) from (select patient_key, window_start, "
        "bool_or(pane_timing = 'ON_TIME') as on_time from patient_twin group by 1, 2)").fetchone()
    assert windows > 0 and only_late == 0


def test_final_rows_from_kafka_equal_the_batch_run(hospital, from_kafka):
    batch, stream = connect(str(hospital / "batch")), connect(str(from_kafka))
    for table, key in (("patient_twin", "patient_key"), ("device_twin", "device_id")):
        rows = accounting._final_rows(batch, table, key, set())
        assert rows and rows == accounting._final_rows(stream, table, key, set()), table


def test_offsets_are_committed_to_the_consumer_group_up_to_the_end(kafka, from_kafka):
    broker, _ = kafka
    committed, end = _committed_and_end(broker.bootstrap, "medtwin-test", [f"p2-{s}" for s in STREAMS])
    with_records = {partition for partition, offset in end.items() if offset > 0}
    assert len({topic for topic, _ in with_records}) >= 2
    # Every partition with records committed to its end; an empty one has nothing to commit.
    assert {p: committed[p] for p in with_records} == {p: end[p] for p in with_records}
    # `--kafka_read_to_end` counts the same way: nothing left for the job's group, all of it for a new one.
    for stream in STREAMS:
        topic = f"p2-{stream}"
        assert kafka_backlog(broker.bootstrap, topic, "medtwin-test") == 0
        assert kafka_backlog(broker.bootstrap, topic, "a-new-group") == sum(
            offset for (t, _), offset in end.items() if t == topic)


def test_a_job_killed_mid_stream_and_started_again_loses_nothing_and_doubles_nothing(kafka, prism, hospital):
    """The job is killed (cancelled) once its consumer group has committed every offset, before it has
    finalised every window: a restart under the same group would read nothing, and the windows the
    killed job held in memory would be lost (Prism keeps no state for it). Started again under a new
    group it replays the topics from their earliest offset, rebuilds the twins' state exactly, and the
    sink adds only what the killed job had not written: every final row equals the batch run's, none
    twice, and samples in = counted + duplicates + dead letters."""
    broker, _ = kafka
    assert main(["publish", "--input", str(hospital / "in"), "--kafka_bootstrap", broker.bootstrap,
                 "--topic_prefix", "p3-"]) == 0
    topics = [f"p3-{stream}" for stream in STREAMS]
    out = hospital / "killed"
    # Bounded (--kafka_read_to_end) because Prism refuses the unbounded Kafka read (stable input).
    result = start_streaming_job(_kafka_argv(kafka, prism, "p3-", "medtwin-killed", out, "--kafka_read_to_end"))
    deadline = time.monotonic() + 300
    while (any(kafka_backlog(broker.bootstrap, topic, "medtwin-killed") for topic in topics)
           and time.monotonic() < deadline and not PipelineState.is_terminal(result.state)):
        time.sleep(0.2)
    assert not PipelineState.is_terminal(result.state), "the job ended before the kill"
    result.cancel()
    with pytest.raises(RuntimeError, match="CANCELLED"):
        result.wait_until_finish()
    batch = connect(str(hospital / "batch"))
    expected = batch.execute("select count(*) from patient_twin where is_final").fetchone()[0]
    killed = connect(str(out)).execute("select count(*) from patient_twin where is_final").fetchone()[0] \
        if table_files(out) else 0
    assert killed < expected, "the kill came after the last window was final"
    assert all(kafka_backlog(broker.bootstrap, topic, "medtwin-killed") == 0 for topic in topics)

    assert main(_kafka_argv(kafka, prism, "p3-", "medtwin-killed-restart", out, "--kafka_read_to_end")) == 0
    stream = connect(str(out))
    for table, key in (("patient_twin", "patient_key"), ("device_twin", "device_id")):
        assert accounting._final_rows(stream, table, key, set()) == accounting._final_rows(batch, table, key, set())
        assert accounting._doubled_final_windows(stream, table, key) == 0, table
    records = landed_records(str(hospital / "in"), "wearables")
    counted, duplicates, dead = accounting._wearable_counts(
        stream, (*accounting.WEARABLE_DEAD_LETTER_STAGES, "sink_patient_twin"))
    assert sum(accounting._samples_in(r) for r in records) == counted + duplicates + dead


def test_an_unbounded_kafka_read_on_prism_is_refused_at_launch(capsys, tmp_path):
    argv = ["run", "--streaming", "--source", "kafka", "--kafka_bootstrap", "127.0.0.1:9", "--kafka_wearables", "w",
            "--runner", "prism", "--demo", "--no_imaging", "--output", str(tmp_path)]
    assert main(argv) == 2
    assert "Prism cannot run an unbounded Kafka read" in capsys.readouterr().err


def test_flink_checkpointing_flags_reach_the_job_server():
    # FlinkRunner sends only options the Python SDK knows (retain_unknown_options=False):
    # launch.runners declares Beam's Flink fault-tolerance options so they are sent.
    from apache_beam.options.pipeline_options import PipelineOptions

    import launch.runners  # noqa: F401  (registers FlinkFaultToleranceOptions)

    options = PipelineOptions(["--runner=FlinkRunner", "--checkpointing_interval=30000", "--state_backend=rocksdb",
                               "--state_backend_storage_path=file:///tmp/checkpoints"])
    sent = options.get_all_options(retain_unknown_options=False)
    assert (sent["checkpointing_interval"], sent["state_backend"], sent["state_backend_storage_path"]) == (
        30000, "rocksdb", "file:///tmp/checkpoints")
