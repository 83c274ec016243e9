"""Stream sessions: the one API that live captions, the server and the CLI use for streaming recognition.

    rec = Recognizer(model, mode="buffered", left_secs=10, chunk_secs=2, right_secs=2)
    s = rec.open()
    for pcm in pieces:                      # float32 mono 16 kHz, any size (10 ms .. seconds)
        for ev in s.feed(pcm):              # StreamEvent: newly committed tokens/words + the tentative tail
            show(ev.text, ev.tentative_text)
    for ev in s.finish():                   # flushes the tail; the last event has final=True
        ...

Many sessions batch together: ``feed(pcm, step=False)`` only queues audio; ``rec.step()`` then runs ONE batched
step (one encoder call, one decoder loop) for every session with a full chunk ready, and each session's events wait
in its queue (``s.poll()``). ``s.feed(pcm)`` (step=True) does both: it steps everything ready, then returns this
session's events.

A *mode* (``StreamingMode`` below) does the recognition; the session only turns its token steps into timed events.
Modes: "buffered" (``trt_asr.streaming.buffered.BufferedMode``, full-attention models such as v3) and "cache_aware"
(``trt_asr.streaming.cache_aware.CacheAwareMode``, models trained with chunked-limited attention). A mode is looked
up by name in ``MODES`` ("module:Class", constructed as ``Class(model, **params)``) or passed in as an object.

Timestamps are absolute: ``Token.frame`` counts encoder frames (80 ms for v3) since the stream started.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------- mode interface
@dataclass(frozen=True)
class Token:
    """One emitted token: vocabulary id, absolute encoder frame, TDT duration in frames (0 for RNNT labels)."""

    id: int
    frame: int
    duration: int = 0


@dataclass
class StepResult:
    """What a mode returns for one stream after one step."""

    committed: list[Token]  # tokens final from now on, in order (never retracted)
    tentative: list[Token]  # the tentative tail after this step (replaces the previous tail; may change)
    finished: bool = False  # the stream ended and everything was decoded


@runtime_checkable
class StreamingMode(Protocol):
    """A streaming decoder for many streams. Per-stream state is an opaque object from ``new_stream``; the mode
    owns the model / engine and never keeps per-stream state elsewhere, so streams can be stepped in any grouping.

    Contract: ``push`` and ``end`` only buffer (no compute). ``ready(s)`` says a step would make progress: a full
    chunk (plus whatever look-ahead the mode needs) is buffered, or the stream ended and is not ``finished``.
    ``step(streams)`` runs one step for a batch of ready streams (one encoder call and one decoder loop for all)
    and returns one ``StepResult`` per stream, in order. After ``end``, repeated steps must reach ``finished``.
    """

    name: str
    sample_rate: int
    frame_seconds: float  # seconds per encoder frame (Token.frame units)

    def new_stream(self) -> Any: ...

    def push(self, stream: Any, pcm: torch.Tensor) -> None:
        """Append float32 mono samples [N] at ``sample_rate``."""
        ...

    def end(self, stream: Any) -> None:
        """No more audio will come for this stream."""
        ...

    def ready(self, stream: Any) -> bool: ...

    def step(self, streams: Sequence[Any]) -> list[StepResult]: ...


MODES = {
    "buffered": "trt_asr.streaming.buffered:BufferedMode",
    "cache_aware": "trt_asr.streaming.cache_aware:CacheAwareMode",
}


def make_mode(model, mode: str | StreamingMode = "buffered", **params) -> StreamingMode:
    if not isinstance(mode, str):
        return mode
    key = mode.replace("-", "_")
    if key not in MODES:
        raise ValueError(f"unknown streaming mode {mode!r}; known: {', '.join(MODES)}")
    module, _, cls = MODES[key].partition(":")
    return getattr(importlib.import_module(module), cls)(model, **params)


# ----------------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class TimedToken:
    id: int
    text: str  # SentencePiece piece ("▁" marks a word start)
    frame: int
    duration: int
    start: float  # seconds since stream start
    end: float


@dataclass(frozen=True)
class Word:
    text: str
    start: float
    end: float


@dataclass
class StreamEvent:
    committed: list[TimedToken]  # tokens committed by this step (append to what came before)
    tentative: list[TimedToken]  # the whole tentative tail now (replaces the previous one)
    words: list[Word]  # words completed by this step (a word completes when the next word starts, or at the end)
    text: str  # all committed text so far
    tentative_text: str  # text of the tentative tail (to show after ``text``)
    final: bool = False


class StreamSession:
    """One audio stream. Made by ``Recognizer.open()``."""

    def __init__(self, recognizer: "Recognizer", stream_id: int):
        self.recognizer = recognizer
        self.id = stream_id
        self.state = recognizer.mode.new_stream()
        self.tokens: list[Token] = []  # committed
        self.tentative: list[Token] = []
        self.words: list[Word] = []  # completed words
        self.ended = False
        self.finished = False
        self._events: list[StreamEvent] = []
        self._word_from = 0  # index in self.tokens where the current (incomplete) word starts

    # -------------------------------------------------------------- public
    def feed(self, pcm, step: bool = True) -> list[StreamEvent]:
        """Queue float32 16 kHz mono samples (any size). step=True: run all ready steps (batched with other
        sessions) and return this session's new events; step=False: only queue (call ``Recognizer.step()``)."""
        if self.ended:
            raise RuntimeError("feed() after finish()")
        pcm_n = _as_pcm(pcm)
        if pcm_n.numel():
            self.recognizer.mode.push(self.state, pcm_n)
        if step:
            self.recognizer.run()
        return self.poll()

    def finish(self, step: bool = True) -> list[StreamEvent]:
        """End of audio: decode everything left (the tail is committed). Returns the remaining events; the last
        one has ``final=True``."""
        if not self.ended:
            self.ended = True
            self.recognizer.mode.end(self.state)
        if step:
            self.recognizer.run()
        return self.poll()

    def poll(self) -> list[StreamEvent]:
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        """Forget the stream (without decoding the rest)."""
        self.recognizer._remove(self)

    @property
    def text(self) -> str:
        return self.recognizer.detokenize([t.id for t in self.tokens])

    def transcript_tokens(self) -> list[TimedToken]:
        return [self.recognizer.timed(t) for t in self.tokens]

    # -------------------------------------------------------------- from the recognizer
    def _on_step(self, result: StepResult) -> None:
        rec = self.recognizer
        self.tokens.extend(result.committed)
        self.tentative = list(result.tentative)
        new_words = self._complete_words(final=result.finished)
        self.finished = result.finished
        self._events.append(StreamEvent(
            committed=[rec.timed(t) for t in result.committed],
            tentative=[rec.timed(t) for t in self.tentative],
            words=new_words,
            text=self.text,
            tentative_text=rec.detokenize([t.id for t in self.tentative]),
            final=result.finished,
        ))
        if result.finished:
            rec._remove(self)

    def _complete_words(self, final: bool) -> list[Word]:
        rec = self.recognizer
        starts = [i for i in range(self._word_from + 1, len(self.tokens)) if rec.starts_word(self.tokens[i].id)]
        bounds = starts + ([len(self.tokens)] if final and self._word_from < len(self.tokens) else [])
        out = []
        for end in bounds:
            word = rec.make_word(self.tokens[self._word_from:end])
            if word.text:
                out.append(word)
            self._word_from = end
        self.words.extend(out)
        return out


