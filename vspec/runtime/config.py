"""Configuration dataclasses of the speculative runtime."""

from __future__ import annotations

from dataclasses import dataclass, field

PRUNE_METHODS = ("semantic", "attention", "uniform", "random", "none")
PRUNE_SOURCES = ("target", "draft")
VERIFY_MODES = ("strict", "loose")


@dataclass(frozen=True)
class PruneConfig:
    """How the draft's visual keep-set is scored.

    ``score_layers``: target decoder layers whose prefill q/k feed ``visual_attention_mass`` (negative indices
    count from the end; ``None`` = every layer). ``query_rows``: how many trailing prompt positions act as the
    text queries (capped by the shortest text tail after the last visual token). ``normalize`` is passed to
    ``visual_attention_mass`` ("visual": HIPPO, "all": SpecVLM). ``weights`` = (attention, temporal, spatial)
    for the "semantic" fusion; ``per_frame_floor`` = minimum kept tokens per frame for "semantic";
    ``mass_fraction`` = SpecVLM's top-mass share for "attention". Defaults are provisional until the quality
    benchmark (issue 9) tunes them.
    """

    score_layers: tuple[int, ...] | None = None
    query_rows: int = 64
    normalize: str = "visual"
    weights: tuple[float, float, float] = (1.0, 0.5, 0.5)
    per_frame_floor: int = 1
    mass_fraction: float = 0.4

    def __post_init__(self):
        if self.normalize not in ("visual", "all"):
            raise ValueError(f"PruneConfig.normalize must be 'visual' or 'all', got {self.normalize!r}")
        if self.query_rows < 1:
            raise ValueError(f"PruneConfig.query_rows must be >= 1, got {self.query_rows}")
        if len(self.weights) != 3 or any(w < 0 for w in self.weights):
            raise ValueError(f"PruneConfig.weights must be three non-negative floats, got {self.weights}")
        if self.per_frame_floor < 0:
            raise ValueError(f"PruneConfig.per_frame_floor must be >= 0, got {self.per_frame_floor}")
        if not 0.0 < self.mass_fraction <= 1.0:
            raise ValueError(f"PruneConfig.mass_fraction must be in (0, 1], got {self.mass_fraction}")


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding settings.

    draft_len: γ, tokens the draft proposes per round (chain mode).
    keep_ratio: fraction of visual tokens the draft sees, in (0, 1]; ``keep_count`` (if set) overrides it.
    prune: one of ``"semantic" | "attention" | "uniform" | "random" | "none"``.
    prune_source: ``"target"`` — scores come from the target's prefill and the draft prefills only the kept
    tokens; ``"draft"`` — the draft prefills every token, scores come from its own prefill, then its cache is
    compacted to the kept rows.
    verify: ``"strict"`` (lossless) or ``"loose"`` (opt-in, not lossless; issue 8).
    parallel: run the draft of round i+1 while round i is verified (issue 7).
    seed: seeds the ``"random"`` pruning and sampling when no generator is passed to ``generate``.
    compact_holes: a model's cache is compacted (``compact_kv_``) once this many physical slots are holes in
    every row (rejected speculative slots of rows that accepted less than their neighbours).
    """

    draft_len: int = 6
    keep_ratio: float = 0.1
    keep_count: int | None = None
    prune: str = "semantic"
    prune_source: str = "target"
    prune_config: PruneConfig = field(default_factory=PruneConfig)
    verify: str = "strict"
    parallel: bool = False
    seed: int = 0
    compact_holes: int = 64

    def __post_init__(self):
        if not isinstance(self.draft_len, int) or self.draft_len < 1:
            raise ValueError(f"SpecConfig.draft_len must be an int >= 1, got {self.draft_len!r}")
        if not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ValueError(f"SpecConfig.keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.keep_count is not None and (not isinstance(self.keep_count, int) or self.keep_count < 1):
            raise ValueError(f"SpecConfig.keep_count must be None or an int >= 1, got {self.keep_count!r}")
        if self.prune not in PRUNE_METHODS:
            raise ValueError(f"SpecConfig.prune must be one of {PRUNE_METHODS}, got {self.prune!r}")
        if self.prune_source not in PRUNE_SOURCES:
            raise ValueError(f"SpecConfig.prune_source must be one of {PRUNE_SOURCES}, got {self.prune_source!r}")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"SpecConfig.verify must be one of {VERIFY_MODES}, got {self.verify!r}")
        if self.compact_holes < 1:
            raise ValueError(f"SpecConfig.compact_holes must be >= 1, got {self.compact_holes}")
        if self.verify == "loose":
            raise NotImplementedError("SpecConfig(verify='loose'): loose verification (issue 8) is not implemented yet")
        if self.parallel:
            raise NotImplementedError("SpecConfig(parallel=True): parallel speculative decoding (issue 7) is not "
                                      "implemented yet")
