"""FastConformer encoder in plain PyTorch, with NeMo's ``ConformerEncoder`` parameter names.

    features [B, F, T_mel] --dw_striding x8--> x [B, T, D] --N x ConformerLayer--> encoded [B, D, T]

Each ConformerLayer: x + 0.5 FF(x) -> + RelPosMHA -> + Conv -> + 0.5 FF -> LayerNorm (macaron).

Streaming (cache-aware) support follows NeMo's semantics: every layer takes ``cache_last_channel`` (the last C
layer inputs of attention, [B, C, D]) and ``cache_last_time`` (the last K-1 inputs of the depthwise convolution,
[B, D, K-1]) and returns their next values; the encoder stacks them layer-first ([L, B, C, D], [L, B, D, K-1]).
The projected-K/V variant (``ProjectedKVCache``) caches each layer's keys and values after linear_k / linear_v
instead of its attention inputs, so a step projects only its new frames (not the C cached ones again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EncoderConfig

MASK_VALUE = 10000.0  # NeMo's INF_VAL: masked scores get -1e4, not -inf


# ----------------------------------------------------------------------------------------------- subsampling
class CausalConv2d(nn.Conv2d):
    """Conv2d padded (k-1, s-1) on both axes, so no output looks at later frames (NeMo's CausalConv2D)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, padding=0, **kwargs)
        self.left_pad, self.right_pad = self.kernel_size[0] - 1, self.stride[0] - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_pad, self.right_pad, self.left_pad, self.right_pad)))


