"""Tests of the audio plugin: file reading and writing, the codec tokenizer and its training."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import soundfile
import torch

import mmtok
from mmtok.errors import MmtokError
from mmtok.modality import Sample
from mmtok.tokens import Tokens
from mmtok_audio import AudioModality, AudioTokenizer, HarmonicAudioTokenizer, SEANetAudioTokenizer, SpectralAudioTokenizer
from mmtok_audio.evaluate import ClipScorer
from mmtok_audio.losses import LogMelDistance
from mmtok_audio.spectral import SpectralConfig, SpectralDecoder, spectral_receptive_field_frames
from mmtok_audio.train import evaluate_tokenizer, load_clips, sample_segments, synthetic_tones, train_audio_tokenizer

# Small enough to run in milliseconds, with the real hop of 320 samples at 16 kHz.
TINY = {
    "channels": [4, 8, 8, 16, 16],
    "strides": [4, 4, 4, 5],
    "dilations": [1],
    "bottleneck_dilations": [1, 3],
    "latent_dim": 8,
    "codebook_size": 32,
    "levels": 3,
}
# The spectral architecture at the same hop, latent size and codebooks.
TINY_SPECTRAL = {"width": 16, "encoder_blocks": 1, "decoder_blocks": 2, "latent_dim": 8, "codebook_size": 32, "levels": 3}
# The harmonic architecture's 3 levels are the pitch and 2 quantizer levels.
ARCHITECTURES = {
    "harmonic": (HarmonicAudioTokenizer, TINY_SPECTRAL),
    "seanet": (SEANetAudioTokenizer, TINY),
    "spectral": (SpectralAudioTokenizer, TINY_SPECTRAL),
}

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Seven silver swans swam silently seaward.",
    "Please remember to close the windows before it rains.",
    "Numbers like forty two appear in many books.",
]


def make_tokenizer(seed: int = 0, architecture: str = "seanet") -> AudioTokenizer:
    torch.manual_seed(seed)
    tokenizer_class, arguments = ARCHITECTURES[architecture]
    return tokenizer_class(**arguments).eval()


def tone(sample_rate: int, samples: int, channels: int, amplitude: float = 0.5) -> np.ndarray:
    """Return ``(samples, channels)`` float32 harmonic tones, a different pitch per channel."""
    time = np.arange(samples) / sample_rate
    columns = [
        amplitude * (0.7 * np.sin(2 * np.pi * 220 * (c + 1) * time) + 0.3 * np.sin(2 * np.pi * 550 * (c + 1) * time))
        for c in range(channels)
    ]
    return np.stack(columns, axis=1).astype(np.float32)


def write_speech(folder: Path, sentences: list[str]) -> list[Path]:
    """Write one espeak-ng WAV per sentence, or harmonic tones where espeak-ng is missing."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, sentence in enumerate(sentences):
        path = folder / f"{index:03d}.wav"
        if shutil.which("espeak-ng"):
            subprocess.run(["espeak-ng", "-s", str(150 + 10 * index), "-w", str(path), sentence], check=True)
        else:
            soundfile.write(path, tone(16000, 16000 * 2 + 997 * index, 1), 16000, subtype="PCM_16")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory) -> Path:
    """A data folder in the layout of scripts/prepare_data.py: audio/train and audio/val."""
    root = tmp_path_factory.mktemp("audio-data")
    write_speech(root / "audio" / "train", SENTENCES[:3])
    write_speech(root / "audio" / "val", SENTENCES[3:])
    return root


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def tokenizer(request) -> AudioTokenizer:
    return make_tokenizer(architecture=request.param)


def encode_array(tokenizer: AudioTokenizer, data: np.ndarray, sample_rate: int) -> Tokens:
    return tokenizer.encode(Sample(torch.from_numpy(data.T.copy()), {"sample_rate": sample_rate}))


# Plugin registration ------------------------------------------------------------------


def test_plugin_registers_audio_modality():
    modality = mmtok.get_plugin_manager().modality("audio")
    assert isinstance(modality, AudioModality)
    assert modality.default_suffix == ".wav"
    assert {".wav", ".flac", ".ogg"} <= set(modality.suffixes)
    assert (".mp3" in modality.suffixes) == ("MP3" in soundfile.available_formats())
    assert (".opus" in modality.suffixes) == OPUS_AVAILABLE
    assert modality.tokenizer_class() is AudioTokenizer


# Reading and writing ------------------------------------------------------------------

READ_CASES = [
    # (suffix, libsndfile subtype, sample rate, channels, tolerance)
    (".wav", "PCM_16", 16000, 1, 1e-4),
    (".wav", "PCM_24", 44100, 2, 1e-6),
    (".wav", "FLOAT", 48000, 3, 0.0),
    (".wav", "PCM_16", 8000, 1, 1e-4),
    (".flac", "PCM_16", 96000, 2, 1e-4),
    (".flac", "PCM_24", 22050, 1, 1e-6),
    (".ogg", "VORBIS", 32000, 2, None),
    (".wav", "PCM_U8", 24000, 1, 1 / 128),
    (".wav", "PCM_32", 96000, 6, 1e-8),
    (".wav", "DOUBLE", 11025, 2, 0.0),
]
if "MP3" in soundfile.available_formats():
    READ_CASES.append((".mp3", "MPEG_LAYER_III", 24000, 2, None))
