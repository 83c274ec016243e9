"""The ring variant of the cache-aware step (``kv_cache="ring"``), against NeMo's layer-input cache as truth.

The ring holds the same C attention inputs per layer as ``cache_last_channel``, in R = C + T_max slots that a step
writes T of (no shift of the whole cache), and attention takes the query into input space instead of projecting
the cached frames. Streaming the same chunks through both must give the same encoder outputs (1e-5, fp32, CPU),
the same carried cache (the ring, read in logical order, == the layer-input cache on its filled frames) and the
same greedy tokens: first chunks while the cache fills, partial last chunks, batches of different lengths, many
wraps of the ring, both attention styles, after switching a running stream, in place and not, through the
torch-cuda engine's bucketed code, and through the contract's checks."""

from __future__ import annotations

import pytest
import torch

from trt_asr.config import tiny_config
from trt_asr.engines.torch_cuda import TorchCudaEngine
from trt_asr.engines.torch_engine import TorchEncoderEngine
from trt_asr.model.asr import TransducerModel
from trt_asr.model.encoder import RingCache, StreamingCache, cache_from_ring, ring_from_cache, ring_order
from trt_asr.streaming.cache_aware import CacheAwareParams, frames_for_chunks, initial_caches, iter_chunks
from trt_asr.streaming.contract import (ContractChecker, ContractViolation, build_contract, cache_io,
                                        initial_cache_state, ring_slots)

TOL = 1e-5


def _model(style: str, context, seed: int = 0) -> TransducerModel:
    """A tiny model with every parameter random (biases, Transformer-XL position biases, BatchNorm statistics
    included: a zero bias would hide a bias dropped or applied twice)."""
    torch.manual_seed(seed)
    m = TransducerModel(tiny_config(att_context_style=style, att_context_size=list(context), causal=True)).eval()
    with torch.no_grad():
        for name, p in m.encoder.named_parameters():
            if "pos_bias" in name or name.endswith("bias"):
                p.normal_(0, 0.3)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return m


@pytest.fixture(scope="module", params=[("chunked_limited", (16, 3)), ("regular", (20, 1))],
                ids=["chunked_limited", "regular"])
def tiny(request):
    return _model(*request.param)


def _params(model) -> CacheAwareParams:
    """The model's streaming params (regular attention streams inexactly w.r.t. the offline forward, like v3 at
    [70, 1]: both variants here compute the same inexact step, which is what is compared)."""
    e = model.cfg.encoder
    chunk = {"chunk_size": e.att_context_size[1] + 1} if e.att_context_style == "regular" else {}  # as bench load
    return CacheAwareParams.for_encoder(e, allow_inexact=True, **chunk)


