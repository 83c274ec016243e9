"""The projected-K/V cache variant of the cache-aware step (issue #4), against NeMo's layer-input cache as truth.

Each layer then caches its keys/values after linear_k / linear_v instead of its attention inputs. Streaming the same
chunks through both variants must give the same encoder outputs (1e-5 max abs, fp32, CPU), the same next caches
(the projected cache == the layer-input cache projected, on its filled frames) and the same greedy tokens: from the
first chunk (cache not yet full) through a partial last chunk, with batch > 1 of different lengths, over hundreds of
chunks, with cache drop, and after switching a running stream from one variant to the other."""

from __future__ import annotations

import pytest
import torch

from tests.demo_assets import demo_nemo
from trt_asr.checkpoint import load_model
from trt_asr.config import tiny_config
from trt_asr.engines.torch_cuda import TorchCudaEngine
from trt_asr.engines.torch_engine import TorchEncoderEngine, project_caches
from trt_asr.model.asr import TransducerModel
from trt_asr.streaming.cache_aware import CacheAwareParams, frames_for_chunks, initial_caches, iter_chunks
from trt_asr.streaming.contract import (ContractChecker, build_contract, cache_io, initial_cache_state,
                                        load_contract, write_contract)
from trt_asr.validation.stability import error_trend

TOL = 1e-5


