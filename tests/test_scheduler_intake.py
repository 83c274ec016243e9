"""The scheduler's intake does O(1) work per stream and chunk, and stays exact:

* ``samples_to_ready`` (buffered and batched cache-aware modes) is the exact shortfall: after pushing m samples it
  drops by exactly m (down to 0), and ``ready`` holds exactly when it is 0 -- checked push by push over random push
  sizes and steps, so the scheduler may skip a stream until its inbox holds that much;
* a stream fed in small frames is visited about once per chunk, not once per push (and every push without the hook);
* streams that become ready while a step's device work runs are taken in meanwhile and stepped next; the streams of
  the step in flight are never touched by that intake (a mode that asserts it), and every token is still exact.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from trt_asr.checkpoint import load_model
from trt_asr.streaming.batched_cache_aware import BatchedCacheAwareMode
from trt_asr.streaming.buffered import BufferedMode
from trt_asr.streaming.scheduler import ErrorEvent, SchedulerConfig, StreamScheduler
from trt_asr.streaming.session import Recognizer



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():  # scoped: a global switch would leak into other test modules
        yield


@pytest.fixture(scope="module")
def tiny_ca():
    m = load_model("random:tiny-cache-aware")
    m.cfg.preprocessor.normalize = None  # as NeMo's cache-aware models
    return m


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny")


def _alone_tokens(model, audio: np.ndarray) -> list:
    alone = Recognizer(model, BatchedCacheAwareMode(model, capacity=1)).open()
    alone.feed(torch.from_numpy(audio))
    alone.finish()
    return alone.tokens


def _modes(tiny, tiny_ca):
    return {"buffered": lambda: BufferedMode(tiny, left_secs=0.64, chunk_secs=0.32, right_secs=0.16),
            "cache_aware": lambda: BatchedCacheAwareMode(tiny_ca, capacity=2)}


@pytest.mark.parametrize("kind", ["buffered", "cache_aware"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pushes=hs.lists(hs.integers(0, 7000), min_size=1, max_size=25))
def test_samples_to_ready_is_the_exact_shortfall(tiny, tiny_ca, kind, pushes):
    """``pushes``: sample counts; 0 = exactly the shortfall less one (the boundary), then one more."""
    mode = _modes(tiny, tiny_ca)[kind]()
    s = mode.new_stream()
    rng = np.random.default_rng(len(pushes))
    def sizes():  # lazily: a boundary probe needs the shortfall of the moment
        for p in pushes:
            yield from (x for x in ((mode.samples_to_ready(s) - 1, 1) if p == 0 else (p,)) if x > 0)

    for m in sizes():
        need = mode.samples_to_ready(s)
        mode.push(s, torch.from_numpy(rng.standard_normal(m).astype(np.float32) * 0.1))
        left = mode.samples_to_ready(s)
        assert left == max(need - m, 0)
        assert mode.ready(s) == (left == 0)
        while mode.ready(s):  # a step: the shortfall is counted again from the next chunk
            mode.step([s])
        assert mode.samples_to_ready(s) > 0
    mode.end(s)
    assert mode.samples_to_ready(s) == 0


class _CountReady:
    """Counts the scheduler's intake visits (every visit asks ``ready``)."""

    def __init__(self, mode):
        self.mode, self.calls = mode, 0
        self._ready = mode.ready
        mode.ready = self

    def __call__(self, s):
        self.calls += 1
        return self._ready(s)


