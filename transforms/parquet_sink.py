"""Parquet tables with a commit protocol: nothing lost, nothing doubled, under retries, re-runs and restarts.

In:  ``{table_name: PCollection[row dict]}`` (rows of `schemas.OUTPUT_TABLES`) and a `SinkConfig`.
Out: files under ``OUT/<table>/date=YYYY-MM-DD/`` (Hive layout, the date from the table's partition
     column); `WriteParquetTables` returns ``{table_name: PCollection[committed path]}``.

Every file is first written under the job's own temporary folder, ``OUT/_temporary/<job_id>/``,
with a name unique to the bundle attempt (a uuid), and only then moved into its table, the way
Beam's `fileio.WriteToFiles` and `filebasedsink` (`WriteToParquet`) do: a bundle that fails and
is retried leaves an orphan temporary file, never a half or second copy in the table. Readers
(`medtwin query`) glob ``OUT/<table>/**/*.parquet`` and never see ``_temporary``.

Batch (``--start/--end`` backfills and plain batch runs): a batch job *owns* a set of event days
(`SinkConfig.owned_dates`; a plain run owns every day its rows fall on) and replaces each owned
(table, day) partition whole. Rows of days it does not own are not written: they belong to the
job that owns that day. The files of a day are written by shard (``part-SSS-of-NNN.parquet``,
NNN from the day's row count and `SinkConfig.max_rows_per_file`, each row's shard from its
identity, rows sorted, so a re-run writes the same bytes and a write step holds about one file's
rows however big the day); once every file is written (the side-input
barrier: only successful bundles' outputs reach it), one commit step (`_CommitPartitionsFn`)
swaps each partition folder for the staged one in a single ``renameat2(RENAME_EXCHANGE)`` on a
local file system, so readers see the old day or the new day, never a mix; a partition left
without rows is removed. On object stores (``gs://``), which have no folder rename, the commit
moves each file into place (one object replace each) and then deletes the partition's other
files: readers listing in the middle of that can briefly see old and new shards together.
A retried commit is idempotent: a partition already holding this job's marker
(``_committed_by``) is left alone.

Streaming: rows are grouped per (day, shard) in the global window by `GroupIntoBatches` (after
`flush_rows` rows or `flush_seconds`, and at the end of a bounded input) and each flush is one
file, ``part-SSS-<job_id>-<digest of its rows>.parquet``: a job's files never overwrite another
job's. Before writing, a flush drops every row whose identity (`row_identity`: the table's
natural key) the partition already holds, reading the identity columns of files it has not read
yet, so a retried flush, or a second job over the same input (a restart that replays it),
adds nothing that is already there, and removes nothing either. One streaming job writes an
output at a time (two at once could both add a row neither had seen). A twin's *final* row for a
window the partition already holds as final is never written twice; if it stands for a different
number of records than the row there (`FINAL_ROW_RECORDS`: e.g. a job after a drain saw samples of
a window the drain had finalised early), it becomes a dead letter (stage ``sink_<table>``) that
names both counts and the job that wrote the row kept, with this row's record count; the same
final row again (a replay) is dropped silently, like every other row a partition holds already.

Why this is hand-made rather than `fileio.WriteToFiles` / `WriteToParquet`: (1) their final
rename does not create the ``date=`` folders (`fileio` makes only the root); (2) neither replaces
a partition: a re-run whose day now has fewer shards or no rows would keep the previous run's
files; (3) in streaming `WriteToFiles` needs windows or a trigger to close files, and the only
trigger that flushes a global window by time, a processing-time trigger, panics Prism 2.77
("assignment to entry in nil map" in its aggregate stage); event-time windows would instead name
files by time, but rows from the twins' timers may carry timestamps behind the watermark, which
the DirectRunner drops as late.

Fault injection (tests only): with `SinkConfig.fail_once_dir` set (``MEDTWIN_TEST_FAIL_ONCE_DIR``
in the environment of `medtwin run`), each write step raises once per bundle, after its file is
written (batch: before the commit; streaming: after the file is in the table), so the runner's
bundle retry is exercised at the worst moment. See `FailOncePerBundle`.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import hashlib
import os
import re
import shutil
import uuid
import zlib

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import window

from schemas import OUTPUT_TABLES, RecordDef, arrow_schema
from transforms import object_store
from transforms.dead_letters import DEAD_LETTERS, dead_letter

TEMPORARY = "_temporary"
COMMIT_MARKER = "_committed_by"

# A row's identity: the columns that name it, whatever its values. A twin's final row is one per
# window whatever its pane index (runners fire different early panes); its provisional rows are
# one per pane. Tables not listed are identified by every column.
ROW_IDENTITY = {
    "patient_twin": ("patient_key", "window_start", "is_final", "pane_index"),
    "device_twin": ("device_id", "window_start", "is_final", "pane_index"),
    "detections": ("sop_instance_uid",),
    "alerts": ("alert_id",),
}
# Tables with final rows, and the column saying how many input records a final row stands for.
# Their identity starts with the subject (patient_key, device_id).
FINAL_ROW_RECORDS = {"patient_twin": "sample_count", "device_twin": "event_count"}
# A streaming flush file's name: part-SSS-<job id>-<digest of its rows>.parquet.
_FLUSH_NAME = re.compile(r"part-\d{3}-(?P<job>.+)-[0-9a-f]{16}\.parquet$")


def partition_date(table: RecordDef, row: dict) -> str:
    """The ``YYYY-MM-DD`` (UTC) of `row`'s partition column."""
    value = row[table.partition_field]
    return value.astimezone(dt.timezone.utc).date().isoformat()


