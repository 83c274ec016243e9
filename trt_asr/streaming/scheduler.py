"""Many streams on one engine: the batching scheduler behind the server, the load tool and the session API.

    sched = StreamScheduler(Recognizer(model, "cache_aware"), SchedulerConfig(max_streams=64, max_batch=32))
    sched.start()                                    # one worker thread owns the mode / engine
    st = sched.open()                                # raises AdmissionError past capacity
    st.push(pcm)                                     # thread-safe; blocks (or ``await st.apush``) past the bound
    st.end();  for ev in st.events(timeout=...): ... # StreamEvent ... (final=True) or ErrorEvent
    sched.stop(drain=True)                           # every stream gets its finals

One *step* = gather the streams that have a full chunk ready (oldest-ready-first, at most ``max_batch``), run ONE
``mode.step`` (one encoder call + one decoder loop for all of them), scatter the results into each stream's event
queue. Only the worker thread touches the mode (its per-stream state: caches, decoder state, audio buffers); the
clients only append to a bounded inbox, so the hot path has no locks held during compute.

Guarantees (tests/test_scheduler.py):

* batched == alone: each stream's tokens are those of running it on its own (the mode batches exactly);
* fairness: a ready stream waits at most ceil(ready_streams / max_batch) steps (oldest-ready-first);
* backpressure: audio queued beyond the next chunk is bounded by ``max_buffer_seconds``; past it ``push`` blocks
  (the server stops reading that socket) and nothing is ever dropped;
* admission: past ``max_streams`` ``open`` raises ``AdmissionError`` (code ``capacity``); while draining, code
  ``shutting_down``;
* isolation: if a batched step raises, the streams are re-run one by one; only the culprit(s) get an
  ``ErrorEvent`` (code ``engine_error``) and are closed, the others get their normal events. Modes must commit a
  stream's state only after the whole step succeeded (the shipped modes do) for the retry to be exact;
* idle timeout (``idle_timeout``): a stream that sends nothing for that long is ended (its finals are emitted), then
  gets ``ErrorEvent('idle_timeout')``; ``max_stream_seconds`` likewise (``stream_too_long``);
* a stream whose events are not read (``max_pending_events``) is closed with ``client_not_reading``: server memory
  stays bounded;
* ``stop(drain=True)`` refuses new streams, ends the open ones and steps until all have their finals (or timeout).

``SlotPool`` is the device-side state store for modes that keep per-stream tensors (cache-aware caches, decoder
state): pre-allocated ``[capacity, ...]`` tensors indexed by the slot the scheduler assigns each stream
(``ScheduledStream.slot``), gathered into per-bucket batch buffers and scattered back with ``index_copy_`` (no
per-step allocation). Batch sizes are rounded up to ``batch_buckets`` for modes that pad to fixed shapes (CUDA
graphs): the scheduler passes ``pad_to=`` to ``mode.step`` when the mode accepts it.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

__all__ = ["AdmissionError", "ErrorEvent", "ScheduledStream", "SchedulerConfig", "SchedulerStats", "SlotPool",
           "StreamScheduler", "StreamClosed", "bucket_for", "percentiles"]


# ----------------------------------------------------------------------------------------------- config / errors
@dataclass
class SchedulerConfig:
    max_streams: int = 64            # admission control: open streams at most
    max_batch: int = 32              # streams in one step at most (fairness: the rest wait for the next step)
    # with fewer than max_batch ready, a step waits until the oldest ready chunk's audio is this old (seconds): fuller
    # steps for a fixed batch shape, whose cost does not depend on how many rows are real; 0: step at once
    batch_wait: float = 0.0
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    max_buffer_seconds: float = 20.0  # audio a stream may queue beyond its next chunk before push() blocks
    piece_seconds: float = 0.25      # inbox pieces are coalesced / split to about this size
    idle_timeout: float | None = 60.0  # seconds without audio (before end) -> stream ended with idle_timeout
    max_stream_seconds: float | None = 4 * 3600.0  # audio per stream at most
    max_pending_events: int = 2000   # unread events per stream before it is closed (client_not_reading)
    sample_rate: int = 16000
    latency_window: int = 100_000    # latency samples kept for the percentiles


class SchedulerError(RuntimeError):
    code = "error"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code or self.code
        self.message = message


class AdmissionError(SchedulerError):
    """A new stream is refused: ``code`` is ``capacity`` (max_streams reached) or ``shutting_down``."""

    code = "capacity"


class StreamClosed(SchedulerError):
    """push/end on a stream that was closed (error, timeout, shutdown or close())."""

    code = "stream_closed"


@dataclass(frozen=True)
class ErrorEvent:
    """An error for one stream. ``fatal``: the stream is closed (no more events follow)."""

    code: str
    message: str
    fatal: bool = True
    final: bool = False  # duck-typing with StreamEvent: never a transcript final


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n (n itself above the largest)."""
    for b in sorted(buckets):
        if b >= n:
            return b
    return n


def percentiles(values: Sequence[float], qs=(50, 95, 99)) -> dict[str, float | None]:
    if not len(values):
        return {f"p{q}": None for q in qs}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


