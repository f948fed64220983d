"""Shared fixtures: real media files made with Pillow, espeak-ng and the bundled models."""

from __future__ import annotations

import os

# The Hub is never reached from tests; huggingface_hub reads this once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib
import http.server
import importlib.util
import shutil
import subprocess
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image, ImageDraw

OPENCLIPART = Path("/usr/share/openclipart/png")
ROOT = Path(__file__).resolve().parents[1]


def prepare_data_module():
    """Import ``scripts/prepare_data.py``, whose split and caption rules tests reuse."""
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)


def one_torch_thread():
    """Run a test module on one torch thread, module fixtures included.

    Module fixtures (a trained model, an evaluation) are set up before the per-test
    setting above. Their models are tiny, so one thread loses no speed, while on a busy
    machine two threads made them up to ten times slower. Use it as
    ``single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


class Interrupted(Exception):
    """Raised inside a training run to stop it after a checkpoint, as a crash would."""


def interrupt_at(step: int):
    """Make ``TrainingRun.run`` raise :class:`Interrupted` before ``step``; return the undo function."""
    from mmtok.train.loop import TrainingRun

    original = TrainingRun.run

    def run(self, train_step, on_checkpoint=None):
        def interrupted_step(index):
            if index == step:
                raise Interrupted
            return train_step(index)

        return original(self, interrupted_step, on_checkpoint)

    TrainingRun.run = run
    return lambda: setattr(TrainingRun, "run", original)


def write_tones(folder: Path, count: int, sample_rate: int = 16000) -> list[Path]:
    """Write ``count`` short sine-tone WAV files of different pitch and length into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        time = np.arange(sample_rate // 2 + 500 * index) / sample_rate
        paths.append(folder / f"{index}.wav")
        soundfile.write(paths[-1], 0.3 * np.sin(2 * np.pi * (220 + 40 * index) * time), sample_rate)
    return paths


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


# The Hugging Face Hub, on loopback ---------------------------------------------------------


class FakeHub:
    """A loopback HTTP server that serves huggingface_hub's file requests as the Hub does.

    It serves ``/{repo_id}/resolve/{revision}/{path}`` for HEAD and GET from local
    folders, with the headers ``hf_hub_download`` reads (``X-Repo-Commit``, ``ETag``,
    ``Content-Length``), and the Hub's ``X-Error-Code`` values for a missing repository,
    revision or file. Every request path is recorded in ``requests``.
    """

    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.commits: dict[str, str] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.respond(self, send_body=False)

            def do_GET(self) -> None:
                hub.respond(self, send_body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, repo_id: str, folder: Path) -> str:
        """Serve ``folder`` as the main branch of ``repo_id``; return its commit hash."""
        self.repos[repo_id] = Path(folder)
        self.commits[repo_id] = hashlib.sha1(repo_id.encode()).hexdigest()
        return self.commits[repo_id]

    def respond(self, handler: http.server.BaseHTTPRequestHandler, send_body: bool) -> None:
        self.requests.append(handler.path)
        parts = urllib.parse.unquote(handler.path).split("/", 5)
        if len(parts) < 6 or parts[3] != "resolve":
            return self.send_hub_error(handler, "EntryNotFound")
        repo_id, revision, path = f"{parts[1]}/{parts[2]}", parts[4], parts[5]
        if repo_id not in self.repos:
            return self.send_hub_error(handler, "RepoNotFound")
        if revision not in ("main", self.commits[repo_id]):
            return self.send_hub_error(handler, "RevisionNotFound")
        file = self.repos[repo_id] / path
        if not file.is_file():
            return self.send_hub_error(handler, "EntryNotFound")
        content = file.read_bytes()
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", self.commits[repo_id])
        handler.send_header("ETag", '"' + hashlib.sha256(content).hexdigest() + '"')
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        if send_body:
            handler.wfile.write(content)

    @staticmethod
    def send_hub_error(handler: http.server.BaseHTTPRequestHandler, code: str) -> None:
        handler.send_response(404)
        handler.send_header("X-Error-Code", code)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub(monkeypatch):
    """Point huggingface_hub at a FakeHub on 127.0.0.1 with offline mode off, for one test."""
    import huggingface_hub.constants as constants

    hub = FakeHub()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    yield hub
    hub.stop()


CACHE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubCache:
    """A huggingface_hub cache folder that tests fill as huggingface_hub lays it out."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, repo_id: str, source: Path, branch: str = "main", commit: str = CACHE_COMMIT) -> Path:
        """Copy the folder tree ``source`` into the cache as ``branch`` of ``repo_id``.

        Files go to ``blobs/<sha256>``, ``snapshots/<commit>/<path>`` links to them and
        ``refs/<branch>`` contains the commit hash. Returns the snapshot folder.
        """
        repo = self.path / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
        (repo / "blobs").mkdir(exist_ok=True)
        snapshot = repo / "snapshots" / commit
        for file in sorted(source.rglob("*")):
            if not file.is_file():
                continue
            content = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
            blob.write_bytes(content)
            link = snapshot / file.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> HubCache:
    """An empty huggingface_hub cache, made the default cache for one test."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return HubCache(cache)
