"""Tokenize a folder tree into token shards with parallel worker processes.

:func:`encode_dataset` lists the files of one modality under the input folder, fixes
their order in ``files.jsonl`` and cuts that list into shards of ``shard_size`` files.
Worker processes encode whole shards, and a shard is written only when all of its files
are done (see :mod:`mmtok.shards`). A run that is killed therefore loses at most the
shards in progress, and running the same command again encodes exactly the shards that
are not complete. Files that fail are listed with the reason and do not stop the run.

Several jobs can share one output folder on a shared file system: job ``i`` of ``n``
(``shard_index``, ``num_shards``) encodes the shards whose number is ``i`` modulo ``n``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import queue
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
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


@dataclass
class EncodeSummary:
    """Counts of one run of :func:`encode_dataset`.

    Attributes:
        files: input files in the plan, over all shards.
        shards: shards in the plan.
        shards_done_before: shards of this job that were complete when the run started.
        shards_encoded: shards this run wrote.
        encoded: files this run encoded.
        failed: files this run could not encode; ``errors.jsonl`` lists them.
        seconds: wall-clock time of the encoding, without planning.
    """

    files: int
    shards: int
    shards_done_before: int
    shards_encoded: int
    encoded: int
    failed: int
    seconds: float


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
    for key, label in (("modality", "modality"), ("tokenizer_hash", "tokenizer weights"), ("shard_size", "shard size")):
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


_worker: dict[str, Any] = {}


def _set_parent_death_signal() -> None:
    """Ask Linux to kill this worker when its parent dies, so no orphan keeps writing shards."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 is PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start_worker(job: _Job, progress: Any, threads: int) -> None:
    from mmtok import api
    from mmtok.plugins import get_plugin_manager

    _set_parent_death_signal()
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
        progress=progress,
    )


def _encode_file(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    tokenizer = _worker["tokenizer"]
    sample = _worker["reader"].read(path)
    with torch.no_grad():
        tokens = tokenizer.encode(sample)
    codes = tokens.codes.cpu().numpy()
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= tokenizer.vocab_size):
        raise MmtokError(f"{path}: the tokenizer produced ids outside [0, {tokenizer.vocab_size})")
    return codes, tokens.metadata


def _encode_shard(index: int, names: list[str]) -> tuple[int, int, int]:
    """Encode the files ``names`` as shard ``index``; return ``(index, encoded, failed)``."""
    job: _Job = _worker["job"]
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
        if _worker["progress"] is not None:
            _worker["progress"].put(1)
    write_shard(job.output_dir, index, items, errors, job.tokenizer_hash, _worker["dtype"])
    return index, len(items), len(errors)


# The run ----------------------------------------------------------------------------


