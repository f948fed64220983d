"""Reading and writing Standard MIDI Files as note lists, with mido.

A MIDI sample is a ``(N, 5)`` float32 tensor with one row per note, sorted by onset:

=======  ===========================================================
column   meaning
=======  ===========================================================
0        onset in seconds from the start of the file
1        offset (release) in seconds, not before the onset
2        MIDI pitch, 0 to 127 (60 is middle C)
3        velocity, 1 to 127
4        General MIDI program, 0 to 127, or 128 for the drum channel
=======  ===========================================================

Reading follows every tempo change, so times are real seconds. Controllers, pitch bends
and lyrics are not kept. Writing produces a format 0 file at 120 beats per minute with
480 ticks per beat, so times are rounded to 1/960 s, and shares the 15 melodic channels
among any number of programs with program changes.
"""

from __future__ import annotations

from collections import defaultdict, deque
from pathlib import Path

import mido
import torch

from mmtok import MmtokError, Modality, Sample
from mmtok.modality import check_input_file

PRETRAINED = Path(__file__).parent / "pretrained"

COLUMNS = ("onset", "offset", "pitch", "velocity", "program")
DRUMS = 128  # the program value of notes on the General MIDI drum channel
DRUM_CHANNEL = 9  # channel 10 in General MIDI's numbering from 1

# Written files use these, so one tick is 1/960 s.
TICKS_PER_BEAT = 480
TEMPO = 500_000  # microseconds per beat: 120 beats per minute

# Longer files are rejected: a bogus delta time could otherwise claim days of silence,
# which the tokenizer would spell out as time-shift events.
MAX_SECONDS = 3 * 60 * 60


def notes_tensor(rows: list[tuple[float, float, int, int, int]]) -> torch.Tensor:
    """Return note rows as a ``(N, 5)`` float32 tensor in canonical order: onset, pitch, program, offset."""
    rows = sorted(rows, key=lambda row: (row[0], row[2], row[4], row[1], row[3]))
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, len(COLUMNS))


def check_notes(data: object, where: str) -> torch.Tensor:
    """Return ``data`` as a ``(N, 5)`` float64 tensor; raise MmtokError naming ``where`` when invalid."""
    if not isinstance(data, torch.Tensor) or data.ndim != 2 or data.shape[1] != len(COLUMNS):
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise MmtokError(f"{where}: MIDI samples must be (notes, 5) tensors of {', '.join(COLUMNS)}, got {shape}")
    notes = data.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(notes).all()):
        raise MmtokError(f"{where}: MIDI notes contain NaN or infinite values")
    onset, offset, pitch, velocity, program = notes.unbind(dim=1)
    problems = {
        "negative onset": onset < 0,
        "offset before onset": offset < onset,
        f"offset past {MAX_SECONDS} s": offset > MAX_SECONDS,
        "pitch outside 0..127": (pitch < 0) | (pitch > 127) | (pitch != pitch.round()),
        "velocity outside 1..127": (velocity < 1) | (velocity > 127) | (velocity != velocity.round()),
        "program outside 0..128": (program < 0) | (program > DRUMS) | (program != program.round()),
    }
    for problem, rows in problems.items():
        if bool(rows.any()):
            raise MmtokError(f"{where}: note {int(rows.nonzero()[0])} has {problem}")
    return notes


