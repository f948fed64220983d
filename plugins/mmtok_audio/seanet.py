"""A SEANet-style convolutional encoder and decoder for mono waveforms.

The layout follows the SEANet encoder/decoder of Zeghidour et al. (2021), "SoundStream:
An End-to-End Neural Audio Codec", and Défossez et al. (2022), "High Fidelity Neural Audio
Compression" (EnCodec): residual units with dilated convolutions and ELU, strided Conv1d
downsampling whose kernel is twice the stride, and a mirrored decoder with ConvTranspose1d.
EnCodec's LSTM bottleneck is replaced by dilated residual units at the frame rate, which
are cheaper on a CPU and keep the receptive field finite, so long inputs can be processed
in chunks.

Every convolution is non-causal and padded so that a length divisible by the total stride
maps to exactly ``length / stride`` frames and back.

Shape letters: B batch, C channels, T samples, F frames, D latent dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _maybe_weight_norm(module: nn.Module, enabled: bool) -> nn.Module:
    if enabled:
        return nn.utils.parametrizations.weight_norm(module)
    return module


class PaddedConv1d(nn.Module):
    """Conv1d with zero padding so that ``T`` samples, a multiple of the stride, become ``T / stride`` outputs.

    The padding is ``effective_kernel - stride`` in total, split evenly with the extra
    sample on the right, so the output is centred on its input window.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        weight_norm: bool = False,
    ) -> None:
        super().__init__()
        self.conv = _maybe_weight_norm(
            nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation), weight_norm
        )
        effective_kernel = (kernel_size - 1) * dilation + 1
        padding = max(effective_kernel - stride, 0)
        self.padding = (padding // 2, padding - padding // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C_in, T)`` to ``(B, C_out, T / stride)``."""
        return self.conv(F.pad(x, self.padding))


class TrimmedConvTranspose1d(nn.Module):
    """ConvTranspose1d with kernel ``2 * stride`` that maps ``F`` inputs to ``F * stride`` outputs.

    The trim mirrors :class:`PaddedConv1d`'s padding, so upsampled sample ``t`` comes from
    the same window that downsampling read it into.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, weight_norm: bool = False) -> None:
        super().__init__()
        self.conv = _maybe_weight_norm(
            nn.ConvTranspose1d(in_channels, out_channels, 2 * stride, stride=stride), weight_norm
        )
        self.trim = (stride // 2, stride - stride // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C_in, F)`` to ``(B, C_out, F * stride)``."""
        y = self.conv(x)  # (B, C_out, (F + 1) * stride)
        return y[..., self.trim[0] : y.shape[-1] - self.trim[1]]


class ResidualUnit(nn.Module):
    """ELU, dilated conv to half the channels, ELU, 1x1 conv back, plus the input."""

    def __init__(self, channels: int, dilation: int, kernel_size: int = 3, weight_norm: bool = False) -> None:
        super().__init__()
        hidden = max(channels // 2, 1)
        self.dilated = PaddedConv1d(channels, hidden, kernel_size, dilation=dilation, weight_norm=weight_norm)
        self.pointwise = PaddedConv1d(hidden, channels, 1, weight_norm=weight_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, T)`` to ``(B, C, T)``."""
        return x + self.pointwise(F.elu(self.dilated(F.elu(x))))


@dataclass(frozen=True)
class SEANetConfig:
    """Architecture shared by :class:`SEANetEncoder` and :class:`SEANetDecoder`.

    Attributes:
        channels: channel count before each downsampling block and after the last one,
            so ``len(channels) == len(strides) + 1``.
        strides: downsampling factor of each encoder block; their product is the hop.
        dilations: dilations of the residual units inside each block.
        bottleneck_dilations: dilations of the residual units at the frame rate.
        latent_dim: dimension D of the latent frames, the vectors the quantizer codes.
        weight_norm: wrap every convolution in weight normalisation.
    """

    channels: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    bottleneck_dilations: tuple[int, ...]
    latent_dim: int
    weight_norm: bool = False

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.strides) + 1:
            raise ValueError(
                f"channels needs one entry more than strides, got channels={list(self.channels)} "
                f"and strides={list(self.strides)}"
            )
        if any(stride < 1 for stride in self.strides):
            raise ValueError(f"strides must be positive, got {list(self.strides)}")

    @property
    def hop_length(self) -> int:
        hop = 1
        for stride in self.strides:
            hop *= stride
        return hop


class SEANetEncoder(nn.Module):
    """Waveform to latent frames: ``(B, 1, T)`` to ``(B, D, T / hop_length)``."""

    def __init__(self, config: SEANetConfig) -> None:
        super().__init__()
        norm = config.weight_norm
        layers: list[nn.Module] = [PaddedConv1d(1, config.channels[0], 7, weight_norm=norm)]
        for index, stride in enumerate(config.strides):
            width = config.channels[index]
            layers += [ResidualUnit(width, dilation, weight_norm=norm) for dilation in config.dilations]
            layers += [nn.ELU(), PaddedConv1d(width, config.channels[index + 1], 2 * stride, stride, weight_norm=norm)]

        width = config.channels[-1]
        layers += [ResidualUnit(width, dilation, weight_norm=norm) for dilation in config.bottleneck_dilations]
        layers += [nn.ELU(), PaddedConv1d(width, config.latent_dim, 3, weight_norm=norm)]
        self.layers = nn.Sequential(*layers)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """Map ``(B, 1, T)`` with ``T`` divisible by the hop to ``(B, D, F)``."""
        return self.layers(wave)


class SEANetDecoder(nn.Module):
    """Latent frames to waveform: ``(B, D, F)`` to ``(B, 1, F * hop_length)``."""

    def __init__(self, config: SEANetConfig) -> None:
        super().__init__()
        norm = config.weight_norm
        width = config.channels[-1]
        layers: list[nn.Module] = [PaddedConv1d(config.latent_dim, width, 7, weight_norm=norm)]
        layers += [ResidualUnit(width, dilation, weight_norm=norm) for dilation in config.bottleneck_dilations]

        for index in reversed(range(len(config.strides))):
            width = config.channels[index]
            upsample = TrimmedConvTranspose1d(config.channels[index + 1], width, config.strides[index], norm)
            layers += [nn.ELU(), upsample]
            layers += [ResidualUnit(width, dilation, weight_norm=norm) for dilation in config.dilations]
        layers += [nn.ELU(), PaddedConv1d(config.channels[0], 1, 7, weight_norm=norm)]
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Map ``(B, D, F)`` to ``(B, 1, F * hop_length)``."""
        return self.layers(latents)


def receptive_field_frames(config: SEANetConfig) -> int:
    """Return the context, in frames, that a chunk needs on each side to match unchunked output.

    Adds up ``(kernel - 1) * dilation`` of every convolution in samples at the rate it runs
    at. That total span bounds both the encoder and the mirrored decoder, whose widest
    frame-rate convolution has kernel 7, so the result is conservative by about a factor
    of two.
    """
    span = 6  # input convolution, kernel 7, at the sample rate
    rate = 1  # samples per step at the current layer's input
    for stride in config.strides:
        span += sum(2 * dilation for dilation in config.dilations) * rate
        span += (2 * stride - 1) * rate
        rate *= stride
    span += sum(2 * dilation for dilation in config.bottleneck_dilations) * rate
    span += 6 * rate  # the decoder's kernel-7 input convolution at the frame rate
    return -(-span // config.hop_length) + 1
