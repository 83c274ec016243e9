"""BatchedCacheAwareMode (the whole step batched on the device) against independent truth: its engine inputs equal
the streaming front end's frames (CacheAwareMode's chunks), and every stream's tokens equal CacheAwareMode alone and
the offline forward with the chunked-limited mask -- through the real StreamScheduler with random push sizes, mixed
first/later/last chunks in one batch and streams opening and closing mid-run; slot reuse leaks no state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trt_asr.checkpoint import load_model
from trt_asr.engines import with_streaming_engine
from trt_asr.engines.torch_engine import TorchEncoderEngine
from trt_asr.streaming.batched_cache_aware import BatchedCacheAwareMode
from trt_asr.streaming.cache_aware import CacheAwareMode, CacheAwareParams, offline_equivalent
from trt_asr.streaming.frontend import BatchedLogMel, StreamingFrontEnd
from trt_asr.streaming.scheduler import ErrorEvent, SchedulerConfig, StreamScheduler
from trt_asr.streaming.session import Recognizer, stream_tokens

DEMO_TEST = Path(__file__).parent / "data" / "demo_test"


@pytest.fixture(scope="module")
def tiny():
    m = load_model("random:tiny-cache-aware")
    m.cfg.preprocessor.normalize = None  # cache-aware models use unnormalised features (NeMo)
    return m


@pytest.fixture(scope="module")
def demo():
    from tests.demo_assets import demo_nemo

    m = load_model(demo_nemo("demo-tdt-cache-aware"))
    assert not m.cfg.preprocessor.normalize
    return m


def _speech(n: int) -> list[np.ndarray]:
    from trt_asr.cli.eval import load_audio

    return [load_audio(str(p), 16000) for p in sorted(DEMO_TEST.glob("*.flac"))[:n]]


def _offline_tokens(model, audio: np.ndarray, params: CacheAwareParams) -> list[tuple]:
    """One whole utterance through the encoder with the stream's chunked-limited mask, decoded in one go."""
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None]
        feats, flen = model.features(x, torch.tensor([x.shape[1]]))
        toks, _ = model.greedy_decoder()(*offline_equivalent(model, feats, flen, params))
    return [tuple(t) for t in toks.to_lists()[0]]


def _tuples(tokens) -> list[tuple]:
    return [(t.id, t.frame, t.duration) for t in tokens]


def _pieces(rng, n: int) -> list[tuple[int, int]]:
    pos, out = 0, []
    while pos < n:
        step = int(rng.integers(1, 9000)) if rng.random() < 0.9 else int(rng.integers(1, 60))
        out.append((pos, min(pos + step, n)))
        pos += step
    return out


def _through_scheduler(model, mode, audios, rng, max_batch=3, open_every=2):
    """Streams open staggered (a new one every ``open_every`` rounds) and close when done, each fed in its own
    random piece sizes, stepped now and then: batches mix first, later and last chunks of different streams."""
    sched = StreamScheduler(Recognizer(model, mode), SchedulerConfig(max_streams=len(audios), max_batch=max_batch,
                                                                      idle_timeout=None))
    cuts = [_pieces(rng, a.size) for a in audios]
    streams: list = [None] * len(audios)
    events: list = [[] for _ in audios]
    turn = 0
    while any(cuts) or any(s is None for s in streams):
        if turn % open_every == 0 and None in streams:
            streams[streams.index(None)] = sched.open()
        for i, (st, a, p) in enumerate(zip(streams, audios, cuts)):
            if st is not None and p:
                lo, hi = p.pop(0)
                st.push(a[lo:hi])
                if not p:
                    st.end()
            if st is not None and not p and a.size == 0:
                st.end()
        turn += 1
        if turn % 2:
            sched.step()
        for i, st in enumerate(streams):
            if st is not None:
                events[i] += st.poll()
    sched.run_until_idle()
    for i, st in enumerate(streams):
        events[i] += st.poll()
        assert events[i] and events[i][-1].final, i
        assert not any(isinstance(e, ErrorEvent) for e in events[i]), events[i]
    assert max(sched.stats.batch_sizes) > 1 and sched.open_streams == 0
    return [[(t.id, t.frame, t.duration) for ev in evs for t in ev.committed] for evs in events]


