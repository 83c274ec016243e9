"""The ``/v1/stream`` WebSocket protocol: parsing and validation of everything a client sends, in one place, with
one error table (code -> WebSocket close code). Pure functions, no I/O: the server calls them, the tests fuzz them
(tests/test_protocol_fuzz.py, hypothesis).

Client -> server
  1. one JSON text message, the config (at most ``MAX_CONFIG_BYTES``)::

        {"sample_rate": 16000, "encoding": "pcm_s16le" | "f32le", "channels": 1,
         "options": {"vad": true, "normalize_gain": false}}              # "type": "config" may be given too
     every key is optional (defaults as shown); unknown keys are an error (``unknown_field``), never ignored.
  2. binary messages: interleaved PCM in the configured encoding; each a whole number of sample frames
     (channels x bytes per sample) and at most ``max_frame_bytes``; finite samples only.
  3. ``{"type": "end"}`` (or ``"eof"``): no more audio; the server sends the finals and ``end``, then closes 1000.
     ``{"type": "ping"}`` is answered with ``{"type": "pong"}``.

Server -> client: JSON events (trt_asr.captions.events): ready, partial, final, error, end. An ``error`` event with
``fatal: true`` is followed by a close with the code in ``ERRORS``.

Nothing a client sends names a server-side path or object: the config has no file, model or directory fields.
"""

from __future__ import annotations

import hmac
import json
import math
from dataclasses import dataclass, field

import numpy as np

MAX_CONFIG_BYTES = 4096
MAX_FRAME_BYTES = 1 << 20
MAX_JSON_DEPTH = 8
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 192000
MAX_CHANNELS = 8
ENCODINGS = {"pcm_s16le": (np.dtype("<i2"), 32768.0), "f32le": (np.dtype("<f4"), 1.0)}
CONFIG_KEYS = {"type", "sample_rate", "encoding", "channels", "options"}
OPTION_KEYS = {"vad": bool, "normalize_gain": bool}
CONTROL_TYPES = {"end", "eof", "ping"}

# error code -> WebSocket close code (RFC 6455 and the 4xxx private range)
ERRORS = {
    "bad_json": 1007,               # not UTF-8 / not JSON
    "bad_config": 1008,             # a config value is wrong
    "unknown_field": 1008,          # a config key the server does not know
    "config_required": 1008,        # binary audio before the config
    "config_timeout": 1008,         # no config in time
    "unsupported_sample_rate": 1003,
    "unsupported_encoding": 1003,
    "bad_audio": 1007,              # odd byte count, NaN / Inf samples
    "frame_too_large": 1009,
    "message_too_large": 1009,
    "bad_message": 1008,            # an unknown control message after the config
    "unauthorized": 1008,
    "capacity": 1013,               # try again later
    "busy": 1013,
    "engine_unavailable": 1013,     # serve --engines: no engine process answers (try again later)
    "shutting_down": 1001,
    "idle_timeout": 1000,
    "stream_too_long": 1008,
    "client_not_reading": 1008,
    "engine_error": 1011,
    "internal": 1011,
}


