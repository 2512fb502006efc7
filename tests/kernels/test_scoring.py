"""Scoring ops: Triton kernels (interpreter on CPU) vs the reference, the reference vs a float64 direct
computation that materialises every softmax, dispatch through vspec.ops, and argument errors."""

import math

import pytest
import torch

from vspec import ops
from vspec.kernels import reference, scoring

# Kernel and reference read the same (already rounded) inputs and both accumulate in float32, so only the
# summation order and exp vs exp2 differ; GPU tensor cores reorder the low-precision dot more.
MASS_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-6),
    torch.bfloat16: dict(rtol=1e-3, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
}
# reference (float32) vs the float64 direct computation, float32 inputs
DIRECT_TOL = dict(rtol=1e-4, atol=1e-6)
# frame scores: kernel uses Welford, the reference two-pass variance, both float32
FRAME_TOL = dict(rtol=1e-4, atol=2e-6)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


# ----------------------------------------------------------------------------------------------------------
# inputs and the float64 direct computations
# ----------------------------------------------------------------------------------------------------------


def _mass_inputs(B, Hq, Hkv, Lq, S, D, Nv, dtype, device, *, left_pad=6, pad_vis=7):
    q = (1.5 * torch.randn(B, Hq, Lq, D)).to(dtype).to(device)
    k = (1.5 * torch.randn(B, Hkv, S, D)).to(dtype).to(device)
    # positions anywhere in [0, S): some land in the left padding (masked -> 0), some among the query
    # rows (causally hidden from the earlier rows)
    vidx = torch.stack([torch.randperm(S)[:Nv].sort().values for _ in range(B)])
    if B > 1 and pad_vis:
        vidx[1, -pad_vis:] = -1
    mask = torch.ones(B, S, dtype=torch.int64)
    if left_pad:
        mask[0, :left_pad] = 0
    return q, k, vidx.to(device), mask.to(device)


def _direct_mass(q, k, vidx, *, scale=None, normalize="visual", mask=None):
    """Float64, one (batch, head, query row) at a time, over explicit key lists."""
    q, k = q.double().cpu(), k.double().cpu()
    vidx = vidx.cpu()
    B, Hq, Lq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    valid = torch.ones(B, S, dtype=torch.bool) if mask is None else mask.cpu() != 0
    res = torch.zeros(B, vidx.shape[1], dtype=torch.float64)
    for b in range(B):
        n_rows = 0
        for i in range(Lq):
            p = S - Lq + i
            if not valid[b, p]:
                continue
            n_rows += 1
            seen = [j for j in range(S) if j <= p and valid[b, j]]
            ents = [n for n in range(vidx.shape[1]) if 0 <= vidx[b, n] <= p and valid[b, vidx[b, n]]]
            for h in range(Hq):
                s = k[b, h // G] @ q[b, h, i] * scale  # [S]
                if normalize == "all":
                    z = torch.logsumexp(s[seen], 0)
                elif ents:
                    z = torch.logsumexp(s[vidx[b, ents]], 0)
                for n in ents:
                    res[b, n] += torch.exp(s[vidx[b, n]] - z)
        res[b] /= max(1, Hq * n_rows)
    return res


def _direct_frame(x, grid, window):
    x = x.double().cpu()
    B, N, C = x.shape
    T, H, W = grid
    r = window // 2

    def cos(a, b):
        return float(a @ b / (max(a.norm(), 1e-8) * max(b.norm(), 1e-8)))

    temporal = torch.zeros(B, N, dtype=torch.float64)
    spatial = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        f = x[b].reshape(T, H, W, C)
        for t in range(T):
            for h in range(H):
                for w in range(W):
                    n = (t * H + h) * W + w
                    if T > 1:
                        temporal[b, n] = 1 - cos(f[t, h, w], f[1 if t == 0 else t - 1, h, w])
                    cs = [cos(f[t, h, w], f[t, hh, ww])
                          for hh in range(max(0, h - r), min(H, h + r + 1))
                          for ww in range(max(0, w - r), min(W, w + r + 1)) if (hh, ww) != (h, w)]
                    if cs:
                        mean = sum(cs) / len(cs)
                        spatial[b, n] = sum((c - mean) ** 2 for c in cs) / len(cs)
    return temporal, spatial


MASS_CASES = {
    # id: (B, Hq, Hkv, Lq, S, D, Nv)
    "mha-lq1": (2, 2, 2, 1, 70, 32, 63),
    "gqa4-lq5": (2, 8, 2, 5, 90, 16, 63),
    "gqa7-lq40": (1, 7, 1, 40, 130, 32, 63),
    "gqa4-d24": (2, 4, 1, 5, 80, 24, 33),
}


# ----------------------------------------------------------------------------------------------------------
# reference vs float64 direct
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["visual", "all"])
@pytest.mark.parametrize("case", ["mha-lq1", "gqa4-lq5", "gqa4-d24"])
def test_reference_mass_matches_direct(case, normalize):
    B, Hq, Hkv, Lq, S, D, Nv = MASS_CASES[case]
    q, k, vidx, mask = _mass_inputs(B, Hq, Hkv, Lq, S, D, Nv, torch.float32, "cpu")
    got = reference.visual_attention_mass(q, k, vidx, normalize=normalize, attention_mask=mask)
    assert got.dtype == torch.float32 and got.shape == (B, Nv)
    want = _direct_mass(q, k, vidx, normalize=normalize, mask=mask)
    torch.testing.assert_close(got.double(), want, **DIRECT_TOL)
    # the direct computation is not trivially zero: the inputs reach the interesting branches
    assert (want[0] == 0).any() and (want[0] > 0).sum() > Nv // 2


