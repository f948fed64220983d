"""MIDI files as an mmtok modality: notes in, performance events as tokens, notes out."""

from __future__ import annotations

import mmtok

from mmtok_midi.modality import MidiModality
from mmtok_midi.tokenizer import MidiTokenizer

__all__ = ["MidiModality", "MidiTokenizer"]


@mmtok.hookimpl
def register_modalities(register):
    register(MidiModality())
