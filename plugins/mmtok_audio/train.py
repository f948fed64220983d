"""Train the audio tokenizer on a folder of sound files.

The objective is that of a SoundStream/EnCodec codec without the adversarial part: a
multi-resolution STFT loss, a multi-resolution log-mel L1, the quantizer's commitment
loss and, for the SEANet architecture, a waveform L1 term. Quantizer dropout (from
SoundStream) trains some steps with fewer residual levels, so that encoding with fewer
levels (a lower bitrate) stays usable.

The bundled ``mmtok/audio-tokenizer`` (the harmonic architecture with its default
arguments) was made from the data that ``scripts/prepare_data.py`` writes:

    python scripts/prepare_data.py --out data --seed 0
    mmtok train tokenizer --modality audio --data data --output runs/audio-harmonic --steps 10000 \
        --checkpoint-every 1000 --threads 2 --logdir runs/logs/audio-harmonic

and the files ``config.json``, ``model.safetensors`` and ``README.md`` of
``runs/audio-harmonic`` were then copied to ``plugins/mmtok_audio/pretrained/audio-tokenizer``.
``python -m mmtok_audio.train`` with the same options runs the same training.
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmtok.errors import MmtokError
from mmtok.train import distributed
from mmtok.train.loop import TrainingRun, seed_everything

from mmtok_audio.evaluate import measure_clips, prepare_clip
from mmtok_audio.losses import SpectralLoss
from mmtok_audio.modality import AudioModality
from mmtok_audio.tokenizer import AudioTokenizer, HarmonicAudioTokenizer, SEANetAudioTokenizer, SpectralAudioTokenizer

logger = logging.getLogger(__name__)

# Tokenizer classes by the name that `--model-arg architecture=NAME` selects.
ARCHITECTURES: dict[str, type[AudioTokenizer]] = {
    "seanet": SEANetAudioTokenizer,
    "spectral": SpectralAudioTokenizer,
    "harmonic": HarmonicAudioTokenizer,
}
DEFAULT_ARCHITECTURE = "harmonic"

# Weight of the waveform L1 term per architecture. The STFT and log-mel terms ignore
# phase, and without an adversarial loss only the waveform L1 makes the output follow the
# input's waveform. For SEANet, EnCodec's weight of 0.1 left the output uncorrelated with
# the input here (SI-SNR -34 dB after 400 steps); 40 reached -10 dB with an equal log-mel
# distance. The spectral decoder predicts each STFT frame's phase. A weight of 10 did not
# raise its PESQ-WB on held-out speech (1.107 against 1.106 without it, after 1000 steps
# on frozen SEANet codes), so it and the harmonic architecture, which shares its decoder,
# train on the spectral terms alone.
WAVE_L1_WEIGHTS = {"seanet": 40.0, "spectral": 0.0, "harmonic": 0.0}
STFT_WEIGHT = 1.0
MEL_WEIGHT = 1.0

# Each training segment is scaled by a random gain in this range (dB), so the codec also
# trains on quieter input than the training files contain.
GAIN_RANGE_DB = (-12.0, 0.0)

# Validation clips measured and logged at each checkpoint. The final metrics use all of them.
CHECKPOINT_VALIDATION_CLIPS = 8


# Data -------------------------------------------------------------------------------


def find_audio_files(data_dir: Path, split: str) -> list[Path]:
    """List the sound files of ``data_dir/audio/<split>``, or of ``data_dir/<split>`` without it."""
    data_dir = Path(data_dir)
    suffixes = set(AudioModality.suffixes)
    candidates = [data_dir / "audio" / split, data_dir / split]
    for folder in candidates:
        if folder.is_dir():
            files = sorted(path for path in folder.iterdir() if path.suffix.lower() in suffixes)
            if files:
                return files
    tried = ", ".join(str(folder) for folder in candidates)
    raise MmtokError(f"no sound files for split {split!r}: looked in {tried}; run scripts/prepare_data.py first")


def load_clips(files: list[Path], sample_rate: int, as_int16: bool = False) -> list[torch.Tensor]:
    """Read each file as a mono 1-D tensor at ``sample_rate``.

    Clips are float32 in [-1, 1], or with ``as_int16`` the same values times 32768 as
    int16, which halves the memory and is exact for 16-bit PCM sources.
    """
    import soxr

    modality = AudioModality()
    clips = []
    for path in files:
        sample = modality.read(path)
        mono = sample.data.mean(dim=0)  # (T,)
        if sample.metadata["sample_rate"] != sample_rate:
            mono = torch.from_numpy(soxr.resample(mono.numpy(), sample.metadata["sample_rate"], sample_rate).copy())
        if as_int16:
            mono = (mono * 32768.0).round().clamp(-32768, 32767).to(torch.int16)
        clips.append(mono)
    return clips


def synthetic_tones(count: int, segment_samples: int, sample_rate: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``(count, segment_samples)`` sums of one to three steady or gliding sine tones.

    Speech and music leave gaps that a codec never learns to code, such as steady pure
    tones above 1 kHz. Each tone starts at a frequency drawn log-uniformly between 50 Hz
    and 90% of the Nyquist frequency. Half of the tones glide linearly to a frequency up
    to one octave away. Each segment is scaled to a peak between -30 and -3 dBFS.
    """
    time = torch.arange(segment_samples, dtype=torch.float64) / sample_rate  # (T,)
    duration = segment_samples / sample_rate
    top = 0.45 * sample_rate
    tones = []
    for _ in range(count):
        partials = int(torch.randint(1, 4, (), generator=generator))
        wave = torch.zeros(segment_samples, dtype=torch.float64)
        for _ in range(partials):
            start = math.exp(math.log(50.0) + float(torch.rand((), generator=generator)) * math.log(top / 50.0))
            glide = 2.0 ** (2.0 * float(torch.rand((), generator=generator)) - 1.0)
            end = min(start * glide, top) if float(torch.rand((), generator=generator)) < 0.5 else start
            phase = 2 * math.pi * float(torch.rand((), generator=generator))
            amplitude = 0.2 + 0.8 * float(torch.rand((), generator=generator))
            # The phase of a linear glide is the integral of its frequency.
            wave += amplitude * torch.sin(2 * math.pi * (start * time + (end - start) * time.pow(2) / (2 * duration)) + phase)
        peak_db = -30.0 + 27.0 * float(torch.rand((), generator=generator))
        tones.append(wave / wave.abs().max().clamp_min(1e-9) * 10.0 ** (peak_db / 20.0))
    if not tones:
        return torch.zeros(0, segment_samples)
    return torch.stack(tones).float()


