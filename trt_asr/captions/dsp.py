"""Streaming DSP for live captions: bytes/arrays of any rate and channel count -> 16 kHz mono float32, in small
steps (soxr streaming resampler), optional gain normalisation, and an energy voice-activity detector with hangover
that marks utterance ends (endpoints).

Everything here is incremental and cheap: one call per captured chunk, no look-ahead beyond the resampler's own
filter delay, so capture never waits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ENCODINGS = {"pcm_s16le": (np.dtype("<i2"), 32768.0), "f32le": (np.dtype("<f4"), 1.0)}


class DSPError(ValueError):
    pass


class PCMDecoder:
    """Raw little-endian PCM bytes (any chunking: frames may straddle messages) -> float32 [n, channels]."""

    def __init__(self, encoding: str = "pcm_s16le", channels: int = 1):
        if encoding not in ENCODINGS:
            raise DSPError(f"unsupported encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
        if not 1 <= int(channels) <= 32:
            raise DSPError(f"channels must be 1..32, got {channels}")
        self.dtype, self.scale = ENCODINGS[encoding]
        self.channels = int(channels)
        self.frame_bytes = self.dtype.itemsize * self.channels
        self._rest = b""

    def decode(self, data: bytes) -> np.ndarray:
        buf = self._rest + data if self._rest else data  # whole frames (the usual case): no copy
        n = len(buf) // self.frame_bytes * self.frame_bytes
        self._rest = bytes(buf[n:])
        x = np.frombuffer(buf, dtype=self.dtype, count=n // self.dtype.itemsize).astype(np.float32)
        if self.scale != 1.0:
            x *= 1.0 / self.scale  # exact: the scale is a power of two
        x = x.reshape(-1, self.channels)
        if self.dtype.kind == "f" and not np.isfinite(x).all():  # integer PCM is always finite
            raise DSPError("audio contains NaN or infinite samples")
        return x


class StreamResampler:
    """[n] or [n, channels] float32 at ``in_rate`` -> mono float32 at ``out_rate``; streaming (soxr.ResampleStream)."""

    def __init__(self, in_rate: int, out_rate: int = 16000, quality: str = "HQ"):
        if not 1000 <= int(in_rate) <= 768000:
            raise DSPError(f"sample_rate must be 1000..768000 Hz, got {in_rate}")
        self.in_rate, self.out_rate = int(in_rate), int(out_rate)
        self._rs = None
        if self.in_rate != self.out_rate:
            import soxr

            self._rs = soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32", quality=quality)

    def process(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 2:
            x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self._rs is None:
            return x
        return np.asarray(self._rs.resample_chunk(x, last=last), dtype=np.float32)


class GainNormalizer:
    """Slow automatic gain: tracks the RMS of speech-level frames and scales towards ``target_dbfs`` (bounded gain).
    Off by default in the pipeline (it changes what the model hears, so streamed and offline transcripts differ)."""

    def __init__(self, target_dbfs: float = -23.0, max_gain_db: float = 24.0, rate: int = 16000,
                 time_constant_s: float = 1.5):
        self.target = 10 ** (target_dbfs / 20)
        self.max_gain = 10 ** (max_gain_db / 20)
        self.alpha = 1.0 - np.exp(-0.02 / time_constant_s)
        self.level = None
        self.frame = int(0.02 * rate)

    def process(self, x: np.ndarray) -> np.ndarray:
        if not x.size:
            return x
        out = np.empty_like(x)
        for i in range(0, x.size, self.frame):
            seg = x[i:i + self.frame]
            rms = float(np.sqrt(np.mean(seg * seg)) + 1e-9)
            if rms > 1e-3:  # ignore silence when tracking the level
                self.level = rms if self.level is None else self.level + self.alpha * (rms - self.level)
            gain = 1.0 if self.level is None else min(self.max_gain, self.target / self.level)
            out[i:i + self.frame] = np.clip(seg * gain, -1.0, 1.0)
        return out


@dataclass
class VADEvent:
    kind: str  # "speech_start" | "endpoint"
    time: float  # seconds (absolute audio time): speech onset, or end of speech for an endpoint
    detected_at: float  # audio time when it was decided (end of speech + hangover)


@dataclass
class EnergyVAD:
    """Frame-energy VAD with an adaptive noise floor and hangover. An ``endpoint`` is reported once speech has been
    followed by ``hangover_ms`` of non-speech; its ``time`` is where speech ended."""

    rate: int = 16000
    frame_ms: float = 20.0
    hangover_ms: float = 600.0
    min_speech_ms: float = 100.0
    threshold_db: float = 9.0  # above the noise floor
    abs_threshold_dbfs: float = -50.0
    _floor: float | None = None
    _samples: int = 0
    _buf: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    _in_speech: bool = False
    _speech_run: float = 0.0
    _silence_run: float = 0.0
    _speech_start: float = 0.0
    _last_speech_end: float = 0.0

    def process(self, x: np.ndarray) -> list[VADEvent]:
        n = int(self.rate * self.frame_ms / 1000)
        buf = np.concatenate([self._buf, np.asarray(x, np.float32)])
        events = []
        fs = self.frame_ms / 1000
        i = 0
        while i + n <= buf.size:
            frame = buf[i:i + n]
            i += n
            t0 = self._samples / self.rate
            self._samples += n
            e_db = 10 * np.log10(float(np.mean(frame * frame)) + 1e-12)
            if self._floor is None:
                self._floor = e_db
            # noise floor: fast down, slow up
            self._floor = e_db if e_db < self._floor else self._floor + 0.01 * (e_db - self._floor)
            speech = e_db > max(self._floor + self.threshold_db, self.abs_threshold_dbfs)
            if speech:
                if self._speech_run == 0.0:
                    self._speech_start_candidate = t0
                self._speech_run += fs
                self._silence_run = 0.0
                self._last_speech_end = t0 + fs
                if not self._in_speech and self._speech_run * 1000 >= self.min_speech_ms:
                    self._in_speech = True
                    self._speech_start = self._speech_start_candidate
                    events.append(VADEvent("speech_start", self._speech_start, t0 + fs))
            else:
                self._speech_run = 0.0
                self._silence_run += fs
                if self._in_speech and self._silence_run * 1000 >= self.hangover_ms:
                    self._in_speech = False
                    events.append(VADEvent("endpoint", self._last_speech_end, t0 + fs))
        self._buf = buf[i:]
        return events

    @property
    def in_speech(self) -> bool:
        return self._in_speech


@dataclass
class DSPConfig:
    sample_rate: int = 16000  # input rate
    channels: int = 1
    target_rate: int = 16000
    normalize_gain: bool = False
    vad: bool = True
    vad_hangover_ms: float = 600.0


class DSPChain:
    """resample + downmix -> optional gain -> VAD. ``process`` returns (16 kHz mono audio, VAD events)."""

    def __init__(self, cfg: DSPConfig):
        self.cfg = cfg
        self.resampler = StreamResampler(cfg.sample_rate, cfg.target_rate)
        self.gain = GainNormalizer(rate=cfg.target_rate) if cfg.normalize_gain else None
        self.vad = EnergyVAD(rate=cfg.target_rate, hangover_ms=cfg.vad_hangover_ms) if cfg.vad else None
        self.samples_in = 0
        self.samples_out = 0

    def process(self, x: np.ndarray, last: bool = False) -> tuple[np.ndarray, list[VADEvent]]:
        x = np.asarray(x, np.float32)
        if x.ndim == 2 and x.shape[1] != self.cfg.channels and self.cfg.channels != 1:
            raise DSPError(f"expected {self.cfg.channels} channels, got {x.shape[1]}")
        self.samples_in += x.shape[0]
        y = self.resampler.process(x, last=last)
        if self.gain is not None:
            y = self.gain.process(y)
        events = self.vad.process(y) if self.vad is not None else []
        self.samples_out += y.size
        return y, events