# ----------------------------------------------------------------------------------------------- tokens
@pytest.mark.parametrize("att", [None, (16, 0)])
def test_tiny_tokens_equal_alone_and_offline(tiny, att):
    """Random tiny cache-aware model: every stream's (label, frame, duration) == CacheAwareMode alone == the
    offline forward. (16, 0): the first chunk (1 mel frame) is shorter than the pre-encode cache (9 frames)."""
    kw = {} if att is None else {"att_context_size": att}
    params = CacheAwareParams.for_encoder(tiny.cfg.encoder, **kw)
    rng = np.random.default_rng(7)
    lengths = [16000 * 3, 16000 * 2 + 777, 9000, 400, 16000 * 3 + 3333, 20000, 0, 161, 5555]
    audios = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in lengths]
    offline = [_offline_tokens(tiny, a, params) if a.size else [] for a in audios]
    alone = [_tuples(stream_tokens(tiny, [a], "cache_aware", piece_secs=0.1, **kw)[0]) for a in audios]
    assert alone == offline and sum(map(len, offline)) > 0
    mode = BatchedCacheAwareMode(tiny, capacity=2, **kw)  # the pool grows past 2 streams
    got = _through_scheduler(tiny, mode, audios, rng)
    assert got == offline
    assert mode.pool.in_use == 0  # finished streams gave their slots back


@pytest.mark.parametrize("kv_cache", ["layer_input", "projected", "ring"])
def test_inplace_engine_caches_equal_offline(tiny, kv_cache):
    """The torch-cuda engine (CPU: same code, eager) with caches updated in place in buffers shared by a bucket's
    chunk shapes, gathered into straight from the pool: batches that mix first, later and last chunks (the first
    group's next caches must be copied out before the second group gathers into the same buffers) still give
    every stream the offline forward's tokens."""
    from trt_asr.engines.torch_cuda import TorchCudaEngine

    params = CacheAwareParams.for_encoder(tiny.cfg.encoder)
    rng = np.random.default_rng(11)
    lengths = [16000 * 3, 16000 * 2 + 777, 9000, 400, 16000 * 3 + 3333, 20000, 161, 5555]
    audios = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in lengths]
    offline = [_offline_tokens(tiny, a, params) for a in audios]
    eng = TorchCudaEngine(tiny, "stream", "fp32", "cpu", params=params, batch_buckets=(1, 2, 4), kv_cache=kv_cache,
                          inplace_caches=True)
    mode = BatchedCacheAwareMode(tiny, params=params, engine=eng, capacity=2)
    got = _through_scheduler(tiny, mode, audios, rng, max_batch=4, open_every=1)
    assert got == offline and sum(map(len, offline)) > 0
    assert len(eng._shared_caches) >= 2 and len(eng._graphs) > len(eng._shared_caches)  # shapes share buffers


def test_demo_model_real_speech_equals_alone_and_offline(demo):
    """The shipped cache-aware demo model on real speech, at its default context and at [70, 1] (80 ms chunks)."""
    audios = _speech(4)
    for att in (None, (70, 1)):
        kw = {} if att is None else {"att_context_size": att}
        params = CacheAwareParams.for_encoder(demo.cfg.encoder, **kw)
        offline = [_offline_tokens(demo, a, params) for a in audios]
        alone = [_tuples(stream_tokens(demo, [a], "cache_aware", piece_secs=0.25, **kw)[0]) for a in audios]
        assert alone == offline and all(offline), att
        got = _through_scheduler(demo, BatchedCacheAwareMode(demo, **kw), audios, np.random.default_rng(3),
                                 max_batch=4)
        assert got == offline, att
        text = demo.tokenizer.decode([t[0] for t in got[0]])
        assert len(text.split()) >= 3, text


def test_decode_block_does_not_change_tokens(tiny):
    """A decode block too short for the chunk takes the second (bounded) pass: same tokens."""
    rng = np.random.default_rng(11)
    audios = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (20000, 13000, 7000)]
    want = [_tuples(t) for t in stream_tokens(tiny, audios, "cache_aware")]
    for block in (1, 3, 1000):
        got = [_tuples(t) for t in stream_tokens(tiny, audios, BatchedCacheAwareMode(tiny, decode_block=block))]
        assert got == want, block


