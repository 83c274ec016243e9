"""Front-end processes and engine processes: ``serve --workers N --engines M``.

Why: a server process runs the WebSocket event loop, the caption dispatcher and the scheduler under one GIL, and past
~300 cache-aware streams that one interpreter is the limit (docs/capacity.md, runs 84-97). ``--workers`` alone makes
N copies of everything, model included. With ``--engines M`` the work is split by role instead:

* an **engine process** (``EngineHost``) owns a model, one ``StreamScheduler`` (its slot pool, CUDA graphs, steps)
  and nothing else: no sockets to clients, no captions, no JSON;
* a **front-end process** (``RemoteCaptionPool``, one per ``--workers``) serves the WebSockets, runs each stream's
  DSP, caption state and events, and opens every stream on the engine that has the fewest of its streams.

Front-end and engine talk over an authenticated local socket (``multiprocessing.connection``), in batched messages
both ways. In a server, a front-end serves its links from its event loop (``attach_loop``: reads, writes and the
caption dispatch are callbacks of the loop that serves the WebSockets, with no thread hand-off on a stream's path);
elsewhere (tests, tools) a sender and a receiver thread per link. An engine sends each step's updates from its
scheduler's thread right after the step, and the rest (refused opens, offline results) from a writer thread:

    front-end -> engine   ("open", fid)  ("push", fid, float32 bytes)  ("end", fid)  ("close", fid)
                          ("transcribe", rid, float32 bytes)                       offline POST, run on the engine
    engine -> front-end   ("update", fid, events, taken, done, consumed, left_sample, frames_decoded)
                          ("transcribed", rid, ok, Transcript or message)
                          ("hello", info) once, on connect: model config, tokenizer, mode, sample rate

A stream's captions are the same as in one process: the front-end's ``RemoteStream`` offers the ``ScheduledStream``
calls the caption adapter uses (push, end, close, poll_state, set_listener), and each update carries what those
read there (the step's events, the samples taken in, done, the mode's live edge).

Backpressure is by credit: a front-end keeps the audio it sent that the engine has not taken into its mode
(``sent - consumed``) under the scheduler's ``max_buffer_seconds`` and refuses more (``submit`` returns False, the
socket is not read) until an update frees room. The engine's own inbox takes ``ENGINE_SLACK_S`` more, so it never
refuses a push: nothing is dropped. ``consumed`` comes with each update (every step of the stream); audio taken in
without a step (less than a chunk) is reported with the next step, so the bound must be at least twice the audio a
stream needs to become ready (the default 20 s is far above it). If an engine goes away, its streams end with
``engine_unavailable``.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import pickle
import socket
import struct
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener, wait
from types import SimpleNamespace
from typing import Callable, NamedTuple

import numpy as np

from ..streaming.scheduler import ErrorEvent, StreamClosed

logger = logging.getLogger("trt_asr.serving")

# once woken, a sender thread lets more queue for this long before it sends (fewer, larger messages: each message
# wakes a thread on the other side, and each wake-up takes the GIL from that process's scheduler or event loop)
SEND_COALESCE_S = 0.002  # front-end -> engine (audio: every client frame of every stream)
WRITE_COALESCE_S = 0.001  # engine -> front-end (updates: come in bursts, one per stepped stream)
READ_BATCH_S = 0.002  # an engine's reader, after serving the connections that were ready, waits this long
ENGINE_SLACK_S = 10.0  # the engine's inbox bound is the front-end's plus this: it never refuses a push


@dataclass(frozen=True)
class EngineAddresses:
    """Where the engine processes listen, and the key a front-end proves itself with."""

    paths: tuple[str, ...]
    authkey: bytes


def engine_addresses(count: int) -> EngineAddresses:
    """``count`` fresh Unix-socket paths in a private temporary folder, and a random key."""
    folder = tempfile.mkdtemp(prefix="trt-asr-engines-")
    return EngineAddresses(tuple(os.path.join(folder, f"engine-{i}.sock") for i in range(count)), os.urandom(32))


class Tok(NamedTuple):
    """A streaming token as it crosses the process boundary (what ``caption_token`` reads)."""

    id: int
    frame: int
    duration: int


class RemoteEvent(NamedTuple):
    """A scheduler ``StreamEvent`` as the caption adapter reads it: the step's committed tokens, the tentative tail."""

    committed: list
    tentative: list
    final: bool = False


