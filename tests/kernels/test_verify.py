"""Verification kernels (vspec/kernels/verify.py) against the PyTorch reference.

Token ids, lengths and paths are compared with ``torch.equal`` where the math is exact on every device: argmax,
ranks and logit differences (greedy, tree, loose without its entropy gate). Where a GPU computes differently
(exp, log and division are approximate there, sums reorder, FMAs fuse) the comparison tolerates a near tie and
nothing else: sampling via ``_assert_sampling_agrees`` (a decision may differ only when the reference's own
margin is below ``SAMPLING_EPS`` relative), the loose entropy gate via ``_assert_loose_agrees`` (a position
within ``GATE_EPS`` of the gate may go either way). On the CPU kernel and reference still agree exactly.
Every buffer the kernels allocate is poisoned
(NaN / −7) so an element no program writes fails loudly. Under ``TRITON_INTERPRET=1`` each reduction in a
program costs milliseconds, so batches stay small; V = 151_936 runs with one or two rows.
"""

import inspect
import math

import pytest
import torch

from vspec import ops
from vspec.kernels import reference as ref

verify_kernels = pytest.importorskip("vspec.kernels.verify")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BIG_V = 151_936


@pytest.fixture(autouse=True)
def _kernels_poisoned(monkeypatch, device):
    if ops.backend_for(torch.empty(0, device=device)) != "triton":
        pytest.skip("the Triton backend is not selected (VSPEC_BACKEND or no triton)")

    def poisoned(shape, dtype, dev):
        t = torch.empty(shape, dtype=dtype, device=dev)
        if t.dtype == torch.bool:
            return t.fill_(True)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(verify_kernels, "_new", poisoned)


def _logits(B, R, V, dtype, device, *, ties=False, scale=3.0):
    x = (torch.randn(B, R, V) * scale).to(dtype)
    if ties:
        # copy each row's max to a random lower and a random higher index: argmax must pick the lowest
        top = x.float().argmax(-1)
        for b in range(B):
            for r in range(R):
                t = int(top[b, r])
                for j in (torch.randint(0, t + 1, ()).item(), torch.randint(t, V, ()).item()):
                    x[b, r, j] = x[b, r, t]
    return x.to(device)


# Near-tie tolerances (see the module docstring). GPU exp / division differ from the CPU's by a few ulp and the
# row sums by ~sqrt(V) ulp: ~1e-6 relative on p. 1e-4 leaves a margin, yet a wrong kernel whose decisions are
# unrelated to the reference's lands inside it with probability ~1e-4 per decision.
SAMPLING_EPS = 1e-4
GATE_EPS = 1e-5  # absolute, on the normalised top-3 entropy


def _assert_sampling_agrees(got, want, x, q, d, u, temperature=1.0, max_excused=1):
    """got (kernel) equals want (reference), except rows whose first disagreement is a near tie in the
    reference's own numbers: an acceptance with ``|u·q − p| <= SAMPLING_EPS · max(u·q, p)`` at the first
    position where the accept lengths differ, or a draw whose threshold lies within ``SAMPLING_EPS · total`` of
    every CDF step between the two drawn tokens. At most ``max_excused`` rows may be excused; returns their count."""
    acc_g, tok_g = (t.cpu() for t in got)
    acc_w, tok_w = (t.cpu() for t in want)
    x, q, d, u = x.cpu(), q.cpu().float(), d.cpu().long(), u.cpu()
    B, R, V = x.shape
    gamma = R - 1
    p, _, _ = ref.sampling_target_probs(x, temperature)
    excused = 0
    for b in range(B):
        if int(acc_g[b]) == int(acc_w[b]) and torch.equal(tok_g[b], tok_w[b]):
            continue
        a_g, a_w = int(acc_g[b]), int(acc_w[b])
        assert torch.equal(tok_g[b, :min(a_g, a_w)], tok_w[b, :min(a_g, a_w)]), (b, tok_g[b], tok_w[b])
        if a_g != a_w:
            j = min(a_g, a_w)
            lhs, rhs = float(u[b, j] * q[b, j, d[b, j]]), float(p[b, j, d[b, j]])
            assert abs(lhs - rhs) <= SAMPLING_EPS * max(lhs, rhs), \
                f"row {b}: accept length {a_g} vs reference {a_w}, not a near tie (u·q={lhs}, p={rhs})"
        else:
            a = a_w
            pa = p[b, a].double()
            qa = q[b, a].double() if a < gamma else torch.zeros_like(pa)
            w = (pa - qa).clamp_min(0.0)
            w = pa if float(w.sum()) <= 0 else w
            cdf, total = w.cumsum(0), float(w.sum())
            thr = float(u[b, gamma]) * total
            lo, hi = sorted((int(tok_g[b, a]), int(tok_w[b, a])))
            assert 0 <= lo and hi < V, (b, lo, hi)
            steps = cdf[lo:hi]  # every CDF step that separates the two tokens
            assert bool(((steps - thr).abs() <= SAMPLING_EPS * total).all()), \
                f"row {b}: drew {int(tok_g[b, a])} vs reference {int(tok_w[b, a])}, not a near tie"
        excused += 1
    assert excused <= max_excused, f"{excused} rows differ from the reference only by near ties: too many"
    return excused


def _assert_loose_agrees(got, x, d, strict, rule):
    """got (kernel, with return_loose) equals the reference, except that positions whose normalised top-3
    entropy lies within GATE_EPS of the gate may be decided either way: accept_len must then lie between the
    reference's at gate + GATE_EPS and at gate − GATE_EPS (acceptance is monotone in the gate), and tokens /
    loose mask must be what that accept_len implies. Exact equality when the two bracketing references agree."""
    full = {**ops.LOOSE_RULE_DEFAULTS, **rule}
    want = ref.verify_loose(x, d, strict, return_loose=True, **full)
    if full["entropy_gate"] <= 0:
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        return
    lo = ref.verify_loose(x, d, strict, return_loose=True, **{**full, "entropy_gate": full["entropy_gate"] - GATE_EPS})
    hi = ref.verify_loose(x, d, strict, return_loose=True, **{**full, "entropy_gate": full["entropy_gate"] + GATE_EPS})
    if all(torch.equal(a, b) for a, b in zip(lo, hi)):
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        return
    acc, tok, loose = got
    assert bool(((hi[0] <= acc) & (acc <= lo[0])).all()), (acc, hi[0], lo[0])
    _check_chain_layout(acc, tok, d, x.shape[-1])
    tgt = x.float().argmax(-1)
    assert torch.equal(tok.gather(1, acc[:, None]), tgt.gather(1, acc[:, None]))
    pos = torch.arange(d.shape[1], device=d.device)[None]
    assert torch.equal(loose, (pos < acc[:, None]) & (d != tgt[:, :d.shape[1]]))


