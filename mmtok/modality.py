"""The Modality base class: a file reader and writer plus a default tokenizer.

A plugin subclasses :class:`Modality` once per modality and registers an instance through
the ``register_modalities`` hook.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch

from mmtok.errors import MmtokError

if TYPE_CHECKING:
    from mmtok.tokenizer import Tokenizer


@dataclass
class Sample:
    """One item of a modality in memory.

    ``data`` is a tensor for continuous modalities (an image is ``(C, H, W)`` float in
    [0, 1], audio is ``(channels, samples)`` float in [-1, 1]) and a ``str`` for text.
    ``metadata`` contains what a writer or decoder needs (sample rate, original size, ...)
    and must be JSON-serialisable.
    """

    data: torch.Tensor | str
    metadata: dict[str, Any] = field(default_factory=dict)


class Modality:
    """Base class for a modality plugin.

    Subclasses set ``name`` (lowercase, unique), ``suffixes`` (lowercase file suffixes
    with the dot, used to pick the modality of a file) and ``default_tokenizer`` (a model
    name or path), and implement :meth:`read`, :meth:`write` and :meth:`tokenizer_class`.

    Optional methods: :meth:`bundled_models`, :meth:`train_tokenizer` (`mmtok train
    tokenizer`) and :meth:`evaluate_tokenizer` (`mmtok eval tokenizer`), which measures
    how well a tokenizer reconstructs a set of files and returns rows of metrics.
    """

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]] = ()
    default_tokenizer: ClassVar[str] = ""
    # Suffix used by `mmtok generate` and `mmtok decode` when no output name is given.
    default_suffix: ClassVar[str] = ""

    def read(self, path: Path) -> Sample:
        """Read one file into a :class:`Sample`; raise :class:`MmtokError` for bad files."""
        raise NotImplementedError

    def write(self, sample: Sample, path: Path) -> None:
        """Write ``sample`` to ``path``; the suffix of ``path`` selects the format."""
        raise NotImplementedError

    def tokenizer_class(self) -> type["Tokenizer"]:
        """Return the tokenizer class this modality uses by default."""
        raise NotImplementedError

    def bundled_models(self) -> dict[str, Path]:
        """Return the names and folders of models shipped with this plugin."""
        return {}

    def train_tokenizer(self, data_dir: Path, output_dir: Path, **options: Any) -> "Tokenizer":
        """Train a tokenizer on ``data_dir`` and save it to ``output_dir``.

        ``options`` are those of `mmtok train tokenizer`: ``steps``, ``batch_size``,
        ``lr``, ``seed``, ``logdir``, ``resume``, ``checkpoint_every``, ``model_args``
        (a dict of tokenizer constructor arguments) and ``device``. Unset options are
        absent. Under ``torchrun`` every process calls this method;
        :mod:`mmtok.train.distributed` and :class:`mmtok.train.loop.TrainingRun` make
        rank 0 the only one that writes.
        """
        raise MmtokError(f"modality {self.name!r} does not support tokenizer training")

    def evaluate_tokenizer(self, tokenizer: "Tokenizer", paths: list[Path], **options: Any) -> dict[str, Any]:
        """Encode and decode ``paths`` with ``tokenizer`` and measure the reconstructions.

        Returns a JSON-serialisable dict ``{"rows": [...], "summary": {...}}``. Each row is
        a dict from metric name to value for one setting (one row per bitrate for audio,
        one row for an image tokenizer). ``summary`` contains what applies to the whole
        run, such as the number of files. ``options`` are the ``--option KEY=VALUE`` pairs
        of `mmtok eval tokenizer` as strings, plus ``grid`` (a :class:`~pathlib.Path`) when
        `--grid` requests a picture of originals beside reconstructions. A modality raises
        :class:`MmtokError` for an option it does not know.
        """
        raise MmtokError(
            f"modality {self.name!r} has no evaluation; its plugin does not implement Modality.evaluate_tokenizer"
        )

    def accepts(self, path: Path) -> bool:
        return path.suffix.lower() in self.suffixes

    def save(self, sample: Sample, path: Path, *, force: bool = False) -> None:
        """Write ``sample`` atomically: to a temporary file first, renamed on success."""
        with atomic_output(Path(path), force=force) as temporary:
            try:
                self.write(sample, temporary)
            except MmtokError as error:
                # Name the user's path, not the temporary file beside it.
                raise MmtokError(str(error).replace(str(temporary), str(path))) from error


def check_input_file(path: Path) -> int:
    """Raise :class:`MmtokError` unless ``path`` is a non-empty file; return its size in bytes."""
    path = Path(path)
    if path.is_dir():
        raise MmtokError(f"{path}: is a folder, not a file")
    if not path.is_file():
        raise MmtokError(f"{path}: file not found")
    size = path.stat().st_size
    if size == 0:
        raise MmtokError(f"{path}: file is empty")
    return size


def set_default_permissions(path: Path) -> None:
    """Give ``path`` the mode a plain ``open`` or ``mkdir`` would, under the current umask.

    Temporary files and folders, and safetensors' own writer, create files readable by
    their owner only, which surprises anyone sharing the models or token files.
    """
    umask = os.umask(0)
    os.umask(umask)
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~umask)


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the storage device."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_directory(path: Path) -> None:
    """Flush a folder's entries, so that a rename inside it survives a power loss.

    Some file systems cannot open or sync a folder; there this does nothing.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_output(path: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and rename it to ``path`` on success.

    The temporary path keeps the suffix of ``path``, so writers that choose a format by
    suffix work. Nothing is left behind when the body raises. The file is synced to disk
    before the rename, so after a crash ``path`` contains either the old or the new
    content in full.
    """
    path = Path(path)
    if path.exists() and not force:
        raise MmtokError(f"{path}: file exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise MmtokError(f"{path}: folder {path.parent} does not exist")
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    # mkstemp creates the file readable by its owner only; give it the usual permissions.
    set_default_permissions(temporary)
    try:
        yield temporary
        fsync_file(temporary)
        os.replace(temporary, path)
        fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)