# ----------------------------------------------------------------------------------------------- stats
class SchedulerStats:
    """Counters and latency samples (seconds). ``summary()`` gives milliseconds."""

    def __init__(self, window: int = 100_000):
        self.steps = 0
        self.stepped_streams = 0
        self.step_seconds: deque[float] = deque(maxlen=window)
        self.batch_sizes: deque[int] = deque(maxlen=window)
        self.event_latency: deque[float] = deque(maxlen=window)  # chunk ready -> its event emitted
        self.busy_seconds = 0.0
        self.started = time.monotonic()
        self.errors: dict[str, int] = {}
        self.refused = 0
        self.opened = 0
        self.max_open = 0
        # where the worker's time goes (seconds, summed): intake before a step, launching its device work, delivering
        # the previous step's events and the intake ahead (both while the device works), waiting for it + committing
        self.phase_seconds = {"intake": 0.0, "launch": 0.0, "deliver": 0.0, "intake_ahead": 0.0, "wait_commit": 0.0}
        # the same over wall time, per TIMELINE_S interval (from the first step on): when a queue builds, and whether
        # the steps were full meanwhile. interval -> [steps, streams stepped, streams ready when a step was chosen
        # (summed), step seconds, events, event latency summed, event latency max, queued audio per open stream (s,
        # the most seen at a step), audio received by all streams so far (s, at the interval's last step)]
        self.timeline: dict[int, list] = {}
        self._t0: float | None = None

    TIMELINE_S = 0.5
    TIMELINE_MAX = 2400  # intervals kept (20 min at 0.5 s): a long-running server keeps its first ones

    def _bin(self, now: float) -> list | None:
        if self._t0 is None:
            self._t0 = now
        i = int((now - self._t0) / self.TIMELINE_S)
        b = self.timeline.get(i)
        if b is None and len(self.timeline) < self.TIMELINE_MAX:
            b = self.timeline[i] = [0, 0, 0, 0.0, 0, 0.0, 0.0, 0.0, 0.0]
        return b

    def note_step(self, now: float, ready: int, stepped: int, seconds: float, queued_s: float,
                  received_s: float = 0.0) -> None:
        b = self._bin(now)
        if b is not None:
            b[8] = received_s
            b[0] += 1
            b[1] += stepped
            b[2] += ready
            b[3] += seconds
            b[7] = max(b[7], queued_s)

    def note_latency(self, now: float, latency: float) -> None:
        self.event_latency.append(latency)
        if self._t0 is None:
            return
        b = self._bin(now)
        if b is not None:
            b[4] += 1
            b[5] += latency
            b[6] = max(b[6], latency)

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def summary(self) -> dict:
        def ms(d):
            return {k: (None if v is None else round(v * 1000, 3)) for k, v in percentiles(list(d)).items()}
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {
            "steps": self.steps, "stepped_streams": self.stepped_streams,
            "mean_batch": (self.stepped_streams / self.steps) if self.steps else 0.0,
            "max_batch": max(self.batch_sizes, default=0),
            "step_ms": ms(self.step_seconds), "event_latency_ms": ms(self.event_latency),
            "busy_fraction": self.busy_seconds / elapsed, "errors": dict(self.errors), "refused": self.refused,
            "opened": self.opened, "max_open": self.max_open,
            "phase_ms_per_step": {k: round(1000 * v / max(self.steps, 1), 3) for k, v in self.phase_seconds.items()},
            "phase_fraction": {k: round(v / elapsed, 4) for k, v in self.phase_seconds.items()},
            "timeline": self.timeline_summary(),
        }

    def timeline_summary(self) -> list[dict]:
        """One row per interval with steps: its start (s after the first step), steps, streams stepped and their mean
        per step, mean streams ready when each step was chosen, mean step ms, events and their mean / max latency
        (ms), the most audio queued per open stream (ms, mean over the open streams) seen at a step, and the audio
        that arrived since the previous row (s, all streams: the offered load)."""
        out, received_before = [], 0.0
        for i in sorted(self.timeline):
            st, n, ready, sec, ev, lat, lat_max, queued, received = self.timeline[i]
            out.append({"t": round(i * self.TIMELINE_S, 3), "steps": st, "stepped": n,
                        "batch": round(n / st, 1) if st else 0,
                        "ready": round(ready / st, 1) if st else 0, "step_ms": round(1000 * sec / st, 2) if st else 0,
                        "events": ev, "latency_ms": round(1000 * lat / ev, 1) if ev else None,
                        "latency_max_ms": round(1000 * lat_max, 1), "queued_ms": round(1000 * queued, 1),
                        "arrived_s": round(received - received_before, 3) if st else None})
            if st:
                received_before = received
        return out


