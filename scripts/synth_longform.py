#!/usr/bin/env python3
"""Long-form test audio for seam / endpoint tests: held-out sentences and voices read one after another with pauses
(0.3-3 s, some long ones), a low noise floor, deterministic by seed. Generated at test time (not committed).

Writes OUT/longform.wav (16 kHz, 16-bit) and OUT/longform.json: {"text": full reference, "segments": [{"start",
"end", "text", "voice"}], "duration"}.

Usage: python scripts/synth_longform.py --minutes 30 --out /tmp/longform [--seed 4040] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trt_asr.training.data import SAMPLE_RATE, make_utterances, synthesize_all  # noqa: E402


def build(minutes: float, seed: int, workers: int):
    rng = np.random.default_rng(seed)
    total = int(minutes * 60 * SAMPLE_RATE)
    chunks, segments, pos = [], [], 0
    batch = 0
    while pos < total:
        utts = make_utterances(seed * 1000 + batch, 50, heldout=True)
        batch += 1
        for u, x in zip(utts, synthesize_all(utts, workers)):
            if pos >= total:
                break
            pause = rng.uniform(0.3, 1.2) if rng.random() < 0.8 else rng.uniform(1.5, 3.0)
            gap = np.zeros(int(pause * SAMPLE_RATE), dtype=np.float32)
            chunks.append(gap)
            pos += len(gap)
            x = x * 10 ** (rng.uniform(-10, 0) / 20)
            segments.append({"start": round(pos / SAMPLE_RATE, 3), "end": round((pos + len(x)) / SAMPLE_RATE, 3),
                             "text": u.text, "voice": u.voice})
            chunks.append(x.astype(np.float32))
            pos += len(x)
    audio = np.concatenate(chunks)
    audio += (10 ** (-60 / 20) * rng.standard_normal(len(audio))).astype(np.float32)  # -60 dBFS floor
    return np.clip(audio, -1, 1), segments


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=4040)
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args()
    import soundfile as sf

    audio, segments = build(args.minutes, args.seed, args.workers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sf.write(out / "longform.wav", audio, SAMPLE_RATE, subtype="PCM_16")
    meta = {"duration": round(len(audio) / SAMPLE_RATE, 3), "text": " ".join(s["text"] for s in segments),
            "segments": segments}
    (out / "longform.json").write_text(json.dumps(meta, indent=1))
    print(f"{out / 'longform.wav'}: {meta['duration'] / 60:.1f} min, {len(segments)} segments")


if __name__ == "__main__":
    main()
