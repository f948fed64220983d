"""Tests of building generator examples from a data folder, with the token cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmtok.api import load_tokenizer
from mmtok.train.generator_data import build_examples
from conftest import draw_picture

CAPTIONS = ("a red circle", "a blue square", "a green line")
FORTUNES = ("Nothing is certain but change.", "Tabs\tand  spaces\nstay.")


@pytest.fixture
def data_folder(tmp_path: Path) -> Path:
    """Write an ``image`` folder of three captioned pictures and a ``text`` folder of two records."""
    (tmp_path / "image" / "train").mkdir(parents=True)
    (tmp_path / "text").mkdir()
    with (tmp_path / "image" / "train.jsonl").open("w") as handle:
        for index, caption in enumerate(CAPTIONS):
            draw_picture(tmp_path / "image" / "train" / f"{index}.png", size=(40 + 8 * index, 32))
            handle.write(json.dumps({"file": f"train/{index}.png", "caption": caption}) + "\n")
    with (tmp_path / "text" / "train.jsonl").open("w") as handle:
        for text in FORTUNES:
            handle.write(json.dumps({"text": text}) + "\n")
    return tmp_path


@pytest.fixture(scope="module")
def tokenizers():
    return {modality: load_tokenizer(f"mmtok/{modality}-tokenizer", modality) for modality in ("image", "text")}


def examples_for(data_folder: Path, tokenizers, cache_dir: Path | None):
    lengths = {modality: tokenizer.sequence_defaults()[0] for modality, tokenizer in tokenizers.items()}
    options = {modality: tokenizer.sequence_defaults()[1] for modality, tokenizer in tokenizers.items()}
    return build_examples(data_folder, "train", tokenizers, lengths, options, ["text"], cache_dir=cache_dir)


def flatten(examples) -> list[tuple[str, list[int]]]:
    return [(modality, ids.tolist()) for example in examples for modality, ids in example]


def test_build_examples_pairs_captions_with_images(data_folder, tokenizers):
    examples = examples_for(data_folder, tokenizers, None)
    text = tokenizers["text"]
    captioned = [example for example in examples if [m for m, _ in example] == ["text", "image"]]
    assert len(captioned) == len(CAPTIONS)
    first_caption = text.decode(text.make_tokens(text.from_sequence(captioned[0][0][1]), {})).data
    assert first_caption == CAPTIONS[0]
    assert all(ids.shape == (256,) for example in captioned for modality, ids in example if modality == "image")


def test_build_examples_adds_captioning_examples(data_folder, tokenizers):
    examples = examples_for(data_folder, tokenizers, None)
    given_caption = {tuple(example[1][1].tolist()): example[0][1].tolist() for example in examples if len(example) == 2 and example[0][0] == "text"}
    captioning = [example for example in examples if [m for m, _ in example] == ["image", "text"]]
    assert captioning
    assert all(given_caption[tuple(image.tolist())] == caption.tolist() for (_, image), (_, caption) in captioning)


def test_token_cache_gives_identical_examples(data_folder, tokenizers):
    cache_dir = data_folder / "cache"
    fresh = examples_for(data_folder, tokenizers, cache_dir)
    cache_files = sorted(path.name for path in cache_dir.iterdir())
    assert len(cache_files) == 2
    assert all(name.endswith(".safetensors") for name in cache_files)

    # Replace the pictures: a cached run must not read them again.
    for picture in (data_folder / "image" / "train").iterdir():
        picture.write_bytes(b"not a png")
    cached = examples_for(data_folder, tokenizers, cache_dir)
    assert flatten(cached) == flatten(fresh)


def test_token_cache_key_follows_manifest(data_folder, tokenizers):
    cache_dir = data_folder / "cache"
    examples_for(data_folder, tokenizers, cache_dir)
    with (data_folder / "text" / "train.jsonl").open("a") as handle:
        handle.write(json.dumps({"text": "One more record."}) + "\n")
    examples_for(data_folder, tokenizers, cache_dir)
    assert len(list(cache_dir.glob("text-train-*.safetensors"))) == 2


def test_unreadable_file_is_skipped_and_cached(data_folder, tokenizers):
    (data_folder / "image" / "train" / "1.png").write_bytes(b"broken")
    cache_dir = data_folder / "cache"
    fresh = examples_for(data_folder, tokenizers, cache_dir)
    cached = examples_for(data_folder, tokenizers, cache_dir)
    images = [example for example in fresh if example[-1][0] == "image"]
    assert len([example for example in images if example[0][0] == "text"]) == len(CAPTIONS) - 1
    assert flatten(cached) == flatten(fresh)
    assert torch.equal(fresh[0][0][1], cached[0][0][1])
