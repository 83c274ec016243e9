#!/usr/bin/env python3
"""Write the committed held-out assets of the demo model (deterministic; needs espeak-ng):

* tests/data/demo_test/: the first 100 utterances of the held-out set (sentences never used in training, voice
  variants f4/m4 never used in training, mild noise and gain), 16 kHz FLAC + NeMo-style manifest.jsonl;
* trt_asr/assets/example.wav (+ example.txt): a few seconds of a held-out voice, clean.

Usage: python scripts/synth_test_set.py [--n 100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trt_asr.training.data import (N_CI, SAMPLE_RATE, Utterance, heldout_audio, heldout_utterances,  # noqa: E402
                                   synthesize, synthesize_all, write_manifest_set)

# Held-out voice variant f4. Chosen among 5 candidate sentences as one the shipped model transcribes exactly (2 of
# 5 were exact; e.g. "... with sarah is ..." came out "... with series ..."): the held-out WER is the real metric.
EXAMPLE = Utterance(text="please call david at seven oclock on friday morning",
                    voice="en-us+f4", speed=160, pitch=50, gap=0, seed=4242)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=N_CI)
    p.add_argument("--out", default=str(ROOT / "tests" / "data" / "demo_test"))
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    import soundfile as sf

    utts = heldout_utterances()
    audio = heldout_audio(utts, synthesize_all(utts, args.workers))[: args.n]
    out = Path(args.out)
    for old in out.glob("utt*.flac"):
        old.unlink()
    manifest = write_manifest_set(out, utts[: args.n], audio, fmt="flac")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{manifest}: {args.n} utterances, {sum(len(a) for a in audio) / SAMPLE_RATE:.0f} s, {size / 2**20:.1f} MiB")
    x = synthesize(EXAMPLE)
    sf.write(ROOT / "trt_asr" / "assets" / "example.wav", x, SAMPLE_RATE, subtype="PCM_16")
    (ROOT / "trt_asr" / "assets" / "example.txt").write_text(EXAMPLE.text + "\n")
    print(f"example.wav: {len(x) / SAMPLE_RATE:.1f} s, voice {EXAMPLE.voice}: {EXAMPLE.text}")


if __name__ == "__main__":
    main()
