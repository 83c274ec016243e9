"""TDT and RNNT losses against brute-force enumeration of every alignment on tiny lattices."""

import itertools
import math

import pytest
import torch

from trt_asr.training.loss import rnnt_loss, rnnt_loss_fast, tdt_loss, tdt_loss_fast


def _tdt_brute(logits, y, T, U, blank, durations, sigma=0.0):
    """Sum over all TDT paths (NeMo's definition): each path ends with a blank landing exactly on t = T at u = U."""
    tok = torch.log_softmax(logits[..., : blank + 1].double(), -1) - sigma
    dur = torch.log_softmax(logits[..., blank + 1:].double(), -1)
    total = []

    def walk(t, u, lp):
        for n, d in enumerate(durations):
            if d > 0 and t + d <= T:  # blank
                step = lp + tok[t, u, blank] + dur[t, u, n]
                if t + d == T:
                    if u == U:
                        total.append(step)
                else:
                    walk(t + d, u, step)
            if u < U and t + d <= T - 1:  # label
                walk(t + d, u + 1, lp + tok[t, u, y[u]] + dur[t, u, n])

    walk(0, 0, torch.zeros((), dtype=torch.float64))
    return -torch.logsumexp(torch.stack(total), 0) if total else torch.tensor(math.inf)


def _rnnt_brute(logits, y, T, U, blank):
    lp = torch.log_softmax(logits.double(), -1)
    total = []
    # an alignment = positions of the U labels among T + U steps, the last step being the final blank
    for labels_at in itertools.combinations(range(T + U - 1), U):
        t, u, s = 0, 0, torch.zeros((), dtype=torch.float64)
        for i in range(T + U):
            if i in labels_at:
                s = s + lp[t, u, y[u]]
                u += 1
            else:
                s = s + lp[t, u, blank]
                t += 1
        total.append(s)
    return -torch.logsumexp(torch.stack(total), 0)


@pytest.mark.parametrize("durations", [[0, 1, 2, 3, 4], [0, 1, 2], [1, 2], [0, 2, 3], [1]])
@pytest.mark.parametrize("sigma", [0.0, 0.05])
@pytest.mark.parametrize("fn", [tdt_loss, tdt_loss_fast])
def test_tdt_matches_brute_force(durations, sigma, fn):
    g = torch.Generator().manual_seed(len(durations) * 7 + int(sigma * 100))
    V = 4
    cases = [(T, U) for T in range(1, 5) for U in range(0, 4)]
    B, Tm, Um = len(cases), 4, 3
    logits = torch.randn(B, Tm, Um + 1, V + 1 + len(durations), generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, V, (B, Um), generator=g)
    T_len = torch.tensor([c[0] for c in cases])
    U_len = torch.tensor([c[1] for c in cases])
    got = fn(logits.float(), targets, T_len, U_len, blank=V, durations=durations, sigma=sigma,
                   reduction="none")
    for i, (T, U) in enumerate(cases):
        want = _tdt_brute(logits[i], targets[i], T, U, V, durations, sigma)
        if math.isinf(want):  # no valid alignment (e.g. durations without 0 and too many labels)
            assert got[i] > 1e20
        else:
            assert got[i].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-4), (T, U)


@pytest.mark.parametrize("fn", [rnnt_loss, rnnt_loss_fast])
def test_rnnt_matches_brute_force(fn):
    g = torch.Generator().manual_seed(3)
    V = 5
    cases = [(T, U) for T in range(1, 5) for U in range(0, 4)]
    B, Tm, Um = len(cases), 4, 3
    logits = torch.randn(B, Tm, Um + 1, V + 1, generator=g) * 2
    targets = torch.randint(0, V, (B, Um), generator=g)
    got = fn(logits, targets, torch.tensor([c[0] for c in cases]), torch.tensor([c[1] for c in cases]),
                    blank=V, reduction="none")
    for i, (T, U) in enumerate(cases):
        want = _rnnt_brute(logits[i], targets[i], T, U, V)
        assert got[i].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-4), (T, U)


def test_gradients_finite_and_match_double_precision():
    g = torch.Generator().manual_seed(0)
    durations = [0, 1, 2, 3, 4]
    V = 6
    logits = (torch.randn(3, 7, 4, V + 1 + 5, generator=g) * 3).requires_grad_()
    targets = torch.randint(0, V, (3, 3), generator=g)
    T_len, U_len = torch.tensor([7, 5, 2]), torch.tensor([3, 1, 3])
    loss = tdt_loss(logits, targets, T_len, U_len, blank=V, durations=durations, omega=0.1, reduction="mean")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # gradient check in double precision on a smaller lattice
    small = (torch.randn(2, 3, 3, V + 1 + 3, generator=g, dtype=torch.float64)).requires_grad_()
    tg = torch.randint(0, V, (2, 2), generator=g)
    f = lambda x: tdt_loss(x, tg, torch.tensor([3, 2]), torch.tensor([2, 1]), blank=V,  # noqa: E731
                           durations=[0, 1, 2], reduction="sum")
    # the loss computes in float32 internally: compare autograd with a finite difference loosely
    eps = 1e-3
    grad = torch.autograd.grad(f(small), small)[0]
    direction = torch.randn_like(small)
    fd = (f(small + eps * direction) - f(small - eps * direction)) / (2 * eps)
    assert (grad * direction).sum().item() == pytest.approx(fd.item(), rel=2e-2, abs=2e-2)
    r = rnnt_loss(logits[..., : V + 1], targets, T_len, U_len, blank=V)
    r.backward()
    assert torch.isfinite(logits.grad).all()


def test_padding_does_not_change_loss():
    g = torch.Generator().manual_seed(1)
    V, durs = 5, [0, 1, 2, 3, 4]
    logits = torch.randn(1, 6, 4, V + 1 + 5, generator=g)
    targets = torch.randint(0, V, (1, 3), generator=g)
    a = tdt_loss(logits, targets, torch.tensor([6]), torch.tensor([3]), blank=V, durations=durs, reduction="none")
    big = torch.randn(1, 9, 6, V + 1 + 5, generator=g)
    big[:, :6, :4] = logits
    tbig = torch.cat([targets, torch.randint(0, V, (1, 2), generator=g)], 1)
    b = tdt_loss(big, tbig, torch.tensor([6]), torch.tensor([3]), blank=V, durations=durs, reduction="none")
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


@pytest.mark.parametrize("durations", [[0, 1, 2, 3, 4], [0, 2, 3], [1, 2]])
def test_fast_path_gradients_match_autograd(durations):
    g = torch.Generator().manual_seed(5)
    V, B = 6, 5
    x = (torch.randn(B, 7, 5, V + 1 + len(durations), generator=g) * 2).requires_grad_()
    y = torch.randint(0, V, (B, 4), generator=g)
    T_len, U_len = torch.tensor([7, 5, 2, 1, 6]), torch.tensor([4, 1, 3, 0, 2])
    a = tdt_loss(x, y, T_len, U_len, V, durations, 0.02, reduction="none")
    b = tdt_loss_fast(x, y, T_len, U_len, V, durations, 0.02, reduction="none")
    ok = a < 1e20
    assert torch.allclose(a[ok], b[ok], rtol=1e-5, atol=1e-4)
    ga = torch.autograd.grad(a[ok].sum(), x)[0]
    gb = torch.autograd.grad(b[ok].sum(), x)[0]
    assert torch.isfinite(gb).all()
    assert torch.allclose(ga, gb, atol=1e-4)
