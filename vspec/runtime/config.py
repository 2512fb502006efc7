"""Configuration dataclasses of the speculative runtime."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ops import LOOSE_RULE_DEFAULTS
from .pruning import (
    DEFAULT_MASS_FRACTION,
    DEFAULT_PER_FRAME_FLOOR,
    DEFAULT_SCORE_NORM,
    DEFAULT_WEIGHTS,
    SCORE_NORMS,
)
from .pruning import METHODS as PRUNE_METHODS

PRUNE_SOURCES = ("target", "draft")
VERIFY_MODES = ("strict", "loose")
PARALLEL_MODES = ("post", "pre", "pearl")
ANCHOR_DETECTORS = ("hidden", "attention", "grounded", "attribution", "token_ids", "none")


@dataclass(frozen=True)
class PruneConfig:
    """How the draft's visual keep-set is scored.

    ``score_layers``: target decoder layers whose prefill q/k feed ``visual_attention_mass`` (negative indices
    count from the end; ``None`` = every layer). ``query_rows``: how many trailing prompt positions act as the
    text queries (capped by the shortest text tail after the last visual token). ``normalize`` is passed to
    ``visual_attention_mass`` ("visual": HIPPO, "all": SpecVLM). ``weights`` = (attention, temporal, spatial)
    for the "semantic" fusion; ``per_frame_floor`` = minimum kept tokens per frame for "semantic";
    ``mass_fraction`` = SpecVLM's top-mass share for "attention"; ``score_norm`` = min-max normalisation of each
    signal before the "semantic" fusion, per "frame" (HIPPO) or over the row's visual tokens ("global").
    The defaults are ``vspec.runtime.pruning.DEFAULT_*`` (one source for both): global normalisation, attention
    plus a quarter of the temporal novelty, no floor — the best setting of ``python -m vspec bench quality --split
    val --sweep`` on validation clips of the synthetic task; the README's "Quality" section has the figures and
    why. The spatial term's weight is 0 there (on a flat background its neighbourhood variance peaks on the
    NEIGHBOURS of an object): set it for textured video.
    """

    score_layers: tuple[int, ...] | None = None
    query_rows: int = 64
    normalize: str = "visual"
    weights: tuple[float, float, float] = DEFAULT_WEIGHTS
    per_frame_floor: int = DEFAULT_PER_FRAME_FLOOR
    mass_fraction: float = DEFAULT_MASS_FRACTION
    score_norm: str = DEFAULT_SCORE_NORM

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
        if self.score_norm not in SCORE_NORMS:
            raise ValueError(f"PruneConfig.score_norm must be one of {SCORE_NORMS}, got {self.score_norm!r}")


# LooseConfig's defaults, chosen on the demo's validation clips (see LooseConfig's docstring).
LOOSE_DEFAULTS = {"detector": "attribution", "threshold": 4.7144,
                  **{k: LOOSE_RULE_DEFAULTS[k] for k in ("top_k", "min_prob_ratio", "entropy_gate")}}


@dataclass(frozen=True)
class LooseConfig:
    """Loose verification (LVSpec, ``SpecConfig(verify="loose")``): which draft tokens are *anchors* (checked
    exactly) and how loosely the others (fillers) are checked. NOT lossless: measure fidelity before use.

    detector — how anchors are found during the target's verification forward:

    * ``"hidden"`` (LVSpec): relevance of draft token j = mean of the ``top_n`` largest cosine similarities
      between its target hidden state (output of decoder layer ``layer``) and the visual tokens' hidden states
      at the same layer (kept from the prefill); anchor iff relevance >= ``threshold``.
    * ``"attention"``: fraction of draft token j's attention (softmax over all keys, mean over heads and the
      ``attention_layers``) that lands on visual keys, from ``ops.visual_attention_mass``; anchor iff >=
      ``threshold``.
    * ``"grounded"``: ``look · certainty``: the largest attention probability one query head puts on one visual
      key (max over heads, visual keys and the ``visual_layers``, None: every layer) from the query that predicts
      draft token j, times the target's certainty at j's verify position (the top-1 probability of its next-token
      distribution); a filler with synonyms is uncertain, a filler fixed by the text does not look at the video
      (see ``anchors.GroundedDetector``). Anchor iff >= ``threshold``.
    * ``"attribution"``: how far the video pushes the target's candidates apart: the visual keys' direct
      contribution to the residual stream at the position that verifies draft token j (their share of the attention
      output of the ``visual_layers``, None: every layer, through each layer's output projection) is taken out
      before the final norm, and relevance is the spread (max - min) of the resulting logit changes over the
      target's top ``candidates`` tokens there (see ``anchors.AttributionDetector``). Anchor iff >= ``threshold``
      (in logits).
    * ``"token_ids"``: anchor iff the draft token is in ``anchor_token_ids`` (an oracle for tasks whose anchor
      vocabulary is known; also what the tests use).
    * ``"none"``: no anchors, every token is checked loosely.

    Rows without visual tokens are checked strictly by ``"hidden"``, ``"attention"``, ``"grounded"`` and
    ``"attribution"`` (nothing to be relevant to). The filler rule is ``ops.verify_loose``'s: ``top_k``,
    ``min_prob_ratio``, ``shift``, ``entropy_gate``, ``window`` (see its docstring). Zero tolerance (``top_k=1,
    shift=0``) equals strict.
    Defaults (``LOOSE_DEFAULTS``): the ``attribution`` detector over every layer, 5 candidates, threshold 4.7144
    (logits), with the op's filler rule (``ops.LOOSE_RULE_DEFAULTS``: top-3, p >= 0.3 · p(argmax), entropy gate 0.3,
    shift 1). Chosen on validation clips of the demo pair (``python -m vspec bench quality --setting divergent
    --choose-on-val 100``, γ = 6): of every detector, layer set, threshold and rule tried there, the highest MAL
    within 0.2% of strict's task score, ties broken by the higher score (MAL 4.21 against strict's 2.47 at 100.0% of
    its score; the wide rule, top-5 / p >= 0.1 / no gate, reached 4.87 at 99.79% with this detector and 4.98 at
    99.37% with none). ``candidates`` = 5 was chosen there too (ROC AUC against the anchor vocabulary 0.915, against
    0.878 and 0.889 with 3 and 8). Relevance scales differ between models: calibrate ``threshold`` for your pair
    (the benchmark prints relevance quantiles and chooses thresholds on validation clips).
    """

    detector: str = LOOSE_DEFAULTS["detector"]
    threshold: float = LOOSE_DEFAULTS["threshold"]
    top_n: int = 4
    layer: int = 1
    attention_layers: tuple[int, ...] = (-1,)
    visual_layers: tuple[int, ...] | None = None
    candidates: int = 5
    anchor_token_ids: tuple[int, ...] = ()
    top_k: int = LOOSE_DEFAULTS["top_k"]
    min_prob_ratio: float = LOOSE_DEFAULTS["min_prob_ratio"]
    shift: int = LOOSE_RULE_DEFAULTS["shift"]
    entropy_gate: float = LOOSE_DEFAULTS["entropy_gate"]
    window: int = LOOSE_RULE_DEFAULTS["window"]

    def __post_init__(self):
        if self.detector not in ANCHOR_DETECTORS:
            raise ValueError(f"LooseConfig.detector must be one of {ANCHOR_DETECTORS}, got {self.detector!r}")
        if self.top_n < 1:
            raise ValueError(f"LooseConfig.top_n must be >= 1, got {self.top_n}")
        if not self.attention_layers:
            raise ValueError("LooseConfig.attention_layers must name at least one layer")
        if self.visual_layers is not None and not self.visual_layers:
            raise ValueError("LooseConfig.visual_layers must name at least one layer, or be None (every layer)")
        if self.candidates < 2:
            raise ValueError(f"LooseConfig.candidates must be >= 2, got {self.candidates}")
        if self.detector == "token_ids" and not self.anchor_token_ids:
            raise ValueError("LooseConfig(detector='token_ids') needs anchor_token_ids")
        if self.top_k < 1:
            raise ValueError(f"LooseConfig.top_k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.min_prob_ratio <= 1.0:
            raise ValueError(f"LooseConfig.min_prob_ratio must be in [0, 1], got {self.min_prob_ratio}")
        if self.shift < 0 or self.window < 1:
            raise ValueError(f"LooseConfig needs shift >= 0 and window >= 1, got {self.shift}, {self.window}")
        if not 0.0 <= self.entropy_gate <= 1.0:
            raise ValueError(f"LooseConfig.entropy_gate must be in [0, 1], got {self.entropy_gate}")

    def rule(self) -> dict:
        """Keyword arguments of ``ops.verify_loose``."""
        return dict(top_k=self.top_k, min_prob_ratio=self.min_prob_ratio, shift=self.shift,
                    entropy_gate=self.entropy_gate, window=self.window)


@dataclass(frozen=True)
class TreeConfig:
    """Tree drafting (``SpecConfig(tree=TreeConfig(...))``): the draft proposes a token tree instead of a chain and
    the target checks every node in ONE forward (tree attention: a node sees the committed prefix and its own
    ancestors only), verified by ``ops.verify_tree_greedy``. The longest accepted root path is kept.

    Two kinds of tree:

    * dynamic (``width``, ``depth``; EAGLE-2's expansion without its re-ranking): level 1 holds the draft's
      top-``width`` tokens after the last committed token; every further level expands each of the ``width``
      nodes above into its top-``width`` tokens and keeps the ``width`` of those ``width²`` candidates with the
      highest cumulative draft log-probability. N = 1 + width·depth nodes (root included); the shape is chosen
      per row and per round. ``TreeConfig(width=1, depth=γ)`` is chain drafting with ``draft_len=γ``.
    * static (``choices``; Medusa / EAGLE-1 trees): the tree as paths of sibling ranks, e.g.
      ``((0,), (1,), (0, 0))`` = the draft's best and second-best first token and the best token after the best
      (:func:`vspec.runtime.trees.tree_from_choices`). ``width`` (largest level) and ``depth`` (longest path) are
      derived from it and must not be given.

    Per round: ``depth`` draft forwards (the first feeds the committed tokens, each further one the nodes of one
    level) and one target forward over N tokens. ``SpecConfig.draft_len`` is not used when a tree is set.
    Greedy decoding only: ``generate(do_sample=True)`` with a tree raises ``ValueError`` (no silent fallback to the
    chain; lossless tree *sampling* needs a different acceptance rule that vspec does not implement). Trees need
    an attention implementation that accepts a 4-D float mask (``"sdpa"`` or ``"eager"``; not flash-attention).
    Defaults (width 3, depth 5: 16 nodes) are provisional, not tuned.
    """

    width: int | None = None
    depth: int | None = None
    choices: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        if self.choices is None:
            width = 3 if self.width is None else self.width
            depth = 5 if self.depth is None else self.depth
            for name, v in (("width", width), ("depth", depth)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"TreeConfig.{name} must be an int >= 1, got {v!r}")
            object.__setattr__(self, "width", width)
            object.__setattr__(self, "depth", depth)
            return
        from .trees import tree_from_choices

        if self.width is not None or self.depth is not None:
            raise ValueError(f"TreeConfig: give either choices or width/depth, got choices and width={self.width!r}, "
                             f"depth={self.depth!r}")
        if isinstance(self.choices, (str, bytes)):
            raise TypeError(f"TreeConfig.choices must be a sequence of rank tuples, got {self.choices!r}")
        try:
            choices = tuple(sorted({tuple(int(c) for c in ch) for ch in self.choices}, key=lambda p: (len(p), p)))
        except TypeError as exc:
            raise TypeError(f"TreeConfig.choices must be a sequence of rank tuples, got {self.choices!r}") from exc
        choices = tuple(ch for ch in choices if ch)
        if not choices:
            raise ValueError("TreeConfig.choices must hold at least one non-empty path")
        try:
            tree_from_choices(choices)
        except ValueError as exc:
            raise ValueError(f"TreeConfig.choices: {exc}") from None
        present = set(choices)
        for ch in choices:
            if ch[-1] > 0 and ch[:-1] + (ch[-1] - 1,) not in present:
                raise ValueError(f"TreeConfig.choices: {ch} needs its better-ranked sibling {ch[:-1] + (ch[-1] - 1,)}")
        depth = max(len(ch) for ch in choices)
        width = max(sum(len(ch) == d for ch in choices) for d in range(1, depth + 1))
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "depth", depth)

    @property
    def num_nodes(self) -> int:
        """Tree nodes per round, the root (last committed token) included: the target's verify forward length."""
        return 1 + (len(self.choices) if self.choices is not None else self.width * self.depth)


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding settings.

    draft_len: γ, tokens the draft proposes per round (chain mode).
    keep_ratio: fraction of visual tokens the draft sees, in (0, 1]; ``keep_count`` (if set) overrides it.
    prune: one of ``"semantic" | "attention" | "uniform" | "random" | "none"``.
    prune_source: ``"target"`` — scores come from the target's prefill and the draft prefills only the kept
    tokens; ``"draft"`` — the draft prefills every token, scores come from its own prefill, then its cache is
    compacted to the kept rows.
    verify: ``"strict"`` (lossless) or ``"loose"`` (opt-in, greedy only, NOT lossless: see :class:`LooseConfig`
    and the fidelity figures in the README); ``loose`` configures it.
    parallel: parallel speculative decoding (HIPPO / PEARL; :mod:`vspec.runtime.parallel`): the draft works while
    the target verifies. Same output as serial (lossless); on CUDA the draft runs on its own stream (and may sit on
    a second device), on the CPU the same schedule runs sequentially.
    parallel_mode: ``"post"`` — while the target verifies round i, the draft already drafts round i+1 as if
    round i were fully accepted; kept when every row accepted all drafts and the target's bonus token equals the
    draft's first speculative token, else discarded. ``"pre"`` — while the draft drafts, the target checks the
    first draft token (a 1-token forward, one round of its own); the verification of the rest is skipped when
    every row rejected it. ``"pearl"`` — both (PEARL): pre-verify while drafting, post-verify while verifying.
    adaptive_draft_len: choose γ from the cost ratio r = T_target / T_draft (one verification forward over one
    draft forward): γ = clamp(round(r) − 1, 1, draft_len) in ``"post"`` mode (the draft runs γ+1 forwards per
    verification), clamp(round(r), 1, draft_len) in ``"pre"``/``"pearl"``; ``draft_len`` is the cap. r is
    ``draft_time_ratio`` when given (deterministic, any device), else measured with CUDA events on the second of
    two serial warm-up rounds; on the CPU without ``draft_time_ratio`` γ stays ``draft_len`` (reproducible runs).
    draft_time_ratio: a fixed r for ``adaptive_draft_len`` (e.g. from ``bench/bench_parallel.py``).
    seed: seeds the ``"random"`` pruning and sampling when no generator is passed to ``generate``.
    compact_holes: a model's cache is compacted (``compact_kv_``) once this many physical slots are holes in
    every row (rejected speculative slots of rows that accepted less than their neighbours).
    tree: ``None`` (chain drafting of ``draft_len`` tokens) or a :class:`TreeConfig` (tree drafting, greedy and
    ``verify="strict"`` only, serial only).
    compile: the decode forwards of both models at fixed shapes, through ``torch.compile`` (the prefill stays
    eager). ``False`` (default): eager, each forward attends over the slots in use. ``True``: ``torch.compile``'s
    default mode; a string: that ``mode`` (``"reduce-overhead"`` captures CUDA graphs); a dict: keyword arguments
    of ``torch.compile`` (e.g. ``{"backend": "eager"}`` checks the capture without code generation). Fixed
    shapes: every decode forward attends over the whole preallocated storage under a 4-D mask and writes its new
    slots at explicit indices, so its shapes depend only on (batch, new tokens); one compilation per shape. Same
    output as eager (lossless). Not with ``verify="loose"`` (its detectors hook the target's layers).
    """

    draft_len: int = 6
    keep_ratio: float = 0.1
    keep_count: int | None = None
    prune: str = "semantic"
    prune_source: str = "target"
    prune_config: PruneConfig = field(default_factory=PruneConfig)
    verify: str = "strict"
    loose: LooseConfig = field(default_factory=LooseConfig)
    parallel: bool = False
    parallel_mode: str = "post"
    adaptive_draft_len: bool = False
    draft_time_ratio: float | None = None
    seed: int = 0
    compact_holes: int = 64
    tree: TreeConfig | None = None
    compile: bool | str | dict = False

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
        if not isinstance(self.loose, LooseConfig):
            raise TypeError(f"SpecConfig.loose must be a LooseConfig, got {type(self.loose).__name__}")
        if self.tree is not None:
            if not isinstance(self.tree, TreeConfig):
                raise TypeError(f"SpecConfig.tree must be None or a TreeConfig, got {type(self.tree).__name__}")
            if self.verify != "strict":
                raise ValueError(f"SpecConfig.tree needs verify='strict' (tree verification is greedy and exact), "
                                 f"got verify={self.verify!r}")
            if self.parallel:
                raise ValueError("SpecConfig.tree cannot be combined with parallel=True (tree drafting is serial)")
        if self.parallel_mode not in PARALLEL_MODES:
            raise ValueError(f"SpecConfig.parallel_mode must be one of {PARALLEL_MODES}, got {self.parallel_mode!r}")
        if self.draft_time_ratio is not None and not float(self.draft_time_ratio) > 0:
            raise ValueError(f"SpecConfig.draft_time_ratio must be None or > 0, got {self.draft_time_ratio}")
        if (self.adaptive_draft_len or self.draft_time_ratio is not None) and not self.parallel:
            raise ValueError("SpecConfig.adaptive_draft_len / draft_time_ratio need parallel=True")
        if self.draft_time_ratio is not None and not self.adaptive_draft_len:
            raise ValueError("SpecConfig.draft_time_ratio is used by adaptive_draft_len=True only; set both")
        if not isinstance(self.compile, (bool, str, dict)):
            raise TypeError(f"SpecConfig.compile must be a bool, a torch.compile mode or a dict of torch.compile "
                            f"arguments, got {type(self.compile).__name__}")
        if self.compile is not False and self.verify == "loose":
            raise ValueError("SpecConfig.compile cannot be combined with verify='loose' (its anchor detectors hook "
                             "the target's layers during the verify forward); use the eager path")
        if self.parallel and self.verify == "loose" and self.parallel_mode != "post":
            raise ValueError(f"SpecConfig(parallel=True, verify='loose') supports parallel_mode='post' only, got "
                             f"{self.parallel_mode!r}")
