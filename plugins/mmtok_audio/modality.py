"""The audio modality: read and write sound files with soundfile (libsndfile)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import soundfile
import torch

from mmtok.errors import MmtokError
from mmtok.modality import Modality, Sample, check_input_file

from mmtok_audio.containers import check_mp3_complete, check_ogg_complete, looks_like_mp3

# libsndfile reads MP3 from version 1.1.0 on; older builds lack the format.
_MP3_AVAILABLE = "MP3" in soundfile.available_formats()

# libsndfile reads a WAV whose data chunk is cut short without error, and notes the
# mismatch in its log as "data : DECLARED (should be PRESENT)".
_SHORT_DATA_CHUNK = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# Declared sizes that writers use when the length was unknown while streaming.
_STREAMING_SIZES = {0, 0x7FFFFFFF, 0xFFFFFFFF}

# Format and subtype that `write` uses for each suffix. Lossless files are 16-bit PCM,
# which is what most players and datasets expect.
_WRITE_FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
}
# libsndfile writes Opus from version 1.0.29 on, at 8, 12, 16, 24 and 48 kHz only.
if "OPUS" in soundfile.available_subtypes("OGG"):
    _WRITE_FORMATS[".opus"] = ("OGG", "OPUS")
if _MP3_AVAILABLE:
    _WRITE_FORMATS[".mp3"] = ("MP3", "MPEG_LAYER_III")
# Lossless encodings a sample's ``subtype`` metadata may ask `write` to keep, so that a
# sample read from a 24-bit or float file (as infilling keeps it) is written back unchanged.
_KEPT_SUBTYPES = {"PCM_U8", "PCM_S8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"}


def _check_not_truncated(path: Path, log: str) -> None:
    """Reject a file whose header declares more audio data than the file contains."""
    match = _SHORT_DATA_CHUNK.search(log)
    if match is None:
        return
    declared, present = int(match.group(1)), int(match.group(2))
    if declared > present and declared not in _STREAMING_SIZES:
        raise MmtokError(
            f"{path}: file is truncated: its header declares {declared} bytes of audio data, but only {present} are present"
        )


def _check_container(path: Path) -> None:
    """Reject a truncated MP3 or Ogg file, which libsndfile would decode up to the cut."""
    with path.open("rb") as handle:
        head = handle.read(4)
    if head == b"OggS":
        check_ogg_complete(path, path.read_bytes())
    elif looks_like_mp3(head):
        check_mp3_complete(path, path.read_bytes())


def _parse_bool(name: str, value: Any) -> bool:
    """Read a boolean option given as a bool or as the text of a command-line option."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "on"}:
        return True
    if text in {"false", "0", "no", "off"}:
        return False
    raise MmtokError(f"option {name} must be true or false, got {value!r}")


