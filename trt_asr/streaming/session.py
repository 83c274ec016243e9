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
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from ..transcribe import TimedToken, Transcript, Word, make_transcript, timed_tokens  # one set of result types


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
    horizon: int | None = None  # encoder frames since stream start that are decided (None: last committed token's)


@runtime_checkable
class StreamingMode(Protocol):
    """A streaming decoder for many streams. Per-stream state is an opaque object from ``new_stream``; the mode
    owns the model / engine and never keeps per-stream state elsewhere, so streams can be stepped in any grouping.

    Contract: ``push`` and ``end`` only buffer (no compute). ``ready(s)`` says a step would make progress: a full
    chunk (plus whatever look-ahead the mode needs) is buffered, or the stream ended and is not ``finished``.
    ``step(streams)`` runs one step for a batch of ready streams (one encoder call and one decoder loop for all)
    and returns one ``StepResult`` per stream, in order. After ``end``, repeated steps must reach ``finished``.

    Optional hooks the scheduler uses when a mode has them: ``step_begin(streams)`` / ``step_end(handle)`` (a step
    split around its device work, so the host works meanwhile), ``samples_to_ready(s)`` (the fewest more samples
    that make ``ready(s)`` true without ``end``; 0 when ready or ended: the scheduler then visits a stream about once
    per chunk instead of on every push), ``release(s)`` (pooled state freed) and ``accepts_numpy``.
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
# TimedToken(id, piece, frame, duration, start, end) and Word(word, start, end) are trt_asr.transcribe's types, so
# streamed and offline results print the same.
@dataclass
class StreamEvent:
    committed: list[TimedToken]  # tokens committed by this step (append to what came before)
    tentative: list[TimedToken]  # the whole tentative tail now (replaces the previous one)
    words: list[Word]  # words completed by this step (a word completes when the next word starts, or at the end)
    text: str  # all committed text so far
    tentative_text: str  # text of the tentative tail (to show after ``text``)
    final: bool = False
    committed_until: float = 0.0  # seconds since stream start up to which the transcript is final


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
        tok = recognizer.tokenizer
        self._lean = recognizer.events == "tokens"
        # committed text, not re-decoded every step (lean events: decoded only if ``text`` is asked for)
        self._text = tok.incremental() if tok is not None and not self._lean else None
        self._word_from = 0  # index in self.tokens where the current (incomplete) word starts
        self._scanned = 0  # tokens before this index were already checked for word starts
        self.horizon = 0  # encoder frames decided so far (nothing before it can change)

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
    def committed_until(self) -> float:
        """Seconds of audio (since stream start) whose transcript is final."""
        return self.horizon * self.recognizer.mode.frame_seconds

    @property
    def text(self) -> str:
        if self._text is not None:
            return self._text.text
        return self.recognizer.detokenize([t.id for t in self.tokens])

    def transcript(self) -> Transcript:
        """Committed tokens so far as an offline-style Transcript."""
        return make_transcript(self.recognizer.model, [(t.id, t.frame, t.duration) for t in self.tokens])

    # -------------------------------------------------------------- from the recognizer
    def _on_step(self, result: StepResult) -> None:
        rec = self.recognizer
        self.tokens.extend(result.committed)
        if self._text is not None and result.committed:
            self._text.extend([t.id for t in result.committed])
        self.tentative = list(result.tentative)
        if result.horizon is not None:
            self.horizon = result.horizon
        elif result.committed:
            self.horizon = result.committed[-1].frame
        if self._lean:
            self.finished = result.finished
            self._events.append(StreamEvent(committed=list(result.committed), tentative=self.tentative, words=[],
                                            text="", tentative_text="", final=result.finished,
                                            committed_until=self.committed_until))
            if result.finished:
                rec._remove(self)
            return
        new_words = self._complete_words(final=result.finished)
        self.finished = result.finished
        self._events.append(StreamEvent(
            committed=rec.timed(result.committed),
            tentative=rec.timed(self.tentative),
            words=new_words,
            text=self.text,
            tentative_text=rec.detokenize([t.id for t in self.tentative]),
            final=result.finished,
            committed_until=self.committed_until,
        ))
        if result.finished:
            rec._remove(self)

    def _complete_words(self, final: bool) -> list[Word]:
        rec = self.recognizer
        # tokens before _scanned were looked at by an earlier step (none of them starts a word after _word_from):
        # each token is looked at once, however long a word gets
        first = max(self._word_from + 1, self._scanned)
        starts = [i for i in range(first, len(self.tokens)) if rec.starts_word(self.tokens[i].id)]
        self._scanned = len(self.tokens)
        bounds = starts + ([len(self.tokens)] if final and self._word_from < len(self.tokens) else [])
        out = []
        for end in bounds:
            word = rec.make_word(self.tokens[self._word_from:end])
            if word.word:
                out.append(word)
            self._word_from = end
        self.words.extend(out)
        return out


class Recognizer:
    """Owns the model (through a mode) and all open sessions; steps every ready session in one batch.

    ``mode``: "buffered" (default) or "cache_aware", or a ``StreamingMode`` object; ``params`` go to the mode
    (buffered: left_secs, chunk_secs, right_secs, ...). ``max_batch`` caps the streams in one step.

    ``events="tokens"``: each ``StreamEvent`` carries the step's tokens as the mode gave them (``Token``: id, frame,
    duration) and ``final`` / ``committed_until``, without pieces, times, words or text (empty). For consumers that
    build their own text from the tokens (the caption layer, an engine process sending tokens to its front-ends):
    detokenising every stream at every step is a large share of a busy scheduler's host work."""

    def __init__(self, model, mode: str | StreamingMode = "buffered", max_batch: int = 64, events: str = "full",
                 **params):
        if events not in ("full", "tokens"):
            raise ValueError(f"events must be 'full' or 'tokens', got {events!r}")
        self.model = model
        self.mode = make_mode(model, mode, **params)
        self.max_batch = max_batch
        self.events = events
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
        if not ids:
            return ""
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return self.tokenizer.decode(ids)

    def starts_word(self, token_id: int) -> bool:
        return self.tokenizer.starts_word(token_id) if self.tokenizer is not None else True

    def timed(self, tokens: Sequence[Token]) -> list[TimedToken]:
        """Tokens with pieces and times in seconds, as the offline transcript gives them."""
        return timed_tokens(self.model, [(t.id, t.frame, t.duration) for t in tokens]) if tokens else []

    def make_word(self, tokens: Sequence[Token]) -> Word:
        """The word spelled by tokens (one word start .. before the next), timed as the offline transcript does."""
        if self.tokenizer is None:
            words = make_transcript(self.model, [(t.id, t.frame, t.duration) for t in tokens]).words
            return words[0] if words else Word("", 0.0, 0.0)
        text = self.tokenizer.decode([t.id for t in tokens]).strip() if tokens else ""
        if not text:
            return Word("", 0.0, 0.0)
        timed = self.timed(tokens)  # one word: make_transcript's grouping gives exactly this
        return Word(text, round(timed[0].start, 3), round(max(t.end for t in timed), 3))


