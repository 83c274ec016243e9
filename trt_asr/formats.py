"""Transcript output formats: plain text, JSON, SubRip (SRT) and WebVTT.

Caption cues follow common broadcast conventions: at most 42 characters per line, at most 2 lines per cue, a cue ends
at a pause longer than ``max_gap`` seconds or after ``max_duration`` seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Sequence

MAX_LINE_CHARS = 42
MAX_LINES = 2


@dataclass
class Cue:
    start: float
    end: float
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _wrap(words: Sequence[str], width: int) -> list[str]:
    lines: list[str] = []
    for w in words:
        if lines and len(lines[-1]) + 1 + len(w) <= width:
            lines[-1] += " " + w
        else:
            lines.append(w)
    return lines


def cues_from_words(words: Iterable, max_chars: int = MAX_LINE_CHARS, max_lines: int = MAX_LINES,
                    max_duration: float = 6.0, max_gap: float = 1.0) -> list[Cue]:
    """Group timed words (objects with .text/.start/.end or dicts with word/start/end) into caption cues."""
    cues: list[Cue] = []
    current: list = []

    def get(w):
        if isinstance(w, dict):
            return w.get("word", w.get("text", "")), float(w["start"]), float(w["end"])
        return w.text, float(w.start), float(w.end)

    def flush():
        if current:
            texts = [t for t, _, _ in current]
            cues.append(Cue(current[0][1], max(current[-1][2], current[0][1] + 0.01), _wrap(texts, max_chars)))
            current.clear()

    for w in words:
        text, start, end = get(w)
        if not text:
            continue
        if current:
            candidate = _wrap([t for t, _, _ in current] + [text], max_chars)
            too_long = len(candidate) > max_lines or end - current[0][1] > max_duration
            if too_long or start - current[-1][2] > max_gap:
                flush()
        current.append((text, start, end))
    flush()
    return cues


def _timestamp(seconds: float, sep: str) -> str:
    ms = max(0, int(round(seconds * 1000)))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt_timestamp(seconds: float) -> str:
    return _timestamp(seconds, ",")


def vtt_timestamp(seconds: float) -> str:
    return _timestamp(seconds, ".")


def format_srt_cue(index: int, cue: Cue) -> str:
    return f"{index}\n{srt_timestamp(cue.start)} --> {srt_timestamp(cue.end)}\n{cue.text}\n\n"


def format_vtt_cue(cue: Cue) -> str:
    return f"{vtt_timestamp(cue.start)} --> {vtt_timestamp(cue.end)}\n{cue.text}\n\n"


def to_srt(words: Iterable) -> str:
    return "".join(format_srt_cue(i, c) for i, c in enumerate(cues_from_words(words), start=1))


def to_vtt(words: Iterable) -> str:
    return "WEBVTT\n\n" + "".join(format_vtt_cue(c) for c in cues_from_words(words))


def to_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2)