OPUS_AVAILABLE = "OPUS" in soundfile.available_subtypes("OGG")
if OPUS_AVAILABLE:
    READ_CASES.append((".opus", "OPUS", 48000, 2, None))
# Container formats that soundfile cannot infer from the suffix.
CONTAINERS = {".opus": "OGG"}


@pytest.mark.parametrize("suffix,subtype,sample_rate,channels,tolerance", READ_CASES)
def test_read_formats(tmp_path, suffix, subtype, sample_rate, channels, tolerance):
    source = tone(sample_rate, 4321, channels)
    path = tmp_path / f"input{suffix}"
    soundfile.write(path, source, sample_rate, subtype=subtype, format=CONTAINERS.get(suffix))

    sample = AudioModality().read(path)

    assert sample.data.dtype == torch.float32
    assert tuple(sample.data.shape) == (channels, 4321)
    assert sample.metadata == {"sample_rate": sample_rate, "channels": channels, "samples": 4321, "subtype": subtype}
    if tolerance is not None:
        assert np.abs(sample.data.numpy().T - source).max() <= tolerance
    else:  # Vorbis, Opus and MP3 are lossy: compare the signals by correlation.
        correlation = np.corrcoef(sample.data.numpy().T.ravel(), source.ravel())[0, 1]
        assert correlation > 0.9


@pytest.mark.parametrize(
    "suffix,subtype,tolerance",
    [(".wav", "PCM_16", 1e-4), (".flac", "PCM_16", 1e-4), (".ogg", "VORBIS", None)]
    + ([(".opus", "OPUS", None)] if OPUS_AVAILABLE else []),
)
def test_write_round_trip(tmp_path, suffix, subtype, tolerance):
    modality = AudioModality()
    data = torch.from_numpy(tone(24000, 5000, 2).T.copy())
    path = tmp_path / f"output{suffix}"

    modality.save(Sample(data, {"sample_rate": 24000}), path)
    sample = modality.read(path)

    assert sample.metadata["subtype"] == subtype
    assert sample.metadata["sample_rate"] == 24000
    assert tuple(sample.data.shape) == (2, 5000)
    if tolerance is not None:
        assert float((sample.data - data).abs().max()) <= tolerance
    else:
        assert float(torch.corrcoef(torch.stack([sample.data.flatten(), data.flatten()]))[0, 1]) > 0.9


@pytest.mark.skipif("MP3" not in soundfile.available_formats(), reason="libsndfile built without MP3")
def test_write_mp3_reads_back(tmp_path):
    modality = AudioModality()
    path = tmp_path / "output.mp3"

    modality.save(Sample(torch.from_numpy(tone(44100, 44100, 2).T.copy()), {"sample_rate": 44100}), path)
    sample = modality.read(path)

    assert sample.metadata["sample_rate"] == 44100
    assert sample.metadata["channels"] == 2


def test_write_clips_to_unit_range(tmp_path):
    modality = AudioModality()
    data = torch.tensor([[0.0, 1.5, -3.0, 0.25]])
    path = tmp_path / "loud.wav"

    modality.save(Sample(data, {"sample_rate": 16000}), path)
    sample = modality.read(path)

    assert float(sample.data.max()) <= 1.0
    assert float(sample.data.min()) >= -1.0
    assert float(sample.data[0, 1]) > 0.99


def test_write_unknown_suffix_raises(tmp_path):
    with pytest.raises(MmtokError, match="use one of"):
        AudioModality().write(Sample(torch.zeros(1, 10), {"sample_rate": 16000}), tmp_path / "out.xyz")


def test_read_missing_file_raises(tmp_path):
    path = tmp_path / "missing.wav"
    with pytest.raises(MmtokError, match="missing.wav: file not found"):
        AudioModality().read(path)


def test_read_empty_file_raises(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(MmtokError, match="empty.wav: file is empty"):
        AudioModality().read(path)


def test_read_zero_length_audio_raises(tmp_path):
    path = tmp_path / "silent.wav"
    soundfile.write(path, np.zeros((0, 1), dtype=np.float32), 16000, subtype="PCM_16")
    with pytest.raises(MmtokError, match="silent.wav: audio file contains no samples"):
        AudioModality().read(path)


def test_read_corrupt_file_raises(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4)
    with pytest.raises(MmtokError, match="corrupt.wav: not a readable audio file"):
        AudioModality().read(path)


def test_read_truncated_wav_raises(tmp_path):
    path = tmp_path / "cut.wav"
    soundfile.write(path, tone(16000, 1000, 1), 16000, subtype="PCM_16")
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MmtokError, match=r"cut.wav: file is truncated: its header declares 2000 bytes"):
        AudioModality().read(path)


def test_read_truncated_flac_raises(tmp_path):
    path = tmp_path / "cut.flac"
    soundfile.write(path, tone(16000, 1000, 1), 16000, subtype="PCM_16")
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MmtokError, match="cut.flac: not a readable audio file"):
        AudioModality().read(path)


def test_read_nan_samples_raises(tmp_path):
    path = tmp_path / "nan.wav"
    data = tone(16000, 1000, 1)
    data[500, 0] = np.nan
    soundfile.write(path, data, 16000, subtype="FLOAT")
    with pytest.raises(MmtokError, match="nan.wav: audio contains NaN or infinite"):
        AudioModality().read(path)


