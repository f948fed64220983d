"""Tokenize a folder tree into token shards with parallel worker processes.

:func:`encode_dataset` lists the files of one modality under the input folder, fixes
their order in ``files.jsonl`` and cuts that list into shards of ``shard_size`` files.
Worker processes encode whole shards, and a shard is written only when all of its files
are done (see :mod:`mmtok.shards`). A run that is killed therefore loses at most the
shards in progress, and running the same command again encodes exactly the shards that
are not complete. Files that fail are listed with the reason and do not stop the run;
``retry_failed`` encodes the shards that contain them again.

Several jobs can share one output folder on a shared file system: job ``i`` of ``n``
(``job_index``, ``num_jobs``) encodes the shards whose number is ``i`` modulo ``n``.

Workers ignore SIGINT, so Ctrl-C reaches only the main process, which stops the workers
and raises :class:`EncodeInterrupted`.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from mmtok.errors import MmtokError
from mmtok.modality import atomic_output
from mmtok.shards import (
    DATASET_FILE,
    ERRORS_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    PLAN_FILE,
    SHARDS_DIR,
    ids_dtype,
    index_path,
    read_dataset_info,
    read_json_lines,
    shard_stem,
    write_json_lines,
    write_shard,
)

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 256

# Seconds that stopped workers get to exit before they are killed.
_STOP_TIMEOUT = 5.0


class EncodeInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`encode_dataset`; the complete shards are kept.

    Attributes:
        remaining_files: input files of this job in shards that are still not complete.
    """

    def __init__(self, remaining_files: int) -> None:
        super().__init__(f"interrupted; {remaining_files} files remain")
        self.remaining_files = remaining_files


@dataclass
class EncodeSummary:
    """Counts of one run of :func:`encode_dataset`.

    Attributes:
        files: input files in the plan, over all shards.
        shards: shards in the plan.
        shards_done_before: shards of this job that were complete when the run started
            and that this run did not encode again.
        shards_encoded: shards this run wrote.
        encoded: files this run encoded.
        failed: files this run could not encode; ``errors.jsonl`` lists them.
        seconds: wall-clock time of the encoding, without planning.
        failed_before: files that failed in earlier runs, in complete shards of this job
            that this run did not encode again (see ``retry_failed``).
        missing: files of ``files.jsonl`` that are no longer in the input folder.
    """

    files: int
    shards: int
    shards_done_before: int
    shards_encoded: int
    encoded: int
    failed: int
    seconds: float
    failed_before: int = 0
    missing: int = 0


# Planning ---------------------------------------------------------------------------


def list_input_files(input_dir: Path, accepts: Callable[[Path], bool], exclude: Path | None = None) -> list[str]:
    """Return the relative paths (``/``-separated, sorted) of the accepted files under ``input_dir``.

    Files and folders whose name starts with a dot are skipped, and so is ``exclude``.
    """
    input_dir = Path(input_dir)
    found = []
    for root, folders, files in os.walk(input_dir):
        folders[:] = sorted(
            name for name in folders if not name.startswith(".") and (exclude is None or Path(root, name) != exclude)
        )
        for name in files:
            path = Path(root, name)
            if not name.startswith(".") and accepts(path):
                found.append(path.relative_to(input_dir).as_posix())
    return sorted(found)


def _write_dataset_info(output_dir: Path, info: dict[str, Any]) -> None:
    path = output_dir / DATASET_FILE
    if not path.is_file():
        with atomic_output(path, force=True) as temporary:
            temporary.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return
    existing = read_dataset_info(output_dir)
    existing.setdefault("encode_options", {})  # folders from before the field existed
    labels = (
        ("modality", "modality"),
        ("tokenizer_hash", "tokenizer weights"),
        ("shard_size", "shard size"),
        ("encode_options", "encode options"),
    )
    for key, label in labels:
        if existing.get(key) != info[key]:
            raise MmtokError(
                f"{path}: this folder was encoded with {label} {existing.get(key)!r}, not {info[key]!r}; "
                "rerun with the same arguments, or choose a new output folder"
            )


