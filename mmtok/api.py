"""The Python API behind the command line: load models, encode, decode and generate.

Each function works on files or in-memory samples, so the CLI stays a thin layer::

    from mmtok import api
    tokens = api.encode_file("song.wav")
    sample = api.decode_tokens(tokens)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from mmtok.errors import MmtokError
from mmtok.hub import HubModel, bundled_models, load_model
from mmtok.modality import Sample
from mmtok.plugins import get_plugin_manager
from mmtok.tokenizer import Tokenizer
from mmtok.tokens import Tokens

if TYPE_CHECKING:
    from mmtok.pipeline import Pipeline

logger = logging.getLogger(__name__)

DEFAULT_GENERATOR = "mmtok/generator"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map ``auto``, ``cpu`` or ``cuda`` (optionally ``cuda:N``) to a torch device."""
    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MmtokError(f"device {device!r} requested, but CUDA is not available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise MmtokError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return torch.device(device)


_loaded: dict[tuple[str, str], HubModel] = {}


def load_cached(name_or_path: str, device: torch.device | str = "cpu") -> HubModel:
    """Load a model once per process and device."""
    key = (str(name_or_path), str(device))
    if key not in _loaded:
        _loaded[key] = load_model(str(name_or_path)).to(device).eval()
    return _loaded[key]


def load_tokenizer(name_or_path: str, modality: str | None = None, device: torch.device | str = "cpu") -> Tokenizer:
    """Load a tokenizer by name or path and check that it handles ``modality``."""
    model = load_cached(name_or_path, device)
    if not isinstance(model, Tokenizer):
        raise MmtokError(f"{name_or_path}: is not a tokenizer but a model of class {type(model).__name__}")
    if modality is not None and model.modality != modality:
        raise MmtokError(f"{name_or_path}: is a tokenizer for {model.modality}, but the input is {modality}")
    return model


def default_tokenizer(modality: str, device: torch.device | str = "cpu") -> Tokenizer:
    """Load the default tokenizer of a registered modality."""
    entry = get_plugin_manager().modality(modality)
    if not entry.default_tokenizer:
        raise MmtokError(f"modality {modality!r} has no default tokenizer; pass --tokenizer")
    return load_tokenizer(entry.default_tokenizer, modality, device)


def read_sample(path: Path, modality: str | None = None) -> tuple[str, Sample]:
    """Read a file with the named modality, or the one its suffix selects."""
    manager = get_plugin_manager()
    entry = manager.modality(modality) if modality else manager.modality_for_file(Path(path))
    return entry.name, entry.read(Path(path))


def encode_file(
    path: Path,
    tokenizer: Tokenizer | str | None = None,
    modality: str | None = None,
    device: torch.device | str = "cpu",
    options: dict[str, Any] | None = None,
) -> Tokens:
    """Read and encode one file; the tokenizer defaults to the modality's default.

    ``options`` are keyword options of the tokenizer's ``encode_batch``, such as the image
    tokenizer's ``resize``.
    """
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer, device=device)
    if tokenizer is not None and modality is None:
        modality = tokenizer.modality
    modality_name, sample = read_sample(Path(path), modality)
    if tokenizer is None:
        tokenizer = default_tokenizer(modality_name, device)
    elif tokenizer.modality != modality_name:
        raise MmtokError(f"{path}: is {modality_name}, but the tokenizer encodes {tokenizer.modality}")
    options = options or {}
    tokenizer.check_encode_options(options)
    try:
        return tokenizer.encode(sample, **options)
    except MmtokError as error:
        raise MmtokError(f"{path}: {error}") from error


def decode_tokens(
    tokens: Tokens, tokenizer: Tokenizer | str | None = None, device: torch.device | str = "cpu"
) -> Sample:
    """Decode tokens with the given tokenizer, or the bundled one recorded in them.

    Without ``tokenizer``, only a bundled tokenizer is loaded by the name the token file
    records: a token file from elsewhere must not choose a folder or Hub repo to load.
    """
    if tokenizer is None:
        if tokens.tokenizer not in bundled_models():
            raise MmtokError(
                f"tokens were made by tokenizer {tokens.tokenizer!r}, which is not bundled; "
                f"pass it explicitly (--tokenizer NAME_OR_PATH) if you trust it"
            )
        tokenizer = tokens.tokenizer
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer, tokens.modality, device)
    return tokenizer.decode(tokens)


def write_sample(sample: Sample, modality: str, path: Path, *, force: bool = False) -> None:
    """Write a sample atomically with the modality's writer."""
    get_plugin_manager().modality(modality).save(sample, Path(path), force=force)


_pipelines: dict[tuple[str, str], "Pipeline"] = {}


def load_pipeline(name_or_path: str = DEFAULT_GENERATOR, device: torch.device | str = "cpu") -> "Pipeline":
    """Load a pipeline, or a bare generator with its recorded tokenizers, once per process and device.

    Every tokenizer must match the vocabulary size and weights hash that the generator
    recorded for its modality.
    """
    from mmtok.pipeline import Pipeline

    key = (str(name_or_path), str(device))
    if key not in _pipelines:
        _pipelines[key] = Pipeline.from_pretrained(str(name_or_path)).to(device)
    return _pipelines[key]


def generate(
    modality: str,
    n: int = 1,
    *,
    model: str = DEFAULT_GENERATOR,
    device: torch.device | str = "cpu",
    **options: Any,
) -> list[Sample]:
    """Generate ``n`` samples of ``modality`` with a generator or pipeline, loaded once per process.

    ``options`` are those of :meth:`mmtok.Pipeline.generate`: ``steps``, ``sampler``,
    ``unmasking``, ``temperature``, ``top_p``, ``seed``, ``prompt``, ``conditions``,
    ``guidance`` and ``show_progress``.
    """
    return load_pipeline(model, device).generate(modality, n, **options)


def inpaint(
    modality: str,
    sample: Sample,
    region: Sequence[float],
    n: int = 1,
    *,
    model: str = DEFAULT_GENERATOR,
    device: torch.device | str = "cpu",
    **options: Any,
) -> list[Sample]:
    """Regenerate the part of ``sample`` under ``region`` with a generator or pipeline.

    ``region`` and ``options`` are those of :meth:`mmtok.Pipeline.inpaint`.
    """
    return load_pipeline(model, device).inpaint(modality, sample, region, n, **options)