class AudioModality(Modality):
    """Sound files as ``(channels, samples)`` float32 tensors in [-1, 1].

    Metadata: ``sample_rate`` (Hz), ``channels``, ``samples`` (per channel) and
    ``subtype`` (the libsndfile encoding of the file read, such as ``PCM_16``).
    """

    name = "audio"
    suffixes = tuple(_WRITE_FORMATS)
    default_suffix = ".wav"
    default_tokenizer = "mmtok/audio-tokenizer"

    def read(self, path: Path) -> Sample:
        path = Path(path)
        check_input_file(path)
        _check_container(path)
        try:
            with soundfile.SoundFile(str(path)) as handle:
                sample_rate = int(handle.samplerate)
                subtype = str(handle.subtype)
                frames = handle.read(dtype="float32", always_2d=True)  # (samples, channels)
                log = handle.extra_info
        except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
            raise MmtokError(f"{path}: not a readable audio file ({error})") from error
        _check_not_truncated(path, log)
        if frames.shape[0] == 0:
            raise MmtokError(f"{path}: audio file contains no samples")
        if not np.isfinite(frames).all():
            raise MmtokError(f"{path}: audio contains NaN or infinite sample values")
        data = torch.from_numpy(np.ascontiguousarray(frames.T))  # (channels, samples)
        metadata = {
            "sample_rate": sample_rate,
            "channels": int(data.shape[0]),
            "samples": int(data.shape[1]),
            "subtype": subtype,
        }
        return Sample(data, metadata)

    def write(self, sample: Sample, path: Path) -> None:
        """Write 16-bit PCM for .wav and .flac, Vorbis for .ogg and MP3 for .mp3, clipped to [-1, 1].

        A lossless ``subtype`` in the sample's metadata (as :meth:`read` records it) is
        kept when the format supports it, so a 24-bit or float WAV read and written again
        keeps its samples.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in _WRITE_FORMATS:
            raise MmtokError(f"{path}: cannot write audio as {suffix or '(no suffix)'!r}; use one of {' '.join(_WRITE_FORMATS)}")
        data = sample.data
        if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.shape[1] == 0:
            shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
            raise MmtokError(f"{path}: audio to write must be a non-empty (channels, samples) tensor, got {shape}")
        sample_rate = sample.metadata.get("sample_rate")
        if not isinstance(sample_rate, int) or sample_rate <= 0:
            raise MmtokError(f"{path}: audio metadata needs a positive integer sample_rate, got {sample_rate!r}")
        frames = data.detach().to("cpu", torch.float32).clamp(-1.0, 1.0).t().numpy()  # (samples, channels)
        file_format, subtype = _WRITE_FORMATS[suffix]
        requested = sample.metadata.get("subtype")
        if requested in _KEPT_SUBTYPES and subtype.startswith("PCM") and soundfile.check_format(file_format, requested):
            subtype = requested
        try:
            soundfile.write(str(path), frames, sample_rate, subtype=subtype, format=file_format)
        except (soundfile.LibsndfileError, RuntimeError, ValueError) as error:
            raise MmtokError(f"{path}: writing {file_format} ({subtype}) at {sample_rate} Hz failed: {error}") from error

    def tokenizer_class(self) -> type:
        from mmtok_audio.tokenizer import AudioTokenizer

        return AudioTokenizer

    def train_tokenizer(self, data_dir: Path, output_dir: Path, **options):
        """Train an audio tokenizer; ``options`` are those of :func:`mmtok_audio.train.train_audio_tokenizer`."""
        from mmtok_audio.train import train_audio_tokenizer

        return train_audio_tokenizer(data_dir, output_dir, **options)

    def evaluate_tokenizer(self, tokenizer, paths: list[Path], **options: Any) -> dict[str, Any]:
        """Measure ``tokenizer`` on sound files at each bitrate of its residual quantizer.

        Each file is mixed to mono and resampled to the tokenizer's rate. Returns
        ``{"rows": [...], "summary": {...}}`` as :func:`mmtok_audio.evaluate.measure_clips`
        describes: one row per number of levels with its bitrate, log-mel distance,
        SI-SNR, codebook usage per level and, for speech, PESQ wide band and STOI.

        Options: ``speech`` (default true) measures PESQ and STOI, which need
        ``pip install 'mmtok[eval]'``; ``speech=false`` skips them, as music needs.
        """
        from mmtok_audio.evaluate import measure_clips
        from mmtok_audio.tokenizer import AudioTokenizer

        if "grid" in options:
            raise MmtokError("--grid draws a picture of images and their reconstructions; audio evaluation has none, so leave it out")
        unknown = sorted(set(options) - {"speech"})
        if unknown:
            raise MmtokError(f"unknown audio evaluation option(s) {', '.join(unknown)}. The only option is speech=true or speech=false")
        speech = _parse_bool("speech", options.get("speech", True))
        if not isinstance(tokenizer, AudioTokenizer):
            raise MmtokError(f"cannot evaluate {type(tokenizer).__name__} on audio files: audio evaluation needs an AudioTokenizer")
        if not paths:
            raise MmtokError("no audio files to evaluate")
        return measure_clips(tokenizer, self._mono_clips(paths, tokenizer.sample_rate), speech=speech)

    def _mono_clips(self, paths: list[Path], sample_rate: int) -> Iterator[torch.Tensor]:
        """Read the files one at a time as mono 1-D clips at ``sample_rate``."""
        from mmtok_audio.train import load_clips

        for path in paths:
            yield load_clips([Path(path)], sample_rate)[0]

    def bundled_models(self) -> dict[str, Path]:
        folder = Path(__file__).parent / "pretrained" / "audio-tokenizer"
        if (folder / "model.safetensors").is_file():
            return {self.default_tokenizer: folder}
        return {}
