"""An STFT-domain encoder and an inverse-STFT decoder that both run at the token frame rate.

The decoder follows Vocos (Siuzdak, 2023, "Vocos: Closing the gap between time-domain
and Fourier-based neural vocoders for high-quality audio synthesis"): a stack of ConvNeXt blocks (Liu et al., 2022, "A
ConvNet for the 2020s") predicts the log magnitude and the phase of each STFT frame, and
an inverse STFT with "same" padding turns them into samples. The encoder mirrors it: log
magnitudes of the input's STFT, then ConvNeXt blocks down to the latent frames. Every
layer except the two STFTs works on token frames, not on samples, which makes this codec
several times cheaper per second of audio than a waveform-domain SEANet of the same width.

Each token frame spans ``hop_length`` samples and ``subframes`` STFT frames of
``hop_length / subframes`` samples each; the STFT window is ``window_length`` samples.

Shape letters: B batch, T samples, F token frames, S STFT frames, N frequency bins,
C channels, D latent dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmtok_audio.pitch import EXCITATION_MARGIN, harmonic_excitation, pitch_features

# Floor added to STFT magnitudes before the encoder takes their log (-80 dB re full scale).
LOG_MAGNITUDE_FLOOR = 1e-4
# Largest log magnitude the decoder may output: e^6 is about 400, above the magnitude of
# a full-scale sine in a 640-point Hann-windowed frame (160).
MAX_LOG_MAGNITUDE = 6.0
# Kernel of the depthwise convolution in each ConvNeXt block, in token frames.
BLOCK_KERNEL = 7
# Initial value of each block's per-channel output scale ("layer scale" in ConvNeXt), so
# that every block starts near the identity.
LAYER_SCALE_INIT = 1e-2


@dataclass(frozen=True)
class SpectralConfig:
    """Architecture shared by :class:`SpectralEncoder` and :class:`SpectralDecoder`.

    Attributes:
        hop_length: samples per token frame.
        subframes: STFT frames per token frame; it must divide ``hop_length``.
        window_length: STFT window and FFT size in samples, at least the STFT hop. Four
            times the STFT hop gives the 75% overlap that Vocos uses.
        width: channels of the ConvNeXt blocks; their hidden layer has three times as many.
        encoder_blocks: ConvNeXt blocks in the encoder.
        decoder_blocks: ConvNeXt blocks in the decoder.
        latent_dim: dimension D of the latent frames, the vectors the quantizer codes.
    """

    hop_length: int
    subframes: int
    window_length: int
    width: int
    encoder_blocks: int
    decoder_blocks: int
    latent_dim: int

    def __post_init__(self) -> None:
        if self.hop_length < 1 or self.subframes < 1 or self.hop_length % self.subframes:
            raise ValueError(
                f"subframes must divide hop_length, got hop_length={self.hop_length} and subframes={self.subframes}"
            )
        if self.window_length < self.stft_hop or (self.window_length - self.stft_hop) % 2:
            raise ValueError(
                f"window_length must be at least the STFT hop ({self.stft_hop}) and differ from it by an even "
                f"number of samples, got {self.window_length}"
            )
        if min(self.width, self.latent_dim) < 1 or min(self.encoder_blocks, self.decoder_blocks) < 0:
            raise ValueError("width and latent_dim must be positive and block counts not negative")

    @property
    def stft_hop(self) -> int:
        return self.hop_length // self.subframes

    @property
    def bins(self) -> int:
        return self.window_length // 2 + 1

    @property
    def padding(self) -> int:
        """Samples each STFT frame reaches beyond its own hop on each side."""
        return (self.window_length - self.stft_hop) // 2


def stft_frames(wave: torch.Tensor, config: SpectralConfig, window: torch.Tensor) -> torch.Tensor:
    """Return the ``(B, S, N)`` complex STFT of ``(B, T)`` samples, ``T`` divisible by the STFT hop.

    STFT frame ``s`` covers samples ``[s * stft_hop - padding, s * stft_hop + stft_hop + padding)``,
    zeros outside the input, so :meth:`SpectralDecoder.overlap_add` puts frame ``s`` back
    where it was cut.
    """
    padded = F.pad(wave, (config.padding, config.padding))  # (B, T + 2 * padding)
    frames = padded.unfold(-1, config.window_length, config.stft_hop) * window  # (B, S, window_length)
    return torch.fft.rfft(frames, dim=-1)


class ConvNeXtBlock(nn.Module):
    """Depthwise convolution over frames, then a per-frame MLP, added back to the input."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv1d(width, width, BLOCK_KERNEL, padding=BLOCK_KERNEL // 2, groups=width)
        self.norm = nn.LayerNorm(width)
        self.expand = nn.Linear(width, 3 * width)
        self.project = nn.Linear(3 * width, width)
        self.scale = nn.Parameter(torch.full((width,), LAYER_SCALE_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, F)`` to ``(B, C, F)``."""
        y = self.depthwise(x).transpose(1, 2)  # (B, F, C)
        y = self.project(F.gelu(self.expand(self.norm(y))))
        return x + (self.scale * y).transpose(1, 2)


class _Backbone(nn.Module):
    """Input convolution, normalisation, ConvNeXt blocks and a final normalisation."""

    def __init__(self, in_channels: int, width: int, blocks: int, kernel_size: int) -> None:
        super().__init__()
        self.embed = nn.Conv1d(in_channels, width, kernel_size, padding=kernel_size // 2)
        self.input_norm = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(ConvNeXtBlock(width) for _ in range(blocks))
        self.output_norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, in_channels, F)`` to ``(B, F, width)``."""
        x = self.input_norm(self.embed(x).transpose(1, 2)).transpose(1, 2)  # (B, C, F)
        for block in self.blocks:
            x = block(x)
        return self.output_norm(x.transpose(1, 2))


class SpectralEncoder(nn.Module):
    """Waveform to latent frames through log STFT magnitudes: ``(B, 1, T)`` to ``(B, D, T / hop_length)``."""

    # Kernel of the input convolution, in token frames.
    embed_kernel = 3

    def __init__(self, config: SpectralConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("window", torch.hann_window(config.window_length), persistent=False)
        # The subframes of one token frame are stacked as channels.
        self.backbone = _Backbone(config.subframes * config.bins, config.width, config.encoder_blocks, self.embed_kernel)
        self.output = nn.Linear(config.width, config.latent_dim)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """Map ``(B, 1, T)`` with ``T`` divisible by the hop to ``(B, D, F)``."""
        config = self.config
        log_magnitude = (stft_frames(wave[:, 0], config, self.window).abs() + LOG_MAGNITUDE_FLOOR).log()  # (B, S, N)
        batch, count, bins = log_magnitude.shape
        features = log_magnitude.reshape(batch, count // config.subframes, config.subframes * bins)
        hidden = self.backbone(features.transpose(1, 2))  # (B, F, width)
        return self.output(hidden).transpose(1, 2)  # (B, D, F)


class SpectralDecoder(nn.Module):
    """Latent frames to waveform through an inverse STFT: ``(B, D, F)`` to ``(B, 1, F * hop_length)``."""

    embed_kernel = 7
    # Values the head predicts per bin of each STFT frame: a log magnitude and a phase.
    outputs_per_bin = 2

    def __init__(self, config: SpectralConfig, extra_inputs: int = 0) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("window", torch.hann_window(config.window_length), persistent=False)
        self.backbone = _Backbone(config.latent_dim + extra_inputs, config.width, config.decoder_blocks, self.embed_kernel)
        self.head = nn.Linear(config.width, config.subframes * self.outputs_per_bin * config.bins)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Map ``(B, D, F)`` to ``(B, 1, F * hop_length)``."""
        return self.synthesize(self.spectrum(self.predict(latents))).unsqueeze(1)

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """Map ``(B, D, F)`` inputs to the head's ``(B, S, outputs_per_bin, N)`` values."""
        hidden = self.backbone(inputs)  # (B, F, width)
        batch, frames, _ = hidden.shape
        config = self.config
        return self.head(hidden).view(batch, frames * config.subframes, self.outputs_per_bin, config.bins)

    @staticmethod
    def spectrum(output: torch.Tensor) -> torch.Tensor:
        """Return the ``(B, S, N)`` complex spectrum from the log magnitudes and phases in ``output``."""
        magnitude = output[:, :, 0].clamp(max=MAX_LOG_MAGNITUDE).exp()
        phase = output[:, :, 1]
        return torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))

    def synthesize(self, spectrum: torch.Tensor) -> torch.Tensor:
        """Turn ``(B, S, N)`` STFT frames into ``(B, S * stft_hop)`` samples by inverse STFT."""
        segments = torch.fft.irfft(spectrum, n=self.config.window_length, dim=-1) * self.window  # (B, S, window)
        return self.overlap_add(segments)

    def overlap_add(self, segments: torch.Tensor) -> torch.Tensor:
        """Overlap-add windowed ``(B, S, window_length)`` frames into ``(B, S * stft_hop)`` samples.

        The sum is divided by the summed squared window, which undoes the analysis and
        synthesis windows, and trimmed by ``padding`` on each side, so frame ``s`` lands
        where the encoder's frame ``s`` was cut.
        """
        config = self.config
        count = segments.shape[1]
        length = (count - 1) * config.stft_hop + config.window_length
        fold = {"output_size": (1, length), "kernel_size": (1, config.window_length), "stride": (1, config.stft_hop)}
        wave = F.fold(segments.transpose(1, 2), **fold)[:, 0, 0]  # (B, length)
        squared_window = self.window.pow(2).view(1, -1, 1).expand(1, -1, count)
        envelope = F.fold(squared_window, **fold)[0, 0, 0]  # (length,)
        inside = slice(config.padding, length - config.padding)
        # Every sample inside the trimmed range lies under at least one frame's window. The
        # floor only guards against a window whose ends are exactly zero there.
        return wave[:, inside] / envelope[inside].clamp_min(1e-8)


class HarmonicDecoder(SpectralDecoder):
    """A :class:`SpectralDecoder` that also shapes a harmonic excitation of a given pitch.

    The backbone reads the latent frames and two pitch features per frame
    (:func:`mmtok_audio.pitch.pitch_features`). Beside the log magnitude and phase of
    each bin, the head predicts a log gain per bin for the STFT of
    :func:`mmtok_audio.pitch.harmonic_excitation`. The output spectrum is the sum of the
    two parts, so harmonics lie exactly at multiples of the coded pitch and keep their
    phase from frame to frame, and the first part adds noise and what the pitch misses.
    """

    outputs_per_bin = 3
    # Initial bias of the excitation's log gain: each harmonic of the excitation has a
    # magnitude near 160 in a 640-sample Hann frame, and speech harmonics are far weaker.
    initial_log_gain = -6.0

    def __init__(self, config: SpectralConfig, sample_rate: int) -> None:
        super().__init__(config, extra_inputs=2)
        self.sample_rate = sample_rate
        with torch.no_grad():
            self.head.bias.view(config.subframes, self.outputs_per_bin, config.bins)[:, 2] = self.initial_log_gain

    def forward(self, latents: torch.Tensor, frequency: torch.Tensor, start_phase: torch.Tensor) -> torch.Tensor:
        """Map ``(B, D, F)`` latents and the pitch to ``(B, 1, F * hop_length)``.

        ``frequency`` and ``start_phase`` are as :func:`mmtok_audio.pitch.harmonic_excitation`
        takes them: ``(B, F + 2 * EXCITATION_MARGIN)`` frame frequencies in Hz and ``(B, F)``
        phases.
        """
        config = self.config
        inner = frequency[:, EXCITATION_MARGIN : frequency.shape[1] - EXCITATION_MARGIN]
        output = self.predict(torch.cat([latents, pitch_features(inner).to(latents.dtype)], dim=1))  # (B, S, 3, N)
        excitation = harmonic_excitation(frequency, start_phase, config.hop_length, self.sample_rate)  # (B, T)
        gain = output[:, :, 2].clamp(max=MAX_LOG_MAGNITUDE).exp()
        spectrum = self.spectrum(output) + gain * stft_frames(excitation.to(latents.dtype), config, self.window)
        return self.synthesize(spectrum).unsqueeze(1)


def spectral_receptive_field_frames(config: SpectralConfig) -> int:
    """Return the context, in token frames, that a chunk needs on each side to match unchunked output.

    Returns the larger of the encoder's and the decoder's reach. The input convolution and
    each ConvNeXt block reach ``kernel // 2`` frames to each side. An STFT frame reaches
    ``padding`` samples beyond its hop, rounded up here to whole token frames.
    """
    stft_reach = -(-config.padding // config.hop_length)
    encoder = SpectralEncoder.embed_kernel // 2 + config.encoder_blocks * (BLOCK_KERNEL // 2) + stft_reach
    decoder = SpectralDecoder.embed_kernel // 2 + config.decoder_blocks * (BLOCK_KERNEL // 2) + stft_reach
    return max(encoder, decoder) + 1
