"""Token files and the unified token space.

A token file is a safetensors file with one tensor, ``codes``, and string metadata: the
modality, the tokenizer's name and weights hash, and a JSON object with what decoding
needs (sample rate, length in samples, image size, ...).

The unified vocabulary of the generator is laid out as special tokens (pad, mask, then a
begin and an end marker per modality) followed by one contiguous id range per tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from mmtok.errors import MmtokError
from mmtok.modality import atomic_output

TOKEN_FILE_SUFFIX = ".mmtok"
FORMAT_NAME = "mmtok-tokens"
FORMAT_VERSION = "1"


@dataclass
class Tokens:
    """Discrete codes of one sample plus what is needed to decode them.

    ``codes`` is int64 with a modality-specific shape: ``(h, w)`` for an image grid,
    ``(levels, frames)`` for audio, ``(n,)`` for text.
    """

    codes: torch.Tensor
    modality: str
    tokenizer: str
    tokenizer_hash: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """Serialise to the token-file format."""
        return safetensors.torch.save({"codes": self._codes_for_saving()}, metadata=self._header())

    def save(self, path: Path, *, force: bool = False) -> None:
        """Write a token file atomically."""
        with atomic_output(Path(path), force=force) as temporary:
            temporary.write_bytes(self.to_bytes())

    def _codes_for_saving(self) -> torch.Tensor:
        return self.codes.detach().to("cpu", torch.int64).contiguous()

    def _header(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "modality": self.modality,
            "tokenizer": self.tokenizer,
            "tokenizer_hash": self.tokenizer_hash,
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }

    @classmethod
    def load(cls, path: Path) -> "Tokens":
        """Read a token file; raise :class:`MmtokError` naming the file when it is invalid.

        Only safetensors files are read; a pickle or ``torch.save`` file is rejected and
        never unpickled.
        """
        path = Path(path)
        if path.is_dir():
            raise MmtokError(f"{path}: is a folder, not a file")
        if not path.is_file():
            raise MmtokError(f"{path}: file not found")
        try:
            with safetensors.safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                names = list(handle.keys())
                if names != ["codes"]:
                    raise MmtokError(f"{path}: not an mmtok token file (tensors {names}, expected only 'codes')")
                codes = handle.get_tensor("codes")
        except (safetensors.SafetensorError, OSError, ValueError) as error:
            if isinstance(error, MmtokError):
                raise
            kind = pickle_kind(path)
            if kind is not None:
                raise MmtokError(f"{path}: is {kind}, not a safetensors token file; mmtok never loads pickles") from error
            raise MmtokError(f"{path}: not a readable mmtok token file ({error})") from error
        if header.get("format") != FORMAT_NAME:
            raise MmtokError(f"{path}: not an mmtok token file (format {header.get('format')!r})")
        if header.get("version") != FORMAT_VERSION:
            raise MmtokError(
                f"{path}: token file version {header.get('version')!r} is not supported (expected {FORMAT_VERSION})"
            )
        try:
            metadata = json.loads(header.get("metadata", "{}"))
        except (json.JSONDecodeError, RecursionError) as error:
            raise MmtokError(f"{path}: invalid metadata in token file: {error}") from error
        if not isinstance(metadata, dict):
            raise MmtokError(
                f"{path}: invalid metadata in token file: expected a JSON object, found {type(metadata).__name__}"
            )
        if codes.dtype != torch.int64:
            raise MmtokError(f"{path}: codes must be int64, found {codes.dtype}")
        missing = [key for key in ("modality", "tokenizer", "tokenizer_hash") if not header.get(key)]
        if missing:
            raise MmtokError(f"{path}: token file is missing {', '.join(missing)}")
        return cls(
            codes=codes,
            modality=header["modality"],
            tokenizer=header["tokenizer"],
            tokenizer_hash=header["tokenizer_hash"],
            metadata=metadata,
        )


# First bytes of files that mmtok never loads: a pickle (protocol 2 and later start with
# the PROTO opcode 0x80 and the protocol number) and a zip archive, which torch.save writes.
# Checked only after safetensors failed to parse a file, to word the error.
_PICKLE_SIGNATURES = {
    **{bytes([0x80, protocol]): "a pickle" for protocol in range(2, 6)},
    b"PK\x03\x04": "a zip archive (torch.save)",
}


def pickle_kind(path: Path) -> str | None:
    """Return what kind of pickle-based file ``path`` looks like, or None."""
    with path.open("rb") as handle:
        head = handle.read(4)
    for signature, kind in _PICKLE_SIGNATURES.items():
        if head.startswith(signature):
            return kind
    return None


PAD = "<pad>"
MASK = "<mask>"


@dataclass(frozen=True)
class TokenRange:
    """The id range one tokenizer occupies in the unified vocabulary."""

    modality: str
    tokenizer: str
    tokenizer_hash: str
    offset: int
    size: int

    @property
    def stop(self) -> int:
        return self.offset + self.size


class TokenSpace:
    """The unified vocabulary: special tokens, then one id range per modality.

    Args:
        entries: one dict per modality with keys ``modality``, ``tokenizer`` (name or
            path), ``tokenizer_hash`` and ``size`` (the tokenizer's flattened vocabulary).
    """

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        modalities = [entry["modality"] for entry in entries]
        if len(set(modalities)) != len(modalities):
            raise ValueError(f"each modality may appear once in a token space, got {modalities}")
        self.special_tokens = [PAD, MASK]
        for modality in modalities:
            self.special_tokens += [f"<{modality}>", f"</{modality}>"]
        offset = len(self.special_tokens)
        self.ranges: dict[str, TokenRange] = {}
        for entry in entries:
            size = int(entry["size"])
            self.ranges[entry["modality"]] = TokenRange(
                entry["modality"], entry["tokenizer"], entry["tokenizer_hash"], offset, size
            )
            offset += size
        self.vocab_size = offset

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def mask_id(self) -> int:
        return 1

    @property
    def modalities(self) -> list[str]:
        return list(self.ranges)

    def range(self, modality: str) -> TokenRange:
        if modality not in self.ranges:
            raise MmtokError(
                f"modality {modality!r} is not in this generator's vocabulary; choose one of {', '.join(self.ranges)}"
            )
        return self.ranges[modality]

    def begin_id(self, modality: str) -> int:
        self.range(modality)
        return self.special_tokens.index(f"<{modality}>")

    def end_id(self, modality: str) -> int:
        self.range(modality)
        return self.special_tokens.index(f"</{modality}>")

    def to_global(self, modality: str, local_ids: torch.Tensor) -> torch.Tensor:
        """Shift a tokenizer's flattened ids into the unified vocabulary."""
        token_range = self.range(modality)
        if local_ids.numel() and (int(local_ids.min()) < 0 or int(local_ids.max()) >= token_range.size):
            raise MmtokError(
                f"{modality} token ids must lie in [0, {token_range.size}), "
                f"found [{int(local_ids.min())}, {int(local_ids.max())}]"
            )
        return local_ids + token_range.offset

    def to_local(self, modality: str, global_ids: torch.Tensor) -> torch.Tensor:
        """Map unified ids of ``modality`` back to the tokenizer's flattened ids."""
        token_range = self.range(modality)
        outside = (global_ids < token_range.offset) | (global_ids >= token_range.stop)
        if bool(outside.any()):
            raise MmtokError(f"ids outside the {modality} range [{token_range.offset}, {token_range.stop})")
        return global_ids - token_range.offset

    def to_config(self) -> list[dict[str, Any]]:
        return [
            {"modality": r.modality, "tokenizer": r.tokenizer, "tokenizer_hash": r.tokenizer_hash, "size": r.size}
            for r in self.ranges.values()
        ]
