"""A performance-event tokenizer for MIDI notes, with a fixed vocabulary and no training.

The event vocabulary follows Oore et al. (2018), "This Time with Feeling: Learning
Expressive Musical Performance": NOTE_ON and NOTE_OFF per pitch, TIME_SHIFT in steps of
``time_step_ms``, and VELOCITY in bins that apply to the following note-ons. A PROGRAM
event, as in the multi-instrument variants of that vocabulary, switches the instrument for
the following note events. Ids are laid out as::

    [0, 128)                  NOTE_ON pitch
    [128, 256)                NOTE_OFF pitch
    [256, 256 + S)            TIME_SHIFT of 1 .. S steps                 (S = max_shift_steps)
    [256 + S, 256 + S + V)    VELOCITY bin                               (V = velocity_bins)
    [256 + S + V, ... + 129)  PROGRAM 0 .. 127, then 128 for drums

Encoding rounds onsets and offsets to the time step and velocities to their bin centre,
so decoding returns the notes exactly when they already lie on that grid.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any

import torch

from mmtok import MmtokError, Sample, Tokenizer, Tokens

from mmtok_midi.modality import DRUMS, check_notes, notes_tensor

PITCHES = 128
PROGRAMS = DRUMS + 1
# Version of the event layout, stored in the event_layout buffer so the weights hash changes with it.
LAYOUT_VERSION = 1


class MidiTokenizer(Tokenizer):
    """Encode ``(N, 5)`` note tensors into 1-D performance-event ids and back.

    Args:
        time_step_ms: length of one time-shift step in milliseconds.
        max_shift_steps: the maximum length of one time shift, in steps. Longer gaps
            take several TIME_SHIFT events.
        velocity_bins: number of velocity bins over 1..127.
    """

    modality = "midi"

    def __init__(self, time_step_ms: int = 10, max_shift_steps: int = 100, velocity_bins: int = 32) -> None:
        super().__init__()
        if time_step_ms < 1 or max_shift_steps < 1 or not 1 <= velocity_bins <= 127:
            raise ValueError(
                f"need time_step_ms >= 1, max_shift_steps >= 1 and velocity_bins in 1..127, "
                f"got {time_step_ms}, {max_shift_steps} and {velocity_bins}"
            )
        self.time_step_ms = time_step_ms
        self.max_shift_steps = max_shift_steps
        self.velocity_bins = velocity_bins
        # This tokenizer has no weights. The buffer puts its settings into model.safetensors
        # and so into the weights hash, so tokens made with other settings fail to decode.
        self.register_buffer(
            "event_layout", torch.tensor([LAYOUT_VERSION, time_step_ms, max_shift_steps, velocity_bins])
        )
        self.note_off_offset = PITCHES
        self.shift_offset = 2 * PITCHES
        self.velocity_offset = self.shift_offset + max_shift_steps
        self.program_offset = self.velocity_offset + velocity_bins

    @property
    def vocab_size(self) -> int:
        return self.program_offset + PROGRAMS

    @property
    def step_seconds(self) -> float:
        return self.time_step_ms / 1000

    # Velocity bins ------------------------------------------------------------------

    def velocity_bin(self, velocity: int) -> int:
        return min(self.velocity_bins - 1, velocity * self.velocity_bins // 128)

    def bin_velocity(self, index: int) -> int:
        """Return the velocity at the centre of bin ``index``."""
        return min(127, max(1, round((index + 0.5) * 128 / self.velocity_bins)))

    # Samples ------------------------------------------------------------------------

    def encode_batch(self, samples: list[Sample]) -> list[Tokens]:
        """Encode each sample's ``(N, 5)`` notes into ``(E,)`` int64 event ids."""
        tokens = []
        for sample in samples:
            notes = check_notes(sample.data, "MIDI sample")
            ids = self._encode_notes(notes)
            seconds = float(notes[:, 1].max()) if len(notes) else 0.0
            tokens.append(self.make_tokens(ids, {"notes": len(notes), "seconds": round(seconds, 6)}))
        return tokens

    def _encode_notes(self, notes: torch.Tensor) -> torch.Tensor:
        events = []  # (step, 0 for note off and 1 for note on, program, pitch, velocity bin)
        for onset, offset, pitch, velocity, program in notes.tolist():
            start = round(onset / self.step_seconds)
            stop = max(round(offset / self.step_seconds), start + 1)
            events.append((start, 1, int(program), int(pitch), self.velocity_bin(int(velocity))))
            events.append((stop, 0, int(program), int(pitch), -1))
        # Note-offs first at equal times, so a note can end where the next one of its pitch starts.
        events.sort()

        ids: list[int] = []
        now, program_now, velocity_now = 0, None, None
        for step, is_on, program, pitch, velocity in events:
            while step > now:
                shift = min(step - now, self.max_shift_steps)
                ids.append(self.shift_offset + shift - 1)
                now += shift
            if program != program_now:
                ids.append(self.program_offset + program)
                program_now = program
            if is_on and velocity != velocity_now:
                ids.append(self.velocity_offset + velocity)
                velocity_now = velocity
            ids.append(pitch if is_on else self.note_off_offset + pitch)
        return torch.tensor(ids, dtype=torch.int64)

    def decode(self, tokens: Tokens) -> Sample:
        """Decode ``(E,)`` event ids into ``(N, 5)`` notes.

        Any id sequence decodes, as a generator's output must: a NOTE_OFF without a
        sounding note is skipped, and notes still sounding at the end get one time step.
        """
        self.check_tokens(tokens, high=self.vocab_size)
        if tokens.codes.ndim != 1:
            raise MmtokError(f"MIDI codes must be 1-D event ids, got shape {tuple(tokens.codes.shape)}")
        rows = []
        sounding: dict[tuple[int, int], deque[tuple[int, int]]] = defaultdict(deque)
        now, program, velocity = 0, 0, self.bin_velocity(self.velocity_bins // 2)
        for event in tokens.codes.tolist():
            if event < self.note_off_offset:
                sounding[(program, event)].append((now, velocity))
            elif event < self.shift_offset:
                queue = sounding.get((program, event - self.note_off_offset))
                if queue:
                    onset, note_velocity = queue.popleft()
                    rows.append(self._row(onset, now, event - self.note_off_offset, note_velocity, program))
            elif event < self.velocity_offset:
                now += event - self.shift_offset + 1
            elif event < self.program_offset:
                velocity = self.bin_velocity(event - self.velocity_offset)
            else:
                program = event - self.program_offset
        for (note_program, pitch), queue in sounding.items():
            for onset, note_velocity in queue:
                rows.append(self._row(onset, now, pitch, note_velocity, note_program))
        notes = notes_tensor(rows)
        seconds = float(notes[:, 1].max()) if len(notes) else 0.0
        return Sample(notes, {"notes": len(rows), "seconds": round(seconds, 6)})

    def _row(self, onset: int, offset: int, pitch: int, velocity: int, program: int) -> tuple:
        offset = max(offset, onset + 1)
        return (onset * self.step_seconds, offset * self.step_seconds, pitch, velocity, program)

    # Sequences for the generator ----------------------------------------------------

    def to_sequence(self, codes: torch.Tensor, **options: Any) -> torch.Tensor:
        return codes.reshape(-1)  # already one flat stream of events

    def from_sequence(self, ids: torch.Tensor, **options: Any) -> torch.Tensor:
        return ids.reshape(-1)

    def sequence_defaults(self) -> tuple[int, dict[str, Any]]:
        # 256 events: about 80 notes with their time shifts.
        return 256, {}

    # Model card ---------------------------------------------------------------------

    def card_variables(self) -> dict[str, Any]:
        return {
            "modality": self.modality,
            "architecture": (
                f"performance events with no trained weights: {PITCHES} note-on, {PITCHES} note-off, "
                f"{self.max_shift_steps} time shifts of {self.time_step_ms} ms, {self.velocity_bins} velocity bins, "
                f"{PROGRAMS} programs"
            ),
            "vocab_size": self.vocab_size,
            "token_rate": "variable: a note-on and a note-off per note, plus time shifts and changes of velocity or program",
            "example_suffix": ".mid",
        }

    def card_tags(self) -> list[str]:
        return ["midi", "symbolic-music", "tokenizer"]