def _pack_events(events: list) -> list:
    out = []
    for ev in events:
        if isinstance(ev, ErrorEvent):
            out.append(("err", ev.code, ev.message, ev.fatal))
        else:
            out.append(("ev", [(int(t.id), int(t.frame), int(t.duration)) for t in ev.committed],
                        [(int(t.id), int(t.frame), int(t.duration)) for t in ev.tentative], bool(ev.final)))
    return out


def _wake(event: threading.Event) -> None:
    """``event.set()`` unless it is set already (a sender is coalescing: the lock and notify are not needed; the
    sender clears the event before it takes the queue, so nothing appended after that is missed)."""
    if not event.is_set():
        event.set()


def _hang_up(conn) -> None:
    """Shut the connection's socket down, then close it: a thread blocked reading it (ours) wakes with EOF and the
    other process sees EOF at once (a bare close leaves a blocked reader, and with it the socket, alive)."""
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        conn.close()
    except OSError:
        pass


def _unpack_events(packed: list) -> list:
    out = []
    for e in packed:
        if e[0] == "err":
            out.append(ErrorEvent(e[1], e[2], e[3]))
        else:
            out.append(RemoteEvent([Tok(*t) for t in e[1]], [Tok(*t) for t in e[2]], e[3]))
    return out


# ----------------------------------------------------------------------------------------------- engine side
class EngineHost:
    """Serves one ``StreamScheduler`` (a ``CaptionSchedulerPool``'s) to front-end processes.

        host = EngineHost(service)              # a CaptionService whose pool is a CaptionSchedulerPool (warmed up)
        host.start(Listener(path, family="AF_UNIX", authkey=key))
        ...
        host.stop(drain_timeout=30)             # streams still open get their finals first

    Two threads serve every front-end, whatever their number: one reads all connections, one writes what the
    scheduler's thread did not send itself (each step's updates leave from there, right after the step). The
    scheduler's thread needs the GIL for each step's host work, and every thread that wakes on I/O takes the GIL
    from it (a thread per connection and side, 16 for 8 front-ends, halved an engine's capacity on the H100); each
    of the two also waits a moment after waking, so that one wake-up serves many messages."""

    def __init__(self, service):
        self.service = service
        self.pool = service._shared
        self.scheduler = self.pool.scheduler
        model = service.model
        tok = getattr(model, "tokenizer", None)
        cfg = self.scheduler.config
        self.info = {"model_name": service.model_name, "cfg": model.cfg, "mode": service.mode,
                     "params": service.info().get("params", {}),
                     "tokenizer": tok.model_bytes if tok is not None else None,
                     "sample_rate": self.pool.recognizer.mode.sample_rate,
                     "frame_seconds": self.pool.recognizer.mode.frame_seconds,
                     # the front-end's credit: the scheduler's bound (the engine's inbox takes ENGINE_SLACK_S more)
                     "max_buffer_seconds": cfg.max_buffer_seconds,
                     "pid": os.getpid()}
        self.scheduler._buffer_samples = int((cfg.max_buffer_seconds + ENGINE_SLACK_S) * cfg.sample_rate)
        self._links: list[_EngineSideLink] = []
        self._listener = None
        self._wake = threading.Event()  # the writer: some link has marks or messages
        self._stopped = False
        self._offline_lock = threading.Lock()
        self._transcriber = None

    def start(self, listener: Listener) -> "EngineHost":
        self._listener = listener
        # each step's updates leave from the scheduler's thread as soon as its events are delivered: the writer
        # thread would wait for the GIL behind the next step's intake and launch (the writer stays for what comes
        # between steps: refused opens, closes, offline results)
        previous = self.scheduler.on_step

        def after_step(info: dict) -> None:
            if previous is not None:
                previous(info)
            self._flush_all()

        self.scheduler.on_step = after_step
        for target, name in ((self._accept, "engine-accept"), (self._read, "engine-read"),
                             (self._write, "engine-write")):
            threading.Thread(target=target, name=name, daemon=True).start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
            except (OSError, EOFError):
                return  # closed by stop()
            except Exception as e:  # a client with the wrong key: refuse it, keep listening
                logger.warning("engine: refused a connection: %s", e)
                continue
            link = _EngineSideLink(self, conn)
            try:
                conn.send(("hello", self.info))
            except OSError:
                continue
            self._links = [*self._links, link]  # replaced, not appended to: the reader iterates a snapshot

    def _read(self) -> None:
        while not self._stopped:
            links = [link for link in self._links if not link.closed]
            if not links:
                time.sleep(0.05)
                continue
            by_conn = {link.conn: link for link in links}
            try:
                ready = wait(list(by_conn), timeout=0.05)
            except OSError:
                ready = []
            for conn in ready:
                link = by_conn[conn]
                try:
                    for _ in range(8):  # what this front-end sent so far, a bounded share per round (fairness)
                        for op in conn.recv():
                            link.apply(op)
                        if not conn.poll(0):
                            break
                except (EOFError, OSError):
                    link.front_end_gone()
            if ready:
                time.sleep(READ_BATCH_S)

    def _write(self) -> None:
        while not self._stopped:
            self._wake.wait()
            time.sleep(WRITE_COALESCE_S)
            self._flush_all()

    def _flush_all(self) -> None:
        self._wake.clear()  # first: a mark made from here on wakes the writer again
        for link in self._links:
            if not link.closed:
                link.flush()

    def transcribe(self, audio: np.ndarray):
        from ..transcribe import Transcriber

        with self._offline_lock:
            if self._transcriber is None:
                self._transcriber = Transcriber(self.service.model)
            return self._transcriber.transcribe_arrays([audio], ["upload"])[0]

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting; streams still open (their front-end went away first) are ended and stepped to their
        finals for up to ``drain_timeout`` s; then the scheduler stops."""
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        self.pool.stop(drain=True, timeout=drain_timeout)
        self._stopped = True
        self._wake.set()
        for link in self._links:
            link.close()


class _EngineSideLink:
    """One front-end's connection: its ops applied to the scheduler (``apply``, from the host's reader thread), the
    updates of its streams that the scheduler signalled (events, room, end) sent by ``flush`` (the writer)."""

    def __init__(self, host: EngineHost, conn):
        self.host = host
        self.sched = host.scheduler
        self.conn = conn
        self.streams: dict[int, object] = {}  # fid -> ScheduledStream
        self._marks: deque[int] = deque()  # fids signalled by the scheduler (appended under its lock)
        self._outbox: deque = deque()  # ready-made messages (refused opens, offline results)
        self._send_lock = threading.Lock()  # flush() from the scheduler's thread and the writer: one at a time,
        self.closed = False                 # so a stream's updates leave in the order they were taken

    def _mark(self, fid: int) -> None:  # scheduler thread, under its lock: keep it short
        self._marks.append(fid)
        _wake(self.host._wake)

    def _post(self, msg) -> None:
        self._outbox.append(msg)
        _wake(self.host._wake)

    def apply(self, op) -> None:
        kind, fid = op[0], op[1]
        if kind == "push":
            st = self.streams.get(fid)
            if st is None:
                return  # closed meanwhile; the front-end learns it from the stream's last update
            try:
                if not st.push(np.frombuffer(op[2], np.float32), block=False):
                    st.close(ErrorEvent("engine_error", "the engine's inbox overflowed (front-end credit broken)"))
            except (StreamClosed, ValueError) as e:  # ended / closed by the scheduler, or bad samples
                if isinstance(e, ValueError):
                    st.close(ErrorEvent("bad_audio", str(e)))
        elif kind == "open":
            try:
                st = self.sched.open()
            except Exception as e:  # AdmissionError: capacity / shutting_down
                code = getattr(e, "code", "engine_error")
                self._post(("update", fid, [("err", code, str(e), True)], 0, True, 0, None, None))
                return
            self.streams[fid] = st
            st.set_listener(lambda fid=fid: self._mark(fid))
        elif kind == "end":
            st = self.streams.get(fid)
            if st is not None:
                st.end()
        elif kind == "close":
            st = self.streams.pop(fid, None)
            if st is not None:
                st.set_listener(None)
                st.close()
        elif kind == "transcribe":
            threading.Thread(target=self._transcribe, args=(fid, op[2]), daemon=True).start()

    def _transcribe(self, rid: int, data: bytes) -> None:
        try:
            msg = ("transcribed", rid, True, self.host.transcribe(np.frombuffer(data, np.float32).copy()))
        except Exception as e:
            msg = ("transcribed", rid, False, f"{type(e).__name__}: {e}")
        self._post(msg)

    def flush(self) -> None:
        """Send what queued and one update per signalled stream, in one message."""
        with self._send_lock:
            self._flush()

    def _flush(self) -> None:
        sched = self.sched
        batch = []
        while self._outbox:
            batch.append(self._outbox.popleft())
        seen = set()
        while self._marks:
            fid = self._marks.popleft()
            if fid in seen:
                continue
            seen.add(fid)
            st = self.streams.get(fid)
            if st is None:
                continue
            with sched._lock:  # one consistent view, as ScheduledStream.poll_state
                events = list(st._events)
                st._events.clear()
                done = st.done
                consumed = st.samples_in - st._inbox_samples
                taken = st.taken_at_step
                state = st.session.state if st.session is not None else None
            left = getattr(state, "left_sample", None)
            decoded = getattr(state, "frames_decoded", None)
            batch.append(("update", fid, _pack_events(events), int(taken), done, int(consumed),
                          None if left is None else int(left), None if decoded is None else int(decoded)))
            if done:
                self.streams.pop(fid, None)
        if batch:
            try:
                self.conn.send(batch)
            except (OSError, EOFError, ValueError):
                self.front_end_gone()

    def front_end_gone(self) -> None:
        """The front-end closed the connection or died: its streams are forgotten (their clients are gone too)."""
        if self.closed:
            return
        self.closed = True
        for st in list(self.streams.values()):
            st.set_listener(None)
            st.close()
        self.streams.clear()
        _hang_up(self.conn)

    def close(self) -> None:
        self.front_end_gone()


# ----------------------------------------------------------------------------------------------- front-end side
class RemoteModel:
    """What a front-end needs of the model: its config, tokenizer and name (the weights stay in the engines)."""

    def __init__(self, info: dict):
        self.cfg = info["cfg"]
        self.name = info["model_name"]
        self.tokenizer = None
        if info.get("tokenizer"):
            from ..tokenizer import Tokenizer

            with tempfile.NamedTemporaryFile(suffix=".model", delete=False) as f:
                f.write(info["tokenizer"])
            try:
                self.tokenizer = Tokenizer(f.name)
            finally:
                os.unlink(f.name)
        self.device = SimpleNamespace(type="remote")


class RemoteStream:
    """A stream on an engine process, with the ``ScheduledStream`` calls the caption adapter makes."""

    def __init__(self, link: "_FrontEndLink", fid: int, bound_samples: int):
        self.link = link
        self.id = fid
        self._bound = max(1, bound_samples)
        self._cond = threading.Condition()
        self._events: list = []
        self._taken = 0
        self._done = False
        self._consumed = 0
        self._sent = 0
        self._left: int | None = None
        self._decoded: int | None = None
        self._listener: Callable[[], None] | None = None
        self._ended = False
        self._closed = False

    # ---- what the caption adapter (_CaptionStream) calls
    @property
    def queued_samples(self) -> int:
        return self._sent - self._consumed

    @property
    def done(self) -> bool:
        return self._done or self._closed

    @property
    def session(self):
        state = SimpleNamespace()
        if self._left is not None:
            state.left_sample = self._left
        if self._decoded is not None:
            state.frames_decoded = self._decoded
        return SimpleNamespace(state=state)

    def push(self, pcm, block: bool = True, timeout: float | None = None) -> bool:
        x = np.ascontiguousarray(pcm, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"expected mono PCM [N], got shape {x.shape}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self.done:
                    raise StreamClosed("stream is closed", "stream_closed")
                if self._ended:
                    raise StreamClosed("push() after end()", "stream_ended")
                if self._sent - self._consumed < self._bound:
                    break
                if not block:
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.5 if left is None else min(left, 0.5))
            if x.size:
                self._sent += x.size
                self.link.send(("push", self.id, x.tobytes()))  # under the lock: ops leave in call order
        return True

    def end(self) -> None:
        with self._cond:
            if self.done or self._ended:
                return
            self._ended = True
            self.link.send(("end", self.id))

    def close(self, reason: ErrorEvent | None = None) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            if reason is not None:
                self._events.append(reason)
            self._cond.notify_all()
        self.link.forget(self)

    def set_listener(self, callback: Callable[[], None] | None) -> None:
        self._listener = callback

    def poll_state(self) -> tuple[list, int, bool]:
        with self._cond:
            out, self._events = self._events, []
            return out, self._taken, self.done

    def poll(self) -> list:
        return self.poll_state()[0]

    def events(self, timeout: float | None = None):
        """Blocking iterator over events until the final (or a fatal error); stops early after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                while not self._events and not self.done:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return
                    self._cond.wait(0.5 if left is None else min(left, 0.5))
                batch, self._events = self._events, []
                finished = self.done
            yield from batch
            if finished:
                return

    def wait_idle(self, timeout: float | None = None) -> bool:
        raise NotImplementedError("a stream on an engine process has no synchronous feed(); use the shared caption "
                                  "dispatcher (ScheduledCaptionPipeline)")

    # ---- from the link's receiver thread
    def _apply(self, events: list, taken: int, done: bool, consumed: int, left, decoded) -> None:
        with self._cond:
            if self._closed:
                return
            self._events.extend(events)
            self._taken = taken
            self._done = self._done or done
            self._consumed = max(self._consumed, consumed)
            self._left, self._decoded = left, decoded
            self._cond.notify_all()
        cb = self._listener
        if cb is not None:
            cb()