def encode_dataset(
    input_dir: Path,
    output_dir: Path,
    modality: str,
    tokenizer: str | None = None,
    *,
    workers: int = 1,
    shard_size: int = DEFAULT_SHARD_SIZE,
    shard_index: int = 0,
    num_shards: int = 1,
    device: str = "cpu",
    threads: int = 1,
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
        shard_index: which of ``num_shards`` jobs this is, from 0.
        num_shards: jobs sharing the output folder; this one encodes the shards whose
            number modulo ``num_shards`` is ``shard_index``.
        device: torch device of the tokenizer in each worker.
        threads: torch CPU threads of each worker. Processes scale better than threads
            here, and one thread per worker does not oversubscribe the cores.
        show_progress: draw a progress bar of files on stderr.
    """
    from mmtok import api
    from mmtok.plugins import get_plugin_manager

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise MmtokError(f"{input_dir}: folder not found")
    if workers < 1 or shard_size < 1 or num_shards < 1 or not 0 <= shard_index < num_shards:
        raise MmtokError(
            f"need workers >= 1, shard_size >= 1 and 0 <= shard_index < num_shards, got {workers}, {shard_size}, "
            f"{shard_index} and {num_shards}"
        )
    entry = get_plugin_manager().modality(modality)
    name = tokenizer or entry.default_tokenizer
    if not name:
        raise MmtokError(f"modality {modality!r} has no default tokenizer; pass --tokenizer")
    loaded = api.load_tokenizer(name, modality)
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
    }
    _write_dataset_info(output_dir, info)

    found = list_input_files(input_dir, entry.accepts, exclude=output_dir.resolve())
    planned = _plan(output_dir, found, shard_size)
    count = -(-len(planned) // shard_size)
    own = [index for index in range(count) if index % num_shards == shard_index]
    pending = [index for index in own if not index_path(output_dir, index).is_file()]
    _remove_temporary_files(output_dir, set(pending))
    tasks = [
        (index, [name for name in planned[index * shard_size : (index + 1) * shard_size] if name is not None])
        for index in pending
    ]
    logger.info(
        "%d %s files in %d shards; this job encodes %d shards, %d were done before",
        len(planned), modality, count, len(pending), len(own) - len(pending),
    )

    job = _Job(input_dir, output_dir, modality, name, info["tokenizer_hash"], str(api.resolve_device(device)))
    started = time.perf_counter()
    progress = tqdm(
        total=sum(len(names) for _, names in tasks), desc=f"encoding {modality}", unit="file",
        disable=not show_progress, dynamic_ncols=True,
    )
    try:
        if workers == 1:
            results = _run_here(job, tasks, progress, threads)
        else:
            results = _run_in_workers(job, tasks, progress, workers, threads)
    finally:
        progress.close()
    seconds = time.perf_counter() - started

    _merge_errors(output_dir, count)
    encoded = sum(result[1] for result in results)
    failed = sum(result[2] for result in results)
    if failed:
        logger.warning("%d files could not be encoded; %s lists them", failed, output_dir / ERRORS_FILE)
    files = sum(name is not None for name in planned)
    return EncodeSummary(files, count, len(own) - len(pending), len(results), encoded, failed, seconds)


class _BarUpdates:
    """Adapter that makes a progress bar accept the worker's ``put(1)`` calls."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def put(self, count: int) -> None:
        self.bar.update(count)


def _run_here(job: _Job, tasks: list[tuple[int, list[str]]], progress: tqdm, threads: int) -> list[tuple[int, int, int]]:
    previous_threads = torch.get_num_threads()
    _start_worker(job, _BarUpdates(progress), threads)
    try:
        return [_encode_shard(index, names) for index, names in tasks]
    finally:
        _worker.clear()
        torch.set_num_threads(previous_threads)


def _run_in_workers(
    job: _Job, tasks: list[tuple[int, list[str]]], progress: tqdm, workers: int, threads: int
) -> list[tuple[int, int, int]]:
    # Spawned, not forked: a fork of a process that has started torch's thread pools can
    # deadlock in the child.
    context = multiprocessing.get_context("spawn")
    updates = context.Queue()
    results = []
    with ProcessPoolExecutor(
        max_workers=min(workers, max(len(tasks), 1)), mp_context=context, initializer=_start_worker,
        initargs=(job, updates, threads),
    ) as pool:
        futures: set[Future] = {pool.submit(_encode_shard, index, names) for index, names in tasks}
        try:
            while futures:
                done, futures = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(updates, progress)
                for future in done:
                    results.append(future.result())
        except BrokenProcessPool as error:
            raise MmtokError(
                f"a worker process died ({error}); the {len(results)} shards finished so far are kept, "
                "so run the same command again to continue"
            ) from error
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        _drain(updates, progress)
    return results


def _drain(updates: Any, progress: tqdm) -> None:
    while True:
        try:
            progress.update(updates.get_nowait())
        except queue.Empty:
            return


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
        path = output_dir / SHARDS_DIR / f"{shard_stem(index)}.errors.jsonl"
        if index_path(output_dir, index).is_file() and path.is_file():
            errors.extend(read_json_lines(path))
    write_json_lines(output_dir / ERRORS_FILE, errors)
