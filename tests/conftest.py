"""Shared fixtures: real media files made with Pillow, espeak-ng and the bundled models."""

from __future__ import annotations

import os

# The Hub is never reached from tests; huggingface_hub reads this once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image, ImageDraw

OPENCLIPART = Path("/usr/share/openclipart/png")


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)


def draw_picture(path: Path, size: tuple[int, int] = (96, 72), mode: str = "RGB") -> Path:
    """Draw a simple clip-art-like picture: flat shapes with outlines on white."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    width, height = size
    draw.ellipse([width * 0.1, height * 0.1, width * 0.6, height * 0.8], fill=(220, 40, 40), outline="black", width=2)
    draw.rectangle([width * 0.5, height * 0.4, width * 0.9, height * 0.9], fill=(40, 90, 200), outline="black", width=2)
    if mode == "RGBA":
        image = image.convert("RGBA")
        alpha = Image.new("L", size, 0)
        ImageDraw.Draw(alpha).ellipse([0, 0, width, height], fill=255)
        image.putalpha(alpha)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def speak(path: Path, text: str = "The quick brown fox jumps over the lazy dog.", voice: str = "en") -> Path:
    """Synthesise speech into a WAV file with espeak-ng."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    return draw_picture(tmp_path / "picture.png")


@pytest.fixture
def clipart() -> Path:
    """A real clip-art file from Debian's openclipart-png, when installed."""
    files = sorted(OPENCLIPART.rglob("*.png"))[:200:20] if OPENCLIPART.is_dir() else []
    if not files:
        pytest.skip("openclipart-png is not installed")
    return files[3]


@pytest.fixture
def speech(tmp_path: Path) -> Path:
    return speak(tmp_path / "speech.wav")


@pytest.fixture
def stereo_song(tmp_path: Path) -> Path:
    """A 44.1 kHz stereo file of odd length: speech on the left, a chord on the right."""
    mono_path = speak(tmp_path / "voice.wav", "Music and speech together.")
    voice, rate = soundfile.read(mono_path, dtype="float32")
    import soxr

    voice = soxr.resample(voice, rate, 44100)
    time = np.arange(len(voice) + 777) / 44100
    chord = 0.2 * (np.sin(2 * np.pi * 220 * time) + np.sin(2 * np.pi * 277 * time))
    left = np.concatenate([voice, np.zeros(777, dtype=np.float32)])
    stereo = np.stack([left, chord], axis=1).astype(np.float32)
    path = tmp_path / "song.wav"
    soundfile.write(path, stereo, 44100, subtype="PCM_16")
    return path


@pytest.fixture
def notes(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_bytes("Notes:\n\tcafé  naïve 中文 😀\r\n  two  spaces\n\n".encode("utf-8"))
    return path
