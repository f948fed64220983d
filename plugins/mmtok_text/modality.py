"""Reading and writing UTF-8 text files byte for byte."""

from __future__ import annotations

from pathlib import Path

from mmtok import MmtokError, Modality, Sample
from mmtok.modality import check_input_file

PRETRAINED = Path(__file__).parent / "pretrained"

# Larger text files are rejected: a SentencePiece pass keeps the whole string in memory.
MAX_TEXT_BYTES = 256 * 1024 * 1024


class TextModality(Modality):
    """Plain UTF-8 text, kept exactly: line endings, tabs, runs of spaces and a BOM survive."""

    name = "text"
    suffixes = (".txt", ".md", ".text")
    default_suffix = ".txt"
    default_tokenizer = "mmtok/text-tokenizer"

    def read(self, path: Path) -> Sample:
        path = Path(path)
        size = check_input_file(path)
        if size > MAX_TEXT_BYTES:
            raise MmtokError(f"{path}: file has {size} bytes, over the limit of {MAX_TEXT_BYTES}")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise MmtokError(f"{path}: not valid UTF-8 at byte {error.start}; convert the file to UTF-8") from error
        return Sample(text, {"characters": len(text)})

    def write(self, sample: Sample, path: Path) -> None:
        suffix = Path(path).suffix.lower()
        if suffix not in self.suffixes:
            raise MmtokError(f"{path}: cannot write text as {suffix or '(no suffix)'!r}; use one of {' '.join(self.suffixes)}")
        if not isinstance(sample.data, str):
            raise MmtokError(f"{path}: text samples must hold a str")
        Path(path).write_bytes(sample.data.encode("utf-8"))

    def tokenizer_class(self):
        from mmtok_text.tokenizer import TextTokenizer

        return TextTokenizer

    def train_tokenizer(self, data_dir: Path, output_dir: Path, **options):
        from mmtok_text.train import train_text_tokenizer

        return train_text_tokenizer(data_dir, output_dir, **options)

    def bundled_models(self) -> dict[str, Path]:
        folder = PRETRAINED / "text-tokenizer"
        if (folder / "model.safetensors").is_file():
            return {"mmtok/text-tokenizer": folder}
        return {}
