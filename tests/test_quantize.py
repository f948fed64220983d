import pytest
import torch

from mmtok.quantize import ResidualVectorQuantizer, VectorQuantizer, nearest_codes


def test_nearest_codes_match_float64_reference():
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(3000, 16, generator=generator)
    codebook = torch.randn(300, 16, generator=generator)
    reference = torch.cdist(vectors.double(), codebook.double()).argmin(dim=1)
    found = nearest_codes(vectors, codebook, chunk_rows=257)
    assert torch.equal(found, reference)


def test_nearest_codes_float32_under_autocast():
    generator = torch.Generator().manual_seed(1)
    vectors = torch.randn(2000, 32, generator=generator)
    codebook = torch.randn(512, 32, generator=generator)
    reference = torch.cdist(vectors.double(), codebook.double()).argmin(dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found = nearest_codes(vectors.bfloat16().float(), codebook)
    bf16_reference = torch.cdist(vectors.bfloat16().double(), codebook.double()).argmin(dim=1)
    assert torch.equal(found, bf16_reference)
    assert (found == reference).float().mean() > 0.9


def test_lookup_matches_forward():
    quantizer = VectorQuantizer(8, 64)
    quantizer.train()
    data = torch.randn(512, 8)
    quantizer(data)
    quantizer.eval()
    output = quantizer(data)
    assert torch.equal(quantizer.lookup(output.codes), output.quantized)


def test_ema_training_learns_clusters():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(16, 4, generator=generator) * 5
    quantizer = VectorQuantizer(4, 16)
    quantizer.train()
    for _ in range(50):
        labels = torch.randint(16, (1024,), generator=generator)
        quantizer(centers[labels] + 0.05 * torch.randn(1024, 4, generator=generator))
    quantizer.eval()
    labels = torch.randint(16, (2048,), generator=generator)
    data = centers[labels] + 0.05 * torch.randn(2048, 4, generator=generator)
    output = quantizer(data)
    error = (output.quantized - data).pow(2).sum(dim=1).mean()
    assert error < 0.1
    assert output.usage > 0.9


def test_restart_resets_ema_statistics():
    quantizer = VectorQuantizer(4, 8, restart_threshold=0.5)
    quantizer.train()
    data = torch.randn(256, 4)
    quantizer(data)
    quantizer.cluster_size[3] = 0.0
    quantizer.embed_sum[3] = 1000.0
    quantizer._restart_dead_codes(data)
    assert quantizer.cluster_size[3] == pytest.approx(0.5)
    assert torch.allclose(quantizer.embed_sum[3] / quantizer.cluster_size[3], quantizer.codebook[3])
    assert bool((quantizer.codebook[3].unsqueeze(0) == data).all(dim=1).any())


def test_residual_levels_lower_error():
    torch.manual_seed(0)
    quantizer = ResidualVectorQuantizer(8, 32, levels=3)
    quantizer.train()
    data = torch.randn(2048, 8)
    for _ in range(20):
        quantizer(data)
    quantizer.eval()
    errors = [(quantizer(data, levels=n).quantized - data).pow(2).mean().item() for n in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2]
    output = quantizer(data, levels=2)
    assert output.codes.shape == (2048, 2)
    assert torch.equal(quantizer.lookup(output.codes), output.quantized)
    with pytest.raises(ValueError, match="levels"):
        quantizer(data, levels=4)
