"""The speculative runtime. Never imports triton: it calls :mod:`vspec.ops`, which dispatches."""

from .config import PruneConfig, SpecConfig
from .engine import SpecDecoder, SpecOutput, SpecStats

__all__ = ["PruneConfig", "SpecConfig", "SpecDecoder", "SpecOutput", "SpecStats"]
