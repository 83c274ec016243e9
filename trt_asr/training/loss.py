"""Transducer losses in plain PyTorch: TDT (token-and-duration transducer) and RNNT, vectorised and differentiable.

Both take the full joint lattice ``logits [B, T, U+1, V+1(+D)]`` (V tokens, blank = V), targets ``[B, U]`` and the
valid lengths, and return the negative log-likelihood per utterance (or reduced).

TDT follows NeMo's definition (``nemo.collections.asr.losses.rnnt_pytorch.TDTLossPytorch`` and the numba kernels):

* token/blank log-probs = log_softmax over the V+1 token logits, minus ``sigma`` (logit under-normalisation);
  duration log-probs = log_softmax over the D duration logits, independently;
* from lattice node (t, u) a label y_{u+1} with duration d goes to (t+d, u+1) (d = 0 allowed), a blank with
  duration d > 0 goes to (t+d, u) (blank with duration 0 is not allowed);
* alpha(t, u) is defined for t < T only, so every path ends with a blank that lands exactly on t = T at u = U;
* ``omega`` > 0 mixes in the plain RNNT loss of the token logits: (1 - omega) * TDT + omega * RNNT (NeMo's
  ``omega``; 0 by default).

RNNT: label at (t, u) -> (t, u+1), blank -> (t+1, u); ends with the blank from (T-1, U).

Implementation: one step per frame t. Arcs from earlier frames (duration >= 1) give a per-u "entry" term c(t, u);
arcs inside frame t (labels of duration 0) form a chain along u, solved in closed form with a log-cumsum-exp:
alpha(t, u) = S(u) + logcumsumexp_k(c(t, k) - S(k)), S(u) = sum_{j<u} w(t, j), w = label + duration-0 log-prob.
So the Python loop runs T times (not T * U), and everything else is batched over B and U.
"""

from __future__ import annotations

import torch

NEG = -1.0e30  # "log 0" kept finite so that gradients stay finite


def _gather_logprobs(token_logits: torch.Tensor, targets: torch.Tensor, blank: int, sigma: float = 0.0):
    """token_logits [B, T, U+1, V+1] -> (blank_lp [B, T, U+1], label_lp [B, T, U+1]) in float32.
    label_lp[..., u] is the log-prob of target u (the (u+1)-th label); its last column is unused (NEG)."""
    x = token_logits.float()
    lse = torch.logsumexp(x, dim=-1)
    blank_lp = x[..., blank] - lse - sigma
    b, t, u1, _ = x.shape
    if u1 > 1:
        idx = targets[:, None, :, None].expand(b, t, u1 - 1, 1).long()
        label_lp = torch.gather(x[:, :, : u1 - 1, :], 3, idx)[..., 0] - lse[:, :, : u1 - 1] - sigma
        label_lp = torch.cat([label_lp, torch.full_like(label_lp[..., :1], NEG)], dim=-1)
    else:
        label_lp = torch.full_like(blank_lp, NEG)
    return blank_lp, label_lp


def _shift_u(x: torch.Tensor) -> torch.Tensor:
    """[B, U+1] -> value at u-1 (NEG at u = 0)."""
    return torch.cat([torch.full_like(x[:, :1], NEG), x[:, :-1]], dim=1)