class Recognizer:
    """Owns the model (through a mode) and all open sessions; steps every ready session in one batch.

    ``mode``: "buffered" (default) or "cache_aware", or a ``StreamingMode`` object; ``params`` go to the mode
    (buffered: left_secs, chunk_secs, right_secs, ...). ``max_batch`` caps the streams in one step."""

    def __init__(self, model, mode: str | StreamingMode = "buffered", max_batch: int = 64, **params):
        self.model = model
        self.mode = make_mode(model, mode, **params)
        self.max_batch = max_batch
        self.tokenizer = getattr(model, "tokenizer", None)
        self.sessions: dict[int, StreamSession] = {}
        self._next_id = 0

    def open(self) -> StreamSession:
        session = StreamSession(self, self._next_id)
        self.sessions[session.id] = session
        self._next_id += 1
        return session

    def step(self) -> int:
        """One batched step for (up to max_batch of) the sessions that are ready; returns how many were stepped."""
        ready = [s for s in self.sessions.values() if self.mode.ready(s.state)][: self.max_batch]
        if not ready:
            return 0
        results = self.mode.step([s.state for s in ready])
        for session, result in zip(ready, results):
            session._on_step(result)
        return len(ready)

    def run(self) -> None:
        """Step until no session is ready."""
        while self.step():
            pass

    def _remove(self, session: StreamSession) -> None:
        self.sessions.pop(session.id, None)

    # -------------------------------------------------------------- tokens -> text and time
    def detokenize(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return self.tokenizer.decode(ids)

    def starts_word(self, token_id: int) -> bool:
        return self.tokenizer.starts_word(token_id) if self.tokenizer is not None else True

    def timed(self, t: Token) -> TimedToken:
        fs = self.mode.frame_seconds
        piece = self.tokenizer.piece(t.id) if self.tokenizer is not None else str(t.id)
        return TimedToken(t.id, piece, t.frame, t.duration, t.frame * fs, (t.frame + max(t.duration, 1)) * fs)

    def make_word(self, tokens: Sequence[Token]) -> Word:
        fs = self.mode.frame_seconds
        last = tokens[-1]
        return Word(self.detokenize([t.id for t in tokens]).strip(), tokens[0].frame * fs,
                    (last.frame + max(last.duration, 1)) * fs)


def _as_pcm(pcm) -> torch.Tensor:
    if isinstance(pcm, torch.Tensor):
        x = pcm.detach().to("cpu", torch.float32)
    else:
        x = torch.from_numpy(np.ascontiguousarray(pcm, dtype=np.float32))
    if x.dim() != 1:
        raise ValueError(f"expected mono PCM [N], got shape {tuple(x.shape)}")
    return x


# ----------------------------------------------------------------------------------------------- whole files
@dataclass
class StreamResult:
    """Result of streaming one whole file (used when trt_asr.transcribe's types are not available)."""

    text: str
    tokens: list[TimedToken] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)