def _drafts_with_prefix(target, prefix, V):
    """Drafts equal to ``target[:, :γ]`` on ``prefix[b]`` leading positions, then a certain mismatch."""
    B, R = target.shape
    d = target[:, :R - 1].clone()
    noise = torch.randint(0, V, d.shape, device=d.device)
    for b in range(B):
        k = int(prefix[b])
        if k < R - 1:
            d[b, k] = (target[b, k] + 1 + noise[b, k] % (V - 1)) % V
            d[b, k + 1:] = noise[b, k + 1:]
    return d


def _check_chain_layout(accept_len, tokens, drafts, V):
    """tokens[:, :a] = drafts, tokens[:, a] in [0, V), rest −1."""
    B, R = tokens.shape
    pos = torch.arange(R, device=tokens.device)[None]
    a = accept_len[:, None]
    assert bool(((accept_len >= 0) & (accept_len <= R - 1)).all())
    assert bool((tokens >= -1).all()) and bool((tokens < V).all())
    assert torch.equal(torch.where(pos[:, :R - 1] < a, tokens[:, :R - 1], -1),
                       torch.where(pos[:, :R - 1] < a, drafts.long(), -1))
    assert bool((tokens.gather(1, accept_len[:, None]) >= 0).all())
    assert bool((tokens[pos > a] == -1).all())


# --------------------------------------------------------------------------------------------------
# greedy chain
# --------------------------------------------------------------------------------------------------

GREEDY_CASES = [
    pytest.param(6, 1, 1000, "fp32", False, id="g1-V1000-fp32"),
    pytest.param(5, 4, 1000, "bf16", True, id="g4-V1000-bf16-ties"),
    pytest.param(5, 4, 1000, "fp16", True, id="g4-V1000-fp16-ties"),
    pytest.param(17, 16, 1000, "fp32", True, id="g16-V1000-fp32-ties"),
    pytest.param(3, 7, 777, "fp32", False, id="g7-V777-odd"),
    pytest.param(2, 2, BIG_V, "fp32", True, id="g2-V151936-fp32-ties"),
    pytest.param(2, 2, BIG_V, "bf16", False, id="g2-V151936-bf16"),
]


@pytest.mark.parametrize("B,gamma,V,dtype,ties", GREEDY_CASES)
def test_verify_greedy_matches_reference(B, gamma, V, dtype, ties, device):
    x = _logits(B, gamma + 1, V, DTYPES[dtype], device, ties=ties)
    target = ref.verify_greedy(x, torch.zeros(B, gamma, dtype=torch.long, device=device))[1]
    prefix = torch.arange(B) % (gamma + 1)  # every accept length occurs
    d = _drafts_with_prefix(target, prefix, V)
    got = ops.verify_greedy(x, d)
    want = ref.verify_greedy(x, d)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[0].cpu(), prefix.long())
    assert got[1].dtype == torch.long and got[0].dtype == torch.long


def test_verify_greedy_ties_across_blocks(device):
    V = 1000
    x = torch.zeros(3, 2, V, device=device)
    x[0, 0, [700, 40, 999]] = 5.0  # same max in three 16-wide blocks: 40 wins
    x[0, 1] = -1.0  # all equal: 0 wins
    x[1, 0, 999] = float("inf")
    x[1, 1, 3] = -float("inf")  # row of zeros with one -inf: 0 wins
    x[2, 0, [17, 16]] = 2.0  # 16 and 17 in one block, 16 is lowest
    x[2, 1, 512] = 1e30
    d = torch.tensor([[40], [999], [17]], device=device)
    for block_v in (16, 128, 1024):
        acc, tgt = verify_kernels.verify_greedy(x, d, block_v=block_v)
        assert tgt.tolist() == [[40, 0], [999, 0], [16, 512]]
        assert acc.tolist() == [1, 1, 0]
    assert torch.equal(ops.verify_greedy(x, d)[1], ref.verify_greedy(x, d)[1])


def test_verify_greedy_noncontiguous_and_int32(device):
    base = _logits(6, 3, 300, torch.float32, device).transpose(0, 1)  # [3, 6, 300], batch stride < row stride
    x = base[:, ::2]  # [3, 3, 300], rows 2 apart
    target = x.argmax(-1)
    d = target[:, :2].to(torch.int32).t().contiguous().t()  # column-major int32
    d[1, 1] += 1
    got = ops.verify_greedy(x, d)
    assert got[0].tolist() == [2, 1, 2]
    assert torch.equal(got[1], target)
    x_t = _logits(2, 2, 64, torch.float32, device).transpose(1, 2).contiguous().transpose(1, 2)
    assert x_t.stride(-1) != 1
    d2 = x_t.argmax(-1)[:, :1]
    assert torch.equal(ops.verify_greedy(x_t, d2)[1], ref.verify_greedy(x_t, d2)[1])


def test_verify_gamma0_and_empty_batch(device):
    x = _logits(3, 1, 50, torch.float32, device)
    acc, tgt = ops.verify_greedy(x, torch.zeros(3, 0, dtype=torch.long, device=device))
    assert acc.tolist() == [0, 0, 0] and torch.equal(tgt, x.argmax(-1))
    acc, tgt = ops.verify_greedy(x[:0], torch.zeros(0, 0, dtype=torch.long, device=device))
    assert acc.shape == (0,) and tgt.shape == (0, 1)
    d0 = torch.zeros(3, 0, dtype=torch.long, device=device)
    q0 = torch.zeros(3, 0, 50, device=device)
    got = ops.verify_sampling(x, q0, d0, seed=5)
    want = ref.verify_sampling(x, q0, d0, seed=5)
    _assert_sampling_agrees(got, want, x, q0, d0, ref.sampling_uniforms(3, 0, seed=5))
    assert got[0].tolist() == [0, 0, 0]
    s0 = torch.zeros(3, 0, dtype=torch.bool, device=device)
    acc, tok, loose = ops.verify_loose(x, d0, s0, return_loose=True)
    assert acc.tolist() == [0, 0, 0] and torch.equal(tok, x.argmax(-1)) and loose.shape == (3, 0)


# --------------------------------------------------------------------------------------------------
# greedy tree
# --------------------------------------------------------------------------------------------------


def _random_parents(N, gen=None):
    return [-1] + [int(torch.randint(0, i, (), generator=gen)) for i in range(1, N)]


