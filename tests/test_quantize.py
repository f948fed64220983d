"""Tests of the shared quantizers: exact search, bounded memory, no collapse, exact lookup, DDP."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing

from mmtok.quantize import (
    CosineVectorQuantizer,
    FactorizedVectorQuantizer,
    FiniteScalarQuantizer,
    ResidualVectorQuantizer,
    VectorQuantizer,
    nearest_codes,
)

# Search agreement tolerance, relative to ||z||^2 + ||e||^2. Float32 distances are exact
# to a few units in the last place of that scale, so codes whose float64 distances differ
# by less count as ties.
TIE_TOLERANCE = 1e-5


def mixture(centers: torch.Tensor, count: int, generator: torch.Generator, noise: float = 0.1) -> torch.Tensor:
    """Draw ``count`` vectors from equal-weight Gaussians around ``centers`` ``(K, D)``."""
    labels = torch.randint(centers.shape[0], (count,), generator=generator)
    return centers[labels] + noise * torch.randn(count, centers.shape[1], generator=generator)


def distance_gaps(vectors: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Return how much farther each chosen code is than the nearest, relative to the distance scale, in float64."""
    vectors, codebook = vectors.double(), codebook.double()
    distances = torch.cdist(vectors, codebook).pow(2)  # (N, K)
    chosen = distances.gather(1, codes.view(-1, 1)).squeeze(1)
    scale = vectors.pow(2).sum(1) + codebook.pow(2).sum(1).max()
    return (chosen - distances.min(dim=1).values) / scale


def trained_vq(dim: int = 8, size: int = 64, steps: int = 3, seed: int = 0) -> VectorQuantizer:
    generator = torch.Generator().manual_seed(seed)
    quantizer = VectorQuantizer(dim, size).train()
    for _ in range(steps):
        quantizer(torch.randn(512, dim, generator=generator))
    return quantizer


# Nearest-code search ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "size", "dim", "chunk_rows"),
    [(3000, 300, 16, 257), (1000, 1, 4, None), (777, 129, 3, 100), (500, 1000, 64, None), (0, 16, 8, None)],
)
def test_nearest_codes_match_float64_reference(count, size, dim, chunk_rows):
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(count, dim, generator=generator)
    codebook = torch.randn(size, dim, generator=generator)
    reference = torch.cdist(vectors.double(), codebook.double()).argmin(dim=1)

    found = nearest_codes(vectors, codebook, chunk_rows=chunk_rows)

    assert found.dtype == torch.int64
    assert torch.equal(found, reference)


