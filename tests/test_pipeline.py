"""Pipelines: a generator and its tokenizers saved as one folder or Hub repository.

The pipeline under test pairs a tiny image tokenizer, the bundled text tokenizer and a
small untrained generator over both, so that every test runs in well under a second.
"""

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard
from PIL import Image

from mmtok import MmtokError, Pipeline, TokenSpace, load_model
from mmtok.cli import cli
from mmtok.generate import Generator
from mmtok.hub import push_folder
from mmtok.pipeline import INDEX_NAME, PipelineIndex
from mmtok_image import ImageTokenizer

RESOLUTION = 16  # a 16x16 image in an 8x8 grid of codes


def image_tokenizer(seed: int = 0, codebook_size: int = 8) -> ImageTokenizer:
    torch.manual_seed(seed)
    return ImageTokenizer(resolution=RESOLUTION, channels=[4, 8], latent_dim=4, codebook_size=codebook_size).eval()


@pytest.fixture
def generator_folder(tmp_path) -> Path:
    """A saved generator whose token space names a saved tiny image tokenizer and the bundled text one."""
    image_tokenizer().save_pretrained(tmp_path / "tiny-image")
    image = load_model(str(tmp_path / "tiny-image"))
    text = load_model("mmtok/text-tokenizer")
    space = TokenSpace(
        [
            {"modality": "image", "tokenizer": image.name_or_path, "tokenizer_hash": image.weights_hash(), "size": 8},
            {"modality": "text", "tokenizer": text.name_or_path, "tokenizer_hash": text.weights_hash(), "size": text.vocab_size},
        ]
    )
    torch.manual_seed(0)
    generator = Generator(
        token_space=space.to_config(),
        sequence_lengths={"image": 64, "text": 8},
        dim=16,
        depth=1,
        heads=2,
        layouts=[["image"], ["text"], ["text", "image"]],
    )
    generator.metrics = {"bits_per_token/image": 2.5}
    generator.save_pretrained(tmp_path / "generator")
    return tmp_path / "generator"


@pytest.fixture
def pipeline_folder(generator_folder, tmp_path) -> Path:
    Pipeline.from_generator(str(generator_folder)).save_pretrained(tmp_path / "pipeline")
    return tmp_path / "pipeline"


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


# Saving ----------------------------------------------------------------------------------


def test_save_layout(pipeline_folder):
    files = sorted(str(p.relative_to(pipeline_folder)) for p in pipeline_folder.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "generator/README.md",
        "generator/config.json",
        "generator/model.safetensors",
        "image-tokenizer/README.md",
        "image-tokenizer/config.json",
        "image-tokenizer/model.safetensors",
        "pipeline.json",
        "text-tokenizer/README.md",
        "text-tokenizer/config.json",
        "text-tokenizer/model.safetensors",
    ]


def test_save_writes_index(pipeline_folder):
    index = json.loads((pipeline_folder / INDEX_NAME).read_text())
    assert index == {
        "format": "mmtok-pipeline",
        "version": 1,
        "generator": "generator",
        "tokenizers": {"image": "image-tokenizer", "text": "text-tokenizer"},
        "mmtok_version": "0.1.0",
    }


def test_save_card_front_matter(pipeline_folder):
    metadata = ModelCard((pipeline_folder / "README.md").read_text()).data.to_dict()
    assert metadata["library_name"] == "mmtok"
    assert metadata["license"] == "apache-2.0"
    assert metadata["modality"] == ["image", "text"]
    assert metadata["tags"] == ["image", "masked-diffusion", "mmtok", "pipeline", "text"]


def test_save_card_lists_components(pipeline_folder):
    card = (pipeline_folder / "README.md").read_text()
    image = load_model(str(pipeline_folder / "image-tokenizer"))
    assert f"| `image-tokenizer` | ImageTokenizer" in card
    assert image.weights_hash() in card
    assert "| bits_per_token/image | 2.5 |" in card


def test_save_refuses_existing_folder(generator_folder, pipeline_folder):
    pipeline = Pipeline.from_generator(str(generator_folder))
    with pytest.raises(MmtokError, match="already exists"):
        pipeline.save_pretrained(pipeline_folder)


def test_save_force_replaces_only_pipelines(generator_folder, tmp_path):
    pipeline = Pipeline.from_generator(str(generator_folder))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(MmtokError, match="not a pipeline folder"):
        pipeline.save_pretrained(tmp_path / "notes", force=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_save_leaves_no_staging_folder(generator_folder, tmp_path):
    Pipeline.from_generator(str(generator_folder)).save_pretrained(tmp_path / "out")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]


