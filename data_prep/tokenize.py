"""`prism-prep tokenize`: corpus files -> a token store, in parallel, resumable, never losing input.

The run is planned up front from the input list: the inputs are cut into shards of about
``shard_bytes`` (a shard is a list of pieces: byte ranges of .txt/.jsonl files, whole .jsonl.gz
files, row groups of .parquet files), so the same command always plans the same shards. Each shard
is written by one worker process, committed by a rename (store.ShardWriter) and then recorded in a
done-file with its bad-input counts. A rerun skips recorded shards and redoes the rest; the
manifest is written last. Documents are streamed and encoded in batches of ``batch_bytes``, so
memory does not grow with the corpus. Reading documents and counting bad input: sources.py.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import json
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence

from tqdm import tqdm

from prism_megatron.data_prep.sources import (FileReport, InputError, Piece, Progress,
                                              combine_reports, discover_inputs, file_pieces,
                                              print_report, read_piece, write_report)
from prism_megatron.data_prep.store import (ShardInfo, ShardWriter, read_shard_info,
                                            token_dtype_for, write_manifest)
from prism_megatron.data_prep.tokenizer import Tokenizer
from prism_megatron.files import disk_error_reason, write_atomic

PREP_DIR = ".prep"  # plan, lock and per-shard done-files of a run in progress
SHARD_BYTES = 64 << 20  # small enough that 2 workers finish together on a 1 GB corpus
BATCH_BYTES = 4 << 20


class WorkerError(RuntimeError):
    """A worker failed (disk full, killed, ...); what is committed stays, a rerun resumes."""


# --- planning -------------------------------------------------------------------------------------

def plan_shards(files: Sequence[str], shard_bytes: int) -> list[list[Piece]]:
    """Cut the inputs, in order, into shards of about ``shard_bytes`` on disk.

    Uncompressed text is treated as one byte stream cut every ``shard_bytes`` (a long file spans
    shards, small files share one); .jsonl.gz files and parquet row groups are not split.
    """
    shards: list[list[Piece]] = []
    current: list[Piece] = []
    room = shard_bytes

    def close() -> None:
        nonlocal current, room
        shards.append(current)
        current, room = [], shard_bytes

    for path in files:
        if path.endswith((".txt", ".jsonl")):
            size = os.path.getsize(path)
            if size == 0:
                current.append(Piece(path, 0, 0, 0))
            position = 0
            while position < size:
                take = min(room, size - position)
                current.append(Piece(path, position, position + take, take))
                position += take
                room -= take
                if room <= 0:
                    close()
        else:
            for piece in file_pieces(path):
                current.append(piece)
                room -= piece.size
                if room <= 0:
                    close()
    if current:
        close()
    return shards


def part_of_plan(num_planned: int, num_parts: int | None, part: int | None) -> range:
    """The contiguous run of shard indices that part ``part`` of ``num_parts`` writes."""
    if num_parts is None and part is None:
        return range(num_planned)
    if num_parts is None or part is None or not 0 <= part < num_parts:
        raise InputError(f"--num-shards and --shard-index go together, with 0 <= shard-index < "
                         f"num-shards (got {num_parts} and {part})")
    return range(num_planned * part // num_parts, num_planned * (part + 1) // num_parts)


# --- the worker -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ShardTask:
    index: int
    pieces: list[Piece]
    shard_path: str
    done_path: str
    text_key: str
    token_dtype: str
    batch_bytes: int


def _worker_main(tokenizer_path: str, tasks: list[ShardTask], next_task, documents, bytes_read,
                 errors, parent_pid: int) -> None:
    """A worker process: takes the next unclaimed shard until none is left."""
    # Die with the parent: an orphan still writing a shard would race the rerun that resumes it.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    try:
        tokenizer = Tokenizer(tokenizer_path)
        while (i := _count(next_task, 1)) < len(tasks):
            tokenize_shard(tasks[i], tokenizer, documents, bytes_read)
    except Exception as e:
        errors.put(str(e))
        raise SystemExit(1)


def _batches(documents: Iterator[str], batch_bytes: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for document in documents:
        batch.append(document)
        size += len(document)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _count(counter, amount: int) -> int:
    """Add to a shared counter; returns its value before."""
    with counter.get_lock():
        counter.value += amount
        return counter.value - amount


def tokenize_shard(task: ShardTask, tokenizer: Tokenizer, documents_done, bytes_read) -> None:
    """Write one shard and its done-file, adding to the shared progress counters."""
    reports: dict[str, FileReport] = {}
    progress = Progress()

    def documents() -> Iterator[str]:
        for piece in task.pieces:
            report = reports.setdefault(piece.path, FileReport())
            yield from read_piece(piece, task.text_key, report, progress)

    # Committed but not recorded (killed between the two): its counts are lost, so redo it.
    shutil.rmtree(task.shard_path, ignore_errors=True)
    reported = 0
    try:
        with ShardWriter(task.shard_path, task.token_dtype) as writer:
            for batch in _batches(documents(), task.batch_bytes):
                writer.add_documents(tokenizer.encode_arrays(batch))
                _count(documents_done, len(batch))
                _count(bytes_read, progress.bytes - reported)
                reported = progress.bytes
            info = writer.commit()
    except Exception as e:
        files = ", ".join(dict.fromkeys(p.path for p in task.pieces))
        raise WorkerError(f"writing shard {task.shard_path} from {files} failed: "
                          f"{disk_error_reason(e) or repr(e)}") from e
    _count(bytes_read, progress.bytes - reported)
    record = {"shard": dataclasses.asdict(info),
              "pieces": [dataclasses.asdict(p) for p in task.pieces],
              "files": {path: dataclasses.asdict(r) for path, r in reports.items()}}
    write_atomic(task.done_path, json.dumps(record, indent=1))


# --- the run --------------------------------------------------------------------------------------

def _load_done(done_path: str, shard_path: str, pieces: list[Piece]) -> dict | None:
    """The done-file of a shard that is committed and recorded, else None."""
    try:
        with open(done_path) as f:
            record = json.load(f)
        info = read_shard_info(shard_path)
    except (OSError, ValueError):
        return None
    if (record["pieces"] != [dataclasses.asdict(p) for p in pieces]
            or record["shard"]["sha256"] != info.sha256):
        return None
    return record


def _acquire_lock(prep_dir: str):
    lock = open(os.path.join(prep_dir, "lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise InputError(f"another prism-prep tokenize is writing {os.path.dirname(prep_dir)}")
    return lock


def _check_same_run(plan_path: str, run: dict) -> None:
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            previous = json.load(f)
        changed = [k for k in run if previous.get(k) != run[k]]
        if changed:
            raise InputError(
                f"{os.path.dirname(os.path.dirname(plan_path))} holds a run with different "
                f"{', '.join(changed)}; resume with the same command or use a new output folder")
    else:
        write_atomic(plan_path, json.dumps(run, indent=1))


def _run_workers(tasks: list[ShardTask], tokenizer_path: str, workers: int, total_bytes: int,
                 done_bytes: int) -> None:
    context = multiprocessing.get_context("spawn")  # zarr's event loop does not survive fork
    next_task, documents, bytes_read = (context.Value("q", 0) for _ in range(3))
    errors = context.Queue()
    processes = [context.Process(target=_worker_main, daemon=True,
                                 args=(tokenizer_path, tasks, next_task, documents, bytes_read,
                                       errors, os.getpid()))
                 for _ in range(min(workers, len(tasks)))]
    bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True,
               desc="tokenize", mininterval=1.0, file=sys.stderr)
    start = time.monotonic()
    for process in processes:
        process.start()
    try:
        while not all(p.exitcode == 0 for p in processes):
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if failed:
                message = f"a worker process died (exit code {failed[0]})"
                if failed[0] > 0:  # its error; a killed worker (OOM killer, kill -9) left none
                    try:
                        message = errors.get(timeout=10)
                    except queue.Empty:
                        pass
                raise WorkerError(f"{message}; run the same command again to resume")
            bar.update(done_bytes + bytes_read.value - bar.n)
            elapsed = max(time.monotonic() - start, 1e-9)
            bar.set_postfix_str(f"{documents.value / elapsed:,.0f} docs/s", refresh=False)
            time.sleep(0.5)
        bar.update(done_bytes + bytes_read.value - bar.n)
    finally:
        for process in processes:
            process.kill()
            process.join()
        bar.close()


def tokenize_corpus(inputs: Sequence[str], tokenizer_path: str, output_store: str,
                    workers: int = 1, text_key: str = "text", num_shards: int | None = None,
                    shard_index: int | None = None, shard_bytes: int = SHARD_BYTES,
                    batch_bytes: int = BATCH_BYTES) -> str:
    """Tokenize ``inputs`` into the token store ``output_store``; rerun to resume. Returns the
    store's path. ``num_shards``/``shard_index`` select part of the planned work (one machine's
    share: join the parts' stores with ``prism-prep merge``)."""
    files = discover_inputs(inputs)
    tokenizer = Tokenizer(tokenizer_path)
    identity = tokenizer.identity()
    token_dtype = token_dtype_for(tokenizer.vocab_size)
    plan = plan_shards(files, shard_bytes)
    part = part_of_plan(len(plan), num_shards, shard_index)

    prep_dir = os.path.join(output_store, PREP_DIR)
    done_dir = os.path.join(prep_dir, "done")
    os.makedirs(done_dir, exist_ok=True)
    os.makedirs(os.path.join(output_store, "shards"), exist_ok=True)
    lock = _acquire_lock(prep_dir)
    try:
        run = {"inputs": [[p, os.path.getsize(p), os.stat(p).st_mtime_ns] for p in files],
               "tokenizer": {k: v for k, v in identity.items() if k != "path"},
               "text_key": text_key, "shard_bytes": shard_bytes,
               "num_shards": num_shards, "shard_index": shard_index}
        _check_same_run(os.path.join(prep_dir, "plan.json"), run)
        tasks = [ShardTask(i, plan[i], os.path.join(output_store, "shards", f"{i:05d}.zarr"),
                           os.path.join(done_dir, f"{i:05d}.json"), text_key, token_dtype,
                           batch_bytes) for i in part]
        records = {t.index: _load_done(t.done_path, t.shard_path, t.pieces) for t in tasks}
        pending = [t for t in tasks if records[t.index] is None]
        if pending:
            total = sum(p.size for t in tasks for p in t.pieces)
            done = total - sum(p.size for t in pending for p in t.pieces)
            if done:
                print(f"resuming: {len(tasks) - len(pending)} of {len(tasks)} shards already "
                      f"written", file=sys.stderr)
            _run_workers(pending, tokenizer_path, workers, total, done)
            for t in pending:
                records[t.index] = _load_done(t.done_path, t.shard_path, t.pieces)

        report = combine_reports(records[t.index]["files"] for t in tasks)
        write_report(output_store, report)
        shards = [ShardInfo(t.shard_path, **{k: records[t.index]["shard"][k] for k in
                                             ("num_documents", "num_tokens", "sha256")})
                  for t in tasks]
        write_manifest(output_store, identity, token_dtype, shards)
    finally:
        lock.close()
    print_report(report, output_store)
    return output_store
