"""compact_kv_: the Triton kernel (CPU interpreter without CUDA) vs the reference, whole tensors compared."""

import pytest
import torch

from vspec import ops
from vspec.kernels import reference as ref

kv_kernel = pytest.importorskip("vspec.kernels.kv")

S, H, D = 24, 2, 12  # D not a power of two: the D-block is masked


def _patterns(B: int, S: int) -> dict[str, tuple[torch.Tensor, int | torch.Tensor]]:
    """Named (src_idx, dst_start) cases for B rows of a length-S cache."""
    g = torch.Generator().manual_seed(1)
    cases = {}
    # Every row moves by one position: each write lands on the previous program-order read.
    cases["shift_by_one"] = (torch.arange(1, S).repeat(B, 1), 0)
    cases["identity"] = (torch.arange(S).repeat(B, 1), 0)
    cases["none_kept"] = (torch.full((B, 7), -1), torch.arange(B) % 3)
    # Different number of kept rows per batch row via trailing -1, per-row dst_start.
    dst = torch.tensor([3 * b % 5 for b in range(B)])
    rows = []
    for b in range(B):
        d = int(dst[b])
        keep = torch.randperm(S - d, generator=g)[: 2 + 3 * b] + d
        rows.append(torch.cat([keep.sort().values, torch.full((S - 2 - 3 * b,), -1)]))
    cases["ragged_dst_tensor"] = (torch.stack([r[: S - 2] for r in rows]), dst)
    # -1 inside the row: that slot is left untouched.
    src = torch.stack([torch.arange(4, S, 2)] * B)
    src[:, 1] = -1
    src[:, 5] = -1
    cases["holes_dst_int"] = (src, 2)
    # Speculative tree path: keep nodes 0, 2, 5 of a 6-node tree appended after a 16-token prefix.
    cases["tree_path"] = (torch.tensor([[16, 18, 21]] * B), 16)
    # Keep every other row of a prompt, mixed with a random subset per row.
    cases["every_other"] = (torch.arange(0, S, 2).repeat(B, 1), 0)
    rand = [torch.randperm(S, generator=g)[: S // 3].sort().values for _ in range(B)]
    cases["random_subset"] = (torch.stack(rand), 0)
    return cases


def _run_both(kv: torch.Tensor, src_idx, dst_start, **kw):
    got, want = kv.clone(), kv.clone()
    kv_kernel.compact_kv_(got, src_idx, dst_start, **kw)
    ref.compact_kv_(want, src_idx, dst_start)
    return got, want


PATTERN_NAMES = list(_patterns(2, S))


@pytest.mark.parametrize("pattern", PATTERN_NAMES)
@pytest.mark.parametrize("lead", [(), (2,), (3, 2)], ids=["lead0", "lead2", "lead3x2"])
def test_kernel_matches_reference(pattern, lead):
    B = 3
    kv = torch.randn(*lead, B, H, S, D)
    src_idx, dst_start = _patterns(B, S)[pattern]
    got, want = _run_both(kv, src_idx, dst_start)
    assert torch.equal(got, want)


@pytest.mark.parametrize("block_k", [1, 2, 8])
@pytest.mark.parametrize("pattern", ["shift_by_one", "ragged_dst_tensor", "holes_dst_int"])
def test_kernel_chunking(pattern, block_k):
    """Several chunks per program (and one row per chunk): the ascending-chunk order is what keeps it safe."""
    kv = torch.randn(2, 2, H, S, 16)
    src_idx, dst_start = _patterns(2, S)[pattern]
    got, want = _run_both(kv, src_idx, dst_start, block_k=block_k, block_d=8)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dtypes(dtype):
    kv = torch.randn(2, 2, 2, H, S, D).to(dtype)
    src_idx, dst_start = _patterns(2, S)["ragged_dst_tensor"]
    got, want = _run_both(kv, src_idx, dst_start)
    assert got.dtype == dtype
    assert torch.equal(got, want)  # a copy: bit-exact


def test_reference_shift_by_one_by_hand():
    kv = torch.randn(2, 3, H, S, D)
    want = kv.clone()
    want[..., : S - 1, :] = kv[..., 1:, :]
    got = kv.clone()
    ref.compact_kv_(got, torch.arange(1, S).repeat(3, 1), 0)
    assert torch.equal(got, want)
    got = kv.clone()
    kv_kernel.compact_kv_(got, torch.arange(1, S).repeat(3, 1), 0)
    assert torch.equal(got, want)


def test_reference_holes_by_hand():
    kv = torch.randn(1, 1, 8, 2)
    want = kv.clone()
    want[0, 0, 1] = kv[0, 0, 3]  # slot 1 + 0 <- row 3
    want[0, 0, 3] = kv[0, 0, 6]  # slot 1 + 2 <- row 6; slot 2 (j = 1, -1) untouched
    got = kv.clone()
    ref.compact_kv_(got, torch.tensor([[3, -1, 6]]), torch.tensor([1]))
    assert torch.equal(got, want)


@pytest.mark.parametrize("layout",
                         ["strided_S", "strided_D", "lead_permuted", "storage_slice", "three_groups"])
def test_non_contiguous(layout):
    B = 2
    if layout == "strided_S":
        base = torch.randn(2, B, H, 2 * S, D)
        view = lambda t: t[..., ::2, :]
    elif layout == "strided_D":
        base = torch.randn(2, B, H, S, 2 * D)
        view = lambda t: t[..., 1::2]
    elif layout == "lead_permuted":  # leading dims do not merge into one stride
        base = torch.randn(2, 3, B, H, S, D)
        view = lambda t: t.transpose(0, 1)
    elif layout == "storage_slice":  # [L, 2, B, H, S_max, D] storage, first layers and a prefix of S_max
        base = torch.randn(4, 2, B, H, S + 5, D)
        view = lambda t: t[:3, :, :, :, :S]
    else:  # three non-mergeable leading groups: the launcher loops over the outermost
        base = torch.randn(2, 3, 2, B, H, S, D)
        view = lambda t: t.permute(2, 0, 1, 3, 4, 5, 6)
    got_base, want_base = base.clone(), base.clone()
    src_idx, dst_start = _patterns(B, S)["ragged_dst_tensor"]
    kv_kernel.compact_kv_(view(got_base), src_idx, dst_start)
    ref.compact_kv_(view(want_base), src_idx, dst_start)
    assert not torch.equal(want_base, base)
    assert torch.equal(got_base, want_base)  # memory outside the view untouched too


def test_int32_src_and_dst_tensor():
    kv = torch.randn(2, 2, H, S, D)
    src_idx, dst_start = _patterns(2, S)["ragged_dst_tensor"]
    got, want = _run_both(kv, src_idx.to(torch.int32), dst_start.to(torch.int32))
    assert torch.equal(got, want)


def test_ops_dispatch_and_checks_pass(monkeypatch):
    monkeypatch.delenv("VSPEC_BACKEND", raising=False)
    kv = torch.randn(2, 2, H, S, D, device="cuda" if torch.cuda.is_available() else "cpu")
    src_idx, dst_start = _patterns(2, S)["ragged_dst_tensor"]
    src_idx, dst_start = src_idx.to(kv.device), dst_start.to(kv.device)
    assert ops.backend_for(kv, src_idx) == "triton"  # conftest sets TRITON_INTERPRET=1 without CUDA
    got, want = kv.clone(), kv.clone()
    assert ops.compact_kv_(got, src_idx, dst_start, check=True) is None
    ref.compact_kv_(want, src_idx, dst_start)
    assert torch.equal(got, want)
    got = kv.clone()
    ops.compact_kv_(got, src_idx, torch.tensor(0, device=kv.device))  # 0-dim tensor dst_start
    want = kv.clone()
    ref.compact_kv_(want, src_idx, 0)
    assert torch.equal(got, want)


def test_ops_reference_backend(monkeypatch):
    monkeypatch.setenv("VSPEC_BACKEND", "reference")
    kv = torch.randn(3, 2, H, S, D)
    src_idx, dst_start = _patterns(2, S)["holes_dst_int"]
    got, want = kv.clone(), kv.clone()
    ops.compact_kv_(got, src_idx, dst_start)
    ref.compact_kv_(want, src_idx, dst_start)
    assert torch.equal(got, want)


def test_empty_inputs():
    kv = torch.randn(2, 2, H, S, D)
    got = kv.clone()
    ops.compact_kv_(got, torch.empty(2, 0, dtype=torch.long), 0)
    assert torch.equal(got, kv)
    kv0 = torch.randn(0, 2, H, S, D)
    ops.compact_kv_(kv0, torch.zeros(2, 3, dtype=torch.long), 0)


# ---- errors -----------------------------------------------------------------------------------------------


def _ok():
    return torch.randn(2, 2, H, S, D), torch.arange(1, 5).repeat(2, 1), 0


@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("kv_list", TypeError, "kv must be a torch.Tensor"),
        ("kv_int", TypeError, "kv must be a floating-point"),
        ("kv_3d", ValueError, r"kv must be \[\.\.\., B, H, S, D\]"),
        ("kv_broadcast", ValueError, "broadcast view"),
        ("src_float", TypeError, "src_idx must be an integer"),
        ("src_1d", ValueError, "src_idx must have 2 dims"),
        ("src_wrong_B", ValueError, r"src_idx must be \[B, K\]"),
        ("dst_float", TypeError, "dst_start must be an int or an integer tensor"),
        ("dst_bool", TypeError, "dst_start must be an int or an integer tensor"),
        ("dst_int_range", ValueError, r"dst_start must be in \[0, S=24\]"),
        ("dst_wrong_shape", ValueError, r"dst_start must be an int or a \[B\] tensor"),
        ("dst_float_tensor", TypeError, "dst_start must be an integer tensor"),
        ("device", ValueError, "src_idx is on meta but kv is on"),
    ],
)
def test_argument_errors(case, exc, match):
    kv, src, dst = _ok()
    if case == "kv_list":
        kv = kv.tolist()
    elif case == "kv_int":
        kv = kv.to(torch.int32)
    elif case == "kv_3d":
        kv = kv[0, 0]
    elif case == "kv_broadcast":
        kv = kv[:1].expand(3, *kv.shape[1:])
    elif case == "src_float":
        src = src.float()
    elif case == "src_1d":
        src = src[0]
    elif case == "src_wrong_B":
        src = src[:1]
    elif case == "dst_float":
        dst = 1.0
    elif case == "dst_bool":
        dst = True
    elif case == "dst_int_range":
        dst = S + 1
    elif case == "dst_wrong_shape":
        dst = torch.zeros(3, dtype=torch.long)
    elif case == "dst_float_tensor":
        dst = torch.zeros(2)
    elif case == "device":
        src = src.to("meta")
    before = kv.clone() if isinstance(kv, torch.Tensor) else None
    with pytest.raises(exc, match=match):
        ops.compact_kv_(kv, src, dst)
    if before is not None:
        assert torch.equal(kv, before)


