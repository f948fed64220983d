"""A SentencePiece text tokenizer whose model lives inside ``model.safetensors``.

The serialized SentencePiece model proto is stored as a uint8 buffer, so
``from_pretrained`` needs no other file. Training settings keep text exact: identity
normalisation, no whitespace folding and byte fallback for characters outside the
vocabulary (Kudo and Richardson, 2018, "SentencePiece").
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
import torch

from mmtok import MmtokError, Sample, Tokenizer, Tokens


def train_sentencepiece(lines: Iterable[str], vocab_size: int, model_type: str = "unigram") -> bytes:
    """Train a SentencePiece model on ``lines`` and return its serialized proto."""
    model = io.BytesIO()
    try:
        _train(lines, vocab_size, model_type, model)
    except RuntimeError as error:
        raise MmtokError(f"SentencePiece training failed: {error}") from error
    return model.getvalue()


def _train(lines: Iterable[str], vocab_size: int, model_type: str, model: io.BytesIO) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=0.9995,
        user_defined_symbols=["\n", "\t"],
        # Ids 0-2 are unk, bos and eos; SentencePiece needs unk, and bos/eos stay unused.
        pad_id=-1,
        max_sentence_length=1 << 16,
        num_threads=2,
        minloglevel=2,
    )


class TextTokenizer(Tokenizer):
    """Encode UTF-8 text into SentencePiece ids; decoding returns the exact text.

    Args:
        proto_size: length in bytes of the serialized SentencePiece model stored in the
            ``proto`` buffer (set by :meth:`from_proto`).
        vocab: SentencePiece vocabulary size, recorded for the config.
    """

    modality = "text"

    def __init__(self, proto_size: int = 0, vocab: int = 0) -> None:
        super().__init__()
        self.register_buffer("proto", torch.zeros(proto_size, dtype=torch.uint8))
        self.vocab = vocab
        self._processor: spm.SentencePieceProcessor | None = None

    @classmethod
    def from_proto(cls, proto: bytes) -> "TextTokenizer":
        """Build a tokenizer around a serialized SentencePiece model."""
        processor = spm.SentencePieceProcessor(model_proto=proto)
        tokenizer = cls(proto_size=len(proto), vocab=processor.get_piece_size())
        tokenizer.proto.copy_(torch.frombuffer(bytearray(proto), dtype=torch.uint8))
        return tokenizer

    @classmethod
    def train_from_lines(cls, lines: Iterable[str], vocab_size: int = 1024) -> "TextTokenizer":
        return cls.from_proto(train_sentencepiece(lines, vocab_size))

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        if self._processor is None:
            if self.proto.numel() == 0:
                raise MmtokError("this text tokenizer has no SentencePiece model; train or load one")
            self._processor = spm.SentencePieceProcessor(model_proto=self.proto.numpy().tobytes())
        return self._processor

    def _load_from_state_dict(self, *args, **kwargs):
        self._processor = None  # the proto may change
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode_text(self, text: str) -> torch.Tensor:
        """Encode a string into 1-D int64 ids."""
        return torch.tensor(self.processor.encode(text, out_type=int), dtype=torch.int64)

    def decode_text(self, ids: torch.Tensor) -> str:
        """Decode 1-D ids into a string."""
        return self.processor.decode([int(i) for i in ids])

    def encode_batch(self, samples: list[Sample]) -> list[Tokens]:
        tokens = []
        for sample in samples:
            if not isinstance(sample.data, str):
                raise MmtokError("text samples must hold a str")
            ids = self.encode_text(sample.data)
            tokens.append(self.make_tokens(ids, {"characters": len(sample.data)}))
        return tokens

    def decode(self, tokens: Tokens) -> Sample:
        self.check_tokens(tokens, high=self.vocab_size)
        if tokens.codes.ndim != 1:
            raise MmtokError(f"text codes must be 1-D, got shape {tuple(tokens.codes.shape)}")
        text = self.decode_text(tokens.codes)
        return Sample(text, {"characters": len(text)})

    def to_sequence(self, codes: torch.Tensor, **options) -> torch.Tensor:
        return codes.reshape(-1)

    def from_sequence(self, ids: torch.Tensor, **options) -> torch.Tensor:
        return ids.reshape(-1)

    def token_byte_spans(self, ids: torch.Tensor) -> list[tuple[int, int]]:
        """Return the ``[start, stop)`` byte offsets of each id in the UTF-8 text of ``ids``."""
        processor = self.processor
        spans, offset = [], 0
        for token in ids.tolist():
            if processor.is_byte(token):
                size = 1
            elif processor.is_control(token) or processor.is_unknown(token):
                size = 0
            else:
                # SentencePiece writes a space as U+2581 inside pieces.
                size = len(processor.id_to_piece(token).replace("\u2581", " ").encode("utf-8"))
            spans.append((offset, offset + size))
            offset += size
        return spans

    def region_mask(self, tokens: Tokens, region: tuple[float, ...], **options) -> torch.Tensor:
        """Return the ids that overlap the character span ``region = (start, end)``, ``end`` exclusive."""
        text = self.decode(tokens).data
        if len(region) != 2:
            raise MmtokError(f"a text region is a span start,end in characters, got {len(region)} numbers")
        start, end = region
        if int(start) != start or int(end) != end or not 0 <= start < end <= len(text):
            raise MmtokError(
                f"span {start:g},{end:g} does not lie inside the {len(text)} characters of the text "
                f"(whole numbers, 0 <= start < end <= {len(text)})"
            )
        first_byte = len(text[: int(start)].encode("utf-8"))
        last_byte = len(text[: int(end)].encode("utf-8"))
        spans = self.token_byte_spans(tokens.codes.reshape(-1))
        if spans and spans[-1][1] != len(text.encode("utf-8")):
            raise MmtokError("the token pieces do not add up to the decoded text; this tokenizer cannot infill it")
        return torch.tensor([begin < last_byte and stop > first_byte for begin, stop in spans], dtype=torch.bool)

    def merge_region(self, original: Sample, generated: Sample, region: tuple[float, ...]) -> Sample:
        """Put the regenerated characters between ``original[:start]`` and ``original[end:]``.

        Tokens that straddle an edge of the span are regenerated whole, so ``generated``
        may differ from the original a few characters outside the span. The characters
        ``generated`` keeps from the original before and after are found as its common
        prefix and suffix with the original, and only what lies between replaces the span.
        """
        text, new = original.data, generated.data
        start, end = int(region[0]), int(region[1])
        prefix = min(_common_prefix(text, new), start)
        suffix = min(_common_prefix(text[::-1], new[::-1]), len(text) - end, len(new) - prefix)
        merged = text[:start] + new[prefix : len(new) - suffix] + text[end:]
        return Sample(merged, {**generated.metadata, "characters": len(merged)})

    def sequence_defaults(self) -> tuple[int, dict]:
        # Enough for a caption or the start of a fortune at about 2.5 characters per token.
        return 32, {}

    def card_variables(self) -> dict:
        measured = self.metrics.get("val_characters_per_token")
        token_rate = "variable"
        if measured is not None:
            token_rate = f"variable, {measured} characters per token on the validation text"
        return {
            "modality": "text",
            "architecture": f"SentencePiece unigram model with byte fallback, {self.vocab_size} pieces",
            "vocab_size": self.vocab_size,
            "token_rate": token_rate,
            "example_suffix": ".txt",
        }

    def card_tags(self) -> list[str]:
        return ["text", "sentencepiece", "tokenizer"]


def read_lines(path: Path) -> list[str]:
    """Read training text records from a ``.txt`` file, one record per line."""
    return [line for line in Path(path).read_text("utf-8").splitlines() if line.strip()]


def _common_prefix(first: str, second: str) -> int:
    """Return the length of the longest common prefix of two strings."""
    for index, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return index
    return min(len(first), len(second))
