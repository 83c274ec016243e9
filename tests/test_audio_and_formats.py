"""Audio loading (formats, rates, channels, errors) and caption formats checked with real SRT / WebVTT parsers."""

import io

import numpy as np
import pytest
import soundfile as sf
import srt
import webvtt

from trt_asr.audio import AudioError, load_audio, to_mono_float
from trt_asr.formats import cues_from_words, to_srt, to_vtt
from trt_asr.transcribe import Word


def tone(seconds, rate, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("fmt,subtype,ext", [("WAV", "PCM_16", "wav"), ("FLAC", "PCM_24", "flac"),
                                             ("OGG", "VORBIS", "ogg"), ("WAV", "FLOAT", "wav")])
@pytest.mark.parametrize("rate,channels", [(16000, 1), (44100, 2), (8000, 1), (48000, 6)])
def test_load_any_format_rate_channels(tmp_path, fmt, subtype, ext, rate, channels):
    mono = tone(1.0, rate)
    data = np.stack([mono] * channels, axis=1) if channels > 1 else mono
    path = tmp_path / f"x.{ext}"
    sf.write(path, data, rate, format=fmt, subtype=subtype)
    out = load_audio(path)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 16000) <= 2  # one second at 16 kHz
    # the tone survives (energy at 440 Hz dominates)
    spec = np.abs(np.fft.rfft(out[2000:14000]))
    assert abs(np.argmax(spec) * 16000 / 12000 - 440) < 5


def test_int_pcm_and_downmix_are_exact():
    x = np.array([[16384, -16384], [0, 32767]], dtype=np.int16)
    out = to_mono_float(x, 16000, 16000)
    np.testing.assert_allclose(out, [0.0, 32767 / 32768 / 2])


@pytest.mark.parametrize("content,msg", [(b"", "empty file"), (b"RIFF....WAVEjunk", "cannot decode"),
                                         (b"hello world", "cannot decode")])
def test_bad_files_give_clear_errors(tmp_path, content, msg):
    p = tmp_path / "bad.wav"
    p.write_bytes(content)
    with pytest.raises(AudioError, match=msg) as e:
        load_audio(p)
    assert str(p) in str(e.value)


def test_missing_and_directory(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "nope.wav")
    with pytest.raises(AudioError, match="directory"):
        load_audio(tmp_path)


def test_zero_samples_and_nan(tmp_path):
    p = tmp_path / "zero.wav"
    sf.write(p, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="no audio samples"):
        load_audio(p)
    buf = io.BytesIO()
    sf.write(buf, np.array([0.1, np.nan, 0.2], dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        load_audio(buf.getvalue())


def _words(n, gap_every=7):
    words, t = [], 0.0
    for i in range(n):
        w = ["caption", "a", "extraordinarily", "long", "word", "x", "timing"][i % 7]
        words.append(Word(w, round(t, 3), round(t + 0.3, 3)))
        t += 0.35 + (1.5 if i % gap_every == gap_every - 1 else 0.0)
    return words


def test_srt_parses_and_respects_line_rules():
    words = _words(60)
    doc = to_srt(words)
    subs = list(srt.parse(doc))
    assert len(subs) >= 5
    assert " ".join(s.content.replace("\n", " ") for s in subs) == " ".join(w.word for w in words)
    for s in subs:
        lines = s.content.split("\n")
        assert len(lines) <= 2 and all(len(line) <= 42 for line in lines)
        assert s.end > s.start
    starts = [s.start.total_seconds() for s in subs]
    assert starts == sorted(starts)


def test_vtt_parses_and_times_match_words(tmp_path):
    words = _words(30)
    p = tmp_path / "x.vtt"
    p.write_text(to_vtt(words))
    captions = webvtt.read(str(p))
    assert " ".join(c.text.replace("\n", " ") for c in captions) == " ".join(w.word for w in words)
    first = captions[0]
    assert first.start == "00:00:00.000"
    cues = cues_from_words(words)
    assert abs(cues[-1].end - words[-1].end) < 1e-6
    # a pause longer than 1 s starts a new cue
    assert all(c.start - p.end >= 0 for p, c in zip(cues, cues[1:]))