# ----------------------------------------------------------------------------------------------- slot pool
class SlotPool:
    """Per-stream tensors on the device, pre-allocated for ``capacity`` slots.

        pool = SlotPool(capacity, {"cache": ((L, C, D), torch.float32)}, device, buckets=(1, 2, 4, 8))
        batch = pool.gather(slots)              # {"cache": [bucket, L, C, D]} views of pre-allocated buffers
        ... step ...
        pool.scatter(slots, {"cache": new})     # writes rows [:len(slots)] back
        pool.reset(slot)                        # zero (or ``init``) one slot when a stream opens

    Rows of a bucket beyond ``len(slots)`` are padding (copies of the first slot's state, so a padded step computes
    on valid data) and are never scattered back."""

    def __init__(self, capacity: int, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], device="cpu",
                 buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128), init: dict[str, torch.Tensor] | None = None,
                 growable: bool = False):
        self.capacity = capacity
        self.device = torch.device(device)
        self.growable = growable  # acquire() past capacity doubles it instead of raising
        self.buckets = tuple(sorted(buckets)) if growable else (
            tuple(sorted(b for b in buckets if b <= max(capacity, 1))) or (capacity,))
        self.state = {k: torch.zeros((capacity, *shape), dtype=dt, device=self.device)
                      for k, (shape, dt) in specs.items()}
        self.init = {k: (v.to(self.device) if v is not None else None) for k, v in (init or {}).items()}
        # bucket buffers are made on first use: a large bucket of big caches is only paid for when a step needs it
        self._batch: dict[int, dict[str, torch.Tensor]] = {}
        self._index: dict[int, torch.Tensor] = {}
        self._free = list(range(capacity - 1, -1, -1))

    def acquire(self, reset: bool = True) -> int:
        """A free slot, reset to the initial state (``reset=False``: the caller resets it, e.g. many at once with
        ``reset_many`` before its next gather; a flood of new streams then costs one copy per key, not per slot)."""
        if not self._free:
            if not self.growable:
                raise AdmissionError(f"all {self.capacity} slots are in use")
            self.grow(2 * max(self.capacity, 1))
        slot = self._free.pop()
        if reset:
            self.reset(slot)
        return slot

    def grow(self, capacity: int) -> None:
        """More slots (existing slots keep their index and state)."""
        old = self.capacity
        if capacity <= old:
            return
        for k, t in self.state.items():
            bigger = torch.zeros((capacity, *t.shape[1:]), dtype=t.dtype, device=self.device)
            bigger[:old].copy_(t)
            self.state[k] = bigger
        self._free = list(range(capacity - 1, old - 1, -1)) + self._free
        self.capacity = capacity

    def release(self, slot: int) -> None:
        self._free.append(slot)

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)

    def reset(self, slot: int) -> None:
        for k, t in self.state.items():
            if self.init.get(k) is not None:
                t[slot].copy_(self.init[k])
            else:
                t[slot].zero_()

    def reset_many(self, slots: Sequence[int]) -> None:
        """``reset`` for many slots: one indexed copy (or fill) per key."""
        if not slots:
            return
        idx = torch.tensor(list(slots), dtype=torch.long).to(self.device, non_blocking=True)
        for k, t in self.state.items():
            init = self.init.get(k)
            if init is not None:
                t.index_copy_(0, idx, init.to(t.dtype).expand(len(slots), *t.shape[1:]))
            else:
                t.index_fill_(0, idx, 0)

    def _index_for(self, slots: Sequence[int]) -> tuple[int, torch.Tensor]:
        n = len(slots)
        b = bucket_for(n, self.buckets)
        if b not in self._index:  # first use of this bucket (above the largest: n itself; bounded by capacity)
            self._index[b] = torch.zeros(b, dtype=torch.long, device=self.device)
        idx = self._index[b]
        host = list(slots) + [slots[0]] * (b - n)
        idx.copy_(torch.tensor(host, dtype=torch.long), non_blocking=True)
        return b, idx

    def gather(self, slots: Sequence[int], out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The slots' state as [bucket, ...] tensors. ``out``: destination tensors for some of the keys (e.g. an
        engine's own input buffers: no bucket buffer is then allocated for those keys, nor a second copy made)."""
        b, idx = self._index_for(slots)
        res = dict(out or {})
        bufs = self._batch.setdefault(b, {})
        for k, t in self.state.items():
            dst = res.get(k)
            if dst is None:
                dst = bufs.get(k)
                if dst is None:
                    dst = bufs[k] = torch.empty((b, *t.shape[1:]), dtype=t.dtype, device=self.device)
                res[k] = dst
            elif dst.shape != (b, *t.shape[1:]) or dst.dtype != t.dtype:
                raise ValueError(f"gather(out=): {k} must be {(b, *t.shape[1:])} {t.dtype}, not "
                                 f"{tuple(dst.shape)} {dst.dtype}")
            torch.index_select(t, 0, idx, out=dst)
        return res

    def scatter(self, slots: Sequence[int], values: dict[str, torch.Tensor]) -> None:
        n = len(slots)
        _, idx = self._index_for(slots)
        for k, v in values.items():
            self.state[k].index_copy_(0, idx[:n], v[:n].to(self.state[k].dtype))


# ----------------------------------------------------------------------------------------------- streams
class ScheduledStream:
    """A client's handle on one stream. ``push``/``end``/``close``/``events`` are thread-safe; ``apush`` and
    ``aevents`` are the asyncio versions (bind a loop with ``attach_loop`` first, or call them from a loop)."""

    def __init__(self, scheduler: "StreamScheduler", stream_id: int, slot: int):
        self.scheduler = scheduler
        self.id = stream_id
        self.slot = slot
        self.opened_at = time.monotonic()
        self.last_audio_at = self.opened_at
        self.samples_in = 0
        # inbox (client side, under scheduler._lock)
        self._inbox: deque[np.ndarray] = deque()
        self._inbox_t: deque[float] = deque()  # arrival time of each piece (its newest sample)
        self._last_arrival = self.opened_at  # arrival time of the newest audio handed to the mode
        self._inbox_samples = 0
        self._coalesce: np.ndarray | None = None  # buffer of the newest inbox piece while small frames fill it
        self._ended = False
        self._ended_at: float | None = None
        self._unseen = False  # audio pushed that the worker has not yet taken in (wait_idle)
        # inbox samples worth a worker visit: fewer cannot make the stream ready (set by the worker from the mode's
        # ``samples_to_ready``; 0: every push is visited), so a stream costs about one intake visit per step
        self._need = 0
        self._listener: Callable[[], None] | None = None  # set_listener(): called (worker thread) on every signal
        self.taken_at_step = 0  # samples the mode had taken in when this stream's last step ran
        self._closed = False
        self._close_reason: ErrorEvent | None = None
        # worker side
        self.session = None  # trt_asr.streaming.session.StreamSession, made by the worker
        self._end_sent = False
        self._pending_error: ErrorEvent | None = None  # sent after the finals (idle_timeout, stream_too_long)
        self.ready_since: float | None = None
        self._ready_at: float | None = None
        self._undelivered = 0  # steps run for this stream whose events are not delivered yet
        self._stepped_ready_at: float | None = None
        self._stepped_taken = 0
        self.finished = False
        self.steps = 0
        # outbox
        self._events: deque = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_event: asyncio.Event | None = None  # set when events arrive or the stream closes
        self._async_space: asyncio.Event | None = None  # set when the inbox has room again
        self._cond = threading.Condition(scheduler._lock)

    # -------------------------------------------------------------- client API
    @property
    def buffered_seconds(self) -> float:
        return self._inbox_samples / self.scheduler.config.sample_rate

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def done(self) -> bool:
        """No more events will come (final or fatal error delivered to the queue)."""
        return self._closed or self.finished

    def has_room(self) -> bool:
        return self._inbox_samples < self.scheduler._buffer_samples

    def push(self, pcm, block: bool = True, timeout: float | None = None) -> bool:
        """Queue float32 mono samples at the scheduler's rate. Past the buffer bound: wait for room (block=True,
        up to ``timeout``), else return False without queueing (the caller keeps the audio: nothing is dropped)."""
        x = _as_array(pcm)
        sched = self.scheduler
        with sched._lock:
            self._check_open()
            if self._ended:
                raise StreamClosed("push() after end()", "stream_ended")
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self.has_room():
                if not block:
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 0.5)
                self._check_open()
            self._enqueue(x)
            sched._work = True  # _wake() without taking the lock a second time
            sched._wake_cond.notify_all()
        return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until the worker has taken all pushed audio and no step is pending for this stream (its events
        for that audio are then queued). For synchronous callers (the caption pipeline's per-stream thread)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.scheduler._lock:
            if self._unseen:  # audio short of a chunk is taken in only when asked for (push visits past _need)
                self.scheduler._touched[self.id] = self
                self.scheduler._work = True
                self.scheduler._wake_cond.notify_all()
            while not self.done and (self._unseen or self.ready_since is not None or self._undelivered):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.5 if left is None else min(left, 0.5))
        return True

    async def apush(self, pcm) -> None:
        """Async push: awaits room past the buffer bound (the caller stops reading its socket meanwhile)."""
        x = _as_array(pcm)
        self.attach_loop()
        sched = self.scheduler
        while True:
            with sched._lock:
                self._check_open()
                if self._ended:
                    raise StreamClosed("push() after end()", "stream_ended")
                if self.has_room():
                    self._enqueue(x)
                    break
                self._async_space.clear()
            await self._async_space.wait()
        sched._wake()

    def end(self) -> None:
        """No more audio: the remaining audio is decoded and the last event has ``final=True``."""
        with self.scheduler._lock:
            if self._closed or self._ended:
                return
            self._ended = True
            self._ended_at = time.monotonic()
            self.scheduler._touched[self.id] = self
        self.scheduler._wake()

    def close(self, reason: ErrorEvent | None = None) -> None:
        """Forget the stream now (e.g. the client disconnected): its audio is not decoded, its slot is freed."""
        self.scheduler._close_stream(self, reason, notify=reason is not None)

    def poll(self) -> list:
        with self.scheduler._lock:
            out = list(self._events)
            self._events.clear()
            return out

    def poll_state(self) -> tuple[list, int, bool]:
        """(events so far, samples taken in as of the last step, done) read together: ``done`` with all of its
        events in this batch means nothing more will come."""
        with self.scheduler._lock:
            out = list(self._events)
            self._events.clear()
            return out, self.taken_at_step, self.done

    def set_listener(self, callback: Callable[[], None] | None) -> None:
        """``callback()`` runs (in the scheduler's thread, under its lock: keep it short, e.g. queue a wake-up) when
        this stream gets events, gets room in its inbox, or ends; the non-blocking alternative to ``events()``."""
        self._listener = callback

    @property
    def queued_samples(self) -> int:
        return self._inbox_samples

    def events(self, timeout: float | None = None) -> Iterator:
        """Blocking iterator over events until the final (or a fatal error); stops early after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.scheduler._lock:
                while not self._events and not self.done:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return
                    self._cond.wait(left if left is not None else 0.5)
                batch = list(self._events)
                self._events.clear()
                finished = self.done and not self._events
            for ev in batch:
                yield ev
            if finished:
                return

    async def aevents(self):
        """Async iterator over events until the final (or a fatal error)."""
        self.attach_loop()
        while True:
            with self.scheduler._lock:
                batch = list(self._events)
                self._events.clear()
                finished = self.done
                if not batch and not finished:
                    self._async_event.clear()
            for ev in batch:
                yield ev
            if finished and not batch:
                with self.scheduler._lock:
                    if not self._events:
                        return
                continue
            if not batch:
                await self._async_event.wait()

    def attach_loop(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._loop is None:
            self._loop = loop or asyncio.get_running_loop()
            self._async_event = asyncio.Event()
            self._async_space = asyncio.Event()
            self._async_space.set()

    # -------------------------------------------------------------- internals (scheduler._lock held)
    def _check_open(self) -> None:
        if self._closed:
            r = self._close_reason
            raise StreamClosed(r.message if r else "stream is closed", r.code if r else "stream_closed")

    def _enqueue(self, x: np.ndarray) -> None:
        if not x.size:
            return
        self.last_audio_at = time.monotonic()
        self.samples_in += x.size
        self.scheduler._samples_in += x.size
        self._unseen = True
        self._inbox_samples += x.size
        if self._worth_a_visit():
            self.scheduler._touched[self.id] = self
        piece = self.scheduler._piece_samples
        now = self.last_audio_at
        if self._inbox and self._inbox[-1].size < piece:  # coalesce small client frames
            last = self._inbox[-1]
            n = last.size
            head = min(piece - n, x.size)
            buf = self._coalesce
            if buf is None or last.base is not buf:  # the piece is a client's array: into a buffer of our own
                buf = self._coalesce = np.empty(piece, np.float32)
                copy_into(buf, 0, last)
            copy_into(buf, n, x[:head])
            self._inbox[-1] = buf[:n + head]
            self._inbox_t[-1] = now
            x = x[head:]
        for i in range(0, x.size, piece):  # split big ones (views)
            self._inbox.append(x[i:i + piece])
            self._inbox_t.append(now)

    def _worth_a_visit(self) -> bool:
        """Queued audio that can make the stream ready, or a full inbox (taking audio in frees room for pushers
        that wait, whatever the mode needs: a bound below one chunk must not stall the stream)."""
        n = self._inbox_samples
        return n >= self._need or n >= self.scheduler._buffer_samples

    def _recount(self) -> None:
        self._inbox_samples = sum(p.size for p in self._inbox)  # deque of <= buffer/piece items

    def _pop_piece(self) -> np.ndarray | None:
        if not self._inbox:
            return None
        full = not self.has_room()
        p = self._inbox.popleft()
        self._last_arrival = self._inbox_t.popleft()
        self._inbox_samples -= p.size
        if full and self.has_room():  # only a full inbox has pushers waiting for room
            self._cond.notify_all()
            self._signal_async(space=True)
        return p

    def _deliver(self, events: list) -> None:
        self._events.extend(events)
        self._cond.notify_all()
        self._signal_async()

    def _signal_async(self, space: bool = False) -> None:
        if self._listener is not None:  # events delivered, room in the inbox, or the stream is gone
            self._listener()
        if self._loop is None:
            return
        ev = self._async_space if space else self._async_event
        try:
            self._loop.call_soon_threadsafe(ev.set)
        except RuntimeError:  # loop closed
            pass


def copy_into(dst: np.ndarray, at: int, src: np.ndarray) -> None:
    """dst[at:at + len(src)] = src (1-D, same dtype) as a memcpy that keeps the GIL: numpy lets it go for copies of
    more than a few hundred elements, and with client threads pushing audio every such release is a thread switch
    on a per-stream path (hundreds of thousands a second at a thousand streams)."""
    n = src.size
    if n:
        if not src.flags.c_contiguous:
            src = np.ascontiguousarray(src)
        memoryview(dst)[at:at + n] = memoryview(src)


def _service_key(st: ScheduledStream):
    return st.ready_since, st._order


def _snapshot(state):
    d = getattr(state, "__dict__", None)
    return dict(d) if d is not None else None


def _restore(state, snap) -> None:
    if snap is not None:
        state.__dict__.clear()
        state.__dict__.update(snap)


def _as_array(pcm) -> np.ndarray:
    if isinstance(pcm, torch.Tensor):
        x = pcm.detach().to("cpu", torch.float32).numpy()
    else:
        x = np.asarray(pcm, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected mono PCM [N], got shape {x.shape}")
    if x.size and not np.isfinite(x).all():
        raise ValueError("audio contains NaN or infinite samples")
    return np.ascontiguousarray(x)


# ----------------------------------------------------------------------------------------------- scheduler
class StreamScheduler:
    """Shares one ``Recognizer`` (its mode and engine) among many streams. See the module docstring.

    ``recognizer``: a ``trt_asr.streaming.session.Recognizer`` (or anything with ``open()`` returning sessions
    with ``state``, ``finish(step=False)``, ``_on_step(result)``, ``poll()`` and a ``mode``)."""

    def __init__(self, recognizer, config: SchedulerConfig | None = None,
                 on_step: Callable[[dict], None] | None = None):
        self.rec = recognizer
        self.mode = recognizer.mode
        self.config = config or SchedulerConfig(sample_rate=getattr(self.mode, "sample_rate", 16000))
        c = self.config
        self._lock = threading.RLock()
        self._wake_cond = threading.Condition(self._lock)
        self._work = False
        self._streams: dict[int, ScheduledStream] = {}
        # streams whose inbox, end or readiness may have changed since the last intake (under _lock): intake visits
        # only these (O(active), not O(open)); a full pass every ``_FULL_SCAN_S`` covers the idle timeouts
        self._touched: dict[int, ScheduledStream] = {}
        self._hold_until: float | None = None  # a step held for config.batch_wait until then
        self._next_full_scan = 0.0
        # streams seen ready and not stepped yet (worker thread only): a stream waiting for a step is not revisited
        self._ready: dict[int, ScheduledStream] = {}
        self._free_slots = list(range(c.max_streams - 1, -1, -1))
        self._next_id = 0
        self._seq = itertools.count()  # service order: ties in ready time go to the stream served longest ago
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._stop = False
        self._engine_lock = threading.Lock()  # one step at a time (worker thread or a synchronous caller)
        self._buffer_samples = max(1, int(c.max_buffer_seconds * c.sample_rate))
        self._piece_samples = max(1, int(c.piece_seconds * c.sample_rate))
        self.stats = SchedulerStats(c.latency_window)
        self.on_step = on_step
        self._push_numpy = bool(getattr(self.mode, "accepts_numpy", False))  # skip a tensor round trip per piece
        self._to_ready = getattr(self.mode, "samples_to_ready", None)  # optional: see ScheduledStream._need
        try:
            self._mode_pads = "pad_to" in inspect.signature(self.mode.step).parameters
        except (TypeError, ValueError):
            self._mode_pads = False
        # a mode with step_begin/step_end: the next step's intake runs during this step's device work
        self._overlap = callable(getattr(self.mode, "step_begin", None)) and callable(getattr(self.mode, "step_end",
                                                                                              None))
        self._pending: list[tuple] = []  # steps run whose events are not yet delivered (worker thread only)
        self._ready_seen = 0  # streams ready when the step being run was chosen (statistics)
        self._samples_in = 0  # audio pushed into all streams so far (statistics: the arrival rate)

    # -------------------------------------------------------------- client API
    def open(self) -> ScheduledStream:
        with self._lock:
            if not self._accepting:
                self.stats.refused += 1
                raise AdmissionError("server is shutting down; no new streams", "shutting_down")
            if not self._free_slots:
                self.stats.refused += 1
                raise AdmissionError(f"server at capacity ({self.config.max_streams} concurrent streams); "
                                     f"retry later", "capacity")
            st = ScheduledStream(self, self._next_id, self._free_slots.pop())
            st._order = next(self._seq)
            self._next_id += 1
            self._streams[st.id] = st
            self._touched[st.id] = st
            self.stats.opened += 1
            self.stats.max_open = max(self.stats.max_open, len(self._streams))
        self._wake()
        return st

    @property
    def open_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    @property
    def capacity_left(self) -> int:
        with self._lock:
            return len(self._free_slots)

    def start(self) -> "StreamScheduler":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="trt-asr-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting; with ``drain`` end every stream and step until all have their finals (up to
        ``timeout`` s); streams left then get ``ErrorEvent('shutdown')``. Stops the worker thread."""
        with self._lock:
            self._accepting = False
            streams = list(self._streams.values())
        if drain:
            for st in streams:
                st.end()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with self._lock:
                    if not self._streams:
                        break
                if self._thread is None or not self._thread.is_alive():
                    self.step()
                else:
                    time.sleep(0.01)
        with self._lock:
            left = list(self._streams.values())
        for st in left:
            self._close_stream(st, ErrorEvent("shutdown", "server shut down before the stream finished"))
        self._stop = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def run_until_idle(self, max_steps: int = 1_000_000) -> int:
        """Synchronous driving (tests, in-process bench): step until nothing is ready. Returns steps run."""
        n = 0
        while n < max_steps and self.step(hold=False):
            n += 1
        return n

    # -------------------------------------------------------------- the worker
    def _wake(self) -> None:
        with self._lock:
            self._work = True
            self._wake_cond.notify_all()

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop:
            try:
                n = self.step()
            except Exception as e:  # never let the worker die; the step already isolated stream errors
                self.stats.error("scheduler_error")
                n = 0
                time.sleep(0.01)
                _ = e
            if n == 0:
                with self._lock:
                    if not self._work and not self._stop:
                        hold = self._hold_until
                        self._wake_cond.wait(0.05 if hold is None else min(0.05, max(0.0, hold - time.monotonic())))
                    self._work = False
        with self._engine_lock:  # nothing run is left undelivered
            self._deliver_pending()

    def step(self, hold: bool = True) -> int:
        """Intake + housekeeping + ONE batched step of the oldest-ready streams. Returns streams stepped (0: none
        ready, or held for ``batch_wait``; intake may still have happened). ``hold=False``: never wait for a
        fuller batch."""
        with self._engine_lock:
            t0 = time.perf_counter()
            now = time.monotonic()
            self._intake(now)
            ready = self._ready
            gone = [i for i, st in ready.items() if st._closed or st.finished]
            for i in gone:
                del ready[i]
            self.stats.phase_seconds["intake"] += time.perf_counter() - t0
            self._hold_until = None
            if not ready:
                self._deliver_pending()
                return 0
            wait = self.config.batch_wait
            if hold and wait > 0 and len(ready) < self.config.max_batch:
                until = min(st._ready_at or now for st in ready.values()) + wait
                # a fuller step is worth the wait (the shape costs the same), but not for a stream that ended: no
                # audio will come to it, and its client waits for the final
                if time.monotonic() < until and not any(st._ended for st in ready.values()):
                    self._hold_until = until
                    self._deliver_pending()
                    return 0
            # FIFO: oldest ready, then longest unserved
            if len(ready) <= self.config.max_batch:
                batch = sorted(ready.values(), key=_service_key)
            else:
                batch = heapq.nsmallest(self.config.max_batch, ready.values(), key=_service_key)
            self._ready_seen = len(ready)
            for st in batch:
                del ready[st.id]
            self._run_batch(batch)
            # its events now, before the next step's intake and launch: delivered during the next step's device
            # work they waited for both (~9 ms on the H100 at 256 streams), and delivery itself is ~0.5 ms a step
            t1 = time.perf_counter()
            self._deliver_pending()
            self.stats.phase_seconds["deliver"] += time.perf_counter() - t1
            # they may be ready again: visited next intake only if the mode already holds the next chunk (need 0),
            # or enough audio is queued for it, or they ended (a full visit per stream and step costs as much as the
            # rest of the intake)
            to_ready = self._to_ready
            with self._lock:
                for st in batch:
                    if st._closed or st.finished:
                        continue
                    need = 0 if to_ready is None or st.session is None else to_ready(st.session.state)
                    st._need = need
                    if st._ended or st._worth_a_visit():
                        self._touched[st.id] = st
            return len(batch)

    _FULL_SCAN_S = 0.25

    def _intake(self, now: float, busy: frozenset | set = frozenset()) -> None:
        """Move queued audio into the mode for the streams that may have changed (``_touched``) and add the ones
        that are ready to ``_ready``. ``busy``: ids of a step in flight (their state is the mode's until it ends:
        they stay touched for the next intake)."""
        c = self.config
        with self._lock:
            touched = self._touched
            if busy:
                streams = [st for i, st in touched.items() if i not in busy]
                self._touched = {i: st for i, st in touched.items() if i in busy}
            else:
                streams = list(touched.values())
                self._touched = {}
            if now >= self._next_full_scan:  # idle timeouts of streams that sent nothing (nothing touched them)
                it = self._FULL_SCAN_S if c.idle_timeout is None else min(self._FULL_SCAN_S, c.idle_timeout / 4)
                self._next_full_scan = now + it
                if c.idle_timeout is not None:
                    streams += [st for i, st in self._streams.items() if i not in touched and i not in busy
                                and not st._ended and now - st.last_audio_at > c.idle_timeout]
        ready = self._ready
        for st in streams:
            if st._closed:
                continue
            try:
                if st.session is None:
                    st.session = self.rec.open()
                state = st.session.state
                # move audio into the mode until a step would make progress (the rest stays in the bounded inbox)
                while not self.mode.ready(state):
                    with self._lock:
                        piece = st._pop_piece()
                        ended = st._ended and not st._inbox
                    if piece is None:
                        if ended and not st._end_sent:
                            st._end_sent = True
                            st.session.finish(step=False)
                            continue
                        break
                    if c.max_stream_seconds is not None and st.samples_in > c.max_stream_seconds * c.sample_rate:
                        self._end_with(st, "stream_too_long",
                                       f"stream longer than the limit of {c.max_stream_seconds:g} s; ended")
                        break
                    self.mode.push(state, piece if self._push_numpy else torch.from_numpy(piece))
                if not st._ended and c.idle_timeout is not None and now - st.last_audio_at > c.idle_timeout:
                    self._end_with(st, "idle_timeout", f"no audio for {c.idle_timeout:g} s; stream ended")
                is_ready = self.mode.ready(state) and not st.finished
                if is_ready:
                    if st.ready_since is None:  # scheduling order: when the scheduler saw it ready (round robin)
                        st.ready_since = now
                        # latency: ready since the newest audio it holds arrived (or it ended)
                        st._ready_at = min(now, max(st._last_arrival, st._ended_at or 0.0))
                    ready[st.id] = st
                need = 0 if is_ready or self._to_ready is None else self._to_ready(state)
                with self._lock:
                    st._need = need
                    if st._inbox and not is_ready and st._worth_a_visit():  # audio came in meanwhile
                        self._touched[st.id] = st
                    if st._unseen and not st._inbox:  # wait_idle(): all audio taken in; a step is pending iff
                        st._unseen = False            # ready_since
                        st._cond.notify_all()
            except Exception as e:  # a bad stream (e.g. its mode state) never stops the others
                self._close_stream(st, ErrorEvent("engine_error", f"stream {st.id}: {type(e).__name__}: {e}"))

    def _end_with(self, st: ScheduledStream, code: str, message: str) -> None:
        """End the stream now (its audio so far is decoded and finalized), then a non-transcript error."""
        with self._lock:
            st._ended = True
            st._inbox.clear()
            st._inbox_t.clear()
            st._recount()
            st._pending_error = ErrorEvent(code, message)
        if not st._end_sent and st.session is not None:
            st._end_sent = True
            st.session.finish(step=False)
        self.stats.error(code)

    def _run_batch(self, batch: list[ScheduledStream]) -> None:
        """ONE mode step for the batch. Its events are built and delivered by ``_deliver_pending`` (the caller's,
        right after). With a mode that splits its step (``step_begin`` launches the device work, ``step_end`` waits
        and commits), the next step's intake runs while this step's device work does."""
        t0 = time.perf_counter()
        states = [st.session.state for st in batch]
        # shallow snapshot: the modes replace (never mutate in place) a stream's tensors, so restoring the attribute
        # dict undoes a step that raised half-way; the retry alone is then exactly the step that failed
        saved = [_snapshot(x) for x in states]
        failed: list[tuple[ScheduledStream, Exception]] = []
        try:
            if self._overlap:
                phase = self.stats.phase_seconds
                handle = self.mode.step_begin(states)
                t1 = time.perf_counter()
                self._deliver_pending()  # (none left: each step's events go out right after it)
                t2 = time.perf_counter()
                # and the next step's intake (not this batch: its state is the mode's until step_end)
                self._intake(time.monotonic(), busy={st.id for st in batch})
                t3 = time.perf_counter()
                results = self.mode.step_end(handle)
                phase["launch"] += t1 - t0
                phase["deliver"] += t2 - t1
                phase["intake_ahead"] += t3 - t2
                phase["wait_commit"] += time.perf_counter() - t3
            else:
                results = self._mode_step(states)
            if len(results) != len(states):
                raise RuntimeError(f"mode returned {len(results)} results for {len(states)} streams")
            pairs = list(zip(batch, results))
        except Exception as batch_error:  # isolate: retry one by one, only the culprits fail
            self._deliver_pending()
            pairs = []
            for x, snap in zip(states, saved):
                _restore(x, snap)
            if len(batch) == 1:
                failed.append((batch[0], batch_error))
            else:
                for st, snap in zip(batch, saved):
                    try:
                        pairs.append((st, self._mode_step([st.session.state])[0]))
                    except Exception as e:
                        _restore(st.session.state, snap)
                        failed.append((st, e))
        dt = time.perf_counter() - t0
        s = self.stats
        s.steps += 1
        s.stepped_streams += len(batch)
        s.step_seconds.append(dt)
        s.batch_sizes.append(len(batch))
        s.busy_seconds += dt
        streams = list(self._streams.values())  # statistics: one pass over the open streams' counters per step
        queued = sum(st._inbox_samples for st in streams) / (max(len(streams), 1) * self.config.sample_rate)
        s.note_step(time.monotonic(), self._ready_seen or len(batch), len(batch), dt, queued,
                    self._samples_in / self.config.sample_rate)
        self._ready_seen = 0
        # what must be settled before the next intake: the next chunk's ready time, the samples this step took in
        with self._lock:
            for st, _ in pairs:
                st._stepped_ready_at = st._ready_at
                st._stepped_taken = st.samples_in - st._inbox_samples
                st._undelivered += 1
                st.steps += 1
                st._order = next(self._seq)  # service order (fairness ties) as of this step
                st.ready_since = None
                st._ready_at = None
        self._pending.append((pairs, failed, len(batch), dt))

    def _deliver_pending(self) -> None:
        """Events of the steps run so far (session bookkeeping, detokenising, delivery to the clients)."""
        while self._pending:
            pairs, failed, n, dt = self._pending.pop(0)
            now = time.monotonic()
            s = self.stats
            for st, result in pairs:
                try:
                    st.session._on_step(result)
                    events = st.session.poll()
                except Exception as e:
                    with self._lock:
                        st._undelivered -= 1
                    failed.append((st, e))
                    continue
                s.note_latency(now, now - (st._stepped_ready_at or now))
                if result.finished and st._pending_error is not None:
                    events.append(st._pending_error)
                with self._lock:
                    st._undelivered -= 1
                    if st._closed:  # closed by the client while it was being stepped
                        continue
                    overflow = len(st._events) + len(events) > self.config.max_pending_events
                    if not overflow:
                        st.finished = bool(result.finished)  # with the events, under the lock: readers see both
                        st.taken_at_step = st._stepped_taken
                        st._deliver(events)
                if overflow:
                    self._close_stream(st, ErrorEvent("client_not_reading",
                                                      f"more than {self.config.max_pending_events} unread events"))
                elif st.finished:
                    self._release(st)
            for st, e in failed:
                self._close_stream(st, ErrorEvent("engine_error", f"step failed for stream {st.id}: "
                                                                  f"{type(e).__name__}: {e}"))
            if self.on_step is not None:
                self.on_step({"batch": n, "seconds": dt, "failed": len(failed)})

    def _mode_step(self, states):
        if self._mode_pads:
            return self.mode.step(states, pad_to=bucket_for(len(states), self.config.batch_buckets))
        return self.mode.step(states)

    def _release(self, st: ScheduledStream) -> None:
        release = getattr(self.mode, "release", None)  # modes with pooled device state free the stream's slot
        if release is not None and st.session is not None:
            try:
                release(st.session.state)
            except Exception:
                pass
        with self._lock:
            if self._streams.pop(st.id, None) is not None:
                self._free_slots.append(st.slot)
            st._cond.notify_all()
            st._signal_async()
            st._signal_async(space=True)

    def _close_stream(self, st: ScheduledStream, reason: ErrorEvent | None, notify: bool = True) -> None:
        with self._lock:
            if st._closed:
                return
            st._closed = True
            st._close_reason = reason
            st._inbox.clear()
            st._inbox_t.clear()
            st._recount()
            if reason is not None and notify:
                st._events.append(reason)
                self.stats.error(reason.code)
        if st.session is not None:
            try:
                st.session.close()  # the recognizer forgets it (a dict pop; the mode keeps no other reference)
            except Exception:
                pass
        self._release(st)


