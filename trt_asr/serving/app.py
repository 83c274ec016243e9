"""The ASGI app (Starlette): live captions over WebSocket, OpenAI-compatible offline transcription, health, and the
web page.

    WS   /v1/stream                 first message: JSON config; then binary PCM frames; JSON caption events out
    POST /v1/audio/transcriptions   multipart ``file`` (+ ``model``, ``response_format``): OpenAI-compatible
    GET  /health                    {"status": "ok", ...}
    GET  /                          the live-captions page (static/)

Security defaults: the CLI binds 127.0.0.1; with a token every endpoint except /health and the static page needs
``Authorization: Bearer <token>`` (WebSocket: that header or ``?token=``; compared in constant time); message and
upload sizes are capped; clients never name server-side paths (uploads are read from memory).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import os
import re
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ..captions import events as ev
from ..captions.dsp import DSPError, ENCODINGS
from ..captions.service import CaptionService
from . import protocol
from .heap import PAUSES

MAX_CONFIG_BYTES = 4096
MAX_FRAME_BYTES = 1 << 20  # one binary WebSocket message
MAX_UPLOAD_BYTES = 25 << 20  # as OpenAI's endpoint
MAX_STREAM_SECONDS = 4 * 3600
MAX_BACKLOG_SECONDS = 30.0  # unprocessed audio per stream before the server stops reading its socket
IDLE_TIMEOUT_SECONDS = 60.0  # a stream that sends nothing (no audio, no end) this long is finalised and closed
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
STATIC_DIR = Path(str(resources.files("trt_asr.serving").joinpath("static")))


def _openai_error(message: str, status: int = 400, param: str | None = None, code: str | None = None):
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": code}}, status_code=status)


class Limits:
    def __init__(self, max_sessions: int = 16, max_frame_bytes: int = MAX_FRAME_BYTES,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES, max_stream_seconds: float = MAX_STREAM_SECONDS,
                 idle_timeout: float | None = IDLE_TIMEOUT_SECONDS):
        self.max_sessions = max_sessions
        self.max_frame_bytes = max_frame_bytes
        self.max_upload_bytes = max_upload_bytes
        self.max_stream_seconds = max_stream_seconds
        self.idle_timeout = idle_timeout or None  # None / 0: a silent client keeps its stream


class LoopRelay:
    """Hands items from other threads (the caption dispatcher's events) to asyncio queues of one event loop, with
    one loop wake-up per batch: ``call_soon_threadsafe`` per event writes the loop's self-pipe and wakes it once per
    event, a cost that grows with every stream a front-end serves."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._loop_thread = threading.get_ident()  # made in the loop (the first stream's handler)
        self._items: collections.deque = collections.deque()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item) -> None:
        if threading.get_ident() == self._loop_thread:  # the loop's own callback (LoopDispatcher): no hand-off
            if self._items:  # (what other threads handed over first stays first)
                self._drain()
            queue.put_nowait(item)
            return
        self._items.append((queue, item))
        if not self._scheduled:  # a drain already scheduled but not yet run will take this item too
            self._scheduled = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._scheduled = False  # first: an item appended from here on schedules another drain
        items = self._items
        while items:
            queue, item = items.popleft()
            queue.put_nowait(item)


class Admission:
    """The concurrent-stream limit. One process counts in a plain int; ``serve --workers N`` gives every worker the
    same counter in shared memory (``multiprocessing.Value``), so the limit holds for the whole server."""

    def __init__(self, limit: int, shared=None):
        self.limit = limit
        self._shared = shared
        self._count = 0

    def try_acquire(self) -> bool:
        if self._shared is None:
            if self._count >= self.limit:
                return False
            self._count += 1
            return True
        with self._shared.get_lock():
            if self._shared.value >= self.limit:
                return False
            self._shared.value += 1
            return True

    def release(self) -> None:
        if self._shared is None:
            self._count -= 1
            return
        with self._shared.get_lock():
            self._shared.value -= 1

    def in_use(self) -> int:
        return self._count if self._shared is None else self._shared.value


