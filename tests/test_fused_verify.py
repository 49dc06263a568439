"""Tests of the fused speculative-decoding verifier (kernels/fused_verify.py).

Fast and vLLM-free.  The Triton kernel runs on CPU under the Triton interpreter
(TRITON_INTERPRET=1, set before triton is imported); ``SPECDIFF_TEST_DEVICE=cuda``
runs the kernel compiled on a GPU instead (``benchmarks/gpu_check.py`` does), with
the statistical check of the kernel at 10^6 draws.

* kernel == PyTorch reference, exactly (tokens and num_accepted), on random batches
  and hand-made edge cases; unfused baseline == reference;
* statistical exactness of the algorithm (reference, 10^6 draws): every emitted
  token follows the target distribution, checked by chi-square goodness of fit, plus
  a negative control (wrong draft probabilities) that must fail the same test.
"""

import os

DEVICE = os.environ.get("SPECDIFF_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton / the kernel module are imported

import functools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from vllm_specdiff.kernels import fused_verify as fv  # noqa: E402
from vllm_specdiff.kernels.fused_verify import (  # noqa: E402
    bytes_moved,
    fused_verify,
    fused_verify_reference,
    unfused_verify,
    verify,
)

NEG_INF = float("-inf")


def on_device(args):
    return [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]


def triton_verify(*args, **kwargs):
    """The Triton kernel on DEVICE, inputs and outputs on the CPU."""
    out, num_accepted = fused_verify(*on_device(args), **kwargs)
    return out.cpu(), num_accepted.cpu()


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """The tensors here are small: one intra-op thread avoids OpenMP oversubscription,
    which on a shared 2-core machine made the 10^6-draw test ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------
# Input builders
# --------------------------------------------------------------------------------------


def make_batch(seed, V, ns, greedy, with_q, with_bonus, *, scale=4.0, noise=0.5, wide_dtypes=True):
    """Random request-major batch.  Sampled drafts come from q = softmax(logits + noise),
    close to p so that acceptance happens; greedy / point-mass drafts hit the target
    argmax 70 % of the time (like n-gram drafts).  wide_dtypes: int64 ids + float64
    uniforms, else int32 + float32."""
    g = torch.Generator().manual_seed(seed)
    B = len(ns)
    n = torch.tensor(ns, dtype=torch.long)
    cu = torch.zeros(B + 1, dtype=torch.long)
    cu[1:] = n.cumsum(0)
    N = int(cu[-1])
    logits = torch.randn(N + B, V, generator=g) * scale
    req = torch.repeat_interleave(torch.arange(B), n)
    rows = torch.arange(N) + req
    q = torch.softmax(logits[rows] + noise * torch.randn(N, V, generator=g), dim=-1)
    x = torch.multinomial(q, 1, generator=g).squeeze(1) if N else torch.zeros(0, dtype=torch.long)
    is_greedy = torch.tensor(greedy, dtype=torch.bool)
    hit = torch.rand(N, generator=g) < 0.7
    argmax_hit = hit if not with_q else hit & is_greedy[req]
    x = torch.where(argmax_hit, logits[rows].argmax(-1), x)
    udt = torch.float64 if wide_dtypes else torch.float32
    idt = torch.long if wide_dtypes else torch.int32
    u_acc = torch.rand(N, generator=g, dtype=udt)
    u_smp = torch.rand(B, generator=g, dtype=udt)
    bonus = torch.randint(0, V, (B,), generator=g).to(idt) if with_bonus else None
    return (logits, x.to(idt), q if with_q else None, cu.to(idt), is_greedy, u_acc, u_smp, max(ns, default=0), bonus)


def assert_same(got, want, what=""):
    (out_g, n_g), (out_w, n_w) = got, want
    assert out_g.dtype == torch.int32 and n_g.dtype == torch.int32
    assert torch.equal(n_g, n_w), f"{what} num_accepted {n_g.tolist()} != {n_w.tolist()}"
    assert torch.equal(out_g, out_w), f"{what} tokens\n{out_g}\n!=\n{out_w}"


def check_well_formed(out, num_acc, args):
    """Accepted drafts, then one real token, then -1."""
    logits, x, _, cu, *_ = args
    for i in range(out.shape[0]):
        a, n_i = int(num_acc[i]), int(cu[i + 1] - cu[i])
        assert 0 <= a <= n_i
        assert out[i, :a].tolist() == x[int(cu[i]) : int(cu[i]) + a].tolist()
        assert 0 <= int(out[i, a]) < logits.shape[1]
        assert (out[i, a + 1 :] == -1).all()


F_, T_ = False, True
# name: (V, n_i per request, is_greedy per request, with draft_probs, with bonus_token_ids, BLOCK_V)
CONFIGS = {
    "mixed_q": (1000, [3, 0, 5, 1, 2], [F_, T_, F_, T_, F_], True, False, 256),
    "mixed_pointmass_bonus": (1000, [3, 0, 5, 1, 2], [F_, T_, F_, F_, T_], False, True, 256),
    "odd_vocab_q_bonus": (777, [4, 2, 0, 7, 3, 1], [F_] * 6, True, True, 128),
    "gamma1": (1000, [1] * 6, [F_, F_, F_, T_, T_, F_], False, False, 256),
    "all_greedy": (1000, [2, 5, 0, 3], [T_] * 4, False, False, 256),
    "all_greedy_q_bonus": (999, [2, 5, 0, 3], [T_] * 4, True, True, 128),
    "gpt2_vocab_q": (50257, [2, 4, 0], [F_, F_, T_], True, False, None),
    "gpt2_vocab_pointmass": (50257, [3, 1], [F_, T_], False, False, None),
}


# --------------------------------------------------------------------------------------
# kernel == reference (exact), unfused == reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernel_matches_reference(name):
    V, ns, greedy, with_q, with_bonus, block_v = CONFIGS[name]
    outcomes = []
    for seed in range(3):
        args = make_batch(seed, V, ns, greedy, with_q, with_bonus, wide_dtypes=seed != 1)
        want = fused_verify_reference(*args)
        got = triton_verify(*args, block_v=block_v)
        assert_same(got, want, f"{name} seed={seed}")
        check_well_formed(*want, args)
        outcomes += [(a, ni) for a, ni in zip(want[1].tolist(), ns) if ni > 0]
    # The random inputs must exercise both full acceptance and rejections.
    assert any(a == ni for a, ni in outcomes), outcomes
    assert any(a < ni for a, ni in outcomes), outcomes


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unfused_matches_reference(name):
    V, ns, greedy, with_q, with_bonus, _ = CONFIGS[name]
    for seed in range(3, 6):
        args = make_batch(seed, V, ns, greedy, with_q, with_bonus, wide_dtypes=seed % 2 == 0)
        assert_same(unfused_verify(*args), fused_verify_reference(*args), f"{name} seed={seed}")


# --------------------------------------------------------------------------------------
# Edge cases, checked for all three implementations
# --------------------------------------------------------------------------------------

IMPLS = {
    "triton": functools.partial(triton_verify, block_v=128),
    "reference": fused_verify_reference,
    "unfused": unfused_verify,
}


def _args(logits, x, q, ns, greedy, u_acc, u_smp, bonus=None, max_spec_len=None):
    cu = torch.zeros(len(ns) + 1, dtype=torch.long)
    cu[1:] = torch.tensor(ns).cumsum(0)
    return (
        logits.float(),
        torch.as_tensor(x, dtype=torch.long),
        q,
        cu,
        torch.as_tensor(greedy, dtype=torch.bool),
        torch.as_tensor(u_acc, dtype=torch.float64),
        torch.as_tensor(u_smp, dtype=torch.float64),
        max(ns) if max_spec_len is None else max_spec_len,
        None if bonus is None else torch.as_tensor(bonus, dtype=torch.long),
    )


@pytest.mark.parametrize("impl", list(IMPLS))
def test_q_zero_is_always_accepted(impl):
    g = torch.Generator().manual_seed(10)
    V, ns = 300, [2, 3]
    logits = torch.randn(sum(ns) + 2, V, generator=g)
    x = [7, 100, 3, 299, 150]
    q = torch.softmax(torch.randn(sum(ns), V, generator=g), -1)
    q[torch.arange(5), torch.tensor(x)] = 0.0  # q(x) = 0 < p(x): always accepted
    args = _args(logits, x, q, ns, [False, False], [0.999] * 5, [0.5, 0.5], bonus=[11, 22])
    out, num_acc = IMPLS[impl](*args)
    assert num_acc.tolist() == [2, 3]
    assert out.tolist() == [[7, 100, 11, -1], [3, 299, 150, 22]]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("with_bonus", [False, True])
def test_p_equals_q_accepts_everything(impl, with_bonus):
    g = torch.Generator().manual_seed(11)
    V, ns = 500, [3, 1, 4]
    N, B = sum(ns), len(ns)
    logits = torch.randn(N + B, V, generator=g) * 3
    req = torch.repeat_interleave(torch.arange(B), torch.tensor(ns))
    p = torch.softmax(logits[torch.arange(N) + req], -1)
    x = torch.multinomial(p, 1, generator=g).squeeze(1)
    # u < 0.99 keeps the test clear of the last-ulp difference between q and the recomputed p.
    u = torch.rand(N, generator=g, dtype=torch.float64) * 0.99
    args = _args(logits, x, p, ns, [False] * B, u, [0.3, 0.6, 0.9], bonus=[5, 6, 7] if with_bonus else None)
    out, num_acc = IMPLS[impl](*args)
    assert num_acc.tolist() == ns
    check_well_formed(out, num_acc, args)
    if with_bonus:
        assert [out[i, ns[i]].item() for i in range(B)] == [5, 6, 7]
    else:  # drawn from the bonus row: must agree with the reference
        assert_same((out, num_acc), fused_verify_reference(*args))


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("with_q", [False, True])
def test_one_hot_target(impl, with_q):
    """p(x) = 1 -> accepted whatever u is; p(x) = 0 -> rejected, the hot token is emitted."""
    # Requests: sampled all-hot, sampled miss at 0, greedy miss at 1, greedy all-hot.
    V, ns = 260, [3, 3, 2, 2]
    N, B = sum(ns), len(ns)
    hot = torch.tensor([3, 140, 259, 9, 0, 200, 17, 130, 64, 65, 66, 67, 1, 2])  # one per logits row
    logits = torch.full((N + B, V), NEG_INF)
    logits[torch.arange(N + B), hot] = 1.5
    draft_rows = [0, 1, 2, 4, 5, 6, 8, 9, 11, 12]  # request i's rows are shifted by i (bonus rows)
    x = hot[draft_rows].clone()
    x[3] = 8  # request 1, position 0: p(x) = 0
    x[7] = 5  # request 2, position 1
    q = torch.softmax(torch.randn(N, V, generator=torch.Generator().manual_seed(12)), -1) if with_q else None
    args = _args(logits, x, q, ns, [False, False, True, True], [0.9999] * N, [0.99] * B)
    out, num_acc = IMPLS[impl](*args)
    assert num_acc.tolist() == [3, 0, 1, 2]
    h = hot.tolist()
    assert out.tolist() == [
        [h[0], h[1], h[2], h[3]],  # all accepted + bonus drawn from a one-hot row
        [h[4], -1, -1, -1],
        [h[8], h[9], -1, -1],
        [h[11], h[12], h[13], -1],
    ]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_first_token_rejected(impl):
    g = torch.Generator().manual_seed(13)
    V, ns = 400, [4, 4]
    logits = torch.randn(10, V, generator=g)
    x = [17, 1, 2, 3, 250, 5, 6, 7]
    logits[0, 17] = NEG_INF  # request 0: p(x_0) = 0
    logits[5, 250] = NEG_INF  # request 1 (rows 5..9)
    for with_q in (False, True):
        q = torch.softmax(torch.randn(8, V, generator=g), -1) if with_q else None
        args = _args(logits, x, q, ns, [False, False], [0.0] * 8, [0.25, 0.75])
        out, num_acc = IMPLS[impl](*args)
        assert num_acc.tolist() == [0, 0]
        assert out[:, 1:].eq(-1).all()
        assert out[0, 0].item() != 17 and out[1, 0].item() != 250
        assert_same((out, num_acc), fused_verify_reference(*args))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_greedy_argmax_takes_first_index_of_ties(impl):
    V = 400  # BLOCK_V = 128 for the kernel: ties inside a block and across blocks
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(14))
    logits[0, [130, 131, 300]] = 9.0  # request 0, draft 0: first max at 130, draft 131 rejected
    logits[3, [390, 399]] = 9.0  # request 1 (rows 3, 4, bonus 5)
    logits[4, [0, 128]] = 9.0
    logits[5, [5, 300]] = 9.0  # bonus: first max at 5
    args = _args(logits, [131, 7, 390, 0], None, [2, 2], [True, True], [0.5] * 4, [0.5, 0.5])
    out, num_acc = IMPLS[impl](*args)
    assert num_acc.tolist() == [0, 2]
    assert out.tolist() == [[130, -1, -1], [390, 0, 5]]


@pytest.mark.parametrize("bonus_rows", [True, False])
def test_all_greedy_shortcut_equals_the_walk(bonus_rows):
    """The reference verifies an all-greedy batch in one argmax over every row; the same
    requests beside one sampled request without drafts (which changes nothing for
    them: it takes its bonus token) go through the position-by-position walk."""
    for seed in range(20):
        g = torch.Generator().manual_seed(100 + seed)
        ns = torch.randint(0, 6, (5,), generator=g).tolist()
        logits, x, _, cu, _, u_acc, _, _, bonus = make_batch(seed, 50, ns, [True] * 5, False, True)
        logits = (logits * 0.3).round()  # ties: the first index of the maximum must win
        rows = torch.arange(int(cu[-1])) + torch.repeat_interleave(torch.arange(5), torch.tensor(ns))
        x = torch.where(torch.rand(len(x), generator=g) < 0.8, logits[rows].argmax(-1), x)
        if not bonus_rows:
            logits = logits[rows]
        extra = dict(q_start=None, bonus_rows=bonus_rows)
        greedy = fused_verify_reference(logits, x, None, cu, torch.ones(5, dtype=torch.bool),
                                        u_acc, torch.rand(5, generator=g, dtype=torch.float64),
                                        max(ns), bonus, **extra)
        walk_logits = logits if not bonus_rows else torch.cat([logits, torch.randn(1, 50)])
        walked = fused_verify_reference(
            walk_logits, x, None, torch.cat([cu, cu[-1:]]),
            torch.tensor([True] * 5 + [False]), u_acc, torch.rand(6, generator=g, dtype=torch.float64),
            max(ns), torch.cat([bonus, bonus[:1]]), **extra)
        assert_same((greedy[0], greedy[1]), (walked[0][:5], walked[1][:5]), f"seed {seed}")


@pytest.mark.parametrize("bonus_rows", [True, False])
def test_testing_every_draft_at_once_equals_the_walk(bonus_rows):
    """The reference tests every draft of a small block at once and walks a large one
    position by position; both must emit the same tokens (mixed greedy and sampled
    requests, dense q, sparse q with point masses, no q)."""
    for seed in range(30):
        g = torch.Generator().manual_seed(300 + seed)
        ns = torch.randint(0, 7, (5,), generator=g).tolist()
        greedy = (torch.rand(5, generator=g) < 0.3).tolist()
        args = list(make_batch(seed, 64, ns, greedy, seed % 3 != 0, True))
        extra = {"bonus_rows": bonus_rows}
        if not bonus_rows:
            rows = torch.arange(sum(ns)) + torch.repeat_interleave(torch.arange(5), torch.tensor(ns))
            args[0] = args[0][rows]
        if seed % 3 == 2:  # sparse q: every other request a point mass
            q_start = args[3][:-1].clone().to(torch.int64)
            q_start[::2] = -1
            extra["q_start"] = q_start
        walked = fused_verify_reference(*args, all_rows_max=0, **extra)
        at_once = fused_verify_reference(*args, all_rows_max=1 << 30, **extra)
        assert_same(at_once, walked, f"seed {seed}")


@pytest.mark.parametrize("all_rows_max", [0, 1 << 30])
def test_point_mass_drafts_longer_than_the_q_buffer(all_rows_max):
    """A copied (point-mass) draft of gamma tokens beside a sampled request whose q
    buffer holds fewer rows: every accepted copy must not read past the buffer (an
    engine crashed on this: IndexError in the q lookup, all drafts tested at once)."""
    V = 50
    logits = torch.full((8, V), -30.0)
    logits[torch.arange(6), torch.arange(6)] = 30.0  # request 0 (6 copied drafts) accepts all
    logits[6:, 7] = 30.0  # request 1 (2 drafts with q) accepts both
    q = torch.zeros(1, 2, V)
    q[0, :, 7] = 1.0
    out, num_acc = fused_verify_reference(
        logits, torch.tensor([0, 1, 2, 3, 4, 5, 7, 7]), q, torch.tensor([0, 6, 8]),
        torch.tensor([False, False]), torch.full((8,), 0.5, dtype=torch.float64),
        torch.full((2,), 0.5, dtype=torch.float64), 6, torch.tensor([9, 9]),
        q_start=torch.tensor([-1, 0]), bonus_rows=False, all_rows_max=all_rows_max)
    assert num_acc.tolist() == [6, 2]
    assert out.tolist() == [[0, 1, 2, 3, 4, 5, 9], [7, 7, 9, -1, -1, -1, -1]]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_masked_tokens_are_never_emitted(impl):
    """Top-k style rows (3 finite logits): rejected drafts outside the support and
    residual/bonus draws must land inside it, for any uniform."""
    g = torch.Generator().manual_seed(15)
    B, V, ns = 12, 300, [1] * 12
    logits = torch.full((2 * B, V), NEG_INF)
    support = torch.stack([torch.randperm(V, generator=g)[:3] for _ in range(2 * B)])
    logits.scatter_(1, support, torch.randn(2 * B, 3, generator=g))
    x = [int(support[2 * i, 0]) if i % 2 else (int(support[2 * i, 0]) + 1) % V for i in range(B)]
    u_smp = torch.linspace(0.0, 0.999999, B)
    for with_q in (False, True):
        q = torch.softmax(torch.randn(B, V, generator=g), -1) if with_q else None
        args = _args(logits, x, q, ns, [False] * B, torch.rand(B, generator=g, dtype=torch.float64), u_smp)
        out, num_acc = IMPLS[impl](*args)
        for i in range(B):
            a = int(num_acc[i])
            assert torch.isfinite(logits[2 * i + a, out[i, a]]), (i, out[i].tolist())


@pytest.mark.parametrize("impl", list(IMPLS))
def test_no_drafts_and_padding(impl):
    """All n_i = 0 (only bonus tokens), and max_spec_len larger than max n_i."""
    g = torch.Generator().manual_seed(16)
    logits = torch.randn(3, 50, generator=g)
    args = _args(logits, [], None, [0, 0, 0], [True, False, False], [], [0.1, 0.5, 0.9])
    out, num_acc = IMPLS[impl](*args)
    assert num_acc.tolist() == [0, 0, 0] and out.shape == (3, 1)
    assert out[0, 0].item() == logits[0].argmax().item()
    assert_same((out, num_acc), fused_verify_reference(*args))
    args = _args(logits, [], None, [0, 0, 0], [True, False, False], [], [0.1, 0.5, 0.9], bonus=[1, 2, 3], max_spec_len=2)
    out, num_acc = IMPLS[impl](*args)
    assert out.tolist() == [[1, -1, -1], [2, -1, -1], [3, -1, -1]]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_gamma_128_all_accepted(impl):
    """The maximum draft length: a greedy request whose 128 drafts all match, and a
    sampled one with p = q (accepted for u < 0.99); bonus drawn by the verifier."""
    g = torch.Generator().manual_seed(17)
    V, ns = 64, [128, 128]
    logits = torch.randn(2 * 129, V, generator=g) * 2
    x_greedy = logits[:128].argmax(-1)
    p = torch.softmax(logits[129:257], -1)
    x_sampled = torch.multinomial(p, 1, generator=g).squeeze(1)
    q = torch.cat([torch.softmax(logits[:128], -1), p])
    u = torch.rand(256, generator=g, dtype=torch.float64) * 0.99
    args = _args(logits, torch.cat([x_greedy, x_sampled]), q, ns, [True, False], u, [0.5, 0.5])
    out, num_acc = IMPLS[impl](*args)
    assert num_acc.tolist() == [128, 128]
    assert out[0, 128].item() == logits[128].argmax().item()
    assert_same((out, num_acc), fused_verify_reference(*args))


# --------------------------------------------------------------------------------------
# Statistical exactness
# --------------------------------------------------------------------------------------

PVALUE_MIN = 1e-4  # a correct sampler fails one such check with probability 1e-4
PVALUE_CONTROL_MAX = 1e-6  # the wrong-q control must be rejected far below that


def chi2_pvalue(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; survival function via gammaincc (no scipy)."""
    observed = observed.double().flatten()
    probs = probs.double().flatten()
    keep = probs > 0
    assert observed[~keep].sum() == 0, "a cell of probability 0 was observed"
    observed, probs = observed[keep], probs[keep] / probs[keep].sum()
    expected = probs * observed.sum()
    assert expected.min() >= 5, "chi-square needs expected counts >= 5"
    stat = ((observed - expected) ** 2 / expected).sum()
    df = observed.numel() - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2).item()


