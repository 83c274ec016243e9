"""Audio sources for the caption pipeline. Each yields (audio chunk, sample_rate, channels) in small pieces:
a file (as fast as possible or paced in real time), the microphone (``sounddevice``, extra ``[mic]``, imported
lazily), raw PCM on stdin. WebSocket clients push into the pipeline directly (``trt_asr.serving``)."""

from __future__ import annotations

import queue
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .dsp import PCMDecoder


@dataclass
class SourceInfo:
    sample_rate: int
    channels: int
    name: str


def file_source(path: str, chunk_ms: float = 100.0, realtime: bool = False, speed: float = 1.0
                ) -> tuple[SourceInfo, Iterator[np.ndarray]]:
    """Read a file block by block (any format soundfile reads, native rate and channels)."""
    import soundfile as sf

    from ..audio import AudioError

    try:
        info = sf.info(path)
    except Exception as e:
        raise AudioError(f"{path}: cannot decode audio ({e})") from None
    block = max(1, int(info.samplerate * chunk_ms / 1000))

    def gen():
        t0 = time.monotonic()
        sent = 0
        with sf.SoundFile(path) as f:
            while True:
                x = f.read(block, dtype="float32", always_2d=True)
                if not len(x):
                    return
                if realtime:
                    delay = t0 + sent / info.samplerate / speed - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                sent += len(x)
                yield x

    return SourceInfo(info.samplerate, info.channels, path), gen()


def stdin_source(sample_rate: int = 16000, channels: int = 1, encoding: str = "pcm_s16le", chunk_ms: float = 50.0,
                 stream=None) -> tuple[SourceInfo, Iterator[np.ndarray]]:
    """Raw little-endian PCM from stdin (e.g. ``ffmpeg -i x -f s16le -ar 16000 -ac 1 - | trt-asr live -``)."""
    dec = PCMDecoder(encoding, channels)
    nbytes = max(dec.frame_bytes, int(sample_rate * chunk_ms / 1000) * dec.frame_bytes)
    src = stream or sys.stdin.buffer

    def gen():
        while True:
            data = src.read1(nbytes) if hasattr(src, "read1") else src.read(nbytes)
            if not data:
                return
            x = dec.decode(data)
            if len(x):
                yield x

    return SourceInfo(sample_rate, channels, "<stdin>"), gen()


def mic_source(sample_rate: int = 16000, channels: int = 1, block_ms: float = 20.0, device=None,
               max_seconds: float | None = None) -> tuple[SourceInfo, Iterator[np.ndarray]]:
    """Microphone capture through PortAudio (``pip install trt-asr-engine[mic]``). The audio callback only copies
    into a queue; Ctrl-C ends the stream."""
    try:
        import sounddevice as sd
    except (ImportError, OSError) as e:
        raise RuntimeError(f"microphone capture needs the 'sounddevice' package and PortAudio "
                           f"(pip install 'trt-asr-engine[mic]'): {e}") from None
    q: queue.SimpleQueue = queue.SimpleQueue()

    def callback(indata, frames, t, status):  # PortAudio thread: copy and return
        q.put(indata.copy())

    def gen():
        t0 = time.monotonic()
        with sd.InputStream(samplerate=sample_rate, channels=channels, dtype="float32", device=device,
                            blocksize=int(sample_rate * block_ms / 1000), callback=callback):
            try:
                while max_seconds is None or time.monotonic() - t0 < max_seconds:
                    try:
                        yield q.get(timeout=0.5)
                    except queue.Empty:
                        continue
            except KeyboardInterrupt:
                return

    return SourceInfo(sample_rate, channels, "<microphone>"), gen()