def _shard(row: dict, table: RecordDef, shards: int) -> int:
    """Streaming: the flush group of `row`, by its cluster columns (a row and its retries meet in one group)."""
    if shards == 1:
        return 0
    key = "|".join(str(row.get(c)) for c in table.cluster_fields)
    return zlib.crc32(key.encode("utf-8")) % shards


def shards_for(rows: int, max_rows_per_file: int) -> int:
    """Batch: how many files a partition of `rows` rows is written in."""
    return max(1, -(-rows // max_rows_per_file))


def _file_of(row: dict, table: RecordDef, shards: int) -> int:
    """Batch: which of a partition's `shards` files holds `row`, by its identity (even spread, same every run)."""
    return int.from_bytes(row_identity(table, row)[:8], "big") % shards


def identity_columns(table: RecordDef) -> tuple[str, ...]:
    return ROW_IDENTITY.get(table.name, table.names)


def row_identity(table: RecordDef, row: dict) -> bytes:
    """16 bytes naming `row` within its table (`ROW_IDENTITY`)."""
    values = [row.get(name) for name in identity_columns(table)]
    if "is_final" in identity_columns(table) and row.get("is_final"):
        values[identity_columns(table).index("pane_index")] = None
    text = "\x1f".join("" if v is None else v.isoformat() if isinstance(v, dt.datetime) else str(v) for v in values)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _sorted_table(table: RecordDef, rows, schema: pa.Schema) -> pa.Table:
    """Rows in a total order (partition, cluster columns, then the whole row), as one Arrow table."""
    order = [table.partition_field, *table.cluster_fields]
    rows = sorted(rows, key=lambda r: (tuple("" if r.get(c) is None else str(r.get(c)) for c in order),
                                       repr([r.get(n) for n in table.names])))
    return pa.Table.from_pylist(rows, schema=schema)


def _write(table: pa.Table, path: str) -> None:
    _ensure_parent(path)
    with FileSystems.create(path) as handle:
        pq.write_table(table, handle, compression="zstd")


def _is_local(path: str) -> bool:
    return "://" not in path


def _ensure_parent(path: str) -> None:
    if _is_local(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)


def partition_path(root: str, table: str, date: str) -> str:
    return FileSystems.join(root, table, f"date={date}")


def temporary_path(root: str, job_id: str, *parts: str) -> str:
    return FileSystems.join(root, TEMPORARY, job_id, *parts)


class FailOncePerBundle:
    """Test-only fault injector: `check(element)` raises once for each bundle's first element.

    The bundle is named by a digest of its first element (Python DoFns do not see bundle ids);
    a marker file in `directory` records that it failed, so the retried bundle passes. A runner
    that splits the retry differently fails each new first element once: every element fails at
    most once, and the job finishes. Never built unless `SinkConfig.fail_once_dir` is set.
    """

    def __init__(self, directory: str | None, step: str):
        self._directory = directory
        self._step = step
        self._checked = False

    def start_bundle(self):
        self._checked = False

    def check(self, element_key: str) -> None:
        if self._directory is None or self._checked:
            return
        self._checked = True
        name = hashlib.sha256(f"{self._step}|{element_key}".encode()).hexdigest()[:24]
        marker = os.path.join(self._directory, name)
        try:
            with open(marker, "x"):
                pass
        except FileExistsError:
            return
        beam.metrics.Metrics.counter("sink", "injected_bundle_failures").inc()
        raise RuntimeError(f"injected bundle failure in {self._step} (test flag MEDTWIN_TEST_FAIL_ONCE_DIR)")


# ----------------------------------------------------------------------------------------------- batch

class _PartitionFileFn(beam.DoFn):
    """What both writers share: the table, the output root, the job, and the test-only fault injector."""

    FAULT_STAGE = ""

    def __init__(self, table: RecordDef, root: str, job_id: str, fail_once_dir: str | None):
        self._table = table
        self._root = root
        self._job_id = job_id
        self._fail_once_dir = fail_once_dir

    def setup(self):
        self._schema = arrow_schema(self._table)
        self._faults = FailOncePerBundle(self._fail_once_dir, f"{self.FAULT_STAGE}:{self._table.name}")

    def start_bundle(self):
        self._faults.start_bundle()


class _WriteStagedFileFn(_PartitionFileFn):
    """((date, shard, shards), rows) -> (table, date, shard, shards, temporary path) of the file written."""

    FAULT_STAGE = "stage"

    def setup(self):
        super().setup()
        self._rows = beam.metrics.Metrics.distribution("sink", f"{self._table.name}_rows_per_file")

    def process(self, element):
        (date, shard, shards), rows = element
        table = _sorted_table(self._table, rows, self._schema)
        self._rows.update(table.num_rows)
        path = temporary_path(self._root, self._job_id, self._table.name, f"date={date}",
                              f"part-{shard:03d}-{uuid.uuid4().hex}.parquet")
        _write(table, path)
        self._faults.check(f"{date}|{shard}|{table.num_rows}")
        yield self._table.name, date, shard, shards, path


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), a)


