"""Stream session API: batched sessions == each session alone, events add up to the final transcript, streamed
transcription (API and CLI) == offline transcription when windows cover the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trt_asr.checkpoint import load_model
from trt_asr.model.calibrate import synthetic_audio
from trt_asr.streaming import Recognizer, StreamingMode, stream_tokens, transcribe_streaming
from trt_asr.streaming.buffered import BufferedMode

torch.set_num_threads(1)
SR = 16000
CTX = dict(left_secs=0.8, chunk_secs=0.4, right_secs=0.32)


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny")


def audio(seconds: float, seed: int) -> torch.Tensor:
    return synthetic_audio(seconds, SR, torch.Generator().manual_seed(seed))


def alone(model, a, **ctx):
    rec = Recognizer(model, "buffered", **ctx)
    s = rec.open()
    s.feed(a)
    s.finish()
    return s.tokens


def test_mode_implements_protocol(tiny):
    assert isinstance(BufferedMode(tiny), StreamingMode)


def test_batched_sessions_equal_each_alone(tiny):
    """Five streams of different lengths, fed in different piece sizes and opened at different times, so one
    batched step mixes first chunks, steady chunks and last chunks (windows of different lengths)."""
    auds = [audio(s, seed) for seed, s in enumerate([4.3, 2.9, 0.5, 6.1, 3.33])]
    pieces = [int(p * SR) for p in (0.07, 0.13, 0.1, 0.04, 0.2)]
    rec = Recognizer(tiny, "buffered", max_batch=4, **CTX)
    steps = []
    orig_step = rec.mode.step
    rec.mode.step = lambda streams: steps.append(len(streams)) or orig_step(streams)
    sessions, pos = {}, [0] * len(auds)
    for tick in range(2000):
        for i, a in enumerate(auds):
            if tick >= 3 * i and i not in sessions:
                sessions[i] = rec.open()
            s = sessions.get(i)
            if s is None or s.ended:
                continue
            if pos[i] < a.numel():
                s.feed(a[pos[i]:pos[i] + pieces[i]], step=False)
                pos[i] += pieces[i]
            else:
                s.finish(step=False)
        if tick % 8 == 7:  # let several streams get ready, then one batched step
            rec.step()
        if len(sessions) == len(auds) and all(s.finished for s in sessions.values()):
            break
    assert all(s.finished for s in sessions.values())
    assert max(steps) == 4 and sum(steps) > len(steps)  # batched, capped by max_batch
    for i, a in enumerate(auds):
        assert sessions[i].tokens == alone(tiny, a, **CTX), i


def test_events_add_up(tiny):
    a = audio(3.7, 9)
    rec = Recognizer(tiny, "buffered", **CTX)
    s = rec.open()
    events = []
    for pos in range(0, a.numel(), 2000):
        events += s.feed(a[pos:pos + 2000])
        for ev in events[-1:]:
            assert ev.committed_until == s.horizon * tiny.cfg.frame_seconds
            assert all(t.frame >= s.horizon for t in ev.tentative)  # the tail lies after what is committed
            assert all(t.frame < s.horizon for t in ev.committed)
    events += s.finish()
    assert [ev.committed_until for ev in events] == sorted(ev.committed_until for ev in events)
    assert [ev.final for ev in events] == [False] * (len(events) - 1) + [True]
    committed = [t for ev in events for t in ev.committed]
    assert [(t.id, t.frame) for t in committed] == [(t.id, t.frame) for t in s.tokens]
    assert events[-1].tentative == [] and events[-1].text == s.text
    offline_words = s.transcript().words
    assert [w for ev in events for w in ev.words] == offline_words == s.words
    assert all(t.start == t.frame * tiny.cfg.frame_seconds for t in committed)  # absolute times
    assert not rec.sessions  # finished sessions leave the recognizer


def test_token_events_carry_the_full_events_tokens(tiny):
    """``Recognizer(events="tokens")`` (what the server's schedulers run): each event has the same tokens (id,
    frame, duration), tentative tail, ``final`` and ``committed_until`` as the full events of the same audio, and no
    text or words; the session's text is still there when asked for."""
    a = audio(3.7, 9)
    runs = {}
    for kind in ("full", "tokens"):
        rec = Recognizer(tiny, "buffered", events=kind, **CTX)
        s = rec.open()
        events = []
        for pos in range(0, a.numel(), 2000):
            events += s.feed(a[pos:pos + 2000])
        events += s.finish()
        runs[kind] = (events, s)
    full, lean = runs["full"][0], runs["tokens"][0]
    assert len(full) == len(lean) > 3
    key = lambda ts: [(t.id, t.frame, t.duration) for t in ts]  # noqa: E731
    for f, t in zip(full, lean):
        assert key(f.committed) == key(t.committed) and key(f.tentative) == key(t.tentative)
        assert (f.final, f.committed_until) == (t.final, t.committed_until)
        assert t.text == t.tentative_text == "" and t.words == []
    assert sum(len(ev.committed) for ev in lean) > 0 and lean[-1].final
    assert runs["tokens"][1].text == runs["full"][1].text != ""
    with pytest.raises(ValueError):
        Recognizer(tiny, "buffered", events="words")


