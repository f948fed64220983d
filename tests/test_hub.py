"""Hub conventions: save/load, download into the cache, offline loading, cards and push.

Downloads go through huggingface_hub itself, against a loopback server that responds like
the Hub (the ``fake_hub`` fixture), or read a cache laid out as huggingface_hub lays it
out (the ``hub_cache`` fixture). Push replaces ``HfApi`` at its boundary and records the
commit it would make.
"""

import json
import traceback
from pathlib import Path
from unittest import mock

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard

from mmtok import MmtokError, load_model
from mmtok.cli import cli
from mmtok.hub import push_folder, split_hub_name, upload_plan
from mmtok_image import ImageTokenizer


def tiny_image_tokenizer(seed: int = 0) -> ImageTokenizer:
    torch.manual_seed(seed)
    return ImageTokenizer(resolution=16, channels=[4, 8], latent_dim=4, codebook_size=8).eval()


@pytest.fixture
def saved(tmp_path) -> tuple[ImageTokenizer, Path]:
    model = tiny_image_tokenizer()
    model.metrics = {"val_psnr_db": 12.5, "val_codebook_usage": 0.75}
    model.training_note = "Trained for 3 steps on two pictures."
    model.save_pretrained(tmp_path / "saved")
    return model, tmp_path / "saved"


# Local folders ---------------------------------------------------------------------------