def _as_pcm(pcm) -> torch.Tensor:
    if isinstance(pcm, torch.Tensor):
        x = pcm.detach().to("cpu", torch.float32)
    else:
        x = torch.from_numpy(np.ascontiguousarray(pcm, dtype=np.float32))
    if x.dim() != 1:
        raise ValueError(f"expected mono PCM [N], got shape {tuple(x.shape)}")
    return x


# ----------------------------------------------------------------------------------------------- whole files
def stream_tokens(model, audio_list: Iterable, mode: str | StreamingMode = "buffered", piece_secs: float | None = None,
                  max_batch: int = 64, **params) -> list[list[Token]]:
    """Stream each audio (float32 mono at the model's rate) through one Recognizer, all sessions batched together,
    fed in pieces of ``piece_secs`` (None: whole file at once). Returns the committed tokens per audio."""
    rec = Recognizer(model, mode, max_batch=max_batch, **params)
    audios = [_as_pcm(a) for a in audio_list]
    sessions = [rec.open() for _ in audios]
    longest = max((len(a) for a in audios), default=0)
    piece = max(longest, 1) if piece_secs is None else max(1, int(piece_secs * rec.mode.sample_rate))
    for pos in range(0, longest, piece):
        for s, a in zip(sessions, audios):
            if pos < len(a):
                s.feed(a[pos:pos + piece], step=False)
        rec.run()
        for s in sessions:
            s.poll()  # events are not needed here; do not let them pile up
    for s in sessions:
        s.finish(step=False)
    rec.run()
    return [s.tokens for s in sessions]


def transcribe_streaming(model, audio_list: Iterable, mode: str | StreamingMode = "buffered",
                         piece_secs: float | None = None, max_batch: int = 64, **params) -> list[Transcript]:
    """Offline-style transcription through the streaming session API (what ``trt-asr transcribe --stream`` runs).

    ``mode``: "buffered" / "cache_aware" ("cache-aware" accepted); ``params`` go to the mode, e.g.
    ``left_secs=10, chunk_secs=2, right_secs=2`` for buffered. All audios stream concurrently, batched. Returns one
    ``trt_asr.transcribe.Transcript`` per audio (``audio`` name and ``duration`` are filled in)."""
    audios = [_as_pcm(a) for a in audio_list]
    per_audio = stream_tokens(model, audios, mode, piece_secs, max_batch, **params)
    sr = model.cfg.sample_rate
    return [make_transcript(model, [(t.id, t.frame, t.duration) for t in tokens], audio=f"<array {i}>",
                            duration=len(a) / sr) for i, (tokens, a) in enumerate(zip(per_audio, audios))]
