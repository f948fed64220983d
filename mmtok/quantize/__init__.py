"""The shared codebook quantizers used by every continuous modality.

All quantizers subclass :class:`Quantizer`: ``forward(z)`` returns a
:class:`QuantizerOutput` (codes, quantized vectors, commitment loss, usage, perplexity)
and ``lookup(codes)`` returns the same vectors from the codes alone.

- :class:`VectorQuantizer`: one codebook learned by EMA, as in van den Oord et al.
  (2017), "Neural Discrete Representation Learning" (appendix A.1), with k-means++
  seeding from the first batch and restarts of dead codes from recent encoder outputs,
  as SoundStream does.
- :class:`CosineVectorQuantizer` and :class:`FactorizedVectorQuantizer`: l2-normalised
  codes and a low-dimensional lookup projection, from Yu et al. (2021),
  "Vector-quantized Image Modeling with Improved VQGAN" (ViT-VQGAN).
- :class:`ResidualVectorQuantizer`: residual stacking of codebooks from Zeghidour et
  al. (2021), "SoundStream: An End-to-End Neural Audio Codec", with the number of levels
  chosen per call.
- :class:`FiniteScalarQuantizer`: Mentzer et al. (2023), "Finite Scalar Quantization:
  VQ-VAE Made Simple", a fixed grid that cannot collapse.

Nearest-code search (:func:`nearest_codes`) always runs in float32, chunked over rows so
that memory stays O(chunk x K) and never O(N x K).
"""

from mmtok.quantize.base import Quantizer, QuantizerOutput, batch_statistics, straight_through
from mmtok.quantize.fsq import FiniteScalarQuantizer
from mmtok.quantize.residual import ResidualVectorQuantizer
from mmtok.quantize.search import SEARCH_CHUNK_ROWS, kmeans_plus_plus, nearest_codes
from mmtok.quantize.vq import CosineVectorQuantizer, FactorizedVectorQuantizer, VectorQuantizer

__all__ = [
    "SEARCH_CHUNK_ROWS",
    "CosineVectorQuantizer",
    "FactorizedVectorQuantizer",
    "FiniteScalarQuantizer",
    "Quantizer",
    "QuantizerOutput",
    "ResidualVectorQuantizer",
    "VectorQuantizer",
    "batch_statistics",
    "kmeans_plus_plus",
    "nearest_codes",
    "straight_through",
]