def test_save_layout_and_config(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["resolution"] == 16
    assert config["channels"] == [4, 8]
    assert config["mmtok_class"] == "mmtok_image.tokenizer.ImageTokenizer"
    assert config["metrics"] == {"val_psnr_db": 12.5, "val_codebook_usage": 0.75}


def test_load_model_picks_class(saved):
    model, folder = saved
    loaded = load_model(str(folder))
    assert isinstance(loaded, ImageTokenizer)
    assert loaded.weights_hash() == model.weights_hash()
    assert not loaded.training
    assert loaded.metrics == model.metrics


def test_load_subfolder_of_local_folder(saved, tmp_path):
    _, folder = saved
    folder.rename(tmp_path / "inner")
    (tmp_path / "outer").mkdir()
    (tmp_path / "inner").rename(tmp_path / "outer" / "image")
    loaded = ImageTokenizer.from_pretrained(tmp_path / "outer", subfolder="image")
    assert loaded.name_or_path == f"{tmp_path / 'outer'}/image"


def test_no_pickle_fallback(saved):
    model, folder = saved
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(MmtokError, match="model.safetensors not found"):
        ImageTokenizer.from_pretrained(folder)


def test_wrong_weights_rejected(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["codebook_size"] = 16
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MmtokError, match="invalid weights"):
        ImageTokenizer.from_pretrained(folder)


def test_missing_local_path_names_it(tmp_path):
    with pytest.raises(MmtokError, match="no such folder"):
        load_model(str(tmp_path / "absent"))


@pytest.mark.parametrize(
    "name, subfolder, expected",
    [
        ("owner/repo", None, ("owner/repo", None)),
        ("owner/repo", "image", ("owner/repo", "image")),
        ("owner/repo/image-tokenizer", None, ("owner/repo", "image-tokenizer")),
        ("owner/repo/a/b", "c", ("owner/repo", "a/b/c")),
        ("/abs/path/x", None, ("/abs/path/x", None)),
    ],
)
def test_split_hub_name(name, subfolder, expected):
    assert split_hub_name(name, subfolder) == expected


# The Hub, over loopback -------------------------------------------------------------------


def test_download_from_hub_fills_cache(saved, fake_hub, tmp_path):
    model, folder = saved
    commit = fake_hub.add("someone/tiny-image", folder)
    loaded = ImageTokenizer.from_pretrained("someone/tiny-image", cache_dir=tmp_path / "cache")
    assert loaded.weights_hash() == model.weights_hash()
    assert loaded.name_or_path == "someone/tiny-image"
    repo = tmp_path / "cache" / "models--someone--tiny-image"
    assert (repo / "refs" / "main").read_text() == commit
    assert (repo / "snapshots" / commit / "config.json").is_file()
    assert (repo / "snapshots" / commit / "model.safetensors").is_file()


def test_download_then_load_offline(saved, fake_hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    model, folder = saved
    fake_hub.add("someone/tiny-image", folder)
    load_model("someone/tiny-image", cache_dir=tmp_path / "cache")
    fake_hub.stop()
    seen = len(fake_hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = load_model("someone/tiny-image", cache_dir=tmp_path / "cache")
    assert loaded.weights_hash() == model.weights_hash()
    assert len(fake_hub.requests) == seen


def test_download_by_commit_hash(saved, fake_hub, tmp_path):
    model, folder = saved
    commit = fake_hub.add("someone/tiny-image", folder)
    loaded = load_model("someone/tiny-image", revision=commit, cache_dir=tmp_path / "cache")
    assert loaded.weights_hash() == model.weights_hash()


def test_download_unknown_revision(saved, fake_hub, tmp_path):
    fake_hub.add("someone/tiny-image", saved[1])
    with pytest.raises(MmtokError, match="revision 'v9' not found"):
        load_model("someone/tiny-image", revision="v9", cache_dir=tmp_path / "cache")


def test_download_unknown_repository(fake_hub, tmp_path):
    with pytest.raises(MmtokError, match="repository 'someone/absent' not found"):
        load_model("someone/absent", cache_dir=tmp_path / "cache")


def test_download_repository_without_weights(saved, fake_hub, tmp_path):
    _, folder = saved
    (folder / "model.safetensors").unlink()
    fake_hub.add("someone/no-weights", folder)
    with pytest.raises(MmtokError, match="model.safetensors not found in the Hub repository"):
        load_model("someone/no-weights", cache_dir=tmp_path / "cache")


def test_info_reports_downloaded_size(saved, fake_hub, hub_cache):
    model, folder = saved
    fake_hub.add("someone/tiny-image", folder)
    result = CliRunner().invoke(cli, ["info", "someone/tiny-image", "--json"])
    assert result.exit_code == 0, result.output
    details = json.loads(result.output)
    weights = (folder / "model.safetensors").stat().st_size + (folder / "config.json").stat().st_size
    assert details["size_on_disk_bytes"] == weights
    assert details["weights_hash"] == model.weights_hash()


# The offline cache ------------------------------------------------------------------------


def test_load_from_offline_cache(saved, hub_cache):
    model, folder = saved
    hub_cache.add("someone/tiny-image", folder)
    loaded = ImageTokenizer.from_pretrained("someone/tiny-image")
    assert loaded.weights_hash() == model.weights_hash()
    assert loaded.name_or_path == "someone/tiny-image"


def test_load_from_explicit_cache_dir(saved, tmp_path, hub_cache):
    model, folder = saved
    type(hub_cache)(tmp_path / "elsewhere").add("someone/tiny-image", folder)
    loaded = load_model("someone/tiny-image", cache_dir=tmp_path / "elsewhere", local_files_only=True)
    assert loaded.weights_hash() == model.weights_hash()


def test_load_branch_from_offline_cache(saved, hub_cache):
    model, folder = saved
    other = tiny_image_tokenizer(seed=1)
    other.save_pretrained(folder.parent / "other")
    hub_cache.add("someone/tiny-image", folder)
    hub_cache.add("someone/tiny-image", folder.parent / "other", branch="dev", commit="f" * 40)
    assert load_model("someone/tiny-image").weights_hash() == model.weights_hash()
    assert load_model("someone/tiny-image", revision="dev").weights_hash() == other.weights_hash()
    assert load_model("someone/tiny-image", revision="f" * 40).weights_hash() == other.weights_hash()


def test_load_subfolder_from_cache(saved, tmp_path, hub_cache):
    model, folder = saved
    (tmp_path / "repo").mkdir()
    folder.rename(tmp_path / "repo" / "image")
    hub_cache.add("someone/pipeline", tmp_path / "repo")
    by_argument = ImageTokenizer.from_pretrained("someone/pipeline", subfolder="image", local_files_only=True)
    by_name = load_model("someone/pipeline/image")
    assert by_argument.weights_hash() == model.weights_hash()
    assert by_name.weights_hash() == model.weights_hash()
    assert by_argument.name_or_path == "someone/pipeline/image"


def test_missing_repo_offline(hub_cache):
    with pytest.raises(MmtokError, match="someone/absent: not a folder or a bundled model name, and config.json is not in the Hub cache.*HF_HUB_OFFLINE"):
        load_model("someone/absent")


def test_missing_revision_offline(saved, hub_cache):
    hub_cache.add("someone/tiny-image", saved[1])
    with pytest.raises(MmtokError, match="not in the Hub cache"):
        load_model("someone/tiny-image", revision="dev")


def test_offline_miss_hides_hub_error(hub_cache):
    with pytest.raises(MmtokError) as caught:
        load_model("someone/absent")
    error = caught.value
    assert error.__cause__ is None
    assert error.__suppress_context__
    shown = "".join(traceback.format_exception(error))
    assert "LocalEntryNotFoundError" not in shown
    assert "check your connection" not in shown
    assert "offline mode (HF_HUB_OFFLINE) is on" in str(error)


def test_local_files_only_miss_says_so(fake_hub, tmp_path):
    with pytest.raises(MmtokError, match="config.json is not in the Hub cache .*; local_files_only is set$") as caught:
        load_model("someone/absent", cache_dir=tmp_path / "cache", local_files_only=True)
    assert caught.value.__cause__ is None
    assert fake_hub.requests == []


def test_failed_lookup_keeps_its_reason(fake_hub, tmp_path, monkeypatch):
    # A response without the commit and ETag headers fails at once, where a stopped
    # server would make huggingface_hub retry for about 20 s before giving up.
    def respond_bare(handler, send_body):
        handler.send_response(200)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    monkeypatch.setattr(fake_hub, "respond", respond_bare)
    with pytest.raises(MmtokError, match="config.json is not in the Hub cache .*; looking it up on the Hub failed") as caught:
        load_model("someone/absent", cache_dir=tmp_path / "cache")
    error = caught.value
    assert "FileMetadataError" in str(error)
    assert error.__cause__ is None
    assert error.__suppress_context__


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("someone/absent", {}, "repository 'someone/absent' not found"),
        ("someone/tiny-image", {"revision": "v9"}, "revision 'v9' not found"),
        ("someone/tiny-image/nested", {}, "config.json not found in the Hub repository"),
    ],
)
def test_hub_not_found_errors_hide_chain(saved, fake_hub, tmp_path, name, options, message):
    fake_hub.add("someone/tiny-image", saved[1])
    with pytest.raises(MmtokError, match=message) as caught:
        load_model(name, cache_dir=tmp_path / "cache", **options)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


# Model cards ------------------------------------------------------------------------------


def test_card_front_matter(saved):
    _, folder = saved
    card = ModelCard((folder / "README.md").read_text())
    metadata = card.data.to_dict()
    assert metadata["library_name"] == "mmtok"
    assert metadata["license"] == "apache-2.0"
    assert metadata["modality"] == "image"
    assert metadata["tags"] == ["image", "mmtok", "tokenizer", "vq"]


def test_card_body_has_stored_metrics(saved):
    model, folder = saved
    card = (folder / "README.md").read_text()
    assert "| val_psnr_db | 12.5 |" in card
    assert "| val_codebook_usage | 0.75 |" in card
    assert model.weights_hash() in card
    assert "Trained for 3 steps on two pictures." in card


def test_card_without_metrics_says_so(tmp_path):
    tiny_image_tokenizer().save_pretrained(tmp_path / "m")
    assert "No metrics recorded" in (tmp_path / "m" / "README.md").read_text()


def test_card_license_follows_class(tmp_path):
    class LicensedTokenizer(ImageTokenizer):
        card_license = "mit"

    card = LicensedTokenizer(resolution=16, channels=[4, 8], latent_dim=4, codebook_size=8).generate_model_card()
    assert card.data.to_dict()["license"] == "mit"


def test_generator_card_front_matter(tmp_path):
    from mmtok import load_model as load

    generator = load("mmtok/generator")
    metadata = generator.generate_model_card().data.to_dict()
    assert metadata["library_name"] == "mmtok"
    assert metadata["modality"] == ["image", "audio", "text"]
    assert "masked-diffusion" in metadata["tags"]


# Push ------------------------------------------------------------------------------------


class RecordingApi:
    """Stands in for huggingface_hub.HfApi and records the calls a push makes."""

    last = None

    def __init__(self, token=None):
        self.calls = []
        self.operations = {}
        RecordingApi.last = self

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return mock.Mock(repo_id=kwargs["repo_id"])

    def create_branch(self, **kwargs):
        self.calls.append(("create_branch", kwargs))

    def create_commit(self, **kwargs):
        self.calls.append(("create_commit", {k: v for k, v in kwargs.items() if k != "operations"}))
        for operation in kwargs["operations"]:
            content = operation.path_or_fileobj
            self.operations[operation.path_in_repo] = content if isinstance(content, bytes) else Path(content).read_bytes()
        return mock.Mock(commit_url=f"https://hub.invalid/{kwargs['repo_id']}/commit/1")


@pytest.fixture
def recording_api():
    RecordingApi.last = None
    with mock.patch("huggingface_hub.HfApi", RecordingApi):
        yield RecordingApi


def test_push_commits_exact_files(saved, recording_api):
    _, folder = saved
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / "trainer_state.safetensors").write_bytes(b"x")
    (folder / ".DS_Store").write_bytes(b"x")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    url = push_folder(folder, "me/tiny")
    api = recording_api.last
    assert url == "https://hub.invalid/me/tiny/commit/1"
    assert sorted(api.operations) == ["README.md", "config.json", "model.safetensors"]
    assert api.operations["model.safetensors"] == (folder / "model.safetensors").read_bytes()


