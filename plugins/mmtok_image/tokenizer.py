"""A convolutional VQ image tokenizer in the VQGAN family.

The encoder and decoder follow the residual-block design of Esser et al. (2021), "Taming
Transformers for High-Resolution Image Synthesis", scaled down for CPU training; the
codebook is one of mmtok's shared quantizers: the EMA vector quantizer by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmtok import MmtokError, Sample, Tokenizer, Tokens
from mmtok.quantize import CosineVectorQuantizer, FiniteScalarQuantizer, Quantizer, QuantizerOutput, VectorQuantizer

QUANTIZER_TYPES = ("vq", "cosine", "fsq")


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(8, channels), num_channels=channels, eps=1e-6)


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            _norm(in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            _norm(out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class Encoder(nn.Module):
    def __init__(self, channels: list[int], latent_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1)]
        for previous, current in zip(channels[:-1], channels[1:]):
            layers += [ResidualBlock(previous, previous), nn.Conv2d(previous, current, 4, stride=2, padding=1)]
        layers += [ResidualBlock(channels[-1], channels[-1]), _norm(channels[-1]), nn.SiLU()]
        layers += [nn.Conv2d(channels[-1], latent_dim, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    def __init__(self, channels: list[int], latent_dim: int) -> None:
        super().__init__()
        reversed_channels = channels[::-1]
        layers: list[nn.Module] = [nn.Conv2d(latent_dim, reversed_channels[0], 3, padding=1)]
        layers += [ResidualBlock(reversed_channels[0], reversed_channels[0])]
        for previous, current in zip(reversed_channels[:-1], reversed_channels[1:]):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(previous, current, 3, padding=1),
                ResidualBlock(current, current),
            ]
        layers += [_norm(reversed_channels[-1]), nn.SiLU(), nn.Conv2d(reversed_channels[-1], 3, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


def make_quantizer(
    quantizer_type: str, dim: int, codebook_size: int, beta: float, decay: float, fsq_levels: list[int] | None
) -> Quantizer:
    """Build the quantizer of an :class:`ImageTokenizer` from its constructor arguments."""
    if quantizer_type == "vq":
        return VectorQuantizer(dim, codebook_size, decay=decay, beta=beta)
    if quantizer_type == "cosine":
        return CosineVectorQuantizer(dim, codebook_size, decay=decay, beta=beta)
    if quantizer_type == "fsq":
        if not fsq_levels:
            raise ValueError('quantizer_type "fsq" needs fsq_levels, e.g. [8, 5, 5, 5] for 1000 codes')
        quantizer = FiniteScalarQuantizer(dim, fsq_levels)
        if quantizer.codebook_size != codebook_size:
            raise ValueError(
                f"fsq_levels {list(fsq_levels)} give {quantizer.codebook_size} codes, but codebook_size is "
                f"{codebook_size}. Set codebook_size={quantizer.codebook_size}."
            )
        return quantizer
    raise ValueError(f"invalid quantizer_type {quantizer_type!r}, expected one of {', '.join(QUANTIZER_TYPES)}")


class ImageTokenizer(Tokenizer):
    """Encode RGB images into a grid of codes, one code per ``2**(len(channels)-1)`` pixels.

    Args:
        resolution: side of the square the image is fitted into before encoding, pixels.
        channels: encoder widths; each step between two entries halves the resolution.
        latent_dim: dimension of the quantized vectors.
        codebook_size: number of codes K.
        beta: commitment loss weight.
        decay: EMA decay of the codebook.
        quantizer_type: ``"vq"`` for :class:`~mmtok.quantize.VectorQuantizer`, ``"cosine"``
            for :class:`~mmtok.quantize.CosineVectorQuantizer` (l2-normalised codes) or
            ``"fsq"`` for :class:`~mmtok.quantize.FiniteScalarQuantizer`, which ignores
            ``beta`` and ``decay``.
        fsq_levels: values per channel of the ``"fsq"`` quantizer, e.g. ``[8, 5, 5, 5]``;
            their product must equal ``codebook_size``.
    """

    modality = "image"

    def __init__(
        self,
        resolution: int = 128,
        channels: list[int] = [32, 64, 128, 128],
        latent_dim: int = 32,
        codebook_size: int = 1024,
        beta: float = 0.25,
        decay: float = 0.99,
        quantizer_type: str = "vq",
        fsq_levels: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.factor = 2 ** (len(channels) - 1)
        if resolution % self.factor:
            raise ValueError(f"resolution {resolution} must be a multiple of the downsampling factor {self.factor}")
        self.grid = resolution // self.factor
        self.codebook_size = codebook_size
        self.encoder = Encoder(list(channels), latent_dim)
        self.decoder = Decoder(list(channels), latent_dim)
        self.quantizer = make_quantizer(quantizer_type, latent_dim, codebook_size, beta, decay, fsq_levels)

    @property
    def vocab_size(self) -> int:
        return self.codebook_size

    # Tensors ------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Reconstruct ``images`` (B, 3, R, R) in [0, 1]; returns the reconstruction and VQ output."""
        latents = self.encoder(images * 2 - 1).permute(0, 2, 3, 1)  # (B, h, w, D)
        quantized = self.quantizer(latents)
        reconstruction = self.decoder(quantized.quantized.permute(0, 3, 1, 2))  # (B, 3, R, R)
        return (reconstruction + 1) / 2, quantized

    @torch.no_grad()
    def encode_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Encode ``(B, 3, R, R)`` images in [0, 1] into ``(B, h, w)`` int64 codes."""
        latents = self.encoder(images * 2 - 1).permute(0, 2, 3, 1)  # (B, h, w, D)
        return self.quantizer(latents).codes

    @torch.no_grad()
    def decode_tensor(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode ``(B, h, w)`` codes into ``(B, 3, R, R)`` images in [0, 1]."""
        vectors = self.quantizer.lookup(codes).permute(0, 3, 1, 2)  # (B, D, h, w)
        return ((self.decoder(vectors) + 1) / 2).clamp(0, 1)

    # Samples ------------------------------------------------------------------------

    def fit(self, image: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Fit ``(3, H, W)`` inside the square, keeping the aspect ratio, padded white.

        Returns the ``(3, R, R)`` image and the content box ``[left, top, width, height]``.
        """
        _, height, width = image.shape
        scale = self.resolution / max(height, width)
        new_height = max(1, min(self.resolution, round(height * scale)))
        new_width = max(1, min(self.resolution, round(width * scale)))
        resized = F.interpolate(image[None], size=(new_height, new_width), mode="area" if scale < 1 else "bicubic")
        canvas = torch.ones(3, self.resolution, self.resolution)
        top = (self.resolution - new_height) // 2
        left = (self.resolution - new_width) // 2
        canvas[:, top : top + new_height, left : left + new_width] = resized[0].clamp(0, 1)
        return canvas, [left, top, new_width, new_height]

    def encode_batch(self, samples: list[Sample]) -> list[Tokens]:
        fitted, boxes = [], []
        for sample in samples:
            if not torch.is_tensor(sample.data) or sample.data.ndim != 3 or sample.data.shape[0] != 3:
                raise MmtokError("image samples must hold a (3, H, W) tensor")
            canvas, box = self.fit(sample.data.float())
            fitted.append(canvas)
            boxes.append(box)
        device = next(self.parameters()).device
        codes = self.encode_tensor(torch.stack(fitted).to(device))
        tokens = []
        for sample, box, grid in zip(samples, boxes, codes):
            _, height, width = sample.data.shape
            metadata = {"width": int(width), "height": int(height), "box": box, "resolution": self.resolution}
            tokens.append(self.make_tokens(grid, metadata))
        return tokens

    def decode(self, tokens: Tokens) -> Sample:
        self.check_tokens(tokens, high=self.codebook_size)
        if tuple(tokens.codes.shape) != (self.grid, self.grid):
            raise MmtokError(f"image codes must have shape ({self.grid}, {self.grid}), got {tuple(tokens.codes.shape)}")
        left, top, box_width, box_height, width, height = self._decode_geometry(tokens.metadata)
        device = next(self.parameters()).device
        image = self.decode_tensor(tokens.codes[None].to(device))[0].cpu()  # (3, R, R)
        content = image[:, top : top + box_height, left : left + box_width]
        if (height, width) != tuple(content.shape[1:]):
            content = F.interpolate(content[None], size=(height, width), mode="bicubic")[0].clamp(0, 1)
        return Sample(content, {"width": width, "height": height})

    def _decode_geometry(self, metadata: dict) -> tuple[int, int, int, int, int, int]:
        """Return ``(left, top, box width, box height, width, height)`` from token metadata, validated.

        The size is limited like a file the image reader accepts (``MMTOK_MAX_IMAGE_PIXELS``),
        so edited metadata cannot make decode allocate a huge image.
        """
        from mmtok_image.modality import max_pixels

        def integer(value: object, name: str) -> int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise MmtokError(f"image token metadata needs an integer {name}, got {value!r}")
            return value

        width = integer(metadata.get("width", self.resolution), "width")
        height = integer(metadata.get("height", self.resolution), "height")
        if width <= 0 or height <= 0 or width * height > max_pixels():
            raise MmtokError(
                f"invalid image size {width}x{height} in token metadata: needs 1 to {max_pixels()} pixels "
                "(MMTOK_MAX_IMAGE_PIXELS)"
            )
        box = metadata.get("box", [0, 0, self.resolution, self.resolution])
        if not isinstance(box, list) or len(box) != 4:
            raise MmtokError(f"image token metadata needs a box [left, top, width, height], got {box!r}")
        left, top, box_width, box_height = (integer(value, "box entry") for value in box)
        if left < 0 or top < 0 or box_width < 1 or box_height < 1 or left + box_width > self.resolution or (
            top + box_height > self.resolution
        ):
            raise MmtokError(f"image token metadata box {box} does not lie inside the {self.resolution}-pixel square")
        return left, top, box_width, box_height, width, height

    # Sequences ----------------------------------------------------------------------

    def to_sequence(self, codes: torch.Tensor, **options) -> torch.Tensor:
        return codes.reshape(-1)  # raster order, (h * w,)

    def from_sequence(self, ids: torch.Tensor, **options) -> torch.Tensor:
        if ids.numel() != self.grid * self.grid:
            raise MmtokError(f"an image needs {self.grid * self.grid} tokens, got {ids.numel()}")
        return ids.reshape(self.grid, self.grid)

    def generation_metadata(self, sequence_length: int, **options) -> dict:
        return {"width": self.resolution, "height": self.resolution, "resolution": self.resolution}

    def sequence_defaults(self) -> tuple[int, dict]:
        return self.grid * self.grid, {}

    def card_variables(self) -> dict:
        return {
            "modality": "image",
            "architecture": (
                f"convolutional VQ autoencoder, {self.resolution}x{self.resolution} input, "
                f"downsampling x{self.factor}, codebook {self.codebook_size}"
            ),
            "vocab_size": self.vocab_size,
            "token_rate": f"{self.grid}x{self.grid} = {self.grid * self.grid} tokens per image",
            "example_suffix": ".png",
        }

    def card_tags(self) -> list[str]:
        return ["image", "vq", "tokenizer"]
