"""Building generator training examples from a data folder, and training from it.

The folder contains ``<modality>/train.jsonl`` and ``<modality>/val.jsonl`` per modality, as
``scripts/prepare_data.py`` writes them. Each line is a JSON object with ``file`` (a path
relative to the modality folder) or ``text`` (the content itself, for text), and an
optional ``caption``. A captioned item becomes a text-conditioned example, so the
generator learns ``<text> caption </text> <image> ... </image>``. A share of captioned
items also appears without the caption, so unconditional generation has a trained layout,
and a share appears as ``<image> ... </image> <text> caption </text>``, which teaches
captioning (image to text).

A modality can also come from token shards that ``mmtok encode-dataset`` wrote (see
:mod:`mmtok.shards`); each shard item becomes unconditional examples.

Reproduce the bundled generator with::

    mmtok train generator --data data --output runs/generator --steps 3000 --batch-size 32 --lr 1e-3 \
        --threads 1 --checkpoint-every 250 --model-arg dim=192 --model-arg depth=4 --model-arg heads=6
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mmtok.errors import MmtokError
from mmtok.modality import Sample
from mmtok.plugins import get_plugin_manager
from mmtok.shards import ShardDataset, read_json_lines
from mmtok.tokenizer import Tokenizer
from mmtok.tokens import TokenSpace
from mmtok.train import distributed

logger = logging.getLogger(__name__)

Example = list[tuple[str, torch.Tensor]]

# Share of captioned items that also become unconditional examples.
UNCONDITIONAL_SHARE = 0.25
# Share of captioned items that also become captioning examples (the caption as target).
CAPTIONING_SHARE = 0.5
# Maximum number of windows taken from one long item (long audio, long text).
MAX_WINDOWS_PER_ITEM = 4


def read_manifest(data_dir: Path, modality: str, split: str) -> list[dict[str, Any]]:
    """Read ``DATA/<modality>/<split>.jsonl``."""
    path = Path(data_dir) / modality / f"{split}.jsonl"
    if not path.is_file():
        raise MmtokError(f"{path}: manifest not found; run scripts/prepare_data.py or pass --modalities")
    return read_json_lines(path)


def windows(sequence: torch.Tensor, length: int, variable_length: bool) -> list[torch.Tensor]:
    """Cut a flattened sequence into consecutive windows of ``length`` ids.

    A fixed-length modality keeps only full windows; a variable-length one keeps the
    shorter tail too.
    """
    pieces = [sequence[start : start + length] for start in range(0, len(sequence), length)]
    pieces = [piece for piece in pieces if len(piece) == length or (variable_length and len(piece) > 0)]
    return pieces[:MAX_WINDOWS_PER_ITEM]


def tokenize_rows(
    data_dir: Path,
    modality: str,
    split: str,
    tokenizer: Tokenizer,
    options: dict[str, Any],
    rows: list[dict[str, Any]],
    cache_dir: Path | None = None,
    cached_only: bool = False,
) -> list[torch.Tensor | None] | None:
    """Return the flattened sequence of each manifest row, ``None`` for an unreadable file.

    With ``cache_dir``, the sequences are stored in one safetensors file per modality,
    split, tokenizer weights hash and sequence options, and read back on later runs, so
    retraining a generator does not tokenize unchanged data again. The key also covers
    the rows themselves, so an edited manifest is tokenized afresh. With ``cached_only``,
    return None instead of tokenizing when the cache has no entry.
    """
    key = json.dumps([modality, split, tokenizer.weights_hash(), options, rows], sort_keys=True, default=str)
    cache_path = None
    if cache_dir is not None:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        cache_path = Path(cache_dir) / f"{modality}-{split}-{digest}.safetensors"
        if cache_path.is_file():
            stored = load_file(str(cache_path))
            lengths = stored["lengths"].tolist()
            pieces = torch.split(stored["ids"], [max(length, 0) for length in lengths])
            logger.info("read %d %s %s sequences from %s", len(lengths), modality, split, cache_path)
            unreadable = sum(length < 0 for length in lengths)
            if unreadable:
                logger.warning("skipping %d unreadable %s %s files, as when the cache %s was made", unreadable, modality, split, cache_path)
            return [piece if length >= 0 else None for piece, length in zip(pieces, lengths)]
    if cached_only:
        return None

    reader = get_plugin_manager().modality(modality)
    manifest = Path(data_dir) / modality / f"{split}.jsonl"
    progress = tqdm(rows, desc=f"tokenizing {modality} {split}", unit="item", leave=False)
    with logging_redirect_tqdm():  # warnings about skipped files print above the bar
        sequences = [
            _tokenize_row(row, number, manifest, reader, tokenizer, options)
            for number, row in enumerate(progress, start=1)
        ]

    if cache_path is not None:
        # A length of -1 marks a row whose file could not be read.
        lengths = torch.tensor([-1 if ids is None else len(ids) for ids in sequences], dtype=torch.int64)
        readable = [ids for ids in sequences if ids is not None]
        ids = torch.cat(readable) if readable else torch.zeros(0, dtype=torch.int64)
        temporary = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"ids": ids, "lengths": lengths}, str(temporary))
            temporary.replace(cache_path)
        except OSError as error:
            logger.warning("writing the token cache %s failed: %s", cache_path, error)
    return sequences


def _tokenize_row(
    row: Any, number: int, manifest: Path, reader: Any, tokenizer: Tokenizer, options: dict[str, Any]
) -> torch.Tensor | None:
    """Return the flattened sequence of manifest row ``number``, or None when its file is unreadable."""
    if not isinstance(row, dict) or not isinstance(row.get("file", row.get("text")), str):
        raise MmtokError(f"{manifest}: row {number} needs a 'file' path or a 'text' string, got {row!r:.80}")
    if "file" in row:
        try:
            sample = reader.read(manifest.parent / row["file"])
        except MmtokError as error:
            logger.warning("skipping %s", error)
            return None
    else:
        sample = Sample(row["text"])
    try:
        with torch.no_grad():
            return tokenizer.to_sequence(tokenizer.encode(sample).codes, **options).to(torch.int64)
    except MmtokError as error:
        raise MmtokError(f"{manifest}: row {number}: {error}") from error


def build_examples(
    data_dir: Path,
    split: str,
    tokenizers: dict[str, Tokenizer],
    sequence_lengths: dict[str, int],
    sequence_options: dict[str, dict[str, Any]],
    variable_length: list[str],
    max_items: int | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
    modalities: list[str] | None = None,
) -> list[Example]:
    """Tokenize every item of ``split`` into generator examples (sequences cached in ``cache_dir``).

    ``modalities`` selects which of ``tokenizers`` to read from ``data_dir`` (all when
    None); the text tokenizer encodes captions either way.
    """
    random_state = random.Random(seed)
    text = tokenizers.get("text")
    examples: list[Example] = []
    for modality, tokenizer in tokenizers.items():
        if modalities is not None and modality not in modalities:
            continue
        rows = read_manifest(data_dir, modality, split)[:max_items]
        length = sequence_lengths[modality]
        options = sequence_options.get(modality, {})
        sequences = tokenize_rows(data_dir, modality, split, tokenizer, options, rows, cache_dir)
        for row, sequence in zip(rows, sequences):
            if sequence is None:
                continue
            caption = row.get("caption") if text is not None and modality != "text" else None
            for piece in windows(sequence, length, modality in variable_length):
                if caption:
                    caption_ids = text.to_sequence(text.encode(Sample(caption)).codes)[: sequence_lengths["text"]]
                    examples.append([("text", caption_ids), (modality, piece)])
                    if random_state.random() < UNCONDITIONAL_SHARE:
                        examples.append([(modality, piece)])
                    if random_state.random() < CAPTIONING_SHARE:
                        examples.append([(modality, piece), ("text", caption_ids)])
                else:
                    examples.append([(modality, piece)])
    if not examples:
        raise MmtokError(f"{data_dir}: no {split} examples for {', '.join(modalities or tokenizers)}")
    return examples


def build_shard_examples(
    dataset: ShardDataset,
    tokenizer: Tokenizer,
    length: int,
    options: dict[str, Any],
    variable_length: bool,
    max_items: int | None = None,
) -> list[Example]:
    """Cut every item of a shard folder into unconditional examples of ``length`` ids."""
    examples: list[Example] = []
    for number, item in enumerate(dataset):
        if max_items is not None and number >= max_items:
            break
        codes = torch.from_numpy(np.asarray(item.codes, dtype=np.int64))
        try:
            sequence = tokenizer.to_sequence(codes, **options).to(torch.int64)
        except (MmtokError, ValueError, RuntimeError, IndexError) as error:
            raise MmtokError(f"{dataset.folder}: item {item.path!r} does not fit the tokenizer ({error})") from error
        examples.extend([(dataset.modality, piece)] for piece in windows(sequence, length, variable_length))
    if not examples:
        raise MmtokError(f"{dataset.folder}: no examples; the shards contain no items")
    return examples


def open_shards(folder: Path, modality: str, tokenizer: Tokenizer) -> ShardDataset:
    """Open a shard folder and check that ``tokenizer`` made its tokens."""
    dataset = ShardDataset(folder)
    if dataset.modality != modality:
        raise MmtokError(f"{folder}: contains {dataset.modality} tokens, not {modality}")
    if dataset.tokenizer_hash != tokenizer.weights_hash():
        raise MmtokError(
            f"{folder}: tokens were made by tokenizer {dataset.tokenizer!r} (weights {dataset.tokenizer_hash}), "
            f"not by {tokenizer.name_or_path!r} (weights {tokenizer.weights_hash()}); pass --tokenizer "
            f"{modality}=NAME with the tokenizer that encoded them"
        )
    return dataset


def train_generator_from_folder(
    data_dir: Path | None,
    output_dir: Path,
    modalities: list[str],
    tokenizer_names: dict[str, str] | None = None,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    logdir: Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 250,
    model_args: dict[str, Any] | None = None,
    max_items: int | None = None,
    shards: dict[str, Path] | None = None,
    validation_shards: dict[str, Path] | None = None,
    device: str = "auto",
) -> Any:
    """Tokenize ``data_dir`` with each modality's tokenizer and train a generator on it.

    ``model_args`` are :class:`mmtok.generate.Generator` arguments; ``sequence_lengths``
    and ``sequence_options`` among them override the tokenizers' defaults per modality.
    A modality in ``shards`` reads its training items from that ``mmtok encode-dataset``
    folder instead of ``data_dir``, and its held-out items from ``validation_shards``
    when that names it. Its tokenizer defaults to the one the shards record.
    """
    from mmtok.api import load_tokenizer
    from mmtok.train.generator import train_generator

    context = distributed.setup(device)
    manager = get_plugin_manager()
    model_args = dict(model_args or {})
    shards = dict(shards or {})
    validation_shards = dict(validation_shards or {})
    unknown = sorted((set(shards) | set(validation_shards)) - set(modalities))
    if unknown:
        raise MmtokError(
            f"shards given for {', '.join(unknown)}, which are not among the modalities {', '.join(modalities)}"
        )
    from_folder = [modality for modality in modalities if modality not in shards]
    if from_folder and data_dir is None:
        raise MmtokError(f"no data for {', '.join(from_folder)}: pass --data or --shards {from_folder[0]}=DIR")
    tokenizers: dict[str, Tokenizer] = {}
    for modality in modalities:
        name = (tokenizer_names or {}).get(modality)
        if name is None and modality in shards:
            name = ShardDataset(shards[modality]).tokenizer
        tokenizers[modality] = load_tokenizer(name or manager.modality(modality).default_tokenizer, modality)
    sequence_lengths: dict[str, int] = {}
    sequence_options: dict[str, dict[str, Any]] = {}
    for modality, tokenizer in tokenizers.items():
        sequence_lengths[modality], sequence_options[modality] = tokenizer.sequence_defaults()
    sequence_lengths.update(model_args.pop("sequence_lengths", {}))
    sequence_options.update(model_args.pop("sequence_options", {}))
    variable_length = model_args.get("variable_length") or [m for m in ("text",) if m in tokenizers]
    if "grid_shapes" not in model_args:
        grids = {m: t.sequence_grid(sequence_lengths[m], **sequence_options.get(m, {})) for m, t in tokenizers.items()}
        model_args["grid_shapes"] = {m: list(grid) for m, grid in grids.items() if grid is not None}

    token_space = TokenSpace(
        [
            {"modality": m, "tokenizer": t.name_or_path, "tokenizer_hash": t.weights_hash(), "size": t.vocab_size}
            for m, t in tokenizers.items()
        ]
    )
    # Rank 0 tokenizes first and fills the token cache, which the other ranks then read.
    if not context.is_main:
        distributed.barrier()
    arguments = (tokenizers, sequence_lengths, sequence_options, variable_length, max_items)
    examples = _examples(data_dir, "train", from_folder, shards, *arguments, seed=seed)
    validation = _examples(data_dir, "val", from_folder, validation_shards, *arguments, seed=seed + 1)
    if context.is_main:
        distributed.barrier()
        logger.info("built %d training and %d validation examples", len(examples), len(validation))
    if not examples:
        raise MmtokError("no training examples")
    model_args["sequence_options"] = sequence_options
    return train_generator(
        examples,
        token_space,
        sequence_lengths,
        output_dir,
        steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        logdir=logdir,
        resume=resume,
        checkpoint_every=checkpoint_every,
        model_args=model_args,
        validation_examples=validation or None,
        device=device,
    )


def _examples(
    data_dir: Path | None,
    split: str,
    from_folder: list[str],
    shards: dict[str, Path],
    tokenizers: dict[str, Tokenizer],
    sequence_lengths: dict[str, int],
    sequence_options: dict[str, dict[str, Any]],
    variable_length: list[str],
    max_items: int | None,
    seed: int,
) -> list[Example]:
    """Build the examples of one split from the data folder and the shard folders."""
    examples: list[Example] = []
    if from_folder:
        cache_dir = Path(data_dir) / ".cache" / "generator-tokens"
        examples += build_examples(
            data_dir, split, tokenizers, sequence_lengths, sequence_options, variable_length,
            max_items=max_items, seed=seed, cache_dir=cache_dir, modalities=from_folder,
        )
    for modality, folder in shards.items():
        tokenizer = tokenizers[modality]
        dataset = open_shards(folder, modality, tokenizer)
        examples += build_shard_examples(
            dataset, tokenizer, sequence_lengths[modality], sequence_options.get(modality, {}),
            modality in variable_length, max_items,
        )
    return examples
