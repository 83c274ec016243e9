"""What the caption pipeline needs from a streaming recognizer, and adapters that provide it.

``StreamingRecognizer`` is deliberately small: accept 16 kHz mono float32 audio of any size, return the current
hypothesis for the whole stream (tokens with absolute times, how many are final), and finish. The adapters:

* ``SessionRecognizer`` wraps a ``trt_asr.streaming`` stream session (buffered or cache-aware mode); several share
  one ``SharedRecognizer`` (one lock, batched steps);
* ``RedecodeRecognizer`` is the dependency-free fallback: it re-decodes all audio so far (full attention) every
  ``step_s`` seconds. Its final hypothesis is exactly the offline transcript; partials cost O(n^2), so it is meant
  for short clips, tests and models without a streaming mode.

Design for later (interfaces only): ``AudioFanout`` lets several recognizers share one DSP path and
``HypothesisAggregator`` combines their hypotheses into one (v1: ``SingleEngineAggregator``).
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from .transcript import Hypothesis, Token


@runtime_checkable
class StreamingRecognizer(Protocol):
    sample_rate: int
    mode: str  # "buffered" | "cache-aware" | "redecode"

    def feed(self, audio: np.ndarray) -> Hypothesis | None:
        """Append audio; run whatever inference is due; return the new hypothesis or None if nothing ran."""
        ...

    def finish(self) -> Hypothesis:
        """Flush (pad the end); the returned hypothesis has ``is_last=True``."""
        ...


def tokens_from_triples(model, triples: Sequence[tuple[int, int, int]], frame_offset: int = 0) -> list[Token]:
    """(label, frame, duration) -> Tokens with absolute times (same timing rules as the offline transcript)."""
    tok = model.tokenizer
    fs = model.cfg.frame_seconds
    tdt = model.cfg.decoding.model_type == "tdt"
    out = []
    for label, frame, dur in triples:
        frame = int(frame) + frame_offset
        span = max(int(dur), 1) if tdt else 1
        out.append(Token(int(label), frame * fs, (frame + span) * fs,
                         tok.starts_word(int(label)) if tok else True, tok.piece(int(label)) if tok else f"<{label}>"))
    return out


def model_decoder(model) -> Callable[[list[int]], str]:
    tok = model.tokenizer
    if tok is None:
        return lambda ids: " ".join(f"<{i}>" for i in ids)
    return lambda ids: tok.decode(ids).strip()


class RedecodeRecognizer:
    """Fallback recognizer: decode all audio so far with full attention every ``step_s`` seconds of new audio."""

    mode = "redecode"

    def __init__(self, model, step_s: float = 0.48, max_seconds: float = 120.0, lock: threading.Lock | None = None):
        self.model = model
        self.sample_rate = model.cfg.sample_rate
        self.step = int(step_s * self.sample_rate)
        self.max_samples = int(max_seconds * self.sample_rate)
        self._chunks: list[np.ndarray] = []
        self._n = 0
        self._decoded_n = 0
        self._decoder = model.greedy_decoder()
        self._lock = lock or threading.Lock()

    def _audio(self) -> np.ndarray:
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0] if self._chunks else np.zeros(0, np.float32)

    def _decode(self, is_last: bool) -> Hypothesis:
        import torch

        audio = self._audio()
        start = max(0, audio.size - self.max_samples)  # bounded cost on long streams (loses exactness beyond it)
        x = audio[start:]
        if x.size == 0:
            return Hypothesis([], 0, audio.size / self.sample_rate, is_last)
        with self._lock, torch.no_grad():
            a = torch.from_numpy(np.ascontiguousarray(x))[None].to(self.model.device)
            n = torch.tensor([x.size], device=self.model.device)
            enc, enc_len = self.model.encode(a, n)
            toks, _ = self._decoder(enc, enc_len)
        offset = int(round(start / self.sample_rate / self.model.cfg.frame_seconds))
        tokens = tokens_from_triples(self.model, toks.to_lists()[0], offset)
        self._decoded_n = audio.size
        return Hypothesis(tokens, len(tokens) if is_last else 0, audio.size / self.sample_rate, is_last)

    def feed(self, audio: np.ndarray) -> Hypothesis | None:
        if audio.size:
            self._chunks.append(np.asarray(audio, np.float32))
            self._n += audio.size
        if self._n - self._decoded_n >= self.step:
            return self._decode(False)
        return None

    def finish(self) -> Hypothesis:
        return self._decode(True)


class SharedRecognizer:
    """A ``trt_asr.streaming.Recognizer`` shared by many caption pipelines (threads): one lock around every call,
    and each call steps *all* ready sessions in one batch (other sessions' events wait in their queues)."""

    def __init__(self, model, mode: str = "buffered", **params):
        from ..streaming import Recognizer

        self.model = model
        self.mode_name = mode
        self.params = params
        self.recognizer = Recognizer(model, mode, **params)
        self.lock = threading.Lock()

    def open(self) -> "SessionRecognizer":
        with self.lock:
            return SessionRecognizer(self, self.recognizer.open())


def caption_token(model, frame_seconds: float, t) -> Token:
    """A streaming token (id, frame, duration) as a captions Token with times in seconds."""
    tok = model.tokenizer
    span = max(int(t.duration), 1)
    return Token(int(t.id), t.frame * frame_seconds, (t.frame + span) * frame_seconds,
                 tok.starts_word(int(t.id)) if tok else True, tok.piece(int(t.id)) if tok else f"<{t.id}>")


def stream_horizon(state, received: int, sample_rate: int, frame_seconds: float, mode: str,
                   last: bool) -> tuple[float, float | None]:
    """(live edge in seconds, time before which the engine's output is final or None) for a session's state."""
    edge = getattr(state, "left_sample", None)
    edge = received if edge is None or last else min(int(edge), received)
    if last:
        final_until = edge / sample_rate
    elif hasattr(state, "frames_decoded"):  # buffered: frames before the current chunk's end are final
        final_until = int(state.frames_decoded) * frame_seconds
    elif mode.startswith("cache"):  # cache-aware: everything emitted is final
        final_until = edge / sample_rate
    else:
        final_until = None
    return edge / sample_rate, final_until


class SessionRecognizer:
    """``StreamingRecognizer`` over a ``trt_asr.streaming`` session: committed tokens are engine-final (buffered: the
    chunk; cache-aware: everything emitted), the tentative tail (buffered: the right context) is revisable."""

    def __init__(self, shared: SharedRecognizer, session):
        self.shared = shared
        self.session = session
        self.model = shared.model
        self.mode = shared.mode_name
        self.sample_rate = shared.recognizer.mode.sample_rate
        self._fs = shared.recognizer.mode.frame_seconds
        self._received = 0
        self._committed: list[Token] = []

    def _token(self, t) -> Token:
        return caption_token(self.model, self._fs, t)

    def _hyp(self, events, last: bool) -> Hypothesis | None:
        if not events and not last:
            return None
        s = self.session
        if len(self._committed) < len(s.tokens):  # committed tokens only grow: convert each once
            self._committed.extend(self._token(t) for t in s.tokens[len(self._committed):])
        committed = self._committed
        tentative = [] if last else [self._token(t) for t in s.tentative]
        edge, final_until = stream_horizon(s.state, self._received, self.sample_rate, self._fs, self.mode, last)
        return Hypothesis(committed + tentative, len(committed), edge, last, final_until)


    def feed(self, audio: np.ndarray) -> Hypothesis | None:
        self._received += int(audio.size)
        with self.shared.lock:
            events = self.session.feed(np.asarray(audio, np.float32)) if audio.size else \
                (self.shared.recognizer.run() or self.session.poll())
        return self._hyp(events, False)

    def finish(self) -> Hypothesis:
        with self.shared.lock:
            self.session.finish()
        return self._hyp([], True)

    def close(self) -> None:
        with self.shared.lock:
            self.session.close()


def open_recognizer(model, mode: str = "buffered", shared: SharedRecognizer | None = None, **params):
    """A ``StreamingRecognizer`` for ``mode``: "redecode" (fallback), or a ``trt_asr.streaming`` mode name."""
    if mode == "redecode":
        return RedecodeRecognizer(model, **params)
    shared = shared or SharedRecognizer(model, mode, **params)
    return shared.open()


# ------------------------------------------------------------------------------------------- design for later
class AudioFanout:
    """One DSP path, several consumers (recognizers, recorders, meters). v1 delivers synchronously in order."""

    def __init__(self):
        self._consumers: list[Callable[[np.ndarray], None]] = []

    def subscribe(self, consumer: Callable[[np.ndarray], None]) -> None:
        self._consumers.append(consumer)

    def push(self, audio: np.ndarray) -> None:
        for c in self._consumers:
            c(audio)


class HypothesisAggregator(Protocol):
    """Combines hypotheses of several recognizers of the same audio into one (ROVER, confidence voting, ...)."""

    def combine(self, hypotheses: Sequence[Hypothesis | None]) -> Hypothesis | None: ...


class SingleEngineAggregator:
    def combine(self, hypotheses: Sequence[Hypothesis | None]) -> Hypothesis | None:
        return hypotheses[0] if hypotheses else None
