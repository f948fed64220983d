"""Tests of the pitch level: YIN estimates, pitch codes and the harmonic excitation."""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest
import soundfile
import torch

from mmtok.errors import MmtokError
from mmtok.modality import Sample
from mmtok_audio import HarmonicAudioTokenizer
from mmtok_audio.pitch import (
    EXCITATION_MARGIN,
    F_MAX,
    F_MIN,
    codes_to_pitch,
    estimate_pitch,
    harmonic_excitation,
    phase_increments,
    pitch_to_codes,
)

SAMPLE_RATE = 16000
HOP = 320


def sine(frequency: float, seconds: float = 1.0, amplitude: float = 0.3) -> torch.Tensor:
    time = torch.arange(round(seconds * SAMPLE_RATE), dtype=torch.float64) / SAMPLE_RATE
    return (amplitude * torch.sin(2 * math.pi * frequency * time)).float().view(1, 1, -1)


@pytest.mark.parametrize("frequency", [60.0, 110.0, 220.0, 441.3, 880.0])
def test_estimate_pitch_of_sines(frequency):
    estimate = estimate_pitch(sine(frequency), SAMPLE_RATE, HOP)[0]

    assert estimate.shape == (50,)
    # Frames whose window lies inside the signal; the edges read zeros beyond it.
    inner = estimate[3:-3]
    assert bool((inner - frequency).abs().max() < 0.002 * frequency), inner


def test_estimate_pitch_missing_fundamental():
    # Harmonics 2 to 6 of 150 Hz: YIN finds the common period, not the lowest partial.
    time = torch.arange(SAMPLE_RATE, dtype=torch.float64) / SAMPLE_RATE
    wave = sum(0.1 * torch.sin(2 * math.pi * 150.0 * k * time + k) for k in range(2, 7))
    estimate = estimate_pitch(wave.float().view(1, 1, -1), SAMPLE_RATE, HOP)[0, 3:-3]

    assert bool((estimate - 150.0).abs().max() < 1.0), estimate