@pytest.mark.parametrize("normalize", ["visual", "all"])
def test_reference_mass_right_padded_rows_and_empty_normaliser(normalize):
    # row 0: the last two query rows are right padding (masked): they contribute nothing, the mean divides
    # by the 3 valid rows. row 1: the only visual keys sit after the first query rows, whose "visual"
    # normaliser is then empty (they contribute 0 and still count).
    B, Hq, Hkv, Lq, S, D = 2, 4, 2, 5, 40, 16
    q = torch.randn(B, Hq, Lq, D)
    k = torch.randn(B, Hkv, S, D)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, -2:] = False
    vidx = torch.tensor([[3, 10, 20, 38], [37, 39, -1, -1]])
    got = reference.visual_attention_mass(q, k, vidx, normalize=normalize, attention_mask=mask, scale=0.3)
    want = _direct_mass(q, k, vidx, normalize=normalize, mask=mask, scale=0.3)
    torch.testing.assert_close(got.double(), want, **DIRECT_TOL)
    assert got[0, 3] == 0  # position 38 is masked
    if normalize == "visual":
        torch.testing.assert_close(got[0].sum(), torch.tensor(1.0))
        # row 1: query rows at 35, 36 see nothing visual; 37, 38 see position 37; 39 sees both
        torch.testing.assert_close(got[1].sum(), torch.tensor(3 / 5))
    kern = scoring.visual_attention_mass(q, k, vidx, normalize=normalize, attention_mask=mask, scale=0.3)
    torch.testing.assert_close(kern, got, **MASS_TOL[torch.float32])


def test_reference_mass_all_rows_masked_is_zero():
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 1, 10, 16)
    mask = torch.ones(1, 10)
    mask[0, -3:] = 0
    vidx = torch.tensor([[0, 4, 6]])
    for impl in (reference, scoring):
        assert torch.equal(impl.visual_attention_mass(q, k, vidx, attention_mask=mask), torch.zeros(1, 3))


@pytest.mark.parametrize("window", [3, 5], ids=["w3", "w5"])
@pytest.mark.parametrize("grid", [(1, 4, 4), (3, 5, 7), (2, 1, 6)], ids=["T1", "T3H5W7", "H1"])
def test_reference_frame_matches_direct(grid, window):
    T, H, W = grid
    x = torch.randn(2, T * H * W, 24)
    x[0, 2] = 0.0  # a zero feature vector: cosine 0 with everything
    got = reference.frame_semantic_scores(x, grid, window=window)
    want = _direct_frame(x, grid, window)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, **FRAME_TOL)
    if T == 1:
        assert torch.equal(got[0], torch.zeros_like(got[0]))