class DepthwiseStridingSubsampling(nn.Module):
    """``dw_striding``: conv3x3/2 -> ReLU -> [dw conv3x3/2 -> pw conv1x1 -> ReLU] x (log2(factor) - 1) -> Linear.

    Frames past each utterance's length are zeroed before every layer (NeMo's MaskedConvSequential), so a padded
    batch gives the same result as each utterance alone. ``conv`` keeps NeMo's Sequential indices (0, 2, 3, 5, 6).
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.subsampling != "dw_striding":
            raise ValueError(f"subsampling {cfg.subsampling!r} is not supported (dw_striding only)")
        n_stages = int(math.log2(cfg.subsampling_factor))
        ch, self.causal = cfg.subsampling_conv_channels, cfg.causal_downsampling
        if self.causal:
            self.pad_left, self.pad_right = 2, 1
            conv = lambda cin, cout, groups: CausalConv2d(cin, cout, 3, stride=2, groups=groups)  # noqa: E731
        else:
            self.pad_left = self.pad_right = 1
            conv = lambda cin, cout, groups: nn.Conv2d(cin, cout, 3, stride=2, padding=1, groups=groups)  # noqa: E731
        layers: list[nn.Module] = [conv(1, ch, 1), nn.ReLU()]
        for _ in range(n_stages - 1):
            layers += [conv(ch, ch, ch), nn.Conv2d(ch, ch, 1), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        freq = cfg.feat_in
        for _ in range(n_stages):
            freq = self.out_length(freq)
        self.out = nn.Linear(ch * freq, cfg.d_model)

    def out_length(self, n):
        """Length after one stride-2 stage: floor((n + pad_l + pad_r - 3) / 2) + 1."""
        return (n + self.pad_left + self.pad_right - 3) // 2 + 1

    def forward(self, feats_btf: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = feats_btf.unsqueeze(1)  # [B, 1, T, F]
        lengths = lengths.to(torch.long)

        def masked(x, lengths):
            keep = torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None]
            return x * keep[:, None, :, None].to(x.dtype)

        x = masked(x, lengths)
        for layer in self.conv:
            x = layer(x)
            if isinstance(layer, nn.Conv2d) and layer.stride[0] != 1:
                lengths = self.out_length(lengths)
            x = masked(x, lengths)
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f)), lengths


# ----------------------------------------------------------------------------------------------- layer parts
class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, bias: bool, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.silu(self.linear1(x))))


class RelPositionalEncoding(nn.Module):
    """Transformer-XL sinusoids for relative positions (T-1 ... -(T-1)); no parameters."""

    def __init__(self, d_model: int, max_len: int, xscale: float | None, dropout: float):
        super().__init__()
        self.d_model, self.xscale = d_model, xscale
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("pe", torch.zeros(1, 0, d_model), persistent=False)
        self.extend(max_len)

    def extend(self, length: int) -> None:
        if self.pe.shape[1] >= 2 * length - 1:
            return
        positions = torch.arange(length - 1, -length, -1, dtype=torch.float32).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, self.d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / self.d_model))
        pe = torch.zeros(positions.shape[0], self.d_model)
        pe[:, 0::2] = torch.sin(positions * div_term)
        pe[:, 1::2] = torch.cos(positions * div_term)
        self.pe = pe.unsqueeze(0).to(self.pe.device)

    def forward(self, x: torch.Tensor, cache_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self.xscale:
            x = x * self.xscale
        total = x.shape[1] + cache_len
        self.extend(total)
        center = self.pe.shape[1] // 2 + 1
        pos_emb = self.pe[:, center - total : center + total - 1].to(x.dtype)  # [1, 2*total-1, D]
        return self.dropout(x), pos_emb


class RelPositionMultiHeadAttention(nn.Module):
    """Transformer-XL attention: scores = (q+u)k^T + rel_shift((q+v)p^T), over sqrt(d_k)."""

    def __init__(self, n_heads: int, d_model: int, bias: bool, dropout: float):
        super().__init__()
        self.h, self.d_k = n_heads, d_model // n_heads
        self.linear_q = nn.Linear(d_model, d_model, bias=bias)
        self.linear_k = nn.Linear(d_model, d_model, bias=bias)
        self.linear_v = nn.Linear(d_model, d_model, bias=bias)
        self.linear_out = nn.Linear(d_model, d_model, bias=bias)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(self.h, self.d_k))
        self.dropout_p = dropout

    @staticmethod
    def rel_shift(x: torch.Tensor) -> torch.Tensor:
        """[B, H, Tq, P] scores by relative position -> scores by key position (first Tk columns are valid)."""
        b, h, tq, p = x.shape
        x = F.pad(x, (1, 0)).reshape(b, h, p + 1, tq)
        return x[:, :, 1:].reshape(b, h, tq, p)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor, pos_emb: torch.Tensor,
                mask_btt: torch.Tensor | None) -> torch.Tensor:
        return self.attend(query, self.linear_k(key_value), self.linear_v(key_value), pos_emb, mask_btt)

    def forward_cached_kv(self, query: torch.Tensor, cache_k_bcd: torch.Tensor, cache_v_bcd: torch.Tensor,
                          pos_emb: torch.Tensor, mask_btt: torch.Tensor | None, cache_drop: int = 0):
        """Attention over projected cached keys/values + the new frames; only the new frames are projected.
        Returns (output, next_k, next_v): the cache keeps the last C projections not dropped, as the layer-input
        cache keeps the last C inputs (linear_k/linear_v act frame by frame, so the two carry the same keys)."""
        k = torch.cat([cache_k_bcd, self.linear_k(query)], dim=1)  # [B, C + T, D]
        v = torch.cat([cache_v_bcd, self.linear_v(query)], dim=1)
        # next = cat(cache[keep:], new[:keep]) with keep = T - cache_drop: a window of k / v, no extra copy
        keep, c = query.shape[1] - cache_drop, cache_k_bcd.shape[1]
        return self.attend(query, k, v, pos_emb, mask_btt), k[:, keep:keep + c], v[:, keep:keep + c]

    def attend(self, query: torch.Tensor, k_btd: torch.Tensor, v_btd: torch.Tensor, pos_emb: torch.Tensor,
               mask_btt: torch.Tensor | None) -> torch.Tensor:
        """Attention from queries (layer inputs) and already projected keys/values [B, Tk, D]."""
        b, tq, _ = query.shape
        tk = k_btd.shape[1]
        q = self.linear_q(query).view(b, tq, self.h, self.d_k)
        k = k_btd.view(b, tk, self.h, self.d_k).transpose(1, 2)
        v = v_btd.view(b, tk, self.h, self.d_k).transpose(1, 2)
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # [B, H, Tq, d_k]
        bd = self.position_scores(q, pos_emb, tk, mask_btt)
        out = F.scaled_dot_product_attention(q_u, k, v, attn_mask=bd,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        if mask_btt is not None:  # queries that see nothing (padding) give zeros, as in NeMo
            out = out.masked_fill(mask_btt.all(dim=-1)[:, None, :, None], 0.0)
        return self.linear_out(out.transpose(1, 2).reshape(b, tq, self.h * self.d_k))

    def forward_ring(self, query: torch.Tensor, ring_brd: torch.Tensor, ring_index: torch.Tensor,
                     ring_stale: torch.Tensor, pos_emb: torch.Tensor, mask_btt: torch.Tensor) -> torch.Tensor:
        """Attention over a ring of cached layer inputs (``RingCache``) + the new frames, reading the ring in place
        and never projecting it: the query is taken into input space instead (q W_k per head), so the scores are
        (q W_k) . ring and the values W_v (p . ring). Per stream that is ~2 H T R D multiply-adds where projecting
        the R cached frames costs 2 R D^2, and no cache-sized keys, values or concatenation are made. The key bias
        adds the same q . b_k to every key of a query (softmax drops it) and the value bias adds b_v once (the
        weights sum to 1). ``ring_index`` [B, R]: each slot's logical cache position (oldest first, the order
        ``forward`` sees); ``ring_stale`` [B, R]: slots outside the window. Equal to ``forward`` over
        cat(cache, query) up to summation order."""
        b, tq, d = query.shape
        r, h, dk = ring_brd.shape[1], self.h, self.d_k
        tk = (pos_emb.shape[1] + 1) // 2  # logical keys: C cached + T new
        c = tk - tq
        w_k = self.linear_k.weight.view(h, dk, d)
        w_v = self.linear_v.weight.view(h, dk, d)
        q = self.linear_q(query).view(b, tq, h, dk)
        q_u = (q + self.pos_bias_u) / math.sqrt(dk)
        q_in = torch.matmul(q_u.permute(2, 0, 1, 3).reshape(h, b * tq, dk), w_k)  # [H, B*T, D]
        q_in = q_in.view(h, b, tq, d).transpose(0, 1).reshape(b, h * tq, d)
        bd = self.position_scores(q, pos_emb, tk, mask_btt)  # [B, H, T, C + T], logical order
        bd_ring = torch.gather(bd[..., :c], -1, ring_index[:, None, None, :].expand(b, h, tq, r))
        bd_ring = bd_ring.masked_fill(ring_stale[:, None, None, :], -MASK_VALUE)
        k_new = F.linear(query, self.linear_k.weight).view(b, tq, h, dk).transpose(1, 2)  # no bias: see above
        v_new = F.linear(query, self.linear_v.weight).view(b, tq, h, dk).transpose(1, 2)
        scores = torch.cat([torch.bmm(q_in, ring_brd.transpose(1, 2)).view(b, h, tq, r) + bd_ring,
                            torch.matmul(q_u.transpose(1, 2), k_new.transpose(-2, -1)) + bd[..., c:]], dim=-1)
        att = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # [B, H, T, R + T]
        ctx = torch.bmm(att[..., :r].reshape(b, h * tq, r), ring_brd)  # [B, H*T, D]: weighted ring inputs
        out = torch.matmul(ctx.view(b, h, tq, d).transpose(0, 1).reshape(h, b * tq, d), w_v.transpose(1, 2))
        out = out.view(h, b, tq, dk).transpose(0, 1) + torch.matmul(att[..., r:], v_new)  # [B, H, T, d_k]
        if self.linear_v.bias is not None:
            out = out + self.linear_v.bias.view(h, 1, dk)
        out = out.masked_fill(mask_btt.all(dim=-1)[:, None, :, None], 0.0)
        return self.linear_out(out.transpose(1, 2).reshape(b, tq, h * dk))

    def position_scores(self, q: torch.Tensor, pos_emb: torch.Tensor, tk: int,
                        mask_btt: torch.Tensor | None) -> torch.Tensor:
        """The relative-position term rel_shift((q+v)p^T) / sqrt(d_k) for queries q [B, Tq, H, d_k] and Tk keys,
        [B, H, Tq, Tk], masked positions at -MASK_VALUE (the additive mask of the scores)."""
        b, tq = q.shape[0], q.shape[1]
        p = self.linear_pos(pos_emb).view(pos_emb.shape[0], -1, self.h, self.d_k).transpose(1, 2)
        if p.shape[0] == 1:  # positions shared by the batch: one [B*Tq, d_k] x [d_k, P] GEMM per head, not B*H
            q_v = (q + self.pos_bias_v).permute(2, 0, 1, 3).reshape(self.h, b * tq, self.d_k)
            # P = 2 Tk - 1 is odd: a row stride of P elements forces cuBLAS onto unaligned (align-1/2) kernels,
            # 10x slower here; padding P to a multiple of 8 keeps the fast ones (the extra columns are dropped)
            n_pos = p.shape[2]
            p_hpd = F.pad(p[0], (0, 0, 0, -n_pos % 8))
            bd = torch.matmul(q_v, p_hpd.transpose(-2, -1)).view(self.h, b, tq, -1)[..., :n_pos].transpose(0, 1)
        else:  # tiny GEMMs of M = Tq rows, slow for short chunks
            bd = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))
        bd = self.rel_shift(bd)[..., :tk] / math.sqrt(self.d_k)
        if mask_btt is not None:
            bd = bd.masked_fill(mask_btt[:, None], -MASK_VALUE)
        return bd


def depthwise_conv1d(x_bdt: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv1d(x, weight, bias, groups=D)`` (no padding) as K shifted multiply-adds on CUDA: cuDNN's depthwise
    1-D kernels are slow in half precision and for short chunks (15 ms of a 119 ms fp16 stream step at B=1024, 10 ms
    of a 131 ms compiled offline pass; benchmarks/results/profile_h100_2026-11-24); these are plain elementwise ops
    that CUDA graphs and torch.compile fuse. The CPU and training (autograd would keep K products for the backward
    pass) keep F.conv1d. Equal to it up to summation order (tests/test_encoder_kernels.py)."""
    if not x_bdt.is_cuda or torch.is_grad_enabled():
        return F.conv1d(x_bdt, weight, bias, groups=weight.shape[0])
    return shifted_depthwise_conv1d(x_bdt, weight, bias)