def simulate(verify_fn, draws, *, seed=0, gamma=3, V=8, point_mass=False, wrong_q=False, chunk=250_000):
    """Run `draws` independent sampled requests with context-free targets p_0..p_gamma
    (p_gamma = the bonus row, drawn by the verifier) and drafts the test samples itself.
    Returns target/draft probabilities and the outcome counts."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(gamma + 1, V, generator=g) * 0.7
    P = torch.softmax(L.double(), -1)
    Lq = L[:gamma] + torch.randn(gamma, V, generator=g) * 0.8
    Q = torch.softmax(Lq, -1)
    if point_mass:  # deterministic drafter: q = one-hot(x_j) is the truth
        X = torch.randint(0, V, (gamma,), generator=g)
        Q = torch.nn.functional.one_hot(X, V).float()
    claimed = torch.softmax(Lq / 0.5, -1) if wrong_q else Q  # the control lies about q
    by_pos = torch.zeros(gamma + 1, V)  # counts of out[:, k] among requests with num_accepted >= k
    joint = torch.zeros(V, V)  # (out[:, 0], out[:, 1]) among requests with num_accepted >= 1
    for c0 in range(0, draws, chunk):
        C = min(chunk, draws - c0)
        x = torch.stack([torch.multinomial(Q[j], C, replacement=True, generator=g) for j in range(gamma)], 1)
        out, num_acc = verify_fn(
            L.repeat(C, 1),
            x.reshape(-1),
            None if point_mass else claimed.repeat(C, 1),
            torch.arange(C + 1) * gamma,
            torch.zeros(C, dtype=torch.bool),
            torch.rand(C * gamma, generator=g, dtype=torch.float64),
            torch.rand(C, generator=g, dtype=torch.float64),
            gamma,
        )
        out, num_acc = out.long(), num_acc.long()
        for k in range(gamma + 1):
            sel = num_acc >= k
            by_pos[k] += torch.bincount(out[sel, k], minlength=V)
        sel = num_acc >= 1
        joint += torch.bincount(out[sel, 0] * V + out[sel, 1], minlength=V * V).view(V, V)
    return P, Q.double(), by_pos, joint


def test_statistics_exact_with_draft_probs():
    """10^6 draws: out[k] | (k drafts accepted) ~ p_k for every k (k = 0 is the plain
    marginal; k = gamma is the bonus draw); joint (out[0], out[1]) | accepted_0 ~
    min(p_0, q_0) (x) p_1 (normalised)."""
    P, Q, by_pos, joint = simulate(fused_verify_reference, 1_000_000)
    assert by_pos[0].sum() == 1_000_000
    for k in range(P.shape[0]):
        assert chi2_pvalue(by_pos[k], P[k]) > PVALUE_MIN, f"position {k}"
    assert chi2_pvalue(joint, torch.minimum(P[0], Q[0])[:, None] * P[1][None, :]) > PVALUE_MIN


def test_statistics_exact_point_mass():
    P, _, by_pos, _ = simulate(fused_verify_reference, 200_000, seed=1, point_mass=True)
    for k in range(P.shape[0]):
        assert chi2_pvalue(by_pos[k], P[k]) > PVALUE_MIN, f"position {k}"


def test_statistics_negative_control_wrong_q_fails():
    """Same test, but the verifier is told q at temperature 0.5 while drafts come from
    temperature 1: the first-token chi-square must fail, proving the test has power."""
    P, _, by_pos, _ = simulate(fused_verify_reference, 200_000, wrong_q=True)
    assert chi2_pvalue(by_pos[0], P[0]) < PVALUE_CONTROL_MAX


def test_statistics_triton_kernel():
    """The kernel's own sampling: interpreted on the CPU a small-draw sanity check
    (exact equality with the reference is tested above); compiled on a GPU the full
    10^6-draw chi-square of every position and of the joint (out[0], out[1])."""
    if DEVICE == "cpu":
        draws = 400
        P, _, by_pos, _ = simulate(functools.partial(triton_verify, block_v=16), draws, seed=2, gamma=2, V=6)
        assert chi2_pvalue(by_pos[0], P[0]) > PVALUE_MIN
        # and the very same draws from the reference
        _, _, by_pos_ref, _ = simulate(fused_verify_reference, draws, seed=2, gamma=2, V=6)
        assert torch.equal(by_pos, by_pos_ref)
        return
    P, Q, by_pos, joint = simulate(triton_verify, 1_000_000)
    assert by_pos[0].sum() == 1_000_000
    for k in range(P.shape[0]):
        assert chi2_pvalue(by_pos[k], P[k]) > PVALUE_MIN, f"position {k}"
    assert chi2_pvalue(joint, torch.minimum(P[0], Q[0])[:, None] * P[1][None, :]) > PVALUE_MIN


# --------------------------------------------------------------------------------------
# The sparse layouts: q rows only where a request has q, target rows without bonus rows
# --------------------------------------------------------------------------------------


def sparse_of(args, has_q_rows, qv):
    """The same batch in the sparse layouts: q only for the requests in ``has_q_rows``,
    stored as the drafter's [R, L, qv + 1] buffer viewed [..., :qv] (a strided view, as
    the proposer hands it over), the others point masses; logits without bonus rows.
    Also returns the dense equivalent (one-hot rows for point masses, q zero past qv)."""
    logits, x, q, cu, greedy, u_acc, u_smp, max_len, bonus = args
    B, V = len(cu) - 1, logits.shape[1]
    L = max(max_len, 1)
    buffer = torch.zeros(len(has_q_rows), L, qv + 1)
    q_start = torch.full((B,), -1, dtype=torch.long)
    dense = torch.zeros(int(cu[-1]), V)
    for r, i in enumerate(has_q_rows):
        a, b = int(cu[i]), int(cu[i + 1])
        part = q[a:b, :qv] / q[a:b, :qv].sum(-1, keepdim=True)  # q lives on the first qv ids
        buffer[r, : b - a, :qv] = part
        dense[a:b, :qv] = part
        q_start[i] = r * L
    for i in range(B):
        if i not in has_q_rows:
            a, b = int(cu[i]), int(cu[i + 1])
            dense[torch.arange(a, b), x[a:b].long()] = 1.0
    req = torch.repeat_interleave(torch.arange(B), (cu[1:] - cu[:-1]).long())
    draft_rows = torch.arange(int(cu[-1])) + req
    bonus = torch.randint(0, V, (B,), generator=torch.Generator().manual_seed(7))
    x = x.clone()
    for i in has_q_rows:  # drafts of q rows must come from q: keep them below qv
        a, b = int(cu[i]), int(cu[i + 1])
        x[a:b] = x[a:b] % qv
    sparse = (logits[draft_rows], x, buffer[..., :qv], cu, greedy, u_acc, u_smp, max_len, bonus)
    dense_args = (logits, x, dense, cu, greedy, u_acc, u_smp, max_len, bonus)
    return sparse, q_start, dense_args


@pytest.mark.parametrize("qv_less", [0, 37])
def test_sparse_q_equals_dense_one_hot_q(qv_less):
    """q rows only for some requests, point masses for the others, target rows read in
    place (no bonus rows): the same tokens as the dense layout with one-hot rows, in the
    reference and in the kernel."""
    V, ns = 1000, [3, 0, 5, 2, 4, 1]
    greedy = [F_, T_, F_, F_, F_, T_]
    args = make_batch(3, V, ns, greedy, True, True, noise=0.3)
    sparse, q_start, dense = sparse_of(args, has_q_rows=[0, 4], qv=V - qv_less)
    want = fused_verify_reference(*dense)
    got = fused_verify_reference(*sparse, q_start=q_start, bonus_rows=False)
    assert_same(got, want, "reference sparse vs dense")
    assert_same(triton_verify(*sparse, q_start=q_start, bonus_rows=False, block_v=256), want,
                "kernel sparse vs dense")
    assert int(got[1][4]) < ns[4] or int(got[1][2]) < ns[2]  # some rejection is exercised


def test_sparse_layout_statistics_exact():
    """Point-mass rows beside q rows, q narrower than V: every emitted token still follows p."""
    V, gamma, draws = 12, 2, 100_000
    g = torch.Generator().manual_seed(11)
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(V - 2, generator=g) * 1.5, -1)  # nothing on the last 2 ids
    B = draws
    cu = torch.arange(0, (B + 1) * gamma, gamma)
    logits = p.log().expand(B * gamma, V).contiguous()
    x = torch.multinomial(q, B * gamma, replacement=True, generator=g)
    pm = torch.arange(B) % 2 == 1  # odd requests: point masses at an n-gram-like draft
    pm_x = torch.multinomial(p.flip(0), B * gamma, replacement=True, generator=g)
    x = torch.where(pm.repeat_interleave(gamma), pm_x, x)
    buffer = q.expand(B // 2 + 1, gamma, V - 2).contiguous()
    q_start = torch.where(pm, torch.tensor(-1), (torch.arange(B) // 2) * gamma)
    out, _ = fused_verify_reference(
        logits, x, buffer, cu, torch.zeros(B, dtype=torch.bool), torch.rand(B * gamma, generator=g),
        torch.rand(B, generator=g), gamma, torch.multinomial(p, B, replacement=True, generator=g),
        q_start=q_start, bonus_rows=False)
    first = out[:, 0].long()
    for part in (first[~pm], first[pm]):
        counts = torch.bincount(part, minlength=V).double()
        expected = p.double() * len(part)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 40.0, chi2  # df = 11: p(chi2 > 40) < 1e-4


def test_no_bonus_rows_needs_bonus_ids():
    args = make_batch(0, 100, [2, 1], [False, True], True, False)
    logits, x, q, cu, greedy, u_acc, u_smp, max_len, _ = args
    with pytest.raises(ValueError, match="bonus_token_ids"):
        fused_verify_reference(logits[:3], x, q, cu, greedy, u_acc, u_smp, max_len, bonus_rows=False)


# --------------------------------------------------------------------------------------
# Dispatch and traffic model
# --------------------------------------------------------------------------------------


def test_verify_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(fv, "fused_verify", lambda *a, **k: calls.append("triton") or fused_verify(*a, **k))
    monkeypatch.setattr(fv, "fused_verify_reference",
                        lambda *a, **k: calls.append("ref") or fused_verify_reference(*a, **k))
    args = make_batch(0, 300, [2, 1], [False, True], True, False)
    monkeypatch.delenv("SPECDIFF_FORCE_TRITON", raising=False)
    r1 = verify(*args)
    monkeypatch.setenv("SPECDIFF_FORCE_TRITON", "1")
    r2 = verify(*args)
    assert calls == ["ref", "triton"]
    assert_same(r2, r1)


def test_bytes_moved():
    V, row = 1000, 4000
    # request 0 greedy: 3 drafts, rejected at 1 -> 2 rows; request 1 sampled, 2 drafts, all
    # accepted, bonus given -> 2 stats passes; request 2 sampled, rejected at 0 with q ->
    # 1 stats pass + normaliser (p + q) + scan of the first block (p + q).
    out = torch.tensor([[5, 6, -1, -1], [7, 8, 9, -1], [10, -1, -1, -1]], dtype=torch.int32)
    num_acc = torch.tensor([1, 2, 0], dtype=torch.int32)
    cu = torch.tensor([0, 3, 5, 6])
    greedy = torch.tensor([True, False, False])
    b = bytes_moved(out, num_acc, cu, greedy, V, has_draft_probs=True, has_bonus_ids=True, block_v=256)
    assert b["fused"] == (2 * row + 2 * 32) + 2 * (row + 64) + (row + 64) + 2 * (row + 256 * 4)
    assert b["unfused"] > 6 * b["fused"]
