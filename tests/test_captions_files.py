"""Incremental WebVTT / SRT caption files: valid for the webvtt-py and srt parsers at every moment, at most 42
characters per line and 2 lines per cue, ordered non-overlapping cues with sensible durations, every word kept."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import srt
import webvtt
from hypothesis import given, settings, strategies as st

from trt_asr.captions.sinks import CaptionFileWriter, CueRules, JsonLinesWriter, cues_for_words

ROOT = Path(__file__).resolve().parents[1]


def _secs(ts: str) -> float:
    h, m, s = ts.replace(",", ".").split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


@st.composite
def final_events(draw):
    t = 0.0
    events = []
    for seg in range(draw(st.integers(1, 6))):
        words = []
        t += draw(st.floats(0.0, 3.0))
        for _ in range(draw(st.integers(1, 25))):
            w = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyzé'-", min_size=1, max_size=
                             draw(st.sampled_from([6, 12, 60]))))
            dur = draw(st.floats(0.0, 0.9))
            t += draw(st.floats(0.0, 1.5))
            words.append({"word": w, "start": round(t, 3), "end": round(t + dur, 3)})
            t += dur
        events.append({"type": "final", "v": 1, "segment": seg, "text": " ".join(w["word"] for w in words),
                       "start": words[0]["start"], "end": words[-1]["end"], "words": words})
    return events


def _check_cues(cues, words_in, rules):
    """cues: list of (start, end, lines)."""
    last_end = 0.0
    for start, end, lines in cues:
        assert 1 <= len(lines) <= rules.max_lines
        assert all(0 < len(line) <= rules.max_chars for line in lines), lines
        assert end > start >= last_end - 1e-3
        assert end - start >= min(rules.min_duration, 0.001) - 1e-3
        last_end = end
    got = "".join("".join(lines).replace(" ", "") for _, _, lines in cues)
    assert got == "".join(w["word"] for w in words_in)


@settings(max_examples=60, deadline=None)
@given(final_events())
def test_vtt_and_srt_are_valid_and_follow_the_line_rules(events):
    rules = CueRules()
    vtt_buf, srt_buf = io.StringIO(), io.StringIO()
    vtt_w, srt_w = CaptionFileWriter(vtt_buf, "vtt", rules), CaptionFileWriter(srt_buf, "srt", rules)
    for e in events:
        vtt_w(e)
        srt_w(e)
        # valid at every moment (one cue is held back until the next one starts)
        webvtt.from_string(vtt_buf.getvalue())
        list(srt.parse(srt_buf.getvalue()))
    vtt_w({"type": "end"})
    srt_w({"type": "end"})
    words = [w for e in events for w in e["words"]]
    vtt = webvtt.from_string(vtt_buf.getvalue())
    _check_cues([(_secs(c.start), _secs(c.end), c.text.split("\n")) for c in vtt], words, rules)
    subs = list(srt.parse(srt_buf.getvalue()))
    assert [s.index for s in subs] == list(range(1, len(subs) + 1))
    _check_cues([(s.start.total_seconds(), s.end.total_seconds(), s.content.split("\n")) for s in subs], words, rules)
    assert len(vtt.captions) == len(subs)


def test_cue_grouping_rules():
    words = [{"word": f"word{i:02d}", "start": i * 0.3, "end": i * 0.3 + 0.25} for i in range(40)]
    cues = cues_for_words(words, CueRules())
    assert all(len(c.lines) <= 2 and all(len(x) <= 42 for x in c.lines) for c in cues)
    assert all(c.end - c.start <= 6.0 for c in cues)
    # a pause longer than max_gap starts a new cue
    cues = cues_for_words([{"word": "a", "start": 0, "end": 0.2}, {"word": "b", "start": 2.0, "end": 2.2}], CueRules())
    assert [c.lines for c in cues] == [["a"], ["b"]]
    # a "word" longer than two lines is cut up rather than breaking the rules
    cues = cues_for_words([{"word": "x" * 100, "start": 0, "end": 1}], CueRules())
    assert all(len(c.lines) <= 2 and all(len(x) <= 42 for x in c.lines) for c in cues)


def test_jsonl_writer():
    buf = io.StringIO()
    w = JsonLinesWriter(buf)
    w({"type": "partial", "v": 1, "stable": "a", "unstable": "b"})
    w({"type": "end", "v": 1})
    assert [json.loads(x)["type"] for x in buf.getvalue().splitlines()] == ["partial", "end"]


def test_live_cli_writes_caption_files(tmp_path, speech_wav):
    """``trt-asr live FILE --vtt --srt --jsonl --stats`` end to end (random:tiny)."""
    vtt, srt_path, jsonl = tmp_path / "o.vtt", tmp_path / "o.srt", tmp_path / "o.jsonl"
    r = subprocess.run([sys.executable, "-m", "trt_asr", "live", str(speech_wav), "--model", "random:tiny",
                        "--chunk-secs", "0.5", "--right-secs", "0.5", "--quiet", "--stats",
                        "--vtt", str(vtt), "--srt", str(srt_path), "--jsonl", str(jsonl)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "partial latency: p50" in r.stderr
    events = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert events[-1]["type"] == "end" and events[-1]["stats"]["committed_changes"] == 0
    finals = [e for e in events if e["type"] == "final"]
    assert finals and all(e["v"] == 1 for e in events)
    cues = webvtt.read(str(vtt))
    subs = list(srt.parse(srt_path.read_text()))
    assert len(cues.captions) == len(subs) > 0
    words = [w for e in finals for w in e["words"]]
    _check_cues([(_secs(c.start), _secs(c.end), c.text.split("\n")) for c in cues], words, CueRules())


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    from trt_asr.captions.testaudio import make_speech_wav

    return make_speech_wav(tmp_path_factory.mktemp("audio") / "speech.wav")


def test_live_stdin_pcm_gives_the_same_finals_as_the_file(tmp_path, speech_wav):
    """Raw s16le PCM on stdin (``trt-asr live -``) and the WAV file itself give identical finals."""
    import soundfile as sf

    from trt_asr.captions.transcript import join_finals

    pcm, rate = sf.read(speech_wav, dtype="int16")
    outs = []
    for name, args, stdin in (("file", [str(speech_wav)], None), ("stdin", ["-", "--rate", str(rate)], pcm.tobytes())):
        out = tmp_path / f"{name}.jsonl"
        r = subprocess.run([sys.executable, "-m", "trt_asr", "live", *args, "--model", "random:tiny", "--quiet",
                            "--chunk-secs", "0.5", "--right-secs", "0.5", "--jsonl", str(out)],
                           input=stdin, capture_output=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr.decode()
        outs.append(join_finals([e for e in map(json.loads, out.read_text().splitlines()) if e["type"] == "final"]))
    assert outs[0] and outs[0] == outs[1]


# ---------------------------------------------------------------------------------------- pipeline pieces
def test_pcm_decoder_frames_straddle_messages():
    from trt_asr.captions.dsp import PCMDecoder

    x = (np.arange(-50, 50, dtype="<i2") * 300).reshape(-1, 2)
    raw = x.tobytes()
    dec = PCMDecoder("pcm_s16le", 2)
    parts = [dec.decode(raw[i:i + 7]) for i in range(0, len(raw), 7)]
    got = np.concatenate(parts)
    assert np.array_equal(got, x.astype(np.float32) / 32768.0)


def test_stream_resampler_is_chunking_invariant():
    from trt_asr.captions.dsp import StreamResampler

    rng = np.random.default_rng(0)
    x = rng.standard_normal((44100, 2)).astype(np.float32) * 0.1
    outs = []
    for sizes in ([44100], [1, 999, 4410, 100, 38590], [441] * 100):
        rs, pos, parts = StreamResampler(44100, 16000), 0, []
        for n in sizes:
            parts.append(rs.process(x[pos:pos + n]))
            pos += n
        parts.append(rs.process(np.zeros((0, 2), np.float32), last=True))
        outs.append(np.concatenate(parts))
    assert abs(outs[0].size - 16000) <= 1
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


def test_energy_vad_marks_utterance_ends():
    from trt_asr.captions.dsp import EnergyVAD
    from trt_asr.captions.testaudio import synthetic_speech

    rate = 16000
    speech = synthetic_speech(1.5, rate, seed=1)
    quiet = np.random.default_rng(0).standard_normal(rate).astype(np.float32) * 1e-4
    audio = np.concatenate([quiet, speech, quiet, speech, quiet])
    vad = EnergyVAD(rate=rate, hangover_ms=600)
    events = []
    for i in range(0, audio.size, 320 * 3 + 17):  # odd block sizes
        events += vad.process(audio[i:i + 320 * 3 + 17])
    ends = [e for e in events if e.kind == "endpoint"]
    starts = [e for e in events if e.kind == "speech_start"]
    assert len(ends) == len(starts) == 2
    first_end = (rate + speech.size) / rate
    assert abs(ends[0].time - first_end) < 0.35 and ends[0].detected_at - ends[0].time >= 0.6 - 0.021


def test_mic_source_without_sounddevice_says_how_to_install(monkeypatch):
    from trt_asr.captions.sources import mic_source

    monkeypatch.setitem(sys.modules, "sounddevice", None)
    with pytest.raises(RuntimeError, match=r"\[mic\]"):
        mic_source()
