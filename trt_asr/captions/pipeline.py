"""The live-caption pipeline: capture -> DSP -> streaming recognizer -> transcript state -> events.

Capture calls ``push`` (never blocks: chunks go on a queue with their wall-clock arrival time). A worker thread
drains the queue, runs the DSP chain on everything that arrived, feeds the recognizer (so a slow model processes
larger batches instead of building a backlog of small steps), updates the transcript state, and calls ``emit`` with
each event (from the worker thread; sinks that need another thread or an event loop hand over themselves).

Latency accounting: for each event, ``audio_end`` (the last sample that produced it) is mapped back to the wall-clock
time that sample arrived; partial latency = emission - arrival(audio_end); final latency = emission - arrival(end of
the segment's last word).
"""

from __future__ import annotations

import bisect
import collections
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import events as ev
from .dsp import DSPChain, DSPConfig, DSPError, PCMDecoder
from .recognizer import StreamingRecognizer
from .transcript import CommitPolicy, Hypothesis, TranscriptState

_CLOSE = object()


@dataclass
class PipelineOptions:
    policy: CommitPolicy = field(default_factory=CommitPolicy)
    dsp: DSPConfig = field(default_factory=DSPConfig)
    decoder_endpoint_ms: float | None = 800.0  # no new tokens for this long -> endpoint; None: off
    encoding: str | None = None  # "pcm_s16le" | "f32le" when push() gets bytes


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class Stats:
    partial_latency_ms: list[float] = field(default_factory=list)
    final_latency_ms: list[float] = field(default_factory=list)
    token_latency_ms: list[float] = field(default_factory=list)  # first display of a token - arrival of its audio
    partials: int = 0
    finals: int = 0
    committed_changes: int = 0  # must stay 0: committed text never changes
    revision_rate: float = 0.0
    audio_seconds: float = 0.0
    compute_seconds: float = 0.0

    def summary(self) -> dict:
        def pq(v):
            return {"p50": _round(percentile(v, 50)), "p95": _round(percentile(v, 95)), "n": len(v)}

        return {"partial_latency_ms": pq(self.partial_latency_ms), "final_latency_ms": pq(self.final_latency_ms),
                "token_latency_ms": pq(self.token_latency_ms),
                "partials": self.partials, "finals": self.finals, "revision_rate": round(self.revision_rate, 4),
                "committed_changes": self.committed_changes, "audio_seconds": round(self.audio_seconds, 3),
                "rtf": round(self.compute_seconds / self.audio_seconds, 4) if self.audio_seconds else None}


def _round(x):
    return None if x is None else round(x, 1)