class _TracedMode(BatchedCacheAwareMode):
    """Records every stream's whole device state (caches, pre-encode mel, decoder state) after each of its steps."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.traces: dict[int, tuple] = {}
        self.step_sizes: list[int] = []
        self.group_sizes: list[list] = []

    def step_end(self, handle):  # the scheduler runs step_begin / step_end (the mode's step is the two)
        self.step_sizes.append(len(handle[0]))
        self.group_sizes += [g.streams for g in handle[1]]
        out = super().step_end(handle)
        for s in handle[0]:
            row = torch.cat([t[s.slot].reshape(-1).double() for t in self.pool.state.values()])
            self.traces.setdefault(id(s), (s, []))[1].append(row.clone())
        return out

    def take_by_length(self) -> dict[int, list]:
        by_len = {s.received: rows for s, rows in self.traces.values()}
        self.traces = {}
        return by_len


@pytest.mark.parametrize("dtype,bucket,max_batch", [("fp32", 4, 3), ("bf16", 4, 3), ("fp32", 2, 5)])
def test_fixed_batch_shape_is_bitwise_batch_invariant(dtype, bucket, max_batch):
    """One batch bucket (``buckets=(S,)``, ``bench load --fixed-batch S``): every engine call, front-end call and
    decode loop has one shape, so a stream's state after every step is BITWISE the same whether it ran alone or
    shared steps with other streams at other chunk indices -- also when a step holds more streams than S and runs
    as sub-batches of S (bucket 2, steps of up to 5). (With buckets (1, 2, 4) fp32 on this CPU differs by ~1e-6:
    GEMM kernels differ by row count; that is what breaks batched == alone at reduced precision.)"""
    model = load_model("random:tiny-cache-aware", dtype=dtype)
    model.cfg.preprocessor.normalize = None
    rng = np.random.default_rng(3)
    lengths = [16000 * 3, 16000 * 2 + 777, 9000, 16000 * 3 + 3333, 20000, 5555]
    audios = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in lengths]
    mode = _TracedMode(model, capacity=8, buckets=(bucket,))
    for a in audios:
        stream_tokens(model, [a], mode, piece_secs=0.1)
    alone = mode.take_by_length()
    _through_scheduler(model, mode, audios, rng, max_batch=max_batch, open_every=1)
    batched = mode.take_by_length()
    if max_batch > bucket:
        assert max(len(g) for g in mode.group_sizes) == bucket and max(mode.step_sizes) > bucket
    assert sorted(alone) == sorted(batched) == sorted(lengths)
    for n in lengths:
        assert len(alone[n]) == len(batched[n]) > 1, n
        for k, (x, y) in enumerate(zip(alone[n], batched[n])):
            assert torch.equal(x, y), (n, k, float((x - y).abs().max()))


# ----------------------------------------------------------------------------------------------- features
class _Recording:
    """An engine that records each step's audio_signal / length (one stream per step here)."""

    def __init__(self, model):
        self.inner = TorchEncoderEngine(model, mode="stream")
        self.name, self.mode, self.precision, self.device = "rec", "stream", "fp32", self.inner.device
        self.steps = []

    def step(self, inputs):
        self.steps.append((inputs["audio_signal"][0].float().clone(), int(inputs["length"][0])))
        return self.inner.step(inputs)


@pytest.mark.parametrize("n", [0, 100, 400, 16000 + 37, 16000 * 2 + 5])
def test_engine_inputs_equal_streaming_front_end(tiny, n):
    """The batched mel + pre-encode cache the engine sees == CacheAwareMode's chunks from StreamingFrontEnd, chunk
    for chunk (first chunk, later chunks, the zero-padded last chunk), max abs diff < 1e-4, same lengths."""
    rng = np.random.default_rng(n)
    a = (rng.standard_normal(n) * 0.3).astype(np.float32)
    cuts = _pieces(rng, n)
    runs = []
    for cls in (CacheAwareMode, BatchedCacheAwareMode):
        eng = _Recording(tiny)
        rec = Recognizer(tiny, cls(tiny, engine=eng))
        s = rec.open()
        for lo, hi in cuts:
            s.feed(a[lo:hi])
        s.finish()
        runs.append(eng.steps)
    ref, got = runs
    assert len(ref) == len(got) >= 1
    for (x_ref, len_ref), (x_got, len_got) in zip(ref, got):
        assert x_ref.shape == x_got.shape and len_ref == len_got
        assert float((x_ref - x_got).abs().max()) < 1e-4


