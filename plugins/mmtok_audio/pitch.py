"""Pitch per token frame, its codes, and a harmonic excitation that follows it.

The spectral codec's decoder places harmonics only as precisely as its codes describe
the pitch, and a learned encoder codes pitch coarsely. The harmonic tokenizer therefore
measures the fundamental frequency of each frame with YIN (de Cheveigné and Kawahara,
2002, "YIN, a fundamental frequency estimator for speech and music") and sends it as one
more code per frame. Its decoder receives an excitation whose harmonics lie exactly on
that frequency, as in a source-filter vocoder.

Pitch codes: 0 means unvoiced. Codes 1 to ``codebook_size - 1`` are frequencies spaced
evenly in log frequency from :data:`F_MIN` to :data:`F_MAX`, 4.7 cents apart with 1024
codes.

Shape letters: B batch, T samples, F token frames, H hop length (samples per frame).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Lowest and highest fundamental frequency coded, in Hz: below the deepest speaking
# voices and above the highest sung notes and the tones of common test signals.
F_MIN = 50.0
F_MAX = 1000.0
# Samples of each difference function (the YIN integration window), in seconds.
WINDOW_SECONDS = 0.032
# YIN's absolute threshold: the first lag whose normalized difference falls below it is
# the period. A frame is voiced when its best normalized difference is below
# VOICING_THRESHOLD and its RMS level above SILENCE_RMS.
YIN_THRESHOLD = 0.15
VOICING_THRESHOLD = 0.3
SILENCE_RMS = 1e-3
# Frequency given to unvoiced frames with no voiced neighbour, so the excitation's phase
# keeps a defined course. The voicing gate silences the excitation there.
UNVOICED_FREQUENCY = 100.0


def pitch_reach_samples(sample_rate: int) -> int:
    """Return how far, in samples from a frame's centre, :func:`estimate_pitch` reads."""
    window = round(WINDOW_SECONDS * sample_rate)
    longest_lag = math.ceil(sample_rate / F_MIN)
    return (window + longest_lag) // 2 + 1


def estimate_pitch(wave: torch.Tensor, sample_rate: int, hop_length: int) -> torch.Tensor:
    """Return the fundamental frequency in Hz of each frame of ``(B, 1, T)``, 0 where unvoiced.

    Frame ``f`` is measured on samples around its centre ``(f + 0.5) * hop_length``.
    Samples beyond the input count as zeros, so the result for a frame depends only on
    samples within :func:`pitch_reach_samples` of its centre. Returns ``(B, T // hop_length)``.
    """
    window = round(WINDOW_SECONDS * sample_rate)
    shortest_lag = max(2, math.floor(sample_rate / F_MAX))
    longest_lag = math.ceil(sample_rate / F_MIN)
    span = window + longest_lag + 1
    frames = wave.shape[-1] // hop_length
    reach = pitch_reach_samples(sample_rate)
    signal = F.pad(wave[:, 0].double(), (reach, reach + span))  # (B, reach + T + reach + span)
    # Segment f starts `span // 2` samples before frame f's centre.
    first = reach + hop_length // 2 - span // 2
    segments = signal[:, first:].unfold(-1, span, hop_length)[:, :frames]  # (B, F, span)
    # Difference function d(lag) = sum over the window of (x[n] - x[n + lag])^2, from the
    # energies and the cross-correlation of the window with the segment (by FFT).
    size = 1 << (2 * span - 1).bit_length()
    head = segments[..., :window]
    spectrum = torch.fft.rfft(segments, size) * torch.fft.rfft(head, size).conj()
    correlation = torch.fft.irfft(spectrum, size)[..., : longest_lag + 1]  # (B, F, lags)
    squares = F.pad(segments.pow(2).cumsum(-1), (1, 0))  # (B, F, span + 1)
    lags = torch.arange(longest_lag + 1)
    shifted_energy = squares[..., lags + window] - squares[..., lags]  # energy of x[lag : lag + window]
    difference = (squares[..., window : window + 1] + shifted_energy - 2 * correlation).clamp_min(0.0)
    # Cumulative mean normalized difference: d'(lag) = d(lag) * lag / sum_{k <= lag} d(k).
    running = difference[..., 1:].cumsum(-1)
    normalized = torch.ones_like(difference)
    normalized[..., 1:] = difference[..., 1:] * lags[1:] / running.clamp_min(1e-12)
    normalized[..., :shortest_lag] = 2.0  # lags that are too short never count

    # The period is the first dip below the threshold, or the deepest dip when none is.
    below = normalized < YIN_THRESHOLD
    first_below = torch.where(below.any(-1), below.int().argmax(-1), normalized.argmin(-1))  # (B, F)
    # Follow the dip down to its local minimum: the first lag from there on whose next
    # lag is not lower (the longest lag always counts as one).
    bottoms = F.pad(normalized[..., 1:] >= normalized[..., :-1], (0, 1), value=True)  # (B, F, lags)
    bottoms &= lags >= first_below.unsqueeze(-1)
    lag = bottoms.int().argmax(-1)
    # Parabolic interpolation between neighbouring lags refines the period below a sample.
    inner = lag.clamp(1, longest_lag - 1)
    left = normalized.gather(-1, (inner - 1).unsqueeze(-1)).squeeze(-1)
    middle = normalized.gather(-1, inner.unsqueeze(-1)).squeeze(-1)
    right = normalized.gather(-1, (inner + 1).unsqueeze(-1)).squeeze(-1)
    curvature = left - 2 * middle + right
    offset = torch.where(curvature > 1e-12, 0.5 * (left - right) / curvature.clamp_min(1e-12), torch.zeros_like(middle))
    period = inner + offset.clamp(-1.0, 1.0)
    level = head.pow(2).mean(-1).sqrt()
    voiced = (middle < VOICING_THRESHOLD) & (level > SILENCE_RMS)
    frequency = sample_rate / period.clamp_min(1.0)
    voiced &= (frequency >= F_MIN) & (frequency <= F_MAX)
    return torch.where(voiced, frequency, torch.zeros_like(frequency)).float()