def ceil_steps(ready: int, max_batch: int) -> int:
    """Upper bound on the steps a ready stream waits (fairness)."""
    return math.ceil(ready / max_batch)


# ----------------------------------------------------------------------------------------------- pooled cache-aware
def pooled_cache_aware_mode(model, capacity: int = 64, buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128),
                            **params):
    """A ``CacheAwareMode`` whose per-stream device state (encoder caches, decoder LSTM state, projected prediction
    output, last label, time jump) lives in a ``SlotPool``: each step gathers the batch's rows into pre-allocated
    bucket-sized buffers, runs the engine and the decoder on the whole bucket (padding rows repeat a real stream and
    are never written back) and scatters the new state back in place. Same tokens as ``CacheAwareMode``."""
    import weakref

    from ..decoding.greedy import DecoderState
    from .cache_aware import CacheAwareMode, CacheAwareStreamState, initial_caches

    class PooledCacheAwareMode(CacheAwareMode):
        name = "cache_aware"

        def __init__(self):
            super().__init__(model, **params)
            device, dtype = model.device, model.dtype
            caches = initial_caches(self.params, 1, device, dtype)
            dec = self.decoder.initial_state(1, device, dtype)
            h, c = dec.lstm
            init = {**{k: v[0] for k, v in caches.items()}, "h": h[:, 0], "c": c[:, 0], "pred_out": dec.pred_out[0],
                    "last_label": dec.last_label[0], "time_jump": dec.time_jump[0]}
            self.pool = SlotPool(capacity, {k: (tuple(v.shape), v.dtype) for k, v in init.items()}, device,
                                 buckets, init=init)
            self.buckets = self.pool.buckets

        def new_stream(self):
            s = CacheAwareStreamState(self.params, None, self.params.feat_in, self._new_front())
            s.slot = self.pool.acquire()
            s._free_slot = weakref.finalize(s, self.pool.release, s.slot)  # runs once: release() or garbage
            return s

        def release(self, s) -> None:
            """The stream is gone (finished, closed, failed): its slot goes back to the pool."""
            fin = getattr(s, "_free_slot", None)
            if fin is not None:
                fin()

        def _step_group(self, group, first: bool):
            device, dtype = self.model.device, self.model.dtype
            audio, lengths = self._take_chunks(group, first)
            n = len(group)
            slots = [s.slot for s in group]
            st = self.pool.gather(slots)  # bucket rows: [n real | padding copies of the first]
            b = next(iter(st.values())).shape[0]
            audio += [audio[0]] * (b - n)
            lengths += [lengths[0]] * (b - n)
            inputs = {"audio_signal": torch.stack(audio).to(device, dtype),
                      "length": torch.tensor(lengths, dtype=torch.long, device=device),
                      "cache_last_channel": st["cache_last_channel"], "cache_last_time": st["cache_last_time"],
                      "cache_last_channel_len": st["cache_last_channel_len"]}
            out = self.engine.step(inputs)
            state = DecoderState((st["h"].transpose(0, 1).contiguous(), st["c"].transpose(0, 1).contiguous()),
                                 st["pred_out"],
                                 st["last_label"], st["time_jump"])
            tokens, state = self.decoder(out["encoder_output"], out["encoded_lengths"], state)
            h, c = state.lstm
            self.pool.scatter(slots, {"cache_last_channel": out["cache_last_channel_next"],
                                      "cache_last_time": out["cache_last_time_next"],
                                      "cache_last_channel_len": out["cache_last_channel_next_len"],
                                      "h": h.transpose(0, 1), "c": c.transpose(0, 1), "pred_out": state.pred_out,
                                      "last_label": state.last_label, "time_jump": state.time_jump})
            enc_len = out["encoded_lengths"][:n].tolist()
            results = []
            for s, toks, el in zip(group, tokens.to_lists()[:n], enc_len):
                results.append([(lab, s.frames_done + fr, d) for lab, fr, d in toks])
                s.frames_done += int(el)
                s.chunks_done += 1
            return results

    return PooledCacheAwareMode()