def _forward(blank_arcs, label_arcs, T: int, B: int, U1: int, device) -> list[torch.Tensor]:
    """Forward variables alpha[t] [B, U+1] for t = 0..T-1.

    blank_arcs: list of (d >= 1, lp [B, T, U+1]) for blanks of duration d; label_arcs: list of (d >= 0, lp) for
    labels of duration d (lp[..., u] = log-prob of emitting target u at node u).

    Arcs from earlier frames are gathered once into G[b, t, d-1, kind, u] = log-prob of the arc of duration d that
    leaves (t-d, u) (kind 0: blank to (t, u); kind 1: label to (t, u+1)), so each frame costs a handful of
    batched ops: alpha window + G[:, t] -> logsumexp -> closed-form scan for the duration-0 labels."""
    dmax = max([d for d, _ in blank_arcs] + [d for d, _ in label_arcs] + [1])
    neg = torch.full((B, T, U1), NEG, device=device)
    by_d = [[neg, neg] for _ in range(dmax)]
    for d, lp in blank_arcs:
        by_d[d - 1][0] = torch.logaddexp(by_d[d - 1][0], lp) if by_d[d - 1][0] is not neg else lp
    for d, lp in label_arcs:
        if d >= 1:
            by_d[d - 1][1] = torch.logaddexp(by_d[d - 1][1], lp) if by_d[d - 1][1] is not neg else lp
    src = torch.stack([torch.stack(k, dim=2) for k in by_d], dim=2)  # [B, T(source), Dmax, 2, U+1]
    # G[:, t, d-1] = src[:, t - d, d-1] (NEG where t - d < 0)
    pad = torch.full((B, dmax, dmax, 2, U1), NEG, device=device)
    src = torch.cat([pad, src], dim=1)  # source frame s sits at s + dmax
    t_idx = torch.arange(T, device=device)[:, None] - torch.arange(1, dmax + 1, device=device)[None, :] + dmax
    g = src[:, t_idx, torch.arange(dmax, device=device)[None, :]]  # [B, T, Dmax, 2, U+1]

    within = [lp for d, lp in label_arcs if d == 0]
    s_all = None
    if within and U1 > 1:
        w = within[0]
        for extra in within[1:]:
            w = torch.logaddexp(w, extra)
        s_all = torch.cat([torch.zeros_like(w[..., :1]), torch.cumsum(w[..., : U1 - 1], dim=-1)], dim=-1)

    init = torch.full((B, U1), NEG, device=device)
    init[:, 0] = 0.0
    neg_row = torch.full((B, U1), NEG, device=device)
    alphas: list[torch.Tensor] = []
    for t in range(T):
        if t == 0:
            c = init
        else:
            window = [alphas[t - d] if t - d >= 0 else neg_row for d in range(1, dmax + 1)]
            wv = torch.stack(window, dim=1)[:, :, None, :]  # [B, Dmax, 1, U+1]
            both = torch.logsumexp(wv + g[:, t], dim=1)  # [B, 2, U+1]: blank arcs, label arcs (at source u)
            c = torch.logaddexp(both[:, 0], _shift_u(both[:, 1]))
        if s_all is not None:
            s = s_all[:, t]
            alpha = s + torch.logcumsumexp(c - s, dim=1)
            alpha = torch.clamp(alpha, min=NEG)  # keep "log 0" from drifting
        else:
            alpha = c
        alphas.append(alpha)
    return alphas


def _reduce(nll: torch.Tensor, target_lengths: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":  # NeMo's "mean": per-utterance loss / target length, averaged
        return (nll / target_lengths.clamp(min=1).to(nll.dtype)).mean()
    if reduction == "mean_batch":
        return nll.mean()
    if reduction == "mean_volume":
        return nll.sum() / target_lengths.sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}")


def _final(alphas, ends, logit_lengths, target_lengths):
    """log P = logsumexp over final blank arcs (d, lp): alpha[T_b - d][b, U_b] + lp[b, T_b - d, U_b]."""
    stack = torch.stack(alphas, dim=1)  # [B, T, U+1]
    b_idx = torch.arange(stack.shape[0], device=stack.device)
    terms = []
    for d, lp in ends:
        t_idx = logit_lengths.long() - d
        ok = t_idx >= 0
        t_c = t_idx.clamp(min=0)
        v = stack[b_idx, t_c, target_lengths.long()] + lp[b_idx, t_c, target_lengths.long()]
        terms.append(torch.where(ok, v, torch.full_like(v, NEG)))
    return torch.logsumexp(torch.stack(terms), dim=0)


def rnnt_loss(logits: torch.Tensor, targets: torch.Tensor, logit_lengths: torch.Tensor,
              target_lengths: torch.Tensor, blank: int, reduction: str = "mean_batch") -> torch.Tensor:
    """RNNT negative log-likelihood. logits [B, T, U+1, V+1] (raw), targets [B, U] (padding any valid id)."""
    B, T, U1, _ = logits.shape
    blank_lp, label_lp = _gather_logprobs(logits, targets, blank)
    alphas = _forward([(1, blank_lp)], [(0, label_lp)], T, B, U1, logits.device)
    nll = -_final(alphas, [(1, blank_lp)], logit_lengths, target_lengths)
    return _reduce(nll, target_lengths, reduction)