def test_read_infinite_samples_raises(tmp_path):
    path = tmp_path / "inf.wav"
    data = tone(16000, 1000, 2)
    data[10, 1] = np.inf
    soundfile.write(path, data, 16000, subtype="FLOAT")
    with pytest.raises(MmtokError, match="inf.wav: audio contains NaN or infinite"):
        AudioModality().read(path)


def test_read_espeak_speech(speech_dir):
    path = sorted((speech_dir / "audio" / "train").glob("*.wav"))[0]
    sample = AudioModality().read(path)
    assert sample.metadata["channels"] == 1
    assert sample.metadata["samples"] > sample.metadata["sample_rate"]  # over one second


# Tokenizer ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sample_rate,samples,channels",
    [(44100, 12345, 2), (16000, 16001, 1), (8000, 777, 1), (96000, 12345, 3), (22050, 1, 1), (48000, 320, 2)],
)
def test_decode_restores_rate_length_channels(tokenizer, sample_rate, samples, channels):
    tokens = encode_array(tokenizer, tone(sample_rate, samples, channels), sample_rate)

    decoded = tokenizer.decode(tokens)

    assert tuple(decoded.data.shape) == (channels, samples)
    assert decoded.metadata == {"sample_rate": sample_rate, "samples": samples, "channels": channels}
    assert decoded.data.dtype == torch.float32


@pytest.mark.parametrize("suffix,subtype,sample_rate,channels,tolerance", READ_CASES)
def test_file_formats_decode_to_input_shape(tokenizer, tmp_path, suffix, subtype, sample_rate, channels, tolerance):
    path = tmp_path / f"input{suffix}"
    soundfile.write(path, tone(sample_rate, 4321, channels), sample_rate, subtype=subtype, format=CONTAINERS.get(suffix))

    decoded = tokenizer.decode(tokenizer.encode_file(path))

    assert tuple(decoded.data.shape) == (channels, 4321)
    assert decoded.metadata["sample_rate"] == sample_rate


SIGNALS = {
    "silence": lambda time: np.zeros_like(time),
    "clipped": lambda time: np.clip(3.0 * np.sin(2 * np.pi * 220 * time), -1.0, 1.0),
    "dc-offset": lambda time: 0.5 + 0.2 * np.sin(2 * np.pi * 220 * time),
}


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_bundled_decodes_edge_signals(bundled, tmp_path, name):
    time = np.arange(16000) / 16000
    path = tmp_path / f"{name}.wav"
    soundfile.write(path, SIGNALS[name](time).astype(np.float32), 16000, subtype="PCM_16")

    decoded = bundled.decode(bundled.encode_file(path)).data

    assert tuple(decoded.shape) == (1, 16000)
    assert bool(torch.isfinite(decoded).all())
    assert float(decoded.abs().max()) <= 1.0
    if name == "silence":
        assert float(decoded.pow(2).mean().sqrt()) < 0.01


