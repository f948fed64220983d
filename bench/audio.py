"""Compare the bundled audio tokenizer with Codec2, Opus and the EnCodec architecture.

Quality: on the held-out speech of ``data/audio/val`` (the rows of ``val.jsonl`` whose
``kind`` is ``speech``), each codec encodes and decodes every file at 16 kHz:

- mmtok: the bundled ``mmtok/audio-tokenizer`` (or ``--model``) with the most levels whose
  bitrate does not exceed ``--bitrate`` (all 6 levels, 3 kbit/s, at the default of 3000).
- Codec2 at 3.2 kbit/s: Debian's ``c2enc``/``c2dec`` on 8 kHz 16-bit raw audio, with the
  resampling from and back to 16 kHz done by soxr.
- Opus at 6 kbit/s: Debian's ``opusenc --bitrate 6`` and ``opusdec --rate 16000``.

Every decoded file of a codec is shifted by that codec's delay (at most 50 ms), which
:func:`codec_delay` estimates once from the energy envelopes of all files, then scored
against the 16 kHz original with PESQ wide band, STOI, log-mel distance and SI-SNR
(:class:`mmtok_audio.evaluate.ClipScorer`).

Speed: encode and decode real-time factors, in compute seconds per second of audio, so
lower is faster. The script times the mmtok tokenizer's ``encode_tensor`` and
``decode_tensor`` and the EnCodec 24 kHz model (``encodec`` 0.1.1, random weights,
3 kbit/s) on the same files, which it resamples to 24 kHz outside the timing. Both run in
this process with the same torch thread count.

    python bench/audio.py --files 20
    python bench/audio.py --speech /usr/share/sounds/alsa/[FRS]*.wav   # recorded speech (alsa-utils)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch

import mmtok
from mmtok_audio.evaluate import ClipScorer, prepare_clip

SAMPLE_RATE = 16000
CODEC2_MODE = "3200"
CODEC2_SAMPLE_RATE = 8000
OPUS_KBITS = 6
# EnCodec's 24 kHz model offers 1.5, 3, 6, 12 and 24 kbit/s, and 3 is nearest to the codecs here.
ENCODEC_KBITS = 3.0
# Largest delay, in samples at 16 kHz (50 ms), that `codec_delay` finds.
MAX_LAG = 800
# Window of the moving average that smooths the power into an energy envelope: 5 ms.
ENVELOPE_SAMPLES = 80


def speech_files(data: Path, count: int) -> list[Path]:
    """Return the first ``count`` held-out speech files listed in ``data/val.jsonl``."""
    rows = [json.loads(line) for line in (data / "val.jsonl").read_text().splitlines() if line.strip()]
    files = [data / row["file"] for row in rows if row.get("kind") == "speech"]
    if len(files) < count:
        raise SystemExit(f"error: {data / 'val.jsonl'} lists {len(files)} speech files, fewer than --files {count}")
    return files[:count]


def read_mono(path: Path) -> np.ndarray:
    """Read a file as mono float32 at 16 kHz."""
    data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def fit_length(wave: np.ndarray, length: int) -> np.ndarray:
    """Trim or zero-pad a decoded signal to the original's length."""
    wave = wave[:length]
    return np.pad(wave, (0, length - wave.shape[0]))


def energy_envelope(wave: np.ndarray) -> np.ndarray:
    """Return the signal's power, averaged over ``ENVELOPE_SAMPLES``, less its mean."""
    power = np.convolve(wave.astype(np.float64) ** 2, np.ones(ENVELOPE_SAMPLES) / ENVELOPE_SAMPLES, mode="same")
    return power - power.mean()


def codec_delay(outputs: list[np.ndarray], references: list[np.ndarray]) -> int:
    """Return the lag in samples, within ``MAX_LAG``, that best aligns a codec's outputs with the references.

    Codec2 3200 delays its output by about 20 ms, which would lower its STOI and SI-SNR
    without any loss of quality. A codec's delay is the same for every file, so one lag
    is chosen from the sum over files of the normalised cross-correlations of energy
    envelopes. Envelopes rather than waveforms: a codec that does not keep the input's
    phase (Codec2, or a spectral decoder) has a waveform cross-correlation without a clear
    peak, and per-file lags taken from it were off by up to 25 ms. Positive means late.
    """
    lags = np.concatenate([np.arange(0, MAX_LAG + 1), np.arange(-MAX_LAG, 0)])
    total = np.zeros(lags.shape[0])
    for output, reference in zip(outputs, references):
        output_envelope, reference_envelope = energy_envelope(output), energy_envelope(reference)
        spectrum_length = 1 << int(np.ceil(np.log2(2 * reference.shape[0])))
        correlation = np.fft.irfft(
            np.fft.rfft(output_envelope, spectrum_length) * np.conj(np.fft.rfft(reference_envelope, spectrum_length)),
            spectrum_length,
        )
        scale = np.linalg.norm(output_envelope) * np.linalg.norm(reference_envelope)
        if scale > 0:
            total += correlation[lags] / scale
    return int(lags[np.argmax(total)])