def test_estimate_pitch_unvoiced_silence_noise():
    silence = torch.zeros(1, 1, SAMPLE_RATE)
    noise = 0.1 * torch.randn(1, 1, SAMPLE_RATE, generator=torch.Generator().manual_seed(0))

    assert bool((estimate_pitch(silence, SAMPLE_RATE, HOP) == 0).all())
    assert float((estimate_pitch(noise, SAMPLE_RATE, HOP) > 0).float().mean()) < 0.1


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_estimate_pitch_of_speech(tmp_path):
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-p", "50", "-w", str(path), "A lovely morning for a long walk."], check=True)
    data, rate = soundfile.read(path, dtype="float32")
    assert rate == 22050
    import soxr

    wave = torch.from_numpy(soxr.resample(data, rate, SAMPLE_RATE).astype(np.float32))
    wave = wave[: wave.shape[0] // HOP * HOP].view(1, 1, -1)

    estimate = estimate_pitch(wave, SAMPLE_RATE, HOP)[0]
    voiced = estimate[estimate > 0]

    # The sentence is mostly vowels and voiced consonants, with pauses at both ends.
    assert 0.4 < voiced.numel() / estimate.numel() < 0.95
    # espeak-ng's default voice speaks around 120 Hz; pitch changes are smooth, so
    # neighbouring voiced frames differ by far less than an octave almost everywhere.
    assert 90.0 < float(voiced.median()) < 160.0
    steps = (estimate[1:].log2() - estimate[:-1].log2()).abs()[(estimate[1:] > 0) & (estimate[:-1] > 0)]
    assert float((steps < 0.2).float().mean()) > 0.95


def test_pitch_codes_round_trip():
    frequencies = torch.tensor([0.0, F_MIN, 73.4, 120.0, 440.0, F_MAX, 10.0, 5000.0])
    codes = pitch_to_codes(frequencies, 1024)
    restored = codes_to_pitch(codes, 1024)
    half_step = 2 ** (math.log2(F_MAX / F_MIN) / 1022 / 2) - 1

    assert codes[0] == 0
    assert restored[0] == 0
    assert codes[1] == 1
    assert codes[5] == 1023
    assert bool(((restored[1:6] / frequencies[1:6]) - 1).abs().max() <= half_step + 1e-9)
    # Frequencies outside the range clamp to its ends.
    assert codes[6] == 1
    assert codes[7] == 1023


def test_harmonic_excitation_spectrum():
    frames = 50
    frequency = torch.full((1, frames + 2 * EXCITATION_MARGIN), 250.0)
    start = torch.remainder(torch.cumsum(phase_increments(frequency, HOP, SAMPLE_RATE), 1), 2 * math.pi)
    start = torch.cat([torch.zeros(1, 1, dtype=torch.float64), start[:, :-1]], 1)

    excitation = harmonic_excitation(frequency, start, HOP, SAMPLE_RATE)[0].double()
    magnitude = torch.fft.rfft(excitation).abs() / (excitation.shape[0] / 2)  # 1 Hz bins: amplitude per harmonic

    top = math.floor(0.95 * SAMPLE_RATE / 2 / 250.0)  # 30 harmonics below 95% of Nyquist
    harmonics = torch.arange(1, top + 1) * 250
    assert torch.allclose(magnitude[harmonics], torch.ones(top, dtype=torch.float64), atol=1e-3)
    others = torch.ones_like(magnitude, dtype=torch.bool)
    others[harmonics] = False
    assert float(magnitude[others].max()) < 1e-3


def test_harmonic_excitation_unvoiced_is_silent():
    frequency = torch.zeros(1, 10 + 2 * EXCITATION_MARGIN)
    excitation = harmonic_excitation(frequency, torch.zeros(1, 10, dtype=torch.float64), HOP, SAMPLE_RATE)
    assert excitation.shape == (1, 10 * HOP)
    assert bool((excitation == 0).all())


def test_harmonic_excitation_continues_across_chunks():
    # A glide with an unvoiced gap, synthesized whole and in two chunks that take their
    # start phases from the whole: the chunks join without a seam.
    voiced = torch.linspace(100.0, 300.0, 40)
    voiced[18:22] = 0.0
    frequency = torch.nn.functional.pad(voiced, (EXCITATION_MARGIN, EXCITATION_MARGIN)).unsqueeze(0)
    increments = phase_increments(frequency, HOP, SAMPLE_RATE)
    start = torch.remainder(increments.cumsum(1) - increments, 2 * math.pi)

    whole = harmonic_excitation(frequency, start, HOP, SAMPLE_RATE)
    first = harmonic_excitation(frequency[:, : 25 + 2 * EXCITATION_MARGIN], start[:, :25], HOP, SAMPLE_RATE)
    second = harmonic_excitation(frequency[:, 25:], start[:, 25:], HOP, SAMPLE_RATE)

    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-4)


def test_harmonic_tokenizer_pitch_level():
    tokenizer = HarmonicAudioTokenizer(width=16, encoder_blocks=1, decoder_blocks=1, latent_dim=8, codebook_size=64, levels=3).eval()
    sample = Sample(sine(220.0, 2.0)[0], {"sample_rate": SAMPLE_RATE})

    tokens = tokenizer.encode(sample)
    expected = pitch_to_codes(torch.tensor(220.0), 64)

    assert tokenizer.min_levels == 2
    assert tokenizer.quantizer.levels == 2
    assert tuple(tokens.codes.shape) == (3, 100)
    assert bool((tokens.codes[0, 3:-3] == expected).all())
    assert tokenizer.bitrate() == 50 * 3 * 6
    with pytest.raises(MmtokError, match="levels must be between 2 and 3"):
        tokenizer.encode_batch([sample], levels=1)
    with pytest.raises(MmtokError, match=r"audio codes must be \(2 <= levels <= 3, frames\)"):
        tokenizer.decode(tokenizer.make_tokens(tokens.codes[:1], tokens.metadata))