@pytest.mark.parametrize("hook", [True, False])
def test_small_frames_cost_about_one_visit_per_chunk(tiny_ca, hook):
    mode = BatchedCacheAwareMode(tiny_ca, capacity=2)
    sched = StreamScheduler(Recognizer(tiny_ca, mode), SchedulerConfig(max_streams=2, idle_timeout=None))
    if not hook:
        sched._to_ready = None  # the scheduler without the mode's hook: every push is visited
    st = sched.open()
    sched.step()
    count = _CountReady(mode)
    audio = np.random.default_rng(0).standard_normal(3 * 16000).astype(np.float32) * 0.1
    frames = range(0, audio.size, 320)  # 20 ms frames; a chunk is 8 or more of them
    for a in frames:
        st.push(audio[a:a + 320])
        sched.step()
    steps = sched.stats.steps
    assert steps >= 3000 * 16 // 320 // 8 // 2  # it did step as the audio came in
    if hook:  # two visits per step (when the chunk is in, after the step), each asking ready() 3 or 4 times
        assert count.calls <= 8 * steps + 8 < len(frames)
    else:
        assert count.calls >= len(frames)
    st.end()
    sched.run_until_idle()
    tokens = [(t.id, t.frame, t.duration) for ev in st.poll() if not isinstance(ev, ErrorEvent) for t in ev.committed]
    alone = _alone_tokens(tiny_ca, audio)
    assert st.session.tokens == alone and len(tokens) == len(alone)


