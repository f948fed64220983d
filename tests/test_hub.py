"""Hub conventions: save/load, loading from the offline cache layout, and push."""

import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch

from mmtok import MmtokError, load_model
from mmtok.cli import cli
from mmtok.hub import push_folder
from mmtok_image import ImageTokenizer


def tiny_image_tokenizer() -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(resolution=16, channels=[4, 8], latent_dim=4, codebook_size=8).eval()


def test_save_layout_and_config(tmp_path):
    model = tiny_image_tokenizer()
    model.metrics = {"val_psnr_db": 12.5}
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["resolution"] == 16
    assert config["channels"] == [4, 8]
    assert config["mmtok_class"] == "mmtok_image.tokenizer.ImageTokenizer"
    card = (tmp_path / "m" / "README.md").read_text()
    assert "library_name: mmtok" in card
    assert "| val_psnr_db | 12.5 |" in card
    assert model.weights_hash() in card


def test_load_model_picks_class(tmp_path):
    model = tiny_image_tokenizer()
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert isinstance(loaded, ImageTokenizer)
    assert loaded.weights_hash() == model.weights_hash()
    assert not loaded.training


def test_no_pickle_fallback(tmp_path):
    model = tiny_image_tokenizer()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(MmtokError, match="model.safetensors not found"):
        ImageTokenizer.from_pretrained(tmp_path / "m")


def test_wrong_weights_rejected(tmp_path):
    tiny_image_tokenizer().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["codebook_size"] = 16
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(MmtokError, match="invalid weights"):
        ImageTokenizer.from_pretrained(tmp_path / "m")


def make_cache(cache: Path, repo_id: str, source: Path, subfolder: str = "") -> None:
    """Lay out a model as huggingface_hub's cache does: refs/main and a snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit / subfolder
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        shutil.copy(file, snapshot / file.name)


def test_load_from_offline_cache(tmp_path, monkeypatch):
    model = tiny_image_tokenizer()
    model.save_pretrained(tmp_path / "saved")
    make_cache(tmp_path / "cache", "someone/tiny-image", tmp_path / "saved")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = ImageTokenizer.from_pretrained("someone/tiny-image", cache_dir=tmp_path / "cache")
    assert loaded.weights_hash() == model.weights_hash()
    assert loaded.name_or_path == "someone/tiny-image"


def test_load_subfolder_from_cache(tmp_path, monkeypatch):
    model = tiny_image_tokenizer()
    model.save_pretrained(tmp_path / "saved")
    make_cache(tmp_path / "cache", "someone/pipeline", tmp_path / "saved", subfolder="image")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = ImageTokenizer.from_pretrained(
        "someone/pipeline", subfolder="image", cache_dir=tmp_path / "cache", local_files_only=True
    )
    assert loaded.weights_hash() == model.weights_hash()


def test_missing_repo_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MmtokError, match="someone/absent"):
        load_model("someone/absent", cache_dir=tmp_path / "empty-cache")


def test_push_uploads_exact_files(tmp_path):
    model = tiny_image_tokenizer()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "checkpoint").mkdir()
    (tmp_path / "m" / "checkpoint" / "trainer_state.safetensors").write_bytes(b"x")
    uploaded = {}

    def upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        ignored = kwargs["ignore_patterns"]
        uploaded["files"] = sorted(
            str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and not any(p.relative_to(folder).match(pattern) for pattern in ignored)
        )
        uploaded["card"] = (folder / "README.md").read_text()
        uploaded["revision"] = kwargs["revision"]
        return mock.Mock(commit_url="https://hub.invalid/commit/1")

    with mock.patch("huggingface_hub.HfApi") as api_class:
        api = api_class.return_value
        api.create_repo.return_value = mock.Mock(repo_id="me/tiny")
        api.upload_folder.side_effect = upload_folder
        url = push_folder(tmp_path / "m", "me/tiny", private=True, revision="dev")
    assert url == "https://hub.invalid/commit/1"
    api.create_repo.assert_called_once_with(repo_id="me/tiny", private=True, exist_ok=True)
    api.create_branch.assert_called_once_with(repo_id="me/tiny", branch="dev", exist_ok=True)
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors"]
    assert uploaded["revision"] == "dev"
    assert "library_name: mmtok" in uploaded["card"]


def test_push_command_rejects_non_model(tmp_path):
    from click.testing import CliRunner

    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["push", str(tmp_path / "empty"), "me/x"])
    assert result.exit_code == 1
    assert "no config.json" in result.output


def test_mixin_push_to_hub_uses_safetensors(tmp_path):
    model = tiny_image_tokenizer()
    seen = {}

    def upload_folder(**kwargs):
        seen["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        return "https://hub.invalid/commit/2"

    with mock.patch("huggingface_hub.hub_mixin.HfApi") as api_class:
        api_class.return_value.create_repo.return_value = mock.Mock(repo_id="me/tiny")
        api_class.return_value.upload_folder.side_effect = upload_folder
        model.push_to_hub("me/tiny")
    assert seen["files"] == ["README.md", "config.json", "model.safetensors"]