# Loading ---------------------------------------------------------------------------------


def test_load_folder_matches_saved_models(generator_folder, pipeline_folder):
    pipeline = Pipeline.from_pretrained(pipeline_folder)
    generator = load_model(str(generator_folder))
    assert pipeline.generator.weights_hash() == generator.weights_hash()
    assert pipeline.modalities == ["image", "text"]
    assert pipeline.tokenizers["image"].name_or_path == f"{pipeline_folder}/image-tokenizer"


def test_load_bare_generator_uses_recorded_tokenizers(generator_folder):
    pipeline = Pipeline.from_pretrained(generator_folder)
    assert pipeline.tokenizers["text"].name_or_path == "mmtok/text-tokenizer"


def test_load_from_offline_cache(pipeline_folder, hub_cache):
    hub_cache.add("someone/tiny-pipeline", pipeline_folder)
    pipeline = Pipeline.from_pretrained("someone/tiny-pipeline")
    assert pipeline.tokenizers["image"].name_or_path == "someone/tiny-pipeline/image-tokenizer"


def test_load_from_hub_download(pipeline_folder, fake_hub, tmp_path):
    commit = fake_hub.add("someone/tiny-pipeline", pipeline_folder)
    Pipeline.from_pretrained("someone/tiny-pipeline", cache_dir=tmp_path / "cache")
    snapshot = tmp_path / "cache" / "models--someone--tiny-pipeline" / "snapshots" / commit
    assert (snapshot / "pipeline.json").is_file()
    assert (snapshot / "image-tokenizer" / "model.safetensors").is_file()
    assert (snapshot / "generator" / "model.safetensors").is_file()


def replace_image_tokenizer(pipeline_folder: Path, tokenizer: ImageTokenizer) -> None:
    folder = pipeline_folder / "image-tokenizer"
    for file in folder.iterdir():
        file.unlink()
    tokenizer.save_pretrained(folder)


def test_load_rejects_other_weights(pipeline_folder):
    trained_with = load_model(str(pipeline_folder / "image-tokenizer")).weights_hash()
    other = image_tokenizer(seed=1)
    replace_image_tokenizer(pipeline_folder, other)
    with pytest.raises(MmtokError) as caught:
        Pipeline.from_pretrained(pipeline_folder)
    assert f"has weights {other.weights_hash()}" in str(caught.value)
    assert f"weights {trained_with})" in str(caught.value)


def test_load_rejects_other_vocabulary(pipeline_folder):
    trained_with = load_model(str(pipeline_folder / "image-tokenizer")).weights_hash()
    other = image_tokenizer(codebook_size=16)
    replace_image_tokenizer(pipeline_folder, other)
    with pytest.raises(MmtokError) as caught:
        Pipeline.from_pretrained(pipeline_folder)
    assert f"has 16 image ids (weights {other.weights_hash()})" in str(caught.value)
    assert f"8 ids, weights {trained_with}" in str(caught.value)


def test_generate_command_rejects_other_weights(pipeline_folder, tmp_path):
    replace_image_tokenizer(pipeline_folder, image_tokenizer(seed=2))
    result = run("generate", "--model", str(pipeline_folder), "--modality", "image", "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 1
    assert "this generator was trained on image tokens" in result.output
    assert not (tmp_path / "x.png").exists()


def test_constructor_needs_every_modality(generator_folder):
    generator = load_model(str(generator_folder))
    image = load_model(str(generator_folder.parent / "tiny-image"))
    with pytest.raises(MmtokError, match="no tokenizer for text"):
        Pipeline(generator, {"image": image})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "diffusers"}, "not an mmtok pipeline index"),
        ({"version": 2}, "version 2 is not supported"),
        ({"generator": "../elsewhere"}, "relative subfolder"),
        ({"tokenizers": {}}, "'tokenizers' must map"),
        ({"tokenizers": {"image": "/abs"}}, "relative subfolder"),
    ],
)
def test_index_rejects_invalid(change, message):
    data = {"format": "mmtok-pipeline", "version": 1, "generator": "generator", "tokenizers": {"image": "image"}}
    data.update(change)
    with pytest.raises(MmtokError, match=message):
        PipelineIndex.from_json(data, "p/pipeline.json")


# Commands --------------------------------------------------------------------------------


