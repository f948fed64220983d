"""The first-party image, audio and text plugins pass the conformance kit with their bundled tokenizers.

One test per check and modality, so that a failure names both. The kit's own failure
reports are checked on a deliberately broken modality.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import draw_picture, speak
from mmtok import MmtokError, Modality, Sample
from mmtok.plugins import get_plugin_manager
from mmtok.testing import CHECKS, ConformanceError, ModalityChecks, check_modality


def image_files(folder: Path) -> list[Path]:
    return [draw_picture(folder / "wide.png", (96, 72)), draw_picture(folder / "tall.png", (40, 64), mode="RGBA")]


def audio_files(folder: Path) -> list[Path]:
    return [speak(folder / "short.wav", "Hello."), speak(folder / "longer.wav", "A slightly longer sentence, spoken.")]


def text_files(folder: Path) -> list[Path]:
    (folder / "short.txt").write_text("Tokens, please.\n", encoding="utf-8")
    (folder / "longer.md").write_bytes("# Notes\r\n\tcafé  naïve 中文 😀\n\nTwo  spaces.\n".encode("utf-8"))
    return [folder / "short.txt", folder / "longer.md"]


FILES = {"image": image_files, "audio": audio_files, "text": text_files}
# A text file cut in half is usually still valid text.
OPTIONS = {"image": {}, "audio": {}, "text": {"truncated_is_error": False}}


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict[str, ModalityChecks]:
    """One ModalityChecks per first-party modality, sharing loaded tokenizers and samples."""
    made = {}
    for name, make_files in FILES.items():
        folder = tmp_path_factory.mktemp(name)
        try:
            files = make_files(folder)
        except pytest.skip.Exception:
            continue
        modality = get_plugin_manager().modality(name)
        made[name] = ModalityChecks(modality, files, workdir=folder, **OPTIONS[name])
    return made


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("modality", list(FILES))
def test_first_party_conformance(checks, modality, check):
    if modality not in checks:
        pytest.skip(f"no sample files for {modality} on this machine")
    checks[modality].run(check)


def test_check_modality_runs_every_check(tmp_path):
    modality = get_plugin_manager().modality("text")
    ran = check_modality(modality, text_files(tmp_path), workdir=tmp_path, truncated_is_error=False)
    assert ran == list(CHECKS)


# The kit's failure reports -----------------------------------------------------------------


class LaxText(Modality):
    """A text modality that accepts anything: empty files, bytes that are not UTF-8, any suffix."""

    name = "text"
    suffixes = (".txt",)
    default_suffix = ".txt"
    default_tokenizer = "mmtok/text-tokenizer"

    def read(self, path: Path) -> Sample:
        return Sample(Path(path).read_bytes().decode("utf-8", errors="replace"))

    def write(self, sample: Sample, path: Path) -> None:
        Path(path).write_text(str(sample.data), encoding="utf-8")

    def tokenizer_class(self):
        from mmtok_text import TextTokenizer

        return TextTokenizer


@pytest.fixture
def lax_checks(tmp_path) -> ModalityChecks:
    (tmp_path / "a.txt").write_text("some text")
    return ModalityChecks(LaxText(), [tmp_path / "a.txt"], workdir=tmp_path, truncated_is_error=False)


def test_kit_reports_missing_file_error(lax_checks):
    with pytest.raises(ConformanceError, match="^bad_files: reading a missing file .* raised FileNotFoundError"):
        lax_checks.run("bad_files")


def test_kit_reports_accepted_bad_sample(lax_checks):
    with pytest.raises(ConformanceError, match="^write_rejects_bad_sample: writing Sample\\(None\\) .* raised no error"):
        lax_checks.run("write_rejects_bad_sample")


def test_kit_reports_unknown_check(lax_checks):
    with pytest.raises(ValueError, match="unknown check 'speed'"):
        lax_checks.run("speed")


def test_kit_reports_nondeterministic_encode(tmp_path):
    from mmtok_text import TextTokenizer

    class NoisyTokenizer(TextTokenizer):
        def encode_batch(self, samples):
            tokens = super().encode_batch(samples)
            for item in tokens:
                item.codes[0] = int(torch.randint(0, 3, ()))
            return tokens

    modality = get_plugin_manager().modality("text")
    base = TextTokenizer.from_pretrained("mmtok/text-tokenizer")
    noisy = NoisyTokenizer(proto_size=base.proto.numel(), vocab=base.vocab)
    noisy.load_state_dict(base.state_dict())
    torch.manual_seed(1)
    checks = ModalityChecks(modality, text_files(tmp_path), noisy, workdir=tmp_path)
    with pytest.raises(ConformanceError, match="^(batch|determinism): "):
        for check in ("batch", "determinism"):
            checks.run(check)


def test_kit_needs_sample_files():
    with pytest.raises(ValueError, match="at least one sample file"):
        ModalityChecks(get_plugin_manager().modality("text"), [])


def test_kit_errors_are_assertions():
    assert issubclass(ConformanceError, AssertionError)
    assert not issubclass(ConformanceError, MmtokError)