# ----------------------------------------------------------------------------------------------------------
# Triton kernels vs reference
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["visual", "all"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(MASS_CASES))
def test_kernel_mass_matches_reference(case, dtype, normalize, device):
    B, Hq, Hkv, Lq, S, D, Nv = MASS_CASES[case]
    q, k, vidx, mask = _mass_inputs(B, Hq, Hkv, Lq, S, D, Nv, dtype, device)
    got = scoring.visual_attention_mass(q, k, vidx, normalize=normalize, attention_mask=mask, num_splits=2)
    assert got.dtype == torch.float32 and got.shape == (B, Nv)
    assert torch.isfinite(got).all()
    want = reference.visual_attention_mass(q, k, vidx, normalize=normalize, attention_mask=mask)
    torch.testing.assert_close(got, want, **MASS_TOL[dtype])
    assert (got[1, -7:] == 0).all() if B > 1 else True  # padded visual_idx entries


@pytest.mark.parametrize("normalize", ["visual", "all"])
def test_kernel_mass_no_mask_contiguous_visual_span(normalize, device):
    # the common layout: one contiguous visual span, text after it, no padding at all
    B, Hq, Hkv, Lq, S, D = 2, 6, 2, 8, 100, 32
    q, k = torch.randn(B, Hq, Lq, D, device=device), torch.randn(B, Hkv, S, D, device=device)
    vidx = torch.arange(10, 80, device=device).expand(B, -1)
    got = scoring.visual_attention_mass(q, k, vidx, normalize=normalize)
    want = reference.visual_attention_mass(q, k, vidx, normalize=normalize)
    torch.testing.assert_close(got, want, **MASS_TOL[torch.float32])
    if normalize == "visual":
        torch.testing.assert_close(got.sum(1), torch.ones(B, device=device))


@pytest.mark.parametrize("normalize", ["visual", "all"])
def test_kernel_mass_splits_and_determinism(normalize, device):
    B, Hq, Hkv, Lq, S, D, Nv = 1, 4, 1, 5, 300, 16, 150
    q, k, vidx, mask = _mass_inputs(B, Hq, Hkv, Lq, S, D, Nv, torch.float32, device)
    runs = [scoring.visual_attention_mass(q, k, vidx, normalize=normalize, attention_mask=mask, num_splits=n)
            for n in (1, 3, 64)]
    for r in runs[1:]:
        torch.testing.assert_close(r, runs[0], **MASS_TOL[torch.float32])
    again = scoring.visual_attention_mass(q, k, vidx, normalize=normalize, attention_mask=mask, num_splits=3)
    assert torch.equal(again, runs[1])  # no atomics: bitwise reproducible


@pytest.mark.parametrize("impl", [scoring, reference], ids=["triton", "reference"])
def test_mass_out_accumulates(impl, device):
    B, Hq, Hkv, Lq, S, D, Nv = 2, 4, 2, 3, 50, 16, 21
    q1, k1, vidx, mask = _mass_inputs(B, Hq, Hkv, Lq, S, D, Nv, torch.float32, device, pad_vis=3)
    q2, k2 = torch.randn_like(q1), torch.randn_like(k1)
    a = impl.visual_attention_mass(q1, k1, vidx, attention_mask=mask)
    b = impl.visual_attention_mass(q2, k2, vidx, attention_mask=mask)
    out = torch.zeros(B, Nv, device=device)
    r1 = impl.visual_attention_mass(q1, k1, vidx, attention_mask=mask, out=out)
    r2 = impl.visual_attention_mass(q2, k2, vidx, attention_mask=mask, out=out)
    assert r1 is out and r2 is out
    torch.testing.assert_close(out, a + b, rtol=1e-6, atol=1e-7)
    # a strided (column-slice) out is written through its strides
    wide = torch.ones(B, 2 * Nv, device=device)
    impl.visual_attention_mass(q1, k1, vidx, attention_mask=mask, out=wide[:, ::2])
    torch.testing.assert_close(wide[:, ::2], a + 1, rtol=1e-6, atol=1e-7)
    assert (wide[:, 1::2] == 1).all()


