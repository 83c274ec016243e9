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
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ..captions import events as ev
from ..captions.dsp import DSPError, ENCODINGS
from ..captions.service import CaptionService

MAX_CONFIG_BYTES = 4096
MAX_FRAME_BYTES = 1 << 20  # one binary WebSocket message
MAX_UPLOAD_BYTES = 25 << 20  # as OpenAI's endpoint
MAX_STREAM_SECONDS = 4 * 3600
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
    state = {"sessions": 0, "started": time.time(), "streams_total": 0}
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
            await ws.send_text(ev.dumps({**ev.error_event(code, message), "seq": -1}))
            await ws.close(code=close_code)

        if state["sessions"] >= limits.max_sessions:
            return await fail("busy", f"server is at its limit of {limits.max_sessions} streams", 1013)
        try:
            first = await asyncio.wait_for(ws.receive(), timeout=30)
        except asyncio.TimeoutError:
            return await fail("config_timeout", "no config message within 30 s")
        if first.get("type") == "websocket.disconnect":
            return
        text = first.get("text")
        if text is None:
            return await fail("bad_config", "the first message must be a JSON text message with the stream config "
                              "(sample_rate, encoding, channels, options)")
        if len(text.encode()) > MAX_CONFIG_BYTES:
            return await fail("bad_config", f"config message larger than {MAX_CONFIG_BYTES} bytes", 1009)
        try:
            cfg = json.loads(text)
            if not isinstance(cfg, dict):
                raise ValueError("config must be a JSON object")
            rate = cfg.get("sample_rate", 16000)
            encoding = cfg.get("encoding", "pcm_s16le")
            channels = cfg.get("channels", 1)
            options = cfg.get("options") or {}
            if not isinstance(rate, int) or not 8000 <= rate <= 192000:
                raise ValueError(f"sample_rate must be an integer 8000..192000, got {rate!r}")
            if encoding not in ENCODINGS:
                raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
            if not isinstance(channels, int) or not 1 <= channels <= 8:
                raise ValueError(f"channels must be an integer 1..8, got {channels!r}")
            if not isinstance(options, dict):
                raise ValueError("options must be a JSON object")
            unknown = set(options) - {"vad", "normalize_gain"}
            if unknown:
                raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
        except (ValueError, json.JSONDecodeError) as e:
            return await fail("bad_config", str(e))

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
        await ws.send_text(ev.dumps({**ev.ready_event(**service.info(), input={"sample_rate": rate,
                                                                             "encoding": encoding,
                                                                             "channels": channels}), "seq": -1}))
        pipe.start()
        error = None
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
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
        finally:
            if error is not None:
                await out.put({**ev.error_event(*error), "seq": -1})
            pipe.close()
            try:
                await asyncio.wait_for(asyncio.shield(send_task), timeout=600)
            except (asyncio.TimeoutError, Exception):
                send_task.cancel()
            state["sessions"] -= 1
            if ws.application_state == WebSocketState.CONNECTED:
                try:
                    await ws.close(code=1000 if error is None else 1008)
                except Exception:
                    pass

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
