"""Keep-set policy (vspec.runtime.pruning): budgets, method rules on hand-made examples, determinism,
errors."""

import subprocess
import sys

import pytest
import torch

from vspec.runtime.pruning import frame_ids_from_grid, keep_count, pad_keep, select_keep

SCORED = ["semantic", "attention", "uniform", "random"]


def _scores(B, nmax):
    return dict(attention=torch.rand(B, nmax), temporal=torch.rand(B, nmax), spatial=torch.rand(B, nmax))


@pytest.mark.parametrize("n,keep,want", [
    (63, 0.1, 6), (5, 0.5, 3), (100, 0.001, 1), (5, 10, 5), (7, 1.0, 7), (7, 3, 3), (0, 0.5, 0),
    (10, 0.25, 3),
], ids=["ratio", "half-up", "at-least-1", "count-capped", "ratio-1", "count", "empty", "2.5-up"])
def test_keep_count(n, keep, want):
    assert keep_count(n, keep) == want


@pytest.mark.parametrize("method", SCORED)
@pytest.mark.parametrize("visual_form", ["counts", "mask", "tensor-counts"])
def test_sorted_unique_exact_k(method, visual_form):
    counts = [40, 17, 0, 63]
    nmax = 63
    mask = torch.arange(nmax)[None, :] < torch.tensor(counts)[:, None]
    visual = {"counts": counts, "mask": mask, "tensor-counts": torch.tensor(counts)}[visual_form]
    frames = torch.arange(nmax) // 9
    gen = torch.Generator().manual_seed(1)
    got = select_keep(visual, method=method, keep=0.2, frame_ids=frames, generator=gen, **_scores(4, nmax))
    assert len(got) == 4
    for row, n in zip(got, counts):
        assert row.dtype == torch.long
        assert row.numel() == keep_count(n, 0.2)
        assert torch.equal(row, torch.unique(row))  # sorted and unique
        assert row.numel() == 0 or (0 <= row.min() and row.max() < n)


def test_mask_with_holes_and_none():
    mask = torch.tensor([[True, False, True, True, False, True], [False] * 5 + [True]])
    got = select_keep(mask, method="none", keep=0.1)
    assert [r.tolist() for r in got] == [[0, 2, 3, 5], [5]]
    att = torch.tensor([[0.0, 9.0, 0.1, 0.5, 9.0, 0.2], [0.0] * 6])
    got = select_keep(mask, method="attention", keep=1, attention=att)
    assert [r.tolist() for r in got] == [[3], [5]]  # masked columns never chosen, however high their score


def test_uniform_evenly_spaced():
    assert select_keep([10], method="uniform", keep=5)[0].tolist() == [1, 3, 5, 7, 9]
    assert select_keep([9], method="uniform", keep=3)[0].tolist() == [1, 4, 7]


def test_attention_40_percent_rule():
    att = torch.tensor([[0.05, 0.30, 0.05, 0.15, 0.05, 0.05, 0.20, 0.05, 0.05, 0.05]])
    # top set holding >= 40%: 0.30 (col 1) + 0.20 (col 6); the other 2 slots spread over the 8 left:
    # [0, 2, 3, 4, 5, 7, 8, 9] at bin centres 2 and 6 -> cols 3 and 8
    assert select_keep([10], method="attention", keep=4, attention=att)[0].tolist() == [1, 3, 6, 8]
    # the top set is capped at K
    assert select_keep([10], method="attention", keep=1, attention=att)[0].tolist() == [1]
    # a larger fraction grows the top set: 0.30 + 0.20 + 0.15 >= 0.6
    got = select_keep([10], method="attention", keep=4, attention=att, mass_fraction=0.6)[0].tolist()
    assert got == [1, 3, 5, 6]  # top {1, 6, 3}; 1 slot over [0, 2, 4, 5, 7, 8, 9] -> centre (index 3) col 5
    # an all-zero row falls back to uniform
    zero = select_keep([10], method="attention", keep=5, attention=torch.zeros(1, 10))[0]
    assert zero.tolist() == [1, 3, 5, 7, 9]


def test_semantic_per_frame_normalisation_and_floor():
    # frame 0 scores live on a small scale, frame 1 on a large one: only per-frame normalisation lets
    # frame 0's standout token (col 2) compete
    temporal = torch.tensor([[0.1, 0.2, 0.9, 0.1, 10.0, 20.0, 30.0, 40.0]])
    frames = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    kw = dict(method="semantic", temporal=temporal, frame_ids=frames, weights=(0.0, 1.0, 0.0), score_norm="frame")
    # normalised: [0, .125, 1, 0 | 0, 1/3, 2/3, 1]; floor picks 2 and 7, the global top adds 6
    assert select_keep([8], keep=3, per_frame_floor=1, **kw)[0].tolist() == [2, 6, 7]
    assert select_keep([8], keep=4, per_frame_floor=2, **kw)[0].tolist() == [1, 2, 6, 7]
    # floor 0: plain global top-K of the fused score, ties to the lower index
    assert select_keep([8], keep=2, per_frame_floor=0, **kw)[0].tolist() == [2, 7]


