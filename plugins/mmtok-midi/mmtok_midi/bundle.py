"""Write the bundled tokenizer folder ``pretrained/performance-events``.

Run ``python -m mmtok_midi.bundle`` after changing the tokenizer's defaults; the tests
check that the shipped folder matches a tokenizer built with them.
"""

from __future__ import annotations

from mmtok_midi.modality import PRETRAINED
from mmtok_midi.tokenizer import MidiTokenizer

TRAINING_NOTE = (
    "No training: the event vocabulary follows from the constructor arguments. "
    "Written by `python -m mmtok_midi.bundle` in the mmtok-midi distribution."
)


def main() -> None:
    tokenizer = MidiTokenizer()
    tokenizer.training_note = TRAINING_NOTE
    tokenizer.save_pretrained(PRETRAINED / "performance-events")


if __name__ == "__main__":
    main()
