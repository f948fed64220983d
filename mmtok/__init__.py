"""mmtok: turn any modality into discrete tokens and generate new ones."""

from mmtok.errors import MmtokError, PluginError
from mmtok.hookspecs import hookimpl
from mmtok.hub import HubModel, load_model
from mmtok.modality import Modality, Sample
from mmtok.plugins import get_plugin_manager
from mmtok.quantize import (
    CosineVectorQuantizer,
    FactorizedVectorQuantizer,
    FiniteScalarQuantizer,
    Quantizer,
    QuantizerOutput,
    ResidualVectorQuantizer,
    VectorQuantizer,
)
from mmtok.tokenizer import Tokenizer
from mmtok.tokens import TokenSpace, Tokens
from mmtok.generate import Generator  # noqa: E402  (imports mmtok.hub and mmtok.tokens)
from mmtok.pipeline import Pipeline  # noqa: E402  (imports mmtok.generate)

__version__ = "0.1.0"

__all__ = [
    "CosineVectorQuantizer",
    "FactorizedVectorQuantizer",
    "FiniteScalarQuantizer",
    "Generator",
    "HubModel",
    "MmtokError",
    "Modality",
    "Pipeline",
    "PluginError",
    "Quantizer",
    "QuantizerOutput",
    "ResidualVectorQuantizer",
    "Sample",
    "TokenSpace",
    "Tokenizer",
    "Tokens",
    "VectorQuantizer",
    "get_plugin_manager",
    "hookimpl",
    "load_model",
]