class CaptionPipeline:
    def __init__(self, recognizer: StreamingRecognizer, emit: Callable[[dict], None],
                 options: PipelineOptions | None = None, decode: Callable[[list[int]], str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.recognizer = recognizer
        self.opts = options or PipelineOptions()
        self._emit_cb = emit
        self.clock = clock
        self.dsp = DSPChain(self.opts.dsp)
        self.pcm = PCMDecoder(self.opts.encoding, self.opts.dsp.channels) if self.opts.encoding else None
        self.state = TranscriptState(decode, self.opts.policy)
        self.stats = Stats()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._arrival_t: list[float] = []  # audio seconds (input) at the end of each pushed chunk
        self._arrival_wall: list[float] = []
        self._pushed_samples = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._closed = False
        self.done = threading.Event()
        self._last_partial_nonempty = False
        self._shown_until = 0.0  # end time of the newest token shown so far

    # ------------------------------------------------------------------ capture side (any thread)
    def push(self, data: np.ndarray | bytes) -> None:
        """Queue captured audio: float/int array [n] or [n, channels] at the input rate, or raw bytes (``encoding``)."""
        self._q.put(self._arrived(data))

    def _arrived(self, data: np.ndarray | bytes) -> np.ndarray:
        """Decode pushed audio to float samples and note its wall-clock arrival (latency accounting)."""
        if self._closed:
            raise RuntimeError("pipeline closed")
        if isinstance(data, (bytes, bytearray, memoryview)):
            if self.pcm is None:
                raise DSPError("bytes pushed but no encoding configured")
            data = self.pcm.decode(bytes(data))
        else:
            data = np.asarray(data)
            if data.dtype.kind in "iu":
                data = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
        now = self.clock()
        with self._lock:
            self._pushed_samples += data.shape[0]
            self._arrival_t.append(self._pushed_samples / self.opts.dsp.sample_rate)
            self._arrival_wall.append(now)
        return data

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._q.put(_CLOSE)

    def backlog_seconds(self) -> float:
        """Pushed audio not yet through the DSP and handed on (the server stops reading a socket past a bound)."""
        return self._pushed_samples / self.opts.dsp.sample_rate - self.dsp.samples_out / self.opts.dsp.target_rate

    def start(self) -> "CaptionPipeline":
        self._thread = threading.Thread(target=self._run, name="caption-worker", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    # ------------------------------------------------------------------ worker
    def _arrival(self, audio_time: float) -> float | None:
        with self._lock:
            i = bisect.bisect_left(self._arrival_t, audio_time - 1e-9)
            if not self._arrival_wall:
                return None
            return self._arrival_wall[min(i, len(self._arrival_wall) - 1)]

    def _trim_arrivals(self, before: float) -> None:
        """Forget arrival times of audio older than ``before`` (bounded memory on endless streams)."""
        with self._lock:
            i = bisect.bisect_left(self._arrival_t, before)
            if i > 0:
                del self._arrival_t[:i], self._arrival_wall[:i]

    def _emit(self, event: dict) -> None:
        event["seq"] = self._seq
        self._seq += 1
        try:
            self._emit_cb(event)
        except Exception:  # a failing sink must not kill recognition
            traceback.print_exc()

    def _run(self) -> None:
        try:
            while True:
                items = [self._q.get()]
                while True:
                    try:
                        items.append(self._q.get_nowait())
                    except queue.Empty:
                        break
                last = any(x is _CLOSE for x in items)
                chunks = [x for x in items if x is not _CLOSE]
                audio = np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)
                if audio.size or last:
                    y, vad_events = self.dsp.process(audio, last=last)
                    for e in vad_events:  # close the utterance a little after the speech ended (inside the pause)
                        if e.kind == "endpoint":
                            self.state.add_endpoint(e.time + min(0.3, (e.detected_at - e.time) / 2))
                    t0 = time.perf_counter()
                    # the stream's last audio goes with finish() where the recognizer takes it (scheduled streams):
                    # one round of steps to the final instead of waiting for this audio's step first
                    tail = y if last and getattr(self.recognizer, "finish_takes_audio", False) else None
                    hyp = self.recognizer.feed(y) if tail is None else None
                    self.stats.compute_seconds += time.perf_counter() - t0
                    if hyp is not None:
                        self._handle(hyp)
                else:
                    tail = None
                if last:
                    t0 = time.perf_counter()
                    hyp = self.recognizer.finish() if tail is None else self.recognizer.finish(tail)
                    self.stats.compute_seconds += time.perf_counter() - t0
                    hyp.is_last = True
                    self._handle(hyp)
                    self.stats.audio_seconds = self.dsp.samples_out / self.opts.dsp.target_rate
                    self.stats.revision_rate = self.state.revision_rate
                    self._emit(ev.end_event(self.stats.audio_seconds, len(self.state.segments), self.stats.summary()))
                    return
        except Exception as e:  # report, then end the stream
            self._emit(_error_event(e))
            self._emit(ev.end_event(self.dsp.samples_out / self.opts.dsp.target_rate, len(self.state.segments),
                                    self.stats.summary()))
        finally:
            self.done.set()

    def _handle(self, hyp: Hypothesis) -> None:
        st = self.state
        endpoint = False
        if self.opts.decoder_endpoint_ms is not None and (st.tail or st.open_segment):
            last_tok = (st.tail or st.open_segment)[-1]
            newest = hyp.tokens[-1].end if hyp.tokens else last_tok.end
            if (hyp.audio_end - max(last_tok.end, newest)) * 1000 >= self.opts.decoder_endpoint_ms:
                endpoint = True
        n_committed = len(st.committed)
        last_committed = st.committed[-1] if st.committed else None
        upd = st.update(hyp, endpoint=endpoint)
        if len(st.committed) < n_committed or (last_committed is not None and
                                               st.committed[n_committed - 1] is not last_committed):
            self.stats.committed_changes += 1
        now = self.clock()
        if st.updates % 512 == 0:
            self._trim_arrivals(upd.audio_end - 600.0)
        for seg in upd.finals:
            arr = self._arrival(min(seg.end, upd.audio_end))
            lat = None if arr is None else (now - arr) * 1000
            if lat is not None:
                self.stats.final_latency_ms.append(lat)
            self.stats.finals += 1
            self._emit(ev.final_event(seg, upd.audio_end, lat))
        nonempty = bool(st.tail or st.open_segment)
        if upd.changed and (nonempty or self._last_partial_nonempty) and not hyp.is_last:
            arr = self._arrival(upd.audio_end)
            lat = None if arr is None else (now - arr) * 1000
            if lat is not None and nonempty:
                self.stats.partial_latency_ms.append(lat)
            for t in upd.revision.added + upd.newly_committed:  # tokens covering new audio, shown the first time
                if t.end > self._shown_until + 1e-6:
                    a = self._arrival(t.end)
                    if a is not None:
                        self.stats.token_latency_ms.append((now - a) * 1000)
                    self._shown_until = t.end
            self.stats.partials += 1
            self._emit(ev.partial_event(st, upd, lat))
            self._last_partial_nonempty = nonempty


def _error_event(e: Exception) -> dict:
    """A stream's own error (e.g. the scheduler ended it: ``stream_too_long``) keeps its code; anything else is
    ``internal`` and its traceback goes to stderr."""
    code = getattr(e, "code", None)
    if isinstance(code, str) and code:
        return ev.error_event(code, str(e))
    traceback.print_exc()
    return ev.error_event("internal", f"{type(e).__name__}: {e}")


class ScheduledCaptionPipeline(CaptionPipeline):
    """``CaptionPipeline`` for a stream of a ``StreamScheduler`` (``CaptionSchedulerPool``), with no thread of its
    own: ``push`` runs the DSP in the caller's thread and queues the audio with the scheduler without waiting; the
    scheduler's worker signals when a step delivered this stream's events, and one dispatcher thread shared by all
    streams (``CaptionDispatcher``) turns them into a hypothesis, the transcript state's update and events. The same
    events as ``CaptionPipeline`` (same recognizer results, same transcript state); what goes is a blocked thread
    per stream and two thread hand-offs per audio frame."""

    def __init__(self, recognizer, emit: Callable[[dict], None], options: PipelineOptions | None = None,
                 decode: Callable[[list[int]], str] | None = None, clock: Callable[[], float] = time.monotonic,
                 *, dispatcher: "CaptionDispatcher"):
        super().__init__(recognizer, emit, options, decode, clock)
        self.dispatcher = dispatcher
        self._audio_lock = threading.Lock()  # push (caller) vs flush (dispatcher): DSP state, pending audio
        self._pending: list[np.ndarray] = []  # DSP output the scheduler's bounded inbox did not take yet
        self._ended = False  # the recognizer was told the stream ended
        self._finished = False
        self._endpoints: list[float] = []
        recognizer.on_events(lambda: self.dispatcher.notify(self))

    def start(self) -> "ScheduledCaptionPipeline":
        return self

    def push(self, data: np.ndarray | bytes) -> None:
        data = self._arrived(data)
        with self._audio_lock:
            y, vad_events = self.dsp.process(data)
            self._queue_endpoints(vad_events)
            if y.size:
                self._pending.append(y)
            self._submit_pending()

    def _queue_endpoints(self, vad_events) -> None:
        """VAD endpoints go to the transcript state from the dispatcher thread (its only writer)."""
        for e in vad_events:  # close the utterance a little after the speech ended (inside the pause)
            if e.kind == "endpoint":
                self._endpoints.append(e.time + min(0.3, (e.detected_at - e.time) / 2))

    def _submit_pending(self) -> None:
        """Hand pending audio to the scheduler as far as its inbox takes it (caller holds ``_audio_lock``)."""
        while self._pending:
            try:
                accepted = self.recognizer.submit(self._pending[0])
            except RuntimeError:  # the scheduler ended or closed the stream (its error event says why)
                self._pending.clear()
                self._ended = True
                self.dispatcher.notify(self)
                return
            if not accepted:
                return  # inbox full: retried when a step frees room (every delivery notifies the dispatcher)
            self._pending.pop(0)

    def close(self) -> None:
        """End the stream. The end reaches the scheduler from the caller's thread when all audio is already with it
        (the usual case): through the dispatcher it would wait behind every stream whose events a step just
        delivered, and its final with it. The final is then serviced ahead of other streams' partials."""
        if not self._closed:
            self._closed = True
            with self._audio_lock:
                self._end_if_submitted()
            self.dispatcher.notify(self, urgent=True)

    def _end_if_submitted(self) -> None:
        """(``_audio_lock`` held, stream closed) The DSP's last output to the scheduler, then ``end``, once nothing
        of the stream's audio waits outside the scheduler's inbox."""
        self._submit_pending()
        if self._closed and not self._ended and not self._pending:
            y, vad_events = self.dsp.process(np.zeros((0,), np.float32), last=True)
            self._queue_endpoints(vad_events)
            if y.size:
                self._pending.append(y)
                self._submit_pending()
            if not self._pending:
                self._ended = True
                self.recognizer.end()

    def backlog_seconds(self) -> float:
        with self._audio_lock:
            pending = sum(p.size for p in self._pending)
        return (pending + self.recognizer.queued_samples()) / self.opts.dsp.target_rate

    def _service(self) -> None:
        """Dispatcher thread: move on what is ready (submit, events, end, final)."""
        if self._finished:
            return
        try:
            with self._audio_lock:
                self._end_if_submitted()
                endpoints, self._endpoints = self._endpoints, []
            for t in endpoints:
                self.state.add_endpoint(t)
            t0 = time.perf_counter()
            hyp, finished = self.recognizer.take()
            self.stats.compute_seconds += time.perf_counter() - t0
            if finished:
                hyp.is_last = True
            if hyp is not None:
                self._handle(hyp)
            if finished:
                self._finished = True
                self.stats.audio_seconds = self.dsp.samples_out / self.opts.dsp.target_rate
                self.stats.revision_rate = self.state.revision_rate
                self._emit(ev.end_event(self.stats.audio_seconds, len(self.state.segments), self.stats.summary()))
                self.done.set()
        except Exception as e:  # report, then end the stream
            self._finished = True
            self._emit(_error_event(e))
            self._emit(ev.end_event(self.dsp.samples_out / self.opts.dsp.target_rate, len(self.state.segments),
                                    self.stats.summary()))
            self.done.set()
            try:
                self.recognizer.close()
            except Exception:
                pass


class CaptionDispatcher:
    """One thread that services ``ScheduledCaptionPipeline``s when they are notified (audio to submit, events
    delivered, closed): each pipeline is queued at most once at a time and serviced in notification order, except
    that streams that ended go first (a step delivers to up to a batch of streams at once; a final waiting behind a
    batch of partials was the tail of the server's latency)."""

    def __init__(self):
        self._urgent: collections.deque = collections.deque()  # streams that ended: their finals
        self._normal: collections.deque = collections.deque()
        self._queued: set[int] = set()
        self._urgent_ids: set[int] = set()
        self._stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="caption-dispatcher", daemon=True)
        self._thread.start()

    def notify(self, pipe: ScheduledCaptionPipeline, urgent: bool = False) -> None:
        urgent = urgent or pipe._closed
        with self._cond:
            key = id(pipe)
            if key in self._queued and not (urgent and key not in self._urgent_ids):
                return
            # (a pipeline queued as normal and now urgent is queued twice; the second service finds nothing new)
            self._queued.add(key)
            if urgent:
                self._urgent_ids.add(key)
                self._urgent.append(pipe)
            else:
                self._normal.append(pipe)
            self._cond.notify()

    def stop(self) -> None:
        """End the thread after the pipelines already queued (their streams should be done)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._urgent and not self._normal:
                    if self._stopping:
                        return
                    self._cond.wait()
                pipe = (self._urgent or self._normal).popleft()
                self._queued.discard(id(pipe))
                self._urgent_ids.discard(id(pipe))
            pipe._service()


class LoopDispatcher:
    """``CaptionDispatcher``'s queueing run as callbacks of one asyncio event loop instead of a thread: for a process
    whose stream I/O all runs in that loop (a ``serve --engines`` front-end: WebSockets and the engine links), so
    an update goes from the engine's socket to the client's without a thread hand-off, each of which waits for the
    GIL. Same order: each pipeline queued once at a time, streams that ended first. ``notify`` never services in the
    caller's frame (the caller may hold the pipeline's audio lock); from another thread it is handed to the loop."""

    # pipelines serviced per callback before the loop gets a turn (its WebSocket sends and reads)
    BATCH = 32

    def __init__(self, loop):
        self.loop = loop
        self._loop_thread = None  # the loop's thread, known from the first callback (or bind())
        self._urgent: collections.deque = collections.deque()
        self._normal: collections.deque = collections.deque()
        self._queued: set[int] = set()
        self._urgent_ids: set[int] = set()
        self._scheduled = False
        self._lock = threading.Lock()  # notify() may come from another thread (a test's feeder, a drain)

    def bind(self) -> "LoopDispatcher":
        """Called in the loop's thread: later notifies from it skip the thread-safe hand-off."""
        self._loop_thread = threading.get_ident()
        return self

    def notify(self, pipe: ScheduledCaptionPipeline, urgent: bool = False) -> None:
        urgent = urgent or pipe._closed
        with self._lock:
            key = id(pipe)
            if key in self._queued and not (urgent and key not in self._urgent_ids):
                return
            self._queued.add(key)
            if urgent:
                self._urgent_ids.add(key)
                self._urgent.append(pipe)
            else:
                self._normal.append(pipe)
            if self._scheduled:
                return
            self._scheduled = True
        if threading.get_ident() == self._loop_thread:
            self.loop.call_soon(self._run)
        else:
            self.loop.call_soon_threadsafe(self._run)

    def stop(self) -> None:
        """Nothing to stop: the loop's owner ends it."""

    def _run(self) -> None:
        if self._loop_thread is None:
            self._loop_thread = threading.get_ident()
        for _ in range(self.BATCH):
            with self._lock:
                if not self._urgent and not self._normal:
                    self._scheduled = False
                    return
                pipe = (self._urgent or self._normal).popleft()
                self._queued.discard(id(pipe))
                self._urgent_ids.discard(id(pipe))
            pipe._service()
        self.loop.call_soon(self._run)  # more queued: after the loop's other ready callbacks


def run_pipeline_sync(recognizer: StreamingRecognizer, chunks, options: PipelineOptions | None = None,
                      decode=None, emit: Callable[[dict], None] | None = None, pace: float | None = None) -> list[dict]:
    """Push an iterable of chunks (as fast as possible, or paced: ``pace`` = real-time factor, 1.0 = real time),
    wait for the end event and return all events."""
    out: list[dict] = []

    def sink(e):
        out.append(e)
        if emit:
            emit(e)

    p = CaptionPipeline(recognizer, sink, options, decode).start()
    rate = (options or PipelineOptions()).dsp.sample_rate
    t0 = time.monotonic()
    sent = 0
    for c in chunks:
        if pace:
            sent_s = sent / rate
            delay = t0 + sent_s / pace - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        p.push(c)
        sent += len(c) if not isinstance(c, (bytes, bytearray)) else len(c) // max(1, p.pcm.frame_bytes)
    p.close()
    p.join()
    return out
