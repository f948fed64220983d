import pytest
import torch

from mmtok import MmtokError, Tokens, TokenSpace


def make_tokens() -> Tokens:
    return Tokens(
        codes=torch.arange(12).reshape(3, 4),
        modality="image",
        tokenizer="some/tokenizer",
        tokenizer_hash="0123456789abcdef",
        metadata={"width": 40, "height": 30, "box": [0, 5, 40, 30]},
    )


def test_token_file_round_trip(tmp_path):
    tokens = make_tokens()
    path = tmp_path / "x.png.mmtok"
    tokens.save(path)
    loaded = Tokens.load(path)
    assert torch.equal(loaded.codes, tokens.codes)
    assert loaded.modality == "image"
    assert loaded.tokenizer == "some/tokenizer"
    assert loaded.tokenizer_hash == "0123456789abcdef"
    assert loaded.metadata == tokens.metadata


def test_token_file_refuses_overwrite(tmp_path):
    path = tmp_path / "x.mmtok"
    make_tokens().save(path)
    with pytest.raises(MmtokError, match="exists"):
        make_tokens().save(path)
    make_tokens().save(path, force=True)


@pytest.mark.parametrize("content", [b"", b"garbage bytes that are not safetensors", b"\xff" * 100])
def test_token_file_corrupt(tmp_path, content):
    path = tmp_path / "bad.mmtok"
    path.write_bytes(content)
    with pytest.raises(MmtokError, match="bad.mmtok"):
        Tokens.load(path)


def test_token_file_truncated(tmp_path):
    path = tmp_path / "cut.mmtok"
    data = make_tokens().to_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(MmtokError, match="cut.mmtok"):
        Tokens.load(path)


def test_token_file_wrong_format(tmp_path):
    import safetensors.torch

    path = tmp_path / "other.mmtok"
    safetensors.torch.save_file({"codes": torch.zeros(3, dtype=torch.int64)}, str(path), metadata={"format": "x"})
    with pytest.raises(MmtokError, match="not an mmtok token file"):
        Tokens.load(path)


def test_token_space_layout():
    space = TokenSpace(
        [
            {"modality": "text", "tokenizer": "t", "tokenizer_hash": "a", "size": 10},
            {"modality": "image", "tokenizer": "i", "tokenizer_hash": "b", "size": 5},
        ]
    )
    assert space.special_tokens == ["<pad>", "<mask>", "<text>", "</text>", "<image>", "</image>"]
    assert space.range("text").offset == 6
    assert space.range("image").offset == 16
    assert space.vocab_size == 21
    ids = space.to_global("image", torch.tensor([0, 4]))
    assert ids.tolist() == [16, 20]
    assert space.to_local("image", ids).tolist() == [0, 4]
    assert space.begin_id("image") == 4
    assert space.end_id("text") == 3


def test_token_space_rejects_out_of_range():
    space = TokenSpace([{"modality": "text", "tokenizer": "t", "tokenizer_hash": "a", "size": 10}])
    with pytest.raises(MmtokError, match=r"\[0, 10\)"):
        space.to_global("text", torch.tensor([10]))
    with pytest.raises(MmtokError, match="outside"):
        space.to_local("text", torch.tensor([1]))
    with pytest.raises(MmtokError, match="not in this generator"):
        space.range("audio")