def shifted_depthwise_conv1d(x_bdt: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    k = weight.shape[-1]
    t = x_bdt.shape[-1] - k + 1
    w = weight[:, 0, :, None]  # [D, K, 1]
    out = x_bdt[..., 0:t] * w[:, 0]
    for j in range(1, k):
        out = out + x_bdt[..., j:j + t] * w[:, j]
    return out if bias is None else out + bias[:, None]


class ConvModule(nn.Module):
    """pw conv (D->2D) -> GLU -> depthwise conv (k) -> BatchNorm -> SiLU -> pw conv (D->D)."""

    def __init__(self, d_model: int, kernel: int, context: list[int], bias: bool, norm: str):
        super().__init__()
        if norm != "batch_norm":
            raise ValueError(f"conv_norm_type {norm!r} is not supported (batch_norm only)")
        self.pad_left, self.pad_right = context
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1, bias=bias)
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel, groups=d_model, bias=bias)
        self.batch_norm = nn.BatchNorm1d(d_model)
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1, bias=bias)

    def forward(self, x_btd: torch.Tensor, pad_mask_bt: torch.Tensor | None,
                cache_bdk: torch.Tensor | None = None, cache_drop: int = 0):
        if x_btd.is_cuda and not torch.is_grad_enabled() and not self.training:
            return self.forward_time_major(x_btd, pad_mask_bt, cache_bdk, cache_drop)
        x = F.glu(self.pointwise_conv1(x_btd.transpose(1, 2)), dim=1)  # [B, D, T]
        if pad_mask_bt is not None:
            x = x.masked_fill(pad_mask_bt[:, None, :], 0.0)
        next_cache = None
        if cache_bdk is None:
            x = F.pad(x, (self.pad_left, self.pad_right))
        else:
            x = torch.cat([cache_bdk, F.pad(x, (0, self.pad_right))], dim=-1)
            kept = x[:, :, : x.shape[-1] - cache_drop] if cache_drop > 0 else x
            next_cache = kept[:, :, -cache_bdk.shape[-1]:]
        x = depthwise_conv1d(x, self.depthwise_conv.weight, self.depthwise_conv.bias)
        x = self.pointwise_conv2(F.silu(self.batch_norm(x)))
        return x.transpose(1, 2), next_cache

    def forward_time_major(self, x_btd: torch.Tensor, pad_mask_bt: torch.Tensor | None,
                           cache_bdk: torch.Tensor | None = None, cache_drop: int = 0):
        """``forward`` kept in [B, T, D] throughout (inference on CUDA): the 1x1 convs as plain GEMMs and the
        depthwise conv as K shifted multiply-adds along T. cuDNN runs the 1x1 convs in NHWC with a layout
        conversion on each side (~5 ms of a 43 ms fp32 stream step at B=256, profile_h100_2026-11-24); here nothing
        is transposed except the small conv cache, whose [B, D, K-1] layout is the contract's. Equal to ``forward``
        up to summation order (tests/test_encoder_kernels.py)."""
        x = F.glu(F.linear(x_btd, self.pointwise_conv1.weight[..., 0], self.pointwise_conv1.bias), dim=-1)
        if pad_mask_bt is not None:
            x = x.masked_fill(pad_mask_bt[:, :, None], 0.0)
        next_cache = None
        if cache_bdk is None:
            x = F.pad(x, (0, 0, self.pad_left, self.pad_right))
        else:
            x = torch.cat([cache_bdk.transpose(1, 2), F.pad(x, (0, 0, 0, self.pad_right))], dim=1)
            kept = x[:, : x.shape[1] - cache_drop] if cache_drop > 0 else x
            next_cache = kept[:, -cache_bdk.shape[-1]:].transpose(1, 2)
        w_kd = self.depthwise_conv.weight[:, 0].t()  # [K, D]
        k = w_kd.shape[0]
        t = x.shape[1] - k + 1
        y = x[:, 0:t] * w_kd[0]
        for j in range(1, k):
            y = y + x[:, j:j + t] * w_kd[j]
        if self.depthwise_conv.bias is not None:
            y = y + self.depthwise_conv.bias
        bn = self.batch_norm
        if isinstance(bn, nn.BatchNorm1d):  # eval BatchNorm as a per-channel affine map (last axis here)
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            y = y * scale + (bn.bias - bn.running_mean * scale)
        return F.linear(F.silu(y), self.pointwise_conv2.weight[..., 0], self.pointwise_conv2.bias), next_cache


