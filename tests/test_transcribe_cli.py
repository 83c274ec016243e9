"""Offline transcription: batching invariance, long-audio windowing, and the `trt-asr transcribe` CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import srt
import torch
import webvtt

from trt_asr.checkpoint import load_model
from trt_asr.model.calibrate import synthetic_audio
from trt_asr.transcribe import Transcriber


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny")


def clips(n, seed=0, lo=1.0, hi=6.0):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    return [synthetic_audio(float(rng.uniform(lo, hi)), 16000, g).numpy() for _ in range(n)]


def test_batched_equals_one_by_one(tiny):
    audio = clips(7, seed=3)
    batched = Transcriber(tiny, batch_size=7).transcribe_arrays(audio)
    single = Transcriber(tiny, batch_size=1).transcribe_arrays(audio)
    total_tokens = 0
    for a, b in zip(batched, single):
        assert [(t.id, t.frame, t.duration) for t in a.tokens] == [(t.id, t.frame, t.duration) for t in b.tokens]
        total_tokens += len(a.tokens)
    assert total_tokens > 50  # the calibrated model really emits tokens


def test_words_and_timestamps_are_consistent(tiny):
    (tr,) = Transcriber(tiny).transcribe_arrays(clips(1, seed=5, lo=4, hi=4.5))
    assert tr.words and tr.tokens
    assert " ".join(w.word for w in tr.words) == tr.text
    fs = tiny.cfg.frame_seconds
    for t in tr.tokens:
        assert t.start == pytest.approx(t.frame * fs) and t.end > t.start
    assert all(w.start <= w.end for w in tr.words)
    assert [w.start for w in tr.words] == sorted(w.start for w in tr.words)
    assert tr.tokens[-1].start <= tr.duration


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    a, b = clips(2, seed=11, lo=2, hi=4)
    sf.write(d / "mono16k.wav", a, 16000)
    import soxr
    b44 = soxr.resample(b, 16000, 44100)
    sf.write(d / "stereo44k.flac", np.stack([b44, b44], 1), 44100)
    (d / "empty.wav").write_bytes(b"")
    (d / "garbage.wav").write_text("this is not audio")
    return d


def cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # never reach for the network in tests
    return subprocess.run([sys.executable, "-m", "trt_asr", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_cli_json_schema_and_bad_files(audio_files):
    files = [audio_files / "mono16k.wav", audio_files / "empty.wav", audio_files / "stereo44k.flac",
             audio_files / "garbage.wav"]
    r = cli("transcribe", "--model", "random:tiny", "--format", "json", *map(str, files))
    assert r.returncode == 1, r.stderr  # some inputs failed
    doc = json.loads(r.stdout)
    assert [d["audio"] for d in doc] == [str(f) for f in files]
    ok = [d for d in doc if "error" not in d]
    assert len(ok) == 2
    for d in ok:
        assert d["text"] and d["duration"] > 1.5 and d["words"]
        assert all({"word", "start", "end"} <= set(w) for w in d["words"])
    assert "empty" in doc[1]["error"] and "cannot decode" in doc[3]["error"]
    assert "RANDOM weights" in r.stderr and "empty.wav" in r.stderr


def test_cli_same_text_for_resampled_stereo_as_api(audio_files, tiny):
    r = cli("transcribe", "--model", "random:tiny", str(audio_files / "stereo44k.flac"))
    assert r.returncode == 0, r.stderr
    api = Transcriber(tiny).transcribe_files([audio_files / "stereo44k.flac"])[0]
    assert r.stdout.strip() == api.text


def test_cli_srt_vtt_output_dir(audio_files, tmp_path):
    for fmt in ("srt", "vtt"):
        r = cli("transcribe", "--model", "random:tiny", "--format", fmt, "--output-dir", str(tmp_path),
                str(audio_files / "mono16k.wav"))
        assert r.returncode == 0, r.stderr
    subs = list(srt.parse((tmp_path / "mono16k.srt").read_text()))
    vtt = webvtt.read(str(tmp_path / "mono16k.vtt"))
    assert subs and len(subs) == len(vtt)
    assert all(len(line) <= 42 for s in subs for line in s.content.split("\n"))


def test_cli_usage_errors(audio_files):
    r = cli("transcribe", "--model", "no/such-model-offline", str(audio_files / "mono16k.wav"))
    assert r.returncode == 2 and "error" in r.stderr
    r = cli("transcribe", "--model", "random:no-such-preset", str(audio_files / "mono16k.wav"))
    assert r.returncode == 2 and "unknown preset" in r.stderr
    r = cli("transcribe", "--model", "random:tiny", "--dtype", "fp64", str(audio_files / "mono16k.wav"))
    assert r.returncode == 2


def test_long_audio_windows_equal_offline_when_context_covers_file(tiny):
    """Audio over max_window_seconds goes through buffered windows; with left/right context covering the whole
    file every window sees all of it, so the tokens must equal the single full-attention pass."""
    (audio,) = clips(1, seed=2, lo=12, hi=12.5)
    offline = Transcriber(tiny).transcribe_arrays([audio])[0]
    windowed = Transcriber(tiny, max_window_seconds=3.0,
                           long_audio=dict(left_secs=20, chunk_secs=2, right_secs=20)).transcribe_arrays([audio])[0]
    key = lambda tr: [(t.id, t.frame, t.duration) for t in tr.tokens]  # noqa: E731
    assert len(offline.tokens) > 40 and key(windowed) == key(offline)
    assert windowed.duration == pytest.approx(len(audio) / 16000)