# ----------------------------------------------------------------------------------------------- caption adapter
class CaptionSchedulerPool:
    """Drop-in for ``trt_asr.captions.recognizer.SharedRecognizer`` (what ``CaptionService`` opens per caption
    stream) that runs every stream through one ``StreamScheduler`` instead of stepping the shared ``Recognizer``
    under a lock from each stream's own thread: one worker, FIFO batches, bounded inboxes (a stream's ``feed``
    blocks past ``max_buffer_seconds``: backpressure up to the server's socket), admission, isolation.

        svc = CaptionService(model, "buffered", params)
        svc._shared = CaptionSchedulerPool(model, "buffered", **params)   # until CaptionService takes it directly
    """

    def __init__(self, model, mode: str = "buffered", config: SchedulerConfig | None = None, state: str = "auto",
                 **params):
        """``state`` (cache-aware): "batched" (``BatchedCacheAwareMode``: the whole step on the device), "per-stream"
        (``CacheAwareMode``) or "auto" (batched when the model's features are unnormalised, as it needs)."""
        from .session import Recognizer

        self.model = model
        self.mode_name = mode
        self.params = params
        if mode.replace("-", "_") == "cache_aware" and (
                state == "batched" or (state == "auto" and not model.cfg.preprocessor.normalize)):
            from .batched_cache_aware import BatchedCacheAwareMode

            self.recognizer = Recognizer(model, BatchedCacheAwareMode(model, **params), events="tokens")
        else:
            self.recognizer = Recognizer(model, mode.replace("-", "_"), events="tokens", **params)
        # admission is the server's (--max-sessions); the scheduler's own bound only guards memory
        cfg = config or SchedulerConfig(sample_rate=self.recognizer.mode.sample_rate, idle_timeout=None,
                                        max_streams=1024)
        self.scheduler = StreamScheduler(self.recognizer, cfg).start()
        self._dispatcher = None

    def open(self) -> "_CaptionStream":
        return _CaptionStream(self, self.scheduler.open())

    @property
    def dispatcher(self):
        """The thread that services this pool's ``ScheduledCaptionPipeline``s (made on first use)."""
        if self._dispatcher is None:
            from ..captions.pipeline import CaptionDispatcher

            self._dispatcher = CaptionDispatcher()
        return self._dispatcher

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        self.scheduler.stop(drain=drain, timeout=timeout)
        if self._dispatcher is not None:  # after the drain: the streams' finals have been handled
            self._dispatcher.stop()


