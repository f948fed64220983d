"""The audio tokenizers: an encoder and a decoder around a residual vector quantizer.

The codec follows SoundStream (Zeghidour et al., 2021) and EnCodec (Défossez et al., 2022).
Mono audio at 16 kHz is encoded to 50 latent frames per second (hop 320 samples). A stack
of codebooks quantizes each frame, and each codebook codes the residual that the previous
ones left. With 4 levels of 1024 codes that is 50 x 4 x 10 = 2000 bits per second.

:class:`AudioTokenizer` holds everything but the networks: encoding and decoding in
chunks, bitrates, token files, generator sequences and infilling. Three architectures
subclass it:

- :class:`SEANetAudioTokenizer`: SEANet convolutions on the waveform, as in EnCodec.
- :class:`SpectralAudioTokenizer`: ConvNeXt blocks at the frame rate on STFT magnitudes,
  decoded through an inverse STFT as in Vocos.
- :class:`HarmonicAudioTokenizer`: the spectral codec plus a measured pitch as the first
  level of codes, whose harmonics the decoder synthesizes exactly (the bundled model:
  6 levels, 3000 bits per second).

Shape letters: B batch, T samples, F frames, L quantizer levels, D latent dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import soxr
import torch
import torch.nn.functional as F

from mmtok.errors import MmtokError
from mmtok.modality import Sample
from mmtok.quantize import QuantizerOutput, ResidualVectorQuantizer
from mmtok.tokenizer import Tokenizer
from mmtok.tokens import Tokens

from mmtok_audio.seanet import SEANetConfig, SEANetDecoder, SEANetEncoder, receptive_field_frames
from mmtok_audio.pitch import (
    EXCITATION_MARGIN,
    F_MAX,
    F_MIN,
    codes_to_pitch,
    estimate_pitch,
    phase_increments,
    pitch_reach_samples,
    pitch_to_codes,
)
from mmtok_audio.spectral import (
    HarmonicDecoder,
    SpectralConfig,
    SpectralDecoder,
    SpectralEncoder,
    spectral_receptive_field_frames,
)


@dataclass
class AudioTokenizerOutput:
    """Result of :meth:`AudioTokenizer.forward`.

    Attributes:
        reconstruction: decoded waveform ``(B, 1, T)``, the same length as the input.
        quantizer: the quantizer's output; ``quantizer.codes`` is ``(B, F, L)``.
    """

    reconstruction: torch.Tensor
    quantizer: QuantizerOutput


class AudioTokenizer(Tokenizer):
    """Neural audio codec that turns waveforms into ``(levels, frames)`` codes and back.

    The base of every audio tokenizer architecture. A subclass builds its networks and
    calls :meth:`_setup`. ``encoder`` maps ``(B, 1, T)`` to ``(B, D, T / hop_length)`` and
    ``decoder`` maps back; the residual quantizer sits between them.
    """

    modality = "audio"
    card_template = "tokenizer"
    # Rows of codes before the quantizer's levels that carry measured side information,
    # such as the pitch of :class:`HarmonicAudioTokenizer`. Every encoding keeps them.
    side_levels = 0
    # Half-precision files are half the size, and the rounding changed no score in the
    # third decimal on held-out speech.
    weights_dtype = torch.float16

    def _setup(
        self,
        sample_rate: int,
        hop_length: int,
        encoder: torch.nn.Module,
        decoder: torch.nn.Module,
        context_frames: int,
        latent_dim: int,
        codebook_size: int,
        levels: int,
        quantizer_decay: float,
        commitment_weight: float,
        restart_threshold: float,
    ) -> None:
        """Store the networks and build the quantizer; ``context_frames`` is the receptive field per side."""
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if levels < self.side_levels + 1 or codebook_size < 2:
            raise ValueError(
                f"need levels >= {self.side_levels + 1} and codebook_size >= 2, got {levels} and {codebook_size}"
            )
        self.sample_rate = int(sample_rate)
        self.hop_length = hop_length
        self.codebook_size = codebook_size
        self.levels = levels
        self.encoder = encoder
        self.decoder = decoder
        self.quantizer = ResidualVectorQuantizer(
            latent_dim,
            codebook_size,
            levels - self.side_levels,
            decay=quantizer_decay,
            beta=commitment_weight,
            restart_threshold=restart_threshold,
        )

        # Quantizer levels used by encode_batch when no `levels` argument is given;
        # None uses all of them. Not saved: it is a per-use choice of bitrate.
        self.encode_levels: int | None = None
        # Frames per forward pass when encoding or decoding long inputs, so activation
        # memory stays bounded for any length. Each chunk also reads `context_frames` of
        # context on both sides, enough for the result to match one whole pass.
        self.chunk_frames = 1500
        self.context_frames = context_frames

    def architecture_description(self) -> str:
        """Describe the networks for the model card."""
        raise NotImplementedError

    @property
    def frame_rate(self) -> float:
        """Token frames per second."""
        return self.sample_rate / self.hop_length

    @property
    def min_levels(self) -> int:
        """Minimum number of levels an encoding keeps: the side levels and one quantizer level."""
        return self.side_levels + 1

    @property
    def vocab_size(self) -> int:
        return self.levels * self.codebook_size

    def bitrate(self, levels: int | None = None) -> float:
        """Return the bits per second of codes with ``levels`` quantizer levels (default: all)."""
        levels = self.levels if levels is None else levels
        return self.frame_rate * levels * math.log2(self.codebook_size)

    def levels_for_bitrate(self, bitrate: float) -> int:
        """Return the largest number of quantizer levels whose bitrate does not exceed ``bitrate`` bits/s."""
        # The tolerance keeps a bitrate given exactly, such as 1500 for 3 levels, from
        # rounding down; min() first keeps an infinite bitrate away from floor().
        levels = math.floor(min(bitrate / self.bitrate(1), self.levels) + 1e-9) if bitrate > 0 else 0
        if levels < self.min_levels:
            lowest = self.min_levels
            raise MmtokError(
                f"bitrate {bitrate:g} bits/s is below this tokenizer's lowest bitrate, {self.bitrate(lowest):g} bits/s "
                f"({lowest} of {self.levels} levels); its bitrates are "
                + ", ".join(f"{self.bitrate(count):g}" for count in range(lowest, self.levels + 1))
            )
        return levels

    # Tensors ------------------------------------------------------------------------

    def forward(self, wave: torch.Tensor, levels: int | None = None) -> AudioTokenizerOutput:
        """Encode, quantize and decode a training batch.

        Args:
            wave: ``(B, 1, T)`` at ``sample_rate`` with ``T`` divisible by ``hop_length``.
            levels: quantizer levels to use; all when None.
        """
        self._check_wave(wave)
        latents = self.encoder(wave)  # (B, D, F)
        quantized = self.quantizer(latents.transpose(1, 2), self._quantizer_levels(levels))  # quantized: (B, F, D)
        reconstruction = self.decoder(quantized.quantized.transpose(1, 2))  # (B, 1, T)
        return AudioTokenizerOutput(reconstruction, quantized)

    @torch.no_grad()
    def encode_tensor(self, wave: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """Encode ``(B, 1, T)`` at ``sample_rate``, ``T`` divisible by the hop, to ``(B, L, F)`` codes."""
        self._check_wave(wave)
        frames = wave.shape[-1] // self.hop_length
        chunks = []
        for start, stop, lo, hi in self._chunks(frames):
            codes = self._encode_span(wave[..., lo * self.hop_length : hi * self.hop_length], levels)  # (B, L, hi - lo)
            chunks.append(codes[..., start - lo : stop - lo])
        return torch.cat(chunks, dim=-1)  # (B, L, F)

    @torch.no_grad()
    def decode_tensor(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode ``(B, L, F)`` codes, ``min_levels <= L <= levels``, to ``(B, 1, F * hop_length)``."""
        if codes.dim() != 3 or not self.min_levels <= codes.shape[1] <= self.levels:
            raise ValueError(
                f"codes must be (batch, {self.min_levels} <= levels <= {self.levels}, frames), got {tuple(codes.shape)}"
            )
        inputs = self._decoder_inputs(codes)
        chunks = []
        for start, stop, lo, hi in self._chunks(codes.shape[-1]):
            wave = self._decode_span(inputs, lo, hi)  # (B, 1, (hi - lo) * hop)
            chunks.append(wave[..., (start - lo) * self.hop_length : (stop - lo) * self.hop_length])
        return torch.cat(chunks, dim=-1)

    def _encode_span(self, wave: torch.Tensor, levels: int | None) -> torch.Tensor:
        """Encode ``(B, 1, T)`` to ``(B, L, T / hop_length)`` codes with ``levels`` levels (all when None)."""
        latents = self.encoder(wave)  # (B, D, F)
        return self.quantizer(latents.transpose(1, 2), self._quantizer_levels(levels)).codes.transpose(1, 2)

    def _quantizer_levels(self, levels: int | None) -> int | None:
        """Return the quantizer levels among ``levels`` levels of codes (all when None)."""
        return None if levels is None else levels - self.side_levels

    def _decoder_inputs(self, codes: torch.Tensor) -> Any:
        """Return what :meth:`_decode_span` reads for all ``(B, L, F)`` codes: here the ``(B, D, F)`` latents."""
        return self.quantizer.lookup(codes.transpose(1, 2)).transpose(1, 2)

    def _decode_span(self, inputs: Any, lo: int, hi: int) -> torch.Tensor:
        """Decode frames ``lo`` to ``hi`` of :meth:`_decoder_inputs` to ``(B, 1, (hi - lo) * hop_length)``."""
        return self.decoder(inputs[..., lo:hi])

    def _chunks(self, frames: int) -> list[tuple[int, int, int, int]]:
        """Split ``frames`` into ``(start, stop, lo, hi)``: the kept range and the range read."""
        if frames == 0:
            return []
        spans = []
        for start in range(0, frames, self.chunk_frames):
            stop = min(start + self.chunk_frames, frames)
            lo = max(start - self.context_frames, 0)
            hi = min(stop + self.context_frames, frames)
            spans.append((start, stop, lo, hi))
        return spans

    def _check_wave(self, wave: torch.Tensor) -> None:
        if wave.dim() != 3 or wave.shape[1] != 1 or wave.shape[-1] % self.hop_length:
            raise ValueError(
                f"wave must be (batch, 1, samples) with samples divisible by {self.hop_length}, "
                f"got {tuple(wave.shape)}"
            )

    # Samples ------------------------------------------------------------------------

    def encode_batch(self, samples: list[Sample], levels: int | None = None, bitrate: float | None = None) -> list[Tokens]:
        """Encode samples of any rate and channel count to ``(L, F)`` codes each.

        Each sample is downmixed to mono, resampled to ``sample_rate``, zero-padded to a
        whole number of frames and encoded on its own, so batching cannot change a result.
        ``bitrate`` (bits/s) selects the most levels whose bitrate does not exceed it;
        otherwise ``levels`` defaults to ``encode_levels``, then to all levels. The
        metadata records the levels used and their ``bitrate``.
        """
        # Both may come from `mmtok encode --option`, so they are checked like user input.
        if levels is not None and (not isinstance(levels, int) or isinstance(levels, bool)):
            raise MmtokError(f"levels must be an integer, got {levels!r}")
        if bitrate is not None and (not isinstance(bitrate, (int, float)) or isinstance(bitrate, bool)):
            raise MmtokError(f"bitrate must be a number of bits per second, got {bitrate!r}")
        if levels is not None and bitrate is not None:
            raise MmtokError(f"pass levels or bitrate, not both (got levels={levels}, bitrate={bitrate:g})")
        if bitrate is not None:
            levels = self.levels_for_bitrate(bitrate)
        levels = levels if levels is not None else self.encode_levels
        levels = levels if levels is not None else self.levels
        if not self.min_levels <= levels <= self.levels:
            raise MmtokError(f"levels must be between {self.min_levels} and {self.levels}, got {levels}")
        device = next(self.parameters()).device
        results = []
        for sample in samples:
            data, sample_rate = _check_sample(sample)
            wave = self._to_model_rate(data.mean(dim=0), sample_rate)  # (T,)
            frames = max(math.ceil(wave.shape[0] / self.hop_length), 1)
            wave = torch.nn.functional.pad(wave, (0, frames * self.hop_length - wave.shape[0]))
            codes = self.encode_tensor(wave.view(1, 1, -1).to(device), levels)[0]  # (L, F)
            metadata = {
                "sample_rate": sample_rate,
                "samples": int(data.shape[1]),
                "channels": int(data.shape[0]),
                "model_sample_rate": self.sample_rate,
                "levels": levels,
                "bitrate": self.bitrate(levels),
            }
            results.append(self.make_tokens(codes, metadata))
        return results

    def decode(self, tokens: Tokens) -> Sample:
        """Decode tokens to ``(channels, samples)`` at the original rate, length and channel count.

        The decoded mono signal is repeated to every original channel.
        """
        # NOTE: the bundled weights never trained on steady pure tones. Sines of 220 to
        # 880 Hz come back at their pitch but 7 to 19 dB quieter, and sines above the
        # pitch range (1 kHz) about 50 dB quieter.
        self.check_tokens(tokens, high=self.codebook_size)
        codes = tokens.codes
        self._check_code_rows(codes)
        sample_rate, samples, channels = _decode_metadata(tokens.metadata)
        # Edited metadata must not make decode allocate far more than the codes describe;
        # one frame of slack covers rounding in encoding's resampling and padding.
        longest = math.ceil((codes.shape[1] + 1) * self.hop_length * sample_rate / self.sample_rate)
        if samples > longest:
            raise MmtokError(f"token metadata claims {samples} samples, but {codes.shape[1]} frames decode to at most {longest}")
        if channels > MAX_CHANNELS:
            raise MmtokError(f"token metadata claims {channels} channels; at most {MAX_CHANNELS} are supported")
        if channels * samples > MAX_DECODE_VALUES:
            raise MmtokError(
                f"token metadata claims {channels} channels of {samples} samples, over the limit of "
                f"{MAX_DECODE_VALUES} values (4 GiB of float32)"
            )
        device = next(self.parameters()).device
        wave = self.decode_tensor(codes.unsqueeze(0).to(device))[0, 0].float().cpu()  # (F * hop,)
        if sample_rate != self.sample_rate:
            wave = torch.from_numpy(soxr.resample(wave.numpy(), self.sample_rate, sample_rate, quality="HQ").copy())
        wave = wave[:samples]
        wave = torch.nn.functional.pad(wave, (0, samples - wave.shape[0]))
        data = wave.clamp(-1.0, 1.0).unsqueeze(0).repeat(channels, 1)  # (channels, samples)
        return Sample(data, {"sample_rate": sample_rate, "samples": samples, "channels": channels})

    def _check_code_rows(self, codes: torch.Tensor) -> None:
        if codes.dim() != 2 or not self.min_levels <= codes.shape[0] <= self.levels:
            raise MmtokError(
                f"audio codes must be ({self.min_levels} <= levels <= {self.levels}, frames), got shape {tuple(codes.shape)}"
            )

    def _to_model_rate(self, wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
        if sample_rate == self.sample_rate:
            return wave
        resampled = soxr.resample(wave.numpy(), sample_rate, self.sample_rate, quality="HQ")
        return torch.from_numpy(np.ascontiguousarray(resampled, dtype=np.float32))

    # Sequences for the generator ----------------------------------------------------

    def to_sequence(self, codes: torch.Tensor, levels: int | None = None, **options: Any) -> torch.Tensor:
        """Flatten ``(L, F)`` codes frame by frame; level ``l`` code ``c`` becomes ``l * K + c``.

        ``levels`` keeps only the first levels, as a generator that models fewer levels needs.
        """
        if levels is not None:
            codes = codes[:levels]
        self._check_code_rows(codes)
        offsets = torch.arange(codes.shape[0], device=codes.device).unsqueeze(1) * self.codebook_size  # (L, 1)
        return (codes + offsets).t().reshape(-1)  # (F * L,)

    def from_sequence(self, ids: torch.Tensor, levels: int | None = None, **options: Any) -> torch.Tensor:
        """Invert :meth:`to_sequence` for ``levels`` (default ``encode_levels`` or all); returns ``(L, F)``.

        An id whose level does not match its position, which a generator can emit, is read
        as the code ``id % codebook_size`` of the position's level.
        """
        levels = levels or self.encode_levels or self.levels
        if ids.dim() != 1 or ids.shape[0] % levels:
            raise MmtokError(
                f"an audio sequence must be 1-D with a length divisible by {levels} levels, got shape {tuple(ids.shape)}"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise MmtokError(f"audio sequence ids must lie in [0, {self.vocab_size})")
        return (ids % self.codebook_size).view(-1, levels).t().contiguous()  # (L, F)

    def generation_metadata(self, sequence_length: int, levels: int | None = None, **options: Any) -> dict[str, Any]:
        levels = levels or self.encode_levels or self.levels
        frames = sequence_length // levels
        return {
            "sample_rate": self.sample_rate,
            "samples": frames * self.hop_length,
            "channels": 1,
            "model_sample_rate": self.sample_rate,
            "levels": levels,
        }

    # Infilling ----------------------------------------------------------------------

    def region_mask(self, tokens: Tokens, region: tuple[float, ...], levels: int | None = None, **options: Any) -> torch.Tensor:
        """Return the ids of the frames that overlap the time span ``region = (start, end)`` in seconds."""
        sample_rate, samples, _ = _decode_metadata(tokens.metadata)
        duration = samples / sample_rate
        if len(region) != 2:
            raise MmtokError(f"an audio region is a span start,end in seconds, got {len(region)} numbers")
        start, end = (float(value) for value in region)
        if not 0 <= start < end <= duration + 1e-9:
            raise MmtokError(f"span {start:g},{end:g} s does not lie inside the {duration:.3f} s of audio (0 <= start < end <= {duration:.3f})")
        kept_levels = min(levels or tokens.codes.shape[0], tokens.codes.shape[0])
        frames = tokens.codes.shape[1]
        first = min(math.floor(start * self.frame_rate), frames - 1)
        last = min(math.ceil(end * self.frame_rate), frames)
        mask = torch.zeros(frames, kept_levels, dtype=torch.bool)
        mask[first:last] = True
        return mask.reshape(-1)  # frame by frame, as to_sequence orders ids: (F * L,)

    def merge_region(self, original: Sample, generated: Sample, region: tuple[float, ...]) -> Sample:
        """Splice the generated samples of the span into ``original``, with 10 ms linear crossfades at its edges."""
        sample_rate = int(original.metadata["sample_rate"])
        data = original.data.float().clone()
        start = max(0, math.floor(float(region[0]) * sample_rate))
        end = min(data.shape[1], math.ceil(float(region[1]) * sample_rate))
        fade = min(round(0.01 * sample_rate), (end - start) // 2)
        weight = torch.ones(end - start)
        if fade:
            ramp = torch.linspace(0.0, 1.0, fade + 2)[1:-1]
            weight[:fade] = ramp
            weight[end - start - fade :] = ramp.flip(0)
        span = slice(start, end)
        data[:, span] = weight * generated.data[:, span].float() + (1 - weight) * data[:, span]
        return Sample(data, dict(original.metadata))

    def sequence_defaults(self) -> tuple[int, dict[str, Any]]:
        # The generator models the two coarsest levels of 64 frames (1.28 s at 50 Hz):
        # finer levels add little audible detail but double the sequence length.
        levels = min(2, self.levels)
        return 64 * levels, {"levels": levels}

    # Model card ---------------------------------------------------------------------

    def card_variables(self) -> dict[str, Any]:
        bits = self.frame_rate * self.levels * math.log2(self.codebook_size)
        architecture = (
            f"{self.architecture_description()} with a {self.levels - self.side_levels}-level residual vector "
            f"quantizer of {self.codebook_size} codes per level, at {self.sample_rate} Hz mono"
        )
        return {
            "modality": self.modality,
            "architecture": architecture,
            "vocab_size": self.vocab_size,
            "token_rate": f"{self.frame_rate:g} frames/s x {self.levels} levels = {bits:g} bits/s",
            "example_suffix": ".wav",
        }

    def card_tags(self) -> list[str]:
        return ["audio", "audio-tokenizer", "neural-codec"]


class SEANetAudioTokenizer(AudioTokenizer):
    """Audio tokenizer with a SEANet convolutional encoder and decoder on the waveform.

    Args:
        sample_rate: rate in Hz the model runs at; inputs are resampled to it.
        channels: encoder channel count before each downsampling block and after the last;
            one entry more than ``strides``. The decoder mirrors them.
        strides: downsampling factor per encoder block. Their product is the hop, in
            samples per token frame: 320 gives 50 frames/s at 16 kHz.
        dilations: dilations of the residual units in each block (kernel 3).
        bottleneck_dilations: dilations of the residual units at the frame rate, which
            widen the context of each frame in place of EnCodec's LSTM.
        latent_dim: dimension of each latent frame, the vectors the quantizer codes.
        codebook_size: codes per quantizer level.
        levels: number of residual quantizer levels; encoding may use fewer.
        weight_norm: wrap every convolution in weight normalisation.
        quantizer_decay: EMA decay of the codebook statistics. The default 0.95, a memory
            of about 20 batches in place of the more usual 0.99, lets the codebooks follow
            the fast-changing encoder of a short training run.
        commitment_weight: weight beta of the commitment loss ``||z - sg(e)||^2``.
        restart_threshold: a code whose EMA count (uses per training batch) falls below
            this is replaced by a recent encoder output. The default training batch has
            400 frames (8 one-second clips), so each of 1024 codes used equally would have
            an EMA count of about 0.4. The default 0.25 restarts codes used less than
            about once every 4 batches.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        channels: Sequence[int] = (16, 32, 48, 96, 128),
        strides: Sequence[int] = (4, 4, 4, 5),
        dilations: Sequence[int] = (1,),
        bottleneck_dilations: Sequence[int] = (1, 3, 9),
        latent_dim: int = 64,
        codebook_size: int = 1024,
        levels: int = 4,
        weight_norm: bool = False,
        quantizer_decay: float = 0.95,
        commitment_weight: float = 0.25,
        restart_threshold: float = 0.25,
    ) -> None:
        super().__init__()
        self.seanet = SEANetConfig(
            channels=tuple(channels),
            strides=tuple(strides),
            dilations=tuple(dilations),
            bottleneck_dilations=tuple(bottleneck_dilations),
            latent_dim=latent_dim,
            weight_norm=weight_norm,
        )
        self._setup(
            sample_rate,
            self.seanet.hop_length,
            SEANetEncoder(self.seanet),
            SEANetDecoder(self.seanet),
            receptive_field_frames(self.seanet),
            latent_dim,
            codebook_size,
            levels,
            quantizer_decay,
            commitment_weight,
            restart_threshold,
        )

    def architecture_description(self) -> str:
        return (
            f"SEANet-style convolutional encoder/decoder (channels {list(self.seanet.channels)}, "
            f"strides {list(self.seanet.strides)}, latent dimension {self.seanet.latent_dim})"
        )


class SpectralAudioTokenizer(AudioTokenizer):
    """Audio tokenizer whose encoder and decoder run at the frame rate on STFT frames.

    The encoder reads log STFT magnitudes and the decoder predicts STFT magnitudes and
    phases that an inverse STFT turns into samples (:mod:`mmtok_audio.spectral`). Only the
    two STFTs run at the sample rate.

    Args:
        sample_rate: rate in Hz the model runs at; inputs are resampled to it.
        hop_length: samples per token frame: 320 gives 50 frames/s at 16 kHz.
        subframes: STFT frames per token frame, so the STFT hop is ``hop_length / subframes``.
        window_length: STFT window and FFT size in samples.
        width: channels of the ConvNeXt blocks.
        encoder_blocks: ConvNeXt blocks in the encoder.
        decoder_blocks: ConvNeXt blocks in the decoder.
        latent_dim: dimension of each latent frame, the vectors the quantizer codes.
        codebook_size: codes per quantizer level.
        levels: number of residual quantizer levels; encoding may use fewer.
        quantizer_decay, commitment_weight, restart_threshold: the quantizer's settings,
            as :class:`SEANetAudioTokenizer` describes them.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        hop_length: int = 320,
        subframes: int = 2,
        window_length: int = 640,
        width: int = 256,
        encoder_blocks: int = 4,
        decoder_blocks: int = 8,
        latent_dim: int = 64,
        codebook_size: int = 1024,
        levels: int = 4,
        quantizer_decay: float = 0.95,
        commitment_weight: float = 0.25,
        restart_threshold: float = 0.25,
    ) -> None:
        super().__init__()
        self.spectral = SpectralConfig(
            hop_length=hop_length,
            subframes=subframes,
            window_length=window_length,
            width=width,
            encoder_blocks=encoder_blocks,
            decoder_blocks=decoder_blocks,
            latent_dim=latent_dim,
        )
        self._setup(
            sample_rate,
            hop_length,
            SpectralEncoder(self.spectral),
            self._make_decoder(sample_rate),
            self._context_frames(sample_rate),
            latent_dim,
            codebook_size,
            levels,
            quantizer_decay,
            commitment_weight,
            restart_threshold,
        )

    def _make_decoder(self, sample_rate: int) -> torch.nn.Module:
        return SpectralDecoder(self.spectral)

    def _context_frames(self, sample_rate: int) -> int:
        return spectral_receptive_field_frames(self.spectral)

    def architecture_description(self) -> str:
        config = self.spectral
        return (
            f"STFT-domain encoder ({config.encoder_blocks} ConvNeXt blocks) and inverse-STFT decoder "
            f"({config.decoder_blocks} ConvNeXt blocks) of width {config.width}, {config.window_length}-sample "
            f"window, STFT hop {config.stft_hop} ({config.subframes} STFT frames per {config.hop_length}-sample "
            f"token frame), latent dimension {config.latent_dim},"
        )


class HarmonicAudioTokenizer(SpectralAudioTokenizer):
    """Spectral audio tokenizer that also codes the pitch and synthesizes its harmonics.

    Level 0 of the codes is the pitch of each frame, measured with YIN and quantized to
    ``codebook_size`` log-spaced values (:mod:`mmtok_audio.pitch`). Levels 1 and up are
    the residual quantizer's. The decoder (:class:`HarmonicDecoder`) adds a harmonic
    excitation at the coded pitch, shaped per STFT bin, to the spectral decoder's output,
    so harmonics lie where the input's were instead of where the latents place them.
    Every encoding keeps the pitch level, so the fewest levels is 2.

    Takes the arguments of :class:`SpectralAudioTokenizer`; ``levels`` counts the pitch
    level too. The default 6 levels of 1024 codes at 50 frames/s are 3000 bits/s.
    """

    side_levels = 1

    def __init__(
        self,
        sample_rate: int = 16000,
        hop_length: int = 320,
        subframes: int = 2,
        window_length: int = 640,
        width: int = 256,
        encoder_blocks: int = 4,
        decoder_blocks: int = 8,
        latent_dim: int = 64,
        codebook_size: int = 1024,
        levels: int = 6,
        quantizer_decay: float = 0.95,
        commitment_weight: float = 0.25,
        restart_threshold: float = 0.25,
    ) -> None:
        super().__init__(
            sample_rate,
            hop_length,
            subframes,
            window_length,
            width,
            encoder_blocks,
            decoder_blocks,
            latent_dim,
            codebook_size,
            levels,
            quantizer_decay,
            commitment_weight,
            restart_threshold,
        )

    def _make_decoder(self, sample_rate: int) -> torch.nn.Module:
        return HarmonicDecoder(self.spectral, sample_rate)

    def _context_frames(self, sample_rate: int) -> int:
        pitch_frames = -(-pitch_reach_samples(sample_rate) // self.spectral.hop_length)
        return max(super()._context_frames(sample_rate), pitch_frames + 1)

    def architecture_description(self) -> str:
        spectral = super().architecture_description().replace("inverse-STFT decoder", "harmonic inverse-STFT decoder")
        return (
            f"{spectral} a YIN pitch level (code 0 unvoiced, {self.codebook_size - 1} log-spaced frequencies "
            f"from {F_MIN:g} to {F_MAX:g} Hz) before the codes,"
        )

    def forward(self, wave: torch.Tensor, levels: int | None = None) -> AudioTokenizerOutput:
        """Encode, quantize and decode a training batch; ``levels`` counts the pitch level."""
        self._check_wave(wave)
        latents = self.encoder(wave)  # (B, D, F)
        quantized = self.quantizer(latents.transpose(1, 2), self._quantizer_levels(levels))
        with torch.no_grad():
            frequency, start_phase = self._pitch_track(self._pitch_codes(wave))
        reconstruction = self.decoder(quantized.quantized.transpose(1, 2), frequency, start_phase)
        return AudioTokenizerOutput(reconstruction, quantized)

    def _encode_span(self, wave: torch.Tensor, levels: int | None) -> torch.Tensor:
        return torch.cat([self._pitch_codes(wave).unsqueeze(1), super()._encode_span(wave, levels)], dim=1)

    def _pitch_codes(self, wave: torch.Tensor) -> torch.Tensor:
        """Return the ``(B, F)`` pitch codes of ``(B, 1, T)`` samples."""
        return pitch_to_codes(estimate_pitch(wave, self.sample_rate, self.hop_length), self.codebook_size)

    def _decoder_inputs(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        frequency, start_phase = self._pitch_track(codes[:, 0])
        return super()._decoder_inputs(codes[:, 1:]), frequency, start_phase

    def _decode_span(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], lo: int, hi: int) -> torch.Tensor:
        latents, frequency, start_phase = inputs
        return self.decoder(latents[..., lo:hi], frequency[:, lo : hi + 2 * EXCITATION_MARGIN], start_phase[:, lo:hi])

    def _pitch_track(self, pitch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the frequencies and excitation start phases of ``(B, F)`` pitch codes.

        The frequencies are ``(B, F + 2 * EXCITATION_MARGIN)``, unvoiced margins included.
        The ``(B, F)`` float64 start phases are summed over the whole input, so that a
        chunk's excitation continues its predecessor's.
        """
        frequency = F.pad(codes_to_pitch(pitch, self.codebook_size), (EXCITATION_MARGIN, EXCITATION_MARGIN))
        increments = phase_increments(frequency, self.hop_length, self.sample_rate)  # (B, F)
        start_phase = torch.remainder(increments.cumsum(1) - increments, 2 * math.pi)
        return frequency, start_phase


def _check_sample(sample: Sample) -> tuple[torch.Tensor, int]:
    """Return the sample's ``(channels, samples)`` float32 data and its sample rate."""
    data = sample.data
    if not isinstance(data, torch.Tensor) or data.dim() != 2:
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise MmtokError(f"audio samples must be (channels, samples) tensors, got {shape}")
    if data.shape[0] < 1 or data.shape[1] < 1:
        raise MmtokError(f"audio sample is empty: shape {tuple(data.shape)}")
    if data.shape[0] > MAX_CHANNELS:
        raise MmtokError(f"audio sample has {data.shape[0]} channels; at most {MAX_CHANNELS} are supported")
    sample_rate = sample.metadata.get("sample_rate")
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise MmtokError(f"audio sample metadata needs a positive integer sample_rate, got {sample_rate!r}")
    data = data.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(data).all()):
        raise MmtokError("audio sample contains NaN or infinite values")
    return data, sample_rate


# Most channels a sample may have. Decode repeats the mono signal to every channel, so
# the limit bounds how far token metadata can multiply the memory decode needs; 64 covers
# third-order Ambisonics and every common surround layout.
MAX_CHANNELS = 64
# Most values (channels x samples) that decode returns: 4 GiB of float32, above an hour of
# 5.1 audio at 48 kHz. Metadata claiming more could make decode exhaust memory.
MAX_DECODE_VALUES = 2**30
# Highest sample rate that decode resamples to, in Hz: the top rate of studio converters.
# A larger value in token metadata would make the resampler allocate without bound.
MAX_DECODE_SAMPLE_RATE = 768_000


def _decode_metadata(metadata: dict[str, Any]) -> tuple[int, int, int]:
    """Return ``(sample_rate, samples, channels)`` from token metadata, validated."""
    values = []
    for key, minimum in (("sample_rate", 1), ("samples", 1), ("channels", 1)):
        value = metadata.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise MmtokError(f"audio token metadata needs an integer {key} >= {minimum}, got {value!r}")
        values.append(value)
    if values[0] > MAX_DECODE_SAMPLE_RATE:
        raise MmtokError(
            f"audio token metadata claims a sample rate of {values[0]} Hz; at most {MAX_DECODE_SAMPLE_RATE} is supported"
        )
    return values[0], values[1], values[2]