def commit_partition(root: str, job_id: str, table: str, date: str, staged: list[tuple[int, str]],
                     shards: int, *, atomic_swap: bool = True) -> list[str]:
    """Replaces OUT/<table>/date=<date> with the `staged` (shard, temporary path) files; returns the
    committed paths. Idempotent: a partition this job already committed is left as it is."""
    final = partition_path(root, table, date)
    names = {shard: f"part-{shard:03d}-of-{shards:03d}.parquet" for shard, _ in staged}
    committed = [FileSystems.join(final, names[shard]) for shard, _ in sorted(staged)]
    if _is_local(root) and atomic_swap:
        _commit_local(root, job_id, table, date, staged, names)
        return committed
    for shard, path in staged:  # object stores: one object replace per file, then the leftovers go
        if FileSystems.exists(path):
            object_store.replace_file(path, FileSystems.join(final, names[shard]))
    existing = FileSystems.match([FileSystems.join(final, "*")])[0].metadata_list
    object_store.delete_files([m.path for m in existing if os.path.basename(m.path) not in names.values()])
    return committed


def _commit_local(root, job_id, table, date, staged, names) -> None:
    final = partition_path(root, table, date)
    marker = os.path.join(final, COMMIT_MARKER)
    if os.path.isfile(marker) and open(marker).read() == job_id:
        return  # a retried commit: this job's partition is in place already
    trash = temporary_path(root, job_id, "replaced", table, f"date={date}")
    if not staged:
        if os.path.isdir(final):
            os.makedirs(os.path.dirname(trash), exist_ok=True)
            os.rename(final, trash)  # a day without rows any more: the partition goes, in one rename
        return
    stage = temporary_path(root, job_id, "commit", table, f"date={date}")
    os.makedirs(stage, exist_ok=True)
    for shard, path in staged:
        if os.path.exists(path):
            os.replace(path, os.path.join(stage, names[shard]))
    with open(os.path.join(stage, COMMIT_MARKER), "w") as handle:
        handle.write(job_id)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if not os.path.isdir(final):
        os.rename(stage, final)
    elif not _exchange(stage, final):  # no exchange on this file system: two renames, a brief gap
        os.makedirs(os.path.dirname(trash), exist_ok=True)
        os.rename(final, trash)
        os.rename(stage, final)


