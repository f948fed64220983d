"""Masked-diffusion generation over the unified token vocabulary."""

from mmtok.generate.model import DiffusionLoss, Generator
from mmtok.generate.sequence import Batch, Layout, build_batch

__all__ = ["Batch", "DiffusionLoss", "Generator", "Layout", "build_batch"]