def _filled(cache_blcd: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    C = cache_blcd.shape[2]
    return [cache_blcd[b, :, C - int(n):] for b, n in enumerate(lengths)]


def _ring_as_cache(caches: dict, params) -> torch.Tensor:
    """The ring's frames in logical order, batch-first [B, L, C, D]."""
    ring = RingCache(caches["cache_last_channel_ring"].transpose(0, 1), caches["cache_last_time"],
                     caches["cache_last_channel_len"], caches["cache_ring_pos"], params.last_channel_cache_size)
    return cache_from_ring(ring).last_channel.transpose(0, 1)


def _stream_both(model, params, features, lengths, switch_at: int | None = None):
    """Stream ``features`` through the layer-input reference and the ring variant (contract checked every step),
    decoding each with its own greedy state. ``switch_at``: the ring stream starts as a layer-input stream and is
    converted (``ring_from_cache``) before that chunk. Returns per-chunk errors and both token lists."""
    ref = TorchEncoderEngine(model, "stream", params)
    ring = TorchEncoderEngine(model, "stream", params, kv_cache="ring")
    B = features.shape[0]
    caches_ref = initial_caches(params, B)
    caches_ring = dict(caches_ref) if switch_at else initial_cache_state(params, B, "ring")
    dec = model.greedy_decoder()
    states = {"ref": dec.initial_state(B, torch.device("cpu")), "ring": dec.initial_state(B, torch.device("cpu"))}
    tokens = {"ref": [[] for _ in range(B)], "ring": [[] for _ in range(B)]}
    errs = {"encoder_output": [], "cache": [], "cache_last_time": []}
    with torch.no_grad():
        for k, (audio, length, _) in enumerate(iter_chunks(features, lengths, params)):
            if switch_at and k == switch_at:
                conv = ring_from_cache(StreamingCache(caches_ring["cache_last_channel"].transpose(0, 1),
                                                      caches_ring["cache_last_time"],
                                                      caches_ring["cache_last_channel_len"]), ring_slots(params))
                caches_ring = {"cache_last_channel_ring": conv.ring.transpose(0, 1),
                               "cache_last_time": conv.last_time, "cache_ring_pos": conv.pos,
                               "cache_last_channel_len": conv.last_channel_len}
            eng = ring if not switch_at or k >= switch_at else ref
            o_ref = ref.step({"audio_signal": audio, "length": length, **caches_ref})
            o_ring = eng.step({"audio_signal": audio, "length": length, **caches_ring})
            assert torch.equal(o_ring["encoded_lengths"], o_ref["encoded_lengths"])
            assert torch.equal(o_ring["cache_last_channel_next_len"], o_ref["cache_last_channel_next_len"])
            errs["encoder_output"].append(float((o_ring["encoder_output"] - o_ref["encoder_output"]).abs().max()))
            errs["cache_last_time"].append(float((o_ring["cache_last_time_next"] - o_ref["cache_last_time_next"])
                                                 .abs().max()))
            caches_ref = {n: o_ref[o] for n, o, _, _ in ref.cache_io()}
            caches_ring = {n: o_ring[o] for n, o, _, _ in eng.cache_io()}
            if eng is ring:  # the carried ring, read in logical order, == the carried layer inputs
                n = caches_ref["cache_last_channel_len"]
                got = _ring_as_cache(caches_ring, params)
                errs["cache"].append(max(float((a - b).abs().amax()) if a.numel() else 0.0 for a, b in
                                         zip(_filled(got, n), _filled(caches_ref["cache_last_channel"], n))))
            for name, out in (("ref", o_ref), ("ring", o_ring)):
                t, states[name] = dec(out["encoder_output"], out["encoded_lengths"], states[name])
                for mine, new in zip(tokens[name], t.to_lists()):
                    mine.extend(lab for lab, _, _ in new)
    return errs, tokens["ref"], tokens["ring"]


def _assert_close(errs):
    for name, e in errs.items():
        assert max(e, default=0.0) <= TOL, (name, max(e))


def test_many_wraps_batch_of_different_lengths(tiny):
    """80 chunks (the ring wraps 7-16 times), 3 streams ending mid-chunk at different chunks: same outputs, same
    carried cache, same tokens."""
    p = _params(tiny)
    total = frames_for_chunks(80, p)
    features = torch.randn(3, p.feat_in, total, generator=torch.Generator().manual_seed(3))
    errs, tok_ref, tok_ring = _stream_both(tiny, p, features, torch.tensor([total, total - 45, total // 2 + 7]))
    _assert_close(errs)
    assert len(errs["encoder_output"]) >= 80 and len(errs["cache"]) == len(errs["encoder_output"])
    assert tok_ring == tok_ref and sum(map(len, tok_ref)) > 0


def test_cache_drop_overlapping_chunks(tiny):
    """shift < chunk: the newest cache_drop_size frames of every chunk are not cached (the ring advances by the
    frames kept), as in NeMo's cache."""
    p = CacheAwareParams.for_encoder(tiny.cfg.encoder, chunk_size=4, shift_size=2, left_chunks=2,
                                     allow_inexact=True)
    assert p.cache_drop_size == 2
    total = 30 * p.shift_size[1]
    features = torch.randn(2, p.feat_in, total, generator=torch.Generator().manual_seed(5))
    errs, tok_ref, tok_ring = _stream_both(tiny, p, features, torch.tensor([total, total - 11]))
    _assert_close(errs)
    assert len(errs["encoder_output"]) >= 25 and tok_ring == tok_ref


def test_first_chunks_while_the_cache_fills(tiny):
    p = _params(tiny)
    for n in (1, 2, 5):
        total = frames_for_chunks(n, p)
        features = torch.randn(2, p.feat_in, total, generator=torch.Generator().manual_seed(n))
        errs, tok_ref, tok_ring = _stream_both(tiny, p, features, torch.tensor([total, max(total - 13, 1)]))
        _assert_close(errs)
        assert tok_ring == tok_ref


@pytest.mark.parametrize("switch_at", [1, 3, 20])
def test_switch_to_ring_mid_stream(tiny, switch_at):
    """``ring_from_cache`` converts a running layer-input stream (cache filling at 1 and 3, full at 20)."""
    p = _params(tiny)
    total = frames_for_chunks(30, p)
    features = torch.randn(2, p.feat_in, total, generator=torch.Generator().manual_seed(switch_at))
    errs, tok_ref, tok_ring = _stream_both(tiny, p, features, torch.tensor([total, total - 50]), switch_at=switch_at)
    _assert_close(errs)
    assert len(errs["cache"]) == 30 - switch_at
    assert tok_ring == tok_ref


def test_ring_order_and_conversions_brute_force():
    """Slot s of a ring written frame by frame from pos 0 holds frame f with f = s (mod R); ``ring_order`` gives
    each slot its place among the C most recent frames, and the conversions invert each other."""
    R, C, L, D = 7, 5, 2, 3
    for written in range(0, 20):
        pos = torch.tensor([written % R])
        index, stale = ring_order(pos, R, C)
        for s in range(R):
            frame = max(f for f in range(written - R, written) if f % R == s)  # the newest frame in slot s
            logical = frame - (written - C)
            assert bool(stale[0, s]) == (logical < 0)
            if logical >= 0:
                assert int(index[0, s]) == logical
    cache = StreamingCache(torch.randn(L, 2, C, D), torch.randn(L, 2, D, 4), torch.tensor([C, 2]))
    ring = ring_from_cache(cache, R)
    assert torch.equal(cache_from_ring(ring).last_channel, cache.last_channel)
    assert ring.pos.tolist() == [0, 0]
    with pytest.raises(ValueError, match="ring"):
        ring_from_cache(cache, C - 1)


def test_inplace_step_equals_functional_step(tiny):
    """``stream_step(inplace=True)`` writes the next ring, conv cache, pos and length into the given tensors and
    gives what the functional step returns."""
    p = _params(tiny)
    enc = tiny.encoder
    caches = initial_cache_state(p, 2, "ring")
    features = torch.randn(2, p.feat_in, frames_for_chunks(6, p), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for k, (audio, length, _) in enumerate(iter_chunks(features, torch.tensor([features.shape[-1]] * 2), p)):
            first = k == 0
            mk = lambda c: RingCache(c["cache_last_channel_ring"].transpose(0, 1),  # noqa: E731
                                     c["cache_last_time"].transpose(0, 1), c["cache_last_channel_len"],
                                     c["cache_ring_pos"], p.last_channel_cache_size)
            kw = dict(drop_extra_pre_encoded=p.drop_extra(first), cache_drop_size=0,
                      att_context_size=list(p.att_context_size))
            mine = {k2: v.clone() for k2, v in caches.items()}
            x1, _, nxt = enc.stream_step(audio, length, mk(caches), **kw)
            x2, _, same = enc.stream_step(audio, length, mk(mine), inplace=True, **kw)
            assert torch.allclose(x1, x2, atol=TOL)
            assert same.ring.data_ptr() == mine["cache_last_channel_ring"].data_ptr()
            assert torch.allclose(mine["cache_last_channel_ring"], nxt.ring.transpose(0, 1), atol=TOL)
            assert torch.allclose(mine["cache_last_time"], nxt.last_time.transpose(0, 1), atol=TOL)
            assert torch.equal(mine["cache_ring_pos"], nxt.pos)
            caches = {"cache_last_channel_ring": nxt.ring.transpose(0, 1).contiguous(),
                      "cache_last_time": nxt.last_time.transpose(0, 1).contiguous(),
                      "cache_ring_pos": nxt.pos, "cache_last_channel_len": nxt.last_channel_len}


def test_torch_cuda_engine_ring_on_cpu(tiny):
    """TorchCudaEngine(kv_cache="ring") (CPU: the same code, eager) == the reference's ring step, in a padded
    batch bucket, with caches in place and not."""
    p = _params(tiny)
    ref = TorchEncoderEngine(tiny, "stream", p, kv_cache="ring")
    for inplace in (False, True):
        eng = TorchCudaEngine(tiny, "stream", "fp32", "cpu", params=p, batch_buckets=(4,), kv_cache="ring",
                              inplace_caches=inplace)
        assert eng.cache_io() == ref.cache_io() == cache_io(p, "ring")
        c_ref = c_eng = initial_cache_state(p, 3, "ring")
        features = torch.randn(3, p.feat_in, frames_for_chunks(8, p), generator=torch.Generator().manual_seed(2))
        for audio, length, _ in iter_chunks(features, torch.tensor([features.shape[-1]] * 3), p):
            o_ref = ref.step({"audio_signal": audio, "length": length, **c_ref})
            o_eng = eng.step({"audio_signal": audio, "length": length, **c_eng})
            assert (o_ref["encoder_output"] - o_eng["encoder_output"]).abs().max() <= TOL
            c_ref = {n: o_ref[o] for n, o, _, _ in ref.cache_io()}
            c_eng = {n: o_eng[o] for n, o, _, _ in eng.cache_io()}
            assert torch.equal(c_ref["cache_ring_pos"], c_eng["cache_ring_pos"])


def test_contract_of_the_ring_variant(tiny):
    """The ring's contract: R = C + the largest chunk, names and shapes, a checker that refuses an out-of-range
    position or a wrong next position, and no ONNX export of it (a layout of the torch engines)."""
    p = _params(tiny)
    R = ring_slots(p)
    first = p.encoder_frames(p.input_frames(True), True)
    assert R >= p.last_channel_cache_size + first
    io = {n: (o, s, dt) for n, o, s, dt in cache_io(p, "ring")}
    assert io["cache_last_channel_ring"][1] == (p.n_layers, R, p.d_model)
    assert io["cache_ring_pos"] == ("cache_ring_pos_next", (), torch.int64)
    contract = build_contract(tiny.cfg.encoder, "cache-aware", p, kv_cache="ring")
    assert contract["kv_cache"] == "ring" and contract["dims"]["R"] == R
    assert [x["name"] for x in contract["inputs"]][-2:] == ["cache_ring_pos", "cache_last_channel_len"]
    checker = ContractChecker(tiny.cfg.encoder, "stream", p, kv_cache="ring")
    caches = initial_cache_state(p, 2, "ring")
    audio = torch.zeros(2, p.feat_in, p.input_frames(True))
    inputs = {"audio_signal": audio, "length": torch.tensor([audio.shape[-1]] * 2), **caches}
    checker.check_inputs(inputs)
    with pytest.raises(ContractViolation, match="cache_ring_pos"):
        checker.check_inputs({**inputs, "cache_ring_pos": torch.tensor([0, R])})
    out = TorchEncoderEngine(tiny, "stream", p, kv_cache="ring", check=False).step(inputs)
    checker.check_outputs(inputs, out)
    with pytest.raises(ContractViolation, match="cache_ring_pos_next"):
        checker.check_outputs(inputs, {**out, "cache_ring_pos_next": out["cache_ring_pos_next"] + 1})
    from trt_asr.engines.onnx_export import export_onnx

    with pytest.raises(ValueError, match="ring"):
        export_onnx(tiny, "/nonexistent-never-written", mode="cache-aware", params=p, kv_cache="ring")
