"""The server's caption path without a thread per stream (ScheduledCaptionPipeline + one CaptionDispatcher) gives
the same captions as the threaded CaptionPipeline over the same scheduler: the same finals (text, words, times) and
the same final transcript, for several streams at once, with the scheduler's bounded inbox full (audio waits in the
pipeline and nothing is lost), and a client that goes away mid-stream does not stop the others."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from trt_asr.captions.pipeline import CaptionPipeline, ScheduledCaptionPipeline
from trt_asr.captions.service import CaptionService
from trt_asr.checkpoint import load_model
from trt_asr.streaming.scheduler import CaptionSchedulerPool, SchedulerConfig


@pytest.fixture(scope="module")
def tiny_ca():
    m = load_model("random:tiny-cache-aware")
    m.cfg.preprocessor.normalize = None
    return m


def _audios(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(int(16000 * s)) * 0.1).astype(np.float32) for s in (3.1, 2.2, 4.05, 1.3)[:n]]


def _finals(events) -> list[tuple]:
    return [(e["text"], e["start"], e["end"], tuple((w["word"], w["start"], w["end"]) for w in e["words"]))
            for e in events if e["type"] == "final"]


def _run(svc: CaptionService, audios, frame: int = 1600, stop_after: dict | None = None) -> list[list[dict]]:
    """All streams at once, each fed from its own thread in `frame`-sample pieces; returns each stream's events."""
    outs: list[list[dict]] = [[] for _ in audios]
    pipes = [svc.pipeline(outs[i].append, 16000, options={"vad": False}).start() for i in range(len(audios))]

    def feed(i):
        a = audios[i]
        for k, j in enumerate(range(0, a.size, frame)):
            if stop_after and stop_after.get(i) == k:
                pipes[i].recognizer.close()  # the client went away: the stream is forgotten
                return
            pipes[i].push(a[j:j + frame])
        pipes[i].close()

    threads = [threading.Thread(target=feed, args=(i,)) for i in range(len(audios))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(pipes):
        if not (stop_after and i in stop_after):
            assert p.join(60), f"stream {i} did not end"
    return outs


@pytest.mark.parametrize("mode,params", [("cache-aware", {}),
                                         ("buffered", {"left_secs": 1.0, "chunk_secs": 0.5, "right_secs": 0.5})])
def test_shared_dispatcher_equals_thread_per_stream(tiny_ca, mode, params):
    model = tiny_ca if mode == "cache-aware" else load_model("random:tiny")
    audios = _audios(4)
    want = []
    for a in audios:  # each stream alone, thread-per-stream pipeline
        svc = CaptionService(model, mode, params, dispatch="thread")
        try:
            assert isinstance(svc.pipeline(lambda e: None, 16000), CaptionPipeline)
            want.append(_run(svc, [a])[0])
        finally:
            svc._shared.stop(drain=False)
    svc = CaptionService(model, mode, params, dispatch="shared")
    try:
        assert isinstance(svc.pipeline(lambda e: None, 16000), ScheduledCaptionPipeline)
        got = _run(svc, audios)
    finally:
        svc._shared.stop(drain=False)
    assert any(_finals(w) for w in want)
    for g, w, a in zip(got, want, audios):
        assert _finals(g) == _finals(w)
        assert g[-1]["type"] == "end" and g[-1]["audio_duration"] == pytest.approx(a.size / 16000, abs=1e-3)
        assert [e["seq"] for e in g] == list(range(len(g)))


def test_full_inbox_keeps_audio_in_the_pipeline(tiny_ca):
    """A scheduler inbox of 0.1 s (so `submit` is refused again and again): the audio waits in the pipeline and is
    handed on as steps free room; the captions equal an unbounded run's."""
    audios = _audios(2, seed=3)
    svc = CaptionService(tiny_ca, "cache-aware", dispatch="shared")
    try:
        want = _run(svc, audios, frame=8000)
    finally:
        svc._shared.stop(drain=False)
    svc = CaptionService(tiny_ca, "cache-aware", dispatch="shared")
    svc._shared.stop(drain=False)
    svc._shared = CaptionSchedulerPool(tiny_ca, "cache-aware", SchedulerConfig(
        sample_rate=16000, idle_timeout=None, max_streams=8, max_buffer_seconds=0.1, piece_seconds=0.05))
    try:
        pipe = svc.pipeline(lambda e: None, 16000)
        assert pipe.recognizer.submit(np.zeros(16000, np.float32)) and not pipe.recognizer.submit(
            np.zeros(16000, np.float32))  # the bound is real: a second second of audio is refused
        pipe.recognizer.close()
        got = _run(svc, audios, frame=8000)
    finally:
        svc._shared.stop(drain=False)
    assert any(_finals(w) for w in want)
    for g, w in zip(got, want):
        assert _finals(g) == _finals(w) and g[-1]["audio_duration"] == w[-1]["audio_duration"]


def test_client_gone_mid_stream_does_not_stop_the_others(tiny_ca):
    audios = _audios(3, seed=5)
    svc = CaptionService(tiny_ca, "cache-aware", dispatch="shared")
    try:
        want = _run(svc, [audios[0], audios[2]])
        got = _run(svc, audios, stop_after={1: 5})
        assert svc._shared.scheduler.open_streams == 0
    finally:
        svc._shared.stop(drain=False)
    assert _finals(got[0]) == _finals(want[0]) and _finals(got[2]) == _finals(want[1])


def test_stream_ended_by_the_scheduler_reports_and_ends(tiny_ca):
    """A stream the scheduler ends on its own (here: longer than max_stream_seconds) gets an error event and an end
    event; audio pushed after that is not an exception in the pusher's thread."""
    svc = CaptionService(tiny_ca, "cache-aware", dispatch="shared")
    svc._shared.stop(drain=False)
    svc._shared = CaptionSchedulerPool(tiny_ca, "cache-aware", SchedulerConfig(
        sample_rate=16000, idle_timeout=None, max_streams=4, max_stream_seconds=1.0))
    try:
        out: list[dict] = []
        pipe = svc.pipeline(out.append, 16000, options={"vad": False})
        audio = _audios(1, seed=7)[0]
        for j in range(0, audio.size, 1600):
            pipe.push(audio[j:j + 1600])
            time.sleep(0.002)
        pipe.close()
        assert pipe.join(30)
    finally:
        svc._shared.stop(drain=False)
    types = [e["type"] for e in out]
    assert types[-1] == "end", types
    assert [e["code"] for e in out if e["type"] == "error"] == ["stream_too_long"], out


class _Blocker:
    """A pipeline whose service holds the dispatcher thread until released (to queue others behind it)."""

    _closed = False

    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()

    def _service(self):
        self.entered.set()
        assert self.release.wait(10)


class _Recorder:
    def __init__(self, name, log, closed=False):
        self.name, self.log, self._closed = name, log, closed

    def _service(self):
        self.log.append(self.name)


def test_dispatcher_services_ended_streams_first():
    """Streams a step just delivered to queue up at the dispatcher; one that ended (its final, which its client is
    waiting for) is serviced before them, whatever the order of notification; the rest keep their order."""
    from trt_asr.captions.pipeline import CaptionDispatcher

    d, log, block = CaptionDispatcher(), [], _Blocker()
    try:
        d.notify(block)
        assert block.entered.wait(5)
        partials = [_Recorder(f"p{i}", log) for i in range(5)]
        for p in partials[:3]:
            d.notify(p)
        d.notify(_Recorder("ended", log, closed=True))
        d.notify(partials[1])  # already queued: not twice
        d.notify(partials[4], urgent=True)
        d.notify(partials[3])
        block.release.set()
        deadline = time.time() + 5
        while len(log) < 6 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        d.stop()
    assert log == ["ended", "p4", "p0", "p1", "p2", "p3"]


def test_end_reaches_the_scheduler_without_the_dispatcher(tiny_ca):
    """close() hands the end to the scheduler in the caller's thread when its audio is already there: a busy
    dispatcher (here: held) does not delay the stream's last step. The final and the end event still come."""
    svc = CaptionService(tiny_ca, "cache-aware", dispatch="shared")
    try:
        out: list[dict] = []
        pipe = svc.pipeline(out.append, 16000, options={"vad": False})
        block = _Blocker()
        pipe.dispatcher.notify(block)
        assert block.entered.wait(5)
        audio = _audios(1, seed=11)[0]
        for j in range(0, audio.size, 1600):
            pipe.push(audio[j:j + 1600])
        pipe.close()
        stream = pipe.recognizer.stream
        assert stream._ended  # before the dispatcher ran again
        assert stream.wait_idle(30)
        deadline = time.time() + 30
        while not stream.done and time.time() < deadline:  # the scheduler ran the last step on its own
            time.sleep(0.01)
        assert stream.done and not out  # ... while nothing was emitted yet (the dispatcher is held)
        block.release.set()
        assert pipe.join(30)
    finally:
        block.release.set()
        svc._shared.stop(drain=False)
    assert out[-1]["type"] == "end" and out[-1]["audio_duration"] == pytest.approx(audio.size / 16000, abs=1e-3)
    svc = CaptionService(tiny_ca, "cache-aware", dispatch="shared")
    try:
        want = _run(svc, [audio])[0]
    finally:
        svc._shared.stop(drain=False)
    assert _finals(out) == _finals(want)
