#!/usr/bin/env python3
"""Prepare training and validation data for the default mmtok models from Debian packages.

The script reads only files that these Debian packages install and runs their tools:

- openclipart-png: clip-art PNGs under /usr/share/openclipart/png give captioned images.
- espeak-ng and flite: synthetic speech of sentences taken from the fortunes.
- fluidsynth and fluid-soundfont-gm: random MIDI pieces, written by this script, rendered to audio.
- fortunes: the fortune files under /usr/share/games/fortunes give text records.

Output layout under --out (default ``data``):

    image/manifest.jsonl         {"path", "caption", "split"} for each readable source PNG
    image/{train,val}/NNNNN.png  RGB 128x128 copies, transparency composited onto white,
                                 scaled to fit and centered on a white square
    image/{train,val}.jsonl      {"file", "caption", "source"}
    audio/{train,val}/*.wav      16 kHz mono 16-bit PCM
    audio/{train,val}.jsonl      {"file", "kind", "duration", ...} where speech rows add
                                 "voice", "options" (tool settings) and "text", and music
                                 rows add "program" (GM lead instrument, 0-127),
                                 "program_name", "programs", "drums", "tempo" and "midi_sha1"
    text/{train,val}.txt         one fortune per record, each record followed by a "%" line
    text/{train,val}.jsonl       {"text"}, one fortune per line

Image and text splits depend only on --val-fraction and SHA-1 hashes of source paths and
texts, so --seed does not change them. The seed selects the --max-images subset and every
speech and music parameter. Validation speech uses only voices that training speech never
uses, and validation music leads with instruments that training music never uses. A rerun
keeps each output file whose index entry still matches the planned item.

Example:

    python scripts/prepare_data.py --out data --seed 0
"""

from __future__ import annotations

import argparse
import bisect
import collections
import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import soundfile
import soxr
from PIL import Image

log = logging.getLogger("prepare_data")

OPENCLIPART_ROOT = Path("/usr/share/openclipart/png")
FORTUNES_ROOT = Path("/usr/share/games/fortunes")
SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")

SPLITS = ("train", "val")
SAMPLE_RATE = 16000
IMAGE_SIZE = 128
TOOL_TIMEOUT_S = 120
CHECKPOINT_EVERY = 100

# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def hash_fraction(key: str) -> float:
    """Map a string to a number in [0, 1) taken from its SHA-1 digest, stable across runs."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(key: str, val_fraction: float) -> str:
    return "val" if hash_fraction(key) < val_fraction else "train"


def write_text_if_changed(path: Path, text: str) -> None:
    """Write the file through a temporary name, leaving it untouched when the content is equal."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    temporary = path.with_name(path.name + ".part")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_if_changed(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    """Read the rows of a JSON Lines file, skipping invalid lines. A missing file has no rows."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            log.warning("Skipping invalid JSON on line %d of %s: %s", number, path, error)
    return rows


def remove_unlisted_files(directory: Path, pattern: str, keep: set[str]) -> int:
    """Delete files matching ``pattern`` in ``directory`` whose names are not in ``keep``."""
    removed = 0
    for path in directory.glob(pattern):
        if path.name not in keep:
            path.unlink()
            removed += 1
    return removed


def remove_partial_files(directory: Path) -> None:
    """Delete ``*.part`` files that an interrupted run left behind."""
    for path in directory.rglob("*.part"):
        path.unlink()


def directory_size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def format_bytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


class ToolError(RuntimeError):
    """An external program failed or wrote no usable output."""


