"""The image modality for mmtok: PNG, JPEG, WebP, GIF and BMP files and a VQ tokenizer."""

from __future__ import annotations

import mmtok

from mmtok_image.modality import ImageModality
from mmtok_image.tokenizer import ImageTokenizer

__all__ = ["ImageModality", "ImageTokenizer"]


@mmtok.hookimpl
def register_modalities(register):
    register(ImageModality())
