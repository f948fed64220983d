"""The text modality for mmtok: UTF-8 files and a SentencePiece tokenizer."""

from __future__ import annotations

import mmtok

from mmtok_text.modality import TextModality
from mmtok_text.tokenizer import TextTokenizer

__all__ = ["TextModality", "TextTokenizer"]


@mmtok.hookimpl
def register_modalities(register):
    register(TextModality())
