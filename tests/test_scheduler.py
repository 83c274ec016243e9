"""The batching scheduler: batched == alone (token for token, fp32, both modes), fairness, backpressure,
admission control, fault isolation, idle timeout, unread events, drain, and the slot pool."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trt_asr.streaming.scheduler import (AdmissionError, ErrorEvent, SchedulerConfig, SlotPool, StreamClosed,
                                         StreamScheduler, bucket_for)
from trt_asr.streaming.session import Recognizer, StepResult, Token


# ----------------------------------------------------------------------------------------------- a cheap fake mode
class _FakeStream:
    def __init__(self):
        self.pcm = np.zeros(0, np.float32)
        self.consumed = 0
        self.ended = False
        self.finished = False
        self.chunks = 0
        self.poison = False


class CountingMode:
    """One token per chunk of ``chunk`` samples; token id = the chunk's sample sum sign + chunk index (so lost or
    duplicated audio changes the tokens). Poisoned streams make any batch they are in raise."""

    name = "fake"
    sample_rate = 16000
    frame_seconds = 0.08

    def __init__(self, chunk: int = 1600):
        self.chunk = chunk
        self.calls: list[int] = []

    def new_stream(self):
        return _FakeStream()

    def push(self, s, pcm):
        s.pcm = np.concatenate([s.pcm, pcm.numpy()])

    def end(self, s):
        s.ended = True

    def ready(self, s):
        return not s.finished and (s.ended or s.pcm.size - s.consumed >= self.chunk)

    def step(self, streams):
        self.calls.append(len(streams))
        if any(s.poison for s in streams):
            # mutate first, then fail: the scheduler must restore the state before retrying
            for s in streams:
                s.consumed += 1
            raise RuntimeError("poisoned stream in batch")
        out = []
        for s in streams:
            piece = s.pcm[s.consumed: s.consumed + self.chunk]
            s.consumed += piece.size
            s.chunks += 1
            s.finished = s.ended and s.consumed >= s.pcm.size
            toks = [Token(int(round(float(piece.sum()))), s.chunks)] if piece.size else []
            out.append(StepResult(committed=toks, tentative=[], finished=s.finished))
        return out


class SplitCountingMode(CountingMode):
    """The same, with the step split as BatchedCacheAwareMode's (``step_begin`` launches, ``step_end`` waits and
    commits): the scheduler then runs the next step's intake while this one's device work runs."""

    def step_begin(self, streams):
        return list(streams)

    def step_end(self, handle):
        return self.step(handle)


_SPLIT = {"on": False}


@pytest.fixture(autouse=True, params=["step", "step_begin/end"])
def _mode_kind(request):
    """Every scheduler test runs with a plain mode and with a split one (``step_begin``/``step_end``)."""
    _SPLIT["on"] = request.param != "step"
    yield
    _SPLIT["on"] = False


FAKE_MODEL = SimpleNamespace(tokenizer=None, cfg=SimpleNamespace(frame_seconds=0.08,
                                                                  decoding=SimpleNamespace(model_type="tdt")))


def fake_scheduler(**cfg):
    mode = SplitCountingMode() if _SPLIT["on"] else CountingMode()
    return StreamScheduler(Recognizer(FAKE_MODEL, mode), SchedulerConfig(**cfg)), mode


def drain_events(st, timeout=5.0):
    return list(st.events(timeout=timeout))


def tokens_of(events):
    return [t.id for ev in events if not isinstance(ev, ErrorEvent) for t in ev.committed]


# ----------------------------------------------------------------------------------------------- batched == alone
def _stream_alone(model, mode, params, audio, pieces):
    rec = Recognizer(model, mode, **params)
    s = rec.open()
    for a, b in pieces:
        s.feed(audio[a:b])
    s.finish()
    return [(t.id, t.frame, t.duration) for t in s.tokens]


@pytest.mark.parametrize("spec,mode,params", [
    ("random:tiny", "buffered", dict(left_secs=0.64, chunk_secs=0.32, right_secs=0.16)),
    ("random:tiny-cache-aware", "cache_aware", {}),
])
def test_batched_equals_alone(spec, mode, params):
    from trt_asr.checkpoint import load_model

    torch.manual_seed(0)
    model = load_model(spec)
    if mode == "cache_aware":
        # cache-aware models use unnormalised features (NeMo); with per-feature normalisation the mode normalises
        # over the audio received so far, which depends on arrival timing, not on batching
        model.cfg.preprocessor.normalize = None
    rng = np.random.default_rng(1)
    lengths = [16000 * 3, 16000 * 2 + 777, 9000, 16000 * 3 + 3333, 20000, 500]
    audios = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in lengths]
    cuts = []
    for a in audios:  # each stream fed in its own random piece sizes (10 ms .. 0.7 s)
        pos, pieces = 0, []
        while pos < a.size:
            step = int(rng.integers(160, 11200))
            pieces.append((pos, min(pos + step, a.size)))
            pos += step
        cuts.append(pieces)
    alone = [_stream_alone(model, mode, params, a, p) for a, p in zip(audios, cuts)]
    assert sum(len(t) for t in alone) > 0

    sched = StreamScheduler(Recognizer(model, mode, **params), SchedulerConfig(max_streams=8, max_batch=4))
    streams = [sched.open() for _ in audios]
    got = {st.id: [] for st in streams}
    turn = 0
    while any(cuts):  # interleave the clients' pieces, stepping now and then (mixed batches, mixed positions)
        for st, a, p in zip(streams, audios, cuts):
            if p:
                lo, hi = p.pop(0)
                st.push(a[lo:hi])
                if not p:
                    st.end()
        turn += 1
        if turn % 2:
            sched.step()
    sched.run_until_idle()
    for st in streams:
        evs = st.poll()
        assert evs and evs[-1].final and not any(isinstance(e, ErrorEvent) for e in evs)
        got[st.id] = [(t.id, t.frame, t.duration) for ev in evs for t in ev.committed]
    assert [got[st.id] for st in streams] == alone
    assert max(sched.stats.batch_sizes) > 1  # it did batch
    assert sched.open_streams == 0 and sched.capacity_left == 8


# ----------------------------------------------------------------------------------------------- fairness
def test_fairness_oldest_ready_first():
    sched, mode = fake_scheduler(max_streams=16, max_batch=3, max_buffer_seconds=100)
    streams = [sched.open() for _ in range(10)]
    for st in streams:
        st.push(np.ones(1600 * 20, np.float32))  # every stream has 20 chunks ready
    waited = {st.id: 0 for st in streams}
    last_step = {st.id: 0 for st in streams}
    for i in range(1, 31):
        before = {st.id: st.steps for st in streams}
        assert sched.step() == 3
        for st in streams:
            if st.steps > before[st.id]:
                waited[st.id] = max(waited[st.id], i - last_step[st.id])
                last_step[st.id] = i
    # 10 ready streams, 3 per step: nobody waits more than ceil(10 / 3) = 4 steps
    assert max(waited.values()) <= 4
    assert min(st.steps for st in streams) >= 8
    assert all(n <= 3 for n in mode.calls)


def test_a_steps_events_are_delivered_when_it_returns():
    """Each step's events reach their streams before ``step()`` returns (not during the next step: they would wait
    for its intake and launch), and each delivery is followed by ``on_step`` (an engine host sends from there)."""
    sched, mode = fake_scheduler(max_streams=8, max_batch=2, max_buffer_seconds=100)
    seen = []
    streams = [sched.open() for _ in range(3)]
    sched.on_step = lambda info: seen.append((info["batch"], [len(st._events) for st in streams]))
    for st in streams:
        st.push(np.ones(1600 * 2, np.float32))  # 2 chunks each
    got = {st.id: [] for st in streams}
    for _ in range(3):
        n = sched.step()
        stepped = [st for st in streams if st.steps > len(got[st.id])]
        assert n == 2 and len(stepped) == 2
        for st in stepped:
            events = st.poll()
            assert len(events) == 1, (st.id, events)  # this step's event, already here
            got[st.id] += events
    assert [b for b, _ in seen] == [2, 2, 2]
    assert all(sum(pending) >= 2 for _, pending in seen)  # on_step came after that step's delivery
    assert all(len(v) == 2 for v in got.values())


def test_stats_timeline_accounts_for_every_step_and_event():
    sched, mode = fake_scheduler(max_streams=16, max_batch=3, max_buffer_seconds=100)
    streams = [sched.open() for _ in range(10)]
    for st in streams:
        st.push(np.ones(1600 * 4, np.float32))  # 4 chunks each: 40 stream-steps, 3 per step
    queued_at_start = streams[0].queued_samples / 16000
    steps = 0
    while sched.step():
        steps += 1
    summary = sched.stats.summary()
    rows = summary["timeline"]
    assert rows and sum(r["steps"] for r in rows) == steps == summary["steps"]
    assert sum(r["stepped"] for r in rows) == sum(mode.calls) == 40
    assert sum(r["events"] for r in rows) == 40  # one event per stream-step
    assert all(r["ready"] >= r["batch"] for r in rows)  # the first step saw all 10 ready, 3 were taken
    assert rows[0]["ready"] > rows[0]["batch"]
    assert max(r["queued_ms"] for r in rows) <= 1000 * queued_at_start
    assert all(r["latency_max_ms"] >= (r["latency_ms"] or 0) for r in rows)
    assert sum(r["arrived_s"] for r in rows) == pytest.approx(10 * 1600 * 4 / 16000)  # all pushed before step 1


def test_flooding_client_does_not_starve_real_time_ones():
    sched, _ = fake_scheduler(max_streams=8, max_batch=2, max_buffer_seconds=100)
    flood = sched.open()
    flood.push(np.ones(1600 * 100, np.float32))  # 100 chunks at once, far ahead of real time
    live = [sched.open() for _ in range(3)]
    for _ in range(20):
        for st in live:  # one chunk each per "real-time tick"
            st.push(np.ones(1600, np.float32))
        before = [st.steps for st in live]
        for _ in range(2):  # two steps of 2 per tick: 4 slots for 4 ready streams
            sched.step()
        assert [st.steps for st in live] == [b + 1 for b in before]  # every live chunk served in its tick
    assert flood.steps >= 15  # and the flooder still progresses


# ----------------------------------------------------------------------------------------------- backpressure
def test_backpressure_bounds_inbox_and_loses_nothing():
    sched, mode = fake_scheduler(max_streams=4, max_batch=4, max_buffer_seconds=0.5, piece_seconds=0.05)
    st = sched.open()
    rng = np.random.default_rng(0)
    sent = []
    refused = 0
    for _ in range(200):  # a client far faster than real time
        x = rng.integers(-3, 4, 800).astype(np.float32)
        while not st.push(x, block=False):
            refused += 1
            assert st.buffered_seconds <= 0.5 + 0.05
            sched.step()  # the engine catches up; the client retries (the server stopped reading meanwhile)
        sent.append(x)
    st.end()
    sched.run_until_idle()
    audio = np.concatenate(sent)
    expect = [int(round(float(audio[i:i + 1600].sum()))) for i in range(0, audio.size, 1600)]
    assert refused > 0
    assert tokens_of(st.poll()) == expect  # nothing lost, nothing duplicated


def test_blocking_push_waits_for_worker():
    sched, _ = fake_scheduler(max_streams=2, max_batch=2, max_buffer_seconds=0.2, piece_seconds=0.05)
    sched.start()
    try:
        st = sched.open()
        x = np.ones(1600, np.float32)
        t0 = time.monotonic()
        for _ in range(100):  # 10 s of audio through a 0.2 s buffer: push blocks until the worker drains it
            assert st.push(x, timeout=5)
        st.end()
        evs = drain_events(st)
        assert evs[-1].final and len(tokens_of(evs)) == 100
        assert time.monotonic() - t0 < 10
    finally:
        sched.stop()


def test_async_push_and_events():
    sched, _ = fake_scheduler(max_streams=2, max_batch=2, max_buffer_seconds=0.2, piece_seconds=0.05)
    sched.start()

    async def client():
        st = sched.open()
        for _ in range(50):
            await st.apush(np.full(1600, 0.5, np.float32))
        st.end()
        return [ev async for ev in st.aevents()]

    try:
        evs = asyncio.run(asyncio.wait_for(client(), 10))
    finally:
        sched.stop()
    assert evs[-1].final and tokens_of(evs) == [800] * 50


# ----------------------------------------------------------------------------------------------- admission
def test_admission_control():
    sched, _ = fake_scheduler(max_streams=2)
    a, b = sched.open(), sched.open()
    with pytest.raises(AdmissionError) as e:
        sched.open()
    assert e.value.code == "capacity" and "capacity" in str(e.value)
    a.push(np.ones(100, np.float32))
    a.end()
    sched.run_until_idle()
    assert a.poll()[-1].final
    c = sched.open()  # a's slot was freed
    assert c.slot == a.slot
    b.close()
    sched.stop(drain=True, timeout=2)
    with pytest.raises(AdmissionError) as e:
        sched.open()
    assert e.value.code == "shutting_down"


def test_bad_audio_rejected_at_push():
    sched, _ = fake_scheduler()
    st = sched.open()
    with pytest.raises(ValueError, match="NaN"):
        st.push(np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="mono"):
        st.push(np.zeros((2, 2), np.float32))
    st.end()
    with pytest.raises(StreamClosed):
        st.push(np.zeros(4, np.float32))


# ----------------------------------------------------------------------------------------------- isolation
def test_engine_error_isolated_to_culprit():
    sched, mode = fake_scheduler(max_streams=8, max_batch=8)
    streams = [sched.open() for _ in range(5)]
    rng = np.random.default_rng(3)
    audio = [rng.integers(-2, 3, 1600 * 4).astype(np.float32) for _ in streams]
    for st, a in zip(streams, audio):
        st.push(a)
    sched.step()  # intake creates the sessions
    streams[2].session.state.poison = True
    for st in streams:
        st.end()
    sched.run_until_idle()
    for i, (st, a) in enumerate(zip(streams, audio)):
        evs = st.poll()
        if i == 2:
            assert isinstance(evs[-1], ErrorEvent) and evs[-1].code == "engine_error"
            assert "poisoned" in evs[-1].message
        else:
            assert evs[-1].final
            assert tokens_of(evs) == [int(round(float(a[j:j + 1600].sum()))) for j in range(0, a.size, 1600)]
    assert sched.stats.errors.get("engine_error") == 1
    assert sched.open_streams == 0


# ----------------------------------------------------------------------------------------------- timeouts, limits
def test_idle_timeout_finalizes_then_errors():
    sched, _ = fake_scheduler(idle_timeout=0.05)
    st = sched.open()
    st.push(np.ones(1000, np.float32))
    sched.step()
    time.sleep(0.1)
    sched.run_until_idle()
    evs = st.poll()
    assert evs[-2].final and tokens_of(evs) == [1000]
    assert isinstance(evs[-1], ErrorEvent) and evs[-1].code == "idle_timeout"
    assert sched.open_streams == 0


def test_stream_duration_limit():
    sched, _ = fake_scheduler(max_stream_seconds=0.5, max_buffer_seconds=10)
    st = sched.open()
    st.push(np.ones(16000, np.float32))
    sched.run_until_idle()
    evs = st.poll()
    assert isinstance(evs[-1], ErrorEvent) and evs[-1].code == "stream_too_long"
    assert any(getattr(e, "final", False) for e in evs)


def test_client_not_reading_is_closed():
    sched, _ = fake_scheduler(max_pending_events=5, max_buffer_seconds=100)
    st = sched.open()
    other = sched.open()
    st.push(np.ones(1600 * 20, np.float32))
    other.push(np.ones(1600 * 2, np.float32))
    other.end()
    sched.run_until_idle()
    evs = st.poll()
    assert len(evs) <= 6 and isinstance(evs[-1], ErrorEvent) and evs[-1].code == "client_not_reading"
    assert other.poll()[-1].final
    with pytest.raises(StreamClosed):
        st.push(np.ones(10, np.float32))


def test_disconnect_mid_utterance_frees_slot():
    sched, _ = fake_scheduler(max_streams=1)
    st = sched.open()
    st.push(np.ones(5000, np.float32))
    sched.step()
    st.close()  # client went away
    sched.run_until_idle()
    assert sched.open_streams == 0
    assert sched.open() is not None


# ----------------------------------------------------------------------------------------------- drain
def test_graceful_drain_gives_finals():
    sched, _ = fake_scheduler(max_streams=8, max_batch=4)
    sched.start()
    streams = [sched.open() for _ in range(6)]
    for st in streams:
        st.push(np.ones(4000, np.float32))  # mid-utterance: not ended by the client
    results = {}

    def reader(st):
        results[st.id] = drain_events(st, timeout=5)

    threads = [threading.Thread(target=reader, args=(st,)) for st in streams]
    for t in threads:
        t.start()
    sched.stop(drain=True, timeout=5)
    for t in threads:
        t.join(5)
    for st in streams:
        evs = results[st.id]
        assert evs and evs[-1].final and sum(tokens_of(evs)) == 4000


# ----------------------------------------------------------------------------------------------- slot pool
def test_slot_pool_gather_scatter():
    pool = SlotPool(6, {"c": ((2, 3), torch.float32), "n": ((), torch.long)}, buckets=(1, 2, 4, 8))
    slots = [pool.acquire() for _ in range(5)]
    for s in slots:
        pool.state["c"][s].fill_(s)
        pool.state["n"][s] = 10 * s
    batch = pool.gather([slots[3], slots[1], slots[4]])
    assert batch["c"].shape == (4, 2, 3)  # bucket 4, the 4th row is padding
    assert batch["c"][:3, 0, 0].tolist() == [slots[3], slots[1], slots[4]]
    ptr = batch["c"].data_ptr()
    pool.scatter([slots[3], slots[1], slots[4]], {"c": batch["c"] + 100, "n": batch["n"] + 1})
    assert pool.state["c"][slots[1], 0, 0] == slots[1] + 100 and pool.state["n"][slots[4]] == 10 * slots[4] + 1
    assert pool.state["c"][slots[0], 0, 0] == slots[0]  # untouched
    assert pool.gather([slots[0], slots[2], slots[3]])["c"].data_ptr() == ptr  # no per-step allocation
    pool.release(slots[0])
    assert pool.acquire() == slots[0] and pool.state["c"][slots[0]].abs().sum() == 0
    assert bucket_for(3, (1, 2, 4)) == 4 and bucket_for(9, (1, 2, 4)) == 9


def test_slot_pool_reset_many_equals_reset():
    """Deferred resets (a flood of new streams: one indexed copy per key) give each slot what ``reset`` gives:
    the ``init`` rows where given, zeros elsewhere; other slots keep their state."""
    init = {"h": torch.arange(6.0).reshape(2, 3)}
    specs = {"h": ((2, 3), torch.float32), "c": ((4,), torch.float16), "n": ((), torch.long)}
    a, b = SlotPool(5, specs, init=init), SlotPool(5, specs, init=init)
    for pool in (a, b):
        for t in pool.state.values():
            t.fill_(7)
    for s in (3, 1, 3):
        a.reset(s)
    b.reset_many([3, 1, 3])
    for k in specs:
        assert torch.equal(a.state[k], b.state[k]), k
    assert torch.equal(b.state["h"][1], init["h"]) and b.state["c"][3].abs().sum() == 0
    assert (b.state["n"][[0, 2, 4]] == 7).all()


def test_pooled_cache_aware_mode_equals_plain():
    """Cache-aware state in a SlotPool (gathered into bucket buffers, scattered back): same tokens as the plain mode,
    batched through the scheduler; slots are freed when streams finish."""
    from trt_asr.checkpoint import load_model
    from trt_asr.streaming.scheduler import pooled_cache_aware_mode
    from trt_asr.streaming.session import stream_tokens

    model = load_model("random:tiny-cache-aware")
    model.cfg.preprocessor.normalize = None
    rng = np.random.default_rng(5)
    audios = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (16000, 23456, 7000, 30000, 400)]
    plain = [[(t.id, t.frame, t.duration) for t in ts] for ts in stream_tokens(model, audios, "cache_aware")]
    mode = pooled_cache_aware_mode(model, capacity=8, buckets=(1, 2, 4, 8))
    sched = StreamScheduler(Recognizer(model, mode), SchedulerConfig(max_streams=8, max_batch=3))
    streams = [sched.open() for _ in audios]
    for st, a in zip(streams, audios):
        for i in range(0, a.size, 2500):
            st.push(a[i:i + 2500])
        st.end()
    sched.run_until_idle()
    got = [[(t.id, t.frame, t.duration) for ev in st.poll() for t in ev.committed] for st in streams]
    assert got == plain and sum(map(len, plain)) > 0
    assert mode.pool.in_use == 0 and sched.open_streams == 0  # finished streams gave their slots back


def test_caption_pipeline_through_scheduler_equals_shared_recognizer():
    """The caption pipeline fed by the scheduler adapter commits exactly what it commits with SharedRecognizer."""
    from trt_asr.captions.pipeline import PipelineOptions, run_pipeline_sync
    from trt_asr.captions.recognizer import SharedRecognizer, model_decoder
    from trt_asr.captions.dsp import DSPConfig
    from trt_asr.checkpoint import load_model
    from trt_asr.streaming.scheduler import CaptionSchedulerPool

    model = load_model("random:tiny")
    params = dict(left_secs=0.64, chunk_secs=0.32, right_secs=0.32)
    rng = np.random.default_rng(2)
    audio = (rng.standard_normal(16000 * 3) * 0.1).astype(np.float32)
    chunks = [audio[i:i + 1600] for i in range(0, audio.size, 1600)]
    opts = PipelineOptions(dsp=DSPConfig(vad=False))

    def finals(rec):
        events = run_pipeline_sync(rec, chunks, opts, model_decoder(model))
        assert events[-1]["type"] == "end" and not [e for e in events if e["type"] == "error"]
        return " ".join(e["text"] for e in events if e["type"] == "final")

    ref = finals(SharedRecognizer(model, "buffered", **params).open())
    pool = CaptionSchedulerPool(model, "buffered", **params)
    try:
        assert finals(pool.open()) == ref and ref
    finally:
        pool.stop()
