"""Training the image tokenizer on a folder of images.

Reproduce the bundled default (after ``python scripts/prepare_data.py``) with::

    mmtok train tokenizer --modality image --data data/image --output runs/image-tokenizer --threads 1

The loss is pixel L1 plus MSE plus the quantizer's commitment loss, with straight-through
gradients through the codebook. The images and flips of a step are functions of
``(seed, step)``, so a resumed run trains on the same batches as an uninterrupted one,
and under ``torchrun`` each process takes its part of the same global batch.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mmtok import MmtokError
from mmtok.train import distributed
from mmtok.train.loop import TrainingRun, seed_everything
from mmtok_image.modality import ImageModality
from mmtok_image.tokenizer import ImageTokenizer

# Constructor arguments of the bundled model, used when no model arguments are given:
# 64x64 input downsampled by 4 to 16x16 codes of 1024 entries.
BUNDLED_MODEL_ARGS = {"resolution": 64, "channels": [24, 48, 96], "codebook_size": 1024}

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


def list_images(data_dir: Path, split: str) -> list[Path]:
    """List the images of a split: ``DIR/<split>.jsonl`` entries, else files under ``DIR/<split>/``."""
    data_dir = Path(data_dir)
    manifest = data_dir / f"{split}.jsonl"
    if manifest.is_file():
        with manifest.open(encoding="utf-8") as handle:
            return [data_dir / json.loads(line)["file"] for line in handle if line.strip()]
    folder = data_dir / split
    if not folder.is_dir():
        folder = data_dir
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MmtokError(f"{data_dir}: no images found (expected {split}.jsonl or image files)")
    return files


def load_images(files: list[Path], tokenizer: ImageTokenizer) -> torch.Tensor:
    """Load and fit every image into a ``(N, 3, R, R)`` uint8 tensor.

    Files are read as ``mmtok encode`` reads them: EXIF rotation applied, transparency
    composited onto white, first frame of an animation, and files over the pixel limit
    (``MMTOK_MAX_IMAGE_PIXELS``) skipped with a warning before they are decoded.
    """
    reader = ImageModality()
    images = []
    for path in files:
        try:
            data = reader.read(path).data
        except MmtokError as error:
            logger.warning("skipping %s", error)
            continue
        canvas, _ = tokenizer.fit(data)
        images.append((canvas * 255 + 0.5).to(torch.uint8))
    if not images:
        raise MmtokError("no readable training images")
    return torch.stack(images)


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Return the PSNR in dB of each image in a ``(B, 3, H, W)`` batch in [0, 1]."""
    mse = (reference - estimate).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


@torch.no_grad()
def evaluate(tokenizer: ImageTokenizer, images: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """Measure PSNR and codebook usage on ``(N, 3, R, R)`` uint8 images."""
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    scores, used = [], torch.zeros(tokenizer.codebook_size, dtype=torch.bool)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device).float() / 255
        codes = tokenizer.encode_tensor(batch)
        used[codes.flatten().unique().cpu()] = True
        scores.append(psnr(batch, tokenizer.decode_tensor(codes)).cpu())
    return {
        "val_psnr_db": round(float(torch.cat(scores).mean()), 2),
        "val_codebook_usage": round(float(used.float().mean()), 3),
    }


def train_image_tokenizer(
    data_dir: Path,
    output_dir: Path,
    steps: int = 3000,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    logdir: Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 250,
    model_args: dict | None = None,
    max_images: int | None = None,
    device: str = "auto",
) -> ImageTokenizer:
    """Train an image tokenizer on ``data_dir`` and save it to ``output_dir``.

    ``batch_size`` is the global batch; under ``torchrun`` each process trains on its
    part of it. ``device`` is ``auto``, ``cpu`` or ``cuda``.
    """
    context = distributed.setup(device)
    seed_everything(seed)
    tokenizer = ImageTokenizer(**(model_args or BUNDLED_MODEL_ARGS))
    tokenizer.to(context.device)
    train_files = list_images(data_dir, "train")[:max_images]
    validation_files = list_images(data_dir, "val")[: max(64, (max_images or 0) // 10) if max_images else None]
    if context.is_main:
        logger.info("loading %d training and %d validation images", len(train_files), len(validation_files))
    train_images = load_images(train_files, tokenizer)
    validation_images = load_images(validation_files, tokenizer)

    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    run = TrainingRun(output_dir, tokenizer, optimizer, steps, checkpoint_every, logdir, resume, context)
    forward = run.wrap(tokenizer)
    warmup = max(1, steps // 50)
    part = distributed.local_rows(batch_size, context)
    # Each process's mean loss is scaled by its share of the batch, so that DDP's average
    # of the gradients equals the gradient of the mean over the whole batch.
    share = (part.stop - part.start) * context.world_size / batch_size

    def train_step(step: int) -> dict[str, float]:
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        indices = torch.randint(len(train_images), (batch_size,), generator=generator)
        flip = torch.rand(batch_size, generator=generator) < 0.5
        batch = train_images[indices[part]].float() / 255
        batch[flip[part]] = batch[flip[part]].flip(-1)
        batch = batch.to(context.device)
        reconstruction, quantized = forward(batch)
        l1 = F.l1_loss(reconstruction, batch)
        mse = F.mse_loss(reconstruction, batch)
        loss = l1 + mse + quantized.loss
        optimizer.zero_grad(set_to_none=True)
        (loss * share).backward()
        torch.nn.utils.clip_grad_norm_(tokenizer.parameters(), 1.0)
        optimizer.step()
        values = {
            "loss": float(loss.detach()),
            "l1": float(l1.detach()),
            "psnr": float(psnr(batch, reconstruction.detach().clamp(0, 1)).mean()),
            "usage": quantized.usage,
            "perplexity": quantized.perplexity,
        }
        return distributed.mean_over_ranks(values, weight=part.stop - part.start)

    def on_checkpoint() -> None:
        metrics = evaluate(tokenizer, validation_images)
        run.log_scalars(metrics)
        sample = validation_images[:8].float() / 255
        reconstruction = tokenizer.decode_tensor(tokenizer.encode_tensor(sample.to(context.device))).cpu()
        grid = torch.cat([torch.cat(list(sample), dim=2), torch.cat(list(reconstruction), dim=2)], dim=1)
        run.log_image("reconstructions", grid)
        logger.info("step %d: %s", run.step, metrics)

    run.run(train_step, on_checkpoint)
    if not context.is_main:
        distributed.barrier()  # wait until rank 0 has saved the model
        return tokenizer
    tokenizer.metrics = evaluate(tokenizer, validation_images)
    tokenizer.metrics["val_images"] = len(validation_images)
    tokenizer.training_note = (
        f"Trained for {steps} steps (batch {batch_size}, seed {seed}) on {len(train_images)} images; "
        f"validation split of {len(validation_images)} images never trained on. The validation PSNR "
        f"compares at the model's {tokenizer.resolution}x{tokenizer.resolution} input, before decode "
        f"scales back to each file's size. Command: "
        f"`mmtok {' '.join(shlex.quote(a) for a in sys.argv[1:])}`"
    )
    tokenizer.save_pretrained(output_dir)
    distributed.barrier()
    return tokenizer
