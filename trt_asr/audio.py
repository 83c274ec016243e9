"""Audio input: any file soundfile reads (WAV, FLAC, OGG, MP3, ...), any sample rate and channel count,
to 16 kHz mono float32 (soxr resampling)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class AudioError(ValueError):
    """Unreadable, empty or invalid audio; the message says which file and why."""


def to_mono_float(samples: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """[N] or [N, channels] of any numeric dtype -> [M] float32 at target_rate (channels averaged)."""
    x = np.asarray(samples)
    if x.dtype.kind in "iu":
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    x = x.astype(np.float32, copy=False)
    if x.ndim == 2:
        x = x.mean(axis=1)
    elif x.ndim != 1:
        raise AudioError(f"audio must be [samples] or [samples, channels], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise AudioError("audio contains NaN or infinite samples")
    if sample_rate != target_rate and x.size:
        x = soxr.resample(x, sample_rate, target_rate, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(x)


def load_audio(source: str | Path | bytes, sample_rate: int = 16000) -> np.ndarray:
    """Read a file path (or the bytes of a file) to 16 kHz mono float32. Raises AudioError with a clear message."""
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    if not isinstance(source, (bytes, bytearray)):
        path = Path(source)
        if not path.exists():
            raise AudioError(f"{name}: no such file")
        if path.is_dir():
            raise AudioError(f"{name}: is a directory, not an audio file")
        if path.stat().st_size == 0:
            raise AudioError(f"{name}: empty file")
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
        data, rate = sf.read(handle, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError on bad input
        raise AudioError(f"{name}: cannot decode audio ({e})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{name}: contains no audio samples")
    try:
        return to_mono_float(data, rate, sample_rate)
    except AudioError as e:
        raise AudioError(f"{name}: {e}") from None
