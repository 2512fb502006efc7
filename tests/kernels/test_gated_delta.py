"""Gated DeltaNet verify/commit (vspec/kernels/gated_delta.py) against the reference, and the reference against
transformers' own qwen3_5 implementation.

Head layouts follow the Qwen3.5 configs (key heads Hk, value heads Hv): 0.8B-like Hv = Hk, 9B-like Hv = 2·Hk,
27B-like Hv = 3·Hk (16 → 48), with head dims shrunk for the interpreter (16/32, and 24/40 where a non power
of two exercises the masks). Kernel and reference both compute in float32; they differ only by summation order,
so float32 results agree to ~1e-6 and low-precision outputs to their own rounding (torch's default tolerances
for the dtype). Output buffers are poisoned (NaN) so an element no program writes fails.
"""

import pytest
import torch

from vspec import ops
from vspec.kernels import reference as ref

gd_kernels = pytest.importorskip("vspec.kernels.gated_delta")
hf_qwen35 = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")

# (Hk, Hv) shaped like the Qwen3.5 layouts, scaled down: 0.8B 16/16, 9B 16/32, 27B 16/48
LAYOUTS = {"0.8b": (2, 2), "9b": (2, 4), "27b": (1, 3)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
F32_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def kernels_poisoned(monkeypatch, device):
    if ops.backend_for(torch.empty(0, device=device)) != "triton":
        pytest.skip("the Triton backend is not selected (VSPEC_BACKEND or no triton)")

    def poisoned(shape, dtype, dev):
        return torch.empty(shape, dtype=dtype, device=dev).fill_(float("nan"))

    monkeypatch.setattr(gd_kernels, "_new", poisoned)


def _inputs(B, T, Hk, Hv, Dk, Dv, dtype=torch.float32, device="cpu"):
    """Random verify inputs distributed like the layer's: g = −A·softplus(a + dt_bias) ≤ 0, beta = sigmoid(b)."""
    q = torch.randn(B, T, Hk, Dk)
    k = torch.randn(B, T, Hk, Dk)
    v = torch.randn(B, T, Hv, Dv)
    g = -torch.empty(Hv).uniform_(0.01, 2.0) * torch.nn.functional.softplus(torch.randn(B, T, Hv))
    beta = torch.sigmoid(torch.randn(B, T, Hv))
    state = torch.randn(B, Hv, Dk, Dv) * 0.5
    cast = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    return (*cast, g.to(device), beta.to(device=device, dtype=dtype), state.to(device))


def _grouped(q, k, v):
    """q, k repeated to the value heads, value head h reading key head h // (Hv / Hk): the layer does this before
    the rule in transformers 5.17, the rule itself in 5.24 (a no-op there once repeated)."""
    rep = v.shape[2] // k.shape[2]
    return q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)


def _hf_recurrent(q, k, v, g, beta, state, *, l2norm=True):
    q, k = _grouped(q, k, v)
    o, s = hf_qwen35.torch_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=state.clone(),
                                                      output_final_state=True, use_qk_l2norm_in_kernel=l2norm)
    return o, s


# ---- the reference is transformers' recurrence ----------------------------------------------------------------