def sample_segments(
    clips: list[torch.Tensor],
    batch_size: int,
    segment_samples: int,
    generator: torch.Generator | None = None,
    rows: slice = slice(None),
    tone_share: float = 0.0,
    sample_rate: int = 16000,
) -> torch.Tensor:
    """Draw random float32 ``(B, 1, segment_samples)`` segments with random gain.

    ``clips`` are as :func:`load_clips` returns them, float32 or int16. A clip is chosen
    with probability proportional to its length, so every second of audio is equally
    likely. Clips shorter than a segment are zero-padded on the right. The draws come
    from ``generator`` (torch's global one when None) and are made for all
    ``batch_size`` segments; only the segments ``rows`` are cut and returned, so each
    process of a distributed run gets its part of the same batch. With ``tone_share``
    above 0, each segment is replaced with probability ``tone_share`` by
    :func:`synthetic_tones` at ``sample_rate``; at 0 no extra draws are made.
    """
    lengths = torch.tensor([clip.shape[0] for clip in clips], dtype=torch.float64)
    choices = torch.multinomial(lengths, batch_size, replacement=True, generator=generator)
    starts = [
        int(torch.randint(max(clips[index].shape[0] - segment_samples, 0) + 1, (), generator=generator))
        for index in choices.tolist()
    ]
    low, high = GAIN_RANGE_DB
    gain_db = torch.rand(batch_size, 1, 1, generator=generator) * (high - low) + low
    segments = []
    for index, start in list(zip(choices.tolist(), starts))[rows]:
        clip = clips[index]
        segment = clip[start : start + segment_samples].float()
        if clip.dtype == torch.int16:
            segment = segment / 32768.0
        segments.append(F.pad(segment, (0, segment_samples - segment.shape[0])))
    batch = torch.stack(segments).unsqueeze(1) * 10.0 ** (gain_db[rows] / 20.0)  # (B, 1, T)
    if tone_share > 0:
        replace = torch.rand(batch_size, generator=generator) < tone_share  # (B,)
        tones = synthetic_tones(int(replace.sum()), segment_samples, sample_rate, generator)
        full = torch.zeros(batch_size, segment_samples)
        full[replace] = tones
        batch = torch.where(replace[rows, None, None], full[rows].unsqueeze(1), batch)
    return batch


