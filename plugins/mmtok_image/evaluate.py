"""Measuring an image tokenizer: PSNR, SSIM, codebook usage, bits per image, and JPEG.

SSIM follows Wang, Bovik, Sheikh and Simoncelli (2004), "Image Quality Assessment: From
Error Visibility to Structural Similarity": an 11x11 Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, statistics over the valid window positions only, averaged over
positions and colour channels.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from mmtok import MmtokError, Sample, Tokenizer
from mmtok.modality import Modality, atomic_output
from mmtok_image.tokenizer import RESIZE_MODES

logger = logging.getLogger(__name__)

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# Pillow's JPEG quality range; 96-100 mostly grow the file without improving it.
JPEG_QUALITIES = range(1, 96)

# Images per encode_batch call during evaluation.
BATCH_SIZE = 32

# Side of each cell of the --grid picture, pixels.
GRID_CELL = 128

OPTIONS = ("grid", "grid_images", "resize")


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """Return the PSNR in dB of ``estimate`` against ``reference``, both ``(C, H, W)`` in [0, 1]."""
    mse = float((reference - estimate).pow(2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def gaussian_profile(size: int, sigma: float) -> torch.Tensor:
    """Return a normalised 1-D Gaussian of ``size`` taps in float64."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    profile = torch.exp(-(offsets**2) / (2 * sigma**2))
    return profile / profile.sum()


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Return a normalised ``(size, size)`` Gaussian window in float64."""
    profile = gaussian_profile(size, sigma)
    return profile[:, None] * profile[None, :]


def ssim(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """Return the mean SSIM of ``estimate`` against ``reference``, both ``(C, H, W)`` in [0, 1].

    Images smaller than the 11-pixel window use a window as large as their shorter side
    (rounded down to an odd size), with the same sigma.

    The Gaussian window is separable, so the local means filter columns, then rows:
    2k instead of k * k products per pixel. They stay in float64, because variances
    computed as E[x^2] - E[x]^2 in float32 were off by up to 3e-5 in flat regions.
    """
    if reference.shape != estimate.shape or reference.ndim != 3:
        raise ValueError(f"ssim needs two (C, H, W) tensors of one shape, got {reference.shape} and {estimate.shape}")
    channels, height, width = reference.shape
    size = min(SSIM_WINDOW, height, width)
    size -= 1 - size % 2
    x = reference.to(torch.float64)
    y = estimate.to(torch.float64)
    # The five images whose local means SSIM needs, filtered in one grouped convolution.
    stack = torch.cat([x, y, x * x, y * y, x * y])[None]  # (1, 5C, H, W)
    profile = gaussian_profile(size, SSIM_SIGMA)
    columns = profile.view(1, 1, size, 1).expand(5 * channels, 1, size, 1)
    rows = profile.view(1, 1, 1, size).expand(5 * channels, 1, 1, size)
    means = F.conv2d(F.conv2d(stack, columns, groups=5 * channels), rows, groups=5 * channels)
    mean_x, mean_y, mean_xx, mean_yy, mean_xy = means[0].split(channels)  # each (C, H - k + 1, W - k + 1)
    variance_x = mean_xx - mean_x**2
    variance_y = mean_yy - mean_y**2
    covariance = mean_xy - mean_x * mean_y

    c1 = (SSIM_K1 * 1.0) ** 2  # data range 1
    c2 = (SSIM_K2 * 1.0) ** 2
    numerator = (2 * mean_x * mean_y + c1) * (2 * covariance + c2)
    denominator = (mean_x**2 + mean_y**2 + c1) * (variance_x + variance_y + c2)
    return float((numerator / denominator).mean())


def to_pil(image: torch.Tensor) -> Image.Image:
    """Convert a ``(3, H, W)`` tensor in [0, 1] to an 8-bit RGB Pillow image."""
    array = (image.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


def from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def jpeg_at_size(image: torch.Tensor, target_bytes: float) -> tuple[int, int, torch.Tensor]:
    """Compress ``image`` with Pillow's JPEG at the quality whose size is closest to ``target_bytes``.

    Returns the quality, the file size in bytes and the decoded ``(3, H, W)`` image. Ties
    go to the higher quality.
    """
    picture = to_pil(image)
    best: tuple[float, int, bytes] | None = None
    for quality in JPEG_QUALITIES:
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=quality)
        data = buffer.getvalue()
        distance = abs(len(data) - target_bytes)
        if best is None or distance <= best[0]:
            best = (distance, quality, data)
    assert best is not None
    _, quality, data = best
    with Image.open(io.BytesIO(data)) as decoded:
        return quality, len(data), from_pil(decoded)


def write_grid(originals: list[torch.Tensor], reconstructions: list[torch.Tensor], path: Path) -> None:
    """Write originals (top row) above their reconstructions (bottom row), each fitted into a white cell."""
    count = len(originals)
    canvas = Image.new("RGB", (GRID_CELL * count, GRID_CELL * 2), (255, 255, 255))
    for column, (original, reconstruction) in enumerate(zip(originals, reconstructions)):
        for row, image in enumerate((original, reconstruction)):
            cell = ImageOps.pad(to_pil(image), (GRID_CELL, GRID_CELL), color=(255, 255, 255))
            canvas.paste(cell, (column * GRID_CELL, row * GRID_CELL))
    with atomic_output(Path(path), force=True) as temporary:
        canvas.save(temporary, format="PNG")


def _parse_options(options: dict[str, Any]) -> tuple[Path | None, int, str]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise MmtokError(f"unknown image evaluation option {unknown[0]!r}; valid options: {', '.join(OPTIONS)}")
    grid = options.get("grid")
    try:
        grid_images = int(options.get("grid_images", 8))
    except ValueError as error:
        raise MmtokError(f"grid_images must be an integer, got {options['grid_images']!r}") from error
    if grid_images < 1:
        raise MmtokError(f"grid_images must be at least 1, got {grid_images}")
    resize = str(options.get("resize", "fit"))
    if resize not in RESIZE_MODES:
        raise MmtokError(f"invalid resize mode {resize!r}; choose one of: {', '.join(RESIZE_MODES)}")
    return (Path(grid) if grid is not None else None), grid_images, resize


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def evaluate_image_tokenizer(
    modality: Modality, tokenizer: Tokenizer, paths: list[Path], **options: Any
) -> dict[str, Any]:
    """Encode and decode each image and compare it with the file, and with JPEG at the same size.

    Every metric compares at the size of the file, which decode restores. The JPEG
    baseline compresses the same RGB image at the quality whose file is closest to the
    token bits / 8 in bytes. Options: ``resize`` (``fit``, the default, ``crop`` or ``pad``,
    as in :meth:`ImageTokenizer.encode_batch`), ``grid`` (a path for a PNG of the first
    ``grid_images`` originals above their reconstructions) and ``grid_images`` (default 8).
    """
    grid, grid_images, resize = _parse_options(options)
    if not paths:
        raise MmtokError("no images to evaluate")
    bits_per_code = math.log2(tokenizer.vocab_size)
    used = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    metrics: dict[str, list[float]] = {name: [] for name in ("psnr", "ssim", "bits", "jpeg_psnr", "jpeg_ssim",
                                                             "jpeg_bytes", "jpeg_quality")}
    originals, reconstructions = [], []

    for start in range(0, len(paths), BATCH_SIZE):
        batch = paths[start : start + BATCH_SIZE]
        samples: list[Sample] = [modality.read(path) for path in batch]
        for path, sample, tokens in zip(batch, samples, tokenizer.encode_batch(samples, resize=resize)):
            decoded = tokenizer.decode(tokens).data
            used[tokens.codes.flatten().unique()] = True
            bits = tokens.codes.numel() * bits_per_code
            quality, size, jpeg = jpeg_at_size(sample.data, bits / 8)
            metrics["psnr"].append(psnr(sample.data, decoded))
            metrics["ssim"].append(ssim(sample.data, decoded))
            metrics["bits"].append(bits)
            metrics["jpeg_psnr"].append(psnr(sample.data, jpeg))
            metrics["jpeg_ssim"].append(ssim(sample.data, jpeg))
            metrics["jpeg_bytes"].append(size)
            metrics["jpeg_quality"].append(quality)
            if grid is not None and len(originals) < grid_images:
                originals.append(sample.data)
                reconstructions.append(decoded)
        logger.info("evaluated %d of %d images", min(start + BATCH_SIZE, len(paths)), len(paths))

    if grid is not None:
        write_grid(originals, reconstructions, grid)
    row = {
        "psnr_db": round(_mean(metrics["psnr"]), 2),
        "ssim": round(_mean(metrics["ssim"]), 4),
        "codebook_usage": round(float(used.float().mean()), 4),
        "bits_per_image": round(_mean(metrics["bits"]), 1),
        "bytes_per_image": round(_mean(metrics["bits"]) / 8, 1),
        "jpeg_psnr_db": round(_mean(metrics["jpeg_psnr"]), 2),
        "jpeg_ssim": round(_mean(metrics["jpeg_ssim"]), 4),
        "jpeg_bytes_per_image": round(_mean(metrics["jpeg_bytes"]), 1),
        "jpeg_quality": round(_mean(metrics["jpeg_quality"]), 1),
    }
    summary = {
        "images": len(paths),
        "resize": resize,
        "tokenizer": tokenizer.name_or_path,
        "codes_used": int(used.sum()),
        "codebook_size": tokenizer.vocab_size,
        "compared_at": "the size of each file, which decode restores",
        "jpeg": "Pillow JPEG per image at the quality whose size is closest to bits_per_image / 8",
    }
    if grid is not None:
        summary["grid"] = str(grid)
    return {"rows": [row], "summary": summary}