def tdt_loss(logits: torch.Tensor, targets: torch.Tensor, logit_lengths: torch.Tensor,
             target_lengths: torch.Tensor, blank: int, durations: list[int], sigma: float = 0.0,
             omega: float = 0.0, reduction: str = "mean_batch") -> torch.Tensor:
    """TDT negative log-likelihood (NeMo's definition). logits [B, T, U+1, V+1+len(durations)] (raw joint output,
    token logits first, then the duration logits), targets [B, U], blank = V."""
    D = len(durations)
    if D == 0 or logits.shape[-1] != blank + 1 + D:
        raise ValueError(f"logits have {logits.shape[-1]} outputs; expected blank + 1 + {D} durations")
    B, T, U1, _ = logits.shape
    token_logits, dur_logits = logits[..., : blank + 1], logits[..., blank + 1:]
    blank_lp, label_lp = _gather_logprobs(token_logits, targets, blank, sigma)
    dur_lp = torch.log_softmax(dur_logits.float(), dim=-1)
    blank_arcs = [(d, blank_lp + dur_lp[..., n]) for n, d in enumerate(durations) if d > 0]
    label_arcs = [(d, label_lp + dur_lp[..., n]) for n, d in enumerate(durations)]
    alphas = _forward(blank_arcs, label_arcs, T, B, U1, logits.device)
    nll = -_final(alphas, blank_arcs, logit_lengths, target_lengths)
    out = _reduce(nll, target_lengths, reduction)
    if omega > 0:
        out = (1 - omega) * out + omega * rnnt_loss(token_logits, targets, logit_lengths, target_lengths, blank,
                                                    reduction)
    return out


# ------------------------------------------------------------------------------------------------ fast path
class _TransducerLogLik(torch.autograd.Function):
    """log P(y | x) of a transducer lattice with explicit forward (alpha) and backward (beta) recursions and the
    analytic gradient d logP / d arc = exp(alpha(src) + arc + beta(dst) - logP): two loops over T without an
    autograd graph (the autograd path above records ~25 kernels per frame). Same definition, same values.

    BA [B, T, U+1, Kb]: blank arcs of durations db (all >= 1); LA [B, T, U+1, Kl]: label arcs of durations dl."""

    @staticmethod
    def forward(ctx, BA, LA, T_len, U_len, db: tuple, dl: tuple):
        B, T, U1, _ = BA.shape
        dev = BA.device
        dm = max(list(db) + list(dl) + [1])
        with torch.no_grad():
            # G[:, t, j] = arcs of duration d = dm - j that end at frame t (source t - d), kinds (blank, label)
            by_d = torch.full((B, T, dm, 2, U1), NEG, device=dev)
            for k, d in enumerate(db):
                by_d[:, :, d - 1, 0] = torch.logaddexp(by_d[:, :, d - 1, 0], BA[..., k])
            for k, d in enumerate(dl):
                if d >= 1:
                    by_d[:, :, d - 1, 1] = torch.logaddexp(by_d[:, :, d - 1, 1], LA[..., k])
            src = torch.cat([torch.full((B, dm, dm, 2, U1), NEG, device=dev), by_d], dim=1)
            ds = torch.arange(dm, 0, -1, device=dev)  # window order: d = dm .. 1
            t_idx = torch.arange(T, device=dev)[:, None] - ds[None, :] + dm
            G = src[:, t_idx, (ds - 1)[None, :]]  # [B, T, dm, 2, U1]
            zero_k = [k for k, d in enumerate(dl) if d == 0]
            S = None
            if zero_k and U1 > 1:
                w = torch.logsumexp(LA[..., zero_k], dim=-1)
                S = torch.cat([torch.zeros_like(w[..., :1]), torch.cumsum(w[..., : U1 - 1], dim=-1)], dim=-1)
            A = torch.full((B, dm + T, U1), NEG, device=dev)  # frame t at dm + t
            A[:, dm, 0] = 0.0
            for t in range(T):
                if t == 0:
                    c = A[:, dm]
                else:
                    both = torch.logsumexp(A[:, t: t + dm, None, :] + G[:, t], dim=1)
                    c = torch.logaddexp(both[:, 0], _shift_u(both[:, 1]))
                if S is not None:
                    c = torch.clamp(S[:, t] + torch.logcumsumexp(c - S[:, t], dim=1), min=NEG)
                A[:, dm + t] = c
            alpha = A[:, dm:]
            # beta: Bn without the terminal, Term = 0 at (T_b, U_b) (reachable by blanks only)
            Bn = torch.full((B, T + dm + 1, U1), NEG, device=dev)
            Term = torch.full_like(Bn, NEG)
            bi = torch.arange(B, device=dev)
            Term[bi, T_len.long(), U_len.long()] = 0.0
            Bb = Term.clone()  # logaddexp(Bn, Term), kept up to date
            t_live = T_len.to(dev)[:, None]
            for t in range(T - 1, -1, -1):
                c = torch.full((B, U1), NEG, device=dev)
                terms = []
                for k, d in enumerate(db):
                    terms.append(BA[:, t, :, k] + Bb[:, t + d])
                for k, d in enumerate(dl):
                    if d >= 1:
                        nxt = torch.cat([Bn[:, t + d, 1:], torch.full_like(c[:, :1], NEG)], dim=1)
                        terms.append(LA[:, t, :, k] + nxt)
                if terms:
                    c = torch.logsumexp(torch.stack(terms), dim=0)
                if S is not None:
                    s = S[:, t]
                    c = torch.clamp(torch.flip(torch.logcumsumexp(torch.flip(c + s, [1]), dim=1), [1]) - s, min=NEG)
                c = torch.where(t < t_live, c, NEG)
                Bn[:, t] = c
                Bb[:, t] = torch.logaddexp(c, Term[:, t])
            ll = torch.full((B,), NEG, device=dev)
            for k, d in enumerate(db):
                tt = T_len.long() - d
                ok = tt >= 0
                v = alpha[bi, tt.clamp(min=0), U_len.long()] + BA[bi, tt.clamp(min=0), U_len.long(), k]
                ll = torch.logaddexp(ll, torch.where(ok, v, NEG))
        ctx.save_for_backward(BA, LA, alpha, Bn, Bb, ll)
        ctx.db, ctx.dl = db, dl
        return ll

    @staticmethod
    def backward(ctx, grad_ll):
        BA, LA, alpha, Bn, Bb, ll = ctx.saved_tensors
        T = BA.shape[1]
        ok = (ll > NEG / 2)
        scale = torch.where(ok, grad_ll, 0.0)[:, None, None]
        norm = torch.where(ok, ll, 0.0)[:, None, None]
        gBA = torch.empty_like(BA)
        for k, d in enumerate(ctx.db):
            gBA[..., k] = torch.exp(alpha + BA[..., k] + Bb[:, d: d + T] - norm) * scale
        gLA = torch.empty_like(LA)
        nxt = torch.cat([Bn[:, :, 1:], torch.full_like(Bn[:, :, :1], NEG)], dim=2)
        for k, d in enumerate(ctx.dl):
            gLA[..., k] = torch.exp(alpha + LA[..., k] + nxt[:, d: d + T] - norm) * scale
        return gBA, gLA, None, None, None, None


