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
import hmac
import json
import re
import threading
import time
from importlib import resources
from pathlib import Path

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

MAX_CONFIG_BYTES = 4096
MAX_FRAME_BYTES = 1 << 20  # one binary WebSocket message
MAX_UPLOAD_BYTES = 25 << 20  # as OpenAI's endpoint
MAX_STREAM_SECONDS = 4 * 3600
MAX_BACKLOG_SECONDS = 30.0  # unprocessed audio per stream before the server stops reading its socket
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
STATIC_DIR = Path(str(resources.files("trt_asr.serving").joinpath("static")))


def _openai_error(message: str, status: int = 400, param: str | None = None, code: str | None = None):
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": code}}, status_code=status)


class Limits:
    def __init__(self, max_sessions: int = 16, max_frame_bytes: int = MAX_FRAME_BYTES,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES, max_stream_seconds: float = MAX_STREAM_SECONDS):
        self.max_sessions = max_sessions
        self.max_frame_bytes = max_frame_bytes
        self.max_upload_bytes = max_upload_bytes
        self.max_stream_seconds = max_stream_seconds


def create_app(service: CaptionService, token: str | None = None, limits: Limits | None = None) -> Starlette:
    limits = limits or Limits()
    state = {"sessions": 0, "admitting": 0, "started": time.time(), "streams_total": 0}
    offline_lock = threading.Lock()
    transcriber = None

    def authorized(headers, query=None) -> bool:
        if not token:
            return True
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not given and query is not None:
            given = query.get("token", "")
        return hmac.compare_digest(given.encode(), token.encode())

    # ------------------------------------------------------------------ HTTP
    async def health(request: Request):
        return JSONResponse({"status": "ok", "schema_version": ev.SCHEMA_VERSION, "sessions": state["sessions"],
                             "uptime_s": round(time.time() - state["started"], 1), **service.info()})

    async def index(request: Request):
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    def _transcribe(data: bytes):
        nonlocal transcriber
        from ..audio import load_audio
        from ..transcribe import Transcriber

        audio = load_audio(data, service.sample_rate)
        with offline_lock:
            if transcriber is None:
                transcriber = Transcriber(service.model)
            return transcriber.transcribe_arrays([audio], ["upload"])[0]

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
        # cannot overshoot the limit (scheduler owner)
        if state["sessions"] + state["admitting"] >= limits.max_sessions:
            return await fail("busy", f"server is at its limit of {limits.max_sessions} streams", 1013)

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

        state["admitting"] += 1
        try:
            cfg = await read_config()
        finally:
            state["admitting"] -= 1
        if cfg is None:
            return
        rate, encoding, channels, options = cfg.sample_rate, cfg.encoding, cfg.channels, cfg.options

        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        pipe = service.pipeline(lambda e: loop.call_soon_threadsafe(out.put_nowait, e), rate, channels, encoding,
                                options)
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

        send_task = asyncio.create_task(sender())
        error = None
        disconnected = started = False
        try:  # (scheduler owner) the session count is released in `finally` even if this task is cancelled / dropped
            try:
                # a send to a client that already went away can hang: bounded
                await asyncio.wait_for(ws.send_text(ev.dumps({**ev.ready_event(
                    **service.info(), input={"sample_rate": rate, "encoding": encoding, "channels": channels}),
                    "seq": -1})), timeout=10)
                pipe.start()
                started = True
                while True:
                    msg = await ws.receive()
                    if msg["type"] == "websocket.disconnect":
                        disconnected = True
                        break
                    data = msg.get("bytes")
                    if data is not None:
                        if len(data) > limits.max_frame_bytes:
                            error = ("frame_too_large", f"binary message of {len(data)} bytes exceeds "
                                     f"{limits.max_frame_bytes}")
                            break
                        received += len(data)
                        if received / bytes_per_second > limits.max_stream_seconds:
                            error = ("stream_too_long", f"stream longer than {limits.max_stream_seconds} s")
                            break
                        try:
                            pipe.push(data)
                        except DSPError as e:
                            error = ("bad_audio", str(e))
                            break
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
                        break
                    error = ("bad_message", "after the config, send binary audio frames or {\"type\": \"end\"}")
                    break
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
                        close_code = 1000 if error is None else protocol.ERRORS.get(error[0], 1008)
                        await asyncio.wait_for(ws.close(code=close_code), timeout=10)
                    except Exception:
                        pass
        except BaseException:
            send_task.cancel()
            raise
        finally:
            pipe.close()
            state["sessions"] -= 1

    routes = [
        Route("/", index),
        Route("/health", health),
        Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
        WebSocketRoute("/v1/stream", stream),
        Mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.service = service
    return app
