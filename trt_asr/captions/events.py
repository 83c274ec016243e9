"""Caption events, schema version 1 (documented in docs/events.md). Every event is one JSON object with ``type``,
``v`` (schema version) and ``seq`` (per-stream counter). Times are seconds of audio since the stream started."""

from __future__ import annotations

import json
from typing import Any

from .transcript import Segment, TranscriptState, Update

SCHEMA_VERSION = 1
EVENT_TYPES = ("ready", "partial", "final", "error", "end")


def _r(x: float) -> float:
    return round(float(x), 3)


def ready_event(**info: Any) -> dict:
    return {"type": "ready", "v": SCHEMA_VERSION, **info}


def partial_event(state: TranscriptState, update: Update, latency_ms: float | None) -> dict:
    rev = update.revision
    words = state.stable_word_dicts() + [{**w.as_dict(), "stable": False} for w in state.words(state.tail)]
    stable, unstable = state.stable_text, state.unstable_text
    return {
        "type": "partial", "v": SCHEMA_VERSION, "segment": len(state.segments),
        "stable": stable, "unstable": unstable, "text": " ".join(x for x in (stable, unstable) if x),
        "revision": {"keep": rev.keep, "removed": rev.removed, "added": state.decode(rev.added)},
        "words": words, "audio_end": _r(update.audio_end),
        "latency_ms": None if latency_ms is None else round(latency_ms, 1),
    }


def final_event(seg: Segment, audio_end: float, latency_ms: float | None) -> dict:
    return {
        "type": "final", "v": SCHEMA_VERSION, "segment": seg.id, "text": seg.text,
        "start": _r(seg.start), "end": _r(seg.end), "words": [w.as_dict() for w in seg.words],
        "reason": seg.reason, "continues_word": seg.continues_word, "audio_end": _r(audio_end),
        "latency_ms": None if latency_ms is None else round(latency_ms, 1),
    }


def error_event(code: str, message: str, fatal: bool = True) -> dict:
    return {"type": "error", "v": SCHEMA_VERSION, "code": code, "message": message, "fatal": fatal}


def end_event(audio_duration: float, segments: int, stats: dict | None = None) -> dict:
    return {"type": "end", "v": SCHEMA_VERSION, "audio_duration": _r(audio_duration), "segments": segments,
            "stats": stats or {}}


def dumps(event: dict) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))