@pytest.mark.parametrize(
    "src, dst, match",
    [
        ([[2, 1, 3], [1, 2, 3]], 0, "strictly ascending"),
        ([[1, 1, 3], [1, 2, 3]], 0, "strictly ascending"),
        ([[3, -1, 3], [1, 2, 3]], 0, "strictly ascending"),
        ([[0, 1, 2], [1, 2, 3]], 1, r"src_idx\[0, 0\] = 0 < 1 \+ 0"),
        ([[1, 2, 3], [5, 6, 7]], [0, 6], r"src_idx\[1, 0\] = 5 < 6 \+ 0"),
        ([[1, 2, S], [1, 2, 3]], 0, r"in \[0, S=24\)"),
        ([[1, 2, -2], [1, 2, 3]], 0, "must be -1"),
        ([[1, 2, 3], [1, 2, 3]], [0, S + 1], r"dst_start must be in \[0, S=24\]"),
    ],
    ids=["descending", "duplicate", "duplicate_across_hole", "src_before_dst", "per_row_dst", "src_ge_S",
         "below_minus_one", "dst_tensor_range"],
)
def test_value_checks(src, dst, match, monkeypatch):
    kv = torch.randn(2, 2, H, S, D)
    before = kv.clone()
    src = torch.tensor(src)
    dst = torch.tensor(dst) if isinstance(dst, list) else dst
    with pytest.raises(ValueError, match=match):
        ops.compact_kv_(kv, src, dst, check=True)
    monkeypatch.setenv("VSPEC_DEBUG", "1")
    with pytest.raises(ValueError, match=match):
        ops.compact_kv_(kv, src, dst)
    assert torch.equal(kv, before)


def test_kernel_never_touches_memory_outside_the_view_on_bad_indices():
    """Unchecked out-of-range indices (check=False) are skipped in the kernel, never read/written outside."""
    base = torch.randn(2, 2, H, 2 * S, D)
    before = base.clone()
    view = base[..., :S, :]
    # Row 0: a source past S (inside base's memory, outside the view); row 1: dst_start + j past S.
    src = torch.tensor([[S + 3, -1], [S - 1, S - 1]])
    kv_kernel.compact_kv_(view, src, torch.tensor([0, S - 1]))
    assert torch.equal(base[..., S:, :], before[..., S:, :])
    assert torch.equal(base[:, 0], before[:, 0])  # row 0 skipped: nothing read from past S
    assert torch.equal(base, before)  # row 1: j = 0 is in place, j = 1 would land at S: skipped
