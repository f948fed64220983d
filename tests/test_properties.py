"""Property-based tests: any bytes, ids or metadata give a valid result or a clear MmtokError.

Hypothesis generates the inputs. Each example must return or raise :class:`MmtokError`
within the deadline; any other exception, or a slower example, fails the test.
"""

from __future__ import annotations

import json
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mmtok import api
from mmtok.errors import MmtokError
from mmtok.modality import Sample
from mmtok.tokens import Tokens

PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=timedelta(seconds=5), suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
FOLDER = Path(tempfile.mkdtemp(prefix="mmtok-properties-"))

HEADER_KEYS = ["format", "version", "modality", "tokenizer", "tokenizer_hash", "metadata"]
DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.float32, torch.float16, torch.bool]


def load_bytes(data: bytes) -> Tokens | None:
    path = FOLDER / "example.mmtok"
    path.write_bytes(data)
    try:
        return Tokens.load(path)
    except MmtokError as error:
        assert str(path) in str(error)
        return None


@PROPERTY_SETTINGS
@given(st.binary(max_size=2048))
def test_any_bytes_load_or_fail_clearly(data):
    load_bytes(data)


@PROPERTY_SETTINGS
@given(st.binary(min_size=8, max_size=600))
def test_bytes_after_valid_prefix_load_or_fail_clearly(tail):
    # A plausible safetensors start: header length, then the opening of the JSON header.
    load_bytes(len(tail).to_bytes(8, "little") + b'{"codes":' + tail)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def token_files(draw) -> bytes:
    """Safetensors files with a ``codes`` tensor of any small shape and dtype and any header strings."""
    shape = draw(st.lists(st.integers(0, 9), max_size=3))
    dtype = draw(st.sampled_from(DTYPES))
    codes = torch.randint(-3, 100, shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))).to(dtype)
    header = {key: draw(st.text(max_size=12)) for key in draw(st.sets(st.sampled_from(HEADER_KEYS)))}
    if draw(st.booleans()):
        header.update(format="mmtok-tokens", version="1", modality=draw(st.sampled_from(["image", "audio", "text", "x"])))
    if draw(st.booleans()):
        header["metadata"] = json.dumps(draw(json_values))
    return safetensors.torch.save({"codes": codes.contiguous()}, metadata=header)


@PROPERTY_SETTINGS
@given(token_files())
def test_any_header_and_tensor_load_or_fail_clearly(data):
    tokens = load_bytes(data)
    if tokens is not None:
        assert tokens.codes.dtype == torch.int64
        assert isinstance(tokens.metadata, dict)


# Decode -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, object]:
    loaded = {name: api.default_tokenizer(name) for name in ("image", "audio", "text")}
    try:
        loaded["midi"] = api.default_tokenizer("midi")
    except MmtokError:
        pass  # the example plugin is not installed
    return loaded


metadata_values = st.one_of(
    st.integers(-5, 3000), st.integers(-(2**40), 2**40), st.text(max_size=4), st.none(),
    st.lists(st.integers(-5, 80), max_size=5), st.floats(allow_nan=True),
)


@st.composite
def decode_inputs(draw, modality: str, valid_shape: list[int], vocab: int, keys: list[str]) -> Tokens:
    """Codes of the tokenizer's own shape or any small shape, ids around the vocabulary, any metadata."""
    if draw(st.booleans()):
        shape = valid_shape
    else:
        shape = draw(st.lists(st.integers(0, 12), max_size=3))
    seed = draw(st.integers(0, 2**16))
    high = vocab if draw(st.booleans()) else vocab + 3
    low = 0 if draw(st.booleans()) else -2
    codes = torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))
    metadata = {key: draw(metadata_values) for key in draw(st.sets(st.sampled_from(keys)))}
    return codes, metadata


def check_decode(tokenizer, codes: torch.Tensor, metadata: dict) -> None:
    tokens = Tokens(codes, tokenizer.modality, tokenizer.name_or_path, tokenizer.weights_hash(), metadata)
    try:
        sample = tokenizer.decode(tokens)
    except MmtokError:
        event("rejected")
        return
    event("decoded")
    assert isinstance(sample, Sample)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_image_decode_any_codes(tokenizers, data):
    tokenizer = tokenizers["image"]
    grid = tokenizer.grid
    codes, metadata = data.draw(decode_inputs("image", [grid, grid], tokenizer.vocab_size, ["width", "height", "box"]))
    if "box" in metadata and data.draw(st.booleans()):
        metadata["box"] = data.draw(st.lists(st.integers(-3, 70), min_size=4, max_size=4))
    check_decode(tokenizer, codes, metadata)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_audio_decode_any_codes(tokenizers, data):
    tokenizer = tokenizers["audio"]
    frames = data.draw(st.integers(1, 40))
    keys = ["sample_rate", "samples", "channels"]
    codes, metadata = data.draw(decode_inputs("audio", [tokenizer.levels, frames], tokenizer.codebook_size, keys))
    if data.draw(st.booleans()):
        # Plausible values, so that decoding is reached and not only the checks.
        metadata.setdefault("sample_rate", data.draw(st.sampled_from([8000, 16000, 44100, 768000, 768001])))
        metadata.setdefault("samples", data.draw(st.integers(1, frames * tokenizer.hop_length * 3)))
        metadata.setdefault("channels", data.draw(st.integers(1, 3)))
    check_decode(tokenizer, codes, metadata)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_text_decode_any_codes(tokenizers, data):
    tokenizer = tokenizers["text"]
    length = data.draw(st.integers(0, 60))
    codes, metadata = data.draw(decode_inputs("text", [length], tokenizer.vocab_size, ["characters"]))
    check_decode(tokenizer, codes, metadata)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_midi_decode_any_codes(tokenizers, data):
    if "midi" not in tokenizers:
        pytest.skip("the mmtok-midi example plugin is not installed")
    tokenizer = tokenizers["midi"]
    length = data.draw(st.integers(0, 60))
    codes, metadata = data.draw(decode_inputs("midi", [length], tokenizer.vocab_size, ["notes", "seconds"]))
    check_decode(tokenizer, codes, metadata)


# The container checks of the audio reader -----------------------------------------------------


@PROPERTY_SETTINGS
@given(st.binary(max_size=4096), st.sampled_from([b"", b"ID3\x04\x00\x00\x00\x00\x00\x10", b"\xff\xfb\x90\x00", b"OggS\x00"]))
def test_container_checks_any_bytes(data, prefix):
    from mmtok_audio.containers import check_mp3_complete, check_ogg_complete

    for check in (check_mp3_complete, check_ogg_complete):
        try:
            check(Path("x.audio"), prefix + data)
        except MmtokError as error:
            assert "x.audio" in str(error)
