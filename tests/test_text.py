import pytest
import torch

from mmtok import MmtokError, Sample
from mmtok.api import default_tokenizer
from mmtok_text import TextModality, TextTokenizer

modality = TextModality()

CASES = [
    "Hello, world!",
    "中文测试，没有空格。",
    "emoji 😀🎉👍🏽 and flags 🇫🇮",
    "   leading and trailing spaces   ",
    "tabs\tand\t\ttabs",
    "line one\nline two\r\nline three\rend",
    "\n\n\nonly newlines\n\n",
    "\ufeffbyte order mark",
    "zero\x00byte and \x7f delete",
    "Ωμέγα, кириллица, עברית, العربية, हिन्दी",
    "a" * 3000,
]


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return default_tokenizer("text")


@pytest.mark.parametrize("text", CASES)
def test_exact_round_trip(tokenizer, text):
    tokens = tokenizer.encode(Sample(text))
    assert tokens.codes.dtype == torch.int64
    assert int(tokens.codes.max()) < tokenizer.vocab_size
    assert tokenizer.decode(tokens).data == text


def test_file_round_trip_byte_for_byte(tokenizer, notes, tmp_path):
    tokens = tokenizer.encode_file(notes)
    tokenizer.decode_to_file(tokens, tmp_path / "back.txt")
    assert (tmp_path / "back.txt").read_bytes() == notes.read_bytes()


def test_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(MmtokError, match="latin1.txt: not valid UTF-8 at byte 3"):
        modality.read(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(MmtokError, match="empty.txt: file is empty"):
        modality.read(path)


def test_save_load_keeps_model(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "text")
    loaded = TextTokenizer.from_pretrained(tmp_path / "text")
    text = "The proto travels inside model.safetensors."
    assert torch.equal(loaded.encode(Sample(text)).codes, tokenizer.encode(Sample(text)).codes)
    assert sorted(p.name for p in (tmp_path / "text").iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_train_small_tokenizer():
    lines = [f"line {i}: the cat sat on the mat while dog {i * 7} ran past a bird in hand" for i in range(400)]
    # Byte fallback alone needs 256 pieces, so SentencePiece's smallest vocabulary is about 270.
    small = TextTokenizer.train_from_lines(lines, vocab_size=290)
    assert small.vocab_size == 290
    assert small.decode_text(small.encode_text("the cat 中")) == "the cat 中"


def test_train_vocabulary_too_large():
    with pytest.raises(MmtokError, match="Vocabulary size too high"):
        TextTokenizer.train_from_lines(["tiny corpus"] * 5, vocab_size=5000)