def pitch_to_codes(frequency: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Quantize frequencies in Hz (0 for unvoiced) to pitch codes of the same shape."""
    steps = codebook_size - 2
    position = (frequency.clamp(F_MIN, F_MAX).log() - math.log(F_MIN)) / (math.log(F_MAX) - math.log(F_MIN))
    codes = 1 + (position * steps).round().long()
    return torch.where(frequency > 0, codes, torch.zeros_like(codes))


def codes_to_pitch(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Return the frequency in Hz of each pitch code, 0 for code 0 (unvoiced)."""
    steps = codebook_size - 2
    position = (codes - 1).clamp_min(0).double() / steps
    frequency = torch.exp(math.log(F_MIN) + position * (math.log(F_MAX) - math.log(F_MIN)))
    return torch.where(codes > 0, frequency, torch.zeros_like(frequency))


def pitch_features(frequency: torch.Tensor) -> torch.Tensor:
    """Return ``(B, 2, F)`` decoder inputs from ``(B, F)`` frequencies: log2(f / 200 Hz) and voicing."""
    voiced = frequency > 0
    octaves = torch.where(voiced, (frequency.clamp_min(F_MIN) / 200.0).log2(), torch.zeros_like(frequency))
    return torch.stack([octaves, voiced.to(octaves.dtype)], dim=1).float()


# Frames of pitch that the excitation of one frame reads on each side: one for the
# interpolation between frame centres and one for filling unvoiced frames.
EXCITATION_MARGIN = 2


def sample_frequencies(frequency: torch.Tensor, hop_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Interpolate frame frequencies to every sample.

    Args:
        frequency: ``(B, F + 2 * EXCITATION_MARGIN)`` frequencies in Hz, 0 where
            unvoiced, with :data:`EXCITATION_MARGIN` frames of context on each side.

    Returns:
        ``(B, F, H)`` float64 frequencies and ``(B, F, H)`` voicing gates in [0, 1] of the
        ``F`` inner frames. Values change linearly between frame centres. An unvoiced
        frame takes the frequency of a voiced neighbour (the previous one first), or
        :data:`UNVOICED_FREQUENCY` when neither is voiced, so that the excitation glides
        only between voiced pitches.
    """
    filled, voiced = _fill_unvoiced(frequency)
    backward, forward = _interpolation_weights(hop_length)
    return _interpolate(filled, backward, forward), _interpolate(voiced, backward, forward)


def phase_increments(frequency: torch.Tensor, hop_length: int, sample_rate: int) -> torch.Tensor:
    """Return the excitation's phase advance over each inner frame, ``(B, F)`` float64 radians.

    ``frequency`` is as :func:`sample_frequencies` takes it. The advance is the sum of the
    interpolated frequencies over the frame's samples, taken from the weights' sums
    without building the samples.
    """
    filled, _ = _fill_unvoiced(frequency)
    backward, forward = _interpolation_weights(hop_length)
    total = _interpolate(filled, backward.sum().view(1), forward.sum().view(1), hop_length)[..., 0]
    return (2 * math.pi / sample_rate) * total


def _fill_unvoiced(frequency: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return float64 frequencies with unvoiced frames filled from a voiced neighbour, and the voicing as 0 or 1."""
    frequency = frequency.double()
    voiced = frequency > 0
    previous = F.pad(frequency[:, :-1], (1, 0))
    following = F.pad(frequency[:, 1:], (0, 1))
    neighbour = torch.where(previous > 0, previous, torch.where(following > 0, following, UNVOICED_FREQUENCY))
    return torch.where(voiced, frequency, neighbour), voiced.double()


def _interpolation_weights(hop_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``(H,)`` weights of the previous and of the next frame for each sample of a frame."""
    # Position of each sample relative to its frame's centre, in frames: -0.5 to 0.5.
    position = (torch.arange(hop_length, dtype=torch.float64) + 0.5) / hop_length - 0.5
    return (-position).clamp_min(0.0), position.clamp_min(0.0)


def _interpolate(values: torch.Tensor, backward: torch.Tensor, forward: torch.Tensor, count: int = 1) -> torch.Tensor:
    """Blend each inner frame of ``(B, F + 2 * EXCITATION_MARGIN)`` values with its neighbours.

    Returns ``(B, F, len(backward))``. With summed weights and ``count`` the frame's
    sample count, the result is the sum over the frame's samples.
    """
    margin = EXCITATION_MARGIN
    length = values.shape[1]
    centre = values[:, margin : length - margin, None]
    before = values[:, margin - 1 : length - margin - 1, None]
    after = values[:, margin + 1 : length - margin + 1, None]
    return centre * (count - backward - forward) + before * backward + after * forward


def harmonic_excitation(frequency: torch.Tensor, start_phase: torch.Tensor, hop_length: int, sample_rate: int) -> torch.Tensor:
    """Return a sum of unit-amplitude cosine harmonics of the pitch, ``(B, F * H)`` float32.

    Args:
        frequency: ``(B, F + 2 * EXCITATION_MARGIN)`` frame frequencies, as
            :func:`sample_frequencies` takes them.
        start_phase: ``(B, F)`` float64 phase of the fundamental at the first sample of
            each inner frame, the running sum of :func:`phase_increments`. A chunk of a
            long signal passes the phases of the whole, so chunks join without seams.

    Every harmonic below 95% of the Nyquist frequency is present at amplitude 1,
    multiplied by the voicing gate. The sum of ``K`` cosines has the closed form
    ``sin((K + 1/2) x) / (2 sin(x / 2)) - 1/2``.
    """
    samples, gate = sample_frequencies(frequency, hop_length)  # (B, F, H) each
    step = (2 * math.pi / sample_rate) * samples
    phase = start_phase.unsqueeze(-1) + step.cumsum(-1) - step  # (B, F, H)
    phase = torch.remainder(phase, 2 * math.pi)
    harmonics = torch.floor(0.95 * sample_rate / 2 / samples)
    denominator = 2 * torch.sin(phase / 2)
    near_zero = denominator.abs() < 1e-9
    total = torch.where(
        near_zero, harmonics, torch.sin((harmonics + 0.5) * phase) / torch.where(near_zero, 1.0, denominator) - 0.5
    )
    return (total * gate).reshape(total.shape[0], -1).float()