@torch.no_grad()
def fold_batch_norm(encoder: nn.Module) -> None:
    """Inference only, in place: fold each conv module's eval BatchNorm into its depthwise conv (w' = w s,
    b' = (b - mean) s + beta with s = gamma / sqrt(var + eps)) and replace it by Identity. Engines call this on
    their own copy of the encoder; the state-dict names then no longer match NeMo's."""
    for m in encoder.modules():
        if isinstance(m, ConvModule) and isinstance(m.batch_norm, nn.BatchNorm1d):
            bn, dw = m.batch_norm, m.depthwise_conv
            acc = torch.promote_types(dw.weight.dtype, torch.float32)  # fold in (at least) fp32
            scale = bn.weight.to(acc) * torch.rsqrt(bn.running_var.to(acc) + bn.eps)
            bias = dw.bias.to(acc) if dw.bias is not None else torch.zeros_like(scale)
            new_bias = (bias - bn.running_mean.to(acc)) * scale + bn.bias.to(acc)
            dw.weight.copy_((dw.weight.to(acc) * scale[:, None, None]).to(dw.weight.dtype))
            if dw.bias is None:
                dw.bias = nn.Parameter(new_bias.to(dw.weight.dtype), requires_grad=False)
            else:
                dw.bias.copy_(new_bias.to(dw.bias.dtype))
            m.batch_norm = nn.Identity()


class ConformerLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d, bias = cfg.d_model, cfg.use_bias
        self.norm_feed_forward1 = nn.LayerNorm(d)
        self.feed_forward1 = FeedForward(d, d * cfg.ff_expansion_factor, bias, cfg.dropout)
        self.norm_self_att = nn.LayerNorm(d)
        self.self_attn = RelPositionMultiHeadAttention(cfg.n_heads, d, bias, cfg.dropout_att)
        self.norm_conv = nn.LayerNorm(d)
        self.conv = ConvModule(d, cfg.conv_kernel_size, cfg.conv_context, bias, cfg.conv_norm_type)
        self.norm_feed_forward2 = nn.LayerNorm(d)
        self.feed_forward2 = FeedForward(d, d * cfg.ff_expansion_factor, bias, cfg.dropout)
        self.norm_out = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, att_mask, pos_emb, pad_mask, cache_channel=None, cache_time=None, cache_drop: int = 0,
                cache_kv: tuple[torch.Tensor, torch.Tensor] | None = None, cache_ring: tuple | None = None):
        """``cache_channel`` [B, C, D]: the last C attention inputs (NeMo); or ``cache_kv`` (k, v) [B, C, D] each:
        their projections (the projected-K/V variant), then ``next_channel`` is the (next_k, next_v) pair; or
        ``cache_ring`` (ring [B, R, D], slot index, stale slots; ``RingCache``), then ``next_channel`` is this
        step's attention inputs [B, T, D], which the caller writes into the ring."""
        x = x + 0.5 * self.dropout(self.feed_forward1(self.norm_feed_forward1(x)))
        q = self.norm_self_att(x)
        next_channel = None
        if cache_ring is not None:
            att = self.self_attn.forward_ring(q, *cache_ring, pos_emb, att_mask)
            next_channel = q
        elif cache_kv is not None:
            att, next_k, next_v = self.self_attn.forward_cached_kv(q, *cache_kv, pos_emb, att_mask, cache_drop)
            next_channel = (next_k, next_v)
        else:
            if cache_channel is None:
                kv = q
            else:  # keys/values see the cached inputs; the cache keeps the last C inputs not dropped
                kv = torch.cat([cache_channel, q], dim=1)
                # next = cat(cache[keep:], q[:keep]) with keep = T - cache_drop: a window of kv, no extra copy
                keep = q.shape[1] - cache_drop
                next_channel = kv[:, keep:keep + cache_channel.shape[1]]
            att = self.self_attn(q, kv, pos_emb, att_mask)
        x = x + self.dropout(att)
        conv_out, next_time = self.conv(self.norm_conv(x), pad_mask, cache_time, cache_drop)
        x = x + self.dropout(conv_out)
        x = x + 0.5 * self.dropout(self.feed_forward2(self.norm_feed_forward2(x)))
        return self.norm_out(x), next_channel, next_time