# Encodes and decodes a generated WAV of the given minutes in a fresh process and prints
# the peak resident memory in MiB, so the measurement includes nothing from the tests.
PEAK_MEMORY_SCRIPT = """
import resource, sys
import numpy as np, soundfile, torch
import mmtok
from mmtok_audio import AudioModality

torch.set_num_threads(1)
minutes, path = float(sys.argv[1]), sys.argv[2]
samples = int(minutes * 60 * 16000)
time = np.arange(samples, dtype=np.float64) / 16000
soundfile.write(path, (0.3 * np.sin(2 * np.pi * 220 * time)).astype(np.float32), 16000, subtype="PCM_16")
del time
tokenizer = mmtok.load_model("mmtok/audio-tokenizer")
if len(sys.argv) > 3:
    tokenizer.chunk_frames = int(sys.argv[3])
decoded = tokenizer.decode(tokenizer.encode(AudioModality().read(path)))
assert decoded.data.shape == (1, samples)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_memory_mib(tmp_path: Path, minutes: float) -> float:
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_SCRIPT, str(minutes), str(tmp_path / f"{minutes}.wav")],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def test_long_file_memory_stays_flat(bundled, tmp_path):
    # Ten minutes hold 9 more minutes of samples than one: about 33 MiB per float32 copy
    # at 16 kHz, and reading, mixing, padding and decoding make a few copies. Measured:
    # 40 MiB more with the default chunks, 2,960 MiB more with the whole file as one chunk.
    short = peak_memory_mib(tmp_path, 1.0)
    long = peak_memory_mib(tmp_path, 10.0)

    assert long - short < 300.0, (short, long)


def test_encode_codes_shape_and_range(tokenizer):
    tokens = encode_array(tokenizer, tone(44100, 12345, 2), 44100)

    model_samples = math.ceil(12345 * 16000 / 44100)
    assert tokens.codes.dtype == torch.int64
    assert tuple(tokens.codes.shape) == (3, math.ceil(model_samples / 320))
    assert int(tokens.codes.min()) >= 0
    assert int(tokens.codes.max()) < tokenizer.codebook_size
    assert tokens.metadata == {
        "sample_rate": 44100,
        "samples": 12345,
        "channels": 2,
        "model_sample_rate": 16000,
        "levels": 3,
        "bitrate": 750.0,
    }
    assert tokens.modality == "audio"
    assert tokens.tokenizer_hash == tokenizer.weights_hash()


def test_encode_is_deterministic(tokenizer):
    data = tone(16000, 8000, 1)
    assert torch.equal(encode_array(tokenizer, data, 16000).codes, encode_array(tokenizer, data, 16000).codes)


def test_batch_equals_one_by_one(tokenizer):
    samples = [
        Sample(torch.from_numpy(tone(44100, 12345, 2).T.copy()), {"sample_rate": 44100}),
        Sample(torch.from_numpy(tone(16000, 3200, 1).T.copy()), {"sample_rate": 16000}),
        Sample(torch.from_numpy(tone(8000, 9999, 3).T.copy() * 0.3), {"sample_rate": 8000}),
    ]

    batched = tokenizer.encode_batch(samples)
    single = [tokenizer.encode(sample) for sample in samples]

    for batch_tokens, single_tokens in zip(batched, single):
        assert torch.equal(batch_tokens.codes, single_tokens.codes)
        assert batch_tokens.metadata == single_tokens.metadata


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_chunked_processing_matches_whole(speech_dir, architecture):
    tokenizer = make_tokenizer(architecture=architecture)
    clip = load_clips(sorted((speech_dir / "audio" / "train").glob("*.wav"))[:1], 16000)[0]
    frames = clip.shape[0] // 320
    wave = clip[: frames * 320].view(1, 1, -1)

    whole_codes = tokenizer.encode_tensor(wave)
    whole_wave = tokenizer.decode_tensor(whole_codes)
    tokenizer.chunk_frames = 7
    chunked_codes = tokenizer.encode_tensor(wave)
    chunked_wave = tokenizer.decode_tensor(whole_codes)

    assert frames > 3 * 7
    assert torch.equal(chunked_codes, whole_codes)
    assert torch.allclose(chunked_wave, whole_wave, atol=1e-5)



def test_spectral_overlap_add_inverts_stft():
    # The decoder's inverse STFT must undo the encoder's framing exactly, edges included,
    # or a decoder that predicts the input's own spectrum could not reproduce it.
    config = SpectralConfig(hop_length=320, subframes=2, window_length=640, width=8, encoder_blocks=0, decoder_blocks=0, latent_dim=4)
    decoder = SpectralDecoder(config)
    wave = torch.randn(2, 320 * 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    window = torch.hann_window(640, dtype=torch.float64)
    decoder.window = window

    frames = torch.nn.functional.pad(wave, (config.padding, config.padding)).unfold(-1, 640, config.stft_hop) * window
    segments = torch.fft.irfft(torch.fft.rfft(frames, dim=-1), n=640, dim=-1) * window
    restored = decoder.overlap_add(segments)

    assert frames.shape[1] == 24
    assert restored.shape == wave.shape
    assert torch.allclose(restored, wave, atol=1e-12)


def test_spectral_context_covers_receptive_field():
    config = SpectralConfig(hop_length=320, subframes=2, window_length=640, width=8, encoder_blocks=2, decoder_blocks=3, latent_dim=4)
    # Decoder: input convolution 3 frames, 3 blocks of 3 frames, 1 frame of STFT overlap.
    assert spectral_receptive_field_frames(config) == 3 + 3 * 3 + 1 + 1

def test_encode_fewer_levels(tokenizer):
    data = tone(16000, 6400, 1)
    full = encode_array(tokenizer, data, 16000)

    lowest = tokenizer.min_levels
    fewer = tokenizer.encode_batch([Sample(torch.from_numpy(data.T.copy()), {"sample_rate": 16000})], levels=lowest)[0]
    decoded = tokenizer.decode(fewer)

    assert tuple(fewer.codes.shape) == (lowest, 20)
    assert fewer.metadata["levels"] == lowest
    assert torch.equal(fewer.codes, full.codes[:lowest])
    assert tuple(decoded.data.shape) == (1, 6400)


def test_encode_levels_attribute():
    tokenizer = make_tokenizer()
    tokenizer.encode_levels = 2
    tokens = encode_array(tokenizer, tone(16000, 3200, 1), 16000)
    assert tuple(tokens.codes.shape) == (2, 10)


@pytest.mark.parametrize("bitrate,levels", [(250.0, 1), (600.0, 2), (750.0, 3), (1e9, 3)])
def test_encode_bitrate_picks_levels(tokenizer, bitrate, levels):
    # TINY runs 50 frames/s with 32 codes (5 bits) per level: 250 bit/s per level.
    sample = Sample(torch.from_numpy(tone(16000, 3200, 1).T.copy()), {"sample_rate": 16000})

    if levels < tokenizer.min_levels:  # the harmonic tokenizer always keeps its pitch level
        with pytest.raises(MmtokError, match="lowest bitrate, 500 bits/s"):
            tokenizer.encode_batch([sample], bitrate=bitrate)
        return

    tokens = tokenizer.encode_batch([sample], bitrate=bitrate)[0]

    assert tuple(tokens.codes.shape) == (levels, 10)
    assert tokens.metadata["levels"] == levels
    assert tokens.metadata["bitrate"] == 250.0 * levels


def test_encode_bitrate_recorded_in_token_file(tokenizer, tmp_path):
    sample = Sample(torch.from_numpy(tone(16000, 3200, 1).T.copy()), {"sample_rate": 16000})
    tokenizer.encode_batch([sample], bitrate=500)[0].save(tmp_path / "tone.wav.mmtok")

    loaded = Tokens.load(tmp_path / "tone.wav.mmtok")

    assert loaded.metadata["bitrate"] == 500.0
    assert loaded.metadata["levels"] == 2


@pytest.mark.parametrize("bitrate", [249.0, 0.0, -1.0, float("nan")])
def test_encode_bitrate_below_lowest_raises(tokenizer, bitrate):
    sample = Sample(torch.zeros(1, 320), {"sample_rate": 16000})
    lowest = 250 * tokenizer.min_levels
    with pytest.raises(MmtokError, match=f"lowest bitrate, {lowest} bits/s"):
        tokenizer.encode_batch([sample], bitrate=bitrate)


@pytest.mark.parametrize("options,message", [({"bitrate": "3k"}, "bitrate must be a number"), ({"levels": "2"}, "levels must be an integer")])
def test_encode_option_wrong_type_raises(tokenizer, options, message):
    sample = Sample(torch.zeros(1, 320), {"sample_rate": 16000})
    with pytest.raises(MmtokError, match=message):
        tokenizer.encode_batch([sample], **options)


def test_cli_encode_bitrate_option(bundled, tmp_path):
    from click.testing import CliRunner

    from mmtok.cli import cli

    path = tmp_path / "tone.wav"
    soundfile.write(path, tone(16000, 16000, 1), 16000, subtype="PCM_16")

    result = CliRunner().invoke(cli, ["encode", str(path), "--option", "bitrate=1200"])
    tokens = Tokens.load(tmp_path / "tone.wav.mmtok")

    assert result.exit_code == 0, result.output
    assert tokens.metadata["levels"] == 2
    assert tokens.metadata["bitrate"] == 1000.0
    assert tuple(tokens.codes.shape) == (2, 50)


def test_encode_levels_and_bitrate_raises(tokenizer):
    sample = Sample(torch.zeros(1, 320), {"sample_rate": 16000})
    with pytest.raises(MmtokError, match="not both"):
        tokenizer.encode_batch([sample], levels=2, bitrate=500)


@pytest.mark.parametrize("levels", [0, 4])
def test_encode_invalid_levels_raises(tokenizer, levels):
    sample = Sample(torch.zeros(1, 320), {"sample_rate": 16000})
    with pytest.raises(MmtokError, match=f"levels must be between {tokenizer.min_levels} and 3"):
        tokenizer.encode_batch([sample], levels=levels)


def test_encode_sample_without_rate_raises(tokenizer):
    with pytest.raises(MmtokError, match="sample_rate"):
        tokenizer.encode(Sample(torch.zeros(1, 320), {}))


def test_encode_nan_sample_raises(tokenizer):
    data = torch.zeros(1, 640)
    data[0, 3] = float("nan")
    with pytest.raises(MmtokError, match="NaN"):
        tokenizer.encode(Sample(data, {"sample_rate": 16000}))


def test_decode_other_tokenizer_raises(tokenizer):
    tokens = encode_array(tokenizer, tone(16000, 3200, 1), 16000)
    other = make_tokenizer(seed=1)
    with pytest.raises(MmtokError, match="decode with the tokenizer that encoded them"):
        other.decode(tokens)


def test_decode_out_of_range_code_raises(tokenizer):
    tokens = encode_array(tokenizer, tone(16000, 3200, 1), 16000)
    tokens.codes[0, 0] = tokenizer.codebook_size
    with pytest.raises(MmtokError, match="out of range"):
        tokenizer.decode(tokens)


def test_decode_missing_metadata_raises(tokenizer):
    tokens = encode_array(tokenizer, tone(16000, 3200, 1), 16000)
    del tokens.metadata["samples"]
    with pytest.raises(MmtokError, match="samples"):
        tokenizer.decode(tokens)


def test_token_file_round_trip(tokenizer, tmp_path):
    tokens = encode_array(tokenizer, tone(44100, 12345, 2), 44100)
    path = tmp_path / "clip.wav.mmtok"

    tokens.save(path)
    loaded = Tokens.load(path)

    assert torch.equal(loaded.codes, tokens.codes)
    assert tuple(tokenizer.decode(loaded).data.shape) == (2, 12345)


def test_save_load_round_trip_same_tokens(tokenizer, tmp_path):
    data = tone(22050, 11025, 1)

    # Saving rounds the weights to float16 first, so tokens made before it would carry
    # the hash of the unrounded weights.
    tokenizer.save_pretrained(tmp_path / "model")
    tokens = encode_array(tokenizer, data, 22050)
    loaded = AudioTokenizer.from_pretrained(tmp_path / "model")
    loaded_any = mmtok.load_model(str(tmp_path / "model"))
    stored = safetensors.torch.load_file(str(tmp_path / "model" / "model.safetensors"))

    assert type(loaded) is type(tokenizer)
    assert {tensor.dtype for tensor in stored.values() if tensor.is_floating_point()} == {torch.float16}
    assert next(loaded.parameters()).dtype == torch.float32
    assert loaded.weights_hash() == tokenizer.weights_hash()
    assert torch.equal(encode_array(loaded, data, 22050).codes, tokens.codes)
    assert isinstance(loaded_any, AudioTokenizer)
    assert torch.equal(loaded.decode(tokens).data, tokenizer.decode(tokens).data)



def test_load_with_other_architecture_raises(tmp_path):
    make_tokenizer(architecture="spectral").save_pretrained(tmp_path / "model")

    with pytest.raises(MmtokError, match="contains a SpectralAudioTokenizer model, not a SEANetAudioTokenizer"):
        SEANetAudioTokenizer.from_pretrained(tmp_path / "model")

def test_saved_config_and_card(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    card = (tmp_path / "model" / "README.md").read_text()

    assert config["codebook_size"] == 32
    assert config["mmtok_class"] == f"mmtok_audio.tokenizer.{type(tokenizer).__name__}"
    assert config.get("strides", [4, 4, 4, 5]) == [4, 4, 4, 5]
    assert config.get("hop_length", 320) == 320
    assert "50 frames/s x 3 levels = 750 bits/s" in card
    assert "input.wav" in card


@pytest.fixture(scope="module")
def bundled() -> AudioTokenizer:
    if "mmtok/audio-tokenizer" not in AudioModality().bundled_models():
        pytest.skip("no bundled audio tokenizer in this checkout")
    return mmtok.load_model("mmtok/audio-tokenizer")


def level_db(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return 20 * math.log10(float(estimate.pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()))


def test_bundled_tokenizer_keeps_speech_intelligible(bundled, speech_dir):
    # The bundled model measured STOI 0.92, PESQ-WB 2.11 and a level 0.6 dB low on this
    # espeak-ng sentence. The decoder predicts each STFT frame's phase, so the output does
    # not follow the input's waveform and SI-SNR is not a useful check.
    pytest.importorskip("pesq")
    pytest.importorskip("pystoi")
    path = sorted((speech_dir / "audio" / "val").glob("*.wav"))[0]
    sample = AudioModality().read(path)
    original = sample.data[0]

    decoded = bundled.decode(bundled.encode(sample)).data[0]
    scores = ClipScorer(sample.metadata["sample_rate"], speech=True)(decoded, original)
    clip = load_clips([path], 16000)[0]
    codec_distance = evaluate_tokenizer(bundled, [clip])["val_log_mel_distance"]
    silence_distance = float(LogMelDistance(16000)(torch.zeros(1, clip.shape[0]), clip.unsqueeze(0))[0])

    assert tuple(decoded.shape) == tuple(original.shape)
    assert scores["stoi"] > 0.85
    assert scores["pesq_wb"] > 1.8
    assert abs(level_db(decoded, original)) < 3.0
    assert codec_distance < 0.5 * silence_distance


def decode_bundled_sine(bundled: AudioTokenizer, frequency: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a 2 s sine at 16 kHz and the bundled tokenizer's decoding of it."""
    time = torch.arange(32000) / 16000
    wave = 0.05 * torch.sin(2 * math.pi * frequency * time)
    sample = Sample(wave.unsqueeze(0), {"sample_rate": 16000})
    return wave, bundled.decode(bundled.encode(sample)).data[0]