class ProtocolError(ValueError):
    """A client message that violates the protocol. ``code`` is a key of ``ERRORS``; ``close_code`` the
    WebSocket close code to end the connection with."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def close_code(self) -> int:
        return ERRORS.get(self.code, 1008)

    def event(self) -> dict:
        return {"type": "error", "code": self.code, "message": self.message, "fatal": True}


@dataclass(frozen=True)
class StreamConfig:
    sample_rate: int = 16000
    encoding: str = "pcm_s16le"
    channels: int = 1
    options: dict = field(default_factory=dict)

    @property
    def frame_bytes(self) -> int:
        """Bytes of one sample frame (all channels)."""
        return ENCODINGS[self.encoding][0].itemsize * self.channels

    @property
    def bytes_per_second(self) -> int:
        return self.frame_bytes * self.sample_rate


def _depth(x, limit: int, d: int = 0) -> int:
    if d > limit:
        return d
    if isinstance(x, dict):
        return max([_depth(v, limit, d + 1) for v in x.values()] or [d + 1])
    if isinstance(x, list):
        return max([_depth(v, limit, d + 1) for v in x] or [d + 1])
    return d


def load_json(message, max_bytes: int = MAX_CONFIG_BYTES) -> object:
    """A text (or bytes) message -> JSON value; ProtocolError for too large, not UTF-8, not JSON, too deep."""
    if message is None:
        raise ProtocolError("bad_json", "expected a JSON text message")
    if isinstance(message, (bytes, bytearray, memoryview)):
        raw = bytes(message)
        if len(raw) > max_bytes:
            raise ProtocolError("message_too_large", f"JSON message larger than {max_bytes} bytes")
        try:
            message = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("bad_json", "message is not valid UTF-8") from None
    if not isinstance(message, str):
        raise ProtocolError("bad_json", "expected a JSON text message")
    if len(message) > max_bytes or len(message.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ProtocolError("message_too_large", f"JSON message larger than {max_bytes} bytes")
    # nesting is bounded before parsing: json's recursive parser must never hit the recursion limit
    depth = running = 0
    in_str = esc = False
    for ch in message:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            running += 1
            depth = max(depth, running)
            if depth > MAX_JSON_DEPTH:
                raise ProtocolError("bad_json", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        elif ch in "]}":
            running -= 1
    try:
        value = json.loads(message, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as e:
        raise ProtocolError("bad_json", f"invalid JSON: {e}") from None
    return value


def _reject_constant(name: str):
    raise ProtocolError("bad_json", f"invalid JSON: {name} is not allowed")


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError("bad_config", f"{name} must be an integer, got {json.dumps(value)[:40]}")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ProtocolError("bad_config", f"{name} must be an integer, got {value!r}")
        value = int(value)
    return value


def parse_config(message, max_bytes: int = MAX_CONFIG_BYTES) -> StreamConfig:
    """The first message -> StreamConfig, or ProtocolError with a clear code and message."""
    if isinstance(message, (bytes, bytearray, memoryview)) and not _looks_like_json(message):
        raise ProtocolError("config_required", "the first message must be the JSON config (sample_rate, encoding, "
                            "channels, options); binary audio may only follow it")
    cfg = load_json(message, max_bytes)
    if not isinstance(cfg, dict):
        raise ProtocolError("bad_config", "the config must be a JSON object")
    unknown = sorted(set(cfg) - CONFIG_KEYS)
    if unknown:
        raise ProtocolError("unknown_field", f"unknown config field(s): {', '.join(map(repr, unknown))[:200]}; "
                            f"known: {', '.join(sorted(CONFIG_KEYS))}")
    if cfg.get("type", "config") != "config":
        raise ProtocolError("bad_config", f"the first message must be the config (type 'config'), "
                            f"got type {json.dumps(cfg.get('type'))[:40]}")
    rate = _int(cfg.get("sample_rate", 16000), "sample_rate")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ProtocolError("unsupported_sample_rate", f"sample_rate must be {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} "
                            f"Hz, got {rate}")
    encoding = cfg.get("encoding", "pcm_s16le")
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        raise ProtocolError("unsupported_encoding", f"encoding must be one of {', '.join(ENCODINGS)}, "
                            f"got {json.dumps(encoding)[:40]}")
    channels = _int(cfg.get("channels", 1), "channels")
    if not 1 <= channels <= MAX_CHANNELS:
        raise ProtocolError("bad_config", f"channels must be 1..{MAX_CHANNELS}, got {channels}")
    options = cfg.get("options") or {}
    if not isinstance(options, dict):
        raise ProtocolError("bad_config", "options must be a JSON object")
    bad = sorted(set(options) - set(OPTION_KEYS))
    if bad:
        raise ProtocolError("unknown_field", f"unknown option(s): {', '.join(map(repr, bad))[:200]}; "
                            f"known: {', '.join(sorted(OPTION_KEYS))}")
    for k, v in options.items():
        if not isinstance(v, OPTION_KEYS[k]):
            raise ProtocolError("bad_config", f"option {k!r} must be a {OPTION_KEYS[k].__name__}")
    return StreamConfig(rate, encoding, channels, dict(options))


def _looks_like_json(data) -> bool:
    head = bytes(data[:64]).lstrip()
    return head[:1] in (b"{", b"[")


def parse_control(message, max_bytes: int = MAX_CONFIG_BYTES) -> str:
    """A text message after the config -> its type ("end", "eof" or "ping"), or ProtocolError."""
    msg = load_json(message, max_bytes)
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("bad_message", 'after the config, send binary audio frames, {"type": "end"} or '
                            '{"type": "ping"}')
    kind = msg["type"]
    if kind not in CONTROL_TYPES:
        raise ProtocolError("bad_message", f"unknown message type {json.dumps(kind)[:40]}; "
                            f"known: {', '.join(sorted(CONTROL_TYPES))}")
    unknown = sorted(set(msg) - {"type"})
    if unknown:
        raise ProtocolError("unknown_field", f"unknown field(s) in {kind!r}: {', '.join(map(repr, unknown))[:200]}")
    return kind


def decode_frame(data, cfg: StreamConfig, max_frame_bytes: int = MAX_FRAME_BYTES) -> np.ndarray:
    """One binary message -> float32 [n] mono at ``cfg.sample_rate`` (channels averaged), or ProtocolError:
    too large, not a whole number of sample frames, NaN / Inf samples."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("bad_audio", "audio must be sent as binary messages")
    n = len(data)
    if n > max_frame_bytes:
        raise ProtocolError("frame_too_large", f"binary message of {n} bytes exceeds the limit of "
                            f"{max_frame_bytes} bytes; send smaller frames (e.g. 20-100 ms)")
    if n % cfg.frame_bytes:
        raise ProtocolError("bad_audio", f"binary message of {n} bytes is not a whole number of {cfg.encoding} "
                            f"sample frames ({cfg.frame_bytes} bytes each for {cfg.channels} channel(s))")
    dtype, scale = ENCODINGS[cfg.encoding]
    x = np.frombuffer(bytes(data), dtype=dtype)
    if dtype.kind == "f":
        if not np.isfinite(x).all():
            raise ProtocolError("bad_audio", "audio contains NaN or infinite samples")
        y = x.astype(np.float32)
    else:
        y = x.astype(np.float32) / scale
    if cfg.channels > 1:
        y = y.reshape(-1, cfg.channels).mean(axis=1, dtype=np.float32)
    return y


def check_token(headers, query, token: str | None) -> bool:
    """Bearer token check (header ``Authorization: Bearer T`` or ``?token=T``), constant-time; True without a token."""
    if not token:
        return True
    auth = headers.get("authorization", "") if headers is not None else ""
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    if not given and query is not None:
        given = query.get("token", "") or ""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode("utf-8", "surrogatepass"))


def error_for(exc: BaseException) -> tuple[str, str, int]:
    """(code, message, close code) for any exception raised while serving a stream (unknown ones: internal)."""
    if isinstance(exc, ProtocolError):
        return exc.code, exc.message, exc.close_code
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in ERRORS:
        return code, str(exc), ERRORS[code]
    return "internal", f"{type(exc).__name__}: {exc}"[:300], 1011
