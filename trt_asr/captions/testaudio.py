"""Test audio for the caption tests and demos: speech from espeak-ng when installed, else a synthetic
speech-like signal (formant-ish tone bursts separated by pauses), 16 kHz mono WAV."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

TEXT = ("Hello and welcome to the live caption demo. "
        "Speech is turned into text while you talk, and finished lines never change.")


def synthetic_speech(seconds: float = 6.0, rate: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    t_total = 0.0
    while t_total < seconds:
        dur = rng.uniform(0.15, 0.4)
        t = np.arange(int(dur * rate)) / rate
        f0 = rng.uniform(100, 220)
        x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8))
        x *= np.hanning(t.size) * 0.2
        out.append(x)
        gap = rng.choice([0.05, 0.1, 0.9], p=[0.5, 0.35, 0.15])
        out.append(np.zeros(int(gap * rate)))
        t_total += dur + gap
    return np.concatenate(out).astype(np.float32)


def make_speech_wav(path: str | Path, text: str = TEXT, rate: int = 16000) -> Path:
    import soundfile as sf

    path = Path(path)
    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe:
        tmp = path.with_suffix(".espeak.wav")
        r = subprocess.run([exe, "-s", "160", "-w", str(tmp), text], capture_output=True, timeout=60)
        if r.returncode == 0 and tmp.exists():
            from ..audio import load_audio

            audio = load_audio(tmp, rate)
            tmp.unlink()
            sf.write(path, audio, rate, subtype="PCM_16")
            return path
    sf.write(path, synthetic_speech(rate=rate), rate, subtype="PCM_16")
    return path
