"""Offline transcription: audio files or arrays -> text, word and token timestamps.

Utterances are sorted by length and batched (one encoder call and one decoder loop per batch). Audio longer than
``max_window_seconds`` is transcribed in buffered windows (the same code path as buffered streaming), so an hour of
audio needs bounded memory; shorter audio gets one full-attention pass, exactly as NeMo's ``transcribe``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .audio import AudioError, load_audio
from .model.asr import TransducerModel


@dataclass
class TimedToken:
    id: int
    piece: str
    frame: int  # encoder frame (80 ms for v3) since the start of the audio
    duration: int  # frames (TDT); 1 for RNNT
    start: float  # seconds
    end: float


@dataclass
class Word:
    word: str
    start: float
    end: float

    @property
    def text(self) -> str:
        return self.word


@dataclass
class Transcript:
    audio: str
    text: str
    duration: float
    words: list[Word] = field(default_factory=list)
    tokens: list[TimedToken] = field(default_factory=list)
    error: str | None = None

    def to_dict(self, with_tokens: bool = False) -> dict:
        d = {"audio": self.audio, "text": self.text, "duration": round(self.duration, 3),
             "words": [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)} for w in self.words]}
        if with_tokens:
            d["tokens"] = [asdict(t) for t in self.tokens]
        if self.error:
            d["error"] = self.error
        return d


def timed_tokens(model: TransducerModel, triples: Sequence[tuple[int, int, int]],
                 frame_offset: int = 0) -> list[TimedToken]:
    """(label, frame, duration) triples -> tokens with their pieces and times in seconds (each on its own)."""
    tok = model.tokenizer
    fs = model.cfg.frame_seconds
    tdt = model.cfg.decoding.model_type == "tdt"
    tokens = []
    for label, frame, dur in triples:
        frame += frame_offset
        span = max(int(dur), 1) if tdt else 1
        piece = tok.piece(label) if tok else f"<{label}>"
        tokens.append(TimedToken(int(label), piece, int(frame), int(dur) if tdt else 1, frame * fs, (frame + span) * fs))
    return tokens


def make_transcript(model: TransducerModel, triples: Sequence[tuple[int, int, int]], audio: str = "",
                    duration: float = 0.0, frame_offset: int = 0) -> Transcript:
    """(label, frame, duration) triples -> text, tokens and words with times in seconds."""
    tok = model.tokenizer
    tokens = timed_tokens(model, triples, frame_offset)
    words: list[Word] = []
    groups: list[list[TimedToken]] = []
    for t in tokens:
        starts = tok.starts_word(t.id) if tok else True
        if starts or not groups:
            groups.append([t])
        else:
            groups[-1].append(t)
    for g in groups:
        text = tok.decode([t.id for t in g]).strip() if tok else " ".join(t.piece for t in g)
        if text:
            words.append(Word(text, round(g[0].start, 3), round(max(t.end for t in g), 3)))
    text = tok.decode([t.id for t in tokens]).strip() if tok else " ".join(t.piece for t in tokens)
    return Transcript(audio=audio, text=text, duration=duration, words=words, tokens=tokens)


class Transcriber:
    """Batched offline transcription with one model (torch engine)."""

    def __init__(self, model: TransducerModel, batch_size: int = 16, max_window_seconds: float = 300.0,
                 long_audio: dict | None = None):
        self.model = model
        self.batch_size = max(1, batch_size)
        self.max_window_seconds = max_window_seconds
        # buffered windows for long audio: left / chunk / right context in seconds
        self.long_audio = long_audio or {"left_secs": 20.0, "chunk_secs": 60.0, "right_secs": 20.0}
        self.decoder = model.greedy_decoder()

    @property
    def sample_rate(self) -> int:
        return self.model.cfg.sample_rate

    @torch.no_grad()
    def transcribe_arrays(self, arrays: Sequence[np.ndarray], names: Sequence[str] | None = None,
                          progress: bool = False) -> list[Transcript]:
        names = list(names) if names is not None else [f"<array {i}>" for i in range(len(arrays))]
        results: list[Transcript | None] = [None] * len(arrays)
        short = [i for i, a in enumerate(arrays) if len(a) <= self.max_window_seconds * self.sample_rate]
        long = [i for i in range(len(arrays)) if i not in set(short)]
        short.sort(key=lambda i: -len(arrays[i]))
        bar = tqdm(total=len(arrays), desc="transcribing", unit="file", file=sys.stderr,
                   disable=not progress or not sys.stderr.isatty())
        for start in range(0, len(short), self.batch_size):
            idx = short[start : start + self.batch_size]
            for i, tr in zip(idx, self._transcribe_batch([arrays[i] for i in idx])):
                tr.audio = names[i]
                results[i] = tr
            bar.update(len(idx))
        if long:
            from .streaming import transcribe_streaming  # buffered windows: same code as buffered streaming

            outs = transcribe_streaming(self.model, [arrays[i] for i in long], mode="buffered", **self.long_audio)
            for i, tr in zip(long, outs):
                tr.audio = names[i]
                tr.duration = len(arrays[i]) / self.sample_rate
                results[i] = tr
            bar.update(len(long))
        bar.close()
        return results  # type: ignore[return-value]

    def _transcribe_batch(self, arrays: Sequence[np.ndarray]) -> list[Transcript]:
        device = self.model.device
        lengths = torch.tensor([len(a) for a in arrays], dtype=torch.long)
        audio = torch.zeros(len(arrays), int(lengths.max()), dtype=torch.float32)
        for b, a in enumerate(arrays):
            audio[b, : len(a)] = torch.from_numpy(np.asarray(a, dtype=np.float32))
        audio, lengths = audio.to(device), lengths.to(device)
        encoded, enc_len = self.model.encode(audio, lengths)
        tokens, _ = self.decoder(encoded, enc_len)
        return [make_transcript(self.model, triples, duration=len(a) / self.sample_rate)
                for triples, a in zip(tokens.to_lists(), arrays)]

    def transcribe_files(self, paths: Sequence[str | Path], progress: bool = False) -> list[Transcript]:
        """Transcribe files; an unreadable or empty file gives a Transcript with ``error`` set (others go on)."""
        arrays, names, results = [], [], {}
        for p in paths:
            try:
                arrays.append(load_audio(p, self.sample_rate))
                names.append(str(p))
            except AudioError as e:
                results[str(p)] = Transcript(audio=str(p), text="", duration=0.0, error=str(e))
        done = {t.audio: t for t in self.transcribe_arrays(arrays, names, progress=progress)} if arrays else {}
        return [results.get(str(p)) or done[str(p)] for p in paths]


def transcribe(audio: str | Path | np.ndarray | Sequence, model: TransducerModel | str | None = None,
               batch_size: int = 16) -> list[Transcript]:
    """Convenience API: ``transcribe("a.wav")`` or ``transcribe(["a.wav", "b.flac"], model="random:tiny")``."""
    from .checkpoint import load_model

    if not isinstance(model, TransducerModel):
        model = load_model(model)
    items = [audio] if isinstance(audio, (str, Path, np.ndarray)) else list(audio)
    t = Transcriber(model, batch_size=batch_size)
    if all(isinstance(x, np.ndarray) for x in items):
        return t.transcribe_arrays(items)
    return t.transcribe_files(items)

