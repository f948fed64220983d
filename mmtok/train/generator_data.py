"""Building generator training examples from a data folder, and training from it.

The folder contains ``<modality>/train.jsonl`` and ``<modality>/val.jsonl`` per modality, as
``scripts/prepare_data.py`` writes them. Each line is a JSON object with ``file`` (a path
relative to the modality folder) or ``text`` (the content itself, for text), and an
optional ``caption``. A captioned item becomes a text-conditioned example, so the
generator learns ``<text> caption </text> <image> ... </image>``; a share of captioned
items also appears without the caption, so unconditional generation has a trained layout.

Reproduce the bundled generator with::

    mmtok train generator --data data --output runs/generator
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mmtok.errors import MmtokError
from mmtok.modality import Sample
from mmtok.plugins import get_plugin_manager
from mmtok.tokenizer import Tokenizer
from mmtok.tokens import TokenSpace

logger = logging.getLogger(__name__)

Example = list[tuple[str, torch.Tensor]]

# Share of captioned items that also become unconditional examples.
UNCONDITIONAL_SHARE = 0.25
# Maximum number of windows taken from one long item (long audio, long text).
MAX_WINDOWS_PER_ITEM = 4


def read_manifest(data_dir: Path, modality: str, split: str) -> list[dict[str, Any]]:
    """Read ``DATA/<modality>/<split>.jsonl``."""
    path = Path(data_dir) / modality / f"{split}.jsonl"
    if not path.is_file():
        raise MmtokError(f"{path}: manifest not found; run scripts/prepare_data.py or pass --modalities")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise MmtokError(f"{path}:{number}: invalid JSON: {error}") from error
    return rows


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
) -> list[torch.Tensor | None]:
    """Return the flattened sequence of each manifest row, ``None`` for an unreadable file.

    With ``cache_dir``, the sequences are stored in one safetensors file per modality,
    split, tokenizer weights hash and sequence options, and read back on later runs, so
    retraining a generator does not tokenize unchanged data again. The key also covers
    the rows themselves, so an edited manifest is tokenized afresh.
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
            return [piece if length >= 0 else None for piece, length in zip(pieces, lengths)]

    reader = get_plugin_manager().modality(modality)
    sequences: list[torch.Tensor | None] = []
    for row in tqdm(rows, desc=f"tokenizing {modality} {split}", unit="item", leave=False):
        if "file" in row:
            path = Path(data_dir) / modality / row["file"]
            try:
                sample = reader.read(path)
            except MmtokError as error:
                logger.warning("skipping %s", error)
                sequences.append(None)
                continue
        elif "text" in row:
            sample = Sample(row["text"])
        else:
            raise MmtokError(f"{data_dir}/{modality}/{split}.jsonl: a row has neither 'file' nor 'text'")
        with torch.no_grad():
            sequences.append(tokenizer.to_sequence(tokenizer.encode(sample).codes, **options).to(torch.int64))

    if cache_path is not None:
        # A length of -1 marks a row whose file could not be read.
        lengths = torch.tensor([-1 if ids is None else len(ids) for ids in sequences], dtype=torch.int64)
        readable = [ids for ids in sequences if ids is not None]
        ids = torch.cat(readable) if readable else torch.zeros(0, dtype=torch.int64)
        temporary = cache_path.with_suffix(".tmp")
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"ids": ids, "lengths": lengths}, str(temporary))
            temporary.replace(cache_path)
        except OSError as error:
            logger.warning("writing the token cache %s failed: %s", cache_path, error)
    return sequences


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
) -> list[Example]:
    """Tokenize every item of ``split`` into generator examples (sequences cached in ``cache_dir``)."""
    random_state = random.Random(seed)
    text = tokenizers.get("text")
    examples: list[Example] = []
    for modality, tokenizer in tokenizers.items():
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
                else:
                    examples.append([(modality, piece)])
    if not examples:
        raise MmtokError(f"{data_dir}: no {split} examples for {', '.join(tokenizers)}")
    return examples


def train_generator_from_folder(
    data_dir: Path,
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
) -> Any:
    """Tokenize ``data_dir`` with each modality's tokenizer and train a generator on it.

    ``model_args`` are :class:`mmtok.generate.Generator` arguments; ``sequence_lengths``
    and ``sequence_options`` among them override the tokenizers' defaults per modality.
    """
    from mmtok.api import load_tokenizer
    from mmtok.train.generator import train_generator

    manager = get_plugin_manager()
    model_args = dict(model_args or {})
    tokenizers: dict[str, Tokenizer] = {}
    for modality in modalities:
        name = (tokenizer_names or {}).get(modality) or manager.modality(modality).default_tokenizer
        tokenizers[modality] = load_tokenizer(name, modality)
    sequence_lengths: dict[str, int] = {}
    sequence_options: dict[str, dict[str, Any]] = {}
    for modality, tokenizer in tokenizers.items():
        sequence_lengths[modality], sequence_options[modality] = tokenizer.sequence_defaults()
    sequence_lengths.update(model_args.pop("sequence_lengths", {}))
    sequence_options.update(model_args.pop("sequence_options", {}))
    variable_length = model_args.get("variable_length") or [m for m in ("text",) if m in tokenizers]

    token_space = TokenSpace(
        [
            {"modality": m, "tokenizer": t.name_or_path, "tokenizer_hash": t.weights_hash(), "size": t.vocab_size}
            for m, t in tokenizers.items()
        ]
    )
    arguments = (tokenizers, sequence_lengths, sequence_options, variable_length)
    cache_dir = Path(data_dir) / ".cache" / "generator-tokens"
    examples = build_examples(data_dir, "train", *arguments, max_items=max_items, seed=seed, cache_dir=cache_dir)
    validation = build_examples(data_dir, "val", *arguments, max_items=max_items, seed=seed + 1, cache_dir=cache_dir)
    logger.info("built %d training and %d validation examples", len(examples), len(validation))
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
        validation_examples=validation,
    )
