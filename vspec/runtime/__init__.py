"""The speculative runtime. Never imports triton: it calls :mod:`vspec.ops`, which dispatches."""

from .config import LooseConfig, PruneConfig, SpecConfig, TreeConfig
from .engine import SpecDecoder, SpecOutput, SpecStats

__all__ = ["LooseConfig", "PruneConfig", "SpecConfig", "SpecDecoder", "SpecOutput", "SpecStats", "TreeConfig"]
