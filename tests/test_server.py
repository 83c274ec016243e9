"""``trt-asr serve`` as a real process on 127.0.0.1 (free port, bearer token): WebSocket replay of a file gives finals
that concatenate to exactly the transcript of the same model and streaming mode; a resampled stereo stream matches
the same DSP path run offline; the OpenAI-compatible endpoint, health, and clear errors for bad input."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
ws_client = pytest.importorskip("websockets.sync.client")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "trt_asr" / "assets" / "demo-tdt-buffered.nemo"
MODEL = str(DEMO) if DEMO.is_file() else "random:tiny"
TOKEN = "test-token-123"
STREAM = {"left_secs": 4.0, "chunk_secs": 0.5, "right_secs": 0.5}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    from trt_asr.captions.testaudio import make_speech_wav

    return make_speech_wav(tmp_path_factory.mktemp("audio") / "speech.wav")


@contextlib.contextmanager
def serve_process(port: int):
    """`trt-asr serve` (demo model, buffered, token) as a real process on 127.0.0.1; yields its base URL."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "trt_asr", "serve", "--host", "127.0.0.1", "--port", str(port), "--model", MODEL,
           "--mode", "buffered", "--left-secs", str(STREAM["left_secs"]), "--chunk-secs", str(STREAM["chunk_secs"]),
           "--right-secs", str(STREAM["right_secs"]), "--token", TOKEN]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read()}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            pytest.fail("server did not come up")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def server():
    port = free_port()
    with serve_process(port) as base:
        yield {"base": base, "ws": f"ws://127.0.0.1:{port}/v1/stream", "port": port}


@pytest.fixture(scope="module")
def model():
    import torch

    torch.set_num_threads(1)
    from trt_asr.checkpoint import load_model

    return load_model(MODEL)


def norm(text: str) -> str:
    return " ".join(text.split())


# Real words: with espeak-ng installed, speech_wav reads trt_asr.captions.testaudio.TEXT, and the shipped demo model
# (trained on espeak speech) recognises it (offline 14 %, buffered 4/0.5/0.5 s 9.5 % WER on this machine).
HEARD_MAX_WER = 0.25


def assert_heard(hyp: str, max_wer: float = HEARD_MAX_WER) -> None:
    """The captions say what the WAV says: WER against the known text (only for real speech and a trained model)."""
    import shutil

    from trt_asr.captions.testaudio import TEXT
    from trt_asr.training.metrics import wer

    if MODEL.startswith("random:") or not (shutil.which("espeak-ng") or shutil.which("espeak")):
        return  # random weights or synthetic tone bursts: nothing to compare with
    w = wer([TEXT], [hyp])
    assert w <= max_wer, f"WER {w:.1%} > {max_wer:.0%}: heard {hyp!r}, said {TEXT!r}"


def stream_reference(model, audio16k: np.ndarray) -> str:
    from trt_asr.streaming import transcribe_streaming

    return norm(transcribe_streaming(model, [audio16k], mode="buffered", **STREAM)[0].text)