@pytest.mark.parametrize("frequency", [220.0, 440.0])
def test_bundled_tokenizer_keeps_tone_pitch(bundled, frequency):
    # The pitch level codes the sine's frequency within 0.3%, so the decoder's harmonic
    # excitation sits on it.
    _, decoded = decode_bundled_sine(bundled, frequency)
    spectrum = torch.fft.rfft(decoded[8000:24000]).abs()  # 1 s, so bin k is k Hz

    assert abs(int(spectrum.argmax()) - frequency) <= 0.02 * frequency


@pytest.mark.xfail(
    strict=True,
    reason="the bundled tokenizer, trained without synthetic tones, returns these sines 7 to 10 dB quieter",
)
@pytest.mark.parametrize("frequency", [220.0, 440.0])
def test_bundled_tokenizer_keeps_tone_level(bundled, frequency):
    wave, decoded = decode_bundled_sine(bundled, frequency)
    assert abs(level_db(decoded, wave)) < 6.0


# Evaluation -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def espeak_files(tmp_path_factory) -> list[Path]:
    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed")
    return write_speech(tmp_path_factory.mktemp("espeak"), SENTENCES[:2])


def test_evaluate_bundled_on_speech(bundled, espeak_files):
    pytest.importorskip("pesq")
    pytest.importorskip("pystoi")

    result = AudioModality().evaluate_tokenizer(bundled, espeak_files)
    rows = result["rows"]

    assert json.loads(json.dumps(result)) == result
    # Level 0 is the pitch, which every encoding keeps.
    assert [row["levels"] for row in rows] == [2, 3, 4, 5, 6]
    assert [row["bitrate"] for row in rows] == [1000.0, 1500.0, 2000.0, 2500.0, 3000.0]
    for row in rows:
        for name in ("log_mel_distance", "si_snr_db", "pesq_wb", "stoi"):
            assert math.isfinite(row[name]), (row["levels"], name)
        assert 1.0 <= row["pesq_wb"] <= 4.7
        assert 0.0 <= row["stoi"] <= 1.0
        assert len(row["codebook_usage"]) == row["levels"]
    distances = [row["log_mel_distance"] for row in rows]
    assert distances == sorted(distances, reverse=True)
    assert distances[-1] < distances[0]
    assert result["summary"]["clips"] == 2
    assert result["summary"]["pesq_clips"] == 2
    assert result["summary"]["codebook_usage"] == rows[-1]["codebook_usage"]