# ----------------------------------------------------------------------------------------------- masks
def attention_masks(lengths: torch.Tensor, max_len: int, att_context: list[int], style: str,
                    offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pad_mask [B, T], att_mask [B, T, T]); True marks what is masked out. Mirrors NeMo's ``_create_masks``."""
    device = lengths.device
    idx = torch.arange(max_len, device=device)
    allowed = torch.ones(max_len, max_len, dtype=torch.bool, device=device)
    left, right = att_context
    if style == "regular" or right < 0:
        if left >= 0:
            allowed = allowed.triu(diagonal=-left)
        if right >= 0 and style == "regular":
            allowed = allowed.tril(diagonal=right)
    elif style == "chunked_limited":
        chunk = right + 1
        left_chunks = left // chunk if left >= 0 else 10000
        chunk_idx = torch.div(idx, chunk, rounding_mode="trunc")
        diff = chunk_idx[:, None] - chunk_idx[None, :]
        allowed = allowed & (diff <= left_chunks) & (diff >= 0)
    else:
        raise ValueError(f"att_context_style {style!r} is not supported")
    valid = idx[None, :] < lengths[:, None]
    if offset is not None:
        valid = valid & (idx[None, :] >= offset[:, None])
    att_allowed = valid[:, None, :] & valid[:, :, None] & allowed[None]
    return ~valid, ~att_allowed


@dataclass
class StreamingCache:
    """NeMo's cache-aware streaming state, layer-first: channel [L, B, C, D], time [L, B, D, K-1], channel_len [B]."""

    last_channel: torch.Tensor
    last_time: torch.Tensor
    last_channel_len: torch.Tensor


@dataclass
class ProjectedKVCache:
    """The projected-K/V variant of ``StreamingCache``: instead of the last C attention inputs, each layer's keys and
    values after linear_k / linear_v, k [L, B, C, D] and v [L, B, C, D] (heads side by side in D, as linear_k
    outputs them), so a step projects only its new frames. Conv cache and channel_len are as in the default."""

    last_k: torch.Tensor
    last_v: torch.Tensor
    last_time: torch.Tensor
    last_channel_len: torch.Tensor


@dataclass
class RingCache:
    """The ring variant of ``StreamingCache``: each layer's attention inputs in a ring of R >= C + T slots, ring
    [L, B, R, D], and ``pos`` [B], the slot of a stream's next frame. A step writes only its T new frames (slots
    pos .. pos + T - 1, mod R) where NeMo's cache shifts all C frames (a concatenation and a copy of the whole cache
    per layer and step); attention reads the slots in place, scored in logical order through ``ring_order``. Holds
    the same C frames as the layer-input cache (``ring_from_cache`` / ``cache_from_ring``); conv cache and
    channel_len as there. ``cache_len``: C."""

    ring: torch.Tensor
    last_time: torch.Tensor
    last_channel_len: torch.Tensor
    pos: torch.Tensor
    cache_len: int


def ring_order(pos: torch.Tensor, ring: int, cache_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [B, R], stale [B, R]): the logical cache position (0 = oldest of the C cached frames) of every ring
    slot before a step writes at ``pos``, and the slots outside the C most recent frames."""
    r = torch.arange(ring, device=pos.device)
    j = torch.remainder(r[None, :] - pos[:, None], ring) - (ring - cache_len)
    return j.clamp(min=0), j < 0


def ring_from_cache(cache: StreamingCache, ring: int) -> RingCache:
    """Layer-input cache (layer-first) -> ring cache with ``pos`` 0: the C frames in the ring's last C slots."""
    ch = cache.last_channel
    L, B, C, D = ch.shape
    if ring < C:
        raise ValueError(f"ring of {ring} slots < cache of {C} frames")
    buf = torch.zeros(L, B, ring, D, dtype=ch.dtype, device=ch.device)
    buf[:, :, ring - C:] = ch
    return RingCache(buf, cache.last_time, cache.last_channel_len,
                     torch.zeros(B, dtype=torch.long, device=ch.device), C)


