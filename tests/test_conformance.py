"""The first-party image, audio and text plugins pass the conformance kit with their bundled tokenizers.

One test per check and modality, so that a failure names both. The kit's own failure
reports are checked on deliberately broken modalities and tokenizers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import draw_picture, speak
from mmtok import MmtokError, Modality, Sample, Tokenizer, Tokens
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


# Settings and the weights hash --------------------------------------------------------------


class ByteTokenizer(Tokenizer):
    """Text as its UTF-8 bytes shifted by ``offset``, in reverse order when ``reverse`` is set.

    A tokenizer with settings and no trained weights. ``stored`` names the settings kept
    in the ``settings`` buffer, so subclasses can leave some out of the weights hash.
    """

    modality = "text"
    stored: tuple[str, ...] = ("offset", "reverse")

    def __init__(self, offset: int = 0, reverse: bool = False) -> None:
        super().__init__()
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self.offset = offset
        self.reverse = reverse
        if self.stored:
            values = [int(getattr(self, name)) for name in self.stored]
            self.register_buffer("settings", torch.tensor(values, dtype=torch.int64))

    @property
    def vocab_size(self) -> int:
        return self.offset + 256

    def encode_batch(self, samples: list[Sample]) -> list[Tokens]:
        tokens = []
        for sample in samples:
            codes = torch.tensor(list(sample.data.encode("utf-8")), dtype=torch.int64) + self.offset
            tokens.append(self.make_tokens(codes.flip(0) if self.reverse else codes, {}))
        return tokens

    def decode(self, tokens: Tokens) -> Sample:
        self.check_tokens(tokens, high=self.vocab_size)
        codes = tokens.codes.flip(0) if self.reverse else tokens.codes
        values = (codes - self.offset).clamp(min=0).tolist()  # ids below the offset, as a generator may emit
        return Sample(bytes(values).decode("utf-8", errors="replace"))

    def to_sequence(self, codes: torch.Tensor, **options) -> torch.Tensor:
        return codes.reshape(-1)

    def from_sequence(self, ids: torch.Tensor, **options) -> torch.Tensor:
        return ids.reshape(-1)

    def card_variables(self) -> dict:
        return {
            "modality": "text",
            "architecture": f"UTF-8 bytes shifted by {self.offset}" + (", reversed" if self.reverse else ""),
            "vocab_size": self.vocab_size,
            "token_rate": "one token per UTF-8 byte",
            "example_suffix": ".txt",
        }


class SettingsOutsideWeights(ByteTokenizer):
    stored = ()


class ReverseOutsideWeights(ByteTokenizer):
    stored = ("offset",)


class NoCard(ByteTokenizer):
    def card_variables(self) -> dict:
        return Tokenizer.card_variables(self)


def byte_checks(folder: Path, tokenizer: Tokenizer, **options) -> ModalityChecks:
    modality = get_plugin_manager().modality("text")
    return ModalityChecks(modality, text_files(folder), tokenizer, workdir=folder, truncated_is_error=False, **options)


def test_weights_free_tokenizer_passes_kit(tmp_path):
    modality = get_plugin_manager().modality("text")
    tokenizer = ByteTokenizer(offset=3, reverse=True)
    ran = check_modality(modality, text_files(tmp_path), tokenizer, workdir=tmp_path, truncated_is_error=False)
    assert ran == list(CHECKS)


def test_kit_reports_empty_state_dict(tmp_path):
    checks = byte_checks(tmp_path, SettingsOutsideWeights(offset=3))
    with pytest.raises(ConformanceError, match="^weights_hash: SettingsOutsideWeights has no parameters or buffers"):
        checks.run("weights_hash")


def test_kit_reports_setting_outside_hash(tmp_path):
    checks = byte_checks(tmp_path, ReverseOutsideWeights(offset=3))
    with pytest.raises(
        ConformanceError, match="^weights_hash: changing the setting reverse from False to True leaves the weights hash"
    ):
        checks.run("weights_hash")


def test_kit_skips_listed_setting_outside_hash(tmp_path):
    checks = byte_checks(tmp_path, ReverseOutsideWeights(offset=3), settings_outside_hash=("reverse",))
    checks.run("weights_hash")


def test_kit_tries_next_value_after_rejection(tmp_path):
    class CappedOffset(ByteTokenizer):
        stored = ("reverse",)

        def __init__(self, offset: int = 0, reverse: bool = False) -> None:
            if offset > 3:
                raise ValueError(f"offset must be <= 3, got {offset}")
            super().__init__(offset, reverse)

    # offset 4 is rejected, so the kit tries 2, which leaves the hash unchanged.
    checks = byte_checks(tmp_path, CappedOffset(offset=3))
    with pytest.raises(ConformanceError, match="^weights_hash: changing the setting offset from 3 to 2 leaves"):
        checks.run("weights_hash")


def test_kit_reports_missing_card_variables(tmp_path):
    checks = byte_checks(tmp_path, NoCard())
    with pytest.raises(ConformanceError, match="^card: card_variables\\(\\) has no modality, architecture, vocab_size"):
        checks.run("card")


def test_kit_reports_card_of_other_modality(tmp_path):
    class AudioCard(ByteTokenizer):
        def card_variables(self) -> dict:
            return {**super().card_variables(), "modality": "audio"}

    with pytest.raises(ConformanceError, match="^card: card_variables\\(\\)\\['modality'\\] is 'audio', not 'text'"):
        byte_checks(tmp_path, AudioCard()).run("card")


def test_kit_reports_nested_metrics(tmp_path):
    tokenizer = ByteTokenizer()
    tokenizer.metrics = {"round_trips": {"exact": 2}}
    with pytest.raises(ConformanceError, match="^card: tokenizer.metrics\\['round_trips'\\] is dict"):
        byte_checks(tmp_path, tokenizer).run("card")
