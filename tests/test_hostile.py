"""A corpus of broken and hostile inputs, each of which must fail with one clear line.

Every case must end in an error that names the file and the problem. Python raises
``MmtokError``. The command line prints one ``error:`` line, exits with code 1, shows no
traceback unless ``--debug`` is given, and leaves no output file, not even a temporary one.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import safetensors.torch
import soundfile
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import draw_picture
from mmtok import api
from mmtok.cli import cli
from mmtok.encode_dataset import encode_dataset
from mmtok.errors import MmtokError
from mmtok.tokens import Tokens

# Media files --------------------------------------------------------------------------------


def image_bytes(image_format: str, size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, image_format)
    return buffer.getvalue()


def audio_bytes(audio_format: str, subtype: str | None = None, seconds: float = 1.0, rate: int = 16000) -> bytes:
    time = np.arange(int(seconds * rate), dtype=np.float32) / rate
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.3 * np.sin(2 * np.pi * 440 * time), rate, format=audio_format, subtype=subtype)
    return buffer.getvalue()


def midi_bytes() -> bytes:
    mido = pytest.importorskip("mido")
    pytest.importorskip("mmtok_midi")
    midi = mido.MidiFile()
    track = mido.MidiTrack()
    midi.tracks.append(track)
    for note in range(60, 70):
        track.append(mido.Message("note_on", note=note, velocity=64, time=120))
        track.append(mido.Message("note_off", note=note, velocity=0, time=120))
    buffer = io.BytesIO()
    midi.save(file=buffer)
    return buffer.getvalue()


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` RGB pixels, with 1000 bytes of pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 1000)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def patched(data: bytes, offset: int, replacement: bytes) -> bytes:
    return data[:offset] + replacement + data[offset + len(replacement) :]


def gif_claiming(width: int, height: int) -> bytes:
    return patched(image_bytes("GIF"), 6, struct.pack("<HH", width, height))  # logical screen size


def bmp_claiming(width: int, height: int) -> bytes:
    return patched(image_bytes("BMP"), 18, struct.pack("<ii", width, height))  # BITMAPINFOHEADER size


def jpeg_claiming(width: int, height: int) -> bytes:
    data = image_bytes("JPEG")
    frame = data.index(b"\xff\xc0")  # start of frame: marker, length, precision, height, width
    return patched(data, frame + 5, struct.pack(">HH", height, width))


def webp_claiming(width: int, height: int) -> bytes:
    """An extended WebP whose VP8X chunk declares a ``width`` x ``height`` canvas."""
    simple = image_bytes("WEBP")
    header = bytes(4) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", 10) + header + simple[12:]
    return b"RIFF" + struct.pack("<I", len(body)) + body


def wav_with(value: float) -> bytes:
    samples = np.full(1600, 0.25, dtype=np.float32)
    samples[100] = value
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, 16000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def ogg_without_last_page() -> bytes:
    data = audio_bytes("OGG", "VORBIS")
    return data[: data.rindex(b"OggS")]


def mp3_cut_between_frames() -> bytes:
    from mmtok_audio.containers import _mp3_frame_lengths

    data = audio_bytes("MP3", "MPEG_LAYER_III", rate=8000)
    return data[: sum(_mp3_frame_lengths(data, 0, len(data))[:8])]


# name, bytes, expected words in the error
MEDIA_CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    # zero-byte files of every format
    **{f"zero.{suffix}": (lambda: b"", "file is empty")
       for suffix in ("png", "jpg", "gif", "webp", "bmp", "wav", "flac", "ogg", "mp3", "txt", "mid")},
    # truncated files of every format
    "truncated.png": (lambda: half(image_bytes("PNG")), "corrupt or truncated image"),
    "truncated.jpg": (lambda: half(image_bytes("JPEG")), "corrupt or truncated image"),
    "truncated.gif": (lambda: half(image_bytes("GIF")), "corrupt or truncated image"),
    "truncated.webp": (lambda: half(image_bytes("WEBP")), "corrupt or truncated image"),
    "truncated.bmp": (lambda: half(image_bytes("BMP")), "corrupt or truncated image"),
    "header-only.png": (lambda: image_bytes("PNG")[:20], "corrupt or truncated image"),
    "header-only.jpg": (lambda: image_bytes("JPEG")[:20], "not a readable image"),
    "truncated.wav": (lambda: half(audio_bytes("WAV", "PCM_16")), "file is truncated"),
    "truncated.flac": (lambda: half(audio_bytes("FLAC", "PCM_16")), "not a readable audio file"),
    "truncated.ogg": (lambda: half(audio_bytes("OGG", "VORBIS")), "file is truncated"),
    "truncated-at-page.ogg": (ogg_without_last_page, "without its end-of-stream page"),
    "truncated.mp3": (lambda: half(audio_bytes("MP3", "MPEG_LAYER_III", rate=8000)[:-36]), "last MP3 frame needs"),
    "truncated-at-frame.mp3": (mp3_cut_between_frames, "Xing header declares"),
    "header-only.mp3": (lambda: audio_bytes("MP3", "MPEG_LAYER_III")[:30], "file is truncated"),
    "truncated.txt": (lambda: "café".encode("utf-8")[:-1], "not valid UTF-8"),
    "truncated.mid": (lambda: half(midi_bytes()), "not a readable MIDI file"),
    # wrong extensions
    "png-named.wav": (lambda: image_bytes("PNG"), "not a readable audio file"),
    "wav-named.png": (lambda: audio_bytes("WAV", "PCM_16"), "not a readable image"),
    "text-named.png": (lambda: b"just some words", "not a readable image"),
    "png-named.txt": (lambda: image_bytes("PNG"), "not valid UTF-8"),
    "png-named.mid": (lambda: image_bytes("PNG"), "not a readable MIDI file"),
    "text-named.ogg": (lambda: b"OggS is how this starts, but it is text", "not a readable audio file"),
    # headers that lie about sizes
    "lying-size.png": (lambda: png_claiming(640, 480), "corrupt or truncated image"),
    "lying-size.bmp": (lambda: bmp_claiming(640, 480), "corrupt or truncated image"),
    "lying-data-size.wav": (lambda: patched(audio_bytes("WAV", "PCM_16"), 40, struct.pack("<I", 0x7FFFFFF0)),
                            "file is truncated"),
    "zero-channels.wav": (lambda: patched(audio_bytes("WAV", "PCM_16"), 22, struct.pack("<H", 0)),
                          "not a readable audio file"),
    "lying-track-size.mid": (lambda: patched(midi_bytes(), 18, (10**6).to_bytes(4, "big")), "not a readable MIDI file"),
    # headers that claim gigapixels: rejected before any pixel is decoded
    "gigapixel.png": (lambda: png_claiming(100_000, 100_000), "over the limit of"),
    "gigapixel.gif": (lambda: gif_claiming(65_535, 65_535), "over the limit of"),
    "gigapixel.jpg": (lambda: jpeg_claiming(65_000, 65_000), "over the limit of"),
    "gigapixel.bmp": (lambda: bmp_claiming(30_000, 30_000), "over the limit of"),
    "gigapixel.webp": (lambda: webp_claiming(1 << 24, 1 << 24), "over the limit of"),
    "over-limit.png": (lambda: png_claiming(9_000, 9_000), "over the limit of"),
    # values no reader should pass on
    "nan.wav": (lambda: wav_with(float("nan")), "NaN or infinite"),
    "infinite.wav": (lambda: wav_with(float("inf")), "NaN or infinite"),
    "latin-1.txt": (lambda: "naïve café".encode("latin-1"), "not valid UTF-8"),
}


def write_case(folder: Path, name: str) -> Path:
    build, _ = MEDIA_CASES[name]
    path = folder / name
    path.write_bytes(build())
    return path


@pytest.mark.parametrize("name", sorted(MEDIA_CASES))
def test_broken_media_rejected_by_api(tmp_path, name):
    path = write_case(tmp_path, name)

    with pytest.raises(MmtokError) as caught:
        api.encode_file(path)

    assert str(path) in str(caught.value)
    assert MEDIA_CASES[name][1] in str(caught.value)


def check_cli_failure(command: str, path: Path, expected: str) -> None:
    """Run ``mmtok COMMAND PATH -o FOLDER/`` and check for one error line, exit code 1 and no output."""
    output = path.parent / "out"
    output.mkdir()

    result = CliRunner().invoke(cli, [command, str(path), "-o", f"{output}/"])

    assert result.exit_code == 1
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: {path}: ")
    assert expected in result.stderr
    assert list(output.iterdir()) == []


@pytest.mark.parametrize("name", sorted(MEDIA_CASES))
def test_broken_media_rejected_by_cli(tmp_path, name):
    check_cli_failure("encode", write_case(tmp_path, name), MEDIA_CASES[name][1])


def test_broken_media_through_console_script(tmp_path):
    """One process encodes the whole corpus: one line per file, no traceback, nothing written."""
    pytest.importorskip("mmtok_midi")
    paths = [write_case(tmp_path, name) for name in sorted(MEDIA_CASES)]
    output = tmp_path / "out"
    output.mkdir()

    process = subprocess.run(
        [sys.executable, "-m", "mmtok.cli", "encode", *map(str, paths), "-o", str(output)],
        capture_output=True, text=True, timeout=300,
    )

    assert process.returncode == 1
    lines = process.stderr.splitlines()
    assert len(lines) == len(paths), process.stderr
    for path, line in zip(paths, lines):
        assert line.startswith(f"error: {path}: "), line
    assert "Traceback" not in process.stderr
    assert list(output.iterdir()) == []


def test_debug_flag_shows_traceback(tmp_path):
    path = write_case(tmp_path, "truncated.png")

    process = subprocess.run(
        [sys.executable, "-m", "mmtok.cli", "--debug", "encode", str(path), "-o", str(tmp_path / "out.mmtok")],
        capture_output=True, text=True, timeout=300,
    )

    assert process.returncode == 1
    assert "Traceback" in process.stderr
    assert "corrupt or truncated image" in process.stderr
    assert not (tmp_path / "out.mmtok").exists()


def test_broken_media_listed_by_encode_dataset(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    names = [name for name in MEDIA_CASES if name.endswith((".png", ".jpg", ".gif", ".webp", ".bmp"))]
    for name in names:
        write_case(folder, name)
    draw_picture(folder / "fine.png")

    summary = encode_dataset(folder, tmp_path / "shards", "image")
    errors = [json.loads(line) for line in (tmp_path / "shards" / "errors.jsonl").read_text().splitlines()]

    assert summary.encoded == 1
    assert sorted(error["path"] for error in errors) == sorted(names)
    for error in errors:
        assert error["path"] in error["error"]


# Token files --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_tokens(tmp_path_factory) -> dict[str, Tokens]:
    """Tokens of a real picture, tone and text, made by the bundled tokenizers."""
    folder = tmp_path_factory.mktemp("sources")
    picture = draw_picture(folder / "picture.png")
    tone = folder / "tone.wav"
    tone.write_bytes(audio_bytes("WAV", "PCM_16"))
    text = folder / "note.txt"
    text.write_text("A short note for the text tokenizer.")
    return {"image": api.encode_file(picture), "audio": api.encode_file(tone), "text": api.encode_file(text)}


def token_bytes(tokens: Tokens, codes: torch.Tensor | None = None, **header: str | None) -> bytes:
    values = {**tokens._header(), **header}
    codes = tokens.codes if codes is None else codes
    metadata = {key: value for key, value in values.items() if value is not None}
    return safetensors.torch.save({"codes": codes.contiguous()}, metadata=metadata)


def with_metadata(tokens: Tokens, **changes: object) -> bytes:
    return token_bytes(tokens, metadata=json.dumps({**tokens.metadata, **changes}))


def negative_id(tokens: Tokens) -> bytes:
    codes = tokens.codes.contiguous().clone()
    codes.view(-1)[0] = -1
    return token_bytes(tokens, codes)


# name, modality of the source tokens, bytes from those tokens, expected words in the error
TOKEN_CASES: dict[str, tuple[str, Callable[[Tokens], bytes], str]] = {
    "zero.mmtok": ("text", lambda t: b"", "not a readable mmtok token file"),
    "truncated.mmtok": ("image", lambda t: half(token_bytes(t)), "not a readable mmtok token file"),
    "huge-header.mmtok": ("text", lambda t: struct.pack("<Q", 2**60) + b"{}", "not a readable mmtok token file"),
    "pickle.mmtok": ("text", lambda t: pickle.dumps({"codes": [1, 2, 3]}), "never loads pickles"),
    "torch-save.mmtok": ("text", lambda t: torch_save_bytes(), "never loads pickles"),
    "extra-tensor.mmtok": ("text", lambda t: safetensors.torch.save(
        {"codes": t.codes, "payload": torch.zeros(3)}, metadata=t._header()), "expected only 'codes'"),
    "metadata-not-json.mmtok": ("image", lambda t: token_bytes(t, metadata="{width: 3"), "invalid metadata"),
    "metadata-list.mmtok": ("audio", lambda t: token_bytes(t, metadata="[1, 2]"), "expected a JSON object"),
    "format-missing.mmtok": ("text", lambda t: token_bytes(t, format=None), "not an mmtok token file"),
    "version-99.mmtok": ("text", lambda t: token_bytes(t, version="99"), "version '99' is not supported"),
    "modality-missing.mmtok": ("text", lambda t: token_bytes(t, modality=None), "missing modality"),
    "modality-unknown.mmtok": ("text", lambda t: token_bytes(t, modality="video"), "video"),
    "image-width-huge.mmtok": ("image", lambda t: with_metadata(t, width=10**6, height=10**6), "invalid image size"),
    "image-width-text.mmtok": ("image", lambda t: with_metadata(t, width="wide"), "needs an integer width"),
    "image-box-outside.mmtok": ("image", lambda t: with_metadata(t, box=[60, 0, 64, 64]), "does not lie inside"),
    "image-box-short.mmtok": ("image", lambda t: with_metadata(t, box=[1]), "needs a box"),
    "audio-samples-huge.mmtok": ("audio", lambda t: with_metadata(t, samples=10**12), "claims 1000000000000 samples"),
    "audio-rate-huge.mmtok": ("audio", lambda t: with_metadata(t, sample_rate=10**12), "at most 768000"),
    "audio-rate-zero.mmtok": ("audio", lambda t: with_metadata(t, sample_rate=0), "sample_rate >= 1"),
    "audio-channels-huge.mmtok": ("audio", lambda t: with_metadata(t, channels=10**9), "at most 64"),
    "image-negative-id.mmtok": ("image", negative_id, "is negative"),
    "audio-negative-id.mmtok": ("audio", negative_id, "is negative"),
    "text-negative-id.mmtok": ("text", negative_id, "is negative"),
    "image-id-too-large.mmtok": ("image", lambda t: token_bytes(t, t.codes + 10**6), "out of range"),
    "audio-id-too-large.mmtok": ("audio", lambda t: token_bytes(t, t.codes + 10**6), "out of range"),
    "text-id-too-large.mmtok": ("text", lambda t: token_bytes(t, t.codes + 10**6), "out of range"),
    "float-codes.mmtok": ("image", lambda t: token_bytes(t, t.codes.float()), "codes must be int64"),
    "int32-codes.mmtok": ("audio", lambda t: token_bytes(t, t.codes.int()), "codes must be int64"),
    "image-flat.mmtok": ("image", lambda t: token_bytes(t, t.codes.flatten()), "image codes must have shape"),
    "image-grid-9.mmtok": ("image", lambda t: token_bytes(t, torch.zeros(9, 9, dtype=torch.int64)),
                            "image codes must have shape"),
    "audio-3d.mmtok": ("audio", lambda t: token_bytes(t, t.codes[None]), "audio codes must be"),
    "audio-9-levels.mmtok": ("audio", lambda t: token_bytes(t, torch.zeros(9, 5, dtype=torch.int64)),
                             "audio codes must be"),
    "text-2d.mmtok": ("text", lambda t: token_bytes(t, t.codes[None]), "text codes must be 1-D"),
    "other-tokenizer.mmtok": ("image", lambda t: token_bytes(t, tokenizer_hash="0123456789abcdef"),
                              "decode with the tokenizer that encoded them"),
}


def torch_save_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"codes": torch.zeros(3)}, buffer)
    return buffer.getvalue()


def write_token_case(folder: Path, name: str, good_tokens: dict[str, Tokens]) -> Path:
    modality, build, _ = TOKEN_CASES[name]
    path = folder / name
    path.write_bytes(build(good_tokens[modality]))
    return path


def decode_file(path: Path) -> None:
    api.decode_tokens(Tokens.load(path))


@pytest.mark.parametrize("name", sorted(TOKEN_CASES))
def test_broken_token_file_rejected_by_api(tmp_path, good_tokens, name):
    path = write_token_case(tmp_path, name, good_tokens)

    with pytest.raises(MmtokError) as caught:
        try:
            decode_file(path)
        except MmtokError as error:
            # decode_tokens does not know the file; the CLI adds the path, as here.
            raise error if str(path) in str(error) else MmtokError(f"{path}: {error}") from error

    assert TOKEN_CASES[name][2] in str(caught.value)


@pytest.mark.parametrize("name", sorted(TOKEN_CASES))
def test_broken_token_file_rejected_by_cli(tmp_path, good_tokens, name):
    check_cli_failure("decode", write_token_case(tmp_path, name, good_tokens), TOKEN_CASES[name][2])


def test_token_file_of_other_tokenizer_rejected(tmp_path, good_tokens):
    path = tmp_path / "picture.png.mmtok"
    good_tokens["image"].save(path)

    result = CliRunner().invoke(cli, ["decode", str(path), "--tokenizer", str(other_image_tokenizer(tmp_path)),
                                      "-o", str(tmp_path / "out.png")])

    assert result.exit_code == 1
    assert "decode with the tokenizer that encoded them" in result.stderr
    assert not (tmp_path / "out.png").exists()


def other_image_tokenizer(folder: Path) -> Path:
    from mmtok_image import ImageTokenizer

    torch.manual_seed(0)
    path = folder / "other-image-tokenizer"
    ImageTokenizer(resolution=64, channels=[4, 8, 8, 8], latent_dim=4, codebook_size=512).save_pretrained(path)
    return path


def test_model_weights_that_are_a_pickle_rejected(tmp_path):
    from mmtok.hub import load_model

    source = Path(__file__).parents[1] / "plugins" / "mmtok_text" / "pretrained" / "text-tokenizer"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((source / "config.json").read_text())
    torch.save({"proto": torch.zeros(3)}, folder / "model.safetensors")

    with pytest.raises(MmtokError, match="model.safetensors: is a zip archive .torch.save., not safetensors"):
        load_model(str(folder))