def test_semantic_global_normalisation():
    # the same scores normalised over the whole row: frame 0's 0.9 is tiny next to frame 1's 10..40
    temporal = torch.tensor([[0.1, 0.2, 0.9, 0.1, 10.0, 20.0, 30.0, 40.0]])
    frames = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    kw = dict(method="semantic", temporal=temporal, frame_ids=frames, weights=(0.0, 1.0, 0.0), score_norm="global")
    assert select_keep([8], keep=3, per_frame_floor=0, **kw)[0].tolist() == [5, 6, 7]
    assert select_keep([8], keep=3, per_frame_floor=1, **kw)[0].tolist() == [2, 6, 7]  # the floor still applies
    # fused signals are each scaled over the row: attention [0..1] plus 0.5 x temporal
    attention = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]])
    got = select_keep([8], keep=2, per_frame_floor=0, attention=attention, **{**kw, "weights": (1.0, 0.5, 0.0)})
    # fused: col 0 = 1 + 0.5*0 = 1.0, col 7 = 0.5 + 0.5*1 = 1.0, col 6 = 0 + 0.5*(29.9/39.9) ≈ 0.37
    assert got[0].tolist() == [0, 7]


def test_defaults_are_shared_with_prune_config():
    from vspec import PruneConfig
    from vspec.runtime import pruning

    pc = PruneConfig()
    assert (pc.weights, pc.per_frame_floor, pc.score_norm) == (
        pruning.DEFAULT_WEIGHTS, pruning.DEFAULT_PER_FRAME_FLOOR, pruning.DEFAULT_SCORE_NORM)
    with pytest.raises(ValueError, match="score_norm"):
        PruneConfig(score_norm="row")


def test_semantic_floor_respected():
    B, T, per = 2, 6, 10
    frames = torch.arange(T * per) // per
    # only frame 0 varies; every other frame is constant, so it normalises to 0 and without a floor the
    # global top-K never reaches frames 2..5
    attention = torch.full((B, T * per), 0.5)
    attention[:, :per] = torch.rand(B, per)
    kw = dict(method="semantic", keep=0.3, attention=attention, frame_ids=frames)
    bare = select_keep([T * per] * B, per_frame_floor=0, **kw)
    assert all((torch.bincount(frames[row], minlength=T) == 0).any() for row in bare)
    for floor in (1, 2, 3):
        got = select_keep([T * per] * B, per_frame_floor=floor, **kw)
        for row in got:
            assert row.numel() == 18
            counts = torch.bincount(frames[row], minlength=T)
            assert (counts >= floor).all(), counts
    # the budget cannot cover the floor (K=3 < 6 frames): no floor, still exactly K
    got = select_keep([T * per], method="semantic", keep=3, attention=attention[:1], frame_ids=frames,
                      per_frame_floor=1)
    assert got[0].numel() == 3


def test_random_seeded_determinism():
    a = select_keep([100, 50], method="random", keep=0.1, generator=torch.Generator().manual_seed(7))
    b = select_keep([100, 50], method="random", keep=0.1, generator=torch.Generator().manual_seed(7))
    c = select_keep([100, 50], method="random", keep=0.1, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("method", ["semantic", "attention", "uniform"])
def test_deterministic_methods_repeat(method):
    s = _scores(3, 30)
    a = select_keep([30, 21, 5], method=method, keep=0.3, **s)
    b = select_keep([30, 21, 5], method=method, keep=0.3, **s)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_padded_output_and_frame_ids():
    got = select_keep([6, 2], method="none", keep=1, padded=True)
    assert torch.equal(got, torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, -1, -1, -1, -1]]))
    ragged = pad_keep([torch.tensor([3]), torch.tensor([], dtype=torch.long)])
    assert torch.equal(ragged, torch.tensor([[3], [-1]]))
    assert frame_ids_from_grid((3, 2, 2)).tolist() == [0] * 4 + [1] * 4 + [2] * 4


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(method="uniform", keep=0), ValueError, "keep as a count must be >= 1"),
    (dict(method="uniform", keep=-3), ValueError, "keep as a count"),
    (dict(method="uniform", keep=1.5), ValueError, r"keep as a ratio must be in \(0, 1\]"),
    (dict(method="uniform", keep=0.0), ValueError, "keep as a ratio"),
    (dict(method="uniform", keep=True), TypeError, "keep must be"),
    (dict(method="uniform", keep="0.1"), TypeError, "keep must be"),
    (dict(method="topk", keep=0.1), ValueError, "method must be one of"),
    (dict(method="attention", keep=0.1), ValueError, "needs the attention scores"),
    (dict(method="semantic", keep=0.1), ValueError, "at least one score"),
    (dict(method="semantic", keep=0.1, attention=torch.rand(2, 5)), ValueError,
     r"attention must be \[B, Nmax\]"),
    (dict(method="semantic", keep=0.1, attention=torch.ones(1, 10, dtype=torch.long)), TypeError,
     "attention must"),
    (dict(method="semantic", keep=0.1, attention=torch.rand(1, 10), weights=(1, -1, 0)), ValueError,
     "weights"),
    (dict(method="semantic", keep=0.1, attention=torch.rand(1, 10), per_frame_floor=-1), ValueError,
     "floor"),
    (dict(method="attention", keep=0.1, attention=torch.rand(1, 10), mass_fraction=0), ValueError,
     "mass_fraction"),
    (dict(method="semantic", keep=0.1, attention=torch.rand(1, 10), score_norm="row"), ValueError, "score_norm"),
    (dict(method="attention", keep=0.1, attention=torch.full((1, 10), float("nan"))), ValueError, "finite"),
], ids=["keep-0", "keep-neg", "ratio>1", "ratio-0", "keep-bool", "keep-str", "method", "attention-missing",
        "semantic-no-score", "shape", "dtype", "weights", "floor", "mass-fraction", "score-norm", "nan"])
def test_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        select_keep([10], **kwargs)


def test_pruning_never_imports_triton():
    code = "import sys, vspec.runtime.pruning; sys.exit(1 if 'triton' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
