"""Vector quantizers with one learned codebook: Euclidean, cosine and factorized."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmtok.quantize.base import Quantizer, QuantizerOutput, batch_statistics, straight_through
from mmtok.quantize.search import kmeans_plus_plus, nearest_codes


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(tensor)
    return tensor


def _broadcast_from_first_rank(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(tensor, src=0)
    return tensor


class VectorQuantizer(Quantizer):
    """One codebook with EMA updates, k-means++ initialisation and dead-code restarts.

    The codebook is the EMA of the vectors assigned to each code, divided by the EMA of
    their count with Laplace smoothing (van den Oord et al. 2017, appendix A.1). The
    first training batch seeds it by k-means++. After each update, every code whose EMA
    count is below ``restart_threshold`` is restarted: it moves to a vector of the current
    batch, drawn with probability proportional to the vector's squared distance to its
    code. Its count and sum are reset to describe that vector alone. It gets the count
    ``restart_threshold / decay ** (restart_grace_steps + 0.5)``, so it survives
    ``restart_grace_steps`` updates in which no vector is assigned to it before it can be
    restarted again. Under ``torch.distributed`` the counts and sums are summed over all
    ranks, and the k-means++ seeds and restart vectors come from rank 0, so every rank
    keeps the same codebook.

    Args:
        dim: vector dimension D.
        codebook_size: number of codes K.
        decay: EMA decay of the code counts and sums, in (0, 1).
        epsilon: Laplace smoothing added to each code count before dividing.
        beta: weight of the commitment loss ``||z - sg(e)||^2``.
        restart_threshold: EMA count (vectors per batch) below which a code is restarted.
            0 turns restarts off.
        restart_grace_steps: updates a restarted code may go unused before it can be
            restarted again. Codes seeded by k-means++ get the same grace period.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        beta: float = 0.25,
        restart_threshold: float = 1.0,
        restart_grace_steps: int = 10,
    ) -> None:
        super().__init__()
        if dim < 1 or codebook_size < 1:
            raise ValueError(f"dim and codebook_size must be positive, got {dim} and {codebook_size}")
        if not 0 < decay < 1:
            raise ValueError(f"decay must be between 0 and 1 (exclusive), got {decay}")
        if epsilon < 0 or beta < 0 or restart_threshold < 0 or restart_grace_steps < 0:
            raise ValueError(
                "epsilon, beta, restart_threshold and restart_grace_steps must not be negative, got "
                f"{epsilon}, {beta}, {restart_threshold} and {restart_grace_steps}"
            )
        self.dim = dim
        self.codebook_size = codebook_size
        self.decay = decay
        self.epsilon = epsilon
        self.beta = beta
        self.restart_threshold = restart_threshold
        self.restart_grace_steps = restart_grace_steps
        # Codes restarted since construction, for logging. Not saved.
        self.restarts = 0
        self.register_buffer("codebook", torch.randn(codebook_size, dim) * 0.01)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_sum", torch.zeros(codebook_size, dim))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def restart_count(self) -> float:
        """EMA count given to a restarted code.

        After ``restart_grace_steps`` decays it is still ``restart_threshold /
        decay**0.5``, above the threshold, and one decay later it is below. The half step
        keeps float rounding of the repeated decay from ending the grace period early.
        """
        return self.restart_threshold / self.decay ** (self.restart_grace_steps + 0.5)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Return the code vectors for ``codes`` (any shape), shape ``codes.shape + (D,)``."""
        return F.embedding(codes, self.codebook)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` of shape ``(..., D)`` into codes ``(...)`` and vectors ``(..., D)``.

        The vectors have the codebook's dtype. A training call seeds the codebook if it is
        not yet initialised, chooses the codes, looks them up and only then updates the
        codebook. So the returned vectors come from the codebook that chose the codes: they
        equal ``lookup(codes)`` as evaluated before the call (after seeding), not after it.
        In eval mode the codebook does not change, and ``lookup(codes)`` after the call
        returns exactly ``quantized``.
        """
        self._check_input(z)
        flat = self._prepare(z.reshape(-1, self.dim))  # (N, D)
        if self.training:
            if flat.shape[0] == 0:
                raise ValueError("cannot train a VectorQuantizer on an empty batch")
            self._initialize(flat.detach())

        codes = nearest_codes(flat.detach(), self.codebook)  # (N,)
        quantized = self.lookup(codes)  # (N, D)
        loss = self.beta * F.mse_loss(flat.float(), quantized.detach().float())

        if self.training:
            errors = (flat.detach().float() - quantized.float()).pow(2).sum(dim=1)  # (N,)
            self._update(flat.detach().float(), codes, errors)

        quantized = straight_through(quantized, flat)
        usage, perplexity = batch_statistics(codes, self.codebook_size)
        return QuantizerOutput(codes.view(z.shape[:-1]), quantized.view(z.shape), loss, usage, perplexity)

    def _prepare(self, flat: torch.Tensor) -> torch.Tensor:
        """Map the input rows ``(N, D)`` to the space the codebook lives in."""
        return flat

    def _refresh_codebook(self) -> None:
        """Set the codebook from the EMA statistics."""
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _initialize(self, flat: torch.Tensor) -> None:
        if bool(self.initialized):
            return
        centroids = _broadcast_from_first_rank(kmeans_plus_plus(flat, self.codebook_size).to(flat.device))
        count = max(1.0, self.restart_count)
        self.codebook.copy_(centroids)
        self.embed_sum.copy_(centroids * count)
        self.cluster_size.fill_(count)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, codes: torch.Tensor, errors: torch.Tensor) -> None:
        """Apply one EMA step for the rows ``flat`` ``(N, D)`` assigned to ``codes`` ``(N,)``.

        ``errors`` ``(N,)`` are the squared distances of the rows to their codes, which
        weight the choice of restart vectors.

        Memory is O(N + K D): bincount and index_add accumulate per code, with no N x K
        one-hot matrix.
        """
        counts = torch.bincount(codes, minlength=self.codebook_size).to(self.cluster_size.dtype)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, flat.to(self.embed_sum.dtype))
        _all_reduce_sum(counts)
        _all_reduce_sum(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self._refresh_codebook()
        self._restart_dead_codes(flat, errors)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, errors: torch.Tensor) -> None:
        if self.restart_threshold <= 0:
            return
        # The counts were summed over ranks, so every rank finds the same dead codes.
        dead = self.cluster_size < self.restart_threshold
        count = int(dead.sum())
        if count == 0:
            return

        # Draw the new vectors with probability proportional to their squared distance to
        # their code, as k-means++ seeds centroids: restarts go where the codebook fits
        # the data worst, so they split shared clusters instead of doubling covered ones.
        # Every rank takes the vectors chosen on rank 0, so codebooks stay equal.
        # NOTE: they come from rank 0's part of the batch only, so N ranks restart codes
        # differently from one process with the same global batch.
        weights = errors.clamp_min(0)
        candidates = int((weights > 0).sum())
        if candidates == 0:
            weights = torch.ones_like(weights)
            candidates = weights.shape[0]
        rows = torch.multinomial(weights, count, replacement=count > candidates)
        chosen = _broadcast_from_first_rank(flat[rows].contiguous()).to(self.codebook.dtype)

        # Reset the EMA statistics with the vector, or the next update pulls it back to
        # the stale mean.
        fresh_count = self.restart_count
        self.codebook[dead] = chosen
        self.embed_sum[dead] = chosen * fresh_count
        self.cluster_size[dead] = fresh_count
        self.restarts += count


