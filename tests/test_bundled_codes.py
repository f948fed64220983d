"""The bundled tokenizers must keep producing the codes recorded in tests/data.

The recorded codes pin the quantizers' eval-mode numerics: a change to nearest-code
search, lookup or the state-dict layout that alters a token shows up here. Each record
carries the weights hash it was made with. When a bundled model is retrained, its record
no longer applies and the test is skipped. Record again with
``python tests/test_bundled_codes.py``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import mmtok
from conftest import draw_picture

RECORD = Path(__file__).parent / "data" / "bundled_codes.safetensors"
MODELS = {"image": "mmtok/image-tokenizer", "audio": "mmtok/audio-tokenizer"}


PICTURE_SIZES = [(96, 72), (40, 120), (128, 128)]


def chords(sample_rate: int = 16000, seconds: int = 3) -> torch.Tensor:
    """One decaying two-note chord per second, ``(1, 1, T)`` at ``sample_rate``."""
    time = torch.arange(sample_rate, dtype=torch.float64) / sample_rate
    parts = []
    for root in [220.0 * 2 ** (step / 12) for step in range(0, 4 * seconds, 4)]:
        notes = torch.sin(2 * math.pi * root * time) + torch.sin(2 * math.pi * 1.5 * root * time)  # root and fifth
        parts.append(0.3 * torch.exp(-2 * time) * notes)
    return torch.cat(parts).float().view(1, 1, -1)


def encode_fixed_input(modality: str, model: torch.nn.Module, workdir: Path) -> torch.Tensor:
    """Encode the fixed pictures or chords with ``model`` in eval mode."""
    torch.set_num_threads(1)
    model.eval()
    if modality == "image":
        from mmtok_image.modality import ImageModality

        pictures = [draw_picture(workdir / f"picture{i}.png", size=size) for i, size in enumerate(PICTURE_SIZES)]
        samples = [ImageModality().read(path) for path in pictures]
        return torch.stack([tokens.codes for tokens in model.encode_batch(samples)])  # (pictures, h, w)
    return model.encode_tensor(chords(model.sample_rate))  # (1, levels, frames)


def record(workdir: Path) -> None:
    """Write the current codes and weights hashes of the bundled models to ``RECORD``."""
    tensors, hashes = {}, {}
    for modality, name in MODELS.items():
        model = mmtok.load_model(name)
        tensors[modality] = encode_fixed_input(modality, model, workdir).contiguous()
        hashes[modality] = model.weights_hash()
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, RECORD, metadata={"weights_hash": json.dumps(hashes)})


@pytest.mark.parametrize("modality", sorted(MODELS))
def test_bundled_model_codes_unchanged(modality, tmp_path):
    model = mmtok.load_model(MODELS[modality])
    with safetensors.safe_open(RECORD, "pt") as handle:
        recorded_hash = json.loads(handle.metadata()["weights_hash"])[modality]
        recorded = handle.get_tensor(modality)
    if model.weights_hash() != recorded_hash:
        pytest.skip(
            f"bundled {modality} weights changed since the codes were recorded, so record them again: python {__file__}"
        )

    codes = encode_fixed_input(modality, model, tmp_path)

    assert torch.equal(codes, recorded)


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as directory:
        record(Path(directory))