class _CaptionStream:
    """``trt_asr.captions.recognizer.StreamingRecognizer`` over one scheduled stream (same hypotheses as
    ``SessionRecognizer``: committed tokens are engine-final, the tentative tail is revisable)."""

    def __init__(self, pool: CaptionSchedulerPool, stream: ScheduledStream):
        self.pool = pool
        self.stream = stream
        self.model = pool.model
        self.mode = pool.mode_name
        self.sample_rate = pool.recognizer.mode.sample_rate
        self._fs = pool.recognizer.mode.frame_seconds
        self._received = 0
        self._committed: list = []  # captions Tokens
        self._tentative: list = []

    def _token(self, t):
        from ..captions.recognizer import caption_token

        return caption_token(self.model, self._fs, t)

    def _take(self, events) -> list:
        out = []
        for ev in events:
            if isinstance(ev, ErrorEvent):
                raise SchedulerError(ev.message, ev.code)
            self._committed.extend(self._token(t) for t in ev.committed)
            self._tentative = [self._token(t) for t in ev.tentative]
            out.append(ev)
        return out

    def _hyp(self, events, last: bool):
        from ..captions.transcript import Hypothesis

        if not events and not last:
            return None
        from ..captions.recognizer import stream_horizon

        state = self.stream.session.state if self.stream.session is not None else None
        edge, final_until = stream_horizon(state, self._received, self.sample_rate, self._fs, self.mode, last)
        tentative = [] if last else self._tentative
        return Hypothesis(self._committed + tentative, len(self._committed), edge, last, final_until)

    def feed(self, audio: np.ndarray):
        audio = np.asarray(audio, np.float32)
        if audio.size:
            self._received += int(audio.size)
            self.stream.push(audio)  # blocks past the buffer bound (backpressure)
            self.stream.wait_idle(timeout=60)  # its step (batched with every other ready stream) has run
        return self._hyp(self._take(self.stream.poll()), False)

    finish_takes_audio = True  # CaptionPipeline hands the last audio to finish(): no wait for its own step

    # ---- non-blocking interface (ScheduledCaptionPipeline: no thread per stream)
    def on_events(self, callback) -> None:
        self.stream.set_listener(callback)

    def submit(self, audio: np.ndarray) -> bool:
        """Queue audio without waiting; False (nothing queued) when the stream's bounded inbox is full."""
        audio = np.asarray(audio, np.float32)
        if not audio.size:
            return True
        return self.stream.push(audio, block=False)

    def queued_samples(self) -> int:
        return self.stream.queued_samples

    def end(self) -> None:
        self.stream.end()

    def take(self):
        """(hypothesis or None, finished) from the events delivered so far; the live edge is the audio the
        scheduler had taken in at the stream's last step."""
        events, taken, done = self.stream.poll_state()
        self._received = max(self._received, int(taken))
        events = self._take(events)
        if done:
            return self._hyp([], True), True
        return self._hyp(events, False), False

    def finish(self, audio: np.ndarray | None = None):
        if audio is not None and audio.size:
            audio = np.asarray(audio, np.float32)
            self._received += int(audio.size)
            self.stream.push(audio)
        self.stream.end()
        self._take(list(self.stream.events(timeout=600)))
        return self._hyp([], True)

    def close(self) -> None:
        self.stream.close()