def create_app(service: CaptionService, token: str | None = None, limits: Limits | None = None,
               admission: Admission | None = None, health: Callable[[], dict] | None = None) -> Starlette:
    limits = limits or Limits()
    admission = admission or Admission(limits.max_sessions)
    # sessions: this process's open streams (the admission count may be all workers')
    state = {"sessions": 0, "started": time.time(), "streams_total": 0, "draining": False}
    stops: set[asyncio.Future] = set()  # one per open stream: resolved by a drain (futures of the serving loop)
    relays: dict = {}  # the serving loop's LoopRelay (made on the first stream, in that loop)

    def authorized(headers, query=None) -> bool:
        if not token:
            return True
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not given and query is not None:
            given = query.get("token", "")
        return hmac.compare_digest(given.encode(), token.encode())

    # ------------------------------------------------------------------ HTTP
    async def health_route(request: Request):
        return JSONResponse({"status": "ok", "schema_version": ev.SCHEMA_VERSION, "sessions": admission.in_use(),
                             "uptime_s": round(time.time() - state["started"], 1), **service.info(),
                             **({"gc": PAUSES.summary()} if PAUSES.installed else {}),
                             **(health() if health is not None else {})})

    async def index(request: Request):
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    def _transcribe(data: bytes):
        from ..audio import load_audio

        return service.transcribe_offline(load_audio(data, service.sample_rate))

    async def transcriptions(request: Request):
        if not authorized(request.headers):
            return JSONResponse({"error": {"message": "missing or invalid bearer token", "type": "authentication_error",
                                           "param": None, "code": "invalid_api_key"}}, status_code=401)
        try:
            length = int(request.headers.get("content-length", "-1"))
        except ValueError:
            length = -1
        if length < 0:
            return _openai_error("Content-Length required", 411)
        if length > limits.max_upload_bytes + 65536:
            return _openai_error(f"upload too large (limit {limits.max_upload_bytes} bytes)", 413, "file")
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return _openai_error("send multipart/form-data with a 'file' field", 400, "file")
        try:
            form = await request.form(max_files=1, max_fields=16)
        except Exception as e:
            return _openai_error(f"cannot parse the form: {e}", 400)
        upload = form.get("file")
        fmt = str(form.get("response_format") or "json")
        if fmt not in RESPONSE_FORMATS:
            return _openai_error(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}", 400,
                                 "response_format")
        if upload is None or isinstance(upload, str):
            return _openai_error("'file' is required (an audio file upload)", 400, "file")
        data = await upload.read()
        await upload.close()
        if len(data) > limits.max_upload_bytes:
            return _openai_error(f"upload too large (limit {limits.max_upload_bytes} bytes)", 413, "file")
        from ..audio import AudioError

        try:
            tr = await run_in_threadpool(_transcribe, data)
        except AudioError as e:
            msg = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "upload", str(e).replace("<bytes>", "file"))
            return _openai_error(msg, 400, "file", "invalid_audio")
        from ..formats import to_srt, to_vtt

        if fmt == "text":
            return PlainTextResponse(tr.text + "\n")
        if fmt == "srt":
            return PlainTextResponse(to_srt(tr.words), media_type="application/x-subrip")
        if fmt == "vtt":
            return PlainTextResponse(to_vtt(tr.words), media_type="text/vtt")
        if fmt == "verbose_json":
            words = [{"word": w.word, "start": w.start, "end": w.end} for w in tr.words]
            segs = [{"id": 0, "start": words[0]["start"] if words else 0.0,
                     "end": words[-1]["end"] if words else round(tr.duration, 3), "text": tr.text}] if tr.text else []
            return JSONResponse({"task": "transcribe", "language": "unknown", "duration": round(tr.duration, 3),
                                 "text": tr.text, "words": words, "segments": segs, "model": service.model_name})
        return JSONResponse({"text": tr.text})

    # ------------------------------------------------------------------ WebSocket
    async def stream(ws: WebSocket):
        if not authorized(ws.headers, ws.query_params):
            await ws.close(code=1008, reason="missing or invalid bearer token")
            return
        await ws.accept()

        async def fail(code: str, message: str, close_code: int = 1008):
            try:  # bounded: a client that is gone or never reads must not hold the handler
                await asyncio.wait_for(ws.send_text(ev.dumps({**ev.error_event(code, message), "seq": -1})), 10)
                await asyncio.wait_for(ws.close(code=close_code), 10)
            except Exception:
                pass

        # admission counts streams from here on (also while their config is awaited): a burst of connections
        # cannot overshoot the limit (scheduler owner); with `serve --workers N` the count is shared by the workers
        if state["draining"]:
            return await fail("shutting_down", "server is shutting down", protocol.ERRORS["shutting_down"])
        if not admission.try_acquire():
            return await fail("busy", f"server is at its limit of {admission.limit} streams", 1013)
        try:
            await admitted(ws, fail)
        finally:
            admission.release()

    async def admitted(ws: WebSocket, fail):
        async def read_config():
            try:
                first = await asyncio.wait_for(ws.receive(), timeout=30)
            except asyncio.TimeoutError:
                return await fail("config_timeout", "no config message within 30 s")
            if first.get("type") == "websocket.disconnect":
                return None
            # the protocol parser (trt_asr.serving.protocol): unknown fields, bad types, deep JSON -> clear codes
            try:
                return protocol.parse_config(first.get("text") if first.get("text") is not None
                                             else first.get("bytes"), MAX_CONFIG_BYTES)
            except protocol.ProtocolError as e:
                return await fail(e.code, e.message, e.close_code)

        cfg = await read_config()
        if cfg is None:
            return
        if state["draining"]:
            return await fail("shutting_down", "server is shutting down", protocol.ERRORS["shutting_down"])
        rate, encoding, channels, options = cfg.sample_rate, cfg.encoding, cfg.channels, cfg.options

        loop = asyncio.get_running_loop()
        if relays.get("loop") is not loop:
            relays.update(loop=loop, relay=LoopRelay(loop))
        relay = relays["relay"]
        out: asyncio.Queue = asyncio.Queue()
        try:
            pipe = service.pipeline(lambda e: relay.put(out, e), rate, channels, encoding, options)
        except (ConnectionError, RuntimeError) as e:  # the scheduler's admission, or no engine process (--engines)
            code = getattr(e, "code", None) or "engine_unavailable"
            return await fail(code, getattr(e, "message", None) or str(e), protocol.ERRORS.get(code, 1011))
        state["sessions"] += 1
        state["streams_total"] += 1
        bytes_per_second = rate * channels * ENCODINGS[encoding][0].itemsize
        received = 0

        async def sender():
            while True:
                e = await out.get()
                if ws.application_state == WebSocketState.CONNECTED:
                    try:
                        await ws.send_text(ev.dumps(e))
                    except Exception:
                        pass
                if e["type"] == "end":
                    return

        async def read_audio():
            """Audio frames into the pipeline until the client ends the stream; returns (error, disconnected)."""
            nonlocal received
            while True:
                try:  # (cancelling a receive loses nothing: the stream ends here anyway)
                    msg = await asyncio.wait_for(ws.receive(), limits.idle_timeout)
                except asyncio.TimeoutError:  # its place goes back to the others; the audio it sent is finalised
                    return ("idle_timeout", f"no message for {limits.idle_timeout:g} s: the stream was finalised "
                            "and closed (keep sending audio, or send {\"type\": \"end\"})"), False
                if msg["type"] == "websocket.disconnect":
                    return None, True
                data = msg.get("bytes")
                if data is not None:
                    if len(data) > limits.max_frame_bytes:
                        return ("frame_too_large", f"binary message of {len(data)} bytes exceeds "
                                f"{limits.max_frame_bytes}"), False
                    received += len(data)
                    if received / bytes_per_second > limits.max_stream_seconds:
                        return ("stream_too_long", f"stream longer than {limits.max_stream_seconds} s"), False
                    try:
                        pipe.push(data)
                    except DSPError as e:
                        return ("bad_audio", str(e)), False
                    # backpressure: past MAX_BACKLOG_SECONDS of unprocessed audio stop reading the socket (TCP then
                    # slows the client); nothing is dropped
                    while pipe.backlog_seconds() > MAX_BACKLOG_SECONDS and not pipe.done.is_set():
                        await asyncio.sleep(0.02)
                    continue
                t = msg.get("text")
                try:
                    ctl = json.loads(t) if t and len(t) <= MAX_CONFIG_BYTES else None
                except json.JSONDecodeError:
                    ctl = None
                if isinstance(ctl, dict) and ctl.get("type") in ("end", "eof"):
                    return None, False
                return ("bad_message", "after the config, send binary audio frames or {\"type\": \"end\"}"), False

        send_task = asyncio.create_task(sender())
        error = None
        disconnected = started = drained = False
        try:  # (scheduler owner) the session count is released in `finally` even if this task is cancelled / dropped
            try:
                # a send to a client that already went away can hang: bounded
                await asyncio.wait_for(ws.send_text(ev.dumps({**ev.ready_event(
                    **service.info(), input={"sample_rate": rate, "encoding": encoding, "channels": channels}),
                    "seq": -1})), timeout=10)
                pipe.start()
                started = True
                # one reader task per stream; a server drain (shutdown) stops it between frames, and the stream
                # then ends as if the client had sent {"type": "end"}: its finals and "end" still go out
                reader = asyncio.create_task(read_audio())
                stop = loop.create_future()
                stops.add(stop)
                try:
                    await asyncio.wait({reader, stop}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stops.discard(stop)
                    if not reader.done():
                        reader.cancel()
                        drained = stop.done()
                        try:
                            await reader
                        except asyncio.CancelledError:
                            pass
                if not drained:
                    error, disconnected = reader.result()
            except (WebSocketDisconnect, asyncio.TimeoutError, RuntimeError, OSError):
                disconnected = True  # the client went away (a send or receive on a closed socket)
            finally:
                if error is not None:
                    out.put_nowait({**ev.error_event(*error), "seq": -1})  # before the pipeline's "end"
                pipe.close()
                if disconnected or not started:  # nobody to send the rest to / no pipeline to send "end"
                    send_task.cancel()
                else:
                    try:
                        await asyncio.wait_for(asyncio.shield(send_task), timeout=600)
                    except (asyncio.TimeoutError, Exception):
                        send_task.cancel()
                if ws.application_state == WebSocketState.CONNECTED:
                    try:
                        close_code = (protocol.ERRORS["shutting_down"] if drained else
                                      1000 if error is None else protocol.ERRORS.get(error[0], 1008))
                        await asyncio.wait_for(ws.close(code=close_code), timeout=10)
                    except Exception:
                        pass
        except BaseException:
            send_task.cancel()
            raise
        finally:
            pipe.close()
            state["sessions"] -= 1

    async def drain(timeout: float = 30.0) -> int:
        """Shutdown, first half: refuse new streams and end the open ones as if each client had sent "end" (their
        finals and "end" go out, then a close with 1001). Returns how many streams were still open at the timeout."""
        state["draining"] = True
        for stop in list(stops):
            if not stop.done():
                stop.set_result(None)
        deadline = time.monotonic() + timeout
        while state["sessions"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return state["sessions"]

    routes = [
        Route("/", index),
        Route("/health", health_route),
        Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
        WebSocketRoute("/v1/stream", stream),
        Mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static"),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        # a serve --engines front-end: its engine links and caption dispatch become callbacks of this loop
        attach = getattr(service.pool, "attach_loop", None)
        # (TRT_ASR_FRONT_END_IO=threads: the links' own threads, as before; for side-by-side measurements)
        if attach is not None and os.environ.get("TRT_ASR_FRONT_END_IO", "loop") != "threads":
            await attach()
        yield

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service = service
    app.state.drain = drain
    return app