def test_transcribe_streaming_equals_offline_when_window_covers_file(tiny):
    from trt_asr.transcribe import Transcriber

    auds = [audio(s, 20 + i).numpy() for i, s in enumerate([2.2, 3.9, 1.04])]
    offline = Transcriber(tiny).transcribe_arrays(auds)
    streamed = transcribe_streaming(tiny, auds, left_secs=10, chunk_secs=4, right_secs=2, piece_secs=0.25)
    for o, s in zip(offline, streamed):
        assert s.to_dict(with_tokens=True) == dict(o.to_dict(with_tokens=True), audio=s.audio)


def test_feed_sizes_do_not_matter(tiny):
    a = audio(3.1, 5)
    ref = stream_tokens(tiny, [a], **CTX)[0]
    for piece in (0.01, 0.3, 1.3):
        assert stream_tokens(tiny, [a], piece_secs=piece, **CTX)[0] == ref


def test_cli_stream_prints_offline_output(tiny, tmp_path, capsys):
    sf = pytest.importorskip("soundfile")
    from trt_asr.cli import main

    paths = []
    for i, secs in enumerate([1.7, 2.6]):
        p = tmp_path / f"a{i}.wav"
        sf.write(p, audio(secs, 40 + i).numpy(), SR, subtype="FLOAT")
        paths.append(str(p))
    assert main(["transcribe", *paths, "--model", "random:tiny", "--format", "json"]) == 0
    offline = json.loads(capsys.readouterr().out)
    assert main(["transcribe", *paths, "--model", "random:tiny", "--format", "json", "--stream", "buffered",
                 "--left-secs", "10", "--chunk-secs", "2", "--right-secs", "2"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    assert streamed == offline and any(d["text"] for d in offline)


def test_short_and_empty_streams(tiny):
    rec = Recognizer(tiny, "buffered", **CTX)
    empty, short = rec.open(), rec.open()
    short.feed(np.zeros(10, dtype=np.float32), step=False)
    assert empty.finish()[-1].final and empty.tokens == []
    assert short.finish()[-1].final


def test_engine_window_step_equals_model(tiny):
    """The buffered mode can run its encoder through any "window" EncoderEngine (the I/O contract)."""
    from trt_asr.engines.torch_engine import TorchEncoderEngine

    a = audio(3.3, 12)
    ref = stream_tokens(tiny, [a], piece_secs=0.2, **CTX)[0]
    engine = TorchEncoderEngine(tiny, mode="window")
    assert stream_tokens(tiny, [a], piece_secs=0.2, engine=engine, **CTX)[0] == ref
    assert engine.steps > 5


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 127), max_size=60), cuts=st.lists(st.integers(0, 60), max_size=12))
def test_words_of_any_step_split_equal_the_offline_words(tiny, ids, cuts):
    """Words completed step by step (each token looked at once, however long a word grows) == the offline
    transcript's words of the same tokens, for any split of the tokens into steps (hypothesis)."""
    from trt_asr.streaming.session import StepResult, Token
    from trt_asr.transcribe import make_transcript

    rec = Recognizer(tiny, "buffered", **CTX)
    s = rec.open()
    tokens = [Token(i, 2 * k, 1) for k, i in enumerate(ids)]
    bounds = sorted({min(c, len(tokens)) for c in cuts} | {len(tokens)})
    start = 0
    for end in bounds:
        s._on_step(StepResult(committed=tokens[start:end], tentative=[], finished=end == len(tokens)))
        start = end
    streamed = [w for ev in s.poll() for w in ev.words]
    assert streamed == make_transcript(tiny, [(t.id, t.frame, t.duration) for t in tokens]).words == s.words
