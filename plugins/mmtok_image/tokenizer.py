"""A convolutional VQ image tokenizer in the VQGAN family.

The encoder and decoder follow the residual-block design of Esser et al. (2021), "Taming
Transformers for High-Resolution Image Synthesis", scaled down for CPU training; the
codebook is one of mmtok's shared quantizers: the EMA vector quantizer by default.
"""

from __future__ import annotations

import math

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmtok import MmtokError, Sample, Tokenizer, Tokens
from mmtok.quantize import CosineVectorQuantizer, FiniteScalarQuantizer, Quantizer, QuantizerOutput, VectorQuantizer

QUANTIZER_TYPES = ("vq", "cosine", "fsq")

# Ways encode brings an image of any size to the encoder, described in ImageTokenizer.encode_batch.
RESIZE_MODES = ("fit", "crop", "pad")


class DecodeGeometry(NamedTuple):
    """Placement of the picture in the decoded canvas, and the size decode returns."""

    grid: tuple[int, int]  # expected shape of the codes, (h, w)
    box: tuple[int, int, int, int]  # picture inside the decoded canvas: left, top, width, height
    width: int  # width of the image decode returns, pixels
    height: int
    crop: tuple[int, int, int, int] | None  # for resize "crop": the encoded square in the returned image


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize ``(3, H, W)`` to ``(3, height, width)``: area averaging to shrink, bicubic to enlarge."""
    if tuple(image.shape[1:]) == (height, width):
        return image
    shrink = height <= image.shape[1] and width <= image.shape[2]
    resized = F.interpolate(image[None], size=(height, width), mode="area" if shrink else "bicubic")
    return resized[0].clamp(0, 1)


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
        resized = _resize(image, new_height, new_width)
        canvas = torch.ones(3, self.resolution, self.resolution)
        top = (self.resolution - new_height) // 2
        left = (self.resolution - new_width) // 2
        canvas[:, top : top + new_height, left : left + new_width] = resized
        return canvas, [left, top, new_width, new_height]

    def crop(self, image: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Scale the centred square of ``(3, H, W)`` to ``(3, R, R)``.

        Returns the square and the region it covers, ``[left, top, side, side]`` in pixels
        of the original image.
        """
        _, height, width = image.shape
        side = min(height, width)
        top = (height - side) // 2
        left = (width - side) // 2
        square = _resize(image[:, top : top + side, left : left + side], self.resolution, self.resolution)
        return square, [left, top, side, side]

    def pad(self, image: torch.Tensor) -> torch.Tensor:
        """Pad ``(3, H, W)`` with white on the right and bottom to multiples of the downsampling factor."""
        _, height, width = image.shape
        canvas = torch.ones(3, -(-height // self.factor) * self.factor, -(-width // self.factor) * self.factor)
        canvas[:, :height, :width] = image
        return canvas

    def _prepare(self, image: torch.Tensor, resize: str) -> tuple[torch.Tensor, dict]:
        """Return the encoder input for ``image`` and the metadata decode needs to undo ``resize``."""
        _, height, width = image.shape
        metadata = {"width": int(width), "height": int(height), "resolution": self.resolution, "resize": resize}
        if resize == "fit":
            canvas, metadata["box"] = self.fit(image)
        elif resize == "crop":
            canvas, metadata["crop"] = self.crop(image)
            metadata["box"] = [0, 0, self.resolution, self.resolution]
        else:
            canvas = self.pad(image)
            metadata["box"] = [0, 0, int(width), int(height)]
        return canvas, metadata

    def encode_batch(self, samples: list[Sample], resize: str = "fit") -> list[Tokens]:
        """Encode ``(3, H, W)`` images into ``(h, w)`` code grids.

        ``resize`` chooses how an image of any size reaches the encoder:

        - ``"fit"`` scales it into the ``resolution`` square and pads with white.
        - ``"crop"`` scales the centred square to it. Decode returns the original size,
          white outside that square.
        - ``"pad"`` keeps every pixel and pads with white to multiples of the downsampling
          factor f, so the grid is ``(ceil(H / f), ceil(W / f))`` and varies with the image.
        """
        if resize not in RESIZE_MODES:
            raise MmtokError(f"invalid resize mode {resize!r}; choose one of: {', '.join(RESIZE_MODES)}")
        prepared = []
        for sample in samples:
            if not torch.is_tensor(sample.data) or sample.data.ndim != 3 or sample.data.shape[0] != 3:
                raise MmtokError("image samples must hold a (3, H, W) tensor")
            prepared.append(self._prepare(sample.data.float(), resize))
        device = next(self.parameters()).device
        if resize == "pad":
            # Padded images differ in size, so each one is encoded on its own.
            # NOTE: this runs the encoder at full size, so memory grows with the pixel count.
            # Only MMTOK_MAX_IMAGE_PIXELS bounds it, and that limit is sized for reading files.
            grids = [self.encode_tensor(canvas[None].to(device))[0] for canvas, _ in prepared]
        else:
            grids = list(self.encode_tensor(torch.stack([canvas for canvas, _ in prepared]).to(device)))
        return [self.make_tokens(grid, metadata) for grid, (_, metadata) in zip(grids, prepared)]

    def decode(self, tokens: Tokens) -> Sample:
        """Decode ``(h, w)`` codes into a ``(3, height, width)`` image of the size the metadata records."""
        self.check_tokens(tokens, high=self.codebook_size)
        geometry = self._decode_geometry(tokens.metadata)
        if tuple(tokens.codes.shape) != geometry.grid:
            raise MmtokError(f"image codes must have shape {geometry.grid}, got {tuple(tokens.codes.shape)}")
        device = next(self.parameters()).device
        canvas = self.decode_tensor(tokens.codes[None].to(device))[0].cpu()  # (3, h * f, w * f)
        left, top, box_width, box_height = geometry.box
        content = canvas[:, top : top + box_height, left : left + box_width]
        if geometry.crop is None:
            image = _resize(content, geometry.height, geometry.width)
        else:
            crop_left, crop_top, crop_width, crop_height = geometry.crop
            image = torch.ones(3, geometry.height, geometry.width)
            image[:, crop_top : crop_top + crop_height, crop_left : crop_left + crop_width] = _resize(
                content, crop_height, crop_width
            )
        return Sample(image, {"width": geometry.width, "height": geometry.height})

    def _decode_geometry(self, metadata: dict) -> "DecodeGeometry":
        """Read and validate the resize mode, sizes, box and crop region of token metadata.

        The size is limited like a file the image reader accepts (``MMTOK_MAX_IMAGE_PIXELS``),
        so edited metadata cannot make decode allocate a huge image. Token files written
        before the ``resize`` field existed were fitted.
        """
        from mmtok_image.modality import max_pixels

        def integer(value: object, name: str) -> int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise MmtokError(f"image token metadata needs an integer {name}, got {value!r}")
            return value

        def rectangle(value: object, name: str, width: int, height: int, where: str) -> tuple[int, int, int, int]:
            if not isinstance(value, list) or len(value) != 4:
                raise MmtokError(f"image token metadata needs a {name} [left, top, width, height], got {value!r}")
            left, top, box_width, box_height = (integer(entry, f"{name} entry") for entry in value)
            if left < 0 or top < 0 or box_width < 1 or box_height < 1 or left + box_width > width or (
                top + box_height > height
            ):
                raise MmtokError(f"image token metadata {name} {value} does not lie inside {where}")
            return left, top, box_width, box_height

        resize = metadata.get("resize", "fit")
        if resize not in RESIZE_MODES:
            raise MmtokError(f"invalid resize mode {resize!r} in token metadata; expected one of {', '.join(RESIZE_MODES)}")
        width = integer(metadata.get("width", self.resolution), "width")
        height = integer(metadata.get("height", self.resolution), "height")
        if width <= 0 or height <= 0 or width * height > max_pixels():
            raise MmtokError(
                f"invalid image size {width}x{height} in token metadata: needs 1 to {max_pixels()} pixels "
                "(MMTOK_MAX_IMAGE_PIXELS)"
            )

        if resize == "pad":
            grid = (-(-height // self.factor), -(-width // self.factor))
            box = rectangle(metadata.get("box", [0, 0, width, height]), "box", width, height, f"the {width}x{height} image")
            if box != (0, 0, width, height):
                raise MmtokError(f"image token metadata box {list(box)} must be [0, 0, {width}, {height}] for resize 'pad'")
            return DecodeGeometry(grid, box, width, height, None)
        side = self.resolution
        box = rectangle(metadata.get("box", [0, 0, side, side]), "box", side, side, f"the {side}-pixel square")
        crop = None
        if resize == "crop":
            crop = rectangle(metadata.get("crop"), "crop", width, height, f"the {width}x{height} image")
        return DecodeGeometry((self.grid, self.grid), box, width, height, crop)

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

    def sequence_grid(self, sequence_length: int, **options) -> tuple[int, int] | None:
        return (self.grid, self.grid) if sequence_length == self.grid * self.grid else None

    # Infilling ----------------------------------------------------------------------

    def region_mask(self, tokens: Tokens, region: tuple[float, ...], **options) -> torch.Tensor:
        """Return the raster-order codes whose ``f x f`` cells overlap the pixel box ``region``.

        ``region`` is ``(x0, y0, x1, y1)`` in pixels of the original image, ``x1`` and
        ``y1`` exclusive. It is mapped through the resize the tokens record.
        """
        geometry = self._decode_geometry(tokens.metadata)
        if len(region) != 4:
            raise MmtokError(f"an image region is a box x0,y0,x1,y1, got {len(region)} numbers")
        x0, y0, x1, y1 = (float(value) for value in region)
        if not (0 <= x0 < x1 <= geometry.width and 0 <= y0 < y1 <= geometry.height):
            raise MmtokError(
                f"box {x0:g},{y0:g},{x1:g},{y1:g} does not lie inside the {geometry.width}x{geometry.height} image "
                "(0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height)"
            )
        left, top, box_width, box_height = geometry.box
        if geometry.crop is not None:
            # Crop: the encoded square covers only part of the original image.
            crop_left, crop_top, crop_width, crop_height = geometry.crop
            x0, x1 = (min(max(x - crop_left, 0), crop_width) for x in (x0, x1))
            y0, y1 = (min(max(y - crop_top, 0), crop_height) for y in (y0, y1))
            if x0 >= x1 or y0 >= y1:
                raise MmtokError(f"box {list(region)} lies outside the encoded centre square {list(geometry.crop)}")
            scale_x, scale_y = box_width / crop_width, box_height / crop_height
        else:
            scale_x, scale_y = box_width / geometry.width, box_height / geometry.height
        columns = range(math.floor((left + x0 * scale_x) / self.factor), math.ceil((left + x1 * scale_x) / self.factor))
        rows = range(math.floor((top + y0 * scale_y) / self.factor), math.ceil((top + y1 * scale_y) / self.factor))
        mask = torch.zeros(geometry.grid, dtype=torch.bool)
        mask[rows.start : rows.stop, columns.start : columns.stop] = True
        return mask.reshape(-1)  # raster order, (h * w,)

    def merge_region(self, original: Sample, generated: Sample, region: tuple[float, ...]) -> Sample:
        """Paste the pixels of ``generated`` inside the box into a copy of ``original``."""
        x0, y0 = (math.floor(float(value)) for value in region[:2])
        x1, y1 = (math.ceil(float(value)) for value in region[2:])
        image = original.data.float().clone()
        image[:, y0:y1, x0:x1] = generated.data[:, y0:y1, x0:x1].to(image.dtype)
        return Sample(image, dict(generated.metadata))

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