def _tiny(seed=0):
    torch.manual_seed(seed)
    m = TransducerModel(tiny_config(att_context_style="chunked_limited", att_context_size=[16, 3], causal=True)).eval()
    for mod in m.modules():  # non-trivial BatchNorm statistics, so the conv cache matters
        if isinstance(mod, torch.nn.BatchNorm1d):
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    return m


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _filled(cache_blcd: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """Each stream's filled cache frames (the last ``len`` of C: older ones are masked, never read)."""
    C = cache_blcd.shape[2]
    return [cache_blcd[b, :, C - int(n):] for b, n in enumerate(lengths)]


def _stream_both(model, params, features, lengths, switch_at: int | None = None):
    """Stream ``features`` [B, F, T] through both variants, chunk by chunk, decoding each with its own carried
    greedy state. ``switch_at``: the projected stream starts as a layer-input stream and is converted
    (``project_caches``) before that chunk. Returns per-chunk errors and both token lists."""
    ref = TorchEncoderEngine(model, "stream", params)
    kv = TorchEncoderEngine(model, "stream", params, kv_cache="projected")
    caches_ref = initial_caches(params, features.shape[0])
    caches_kv = dict(caches_ref) if switch_at else initial_cache_state(params, features.shape[0], "projected")
    dec = model.greedy_decoder()
    state_ref = state_kv = dec.initial_state(features.shape[0], torch.device("cpu"))
    tokens_ref = [[] for _ in range(features.shape[0])]
    tokens_kv = [[] for _ in range(features.shape[0])]
    errs = {"encoder_output": [], "cache_k": [], "cache_v": [], "cache_last_time": []}
    with torch.no_grad():
        for k, (audio, length, _) in enumerate(iter_chunks(features, lengths, params)):
            if switch_at and k == switch_at:
                caches_kv = project_caches(model, caches_kv)
            eng = kv if not switch_at or k >= switch_at else ref
            o_ref = ref.step({"audio_signal": audio, "length": length, **caches_ref})
            o_kv = eng.step({"audio_signal": audio, "length": length, **caches_kv})
            assert torch.equal(o_kv["encoded_lengths"], o_ref["encoded_lengths"])
            assert torch.equal(o_kv["cache_last_channel_next_len"], o_ref["cache_last_channel_next_len"])
            errs["encoder_output"].append(float((o_kv["encoder_output"] - o_ref["encoder_output"]).abs().max()))
            errs["cache_last_time"].append(float((o_kv["cache_last_time_next"] - o_ref["cache_last_time_next"])
                                                 .abs().max()))
            caches_ref = {n: o_ref[o] for n, o, _, _ in ref.cache_io()}
            caches_kv = {n: o_kv[o] for n, o, _, _ in eng.cache_io()}
            if eng is kv:  # the carried K/V == the carried layer inputs projected, wherever they are read
                want = project_caches(model, caches_ref)
                n = caches_ref["cache_last_channel_len"]
                for name, key in (("cache_k", "cache_last_channel_k"), ("cache_v", "cache_last_channel_v")):
                    errs[name].append(max(float((a - b).abs().amax()) if a.numel() else 0.0 for a, b in
                                          zip(_filled(caches_kv[key], n), _filled(want[key], n))))
            for toks, out, state_name in ((tokens_ref, o_ref, "ref"), (tokens_kv, o_kv, "kv")):
                state = state_ref if state_name == "ref" else state_kv
                t, state = dec(out["encoder_output"], out["encoded_lengths"], state)
                for mine, new in zip(toks, t.to_lists()):
                    mine.extend(lab for lab, _, _ in new)
                if state_name == "ref":
                    state_ref = state
                else:
                    state_kv = state
    return errs, tokens_ref, tokens_kv


def _assert_close(errs, n_chunks=None):
    for name, e in errs.items():
        if n_chunks is not None and name in ("encoder_output", "cache_last_time"):
            assert len(e) == n_chunks, name
        assert max(e, default=0.0) <= TOL, (name, max(e))


# ----------------------------------------------------------------------------------------------- tiny model
def test_tiny_240_chunks_batch_of_different_lengths(tiny):
    """240 carried chunks, 3 streams ending at different chunks (partial last chunks, then finished streams riding
    along): outputs and caches equal at 1e-5, tokens identical, no growth of the difference."""
    p = CacheAwareParams.for_encoder(tiny.cfg.encoder)
    n_chunks = 240
    total = frames_for_chunks(n_chunks, p)
    g = torch.Generator().manual_seed(3)
    features = torch.randn(3, p.feat_in, total, generator=g)
    lengths = torch.tensor([total, total - 45, total // 2 + 7])  # 45 and the middle one: mid-chunk ends
    errs, tok_ref, tok_kv = _stream_both(tiny, p, features, lengths)
    _assert_close(errs, n_chunks)
    assert tok_kv == tok_ref
    trend = error_trend(errs["encoder_output"])
    assert trend["growth_ci95_hi"] <= 1e-6, trend
    assert max(errs["encoder_output"][-40:]) <= max(10 * max(errs["encoder_output"][:40]), 1e-6)


def test_tiny_first_chunks_while_the_cache_fills(tiny):
    """C = 16 frames and 4 frames per chunk: the first 4 chunks read a partly filled cache (masked frames differ
    between the variants: zeros vs projections), a one-chunk stream only the first chunk."""
    p = CacheAwareParams.for_encoder(tiny.cfg.encoder)
    for n in (1, 2, 5):
        total = frames_for_chunks(n, p)
        features = torch.randn(2, p.feat_in, total, generator=torch.Generator().manual_seed(n))
        errs, tok_ref, tok_kv = _stream_both(tiny, p, features, torch.tensor([total, max(total - 13, 1)]))
        _assert_close(errs, n)
        assert tok_kv == tok_ref


def test_tiny_cache_drop_overlapping_chunks(tiny):
    """shift < chunk: the newest cache_drop_size frames of every chunk are not cached, in both variants."""
    p = CacheAwareParams.for_encoder(tiny.cfg.encoder, chunk_size=4, shift_size=2, left_chunks=2)
    assert p.cache_drop_size == 2
    total = 30 * p.shift_size[1]
    features = torch.randn(2, p.feat_in, total, generator=torch.Generator().manual_seed(5))
    errs, _, _ = _stream_both(tiny, p, features, torch.tensor([total, total - 11]))
    _assert_close(errs)
    assert len(errs["encoder_output"]) >= 25


@pytest.mark.parametrize("switch_at", [1, 3, 20])
def test_tiny_switch_variant_mid_stream(tiny, switch_at):
    """``project_caches`` converts a running layer-input stream (cache not yet full at 1 and 3, full at 20); the
    stream then continues in the projected variant with the same outputs."""
    p = CacheAwareParams.for_encoder(tiny.cfg.encoder)
    total = frames_for_chunks(30, p)
    features = torch.randn(2, p.feat_in, total, generator=torch.Generator().manual_seed(switch_at))
    errs, tok_ref, tok_kv = _stream_both(tiny, p, features, torch.tensor([total, total - 50]), switch_at=switch_at)
    _assert_close(errs, 30)
    assert len(errs["cache_k"]) == 30 - switch_at
    assert tok_kv == tok_ref


def test_projected_default_path_unchanged(tiny):
    """The default step is not touched by the variant: its outputs equal a direct ``stream_step`` call."""
    from trt_asr.model.encoder import StreamingCache

    p = CacheAwareParams.for_encoder(tiny.cfg.encoder)
    c = initial_caches(p, 2)
    audio = torch.randn(2, p.feat_in, p.input_frames(True))
    with torch.no_grad():
        o = TorchEncoderEngine(tiny, "stream", p).step({"audio_signal": audio, "length": torch.tensor([25, 20]), **c})
        enc, _, nxt = tiny.encoder.stream_step(
            audio, torch.tensor([25, 20]), StreamingCache(c["cache_last_channel"].transpose(0, 1),
                                                          c["cache_last_time"].transpose(0, 1),
                                                          c["cache_last_channel_len"]),
            drop_extra_pre_encoded=0, cache_drop_size=0, att_context_size=list(p.att_context_size))
    assert torch.equal(o["encoder_output"], enc)
    assert torch.equal(o["cache_last_channel_next"], nxt.last_channel.transpose(0, 1))


# ----------------------------------------------------------------------------------------------- engines, contract
def test_contract_variant(tiny, tmp_path):
    p = CacheAwareParams.for_encoder(tiny.cfg.encoder)
    default = build_contract(tiny.cfg.encoder, "cache-aware", p)
    proj = build_contract(tiny.cfg.encoder, "cache-aware", p, kv_cache="projected")
    assert "kv_cache" not in default and proj["kv_cache"] == "projected"
    names = lambda c, io: [x["name"] for x in c[io]]  # noqa: E731
    assert "cache_last_channel" in names(default, "inputs")
    assert names(proj, "inputs") == ["audio_signal", "length", "cache_last_channel_k", "cache_last_channel_v",
                                     "cache_last_time", "cache_last_channel_len"]
    assert names(proj, "outputs") == ["encoder_output", "encoded_lengths", "cache_last_channel_k_next",
                                      "cache_last_channel_v_next", "cache_last_time_next",
                                      "cache_last_channel_next_len"]
    assert proj["optimization_profiles"][0]["max"]["cache_last_channel_k"] == [8, 2, 16, 64]
    loaded = load_contract(write_contract(proj, tmp_path))
    checker = ContractChecker.from_contract(loaded)
    caches = initial_cache_state(p, 2, "projected")
    inputs = {"audio_signal": torch.randn(2, p.feat_in, p.input_frames(True)), "length": torch.tensor([25, 25]),
              **caches}
    checker.check_inputs(inputs)
    out = TorchEncoderEngine(tiny, "stream", p, kv_cache="projected", check=False).step(inputs)
    checker.check_outputs(inputs, out)
    with pytest.raises(Exception, match="input_names"):  # a layer-input cache is not this contract's
        checker.check_inputs({**inputs, **initial_caches(p, 2)})
    with pytest.raises(ValueError, match="kv_cache"):
        build_contract(tiny.cfg.encoder, "cache-aware", p, kv_cache="nope")


def test_cache_io(tiny):
    p = CacheAwareParams.for_encoder(tiny.cfg.encoder)
    L, C, D, K = p.n_layers, p.last_channel_cache_size, p.d_model, p.last_time_cache_size
    ref = TorchEncoderEngine(tiny, "stream", p).cache_io()
    assert ref == [("cache_last_channel", "cache_last_channel_next", (L, C, D), torch.float32),
                   ("cache_last_time", "cache_last_time_next", (L, D, K), torch.float32),
                   ("cache_last_channel_len", "cache_last_channel_next_len", (), torch.int64)]
    proj = TorchCudaEngine(tiny, "stream", "fp16", "cpu", params=p, kv_cache="projected").cache_io()
    assert [x[0] for x in proj] == ["cache_last_channel_k", "cache_last_channel_v", "cache_last_time",
                                    "cache_last_channel_len"]
    assert proj[0][2:] == ((L, C, D), torch.float16) and proj[-1][2:] == ((), torch.int64)
    assert cache_io(p, "projected") == TorchEncoderEngine(tiny, "stream", p, kv_cache="projected").cache_io()
    zeros = initial_cache_state(p, 3)
    assert all(torch.equal(zeros[k], v) for k, v in initial_caches(p, 3).items())


def test_torch_cuda_engine_projected_on_cpu(tiny):
    """TorchCudaEngine(kv_cache="projected") == the reference's projected step, with a padded batch bucket."""
    p = CacheAwareParams.for_encoder(tiny.cfg.encoder)
    eng = TorchCudaEngine(tiny, "stream", "fp32", "cpu", params=p, batch_buckets=(4,), kv_cache="projected")
    ref = TorchEncoderEngine(tiny, "stream", p, kv_cache="projected")
    caches = initial_cache_state(p, 3, "projected")
    g = torch.Generator().manual_seed(0)
    for k in range(5):
        t = p.input_frames(k == 0)
        inp = {"audio_signal": torch.randn(3, p.feat_in, t, generator=g), "length": torch.tensor([t, t - 4, t]),
               **caches}
        o, r = eng.step(inp), ref.step(inp)
        assert set(o) == set(r)
        for name in r:
            assert float((o[name].float() - r[name].float()).abs().max()) <= TOL, (k, name)
        caches = {n: r[out] for n, out, _, _ in ref.cache_io()}


# ----------------------------------------------------------------------------------------------- demo model
@pytest.fixture(scope="module")
def demo():
    return load_model(demo_nemo("demo-tdt-cache-aware"))


@pytest.mark.parametrize("att", [[70, 13], [70, 1]])
def test_demo_model_utterances(demo, att):
    """The shipped cache-aware demo model on 3 held-out utterances of different lengths, batched: same encoder
    outputs (1e-5) and the same, non-empty, tokens in both variants."""
    from pathlib import Path

    from trt_asr.cli.eval import load_audio

    data = Path(__file__).parent / "data" / "demo_test"
    waves = [torch.as_tensor(load_audio(str(data / f"utt000{i}.flac"), 16000)) for i in range(3)]
    lengths = torch.tensor([w.numel() for w in waves])
    audio = torch.zeros(3, int(lengths.max()))
    for i, w in enumerate(waves):
        audio[i, : w.numel()] = w
    with torch.no_grad():
        features, feat_len = demo.features(audio, lengths)
    p = CacheAwareParams.for_encoder(demo.cfg.encoder, att_context_size=att)
    errs, tok_ref, tok_kv = _stream_both(demo, p, features, feat_len)
    _assert_close(errs)
    assert tok_kv == tok_ref
    assert all(len(t) > 0 for t in tok_ref)


# ----------------------------------------------------------------------------------------------- ONNX
def test_onnx_export_projected(tiny, tmp_path):
    """``export_onnx(kv_cache="projected")``: the stream graph has the variant's names, its contract says so, and
    onnxruntime (contract checked every step) equals the torch projected step over carried chunks."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import warnings

    from trt_asr.engines.onnx_export import export_onnx
    from trt_asr.engines.onnxruntime_engine import OnnxRuntimeEngine

    p = CacheAwareParams.for_encoder(tiny.cfg.encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = export_onnx(tiny, tmp_path, mode="cache-aware", params=p, decoder=False, kv_cache="projected")
    assert meta["kv_cache"] == "projected"
    ort = OnnxRuntimeEngine(tmp_path, check=True)
    assert ort.contract["kv_cache"] == "projected"
    assert ort.runner.input_names == [
        "audio_signal", "length", "cache_last_channel_k", "cache_last_channel_v", "cache_last_time",
        "cache_last_channel_len"]
    ref = TorchEncoderEngine(tiny, "stream", p, kv_cache="projected")
    total = frames_for_chunks(8, p)
    features = torch.randn(2, p.feat_in, total, generator=torch.Generator().manual_seed(9))
    caches = initial_cache_state(p, 2, "projected")
    for audio, length, _ in iter_chunks(features, torch.tensor([total, total - 20]), p):
        inp = {"audio_signal": audio, "length": length, **caches}
        o, r = ort.step(inp), ref.step(inp)
        for name in r:
            assert float((o[name].float() - r[name].float()).abs().max()) <= TOL, name
        caches = {n: r[out] for n, out, _, _ in ref.cache_io()}


def test_batched_cache_aware_mode_with_projected_engine(demo):
    """A streaming mode that allocates its state from ``engine.cache_io()`` (BatchedCacheAwareMode) runs the
    projected variant unchanged: same tokens as with the default engine, through the session API."""
    batched = pytest.importorskip("trt_asr.streaming.batched_cache_aware")
    from pathlib import Path

    from trt_asr.cli.eval import load_audio
    from trt_asr.streaming.session import stream_tokens

    audios = [load_audio(str(p), 16000) for p in sorted((Path(__file__).parent / "data" / "demo_test")
                                                          .glob("*.flac"))[:3]]
    p = CacheAwareParams.for_encoder(demo.cfg.encoder, att_context_size=[70, 1])
    as_tuples = lambda toks: [[(t.id, t.frame, t.duration) for t in s] for s in toks]  # noqa: E731
    want = as_tuples(stream_tokens(demo, audios, batched.BatchedCacheAwareMode(demo, params=p)))
    engine = TorchCudaEngine(demo, "stream", "fp32", "cpu", params=p, kv_cache="projected")
    got = as_tuples(stream_tokens(demo, audios, batched.BatchedCacheAwareMode(demo, params=p, engine=engine)))
    assert got == want and all(want)
