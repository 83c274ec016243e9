"""The encoder's GPU-friendly kernels equal the plain formulations they replace."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trt_asr.model.encoder import RelPositionMultiHeadAttention, shifted_depthwise_conv1d


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 12), st.integers(1, 9), st.integers(1, 40), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_shifted_depthwise_conv_equals_conv1d(b, d, k, t, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, t + k - 1, generator=g, dtype=torch.float64)
    w = torch.randn(d, 1, k, generator=g, dtype=torch.float64)
    bb = torch.randn(d, generator=g, dtype=torch.float64) if bias else None
    ref = F.conv1d(x, w, bb, groups=d)
    out = shifted_depthwise_conv1d(x, w, bb)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(0, 9), st.integers(0, 2**31 - 1))
def test_rel_pos_scores_brute_force(b, tq, cache, seed):
    """Attention of Tq queries over cache + Tq keys equals the Transformer-XL score written out element by element:
    s[i, j] = ((q_i + u) . k_j + (q_i + v) . p(i - j)) / sqrt(d_k), softmax over j, times V."""
    torch.manual_seed(seed)
    h, dk = 2, 4
    att = RelPositionMultiHeadAttention(h, h * dk, True, 0.0).double().eval()
    for prm in att.parameters():
        torch.nn.init.normal_(prm, std=0.5)
    tk = cache + tq
    q_in = torch.randn(b, tq, h * dk, dtype=torch.float64)
    kv_in = torch.cat([torch.randn(b, cache, h * dk, dtype=torch.float64), q_in], dim=1)
    rel = torch.arange(tk - 1, -tk, -1, dtype=torch.float64)  # positions tk-1 .. -(tk-1), as RelPositionalEncoding
    pos_emb = torch.randn(1, 2 * tk - 1, h * dk, dtype=torch.float64)
    with torch.no_grad():
        out = att(q_in, kv_in, pos_emb, None)
        q = att.linear_q(q_in).view(b, tq, h, dk)
        k = att.linear_k(kv_in).view(b, tk, h, dk)
        v = att.linear_v(kv_in).view(b, tk, h, dk)
        p = att.linear_pos(pos_emb).view(2 * tk - 1, h, dk)
        ref = torch.zeros(b, tq, h, dk, dtype=torch.float64)
        for bi in range(b):
            for hi in range(h):
                for i in range(tq):
                    qi = cache + i  # absolute position of query i among the keys
                    s = torch.stack([(q[bi, i, hi] + att.pos_bias_u[hi]) @ k[bi, j, hi]
                                     + (q[bi, i, hi] + att.pos_bias_v[hi]) @ p[int((rel == qi - j).nonzero()), hi]
                                     for j in range(tk)]) / dk ** 0.5
                    ref[bi, i, hi] = torch.softmax(s, 0) @ v[bi, :, hi]
        ref = att.linear_out(ref.reshape(b, tq, h * dk))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def _random_conv_module(d, k, seed, context=None):
    from trt_asr.model.encoder import ConvModule
    torch.manual_seed(seed)
    m = ConvModule(d, k, context or [k - 1, 0], True, "batch_norm").double().eval()
    for prm in m.parameters():
        torch.nn.init.normal_(prm, std=0.5)
    m.batch_norm.running_mean.normal_()
    m.batch_norm.running_var.uniform_(0.5, 2.0)
    return m


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 8), st.sampled_from([3, 9]), st.booleans(), st.integers(0, 2),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_conv_module_time_major_equals_reference(b, t, k, cached, cache_drop, masked, seed):
    """The CUDA inference layout ([B, T, D] GEMMs + shifted multiply-adds) gives the reference module's output and
    next conv cache: offline (symmetric padding) and streaming (cache in, cache_drop frames not cached)."""
    d = 6
    m = _random_conv_module(d, k, seed, context=None if cached else [(k - 1) // 2, (k - 1) // 2])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    pad = (torch.arange(t)[None, :] >= torch.randint(0, t + 1, (b,), generator=g)[:, None]) if masked else None
    cache = torch.randn(b, d, k - 1, generator=g, dtype=torch.float64) if cached else None
    drop = min(cache_drop, t) if cached else 0
    with torch.no_grad():
        ref, ref_next = m(x, pad, cache, drop)
        out, nxt = m.forward_time_major(x, pad, cache, drop)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    if cached:
        assert nxt.shape == ref_next.shape == (b, d, k - 1)
        torch.testing.assert_close(nxt, ref_next, rtol=1e-12, atol=1e-12)  # GLU outputs of the new frames


def test_fold_batch_norm_keeps_outputs():
    """Folding eval BatchNorm into the depthwise conv changes nothing but rounding, in both layouts."""
    from trt_asr.model.encoder import fold_batch_norm
    m = _random_conv_module(5, 4, 3)
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    cache = torch.randn(2, 5, 3, dtype=torch.float64)
    with torch.no_grad():
        ref, ref_next = m(x, None, cache, 1)
        fold_batch_norm(m)
        assert isinstance(m.batch_norm, torch.nn.Identity)
        for fn in (m.forward, m.forward_time_major):
            out, nxt = fn(x, None, cache, 1)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(nxt, ref_next, rtol=1e-12, atol=1e-12)  # GLU outputs of the new frames


def test_rel_pos_scores_with_padded_positions_match_per_batch_positions():
    """The shared-position path (P padded to a multiple of 8 for aligned GEMMs) equals the per-row path."""
    torch.manual_seed(0)
    h, dk, b, tq, cache = 2, 4, 3, 5, 6
    att = RelPositionMultiHeadAttention(h, h * dk, True, 0.0).double().eval()
    for prm in att.parameters():
        torch.nn.init.normal_(prm, std=0.5)
    tk = cache + tq
    q_in = torch.randn(b, tq, h * dk, dtype=torch.float64)
    kv_in = torch.randn(b, tk, h * dk, dtype=torch.float64)
    pos_emb = torch.randn(1, 2 * tk - 1, h * dk, dtype=torch.float64)  # P = 21: padded to 24
    with torch.no_grad():
        shared = att(q_in, kv_in, pos_emb, None)
        per_row = att(q_in, kv_in, pos_emb.expand(b, -1, -1).contiguous(), None)
    torch.testing.assert_close(shared, per_row, rtol=1e-10, atol=1e-10)