class _FrontEndLink:
    """A front-end's connection to one engine: ops are batched for ``SEND_COALESCE_S`` and sent, updates are applied
    to the streams; by a sender and a receiver thread (``start_threads``) or by the event loop (``attach``)."""

    def __init__(self, index: int, path: str, authkey: bytes, connect_timeout: float = 60.0):
        self.index = index
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.conn = Client(path, family="AF_UNIX", authkey=authkey)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise ConnectionError(f"engine {index} ({path}) did not accept within {connect_timeout:.0f} s")
                time.sleep(0.1)
        kind, self.info = self.conn.recv()
        if kind != "hello":
            raise ConnectionError(f"engine {index}: unexpected first message {kind!r}")
        self.streams: dict[int, RemoteStream] = {}
        self._ids = itertools.count()
        self._outbox: deque = deque()
        self._wake = threading.Event()
        self._rpc: dict[int, concurrent.futures.Future] = {}
        self.alive = True
        self._io = None  # "threads" or "loop", from start_threads() / attach()
        self._loop = None
        self._loop_thread = None
        self._transport = None
        self._flush_scheduled = False

    def start_threads(self) -> None:
        """Serve the connection with a sender and a receiver thread (any process; ``attach`` is the server's)."""
        if self._io is None:
            self._io = "threads"
            threading.Thread(target=self._send_loop, name=f"engine-{self.index}-send", daemon=True).start()
            threading.Thread(target=self._recv_loop, name=f"engine-{self.index}-recv", daemon=True).start()

    async def attach(self) -> None:
        """Serve the connection from the running event loop: reads and writes are callbacks of the loop that
        serves the WebSockets, so an update reaches its stream's caption pipeline and client without a thread
        hand-off (each waits for the GIL, behind the loop's own work)."""
        if self._io is not None:
            raise RuntimeError(f"engine link {self.index} is already served ({self._io})")
        import asyncio

        self._io = "loop"
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # the socket, past the handshake and the hello (Connection reads exactly a message: nothing is buffered)
        sock = socket.socket(fileno=os.dup(self.conn.fileno()))
        sock.setblocking(False)
        self._transport, _ = await self._loop.create_unix_connection(lambda: _LinkProtocol(self), sock=sock)
        self.conn.close()
        if self._outbox:
            self._schedule_flush()

    def open(self, bound_samples: int) -> RemoteStream:
        if not self.alive:
            raise ConnectionError(f"engine {self.index} is not available")
        st = RemoteStream(self, next(self._ids), bound_samples)
        self.streams[st.id] = st
        self.send(("open", st.id))
        return st

    def send(self, op) -> None:
        self._outbox.append(op)
        if self._io == "loop":
            self._schedule_flush()
        else:
            _wake(self._wake)

    def _schedule_flush(self) -> None:
        # (the flag is cleared before the outbox is taken: an op appended meanwhile schedules another flush)
        if self._flush_scheduled:
            return
        self._flush_scheduled = True
        if threading.get_ident() == self._loop_thread:
            self._loop.call_later(SEND_COALESCE_S, self._flush)
        else:
            self._loop.call_soon_threadsafe(self._loop.call_later, SEND_COALESCE_S, self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch = []
        while self._outbox:
            batch.append(self._outbox.popleft())
        if batch and self.alive and self._transport is not None and not self._transport.is_closing():
            self._transport.write(_frame(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)))

    def forget(self, st: RemoteStream) -> None:
        if self.streams.pop(st.id, None) is not None:
            self.send(("close", st.id))

    def transcribe(self, audio: np.ndarray, timeout: float = 3600.0):
        fut: concurrent.futures.Future = concurrent.futures.Future()
        rid = next(self._ids)
        self._rpc[rid] = fut
        self.send(("transcribe", rid, np.ascontiguousarray(audio, np.float32).tobytes()))
        return fut.result(timeout)

    def _send_loop(self) -> None:
        try:
            while self.alive:
                self._wake.wait()
                time.sleep(SEND_COALESCE_S)
                self._wake.clear()
                batch = []
                while self._outbox:
                    batch.append(self._outbox.popleft())
                if batch:
                    self.conn.send(batch)
        except (OSError, EOFError, ValueError):
            self._engine_gone()

    def _recv_loop(self) -> None:
        try:
            while True:
                self._received(self.conn.recv())
        except (EOFError, OSError):
            pass
        self._engine_gone()

    def _received(self, batch: list) -> None:
        """One message of the engine's: updates applied to their streams, offline results to their callers."""
        for msg in batch:
            if msg[0] == "update":
                _, fid, events, taken, done, consumed, left, decoded = msg
                st = self.streams.get(fid)
                if st is None:
                    continue
                if done:
                    self.streams.pop(fid, None)
                st._apply(_unpack_events(events), taken, done, consumed, left, decoded)
            elif msg[0] == "transcribed":
                fut = self._rpc.pop(msg[1], None)
                if fut is not None:
                    if msg[2]:
                        fut.set_result(msg[3])
                    else:
                        fut.set_exception(RuntimeError(msg[3]))

    def _engine_gone(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self._wake.set()
        err = ErrorEvent("engine_unavailable", f"engine process {self.index} went away")
        for st in list(self.streams.values()):
            st._apply([err], st._taken, True, st._consumed, st._left, st._decoded)
        self.streams.clear()
        for fut in list(self._rpc.values()):
            fut.set_exception(ConnectionError(err.message))
        self._rpc.clear()

    def close(self) -> None:
        self.alive = False
        self._wake.set()
        if self._io == "loop":
            if threading.get_ident() == self._loop_thread:
                self._transport.abort()
            elif not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._transport.abort)
        else:
            _hang_up(self.conn)