def test_evaluate_missing_speech_packages_raises(tokenizer, espeak_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "pesq", None)  # makes `import pesq` raise ImportError

    with pytest.raises(MmtokError, match=r"pip install 'mmtok\[eval\]'"):
        AudioModality().evaluate_tokenizer(tokenizer, espeak_files)


def test_evaluate_speech_false_skips_packages(tokenizer, espeak_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "pesq", None)
    monkeypatch.setitem(sys.modules, "pystoi", None)

    result = AudioModality().evaluate_tokenizer(tokenizer, espeak_files, speech="false")

    assert [row["levels"] for row in result["rows"]] == list(range(tokenizer.min_levels, 4))
    assert "pesq_wb" not in result["rows"][0]
    assert "stoi" not in result["rows"][0]
    assert math.isfinite(result["rows"][0]["log_mel_distance"])
    assert result["summary"]["speech_metrics"] is False


def test_evaluate_short_and_silent_clips_skip_speech_metrics(tokenizer, tmp_path):
    pytest.importorskip("pesq")
    pytest.importorskip("pystoi")
    short = tmp_path / "short.wav"
    silent = tmp_path / "silent.wav"
    soundfile.write(short, tone(16000, 10, 1), 16000)
    soundfile.write(silent, np.zeros(16000, dtype=np.float32), 16000)

    result = AudioModality().evaluate_tokenizer(tokenizer, [short, silent])

    # STOI needs 30 non-silent frames of 25.6 ms and PESQ a quarter second of speech.
    assert result["summary"]["stoi_clips"] == 0
    assert result["summary"]["pesq_clips"] == 0
    assert "stoi" not in result["rows"][0]
    assert math.isfinite(result["rows"][0]["log_mel_distance"])


