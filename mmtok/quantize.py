"""The shared codebook quantizers used by every continuous modality.

Vector quantization with an EMA-updated codebook follows van den Oord et al. (2017),
"Neural Discrete Representation Learning" (appendix A.1 for the EMA update); residual
stacking follows Zeghidour et al. (2021), "SoundStream". Nearest-code search always
runs in float32, chunked over rows so memory stays O(chunk x K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Rows per chunk in nearest-code search: the distance block is chunk x K float32.
SEARCH_CHUNK_ROWS = 4096


@dataclass
class QuantizerOutput:
    """Result of a quantizer's forward pass.

    Attributes:
        codes: int64 code indices, shape ``(...)`` for one codebook or ``(..., levels)``
            for a residual stack, where ``...`` is the input shape without its last axis.
        quantized: the quantized vectors with straight-through gradients, shaped as the input.
        loss: the commitment loss (weighted by beta), a scalar.
        usage: fraction of codes used in this batch (mean over levels).
        perplexity: exp of the entropy of the batch's code histogram (mean over levels).
    """

    codes: torch.Tensor
    quantized: torch.Tensor
    loss: torch.Tensor
    usage: float
    perplexity: float


def nearest_codes(vectors: torch.Tensor, codebook: torch.Tensor, chunk_rows: int = SEARCH_CHUNK_ROWS) -> torch.Tensor:
    """Return the index of the nearest codebook row for each row of ``vectors``.

    Distances are ``||z||^2 - 2 z.e + ||e||^2`` computed in float32 (autocast is turned
    off), one block of ``chunk_rows`` rows at a time.

    Args:
        vectors: ``(N, D)``.
        codebook: ``(K, D)``.
    Returns:
        ``(N,)`` int64.
    """
    with torch.autocast(device_type=vectors.device.type, enabled=False):
        vectors = vectors.float()
        codebook = codebook.float()
        codebook_norms = codebook.pow(2).sum(dim=1)  # (K,)
        codes = torch.empty(vectors.shape[0], dtype=torch.int64, device=vectors.device)
        for start in range(0, vectors.shape[0], chunk_rows):
            block = vectors[start : start + chunk_rows]  # (n, D)
            # ||z||^2 is constant per row, so it does not change the argmin.
            distances = torch.addmm(codebook_norms, block, codebook.t(), beta=1.0, alpha=-2.0)  # (n, K)
            codes[start : start + chunk_rows] = distances.argmin(dim=1)
    return codes


def _kmeans_plus_plus(vectors: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick ``count`` initial centroids from ``vectors`` (N, D) by k-means++ seeding."""
    vectors = vectors.float()
    if vectors.shape[0] < count:
        repeats = -(-count // vectors.shape[0])
        vectors = vectors.repeat(repeats, 1)
    first = torch.randint(vectors.shape[0], (1,), generator=generator, device="cpu").item()
    centroids = [vectors[first]]
    closest = (vectors - vectors[first]).pow(2).sum(dim=1)
    for _ in range(1, count):
        weights = closest.clamp_min(0)
        if float(weights.sum()) <= 0:
            weights = torch.ones_like(weights)
        index = torch.multinomial(weights.cpu(), 1, generator=generator).item()
        centroids.append(vectors[index])
        closest = torch.minimum(closest, (vectors - vectors[index]).pow(2).sum(dim=1))
    return torch.stack(centroids)


def _batch_statistics(codes: torch.Tensor, size: int) -> tuple[float, float]:
    counts = torch.bincount(codes.flatten(), minlength=size).float()
    probabilities = counts / counts.sum().clamp_min(1)
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum()
    return float((counts > 0).float().mean()), float(entropy.exp())


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def _broadcast(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(tensor, src=0)
    return tensor


class VectorQuantizer(nn.Module):
    """One codebook with EMA updates, k-means++ initialisation and dead-code restarts.

    Args:
        dim: vector dimension D.
        codebook_size: number of codes K.
        decay: EMA decay of the code counts and sums.
        epsilon: Laplace smoothing of the code counts.
        beta: weight of the commitment loss ||z - sg(e)||^2.
        restart_threshold: a code whose EMA count falls below this is restarted from a
            random encoder output of the current batch.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        beta: float = 0.25,
        restart_threshold: float = 1.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.decay = decay
        self.epsilon = epsilon
        self.beta = beta
        self.restart_threshold = restart_threshold
        self.register_buffer("codebook", torch.randn(codebook_size, dim) * 0.01)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_sum", torch.zeros(codebook_size, dim))
        self.register_buffer("initialized", torch.tensor(False))

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Return the code vectors for ``codes`` (any shape), shape ``codes.shape + (D,)``."""
        return F.embedding(codes, self.codebook)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` of shape ``(..., D)``; codes have shape ``(...)``."""
        flat = z.reshape(-1, self.dim)  # (N, D)
        if self.training:
            self._initialize(flat.detach())
        codes = nearest_codes(flat.detach(), self.codebook)
        if self.training:
            self._update(flat.detach().float(), codes)
        quantized = self.lookup(codes).to(z.dtype)
        loss = self.beta * F.mse_loss(flat, quantized.detach())
        # Straight-through gradient. Adding the exact zero (flat - flat.detach()) keeps the
        # forward value bit-identical to lookup(codes), unlike flat + (q - flat).detach().
        quantized = quantized + (flat - flat.detach())
        usage, perplexity = _batch_statistics(codes, self.codebook_size)
        return QuantizerOutput(codes.view(z.shape[:-1]), quantized.view(z.shape), loss, usage, perplexity)

    @torch.no_grad()
    def _initialize(self, flat: torch.Tensor) -> None:
        if bool(self.initialized):
            return
        centroids = _broadcast(_kmeans_plus_plus(flat, self.codebook_size).to(flat.device))
        self.codebook.copy_(centroids)
        self.embed_sum.copy_(centroids)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, flat)
        _all_reduce_sum(counts)
        _all_reduce_sum(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))
        self._restart_dead_codes(flat)

    # NOTE: a restarted code gets exactly restart_threshold as its count, so one decay
    # step puts it below the threshold again and it is replaced each step until used.
    # With few vectors per batch and a large codebook, lower the threshold (the audio
    # tokenizer uses 0.25) until restarts get a grace period.
    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        dead = self.cluster_size < self.restart_threshold
        count = int(dead.sum())
        if count == 0:
            return
        # Every rank takes the replacement vectors chosen on rank 0, so codebooks stay equal.
        chosen = flat[torch.randint(flat.shape[0], (count,), device=flat.device)]
        chosen = _broadcast(chosen.contiguous())
        self.codebook[dead] = chosen
        # Reset the EMA statistics with the vector, or the next update pulls it back.
        self.embed_sum[dead] = chosen * self.restart_threshold
        self.cluster_size[dead] = self.restart_threshold


class ResidualVectorQuantizer(nn.Module):
    """A stack of codebooks, each quantizing the residual the previous ones left.

    Args:
        dim: vector dimension D.
        codebook_size: codes per level K.
        levels: number of codebooks; fewer may be used at call time to lower the bitrate.
        Other arguments as for :class:`VectorQuantizer`.
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
    ) -> None:
        super().__init__()
        self.levels = levels
        self.codebook_size = codebook_size
        self.layers = nn.ModuleList(
            VectorQuantizer(dim, codebook_size, decay, epsilon, beta, restart_threshold) for _ in range(levels)
        )

    def forward(self, z: torch.Tensor, levels: int | None = None) -> QuantizerOutput:
        """Quantize ``z`` of shape ``(..., D)`` with the first ``levels`` codebooks.

        Returns codes of shape ``(..., levels)``.
        """
        levels = self._check_levels(levels)
        residual = z
        quantized = torch.zeros_like(z)
        codes, losses, usages, perplexities = [], [], [], []
        for layer in self.layers[:levels]:
            output = layer(residual)
            residual = residual - output.quantized.detach()
            quantized = quantized + output.quantized.detach()
            codes.append(output.codes)
            losses.append(output.loss)
            usages.append(output.usage)
            perplexities.append(output.perplexity)
        # One straight-through term for the whole stack, so the gradient reaches z once
        # instead of once per level. Adding the exact zero keeps the value equal to lookup(codes).
        quantized = quantized + (z - z.detach())
        return QuantizerOutput(
            torch.stack(codes, dim=-1),
            quantized,
            torch.stack(losses).sum(),
            sum(usages) / levels,
            sum(perplexities) / levels,
        )

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum the code vectors of ``codes`` shaped ``(..., levels)``; returns ``(..., D)``."""
        levels = self._check_levels(codes.shape[-1])
        return sum(self.layers[i].lookup(codes[..., i]) for i in range(levels))

    def _check_levels(self, levels: int | None) -> int:
        if levels is None:
            return self.levels
        if not 1 <= levels <= self.levels:
            raise ValueError(f"levels must be between 1 and {self.levels}, got {levels}")
        return levels
