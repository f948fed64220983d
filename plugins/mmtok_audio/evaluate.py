"""Quality of an audio tokenizer at each bitrate its residual quantizer offers.

- Log-mel distance and scale-invariant SNR from :mod:`mmtok_audio.losses`.
- PESQ in wide-band mode (ITU-T P.862.2) through the ``pesq`` package, and STOI (Taal et
  al., 2011, "An algorithm for intelligibility prediction of time-frequency weighted
  noisy speech") through ``pystoi``. Both are meaningful for speech only, and both
  packages are optional: ``pip install 'mmtok[eval]'`` installs them.

Shape letters: L quantizer levels, F frames, T samples.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import soxr
import torch
import torch.nn.functional as F

from mmtok.errors import MmtokError

from mmtok_audio.losses import LogMelDistance, si_snr

if TYPE_CHECKING:
    from mmtok_audio.tokenizer import AudioTokenizer

logger = logging.getLogger(__name__)

# PESQ defines its wide-band mode for 16 kHz signals only.
PESQ_SAMPLE_RATE = 16000


class ClipScorer:
    """Score a decoded mono clip against its reference at one sample rate.

    Args:
        sample_rate: rate in Hz of both clips.
        speech: also measure PESQ wide band and STOI. Raises :class:`MmtokError` naming
            the ``eval`` extra when the ``pesq`` or ``pystoi`` package is missing.
    """

    def __init__(self, sample_rate: int, speech: bool) -> None:
        self.sample_rate = sample_rate
        self.speech = speech
        self.log_mel = LogMelDistance(sample_rate)
        if speech:
            self._pesq, self._stoi = import_speech_metrics()

    def __call__(self, estimate: torch.Tensor, reference: torch.Tensor) -> dict[str, float | None]:
        """Return ``log_mel_distance`` and ``si_snr_db``, plus ``pesq_wb`` and ``stoi`` for speech.

        Both inputs are 1-D ``(T,)`` with the same length. ``pesq_wb`` is None when PESQ
        finds no speech in the reference (silence, or a clip under a quarter second).
        ``stoi`` is None when the reference has too little non-silent audio for STOI,
        which needs 30 frames of 25.6 ms after dropping silent ones.
        """
        estimate = estimate.detach().float().cpu().view(1, -1)
        reference = reference.detach().float().cpu().view(1, -1)
        scores: dict[str, float | None] = {
            "log_mel_distance": float(self.log_mel(estimate, reference)[0]),
            "si_snr_db": float(si_snr(estimate, reference)[0]),
        }
        if self.speech:
            estimate_array = estimate[0].numpy().astype(np.float64)
            reference_array = reference[0].numpy().astype(np.float64)
            scores["pesq_wb"] = self._score_pesq(estimate_array, reference_array)
            scores["stoi"] = self._score_stoi(estimate_array, reference_array)
        return scores

    def _score_stoi(self, estimate: np.ndarray, reference: np.ndarray) -> float | None:
        # pystoi warns and returns 1e-5 when too few frames remain after dropping silent
        # ones, and fails with an indexing error on clips shorter than one frame. It
        # scores an all-zero reference as 0 without a warning, so that is left out here.
        if not np.abs(reference).max() > 0.0:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            try:
                return float(self._stoi.stoi(reference, estimate, self.sample_rate, extended=False))
            except (RuntimeWarning, ValueError, IndexError):
                return None

    def _score_pesq(self, estimate: np.ndarray, reference: np.ndarray) -> float | None:
        if self.sample_rate != PESQ_SAMPLE_RATE:
            estimate = soxr.resample(estimate, self.sample_rate, PESQ_SAMPLE_RATE, quality="HQ")
            reference = soxr.resample(reference, self.sample_rate, PESQ_SAMPLE_RATE, quality="HQ")
        if not np.abs(reference).max() > 0.0:
            return None  # pesq divides by the peak, so silence would give NaN
        try:
            return float(self._pesq.pesq(PESQ_SAMPLE_RATE, reference, estimate, "wb"))
        except self._pesq.PesqError:
            return None


def import_speech_metrics() -> tuple[Any, Any]:
    """Import the ``pesq`` and ``pystoi`` modules, or raise :class:`MmtokError` naming the extra."""
    try:
        import pesq
        import pystoi
    except ImportError as error:
        raise MmtokError(
            f"PESQ and STOI need the pesq and pystoi packages, which are missing ({error}). Install them "
            "with pip install 'mmtok[eval]', or pass the option speech=false to skip speech metrics"
        ) from error
    return pesq, pystoi


def prepare_clip(clip: torch.Tensor, hop_length: int) -> torch.Tensor:
    """Zero-pad a 1-D clip to whole frames and shape it ``(1, 1, T)`` for ``encode_tensor``."""
    frames = max(math.ceil(clip.shape[0] / hop_length), 1)
    return F.pad(clip, (0, frames * hop_length - clip.shape[0])).view(1, 1, -1)


@torch.no_grad()
def measure_clips(tokenizer: "AudioTokenizer", clips: Iterable[torch.Tensor], speech: bool = False) -> dict[str, Any]:
    """Encode and decode each clip with ``tokenizer.min_levels`` to ``tokenizer.levels`` levels and score the results.

    ``clips`` are mono 1-D float tensors at the tokenizer's sample rate. An iterator is
    read one clip at a time, so the clips need not fit in memory together.

    Returns ``{"rows": [...], "summary": {...}}`` with one row per number of levels. A row
    has ``levels``, ``bitrate`` (bits/s), the means over clips of ``log_mel_distance``
    and ``si_snr_db`` (dB), and ``codebook_usage``: for each level used, the fraction of
    its codes that occur in any clip. With ``speech`` a row also has ``stoi`` and
    ``pesq_wb``, each averaged over the clips that the metric could score.
    """
    scorer = ClipScorer(tokenizer.sample_rate, speech)
    was_training = tokenizer.training
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    totals: dict[int, dict[str, list[float]]] = {levels: {} for levels in range(tokenizer.min_levels, tokenizer.levels + 1)}
    used = torch.zeros(tokenizer.levels, tokenizer.codebook_size, dtype=torch.bool)
    clip_count = 0
    samples = 0
    try:
        for clip in clips:
            length = clip.shape[0]
            wave = prepare_clip(clip.float(), tokenizer.hop_length).to(device)  # (1, 1, T)
            codes = tokenizer.encode_tensor(wave)  # (1, L, F)
            used |= F.one_hot(codes[0].cpu(), tokenizer.codebook_size).any(dim=1)
            for levels, scores in totals.items():
                reconstruction = tokenizer.decode_tensor(codes[:, :levels])[0, 0, :length]  # (T,)
                for name, value in scorer(reconstruction, clip).items():
                    if value is not None:
                        scores.setdefault(name, []).append(value)
            clip_count += 1
            samples += length
    finally:
        tokenizer.train(was_training)
    if clip_count == 0:
        raise MmtokError("no audio clips to evaluate")

    usage = [round(float(level.float().mean()), 4) for level in used]
    rows = []
    for levels, scores in totals.items():
        row: dict[str, Any] = {"levels": levels, "bitrate": round(tokenizer.bitrate(levels), 1)}
        for name, values in scores.items():
            row[name] = round(sum(values) / len(values), 4)
        row["codebook_usage"] = usage[:levels]
        rows.append(row)
    summary: dict[str, Any] = {
        "clips": clip_count,
        "seconds": round(samples / tokenizer.sample_rate, 2),
        "sample_rate": tokenizer.sample_rate,
        "frame_rate": tokenizer.frame_rate,
        "codebook_size": tokenizer.codebook_size,
        "levels": tokenizer.levels,
        "speech_metrics": speech,
        "codebook_usage": usage,
    }
    if speech:
        for metric, name in (("pesq_wb", "PESQ"), ("stoi", "STOI")):
            scored = len(totals[tokenizer.levels].get(metric, []))
            summary[f"{name.lower()}_clips"] = scored
            if scored < clip_count:
                logger.warning(
                    "%s could not score %d of %d clips (silent or too short); %s averages the others",
                    name,
                    clip_count - scored,
                    clip_count,
                    metric,
                )
    return {"rows": rows, "summary": summary}
