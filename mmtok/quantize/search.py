"""Nearest-code search and k-means++ seeding, the numerical kernels of the quantizers.

The search computes squared distances as ``||e||^2 - 2 z.e`` with one matrix product per
block of rows, in full float32 whatever the autocast state or the float32 matmul
precision, and never holds more than one ``chunk x K`` block of distances. k-means++
seeding follows Arthur and Vassilvitskii (2007), "k-means++: The Advantages of Careful
Seeding".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Rows per block of the distance matrix on CPU. The block should stay in cache between
# the matrix product that writes it and the reduction that reads it. In
# `bench/quantizer.py --chunk-rows` (docs/benchmarks.md), 64 to 1024 rows ran within 5%
# of each other at K = 4096, and at K = 16384 blocks of 512 or more rows (32 MiB) ran 1.5
# to 1.9 times slower than 128 or 256 rows.
SEARCH_CHUNK_ROWS = 256

# Distance-block elements per chunk on other devices, where one large product per chunk
# keeps the device busy: 2**25 float32 values are 128 MiB.
# NOTE: an estimate, not yet measured on a GPU. `bench/quantizer.py --device cuda
# --chunk-rows ...` measures the choices.
DEVICE_SEARCH_ELEMENTS = 2**25

# Codes per group in the two-stage argmin (see nearest_codes).
ARGMIN_GROUP = 128


@contextlib.contextmanager
def full_float32_matmul() -> Iterator[None]:
    """Run float32 matrix products in IEEE float32 inside the block, then restore the settings.

    ``torch.set_float32_matmul_precision("medium")`` makes CPU products use bfloat16 and
    ``"high"`` makes CUDA products use TF32, which would move near-ties in the search.
    The per-backend ``fp32_precision`` flags, which torch 2.13 has, override the global
    setting (checked on CPU with torch 2.13). A torch without them gets only its CUDA
    ``allow_tf32`` flag switched off.
    NOTE: the flags are process-wide, so a product running in another Python thread
    during the search also runs in full float32.
    """
    matmul_backends = [torch.backends.cuda.matmul]
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if mkldnn_matmul is not None:
        matmul_backends.append(mkldnn_matmul)
    if all(hasattr(backend, "fp32_precision") for backend in matmul_backends):
        saved = [backend.fp32_precision for backend in matmul_backends]
        for backend in matmul_backends:
            backend.fp32_precision = "ieee"
        try:
            yield
        finally:
            for backend, precision in zip(matmul_backends, saved):
                backend.fp32_precision = precision
        return
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32


def default_chunk_rows(device: torch.device, codebook_size: int) -> int:
    """Return the number of rows per distance block for ``device`` and ``codebook_size`` codes."""
    if device.type == "cpu":
        return SEARCH_CHUNK_ROWS
    return max(SEARCH_CHUNK_ROWS, DEVICE_SEARCH_ELEMENTS // max(codebook_size, 1))


@torch.no_grad()
def nearest_codes(vectors: torch.Tensor, codebook: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Return the index of the nearest codebook row for each row of ``vectors``.

    Distances are ``||e||^2 - 2 z.e`` (``||z||^2`` is the same for every code of a row,
    so it cannot change the argmin), computed in float32 with autocast off, one block of
    ``chunk_rows`` rows at a time into a reused buffer. A tie goes to the lowest index,
    as in ``torch.argmin``.

    The argmin runs in two stages, because on CPU (torch 2.13, x86 with AVX-512)
    ``Tensor.argmin`` over rows of 4096 codes took about three times as long as the
    matrix product that fills them, while ``amin`` is vectorised. The first stage takes
    the ``amin`` of each group of ``ARGMIN_GROUP`` codes and the argmin among those group
    minima. The second takes the argmin inside the winning group. The codebook is padded
    to whole groups with rows whose squared norm is ``+inf``, so padding never wins.

    Args:
        vectors: ``(N, D)``, any float dtype, converted to float32.
        codebook: ``(K, D)``, any float dtype, converted to float32.
        chunk_rows: rows per block. By default ``SEARCH_CHUNK_ROWS`` on CPU and
            ``DEVICE_SEARCH_ELEMENTS // K`` (at least as many) on other devices.
    Returns:
        ``(N,)`` int64.
    """
    if vectors.dim() != 2 or codebook.dim() != 2 or vectors.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"need vectors (N, D) and codebook (K, D), got {tuple(vectors.shape)} and {tuple(codebook.shape)}"
        )
    if codebook.shape[0] == 0:
        raise ValueError("the codebook is empty")
    device = vectors.device
    count, size = vectors.shape[0], codebook.shape[0]
    chunk_rows = chunk_rows or default_chunk_rows(device, size)

    groups = -(-size // ARGMIN_GROUP)
    group_size = -(-size // groups)  # the smallest group size that covers K in `groups` groups
    padded_size = groups * group_size

    with torch.autocast(device_type=device.type, enabled=False), full_float32_matmul():
        vectors = vectors.float()
        codebook = codebook.float()
        norms = codebook.pow(2).sum(dim=1)  # (K,)
        if padded_size > size:
            codebook = torch.cat([codebook, codebook.new_zeros(padded_size - size, codebook.shape[1])])
            norms = torch.cat([norms, norms.new_full((padded_size - size,), float("inf"))])

        codes = torch.empty(count, dtype=torch.int64, device=device)
        buffer = torch.empty(min(chunk_rows, count), padded_size, device=device)
        rows = torch.arange(buffer.shape[0], device=device)
        for start in range(0, count, chunk_rows):
            block = vectors[start : start + chunk_rows]  # (n, D)
            n = block.shape[0]
            distances = torch.addmm(norms, block, codebook.t(), beta=1.0, alpha=-2.0, out=buffer[:n])  # (n, K')
            grouped = distances.view(n, groups, group_size)
            best_group = grouped.amin(dim=2).min(dim=1).indices  # (n,)
            best_in_group = grouped[rows[:n], best_group].min(dim=1).indices  # (n,)
            torch.add(best_in_group, best_group, alpha=group_size, out=codes[start : start + n])
    return codes


def kmeans_plus_plus(vectors: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick ``count`` initial centroids ``(count, D)`` from ``vectors`` ``(N, D)`` by k-means++ seeding.

    Each new centroid is drawn with probability proportional to the squared distance to
    the nearest centroid chosen so far. With fewer vectors than ``count`` the vectors are
    repeated, so some centroids coincide until training moves or restarts them. Memory is
    O(N D) and time O(count N D).
    """
    vectors = vectors.float()
    if vectors.shape[0] < count:
        repeats = -(-count // vectors.shape[0])
        vectors = vectors.repeat(repeats, 1)
    first = torch.randint(vectors.shape[0], (1,), generator=generator, device="cpu").item()
    centroids = [vectors[first]]
    closest = (vectors - vectors[first]).pow(2).sum(dim=1)  # (N,)
    for _ in range(1, count):
        weights = closest.clamp_min(0)
        if float(weights.sum()) <= 0:
            weights = torch.ones_like(weights)
        index = torch.multinomial(weights.cpu(), 1, generator=generator).item()
        centroids.append(vectors[index])
        closest = torch.minimum(closest, (vectors - vectors[index]).pow(2).sum(dim=1))
    return torch.stack(centroids)
