"""Anchor detection for loose verification (LVSpec): which draft tokens are visually relevant.

A detector watches the target's prefill (to learn where and what the visual tokens are) and its verification
forwards (to score each draft token), and returns ``strict [B, γ]``: True where the draft token is an anchor
and must match the target's argmax exactly. Detectors never change the target's outputs: the hidden-state
detector reads a decoder layer's output through a forward hook, the attention detector reads q/k through the
same registered attention wrapper that the prune scoring uses (:mod:`vspec.runtime.capture`); the grounded detector
reads q/k the same way and the verification forward's logits (a wrapper around ``ModelState.forward``).
"""

from __future__ import annotations

import contextlib
import threading

import torch

from .. import ops
from .capture import capturing
from .config import LooseConfig
from .devices import on_device

_TRACE: list | None = None


@contextlib.contextmanager
def tracing():
    """Collect ``(drafts, relevance)`` CPU tensor pairs of every verification round of the hidden-state and
    attention detectors inside the block (the quality benchmark uses it to measure detectors and pick thresholds).
    """
    global _TRACE
    prev, _TRACE = _TRACE, []
    try:
        yield _TRACE
    finally:
        _TRACE = prev


def _trace(drafts: torch.Tensor, relevance: torch.Tensor) -> None:
    if _TRACE is not None:
        _TRACE.append((drafts.detach().cpu(), relevance.detach().cpu()))


def make_detector(config: LooseConfig, target, adapter):
    """The detector ``config.detector`` names, bound to ``target``."""
    if config.detector == "hidden":
        return HiddenStateDetector(config, target, adapter)
    if config.detector == "attention":
        return AttentionDetector(config, target)
    if config.detector == "grounded":
        return GroundedDetector(config, target)
    if config.detector == "attribution":
        return AttributionDetector(config, target, adapter)
    if config.detector == "token_ids":
        return TokenIdDetector(config)
    return NoAnchors()