# Evaluation -------------------------------------------------------------------------


def evaluate_tokenizer(tokenizer: AudioTokenizer, clips: list[torch.Tensor]) -> dict[str, Any]:
    """Measure reconstruction quality and codebook use on mono clips at the model's rate.

    Returns SI-SNR (dB, mean over clips) and log-mel distance (mean absolute natural-log
    difference of 80-band mel magnitudes) with all levels, the log-mel distance with each
    smaller number of levels, and the fraction of each level's codebook used over all
    clips, as flat ``val_`` metrics from :func:`mmtok_audio.evaluate.measure_clips`.
    """
    result = measure_clips(tokenizer, clips)
    rows = {row["levels"]: row for row in result["rows"]}
    full = rows[tokenizer.levels]
    metrics: dict[str, Any] = {
        "val_clips": result["summary"]["clips"],
        "val_seconds": round(result["summary"]["seconds"], 1),
        "val_si_snr_db": round(full["si_snr_db"], 2),
        "val_log_mel_distance": full["log_mel_distance"],
    }
    for levels in range(tokenizer.min_levels, tokenizer.levels):
        metrics[f"val_log_mel_distance_{levels}_levels"] = rows[levels]["log_mel_distance"]
    for level, usage in enumerate(result["summary"]["codebook_usage"]):
        metrics[f"val_codebook_usage_level_{level}"] = usage
    return metrics


# Training ---------------------------------------------------------------------------


def _learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 2% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 50)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _tokenizer_class(model_args: dict[str, Any] | None) -> tuple[str, type[AudioTokenizer]]:
    """Return the architecture name that ``model_args`` selects and its tokenizer class."""
    architecture = (model_args or {}).get("architecture", DEFAULT_ARCHITECTURE)
    if architecture not in ARCHITECTURES:
        raise MmtokError(
            f"unknown audio tokenizer architecture {architecture!r}; choose one of {', '.join(sorted(ARCHITECTURES))}"
        )
    return architecture, ARCHITECTURES[architecture]