def _frame(payload: bytes) -> bytes:
    """``multiprocessing.connection``'s framing (what the engine's ``Connection.recv`` reads): a big-endian
    signed 32-bit length, or -1 and a 64-bit length past 2 GiB, then the pickle."""
    n = len(payload)
    return (struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)) + payload


class _LinkProtocol:
    """The loop side of a ``_FrontEndLink``: whole messages out of the byte stream (``_frame``'s format), each
    handed to the link as it completes."""

    def __init__(self, link: "_FrontEndLink"):
        self.link = link
        self._buf = bytearray()

    def connection_made(self, transport) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        while True:
            if len(buf) - pos < 4:
                break
            (n,) = struct.unpack_from("!i", buf, pos)
            head = 4
            if n == -1:
                if len(buf) - pos < 12:
                    break
                (n,) = struct.unpack_from("!Q", buf, pos + 4)
                head = 12
            if len(buf) - pos < head + n:
                break
            batch = pickle.loads(bytes(buf[pos + head:pos + head + n]))
            pos += head + n
            self.link._received(batch)
        if pos:
            del buf[:pos]

    def eof_received(self):
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc) -> None:
        self.link._engine_gone()

    def pause_writing(self) -> None:  # the engine reads slowly: writes queue in the transport (credit bounds them)
        pass

    def resume_writing(self) -> None:
        pass