def test_evaluate_grid_option_raises(tokenizer, espeak_files, tmp_path):
    with pytest.raises(MmtokError, match="--grid draws a picture of images"):
        AudioModality().evaluate_tokenizer(tokenizer, espeak_files, grid=tmp_path / "grid.png")


def test_evaluate_unknown_option_raises(tokenizer, espeak_files):
    with pytest.raises(MmtokError, match="unknown audio evaluation option"):
        AudioModality().evaluate_tokenizer(tokenizer, espeak_files, speeech=False)


def test_evaluate_bad_speech_value_raises(tokenizer, espeak_files):
    with pytest.raises(MmtokError, match="option speech must be true or false"):
        AudioModality().evaluate_tokenizer(tokenizer, espeak_files, speech="maybe")


def test_evaluate_no_files_raises(tokenizer):
    with pytest.raises(MmtokError, match="no audio files"):
        AudioModality().evaluate_tokenizer(tokenizer, [], speech=False)


def test_training_metrics_match_evaluation(tokenizer, espeak_files):
    clips = load_clips(espeak_files, 16000)

    metrics = evaluate_tokenizer(tokenizer, clips)
    rows = AudioModality().evaluate_tokenizer(tokenizer, espeak_files, speech=False)["rows"]

    assert metrics["val_log_mel_distance"] == rows[-1]["log_mel_distance"]
    assert metrics[f"val_log_mel_distance_{tokenizer.min_levels}_levels"] == rows[0]["log_mel_distance"]
    assert metrics["val_codebook_usage_level_2"] == rows[-1]["codebook_usage"][2]


# Sequences for the generator ----------------------------------------------------------


def test_sequence_round_trip(tokenizer):
    codes = encode_array(tokenizer, tone(16000, 6400, 1), 16000).codes

    sequence = tokenizer.to_sequence(codes)

    assert tokenizer.vocab_size == 3 * 32
    assert tuple(sequence.shape) == (3 * 20,)
    assert sequence[:3].tolist() == [int(codes[0, 0]), 32 + int(codes[1, 0]), 64 + int(codes[2, 0])]
    assert int(sequence.max()) < tokenizer.vocab_size
    assert torch.equal(tokenizer.from_sequence(sequence), codes)


def test_from_sequence_bad_length_raises(tokenizer):
    with pytest.raises(MmtokError, match="divisible by 3 levels"):
        tokenizer.from_sequence(torch.zeros(7, dtype=torch.int64))


def test_from_sequence_out_of_vocabulary_raises(tokenizer):
    with pytest.raises(MmtokError, match=r"\[0, 96\)"):
        tokenizer.from_sequence(torch.tensor([0, 1, 96]))


def test_generated_sequence_decodes(tokenizer):
    sequence = torch.arange(30) % tokenizer.vocab_size
    codes = tokenizer.from_sequence(sequence)
    tokens = tokenizer.make_tokens(codes, tokenizer.generation_metadata(sequence.shape[0]))

    decoded = tokenizer.decode(tokens)

    assert tuple(decoded.data.shape) == (1, 10 * 320)
    assert decoded.metadata["sample_rate"] == 16000