@pytest.mark.parametrize("l2norm", [True, False], ids=["l2norm", "raw"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_reference_equals_transformers_recurrent(layout, dtype, l2norm):
    Hk, Hv = LAYOUTS[layout]
    q, k, v, g, beta, state = _inputs(3, 6, Hk, Hv, 16, 8, dtype)
    if not l2norm:
        k = k * 0.2  # keeps the un-normalised delta rule contractive
    o_hf, s_hf = _hf_recurrent(q, k, v, g, beta, state, l2norm=l2norm)
    o = ref.gated_delta_verify(q, k, v, g, beta, state, use_qk_l2norm=l2norm)
    s = ref.gated_delta_commit(q, k, v, g, beta, state, torch.full((3,), 5), use_qk_l2norm=l2norm)
    assert o.dtype == o_hf.dtype == dtype
    # same operations in the same order: bitwise equal on the CPU
    assert torch.equal(o, o_hf)
    assert torch.equal(s, s_hf)


def test_reference_equals_token_by_token_decode_and_chunked_prefill():
    """T verify tokens == T one-token decode steps of transformers (the path target.generate takes); the chunked
    form (what the layer runs for T > 1) agrees to float32 rounding only."""
    q, k, v, g, beta, state = _inputs(2, 9, 2, 4, 16, 8)
    o = ref.gated_delta_verify(q, k, v, g, beta, state)
    s = state.clone()
    for t in range(9):
        o_t, s = _hf_recurrent(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], beta[:, t:t + 1], s)
        torch.testing.assert_close(o[:, t:t + 1], o_t, rtol=0, atol=0)
    torch.testing.assert_close(ref.gated_delta_commit(q, k, v, g, beta, state, torch.full((2,), 8)), s, rtol=0, atol=0)
    o_c, s_c = hf_qwen35.torch_chunk_gated_delta_rule(*_grouped(q, k, v), v, g=g, beta=beta,
                                                      initial_state=state.clone(), output_final_state=True,
                                                      use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(o, o_c, **F32_TOL)
    torch.testing.assert_close(s, s_c, **F32_TOL)


# ---- kernel == reference --------------------------------------------------------------------------------------

CASES = {
    # id: (B, T, layout, Dk, Dv)
    "0.8b-T7": (3, 7, "0.8b", 16, 32),
    "9b-T17": (2, 17, "9b", 32, 16),
    "27b-T5": (3, 5, "27b", 16, 32),
    "27b-T1": (2, 1, "27b", 16, 16),
    "9b-npow2": (2, 4, "9b", 24, 40),
}


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_verify_kernel_matches_reference(case, dtype, device, kernels_poisoned):
    B, T, layout, Dk, Dv = CASES[case]
    Hk, Hv = LAYOUTS[layout]
    q, k, v, g, beta, state = _inputs(B, T, Hk, Hv, Dk, Dv, dtype, device)
    state_before = state.clone()
    o = ops.gated_delta_verify(q, k, v, g, beta, state)
    want = ref.gated_delta_verify(q, k, v, g, beta, state)
    assert o.dtype == dtype and o.shape == (B, T, Hv, Dv)
    tol = F32_TOL if dtype == torch.float32 else {}  # low precision: torch's default tolerance for the dtype
    torch.testing.assert_close(o, want, **tol)
    assert torch.equal(state, state_before)  # the verify never writes the state


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", ["0.8b-T7", "9b-T17", "27b-T5", "9b-npow2"])
def test_commit_kernel_matches_reference(case, dtype, device, kernels_poisoned):
    B, T, layout, Dk, Dv = CASES[case]
    Hk, Hv = LAYOUTS[layout]
    q, k, v, g, beta, state = _inputs(B, T, Hk, Hv, Dk, Dv, dtype, device)
    accept_len = torch.tensor([0, T - 1, T // 2][:B], device=device)  # rows with different accept lengths
    got = ops.gated_delta_commit(q, k, v, g, beta, state, accept_len)
    want = ref.gated_delta_commit(q, k, v, g, beta, state, accept_len)
    assert got.dtype == torch.float32 and got.shape == state.shape
    torch.testing.assert_close(got, want, **F32_TOL)  # the state is float32 whatever the input dtype


def test_commit_in_place_and_out(device, kernels_poisoned):
    q, k, v, g, beta, state = _inputs(3, 6, 2, 4, 16, 16, device=device)
    a = torch.tensor([2, 5, 0], device=device)
    want = ref.gated_delta_commit(q, k, v, g, beta, state, a)
    out = torch.full_like(state, float("nan"))
    assert ops.gated_delta_commit(q, k, v, g, beta, state, a, out=out) is out
    torch.testing.assert_close(out, want, **F32_TOL)
    assert ops.gated_delta_commit(q, k, v, g, beta, state, a, out=state) is state  # in place
    torch.testing.assert_close(state, want, **F32_TOL)


@pytest.mark.parametrize("layout", ["9b", "27b"])
def test_rollback_equals_recurrence_over_the_accepted_prefix(layout, device, kernels_poisoned):
    """Verify over T tokens, commit at accept_len a == the recurrence over only the first a+1 tokens; and the
    next round's verify from the committed state == one verify over the accepted prefix + the new tokens."""
    Hk, Hv = LAYOUTS[layout]
    B, T = 3, 7
    q, k, v, g, beta, state = _inputs(B, T, Hk, Hv, 16, 16, device=device)
    accept = [0, 6, 3]
    o = ops.gated_delta_verify(q, k, v, g, beta, state)
    committed = ops.gated_delta_commit(q, k, v, g, beta, state, torch.tensor(accept, device=device))
    q2, k2, v2, g2, beta2, _ = _inputs(B, 4, Hk, Hv, 16, 16, device=device)
    o_next = ops.gated_delta_verify(q2, k2, v2, g2, beta2, committed)
    for b, a in enumerate(accept):
        n = a + 1
        rows = [t[b:b + 1] for t in (q, k, v, g, beta)]
        prefix = [t[:, :n] for t in rows]
        s_prefix = ops.gated_delta_commit(*prefix, state[b:b + 1], torch.tensor([a], device=device))
        torch.testing.assert_close(committed[b:b + 1], s_prefix, **F32_TOL)
        # causality: the verify's outputs of the prefix do not depend on the rejected tokens
        torch.testing.assert_close(o[b:b + 1, :n], ops.gated_delta_verify(*prefix, state[b:b + 1]), **F32_TOL)
        joined = [torch.cat([p, t[b:b + 1]], 1) for p, t in zip(prefix, (q2, k2, v2, g2, beta2))]
        o_joined = ops.gated_delta_verify(*joined, state[b:b + 1])
        torch.testing.assert_close(o_next[b:b + 1], o_joined[:, n:], **F32_TOL)


def test_strided_inputs_and_split_value_blocks(device, kernels_poisoned):
    """q/k/v as split views of one projection (the layer's layout), Dv split over several programs."""
    B, T, Hk, Hv, Dk, Dv = 2, 5, 2, 4, 16, 40
    mixed = torch.randn(B, T, 2 * Hk * Dk + Hv * Dv, device=device, dtype=torch.bfloat16)
    q, k, v = torch.split(mixed, [Hk * Dk, Hk * Dk, Hv * Dv], dim=-1)
    q, k, v = q.reshape(B, T, Hk, Dk), k.reshape(B, T, Hk, Dk), v.reshape(B, T, Hv, Dv)
    _, _, _, g, beta, state = _inputs(B, T, Hk, Hv, Dk, Dv, device=device)
    state_t = state.transpose(-1, -2).contiguous().transpose(-1, -2)  # column-major state: explicit strides
    want_o = ref.gated_delta_verify(q, k, v, g, beta, state)
    a = torch.tensor([1, 4], device=device)
    want_s = ref.gated_delta_commit(q, k, v, g, beta, state, a)
    for block_v in (None, 16):
        o = gd_kernels.gated_delta_verify(q, k, v, g, beta, state_t, block_v=block_v)
        torch.testing.assert_close(o, want_o)
        s = gd_kernels.gated_delta_commit(q, k, v, g, beta, state_t, a, block_v=block_v)
        torch.testing.assert_close(s, want_s, **F32_TOL)


def test_explicit_scale_and_no_l2norm(device, kernels_poisoned):
    q, k, v, g, beta, state = _inputs(2, 4, 1, 3, 16, 16, device=device)
    k = k * 0.2
    for kw in (dict(scale=0.3), dict(use_qk_l2norm=False), dict(scale=1.0, use_qk_l2norm=False)):
        torch.testing.assert_close(ops.gated_delta_verify(q, k, v, g, beta, state, **kw),
                                   ref.gated_delta_verify(q, k, v, g, beta, state, **kw), **F32_TOL)
        a = torch.tensor([3, 1], device=device)
        torch.testing.assert_close(ops.gated_delta_commit(q, k, v, g, beta, state, a, **kw),
                                   ref.gated_delta_commit(q, k, v, g, beta, state, a, **kw), **F32_TOL)


# ---- conv window rollback --------------------------------------------------------------------------------------


@pytest.mark.parametrize("W", [4, 2])
def test_conv_state_commit_equals_token_by_token_update(W):
    """The window after the accepted prefix == what transformers' one-token conv update leaves in conv_state
    after feeding exactly those a+1 tokens."""
    B, C, T = 3, 6, 7
    conv_state = torch.randn(B, C, W)
    x = torch.randn(B, C, T)
    weight = torch.randn(C, W)
    accept = torch.tensor([0, 6, 2])
    got = ops.causal_conv_state_commit(conv_state, x, accept)
    for b in range(B):
        s = conv_state[b:b + 1].clone()
        for t in range(int(accept[b]) + 1):
            hf_qwen35.causal_conv1d_update(x[b:b + 1, :, t:t + 1], s, weight, None, "silu")
        assert torch.equal(got[b:b + 1], s)
    out = conv_state.clone()
    assert ops.causal_conv_state_commit(out, x, accept, out=out) is out
    assert torch.equal(out, got)


# ---- argument checks -------------------------------------------------------------------------------------------


def test_argument_errors_name_the_argument():
    q, k, v, g, beta, state = _inputs(2, 3, 2, 4, 8, 8)
    a = torch.tensor([0, 2])
    with pytest.raises(ValueError, match="v heads must be a positive multiple"):
        ops.gated_delta_verify(q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3], state[:, :3])
    with pytest.raises(ValueError, match=r"k must be \[B, T, Hk, Dk\]"):
        ops.gated_delta_verify(q, k[:, :2], v, g, beta, state)
    with pytest.raises(TypeError, match="state must be float32"):
        ops.gated_delta_verify(q, k, v, g, beta, state.bfloat16())
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        ops.gated_delta_verify(q, k.bfloat16(), v, g, beta, state)
    with pytest.raises(ValueError, match=r"g must be \[B, T, Hv\]"):
        ops.gated_delta_verify(q, k, v, g[:, :2], beta, state)
    with pytest.raises(ValueError, match=r"state must be \[B, Hv, Dk, Dv\]"):
        ops.gated_delta_verify(q, k, v, g, beta, state[..., :4])
    with pytest.raises(TypeError, match="use_qk_l2norm must be a bool"):
        ops.gated_delta_verify(q, k, v, g, beta, state, use_qk_l2norm=1)
    with pytest.raises(TypeError, match="accept_len must be an integer tensor"):
        ops.gated_delta_commit(q, k, v, g, beta, state, a.float())
    with pytest.raises(ValueError, match=r"accept_len values must lie in \[0, T=3\)"):
        ops.gated_delta_commit(q, k, v, g, beta, state, torch.tensor([0, 3]), check=True)
    with pytest.raises(TypeError, match="out must be float32"):
        ops.gated_delta_commit(q, k, v, g, beta, state, a, out=state.double())
    with pytest.raises(ValueError, match=r"x must be \[B, C, T\]"):
        ops.causal_conv_state_commit(torch.zeros(2, 5, 4), torch.zeros(2, 4, 3), a)