def test_batched_log_mel_equals_streaming_front_end(tiny):
    """BatchedLogMel on rows cut at arbitrary frames (incl. frame 0 and the end of the stream) == the frames
    StreamingFrontEnd emits for the whole stream."""
    fe = tiny.preprocessor.featurizer
    lm = BatchedLogMel(fe)
    hop, half = fe.hop, fe.n_fft // 2
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(16000 + 123) * 0.2).astype(np.float32)
    sfe = StreamingFrontEnd(fe)
    want = torch.cat([sfe.push(torch.from_numpy(x[:7000])), sfe.push(torch.from_numpy(x[7000:])), sfe.finish()], 1)
    total = want.shape[1]
    assert total == x.size // hop
    n = 9
    starts = [0, 1, 17, total - n, total - 3]  # the last rows run past the end (frames >= total are not compared)
    rows = np.zeros((len(starts), lm.samples(n)), np.float32)
    valid = []
    for r, j0 in enumerate(starts):
        a0 = j0 * hop - half - 1
        lo, hi = max(a0, 0), min(a0 + rows.shape[1], x.size)
        rows[r, lo - a0:hi - a0] = x[lo:hi]
        valid.append(x.size - a0 - 1)
    mel = lm(torch.from_numpy(rows), torch.tensor(valid))
    for r, j0 in enumerate(starts):
        k = min(n, total - j0)
        assert float((mel[r, :, :k] - want[:, j0:j0 + k]).abs().max()) < 1e-4, j0


# ----------------------------------------------------------------------------------------------- slots
def test_slot_reuse_does_not_leak_state(tiny):
    """A stream that gets the slot of a released one (mid-stream close and a finished one) decodes exactly as a
    fresh stream: caches, pre-encode frames and decoder state are reset on acquire."""
    rng = np.random.default_rng(4)
    a, b = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (24000, 17000)]
    want = _tuples(stream_tokens(tiny, [b], "cache_aware")[0])
    mode = BatchedCacheAwareMode(tiny, capacity=1)
    rec = Recognizer(tiny, mode)
    s1 = rec.open()
    s1.feed(a[:12000])  # mid-stream: its slot holds non-trivial caches and decoder state
    slot = s1.state.slot
    mode.release(s1.state)
    s1.close()
    s2 = rec.open()
    assert s2.state.slot == slot and mode.pool.capacity == 1
    s2.feed(b)
    s2.finish()
    assert _tuples(s2.tokens) == want
    s3 = rec.open()  # and after a finished stream
    assert s3.state.slot == slot
    s3.feed(b)
    s3.finish()
    assert _tuples(s3.tokens) == want


def test_reserve_sizes_the_pool_up_front_and_keeps_open_streams(tiny):
    """``reserve(n)`` (a server's warm-up: slots for its share of the streams): the pool then holds n streams without
    growing, and a stream that was already mid-way when it was reserved decodes as alone (its state was copied)."""
    rng = np.random.default_rng(8)
    audios = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (24000, 17000, 9000, 20000, 12345)]
    want = [_tuples(t) for t in stream_tokens(tiny, audios, "cache_aware")]
    mode = BatchedCacheAwareMode(tiny, capacity=1)
    rec = Recognizer(tiny, mode)
    first = rec.open()
    first.feed(audios[0][:12000])  # mid-stream state in slot 0
    mode.reserve(5)
    assert mode.pool.capacity == 5
    rest = [rec.open() for _ in audios[1:]]
    assert mode.pool.capacity == 5 and mode.pool.in_use == 5  # no growth while they open
    first.feed(audios[0][12000:])
    for s, a in zip(rest, audios[1:]):
        s.feed(a, step=False)
    rec.run()
    for s in [first, *rest]:
        s.finish(step=False)
    rec.run()
    assert [_tuples(s.tokens) for s in [first, *rest]] == want
    mode.reserve(3)  # never shrinks
    assert mode.pool.capacity == 5