def shift(output: np.ndarray, lag: int) -> np.ndarray:
    """Remove ``lag`` samples of delay from a decoded signal, keeping its length."""
    shifted = output[lag:] if lag >= 0 else np.concatenate([np.zeros(-lag, dtype=output.dtype), output])
    return fit_length(shifted, output.shape[0])


def run_codec2(wave: np.ndarray, folder: Path) -> tuple[np.ndarray, int]:
    """Return Codec2's decoded 16 kHz signal and the size of its bit stream in bytes."""
    narrow = soxr.resample(wave, SAMPLE_RATE, CODEC2_SAMPLE_RATE, quality="HQ")
    pcm = (np.clip(narrow, -1.0, 1.0) * 32767.0).round().astype("<i2")
    source, bits, decoded = folder / "in.raw", folder / "out.c2", folder / "out.raw"
    source.write_bytes(pcm.tobytes())
    subprocess.run(["c2enc", CODEC2_MODE, str(source), str(bits)], check=True, capture_output=True)
    subprocess.run(["c2dec", CODEC2_MODE, str(bits), str(decoded)], check=True, capture_output=True)
    narrow_out = np.frombuffer(decoded.read_bytes(), dtype="<i2").astype(np.float32) / 32768.0
    wide = soxr.resample(narrow_out, CODEC2_SAMPLE_RATE, SAMPLE_RATE, quality="HQ")
    return fit_length(wide, wave.shape[0]), bits.stat().st_size


def run_opus(wave: np.ndarray, folder: Path) -> tuple[np.ndarray, int]:
    """Return Opus's decoded 16 kHz signal and the size of its Ogg file in bytes."""
    source, bits, decoded = folder / "in.wav", folder / "out.opus", folder / "out.wav"
    soundfile.write(source, wave, SAMPLE_RATE, subtype="PCM_16")
    subprocess.run(["opusenc", "--quiet", "--bitrate", str(OPUS_KBITS), str(source), str(bits)], check=True)
    subprocess.run(["opusdec", "--quiet", "--rate", str(SAMPLE_RATE), str(bits), str(decoded)], check=True)
    data, _ = soundfile.read(decoded, dtype="float32", always_2d=True)
    return fit_length(data.mean(axis=1), wave.shape[0]), bits.stat().st_size


def load_encodec() -> torch.nn.Module:
    """Build EnCodec's 24 kHz model with random weights, set to ``ENCODEC_KBITS``."""
    # encodec imports torchaudio at import time but needs it only for file I/O and its
    # discriminator, which this script does not use, so an empty module replaces it.
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    from encodec import EncodecModel

    model = EncodecModel.encodec_model_24khz(pretrained=False)
    model.set_target_bandwidth(ENCODEC_KBITS)
    return model.eval()


def timed(function, *arguments):
    """Return ``function(*arguments)`` and its wall time in seconds."""
    start = time.perf_counter()
    result = function(*arguments)
    return result, time.perf_counter() - start


