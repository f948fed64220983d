import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import draw_picture
from mmtok import MmtokError, Sample, Tokens
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
    assert psnr(small, small_decoded) > 24.0  # measured 26.9 dB


# Real-world inputs ----------------------------------------------------------------------


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """Build a PNG file by hand, for layouts Pillow cannot write (16-bit RGB, forged sizes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_sixteen_bit_rgb_png(tmp_path):
    # Two pixels per row: full red, then half grey, in 16 bits per channel.
    row = b"\x00" + struct.pack(">6H", 65535, 0, 0, 32768, 32768, 32768)
    path = tmp_path / "deep-rgb.png"
    path.write_bytes(png_bytes(2, 3, 16, 2, row * 3))
    sample = modality.read(path)
    assert sample.data.shape == (3, 3, 2)
    assert sample.data[:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert sample.data[:, 0, 1].tolist() == pytest.approx([128 / 255] * 3, abs=1 / 255)


def test_forged_png_size_rejected_before_decoding(tmp_path):
    # The header claims 100000 x 100000 pixels; the data would need 30 GB, the file has 40 bytes of it.
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(100_000, 100_000, 8, 2, b"\x00" * 40))
    with pytest.raises(MmtokError, match="bomb.png: image .*over the limit"):
        modality.read(path)


def test_palette_transparency_becomes_white(tmp_path):
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    image.paste(0, (0, 0, 4, 8))
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    sample = modality.read(path)
    assert sample.data[:, 0, 0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert sample.data[:, 0, 7].tolist() == pytest.approx([200 / 255, 30 / 255, 30 / 255])


def test_palette_without_transparency_keeps_colours(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([10, 20, 30] + [0] * 765)
    path = tmp_path / "opaque-palette.png"
    image.save(path)
    assert modality.read(path).data[:, 3, 3].tolist() == pytest.approx([10 / 255, 20 / 255, 30 / 255])


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_composited_onto_white(tmp_path, mode):
    # Half-transparent black over white gives mid grey; fully transparent gives white.
    image = Image.new(mode, (4, 1))
    colour = (0, 128) if mode == "LA" else (0, 0, 0, 128)
    clear = (0, 0) if mode == "LA" else (0, 0, 0, 0)
    image.putpixel((0, 0), colour)
    image.putpixel((1, 0), clear)
    path = tmp_path / f"alpha-{mode}.png"
    image.save(path)
    sample = modality.read(path)
    assert sample.data[0, 0, 0] == pytest.approx(127 / 255, abs=1 / 255)
    assert sample.data[:, 0, 1].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_exif_rotation_moves_content(tmp_path):
    # A red left edge, displayed rotated 90 degrees clockwise, becomes the top edge.
    image = Image.new("RGB", (60, 20), "white")
    image.paste((255, 0, 0), (0, 0, 10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    data = modality.read(path).data
    assert data.shape == (3, 60, 20)
    assert float(data[1, 2, 10]) < 0.2  # top: red, so little green
    assert float(data[1, -2, 10]) > 0.8  # bottom: white


def test_cmyk_jpeg_colours(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("RGB", (16, 16), (200, 40, 40)).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    red, green, _ = modality.read(path).data[:, 8, 8].tolist()
    assert red > 0.6
    assert green < 0.3


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(path).n_frames == 2
    assert modality.read(path).data[:, 5, 5].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=0.02)


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("rgb.png", "RGB"), ("grey.png", "L"), ("palette.png", "P"), ("alpha.png", "RGBA"), ("grey-alpha.png", "LA"),
        ("photo.jpg", "RGB"), ("cmyk.jpg", "CMYK"), ("picture.webp", "RGB"), ("picture.gif", "P"),
        ("picture.bmp", "RGB"),
    ],
)
def test_every_format_round_trips(tmp_path, name, mode):
    path = tmp_path / name
    Image.open(draw_picture(tmp_path / "source.png", (45, 28))).convert(mode).save(path)
    tokenizer = tiny_tokenizer()
    token_file = tmp_path / "picture.mmtok"
    tokenizer.encode(modality.read(path)).save(token_file)
    output = tmp_path / ("decoded" + Path(name).suffix)
    tokenizer.decode_to_file(Tokens.load(token_file), output)
    assert Image.open(output).size == (45, 28)


# Resize modes -----------------------------------------------------------------------------


@pytest.mark.parametrize(("resize", "grid"), [("fit", (16, 16)), ("crop", (16, 16)), ("pad", (3, 6))])
def test_resize_modes_restore_size(tmp_path, resize, grid):
    tokenizer = tiny_tokenizer()  # downsampling factor 2
    sample = modality.read(draw_picture(tmp_path / "wide.png", (11, 5)))
    tokens = tokenizer.encode(sample, resize=resize)
    token_file = tmp_path / "wide.mmtok"
    tokens.save(token_file)
    loaded = Tokens.load(token_file)
    decoded = tokenizer.decode(loaded)
    assert tuple(tokens.codes.shape) == grid
    assert loaded.metadata["resize"] == resize
    assert decoded.data.shape == (3, 5, 11)


def test_resize_crop_whitens_outside_square(tmp_path):
    tokenizer = tiny_tokenizer()
    tokens = tokenizer.encode(modality.read(draw_picture(tmp_path / "wide.png", (90, 30))), resize="crop")
    decoded = tokenizer.decode(tokens).data
    assert tokens.metadata["crop"] == [30, 0, 30, 30]
    assert torch.equal(decoded[:, :, :30], torch.ones(3, 30, 30))
    assert torch.equal(decoded[:, :, 60:], torch.ones(3, 30, 30))


def test_resize_pad_keeps_every_pixel(tmp_path):
    tokenizer = tiny_tokenizer()
    sample = modality.read(draw_picture(tmp_path / "odd.png", (33, 21)))
    canvas = tokenizer.pad(sample.data)
    assert canvas.shape == (3, 22, 34)
    assert torch.equal(canvas[:, :21, :33], sample.data)
    assert torch.equal(canvas[:, 21:, :], torch.ones(3, 1, 34))


def test_resize_invalid_mode_rejected(picture):
    with pytest.raises(MmtokError, match="invalid resize mode 'zoom'; choose one of: fit, crop, pad"):
        tiny_tokenizer().encode(modality.read(picture), resize="zoom")


@pytest.mark.parametrize(
    ("resize", "size", "change", "message"),
    [
        ("crop", (90, 30), {"resize": "stretch"}, "invalid resize mode 'stretch' in token metadata"),
        ("crop", (90, 30), {"crop": [80, 0, 30, 30]}, "crop .* does not lie inside the 90x30 image"),
        ("crop", (90, 30), {"crop": None}, "needs a crop"),
        ("pad", (33, 20), {"width": 40, "box": [0, 0, 40, 20]}, r"codes must have shape \(10, 20\)"),
        ("pad", (33, 20), {"box": [1, 0, 32, 20]}, r"box \[1, 0, 32, 20\] must be \[0, 0, 33, 20\] for resize 'pad'"),
        ("pad", (33, 20), {"box": [0, 0, 34, 20]}, "box .* does not lie inside the 33x20 image"),
    ],
)
def test_decode_rejects_bad_resize_metadata(tmp_path, resize, size, change, message):
    tokenizer = tiny_tokenizer()
    tokens = tokenizer.encode(modality.read(draw_picture(tmp_path / "picture.png", size)), resize=resize)
    tokens.metadata.update(change)
    with pytest.raises(MmtokError, match=message):
        tokenizer.decode(tokens)


def test_metadata_without_resize_decodes_as_fit(picture):
    tokenizer = tiny_tokenizer()
    tokens = tokenizer.encode(modality.read(picture))
    expected = tokenizer.decode(tokens).data
    del tokens.metadata["resize"]
    assert torch.equal(tokenizer.decode(tokens).data, expected)


@pytest.mark.parametrize("resize", ["fit", "crop", "pad"])
def test_folder_batch_equals_one_by_one(tmp_path, resize):
    tokenizer = tiny_tokenizer()
    for index, size in enumerate([(30, 40), (64, 20), (17, 17), (50, 51)]):
        draw_picture(tmp_path / f"{index}.png", size)
    samples = [modality.read(path) for path in sorted(tmp_path.glob("*.png"))]
    batch = tokenizer.encode_batch(samples, resize=resize)
    for sample, tokens in zip(samples, batch):
        single = tokenizer.encode(sample, resize=resize)
        assert torch.equal(single.codes, tokens.codes)
        assert single.metadata == tokens.metadata


def test_cli_encode_resize_option(tmp_path):
    from click.testing import CliRunner

    from mmtok.cli import cli

    path = draw_picture(tmp_path / "wide.png", (150, 97))
    runner = CliRunner()
    encoded = runner.invoke(cli, ["encode", str(path), "--option", "resize=pad"])
    decoded = runner.invoke(cli, ["decode", str(tmp_path / "wide.png.mmtok"), "-o", str(tmp_path / "back.png")])
    rejected = runner.invoke(cli, ["encode", str(path), "-o", str(tmp_path / "x.mmtok"), "--option", "levels=2"])
    assert encoded.exit_code == 0, encoded.output
    assert Tokens.load(tmp_path / "wide.png.mmtok").codes.shape == (25, 38)  # padded to 152x100, downsampled by 4
    assert decoded.exit_code == 0, decoded.output
    assert Image.open(tmp_path / "back.png").size == (150, 97)
    assert rejected.exit_code == 1
    assert "has no encode option 'levels'; options: resize" in rejected.output


def test_training_loader_applies_exif_rotation(tmp_path):
    from mmtok_image.train import load_images

    # A tall picture stored as a wide JPEG: after rotation the white band runs left to right.
    image = Image.new("RGB", (64, 32), "black")
    image.paste((255, 255, 255), (0, 0, 32, 32))  # left half white, rotated to the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    (loaded,) = load_images([path], tiny_tokenizer())
    rows = loaded.float().mean(dim=(0, 2))  # mean brightness of each row of the fitted square
    assert rows[: len(rows) // 2].mean() > rows[len(rows) // 2 :].mean() + 100


def test_training_loader_skips_large_files(tmp_path, monkeypatch):
    from mmtok_image.train import load_images

    small = draw_picture(tmp_path / "small.png", (60, 40))
    big = draw_picture(tmp_path / "big.png", (200, 100))
    monkeypatch.setenv("MMTOK_MAX_IMAGE_PIXELS", "10000")
    assert load_images([small, big], tiny_tokenizer()).shape[0] == 1
