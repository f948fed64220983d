"""Tests of infilling: regions to token masks, the generator's infill, and `mmtok inpaint`."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch
from click.testing import CliRunner
from PIL import Image

from mmtok import MmtokError, Sample, load_model
from mmtok.api import load_pipeline, read_sample
from mmtok.cli import cli

from conftest import draw_picture


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def pipeline():
    return load_pipeline("mmtok/generator")


@pytest.fixture(scope="module")
def image_tokenizer():
    return load_model("mmtok/image-tokenizer")


def image_sample(width: int, height: int) -> Sample:
    return Sample(torch.rand(3, height, width), {"width": width, "height": height})


# Regions to token masks ----------------------------------------------------------------


def test_image_box_maps_to_grid_cells(image_tokenizer):
    # A square image fills the 64-pixel square, so each code covers 4x4 of its pixels.
    tokens = image_tokenizer.encode(image_sample(64, 64))
    mask = image_tokenizer.region_mask(tokens, (8, 16, 24, 17)).reshape(16, 16)
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:5, 2:6] = True
    assert torch.equal(mask, expected)


def test_image_box_follows_fit_letterbox(image_tokenizer):
    # 128x64 is fitted to 64x32, centred at rows 16-47. Its left half is columns 0-7.
    tokens = image_tokenizer.encode(image_sample(128, 64))
    mask = image_tokenizer.region_mask(tokens, (0, 0, 64, 64)).reshape(16, 16)
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:12, 0:8] = True
    assert torch.equal(mask, expected)


def test_image_box_follows_crop(image_tokenizer):
    # The centred 64x64 square of a 128x64 image spans x 32-95; a box left of it misses it.
    tokens = image_tokenizer.encode(image_sample(128, 64), resize="crop")
    mask = image_tokenizer.region_mask(tokens, (32, 0, 40, 8)).reshape(16, 16)
    assert mask.nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    with pytest.raises(MmtokError, match="outside the encoded centre square"):
        image_tokenizer.region_mask(tokens, (0, 0, 16, 16))


def test_image_box_outside_image_rejected(image_tokenizer):
    tokens = image_tokenizer.encode(image_sample(64, 64))
    with pytest.raises(MmtokError, match="does not lie inside the 64x64 image"):
        image_tokenizer.region_mask(tokens, (10, 10, 80, 20))


def test_image_merge_keeps_pixels_outside_box(image_tokenizer):
    original, generated = image_sample(40, 30), image_sample(40, 30)
    merged = image_tokenizer.merge_region(original, generated, (5, 6, 20, 16)).data
    inside = torch.zeros(30, 40, dtype=torch.bool)
    inside[6:16, 5:20] = True
    assert torch.equal(merged[:, ~inside], original.data[:, ~inside])
    assert torch.equal(merged[:, inside], generated.data[:, inside])


def test_audio_span_maps_to_frames(pipeline):
    tokenizer = pipeline.tokenizers["audio"]
    sample = Sample(torch.zeros(1, 16000), {"sample_rate": 16000})
    tokens = tokenizer.encode(sample)
    mask = tokenizer.region_mask(tokens, (0.1, 0.2), levels=2).reshape(-1, 2)
    # 50 frames per second: the span covers frames 5 to 9, every level.
    assert mask.all(1).nonzero()[:, 0].tolist() == [5, 6, 7, 8, 9]
    assert int(mask.sum()) == 10


def test_audio_span_past_end_rejected(pipeline):
    tokenizer = pipeline.tokenizers["audio"]
    tokens = tokenizer.encode(Sample(torch.zeros(1, 8000), {"sample_rate": 16000}))
    with pytest.raises(MmtokError, match="does not lie inside the 0.500 s"):
        tokenizer.region_mask(tokens, (0.2, 0.9))


def test_text_span_maps_to_tokens(pipeline):
    tokenizer = pipeline.tokenizers["text"]
    text = "café naïve 中文 end"
    tokens = tokenizer.encode(Sample(text))
    mask = tokenizer.region_mask(tokens, (5, 10))
    spans = tokenizer.token_byte_spans(tokens.codes)
    chosen = tokenizer.decode_text(tokens.codes[mask])  # the chosen ids are contiguous
    assert "naïve" in chosen
    assert not chosen.startswith("café")
    assert spans[-1][1] == len(text.encode("utf-8"))


# The generator's infill ------------------------------------------------------------------


def test_text_infill_middle_keeps_length(pipeline):
    text = pipeline.tokenizers["text"]
    ids = text.encode(Sample("One two three four five six seven.")).codes
    keep = torch.ones(len(ids), dtype=torch.bool)
    keep[3:6] = False
    results = pipeline.generator.infill([("text", ids)], [keep], n=8, steps=4, seed=0)
    for (result,) in results:
        assert len(result) == len(ids)
        assert torch.equal(result[keep], ids[keep])


def test_text_infill_end_changes_length(pipeline):
    text = pipeline.tokenizers["text"]
    ids = text.encode(Sample("One two three four five six seven.")).codes
    keep = torch.ones(len(ids), dtype=torch.bool)
    keep[-3:] = False
    results = pipeline.generator.infill([("text", ids)], [keep], n=8, steps=8, seed=0)
    assert all(torch.equal(result[: len(ids) - 3], ids[:-3]) for (result,) in results)


# Pipeline and command line ---------------------------------------------------------------


def test_inpaint_image_changes_only_the_box(pipeline, tmp_path):
    path = draw_picture(tmp_path / "picture.png", size=(96, 72))
    _, sample = read_sample(path)
    (result,) = pipeline.inpaint("image", sample, (24, 16, 72, 56), steps=8, seed=0)
    inside = torch.zeros(72, 96, dtype=torch.bool)
    inside[16:56, 24:72] = True
    assert result.data.shape == sample.data.shape
    assert torch.equal(result.data[:, ~inside], sample.data[:, ~inside])
    assert not torch.equal(result.data[:, inside], sample.data[:, inside])


def test_inpaint_text_keeps_text_outside_span(pipeline):
    text = "A journey of a thousand miles begins with a single step."
    results = pipeline.inpaint("text", Sample(text), (13, 21), n=4, steps=8, seed=0)
    for result in results:
        assert result.data.startswith("A journey of")
        assert result.data.endswith(" miles begins with a single step.")


@pytest.mark.parametrize("span", [(10, 25), (60, 70), (3, 9), (0, 5), (60, 71)])
def test_inpaint_text_span_cutting_tokens(pipeline, span):
    # These spans start or end inside a token, which is regenerated whole.
    text = "The early bird catches the worm, but the second mouse gets the cheese.\n"
    start, end = span
    for result in pipeline.inpaint("text", Sample(text), span, n=3, steps=8, seed=0):
        assert result.data.startswith(text[:start])
        assert result.data.endswith(text[end:])


def test_inpaint_audio_shorter_than_segment(pipeline):
    # 0.3 s is shorter than the generator's 1.28 s segment; the rest is generated and dropped.
    rate = 16000
    time = torch.arange(int(0.3 * rate)) / rate
    sample = Sample((0.2 * torch.sin(2 * torch.pi * 220 * time))[None], {"sample_rate": rate})
    (result,) = pipeline.inpaint("audio", sample, (0.1, 0.2), steps=4, seed=0)
    assert result.data.shape == sample.data.shape
    assert torch.equal(result.data[:, : int(0.1 * rate)], sample.data[:, : int(0.1 * rate)])


def test_inpaint_long_audio_keeps_outside(pipeline, speech):
    _, sample = read_sample(speech)
    seconds = sample.data.shape[1] / sample.metadata["sample_rate"]
    assert seconds > 2  # longer than the generator's 1.28 s segment, so a window is infilled
    (result,) = pipeline.inpaint("audio", sample, (1.5, 1.8), steps=8, seed=0)
    rate = sample.metadata["sample_rate"]
    start, end = int(1.5 * rate), int(1.8 * rate) + 1
    assert result.data.shape == sample.data.shape
    assert torch.equal(result.data[:, :start], sample.data[:, :start].float())
    assert torch.equal(result.data[:, end:], sample.data[:, end:].float())
    assert not torch.allclose(result.data[:, start:end], sample.data[:, start:end].float())


def test_inpaint_command_writes_image(tmp_path):
    path = draw_picture(tmp_path / "picture.png", size=(64, 64))
    result = run("inpaint", str(path), "--box", "16,16,48,48", "--steps", "4", "--seed", "0", "-o", str(tmp_path / "out.png"))
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (64, 64)


def test_inpaint_command_box_outside_image(tmp_path):
    path = draw_picture(tmp_path / "picture.png", size=(64, 64))
    result = run("inpaint", str(path), "--box", "16,16,80,48", "-o", str(tmp_path / "out.png"))
    assert result.exit_code == 1
    assert "does not lie inside the 64x64 image" in result.output
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("arguments", [[], ["--box", "1,2,3"], ["--box", "1,2,3,nan"]])
def test_inpaint_command_bad_region(tmp_path, arguments):
    path = draw_picture(tmp_path / "picture.png", size=(64, 64))
    result = run("inpaint", str(path), *arguments)
    assert result.exit_code == 2


def test_inpaint_command_span_on_image(tmp_path):
    path = draw_picture(tmp_path / "picture.png", size=(64, 64))
    result = run("inpaint", str(path), "--span", "0,1")
    assert result.exit_code == 1
    assert "use --box for images" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_inpaint_command_span_too_long(tmp_path, speech):
    result = run("inpaint", str(speech), "--span", "0,2", "-o", str(tmp_path / "out.wav"))
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {speech}: the region is too large")
    assert "(1.28 s of audio)" in result.output
    assert not (tmp_path / "out.wav").exists()


def test_inpaint_command_writes_audio(tmp_path, speech):
    result = run("inpaint", str(speech), "--span", "0.2,0.6", "--steps", "4", "--seed", "0", "-o", str(tmp_path / "out.wav"))
    assert result.exit_code == 0, result.output
    original, rate = soundfile.read(speech, dtype="float32")
    infilled, infilled_rate = soundfile.read(tmp_path / "out.wav", dtype="float32")
    assert infilled_rate == rate
    assert infilled.shape == original.shape
    assert np.abs(infilled[: int(0.19 * rate)] - original[: int(0.19 * rate)]).max() < 1e-4


def test_inpaint_command_box_and_span_together(tmp_path):
    path = draw_picture(tmp_path / "picture.png", size=(64, 64))
    result = run("inpaint", str(path), "--box", "0,0,8,8", "--span", "0,1")
    assert result.exit_code == 2
    assert "not both" in result.output
