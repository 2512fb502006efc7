"""Linear-attention (Gated DeltaNet) state of a hybrid model, with exact per-row rollback.

A hybrid model (Qwen3.5: 3 of every 4 decoder layers are Gated DeltaNet) cannot undo a rejected draft token by
masking: the layer's recurrent state ``[B, Hv, Dk, Dv]`` and its short-conv window ``[B, C, W]`` have already
absorbed it. :class:`LinearAttentionState` therefore holds those states itself (``ModelState`` owns one; the model's
own cache object is never asked for them) and runs every linear layer of vspec's forwards through
:meth:`LinearAttentionState.layer_forward`, a replacement of the module's forward that

* feeds the step's tokens from the current state with ``ops.gated_delta_verify`` (no state written) and keeps what
  a rollback needs: the state before the step, the step's q, k, v, g, beta and conv inputs, and each token's
  physical slot per row (a *journal*, per layer, of the recent steps);
* skips hole tokens exactly (slots of the step whose ``new_valid`` is False: left padding, a row with fewer tokens
  to feed this round): the conv window is slid over the row's valid tokens only, and a hole gets g = 0 and
  beta = 0, so the recurrence passes the state through unchanged (S · exp(0) + k ⊗ 0 = S). A zeroed hole input would
  NOT do: it still decays the state through g and shifts the conv window;
* materialises the state after a step lazily, when the next step of that layer needs it
  (``ops.gated_delta_commit`` over all of the step's tokens, ``ops.causal_conv_state_commit`` for the window).

The first forward (the prefill: no rollback ever reaches into it) instead runs the model family's own chunked rule
(``torch_chunk_gated_delta_rule`` of the layer's modeling module, which transformers routes to flash-linear-
attention's kernel when installed), outputs and final state in one pass, as ``generate``'s prefill does; holes there
get the same g = 0 / beta = 0 treatment. Without that function the prefill takes the verify/commit path.

:meth:`rollback` (called by ``ModelState.invalidate``, which rejects a suffix of each row's slots) sets each row's
state to what its valid slots produce: later tokens were always fed from states without earlier rejected ones, so
that is the state after the row's last valid slot — the journal step holding that slot, replayed up to it from its
own starting state (``gated_delta_commit`` with that accept length; the conv window with
``causal_conv_state_commit``). After a verify round every row holds what plain ``generate`` holds after the row's
accepted tokens. Device ops only, no host sync. A chain round's target needs ONE commit per layer (its verify
step); the draft's single-token steps replay from their starting states (the "snapshots"). The journal keeps the
steps of the last ``keep_rounds`` rollback periods: 1 for the serial chain (a rollback never reaches before the
round), 3 for the parallel schedule's draft (a kept speculation can be rejected a round and two rollbacks later).
A rollback that would reach past the journal cannot be undone; it sets the device flag :attr:`overreach`, which the
tests assert stays False. ``compact_`` and ``truncate`` move and drop slots: the journal's slots follow
(:meth:`compacted`, :meth:`truncate`), and ``select_rows`` indexes it with the states.

Pruned draft prefill: a prefill of the kept tokens only (``prune_source="target"``) feeds the linear layers just
those (left padding is a hole); with ``prune_source="draft"`` the draft reads the whole prompt to score it, so its
linear layers keep the whole prompt's state while its attention layers drop the pruned tokens (the draft only
proposes: either way the output is the target's).

What the journal cannot express is refused by ``ModelState``: keeping a non-suffix subset of slots (trees: a tree's
nodes would need a state each).

The replacement forward is installed on the model's linear-attention modules only while one of vspec's forwards
runs (reference-counted across threads); in a thread without an active state, or on another model's state, the
module runs its own forward.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops

_local = threading.local()
_install_lock = threading.Lock()
_installed: dict[int, list] = {}  # id(module) -> [refcount, module, its own instance forward or None]


@dataclass
class _Step:
    """One forward's record for one layer: the state before it and what replays it.

    slots ``[B, n]`` long: each token's physical slot in its row (−1 once the slot is gone: compacted away or
    truncated; ``ModelState`` moves and drops slots, the journal follows).
    pre_rec ``[B, Hv, Dk, Dv]`` float32, pre_conv ``[B, C, W]``; q, k ``[B, n, Hk, Dk]``, v ``[B, n, Hv, Dv]``,
    g, beta ``[B, n, Hv]`` (0 at holes); x ``[B, C, n]`` the conv inputs with each row's valid tokens first (left
    compacted); n_valid ``[B, n]`` long: valid tokens among the first t + 1 of the step.
    """

    slots: torch.Tensor
    n: int
    pre_rec: torch.Tensor
    pre_conv: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    x: torch.Tensor
    n_valid: torch.Tensor


class _Layer:
    """One linear layer's state: ``rec`` / ``conv`` after every materialised step (None: nothing fed yet),
    ``journal`` the steps since the last settle (the last one possibly not materialised: ``pending``)."""

    def __init__(self):
        self.rec: torch.Tensor | None = None
        self.conv: torch.Tensor | None = None
        self.pending: _Step | None = None
        self.journal: list[_Step] = []


def _replay(step: _Step, k: torch.Tensor):
    """``(rec, conv)`` after the first ``k[b]`` tokens ``[B]`` (0 .. n) of ``step`` from its starting state."""
    acc = (k - 1).clamp(0, step.n - 1)
    rec = ops.gated_delta_commit(step.q, step.k, step.v, step.g, step.beta, step.pre_rec, acc, use_qk_l2norm=True)
    rec = torch.where((k > 0)[:, None, None, None], rec, step.pre_rec)
    j = torch.gather(step.n_valid, 1, acc[:, None]).squeeze(1) * (k > 0)  # valid tokens among the first k
    conv = ops.causal_conv_state_commit(step.pre_conv, step.x, (j - 1).clamp_min(0))
    conv = torch.where((j > 0)[:, None, None], conv, step.pre_conv)
    return rec, conv


class LinearAttentionState:
    """Recurrent and conv states of a hybrid model's linear-attention layers for the active batch rows.

    modules: ``{layer_idx: module}`` (the adapter's ``linear_attention_modules()``).
    ``ModelState`` calls :meth:`step` around each forward, :meth:`rollback` / :meth:`truncate` / :meth:`select_rows`
    / :meth:`settle` from its own methods of those names (see the module docstring).
    """

    def __init__(self, modules: dict):
        self.modules = dict(modules)
        self.layers = {i: _Layer() for i in self.modules}
        self._last_layer = max(self.modules) if self.modules else None
        self._start = 0
        self._valid: torch.Tensor | None = None
        self._prefill = False
        #: journal steps per rollback period, the last one open; the journal keeps the last ``keep_rounds`` periods
        #: (1: a rollback never reaches before the last one, as in the serial chain)
        self._gen_sizes = [0]
        self.keep_rounds = 1
        #: device bool: some rollback rejected a slot the journal no longer covered (its state could not be undone)
        self.overreach: torch.Tensor | None = None

    # ---- forwards ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, start: int, new_valid: torch.Tensor):
        """Run the linear layers of the forward inside the block through :meth:`layer_forward`: the forward appends
        slots ``[start, start + n)``, ``new_valid [B, n]`` bool marks each row's real tokens (the rest are holes).

        The first forward (the prefill) is settled at once: no rollback reaches into the prompt, and its journal
        entry would otherwise make the first rollback replay the whole prompt."""
        first = all(layer.rec is None and not layer.journal for layer in self.layers.values())
        self._start, self._valid, self._prefill = start, new_valid, first
        prev = getattr(_local, "state", None)
        _local.state = self
        _install(self.modules.values())
        try:
            yield
        finally:
            _uninstall(self.modules.values())
            _local.state = prev
            self._valid = None
        if first:
            self.settle()

    def _current(self, layer: _Layer):
        if layer.pending is not None:
            step, layer.pending = layer.pending, None
            layer.rec, layer.conv = _replay(step, torch.full_like(step.n_valid[:, 0], step.n))
        return layer.rec, layer.conv

    def layer_forward(self, mod, hidden_states: torch.Tensor) -> torch.Tensor:
        """The Gated DeltaNet layer ``mod`` (transformers' ``Qwen3_5GatedDeltaNet`` and its MoE twin) over
        ``hidden_states [B, n, H]`` from this state; what transformers' forward computes for the row's valid tokens
        (hole rows' outputs are unspecified)."""
        layer = self.layers[mod.layer_idx]
        valid = self._valid.to(hidden_states.device)
        B, n, _ = hidden_states.shape
        rec, conv = self._current(layer)
        x = mod.in_proj_qkv(hidden_states).transpose(1, 2)  # [B, C, n]
        z = mod.in_proj_z(hidden_states).reshape(B, n, -1, mod.head_v_dim)
        b = mod.in_proj_b(hidden_states)
        a = mod.in_proj_a(hidden_states)
        C, W = x.shape[1], mod.conv_kernel_size
        if conv is None:
            conv = x.new_zeros(B, C, W)
        if rec is None:
            rec = torch.zeros(B, mod.num_v_heads, mod.head_k_dim, mod.head_v_dim, dtype=torch.float32,
                              device=x.device)
        # Slide the conv over each row's valid tokens only: valid tokens first (stable), conv, then back in place.
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        x_c = torch.gather(x, 2, order[:, None, :].expand(-1, C, -1))
        weight = mod.conv1d.weight.squeeze(1)
        y = F.conv1d(torch.cat([conv, x_c], dim=-1).to(weight.dtype), weight.unsqueeze(1), mod.conv1d.bias,
                     groups=C)[..., -n:]
        y = F.silu(y) if mod.activation in ("silu", "swish") else _act(mod.activation)(y)
        y = torch.gather(y.to(x.dtype), 2, torch.argsort(order, dim=1)[:, None, :].expand(-1, C, -1))
        y = (y * valid[:, None, :]).transpose(1, 2)
        q, k, v = torch.split(y, [mod.key_dim, mod.key_dim, mod.value_dim], dim=-1)
        q = q.reshape(B, n, -1, mod.head_k_dim)
        k = k.reshape(B, n, -1, mod.head_k_dim)
        v = v.reshape(B, n, -1, mod.head_v_dim)
        beta = b.sigmoid() * valid[..., None]
        g = -mod.A_log.float().exp() * F.softplus(a.float() + mod.dt_bias)
        g = g * valid[..., None]  # a hole neither decays nor updates the state
        n_valid = valid.long().cumsum(dim=1)
        chunked = _chunk_rule(mod) if self._prefill and layer.rec is None else None
        if chunked is not None:  # the prefill: one chunked pass, settled (module docstring)
            rep = mod.num_v_heads // mod.num_k_heads  # value heads per q/k head (5.17's rule wants them repeated)
            o, final = chunked(q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2), v, g=g, beta=beta,
                               initial_state=None, output_final_state=True, use_qk_l2norm_in_kernel=True)
            j = n_valid[:, -1]
            window = ops.causal_conv_state_commit(conv, x_c, (j - 1).clamp_min(0))
            layer.rec = final.to(torch.float32)
            layer.conv = torch.where((j > 0)[:, None, None], window, conv)
        else:
            o = ops.gated_delta_verify(q, k, v, g, beta, rec, use_qk_l2norm=True)
            slots = (self._start + torch.arange(n, device=valid.device))[None].expand(B, n)
            step = _Step(slots, n, rec, conv, q, k, v, g, beta, x_c, n_valid)
            layer.pending = step
            layer.journal.append(step)
            if mod.layer_idx == self._last_layer:
                self._gen_sizes[-1] += 1
        o = mod.norm(o.reshape(-1, mod.head_v_dim), z.reshape(-1, mod.head_v_dim)).reshape(B, n, -1)
        return mod.out_proj(o)

    # ---- rollback and bookkeeping ---------------------------------------------------------------------------
    def rollback(self, valid: torch.Tensor, before: torch.Tensor | None = None) -> None:
        """Bring every row's state to what its valid slots produce, after ``ModelState`` rejected a suffix of them.

        valid: ``[B, S]`` bool, ``ModelState.valid`` after the invalidation; only a suffix of each row's fed tokens
        may have turned invalid (later tokens were fed from states without the rejected ones), so a row's state is
        the one after its last valid slot: the journal step holding that slot, replayed up to it from its own
        starting state (a row whose last valid slot precedes the journal gets the journal's starting state).
        before: ``valid`` before the invalidation; rejecting a slot the journal does not cover cannot be undone and
        sets :attr:`overreach` (a device flag; tests assert it stays False). Device ops only. Afterwards the journal
        keeps the steps of the last ``keep_rounds`` rollback periods (the current one included)."""
        S = valid.shape[1]
        cols = torch.arange(S, device=valid.device)
        last = torch.where(valid, cols, -1).amax(dim=1)  # [B] each row's last valid slot
        if before is not None:
            covered = self._first_slots(valid.shape[0], S, valid.device)
            lost = (before & ~valid & (cols[None] < covered[:, None])).any()
            self.overreach = lost if self.overreach is None else self.overreach | lost
        for layer in self.layers.values():
            if not layer.journal:
                continue
            first = layer.journal[0]
            p = last.to(first.q.device)
            rec, conv = first.pre_rec, first.pre_conv
            for step in layer.journal:
                at = step.slots == p[:, None]  # [B, n]
                hit = at.any(dim=1)
                r, c = _replay(step, torch.where(hit, at.long().argmax(dim=1) + 1, 0))
                rec = torch.where(hit[:, None, None, None], r, rec)
                conv = torch.where(hit[:, None, None], c, conv)
            layer.rec, layer.conv, layer.pending = rec, conv, None
        self._gen_sizes.append(0)
        drop = sum(self._gen_sizes[:-self.keep_rounds])
        self._gen_sizes = self._gen_sizes[-self.keep_rounds:]
        for layer in self.layers.values():
            layer.journal = layer.journal[drop:]

    def _first_slots(self, B: int, S: int, device) -> torch.Tensor:
        """``[B]`` each row's first slot the journal covers (``S`` when none)."""
        for layer in self.layers.values():
            if layer.journal:
                slots = torch.cat([step.slots for step in layer.journal], dim=1).to(device)
                return torch.where(slots >= 0, slots, S).amin(dim=1).clamp_max(S)
        return torch.full((B,), S, dtype=torch.long, device=device)

    def _remap(self, new_of_old: torch.Tensor) -> None:
        """Renumber the journal's slots: old slot j of row b is now ``new_of_old[b, j]`` (−1: gone)."""
        for layer in self.layers.values():
            for step in layer.journal:
                m = new_of_old.to(step.slots.device)
                safe = step.slots.clamp(0, m.shape[1] - 1)
                step.slots = torch.where((step.slots >= 0) & (step.slots < m.shape[1]),
                                         torch.gather(m, 1, safe), -1)

    def truncate(self, n: int) -> None:
        """The physical length drops to ``n`` slots (``ModelState`` drops only slots no row uses: holes): journal
        slots from ``n`` on are gone (later forwards reuse those numbers)."""
        for layer in self.layers.values():
            for step in layer.journal:
                step.slots = torch.where(step.slots < n, step.slots, -1)

    def compacted(self, src_idx: torch.Tensor, length: int) -> None:
        """``ModelState.compact_`` moved row b's slot ``src_idx[b, j]`` to slot j (``src_idx [B, K]``, −1 padded)
        of a cache that had ``length`` slots: the journal follows."""
        B, K = src_idx.shape
        new_of_old = torch.full((B, length + 1), -1, dtype=torch.long, device=src_idx.device)
        cols = torch.arange(K, device=src_idx.device)[None].expand(B, K)
        new_of_old.scatter_(1, torch.where(src_idx >= 0, src_idx, length), torch.where(src_idx >= 0, cols, -1))
        self._remap(new_of_old[:, :length])

    def settle(self) -> None:
        """Materialise every pending step and forget the journal (no rollback before the current end after this)."""
        for layer in self.layers.values():
            self._current(layer)
            layer.journal = []
        self._gen_sizes = [0]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (states and journal alike)."""
        for layer in self.layers.values():
            if layer.rec is not None:
                idx = rows.to(layer.rec.device)
                layer.rec = layer.rec.index_select(0, idx)
                layer.conv = layer.conv.index_select(0, idx)
            for step in layer.journal:
                for name in ("slots", "pre_rec", "pre_conv", "q", "k", "v", "g", "beta", "x", "n_valid"):
                    setattr(step, name, getattr(step, name).index_select(0, rows.to(step.q.device)))


def _chunk_rule(mod):
    """The chunked gated delta rule of ``mod``'s modeling module (None if it has none)."""
    return getattr(inspect.getmodule(type(mod)), "torch_chunk_gated_delta_rule", None)


def _act(name):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _dispatch(module, original):
    def forward(hidden_states, *args, **kwargs):
        state = getattr(_local, "state", None)
        if state is not None and state.modules.get(module.layer_idx) is module:
            return state.layer_forward(module, hidden_states)
        return original(hidden_states, *args, **kwargs)

    return forward


def _install(modules) -> None:
    """Route the modules' forwards through :func:`_dispatch` (reference-counted; :func:`_uninstall` restores an
    instance-level forward that was there before, e.g. accelerate's hook)."""
    with _install_lock:
        for m in modules:
            entry = _installed.get(id(m))
            if entry is None:
                own = m.__dict__.get("forward")
                m.forward = _dispatch(m, m.forward)
                _installed[id(m)] = [1, m, own]
            else:
                entry[0] += 1


def _uninstall(modules) -> None:
    with _install_lock:
        for m in modules:
            entry = _installed[id(m)]
            entry[0] -= 1
            if entry[0] == 0:
                del _installed[id(m)]
                if entry[2] is None:
                    del m.forward  # the class's forward shows through again
                else:
                    m.forward = entry[2]