def test_generate_command_from_folder(pipeline_folder, tmp_path):
    result = run("generate", "--model", str(pipeline_folder), "--modality", "image", "--steps", "2", "--seed", "1",
                 "-o", str(tmp_path / "out.png"))
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (RESOLUTION, RESOLUTION)


def test_generate_command_from_hub_cache(pipeline_folder, hub_cache, tmp_path):
    hub_cache.add("someone/tiny-pipeline", pipeline_folder)
    result = run("generate", "--model", "someone/tiny-pipeline", "--modality", "text", "--steps", "2",
                 "-o", str(tmp_path / "out.txt"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.txt").is_file()


def test_generate_command_untrained_modality(pipeline_folder, tmp_path):
    result = run("generate", "--model", str(pipeline_folder), "--modality", "audio", "-o", str(tmp_path / "a.wav"))
    assert result.exit_code == 1
    assert "was not trained for 'audio'; its modalities are image, text" in result.output


def test_export_command_writes_pipeline(generator_folder, tmp_path):
    result = run("export-pipeline", str(tmp_path / "exported"), "--model", str(generator_folder))
    assert result.exit_code == 0, result.output
    assert Pipeline.from_pretrained(tmp_path / "exported").modalities == ["image", "text"]


def test_export_command_refuses_overwrite(generator_folder, pipeline_folder):
    result = run("export-pipeline", str(pipeline_folder), "--model", str(generator_folder))
    assert result.exit_code == 1
    assert "--force" in result.output
    forced = run("export-pipeline", str(pipeline_folder), "--model", str(generator_folder), "--force")
    assert forced.exit_code == 0, forced.output


def test_export_command_checks_tokenizer_override(generator_folder, tmp_path):
    image_tokenizer(seed=3).save_pretrained(tmp_path / "other-image")
    result = run("export-pipeline", str(tmp_path / "exported"), "--model", str(generator_folder),
                 "--tokenizer", f"image={tmp_path / 'other-image'}")
    assert result.exit_code == 1
    assert "this generator was trained on image tokens" in result.output
    assert not (tmp_path / "exported").exists()


def test_export_command_bad_tokenizer_option(generator_folder, tmp_path):
    result = run("export-pipeline", str(tmp_path / "exported"), "--model", str(generator_folder), "--tokenizer", "image")
    assert result.exit_code == 2
    assert "MODALITY=NAME" in result.output


def test_info_command_describes_pipeline(pipeline_folder):
    result = run("info", str(pipeline_folder), "--json")
    assert result.exit_code == 0, result.output
    details = json.loads(result.output)
    assert details["kind"] == "pipeline"
    assert details["modality"] == ["image", "text"]
    assert list(details["components"]) == ["generator", "image-tokenizer", "text-tokenizer"]
    assert details["components"]["generator"]["architecture"].startswith("Masked-diffusion transformer: 1 ")
    assert details["components"]["image-tokenizer"]["vocab_size"] == 8
    total = sum(p.stat().st_size for p in pipeline_folder.rglob("*") if p.is_file())
    assert details["size_on_disk_bytes"] == total


def test_info_command_text_output(generator_folder):
    result = run("info", str(generator_folder))
    assert result.exit_code == 0, result.output
    assert "class: mmtok.generate.model.Generator" in result.output
    assert "architecture: Masked-diffusion transformer" in result.output
    assert "token_rate: image 64, text up to 8 tokens per sample" in result.output


# Push ------------------------------------------------------------------------------------


def test_push_commits_pipeline_files(pipeline_folder):
    operations = {}

    def create_commit(**kwargs):
        for operation in kwargs["operations"]:
            content = operation.path_or_fileobj
            operations[operation.path_in_repo] = content if isinstance(content, bytes) else Path(content).read_bytes()
        return mock.Mock(commit_url="https://hub.invalid/commit/3")

    with mock.patch("huggingface_hub.HfApi") as api_class:
        api_class.return_value.create_repo.return_value = mock.Mock(repo_id="me/pipe")
        api_class.return_value.create_commit.side_effect = create_commit
        push_folder(pipeline_folder, "me/pipe")
    expected = sorted(str(p.relative_to(pipeline_folder)) for p in pipeline_folder.rglob("*") if p.is_file())
    assert sorted(operations) == expected
    assert "mmtok generate --model me/pipe --modality image" in operations["README.md"].decode()
    assert 'load_model("me/pipe/image-tokenizer")' in operations["image-tokenizer/README.md"].decode()
    assert operations["generator/model.safetensors"] == (pipeline_folder / "generator" / "model.safetensors").read_bytes()