def _tree_tokens(logits, parents, p_follow=0.75):
    """Tokens that follow the target's argmax at the parent with probability p_follow."""
    B, N, V = logits.shape
    par = parents if parents.ndim == 2 else parents.expand(B, N)
    am = logits.float().argmax(-1)
    follow = torch.rand(B, N, device=logits.device) < p_follow
    tok = torch.randint(0, V, (B, N), device=logits.device)
    want = am.gather(1, par.clamp_min(0))
    return torch.where(follow, want, tok)


def _check_path(acc, path, nxt, logits, tokens, parents):
    B, N, V = logits.shape
    par = parents if parents.ndim == 2 else parents.expand(B, N)
    am = logits.float().argmax(-1)
    for b in range(B):
        a = int(acc[b])
        row = path[b].tolist()
        assert row[0] == 0 and all(v == -1 for v in row[a + 1:]) and all(v >= 0 for v in row[:a + 1])
        for d in range(1, a + 1):
            node, up = row[d], row[d - 1]
            assert int(par[b, node]) == up and int(tokens[b, node]) == int(am[b, up])
        assert int(nxt[b]) == int(am[b, row[a]])


TREE_CASES = [
    pytest.param(3, 1, 1000, "fp32", False, id="N1-root-only"),
    pytest.param(4, 7, 1000, "fp32", False, id="N7-shared"),
    pytest.param(3, 25, 1000, "bf16", True, id="N25-per-row-bf16"),
    pytest.param(2, 64, 1000, "fp16", False, id="N64-shared-fp16"),
    pytest.param(3, 33, 500, "fp32", True, id="N33-per-row"),
    pytest.param(1, 6, BIG_V, "bf16", False, id="N6-V151936"),
]


@pytest.mark.parametrize("B,N,V,dtype,per_row", TREE_CASES)
def test_verify_tree_matches_reference(B, N, V, dtype, per_row, device):
    x = _logits(B, N, V, DTYPES[dtype], device, ties=True)
    if per_row:
        parents = torch.tensor([_random_parents(N) for _ in range(B)], device=device)
    else:
        parents = torch.tensor(_random_parents(N), device=device)
    tokens = _tree_tokens(x, parents)
    got = ops.verify_tree_greedy(x, tokens, parents)
    want = ref.verify_tree_greedy(x, tokens, parents)
    for g, w in zip(got, want):
        assert g.dtype == torch.long and torch.equal(g, w)
    depth = ref.tree_depths(parents.cpu())
    assert got[1].shape == (B, int(depth.max()) + 1)
    _check_path(*got, x, tokens, parents)


def test_verify_tree_hand_made(device):
    # root ── 1 ── 3 ── 5
    #      └─ 2 ── 4
    #            └ 6
    parents = [-1, 0, 0, 1, 2, 3, 2]
    V = 10
    x = torch.zeros(2, 7, V, device=device)
    argmax = [3, 7, 4, 8, 1, 2, 9]  # target argmax at every node
    for n, t in enumerate(argmax):
        x[:, n, t] = 1.0
    # row 0: 1 and 2 both carry the root's argmax (3); 1→3 accepted, 3→5 rejected; 2→4 and 2→6 rejected
    # row 1: 1 rejected, 2 accepted, 4 and 6 both carry node 2's argmax (4): tie at depth 2 → node 4
    tokens = torch.tensor([[0, 3, 3, 7, 0, 0, 0],
                           [0, 5, 3, 0, 4, 0, 4]], device=device)
    acc, path, nxt = ops.verify_tree_greedy(x, tokens, parents)
    assert acc.tolist() == [2, 2]
    assert path.tolist() == [[0, 1, 3, -1], [0, 2, 4, -1]]
    assert nxt.tolist() == [8, 1]
    tokens[0, 5] = 8  # now 3→5 accepted as well
    acc, path, nxt = ops.verify_tree_greedy(x, tokens, torch.tensor(parents, device=device))
    assert acc.tolist() == [3, 2] and path[0].tolist() == [0, 1, 3, 5] and nxt.tolist() == [2, 1]


def test_verify_tree_chain_equals_greedy(device):
    gamma = 5
    x = _logits(6, gamma + 1, 300, torch.float32, device)
    target = x.argmax(-1)
    d = _drafts_with_prefix(target, torch.arange(6), 300)
    tokens = torch.cat([torch.zeros(6, 1, dtype=torch.long, device=device), d], 1)
    acc, path, nxt = ops.verify_tree_greedy(x, tokens, list(range(-1, gamma)))
    g_acc, g_tgt = ops.verify_greedy(x, d)
    assert torch.equal(acc, g_acc)
    assert torch.equal(nxt, g_tgt.gather(1, g_acc[:, None])[:, 0])


# --------------------------------------------------------------------------------------------------
# speculative sampling
# --------------------------------------------------------------------------------------------------


def _sampling_inputs(B, gamma, V, dtype, device, *, draft_noise=1.0, temperature=1.0):
    x = _logits(B, gamma + 1, V, dtype, device, scale=2.0)
    q_logits = x[:, :gamma].float() + draft_noise * torch.randn(B, gamma, V, device=device)
    q = torch.softmax(q_logits / temperature, -1)
    d = torch.multinomial(q.reshape(-1, V), 1).reshape(B, gamma)
    return x, q.to(dtype), d


SAMPLING_CASES = [
    pytest.param(6, 1, 1000, "fp32", 1.0, 0.3, id="g1-V1000-fp32"),
    pytest.param(4, 4, 1000, "bf16", 0.7, 0.5, id="g4-V1000-bf16-T0.7"),
    pytest.param(4, 4, 1000, "fp16", 1.3, 1.0, id="g4-V1000-fp16-T1.3"),
    pytest.param(3, 16, 1000, "fp32", 1.0, 0.1, id="g16-V1000-fp32"),
    pytest.param(8, 3, 8, "fp32", 1.0, 3.0, id="g3-V8-far-draft"),
    pytest.param(2, 2, BIG_V, "fp32", 1.0, 0.3, id="g2-V151936-fp32"),
]


@pytest.mark.parametrize("B,gamma,V,dtype,temperature,noise", SAMPLING_CASES)
def test_verify_sampling_matches_reference(B, gamma, V, dtype, temperature, noise, device):
    x, q, d = _sampling_inputs(B, gamma, V, DTYPES[dtype], device, draft_noise=noise, temperature=temperature)
    seen = set()
    for seed in range(3 if V < 10_000 else 1):
        got = ops.verify_sampling(x, q, d, temperature=temperature, seed=seed)
        want = ref.verify_sampling(x, q, d, temperature=temperature, seed=seed)
        u = ref.sampling_uniforms(B, gamma, seed=seed)
        _assert_sampling_agrees(got, want, x, q, d, u, temperature)
        _check_chain_layout(*got, d, V)
        seen.update(got[0].tolist())
    if V < 10_000 and gamma > 1:
        assert len(seen) > 1  # both acceptances and rejections happened


