"""Tests of the MIDI plugin: files, tokens, the conformance kit, the CLI and a tiny generator.

The MIDI files are composed here with mido: scales and chords on a 10 ms grid, in format
0 and 1, with tempo changes, running status and note-ons of velocity 0.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import mido
import pytest
import torch
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # these tests never reach the Hub

from mmtok import MmtokError, Sample, load_model  # noqa: E402
from mmtok.cli import cli  # noqa: E402
from mmtok.testing import CHECKS, ModalityChecks, check_modality  # noqa: E402
from mmtok_midi import MidiModality, MidiTokenizer  # noqa: E402
from mmtok_midi.bundle import TRAINING_NOTE  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def compose(path: Path, seed: int = 0, notes: int = 8, program: int = 0, drums: bool = False, file_type: int = 1) -> Path:
    """Write a short piece: a scale of ``notes`` notes, 250 ms each, optionally over a drum beat."""
    rng = random.Random(seed)
    midi = mido.MidiFile(type=file_type, ticks_per_beat=480)  # 120 bpm: 960 ticks per second
    melody = mido.MidiTrack()
    melody.append(mido.MetaMessage("set_tempo", tempo=500_000, time=0))
    melody.append(mido.Message("program_change", program=program, channel=0, time=0))
    tonic = rng.randint(48, 72)
    for index in range(notes):
        pitch = tonic + [0, 2, 4, 5, 7, 9, 11, 12][index % 8]
        velocity = rng.choice([42, 66, 90, 114])  # centres of 32 velocity bins
        melody.append(mido.Message("note_on", note=pitch, velocity=velocity, channel=0, time=0))
        melody.append(mido.Message("note_on", note=pitch, velocity=0, channel=0, time=240))
    midi.tracks.append(melody)
    if drums:
        beat = mido.MidiTrack()
        for _ in range(notes // 2):
            beat.append(mido.Message("note_on", note=36, velocity=102, channel=9, time=0))
            beat.append(mido.Message("note_off", note=36, velocity=0, channel=9, time=480))
        if file_type == 0:
            midi.tracks[0] = mido.merge_tracks([melody, beat])
        else:
            midi.tracks.append(beat)
    midi.save(str(path))
    return path


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def pieces(tmp_path) -> list[Path]:
    return [compose(tmp_path / "scale.mid", seed=1), compose(tmp_path / "band.midi", seed=2, notes=12, program=40, drums=True)]


# Reading and writing -----------------------------------------------------------------------


def test_read_scale_notes(tmp_path):
    sample = MidiModality().read(compose(tmp_path / "a.mid", seed=3, notes=3))
    assert sample.data.shape == (3, 5)
    assert sample.data.dtype == torch.float32
    assert sample.data[:, 0].tolist() == pytest.approx([0.0, 0.25, 0.5])
    assert sample.data[:, 1].tolist() == pytest.approx([0.25, 0.5, 0.75])
    assert sample.metadata == {"notes": 3, "seconds": 0.75}


def test_read_drums_get_program_128(tmp_path):
    sample = MidiModality().read(compose(tmp_path / "b.mid", notes=4, program=40, drums=True))
    programs = sorted(set(sample.data[:, 4].int().tolist()))
    assert programs == [40, 128]


def test_read_follows_tempo_changes(tmp_path):
    midi = mido.MidiFile(type=0, ticks_per_beat=100)
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("set_tempo", tempo=1_000_000, time=0))  # 1 s per beat
    track.append(mido.Message("note_on", note=60, velocity=64, time=0))
    track.append(mido.Message("note_off", note=60, velocity=0, time=100))
    track.append(mido.MetaMessage("set_tempo", tempo=250_000, time=0))  # 0.25 s per beat
    track.append(mido.Message("note_on", note=62, velocity=64, time=0))
    track.append(mido.Message("note_off", note=62, velocity=0, time=100))
    midi.tracks.append(track)
    midi.save(str(tmp_path / "tempo.mid"))
    data = MidiModality().read(tmp_path / "tempo.mid").data
    assert data[:, :2].tolist() == [[0.0, 1.0], [1.0, 1.25]]


def test_read_running_status_bytes(tmp_path):
    """A format 0 file written byte by byte: running status and note-on velocity 0 as note-off."""
    events = bytes(
        [0x00, 0xFF, 0x51, 0x03, 0x07, 0xA1, 0x20,  # tempo 500000 us per beat
         0x00, 0x90, 60, 100,                       # note on C4
         0x00, 64, 100,                             # running status: note on E4
         0x83, 0x60, 60, 0,                         # 480 ticks later: C4 velocity 0 (off)
         0x00, 64, 0,                               # E4 off
         0x00, 0xFF, 0x2F, 0x00])                   # end of track
    header = b"MThd" + (6).to_bytes(4, "big") + (0).to_bytes(2, "big") + (1).to_bytes(2, "big") + (480).to_bytes(2, "big")
    track = b"MTrk" + len(events).to_bytes(4, "big") + events
    (tmp_path / "raw.mid").write_bytes(header + track)
    data = MidiModality().read(tmp_path / "raw.mid").data
    assert data.tolist() == [[0.0, 0.5, 60.0, 100.0, 0.0], [0.0, 0.5, 64.0, 100.0, 0.0]]


def test_read_unterminated_note_ends_with_file(tmp_path):
    midi = mido.MidiFile(type=0)
    track = mido.MidiTrack([mido.Message("note_on", note=60, velocity=64, time=0), mido.MetaMessage("end_of_track", time=960)])
    midi.tracks.append(track)
    midi.save(str(tmp_path / "open.mid"))
    data = MidiModality().read(tmp_path / "open.mid").data
    assert data[0, 1].item() == pytest.approx(1.0)


def test_write_then_read_keeps_notes(pieces, tmp_path):
    modality = MidiModality()
    original = modality.read(pieces[1])
    modality.save(original, tmp_path / "copy.mid")
    copy = modality.read(tmp_path / "copy.mid")
    assert torch.allclose(copy.data, original.data, atol=1e-3)


@pytest.mark.parametrize(
    "row, problem",
    [
        ([-1.0, 0.5, 60, 64, 0], "negative onset"),
        ([1.0, 0.5, 60, 64, 0], "offset before onset"),
        ([0.0, 0.5, 128, 64, 0], "pitch outside 0..127"),
        ([0.0, 0.5, 60, 0, 0], "velocity outside 1..127"),
        ([0.0, 0.5, 60, 64, 129], "program outside 0..128"),
        ([0.0, float("nan"), 60, 64, 0], "NaN"),
    ],
)
def test_write_rejects_invalid_note(tmp_path, row, problem):
    with pytest.raises(MmtokError, match=problem):
        MidiModality().save(Sample(torch.tensor([row])), tmp_path / "bad.mid")
    assert not (tmp_path / "bad.mid").exists()


def test_write_shares_channels_among_many_programs(tmp_path):
    # 20 programs, each playing two overlapping notes: more than 15 melodic channels hold.
    rows = [[0.1 * index, 0.1 * index + 1.0, 60 + index, 66, index] for index in range(20)]
    rows += [[0.1 * index + 0.5, 0.1 * index + 2.0, 40 + index, 66, index] for index in range(20)]
    original = Sample(torch.tensor(rows))
    MidiModality().save(original, tmp_path / "crowd.mid")
    copy = MidiModality().read(tmp_path / "crowd.mid").data
    expected = torch.tensor(sorted(rows, key=lambda row: (row[0], row[2], row[4])))
    assert torch.allclose(copy, expected, atol=1e-3)


def test_read_rejects_type_2(tmp_path):
    midi = mido.MidiFile(type=2)
    midi.tracks.append(mido.MidiTrack([mido.Message("note_on", note=60, velocity=64, time=0)]))
    midi.save(str(tmp_path / "async.mid"))
    with pytest.raises(MmtokError, match="type 2"):
        MidiModality().read(tmp_path / "async.mid")


# Tokens ----------------------------------------------------------------------------------


def test_tokenizer_vocabulary_layout():
    tokenizer = MidiTokenizer()
    assert tokenizer.vocab_size == 128 + 128 + 100 + 32 + 129


def test_encode_decode_exact_on_grid(pieces):
    tokenizer = MidiTokenizer()
    for path in pieces:
        sample = MidiModality().read(path)
        decoded = tokenizer.decode(tokenizer.encode(sample))
        assert torch.allclose(decoded.data, sample.data, atol=1e-5)


def test_encode_splits_long_gaps():
    tokenizer = MidiTokenizer()
    notes = torch.tensor([[0.0, 0.1, 60, 66, 0], [2.5, 2.6, 62, 66, 0]])
    ids = tokenizer.encode(Sample(notes)).codes.tolist()
    shifts = [event - tokenizer.shift_offset + 1 for event in ids if tokenizer.shift_offset <= event < tokenizer.velocity_offset]
    assert shifts == [10, 100, 100, 40, 10]


def test_decode_skips_unmatched_note_off():
    tokenizer = MidiTokenizer()
    ids = torch.tensor([128 + 60, 60, tokenizer.shift_offset + 9, 128 + 60])
    decoded = tokenizer.decode(tokenizer.make_tokens(ids, {}))
    assert decoded.data.tolist() == [[0.0, pytest.approx(0.1), 60.0, 66.0, 0.0]]


def test_settings_change_weights_hash():
    assert MidiTokenizer().weights_hash() != MidiTokenizer(time_step_ms=20).weights_hash()


def test_decode_rejects_tokens_of_other_settings(pieces):
    tokens = MidiTokenizer(time_step_ms=20).encode(MidiModality().read(pieces[0]))
    with pytest.raises(MmtokError, match="decode with the tokenizer that encoded them"):
        MidiTokenizer().decode(tokens)


def test_bundled_tokenizer_matches_defaults():
    bundled = load_model("mmtok-midi/performance-events")
    assert isinstance(bundled, MidiTokenizer)
    assert bundled.weights_hash() == MidiTokenizer().weights_hash()
    assert bundled.training_note == TRAINING_NOTE


# The conformance kit ---------------------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS)
def test_conformance(pieces, tmp_path, check):
    ModalityChecks(MidiModality(), pieces, workdir=tmp_path).run(check)


def test_conformance_with_other_settings(pieces, tmp_path):
    check_modality(MidiModality(), pieces, MidiTokenizer(time_step_ms=5, velocity_bins=16), workdir=tmp_path)


# The command line ------------------------------------------------------------------------


def test_plugins_lists_midi():
    listing = {plugin["name"]: plugin for plugin in json.loads(run("plugins", "--json").output)}
    assert listing["midi"]["distribution"] == "mmtok-midi"
    assert listing["midi"]["modalities"] == ["midi"]
    assert listing["midi"]["error"] is None


def test_encode_decode_commands(pieces, tmp_path):
    assert run("encode", str(pieces[1]), "-o", str(tmp_path / "band.mmtok")).exit_code == 0
    result = run("decode", str(tmp_path / "band.mmtok"), "-o", str(tmp_path / "back.mid"))
    assert result.exit_code == 0, result.output
    original = MidiModality().read(pieces[1]).data
    assert torch.allclose(MidiModality().read(tmp_path / "back.mid").data, original, atol=1e-3)


def test_encode_corrupt_file(tmp_path):
    (tmp_path / "bad.mid").write_bytes(b"MThd\x00\x00")
    result = run("encode", str(tmp_path / "bad.mid"))
    assert result.exit_code == 1
    assert "bad.mid: not a readable MIDI file" in result.output
    assert not (tmp_path / "bad.mid.mmtok").exists()


def test_info_bundled_tokenizer():
    details = json.loads(run("info", "mmtok-midi/performance-events", "--json").output)
    assert details["modality"] == "midi"
    assert details["vocab_size"] == 517
    assert details["architecture"].startswith("performance events")


def test_bundled_generator_was_not_trained_for_midi(tmp_path):
    result = run("generate", "--modality", "midi", "-o", str(tmp_path / "x.mid"))
    assert result.exit_code == 1
    assert "was not trained for 'midi'" in result.output
    assert not (tmp_path / "x.mid").exists()


# Generation with a tiny generator trained here -------------------------------------------


@pytest.fixture(scope="module")
def trained_generator(tmp_path_factory) -> Path:
    """Train a tiny generator on 30 scales through `mmtok train generator`."""
    data = tmp_path_factory.mktemp("data")
    for split, count in (("train", 24), ("val", 6)):
        (data / "midi" / split).mkdir(parents=True)
        rows = []
        for index in range(count):
            compose(data / "midi" / split / f"{index}.mid", seed=index + (100 if split == "val" else 0))
            rows.append(json.dumps({"file": f"{split}/{index}.mid"}))
        (data / "midi" / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    output = tmp_path_factory.mktemp("generator")
    result = run(
        "train", "generator", "--modalities", "midi", "--data", str(data), "--output", str(output),
        "--steps", "30", "--batch-size", "8", "--lr", "3e-3", "--threads", "1",
        "--model-arg", "dim=32", "--model-arg", "depth=1", "--model-arg", "heads=2",
        "--model-arg", 'sequence_lengths={"midi": 16}',
    )
    assert result.exit_code == 0, result.output
    return output


def test_generate_with_trained_generator(trained_generator, tmp_path):
    result = run("generate", "--model", str(trained_generator), "--modality", "midi", "-n", "2",
                 "--steps", "4", "--seed", "0", "-o", str(tmp_path / "tune.mid"))
    assert result.exit_code == 0, result.output
    for name in ("tune-1.mid", "tune-2.mid"):
        sample = MidiModality().read(tmp_path / name)
        assert sample.data.shape[1] == 5


def test_generator_records_bits_per_token(trained_generator):
    config = json.loads((trained_generator / "config.json").read_text())
    assert config["token_space"][0]["tokenizer"] == "mmtok-midi/performance-events"
    assert "bits_per_token/midi" in config["metrics"]


def test_generate_from_exported_pipeline(trained_generator, tmp_path):
    assert run("export-pipeline", str(tmp_path / "pipeline"), "--model", str(trained_generator)).exit_code == 0
    assert (tmp_path / "pipeline" / "midi-tokenizer" / "model.safetensors").is_file()
    result = run("generate", "--model", str(tmp_path / "pipeline"), "--modality", "midi", "--steps", "4",
                 "-o", str(tmp_path / "tune.mid"))
    assert result.exit_code == 0, result.output
    assert MidiModality().read(tmp_path / "tune.mid").data.ndim == 2