def run_tool(command: list[str], stdin_text: str | None = None) -> None:
    """Run a command and raise ToolError with the end of its stderr when it fails or times out."""
    try:
        result = subprocess.run(
            command,
            input=stdin_text,
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as error:
        raise ToolError(f"{command[0]} timed out after {TOOL_TIMEOUT_S} s") from error
    if result.returncode != 0:
        stderr = result.stderr.strip()[-300:]
        raise ToolError(f"{command[0]} exited with status {result.returncode}: {stderr}")


# ---------------------------------------------------------------------------
# Text: fortunes
# ---------------------------------------------------------------------------


def render_overstrike(line: str) -> str:
    """Resolve backspace overstrikes ("_\\bx" underlines, "x\\bx" bold) into the visible characters.

    An underscore never replaces a letter it is struck over, so both "_\\bx" and "x\\b_" give "x".
    """
    cells: list[str] = []
    cursor = 0
    for character in line:
        if character == "\b":
            cursor = max(cursor - 1, 0)
        elif cursor < len(cells):
            if character != "_":
                cells[cursor] = character
            cursor += 1
        else:
            cells.append(character)
            cursor += 1
    return "".join(cells)


def read_fortunes(root: Path) -> list[str]:
    """Read every fortune record under ``root`` in file order, without exact duplicates.

    Skipped are ``*.dat`` index files, the offensive ``off/`` folder, links to files already
    read (the ``*.u8`` names), files that are not UTF-8 and files without "%" separator lines.
    """
    records: list[str] = []
    seen_records: set[str] = set()
    seen_files: set[Path] = set()
    duplicates = 0
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or path.suffix == ".dat" or relative.parts[0] == "off":
            continue
        real_path = path.resolve()
        if real_path in seen_files:
            continue
        seen_files.add(real_path)
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            log.warning("Skipping %s because it is not UTF-8 text: %s", path, error)
            continue
        if not re.search(r"^%\s*$", content, flags=re.MULTILINE):
            log.warning("Skipping %s because it has no '%%' separator lines", path)
            continue
        file_records = 0
        for chunk in re.split(r"^%[ \t]*\n?", content, flags=re.MULTILINE):
            lines = [render_overstrike(line).rstrip() for line in chunk.split("\n")]
            record = "\n".join(lines).strip("\n")
            if not record.strip():
                continue
            if record in seen_records:
                duplicates += 1
                continue
            seen_records.add(record)
            records.append(record)
            file_records += 1
        log.debug("Read %d fortunes from %s", file_records, path)
    log.info("Read %d fortunes from %d files, dropped %d exact duplicates", len(records), len(seen_files), duplicates)
    return records


def split_fortunes(val_fraction: float) -> dict[str, list[str]]:
    """Read the fortunes and assign each to a split by the hash of its text."""
    records = read_fortunes(FORTUNES_ROOT)
    if not records:
        raise SystemExit(f"No fortunes found under {FORTUNES_ROOT}. Install the 'fortunes' package.")
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for record in records:
        splits[split_of(record, val_fraction)].append(record)
    return splits


def write_text_splits(out: Path, splits: dict[str, list[str]]) -> None:
    text_dir = out / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        write_text_if_changed(text_dir / f"{split}.txt", "".join(record + "\n%\n" for record in records))
        write_jsonl(text_dir / f"{split}.jsonl", [{"text": record} for record in records])
        log.info("Text %s: %d fortunes", split, len(records))


# ---------------------------------------------------------------------------
# Images: openclipart
# ---------------------------------------------------------------------------

# Many openclipart file names end with the author's name, often cut short by a length limit on
# file names ("medicina_dottore_archite_01"). These are the authors whose names end the most
# file names in openclipart-png 1:0.18+dfsg-19. Where no file name shows a whole name, the
# list keeps the longest part that one shows.
CLIPART_AUTHORS = [
    "aj ashton", "alex fernandez", "andreas nilsson", "anthony liekens", "anton yu", "architetto francesco rollandin",
    "aubanel monnier", "benji park", "bradley whit", "brice boyer", "cedric bosdon", "charles mccolm",
    "christoph brill", "costea bogdan", "dan gerhards", "dave pena", "dave reckonin",
    "dennis bo", "dirk struve", "frank warttig", "enrique meza c", "frederic moser", "fudriot omic ch",
    "ganson", "gerald g", "guillaume boitel", "havok redh", "jakob chaosinfa", "jasper van de grond",
    "jarno vasamaa", "jean victor balin", "jon phillips", "jonadab", "jonathan dietrich",
    "juliane krug", "k yager", "leif lodahl", "linda kim", "luiz araujo",
    "lumen design studio", "marcelo staudt", "mateya", "matt todd", "matthew gates",
    "mauro olivo", "michael breuer", "miguel s nchez", "mikhail a medve", "mimooh",
    "mo", "nathan eady", "nicolas cle", "nicu buculei", "patricia fidi",
    "peterm", "richard torkar", "rob lucas", "rollandin architetto", "rollandin francesco", "roman bertle", "sergio luiz araujo", "snuatautisticido", "stefan bazelkov",
    "susan park", "tanguy jacq", "timothy whit", "victor balin", "wolfram es", "yen cheng",
    "yves guillou", "zazou",
]
CLIPART_AUTHOR_WORDS = [author.split() for author in CLIPART_AUTHORS]
MAX_AUTHOR_WORDS = max(len(words) for words in CLIPART_AUTHOR_WORDS)
# Maximum length in characters of a file name stem in openclipart-png 1:0.18+dfsg-19, not
# counting a "_01" style suffix.
CLIPART_NAME_LIMIT = 24
# Abbreviations in file names that read better spelled out in a caption.
CAPTION_EXPANSIONS = {"bw": ["black", "and", "white"]}


def name_words(name: str) -> list[str]:
    """Split a file or folder name into lowercase ASCII words.

    Digits at either end of a word are dropped ("arrow1" gives "arrow"), and so are words with
    digits inside ("67pt11step"), which are codes rather than words.
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    words = []
    for token in re.split(r"[^a-z0-9]+", ascii_name.lower()):
        word = token.strip("0123456789")
        if word and not any(character.isdigit() for character in word):
            words.append(word)
    return words


def is_author_start(tail: list[str], author: list[str]) -> bool:
    """Tell whether ``tail`` is the start of the author's name, possibly cut inside its last word.

    A single cut word needs at least 4 letters, so that short title words such as "ben" are kept.
    """
    if len(tail) > len(author):
        return False
    *whole_words, last_word = tail
    if whole_words != author[: len(whole_words)]:
        return False
    author_word = author[len(whole_words)]
    if last_word == author_word:
        return True
    return author_word.startswith(last_word) and (len(tail) > 1 or len(last_word) >= 4)


def is_cut_short(stem: str) -> bool:
    """Tell whether a file name stem may have been cut inside its last word.

    Openclipart cut long names to 24 characters before adding a "_01" style suffix, and many
    cut names are 23 characters long, apparently because a character was dropped afterwards.
    A name cut right after "_" or "-" ends with a whole word.
    """
    base = re.sub(r"_[0-9]+[a-z]?$", "", stem)
    return len(base) >= CLIPART_NAME_LIMIT - 1 and base[-1] not in "_-"


def strip_author(words: list[str]) -> list[str]:
    """Drop a trailing author name and anything after a "by".

    Returns the words unchanged when they do not end with a known author.
    """
    if "by" in words[1:]:
        words = words[: words.index("by", 1)]
    for start in range(max(0, len(words) - MAX_AUTHOR_WORDS), len(words)):
        tail = words[start:]
        if any(is_author_start(tail, author) for author in CLIPART_AUTHOR_WORDS):
            return words[:start]
    return words


def title_words(stem: str) -> list[str]:
    """Return the words of a clip-art file name without author, cut-off word or version letter."""
    words = name_words(stem)
    # Trailing single letters are version marks ("_01a", "_r") or card ranks and suits.
    while words and len(words[-1]) == 1:
        words.pop()
    stripped = strip_author(words)
    if stripped == words and is_cut_short(stem) and len(words) > 1:
        stripped = words[:-1]
    return stripped


def clipart_caption(path: Path, root: Path) -> str:
    """Build a caption from the folder names and the file name of an openclipart PNG.

    For example ``animals/birds/blue_bird_01.png`` gives "animals birds blue bird".
    """
    relative = path.relative_to(root)
    words: list[str] = []
    for folder in relative.parts[:-1]:
        words.extend(name_words(folder))

    title = title_words(path.stem)
    for position, word in enumerate(title):
        if word in CAPTION_EXPANSIONS:
            words.extend(CAPTION_EXPANSIONS[word])
        elif len(word) > 1 or (word == "a" and position < len(title) - 1):
            # Other single letters are mostly leftovers of cut names and initials.
            words.append(word)

    caption: list[str] = []
    for word in words:
        if not caption or caption[-1] != word:
            caption.append(word)
    return " ".join(caption) if caption else "clip art"


def letterbox_on_white(image: Image.Image, size: int) -> Image.Image:
    """Scale the image to fit a size x size square, keep its aspect ratio and fill the rest with white."""
    rgba = image.convert("RGBA")
    scale = size / max(rgba.size)
    width = min(size, max(1, round(rgba.width * scale)))
    height = min(size, max(1, round(rgba.height * scale)))
    # Image.resize in Pillow 13 resamples RGBA with premultiplied alpha, so the colors of
    # transparent pixels do not bleed into the edges.
    rgba = rgba.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, ((size - width) // 2, (size - height) // 2))
    return canvas.convert("RGB")


def resize_clipart(task: tuple[str, str]) -> tuple[str, str | None]:
    """Write the 128x128 copy of one source PNG. Returns the source and an error message or None."""
    source, destination = task
    try:
        with warnings.catch_warnings():
            # Files between Pillow's warning and error pixel limits are legitimate large drawings.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                image.load()
                small = letterbox_on_white(image, IMAGE_SIZE)
        temporary = destination + ".part"
        small.save(temporary, format="PNG")
        os.replace(temporary, destination)
    except (OSError, ValueError, MemoryError, Image.DecompressionBombError) as error:
        return source, f"{type(error).__name__}: {error}"
    return source, None


def list_readable_clipart(root: Path) -> tuple[list[Path], int]:
    """List PNG files whose header Pillow accepts, and count the rejected files."""
    readable = []
    rejected = 0
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix.lower() != ".png":
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path):
                    pass
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            log.warning("Skipping %s because Pillow cannot open it: %s", path, error)
            rejected += 1
            continue
        readable.append(path)
    return readable, rejected


def prepare_images(out: Path, seed: int, max_images: int | None, val_fraction: float, workers: int) -> None:
    """Write the image manifest and the 128x128 copies of the openclipart PNGs."""
    if not OPENCLIPART_ROOT.is_dir():
        raise SystemExit(f"{OPENCLIPART_ROOT} not found. Install the 'openclipart-png' package.")
    sources, rejected = list_readable_clipart(OPENCLIPART_ROOT)
    log.info("Found %d clip-art PNGs that Pillow can open, %d that it cannot", len(sources), rejected)
    if max_images is not None and max_images < len(sources):
        sources = sorted(random.Random(f"{seed}:images").sample(sources, max_images))
        log.info("Using a subset of %d images chosen with seed %d", max_images, seed)

    image_dir = out / "image"
    for split in SPLITS:
        (image_dir / split).mkdir(parents=True, exist_ok=True)
    remove_partial_files(image_dir)

    # Numbering follows path order within each split.
    planned: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for source in sources:
        split = split_of(str(source), val_fraction)
        row = {
            "file": f"{split}/{len(planned[split]):05d}.png",
            "caption": clipart_caption(source, OPENCLIPART_ROOT),
            "source": str(source),
        }
        planned[split].append(row)

    tasks = []
    for split in SPLITS:
        previous_sources = {row.get("file"): row.get("source") for row in read_jsonl(image_dir / f"{split}.jsonl")}
        for row in planned[split]:
            destination = image_dir / row["file"]
            if previous_sources.get(row["file"]) == row["source"] and destination.exists():
                continue
            tasks.append((row["source"], str(destination)))
    already_done = len(sources) - len(tasks)
    log.info("Resizing %d images with %d workers (%d already done)", len(tasks), workers, already_done)

    failed: set[str] = set()
    started = time.monotonic()
    with multiprocessing.Pool(workers) as pool:
        for done, (source, error) in enumerate(pool.imap_unordered(resize_clipart, tasks, chunksize=4), start=1):
            if error is not None:
                log.warning("Skipping %s because it could not be converted: %s", source, error)
                failed.add(source)
            if done % 500 == 0:
                log.info("Resized %d of %d images in %.0f s", done, len(tasks), time.monotonic() - started)
    if failed:
        # NOTE: the numbering was assigned before conversion, so each failed file leaves a gap.
        log.warning("%d images failed to convert and are left out", len(failed))

    manifest = []
    for split in SPLITS:
        rows = [row for row in planned[split] if row["source"] not in failed]
        write_jsonl(image_dir / f"{split}.jsonl", rows)
        removed = remove_unlisted_files(image_dir / split, "*.png", {Path(row["file"]).name for row in rows})
        if removed:
            log.info("Removed %d stale images from %s", removed, image_dir / split)
        manifest.extend({"path": row["source"], "caption": row["caption"], "split": split} for row in rows)
        log.info("Images %s: %d", split, len(rows))
    manifest.sort(key=lambda entry: entry["path"])
    write_jsonl(image_dir / "manifest.jsonl", manifest)


# ---------------------------------------------------------------------------
# Audio helpers
# ---------------------------------------------------------------------------


def read_mono_16k(path: Path) -> np.ndarray:
    """Read an audio file as float32 mono at 16 kHz, averaging channels and resampling with soxr."""
    audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    if audio.shape[0] == 0:
        raise ToolError(f"{path.name} contains no audio")
    mono = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE)
    return mono.astype(np.float32)


def trim_silence(audio: np.ndarray, threshold_db: float = -50.0, margin_s: float = 0.1) -> np.ndarray:
    """Cut leading and trailing samples quieter than ``threshold_db`` dBFS, keeping a short margin."""
    loud = np.flatnonzero(np.abs(audio) > 10 ** (threshold_db / 20))
    if loud.size == 0:
        return audio[:0]
    margin = int(margin_s * SAMPLE_RATE)
    return audio[max(loud[0] - margin, 0) : loud[-1] + margin + 1]


def write_wav(path: Path, audio: np.ndarray) -> None:
    """Write 16-bit PCM through a temporary name, scaling down audio that would clip."""
    peak = float(np.max(np.abs(audio)))
    if peak > 0.99:
        audio = audio * (0.99 / peak)
    temporary = path.with_name(path.name + ".part")
    soundfile.write(str(temporary), audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(temporary, path)


# ---------------------------------------------------------------------------
# Speech: espeak-ng and flite
# ---------------------------------------------------------------------------

# Languages written in Latin script. espeak-ng reads the English fortunes with each language's
# spelling rules, which gives many accents. In espeak-ng 1.51, voices for other scripts switch
# to English for Latin text (ru, hi) or spell out each letter (ja).
ESPEAK_LANGUAGES = [
    "af", "an", "az", "ca", "cs", "cy", "da", "de", "en-029", "en-gb", "en-gb-scotland",
    "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-gb-x-rp", "en-us", "en-us-nyc", "eo", "es", "es-419",
    "et", "eu", "fi", "fr-be", "fr-ch", "fr-fr", "ga", "gd", "haw", "hr", "ht", "hu", "ia", "id",
    "is", "it", "la", "lb", "lt", "lv", "mi", "ms", "mt", "nb", "nl", "pl", "pt", "pt-br", "ro",
    "sk", "sl", "sq", "sv", "sw", "tn", "tr", "vi",
]
# An empty variant is the language's default voice.
ESPEAK_VARIANTS = ["", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]
# Validation speech uses only voices with a held-out language or a held-out variant.
VAL_ESPEAK_LANGUAGES = {"en-us-nyc", "hr", "nl", "pt-br", "sv"}
VAL_ESPEAK_VARIANTS = {"m7", "f5"}
# flite's awb_time is a limited-domain voice for clock times, so it is left out.
FLITE_VOICES = ["awb", "kal", "kal16", "rms", "slt"]
VAL_FLITE_VOICES = {"rms"}
FLITE_SHARE = 0.1

MIN_SPEECH_S = 3.0
MAX_SPEECH_S = 12.0
SENTENCE_CANDIDATES = 8
SPEAKABLE_SENTENCE = re.compile(r"[A-Za-z0-9 ,.;:'\"!?()-]+")


def speech_sentences(records: list[str]) -> list[str]:
    """Cut fortunes into sentences that suit 3-12 s of speech, in plain ASCII, without duplicates."""
    sentences: dict[str, None] = {}
    for record in records:
        flat = " ".join(record.split())
        for sentence in re.split(r"(?<=[.!?])\s+", flat):
            letters = sum(character.isalpha() for character in sentence)
            if (
                30 <= len(sentence) <= 200
                and SPEAKABLE_SENTENCE.fullmatch(sentence)
                and letters >= 0.7 * len(sentence)
            ):
                sentences[sentence] = None
    return sorted(sentences, key=len)


def espeak_supports(voice: str) -> bool:
    """Synthesize a short phrase with an espeak-ng voice to check that it works."""
    with tempfile.TemporaryDirectory(prefix="mmtok-espeak-") as directory:
        output = Path(directory) / "probe.wav"
        try:
            run_tool(["espeak-ng", "-v", voice, "-w", str(output), "--stdin"], "This is a test.")
            return read_mono_16k(output).size > 0
        except (ToolError, RuntimeError) as error:
            log.warning("Skipping espeak-ng voice %s because it failed: %s", voice, error)
            return False


def list_speech_voices() -> dict[str, list[dict]]:
    """Return the working voices of each split. Each voice is a dict with "engine", "name" and "spec"."""
    voices: dict[str, list[dict]] = {split: [] for split in SPLITS}

    listing = subprocess.run(["espeak-ng", "--voices"], capture_output=True, text=True, check=True).stdout
    installed = {line.split()[1] for line in listing.splitlines()[1:] if len(line.split()) > 1}
    languages = []
    for language in ESPEAK_LANGUAGES:
        if language not in installed:
            log.warning("Skipping espeak-ng language %s because 'espeak-ng --voices' does not list it", language)
        elif espeak_supports(language):
            languages.append(language)
    variants = [variant for variant in ESPEAK_VARIANTS if not variant or espeak_supports(f"en+{variant}")]
    for language in languages:
        for variant in variants:
            spec = f"{language}+{variant}" if variant else language
            split = "val" if language in VAL_ESPEAK_LANGUAGES or variant in VAL_ESPEAK_VARIANTS else "train"
            voices[split].append({"engine": "espeak-ng", "name": f"espeak-ng:{spec}", "spec": spec})
    log.info(
        "espeak-ng: %d languages and %d variants work, giving %d train and %d val voices",
        len(languages), len(variants), len(voices["train"]), len(voices["val"]),
    )

    if shutil.which("flite") is None:
        log.warning("flite not found, so all speech comes from espeak-ng")
        return voices
    listing = subprocess.run(["flite", "-lv"], capture_output=True, text=True, check=True).stdout
    installed = set(listing.split(":", 1)[-1].split())
    for name in FLITE_VOICES:
        if name not in installed:
            log.warning("Skipping flite voice %s because 'flite -lv' does not list it", name)
            continue
        split = "val" if name in VAL_FLITE_VOICES else "train"
        voices[split].append({"engine": "flite", "name": f"flite:{name}", "spec": name})
    return voices


def plan_speech(split: str, count: int, voices: list[dict], sentences: list[str], seed: int) -> list[dict]:
    """Draw the voice, tool options and candidate sentences of each speech clip of one split.

    Candidates are drawn from sentences whose length at the drawn speed should give 3-12 s. The
    worker keeps the first candidate whose audio really is that long.
    """
    espeak_voices = [voice for voice in voices if voice["engine"] == "espeak-ng"]
    flite_voices = [voice for voice in voices if voice["engine"] == "flite"]
    lengths = [len(sentence) for sentence in sentences]
    jobs = []
    for index in range(count):
        rng = random.Random(f"{seed}:speech:{split}:{index}")
        if flite_voices and (not espeak_voices or rng.random() < FLITE_SHARE):
            voice = rng.choice(flite_voices)
            # duration_stretch > 1 speaks slower. At 1, flite 2.2 voices read roughly 16
            # characters per second of trimmed audio (median over the clips of a full run).
            stretch = round(rng.uniform(0.8, 1.25), 2)
            options = {"duration_stretch": stretch}
            characters_per_s = 16.0 / stretch
        else:
            voice = rng.choice(espeak_voices)
            # Speed in approximate words per minute (default 175), pitch on a 0-99 scale (default 50).
            options = {"speed": rng.randint(120, 220), "pitch": rng.randint(20, 80)}
            # Estimate of about 6 characters per word. The median over the clips of a full run
            # with espeak-ng 1.51 was 15 characters per second at a mean speed of 170.
            characters_per_s = options["speed"] * 6 / 60
        # Aim inside the 3-12 s window so that speed estimates that are off still fit.
        low = bisect.bisect_left(lengths, int(3.5 * characters_per_s))
        high = bisect.bisect_right(lengths, int(10.5 * characters_per_s))
        pool = sentences[low:high] if high - low >= SENTENCE_CANDIDATES else sentences
        jobs.append({
            "kind": "speech",
            "split": split,
            "file": f"{split}/speech_{index:05d}.wav",
            "engine": voice["engine"],
            "voice": voice["name"],
            "spec": voice["spec"],
            "options": options,
            "candidates": rng.sample(pool, min(SENTENCE_CANDIDATES, len(pool))),
        })
    return jobs


def synthesize(job: dict, text: str, directory: Path) -> np.ndarray:
    output = directory / "speech.wav"
    output.unlink(missing_ok=True)
    if job["engine"] == "espeak-ng":
        options = job["options"]
        command = ["espeak-ng", "-v", job["spec"], "-s", str(options["speed"]), "-p", str(options["pitch"])]
        run_tool(command + ["-w", str(output), "--stdin"], text)
    else:
        # flite would read a leading "-" in a -t argument as an option, so the text goes in a file.
        text_file = directory / "speech.txt"
        text_file.write_text(text + "\n", encoding="utf-8")
        command = ["flite", "-voice", job["spec"], "--setf", f"duration_stretch={job['options']['duration_stretch']}"]
        run_tool(command + ["-f", str(text_file), "-o", str(output)])
    if not output.exists():
        raise ToolError(f"{job['engine']} wrote no output file")
    return read_mono_16k(output)


def synthesize_speech(job: dict, out: Path) -> dict:
    """Synthesize the first candidate sentence that gives 3-12 s of speech and write the clip."""
    errors = []
    with tempfile.TemporaryDirectory(prefix="mmtok-speech-") as directory:
        for text in job["candidates"]:
            try:
                audio = trim_silence(synthesize(job, text, Path(directory)))
            except (ToolError, RuntimeError) as error:
                errors.append(str(error))
                if len(errors) >= 2:
                    break  # two failures point to a broken voice rather than a bad sentence
                continue
            duration = audio.size / SAMPLE_RATE
            if MIN_SPEECH_S <= duration <= MAX_SPEECH_S:
                write_wav(out / job["file"], audio)
                row = {
                    "file": job["file"],
                    "kind": "speech",
                    "voice": job["voice"],
                    "options": job["options"],
                    "text": text,
                    "duration": round(duration, 3),
                }
                return {"row": row}
            errors.append(f"{duration:.1f} s is outside {MIN_SPEECH_S:g}-{MAX_SPEECH_S:g} s")
    return {"error": "; ".join(errors[-3:]) or "no candidate sentences"}


def speech_row_matches(row: dict, job: dict) -> bool:
    return (
        row.get("voice") == job["voice"]
        and row.get("options") == job["options"]
        and row.get("text") in job["candidates"]
    )


# ---------------------------------------------------------------------------
# Music: random MIDI pieces rendered with fluidsynth
# ---------------------------------------------------------------------------

TICKS_PER_BEAT = 480
DRUM_CHANNEL = 9  # channel 10 in General MIDI numbering
# General MIDI programs, numbered from 0.
GM_PROGRAM_NAMES = {
    0: "acoustic grand piano", 4: "electric piano", 5: "electric piano 2", 6: "harpsichord",
    11: "vibraphone", 12: "marimba", 16: "drawbar organ", 19: "church organ", 21: "accordion",
    22: "harmonica", 24: "nylon guitar", 25: "steel guitar", 26: "jazz guitar",
    29: "overdriven guitar", 32: "acoustic bass", 33: "fingered bass", 34: "picked bass",
    38: "synth bass", 40: "violin", 42: "cello", 43: "contrabass", 46: "harp",
    48: "string ensemble", 49: "slow strings", 52: "choir aahs", 56: "trumpet",
    60: "french horn", 61: "brass section", 65: "alto sax", 68: "oboe", 71: "clarinet",
    73: "flute", 75: "pan flute", 80: "square lead", 81: "saw lead", 88: "new age pad",
    89: "warm pad", 105: "banjo", 108: "kalimba",
}
TRAIN_LEAD_PROGRAMS = [0, 4, 6, 12, 16, 21, 22, 24, 25, 26, 29, 40, 52, 56, 60, 68, 71, 73, 80, 81, 108]
VAL_LEAD_PROGRAMS = [11, 42, 46, 65, 75, 105]
CHORD_PROGRAMS = [0, 5, 19, 24, 48, 49, 61, 88, 89]
BASS_PROGRAMS = [32, 33, 34, 38, 43]
# Drum kits that FluidR3_GM.sf2 provides in bank 128: standard, room, power, electronic, TR-808, jazz, brush.
DRUM_KITS = [0, 8, 16, 24, 25, 32, 40]
SCALES = {
    "major": [0, 2, 4, 5, 7, 9, 11],
    "minor": [0, 2, 3, 5, 7, 8, 10],
    "dorian": [0, 2, 3, 5, 7, 9, 10],
    "mixolydian": [0, 2, 4, 5, 7, 9, 10],
    "harmonic minor": [0, 2, 3, 5, 7, 8, 11],
}
# Chord roots as scale degrees (I, ii, IV, V, vi). Each triad stacks every other scale note.
CHORD_DEGREES = [0, 0, 1, 3, 4, 4, 5]
# The MIDI file ends this long after the last note, so that fluidsynth renders releases and reverb.
RELEASE_TAIL_S = 1.5
# Pieces have at least MIN_MUSIC_S of notes. Longer renders are cut to MAX_MUSIC_S with a fade-out.
MIN_MUSIC_S = 4.0
MAX_MUSIC_S = 10.0
FADE_OUT_S = 0.2


def variable_length_quantity(value: int) -> bytes:
    """Encode a MIDI delta time: 7 bits per byte, most significant first, high bit set on all but the last."""
    encoded = [value & 0x7F]
    value >>= 7
    while value:
        encoded.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(encoded))


class MidiTrack:
    """Events of a single-track (format 0) Standard MIDI File, kept with absolute tick times."""

    def __init__(self) -> None:
        self.events: list[tuple[int, int, bytes]] = []

    def add(self, tick: int, message: bytes, order: int = 1) -> None:
        # At equal ticks, lower order sorts first: setup messages (0), note-offs (1), note-ons (2).
        self.events.append((tick, order, message))

    def tempo(self, tick: int, beats_per_minute: float) -> None:
        microseconds_per_beat = round(60_000_000 / beats_per_minute)
        self.add(tick, b"\xff\x51\x03" + microseconds_per_beat.to_bytes(3, "big"), order=0)

    def program(self, tick: int, channel: int, program: int) -> None:
        self.add(tick, bytes([0xC0 | channel, program]), order=0)

    def note(self, start: int, length: int, channel: int, pitch: int, velocity: int) -> None:
        self.add(start, bytes([0x90 | channel, pitch, velocity]), order=2)
        self.add(start + max(length, 1), bytes([0x80 | channel, pitch, 0]), order=1)

    def to_bytes(self, end_tick: int) -> bytes:
        """Serialize as a Standard MIDI File whose end-of-track event is at ``end_tick`` or later."""
        data = bytearray()
        last_tick = 0
        for tick, _, message in sorted(self.events, key=lambda event: (event[0], event[1])):
            data += variable_length_quantity(tick - last_tick) + message
            last_tick = tick
        data += variable_length_quantity(max(end_tick - last_tick, 0)) + b"\xff\x2f\x00"
        header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, TICKS_PER_BEAT)
        return header + b"MTrk" + struct.pack(">I", len(data)) + bytes(data)


def compose_piece(rng: random.Random, lead_programs: list[int]) -> tuple[bytes, dict]:
    """Compose a random piece of about 4-10 s: a melody over chords, with optional bass and drums.

    Returns the MIDI file and a description with the lead program, all programs, drums and tempo.
    """
    tempo = rng.randint(70, 160)
    beats_per_bar = rng.choice([3, 4, 4, 4])
    bar_s = beats_per_bar * 60 / tempo
    bars = max(math.ceil(MIN_MUSIC_S / bar_s), round(rng.uniform(MIN_MUSIC_S, MAX_MUSIC_S) / bar_s))
    total_beats = bars * beats_per_bar
    scale = SCALES[rng.choice(sorted(SCALES))]
    tonic = rng.randint(55, 67)  # MIDI note of the melody's tonic, G3 to G4

    def scale_pitch(degree: int) -> int:
        octave, step = divmod(degree, len(scale))
        return tonic + 12 * octave + scale[step]

    def ticks(beats: float) -> int:
        return round(beats * TICKS_PER_BEAT)

    track = MidiTrack()
    track.tempo(0, tempo)
    lead = rng.choice(lead_programs)
    programs = [lead]
    track.program(0, 0, lead)

    # Chords change every bar or every half bar.
    beats_per_chord = beats_per_bar if rng.random() < 0.6 else beats_per_bar / 2
    chord_roots = [rng.choice(CHORD_DEGREES) for _ in range(int(total_beats / beats_per_chord))]

    # Melody: a random walk over scale degrees with mixed note lengths and a few rests.
    beat = 0.0
    degree = rng.randint(0, 4)
    while beat < total_beats:
        length = min(rng.choice([0.25, 0.5, 0.5, 1, 1, 1, 1.5, 2]), total_beats - beat)
        is_last_note = beat + length >= total_beats
        if is_last_note or rng.random() > 0.12:
            velocity = rng.randint(70, 110)
            track.note(ticks(beat), ticks(length * 0.95), 0, scale_pitch(degree), velocity)
        degree = min(max(degree + rng.choice([-3, -2, -1, -1, 0, 1, 1, 2, 3]), -3), 10)
        beat += length

    if rng.random() < 0.85:
        chord_program = rng.choice(CHORD_PROGRAMS)
        programs.append(chord_program)
        track.program(0, 1, chord_program)
        arpeggio = rng.random() < 0.4
        for index, root in enumerate(chord_roots):
            start = index * beats_per_chord
            pitches = [scale_pitch(root + step) - 12 for step in (0, 2, 4)]
            velocity = rng.randint(45, 75)
            if arpeggio:
                steps = int(beats_per_chord * 2)
                for step in range(steps):
                    track.note(ticks(start + step / 2), ticks(0.5), 1, pitches[step % 3], velocity)
            else:
                for pitch in pitches:
                    track.note(ticks(start), ticks(beats_per_chord * 0.98), 1, pitch, velocity)

    if rng.random() < 0.6:
        bass_program = rng.choice(BASS_PROGRAMS)
        programs.append(bass_program)
        track.program(0, 2, bass_program)
        notes_per_chord = max(1, int(beats_per_chord * rng.choice([0.5, 1])))
        for index, root in enumerate(chord_roots):
            pitch = scale_pitch(root) - 24
            for step in range(notes_per_chord):
                start = index * beats_per_chord + step * beats_per_chord / notes_per_chord
                length = beats_per_chord / notes_per_chord * 0.9
                track.note(ticks(start), ticks(length), 2, pitch, rng.randint(70, 100))

    drums = rng.random() < 0.5
    if drums:
        track.program(0, DRUM_CHANNEL, rng.choice(DRUM_KITS))
        for bar in range(bars):
            for eighth in range(beats_per_bar * 2):
                start = ticks(bar * beats_per_bar + eighth / 2)
                if eighth % 2 == 0:
                    beat_in_bar = eighth // 2
                    instrument = 36 if beat_in_bar % 2 == 0 else 38  # bass drum or snare
                    track.note(start, ticks(0.25), DRUM_CHANNEL, instrument, rng.randint(80, 115))
                if rng.random() < 0.9:
                    track.note(start, ticks(0.25), DRUM_CHANNEL, 42, rng.randint(50, 85))  # closed hi-hat

    end_tick = ticks(total_beats + RELEASE_TAIL_S * tempo / 60)
    description = {"program": lead, "programs": programs, "drums": drums, "tempo": tempo}
    return track.to_bytes(end_tick), description


def plan_music(split: str, count: int, seed: int) -> list[dict]:
    """Compose the MIDI pieces of one split. Validation pieces lead with held-out instruments."""
    lead_programs = VAL_LEAD_PROGRAMS if split == "val" else TRAIN_LEAD_PROGRAMS
    jobs = []
    for index in range(count):
        rng = random.Random(f"{seed}:music:{split}:{index}")
        midi, description = compose_piece(rng, lead_programs)
        jobs.append({
            "kind": "music",
            "split": split,
            "file": f"{split}/music_{index:05d}.wav",
            "midi": midi,
            "midi_sha1": hashlib.sha1(midi).hexdigest(),
            "description": description,
        })
    return jobs


def render_music(job: dict, out: Path, gain: float) -> dict:
    """Render a MIDI piece with fluidsynth at 16 kHz, trim silence, cut it to 10 s and write the clip."""
    with tempfile.TemporaryDirectory(prefix="mmtok-music-") as directory:
        midi_path = Path(directory) / "piece.mid"
        wav_path = Path(directory) / "piece.wav"
        midi_path.write_bytes(job["midi"])
        command = [
            "fluidsynth", "-n", "-i", "-q",
            "-F", str(wav_path), "-T", "wav", "-O", "float",
            "-r", str(SAMPLE_RATE), "-g", str(gain),
            str(SOUNDFONT), str(midi_path),
        ]
        try:
            run_tool(command)
            audio = trim_silence(read_mono_16k(wav_path))
        except (ToolError, RuntimeError) as error:
            return {"error": str(error)}
    if audio.size > MAX_MUSIC_S * SAMPLE_RATE:
        audio = audio[: int(MAX_MUSIC_S * SAMPLE_RATE)].copy()
        fade = int(FADE_OUT_S * SAMPLE_RATE)
        audio[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    duration = audio.size / SAMPLE_RATE
    if duration < 1.0:
        return {"error": f"render is only {duration:.2f} s long after trimming silence"}
    write_wav(out / job["file"], audio)
    description = job["description"]
    row = {
        "file": job["file"],
        "kind": "music",
        "program": description["program"],
        "program_name": GM_PROGRAM_NAMES.get(description["program"], ""),
        "programs": description["programs"],
        "drums": description["drums"],
        "tempo": description["tempo"],
        "midi_sha1": job["midi_sha1"],
        "duration": round(duration, 3),
    }
    return {"row": row}


def music_row_matches(row: dict, job: dict) -> bool:
    return row.get("midi_sha1") == job["midi_sha1"]


# ---------------------------------------------------------------------------
# Audio stage
# ---------------------------------------------------------------------------


def run_audio_job(arguments: tuple[dict, str, float]) -> tuple[dict, dict]:
    job, out, gain = arguments
    if job["kind"] == "speech":
        return job, synthesize_speech(job, Path(out))
    return job, render_music(job, Path(out), gain)


def prepare_audio(
    out: Path,
    seed: int,
    counts: dict[tuple[str, str], int],
    fortunes: dict[str, list[str]],
    gain: float,
    workers: int,
) -> None:
    """Write the speech and music clips of both splits and their JSON Lines indexes."""
    audio_dir = out / "audio"
    for split in SPLITS:
        (audio_dir / split).mkdir(parents=True, exist_ok=True)
    remove_partial_files(audio_dir)

    voices = list_speech_voices()
    jobs: list[dict] = []
    for split in SPLITS:
        # Speech of each split reads only fortunes of the same text split.
        sentences = speech_sentences(fortunes[split])
        log.info("Speech %s: %d candidate sentences, %d voices", split, len(sentences), len(voices[split]))
        speech_count = counts[("speech", split)]
        if speech_count and (not voices[split] or not sentences):
            raise SystemExit(f"No working voices or sentences for {split} speech. See the warnings above.")
        jobs += plan_speech(split, speech_count, voices[split], sentences, seed)
        jobs += plan_music(split, counts[("music", split)], seed)

    rows: dict[str, dict] = {}
    previous = {row.get("file"): row for split in SPLITS for row in read_jsonl(audio_dir / f"{split}.jsonl")}
    pending = []
    for job in jobs:
        row = previous.get(job["file"])
        matches = speech_row_matches if job["kind"] == "speech" else music_row_matches
        if row is not None and (audio_dir / job["file"]).exists() and matches(row, job):
            rows[job["file"]] = row
        else:
            pending.append(job)
    log.info("Generating %d audio clips with %d workers (%d already done)", len(pending), workers, len(rows))

    def write_indexes() -> None:
        for split in SPLITS:
            split_rows = [rows[job["file"]] for job in jobs if job["split"] == split and job["file"] in rows]
            write_jsonl(audio_dir / f"{split}.jsonl", split_rows)

    failures_by_source: collections.Counter[str] = collections.Counter()
    failed_clips = 0
    started = time.monotonic()
    tasks = [(job, str(audio_dir), gain) for job in pending]
    with multiprocessing.Pool(workers) as pool:
        for done, (job, result) in enumerate(pool.imap_unordered(run_audio_job, tasks), start=1):
            if "row" in result:
                rows[job["file"]] = result["row"]
            else:
                failed_clips += 1
                source = job.get("voice") or f"program {job['description']['program']}"
                failures_by_source[source] += 1
                # Log the first failures of each voice or program, then only count them.
                level = logging.WARNING if failures_by_source[source] <= 2 else logging.DEBUG
                log.log(level, "Skipping %s (%s): %s", job["file"], source, result["error"])
            if done % CHECKPOINT_EVERY == 0:
                write_indexes()
                elapsed = time.monotonic() - started
                log.info("Generated %d of %d audio clips in %.0f s", done, len(pending), elapsed)
    write_indexes()

    if failed_clips:
        log.warning(
            "%d audio clips failed and are left out. Failures by voice or program: %s",
            failed_clips, dict(failures_by_source.most_common()),
        )
    for split in SPLITS:
        keep = {Path(file).name for file in rows if file.startswith(f"{split}/")}
        removed = remove_unlisted_files(audio_dir / split, "*.wav", keep)
        if removed:
            log.info("Removed %d stale clips from %s", removed, audio_dir / split)


# ---------------------------------------------------------------------------
# Summary and command line
# ---------------------------------------------------------------------------


def summarize(out: Path, elapsed_s: float) -> None:
    """Print counts, audio durations and disk usage of everything under ``out`` to stdout."""
    lines = [f"Data in {out.resolve()} (finished in {elapsed_s / 60:.1f} min)"]
    for split in SPLITS:
        path = out / "text" / f"{split}.jsonl"
        if path.exists():
            lines.append(f"  text {split}: {len(read_jsonl(path))} fortunes")
    for split in SPLITS:
        path = out / "image" / f"{split}.jsonl"
        if path.exists():
            lines.append(f"  image {split}: {len(read_jsonl(path))} images")
    total_hours = 0.0
    for split in SPLITS:
        rows = read_jsonl(out / "audio" / f"{split}.jsonl")
        for kind in ("speech", "music"):
            kind_rows = [row for row in rows if row.get("kind") == kind]
            if not kind_rows:
                continue
            seconds = sum(row["duration"] for row in kind_rows)
            total_hours += seconds / 3600
            durations = sorted(row["duration"] for row in kind_rows)
            lines.append(
                f"  audio {split} {kind}: {len(kind_rows)} clips, {seconds / 3600:.2f} h, "
                f"{durations[0]:.1f}-{durations[-1]:.1f} s per clip"
            )
    if total_hours:
        lines.append(f"  audio total: {total_hours:.2f} h")
    for stage in ("text", "image", "audio"):
        if (out / stage).is_dir():
            lines.append(f"  disk {stage}: {format_bytes(directory_size(out / stage))}")
    lines.append(f"  disk total: {format_bytes(directory_size(out))}")
    print("\n".join(lines))


def check_tools(stages: set[str]) -> None:
    """Exit with the package to install when a tool or file that a stage needs is missing."""
    needed = {
        "image": [(OPENCLIPART_ROOT, "openclipart-png")],
        "audio": [("espeak-ng", "espeak-ng"), ("fluidsynth", "fluidsynth"), (SOUNDFONT, "fluid-soundfont-gm")],
        "text": [(FORTUNES_ROOT, "fortunes")],
    }
    # Speech reads the fortunes, so the audio stage needs them too.
    needed["audio"] += needed["text"]
    missing = []
    for stage in sorted(stages):
        for requirement, package in needed[stage]:
            found = requirement.exists() if isinstance(requirement, Path) else shutil.which(requirement)
            if not found:
                missing.append(f"{requirement} (package {package})")
    if missing:
        raise SystemExit("Missing: " + ", ".join(sorted(set(missing))) + ". Install them with apt-get.")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Prepare image, audio and text training data for the default mmtok models from Debian packages.",
    )
    parser.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: data)")
    parser.add_argument("--seed", type=int, default=0, help="seed for subsets, speech and music (default: 0)")
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=["text", "image", "audio"],
        default=["text", "image", "audio"],
        help="stages to run (default: all three)",
    )
    parser.add_argument(
        "--max-images", type=int, default=None, help="maximum number of clip-art images (default: all)"
    )
    parser.add_argument("--speech-train", type=int, default=1500, help="number of training speech clips (default: 1500)")
    parser.add_argument("--speech-val", type=int, default=100, help="number of validation speech clips (default: 100)")
    parser.add_argument("--music-train", type=int, default=600, help="number of training music clips (default: 600)")
    parser.add_argument("--music-val", type=int, default=50, help="number of validation music clips (default: 50)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="fraction of images and fortunes in the validation split (default: 0.05)",
    )
    parser.add_argument("--gain", type=float, default=0.6, help="fluidsynth output gain (default: 0.6)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="number of worker processes (default: CPU count, at most 4). Resizing the largest "
        "clip art took 2 GB of memory per worker with Pillow 13",
    )
    parser.add_argument("--verbose", action="store_true", help="log every skipped item")
    arguments = parser.parse_args(argv)

    for name in ("max_images", "speech_train", "speech_val", "music_train", "music_val"):
        value = getattr(arguments, name)
        if value is not None and value < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more, got {value}")
    if not 0 < arguments.val_fraction < 1:
        parser.error(f"--val-fraction must be between 0 and 1, got {arguments.val_fraction}")
    if arguments.workers < 1:
        parser.error(f"--workers must be at least 1, got {arguments.workers}")
    return arguments


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    logging.basicConfig(
        level=logging.DEBUG if arguments.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    stages = set(arguments.stages)
    check_tools(stages)

    out: Path = arguments.out
    out.mkdir(parents=True, exist_ok=True)
    # Keep generated data out of git wherever --out points.
    write_text_if_changed(out / ".gitignore", "*\n")

    started = time.monotonic()
    fortunes = None
    if "text" in stages or "audio" in stages:
        log.info("Reading fortunes from %s", FORTUNES_ROOT)
        fortunes = split_fortunes(arguments.val_fraction)
    if "text" in stages:
        log.info("Text stage: writing fortune splits")
        write_text_splits(out, fortunes)
    if "image" in stages:
        log.info("Image stage: converting clip art from %s", OPENCLIPART_ROOT)
        prepare_images(out, arguments.seed, arguments.max_images, arguments.val_fraction, arguments.workers)
    if "audio" in stages:
        log.info("Audio stage: synthesizing speech and rendering music")
        counts = {
            ("speech", "train"): arguments.speech_train,
            ("speech", "val"): arguments.speech_val,
            ("music", "train"): arguments.music_train,
            ("music", "val"): arguments.music_val,
        }
        prepare_audio(out, arguments.seed, counts, fortunes, arguments.gain, arguments.workers)
    summarize(out, time.monotonic() - started)


if __name__ == "__main__":
    main()
