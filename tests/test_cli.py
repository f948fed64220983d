"""End-to-end tests of the mmtok command line on real files with the bundled models."""

import json
import subprocess
import sys

import pytest
import soundfile
import torch
from click.testing import CliRunner

from mmtok.cli import cli
from mmtok_image import ImageModality


def run(*args: str, input: bytes | None = None):
    result = CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
    return result


def test_encode_decode_audio(stereo_song, tmp_path):
    result = run("encode", str(stereo_song))
    assert result.exit_code == 0, result.output
    token_file = stereo_song.with_name("song.wav.mmtok")
    assert token_file.is_file()
    back = tmp_path / "back.wav"
    result = run("decode", str(token_file), "-o", str(back))
    assert result.exit_code == 0, result.output
    original = soundfile.info(stereo_song)
    decoded = soundfile.info(back)
    assert decoded.frames == original.frames
    assert decoded.samplerate == original.samplerate
    assert decoded.channels == original.channels


def test_decode_refuses_overwrite(speech, tmp_path):
    assert run("encode", str(speech), "-o", str(tmp_path / "s.mmtok")).exit_code == 0
    target = tmp_path / "exists.wav"
    target.write_bytes(b"keep me")
    result = run("decode", str(tmp_path / "s.mmtok"), "-o", str(target))
    assert result.exit_code == 1
    assert "--force" in result.output
    assert target.read_bytes() == b"keep me"
    assert run("decode", str(tmp_path / "s.mmtok"), "-o", str(target), "--force").exit_code == 0
    assert soundfile.info(target).frames == soundfile.info(speech).frames


def test_encode_decode_image(picture, tmp_path):
    assert run("encode", str(picture)).exit_code == 0
    back = tmp_path / "back.png"
    result = run("decode", str(picture) + ".mmtok", "-o", str(back))
    assert result.exit_code == 0, result.output
    original = ImageModality().read(picture).data
    decoded = ImageModality().read(back).data
    assert decoded.shape == original.shape


def test_encode_decode_text_exact(notes, tmp_path):
    assert run("encode", str(notes)).exit_code == 0
    back = tmp_path / "back.txt"
    assert run("decode", str(notes) + ".mmtok", "-o", str(back)).exit_code == 0
    assert back.read_bytes() == notes.read_bytes()


def test_encode_several_inputs_into_folder(picture, notes, speech, tmp_path):
    folder = tmp_path / "tokens"
    folder.mkdir()
    result = run("encode", str(picture), str(notes), str(speech), "-o", str(folder))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt.mmtok", "picture.png.mmtok", "speech.wav.mmtok"]


def test_encode_to_stdout(notes):
    result = CliRunner().invoke(cli, ["encode", str(notes), "-o", "-"])
    assert result.exit_code == 0
    assert result.stdout_bytes[8:9] == b"{"  # safetensors: 8-byte header length, then JSON


@pytest.mark.parametrize(
    "name, content",
    [("broken.png", b"\x89PNG\r\n\x1a\nbroken"), ("broken.wav", b"RIFF\x00\x00\x00\x00WAVEjunk"), ("empty.txt", b"")],
)
def test_corrupt_input_fails_cleanly(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    result = run("encode", str(path))
    assert result.exit_code == 1
    assert name in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / (name + ".mmtok")).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "table.xyz"
    path.write_bytes(b"1,2,3")
    result = run("encode", str(path))
    assert result.exit_code == 1
    assert "table.xyz: unsupported file type '.xyz'" in result.output


def test_decode_corrupt_token_file(tmp_path):
    path = tmp_path / "bad.mmtok"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    result = run("decode", str(path), "-o", str(tmp_path / "out.png"))
    assert result.exit_code == 1
    assert "bad.mmtok" in result.output
    assert not (tmp_path / "out.png").exists()