def _plan(output_dir: Path, found: list[str], shard_size: int) -> list[str | None]:
    """Return the file order of the output folder, appending files new since the last run.

    New files start a new shard, because the shards of earlier runs may be complete
    already: ``None`` entries pad the last earlier shard to ``shard_size``.
    """
    path = output_dir / PLAN_FILE
    if not path.is_file():
        write_json_lines(path, found)
        return list(found)
    planned = read_json_lines(path)
    known = set(planned)
    new = [name for name in found if name not in known]
    if new:
        logger.warning("%d files are new since the first run; they are added as new shards", len(new))
        planned = planned + [None] * (-len(planned) % shard_size) + new
        write_json_lines(path, planned)
    return planned


# Workers ----------------------------------------------------------------------------


@dataclass
class _Job:
    """Settings that every worker needs to encode shards, sent to each worker once."""

    input_dir: Path
    output_dir: Path
    modality: str
    tokenizer: str
    tokenizer_hash: str
    device: str
    options: dict[str, Any]


_worker: dict[str, Any] = {}


def _set_parent_death_signal() -> None:
    """Ask Linux to kill this worker when its parent dies, so no orphan keeps writing shards."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 is PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start_worker(job: _Job, report_files: Callable[[int], None], threads: int) -> None:
    from mmtok import api
    from mmtok.plugins import get_plugin_manager

    torch.set_num_threads(threads)
    tokenizer = api.load_tokenizer(job.tokenizer, job.modality, job.device)
    if tokenizer.weights_hash() != job.tokenizer_hash:
        raise MmtokError(
            f"{job.tokenizer}: weights hash {tokenizer.weights_hash()} differs from {job.tokenizer_hash}, "
            "which this output folder was encoded with"
        )
    _worker.update(
        job=job,
        tokenizer=tokenizer,
        reader=get_plugin_manager().modality(job.modality),
        dtype=ids_dtype(tokenizer.vocab_size),
        report_files=report_files,
    )


def _encode_file(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    tokenizer = _worker["tokenizer"]
    sample = _worker["reader"].read(path)
    with torch.no_grad():
        tokens = tokenizer.encode(sample, **_worker["job"].options)
    codes = tokens.codes.cpu().numpy()
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= tokenizer.vocab_size):
        raise MmtokError(f"{path}: the tokenizer produced ids outside [0, {tokenizer.vocab_size})")
    return codes, tokens.metadata


def _encode_shard(index: int, names: list[str]) -> tuple[int, int, int]:
    """Encode the files ``names`` as shard ``index``; return ``(index, encoded, failed)``.

    A complete shard that is encoded again (to retry its failed files) is first marked
    incomplete by deleting its index, so that a kill in the middle leaves it to the next run.
    """
    job: _Job = _worker["job"]
    index_path(job.output_dir, index).unlink(missing_ok=True)
    items, errors = [], []
    for name in names:
        path = job.input_dir / name
        try:
            codes, metadata = _encode_file(path)
            items.append((name, codes, metadata))
        except MmtokError as error:
            message = str(error)
            errors.append({"path": name, "error": message if str(path) in message else f"{path}: {message}"})
        except Exception as error:  # noqa: BLE001 - one bad file must not stop the dataset
            errors.append({"path": name, "error": f"{path}: unexpected {type(error).__name__}: {error}"})
        _worker["report_files"](1)
    write_shard(job.output_dir, index, items, errors, job.tokenizer_hash, _worker["dtype"])
    return index, len(items), len(errors)


def _worker_main(job: _Job, threads: int, tasks: Any, messages: Any) -> None:
    """Encode shards from ``tasks`` until a ``None`` arrives, sending progress and results to ``messages``.

    Messages are ``("files", count)``, ``("shard", (index, encoded, failed))`` and
    ``("error", text)`` when the worker cannot start.
    """
    # Workers start with SIGINT ignored, as the main process ignores it while starting them.
    # Setting it again keeps Ctrl-C away whatever started the worker, so only the main
    # process stops them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_parent_death_signal()
    try:
        _start_worker(job, lambda count: messages.put(("files", count)), threads)
    except Exception as error:  # noqa: BLE001 - reported to the main process, which raises it
        text = str(error) if isinstance(error, MmtokError) else f"unexpected {type(error).__name__}: {error}"
        messages.put(("error", f"a worker could not start: {text}"))
        return
    while True:
        task = tasks.get()
        if task is None:
            return
        messages.put(("shard", _encode_shard(*task)))


# The run ----------------------------------------------------------------------------


def encode_dataset(
    input_dir: Path,
    output_dir: Path,
    modality: str,
    tokenizer: str | None = None,
    *,
    workers: int = 1,
    shard_size: int = DEFAULT_SHARD_SIZE,
    job_index: int = 0,
    num_jobs: int = 1,
    retry_failed: bool = False,
    device: str = "cpu",
    threads: int = 1,
    options: dict[str, Any] | None = None,
    show_progress: bool = False,
) -> EncodeSummary:
    """Encode every ``modality`` file under ``input_dir`` into token shards in ``output_dir``.

    Args:
        input_dir: the folder tree to read; files are chosen by the modality's suffixes.
        output_dir: the shard folder, created when missing. An existing one must have
            been made with the same modality, tokenizer weights and shard size.
        modality: a registered modality name.
        tokenizer: a tokenizer name or folder; the modality's default when None.
        workers: encoding processes. 1 encodes in this process.
        shard_size: files per shard; fixed by the first run into ``output_dir``.
        job_index: which of ``num_jobs`` jobs this is, from 0.
        num_jobs: jobs sharing the output folder; this one encodes the shards whose
            number modulo ``num_jobs`` is ``job_index``.
        retry_failed: also encode again every complete shard of this job that lists
            failed files. The whole shard is encoded again, not only its failed files.
        device: torch device of the tokenizer in each worker.
        threads: torch CPU threads of each worker. Processes scale better than threads
            here, and one thread per worker does not oversubscribe the cores.
        options: keyword options of the tokenizer's ``encode``, such as the image
            tokenizer's ``resize``. They are recorded in ``dataset.json``, and a later run
            into the same folder must pass the same ones.
        show_progress: draw a progress bar of files on stderr.

    Raises:
        EncodeInterrupted: on Ctrl-C (a ``KeyboardInterrupt``), after the workers have
            stopped and ``errors.jsonl`` has been rewritten; the complete shards are kept.
    """
    from mmtok import api
    from mmtok.plugins import get_plugin_manager

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise MmtokError(f"{input_dir}: folder not found")
    if workers < 1 or shard_size < 1 or num_jobs < 1 or not 0 <= job_index < num_jobs:
        raise MmtokError(
            f"need workers >= 1, shard_size >= 1 and 0 <= job_index < num_jobs, got {workers}, {shard_size}, "
            f"{job_index} and {num_jobs}"
        )
    entry = get_plugin_manager().modality(modality)
    name = tokenizer or entry.default_tokenizer
    if not name:
        raise MmtokError(f"modality {modality!r} has no default tokenizer; pass --tokenizer")
    loaded = api.load_tokenizer(name, modality)
    options = dict(options or {})
    loaded.check_encode_options(options)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / SHARDS_DIR).mkdir(exist_ok=True)
    info = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "modality": modality,
        "tokenizer": loaded.name_or_path,
        "tokenizer_hash": loaded.weights_hash(),
        "vocab_size": loaded.vocab_size,
        "ids_dtype": ids_dtype(loaded.vocab_size).name,
        "shard_size": shard_size,
        "encode_options": options,
    }
    _write_dataset_info(output_dir, info)

    found = list_input_files(input_dir, entry.accepts, exclude=output_dir.resolve())
    planned = _plan(output_dir, found, shard_size)
    missing = _warn_missing_inputs(output_dir, planned, found)
    count = -(-len(planned) // shard_size)
    own = [index for index in range(count) if index % num_jobs == job_index]
    pending = [index for index in own if not index_path(output_dir, index).is_file()]
    failed_shards = {index: len(_shard_errors(output_dir, index)) for index in own if index not in pending}
    failed_shards = {index: failed for index, failed in failed_shards.items() if failed}
    failed_before = sum(failed_shards.values())
    if retry_failed:
        pending = sorted(set(pending) | set(failed_shards))
        failed_before = 0
    elif failed_before:
        logger.warning(
            "%d %s failed in earlier runs and %s not retried; pass --retry-failed to encode the shards with failures "
            "again", failed_before, "file" if failed_before == 1 else "files", "is" if failed_before == 1 else "are",
        )
    _remove_temporary_files(output_dir, set(pending))
    tasks = [
        (index, [name for name in planned[index * shard_size : (index + 1) * shard_size] if name is not None])
        for index in pending
    ]
    done_before = len(own) - len(pending)
    logger.info(
        "%d %s files in %d shards; this job encodes %d shards, %d were done before",
        len(planned), modality, count, len(pending), done_before,
    )

    job = _Job(input_dir, output_dir, modality, name, info["tokenizer_hash"], str(api.resolve_device(device)), options)
    started = time.perf_counter()
    progress = tqdm(
        total=sum(len(names) for _, names in tasks), desc=f"encoding {modality}", unit="file",
        disable=not show_progress, dynamic_ncols=True,
    )
    results: list[tuple[int, int, int]] = []
    try:
        if workers == 1:
            _run_here(job, tasks, progress, threads, results)
        else:
            _run_in_workers(job, tasks, progress, workers, threads, results)
    except KeyboardInterrupt:
        # The workers have stopped (see _run_in_workers); a second Ctrl-C must not cut
        # short the bookkeeping below, which takes milliseconds.
        with _sigint_ignored():
            progress.close()
            _merge_errors(output_dir, count)
            remaining = sum(len(names) for index, names in tasks if not index_path(output_dir, index).is_file())
        raise EncodeInterrupted(remaining) from None
    finally:
        progress.close()
    seconds = time.perf_counter() - started

    _merge_errors(output_dir, count)
    encoded = sum(result[1] for result in results)
    failed = sum(result[2] for result in results)
    if failed:
        logger.warning(
            "%d %s could not be encoded; %s lists them", failed, "file" if failed == 1 else "files",
            output_dir / ERRORS_FILE,
        )
    files = sum(name is not None for name in planned)
    return EncodeSummary(
        files, count, done_before, len(results), encoded, failed, seconds,
        failed_before=failed_before, missing=missing,
    )


def _warn_missing_inputs(output_dir: Path, planned: list[str | None], found: list[str]) -> int:
    """Log the planned files that are gone from the input folder; return how many there are."""
    present = set(found)
    missing = [name for name in planned if name is not None and name not in present]
    if missing:
        logger.warning(
            "%d files of %s are no longer in the input folder (first: %s); complete shards keep their tokens, "
            "and shards not yet encoded will list them as failed",
            len(missing), output_dir / PLAN_FILE, missing[0],
        )
    return len(missing)


def _shard_errors(output_dir: Path, index: int) -> list[dict[str, str]]:
    path = output_dir / SHARDS_DIR / f"{shard_stem(index)}.errors.jsonl"
    return read_json_lines(path) if path.is_file() else []


class _sigint_ignored:
    """Context manager that ignores SIGINT inside it, where this is the main thread."""

    def __enter__(self) -> None:
        self.active = threading.current_thread() is threading.main_thread()
        if self.active:
            self.previous = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc_info: Any) -> None:
        if self.active:
            # signal.signal returns None for a handler that was not set from Python.
            signal.signal(signal.SIGINT, signal.SIG_DFL if self.previous is None else self.previous)


def _run_here(
    job: _Job, tasks: list[tuple[int, list[str]]], progress: tqdm, threads: int, results: list[tuple[int, int, int]]
) -> None:
    previous_threads = torch.get_num_threads()
    _start_worker(job, progress.update, threads)
    try:
        for index, names in tasks:
            results.append(_encode_shard(index, names))
    finally:
        _worker.clear()
        torch.set_num_threads(previous_threads)


def _run_in_workers(
    job: _Job, tasks: list[tuple[int, list[str]]], progress: tqdm, workers: int, threads: int,
    results: list[tuple[int, int, int]],
) -> None:
    """Encode ``tasks`` in worker processes, appending each finished shard to ``results``.

    On any exception, KeyboardInterrupt included, the workers are terminated before it
    propagates, and the shards they had in progress stay incomplete.
    """
    # Spawned, not forked: a fork of a process that has started torch's thread pools can
    # deadlock in the child.
    context = multiprocessing.get_context("spawn")
    task_queue = context.Queue()
    messages = context.Queue()
    processes = []
    for task in tasks:
        task_queue.put(task)
    count = min(workers, max(len(tasks), 1))
    for _ in range(count):
        task_queue.put(None)
    finished = False
    try:
        # A spawned child does not inherit the signal mask, but it keeps an ignored
        # disposition through exec, and Python then installs no KeyboardInterrupt handler.
        # So workers ignore Ctrl-C from their first instruction. A Ctrl-C that arrives
        # while start() runs is lost, and the next one stops the run.
        with _sigint_ignored():
            for _ in range(count):
                process = context.Process(target=_worker_main, args=(job, threads, task_queue, messages), daemon=True)
                process.start()
                processes.append(process)
        _collect(processes, messages, progress, len(tasks), results)
        finished = True
    finally:
        with _sigint_ignored():
            _stop_workers(processes, [task_queue, messages], graceful=finished)


def _collect(
    processes: list[Any], messages: Any, progress: tqdm, expected: int, results: list[tuple[int, int, int]]
) -> None:
    """Read worker messages until ``expected`` shards are done, raising if a worker fails."""
    all_exited_before = False
    while len(results) < expected:
        try:
            kind, value = messages.get(timeout=0.2)
        except queue.Empty:
            dead = [process for process in processes if process.exitcode not in (None, 0)]
            # Workers that exited cleanly may have sent their last messages just after the
            # timeout, so that case raises only after a second empty read.
            all_exited = not any(process.is_alive() for process in processes)
            if dead or (all_exited and all_exited_before):
                code = dead[0].exitcode if dead else 0
                raise MmtokError(
                    f"a worker process died (exit code {code}); the {len(results)} shards finished so far are kept, "
                    "so run the same command again to continue"
                ) from None
            all_exited_before = all_exited
            continue
        if kind == "files":
            progress.update(value)
        elif kind == "shard":
            results.append(value)
        else:
            raise MmtokError(value)


def _stop_workers(processes: list[Any], queues: list[Any], graceful: bool) -> None:
    """Stop the workers without waiting on queue threads that may be blocked.

    After a clean run the workers exit on their own; otherwise they are terminated.
    A worker that has not exited after ``_STOP_TIMEOUT`` seconds is killed.
    """
    for channel in queues:
        # A feeder thread blocked on a full pipe that no process reads any more would
        # otherwise hang this process at exit.
        channel.cancel_join_thread()
    if not graceful:
        for process in processes:
            if process.is_alive():
                process.terminate()
    deadline = time.monotonic() + _STOP_TIMEOUT
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            logger.warning("worker process %d did not exit; killing it", process.pid)
            process.kill()
            process.join()
    for channel in queues:
        channel.close()


def _remove_temporary_files(output_dir: Path, shards: set[int]) -> None:
    """Delete the temporary files that a killed run left for ``shards``.

    Only this job writes these shards, so no other job's file in progress is touched.
    """
    names = {shard_stem(index) for index in shards}
    for path in (output_dir / SHARDS_DIR).glob(".shard-*"):
        # atomic_output names a temporary file ".<final name>.<random><suffix>".
        if path.name[1:].split(".", 1)[0] in names:
            path.unlink(missing_ok=True)


def _merge_errors(output_dir: Path, count: int) -> None:
    """Rewrite ``errors.jsonl`` from the error lists of the complete shards."""
    errors = []
    for index in range(count):
        if index_path(output_dir, index).is_file():
            errors.extend(_shard_errors(output_dir, index))
    write_json_lines(output_dir / ERRORS_FILE, errors)