def stream_tokens(model, audio_list: Iterable, mode: str | StreamingMode = "buffered", piece_secs: float | None = None,
                  max_batch: int = 64, **params) -> list[list[Token]]:
    """Stream each audio (float32 mono at the model's rate) through one Recognizer, all sessions batched together,
    fed in pieces of ``piece_secs`` (None: whole file at once). Returns the committed tokens per audio."""
    rec = Recognizer(model, mode, max_batch=max_batch, **params)
    audios = [_as_pcm(a) for a in audio_list]
    sessions = [rec.open() for _ in audios]
    piece = len(max(audios, key=len, default=[])) if piece_secs is None else max(1, int(piece_secs * rec.mode.sample_rate))
    pos = 0
    longest = max((len(a) for a in audios), default=0)
    while pos < longest:
        for s, a in zip(sessions, audios):
            if pos < len(a):
                s.feed(a[pos:pos + piece], step=False)
        rec.run()
        pos += piece
    for s in sessions:
        s.finish(step=False)
    rec.run()
    return [s.tokens for s in sessions]


def transcribe_streaming(model, audio_list: Iterable, mode: str | StreamingMode = "buffered",
                         piece_secs: float | None = None, max_batch: int = 64, **params) -> list:
    """Offline-style transcription through the streaming session API (what ``trt-asr transcribe --stream`` runs).

    ``params`` go to the mode, e.g. ``left_secs=10, chunk_secs=2, right_secs=2`` for buffered. Returns one
    transcript per audio: ``trt_asr.transcribe.Transcript`` objects when that module provides a way to build them
    from tokens (see ``_to_transcripts``), else ``StreamResult``."""
    audios = list(audio_list)
    per_audio = stream_tokens(model, audios, mode, piece_secs, max_batch, **params)
    return _to_transcripts(model, per_audio, model.cfg.frame_seconds)


def _to_transcripts(model, per_audio: list[list[Token]], frame_seconds: float) -> list:
    try:  # the offline transcribe module's own result types, so both paths print the same
        from .. import transcribe as offline
        build = getattr(offline, "transcript_from_tokens")
    except (ImportError, AttributeError):
        build = None
    if build is not None:
        return [build(model, [(t.id, t.frame, t.duration) for t in tokens]) for tokens in per_audio]
    tok = getattr(model, "tokenizer", None)
    out = []
    for tokens in per_audio:
        timed, words, cur = [], [], []
        for t in tokens:
            piece = tok.piece(t.id) if tok is not None else str(t.id)
            timed.append(TimedToken(t.id, piece, t.frame, t.duration, t.frame * frame_seconds,
                                    (t.frame + max(t.duration, 1)) * frame_seconds))
            if cur and (tok is None or tok.starts_word(t.id)):
                words.append(cur)
                cur = []
            cur.append(timed[-1])
        if cur:
            words.append(cur)
        decode = (lambda ids: tok.decode(ids)) if tok is not None else (lambda ids: " ".join(map(str, ids)))
        word_objs = [Word(decode([t.id for t in w]).strip(), w[0].start, w[-1].end) for w in words]
        out.append(StreamResult(decode([t.id for t in tokens]), timed, [w for w in word_objs if w.text]))
    return out
