"""Token shards: a tokenized dataset as memory-mappable arrays plus JSON-lines indexes.

``mmtok encode-dataset`` writes this layout, and ``mmtok train generator --shards``
reads it (``docs/formats.md`` describes it for other readers)::

    OUTPUT/
      dataset.json                  format, modality, tokenizer name and weights hash, shard size
      files.jsonl                   every input file (relative path as a JSON string), in shard order;
                                    null pads a shard, so that files added later start a new one
      errors.jsonl                  the files that failed, merged from the shards at the end of a run
      shards/
        shard-000000.ids.npy        the codes of all items of the shard, flattened and concatenated
        shard-000000.offsets.npy    int64, items + 1 entries: item i is ids[offsets[i]:offsets[i + 1]]
        shard-000000.errors.jsonl   {"path", "error"} per file of the shard that failed
        shard-000000.jsonl          {"path", "shape", "metadata", "tokenizer_hash"} per item

Shard ``s`` covers lines ``s * shard_size`` to ``(s + 1) * shard_size`` of ``files.jsonl``.
Each shard file is written to a temporary file, synced and renamed, and the index
``shard-NNNNNN.jsonl`` comes last, so a shard whose index exists is complete.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from mmtok.errors import MmtokError
from mmtok.modality import atomic_output
from mmtok.tokens import Tokens

logger = logging.getLogger(__name__)

DATASET_FILE = "dataset.json"
PLAN_FILE = "files.jsonl"
ERRORS_FILE = "errors.jsonl"
SHARDS_DIR = "shards"
FORMAT_NAME = "mmtok-shards"
FORMAT_VERSION = 1


def shard_stem(index: int) -> str:
    return f"shard-{index:06d}"


def index_path(folder: Path, index: int) -> Path:
    """Return the path of shard ``index``'s item index, whose presence marks the shard complete."""
    return Path(folder) / SHARDS_DIR / f"{shard_stem(index)}.jsonl"


def ids_dtype(vocab_size: int) -> np.dtype:
    """Return the smallest integer type for ids in ``[0, vocab_size)``, unsigned up to 2**32."""
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    return np.dtype(np.int64)


def write_json_lines(path: Path, rows: list[Any]) -> None:
    """Write ``rows`` as JSON lines, atomically, replacing an existing file."""
    with atomic_output(path, force=True) as temporary:
        with temporary.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def read_json_lines(path: Path) -> list[Any]:
    rows = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise MmtokError(f"{path}:{number}: invalid JSON: {error}") from error
    return rows


@dataclass
class ShardItem:
    """One encoded file of a shard.

    Attributes:
        path: the file's path relative to the input folder, with ``/`` separators.
        codes: the tokenizer's codes, reshaped to their original shape (a read-only
            view of the memory-mapped ids array, in its stored dtype).
        metadata: the token metadata that decoding needs.
    """

    path: str
    codes: np.ndarray
    metadata: dict[str, Any]


def write_shard(
    folder: Path, index: int, items: list[tuple[str, np.ndarray, dict[str, Any]]], errors: list[dict[str, str]],
    tokenizer_hash: str, dtype: np.dtype,
) -> None:
    """Write shard ``index`` of ``folder``: its ids, offsets, error list and, last, its index.

    ``items`` are ``(relative path, codes, metadata)``; ``errors`` are ``{"path", "error"}``.
    """
    shards = Path(folder) / SHARDS_DIR
    stem = shard_stem(index)
    lengths = [codes.size for _, codes, _ in items]
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate([codes.reshape(-1).astype(dtype) for _, codes, _ in items]) if items else np.zeros(0, dtype)
    for suffix, array in ((".ids.npy", ids), (".offsets.npy", offsets)):
        with atomic_output(shards / f"{stem}{suffix}", force=True) as temporary:
            with temporary.open("wb") as handle:
                np.save(handle, array, allow_pickle=False)
    write_json_lines(shards / f"{stem}.errors.jsonl", errors)
    rows = [
        {"path": path, "shape": list(codes.shape), "metadata": metadata, "tokenizer_hash": tokenizer_hash}
        for path, codes, metadata in items
    ]
    write_json_lines(shards / f"{stem}.jsonl", rows)