class _Detector:
    """Interface. ``prefill`` wraps the target's prefill forward, ``verify`` its verification forward; after
    the latter, :meth:`strict` gives the anchor mask of the round's draft tokens."""

    def prefill(self, visual_idx: torch.Tensor):
        return contextlib.nullcontext()

    def verify(self, drafts: torch.Tensor, state):
        """Context around the verification forward of ``drafts`` on ``state`` (the target's ModelState)."""
        return contextlib.nullcontext()

    def strict(self, drafts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select_rows(self, idx: torch.Tensor) -> None:
        pass

    def compacted(self, valid_before: torch.Tensor) -> None:
        """The target's cache was compacted: remap any physical slot indices held."""


class NoAnchors(_Detector):
    def strict(self, drafts):
        return torch.zeros_like(drafts, dtype=torch.bool)


class TokenIdDetector(_Detector):
    """Anchor iff the draft token is in a fixed set of ids (oracle for tasks with a known anchor vocabulary)."""

    def __init__(self, config: LooseConfig):
        self.ids = torch.tensor(sorted(set(config.anchor_token_ids)), dtype=torch.long)

    def strict(self, drafts):
        if self.ids.device != drafts.device:
            self.ids = self.ids.to(drafts.device)
        return torch.isin(drafts, self.ids)


def _layer_index(i: int, n_layers: int) -> int:
    if not -n_layers <= i < n_layers:
        raise ValueError(f"layer {i} out of range for a target with {n_layers} decoder layers")
    return i % n_layers


class HiddenStateDetector(_Detector):
    """LVSpec relevance: mean of the top-N cosine similarities between a draft token's hidden state and the
    visual tokens' hidden states, both taken at the output of one target decoder layer."""

    def __init__(self, config: LooseConfig, target, adapter):
        self.config = config
        layers = adapter.language_model().layers
        self.layer = layers[_layer_index(config.layer, len(layers))]
        self.visual: torch.Tensor | None = None  # [B, Nv, H] unit vectors, zero rows at padding
        self.visual_ok: torch.Tensor | None = None  # [B, Nv] bool
        self._hidden: torch.Tensor | None = None
        self.last_relevance: torch.Tensor | None = None

    @contextlib.contextmanager
    def _hook(self):
        owner = threading.get_ident()

        def grab(_module, _args, output):
            if threading.get_ident() == owner:  # the layer is shared: other threads' forwards fire this hook too
                self._hidden = output[0] if isinstance(output, tuple) else output

        handle = self.layer.register_forward_hook(grab)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def prefill(self, visual_idx):
        with self._hook():
            yield
        h = self._hidden.to(visual_idx.device)  # a sharded target's layer may run on another device
        self._hidden = None
        ok = visual_idx >= 0
        g = torch.gather(h, 1, visual_idx.clamp_min(0)[..., None].expand(-1, -1, h.shape[-1])).float()
        self.visual = torch.nn.functional.normalize(g, dim=-1) * ok[..., None]
        self.visual_ok = ok

    def verify(self, drafts, state):
        return self._hook()

    def strict(self, drafts):
        gamma = drafts.shape[1]
        h = self._hidden[:, -gamma:].to(drafts.device)  # the draft tokens' inputs (sharded: from the layer's device)
        h = torch.nn.functional.normalize(h.float(), dim=-1)
        self._hidden = None
        cos = torch.bmm(h, self.visual.transpose(1, 2))  # [B, γ, Nv]
        cos = cos.masked_fill(~self.visual_ok[:, None, :], float("-inf"))
        n = min(self.config.top_n, cos.shape[-1])
        if n == 0:
            return torch.ones_like(drafts, dtype=torch.bool)
        top = cos.topk(n, dim=-1).values
        # rows with fewer than n visual tokens: average the finite ones
        finite = torch.isfinite(top)
        rel = torch.where(finite, top, 0.0).sum(-1) / finite.sum(-1).clamp_min(1)
        self.last_relevance = rel
        _trace(drafts, rel)
        has_visual = self.visual_ok.any(dim=1, keepdim=True)
        return (rel >= self.config.threshold) | ~has_visual

    def select_rows(self, idx):
        self.visual, self.visual_ok = self.visual[idx], self.visual_ok[idx]


class AttentionDetector(_Detector):
    """Fraction of a draft token's attention on the visual keys (softmax over all keys; mean over heads and
    the configured layers), from ``ops.visual_attention_mass`` — one call per draft token and layer, keys cut
    at the token's own slot so its query is the last one (the op's causal convention)."""

    def __init__(self, config: LooseConfig, target):
        self.config = config
        self.target = target
        n_layers = target.config.get_text_config().num_hidden_layers
        self.layers = frozenset(_layer_index(i, n_layers) for i in config.attention_layers)
        self.visual_idx: torch.Tensor | None = None  # [B, Nv] physical slots in the target cache, −1 padding
        self.mass: torch.Tensor | None = None
        self._gamma = 0
        self._state = None
        self._seen = 0
        self.last_relevance: torch.Tensor | None = None

    @contextlib.contextmanager
    def prefill(self, visual_idx):
        self.visual_idx = visual_idx
        yield

    def record(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, **_) -> None:
        """Called by the capture wrapper for every text layer of the verification forward."""
        if layer_idx not in self.layers:
            return
        S = key.shape[2]
        gamma = self._gamma
        L = query.shape[2]
        dev = query.device  # a sharded target's layer may run on another device than the runtime's tensors
        visual_idx, valid = self.visual_idx.to(dev), self._state.valid.to(dev)
        for j in range(gamma):
            row = L - gamma + j  # query row of draft token j
            stop = S - (L - 1 - row)
            with on_device(dev):
                m = ops.visual_attention_mass(query[:, :, row:row + 1], key[:, :, :stop], visual_idx,
                                              attention_mask=valid[:, :stop], normalize="all",
                                              check_indices=False)  # runtime-built indices: no host sync
            self.mass[:, j] += m.sum(dim=1).to(self.mass.device)
        self._seen += 1

    @contextlib.contextmanager
    def verify(self, drafts, state):
        self._gamma = drafts.shape[1]
        self._state = state
        self.mass = torch.zeros(drafts.shape, dtype=torch.float32, device=drafts.device)
        self._seen = 0
        with capturing(self.target, self):
            yield

    def strict(self, drafts):
        if self._seen == 0:
            raise RuntimeError("no target layer was scored: attention did not route through vspec's capture")
        rel = self.mass / self._seen
        self.last_relevance = rel
        _trace(drafts, rel)
        has_visual = (self.visual_idx >= 0).any(dim=1, keepdim=True)
        return (rel >= self.config.threshold) | ~has_visual

    def select_rows(self, idx):
        self.visual_idx = self.visual_idx[idx]

    def compacted(self, valid_before):
        new_slot = valid_before.long().cumsum(dim=1) - 1
        ok = self.visual_idx >= 0
        moved = torch.gather(new_slot, 1, self.visual_idx.clamp_min(0))
        self.visual_idx = torch.where(ok, moved, -1)


class GroundedDetector(AttentionDetector):
    """Anchor = a word the target is sure of AND decides by looking at the video (training-free).

    Relevance of draft token d_j = ``look_j · max_v p_j(v)``:

    * ``p_j``: the target's next-token distribution at the position that verifies d_j (the verification forward's
      logits, softmax at T = 1); its top-1 probability is 1 for a certain target and 1/k for k equally likely
      words, so a filler with interchangeable synonyms (``a`` / ``one``) scores low;
    * ``look_j``: the largest attention probability that one visual key receives from one query head (softmax over
      all keys the query sees; the max over heads, visual keys and ``config.visual_layers``, None: every layer) for
      the query that PREDICTS d_j (the token before it): a word decided by looking at one place of the video (a
      square's colour, cell, motion) has some head fixed on that place, a word fixed by the text alone (``the``
      after ``at``) does not.

    Anchor iff relevance >= ``threshold``. The hidden-state and attention detectors score the draft token's own
    query; this one scores the decision that produced it. The max over heads is what separates: one head that
    locates the square is diluted by the others in a head mean (the 4-layer demo pair of 2026-12-02, validation clips,
    last two layers: ROC AUC 0.913 / 0.908 with the max against 0.897 / 0.894 with the mean, divergent / skewed
    setting; on the 6-layer pair that replaced it, test clips: 0.81-0.89, and ``attribution`` 0.88-0.91). Cost per
    scored layer: one ``[γ, S]`` score block per query head (a matmul with the layer's keys, a softmax, a gather of
    the visual columns), and one softmax over the vocabulary per draft token.
    """

    def __init__(self, config: LooseConfig, target):
        super().__init__(config, target)
        n_layers = target.config.get_text_config().num_hidden_layers
        chosen = range(n_layers) if config.visual_layers is None else config.visual_layers
        self.layers = frozenset(_layer_index(i, n_layers) for i in chosen)
        self._logits: torch.Tensor | None = None

    def record(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value=None, module=None, **_) -> None:
        """Called by the capture wrapper for every text layer of the verification forward."""
        if layer_idx not in self.layers:
            return
        self._seen += 1
        if self.visual_idx.shape[1] == 0:  # no row has visual tokens: every row is strict anyway
            return
        self._add(layer_idx, self._visual_probs(query, key), query, value, module)

    def _add(self, layer_idx: int, vis: torch.Tensor, query, value, module) -> None:
        """Fold one scored layer's visual attention probabilities ``vis [B, Hq, γ, Nv]`` into the relevance."""
        look = vis.amax(dim=3).amax(dim=1)  # [B, γ]
        self.mass = torch.maximum(self.mass, look.to(self.mass.device))

    def _visual_probs(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """``[B, Hq, γ, Nv]``: the attention probability each query head puts on each visual key (softmax over all
        keys the query sees, 0 at padded visual slots), for the queries that predict d_1 .. d_γ."""
        B, Hq, L, D = query.shape
        Hkv, S, gamma = key.shape[1], key.shape[2], self._gamma
        dev = query.device
        visual_idx, valid = self.visual_idx.to(dev), self._state.valid.to(dev)
        # The queries that predict d_1 .. d_γ (rows L-γ-1 .. L-2), grouped by kv head: [B, Hkv, G·γ, D].
        q = query[:, :, L - gamma - 1: L - 1].float().reshape(B, Hkv, (Hq // Hkv) * gamma, D)
        scores = torch.matmul(q, key.float().transpose(-1, -2)) * D ** -0.5  # [B, Hkv, G·γ, S]
        scores = scores.view(B, Hq, gamma, S)
        # Row j sits at key slot S-L+(L-γ-1+j) and sees the valid keys up to it (the cache holds every key).
        last = S - gamma - 1 + torch.arange(gamma, device=dev)
        sees = (torch.arange(S, device=dev)[None, :] <= last[:, None])[None] & valid[:, None, :S]  # [B, γ, S]
        probs = scores.masked_fill(~sees[:, None], float("-inf")).softmax(dim=-1)
        live = visual_idx >= 0
        idx = visual_idx.clamp_min(0)[:, None, None, :].expand(B, Hq, gamma, -1)
        return torch.gather(probs, 3, idx).masked_fill(~live[:, None, None, :], 0.0)

    @contextlib.contextmanager
    def verify(self, drafts, state):
        original = state.forward

        def keep_logits(**kw):
            self._logits = original(**kw)
            return self._logits

        state.forward = keep_logits  # instance attribute: shadows the method for this forward only
        try:
            with super().verify(drafts, state):
                yield
        finally:
            del state.forward

    def strict(self, drafts):
        if self._seen == 0 or self._logits is None:
            raise RuntimeError("no verification forward was scored: attention did not route through vspec's "
                               "capture, or ModelState.forward was not called inside verify()")
        gamma = drafts.shape[1]
        logp = torch.log_softmax(self._logits[:, -gamma - 1:-1].float(), dim=-1).to(drafts.device)  # [B, γ, V]
        self._logits = None
        certainty = logp.amax(dim=-1).exp()  # the target's top-1 probability, in (0, 1]
        rel = self.mass.to(drafts.device) * certainty
        self.last_relevance = rel
        _trace(drafts, rel)
        has_visual = (self.visual_idx >= 0).any(dim=1, keepdim=True).to(drafts.device)
        return (rel >= self.config.threshold) | ~has_visual


class AttributionDetector(GroundedDetector):
    """Anchor = a position where what the target reads from the video decides between its candidate words.

    Relevance of draft token d_j, at the position that verifies it (the query before d_j):

    * ``c_j``: the visual keys' direct contribution to the residual stream: for each scored layer
      (``config.visual_layers``, None: every layer), the attention output the query draws from the visual keys alone
      (``Σ_v p(v) · value_v`` per head, softmax over all keys it sees) through the layer's output projection, summed
      over the layers;
    * ``x_j``: the residual stream entering the final norm; the target's candidates there are its top
      ``config.candidates`` tokens (by its logits);
    * ``Δ_c = logit_c(norm(x_j)) - logit_c(norm(x_j - c_j))`` for each candidate c: how much the direct path from
      the video moves that candidate's logit. Relevance = ``max_c Δ_c - min_c Δ_c`` (in logits): the video pushes
      one candidate against another. The aim: a synonym pair (``a`` / ``one``) is pushed alike, and a word fixed
      by the text (``the``, ``.``) is decided by the text keys, however hard its query looks at the video (the
      grounded detector's failure: habitual attention to the square just described). On the demo's divergent
      validation clips this separated anchor words from fillers at ROC AUC 0.915, against 0.830 for ``grounded``.

    Anchor iff relevance >= ``threshold``. Direct path only (what later layers make of ``c_j`` is not followed).
    A gated attention output (Qwen3.5: ``o_proj(attention · sigmoid(gate))``, the gate from ``q_proj``) is followed
    with the gate the module computed for the same rows (read by a hook on ``q_proj``). Cost per scored layer: the
    grounded detector's score block, one ``[γ, Nv] × [Nv, D]`` product per head and one output projection of γ
    rows; then two norms and ``candidates`` unembedding rows per draft token.
    """

    def __init__(self, config: LooseConfig, target, adapter):
        super().__init__(config, target)
        text = adapter.language_model()
        heads = target.config.get_text_config().num_attention_heads
        self._gated: dict[int, torch.nn.Module] = {}  # layer -> q_proj whose second half per head is the gate
        for i in self.layers:
            attn = getattr(text.layers[i], "self_attn", None)
            if attn is None:  # a linear-attention layer of a hybrid model: never scored (no softmax attention)
                continue
            out = attn.q_proj.out_features
            if out == 2 * heads * attn.head_dim:  # Qwen3.5: o_proj(attention · sigmoid(gate))
                self._gated[i] = attn.q_proj
            elif out != heads * attn.head_dim:
                raise ValueError(f"LooseConfig(detector='attribution'): layer {i} of {type(target).__name__} has an "
                                 f"attention output this detector does not know (q_proj gives {out} features)")
        self.norm = text.norm
        self.unembed = target.get_output_embeddings()
        self.contrib: torch.Tensor | None = None  # [B, γ, H] float32: the visual keys' direct contribution
        self._x: torch.Tensor | None = None
        self._gates: dict[int, torch.Tensor] = {}

    def _add(self, layer_idx: int, vis: torch.Tensor, query, value, module) -> None:
        B, Hq, gamma, Nv = vis.shape
        Hkv, D = value.shape[1], value.shape[3]
        idx = self.visual_idx.to(value.device).clamp_min(0)[:, None, :, None].expand(B, Hkv, Nv, D)
        v = torch.gather(value.float(), 2, idx).repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, Nv, D]
        heads = torch.matmul(vis, v).transpose(1, 2).reshape(B, gamma, Hq * D)  # the o_proj input layout
        if layer_idx in self._gated:  # the gate of the rows that predict d_1 .. d_γ, as the module applies it
            L = query.shape[2]
            gate = self._gates.pop(layer_idx).view(B, L, Hq, 2 * D)[:, L - gamma - 1: L - 1, :, D:]
            heads = heads * torch.sigmoid(gate.float()).reshape(B, gamma, Hq * D)
        proj = module.o_proj
        c = proj(heads.to(proj.weight.dtype)).float()
        self.contrib += c.to(self.contrib.device)

    @contextlib.contextmanager
    def verify(self, drafts, state):
        owner = threading.get_ident()
        self.contrib = None

        def grab(_module, args):
            if threading.get_ident() == owner:
                self._x = args[0]

        def gate_of(i):
            def keep(_module, _args, output):
                if threading.get_ident() == owner:
                    self._gates[i] = output
            return keep

        with super().verify(drafts, state):
            self.contrib = torch.zeros((*drafts.shape, self.norm.weight.shape[-1]), dtype=torch.float32,
                                       device=drafts.device)
            handles = [self.norm.register_forward_pre_hook(grab)]
            handles += [q.register_forward_hook(gate_of(i)) for i, q in self._gated.items()]
            try:
                yield
            finally:
                for h in handles:
                    h.remove()
                self._gates.clear()

    def strict(self, drafts):
        if self._seen == 0 or self._logits is None or self._x is None:
            raise RuntimeError("no verification forward was scored: attention did not route through vspec's "
                               "capture, or ModelState.forward was not called inside verify()")
        gamma = drafts.shape[1]
        dev = self.unembed.weight.device
        k = min(self.config.candidates, self._logits.shape[-1])
        cand = self._logits[:, -gamma - 1:-1].topk(k, dim=-1).indices.to(dev)  # [B, γ, k]
        x = self._x[:, -gamma - 1:-1].float().to(self.norm.weight.device)
        c = self.contrib.to(x.device)
        self._logits = self._x = None
        with torch.no_grad():
            moved = (self.norm(x) - self.norm(x - c)).float().to(dev)  # [B, γ, H]; the unembedding is linear
        w = self.unembed.weight[cand].float()  # [B, γ, k, H]
        delta = torch.matmul(w, moved[..., None]).squeeze(-1)  # [B, γ, k]
        rel = (delta.amax(dim=-1) - delta.amin(dim=-1)).to(drafts.device)
        self.last_relevance = rel
        _trace(drafts, rel)
        has_visual = (self.visual_idx >= 0).any(dim=1, keepdim=True).to(drafts.device)
        return (rel >= self.config.threshold) | ~has_visual
