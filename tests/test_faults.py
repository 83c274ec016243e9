"""Faults and bad input against a real server (uvicorn on 127.0.0.1, random:tiny, buffered): every bad client gets
a clear error event and/or close code, the server keeps serving, and a good stream running through all of it gets
exactly the transcript it gets alone. Everything is loopback, bounded in count and time."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import numpy as np
import pytest

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("websockets")
pytest.importorskip("starlette")
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

RATE = 16000
PARAMS = {"left_secs": 0.64, "chunk_secs": 0.32, "right_secs": 0.32}
MAX_SESSIONS = 12
MAX_FRAME = 64 * 1024
TOKEN = "s3cret-token"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Server:
    def __init__(self, token=None, idle_timeout: float | None = None):
        import torch

        from trt_asr.captions.service import CaptionService
        from trt_asr.checkpoint import load_model
        from trt_asr.serving.app import Limits, create_app

        torch.manual_seed(0)
        self.model = load_model("random:tiny")
        svc = CaptionService(self.model, "buffered", dict(PARAMS))
        app = create_app(svc, token, Limits(max_sessions=MAX_SESSIONS, max_frame_bytes=MAX_FRAME,
                                            max_stream_seconds=600, idle_timeout=idle_timeout))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.sock = sock
        from trt_asr.serving.runner import DrainingServer, uvicorn_options  # as `trt-asr serve` runs it

        opts = {**uvicorn_options("critical"), "ws_max_size": 4 * MAX_FRAME}
        self.server = DrainingServer(uvicorn.Config(app, lifespan="off", **opts))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"ws://127.0.0.1:{self.port}/v1/stream"

    def health(self) -> dict:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).json()

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server():
    s = _Server()
    yield s
    s.stop()


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 1.7 * t)
    x = env * (0.2 * np.sin(2 * np.pi * (180 + 40 * np.sin(t)) * t) + 0.05 * rng.standard_normal(t.size))
    return x.astype(np.float32)


def s16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


async def run_client(url, config: dict | str | bytes | None, frames=(), end=True, read=True, pace: float = 0.0,
                     timeout: float = 60.0, headers=None):
    """One client: send config (dict -> JSON), frames (bytes or str), then {"type":"end"}; collect events until the
    server closes. Returns (events, close_code, close_reason)."""
    events = []
    async with connect(url, max_size=2**22, open_timeout=10, additional_headers=headers) as ws:
        async def reader():
            try:
                async for msg in ws:
                    events.append(json.loads(msg))
            except ConnectionClosed:
                pass

        task = asyncio.create_task(reader()) if read else None
        try:
            if config is not None:
                await ws.send(json.dumps(config) if isinstance(config, dict) else config)
            for f in frames:
                await ws.send(f)
                if pace:
                    await asyncio.sleep(pace)
            if end:
                await ws.send(json.dumps({"type": "end"}))
        except ConnectionClosed:
            pass
        if task is not None:
            await asyncio.wait_for(task, timeout)
        else:
            await asyncio.sleep(0.2)
            return events, None, None
    return events, ws.close_code, ws.close_reason


def finals_text(events) -> str:
    return " ".join(e["text"] for e in events if e.get("type") == "final" and e.get("text")).strip()


def errors(events):
    return [e for e in events if e.get("type") == "error"]


GOOD_CONFIG = {"sample_rate": RATE, "encoding": "pcm_s16le", "channels": 1, "options": {"vad": False}}
GOOD_AUDIO = speech_like(4.0, seed=1)
GOOD_FRAMES = [s16(GOOD_AUDIO[i:i + 1600]) for i in range(0, GOOD_AUDIO.size, 1600)]


def test_good_stream_alone_then_under_faults(server):
    """The reference: a good stream's finals alone, then the same stream while bad clients hit the server."""
    alone, code, _ = asyncio.run(run_client(server.url, GOOD_CONFIG, GOOD_FRAMES))
    assert code == 1000 and alone[-1]["type"] == "end" and not errors(alone)
    ref = finals_text(alone)

    big = b"\x00" * (MAX_FRAME + 2)
    nan = np.array([0.1, np.nan, 0.2, np.inf], "<f4").tobytes()

    async def storm():
        bad = [
            run_client(server.url, "{not json"),                                              # malformed JSON
            run_client(server.url, {**GOOD_CONFIG, "languag": "en"}),                        # unknown field
            run_client(server.url, {**GOOD_CONFIG, "sample_rate": 1000}),                    # wrong sample rate
            run_client(server.url, {**GOOD_CONFIG, "sample_rate": "16k"}),
            run_client(server.url, b"\x01\x02" * 800),                                         # binary before config
            run_client(server.url, GOOD_CONFIG, [b"\x00" * 1601, b"\x00" * 3]),              # odd byte counts
            run_client(server.url, GOOD_CONFIG, [big]),                                        # oversized frame
            run_client(server.url, {**GOOD_CONFIG, "encoding": "f32le"}, [nan]),              # NaN / Inf samples
            run_client(server.url, GOOD_CONFIG, ['{"type": "dance"}']),                        # unknown control
            run_client(server.url, "[" * 3000),                                                # deep nesting
        ]
        good = run_client(server.url, GOOD_CONFIG, GOOD_FRAMES, pace=0.005)
        return await asyncio.gather(good, *bad, return_exceptions=True)

    good, *bad = asyncio.run(storm())
    assert not isinstance(good, BaseException), good
    events, code, _ = good
    assert code == 1000 and not errors(events) and finals_text(events) == ref

    names = ["bad_json", "unknown_field", "sample_rate", "sample_rate_type", "binary_first", "odd_bytes",
             "oversized", "nan", "unknown_control", "deep_json"]
    for name, result in zip(names, bad):
        assert not isinstance(result, BaseException), (name, result)
        events, code, reason = result
        if name == "odd_bytes":  # frames may straddle messages: accepted, the stream ends normally
            assert code == 1000 and events[-1]["type"] == "end", (name, events)
            continue
        errs = errors(events)
        assert errs and errs[0]["message"], (name, events)
        assert code not in (None, 1000), (name, code)
        if name == "oversized":
            assert errs[0]["code"] == "frame_too_large"
        if name == "nan":
            assert errs[0]["code"] == "bad_audio" and "NaN" in errs[0]["message"]
        if name in ("unknown_field",):
            assert "languag" in errs[0]["message"]
    assert _wait_sessions(server, 0)