class _CommitPartitionsFn(beam.DoFn):
    """(the one trigger element; side inputs: every staged file, every day with rows) -> committed paths."""

    def __init__(self, root: str, job_id: str, tables: tuple[str, ...], owned_dates, atomic_swap: bool = True):
        self._root = root
        self._job_id = job_id
        self._tables = tables
        self._owned = tuple(owned_dates) if owned_dates else None
        self._atomic_swap = atomic_swap

    def process(self, _, staged, dates):
        owned = self._owned or tuple(sorted(set(dates)))
        files, counts = {}, {}
        for table, date, shard, shards, path in staged:
            files.setdefault((table, date), []).append((shard, path))
            counts[table, date] = shards
        for table in self._tables:
            for date in owned:
                partition = files.get((table, date), [])
                if len({shard for shard, _ in partition}) != len(partition):
                    raise RuntimeError(f"{table} {date}: two staged files for one shard ({sorted(partition)}): "
                                       "the runner delivered a file group twice; nothing was committed for it")
                for path in commit_partition(self._root, self._job_id, table, date, partition,
                                             counts.get((table, date), 1), atomic_swap=self._atomic_swap):
                    yield table, path
        scratch = temporary_path(self._root, self._job_id)
        if _is_local(scratch):
            shutil.rmtree(scratch, ignore_errors=True)
            try:
                os.rmdir(os.path.dirname(scratch))  # _temporary itself, when no other job is writing
            except OSError:
                pass
        else:
            object_store.delete_files(object_store.list_objects(scratch.rstrip("/") + "/")
                                      if scratch.startswith("gs://") else [scratch])


# ------------------------------------------------------------------------------------------- streaming

