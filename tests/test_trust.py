"""Tests that files from elsewhere cannot choose what mmtok loads or imports."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mmtok import MmtokError, api, load_model
from mmtok.cli import cli
from mmtok.tokens import Tokens

MARKER_MODULE = "mmtok_trust_probe"


def test_decode_refuses_tokenizer_named_by_token_file(tmp_path, notes):
    tokenizer = load_model("mmtok/text-tokenizer")
    folder = tmp_path / "copied-tokenizer"
    tokenizer.save_pretrained(folder)
    tokens = api.encode_file(notes, tokenizer=str(folder))
    tokens.save(tmp_path / "notes.mmtok")
    loaded = Tokens.load(tmp_path / "notes.mmtok")

    with pytest.raises(MmtokError, match="which is not bundled; pass it explicitly"):
        api.decode_tokens(loaded)
    decoded = api.decode_tokens(loaded, str(folder))
    assert decoded.data == notes.read_bytes().decode("utf-8")


def test_decode_loads_bundled_tokenizer_named_by_token_file(notes):
    tokens = api.encode_file(notes)
    assert api.decode_tokens(tokens).data == notes.read_bytes().decode("utf-8")


def test_load_model_refuses_unknown_module(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / f"{MARKER_MODULE}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\nclass Model:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = tmp_path / "model"
    load_model("mmtok/text-tokenizer").save_pretrained(model)
    config = json.loads((model / "config.json").read_text())
    config["mmtok_class"] = f"{MARKER_MODULE}.Model"
    (model / "config.json").write_text(json.dumps(config))

    with pytest.raises(MmtokError, match="belongs neither to mmtok nor to a loaded plugin"):
        load_model(str(model))
    assert not marker.exists()
    assert MARKER_MODULE not in sys.modules


def test_saved_weights_follow_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        load_model("mmtok/text-tokenizer").save_pretrained(tmp_path / "model")
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "config.json", "README.md"):
        assert stat.S_IMODE((tmp_path / "model" / name).stat().st_mode) == 0o644


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_cli_names_folder_input(tmp_path, command):
    folder = tmp_path / "pictures.png"
    folder.mkdir()
    result = CliRunner().invoke(cli, [command, str(folder)])
    assert result.exit_code == 1
    assert result.output.strip().endswith("pictures.png: is a folder, not a file")
