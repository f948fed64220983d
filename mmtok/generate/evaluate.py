"""Held-out evaluation of a generator: bits per token per modality, with and without conditions.

``mmtok eval generator DATA`` runs :func:`evaluate_generator`. For every modality with a
held-out manifest in ``DATA`` it measures the negative ELBO (an upper bound on the negative
log-likelihood, see :meth:`mmtok.Generator.loss`) in bits per target token:

- alone: the target segment without any condition;
- given a condition: the caption before an image, or an image before its caption, for
  the segment orders the generator was trained on. The same row gives the bits per token
  of the same targets alone, and with every condition token replaced by ``<mask>`` (the
  unconditional pass of classifier-free guidance), so the conditional gain compares
  like with like.

Each row also gives a unigram baseline: the cross-entropy of the target positions under
token frequencies counted on the training split (add-one-half smoothing), which any
useful generator must beat.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from mmtok.errors import MmtokError
from mmtok.generate.model import Generator
from mmtok.modality import Sample

logger = logging.getLogger(__name__)


@dataclass
class GeneratorScore:
    """Bits per target token of one target modality under one condition."""

    target: str
    condition: str
    """``"none"`` or the condition modality, e.g. ``"text"`` for an image given its caption."""
    examples: int
    bits_per_token: float
    unigram_bits_per_token: float
    """Cross-entropy of the same positions under training-split token frequencies."""
    alone_bits_per_token: float | None = None
    """The same targets without the condition segment; None on ``"none"`` rows."""
    masked_condition_bits_per_token: float | None = None
    """The same examples with every condition token masked; None on ``"none"`` rows."""

    @property
    def gain(self) -> float | None:
        """Bits per token the condition saves: alone minus given."""
        return None if self.alone_bits_per_token is None else self.alone_bits_per_token - self.bits_per_token

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gain": self.gain}


@dataclass
class _Item:
    """One held-out segment, with the caption of its item when it has one."""

    ids: torch.Tensor
    caption: torch.Tensor | None


def evaluate_generator(
    pipeline: Any,
    data_dir: Path,
    *,
    split: str = "val",
    baseline_split: str = "train",
    modalities: Sequence[str] | None = None,
    max_items: int | None = None,
    t_samples: int = 8,
    seed: int = 0,
) -> list[GeneratorScore]:
    """Measure held-out bits per token of ``pipeline``'s generator on ``data_dir``.

    Args:
        pipeline: a :class:`mmtok.Pipeline`.
        data_dir: a folder as ``scripts/prepare_data.py`` writes it.
        split: the held-out split to score.
        baseline_split: the split whose token frequencies give the unigram baseline.
        modalities: modalities to read from ``data_dir``; by default every modality of
            the generator with a ``split`` manifest there.
        max_items: read at most this many items per modality.
        t_samples: diffusion times per example; more lower the estimate's variance.
        seed: seeds the diffusion times and masks.

    Returns:
        One :class:`GeneratorScore` per target modality and condition.
    """
    generator: Generator = pipeline.generator
    data_dir = Path(data_dir)
    available = [m for m in generator.token_space.modalities if (data_dir / m / f"{split}.jsonl").is_file()]
    modalities = list(modalities) if modalities is not None else available
    unknown = [m for m in modalities if m not in generator.token_space.modalities]
    if unknown:
        raise MmtokError(
            f"the generator has no modality {', '.join(map(repr, unknown))}; "
            f"its modalities are {', '.join(generator.token_space.modalities)}"
        )
    if not modalities:
        raise MmtokError(f"{data_dir}: no {split}.jsonl manifest for any of {', '.join(generator.token_space.modalities)}")
    if t_samples < 1:
        raise ValueError(f"t_samples must be at least 1, got {t_samples}")

    def known(order: list[str]) -> bool:
        return generator.layouts is None or order in generator.layouts

    score = _Scorer(pipeline, data_dir, baseline_split, t_samples, seed)

    scores: list[GeneratorScore] = []
    for modality in modalities:
        items = _held_out_items(pipeline, data_dir, modality, split, max_items)
        if known([modality]):
            scores.append(score(modality, "none", [[(modality, item.ids)] for item in items]))
        captioned = [item for item in items if item.caption is not None]
        if not captioned or modality == "text":
            continue
        if known(["text", modality]):
            examples = [[("text", item.caption), (modality, item.ids)] for item in captioned]
            scores.append(score(modality, "text", examples))
        if known([modality, "text"]):
            examples = [[(modality, item.ids), ("text", item.caption)] for item in captioned]
            scores.append(score("text", modality, examples))
    if not scores:
        raise MmtokError(f"the generator's segment orders {generator.layouts} match none of {', '.join(modalities)}")
    return scores


class _Scorer:
    """Score examples of one segment order: given, alone and with the condition masked."""

    def __init__(self, pipeline: Any, data_dir: Path, baseline_split: str, t_samples: int, seed: int) -> None:
        self.pipeline = pipeline
        self.generator: Generator = pipeline.generator
        self.data_dir = data_dir
        self.baseline_split = baseline_split
        self.t_samples = t_samples
        self.seed = seed
        self.unigrams: dict[str, torch.Tensor] = {}
        # Bits per token of targets scored alone, keyed by the target tensors' identities,
        # because the "none" row and a conditioned row of one modality share their targets.
        # Each entry also keeps its targets alive, so their ids cannot be reused.
        self.alone: dict[tuple[str, tuple[int, ...]], tuple[float, list[torch.Tensor]]] = {}

    def __call__(self, target: str, condition: str, examples: list[list[tuple[str, torch.Tensor]]]) -> GeneratorScore:
        from mmtok.train.generator import evaluate_bits_per_token

        targets = [example[-1][1] for example in examples]
        logger.info("scoring %d %s examples given %s", len(examples), target, condition)
        unigram = _cross_entropy(self.generator, target, targets, self.unigram(target))
        key = (target, tuple(id(ids) for ids in targets))
        if key not in self.alone:
            alone_examples = [[(target, ids)] for ids in targets]
            measured = evaluate_bits_per_token(self.generator, alone_examples, t_samples=self.t_samples, seed=self.seed)
            self.alone[key] = (measured[f"bits_per_token/{target}"], targets)
        alone = self.alone[key][0]
        if condition == "none":
            return GeneratorScore(target, condition, len(examples), alone, unigram)
        name = f"bits_per_token/{target}_given_{condition}"
        measured = evaluate_bits_per_token(self.generator, examples, t_samples=self.t_samples, seed=self.seed)
        return GeneratorScore(
            target, condition, len(examples), measured[name], unigram, alone, measured[f"{name}_condition_dropped"]
        )

    def unigram(self, target: str) -> torch.Tensor:
        if target not in self.unigrams:
            self.unigrams[target] = _unigram_log_probs(self.pipeline, self.data_dir, target, self.baseline_split)
        return self.unigrams[target]


def _held_out_items(pipeline: Any, data_dir: Path, modality: str, split: str, max_items: int | None) -> list[_Item]:
    """Tokenize the items of ``split`` into generator segments, with their captions."""
    from mmtok.train.generator_data import read_manifest, tokenize_rows, windows

    generator: Generator = pipeline.generator
    text = pipeline.tokenizers.get("text")
    rows = read_manifest(data_dir, modality, split)
    cache_dir = data_dir / ".cache" / "generator-tokens"
    options = generator.sequence_options.get(modality, {})
    if max_items is not None:
        # The token cache contains whole manifests; tokenize only the part when it is not cached.
        cached = tokenize_rows(data_dir, modality, split, pipeline.tokenizers[modality], options, rows, cache_dir, cached_only=True)
        rows = rows[:max_items]
        sequences = cached[:max_items] if cached is not None else tokenize_rows(
            data_dir, modality, split, pipeline.tokenizers[modality], options, rows
        )
    else:
        sequences = tokenize_rows(data_dir, modality, split, pipeline.tokenizers[modality], options, rows, cache_dir)
    length = generator.sequence_lengths[modality]
    items = []
    for row, sequence in zip(rows, sequences):
        if sequence is None:
            continue
        caption = None
        if text is not None and modality != "text" and row.get("caption"):
            caption = text.to_sequence(text.encode(Sample(row["caption"])).codes)[: generator.sequence_lengths["text"]]
        items.extend(_Item(piece, caption) for piece in windows(sequence, length, modality in generator.variable_length))
    if not items:
        raise MmtokError(f"{data_dir}/{modality}/{split}.jsonl: no readable items to score")
    return items


def _unigram_log_probs(pipeline: Any, data_dir: Path, target: str, split: str) -> torch.Tensor:
    """Return ``(V,)`` float64 log-frequencies of the ids at ``target`` positions in ``split``.

    Counts get one half added, and only ids a target position may hold get probability:
    the modality's range, plus the end marker and padding for a variable-length modality.
    A text target counts the text manifest and the captions of the other modalities.
    """
    from mmtok.train.generator_data import read_manifest

    generator: Generator = pipeline.generator
    sequences: list[torch.Tensor] = []
    for modality in generator.token_space.modalities:
        if not (Path(data_dir) / modality / f"{split}.jsonl").is_file():
            continue
        if modality == target:
            sequences += [item.ids for item in _held_out_items(pipeline, data_dir, modality, split, None)]
        elif target == "text":
            rows = [row for row in read_manifest(data_dir, modality, split) if row.get("caption")]
            text = pipeline.tokenizers["text"]
            length = generator.sequence_lengths["text"]
            sequences += [text.to_sequence(text.encode(Sample(row["caption"])).codes)[:length] for row in rows]
    if not sequences:
        raise MmtokError(f"{data_dir}: no {split} items of {target} for the unigram baseline")
    layout = generator.layout([target])
    counts = torch.zeros(generator.token_space.vocab_size, dtype=torch.float64)
    for ids in sequences:
        counts += torch.bincount(layout.encode([(target, ids)])[layout.target.content], minlength=counts.numel()).double()
    allowed = generator.allowed[layout.position_kind[layout.target.content]].any(0).cpu()
    counts = torch.where(allowed, counts + 0.5, torch.zeros_like(counts))
    return (counts / counts.sum()).log()


def _cross_entropy(generator: Generator, target: str, sequences: list[torch.Tensor], log_probs: torch.Tensor) -> float:
    """Return bits per target position of ``sequences`` under unigram ``log_probs``."""
    layout = generator.layout([target])
    total, positions = 0.0, 0
    for ids in sequences:
        slots = layout.encode([(target, ids)])[layout.target.content]
        total -= float(log_probs[slots].sum())
        positions += slots.numel()
    return total / positions / math.log(2)