def test_decode_with_wrong_tokenizer(picture, tmp_path):
    assert run("encode", str(picture)).exit_code == 0
    result = run("decode", str(picture) + ".mmtok", "--tokenizer", "mmtok/text-tokenizer", "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 1
    assert "tokenizer for text" in result.output


def test_plugins_listing():
    result = run("plugins", "--json")
    assert result.exit_code == 0
    listing = {plugin["name"]: plugin for plugin in json.loads(result.output)}
    assert {"image", "audio", "text"} <= set(listing)
    assert listing["image"]["modalities"] == ["image"]
    assert listing["audio"]["version"] == "0.1.0"
    table = run("plugins").output
    for name in ("image", "audio", "text"):
        assert name in table


@pytest.mark.parametrize("modality, suffix", [("image", ".png"), ("audio", ".wav"), ("text", ".txt")])
def test_generate_each_modality(tmp_path, modality, suffix):
    output = tmp_path / f"out{suffix}"
    result = run("generate", "--modality", modality, "-o", str(output), "-n", "2", "--steps", "4", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert (tmp_path / f"out-1{suffix}").is_file()
    assert (tmp_path / f"out-2{suffix}").is_file()


def test_generate_seed_repeatable(tmp_path):
    for name in ("a.png", "b.png"):
        assert run("generate", "--modality", "image", "-o", str(tmp_path / name), "--steps", "4", "--seed", "7").exit_code == 0
    first = ImageModality().read(tmp_path / "a.png").data
    second = ImageModality().read(tmp_path / "b.png").data
    assert torch.equal(first, second)


def test_generate_with_prompt(tmp_path):
    output = tmp_path / "apple.png"
    result = run("generate", "--modality", "image", "--prompt", "food fruit apple", "-o", str(output), "--steps", "4")
    assert result.exit_code == 0, result.output
    assert ImageModality().read(output).data.shape[0] == 3


def test_generate_unknown_modality(tmp_path):
    result = run("generate", "--modality", "smell", "-o", str(tmp_path / "x"))
    assert result.exit_code == 1
    assert "unknown modality 'smell'" in result.output


def test_info_bundled_model():
    result = run("info", "mmtok/image-tokenizer", "--json")
    assert result.exit_code == 0, result.output
    details = json.loads(result.output)
    assert details["modality"] == "image"
    assert details["size_on_disk_bytes"] > 0
    assert "val_psnr_db" in details["metrics"]


def test_console_script_exit_codes(tmp_path):
    missing = tmp_path / "missing.png"
    process = subprocess.run([sys.executable, "-m", "mmtok.cli", "encode", str(missing)], capture_output=True, text=True)
    assert process.returncode == 1
    assert "missing.png: file not found" in process.stderr
    usage = subprocess.run([sys.executable, "-m", "mmtok.cli", "encode"], capture_output=True, text=True)
    assert usage.returncode == 2


def test_decode_adds_modality_suffix(picture, tmp_path):
    token_file = tmp_path / "photo.mmtok"
    assert run("encode", str(picture), "-o", str(token_file)).exit_code == 0
    result = run("decode", str(token_file))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "photo.decoded.png").is_file()


@pytest.mark.parametrize("name", ["back.png", "back", "back.TXT.png"])
def test_decode_rejects_output_suffix(notes, tmp_path, name):
    assert run("encode", str(notes), "-o", str(tmp_path / "notes.mmtok")).exit_code == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run("decode", str(tmp_path / "notes.mmtok"), "-o", str(tmp_path / name))
    assert result.exit_code == 1
    assert f"{name}: cannot write decoded text as" in result.output
    assert ".txt .md .text" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_decode_accepts_uppercase_output_suffix(notes, tmp_path):
    assert run("encode", str(notes), "-o", str(tmp_path / "notes.mmtok")).exit_code == 0
    result = run("decode", str(tmp_path / "notes.mmtok"), "-o", str(tmp_path / "back.TXT"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "back.TXT").read_bytes() == notes.read_bytes()


def test_decode_into_folder_adds_suffix(notes, tmp_path):
    assert run("encode", str(notes), "-o", str(tmp_path / "notes.mmtok")).exit_code == 0
    (tmp_path / "out").mkdir()
    result = run("decode", str(tmp_path / "notes.mmtok"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.decoded.txt"]


def test_decode_help_describes_output_suffix():
    result = run("decode", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # click wraps the help text
    assert "must have a suffix that the modality writes" in text
    assert "(photo.decoded.png)" in text


def test_generate_output_without_suffix(tmp_path):
    result = run("generate", "--modality", "text", "-o", str(tmp_path / "out"), "--steps", "2", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.txt").is_file()


def test_generate_guidance_needs_prompt(tmp_path):
    result = run("generate", "--modality", "image", "--guidance", "2", "-o", str(tmp_path / "g.png"))
    assert result.exit_code == 1
    assert "--prompt" in result.output
    assert not (tmp_path / "g.png").exists()


def test_same_names_into_folder_rejected(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "n.txt").write_text(f"text from {folder}")
    (tmp_path / "out").mkdir()
    result = run("encode", str(tmp_path / "a" / "n.txt"), str(tmp_path / "b" / "n.txt"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_model_folder(tmp_path):
    result = run("info", str(tmp_path / "nosuch"))
    assert result.exit_code == 1
    assert "nosuch" in result.output


def test_decode_rejects_inflated_audio_length(speech, tmp_path):
    from mmtok import Tokens

    assert run("encode", str(speech), "-o", str(tmp_path / "s.mmtok")).exit_code == 0
    tokens = Tokens.load(tmp_path / "s.mmtok")
    tokens.metadata["samples"] = 99_999_999_999
    tokens.save(tmp_path / "big.mmtok")
    result = run("decode", str(tmp_path / "big.mmtok"), "-o", str(tmp_path / "big.wav"))
    assert result.exit_code == 1
    assert "claims 99999999999 samples" in result.output
    assert not (tmp_path / "big.wav").exists()