def _wait_sessions(server, n, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.health()["sessions"] == n:
            return True
        time.sleep(0.1)
    return False


def test_long_silence_fast_forwarded_bounded_memory(server):
    """Three minutes of silence sent as fast as the socket takes it: the stream ends normally, memory stays flat."""
    before = _rss_mb()
    frame = b"\x00" * 32000  # 1 s of s16 silence
    events, code, _ = asyncio.run(run_client(server.url, GOOD_CONFIG, [frame] * 180, timeout=120))
    assert code == 1000 and events[-1]["type"] == "end" and not errors(events)
    assert abs(events[-1]["audio_duration"] - 180) < 1
    assert _rss_mb() - before < 300


def test_disconnect_mid_utterance(server):
    async def go():
        async with connect(server.url) as ws:
            await ws.send(json.dumps(GOOD_CONFIG))
            for f in GOOD_FRAMES[:10]:
                await ws.send(f)
        # closed without "end": the server must clean up
    asyncio.run(go())
    assert _wait_sessions(server, 0)
    events, code, _ = asyncio.run(run_client(server.url, GOOD_CONFIG, GOOD_FRAMES[:5]))
    assert code == 1000


def test_client_that_never_reads(server):
    """Sends a minute of audio, never reads a byte, then drops the connection: the server frees everything."""
    frames = [s16(speech_like(1.0, seed=i)) for i in range(60)]
    asyncio.run(run_client(server.url, GOOD_CONFIG, frames, read=False))
    assert _wait_sessions(server, 0, timeout=60)
    events, code, _ = asyncio.run(run_client(server.url, GOOD_CONFIG, GOOD_FRAMES[:5]))
    assert code == 1000


def test_idle_stream_is_finalised_closed_and_freed():
    """A client that sends its config and 2 s of audio, then nothing (no audio, no end) for longer than the idle
    timeout: the audio the server took is finalised (the same finals as that audio ended normally, `end` says 2 s),
    with an `idle_timeout` error, close 1000, and its place is free again. A client that pauses less than the
    timeout between frames is not touched, however long it streams."""
    s = _Server(idle_timeout=1.0)
    try:
        frames = GOOD_FRAMES[:20]
        ended, code, _ = asyncio.run(run_client(s.url, GOOD_CONFIG, frames))
        assert code == 1000 and not errors(ended)
        events, code, _ = asyncio.run(run_client(s.url, GOOD_CONFIG, frames, end=False, timeout=30))
        assert code == 1000, events[-3:]
        assert [e["code"] for e in errors(events)] == ["idle_timeout"] and "1 s" in errors(events)[0]["message"]
        assert events[-1]["type"] == "end" and abs(events[-1]["audio_duration"] - 2.0) < 0.01
        assert finals_text(events) == finals_text(ended)
        assert _wait_sessions(s, 0)
        slow, code, _ = asyncio.run(run_client(s.url, GOOD_CONFIG, GOOD_FRAMES[:8], pace=0.4, timeout=30))
        assert code == 1000 and not errors(slow) and slow[-1]["type"] == "end"
    finally:
        s.stop()


def test_connection_flood(server):
    """More connections than the limit at once: the excess are refused with 1013 and a clear error, the ones
    admitted finish normally, and afterwards the server serves again."""
    async def flood():
        return await asyncio.gather(*[run_client(server.url, GOOD_CONFIG, GOOD_FRAMES[:8], pace=0.01)
                                      for _ in range(MAX_SESSIONS * 3)], return_exceptions=True)

    results = asyncio.run(flood())
    ok = [r for r in results if not isinstance(r, BaseException) and r[1] == 1000]
    refused = [r for r in results if not isinstance(r, BaseException) and r[1] == 1013]
    assert len(ok) + len(refused) == len(results), [r for r in results if isinstance(r, BaseException)][:3]
    assert 1 <= len(ok) and len(refused) >= 1
    assert all(errors(r[0]) and errors(r[0])[0]["code"] in ("busy", "capacity") for r in refused)
    assert _wait_sessions(server, 0)
    assert asyncio.run(run_client(server.url, GOOD_CONFIG, GOOD_FRAMES[:5]))[1] == 1000


def test_bearer_token_required():
    from websockets.exceptions import InvalidStatus

    s = _Server(token=TOKEN)
    try:
        for url, headers in ((s.url, None), (s.url + "?token=wrong", None),
                             (s.url, {"Authorization": "Bearer " + TOKEN[:-1] + "X"})):
            with pytest.raises((InvalidStatus, ConnectionClosed)):  # refused at the handshake (403) or closed 1008
                events, code, _ = asyncio.run(run_client(url, GOOD_CONFIG, GOOD_FRAMES[:2], headers=headers))
                assert code == 1008
                raise ConnectionClosed(None, None)
        events, code, _ = asyncio.run(run_client(s.url, GOOD_CONFIG, GOOD_FRAMES[:2],
                                                 headers={"Authorization": f"Bearer {TOKEN}"}))
        assert code == 1000
        assert asyncio.run(run_client(s.url + "?token=" + TOKEN, GOOD_CONFIG, GOOD_FRAMES[:2]))[1] == 1000
    finally:
        s.stop()


def test_load_tool_smoke(server, tmp_path):
    """`trt-asr bench load` through this server and in-process: summary keys, nothing lost or duplicated."""
    from trt_asr.cli import main

    common = ["bench", "load", "--streams", "2", "--duration", "1.5", "--model", "random:tiny", "--left-secs",
              str(PARAMS["left_secs"]), "--chunk-secs", str(PARAMS["chunk_secs"]), "--right-secs",
              str(PARAMS["right_secs"]), "--latency-budget-ms", "5000", "--drain-timeout", "20"]
    for extra in (["--url", server.url], ["--url", server.url, "--clients-per-process", "1"], ["--in-process"]):
        out = tmp_path / "s.json"
        main(common + extra + ["--summary-json", str(out)])
        d = json.loads(out.read_text())
        for key in ("streams_sustained", "lost_audio_seconds", "duplicated_words", "p50_latency_ms",
                    "p99_latency_ms"):
            assert key in d
        run = d["runs"][0]
        assert run["n_errors"] == 0 and run["lost_audio_seconds"] == 0, run
        assert run["duplicated_words"] == 0 and run["lost_words"] == 0 and run["transcripts_checked"], run
        assert d["streams_sustained"] == 2
        if "--url" in extra:  # the server's own latency view came back in every stream's end event
            assert run["server_latency"]["partial_latency_p50_ms"]["max"] >= 0, run


def test_load_tool_end_spread_lengths():
    """--end-spread S: stream i is --duration + u_i seconds long, u_i uniform in [0, S) (seeded): the streams end
    over S seconds; without it every clip is exactly --duration long. Each clip is a different part of the source."""
    import argparse

    from trt_asr.cli import bench

    p = argparse.ArgumentParser()
    bench.register(p.add_subparsers(dest="cmd"))
    base = ["bench", "load", "--duration", "1.5"]
    same = bench.stream_audios(p.parse_args(base), 6)
    spread = bench.stream_audios(p.parse_args(base + ["--end-spread", "2"]), 6)
    again = bench.stream_audios(p.parse_args(base + ["--end-spread", "2"]), 6)
    assert {a.size for a in same} == {24000}
    sizes = [a.size for a in spread]
    assert all(24000 <= n < 24000 + 32000 for n in sizes) and len(set(sizes)) == 6
    assert max(sizes) - min(sizes) > 8000  # spread over seconds, not samples
    assert [a.size for a in again] == sizes
    for a, b in zip(same, spread):  # the same clip, only longer
        np.testing.assert_array_equal(b[:a.size], a)


@pytest.mark.parametrize("mode_args", [["--mode", "buffered", "--left-secs", "1", "--chunk-secs", "0.5",
                                        "--right-secs", "0.5"],
                                       ["--mode", "cache-aware", "--chunk-ms", "160", "--pooled"]])
def test_load_tool_torch_cuda_engine_equals_reference_engine(mode_args):
    """`bench load --engine torch-cuda` (CPU here: the same bucketed/padded code, eager) gives every stream the
    transcript the fp32 reference engine gives it alone."""
    import argparse

    from trt_asr.checkpoint import load_model
    from trt_asr.cli import bench
    from trt_asr.engines import with_streaming_engine

    p = argparse.ArgumentParser()
    bench.register(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["bench", "load", "--streams", "3", "--duration", "2", "--model", "random:tiny", "--in-process",
                         "--engine", "torch-cuda", "--drain-timeout", "20", *mode_args])
    model = load_model("random:tiny")
    mode, params, chunk_s = bench.mode_params(args)
    bench._streamable_features(model, mode)
    want = bench.reference_texts(model, mode, params, bench.stream_audios(args, 3))
    got = bench.run_in_process(model, args, 3, mode, with_streaming_engine(model, mode, params, "torch-cuda"), chunk_s)
    assert not got["errors"] and got["lost_audio_seconds"] == 0
    assert got["texts"] == want and any(want)
