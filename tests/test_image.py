import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import draw_picture
from mmtok import MmtokError, Sample
from mmtok_image import ImageModality, ImageTokenizer

modality = ImageModality()


def tiny_tokenizer() -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(resolution=32, channels=[8, 16], latent_dim=4, codebook_size=16).eval()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA", "CMYK"])
def test_read_modes(tmp_path, mode):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = draw_picture(tmp_path / f"picture{suffix}", (50, 30), "RGB")
    image = Image.open(path).convert(mode)
    image.save(path)
    sample = modality.read(path)
    assert sample.data.shape == (3, 30, 50)
    assert sample.data.dtype == torch.float32
    assert float(sample.data.min()) >= 0
    assert float(sample.data.max()) <= 1


def test_transparent_pixels_become_white(tmp_path):
    path = draw_picture(tmp_path / "alpha.png", (40, 40), "RGBA")
    sample = modality.read(path)
    assert torch.allclose(sample.data[:, 0, 0], torch.ones(3))


def test_sixteen_bit_grayscale(tmp_path):
    array = (np.linspace(0, 65535, 64 * 32).reshape(32, 64)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode.startswith("I")
    sample = modality.read(path)
    assert sample.data.shape == (3, 32, 64)
    assert float(sample.data[0, 0, 0]) == pytest.approx(0.0)
    assert float(sample.data[0, -1, -1]) == pytest.approx(1.0)


def test_exif_rotation_applied(tmp_path):
    image = Image.new("RGB", (60, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert modality.read(path).data.shape == (3, 60, 20)


@pytest.mark.parametrize("suffix", [".webp", ".gif", ".bmp", ".jpeg"])
def test_other_formats(tmp_path, suffix):
    path = draw_picture(tmp_path / f"picture{suffix}", (33, 21))
    assert modality.read(path).data.shape == (3, 21, 33)


def test_write_read_round_trip(tmp_path):
    data = torch.rand(3, 17, 23)
    modality.save(Sample(data), tmp_path / "out.png")
    back = modality.read(tmp_path / "out.png").data
    assert torch.allclose(back, data, atol=1 / 255 + 1e-6)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "image"), (b"not an image at all", "not a readable image")],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(MmtokError, match="bad.png") as error:
        modality.read(path)
    assert message in str(error.value)


def test_truncated_png(tmp_path, picture):
    data = picture.read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MmtokError, match="cut.png"):
        modality.read(path)


def test_pixel_limit(tmp_path, monkeypatch):
    path = draw_picture(tmp_path / "big.png", (200, 100))
    monkeypatch.setenv("MMTOK_MAX_IMAGE_PIXELS", "10000")
    with pytest.raises(MmtokError, match="over the limit of 10000"):
        modality.read(path)


def test_encode_decode_keeps_size(tmp_path):
    tokenizer = tiny_tokenizer()
    path = draw_picture(tmp_path / "wide.png", (90, 41))
    tokens = tokenizer.encode(modality.read(path))
    assert tokens.codes.shape == (16, 16)
    assert int(tokens.codes.max()) < 16
    decoded = tokenizer.decode(tokens)
    assert decoded.data.shape == (3, 41, 90)


def test_batch_equals_one_by_one(tmp_path):
    tokenizer = tiny_tokenizer()
    samples = [modality.read(draw_picture(tmp_path / f"{i}.png", (30 + 7 * i, 40))) for i in range(3)]
    batch = tokenizer.encode_batch(samples)
    for sample, tokens in zip(samples, batch):
        assert torch.equal(tokenizer.encode(sample).codes, tokens.codes)


def test_save_load_round_trip(tmp_path, picture):
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "model")
    loaded = ImageTokenizer.from_pretrained(tmp_path / "model")
    sample = modality.read(picture)
    assert torch.equal(tokenizer.encode(sample).codes, loaded.encode(sample).codes)
    assert loaded.weights_hash() == tokenizer.weights_hash()
    assert (tmp_path / "model" / "README.md").read_text().count("image") > 0


@pytest.mark.parametrize(
    ("quantizer_type", "options"),
    [("cosine", {"codebook_size": 16}), ("fsq", {"codebook_size": 12, "fsq_levels": [4, 3]})],
)
def test_quantizer_types_encode_decode_and_reload(tmp_path, picture, quantizer_type, options):
    torch.manual_seed(0)
    tokenizer = ImageTokenizer(resolution=32, channels=[8, 16], latent_dim=4, quantizer_type=quantizer_type, **options)
    tokenizer.train()
    tokenizer(torch.rand(2, 3, 32, 32))  # one training step seeds a learned codebook
    tokenizer.eval()
    tokenizer.save_pretrained(tmp_path / "model")
    loaded = ImageTokenizer.from_pretrained(tmp_path / "model")
    sample = modality.read(picture)

    tokens = tokenizer.encode(sample)
    decoded = loaded.decode(loaded.encode(sample))

    assert tokenizer.vocab_size == options["codebook_size"]
    assert int(tokens.codes.max()) < options["codebook_size"]
    assert torch.equal(loaded.encode(sample).codes, tokens.codes)
    assert decoded.data.shape == sample.data.shape


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quantizer_type": "lfq"}, "invalid quantizer_type"),
        ({"quantizer_type": "fsq"}, "needs fsq_levels"),
        ({"quantizer_type": "fsq", "fsq_levels": [8, 5, 5, 5], "codebook_size": 1024}, "Set codebook_size=1000"),
    ],
)
def test_invalid_quantizer_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        ImageTokenizer(resolution=32, channels=[8, 16], latent_dim=4, **options)


def test_decode_rejects_other_tokenizer(picture):
    tokens = tiny_tokenizer().encode(modality.read(picture))
    torch.manual_seed(1)
    other = ImageTokenizer(resolution=32, channels=[8, 16], latent_dim=4, codebook_size=16).eval()
    with pytest.raises(MmtokError, match="decode with the tokenizer that encoded them"):
        other.decode(tokens)


def test_decode_rejects_out_of_range_codes(picture):
    tokenizer = tiny_tokenizer()
    tokens = tokenizer.encode(modality.read(picture))
    tokens.codes[0, 0] = 99
    with pytest.raises(MmtokError, match="out of range"):
        tokenizer.decode(tokens)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).pow(2).mean()))


def test_bundled_tokenizer_reconstructs_clipart(clipart):
    from mmtok.api import default_tokenizer

    tokenizer = default_tokenizer("image")
    sample = modality.read(clipart)
    decoded = tokenizer.decode(tokenizer.encode(sample))
    assert decoded.data.shape == sample.data.shape
    # The bundled model works at 64x64, so compare at that scale.
    small = torch.nn.functional.interpolate(sample.data[None], size=(64, 64), mode="area")
    small_decoded = torch.nn.functional.interpolate(decoded.data[None], size=(64, 64), mode="area")
    assert psnr(small, small_decoded) > 18.0