class _AppendFlushFn(_PartitionFileFn):
    """((date, shard), rows) -> the path of the file written with the rows the partition lacks, if any;
    tagged ``dead_letters``: second final rows that stand for other records than the partition's."""

    FAULT_STAGE = "flush"

    def setup(self):
        super().setup()
        self._read = {}   # date -> paths whose rows are in self._known[date]
        self._known = {}  # date -> {identity: None, or for a final row (writer, record count)}
        self._records = FINAL_ROW_RECORDS.get(self._table.name)

    def _held(self, date: str) -> dict:
        """Identities of the rows in the partition's files (with their writer and record count if
        final), reading only files not read before."""
        known, read = self._known.setdefault(date, {}), self._read.setdefault(date, set())
        pattern = FileSystems.join(partition_path(self._root, self._table.name, date), "*.parquet")
        columns = list(dict.fromkeys([*identity_columns(self._table), *([self._records] if self._records else [])]))
        for metadata in FileSystems.match([pattern])[0].metadata_list:
            if metadata.path in read:
                continue
            with FileSystems.open(metadata.path) as handle:
                held = pq.read_table(handle, columns=columns).to_pylist()
            writer = _writer_of(metadata.path)
            known.update((row_identity(self._table, row), self._final(row, writer)) for row in held)
            read.add(metadata.path)
        return known

    def _final(self, row: dict, writer: str):
        return (writer, row[self._records]) if self._records and row.get("is_final") else None

    def process(self, element):
        (date, shard), rows = element
        known = self._held(date)
        fresh = {}
        for row in rows:
            fresh.setdefault(row_identity(self._table, row), row)
        rows = []
        for identity, row in fresh.items():
            if identity not in known:
                rows.append(row)
            elif known[identity] is not None and known[identity][1] != row[self._records]:
                yield beam.pvalue.TaggedOutput(DEAD_LETTERS, self._second_final(row, *known[identity]))
        if rows:
            table = _sorted_table(self._table, rows, self._schema)
            final = FileSystems.join(partition_path(self._root, self._table.name, date),
                                     f"part-{shard:03d}-{self._job_id}-{_digest(table)}.parquet")
            staged = temporary_path(self._root, self._job_id, self._table.name, f"date={date}",
                                    f"{uuid.uuid4().hex}.parquet")
            _write(table, staged)
            object_store.replace_file(staged, final)
            known.update((identity, self._final(row, self._job_id)) for identity, row in fresh.items()
                         if identity not in known)
            self._read[date].add(final)
            beam.metrics.Metrics.counter("sink", f"{self._table.name}_rows").inc(len(rows))
            self._faults.check(f"{date}|{shard}|{final}")
            yield final

    def _second_final(self, row: dict, writer: str, held_records: int) -> dict:
        """The dead letter of a final row whose window the partition holds as final with other records."""
        subject = identity_columns(self._table)[0]
        window = f"{row['window_start'].isoformat()}/{row['window_end'].isoformat()}"
        return dead_letter(
            f"sink_{self._table.name}",
            f"window {window} of {subject} {row[subject]} is final already ({held_records} {self._records} in "
            f"the {self._table.name} row written by {writer}); this final row of {row[self._records]} is not "
            f"written: the window closed before these records were all seen",
            {subject: row[subject], "window_start": row["window_start"].isoformat(),
             self._records: row[self._records], f"final_{self._records}": held_records, "written_by": writer},
            recorded_at=row["window_end"], event_time=row["window_start"], record_count=row[self._records])


def _writer_of(path: str) -> str:
    """Which job wrote a partition file: a streaming job (by its id), or a batch run."""
    match = _FLUSH_NAME.search(os.path.basename(path))
    return f"job {match.group('job')}" if match else "a batch run"