def replay(url: str, config: dict, frames: list[bytes], token: str | None = TOKEN, timeout: float = 120) -> list[dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    events = []
    with ws_client.connect(url, additional_headers=headers, max_size=None, open_timeout=30) as ws:
        ws.send(json.dumps(config))
        for f in frames:
            ws.send(f)
        ws.send(json.dumps({"type": "end"}))
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                msg = ws.recv(timeout=deadline - time.time())
            except Exception:
                break
            e = json.loads(msg)
            events.append(e)
            if e["type"] in ("end",) or (e["type"] == "error" and e.get("fatal")):
                if e["type"] == "end":
                    break
    return events


def check_stream_invariants(events: list[dict]) -> None:
    assert events[0]["type"] == "ready"
    assert events[-1]["type"] == "end", events[-3:]
    assert all(e["v"] == 1 for e in events)
    seqs = [e["seq"] for e in events if e["seq"] >= 0]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # within a segment the stable (committed) text only grows; the final is that text completed
    stable_by_seg: dict[int, str] = {}
    for e in events:
        if e["type"] == "partial":
            prev = stable_by_seg.get(e["segment"], "")
            assert e["stable"].startswith(prev), (prev, e["stable"])
            stable_by_seg[e["segment"]] = e["stable"]
            assert all({"word", "start", "end", "stable"} <= set(w) for w in e["words"])
        elif e["type"] == "final":
            assert e["text"].startswith(stable_by_seg.get(e["segment"], ""))
            assert e["start"] <= e["end"]
    assert events[-1]["stats"]["committed_changes"] == 0


def finals_text(events) -> str:
    from trt_asr.captions.transcript import join_finals

    return norm(join_finals([e for e in events if e["type"] == "final"]))


def test_health(server):
    r = httpx.get(server["base"] + "/health", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["mode"] == "buffered" and body["schema_version"] == 1


def test_ws_replay_matches_offline_stream_transcript(server, speech_wav, model):
    """Two clients at once (batched sessions), 100 ms frames of 16 kHz s16le, as fast as possible."""
    import soundfile as sf

    pcm, rate = sf.read(speech_wav, dtype="int16")
    assert rate == 16000
    frames = [pcm[i:i + 1600].tobytes() for i in range(0, len(pcm), 1600)]
    expected = stream_reference(model, pcm.astype(np.float32) / 32768.0)
    assert expected, "the reference transcript is empty; the test would prove nothing"
    results = [None, None]

    def client(i):
        results[i] = replay(server["ws"], {"sample_rate": 16000, "encoding": "pcm_s16le", "channels": 1}, frames)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert_heard(expected)
    for events in results:
        check_stream_invariants(events)
        assert finals_text(events) == expected
        assert any(e["type"] == "partial" for e in events)


def test_ws_resampled_stereo_matches_the_same_dsp_offline(server, speech_wav, model):
    """44.1 kHz stereo f32le in odd-sized frames (frames straddle messages): the server's streaming DSP
    (downmix + soxr stream resampling) must give the same transcript as that DSP run offline."""
    from trt_asr.audio import load_audio
    from trt_asr.captions.dsp import StreamResampler

    mono = load_audio(speech_wav, 44100)
    stereo = np.stack([mono, mono * 0.5], axis=1).astype("<f4")
    raw = stereo.tobytes()
    frames = [raw[i:i + 7001] for i in range(0, len(raw), 7001)]  # not a multiple of the 8-byte frame
    rs = StreamResampler(44100, 16000)
    ref_audio = np.concatenate([rs.process(stereo[i:i + 4410]) for i in range(0, len(stereo), 4410)]
                               + [rs.process(np.zeros((0, 2), np.float32), last=True)])
    expected = stream_reference(model, ref_audio)
    assert_heard(expected)
    events = replay(server["ws"], {"sample_rate": 44100, "encoding": "f32le", "channels": 2}, frames)
    check_stream_invariants(events)
    assert finals_text(events) == expected


def test_openai_transcriptions(server, speech_wav, model):
    from trt_asr.transcribe import Transcriber

    import srt
    import webvtt

    expected = Transcriber(model).transcribe_files([speech_wav])[0]
    url = server["base"] + "/v1/audio/transcriptions"
    data = speech_wav.read_bytes()

    def post(fmt, headers=AUTH, file=("speech.wav", data, "audio/wav")):
        return httpx.post(url, headers=headers, files={"file": file},
                          data={"model": "whisper-1", "response_format": fmt}, timeout=120)

    assert_heard(expected.text)
    r = post("json")
    assert r.status_code == 200 and r.json() == {"text": expected.text}
    r = post("text")
    assert r.status_code == 200 and r.text.strip() == expected.text
    r = post("verbose_json")
    body = r.json()
    assert body["text"] == expected.text and len(body["words"]) == len(expected.words)
    assert abs(body["duration"] - expected.duration) < 1e-3
    subs = list(srt.parse(post("srt").text))
    assert norm(" ".join(s.content for s in subs)) == norm(expected.text)
    vtt = webvtt.from_string(post("vtt").text)
    assert norm(" ".join(c.text for c in vtt)) == norm(expected.text)
    # errors: OpenAI-style JSON, no server paths or internals
    r = post("json", file=("notes.txt", b"this is not audio", "text/plain"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    assert "cannot decode audio" in r.json()["error"]["message"]
    assert post("yaml").status_code == 400
    assert post("json", headers={}).status_code == 401
    assert post("json", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = httpx.post(url, headers=AUTH, data={"model": "x"}, timeout=30)
    assert r.status_code == 400


def test_openai_python_client(server, speech_wav, model):
    openai = pytest.importorskip("openai")
    from trt_asr.transcribe import Transcriber

    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key=TOKEN)
    with open(speech_wav, "rb") as f:
        out = client.audio.transcriptions.create(model="parakeet", file=f)
    assert out.text == Transcriber(model).transcribe_files([speech_wav])[0].text


def _first_error(url, first_messages, headers=AUTH):
    with ws_client.connect(url, additional_headers=headers, open_timeout=30) as ws:
        for m in first_messages:
            ws.send(m)
        for _ in range(50):
            e = json.loads(ws.recv(timeout=30))
            if e["type"] == "error":
                return e
    raise AssertionError("no error event")


def test_ws_bad_input_gives_clear_errors(server):
    from trt_asr.serving.protocol import ERRORS

    url = server["ws"]
    cases = [
        (["{not json"], {"bad_json", "bad_config"}, "JSON"),
        ([b"\x00\x01" * 100], {"bad_config", "config_required"}, "config"),
        ([json.dumps({"sample_rate": 16000, "encoding": "mp3"})], {"bad_config", "unsupported_encoding"}, "encoding"),
        ([json.dumps({"sample_rate": 16000, "channels": 0})], {"bad_config"}, "channels"),
        ([json.dumps({"sample_rate": 16000, "options": {"path": "/etc/passwd"}})], {"bad_config", "unknown_field"},
         "path"),
        ([json.dumps({"sample_rate": 16000}), "hello"], {"bad_message", "bad_json"}, ""),
        ([json.dumps({"sample_rate": 16000, "encoding": "f32le"}), np.full(4000, np.nan, "<f4").tobytes()],
         {"bad_audio"}, ""),
    ]
    for messages, codes, needle in cases:
        e = _first_error(url, messages)
        assert e["code"] in codes and e["code"] in ERRORS and e["fatal"], (messages, e)
        assert needle.lower() in e["message"].lower(), e
    # missing / wrong token: the handshake is refused or closed with 1008 (policy violation)
    for headers in (None, {"Authorization": "Bearer nope"}):
        with pytest.raises(Exception):
            with ws_client.connect(url, additional_headers=headers, open_timeout=30) as ws:
                ws.send(json.dumps({"sample_rate": 16000}))
                ws.recv(timeout=30)
    # ?token= works for browsers, which cannot set headers on a WebSocket
    with ws_client.connect(url + f"?token={TOKEN}", open_timeout=30) as ws:
        ws.send(json.dumps({"sample_rate": 16000}))
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        ws.send(json.dumps({"type": "end"}))
        types = []
        while "end" not in types:
            types.append(json.loads(ws.recv(timeout=30))["type"])


def test_loop_relay_delivers_every_item_in_order_with_few_wakeups():
    """``LoopRelay`` (the caption dispatcher's events to the WebSocket senders): items put from other threads reach
    their asyncio queues all, each queue in put order, and the loop is woken once per batch, not once per item."""
    import asyncio

    from trt_asr.serving.app import LoopRelay

    loop = asyncio.new_event_loop()
    wakeups = []
    real = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *a: wakeups.append(1) or real(*a)
    relay = LoopRelay(loop)
    queues = [asyncio.Queue() for _ in range(3)]
    n = 3000

    def producer(tag):
        for i in range(n):
            relay.put(queues[i % 3], (tag, i))

    async def main():
        threads = [threading.Thread(target=producer, args=(t,)) for t in ("a", "b")]
        for t in threads:
            t.start()
        got = [[] for _ in queues]
        while sum(map(len, got)) < 2 * n:
            for q, out in zip(queues, got):
                while not q.empty():
                    out.append(q.get_nowait())
            await asyncio.sleep(0.001)
        for t in threads:
            t.join()
        return got

    got = loop.run_until_complete(asyncio.wait_for(main(), 30))
    loop.close()
    for k, items in enumerate(got):
        for tag in ("a", "b"):
            assert [i for t, i in items if t == tag] == list(range(k, n, 3))  # all, in order
    assert len(wakeups) < n  # batches (two threads put 6,000 items)