def test_nearest_codes_ties_go_to_lowest_index():
    generator = torch.Generator().manual_seed(0)
    distinct = torch.randn(100, 8, generator=generator)
    codebook = torch.cat([distinct, distinct, distinct])  # every vector three times
    codes = nearest_codes(distinct[torch.arange(99, -1, -1)], codebook)
    assert torch.equal(codes, torch.arange(99, -1, -1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_under_autocast_searches_in_float32(dtype):
    generator = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(32, 32)
    quantizer = VectorQuantizer(32, 512).eval()
    quantizer.codebook.copy_(torch.randn(512, 32, generator=generator))
    inputs = torch.randn(2000, 32, generator=generator)

    with torch.autocast("cpu", dtype=dtype):
        latents = layer(inputs)
        output = quantizer(latents)

    assert latents.dtype == dtype
    gaps = distance_gaps(latents.detach(), quantizer.codebook, output.codes)
    assert float(gaps.max()) < TIE_TOLERANCE


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_search_ignores_reduced_matmul_precision(precision):
    generator = torch.Generator().manual_seed(2)
    vectors = torch.randn(4000, 64, generator=generator)
    codebook = torch.randn(1024, 64, generator=generator)
    reference = torch.cdist(vectors.double(), codebook.double()).argmin(dim=1)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        found = nearest_codes(vectors, codebook)
        after = torch.get_float32_matmul_precision()
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(found, reference)
    assert after == precision


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    import torch
    from mmtok.quantize import VectorQuantizer

    def status_bytes(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    torch.set_num_threads(1)
    count, dim, size = 262144, 64, 8192
    vectors = torch.randn(count, dim, generator=torch.Generator().manual_seed(0))
    quantizer = VectorQuantizer(dim, size)
    quantizer.load_state_dict(
        {"codebook": vectors[:size].clone(), "cluster_size": torch.ones(size),
         "embed_sum": vectors[:size].clone(), "initialized": torch.tensor(True)}
    )
    # Cap the address space at what is mapped now plus 3 GiB, so that building the
    # 8 GiB N x K matrix fails at once instead of filling the machine's memory.
    limit = status_bytes("VmSize") + 3 * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    peaks = {}
    for mode in ("eval", "train"):
        quantizer.train(mode == "train")
        inputs = vectors.clone().requires_grad_(mode == "train")
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to VmRSS
        before = status_bytes("VmRSS")
        output = quantizer(inputs)
        if mode == "train":
            (output.quantized.sum() + output.loss).backward()
        peaks[mode] = status_bytes("VmHWM") - before
    json.dump(peaks, sys.stdout)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak memory from /proc/self/status")
def test_large_search_memory_stays_bounded():
    # N = 262,144 vectors of D = 64 against K = 8,192 codes: a full N x K float32
    # distance matrix or one-hot would take 8 GiB, the chunked search a few MiB.
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    peaks = json.loads(result.stdout)
    assert peaks["eval"] < 2**30, peaks
    assert peaks["train"] < 2**30, peaks


# Lookup equals forward --------------------------------------------------------------


def make_quantizers() -> dict[str, torch.nn.Module]:
    return {
        "vq": VectorQuantizer(8, 64),
        "cosine": CosineVectorQuantizer(8, 64),
        "factorized": FactorizedVectorQuantizer(8, CosineVectorQuantizer(3, 64)),
        "residual": ResidualVectorQuantizer(8, 32, levels=3),
        "fsq": FiniteScalarQuantizer(4, [8, 5, 5, 5]),
        "fsq-projected": FiniteScalarQuantizer(8, [5, 4, 3]),
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach(), b.detach()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("name", sorted(make_quantizers()))
def test_lookup_matches_forward_in_eval(name):
    torch.manual_seed(0)
    quantizer = make_quantizers()[name].train()
    data = torch.randn(4, 128, quantizer.dim)
    quantizer(data)
    quantizer.eval()

    output = quantizer(data.requires_grad_())

    assert same_bits(quantizer.lookup(output.codes), output.quantized)


@pytest.mark.parametrize("name", sorted(make_quantizers()))
def test_lookup_matches_forward_in_training(name):
    torch.manual_seed(0)
    quantizer = make_quantizers()[name].train()
    quantizer(torch.randn(512, quantizer.dim))  # seeds the codebooks
    before = copy.deepcopy(quantizer)
    data = torch.randn(512, quantizer.dim, requires_grad=True)

    output = quantizer(data)

    # The vectors come from the codebook that chose the codes, the state before the call.
    assert same_bits(before.lookup(output.codes), output.quantized)


def test_training_output_comes_from_choosing_codebook():
    quantizer = trained_vq()
    before = quantizer.codebook.clone()
    data = torch.randn(512, 8, generator=torch.Generator().manual_seed(5))

    output = quantizer(data)

    assert not torch.equal(quantizer.codebook, before)
    assert torch.equal(output.codes, nearest_codes(data, before))
    assert torch.equal(output.quantized, before[output.codes])


def test_quantizers_share_one_interface():
    for name, quantizer in make_quantizers().items():
        quantizer.eval()
        output = quantizer(torch.randn(2, 5, quantizer.dim))
        assert output.quantized.shape == (2, 5, quantizer.dim), name
        assert output.codes.dtype == torch.int64, name
        assert int(output.codes.min()) >= 0, name
        assert int(output.codes.max()) < quantizer.codebook_size, name
        assert output.loss.dim() == 0, name
        assert 0 < output.usage <= 1, name
        assert output.perplexity >= 1, name


def test_wrong_input_size_raises():
    with pytest.raises(ValueError, match="size 8"):
        VectorQuantizer(8, 16)(torch.randn(3, 7))


# Gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_residual_gradient_to_input_is_identity(training, levels):
    torch.manual_seed(0)
    quantizer = ResidualVectorQuantizer(8, 32, levels=3).train()
    quantizer(torch.randn(256, 8))
    quantizer.train(training)
    data = torch.randn(256, 8, requires_grad=True)
    upstream = torch.randn(256, 8)

    output = quantizer(data, levels=levels)
    output.quantized.backward(upstream)

    assert torch.equal(data.grad, upstream)


def test_factorized_projections_get_gradients():
    torch.manual_seed(0)
    quantizer = FactorizedVectorQuantizer(16, VectorQuantizer(4, 32)).train()
    data = torch.randn(256, 16, requires_grad=True)

    output = quantizer(data)
    (output.quantized.pow(2).mean() + output.loss).backward()

    assert float(quantizer.project_in.weight.grad.abs().sum()) > 0
    assert float(quantizer.project_out.weight.grad.abs().sum()) > 0
    assert float(data.grad.abs().sum()) > 0


# Codebook learning ------------------------------------------------------------------


def test_ema_update_follows_decay_and_smoothing():
    quantizer = VectorQuantizer(2, 2, decay=0.5, epsilon=0.1, restart_threshold=0).train()
    quantizer(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))  # seeds one code on each vector
    first = int(quantizer(torch.tensor([[0.0, 0.0]])).codes)
    count = quantizer.cluster_size.clone()
    sums = quantizer.embed_sum.clone()
    data = torch.tensor([[1.0, 1.0], [1.0, 3.0], [9.0, 9.0]])

    quantizer(data)

    counts = torch.zeros(2)
    counts[first] = 2.0
    counts[1 - first] = 1.0
    expected_count = 0.5 * count + 0.5 * counts
    assert torch.allclose(quantizer.cluster_size, expected_count)
    expected_sums = 0.5 * sums
    expected_sums[first] += 0.5 * torch.tensor([2.0, 4.0])
    expected_sums[1 - first] += 0.5 * torch.tensor([9.0, 9.0])
    total = expected_count.sum()
    smoothed = (expected_count + 0.1) / (total + 2 * 0.1) * total
    assert torch.allclose(quantizer.codebook, expected_sums / smoothed.unsqueeze(1))


def test_ema_training_learns_clusters():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(16, 4, generator=generator) * 5
    quantizer = VectorQuantizer(4, 16).train()
    for _ in range(50):
        quantizer(mixture(centers, 1024, generator, noise=0.05))
    quantizer.eval()
    data = mixture(centers, 2048, generator, noise=0.05)

    output = quantizer(data)

    error = (output.quantized - data).pow(2).sum(dim=1).mean()
    assert error < 0.1
    assert output.usage > 0.9


def train_on_mixture(restart_threshold: float, seed: int = 0) -> tuple[VectorQuantizer, float, float]:
    """Seed a 64-code VQ on a tight blob, train it on a 64-mode mixture, return usage and perplexity."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    centers = torch.randn(64, 8, generator=generator) * 10
    quantizer = VectorQuantizer(8, 64, decay=0.9, restart_threshold=restart_threshold).train()
    # The first batch is what a fresh encoder emits, a blob far from the later data.
    quantizer(0.01 * torch.randn(1024, 8, generator=generator))
    for _ in range(200):
        quantizer(mixture(centers, 1024, generator))
    quantizer.eval()
    output = quantizer(mixture(centers, 16384, generator))
    return quantizer, output.usage, output.perplexity


def test_restarts_prevent_codebook_collapse():
    quantizer, usage, perplexity = train_on_mixture(restart_threshold=1.0)
    assert quantizer.restarts > 0
    assert usage >= 0.95
    assert perplexity >= 0.9 * 64


def test_without_restarts_codebook_collapses():
    quantizer, usage, perplexity = train_on_mixture(restart_threshold=0.0)
    assert quantizer.restarts == 0
    assert usage < 0.8
    assert perplexity < 0.6 * 64


def test_restarted_code_gets_fresh_statistics():
    quantizer = VectorQuantizer(4, 8, restart_threshold=0.5, restart_grace_steps=3).train()
    data = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    quantizer(data)
    quantizer.cluster_size[3] = 0.0
    quantizer.embed_sum[3] = 1000.0  # stale statistics of a code that drifted away
    restarts = quantizer.restarts

    quantizer(data)

    assert quantizer.restarts == restarts + 1
    assert float(quantizer.cluster_size[3]) == pytest.approx(quantizer.restart_count)
    assert torch.allclose(quantizer.embed_sum[3], quantizer.codebook[3] * quantizer.cluster_size[3])
    assert bool((quantizer.codebook[3].unsqueeze(0) == data).all(dim=1).any())


def test_restarted_code_survives_grace_period():
    grace = 3
    quantizer = VectorQuantizer(2, 4, decay=0.9, restart_threshold=1.0, restart_grace_steps=grace).train()
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    generator = torch.Generator().manual_seed(0)
    quantizer(mixture(centers, 400, generator, noise=0.01))  # seeds one code per center
    quantizer.cluster_size[:3] = 100.0
    quantizer.embed_sum[:3] = quantizer.codebook[:3] * 100.0
    quantizer.cluster_size[3] = 0.0
    quantizer.codebook[3] = torch.tensor([100.0, 100.0])  # far from every batch below

    # One batch far away: the dead code restarts onto one of its vectors.
    quantizer(torch.tensor([[-50.0, -50.0]]) + 0.01 * torch.randn(64, 2, generator=generator))
    restarted = quantizer.codebook[3].clone()
    restarts_after_first = quantizer.restarts

    # Later batches never come near it: it must survive `grace` updates, then restart.
    survived = 0
    for _ in range(grace + 1):
        quantizer(mixture(centers[:3], 300, generator, noise=0.01))
        if quantizer.restarts != restarts_after_first:
            break
        survived += 1

    assert float(restarted.norm()) > 50
    assert survived == grace
    assert quantizer.restarts == restarts_after_first + 1


def test_invalid_vq_arguments_raise():
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizer(4, 8, decay=1.0)
    with pytest.raises(ValueError, match="restart_threshold"):
        VectorQuantizer(4, 8, restart_threshold=-1.0)
    with pytest.raises(ValueError, match="codebook_size"):
        VectorQuantizer(4, 0)


def test_vq_state_dict_keys_unchanged():
    # The bundled models store these buffers, so renaming one breaks loading them.
    assert set(VectorQuantizer(4, 8).state_dict()) == {"codebook", "cluster_size", "embed_sum", "initialized"}
    assert set(CosineVectorQuantizer(4, 8).state_dict()) == {"codebook", "cluster_size", "embed_sum", "initialized"}
    assert set(ResidualVectorQuantizer(4, 8, levels=2).state_dict()) == {
        f"layers.{level}.{name}"
        for level in range(2)
        for name in ("codebook", "cluster_size", "embed_sum", "initialized")
    }


# Cosine codes -----------------------------------------------------------------------


def test_cosine_codes_have_unit_length_and_maximal_similarity():
    torch.manual_seed(0)
    quantizer = CosineVectorQuantizer(8, 32).train()
    for _ in range(5):
        quantizer(torch.randn(512, 8) * 3)
    quantizer.eval()
    data = torch.randn(1000, 8) * 3

    output = quantizer(data)

    assert torch.allclose(quantizer.codebook.norm(dim=1), torch.ones(32))
    similarity = torch.nn.functional.normalize(data.double(), dim=1) @ quantizer.codebook.double().t()
    chosen = similarity.gather(1, output.codes.view(-1, 1)).squeeze(1)
    assert float((similarity.max(dim=1).values - chosen).max()) < TIE_TOLERANCE


# Residual levels --------------------------------------------------------------------


def test_residual_levels_lower_error():
    torch.manual_seed(0)
    quantizer = ResidualVectorQuantizer(8, 32, levels=3).train()
    data = torch.randn(2048, 8)
    for _ in range(20):
        quantizer(data)
    quantizer.eval()

    errors = [(quantizer(data, levels=n).quantized - data).pow(2).mean().item() for n in (1, 2, 3)]
    output = quantizer(data, levels=2)

    assert errors[0] > errors[1] > errors[2]
    assert output.codes.shape == (2048, 2)
    assert torch.equal(quantizer.lookup(output.codes), output.quantized)
    with pytest.raises(ValueError, match="levels"):
        quantizer(data, levels=4)


def test_residual_fewer_levels_in_training_update_only_those():
    torch.manual_seed(0)
    quantizer = ResidualVectorQuantizer(8, 32, levels=3).train()
    quantizer(torch.randn(512, 8))
    unused = {name: tensor.clone() for name, tensor in quantizer.layers[2].state_dict().items()}
    before = copy.deepcopy(quantizer)

    output = quantizer(torch.randn(512, 8), levels=2)

    assert output.codes.shape == (512, 2)
    assert not torch.equal(quantizer.layers[1].codebook, before.layers[1].codebook)
    for name, tensor in quantizer.layers[2].state_dict().items():
        assert torch.equal(tensor, unused[name]), name
    assert torch.equal(before.lookup(output.codes), output.quantized)


# Finite scalar quantization ---------------------------------------------------------


def test_fsq_codes_cover_grid_exactly():
    levels = [8, 5, 5, 5]
    quantizer = FiniteScalarQuantizer(4, levels)
    every_code = torch.arange(quantizer.codebook_size)

    points = quantizer.lookup(every_code)  # (1000, 4)
    output = quantizer(torch.randn(200000, 4, generator=torch.Generator().manual_seed(0)))

    assert quantizer.codebook_size == 1000
    assert torch.unique(points, dim=0).shape[0] == 1000
    for channel, level in enumerate(levels):
        expected = (torch.arange(level) - level // 2).float() / (level // 2)
        assert torch.equal(torch.unique(points[:, channel]), expected)
    assert torch.equal(torch.unique(output.codes), every_code)
    assert torch.equal(quantizer.lookup(output.codes), output.quantized)


def test_fsq_rounds_to_nearest_grid_point():
    quantizer = FiniteScalarQuantizer(3, [5, 5, 5])
    data = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0))

    output = quantizer(data)

    # For odd levels the bound is about 2 tanh(z), and the grid points are k / 2.
    bounded = torch.tanh(data) * 2 * (1 - 1e-3)
    assert torch.equal(output.quantized, bounded.round() / 2)


def test_fsq_gradient_passes_straight_through():
    quantizer = FiniteScalarQuantizer(4, [8, 5, 5, 5])
    data = torch.zeros(10, 4, requires_grad=True)

    quantizer(data).quantized.sum().backward()

    # d/dz of tanh(z + shift) * half_range / (L // 2), at z = 0.
    assert bool((data.grad > 0).all())


def test_fsq_invalid_levels_raise():
    with pytest.raises(ValueError, match="levels"):
        FiniteScalarQuantizer(4, [8, 1, 5])
    with pytest.raises(ValueError, match="levels"):
        FiniteScalarQuantizer(4, [])


def test_fsq_saves_only_projections():
    assert FiniteScalarQuantizer(4, [8, 5, 5, 5]).state_dict() == {}
    assert set(FiniteScalarQuantizer(16, [8, 5, 5, 5]).state_dict()) == {
        "project_in.weight",
        "project_in.bias",
        "project_out.weight",
        "project_out.bias",
    }


# Distributed training ---------------------------------------------------------------


def _train_distributed(rank: int, world_size: int, init_file: str, output_dir: str) -> None:
    """Train a VQ and an RVQ on rank-specific data and save their buffers (run by spawn)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        centers = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)) * 10
        generator = torch.Generator().manual_seed(100 + rank)
        torch.manual_seed(100 + rank)
        # A short grace period, so that restarts happen within the few steps.
        single = VectorQuantizer(4, 32, decay=0.9, restart_grace_steps=2).train()
        residual = ResidualVectorQuantizer(4, 16, levels=2, decay=0.9, restart_grace_steps=2).train()
        # A blob first, so that restarts happen once the data spreads out.
        blob = 0.01 * torch.randn(200 + 50 * rank, 4, generator=generator)
        single(blob)
        residual(blob)
        for step in range(8):
            data = mixture(centers, 300 + 40 * rank, generator)
            single(data)
            residual(data, levels=1 + step % 2)
        tensors = {f"single.{k}": v for k, v in single.state_dict().items()}
        tensors |= {f"residual.{k}": v for k, v in residual.state_dict().items()}
        metadata = {"restarts": str(single.restarts)}
        safetensors.torch.save_file(tensors, os.path.join(output_dir, f"rank{rank}.safetensors"), metadata=metadata)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_distributed_codebooks_stay_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # gloo traffic stays on loopback
    torch.multiprocessing.spawn(
        _train_distributed, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True
    )
    states = [safetensors.torch.load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(2)]
    with safetensors.safe_open(tmp_path / "rank0.safetensors", "pt") as handle:
        restarts = int(handle.metadata()["restarts"])

    assert restarts > 0
    assert set(states[0]) == set(states[1])
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