@pytest.mark.parametrize("dtype,C", [(torch.float32, 24), (torch.bfloat16, 24), (torch.float16, 24),
                                     (torch.float32, 130)],
                         ids=["fp32-C24", "bf16-C24", "fp16-C24", "fp32-C130"])
@pytest.mark.parametrize("grid,window", [((1, 4, 6), 3), ((3, 5, 7), 3), ((3, 5, 7), 5), ((2, 3, 1), 3),
                                         ((4, 2, 2), 1)], ids=["T1", "T3H5W7", "T3H5W7-w5", "W1", "w1"])
def test_kernel_frame_matches_reference(grid, window, dtype, C, device):
    T, H, W = grid
    x = torch.randn(2, T * H * W, C).to(dtype).to(device)
    x[1, 0] = 0.0
    got = scoring.frame_semantic_scores(x, grid, window=window)
    want = reference.frame_semantic_scores(x, grid, window=window)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == (2, T * H * W)
        assert torch.isfinite(g).all()  # freshly allocated (torch.empty) outputs are fully written
        torch.testing.assert_close(g, w, **FRAME_TOL)
    if T == 1:
        assert torch.equal(got[0], torch.zeros_like(got[0]))
    if window == 1:
        assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_frame_static_background_scores_low(device):
    # a static frame sequence has zero temporal novelty; a single changed token stands out
    T, H, W, C = 3, 4, 4, 16
    frame = torch.randn(1, H * W, C)
    x = frame.repeat(1, T, 1)
    x[0, H * W + 5] = torch.randn(C)
    temporal, _ = scoring.frame_semantic_scores(x.to(device), (T, H, W))
    changed = {H * W + 5, 5, 2 * H * W + 5}  # the token itself, its partner at t=0 and at t=2
    for n in range(T * H * W):
        if n in changed:
            assert temporal[0, n] > 0.1
        else:
            assert abs(temporal[0, n].item()) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# vspec.ops: dispatch, empty inputs, errors
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_ops_dispatch(backend, monkeypatch, device):
    monkeypatch.setenv("VSPEC_BACKEND", backend)
    assert ops.backend_for(torch.zeros(1, device=device)) == backend
    B, Hq, Hkv, Lq, S, D, Nv = 2, 4, 2, 3, 40, 16, 15
    q, k, vidx, mask = _mass_inputs(B, Hq, Hkv, Lq, S, D, Nv, torch.float32, device, pad_vis=2)
    got = ops.visual_attention_mass(q, k, vidx, normalize="all", attention_mask=mask, scale=0.2)
    want = _direct_mass(q, k, vidx, normalize="all", mask=mask, scale=0.2)
    torch.testing.assert_close(got.double().cpu(), want, **DIRECT_TOL)
    x = torch.randn(1, 2 * 3 * 5, 20, device=device)
    grid = (torch.tensor(2), 3, 5)  # a grid row taken from a video_grid_thw tensor
    got_t, got_s = ops.frame_semantic_scores(x, grid)
    want_t, want_s = _direct_frame(x, (2, 3, 5), 3)
    torch.testing.assert_close(got_t.double().cpu(), want_t, **FRAME_TOL)
    torch.testing.assert_close(got_s.double().cpu(), want_s, **FRAME_TOL)


def test_ops_empty_visual_set(device):
    q, k = torch.randn(2, 2, 1, 16, device=device), torch.randn(2, 1, 5, 16, device=device)
    vidx = torch.zeros(2, 0, dtype=torch.long, device=device)
    got = ops.visual_attention_mass(q, k, vidx)
    assert got.shape == (2, 0) and got.dtype == torch.float32
    out = torch.zeros(2, 0, device=device)
    assert ops.visual_attention_mass(q, k, vidx, out=out) is out