class _GuardedMode(BatchedCacheAwareMode):
    """Raises if the scheduler pushes into a stream whose step is in flight; ``during_step`` runs while a step's
    device work would (clients pushing meanwhile)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.in_flight: set[int] = set()
        self.pushed_during_steps = 0
        self.during_step = lambda: None

    def push(self, s, pcm):
        assert id(s) not in self.in_flight, "push into a stream whose step is in flight"
        self.pushed_during_steps += bool(self.in_flight)
        super().push(s, pcm)

    def step_begin(self, streams):
        self.in_flight = {id(s) for s in streams}
        handle = super().step_begin(streams)
        self.during_step()
        return handle

    def step_end(self, handle):
        out = super().step_end(handle)
        self.in_flight = set()
        return out


def test_intake_during_a_step_skips_its_streams_and_stays_exact(tiny_ca):
    rng = np.random.default_rng(1)
    audios = [rng.standard_normal(int(16000 * rng.uniform(1.0, 2.5))).astype(np.float32) * 0.1 for _ in range(6)]
    mode = _GuardedMode(tiny_ca, capacity=6)
    sched = StreamScheduler(Recognizer(tiny_ca, mode), SchedulerConfig(max_streams=6, max_batch=2, idle_timeout=None,
                                                                        piece_seconds=0.05))
    streams = [sched.open() for _ in audios]
    pos = [0] * len(audios)

    def feed():  # every stream sends a piece of its own random size
        for i, (st, a) in enumerate(zip(streams, audios)):
            if pos[i] < a.size:
                n = int(rng.integers(400, 4000))
                st.push(a[pos[i]:pos[i] + n])
                pos[i] += n
                if pos[i] >= a.size:
                    st.end()

    mode.during_step = feed
    while any(p < a.size for p, a in zip(pos, audios)):
        feed()
        sched.step()
    sched.run_until_idle()
    assert mode.pushed_during_steps > 0  # the overlap happened
    assert sched.stats.phase_seconds["intake_ahead"] > 0
    for st, a in zip(streams, audios):
        assert st.samples_in == a.size
        events = st.poll()
        assert not any(isinstance(ev, ErrorEvent) for ev in events) and events[-1].final
        assert st.session.tokens == _alone_tokens(tiny_ca, a)


@settings(max_examples=200, deadline=None)
@given(sizes=hs.lists(hs.integers(1, 9000), min_size=1, max_size=40), piece_ms=hs.sampled_from([20, 100, 250]))
def test_inbox_pieces_are_the_pushed_audio_in_order(sizes, piece_ms):
    """Small frames are coalesced into the inbox's own buffers, big ones split: popping every piece gives back
    exactly the samples pushed, in order, each piece at most the piece size (and the caller's arrays untouched)."""
    from tests.test_scheduler import fake_scheduler

    sched, _ = fake_scheduler(max_streams=1, idle_timeout=None, piece_seconds=piece_ms / 1000,
                              max_buffer_seconds=60.0)
    st = sched.open()
    rng = np.random.default_rng(len(sizes))
    frames = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    copies = [f.copy() for f in frames]
    for f in frames:
        st.push(f)
    pieces = []
    with sched._lock:
        while (p := st._pop_piece()) is not None:
            pieces.append(p.copy())
    assert all(p.size <= sched._piece_samples for p in pieces)
    assert np.array_equal(np.concatenate(pieces), np.concatenate(copies))
    assert all(np.array_equal(f, c) for f, c in zip(frames, copies))


def test_an_inbox_bound_below_one_chunk_does_not_stall_the_stream(tiny_ca):
    """With ``max_buffer_seconds`` under a chunk, a full inbox is still short of what the mode needs: it must be
    taken in anyway (a visit), or pushes would be refused forever. Tokens equal the stream alone."""
    mode = BatchedCacheAwareMode(tiny_ca, capacity=1)
    sched = StreamScheduler(Recognizer(tiny_ca, mode), SchedulerConfig(max_streams=1, idle_timeout=None,
                                                                        max_buffer_seconds=0.05, piece_seconds=0.02))
    st = sched.open()
    audio = np.random.default_rng(4).standard_normal(2 * 16000).astype(np.float32) * 0.1
    assert mode.latency_seconds > 0.05
    pos, rounds = 0, 0
    while pos < audio.size:
        rounds += 1
        assert rounds < 2000, "the stream stalled: its full inbox was never taken in"
        if st.push(audio[pos:pos + 480], block=False):
            pos += 480
        sched.step()
    st.end()
    sched.run_until_idle()
    assert st.done and st.session.tokens == _alone_tokens(tiny_ca, audio)


def test_batch_wait_holds_a_partial_step_but_never_a_full_one(tiny_ca):
    """``batch_wait``: with fewer than ``max_batch`` streams ready a step waits until the oldest ready chunk is that
    old; a full batch goes at once; synchronous driving never waits; every stream stays exact."""
    rng = np.random.default_rng(3)
    audios = [rng.standard_normal(16000).astype(np.float32) * 0.1 for _ in range(3)]
    mode = BatchedCacheAwareMode(tiny_ca, capacity=3)
    sched = StreamScheduler(Recognizer(tiny_ca, mode), SchedulerConfig(max_streams=3, max_batch=3, idle_timeout=None,
                                                                        batch_wait=30.0))
    streams = [sched.open() for _ in audios]
    t0 = time.monotonic()
    for st, a in zip(streams[:2], audios[:2]):
        st.push(a)
    assert sched.step() == 0 and len(sched._ready) == 2  # two ready, held
    assert t0 + 30.0 <= sched._hold_until <= time.monotonic() + 30.0
    streams[2].push(audios[2])
    assert sched.step() == 3  # a full batch does not wait
    assert sched.step() == 3  # all three hold their next chunk already: full again
    sched.run_until_idle()  # every chunk so far stepped (synchronous driving does not hold)
    assert not sched._ready
    streams[0].push(audios[0][:8000])
    assert sched.step() == 0 and len(sched._ready) == 1  # held
    streams[0].end()
    assert sched.step() == 1  # an ended stream is not held: its client waits for the final
    for st in streams[1:]:
        st.end()
    assert sched.run_until_idle() > 0 and not sched._ready
    audios[0] = np.concatenate([audios[0], audios[0][:8000]])
    for st, a in zip(streams, audios):
        assert st.samples_in == a.size and st.session.tokens == _alone_tokens(tiny_ca, a)


def test_the_worker_steps_a_held_batch_when_its_wait_is_over(tiny_ca):
    """The worker thread steps a held batch once its wait is over, with no further push to wake it."""
    mode = BatchedCacheAwareMode(tiny_ca, capacity=2)
    wait = 0.4
    sched = StreamScheduler(Recognizer(tiny_ca, mode), SchedulerConfig(max_streams=2, max_batch=2, idle_timeout=None,
                                                                        batch_wait=wait)).start()
    try:
        st = sched.open()
        audio = np.random.default_rng(4).standard_normal(8000).astype(np.float32) * 0.1
        t0 = time.monotonic()
        st.push(audio)
        events = next(iter(st.events(timeout=20)), None)
        waited = time.monotonic() - t0
        assert events is not None and not isinstance(events, ErrorEvent)
        assert waited >= wait * 0.9, waited  # it was held (the chunk was ready long before)
        st.end()
        list(st.events(timeout=20))
        assert st.session.tokens == _alone_tokens(tiny_ca, audio)
    finally:
        sched.stop(drain=False)