def tdt_loss_fast(logits: torch.Tensor, targets: torch.Tensor, logit_lengths: torch.Tensor,
                  target_lengths: torch.Tensor, blank: int, durations: list[int], sigma: float = 0.0,
                  reduction: str = "mean_batch") -> torch.Tensor:
    """``tdt_loss`` (omega = 0) through the explicit-gradient path: same values, far fewer GPU kernels."""
    D = len(durations)
    if D == 0 or logits.shape[-1] != blank + 1 + D:
        raise ValueError(f"logits have {logits.shape[-1]} outputs; expected blank + 1 + {D} durations")
    blank_lp, label_lp = _gather_logprobs(logits[..., : blank + 1], targets, blank, sigma)
    dur_lp = torch.log_softmax(logits[..., blank + 1:].float(), dim=-1)
    bk = [n for n, d in enumerate(durations) if d > 0]
    BA = blank_lp[..., None] + dur_lp[..., bk]
    LA = label_lp[..., None] + dur_lp
    ll = _TransducerLogLik.apply(BA.contiguous(), LA.contiguous(), logit_lengths, target_lengths,
                                 tuple(durations[n] for n in bk), tuple(durations))
    return _reduce(-ll, target_lengths, reduction)


def rnnt_loss_fast(logits: torch.Tensor, targets: torch.Tensor, logit_lengths: torch.Tensor,
                   target_lengths: torch.Tensor, blank: int, reduction: str = "mean_batch") -> torch.Tensor:
    blank_lp, label_lp = _gather_logprobs(logits, targets, blank)
    ll = _TransducerLogLik.apply(blank_lp[..., None].contiguous(), label_lp[..., None].contiguous(), logit_lengths,
                                 target_lengths, (1,), (0,))
    return _reduce(-ll, target_lengths, reduction)