def cache_from_ring(cache: RingCache) -> StreamingCache:
    """Ring cache -> the layer-input cache it holds (the C most recent frames, oldest first)."""
    L, B, R, D = cache.ring.shape
    C = cache.cache_len
    slot = torch.remainder(torch.arange(C, device=cache.pos.device)[None, :] + (R - C) + cache.pos[:, None], R)
    ch = torch.gather(cache.ring, 2, slot[None, :, :, None].expand(L, B, C, D))
    return StreamingCache(ch, cache.last_time, cache.last_channel_len)


# ----------------------------------------------------------------------------------------------- encoder
class ConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.self_attention_model != "rel_pos":
            raise ValueError(f"self_attention_model {cfg.self_attention_model!r} is not supported (rel_pos only)")
        if not cfg.untie_biases:
            raise ValueError("untie_biases=false is not supported")
        self.cfg = cfg
        self.att_context_size = list(cfg.att_context_sizes[0])
        self.pre_encode = DepthwiseStridingSubsampling(cfg)
        xscale = math.sqrt(cfg.d_model) if cfg.xscaling else None
        self.pos_enc = RelPositionalEncoding(cfg.d_model, cfg.pos_emb_max_len, xscale, cfg.dropout_pre_encoder)
        self.layers = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.n_layers))

    def forward(self, features: torch.Tensor, lengths: torch.Tensor,
                att_context_size: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, F, T_mel], lengths [B] -> encoded [B, D, T], encoded_lengths [B]."""
        x, lengths = self.pre_encode(features.transpose(1, 2), lengths)
        x, pos_emb = self.pos_enc(x)
        pad_mask, att_mask = attention_masks(lengths, x.shape[1], att_context_size or self.att_context_size,
                                             self.cfg.att_context_style)
        for layer in self.layers:
            x, _, _ = layer(x, att_mask, pos_emb, pad_mask)
        return x.transpose(1, 2), lengths

    def stream_step(self, features: torch.Tensor, lengths: torch.Tensor, cache: StreamingCache | ProjectedKVCache,
                    *, drop_extra_pre_encoded: int, cache_drop_size: int, att_context_size: list[int] | None = None,
                    inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor, StreamingCache | ProjectedKVCache]:
        """One cache-aware step (NeMo's ``forward_internal`` with caches): features of one chunk, including the
        pre-encode cache frames, -> encoded [B, D, T_valid], lengths, next cache (of the same kind as ``cache``:
        a ``ProjectedKVCache`` selects the projected-K/V variant). ``inplace``: the next cache is written into
        ``cache``'s own tensors (each layer has read its cache before anything is written) and ``cache`` is
        returned: no second set of cache-sized buffers (the engines' CUDA graphs keep one per batch bucket)."""
        x, lengths = self.pre_encode(features.transpose(1, 2), lengths)
        if drop_extra_pre_encoded > 0:
            x = x[:, drop_extra_pre_encoded:]
            lengths = (lengths - drop_extra_pre_encoded).clamp(min=0)
        projected = isinstance(cache, ProjectedKVCache)
        if isinstance(cache, RingCache):
            cache_len = cache.cache_len
        else:
            cache_len = (cache.last_k if projected else cache.last_channel).shape[2]
        t = x.shape[1]
        x, pos_emb = self.pos_enc(x, cache_len=cache_len)
        offset = cache_len - cache.last_channel_len
        pad_mask, att_mask = attention_masks(lengths + cache_len, t + cache_len,
                                             att_context_size or self.att_context_size, self.cfg.att_context_style,
                                             offset=offset)
        pad_mask, att_mask = pad_mask[:, cache_len:], att_mask[:, cache_len:]
        if isinstance(cache, RingCache):
            return self._stream_step_ring(x, lengths, cache, pos_emb, pad_mask, att_mask, cache_drop_size, inplace)
        next_channel, next_time = [], []
        for i, layer in enumerate(self.layers):
            if projected:
                x, ch, tm = layer(x, att_mask, pos_emb, pad_mask, None, cache.last_time[i], cache_drop_size,
                                  cache_kv=(cache.last_k[i], cache.last_v[i]))
            else:
                x, ch, tm = layer(x, att_mask, pos_emb, pad_mask, cache.last_channel[i], cache.last_time[i],
                                  cache_drop_size)
            if inplace:  # layer i's cache is no longer read: overwrite it now (its K/V temporaries die here)
                if projected:
                    cache.last_k[i].copy_(ch[0])
                    cache.last_v[i].copy_(ch[1])
                else:
                    cache.last_channel[i].copy_(ch)
                cache.last_time[i].copy_(tm)
                continue
            next_channel.append(ch)
            next_time.append(tm)
        next_len = torch.clamp(cache.last_channel_len + (t - cache_drop_size), max=cache_len)
        if inplace:
            cache.last_channel_len.copy_(next_len)
            return x.transpose(1, 2), lengths, cache
        # stacked batch-first ([B, L, ...] memory, the contract's layout), returned as layer-first views: the engines'
        # .transpose(0, 1).contiguous() is then free, one copy of each cache per step instead of two
        stack = lambda ts: torch.stack(ts, dim=1).transpose(0, 1)  # noqa: E731
        if projected:
            return x.transpose(1, 2), lengths, ProjectedKVCache(stack([k for k, _ in next_channel]),
                                                                stack([v for _, v in next_channel]),
                                                                stack(next_time), next_len)
        return x.transpose(1, 2), lengths, StreamingCache(stack(next_channel), stack(next_time), next_len)

    def _stream_step_ring(self, x, lengths, cache: RingCache, pos_emb, pad_mask, att_mask, cache_drop_size: int,
                          inplace: bool):
        """The layers of ``stream_step`` with a ``RingCache`` (positions and masks as for the layer-input cache, in
        logical order): each layer attends over the ring in place, then the T new frames of every layer are written
        into the ring in one scatter."""
        L, B, R, D = cache.ring.shape
        C, t = cache.cache_len, x.shape[1]
        if C + t > R:
            raise ValueError(f"a chunk of {t} frames does not fit a ring of {R} slots for a cache of {C}")
        index, stale = ring_order(cache.pos, R, C)
        new_frames, next_time = [], []
        for i, layer in enumerate(self.layers):
            x, q, tm = layer(x, att_mask, pos_emb, pad_mask, None, cache.last_time[i], cache_drop_size,
                             cache_ring=(cache.ring[i], index, stale))
            new_frames.append(q)
            if inplace:
                cache.last_time[i].copy_(tm)
            else:
                next_time.append(tm)
        # the cache keeps the first T - cache_drop_size new frames (overlapping chunks compute the rest again)
        keep = t - cache_drop_size
        ring = cache.ring if inplace else cache.ring.clone()
        if keep > 0:
            slots = torch.remainder(cache.pos[:, None] + torch.arange(keep, device=x.device)[None, :], R)  # [B, keep]
            ring.scatter_(2, slots[None, :, :, None].expand(L, B, keep, D), torch.stack(new_frames)[:, :, :keep])
        next_pos = torch.remainder(cache.pos + keep, R)
        next_len = torch.clamp(cache.last_channel_len + keep, max=C)
        if inplace:
            cache.pos.copy_(next_pos)
            cache.last_channel_len.copy_(next_len)
            return x.transpose(1, 2), lengths, cache
        return x.transpose(1, 2), lengths, RingCache(ring, torch.stack(next_time), next_len, next_pos, C)

    @torch.no_grad()
    def project_cache(self, cache: StreamingCache) -> ProjectedKVCache:
        """Layer-input cache -> projected-K/V cache (each layer's linear_k / linear_v over its cached inputs), so a
        stream can switch variant between two steps. One way only: the inputs cannot be recovered from K/V.
        Frames not yet filled project to the biases, not to zeros as in a fresh projected cache; both are masked
        (``last_channel_len``), so the step's outputs are the same."""
        x = cache.last_channel  # [L, B, C, D]
        k, v = torch.empty_like(x), torch.empty_like(x)  # same strides as x: a batch-first view stays batch-first
        for i, layer in enumerate(self.layers):  # layer by layer: no other cache-sized temporaries
            k[i] = layer.self_attn.linear_k(x[i])
            v[i] = layer.self_attn.linear_v(x[i])
        return ProjectedKVCache(k, v, cache.last_time, cache.last_channel_len)
