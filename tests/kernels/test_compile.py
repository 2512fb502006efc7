"""Every kernel variant the ops launch compiles for sm_90a (and one variant per kernel for sm_80) without a GPU.

The variants come from :mod:`vspec.kernel_report` (the same list the benches print); they are compiled once per
session in a child process with the interpreter off (``triton.compile`` + the ptxas bundled with the Triton
wheel; ~40 s on a shared 2-core machine with a cold Triton cache). Checks: no compile error (the interpreter
accepts code a GPU build rejects, e.g. a loop-carried int64 reassigned from an int32 load), no register spills
on hot variants, shared memory within the architecture's per-block limit. A deliberately spilling probe proves
the spill check can fail.
"""

import pytest

pytest.importorskip("triton")

from vspec import kernel_report  # noqa: E402
from vspec.kernels import MAX_TREE_NODES  # noqa: E402

if kernel_report.ptxas_path(90) is None or kernel_report.ptxas_path(80) is None:
    pytest.skip("ptxas not found: Triton's NVIDIA backend ships it in the triton wheel; without it nothing can be "
                "compiled for a GPU target", allow_module_level=True)

# per-block shared memory opt-in limits (CUDA programming guide, compute capabilities table)
SMEM_LIMIT = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}


@pytest.fixture(scope="module")
def rows():
    return kernel_report.report(archs=(90, 80), families=kernel_report.ALL_FAMILIES + ("probe",))


def _kernel_rows(rows):
    return [r for r in rows if not r["label"].startswith("probe")]


def _fmt(bad):
    return "\n" + kernel_report.format_table(bad)


def test_every_variant_compiles(rows):
    bad = [r for r in rows if r["error"]]
    assert not bad, _fmt(bad)


def test_hot_variants_do_not_spill(rows):
    hot = [r for r in _kernel_rows(rows) if r["hot"]]
    assert len(hot) >= 40
    bad = [r for r in hot if r["spill_stores"] or r["spill_loads"]]
    assert not bad, _fmt(bad)


def test_shared_memory_fits_one_block(rows):
    bad = [r for r in rows if not r["error"] and r["shared"] > SMEM_LIMIT[r["arch"]]]
    assert not bad, _fmt(bad)


def test_spill_check_can_fail(rows):
    probe = [r for r in rows if r["label"].startswith("probe")]
    assert len(probe) == 1 and probe[0]["spill_stores"] > 0, probe


def test_variants_cover_every_kernel_and_the_shapes_that_matter():
    import importlib

    vs = kernel_report.variants()
    for family in kernel_report.ALL_FAMILIES:
        mod = importlib.import_module(f"vspec.kernels.{family}")
        kernels = {n for n in vars(mod) if n.startswith("_") and n.endswith("_kernel")}
        covered = {v.kernel for v in vs if v.family == family}
        assert kernels == covered, (family, kernels ^ covered)
    mass = [v for v in vs if v.kernel == "_mass_lse_partial_kernel"]
    for dtype in ("bf16", "fp32"):
        assert {v.constexprs["D"] for v in mass if v.dtype == dtype} >= {80, 128, 256}
    assert 64 in {v.constexprs["D"] for v in mass}
    tree = [v for v in vs if v.kernel == "_greedy_tree_kernel"]
    assert max(v.constexprs["BLOCK_N"] for v in tree) >= MAX_TREE_NODES
    assert any(v.pointers.get("par_ptr") == "i32" for v in tree)  # the int32-parents regression
    assert max(v.constexprs["BLOCK_R"] for v in vs if v.kernel == "_loose_accept_kernel") >= 32
    gdn = [v for v in vs if v.kernel == "_gated_delta_kernel"]  # Qwen3.5's real head dims, both phases
    assert {(v.dtype, v.constexprs["COMMIT"]) for v in gdn} >= {(d, c) for d in ("bf16", "fp32") for c in (False, True)}
    assert all(v.constexprs["BLOCK_K"] == 128 and v.hot for v in gdn)


def test_sm80_compiles_one_variant_per_kernel(rows):
    sm80 = {r["kernel"] for r in rows if r["arch"] == "sm_80"}
    sm90 = {r["kernel"] for r in rows if r["arch"] == "sm_90a"}
    assert sm80 == sm90
