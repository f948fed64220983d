"""The interface every mmtok quantizer implements, and its return type."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class QuantizerOutput:
    """Result of a quantizer's forward pass.

    Attributes:
        codes: int64 code indices, shape ``(...)`` for one codebook or ``(..., levels)``
            for a residual stack, where ``...`` is the input shape without its last axis.
        quantized: the quantized vectors, shaped as the input. Their values equal
            ``lookup(codes)``, and their gradient with respect to the input is the identity
            (straight-through estimator).
        loss: the commitment loss (weighted by beta), a scalar, or zero for quantizers
            without one.
        usage: fraction of codes used in this batch (mean over levels).
        perplexity: exp of the entropy of the batch's code histogram (mean over levels).
    """

    codes: torch.Tensor
    quantized: torch.Tensor
    loss: torch.Tensor
    usage: float
    perplexity: float


class Quantizer(nn.Module):
    """Base class of the quantizers: ``forward`` maps vectors to codes, ``lookup`` back.

    Subclasses set ``dim``, the input dimension D, and ``codebook_size``, the number of
    codes of each codebook, and implement :meth:`forward` and :meth:`lookup`. For the same
    codes, ``lookup`` returns the values that ``forward`` returned, bit for bit, when both
    run with the same parameters, dtype and autocast setting. Quantizers that learn their
    codebook during ``forward`` in training mode state in their docstring which codebook
    state that refers to.
    """

    dim: int
    codebook_size: int

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` of shape ``(..., D)``."""
        raise NotImplementedError

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Map ``codes`` as returned by :meth:`forward` to vectors of shape ``(..., D)``."""
        raise NotImplementedError

    def _check_input(self, z: torch.Tensor) -> None:
        if z.dim() == 0 or z.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects vectors of size {self.dim} in the last axis, got shape {tuple(z.shape)}"
            )


def straight_through(values: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Return ``values`` with the gradient of ``inputs``: the straight-through estimator.

    The result equals ``values`` bit for bit for finite ``inputs``. Subtracting the exact
    zero ``inputs.detach() - inputs`` keeps even ``-0.0`` entries, which adding
    ``inputs - inputs.detach()`` would turn into ``+0.0``, and ``inputs + (values -
    inputs).detach()`` would round. Without autograd it returns ``values`` unchanged.
    """
    if not (torch.is_grad_enabled() and inputs.requires_grad):
        return values
    return values - (inputs.detach() - inputs).to(values.dtype)


def batch_statistics(codes: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """Return the fraction of codes used in ``codes`` and the perplexity of their histogram."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    probabilities = counts / counts.sum().clamp_min(1)
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum()
    return float((counts > 0).float().mean()), float(entropy.exp())
