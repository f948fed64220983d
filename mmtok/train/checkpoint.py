"""Checkpoint folders that survive a crash at any moment.

``OUTPUT/checkpoint/`` contains one complete checkpoint, ``step-000000500/``, in Hub layout
(``config.json``, ``model.safetensors``, ``README.md``) plus ``trainer_state.safetensors``.
A new checkpoint is written into a hidden temporary folder beside it, every file is synced
to disk, and only then is the folder renamed to its ``step-...`` name. A rename within
one file system is atomic, so a ``step-...`` folder is always complete. The folder with
the highest step is the checkpoint; older ones are deleted after the new one is in place.

Runs made before this layout kept the files directly in ``OUTPUT/checkpoint/``; such a
checkpoint still loads.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from mmtok.errors import MmtokError
from mmtok.modality import fsync_directory, fsync_file

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.safetensors"
WEIGHTS_FILE = "model.safetensors"

_STEP_FOLDER = re.compile(r"^step-(\d+)$")
_TEMPORARY_PREFIXES = (".partial-", ".stale-")
# Files of the flat layout that runs before the step folders wrote.
_FLAT_LAYOUT_FILES = ("config.json", WEIGHTS_FILE, "README.md", STATE_FILE)


def step_folder_name(step: int) -> str:
    return f"step-{step:09d}"


def _step_folders(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    if not checkpoint_dir.is_dir():
        return []
    folders = []
    for entry in checkpoint_dir.iterdir():
        match = _STEP_FOLDER.match(entry.name)
        if match and entry.is_dir():
            folders.append((int(match.group(1)), entry))
    return sorted(folders)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """Return the folder of the newest complete checkpoint in ``checkpoint_dir``, or None.

    Raises :class:`MmtokError` when that folder lacks its weights or trainer state, which
    only damage from outside mmtok can cause.
    """
    checkpoint_dir = Path(checkpoint_dir)
    folders = _step_folders(checkpoint_dir)
    if folders:
        folder = folders[-1][1]
    elif (checkpoint_dir / STATE_FILE).is_file():
        folder = checkpoint_dir
    else:
        return None
    missing = [name for name in (WEIGHTS_FILE, STATE_FILE) if not (folder / name).is_file()]
    if missing:
        raise MmtokError(
            f"{folder}: checkpoint is incomplete: {', '.join(missing)} missing; delete the folder to start over"
        )
    return folder


def write_checkpoint(checkpoint_dir: Path, step: int, write: Callable[[Path], None]) -> Path:
    """Write a checkpoint for ``step`` with ``write(folder)`` and make it the newest one.

    ``write`` fills an empty temporary folder. A crash before this function returns leaves
    the previous checkpoint in place and loadable. Returns the new checkpoint folder.
    """
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".partial-{step_folder_name(step)}-", dir=checkpoint_dir))
    try:
        write(partial)
        for file in partial.rglob("*"):
            if file.is_file():
                fsync_file(file)
        fsync_directory(partial)

        target = checkpoint_dir / step_folder_name(step)
        if target.exists():
            # A folder of the same step from an earlier run started without --resume.
            # Renamed aside, not deleted, so a crash here still leaves a checkpoint.
            target.rename(checkpoint_dir / f".stale-{target.name}-{os.getpid()}")
        os.replace(partial, target)
        fsync_directory(checkpoint_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    remove_all_but(checkpoint_dir, target)
    return target


def remove_all_but(checkpoint_dir: Path, keep: Path) -> None:
    """Delete every checkpoint folder, temporary folder and flat-layout file except ``keep``."""
    for entry in Path(checkpoint_dir).iterdir():
        if entry == keep:
            continue
        if entry.is_dir() and (_STEP_FOLDER.match(entry.name) or entry.name.startswith(_TEMPORARY_PREFIXES)):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file() and entry.name in _FLAT_LAYOUT_FILES:
            entry.unlink(missing_ok=True)