def test_push_card_names_repository(saved, recording_api):
    model, folder = saved
    push_folder(folder, "me/tiny")
    card = recording_api.last.operations["README.md"].decode()
    assert ModelCard(card).data.to_dict()["library_name"] == "mmtok"
    assert 'load_model("me/tiny")' in card
    assert "PATH_OR_REPO_ID" not in card
    assert "| val_psnr_db | 12.5 |" in card
    assert model.weights_hash() in card


def test_push_private_to_branch(saved, recording_api):
    push_folder(saved[1], "me/tiny", private=True, revision="dev", commit_message="first")
    calls = recording_api.last.calls
    assert calls[0] == ("create_repo", {"repo_id": "me/tiny", "private": True, "exist_ok": True})
    assert calls[1] == ("create_branch", {"repo_id": "me/tiny", "branch": "dev", "exist_ok": True})
    assert calls[2] == ("create_commit", {"repo_id": "me/tiny", "commit_message": "first", "revision": "dev"})


def test_push_command(saved, recording_api):
    result = CliRunner().invoke(cli, ["push", str(saved[1]), "me/tiny", "--private", "--revision", "dev"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "https://hub.invalid/me/tiny/commit/1"
    assert recording_api.last.calls[0][1]["private"] is True


def test_push_command_rejects_non_model(tmp_path, recording_api):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["push", str(tmp_path / "empty"), "me/x"])
    assert result.exit_code == 1
    assert "neither config.json nor the pipeline index" in result.output
    assert recording_api.last is None


def test_upload_plan_keeps_extra_files(saved):
    _, folder = saved
    (folder / "samples").mkdir()
    (folder / "samples" / "a.png").write_bytes(b"png")
    assert list(upload_plan(folder, "me/tiny")) == ["README.md", "config.json", "model.safetensors", "samples/a.png"]


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