def _digest(table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ composites

class WriteParquetTables(beam.PTransform):
    """``{table_name: PCollection[row]}`` -> Parquet under `config.output`; ``{table_name: committed paths}``."""

    def __init__(self, config):
        super().__init__()
        self._config = config

    def expand(self, tables: dict):
        if self._config.streaming:
            return self._append(tables)
        config = self._config
        owned = set(config.owned_dates) if config.owned_dates else None
        staged, dates = [], []
        for name, rows in tables.items():
            table = OUTPUT_TABLES[name]
            if owned is not None:
                rows = rows | f"OwnedDays_{name}" >> beam.Filter(lambda row, t=table: partition_date(t, row) in owned)
            staged.append(rows | f"Stage_{name}" >> _StageFiles(table, config))
            if owned is None:
                dates.append(rows | f"Days_{name}" >> beam.Map(lambda row, t=table: partition_date(t, row)))
        pipeline = next(iter(tables.values())).pipeline
        all_staged = staged | "AllStagedFiles" >> beam.Flatten(pipeline=pipeline)
        all_dates = (dates or [pipeline | "NoDays" >> beam.Create([])]) | "AllDays" >> beam.Flatten(
            pipeline=pipeline) | "DistinctDays" >> beam.Distinct()
        committed = (
            pipeline
            | "CommitOnce" >> beam.Create([None])
            | "CommitPartitions" >> beam.ParDo(
                _CommitPartitionsFn(config.output, config.job_id, tuple(tables), config.owned_dates),
                staged=beam.pvalue.AsList(all_staged), dates=beam.pvalue.AsList(all_dates))
        )
        return {name: committed | f"Committed_{name}" >> beam.FlatMap(
                    lambda item, n=name: [item[1]] if item[0] == n else [])
                for name in tables}

    def _append(self, tables: dict) -> dict:
        """Streaming: each table's flushes; the dead letters of second final rows join ``dead_letters``."""
        written, refused = {}, []
        for name, rows in tables.items():
            if name == DEAD_LETTERS:
                continue
            flushed = rows | f"Append_{name}" >> _AppendFlushes(OUTPUT_TABLES[name], self._config)
            written[name] = flushed.paths
            if name in FINAL_ROW_RECORDS:
                refused.append(flushed[DEAD_LETTERS])
        dead = ([tables[DEAD_LETTERS] | "DeadLettersGlobal" >> beam.WindowInto(window.GlobalWindows())]
                if DEAD_LETTERS in tables else [])
        if dead or refused:
            pipeline = next(iter(tables.values())).pipeline
            all_dead = [*dead, *refused] | "WithSecondFinalRows" >> beam.Flatten(pipeline=pipeline)
            written[DEAD_LETTERS] = (all_dead | f"Append_{DEAD_LETTERS}"
                                     >> _AppendFlushes(OUTPUT_TABLES[DEAD_LETTERS], self._config)).paths
        return written


class _StageFiles(beam.PTransform):
    """Batch rows of one table -> (table, date, shard, shards, temporary path) per file of a day.

    A day of N rows is written in ``ceil(N / max_rows_per_file)`` files (`shards_for`; N counted
    first, a side input), rows spread over them by identity: the rows one write step holds are
    about `max_rows_per_file`, whatever the day's size, and the files' parallelism grows with it.
    """

    def __init__(self, table: RecordDef, config):
        super().__init__()
        self._table = table
        self._config = config

    def expand(self, rows):
        table, config = self._table, self._config
        dated = rows | "WithDay" >> beam.Map(lambda row: (partition_date(table, row), row))
        shards = (dated
                  | "Days" >> beam.Keys()
                  | "RowsPerDay" >> beam.combiners.Count.PerElement()
                  | "FilesPerDay" >> beam.MapTuple(lambda day, n: (day, shards_for(n, config.max_rows_per_file))))

        def by_file(date, row, shards_of=None):  # MapTuple wants a default for a side input
            return (date, _file_of(row, table, shards_of[date]), shards_of[date]), row

        return (dated
                | "ByDateAndFile" >> beam.MapTuple(by_file, shards_of=beam.pvalue.AsDict(shards))
                | "GroupFiles" >> beam.GroupByKey()
                | "WriteStaged" >> beam.ParDo(
                    _WriteStagedFileFn(table, config.output, config.job_id, config.fail_once_dir)))


class _AppendFlushes(beam.PTransform):
    """Streaming rows of one table -> ``paths`` of the flush files written (rows the partition lacked),
    and ``dead_letters`` (second final rows, see the module docstring)."""

    def __init__(self, table: RecordDef, config):
        super().__init__()
        self._table = table
        self._config = config

    def expand(self, rows):
        table, config = self._table, self._config
        return (rows
                | "GlobalWindow" >> beam.WindowInto(window.GlobalWindows())
                | "ByDateAndShard" >> beam.Map(lambda row: (
                    (partition_date(table, row), _shard(row, table, config.shards)), row))
                | "FlushEvery" >> beam.GroupIntoBatches(
                    config.flush_rows, max_buffering_duration_secs=config.flush_seconds)
                | "AppendNew" >> beam.ParDo(_AppendFlushFn(table, config.output, config.job_id, config.fail_once_dir))
                .with_outputs(DEAD_LETTERS, main="paths"))
