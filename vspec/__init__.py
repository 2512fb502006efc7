"""vspec: fused Triton kernels and a thin runtime for lossless speculative decoding of Video-LLMs.

Public API: :mod:`vspec.ops` (the fused ops), :class:`SpecConfig`, :class:`SpecDecoder`, :func:`apply_vspec`.
"""

from . import ops
from .patch import VSpecHandle, apply_vspec
from .runtime import LooseConfig, PruneConfig, SpecConfig, SpecDecoder, SpecOutput, SpecStats, TreeConfig

__version__ = "0.1.0"

__all__ = [
    "ops",
    "SpecConfig",
    "LooseConfig",
    "PruneConfig",
    "TreeConfig",
    "SpecDecoder",
    "SpecOutput",
    "SpecStats",
    "apply_vspec",
    "VSpecHandle",
    "__version__",
]
