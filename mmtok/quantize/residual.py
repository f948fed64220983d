"""Residual vector quantization: a stack of codebooks, each coding what the previous left."""

from __future__ import annotations

import torch
from torch import nn

from mmtok.quantize.base import Quantizer, QuantizerOutput, straight_through
from mmtok.quantize.vq import VectorQuantizer


def _sum_levels(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Add the per-level vectors in level order, so that forward and lookup round alike."""
    total = vectors[0]
    for level_vectors in vectors[1:]:
        total = total + level_vectors
    return total


class ResidualVectorQuantizer(Quantizer):
    """A stack of :class:`VectorQuantizer` codebooks (residual VQ, as in SoundStream).

    Level 0 quantizes the input, and each later level quantizes the residual the levels
    before it left (Zeghidour et al. 2021, "SoundStream: An End-to-End Neural Audio
    Codec"). The quantized output is the sum of the levels' code vectors. A call may use
    fewer levels than were trained, in eval and training mode alike, to lower the
    bitrate. A training call with fewer levels updates only those codebooks.

    Args:
        dim: vector dimension D.
        codebook_size: codes per level K.
        levels: number of codebooks.
        Other arguments as for :class:`VectorQuantizer`, applied to every level.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        levels: int,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        beta: float = 0.25,
        restart_threshold: float = 1.0,
        restart_grace_steps: int = 10,
    ) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be at least 1, got {levels}")
        self.dim = dim
        self.levels = levels
        self.codebook_size = codebook_size
        self.layers = nn.ModuleList(
            VectorQuantizer(dim, codebook_size, decay, epsilon, beta, restart_threshold, restart_grace_steps)
            for _ in range(levels)
        )

    def forward(self, z: torch.Tensor, levels: int | None = None) -> QuantizerOutput:
        """Quantize ``z`` of shape ``(..., D)`` with the first ``levels`` codebooks (all when None).

        Returns codes of shape ``(..., levels)``. The gradient of ``quantized`` with respect
        to ``z`` is the identity, however many levels are used. Each level's commitment
        loss also reaches ``z`` through its residual. The values equal ``lookup(codes)``
        under the conditions :meth:`VectorQuantizer.forward` states for each level.
        """
        self._check_input(z)
        levels = self._check_levels(levels)
        residual = z
        level_vectors, codes, losses, usages, perplexities = [], [], [], [], []
        for layer in self.layers[:levels]:
            output = layer(residual)
            # Level vectors carry no gradient: the sum gets one straight-through term below,
            # where one per level would multiply the gradient to z by the number of levels.
            vectors = output.quantized.detach()
            residual = residual - vectors
            level_vectors.append(vectors)
            codes.append(output.codes)
            losses.append(output.loss)
            usages.append(output.usage)
            perplexities.append(output.perplexity)
        quantized = straight_through(_sum_levels(level_vectors), z)
        return QuantizerOutput(
            torch.stack(codes, dim=-1),
            quantized,
            torch.stack(losses).sum(),
            sum(usages) / levels,
            sum(perplexities) / levels,
        )

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum the code vectors of ``codes`` shaped ``(..., levels)`` into ``(..., D)``."""
        levels = self._check_levels(codes.shape[-1])
        return _sum_levels([self.layers[i].lookup(codes[..., i]) for i in range(levels)])

    def _check_levels(self, levels: int | None) -> int:
        if levels is None:
            return self.levels
        if not 1 <= levels <= self.levels:
            raise ValueError(f"levels must be between 1 and {self.levels}, got {levels}")
        return levels
