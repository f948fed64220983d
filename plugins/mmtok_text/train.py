"""Training the SentencePiece text tokenizer.

Reproduce the bundled default (after ``python scripts/prepare_data.py``) with::

    mmtok train tokenizer --modality text --data data/text --output runs/text-tokenizer

``DIR/train.jsonl`` contains one ``{"text": ...}`` record per line (``DIR/train.txt`` with
one record per line also works); ``DIR/val.jsonl`` is used to measure tokens per character.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

from mmtok import MmtokError
from mmtok.train import distributed
from mmtok.train.loop import seed_everything
from mmtok_text.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)


def read_records(data_dir: Path, split: str) -> list[str]:
    """Read the text records of a split from ``DIR/<split>.jsonl`` or ``DIR/<split>.txt``."""
    data_dir = Path(data_dir)
    manifest = data_dir / f"{split}.jsonl"
    if manifest.is_file():
        with manifest.open(encoding="utf-8") as handle:
            return [json.loads(line)["text"] for line in handle if line.strip()]
    plain = data_dir / f"{split}.txt"
    if plain.is_file():
        return [line for line in plain.read_text("utf-8").splitlines() if line.strip()]
    raise MmtokError(f"{data_dir}: neither {split}.jsonl nor {split}.txt found")


def train_text_tokenizer(
    data_dir: Path,
    output_dir: Path,
    seed: int = 0,
    model_args: dict | None = None,
    **ignored,
) -> TextTokenizer:
    """Train a SentencePiece tokenizer; ``model_args`` may set ``vocab_size`` (default 1024).

    SentencePiece trains in one process, so under ``torchrun`` rank 0 trains and saves
    while the other processes wait, then load the saved tokenizer.
    """
    context = distributed.setup("cpu")
    if not context.is_main:
        distributed.barrier()
        return TextTokenizer.from_pretrained(str(output_dir))
    seed_everything(seed)
    vocab_size = int((model_args or {}).get("vocab_size", 1024))
    records = read_records(data_dir, "train")
    # SentencePiece reads sentences, so multi-line records are split at newlines; the
    # newline itself is a user-defined piece.
    lines = [line for record in records for line in record.split("\n") if line.strip()]
    logger.info("training SentencePiece (%d pieces) on %d lines", vocab_size, len(lines))
    tokenizer = TextTokenizer.train_from_lines(lines, vocab_size)
    try:
        validation = read_records(data_dir, "val")
    except MmtokError:
        validation = []
    if validation:
        characters = sum(len(text) for text in validation)
        tokens = sum(len(tokenizer.encode_text(text)) for text in validation)
        exact = sum(tokenizer.decode_text(tokenizer.encode_text(text)) == text for text in validation)
        tokenizer.metrics = {
            "val_characters_per_token": round(characters / max(tokens, 1), 3),
            "val_exact_round_trips": f"{exact}/{len(validation)}",
        }
    tokenizer.training_note = (
        f"SentencePiece unigram model, {vocab_size} pieces, trained on {len(lines)} lines. "
        f"Command: `mmtok {' '.join(shlex.quote(a) for a in sys.argv[1:])}`"
    )
    tokenizer.save_pretrained(output_dir)
    distributed.barrier()
    return tokenizer