def test_refuses_normalised_features():
    m = load_model("random:tiny-cache-aware")
    m.cfg.preprocessor.normalize = "per_feature"
    with pytest.raises(ValueError, match="unnormalised"):
        BatchedCacheAwareMode(m)


# ----------------------------------------------------------------------------------------------- wiring
@pytest.mark.parametrize("kv_cache", ["layer_input", "projected", "ring"])
def test_load_tool_batched_state_with_torch_cuda_engine_equals_reference(kv_cache):
    """`bench load --mode cache-aware --state batched --engine torch-cuda [--kv-cache projected]` (CPU here: the
    same bucketed code, eager) gives every stream the transcript CacheAwareMode with the fp32 reference engine
    (NeMo's layer-input cache) gives it."""
    import argparse

    from trt_asr.cli import bench

    p = argparse.ArgumentParser()
    bench.register(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["bench", "load", "--streams", "3", "--duration", "2", "--model", "random:tiny-cache-aware",
                         "--in-process", "--engine", "torch-cuda", "--drain-timeout", "20", "--mode", "cache-aware",
                         "--chunk-ms", "160", "--left-frames", "16", "--state", "batched", "--kv-cache", kv_cache])
    model = load_model("random:tiny-cache-aware")
    mode, params, chunk_s = bench.mode_params(args)
    bench._streamable_features(model, mode)
    assert bench.cache_aware_state(args, mode) == "batched"
    want = bench.reference_texts(model, mode, params, bench.stream_audios(args, 3))
    engine_params = with_streaming_engine(model, mode, params, "torch-cuda", args.kv_cache)
    assert engine_params["engine"].kv_cache == kv_cache and engine_params["engine"].inplace_caches
    got = bench.run_in_process(model, args, 3, mode, engine_params, chunk_s)
    assert not got["errors"] and got["lost_audio_seconds"] == 0
    assert got["texts"] == want and any(want)


def test_warmup_leaves_no_streams(tiny):
    mode = BatchedCacheAwareMode(tiny, capacity=4)
    mode.warmup(4, seconds=0.3)
    assert mode.pool.in_use == 0 and {k[0] for k in mode._loops} == {1, 2, 4}


def test_service_warmup_runs_every_bucket_then_serves_exactly(tiny):
    """CaptionService.warmup(streams=K) (what `serve` does on CUDA) steps every batch bucket up to K once, leaves
    no stream or slot behind, and a stream served afterwards gets the offline forward's tokens."""
    from trt_asr.captions.service import CaptionService

    svc = CaptionService(tiny, "cache-aware")
    try:
        mode = svc._shared.recognizer.mode
        svc.warmup(seconds=0.5, streams=4)
        assert {k[0] for k in mode._loops} >= {1, 2, 4} and mode.pool.in_use == 0
        params = mode.params
        audio = (np.random.default_rng(2).standard_normal(24000) * 0.1).astype(np.float32)
        rec = svc.recognizer()
        for i in range(0, audio.size, 4000):
            rec.feed(audio[i:i + 4000])
        hyp = rec.finish()
        want = [t[0] for t in _offline_tokens(tiny, audio, params)]
        assert want and [t.id for t in hyp.tokens] == want
    finally:
        svc._shared.stop(drain=False)


def test_caption_pool_uses_batched_mode_when_features_are_unnormalised(tiny):
    from trt_asr.streaming.cache_aware import CacheAwareMode as Plain
    from trt_asr.streaming.scheduler import CaptionSchedulerPool

    pool = CaptionSchedulerPool(tiny, "cache-aware")
    try:
        assert isinstance(pool.recognizer.mode, BatchedCacheAwareMode)
    finally:
        pool.stop(drain=False)
    pool = CaptionSchedulerPool(tiny, "cache-aware", state="per-stream")
    try:
        assert isinstance(pool.recognizer.mode, Plain)
    finally:
        pool.stop(drain=False)