@torch.no_grad()
def measure_speed(tokenizer, levels: int, encodec, waves: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Time encode and decode of both models on every file, after one warm-up file."""
    seconds = {name: {"encode": 0.0, "decode": 0.0} for name in ("mmtok", "encodec")}
    for index, wave in enumerate([waves[0]] + waves):
        ours = prepare_clip(torch.from_numpy(wave), tokenizer.hop_length)  # (1, 1, T)
        theirs = torch.from_numpy(soxr.resample(wave, SAMPLE_RATE, encodec.sample_rate, quality="HQ")).view(1, 1, -1)

        codes, encode_time = timed(tokenizer.encode_tensor, ours)
        _, decode_time = timed(tokenizer.decode_tensor, codes[:, :levels])
        frames, their_encode_time = timed(encodec.encode, theirs)
        _, their_decode_time = timed(encodec.decode, frames)
        if index == 0:
            continue  # warm-up
        seconds["mmtok"]["encode"] += encode_time
        seconds["mmtok"]["decode"] += decode_time
        seconds["encodec"]["encode"] += their_encode_time
        seconds["encodec"]["decode"] += their_decode_time
    audio_seconds = sum(wave.shape[0] for wave in waves) / SAMPLE_RATE
    return {
        name: {step: value / audio_seconds for step, value in steps.items()} for name, steps in seconds.items()
    }


def measure_quality(tokenizer, levels: int, waves: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Score each codec's decoded speech against the originals; return means and the delay per codec."""
    scorer = ClipScorer(SAMPLE_RATE, speech=True)
    outputs: dict[str, list[np.ndarray]] = {"mmtok": [], "Codec2": [], "Opus": []}
    stream_bytes = {"Codec2": 0, "Opus": 0}
    audio_seconds = sum(wave.shape[0] for wave in waves) / SAMPLE_RATE
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        for wave in waves:
            clip = torch.from_numpy(wave)
            codes = tokenizer.encode_tensor(prepare_clip(clip, tokenizer.hop_length))[:, :levels]
            outputs["mmtok"].append(tokenizer.decode_tensor(codes)[0, 0, : wave.shape[0]].numpy())
            output, size = run_codec2(wave, Path(folder))
            outputs["Codec2"].append(output)
            stream_bytes["Codec2"] += size
            output, size = run_opus(wave, Path(folder))
            outputs["Opus"].append(output)
            stream_bytes["Opus"] += size

    results = {}
    for codec, decoded in outputs.items():
        lag = codec_delay(decoded, waves)
        scores: dict[str, list[float]] = {}
        for output, wave in zip(decoded, waves):
            aligned = np.ascontiguousarray(shift(output.astype(np.float32), lag))
            for name, value in scorer(torch.from_numpy(aligned), torch.from_numpy(wave)).items():
                if value is not None:
                    scores.setdefault(name, []).append(value)
        results[codec] = {name: sum(values) / len(values) for name, values in scores.items()}
        results[codec]["pesq_clips"] = len(scores.get("pesq_wb", []))
        results[codec]["delay_ms"] = 1000.0 * lag / SAMPLE_RATE
    results["mmtok"]["nominal_bitrate"] = tokenizer.bitrate(levels)
    results["mmtok"]["stream_bitrate"] = tokenizer.bitrate(levels)
    results["Codec2"]["nominal_bitrate"] = float(CODEC2_MODE)
    results["Opus"]["nominal_bitrate"] = OPUS_KBITS * 1000.0
    for codec, size in stream_bytes.items():
        results[codec]["stream_bitrate"] = 8 * size / audio_seconds
    return results


def print_table(report: dict) -> None:
    print(f"{report['files']} files, {report['seconds']:.1f} s of {report['source']} at 16 kHz, {report['threads']} torch thread(s)")
    print()
    print("| codec | nominal bitrate (bit/s) | stream bitrate (bit/s) | PESQ-WB | STOI | log-mel distance | SI-SNR (dB) | delay (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for codec, row in report["quality"].items():
        name = f"mmtok ({report['mmtok_levels']} levels)" if codec == "mmtok" else codec
        print(
            f"| {name} | {row['nominal_bitrate']:.0f} | {row['stream_bitrate']:.0f} | {row['pesq_wb']:.3f} | "
            f"{row['stoi']:.3f} | {row['log_mel_distance']:.3f} | {row['si_snr_db']:.2f} | {row['delay_ms']:.1f} |"
        )
    print()
    print("| model | encode RTF | decode RTF |")
    print("|---|---|---|")
    for name, row in report["speed"].items():
        print(f"| {name} | {row['encode']:.4f} | {row['decode']:.4f} |")
    mmtok_speed, encodec_speed = report["speed"]["mmtok"], report["speed"]["encodec"]
    print()
    print(
        f"EnCodec takes {encodec_speed['encode'] / mmtok_speed['encode']:.1f}x the encode time and "
        f"{encodec_speed['decode'] / mmtok_speed['decode']:.1f}x the decode time of mmtok"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/audio"), help="folder with val.jsonl and val/")
    parser.add_argument("--files", type=int, default=20, help="number of held-out speech files")
    parser.add_argument(
        "--speech",
        type=Path,
        nargs="+",
        default=None,
        help="speech files to use instead of the held-out split, such as the recorded voice in /usr/share/sounds/alsa",
    )
    parser.add_argument("--bitrate", type=float, default=3000.0, help="highest mmtok bitrate in bit/s")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--model", default="mmtok/audio-tokenizer", help="audio tokenizer name or folder (default: the bundled one)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    arguments = parser.parse_args(argv)

    torch.set_num_threads(arguments.threads)
    tokenizer = mmtok.load_model(arguments.model).eval()
    levels = tokenizer.levels_for_bitrate(arguments.bitrate)
    files = arguments.speech if arguments.speech else speech_files(arguments.data, arguments.files)
    waves = [read_mono(path) for path in files]

    report = {
        "files": len(files),
        "source": "the given speech files" if arguments.speech else "held-out speech",
        "seconds": sum(wave.shape[0] for wave in waves) / SAMPLE_RATE,
        "threads": arguments.threads,
        "model": arguments.model,
        "mmtok_levels": levels,
        "quality": measure_quality(tokenizer, levels, waves),
        "speed": measure_speed(tokenizer, levels, load_encodec(), waves),
    }
    if arguments.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
