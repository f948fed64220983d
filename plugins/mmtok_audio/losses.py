"""Reconstruction losses and quality metrics for the audio tokenizer.

- Multi-resolution STFT loss (spectral convergence plus log-magnitude L1) from Yamamoto
  et al. (2020), "Parallel WaveGAN".
- Multi-resolution log-mel L1, as in the frequency-domain loss of EnCodec (Défossez et
  al., 2022). The mel filterbanks are built here from the HTK mel scale, so no audio
  library beyond torch is needed.
- Scale-invariant SNR from Le Roux et al. (2019), "SDR - half-baked or well done?".

Shape letters: B batch, T samples, N frequency bins, M mel bands, S STFT frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Floor under magnitudes before taking logs, so silence gives a finite log.
LOG_FLOOR = 1e-5


def hz_to_mel(frequency: torch.Tensor) -> torch.Tensor:
    """Convert Hz to mel on the HTK scale: ``2595 * log10(1 + f / 700)``."""
    return 2595.0 * torch.log10(1.0 + frequency / 700.0)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None) -> torch.Tensor:
    """Build triangular mel filters with unit peaks, shape ``(M, n_fft // 2 + 1)``.

    Filter ``m`` rises linearly from mel point ``m`` to ``m + 1`` and falls to ``m + 2``,
    over ``n_mels + 2`` points spaced evenly on the mel scale between ``f_min`` and
    ``f_max`` (default: the Nyquist frequency). A filter narrower than the bin spacing
    may cover no bin and stay all zero.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    bins = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # (N,)
    mel_points = torch.linspace(float(hz_to_mel(torch.tensor(f_min))), float(hz_to_mel(torch.tensor(f_max))), n_mels + 2)
    edges = mel_to_hz(mel_points.double())  # (M + 2,)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (M, 1) each
    rising = (bins - left) / (centre - left)
    falling = (right - bins) / (right - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()  # (M, N)


@dataclass(frozen=True)
class Resolution:
    """One STFT setting; the window length equals ``n_fft`` and the hop is a quarter of it."""

    n_fft: int
    n_mels: int

    @property
    def hop_length(self) -> int:
        return self.n_fft // 4


# Four resolutions from 16 ms to 128 ms windows at 16 kHz, so both transients and pitch
# harmonics are penalised.
DEFAULT_RESOLUTIONS = (Resolution(256, 32), Resolution(512, 64), Resolution(1024, 80), Resolution(2048, 128))


class SpectralLoss(nn.Module):
    """Multi-resolution STFT and log-mel losses, averaged over resolutions.

    ``forward`` returns a dict of scalars: ``spectral_convergence``, ``log_magnitude``
    (L1 of log magnitudes) and ``log_mel`` (L1 of log mel magnitudes).
    """

    def __init__(self, sample_rate: int, resolutions: tuple[Resolution, ...] = DEFAULT_RESOLUTIONS) -> None:
        super().__init__()
        self.resolutions = resolutions
        for index, resolution in enumerate(resolutions):
            self.register_buffer(f"window_{index}", torch.hann_window(resolution.n_fft), persistent=False)
            filters = mel_filterbank(sample_rate, resolution.n_fft, resolution.n_mels)
            self.register_buffer(f"mel_{index}", filters, persistent=False)

    def forward(self, estimate: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compare ``(B, 1, T)`` or ``(B, T)`` waveforms."""
        estimate = estimate.reshape(-1, estimate.shape[-1]).float()  # (B, T)
        reference = reference.reshape(-1, reference.shape[-1]).float()
        totals = {"spectral_convergence": 0.0, "log_magnitude": 0.0, "log_mel": 0.0}
        for index, resolution in enumerate(self.resolutions):
            window = getattr(self, f"window_{index}")
            filters = getattr(self, f"mel_{index}")
            estimate_magnitude = _magnitude(estimate, resolution, window)  # (B, N, S)
            reference_magnitude = _magnitude(reference, resolution, window)
            difference = torch.linalg.vector_norm(reference_magnitude - estimate_magnitude, dim=(1, 2))
            convergence = difference / torch.linalg.vector_norm(reference_magnitude, dim=(1, 2)).clamp_min(LOG_FLOOR)
            totals["spectral_convergence"] = totals["spectral_convergence"] + convergence.mean()
            totals["log_magnitude"] = totals["log_magnitude"] + F.l1_loss(
                estimate_magnitude.clamp_min(LOG_FLOOR).log(), reference_magnitude.clamp_min(LOG_FLOOR).log()
            )
            estimate_mel = (filters @ estimate_magnitude).clamp_min(LOG_FLOOR).log()  # (B, M, S)
            reference_mel = (filters @ reference_magnitude).clamp_min(LOG_FLOOR).log()
            totals["log_mel"] = totals["log_mel"] + F.l1_loss(estimate_mel, reference_mel)
        return {name: value / len(self.resolutions) for name, value in totals.items()}


def _magnitude(wave: torch.Tensor, resolution: Resolution, window: torch.Tensor) -> torch.Tensor:
    spectrum = torch.stft(
        wave,
        resolution.n_fft,
        hop_length=resolution.hop_length,
        window=window,
        center=True,
        pad_mode="constant",
        return_complex=True,
    )  # (B, N, S)
    # The small constant keeps the gradient of |z| finite where z is exactly zero.
    return (spectrum.real.pow(2) + spectrum.imag.pow(2) + 1e-12).sqrt()


def si_snr(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Return the scale-invariant SNR in dB of each row of ``(B, T)`` waveforms, shape ``(B,)``."""
    estimate = estimate - estimate.mean(dim=-1, keepdim=True)
    reference = reference - reference.mean(dim=-1, keepdim=True)
    scale = (estimate * reference).sum(-1, keepdim=True) / reference.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
    target = scale * reference
    noise = estimate - target
    ratio = target.pow(2).sum(-1).clamp_min(1e-12) / noise.pow(2).sum(-1).clamp_min(1e-12)
    return 10.0 * torch.log10(ratio)


class LogMelDistance(nn.Module):
    """Mean absolute difference of natural-log mel magnitudes, one resolution (metric, not loss).

    Defaults: 1024-point FFT, hop 256, 80 mel bands, which at 16 kHz is a 64 ms window.
    """

    def __init__(self, sample_rate: int, n_fft: int = 1024, n_mels: int = 80) -> None:
        super().__init__()
        self.resolution = Resolution(n_fft, n_mels)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("filters", mel_filterbank(sample_rate, n_fft, n_mels), persistent=False)

    def forward(self, estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Return the distance per row of ``(B, T)`` waveforms, shape ``(B,)``."""
        estimate_mel = (self.filters @ _magnitude(estimate.float(), self.resolution, self.window)).clamp_min(LOG_FLOOR)
        reference_mel = (self.filters @ _magnitude(reference.float(), self.resolution, self.window)).clamp_min(LOG_FLOOR)
        return (estimate_mel.log() - reference_mel.log()).abs().mean(dim=(1, 2))