def train_audio_tokenizer(
    data_dir: Path,
    output_dir: Path,
    steps: int = 5000,
    batch_size: int = 8,
    segment_seconds: float = 1.0,
    lr: float = 1e-3,
    seed: int = 0,
    logdir: Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 250,
    model_args: dict[str, Any] | None = None,
    quantizer_dropout: float = 0.1,
    device: str = "auto",
    command: str | None = None,
    tone_share: float = 0.0,
) -> AudioTokenizer:
    """Train an :class:`AudioTokenizer` on ``data_dir`` and save it to ``output_dir``.

    Loads every file of ``data_dir/audio/train`` into memory once and trains on random
    segments of ``segment_seconds``. After training, the model is measured on
    ``data_dir/audio/val`` (SI-SNR, log-mel distance, codebook usage per level) and saved
    with those metrics and a training note quoting ``command`` (by default the running
    ``mmtok`` command line). ``output_dir/checkpoint`` contains the state for ``resume``.

    The module docstring gives the command that made the bundled model: about 37
    minutes of training on two threads of a 2-core machine.

    The segments, gains and quantizer dropout of a step are functions of ``(seed,
    step)``, so a resumed run trains on the same batches as an uninterrupted one.

    Args:
        batch_size: segments per step in all processes together; under ``torchrun`` each
            process trains on its part of the batch.
        quantizer_dropout: probability that a step uses a random smaller number of
            levels (``min_levels`` to levels - 1) instead of all of them.
        model_args: constructor arguments of the tokenizer class, whose defaults apply to
            the rest. The key ``architecture`` picks the class from :data:`ARCHITECTURES`
            (default ``harmonic``, :class:`HarmonicAudioTokenizer`).
        device: ``auto``, ``cpu`` or ``cuda``.
        tone_share: share of training segments replaced by synthetic sine tones and
            glides (:func:`synthetic_tones`); the bundled model used 0.
    """
    context = distributed.setup(device)
    device = context.device
    seed_everything(seed)
    architecture, tokenizer_class = _tokenizer_class(model_args)
    arguments = {key: value for key, value in (model_args or {}).items() if key != "architecture"}
    try:
        tokenizer = tokenizer_class(**arguments).to(device)
    except (TypeError, ValueError) as error:
        raise MmtokError(f"invalid model arguments for the {architecture} audio tokenizer: {error}") from error
    wave_l1_weight = WAVE_L1_WEIGHTS[architecture]
    sample_rate = tokenizer.sample_rate
    segment_samples = max(1, round(segment_seconds * sample_rate / tokenizer.hop_length)) * tokenizer.hop_length

    train_files = find_audio_files(data_dir, "train")
    validation_files = find_audio_files(data_dir, "val")
    train_clips = load_clips(train_files, sample_rate, as_int16=True)
    validation_clips = load_clips(validation_files, sample_rate)
    train_seconds = sum(clip.shape[0] for clip in train_clips) / sample_rate
    if context.is_main:
        logger.info(
            "loaded %d training files (%.1f min) and %d validation files",
            len(train_clips),
            train_seconds / 60,
            len(validation_clips),
        )

    spectral_loss = SpectralLoss(sample_rate).to(device)
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=lr, betas=(0.8, 0.99), weight_decay=0.0)
    run = TrainingRun(output_dir, tokenizer, optimizer, steps, checkpoint_every, logdir, resume, context)
    forward = run.wrap(tokenizer)
    part = distributed.local_rows(batch_size, context)
    # Scaled by this process's share of the batch, so DDP's gradient average equals the
    # gradient of the whole batch's mean loss.
    share = (part.stop - part.start) * context.world_size / batch_size

    def train_step(step: int) -> dict[str, float]:
        learning_rate = _learning_rate(step, steps, lr)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        batch = sample_segments(
            train_clips, batch_size, segment_samples, generator, part, tone_share, sample_rate
        ).to(device)  # (B, 1, T)
        # Every process draws the same number of levels: each level's codebook update is
        # a collective operation that all processes must join.
        levels = None
        if tokenizer.levels > tokenizer.min_levels and float(torch.rand((), generator=generator)) < quantizer_dropout:
            levels = int(torch.randint(tokenizer.min_levels, tokenizer.levels, (), generator=generator))

        output = forward(batch, levels)
        wave_l1 = F.l1_loss(output.reconstruction, batch)
        spectral = spectral_loss(output.reconstruction, batch)
        stft = spectral["spectral_convergence"] + spectral["log_magnitude"]
        loss = wave_l1_weight * wave_l1 + STFT_WEIGHT * stft + MEL_WEIGHT * spectral["log_mel"] + output.quantizer.loss

        optimizer.zero_grad(set_to_none=True)
        (loss * share).backward()
        torch.nn.utils.clip_grad_norm_(tokenizer.parameters(), 1.0)
        optimizer.step()
        values = {
            "loss": loss.item(),
            "log_mel": spectral["log_mel"].item(),
            "usage": output.quantizer.usage,
            "stft": stft.item(),
            "wave_l1": wave_l1.item(),
            "commitment": output.quantizer.loss.item(),
            "perplexity": output.quantizer.perplexity,
        }
        return {**distributed.mean_over_ranks(values, weight=part.stop - part.start), "lr": learning_rate}

    def on_checkpoint() -> None:
        clips = validation_clips[:CHECKPOINT_VALIDATION_CLIPS]
        metrics = evaluate_tokenizer(tokenizer, clips)
        run.log_scalars({name: value for name, value in metrics.items() if isinstance(value, float)})
        logger.info("step %d: %s", run.step, metrics)
        clip = clips[0]
        wave = prepare_clip(clip, tokenizer.hop_length).to(device)  # (1, 1, T)
        reconstruction = tokenizer.decode_tensor(tokenizer.encode_tensor(wave))[0, 0, : clip.shape[0]]
        run.log_audio("validation/original", clip, sample_rate)
        run.log_audio("validation/reconstruction", reconstruction.cpu(), sample_rate)

    run.run(train_step, on_checkpoint)
    if not context.is_main:
        distributed.barrier()  # wait until rank 0 has saved the model
        tokenizer.round_weights()  # as saving did on rank 0, so all ranks end with the same weights
        return tokenizer

    tokenizer.metrics = evaluate_tokenizer(tokenizer, validation_clips)
    if command is None:
        command = "mmtok " + shlex.join(sys.argv[1:])
    loss_terms = "multi-resolution STFT (spectral convergence + log magnitude) + multi-resolution log-mel L1 + commitment"
    if wave_l1_weight:
        loss_terms = f"{wave_l1_weight:g} x waveform L1 + {loss_terms}"
    tokenizer.training_note = (
        f"Architecture: {architecture}. "
        f"Trained for {steps} steps (batch {batch_size} x {segment_samples / sample_rate:g} s segments, "
        f"peak learning rate {lr:g}, seed {seed}, quantizer dropout {quantizer_dropout:g}, "
        f"synthetic tone share {tone_share:g}) on "
        f"{len(train_clips)} files ({train_seconds / 60:.1f} min) of {train_files[0].parent}. "
        f"Loss: {loss_terms}; no adversarial loss. "
        f"Metrics are measured on the {len(validation_clips)} files of {validation_files[0].parent}, "
        f"which training never reads: SI-SNR in dB, log-mel distance as the mean absolute difference "
        f"of natural-log 80-band mel magnitudes (1024-point FFT), also with fewer quantizer levels, "
        f"and the fraction of each level's codes used. Command: `{command}`"
    )
    tokenizer.save_pretrained(output_dir)
    logger.info("saved %s with metrics %s", output_dir, tokenizer.metrics)
    distributed.barrier()
    return tokenizer