def read_dataset_info(folder: Path) -> dict[str, Any]:
    """Read and check ``dataset.json`` of a shard folder."""
    path = Path(folder) / DATASET_FILE
    if not path.is_file():
        raise MmtokError(
            f"{folder}: not a token shard folder ({DATASET_FILE} not found); make one with mmtok encode-dataset"
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MmtokError(f"{path}: invalid JSON: {error}") from error
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise MmtokError(f"{path}: not a token shard index (format is not {FORMAT_NAME!r})")
    if info.get("version") != FORMAT_VERSION:
        raise MmtokError(
            f"{path}: shard format version {info.get('version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    missing = [key for key in ("modality", "tokenizer", "tokenizer_hash", "shard_size") if key not in info]
    if missing:
        raise MmtokError(f"{path}: missing {', '.join(missing)}")
    return info


class ShardDataset:
    """Read the shards of an ``mmtok encode-dataset`` output folder.

    Every shard that ``files.jsonl`` implies must be complete, unless ``allow_incomplete``
    is set, in which case incomplete shards are skipped with a warning. The ids arrays
    are memory-mapped, so opening a dataset reads only the indexes. Iterating yields
    :class:`ShardItem` objects, not :class:`Tokens`; :meth:`tokens` converts one.
    """

    def __init__(self, folder: Path, *, allow_incomplete: bool = False) -> None:
        self.folder = Path(folder)
        self.info = read_dataset_info(self.folder)
        plan = self.folder / PLAN_FILE
        if not plan.is_file():
            raise MmtokError(f"{self.folder}: {PLAN_FILE} not found; run mmtok encode-dataset again")
        planned = len(read_json_lines(plan))
        size = int(self.info["shard_size"])
        count = -(-planned // size)
        self.shards = [index for index in range(count) if index_path(self.folder, index).is_file()]
        self._length: int | None = None
        incomplete = count - len(self.shards)
        if incomplete:
            message = (
                f"{self.folder}: {incomplete} of {count} shards are not complete; "
                "run mmtok encode-dataset again with the same arguments to finish them"
            )
            if not allow_incomplete:
                raise MmtokError(message)
            logger.warning(message)

    @property
    def modality(self) -> str:
        return str(self.info["modality"])

    @property
    def tokenizer(self) -> str:
        return str(self.info["tokenizer"])

    @property
    def tokenizer_hash(self) -> str:
        return str(self.info["tokenizer_hash"])

    def __len__(self) -> int:
        """Return the number of items in the complete shards.

        The first call counts the lines of every shard index and caches the result.
        """
        if self._length is None:
            self._length = sum(len(read_json_lines(index_path(self.folder, index))) for index in self.shards)
        return self._length

    def __iter__(self) -> Iterator[ShardItem]:
        """Yield a :class:`ShardItem` per encoded file, in ``files.jsonl`` order.

        Failed files have no item. :meth:`tokens` turns an item into :class:`Tokens`.
        """
        for index in self.shards:
            yield from self.read_shard(index)

    def read_shard(self, index: int) -> list[ShardItem]:
        """Return the items of shard ``index``, checking the arrays against the index."""
        stem = self.folder / SHARDS_DIR / shard_stem(index)
        rows = read_json_lines(index_path(self.folder, index))
        try:
            ids = np.load(f"{stem}.ids.npy", mmap_mode="r", allow_pickle=False)
            offsets = np.load(f"{stem}.offsets.npy", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise MmtokError(f"{stem}: shard arrays cannot be read ({error})") from error
        if offsets.shape != (len(rows) + 1,) or int(offsets[-1]) != ids.shape[0]:
            raise MmtokError(
                f"{stem}: the offsets do not match the {len(rows)} items and {ids.shape[0]} ids of the shard"
            )
        items = []
        for number, row in enumerate(rows):
            if row.get("tokenizer_hash") != self.tokenizer_hash:
                raise MmtokError(
                    f"{stem}.jsonl: item {row.get('path')!r} was made by tokenizer weights {row.get('tokenizer_hash')}, "
                    f"but {DATASET_FILE} records {self.tokenizer_hash}"
                )
            codes = ids[int(offsets[number]) : int(offsets[number + 1])]
            shape = tuple(int(size) for size in row["shape"])
            if int(np.prod(shape)) != codes.shape[0]:
                raise MmtokError(f"{stem}.jsonl: item {row['path']!r} has shape {shape}, but {codes.shape[0]} ids")
            items.append(ShardItem(row["path"], codes.reshape(shape), row.get("metadata", {})))
        return items

    def tokens(self, item: ShardItem) -> Tokens:
        """Return an item as :class:`Tokens`, ready for ``Tokenizer.decode``."""
        return Tokens(
            codes=torch.from_numpy(np.asarray(item.codes, dtype=np.int64)),
            modality=self.modality,
            tokenizer=self.tokenizer,
            tokenizer_hash=self.tokenizer_hash,
            metadata=dict(item.metadata),
        )
