"""The Tokenizer base class: encode and decode samples, files and flattened sequences.

Every tokenizer is a :class:`mmtok.hub.HubModel`, so it saves, loads and pushes with the
Hugging Face Hub conventions, and stamps the tokens it makes with its name and weights
hash so decoding with another tokenizer fails clearly.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmtok.errors import MmtokError
from mmtok.hub import HubModel
from mmtok.modality import Sample
from mmtok.tokens import Tokens


class Tokenizer(HubModel):
    """Base class of modality tokenizers.

    Subclasses set ``modality`` and implement :meth:`encode_batch`, :meth:`decode`,
    :meth:`to_sequence`, :meth:`from_sequence` and :attr:`vocab_size`.
    """

    modality: ClassVar[str]
    card_template = "tokenizer"

    @property
    def vocab_size(self) -> int:
        """Size of the flattened id range that :meth:`to_sequence` produces."""
        raise NotImplementedError

    # Samples ------------------------------------------------------------------------

    def encode_batch(self, samples: list[Sample]) -> list[Tokens]:
        """Encode several samples; the result equals encoding them one by one.

        A subclass may take keyword options (the image tokenizer's ``resize``), which
        `mmtok encode --option KEY=VALUE` passes on after :meth:`check_encode_options`.
        """
        raise NotImplementedError

    def encode(self, sample: Sample, **options: Any) -> Tokens:
        """Encode one sample; ``options`` go to :meth:`encode_batch`."""
        return self.encode_batch([sample], **options)[0]

    def check_encode_options(self, options: dict[str, Any]) -> None:
        """Raise :class:`MmtokError` unless :meth:`encode_batch` takes every keyword in ``options``."""
        parameters = inspect.signature(self.encode_batch).parameters
        if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters.values()):
            return

        keyword_kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        accepted = [name for name, parameter in parameters.items() if parameter.kind in keyword_kinds]
        accepted = [name for name in accepted if name != "samples"]
        for name in options:
            if name not in accepted:
                choices = ", ".join(accepted) or "none"
                raise MmtokError(f"the {self.modality} tokenizer has no encode option {name!r}; options: {choices}")

    def decode(self, tokens: Tokens) -> Sample:
        """Decode tokens made by this tokenizer back into a sample."""
        raise NotImplementedError

    # Flattened sequences for the generator -----------------------------------------

    # ``options`` are the generator's per-modality sequence options (for example how many
    # residual levels of audio it models); tokenizers ignore the ones they do not know.

    def to_sequence(self, codes: torch.Tensor, **options: Any) -> torch.Tensor:
        """Flatten ``codes`` of one sample into 1-D ids in ``[0, vocab_size)``."""
        raise NotImplementedError

    def from_sequence(self, ids: torch.Tensor, **options: Any) -> torch.Tensor:
        """Invert :meth:`to_sequence`."""
        raise NotImplementedError

    def generation_metadata(self, sequence_length: int, **options: Any) -> dict[str, Any]:
        """Return the token metadata for a generated sequence of this length."""
        return {}

    def sequence_defaults(self) -> tuple[int, dict[str, Any]]:
        """Return the default generator segment length and sequence options."""
        return 256, {}

    def sequence_grid(self, sequence_length: int, **options: Any) -> tuple[int, int] | None:
        """Return ``(rows, columns)`` when a sequence of this length is a raster-order grid.

        The generator then gives the sequence 2-D rotary positions. None (the default)
        means the sequence is 1-D, as for text and audio.
        """
        return None

    # Infilling ----------------------------------------------------------------------

    def region_mask(self, tokens: Tokens, region: tuple[float, ...], **options: Any) -> torch.Tensor:
        """Return which ids of ``to_sequence(tokens.codes, **options)`` lie under ``region``.

        ``region`` is in the modality's own units, for the sample that ``tokens`` encode:
        ``(x0, y0, x1, y1)`` pixels of an image, ``(start, end)`` seconds of audio,
        ``(start, end)`` characters of text. Infilling regenerates the ids where the
        returned 1-D bool tensor is True. Raises :class:`MmtokError` for a region outside
        the sample, and by default, for tokenizers that do not support infilling.
        """
        raise MmtokError(f"{type(self).__name__} ({self.modality}) does not support infilling")

    def merge_region(self, original: Sample, generated: Sample, region: tuple[float, ...]) -> Sample:
        """Return ``generated`` inside ``region`` and ``original`` outside it.

        ``generated`` is the decoded infilled sample; lossy tokenizers change every part
        of a sample a little, so infilling keeps the original outside the region. The
        default returns ``generated`` unchanged.
        """
        return generated

    # Files --------------------------------------------------------------------------

    def encode_file(self, path: Path) -> Tokens:
        """Read a file with this tokenizer's modality and encode it."""
        from mmtok.plugins import get_plugin_manager

        modality = get_plugin_manager().modality(self.modality)
        return self.encode(modality.read(Path(path)))

    def decode_to_file(self, tokens: Tokens, path: Path, *, force: bool = False) -> None:
        """Decode tokens and write the result atomically to ``path``."""
        from mmtok.plugins import get_plugin_manager

        modality = get_plugin_manager().modality(self.modality)
        modality.save(self.decode(tokens), Path(path), force=force)

    # Helpers for subclasses -------------------------------------------------------

    def make_tokens(self, codes: torch.Tensor, metadata: dict[str, Any]) -> Tokens:
        return Tokens(
            codes=codes.to(torch.int64).cpu(),
            modality=self.modality,
            tokenizer=self.name_or_path,
            tokenizer_hash=self.weights_hash(),
            metadata=metadata,
        )

    def check_tokens(self, tokens: Tokens, *, low: int = 0, high: int | None = None) -> None:
        """Raise :class:`MmtokError` when ``tokens`` were not made by this tokenizer."""
        if tokens.modality != self.modality:
            raise MmtokError(f"tokens are {tokens.modality}, but this tokenizer decodes {self.modality}")
        own_hash = self.weights_hash()
        if tokens.tokenizer_hash != own_hash:
            raise MmtokError(
                f"tokens were made by tokenizer {tokens.tokenizer!r} (weights {tokens.tokenizer_hash}), "
                f"not by {self.name_or_path!r} (weights {own_hash}); decode with the tokenizer that encoded them"
            )
        codes = tokens.codes
        if codes.numel() and int(codes.min()) < low:
            raise MmtokError(f"token id {int(codes.min())} is negative")
        if high is not None and codes.numel() and int(codes.max()) >= high:
            raise MmtokError(f"token id {int(codes.max())} is out of range for a codebook of size {high}")

    def weights_hash(self) -> str:
        # Cached because decode and encode call it per sample; parameters change only in training.
        if self.training or not hasattr(self, "_cached_hash"):
            self._cached_hash = super().weights_hash()
        return self._cached_hash

    def train(self, mode: bool = True):  # type: ignore[override]
        self.__dict__.pop("_cached_hash", None)
        return super().train(mode)

    def round_weights(self) -> None:
        self.__dict__.pop("_cached_hash", None)
        super().round_weights()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.pop("_cached_hash", None)
        super()._load_from_state_dict(*args, **kwargs)
