"""Tests of `mmtok eval generator` and conditional generation with the bundled pipeline.

The data folder contains real clip art that ``scripts/prepare_data.py`` puts in the held-out
split (the bundled generator never trained on it), with the captions that script makes.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mmtok.api import load_pipeline, read_sample
from mmtok.cli import cli
from mmtok.generate.evaluate import evaluate_generator

from conftest import OPENCLIPART, draw_picture, one_torch_thread, prepare_data_module

ITEMS = 48


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def held_out_folder(tmp_path_factory) -> Path:
    """Write image manifests of held-out clip art with captions, and a few fortunes."""
    if not OPENCLIPART.is_dir():
        pytest.skip("openclipart-png is not installed")
    prepare = prepare_data_module()
    sources = sorted(OPENCLIPART.rglob("*.png"))
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for source in sources:
        split = prepare.split_of(str(source), 0.05)
        if len(splits[split]) < ITEMS:
            splits[split].append({"file": str(source), "caption": prepare.clipart_caption(source, OPENCLIPART)})
        if all(len(rows) == ITEMS for rows in splits.values()):
            break
    folder = tmp_path_factory.mktemp("held-out")
    (folder / "image").mkdir()
    (folder / "text").mkdir()
    for split, rows in splits.items():
        (folder / "image" / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    fortunes = ["You will meet a tall dark stranger.", "Time flies like an arrow.\nFruit flies like a banana."]
    for split in splits:
        (folder / "text" / f"{split}.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in fortunes))
    return folder


@pytest.fixture(scope="module")
def pipeline():
    return load_pipeline("mmtok/generator")


@pytest.fixture(scope="module")
def scores(pipeline, held_out_folder):
    return {(score.target, score.condition): score for score in evaluate_generator(pipeline, held_out_folder, t_samples=4)}


def test_eval_scores_every_trained_order(scores):
    assert set(scores) == {("image", "none"), ("image", "text"), ("text", "image"), ("text", "none")}


def test_eval_caption_lowers_image_bits(scores):
    # Measured with the bundled generator: 6.45 bits per token alone and 6.39 given the
    # caption, a gain of 0.055.
    given = scores[("image", "text")]
    assert given.gain > 0.02
    assert given.alone_bits_per_token == pytest.approx(scores[("image", "none")].bits_per_token)


def test_eval_image_beats_unigram(scores):
    score = scores[("image", "none")]
    assert score.bits_per_token < score.unigram_bits_per_token - 0.5
    assert score.bits_per_token < math.log2(1024)


def test_eval_image_lowers_caption_bits(scores):
    # Measured: captions cost 3.42 bits per token alone and 2.29 given the image.
    assert scores[("text", "image")].gain > 0.3


def test_eval_masked_condition_close_to_alone(scores):
    # Guidance training teaches the masked condition to act as no condition.
    given = scores[("image", "text")]
    assert abs(given.masked_condition_bits_per_token - given.alone_bits_per_token) < 0.3


def test_eval_command_prints_json(held_out_folder):
    result = run("eval", "generator", str(held_out_folder), "--modalities", "text", "--t-samples", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [(row["target"], row["condition"]) for row in report["scores"]] == [("text", "none")]
    assert report["scores"][0]["gain"] is None


def test_eval_command_prints_gain_line(held_out_folder):
    result = run("eval", "generator", str(held_out_folder), "--modalities", "image", "--max-items", "8", "--t-samples", "1")
    assert result.exit_code == 0, result.output
    # The sign on 8 items and one diffusion time is noise; test_eval_caption_lowers_image_bits
    # checks the gain itself on more samples.
    assert re.search(r"^image given text: \d+\.\d{3} bits/token (fewer|more) than alone \(\d+\.\d%\)", result.output, re.M)


def test_eval_command_missing_folder(tmp_path):
    result = run("eval", "generator", str(tmp_path / "nowhere"))
    assert result.exit_code == 1
    assert "data folder not found" in result.output


def test_eval_command_folder_without_manifests(tmp_path):
    result = run("eval", "generator", str(tmp_path))
    assert result.exit_code == 1
    assert "no val.jsonl manifest" in result.output


# Conditional generation from files -------------------------------------------------------


def test_caption_image_from_python(pipeline, held_out_folder):
    row = json.loads((held_out_folder / "image" / "val.jsonl").read_text().splitlines()[0])
    _, image = read_sample(Path(row["file"]))
    captions = pipeline.generate("text", 4, conditions=[("image", image)], steps=8, seed=0)
    assert all(isinstance(caption.data, str) and caption.data for caption in captions)


def test_caption_command_writes_text(tmp_path):
    picture = draw_picture(tmp_path / "picture.png")
    result = run("generate", "--modality", "text", "--image", str(picture), "--steps", "8", "--seed", "0",
                 "-o", str(tmp_path / "caption.txt"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "caption.txt").read_text(encoding="utf-8")


def test_generate_untrained_order_names_trained_orders(tmp_path, speech):
    result = run("generate", "--modality", "image", "--audio", str(speech), "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 1
    assert "was not trained to generate audio then image" in result.output
    assert "text then image" in result.output
    assert not (tmp_path / "x.png").exists()


def test_guidance_changes_text_to_image(pipeline):
    plain = pipeline.generate("image", 2, prompt="animals bird", steps=8, seed=0)
    guided = pipeline.generate("image", 2, prompt="animals bird", guidance=3.0, steps=8, seed=0)
    assert not torch.equal(plain[0].data, guided[0].data)


def test_condition_option_takes_modality_prefix(tmp_path):
    picture = draw_picture(tmp_path / "picture.png")
    renamed = tmp_path / "picture.data"
    renamed.write_bytes(picture.read_bytes())
    result = run("generate", "--modality", "text", "--condition", f"image={renamed}", "--steps", "4", "--seed", "0",
                 "-o", str(tmp_path / "caption.txt"))
    assert result.exit_code == 0, result.output


def test_condition_option_unknown_suffix(tmp_path):
    (tmp_path / "picture.data").write_bytes(b"x")
    result = run("generate", "--modality", "text", "--condition", str(tmp_path / "picture.data"), "-o", str(tmp_path / "c.txt"))
    assert result.exit_code == 1
    assert "or write --condition MODALITY=FILE" in result.output


def test_eval_command_unknown_modality(held_out_folder):
    result = run("eval", "generator", str(held_out_folder), "--modalities", "video")
    assert result.exit_code == 1
    assert "the generator has no modality 'video'" in result.output


def test_condition_option_unknown_modality_prefix(tmp_path):
    picture = draw_picture(tmp_path / "picture.png")
    result = run("generate", "--modality", "text", "--condition", f"video={picture}", "-o", str(tmp_path / "c.txt"))
    assert result.exit_code == 1
    assert "unknown modality 'video'" in result.output


def test_eval_command_bad_manifest_row(tmp_path):
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "val.jsonl").write_text('{"file": 5}\n')
    result = run("eval", "generator", str(tmp_path))
    assert result.exit_code == 1
    assert "val.jsonl: row 1 needs a 'file' path or a 'text' string" in result.output
