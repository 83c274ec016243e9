"""Front-ends and engine processes (``serve --engines``), in one process here (the engine hosts listen on real Unix
sockets, the front-end pool connects to them): a stream's captions through an engine equal the same streams through
the in-process scheduler pool, for both streaming modes and with two engines sharing the streams; credit
backpressure refuses audio past the bound and loses none; offline transcription runs on the engine; an engine that
goes away ends its streams with ``engine_unavailable``; a front-end that goes away frees its streams on the engine;
a wrong key is refused; the engine's own admission refusal reaches the caption stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import time
from multiprocessing.connection import Client, Listener

import numpy as np
import pytest

from trt_asr.captions.service import CaptionService
from trt_asr.checkpoint import load_model
from trt_asr.serving.shared_engine import EngineAddresses, EngineHost, RemoteCaptionPool
from trt_asr.streaming.scheduler import CaptionSchedulerPool, SchedulerConfig

from .test_caption_dispatch import _audios, _finals, _run

BUFFERED = {"left_secs": 1.0, "chunk_secs": 0.5, "right_secs": 0.5}


@pytest.fixture(scope="module")
def tiny_ca():
    m = load_model("random:tiny-cache-aware")
    m.cfg.preprocessor.normalize = None
    return m


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny")


def _service(model, mode, params, config: SchedulerConfig | None = None) -> CaptionService:
    svc = CaptionService(model, mode, params, dispatch="shared")
    if config is not None:
        svc._shared.stop(drain=False)
        svc._shared = CaptionSchedulerPool(model, mode, config, **params)
    return svc


@contextlib.contextmanager
def engines(services, io: str = "threads"):
    """One EngineHost per service on a fresh Unix socket, and a front-end pool connected to all of them. ``io``:
    the pool serves its links with threads, or from an event loop (a thread running it here; a server's own loop
    in ``serve``), as a front-end process does (``attach_loop``); the loop is ``pool.test_loop``."""
    key = os.urandom(16)
    folder = tempfile.mkdtemp(prefix="trt-asr-test-engines-")
    hosts, paths = [], []
    for i, svc in enumerate(services):
        path = os.path.join(folder, f"e{i}.sock")
        hosts.append(EngineHost(svc).start(Listener(path, family="AF_UNIX", authkey=key)))
        paths.append(path)
    pool = RemoteCaptionPool(EngineAddresses(tuple(paths), key))
    loop = thread = None
    if io == "loop":
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(pool.attach_loop(), loop).result(10)
        pool.test_loop = (loop, thread.ident)
    try:
        yield pool, hosts
    finally:
        pool.stop(drain=False)
        for h in hosts:
            h.stop(drain_timeout=5)
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


def _front_end(pool, mode: str) -> CaptionService:
    return CaptionService(pool.model, mode, pool.params, pool=pool)


@pytest.mark.parametrize("mode,io", [("cache-aware", "threads"), ("buffered", "threads"), ("cache-aware", "loop"),
                                     ("buffered", "loop")])
def test_captions_through_two_engines_equal_in_process(tiny_ca, tiny, mode, io):
    """Also with the links served from an event loop (a server front-end's): every event is then made in the
    loop's thread, fed by other threads' pushes."""
    model, params = (tiny_ca, {}) if mode == "cache-aware" else (tiny, BUFFERED)
    audios = _audios(4)
    svc = _service(model, mode, params)
    try:
        want = _run(svc, audios)
    finally:
        svc._shared.stop(drain=False)
    with engines([_service(model, mode, params), _service(model, mode, params)], io) as (pool, hosts):
        fe = _front_end(pool, mode)
        assert fe.model.tokenizer is not None and fe.model.cfg.sample_rate == 16000  # config and tokenizer came over
        emitted_in: set[int] = set()
        make = fe.pipeline
        fe.pipeline = lambda emit, *a, **k: make(lambda e: (emitted_in.add(threading.get_ident()), emit(e)), *a, **k)
        got = _run(fe, audios)
        assert [link._io for link in pool.links] == [io, io]
        if io == "loop":
            assert emitted_in == {pool.test_loop[1]}, emitted_in
        else:
            assert len(emitted_in) == 1 and threading.get_ident() not in emitted_in  # the dispatcher thread
        opened = [h.scheduler.stats.opened for h in hosts]
        assert opened == [2, 2], opened  # the streams were spread over both engines
        assert [h.scheduler.open_streams for h in hosts] == [0, 0]  # every stream finished and was released
    assert any(_finals(w) for w in want), "the reference has no finals; the test would prove nothing"
    for g, w, a in zip(got, want, audios):
        assert _finals(g) == _finals(w)
        assert g[-1]["type"] == "end" and g[-1]["audio_duration"] == pytest.approx(a.size / 16000, abs=1e-3)
        assert [e["seq"] for e in g] == list(range(len(g)))


def test_a_steps_updates_leave_from_the_schedulers_thread(tiny_ca):
    """The engine sends a step's updates from the scheduler's thread right after the step (the writer thread would
    wait for the GIL behind the next step); the captions are those of the in-process pool."""
    audios = _audios(2, seed=5)
    svc = _service(tiny_ca, "cache-aware", {})
    try:
        want = _run(svc, audios)
    finally:
        svc._shared.stop(drain=False)
    with engines([_service(tiny_ca, "cache-aware", {})], "loop") as (pool, hosts):
        senders: list[str] = []
        deadline = time.monotonic() + 10
        while not hosts[0]._links and time.monotonic() < deadline:
            time.sleep(0.01)
        link = hosts[0]._links[0]
        send = link.conn.send
        link.conn.send = lambda msg: (senders.append(threading.current_thread().name), send(msg))[1]
        got = _run(_front_end(pool, "cache-aware"), audios)
        scheduler_thread = hosts[0].scheduler._thread.name
    assert any(_finals(w) for w in want)
    assert [_finals(g) for g in got] == [_finals(w) for w in want]
    assert senders and senders.count(scheduler_thread) >= len(senders) // 2, senders


def test_credit_refuses_audio_past_the_bound_and_loses_none(tiny_ca):
    """A bound of 0.6 s: a second 1-s frame is refused until the engine reports it took the first in; with 1-s
    frames every push after the first waits for credit, and the captions equal an unbounded run's."""
    audios = _audios(2, seed=3)
    svc = _service(tiny_ca, "cache-aware", {})
    try:
        want = _run(svc, audios, frame=16000)
    finally:
        svc._shared.stop(drain=False)
    config = SchedulerConfig(sample_rate=16000, idle_timeout=None, max_streams=8, max_buffer_seconds=0.6,
                             piece_seconds=0.05)
    with engines([_service(tiny_ca, "cache-aware", {}, config)]) as (pool, hosts):
        fe = _front_end(pool, "cache-aware")
        rec = fe.recognizer()
        assert rec.submit(np.zeros(16000, np.float32)) and not rec.submit(np.zeros(16000, np.float32))
        rec.close()
        got = _run(fe, audios, frame=16000)
    assert any(_finals(w) for w in want)
    for g, w in zip(got, want):
        assert _finals(g) == _finals(w) and g[-1]["audio_duration"] == w[-1]["audio_duration"]


@pytest.mark.parametrize("io", ["threads", "loop"])
def test_offline_transcription_runs_on_the_engine(tiny, io):
    audio = _audios(1, seed=11)[0]
    svc = _service(tiny, "buffered", BUFFERED)
    want = svc.transcribe_offline(audio)
    with engines([svc], io) as (pool, hosts):
        got = _front_end(pool, "buffered").transcribe_offline(audio)
        assert hosts[0]._transcriber is not None  # it ran there
    assert want.text and got.text == want.text
    assert [(w.word, w.start, w.end) for w in got.words] == [(w.word, w.start, w.end) for w in want.words]


@pytest.mark.parametrize("io", ["threads", "loop"])
def test_an_engine_that_goes_away_ends_its_streams(tiny_ca, io):
    with engines([_service(tiny_ca, "cache-aware", {})], io) as (pool, hosts):
        fe = _front_end(pool, "cache-aware")
        out: list[dict] = []
        pipe = fe.pipeline(out.append, 16000, options={"vad": False})
        pipe.push(_audios(1)[0][:8000])
        hosts[0].stop(drain_timeout=0)  # the engine's connections close
        assert pipe.done.wait(30), out
        errors = [e for e in out if e["type"] == "error"]
        assert errors and errors[0]["code"] == "engine_unavailable", out
        assert out[-1]["type"] == "end"
        deadline = time.monotonic() + 10
        while any(link.alive for link in pool.links) and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(ConnectionError):
            fe.recognizer()


def test_a_front_end_that_goes_away_frees_its_streams(tiny_ca):
    svc = _service(tiny_ca, "cache-aware", {})
    with engines([svc]) as (pool, hosts):
        fe = _front_end(pool, "cache-aware")
        recs = [fe.recognizer() for _ in range(3)]
        for r in recs:
            assert r.submit(_audios(1)[0][:4000])
        deadline = time.monotonic() + 10
        while svc._shared.scheduler.open_streams < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert svc._shared.scheduler.open_streams == 3
        for link in pool.links:  # the front-end process dies: its connections close
            link.close()
        while svc._shared.scheduler.open_streams and time.monotonic() < deadline:
            time.sleep(0.02)
        assert svc._shared.scheduler.open_streams == 0


def test_a_wrong_key_is_refused_and_the_engine_keeps_serving(tiny_ca):
    from multiprocessing import AuthenticationError

    with engines([_service(tiny_ca, "cache-aware", {})]) as (pool, hosts):
        with pytest.raises((AuthenticationError, EOFError, ConnectionError)):
            Client(hosts[0]._listener.address, family="AF_UNIX", authkey=b"wrong")
        out = _run(_front_end(pool, "cache-aware"), _audios(1))
        assert out[0][-1]["type"] == "end" and not [e for e in out[0] if e["type"] == "error"]


def test_the_engines_admission_refusal_reaches_the_stream(tiny_ca):
    config = SchedulerConfig(sample_rate=16000, idle_timeout=None, max_streams=1)
    with engines([_service(tiny_ca, "cache-aware", {}, config)]) as (pool, hosts):
        fe = _front_end(pool, "cache-aware")
        first = fe.recognizer()
        out: list[dict] = []
        pipe = fe.pipeline(out.append, 16000, options={"vad": False})
        pipe.push(np.zeros(1600, np.float32))
        assert pipe.done.wait(30), out
        errors = [e for e in out if e["type"] == "error"]
        assert errors and errors[0]["code"] == "capacity", out
        first.close()


@pytest.mark.parametrize("engines", [2, 0])
def test_first_alone_starts_the_first_model_process_before_the_others(tmp_path, engines):
    """``serve_workers(first_alone=True)``: the first process that holds the model (engine 0, or worker 0 without
    engines) is ready before any other of its kind starts building, so the others can load what it compiled; the
    front-ends start only once every engine is ready."""
    import signal
    import socket

    from trt_asr.serving.runner import serve_workers

    from . import serving_stubs

    log = str(tmp_path / "events.txt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = serve_workers(serving_stubs.build_app, (log, 0.5), 2, port=port, engines=engines,
                         engine_build=serving_stubs.build_engine if engines else None, engine_args=(log, 0.5),
                         on_ready=lambda: os.kill(os.getpid(), signal.SIGTERM), first_alone=True, start_timeout=60)
    assert code == 0
    events = [line.split() for line in open(log)]
    kind = "engine" if engines else "worker"
    starts = {pid: float(t) for pid, e, t in events if e == f"{kind}-start"}
    ready = {pid: float(t) for pid, e, t in events if e == f"{kind}-ready"}
    assert len(starts) == len(ready) == 2
    first = min(starts, key=starts.get)
    assert all(ready[first] < t for pid, t in starts.items() if pid != first)
    if engines:  # the front-ends after all engines
        worker_starts = [float(t) for _, e, t in events if e == "worker-start"]
        assert len(worker_starts) == 2 and min(worker_starts) > max(ready.values())