# Command line -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run :func:`train_audio_tokenizer` from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m mmtok_audio.train",
        description=__doc__.split("\n")[0],
        epilog=f"Trains the default {DEFAULT_ARCHITECTURE} architecture with its default arguments. "
        "`mmtok train tokenizer --modality audio --model-arg architecture=NAME` selects another "
        f"({', '.join(sorted(ARCHITECTURES))}) or other arguments.",
    )
    parser.add_argument("--data", type=Path, required=True, help="data folder holding audio/train and audio/val")
    parser.add_argument("--output", type=Path, required=True, help="folder for checkpoints and the final model")
    parser.add_argument("--steps", type=int, default=5000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="segments per step")
    parser.add_argument("--segment-seconds", type=float, default=1.0, help="length of each training segment in seconds")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--logdir", type=Path, default=None, help="TensorBoard log folder (none by default)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    parser.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints")
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA when available), cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch's default when omitted)")
    parser.add_argument(
        "--tone-share", type=float, default=0.0, help="share of segments replaced by synthetic sine tones (default: 0)"
    )
    arguments = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    command = "python -m mmtok_audio.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        train_audio_tokenizer(
            arguments.data,
            arguments.output,
            steps=arguments.steps,
            batch_size=arguments.batch_size,
            segment_seconds=arguments.segment_seconds,
            lr=arguments.lr,
            seed=arguments.seed,
            logdir=arguments.logdir,
            resume=arguments.resume,
            checkpoint_every=arguments.checkpoint_every,
            device=arguments.device,
            tone_share=arguments.tone_share,
            command=command,
        )
    except MmtokError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from error


if __name__ == "__main__":
    main()
