"""Finite scalar quantization (FSQ), the codebook-free quantizer.

Follows Mentzer et al. (2023), "Finite Scalar Quantization: VQ-VAE Made Simple": each of
d channels is bounded with tanh to a few values and rounded, and the code is the
mixed-radix number formed by the rounded channels. The implicit codebook is the grid of
all combinations, so it cannot collapse and needs no codebook loss, EMA or restarts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from mmtok.quantize.base import Quantizer, QuantizerOutput, batch_statistics, straight_through

# Fraction by which the tanh bound stays inside the outermost rounding interval, so no
# input reaches the boundary between two codes at the ends of the range.
BOUND_MARGIN = 1e-3


class FiniteScalarQuantizer(Quantizer):
    """Quantize channel i to ``levels[i]`` values, so that the codes are the points of a grid.

    Channel ``i`` of the projected input is bounded to ``levels[i]`` integer values
    centred on zero (``-L/2 .. L/2 - 1`` for even ``L``, ``-(L-1)/2 .. (L-1)/2`` for odd
    ``L``), rounded, and scaled by ``1 / (L // 2)`` to lie in [-1, 1]. Rounding passes
    the gradient straight through. With ``dim`` different from ``len(levels)``, linear maps
    project the input to ``len(levels)`` channels and the grid point back to ``dim``.

    Codes map to grid points and back exactly: ``forward`` and ``lookup`` compute the
    point from the same integer digits, so ``lookup(codes)`` equals ``quantized`` bit for
    bit in eval and training mode (with the same projection weights and autocast setting).

    Args:
        dim: vector dimension D of the input and output.
        levels: values per channel, each at least 2. The codebook size is their product.
            Mentzer et al. recommend ``[8, 5, 5, 5]`` for about 2**10 codes and
            ``[8, 8, 8, 5, 5, 5]`` for about 2**16.
    """

    def __init__(self, dim: int, levels: Sequence[int] = (8, 5, 5, 5)) -> None:
        super().__init__()
        levels = [int(level) for level in levels]
        if not levels or min(levels) < 2:
            raise ValueError(f"levels must be a non-empty list of integers of at least 2, got {levels}")
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.levels = levels
        self.codebook_size = math.prod(levels)
        channels = len(levels)
        self.project_in = nn.Linear(dim, channels) if dim != channels else nn.Identity()
        self.project_out = nn.Linear(channels, dim) if dim != channels else nn.Identity()

        # Derived from `levels`, so not saved with the weights.
        level_tensor = torch.tensor(levels)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1]), dim=0)
        self.register_buffer("_levels", level_tensor, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("_half_width", level_tensor // 2, persistent=False)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` of shape ``(..., D)`` into codes ``(...)`` and vectors ``(..., D)``."""
        self._check_input(z)
        projected = self.project_in(z)  # (..., d)
        with torch.autocast(device_type=z.device.type, enabled=False):
            bounded = self._bound(projected.float())  # (..., d)
        digits = (bounded.round().long() + self._half_width).clamp_(min=0)
        digits = torch.minimum(digits, self._levels - 1)  # (..., d), in 0 .. L-1

        codes = (digits * self._basis).sum(dim=-1)  # (...)
        grid_point = straight_through(self._grid_point(digits), bounded / self._half_width)
        quantized = self.project_out(grid_point)
        usage, perplexity = batch_statistics(codes, self.codebook_size)
        return QuantizerOutput(codes, quantized, z.new_zeros((), dtype=torch.float32), usage, perplexity)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Return the vectors ``codes.shape + (D,)`` of ``codes``."""
        digits = torch.div(codes.unsqueeze(-1), self._basis, rounding_mode="floor") % self._levels  # (..., d)
        return self.project_out(self._grid_point(digits))

    def _bound(self, projected: torch.Tensor) -> torch.Tensor:
        """Squash channels into ``(-L/2, L/2 - 1)`` (even L) or ``(-(L-1)/2, (L-1)/2)`` (odd L)."""
        half_range = (self._levels - 1) * (1 - BOUND_MARGIN) / 2
        # Even L has an even number of integers, placed asymmetrically around 0: shift the
        # range down by 1/2 and shift the tanh input so that bound(0) = 0.
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_range)
        return torch.tanh(projected + shift) * half_range - offset

    def _grid_point(self, digits: torch.Tensor) -> torch.Tensor:
        """Map integer digits ``(..., d)`` in ``0 .. L-1`` to float32 values in [-1, 1]."""
        return (digits - self._half_width).float() / self._half_width.float()
