"""Training the image tokenizer on a folder of images.

Reproduce the bundled default (after ``python scripts/prepare_data.py``) with::

    mmtok train tokenizer --modality image --data data/image --output runs/image-tokenizer

The loss is pixel L1 plus MSE plus the quantizer's commitment loss, with straight-through
gradients through the codebook.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmtok import MmtokError
from mmtok.train.loop import TrainingRun, seed_everything
from mmtok_image.modality import to_rgb
from mmtok_image.tokenizer import ImageTokenizer

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
    """Load and fit every image into a ``(N, 3, R, R)`` uint8 tensor."""
    images = []
    for path in files:
        try:
            with Image.open(path) as image:
                rgb = to_rgb(image)
        except OSError as error:
            logger.warning("skipping %s: %s", path, error)
            continue
        data = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
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
    scores, used = [], torch.zeros(tokenizer.codebook_size, dtype=torch.bool)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].float() / 255
        codes = tokenizer.encode_tensor(batch)
        used[codes.flatten().unique()] = True
        scores.append(psnr(batch, tokenizer.decode_tensor(codes)))
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
) -> ImageTokenizer:
    """Train an image tokenizer on ``data_dir`` and save it to ``output_dir``."""
    seed_everything(seed)
    tokenizer = ImageTokenizer(**(model_args or {"resolution": 64, "channels": [24, 48, 96, 128], "codebook_size": 512}))
    train_files = list_images(data_dir, "train")[:max_images]
    validation_files = list_images(data_dir, "val")[: max(64, (max_images or 0) // 10) if max_images else None]
    logger.info("loading %d training and %d validation images", len(train_files), len(validation_files))
    train_images = load_images(train_files, tokenizer)
    validation_images = load_images(validation_files, tokenizer)

    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    run = TrainingRun(output_dir, tokenizer, optimizer, steps, checkpoint_every, logdir, resume)
    warmup = max(1, steps // 50)
    generator = torch.Generator().manual_seed(seed + run.step)

    def train_step(step: int) -> dict[str, float]:
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        indices = torch.randint(len(train_images), (batch_size,), generator=generator)
        batch = train_images[indices].float() / 255
        flip = torch.rand(batch_size, generator=generator) < 0.5
        batch[flip] = batch[flip].flip(-1)
        reconstruction, quantized = tokenizer(batch)
        l1 = F.l1_loss(reconstruction, batch)
        mse = F.mse_loss(reconstruction, batch)
        loss = l1 + mse + quantized.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tokenizer.parameters(), 1.0)
        optimizer.step()
        return {
            "loss": float(loss),
            "l1": float(l1),
            "psnr": float(psnr(batch, reconstruction.detach().clamp(0, 1)).mean()),
            "usage": quantized.usage,
            "perplexity": quantized.perplexity,
        }

    def on_checkpoint() -> None:
        metrics = evaluate(tokenizer, validation_images)
        run.log_scalars(metrics)
        sample = validation_images[:8].float() / 255
        reconstruction = tokenizer.decode_tensor(tokenizer.encode_tensor(sample))
        grid = torch.cat([torch.cat(list(sample), dim=2), torch.cat(list(reconstruction), dim=2)], dim=1)
        run.log_image("reconstructions", grid)
        logger.info("step %d: %s", run.step, metrics)

    run.run(train_step, on_checkpoint)
    tokenizer.metrics = evaluate(tokenizer, validation_images)
    tokenizer.metrics["val_images"] = len(validation_images)
    tokenizer.training_note = (
        f"Trained for {steps} steps (batch {batch_size}, seed {seed}) on {len(train_images)} images; "
        f"validation split of {len(validation_images)} images never trained on. Command: "
        f"`mmtok {' '.join(shlex.quote(a) for a in sys.argv[1:])}`"
    )
    tokenizer.save_pretrained(output_dir)
    return tokenizer
