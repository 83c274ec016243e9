"""Event sinks: incremental WebVTT / SRT caption files, JSON lines, and a live terminal view (rich).

Caption files are written as finals arrive and flushed after every cue, so they are valid at any moment (a cue is
held back until the next one starts or the stream ends, so its end can be clamped to the next cue's start).
Cue rules: at most ``max_chars`` (42) characters per line, at most ``max_lines`` (2) lines per cue, at most
``max_duration`` seconds per cue, at least ``min_duration`` seconds on screen when the gap to the next cue allows.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import IO, Callable

from ..formats import format_srt_cue, format_vtt_cue, Cue

MAX_CHARS = 42
MAX_LINES = 2


def _split_long(word: str, width: int) -> list[str]:
    return [word[i:i + width] for i in range(0, len(word), width)] or [word]


def wrap_lines(words: list[str], width: int = MAX_CHARS) -> list[str]:
    lines: list[str] = []
    for w in words:
        for piece in _split_long(w, width):
            if lines and len(lines[-1]) + 1 + len(piece) <= width:
                lines[-1] += " " + piece
            else:
                lines.append(piece)
    return lines


@dataclass
class CueRules:
    max_chars: int = MAX_CHARS
    max_lines: int = MAX_LINES
    max_duration: float = 6.0
    min_duration: float = 0.8
    max_gap: float = 1.0


def cues_for_words(words: list[dict], rules: CueRules) -> list[Cue]:
    """Timed words ({word, start, end}) of one final -> cues obeying the rules."""
    cues: list[Cue] = []
    cur: list[tuple[str, float, float]] = []

    def flush():
        if cur:
            start = cur[0][1]
            end = max(cur[-1][2], start + 0.01)
            cues.append(Cue(start, end, wrap_lines([w for w, _, _ in cur], rules.max_chars)))
            cur.clear()

    for w in words:
        text = str(w.get("word", "")).strip()
        if not text:
            continue
        start, end = float(w["start"]), float(w["end"])
        if cur:
            lines = wrap_lines([x for x, _, _ in cur] + [text], rules.max_chars)
            if (len(lines) > rules.max_lines or end - cur[0][1] > rules.max_duration
                    or start - cur[-1][2] > rules.max_gap):
                flush()
        if len(wrap_lines([text], rules.max_chars)) > rules.max_lines:  # a monster "word": cut it up
            pieces = _split_long(text, rules.max_chars * rules.max_lines)
            step = (end - start) / len(pieces)
            for k, p in enumerate(pieces):
                cur.append((p, start + k * step, start + (k + 1) * step))
                flush()
            continue
        cur.append((text, start, end))
    flush()
    return cues


class CaptionFileWriter:
    """Incremental WebVTT (``fmt="vtt"``) or SRT (``fmt="srt"``) writer fed with caption events."""

    def __init__(self, path_or_file: str | IO[str], fmt: str = "vtt", rules: CueRules | None = None):
        if fmt not in ("vtt", "srt"):
            raise ValueError("fmt must be 'vtt' or 'srt'")
        self.fmt = fmt
        self.rules = rules or CueRules()
        self._own = isinstance(path_or_file, str)
        self.f = open(path_or_file, "w", encoding="utf-8") if self._own else path_or_file
        self.index = 0
        self._pending: Cue | None = None
        self._last_end = 0.0
        self._lock = threading.Lock()
        if fmt == "vtt":
            self.f.write("WEBVTT\n\n")
            self.f.flush()

    def _write(self, cue: Cue, next_start: float | None) -> None:
        start = max(cue.start, self._last_end)
        end = max(cue.end, start + self.rules.min_duration)
        if next_start is not None:  # no overlap with the next cue, but never shorter than min_duration
            end = min(end, max(next_start, start + self.rules.min_duration))
        self.index += 1
        c = Cue(start, end, cue.lines)
        self.f.write(format_vtt_cue(c) if self.fmt == "vtt" else format_srt_cue(self.index, c))
        self.f.flush()
        self._last_end = end

    def add_cue(self, cue: Cue) -> None:
        with self._lock:
            if self._pending is not None:
                self._write(self._pending, cue.start)
            self._pending = cue

    def __call__(self, event: dict) -> None:
        if event.get("type") == "final":
            for cue in cues_for_words(event.get("words") or [], self.rules):
                self.add_cue(cue)
        elif event.get("type") == "end":
            self.close()

    def close(self) -> None:
        with self._lock:
            if self._pending is not None:
                self._write(self._pending, None)
                self._pending = None
            if self._own and not self.f.closed:
                self.f.close()


class JsonLinesWriter:
    def __init__(self, path_or_file: str | IO[str]):
        self._own = isinstance(path_or_file, str)
        self.f = open(path_or_file, "w", encoding="utf-8") if self._own else path_or_file

    def __call__(self, event: dict) -> None:
        self.f.write(json.dumps(event, ensure_ascii=False) + "\n")
        self.f.flush()
        if event.get("type") == "end" and self._own:
            self.f.close()


class TerminalView:
    """Live captions in the terminal: finals scroll up, the open segment redraws in place (stable text normal,
    unstable tail dim). Uses rich's Live display when stdout is a terminal, plain lines otherwise."""

    def __init__(self, console=None, show_latency: bool = False):
        from rich.console import Console

        self.console = console or Console(stderr=False)
        self.show_latency = show_latency
        self.live = None
        self._partial = ("", "")
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._render(), console=self.console, refresh_per_second=20, transient=True)
            self.live.start()

    def _render(self):
        from rich.text import Text

        stable, unstable = self._partial
        t = Text()
        t.append(stable, style="bold")
        if unstable:
            t.append((" " if stable else "") + unstable, style="dim italic")
        return t

    def __call__(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "partial":
            self._partial = (event.get("stable", ""), event.get("unstable", ""))
            if self.live:
                self.live.update(self._render())
        elif kind == "final":
            self._partial = ("", "")
            lat = f"  [dim]({event['latency_ms']:.0f} ms)[/dim]" if self.show_latency and event.get("latency_ms") \
                is not None else ""
            from rich.markup import escape

            self.console.print(f"[cyan]{event['start']:7.2f}[/cyan] {escape(event['text'])}{lat}")
            if self.live:
                self.live.update(self._render())
        elif kind == "error":
            self.console.print(f"[red]error[/red] {event.get('code')}: {event.get('message')}")
        elif kind == "end":
            self.close()

    def close(self) -> None:
        if self.live:
            self.live.stop()
            self.live = None


def fan_out(*sinks: Callable[[dict], None]) -> Callable[[dict], None]:
    def emit(event: dict) -> None:
        for s in sinks:
            s(event)
    return emit