# Training -----------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_training_reduces_log_mel_distance(speech_dir, tmp_path, architecture):
    validation = load_clips(sorted((speech_dir / "audio" / "val").glob("*.wav")), 16000)
    before = evaluate_tokenizer(make_tokenizer(architecture=architecture), validation)

    trained = train_audio_tokenizer(
        speech_dir,
        tmp_path / "run",
        steps=30,
        batch_size=4,
        segment_seconds=0.5,
        lr=3e-3,
        seed=0,
        logdir=tmp_path / "logs",
        checkpoint_every=15,
        model_args={"architecture": architecture, **ARCHITECTURES[architecture][1]},
        command="pytest",
    )

    assert type(trained) is ARCHITECTURES[architecture][0]
    assert trained.metrics["val_log_mel_distance"] < before["val_log_mel_distance"]
    fewest = f"val_log_mel_distance_{trained.min_levels}_levels"
    assert set(trained.metrics) >= {"val_si_snr_db", "val_codebook_usage_level_0", fewest}
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert "Command: `pytest`" in (tmp_path / "run" / "README.md").read_text()
    assert "val_log_mel_distance" in (tmp_path / "run" / "README.md").read_text()
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))


def test_training_resume_loads_checkpoint(speech_dir, tmp_path):
    model_args = {"architecture": "seanet", **TINY}
    arguments = {"steps": 6, "batch_size": 2, "segment_seconds": 0.2, "checkpoint_every": 3, "model_args": model_args}
    first = train_audio_tokenizer(speech_dir, tmp_path / "run", **arguments)

    resumed = train_audio_tokenizer(speech_dir, tmp_path / "run", resume=True, seed=5, **arguments)

    assert resumed.weights_hash() == first.weights_hash()


def test_training_missing_data_raises(tmp_path):
    with pytest.raises(MmtokError, match="no sound files for split 'train'"):
        train_audio_tokenizer(tmp_path, tmp_path / "run", steps=1, model_args=TINY_SPECTRAL)


def test_training_unknown_architecture_raises(speech_dir, tmp_path):
    with pytest.raises(MmtokError, match="unknown audio tokenizer architecture 'lstm'; choose one of harmonic, seanet, spectral"):
        train_audio_tokenizer(speech_dir, tmp_path / "run", steps=1, model_args={"architecture": "lstm"})


def test_training_wrong_model_argument_raises(speech_dir, tmp_path):
    with pytest.raises(MmtokError, match="invalid model arguments for the harmonic audio tokenizer"):
        train_audio_tokenizer(speech_dir, tmp_path / "run", steps=1, model_args={"channels": [4, 8]})


def test_decode_rejects_too_many_channels(bundled):
    tokens = bundled.encode(Sample(torch.zeros(1, 3200), {"sample_rate": 16000}))
    tokens.metadata["channels"] = 65
    with pytest.raises(MmtokError, match="claims 65 channels; at most 64 are supported"):
        bundled.decode(tokens)


def test_encode_rejects_too_many_channels(bundled):
    with pytest.raises(MmtokError, match="has 65 channels; at most 64 are supported"):
        bundled.encode(Sample(torch.zeros(65, 3200), {"sample_rate": 16000}))


def test_sample_segments_without_tones_draws_nothing_extra():
    clips = [torch.linspace(-0.5, 0.5, 4000)]
    plain_generator = torch.Generator().manual_seed(3)
    plain = sample_segments(clips, 4, 1600, plain_generator)
    generator = torch.Generator().manual_seed(3)
    shared = sample_segments(clips, 4, 1600, generator, tone_share=0.0)

    assert torch.equal(plain, shared)
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=plain_generator))


def test_sample_segments_tones_replace_every_segment():
    silent = [torch.zeros(4000)]
    batch = sample_segments(silent, 6, 1600, torch.Generator().manual_seed(0), tone_share=1.0, sample_rate=16000)
    peaks = batch.abs().amax(dim=(1, 2))
    assert tuple(batch.shape) == (6, 1, 1600)
    assert bool((peaks >= 10 ** (-30 / 20) - 1e-6).all())
    assert bool((peaks <= 10 ** (-3 / 20) + 1e-6).all())


def test_synthetic_tone_frequency_in_range():
    tones = synthetic_tones(20, 16000, 16000, torch.Generator().manual_seed(1))
    spectrum = torch.fft.rfft(tones).abs()  # 1 s, so bin k is k Hz
    strongest = spectrum.argmax(dim=1)
    assert bool((strongest >= 25).all())
    assert bool((strongest <= 0.45 * 16000 * 1.01).all())


def test_sample_segments_rare_tones_keep_clips():
    clips = [torch.linspace(-0.5, 0.5, 4000)]
    batches = [sample_segments(clips, 2, 1600, torch.Generator().manual_seed(seed), tone_share=0.01) for seed in range(20)]
    assert all(tuple(batch.shape) == (2, 1, 1600) for batch in batches)
    assert synthetic_tones(0, 1600, 16000).shape == (0, 1600)


@pytest.mark.parametrize("subtype", ["PCM_24", "FLOAT"])
def test_write_keeps_lossless_subtype(tmp_path, subtype):
    frames = (np.random.default_rng(0).standard_normal((4000, 2)) * 0.1).astype(np.float32)
    soundfile.write(tmp_path / "in.wav", frames, 22050, subtype=subtype)
    sample = AudioModality().read(tmp_path / "in.wav")
    AudioModality().write(sample, tmp_path / "out.wav")
    assert soundfile.info(tmp_path / "out.wav").subtype == subtype
    original, _ = soundfile.read(tmp_path / "in.wav", dtype="float64")
    written, _ = soundfile.read(tmp_path / "out.wav", dtype="float64")
    assert np.array_equal(original, written)