def test_verify_sampling_generator_state(device):
    x, q, d = _sampling_inputs(5, 3, 64, torch.float32, device)
    g1 = torch.Generator().manual_seed(123)
    g2 = torch.Generator().manual_seed(123)
    for _ in range(2):  # the generator advances identically
        g3 = torch.Generator()
        g3.set_state(g2.get_state())
        u = ref.sampling_uniforms(5, 3, generator=g3)
        got = ops.verify_sampling(x, q, d, generator=g1)
        want = ref.verify_sampling(x, q, d, generator=g2)
        _assert_sampling_agrees(got, want, x, q, d, u)
    assert torch.equal(ops.verify_sampling(x, q, d, seed=7)[1], ops.verify_sampling(x, q, d, seed=7)[1])


def test_verify_sampling_edge_probabilities(device):
    V = 16
    x = torch.zeros(4, 3, V, device=device)
    x[:, :, 0] = -float("inf")  # p(0) = 0
    q = torch.full((4, 2, V), 1.0 / V, device=device)
    d = torch.tensor([[0, 1], [1, 0], [2, 3], [4, 5]], device=device)
    q[2, 0, 2] = 0.0  # q = 0 with p > 0: always accepted
    q[3] = 2 * torch.softmax(x[3, :2], -1)  # unnormalised q = 2p: accept w.p. 1/2, residual 0 → draw from p
    seen3 = set()
    for seed in range(8):
        got = ops.verify_sampling(x, q, d, seed=seed)
        want = ref.verify_sampling(x, q, d, seed=seed)
        _assert_sampling_agrees(got, want, x, q, d, ref.sampling_uniforms(4, 2, seed=seed))
        assert got[0][0] == 0 and got[0][1] == 1  # p = 0 for the draft token: certain rejection
        assert got[0][2] >= 1
        seen3.add(int(got[0][3]))
        assert bool((got[1] != 0).all())  # token 0 has p = 0 and is never drawn
        _check_chain_layout(*got, d, V)
    assert 0 in seen3 or 1 in seen3  # the fallback draw happened


def _chi2_sf(stat: float, dof: int) -> float:
    try:
        from scipy.stats import chi2
    except ImportError:
        return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                             torch.tensor(stat / 2, dtype=torch.float64)))
    return float(chi2.sf(stat, dof))