class CosineVectorQuantizer(VectorQuantizer):
    """A :class:`VectorQuantizer` over l2-normalised vectors and codes (cosine similarity).

    Inputs are l2-normalised before the search and the codes are kept at unit length, so
    the nearest code is the one with the largest cosine similarity, and the EMA update is
    spherical k-means. This follows the l2-normalised codes of Yu et al. (2021),
    "Vector-quantized Image Modeling with Improved VQGAN", which improve codebook usage.
    The quantized vectors have unit length, and the gradient reaches ``z`` through the
    normalisation. Arguments are those of :class:`VectorQuantizer`.
    """

    def _prepare(self, flat: torch.Tensor) -> torch.Tensor:
        return F.normalize(flat, dim=-1)

    def _refresh_codebook(self) -> None:
        # Smoothing scales a code by a positive factor, so it cannot change the direction.
        self.codebook.copy_(F.normalize(self.embed_sum, dim=-1))

    @torch.no_grad()
    def _initialize(self, flat: torch.Tensor) -> None:
        super()._initialize(flat)
        self._refresh_codebook()


class FactorizedVectorQuantizer(Quantizer):
    """Search codes in a low-dimensional space: project in, quantize, project out.

    Following the factorized codes of Yu et al. (2021), "Vector-quantized Image Modeling
    with Improved VQGAN", a linear map takes ``z`` from dimension D to the inner
    quantizer's smaller dimension, the inner quantizer chooses the code there, and a second
    linear map takes the code vector back to D. A small lookup dimension makes the search
    cheaper and, with a :class:`CosineVectorQuantizer` inside, improves codebook usage.
    Both maps are trained by the gradients of the loss: the output map through the
    quantized vectors, the input map through the commitment loss and the straight-through
    gradient.

    Args:
        dim: vector dimension D of the input and output.
        inner: the quantizer of the projected vectors, e.g. ``CosineVectorQuantizer(8,
            8192)``. Its ``dim`` is the lookup dimension.
    """

    def __init__(self, dim: int, inner: Quantizer) -> None:
        super().__init__()
        self.dim = dim
        self.codebook_size = inner.codebook_size
        self.inner = inner
        self.project_in = nn.Linear(dim, inner.dim)
        self.project_out = nn.Linear(inner.dim, dim)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Return the vectors ``codes.shape + (D,)`` for ``codes``, projected out of the lookup space."""
        return self.project_out(self.inner.lookup(codes))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` of shape ``(..., D)`` with the inner quantizer, which supplies codes, loss and statistics.

        ``quantized`` equals ``lookup(codes)`` under the conditions the inner quantizer
        states, with the same projection weights and autocast setting.
        """
        self._check_input(z)
        inner = self.inner(self.project_in(z))  # quantized: (..., d)
        quantized = self.project_out(inner.quantized)  # (..., D)
        return QuantizerOutput(inner.codes, quantized, inner.loss, inner.usage, inner.perplexity)