def test_ops_mass_check_indices_off_gives_the_same_result(device):
    # check_indices=False only skips the range check (a host sync); valid indices give the same mass
    q, k = torch.randn(2, 4, 3, 16, device=device), torch.randn(2, 2, 10, 16, device=device)
    vidx = torch.tensor([[0, 5, -1], [1, 2, 9]], device=device)
    want = ops.visual_attention_mass(q, k, vidx)
    got = ops.visual_attention_mass(q, k, vidx, check_indices=False)
    assert torch.equal(got, want)


def _bad_mass_calls():
    q, k = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 10, 16)
    v = torch.tensor([[0, 5, -1], [1, 2, 9]])
    ok = dict(q=q, k=k, visual_idx=v)
    return [
        ("q-rank", dict(ok, q=q[0]), ValueError, "q must have 4 dims"),
        ("k-int", dict(ok, k=k.long()), TypeError, "k must be a floating"),
        ("q-float64", dict(ok, q=q.double(), k=k.double()), TypeError, "q must be float32"),
        ("k-dtype", dict(ok, k=k.half()), TypeError, "k must have the dtype of q"),
        ("gqa", dict(ok, k=torch.randn(2, 3, 10, 16)), ValueError, "Hq % Hkv"),
        ("batch", dict(ok, k=torch.randn(1, 2, 10, 16)), ValueError, r"k must be \[B, Hkv, S, D\]"),
        ("head-dim", dict(ok, k=torch.randn(2, 2, 10, 8)), ValueError, "D=16"),
        ("lq>s", dict(ok, k=torch.randn(2, 2, 2, 16)), ValueError, "Lq <= S"),
        ("vidx-float", dict(ok, visual_idx=v.float()), TypeError, "visual_idx must be an integer"),
        ("vidx-rank", dict(ok, visual_idx=v[0]), ValueError, "visual_idx must have 2 dims"),
        ("vidx-batch", dict(ok, visual_idx=v[:1]), ValueError, r"visual_idx must be \[B, Nv\]"),
        ("vidx-high", dict(ok, visual_idx=v + 1), ValueError, r"max 10"),
        ("vidx-low", dict(ok, visual_idx=v - 1), ValueError, r"min -2"),
        ("normalize", dict(ok, normalize="softmax"), ValueError, "normalize must be"),
        ("scale-type", dict(ok, scale="0.1"), TypeError, "scale must be a real number"),
        ("scale-inf", dict(ok, scale=math.inf), ValueError, "scale must be finite"),
        ("mask-shape", dict(ok, attention_mask=torch.ones(2, 9)), ValueError, "attention_mask must be"),
        ("out-dtype", dict(ok, out=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "out must be float32"),
        ("out-shape", dict(ok, out=torch.zeros(2, 4)), ValueError, r"out must be \[B, Nv\]"),
        ("device", dict(ok, out=torch.zeros(2, 3, device="meta")), ValueError, "out is on meta"),
    ]


@pytest.mark.parametrize("kwargs,exc,match", [c[1:] for c in _bad_mass_calls()],
                         ids=[c[0] for c in _bad_mass_calls()])
def test_ops_mass_rejects_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ops.visual_attention_mass(**kwargs)


@pytest.mark.parametrize("x,grid,window,exc,match", [
    (torch.randn(12, 4), (1, 3, 4), 3, ValueError, "x must have 3 dims"),
    (torch.ones(1, 12, 4, dtype=torch.long), (1, 3, 4), 3, TypeError, "x must be a floating"),
    (torch.randn(1, 12, 0), (1, 3, 4), 3, ValueError, "C >= 1"),
    (torch.randn(1, 12, 4), (2, 3, 4), 3, ValueError, "T\\*H\\*W = 24"),
    (torch.randn(1, 12, 4), (3, 4), 3, TypeError, "grid must be"),
    (torch.randn(1, 12, 4), (1.0, 3, 4), 3, TypeError, "grid must be"),
    (torch.randn(1, 12, 4), (-1, -3, 4), 3, ValueError, "grid entries must be positive"),
    (torch.randn(1, 12, 4), (1, 3, 4), 4, ValueError, "window must be an odd positive int, got 4"),
    (torch.randn(1, 12, 4), (1, 3, 4), -1, ValueError, "window must be an odd"),
    (torch.randn(1, 12, 4), (1, 3, 4), 3.0, TypeError, "window must be an odd"),
], ids=["x-rank", "x-int", "x-C0", "grid-product", "grid-len", "grid-float", "grid-negative", "window-even",
        "window-negative", "window-float"])
def test_ops_frame_rejects_bad_input(x, grid, window, exc, match):
    with pytest.raises(exc, match=match):
        ops.frame_semantic_scores(x, grid, window=window)


# ----------------------------------------------------------------------------------------------------------
# real head sizes, and the float32 dot precision
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("D", [80, 128, 256], ids=["d80", "d128", "d256"])
def test_kernel_mass_real_head_dims(D, dtype, device):
    # D = 80 is not a power of two: head-dim chunks of 16 with the tail masked
    B, Hq, Hkv, Lq, S, Nv = 2, 4, 2, 3, 40, 17
    q, k, vidx, mask = _mass_inputs(B, Hq, Hkv, Lq, S, D, Nv, dtype, device, pad_vis=3)
    q = q / 3  # keep softmax away from one-hot at large D so the comparison is informative
    for normalize in ("visual", "all"):
        got = scoring.visual_attention_mass(q, k, vidx, normalize=normalize, attention_mask=mask)
        want = reference.visual_attention_mass(q, k, vidx, normalize=normalize, attention_mask=mask)
        torch.testing.assert_close(got, want, **MASS_TOL[dtype])
        assert (got[1, -3:] == 0).all()


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32 (10 mantissa bits, to nearest): what a plain-tf32 tensor-core dot reads."""
    i = t.float().contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("D", [80, 128], ids=["d80", "d128"])
def test_kernel_mass_fp32_matches_float64(D, device):
    """fp32 scores use tf32x3 on a GPU (``scoring.FP32_PRECISION``): hi·hi + hi·lo + lo·hi drops only lo·lo,
    ~2^-22 of each product, below float32 rounding, so the float64 tolerance of the float32 reference holds.
    The same tolerance rejects plain tf32 (inputs rounded to 10 mantissa bits): it is tight enough to tell."""
    assert scoring.FP32_PRECISION == "tf32x3"
    B, Hq, Hkv, Lq, S, Nv = 1, 4, 2, 4, 48, 20
    q, k, vidx, mask = _mass_inputs(B, Hq, Hkv, Lq, S, D, Nv, torch.float32, device, pad_vis=0)
    want = _direct_mass(q, k, vidx, mask=mask)
    got = scoring.visual_attention_mass(q, k, vidx, attention_mask=mask)
    torch.testing.assert_close(got.double().cpu(), want, **DIRECT_TOL)
    tf32 = _direct_mass(_tf32(q), _tf32(k), vidx, mask=mask)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(tf32, want, **DIRECT_TOL)


@pytest.mark.parametrize("window", [7, 9], ids=["w7", "w9"])
def test_kernel_frame_large_window_chunks(window, device):
    # 50 and 82 partner slots: several slot chunks merged (Chan), the centre read once per chunk
    grid = (2, 5, 9)
    x = torch.randn(1, 90, 20, device=device)
    got = scoring.frame_semantic_scores(x, grid, window=window)
    want = reference.frame_semantic_scores(x, grid, window=window)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **FRAME_TOL)


def test_frame_rows_read_once_per_neighbourhood():
    # interior token, window 3, T > 1: itself once, the temporal partner once, 8 neighbours once each
    assert scoring.frame_rows_read((2, 3, 3), 3) == 2 * (9 + 9 + (4 * 3 + 4 * 5 + 8))
    assert scoring.frame_rows_read((1, 1, 1), 3) == 1
