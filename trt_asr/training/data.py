"""Synthetic speech for the demo model: espeak-ng voices x variants x speeds x pitches, 16 kHz mono, plus noise and
gain augmentation. Everything is a function of (seed, index), so data sets are reproducible on any machine.

espeak-ng is found as ``$TRT_ASR_ESPEAK`` or ``espeak-ng`` on PATH (Debian/Ubuntu package ``espeak-ng``); its data
folder may be given with ``ESPEAK_DATA_PATH`` (the folder that holds ``espeak-ng-data``).

Voices: training uses 7 English accents x 22 variants; the held-out variants ``f4`` and ``m4`` (any accent) never
occur in training.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .text import SentenceGenerator

SAMPLE_RATE = 16000
ESPEAK_RATE = 22050
ACCENTS = ["en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan"]
TRAIN_VARIANTS = ["", "m1", "m2", "m3", "m5", "m6", "m7", "f1", "f2", "f3", "f5", "klatt", "klatt2", "klatt3",
                  "Alex", "Andy", "Annie", "max", "paul", "linda", "edward", "steph"]
HELDOUT_VARIANTS = ["f4", "m4"]


@dataclass
class Utterance:
    text: str
    voice: str  # espeak -v argument, e.g. "en-us+f3"
    speed: int  # words per minute
    pitch: int  # 0..99
    gap: int  # extra pause between words, in 10 ms units
    seed: int

    @property
    def args(self) -> list[str]:
        return ["-v", self.voice, "-s", str(self.speed), "-p", str(self.pitch), "-g", str(self.gap)]


def espeak_binary() -> str:
    exe = os.environ.get("TRT_ASR_ESPEAK") or shutil.which("espeak-ng")
    if not exe:
        raise RuntimeError("espeak-ng not found: install the espeak-ng package or set TRT_ASR_ESPEAK")
    return exe


def synthesize(u: Utterance) -> np.ndarray:
    """float32 audio at 16 kHz, peak-normalised to 0.5, with leading/trailing silence trimmed to ~100-250 ms."""
    from scipy.signal import resample_poly

    raw = subprocess.run([espeak_binary(), *u.args, "--stdout", u.text], check=True, capture_output=True).stdout
    pcm = np.frombuffer(raw[44:], dtype="<i2").astype(np.float32) / 32768.0
    x = resample_poly(pcm, 320, 441).astype(np.float32)
    loud = np.flatnonzero(np.abs(x) > 0.01)
    rng = np.random.default_rng(u.seed)
    if loud.size:
        lead, tail = (int(rng.uniform(0.1, 0.25) * SAMPLE_RATE) for _ in range(2))
        x = x[max(0, loud[0] - lead): loud[-1] + tail]
    peak = np.abs(x).max() if x.size else 0.0
    return x * (0.5 / peak) if peak > 0 else x


def make_utterances(seed: int, n: int, heldout: bool = False, exclude: set[str] | None = None) -> list[Utterance]:
    """n utterance specs: sentences from SentenceGenerator(seed), voices/speeds/pitches from the same seed."""
    texts = SentenceGenerator(seed).sentences(n, exclude=exclude)
    rng = np.random.default_rng(seed + 1_000_003)
    variants = HELDOUT_VARIANTS if heldout else TRAIN_VARIANTS
    out = []
    for i, text in enumerate(texts):
        accent = ACCENTS[rng.integers(len(ACCENTS))]
        variant = variants[rng.integers(len(variants))]
        out.append(Utterance(text=text, voice=accent + (f"+{variant}" if variant else ""),
                             speed=int(rng.integers(130, 211)), pitch=int(rng.integers(25, 76)),
                             gap=int(rng.choice([0, 0, 0, 1, 2, 4])), seed=int(seed * 1_000_000 + i)))
    return out


def augment(x: np.ndarray, seed: int, snr_db: tuple[float, float] = (15.0, 40.0),
            gain_db: tuple[float, float] = (-20.0, 0.0)) -> np.ndarray:
    """Deterministic gain + additive white/pink-ish noise at a random SNR (numpy; for test sets)."""
    rng = np.random.default_rng(seed)
    gain = 10 ** (rng.uniform(*gain_db) / 20)
    power = float(np.mean(x ** 2)) + 1e-12
    snr = rng.uniform(*snr_db)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    if rng.random() < 0.5:  # pinkish: one-pole low-pass
        from scipy.signal import lfilter
        noise = lfilter([1.0], [1.0, -0.95], noise).astype(np.float32)
    noise *= np.sqrt(power / 10 ** (snr / 10) / (np.mean(noise ** 2) + 1e-12))
    return ((x + noise) * gain).astype(np.float32)


def _synth_one(u: Utterance) -> np.ndarray:
    return synthesize(u)


def synthesize_all(utts: list[Utterance], workers: int | None = None) -> list[np.ndarray]:
    workers = workers or os.cpu_count() or 1
    if workers <= 1:
        return [synthesize(u) for u in utts]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_synth_one, utts, chunksize=32))


def write_manifest_set(folder: Path, utts: list[Utterance], audio: list[np.ndarray], fmt: str = "flac",
                       noise_seed: int | None = None) -> Path:
    """Write audio files (FLAC/WAV, 16-bit) and a NeMo-style JSONL manifest (audio_filepath relative to the
    manifest's folder, text, duration; plus the voice parameters)."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (u, x) in enumerate(zip(utts, audio)):
        if noise_seed is not None:
            x = augment(x, noise_seed + i, snr_db=(20.0, 40.0), gain_db=(-12.0, 0.0))
        name = f"utt{i:04d}.{fmt}"
        sf.write(folder / name, np.clip(x, -1, 1), SAMPLE_RATE, subtype="PCM_16")
        lines.append(json.dumps({"audio_filepath": name, "text": u.text, "duration": round(len(x) / SAMPLE_RATE, 3),
                                 **{k: v for k, v in asdict(u).items() if k != "text"}}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def read_manifest(path: str | Path) -> list[dict]:
    """NeMo-style JSONL manifest; relative audio paths are resolved against the manifest's folder."""
    path = Path(path)
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            p = Path(d["audio_filepath"])
            d["audio_filepath"] = str(p if p.is_absolute() else path.parent / p)
            out.append(d)
    return out


# ------------------------------------------------------------------------------------------------ held-out sets
TEST_SEED = 777  # held-out sentences; voices from HELDOUT_VARIANTS only
N_TEST = 150  # synthesized for the validation curve during training; the first N_CI are committed for CI
N_CI = 100


def heldout_utterances(n: int = N_TEST) -> list[Utterance]:
    """The held-out test set: sentences never used in training (training excludes them), voice variants f4/m4."""
    return make_utterances(TEST_SEED, n, heldout=True)


def heldout_audio(utts: list[Utterance], audio: list[np.ndarray]) -> list[np.ndarray]:
    """Mild deterministic noise and gain, as in tests/data/demo_test."""
    return [augment(x, 5000 + i, snr_db=(20.0, 40.0), gain_db=(-12.0, 0.0)) for i, x in enumerate(audio)]


# ------------------------------------------------------------------------------------------------ composites
def compose_examples(lengths: np.ndarray, n_composites: int, seed: int, parts: tuple[int, int] = (2, 4),
                     pause_s: tuple[float, float] = (0.3, 3.0), max_seconds: float = 20.0
                     ) -> list[tuple[list[int], list[int]]]:
    """Training examples that look like a buffered-streaming window of a long recording: 2-4 utterances joined
    by pauses of 0.3-3 s (the long-form set's range), at most ``max_seconds`` long. Each example is (utterance
    indices, pause lengths in samples between them). Every utterance also stays an example on its own, first, so
    ``examples[i] == ([i], [])`` for i < len(lengths). Seeded: the same (lengths, n, seed) give the same list.

    Per-feature normalisation then sees what a window of continuous speech gives it (speech, pauses and a noise
    floor over up to 20 s, not one sentence trimmed to ~0.2 s of silence), which is what the buffered decode of
    long recordings runs on."""
    rng = np.random.default_rng(seed)
    examples: list[tuple[list[int], list[int]]] = [([i], []) for i in range(len(lengths))]
    limit = int(max_seconds * SAMPLE_RATE)
    for _ in range(n_composites):
        k = int(rng.integers(parts[0], parts[1] + 1))
        idx = [int(i) for i in rng.choice(len(lengths), size=k, replace=False)]
        pauses = [int(rng.uniform(*pause_s) * SAMPLE_RATE) for _ in range(k - 1)]
        while len(idx) > 1 and int(lengths[idx].sum()) + sum(pauses) > limit:
            idx.pop()
            pauses.pop()
        examples.append((idx, pauses))
    return examples


def assemble_example(pieces: list[np.ndarray], pauses: list[int]) -> np.ndarray:
    """The utterances of one example with silence (zeros; the trainer adds noise to the whole) between them."""
    out = [pieces[0]]
    for p, x in zip(pauses, pieces[1:]):
        out += [np.zeros(p, dtype=pieces[0].dtype), x]
    return np.concatenate(out)