class MidiModality(Modality):
    """Standard MIDI Files (``.mid``, ``.midi``) as note lists; see the module docstring."""

    name = "midi"
    suffixes = (".mid", ".midi")
    default_suffix = ".mid"
    default_tokenizer = "mmtok-midi/performance-events"

    def read(self, path: Path) -> Sample:
        path = Path(path)
        check_input_file(path)
        try:
            midi = mido.MidiFile(str(path), clip=False)
            if midi.type == 2:
                raise MmtokError(f"{path}: type 2 (asynchronous) MIDI files are not supported")
            notes, seconds = _collect_notes(midi, path)
        except MmtokError:
            raise
        except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError) as error:
            raise MmtokError(f"{path}: not a readable MIDI file ({type(error).__name__}: {error})") from error
        data = notes_tensor(notes)
        return Sample(data, {"notes": len(notes), "seconds": round(seconds, 6)})

    def write(self, sample: Sample, path: Path) -> None:
        path = Path(path)
        if path.suffix.lower() not in self.suffixes:
            raise MmtokError(f"{path}: cannot write MIDI as {path.suffix or '(no suffix)'!r}; use one of {' '.join(self.suffixes)}")
        notes = check_notes(sample.data, str(path))
        ticks_per_second = TICKS_PER_BEAT * 1_000_000 / TEMPO
        events = []  # (tick, 0 for note off and 1 for note on, program, pitch, velocity)
        for onset, offset, pitch, velocity, program in notes.tolist():
            start = round(onset * ticks_per_second)
            stop = max(round(offset * ticks_per_second), start + 1)  # a zero-length note would vanish
            events.append((start, 1, int(program), int(pitch), int(velocity)))
            events.append((stop, 0, int(program), int(pitch), 0))
        events.sort()

        track = mido.MidiTrack()
        track.append(mido.MetaMessage("set_tempo", tempo=TEMPO, time=0))
        channels = _ChannelAllocator()
        now = 0
        for tick, is_on, program, pitch, velocity in events:
            if is_on:
                channel, program_change = channels.note_on(program, pitch)
                if program_change:
                    track.append(mido.Message("program_change", program=program, channel=channel, time=tick - now))
                    now = tick
                track.append(mido.Message("note_on", note=pitch, velocity=velocity, channel=channel, time=tick - now))
            else:
                channel = channels.note_off(program, pitch)
                track.append(mido.Message("note_off", note=pitch, velocity=0, channel=channel, time=tick - now))
            now = tick
        track.append(mido.MetaMessage("end_of_track", time=0))
        midi = mido.MidiFile(type=0, ticks_per_beat=TICKS_PER_BEAT)
        midi.tracks.append(track)
        try:
            midi.save(str(path))
        except (OSError, ValueError) as error:
            raise MmtokError(f"{path}: writing the MIDI file failed: {error}") from error

    def tokenizer_class(self):
        from mmtok_midi.tokenizer import MidiTokenizer

        return MidiTokenizer

    def bundled_models(self) -> dict[str, Path]:
        folder = PRETRAINED / "performance-events"
        if (folder / "model.safetensors").is_file():
            return {self.default_tokenizer: folder}
        return {}


def _collect_notes(midi: mido.MidiFile, path: Path) -> tuple[list[tuple[float, float, int, int, int]], float]:
    """Pair note-on and note-off messages into note rows; return them and the file's length in seconds.

    A note-on with velocity 0 is a note-off, as the MIDI standard allows. A note takes the
    program its channel has at the note-on. Repeated notes of one pitch on one channel end
    first-in, first-out. Notes still sounding at the end of the file end there.
    """
    programs: dict[int, int] = defaultdict(int)
    sounding: dict[tuple[int, int], deque[tuple[float, int, int]]] = defaultdict(deque)
    notes = []
    now = 0.0
    for message in midi:  # merged tracks; message.time is the delta in seconds
        now += message.time
        if now > MAX_SECONDS:
            raise MmtokError(f"{path}: MIDI file is longer than {MAX_SECONDS} s")
        if message.type == "program_change":
            programs[message.channel] = message.program
        elif message.type == "note_on" and message.velocity > 0:
            program = DRUMS if message.channel == DRUM_CHANNEL else programs[message.channel]
            sounding[(message.channel, message.note)].append((now, message.velocity, program))
        elif message.type in ("note_on", "note_off"):
            queue = sounding.get((message.channel, message.note))
            if queue:
                onset, velocity, program = queue.popleft()
                notes.append((onset, now, message.note, velocity, program))
    for (_, pitch), queue in sounding.items():
        for onset, velocity, program in queue:
            notes.append((onset, now, pitch, velocity, program))
    return notes, now


class _ChannelAllocator:
    """Choose MIDI channels for notes so that any number of programs fits in 16 channels.

    Drums always use the drum channel. A melodic note takes a channel already set to its
    program when there is one. Otherwise it takes the channel with the fewest sounding
    notes and needs a program change there. Notes that still sound keep the program they
    started with, because a program change applies to later note-ons only.
    """

    def __init__(self) -> None:
        self.melodic = [channel for channel in range(16) if channel != DRUM_CHANNEL]
        self.program_of: dict[int, int] = {}
        self.sounding = defaultdict(int)
        self.channels_of: dict[tuple[int, int], deque[int]] = defaultdict(deque)

    def note_on(self, program: int, pitch: int) -> tuple[int, bool]:
        """Return the channel for a note-on and whether it needs a program change first."""
        change = False
        if program == DRUMS:
            channel = DRUM_CHANNEL
        else:
            matching = [channel for channel in self.melodic if self.program_of.get(channel) == program]
            if matching:
                channel = matching[0]
            else:
                channel = min(self.melodic, key=lambda candidate: (self.sounding[candidate], candidate in self.program_of))
                self.program_of[channel] = program
                change = True
        self.sounding[channel] += 1
        self.channels_of[(program, pitch)].append(channel)
        return channel, change

    def note_off(self, program: int, pitch: int) -> int:
        """Return the channel that the matching note-on used."""
        channel = self.channels_of[(program, pitch)].popleft()
        self.sounding[channel] -= 1
        return channel