def test_engine_cache_io_variant(tiny):
    """An engine with ``cache_io()`` (the projected-K/V cache variant) gets its own caches pooled: same tokens."""
    params = CacheAwareParams.for_encoder(tiny.cfg.encoder)
    try:
        eng = TorchEncoderEngine(tiny, "stream", params, kv_cache="projected")
    except TypeError:
        pytest.skip("this checkout's TorchEncoderEngine has no kv_cache variants")
    rng = np.random.default_rng(5)
    audios = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (16000, 23456, 7000)]
    want = [_tuples(t) for t in stream_tokens(tiny, audios, "cache_aware")]
    mode = BatchedCacheAwareMode(tiny, params=params, engine=eng)
    assert [name for name, *_ in mode.cache_io][:2] == ["cache_last_channel_k", "cache_last_channel_v"]
    assert [_tuples(t) for t in stream_tokens(tiny, audios, mode, piece_secs=0.3)] == want


def test_load_tool_worker_processes_and_fixed_batch(tmp_path):
    """`bench load --in-process --processes 2 --fixed-batch 4`: K=5 streams split 3 + 2 over two worker processes
    started together; the merged summary counts every worker's events and words, and with one batch shape each
    worker's transcripts equal its reference pass's (checked by the workers, summed here)."""
    import json

    from trt_asr.cli import main

    out = tmp_path / "s.json"
    main(["bench", "load", "--streams", "5", "--duration", "2", "--model", "random:tiny-cache-aware", "--in-process",
          "--mode", "cache-aware", "--chunk-ms", "160", "--left-frames", "16", "--processes", "2", "--fixed-batch", "4",
          "--latency-budget-ms", "5000", "--drain-timeout", "30", "--summary-json", str(out)])
    d = json.loads(out.read_text())
    run = d["runs"][0]
    assert d["processes"] == 2 and [p["streams"] for p in run["processes"]] == [3, 2]
    assert run["event_latency_ms"]["n"] == sum(p["scheduler"]["stepped_streams"] for p in run["processes"]) > 5
    assert max(p["scheduler"]["max_batch"] for p in run["processes"]) <= 4
    assert run["transcripts_checked"] and run["reference_words"] > 0
    assert run["duplicated_words"] == run["lost_words"] == run["n_errors"] == 0 and run["lost_audio_seconds"] == 0
    assert d["streams_sustained"] == 5 and d["mode_params"]["buckets"] == [4]


def test_load_tool_compile_option_reaches_the_engine_and_sends_are_never_early(tiny):
    """`bench load --compile MODE` builds the torch-cuda engine with that torch.compile mode (buffered and
    cache-aware); `--send-tick-ms` rounds each frame's send time up to the tick (never before its audio exists,
    at most one tick late)."""
    import argparse

    from trt_asr.cli import bench

    p = argparse.ArgumentParser()
    bench.register(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["bench", "load", "--model", "random:tiny", "--compile", "default", "--send-tick-ms", "20"])
    assert args.compile_mode == "default" and args.send_tick_ms == 20
    buffered = with_streaming_engine(load_model("random:tiny"), "buffered", {}, "torch-cuda", compile_mode="default")
    assert buffered["engine"].compile_mode == "default"
    ca = with_streaming_engine(tiny, "cache_aware", {}, "torch-cuda", compile_mode="max-autotune-no-cudagraphs")
    assert ca["engine"].compile_mode == "max-autotune-no-cudagraphs"
    rng = np.random.default_rng(0)
    for t in rng.uniform(0, 30, 1000):
        sent = bench._tick_up(t, 0.02)
        assert t <= sent < t + 0.02 + 1e-9
    assert bench._tick_up(1.234, 0.0) == 1.234
    # bad combinations are refused with a message, before any model is loaded
    for bad in (["--compile", "default"], ["--engine", "torch-cuda", "--send-tick-ms", "-1"]):
        a = p.parse_args(["bench", "load", "--model", "random:tiny", "--streams", "2", *bad])
        assert bench.run_load(a) == 2
