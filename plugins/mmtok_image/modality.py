"""Reading and writing image files with Pillow."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mmtok import MmtokError, Modality, Sample
from mmtok.modality import check_input_file

# Images with more pixels are rejected before their pixel data is decoded, so a
# decompression bomb cannot exhaust memory. Override with MMTOK_MAX_IMAGE_PIXELS.
DEFAULT_MAX_PIXELS = 64_000_000

# Transparent pixels are composited onto this colour (white, as clip art is drawn on).
BACKGROUND = (255, 255, 255)

PRETRAINED = Path(__file__).parent / "pretrained"


def max_pixels() -> int:
    value = os.environ.get("MMTOK_MAX_IMAGE_PIXELS")
    if value is None:
        return DEFAULT_MAX_PIXELS
    try:
        return int(value)
    except ValueError as error:
        raise MmtokError(f"MMTOK_MAX_IMAGE_PIXELS must be an integer, got {value!r}") from error


@contextlib.contextmanager
def _pillow_pixel_limit(limit: int) -> Iterator[None]:
    """Make Pillow's decompression-bomb check, which runs when a header is read, use ``limit``.

    Pillow warns above ``Image.MAX_IMAGE_PIXELS`` and raises above twice that, in
    ``Image.open``, before any pixel data is decoded.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB, compositing transparency onto BACKGROUND."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16- and 32-bit grayscale: scale to 8 bits by the mode's full range.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


class ImageModality(Modality):
    """Still images: read into ``(3, H, W)`` float tensors in [0, 1]."""

    name = "image"
    suffixes = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
    default_suffix = ".png"
    default_tokenizer = "mmtok/image-tokenizer"

    def read(self, path: Path) -> Sample:
        path = Path(path)
        check_input_file(path)
        limit = max_pixels()
        try:
            with warnings.catch_warnings(), _pillow_pixel_limit(limit):
                # Below twice the limit Pillow only warns; the check below then rejects the file.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    width, height = image.size
                    if width * height > limit:
                        raise MmtokError(
                            f"{path}: image has {width}x{height} = {width * height} pixels, over the limit of "
                            f"{limit}; raise MMTOK_MAX_IMAGE_PIXELS if the file is trusted"
                        )
                    image.seek(0)  # first frame of an animation
                    image = ImageOps.exif_transpose(image)
                    mode = image.mode
                    rgb = to_rgb(image)
        except MmtokError:
            raise
        except Image.DecompressionBombError as error:
            # Pillow's own message quotes its raise threshold, twice this limit, so it is left out.
            raise MmtokError(
                f"{path}: image is over the limit of {limit} pixels; raise MMTOK_MAX_IMAGE_PIXELS if the file is "
                "trusted"
            ) from error
        except UnidentifiedImageError as error:
            raise MmtokError(f"{path}: not a readable image ({error})") from error
        except (OSError, SyntaxError, ValueError) as error:
            raise MmtokError(f"{path}: corrupt or truncated image ({error})") from error
        data = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        return Sample(data, {"width": rgb.width, "height": rgb.height, "mode": mode})

    def write(self, sample: Sample, path: Path) -> None:
        data = sample.data
        if not torch.is_tensor(data) or data.ndim != 3 or data.shape[0] not in (1, 3):
            raise MmtokError(f"{path}: image data must be a (3, H, W) tensor")
        array = (data.detach().float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        if array.shape[2] == 1:
            array = array[:, :, 0]
        image = Image.fromarray(array)
        suffix = Path(path).suffix.lower()
        if suffix not in self.suffixes:
            raise MmtokError(f"{path}: cannot write images as {suffix!r}; use one of {' '.join(self.suffixes)}")
        if suffix in (".jpg", ".jpeg", ".webp"):
            image.save(path, quality=95)
        else:
            image.save(path)

    def tokenizer_class(self):
        from mmtok_image.tokenizer import ImageTokenizer

        return ImageTokenizer

    def train_tokenizer(self, data_dir: Path, output_dir: Path, **options):
        from mmtok_image.train import train_image_tokenizer

        return train_image_tokenizer(data_dir, output_dir, **options)

    def evaluate_tokenizer(self, tokenizer, paths: list[Path], **options) -> dict:
        """Measure PSNR, SSIM, codebook usage and bits per image, against JPEG at the same size.

        :func:`mmtok_image.evaluate.evaluate_image_tokenizer` describes the metrics and options.
        """
        from mmtok_image.evaluate import evaluate_image_tokenizer

        return evaluate_image_tokenizer(self, tokenizer, paths, **options)

    def bundled_models(self) -> dict[str, Path]:
        folder = PRETRAINED / "image-tokenizer"
        if (folder / "model.safetensors").is_file():
            return {"mmtok/image-tokenizer": folder}
        return {}