class RemoteCaptionPool:
    """A front-end's drop-in for ``CaptionSchedulerPool``: the same caption streams, stepped by engine processes.

        pool = RemoteCaptionPool(addresses)          # connects to every engine; model info from the first
        svc = CaptionService(pool.model, pool.mode_name.replace("_", "-"), pool=pool)
    """

    remote = True

    def __init__(self, addresses: EngineAddresses, connect_timeout: float = 60.0):
        self.links = [_FrontEndLink(i, p, addresses.authkey, connect_timeout) for i, p in enumerate(addresses.paths)]
        info = self.links[0].info
        self.info = info
        self.model = RemoteModel(info)
        self.mode_name = info["mode"]
        self.params = info.get("params", {})
        self.recognizer = SimpleNamespace(mode=SimpleNamespace(sample_rate=info["sample_rate"],
                                                               frame_seconds=info["frame_seconds"]))
        self._bound = int(info["max_buffer_seconds"] * info["sample_rate"])
        self._dispatcher = None
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def _serve(self) -> None:
        """The links' I/O, if ``attach_loop`` did not take it: a sender and a receiver thread per engine, and a
        dispatcher thread (made on first use)."""
        with self._lock:
            for link in self.links:
                if link._io is None:
                    link.start_threads()

    async def attach_loop(self) -> None:
        """Serve every engine link and the caption dispatch from the running event loop (the server's: its app
        calls this at start-up, before any stream; ``create_app``'s lifespan). After it, the front-end's stream
        path has no thread of its own: the engines' updates, the caption pipelines and the WebSocket sends run
        in the loop's thread, one after another, with no hand-off that waits for the GIL."""
        import asyncio

        from ..captions.pipeline import LoopDispatcher

        if self._dispatcher is not None or any(link._io is not None for link in self.links):
            raise RuntimeError("the engine links are already served by threads")
        for link in self.links:
            await link.attach()
        self._dispatcher = LoopDispatcher(asyncio.get_running_loop()).bind()

    def open(self):
        """A caption stream on the engine with the fewest of this front-end's streams (ties in turn)."""
        from ..streaming.scheduler import _CaptionStream

        self._serve()
        alive = [link for link in self.links if link.alive]
        if not alive:
            raise ConnectionError("no engine process is available")
        turn = next(self._turn)
        link = min(alive, key=lambda link: (len(link.streams), (link.index - turn) % len(self.links)))
        return _CaptionStream(self, link.open(self._bound))

    @property
    def dispatcher(self):
        with self._lock:
            if self._dispatcher is None:
                from ..captions.pipeline import CaptionDispatcher

                self._dispatcher = CaptionDispatcher()
        return self._dispatcher

    def transcribe(self, audio: np.ndarray):
        """Offline transcription of one clip, on the engine with the fewest streams of this front-end."""
        self._serve()
        alive = [link for link in self.links if link.alive]
        if not alive:
            raise ConnectionError("no engine process is available")
        return min(alive, key=lambda link: len(link.streams)).transcribe(audio)

    def engines(self) -> list[dict]:
        return [{"index": link.index, "pid": link.info.get("pid"), "alive": link.alive, "streams": len(link.streams),
                 "io": link._io} for link in self.links]

    def health(self, base: Callable[[], dict] | None = None) -> Callable[[], dict]:
        """``base``'s GET /health fields (the workers') plus this front-end's view of the engines."""
        return lambda: {**(base() if base is not None else {}), "engines": self.engines()}

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """With ``drain``: wait (up to ``timeout`` s) until this front-end's streams have their finals; then
        disconnect (an engine forgets the streams of a front-end that went away)."""
        deadline = time.monotonic() + timeout
        while drain and time.monotonic() < deadline and any(link.streams for link in self.links if link.alive):
            time.sleep(0.02)
        for link in self.links:
            link.close()
        if self._dispatcher is not None:
            self._dispatcher.stop()