def _chi2_stat(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    n = counts.sum()
    expected = probs.double() * n
    keep = expected > 0
    assert int(counts[~keep].sum()) == 0, "a token of probability 0 was emitted"
    stat = ((counts[keep].double() - expected[keep]) ** 2 / expected[keep]).sum()
    return float(stat), int(keep.sum()) - 1


def _sampler(device):
    # 20k rows take minutes under the interpreter: there the statistics run on the reference (which the
    # kernel matches token for token, tests above); on a GPU they run on the kernel itself.
    return ops.verify_sampling if torch.device(device).type == "cuda" else ref.verify_sampling


FALSE_ALARM = 1e-3  # per test, fixed seeds make each outcome reproducible


def test_verify_sampling_first_token_follows_target(device):
    n, V = 20_000, 8
    target = torch.tensor([3.0, 0.0, -1.0, 2.0, -5.0, 1.0, 0.5, -float("inf")])
    # far from the target (total variation 0.75) and putting mass on token 7, which the target forbids
    draft = torch.softmax(torch.tensor([0.0, 2.0, 1.0, 0.5, 1.0, 1.5, -1.0, 1.0]), -1)
    x = target.expand(n, 2, V).contiguous().to(device)
    q = draft.expand(n, 1, V).contiguous().to(device)
    d = torch.multinomial(q[:, 0], 1, generator=torch.Generator(device=device).manual_seed(1))
    acc, tok = _sampler(device)(x, q, d, seed=2)
    p0 = torch.softmax(target, -1)
    counts = torch.bincount(tok[:, 0].cpu(), minlength=V)
    stat, dof = _chi2_stat(counts, p0)
    assert _chi2_sf(stat, dof) > FALSE_ALARM, (stat, dof, counts.tolist())
    # the draft was far from the target: both branches of the algorithm were exercised
    assert abs(acc.float().mean().item() - 0.2541) < 0.02  # acceptance rate = Σ min(p, q)


def test_verify_sampling_two_tokens_follow_markov_target(device):
    # target and draft are Markov chains over V = 4; logits at position 1 depend on the draft token at 0.
    n, V, root = 20_000, 4, 0
    P = torch.softmax(torch.tensor([[2.0, 0.0, -1.0, 1.0], [0.0, 1.5, 0.5, -2.0],
                                    [-1.0, 0.0, 2.0, 0.3], [1.0, 1.0, -1.0, 0.0]]), -1)
    Q = torch.softmax(torch.tensor([[-1.0, 2.0, 0.0, 0.0], [1.0, -1.0, 0.0, 2.0],
                                    [0.0, 2.0, -2.0, 0.0], [-1.0, 0.0, 2.0, 1.0]]), -1)
    gen = torch.Generator().manual_seed(3)
    d0 = torch.multinomial(Q[root].expand(n, V), 1, generator=gen)[:, 0]
    d1 = torch.multinomial(Q[d0], 1, generator=gen)[:, 0]
    x = torch.stack([P[root].expand(n, V), P[d0], P[d1]], 1).log()
    q = torch.stack([Q[root].expand(n, V), Q[d0]], 1)
    d = torch.stack([d0, d1], 1)
    acc, tok = _sampler(device)(x.to(device), q.to(device), d.to(device), seed=4)
    acc, tok = acc.cpu(), tok.cpu()
    stat, dof = _chi2_stat(torch.bincount(tok[:, 0], minlength=V), P[root])
    # second emitted token, given the first was accepted as a: must follow P[a]
    for a in range(V):
        rows = (acc >= 1) & (tok[:, 0] == a)
        s, k = _chi2_stat(torch.bincount(tok[rows, 1], minlength=V), P[a])
        stat, dof = stat + s, dof + k
    assert _chi2_sf(stat, dof) > FALSE_ALARM, (stat, dof)


# --------------------------------------------------------------------------------------------------
# loose verification
# --------------------------------------------------------------------------------------------------


def _loose_inputs(B, gamma, V, dtype, device, scale=2.0):
    x = _logits(B, gamma + 1, V, dtype, device, scale=scale)
    top = x[:, :gamma].float().topk(min(4, V), -1).indices  # [B, γ, 4]
    pick = torch.randint(0, top.shape[-1], (B, gamma), device=device)
    d = top.gather(-1, pick[..., None])[..., 0]
    rand = torch.rand(B, gamma, device=device) < 0.1
    d = torch.where(rand, torch.randint(0, V, (B, gamma), device=device), d)
    # adjacent argmax copies, so the shift rule has something to salvage
    shifted = torch.rand(B, gamma, device=device) < 0.15
    d[:, 1:] = torch.where(shifted[:, 1:], x[:, :gamma - 1].float().argmax(-1), d[:, 1:])
    return x, d


def _greedy_tokens(acc, tgt, d):
    R = tgt.shape[1]
    pos = torch.arange(R, device=tgt.device)[None]
    full = torch.cat([d.long(), tgt[:, -1:]], 1)
    out = torch.where(pos < acc[:, None], full, -1)
    return torch.where(pos == acc[:, None], tgt, out)


RULES = {
    "default": {},
    "topk5-noratio": dict(top_k=5, min_prob_ratio=0.0, entropy_gate=0.0, shift=0),
    "shift2-window2": dict(shift=2, window=2, top_k=2),
    "gate0.8": dict(entropy_gate=0.8, min_prob_ratio=0.1),
    "ratio-only": dict(top_k=1_000_000, min_prob_ratio=0.5, shift=0, entropy_gate=0.0),
}

LOOSE_CASES = [
    pytest.param(6, 4, 1000, "fp32", id="g4-V1000-fp32"),
    pytest.param(4, 8, 1000, "bf16", id="g8-V1000-bf16"),
    pytest.param(3, 16, 50, "fp16", id="g16-V50-fp16"),
]


@pytest.mark.parametrize("rule", list(RULES), ids=list(RULES))
@pytest.mark.parametrize("B,gamma,V,dtype", LOOSE_CASES)
def test_verify_loose_matches_reference(B, gamma, V, dtype, rule, device):
    x, d = _loose_inputs(B, gamma, V, DTYPES[dtype], device)
    strict = torch.rand(B, gamma, device=device) < 0.3
    got = ops.verify_loose(x, d, strict, return_loose=True, **RULES[rule])
    _assert_loose_agrees(got, x, d, strict, RULES[rule])
    acc, tok, loose = got
    _check_chain_layout(acc, tok, d, V)
    g_acc, g_tgt = ref.verify_greedy(x, d)
    assert bool((acc >= g_acc).all())
    tgt = x.float().argmax(-1)
    assert torch.equal(tok.gather(1, acc[:, None]), tgt.gather(1, acc[:, None]))  # correction = argmax
    pos = torch.arange(gamma, device=device)[None]
    inside = pos < acc[:, None]
    exact = d == tgt[:, :gamma]
    assert bool((exact | ~strict | ~inside).all())  # anchors inside the accepted run match exactly
    assert torch.equal(loose, inside & ~exact)


def test_verify_loose_accepts_more_somewhere(device):
    x, d = _loose_inputs(6, 8, 1000, torch.float32, device, scale=0.5)
    strict = torch.zeros(6, 8, dtype=torch.bool, device=device)
    acc = ops.verify_loose(x, d, strict, entropy_gate=0.0)[0]
    assert bool((acc > ref.verify_greedy(x, d)[0]).any())  # the rule is not a no-op on these inputs


ZERO_TOLERANCE = [
    pytest.param(dict(top_k=1, shift=0), True, id="zero-tolerance"),
    pytest.param(dict(top_k=1, shift=0, min_prob_ratio=0.0, entropy_gate=0.0, window=3), True, id="zero-all"),
    pytest.param({}, False, id="all-strict-default"),
    pytest.param(dict(top_k=50, shift=3, min_prob_ratio=0.0), False, id="all-strict-wide"),
]


@pytest.mark.parametrize("rule,loose_positions", ZERO_TOLERANCE)
@pytest.mark.parametrize("V,dtype", [(1000, "fp32"), (BIG_V, "bf16")], ids=["V1000", "V151936"])
def test_verify_loose_reduces_to_greedy(rule, loose_positions, V, dtype, device):
    B, gamma = (5, 4) if V < 10_000 else (1, 3)
    x, d = _loose_inputs(B, gamma, V, DTYPES[dtype], device)
    strict = torch.full((B, gamma), not loose_positions, dtype=torch.bool, device=device)
    acc, tok, loose = ops.verify_loose(x, d, strict, return_loose=True, **rule)
    g_acc, g_tgt = ops.verify_greedy(x, d)
    assert torch.equal(acc, g_acc)
    assert torch.equal(tok, _greedy_tokens(g_acc, g_tgt, d))
    assert not bool(loose.any())


def test_verify_loose_hand_made(device):
    # position 0: argmax 0 (logit 2), token 1 at ratio e^-0.5 ≈ 0.61, token 2 at e^-3; target fairly unsure
    row = torch.tensor([2.0, 1.5, -1.0, 1.2, -9.0, -9.0, -9.0, -9.0])
    x = torch.stack([row, row.roll(1), row.roll(2)], 0)[None].to(device)  # argmax 0, 1, 2
    strict = torch.zeros(1, 2, dtype=torch.bool, device=device)

    def run(d, **rule):
        d = torch.tensor([d], device=device)
        acc, tok, loose = ops.verify_loose(x, d, strict, return_loose=True, **rule)
        want = ref.verify_loose(x, d, strict, return_loose=True,
                                **{**ops.LOOSE_RULE_DEFAULTS, **rule})
        assert torch.equal(acc, want[0]) and torch.equal(tok, want[1]) and torch.equal(loose, want[2])
        return int(acc), tok[0].tolist(), loose[0].tolist()

    assert run([1, 1]) == (2, [1, 1, 2], [True, False])  # runner-up accepted, then exact
    assert run([1, 1], min_prob_ratio=0.7, shift=0)[0] == 0  # ratio 0.61 < 0.7
    assert run([1, 1], min_prob_ratio=0.7)[0] == 2  # ... but 1 is the argmax one position later
    assert run([1, 1], top_k=1, shift=0)[0] == 0
    assert run([2, 1], shift=0)[0] == 0  # token 2 is ranked 4th and far below
    assert run([5, 2])[0] == 0  # 5 is nowhere near
    assert run([1, 0], shift=0, top_k=2)[:2] == (1, [1, 1, -1])  # 0 is far below at position 1
    assert run([1, 0], top_k=1) == (2, [1, 0, 2], [True, True])  # shift: the argmax one later / earlier
    assert run([1, 0], top_k=1, shift=0)[0] == 0
    assert run([1, 1], window=2) == (2, [1, 1, 2], [True, False])  # followed by one exact match
    assert run([1, 0], window=2, top_k=3, min_prob_ratio=0.0, shift=0)[0] == 0  # followed by a loose one
    # a confident target forces the exact match
    x[0, 0] = torch.tensor([9.0, 6.0, -1.0, -2.0, -9.0, -9.0, -9.0, -9.0])
    assert run([1, 1], min_prob_ratio=0.0)[0] == 0
    assert run([1, 1], min_prob_ratio=0.0, entropy_gate=0.0)[0] == 2


def test_loose_rule_defaults_match_reference():
    sig = inspect.signature(ref.verify_loose).parameters
    for k, v in ops.LOOSE_RULE_DEFAULTS.items():
        assert sig[k].default == v, k


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------


_X = torch.randn(2, 4, 10)
_D = torch.zeros(2, 3, dtype=torch.long)
_Q = torch.full((2, 3, 10), 0.1)
_S = torch.zeros(2, 3, dtype=torch.bool)
_T = torch.zeros(2, 4, dtype=torch.long)

BAD_CALLS = [
    ("greedy-logits-2d", lambda: ops.verify_greedy(_X[0], _D), ValueError, "logits"),
    ("greedy-logits-int", lambda: ops.verify_greedy(_X.long(), _D), TypeError, "logits"),
    ("greedy-logits-f64", lambda: ops.verify_greedy(_X.double(), _D), TypeError, "logits"),
    ("greedy-draft-len", lambda: ops.verify_greedy(_X, _D[:, :2]), ValueError, "draft_tokens"),
    ("greedy-draft-batch", lambda: ops.verify_greedy(_X, _D[:1]), ValueError, "draft_tokens"),
    ("greedy-draft-float", lambda: ops.verify_greedy(_X, _D.float()), TypeError, "draft_tokens"),
    ("greedy-draft-range", lambda: ops.verify_greedy(_X, _D + 10), ValueError, "draft_tokens"),
    ("greedy-draft-neg", lambda: ops.verify_greedy(_X, _D - 1), ValueError, "draft_tokens"),
    ("tree-root", lambda: ops.verify_tree_greedy(_X, _T, [0, 0, 1, 2]), ValueError, "parents"),
    ("tree-forward", lambda: ops.verify_tree_greedy(_X, _T, [-1, 0, 3, 1]), ValueError, "parents"),
    ("tree-self", lambda: ops.verify_tree_greedy(_X, _T, [-1, 0, 2, 1]), ValueError, "parents"),
    ("tree-len", lambda: ops.verify_tree_greedy(_X, _T, [-1, 0, 1]), ValueError, "parents"),
    ("tree-float", lambda: ops.verify_tree_greedy(_X, _T, torch.zeros(4)), TypeError, "parents"),
    ("tree-rowwise", lambda: ops.verify_tree_greedy(_X, _T, torch.tensor([[-1, 0, 1, 1], [-1, 0, 0, 5]])),
     ValueError, "parents"),
    ("tree-rows", lambda: ops.verify_tree_greedy(_X, _T, torch.tensor([[-1, 0, 1, 1]] * 3)), ValueError,
     "parents"),
    ("tree-tokens", lambda: ops.verify_tree_greedy(_X, _T[:, :3], [-1, 0, 1, 2]), ValueError, "tree_tokens"),
    ("tree-token-range", lambda: ops.verify_tree_greedy(_X, _T + 10, [-1, 0, 1, 2]), ValueError,
     "tree_tokens"),
    ("sampling-temp0", lambda: ops.verify_sampling(_X, _Q, _D, temperature=0.0), ValueError, "temperature"),
    ("sampling-temp-neg", lambda: ops.verify_sampling(_X, _Q, _D, temperature=-1.0), ValueError,
     "temperature"),
    ("sampling-temp-nan", lambda: ops.verify_sampling(_X, _Q, _D, temperature=math.nan), ValueError,
     "temperature"),
    ("sampling-temp-str", lambda: ops.verify_sampling(_X, _Q, _D, temperature="1"), TypeError, "temperature"),
    ("sampling-q-shape", lambda: ops.verify_sampling(_X, _Q[:, :2], _D), ValueError, "draft_probs"),
    ("sampling-q-vocab", lambda: ops.verify_sampling(_X, _Q[..., :9], _D), ValueError, "draft_probs"),
    ("sampling-q-int", lambda: ops.verify_sampling(_X, _Q.long(), _D), TypeError, "draft_probs"),
    ("sampling-draft", lambda: ops.verify_sampling(_X, _Q, _D[:, :2]), ValueError, "draft_tokens"),
    ("sampling-draft-range", lambda: ops.verify_sampling(_X, _Q, _D + 10), ValueError, "draft_tokens"),
    ("sampling-gen", lambda: ops.verify_sampling(_X, _Q, _D, generator=3), TypeError, "generator"),
    ("sampling-both", lambda: ops.verify_sampling(_X, _Q, _D, seed=1, generator=torch.Generator()),
     ValueError, "generator"),
    ("loose-mask-dtype", lambda: ops.verify_loose(_X, _D, _S.long()), TypeError, "strict_mask"),
    ("loose-mask-shape", lambda: ops.verify_loose(_X, _D, _S[:, :2]), ValueError, "strict_mask"),
    ("loose-unknown", lambda: ops.verify_loose(_X, _D, _S, topk=3), TypeError, "topk"),
    ("loose-topk0", lambda: ops.verify_loose(_X, _D, _S, top_k=0), ValueError, "top_k"),
    ("loose-ratio", lambda: ops.verify_loose(_X, _D, _S, min_prob_ratio=1.5), ValueError, "min_prob_ratio"),
    ("loose-shift", lambda: ops.verify_loose(_X, _D, _S, shift=-1), ValueError, "shift"),
    ("loose-window", lambda: ops.verify_loose(_X, _D, _S, window=0), ValueError, "window"),
    ("loose-gate", lambda: ops.verify_loose(_X, _D, _S, entropy_gate=-0.1), ValueError, "entropy_gate"),
    ("loose-shift-float", lambda: ops.verify_loose(_X, _D, _S, shift=1.0), TypeError, "shift"),
]


@pytest.mark.parametrize("call,exc,needle", [pytest.param(*c[1:], id=c[0]) for c in BAD_CALLS])
def test_verify_argument_errors(call, exc, needle):
    with pytest.raises(exc, match=needle):
        call()


@pytest.mark.parametrize("block_v", [16, 64], ids=["bv16", "bv64"])
def test_small_vocab_blocks(block_v, device):
    """Many vocabulary blocks on a small V: cross-block argmax ties, rank, top-3 merge and inverse CDF."""
    B, gamma, V = 3, 3, 200
    x = _logits(B, gamma + 1, V, torch.float32, device, ties=True, scale=1.0)
    x[0, 0, 5::16] = x[0, 0].max()  # the max repeated once per block
    d = _loose_inputs(B, gamma, V, torch.float32, device)[1]
    strict = torch.zeros(B, gamma, dtype=torch.bool, device=device)
    for rule in ({**ops.LOOSE_RULE_DEFAULTS, "entropy_gate": 0.8}, dict(top_k=4, min_prob_ratio=0.0, shift=0,
                                                                       entropy_gate=0.99, window=1)):
        got = verify_kernels.verify_loose(x, d, strict, return_loose=True, block_v=block_v, **rule)
        _assert_loose_agrees(got, x, d, strict, rule)
    q = torch.softmax(torch.randn(B, gamma, V, device=device), -1)
    for seed in range(3):
        u = ref.sampling_uniforms(B, gamma, seed=seed, device=device)
        got = verify_kernels.verify_sampling(x, q, d, uniforms=u, block_v=block_v)
        want = ref.verify_sampling(x, q, d, uniforms=u)
        _assert_sampling_agrees(got, want, x, q, d, u)
    parents = torch.tensor([-1, 0, 0, 1], device=device)
    tok = _tree_tokens(x, parents)
    got = verify_kernels.verify_tree_greedy(x, tok, parents, width=3, block_v=block_v)
    assert all(torch.equal(g, w) for g, w in zip(got, ref.verify_tree_greedy(x, tok, parents)))


def test_check_ids_off_keeps_results(device):
    x = _logits(2, 3, 100, torch.float32, device)
    d = x.argmax(-1)[:, :2]
    assert torch.equal(ops.verify_greedy(x, d, check_ids=False)[1], ops.verify_greedy(x, d)[1])
    strict = torch.zeros(2, 2, dtype=torch.bool, device=device)
    assert torch.equal(ops.verify_loose(x, d, strict, check_ids=False)[1], ops.verify_loose(x, d, strict)[1])


# --------------------------------------------------------------------------------------------------
# the near-tie rules still catch a wrong kernel
# --------------------------------------------------------------------------------------------------


def test_sampling_rule_rejects_a_wrong_kernel(device):
    B, gamma, V = 8, 4, 300
    x, q, d = _sampling_inputs(B, gamma, V, torch.float32, device, draft_noise=0.5)
    u = ref.sampling_uniforms(B, gamma, seed=1)
    want = ref.verify_sampling(x, q, d, uniforms=u.to(device))
    assert _assert_sampling_agrees(want, want, x, q, d, u) == 0
    # a kernel that used other random numbers, or the wrong temperature, or drew one token too far
    for wrong in (ref.verify_sampling(x, q, d, uniforms=ref.sampling_uniforms(B, gamma, seed=2).to(device)),
                  ref.verify_sampling(x, q, d, uniforms=u.to(device), temperature=0.8)):
        with pytest.raises(AssertionError):
            _assert_sampling_agrees(wrong, want, x, q, d, u)
    acc, tok = want
    shifted = tok.clone()
    rows = torch.arange(B, device=device)
    shifted[rows, acc] = (tok[rows, acc] + 1) % V
    with pytest.raises(AssertionError):
        _assert_sampling_agrees((acc, shifted), want, x, q, d, u)


def test_sampling_rule_excuses_only_a_near_tie(device):
    # one draft token whose p equals u·q up to 1e-6 relative: a flipped decision there is excused, and only there
    V = 8
    x = torch.log(torch.tensor([[0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]] * 2))[None].to(device)
    d = torch.tensor([[1]], device=device)
    q = torch.full((1, 1, V), 1.0 / V, device=device)
    p1 = float(ref.sampling_target_probs(x)[0][0, 0, 1])
    u = torch.tensor([[p1 / (1.0 / V) * (1 + 1e-6), 0.5]])  # u·q just above p: rejected by the reference
    want = ref.verify_sampling(x, q, d, uniforms=u.to(device))
    assert want[0].item() == 0
    flipped = (torch.ones_like(want[0]), torch.tensor([[1, 0]], device=device))
    assert _assert_sampling_agrees(flipped, want, x, q, d, u) == 1
    u_far = torch.tensor([[p1 / (1.0 / V) * 1.01, 0.5]])
    want_far = ref.verify_sampling(x, q, d, uniforms=u_far.to(device))
    with pytest.raises(AssertionError):
        _assert_sampling_agrees(flipped, want_far, x, q, d, u_far)


def test_loose_rule_rejects_a_wrong_kernel(device):
    x, d = _loose_inputs(6, 8, 1000, torch.float32, device, scale=0.5)
    strict = torch.zeros(6, 8, dtype=torch.bool, device=device)
    rule = dict(entropy_gate=0.3)
    good = ref.verify_loose(x, d, strict, return_loose=True, **{**ops.LOOSE_RULE_DEFAULTS, **rule})
    _assert_loose_agrees(good, x, d, strict, rule)
    # a kernel whose gate misfires (forces every position strict: normalised entropy never reaches 1 here)
    wrong = ref.verify_loose(x, d, strict, return_loose=True, **{**ops.LOOSE_RULE_DEFAULTS, "entropy_gate": 1.0})
    assert not torch.equal(wrong[0], good[0])  # the inputs make the gate matter
    with pytest.raises(AssertionError):
        _assert_loose_agrees(wrong, x, d, strict, rule)


# --------------------------------------------------------------------------------------------------
# NaN and ±inf logits: torch.argmax semantics, ids always in [0, V), kernel == reference
# --------------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def _special_logits(dtype, device, V=200):
    """[3, 4, V]: every row a different mix of NaN / ±inf; rows [0, 0] and [2, 3] stay finite."""
    x = torch.randn(3, 4, V) * 2
    x[0, 1, 150] = NAN  # one NaN
    x[0, 2, [170, 40]] = NAN  # first NaN (40) wins; blocks of 16 put them in different blocks
    x[0, 2, 100] = 50.0
    x[0, 3] = NAN  # all NaN: argmax 0
    x[1, 0, [120, 90]] = INF  # first +inf (90)
    x[1, 1, 130] = NAN
    x[1, 1, 10] = INF  # NaN beats +inf
    x[1, 2] = -INF  # all -inf: argmax 0
    x[1, 3, :150] = -INF  # -inf mixed with finite values: a finite row
    x[2, 0, 5] = -INF
    x[2, 1, 199] = NAN  # NaN in the last (partial) block
    x[2, 2, 0] = NAN
    x[2, 2, 1] = INF
    return x.to(dtype).to(device)


SPECIAL_DTYPES = [pytest.param(k, id=k) for k in DTYPES]


@pytest.mark.parametrize("block_v", [16, None], ids=["bv16", "bv-default"])
@pytest.mark.parametrize("dtype", SPECIAL_DTYPES)
def test_verify_greedy_and_tree_nan_inf(dtype, block_v, device):
    x = _special_logits(DTYPES[dtype], device)
    V = x.shape[-1]
    am = x.float().argmax(-1)  # torch.argmax: NaN is the max, first NaN wins
    assert am[0, 2] == 40 and am[1, 0] == 90 and am[1, 1] == 130 and am[0, 3] == 0 and am[1, 2] == 0
    d = am[:, :3].clone()
    d[1, 2] = (d[1, 2] + 1) % V
    acc, tgt = verify_kernels.verify_greedy(x, d, block_v=block_v)
    assert torch.equal(tgt, am) and acc.tolist() == [3, 2, 3]
    assert all(torch.equal(g, w) for g, w in zip(ops.verify_greedy(x, d), ref.verify_greedy(x, d)))
    parents = torch.tensor([-1, 0, 0, 1], device=device)
    tok = am.gather(1, parents.clamp_min(0).expand(3, 4)).clone()
    tok[2, 1] = (tok[2, 1] + 1) % V  # row 2 follows the second branch only
    got = verify_kernels.verify_tree_greedy(x, tok, parents, width=3, block_v=block_v)
    want = ref.verify_tree_greedy(x, tok, parents)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert bool(((got[2] >= 0) & (got[2] < V)).all())
    assert got[0].tolist() == [2, 2, 1]


@pytest.mark.parametrize("dtype", SPECIAL_DTYPES)
def test_verify_sampling_nan_inf(dtype, device):
    x = _special_logits(DTYPES[dtype], device)
    B, R, V = x.shape
    am = x.float().argmax(-1)
    point = ~torch.isfinite(x.float().amax(-1))
    q = torch.softmax(torch.randn(B, R - 1, V, device=device), -1).to(DTYPES[dtype])
    d = torch.where(point[:, :R - 1], am[:, :R - 1], torch.multinomial(q.float().reshape(-1, V), 1).reshape(B, R - 1))
    for block_v in (16, None):
        for seed in range(4):
            u = ref.sampling_uniforms(B, R - 1, seed=seed)
            got = verify_kernels.verify_sampling(x, q, d, uniforms=u.to(device), block_v=block_v, temperature=0.7)
            want = ref.verify_sampling(x, q, d, uniforms=u.to(device), temperature=0.7)
            _assert_sampling_agrees(got, want, x, q, d, u, 0.7)
            acc, tok = got
            _check_chain_layout(acc, tok, d, V)
            for b in range(B):  # a point-mass row accepts its argmax and draws nothing else
                a = int(acc[b])
                assert all(bool(point[b, i]) is False or int(tok[b, i]) == int(am[b, i]) for i in range(a + 1))


@pytest.mark.parametrize("dtype", SPECIAL_DTYPES)
def test_verify_loose_nan_inf(dtype, device):
    x = _special_logits(DTYPES[dtype], device)
    B, R, V = x.shape
    xf = x.float()
    # the runner-up at every position: loosely acceptable on finite rows, never on non-finite ones
    d = xf.nan_to_num(nan=-1e30, posinf=-1e30).topk(2, -1).indices[:, :R - 1, 1]
    strict = torch.zeros(B, R - 1, dtype=torch.bool, device=device)
    rule = dict(top_k=5, min_prob_ratio=0.0, entropy_gate=0.0, shift=0)
    for block_v in (16, None):
        got = verify_kernels.verify_loose(x, d, strict, return_loose=True, block_v=block_v,
                                          **{**ops.LOOSE_RULE_DEFAULTS, **rule})
        _assert_loose_agrees(got, x, d, strict, rule)
        acc, tok, loose = got
        _check_chain_layout(acc, tok, d, V)
        finite = torch.isfinite(xf.amax(-1))[:, :R - 1]
        assert not bool((loose & ~finite).any())
        assert acc.tolist() == [1, 0, 1]  # each row stops at its first non-finite position
        got = ops.verify_loose(x, d, strict, return_loose=True)  # default rule, gate on
        _assert_loose_agrees(got, x, d, strict, {})


# --------------------------------------------------------------------------------------------------
# caps: vocabulary blocks and tree size
# --------------------------------------------------------------------------------------------------


def test_block_v_cap(device):
    x = _logits(1, 2, 5000, torch.float32, device)
    d = x.argmax(-1)[:, :1]
    with pytest.raises(ValueError, match="block_v=64 splits V=5000 into 79 blocks"):
        verify_kernels.verify_greedy(x, d, block_v=64)
    assert torch.equal(verify_kernels.verify_greedy(x, d, block_v=128)[1], x.argmax(-1))
    assert verify_kernels.pick_block_v(BIG_V, None) == 4096
    assert triton_cdiv(BIG_V * 4, verify_kernels.pick_block_v(BIG_V * 4, None)) <= verify_kernels.MAX_BLOCKS


def triton_cdiv(a, b):
    return -(-a // b)


def test_tree_size_cap(device):
    from vspec.kernels import MAX_TREE_NODES

    N = MAX_TREE_NODES + 1
    x = torch.zeros(1, N, 16, device=device)
    parents = list(range(-1, N - 1))
    tok = torch.zeros(1, N, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match=f"at most {MAX_TREE_NODES}"):
        ops.verify_tree_greedy(x, tok, parents)
    with pytest.raises(ValueError, match="at most"):
        verify_kernels.verify_tree_greedy(x, tok, torch.tensor(parents, device=device), width=N)


def test_verify_tree_largest_tree_and_int32_parents(device):
    from vspec.kernels import MAX_TREE_NODES

    N, V = MAX_TREE_NODES, 64
    x = _logits(1, N, V, torch.float32, device, ties=True)
    parents = torch.tensor(_random_parents(N), device=device)
    tok = _tree_tokens(x, parents, p_follow=0.9)
    depth = int(ref.tree_depths(parents.cpu()).max()) + 1
    want = ref.verify_tree_greedy(x, tok, parents)
    for par in (parents, parents.to(torch.int32)):  # int32 parents: the launcher is called directly
        got = verify_kernels.verify_tree_greedy(x, tok, par, width=depth)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
