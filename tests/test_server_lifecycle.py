"""``trt-asr serve`` as a real process: shutdown drains the open streams (SIGTERM mid-utterance: every client still
gets the finals of exactly the audio the server took, then ``end`` and close code 1001; new streams are refused),
and ``--workers N`` (N processes on one port: one stream limit for all of them, each stream's transcript equal to
the same audio streamed alone, a dead worker stops the server instead of leaving it short)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from .test_server import (MODEL, ROOT, STREAM, check_stream_invariants, finals_text, free_port, httpx,
                          stream_reference, ws_client)

CONFIG = {"sample_rate": 16000, "encoding": "pcm_s16le", "channels": 1}


@contextlib.contextmanager
def serve(*extra: str, max_sessions: int = 4):
    """`trt-asr serve` (demo model, buffered, no token) on a free port; yields (process, port) once /health says
    every worker is up."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "trt_asr", "serve", "--port", str(port), "--model", MODEL, "--mode", "buffered",
           "--left-secs", str(STREAM["left_secs"]), "--chunk-secs", str(STREAM["chunk_secs"]),
           "--right-secs", str(STREAM["right_secs"]), "--max-sessions", str(max_sessions), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers = int(extra[extra.index("--workers") + 1]) if "--workers" in extra else 1
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"server exited: {proc.stdout.read()}"
            assert time.time() < deadline, "server did not come up"
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                if body.get("workers_ready", 1) >= workers:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def model():
    import torch

    torch.set_num_threads(1)
    from trt_asr.checkpoint import load_model

    return load_model(MODEL)


@pytest.fixture(scope="module")
def pcm(tmp_path_factory):
    import soundfile as sf

    from trt_asr.captions.testaudio import make_speech_wav

    data, rate = sf.read(make_speech_wav(tmp_path_factory.mktemp("audio") / "speech.wav"), dtype="int16")
    assert rate == 16000
    return data


class OpenStream:
    """A client that sends audio but does not end its stream; collects events until the server closes it."""

    def __init__(self, port: int):
        self.ws = ws_client.connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None, open_timeout=30)
        self.ws.send(json.dumps(CONFIG))
        self.events = [json.loads(self.ws.recv(timeout=30))]
        self.close_code = None

    def send(self, pcm: np.ndarray) -> None:
        for i in range(0, len(pcm), 1600):
            self.ws.send(pcm[i:i + 1600].tobytes())

    def read_until_closed(self, timeout: float = 60) -> None:
        from websockets.exceptions import ConnectionClosed

        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                self.events.append(json.loads(self.ws.recv(timeout=deadline - time.time())))
        except ConnectionClosed as e:
            self.close_code = e.rcvd.code if e.rcvd is not None else None
        except TimeoutError:
            pass


@pytest.mark.parametrize("workers,engines", [(1, 0), (2, 0), (2, 1)])
def test_sigterm_drains_open_streams(model, pcm, workers, engines):
    """Two streams mid-utterance when the server is told to stop: each gets the finals of exactly the audio the
    server took (== that audio streamed alone), then `end`, then close 1001; a new stream during the drain is
    refused; the server exits. With --engines the front-ends drain first, and the engine steps their finals."""
    cut = [int(len(pcm) * 0.6), int(len(pcm) * 0.45)]
    with serve("--workers", str(workers), "--engines", str(engines)) as (proc, port):
        clients = [OpenStream(port) for _ in cut]
        for c, n in zip(clients, cut):
            assert c.events[0]["type"] == "ready"
            c.send(pcm[:n])
        time.sleep(2.0)  # the server has read every frame by now (what it took is checked below, not assumed)
        readers = [threading.Thread(target=c.read_until_closed) for c in clients]
        for t in readers:
            t.start()
        proc.send_signal(signal.SIGTERM)
        # a stream that arrives once the drain began is refused (an error event, or the listener is closed); uvicorn
        # notices the signal within ~0.1 s, and a stream accepted before that just runs (we hang up on it)
        late, deadline = {"type": "ready"}, time.time() + 10
        while late["type"] == "ready" and time.time() < deadline:
            try:
                with ws_client.connect(f"ws://127.0.0.1:{port}/v1/stream", open_timeout=5) as ws:
                    ws.send(json.dumps(CONFIG))
                    late = json.loads(ws.recv(timeout=10))
            except Exception as e:
                late = {"type": "error", "code": "connection_refused", "detail": repr(e)}
            time.sleep(0.02)
        alive = proc.poll() is None  # the refusal came from the draining server, not from a server already gone
        for t in readers:
            t.join(90)
        assert proc.wait(60) in (0, -signal.SIGTERM), proc.stdout.read()
    assert alive and late["type"] == "error" and late["code"] in ("shutting_down", "connection_refused"), late
    for c, n in zip(clients, cut):
        ev = c.events
        check_stream_invariants(ev)
        assert c.close_code == 1001, (c.close_code, ev[-2:])
        assert ev[-1]["audio_duration"] == pytest.approx(n / 16000, abs=1e-3), "the server lost or skipped audio"
        expected = stream_reference(model, pcm[:n].astype(np.float32) / 32768.0)
        assert expected, "the reference transcript is empty; the test would prove nothing"
        assert finals_text(ev) == expected


@pytest.mark.parametrize("engines", [0, 2])
def test_workers_share_one_stream_limit_and_match_alone(model, pcm, engines):
    """--workers 2 --max-sessions 2: two streams run (wherever the kernel put them), a third is refused with
    `busy` although each worker alone would have room; each finished stream's finals == the audio alone. With
    --engines 2 the front-ends hold no model: the streams run on the engine processes, and each front-end serves
    its links to them from its event loop."""
    with serve("--workers", "2", "--engines", str(engines), max_sessions=2) as (proc, port):
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        assert health["workers"] == 2 and health["workers_ready"] == 2
        if engines:
            assert health["engine_processes"] == 2 and [e["alive"] for e in health["engines"]] == [True, True]
            # the front-end serves its engine links from its event loop (no link or dispatcher threads)
            assert [e["io"] for e in health["engines"]] == ["loop", "loop"]
        # each worker froze its start-up heap (model, tokenizer) out of the collector's way, and counts pauses
        assert health["gc"]["frozen_objects"] > 10_000 and len(health["gc"]["collections"]) == 3
        a, b = OpenStream(port), OpenStream(port)
        with ws_client.connect(f"ws://127.0.0.1:{port}/v1/stream", open_timeout=10) as ws:
            refused = json.loads(ws.recv(timeout=10))
        assert refused["type"] == "error" and refused["code"] == "busy", refused
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["sessions"] == 2
        for c in (a, b):
            c.send(pcm)
            c.ws.send(json.dumps({"type": "end"}))
        for c in (a, b):
            c.read_until_closed(120)
        expected = stream_reference(model, pcm.astype(np.float32) / 32768.0)
        for c in (a, b):
            check_stream_invariants(c.events)
            assert c.close_code == 1000
            assert finals_text(c.events) == expected
        if engines:  # the offline endpoint of a front-end runs on an engine process: the same transcript
            import io

            import soundfile as sf

            from trt_asr.transcribe import Transcriber

            buf = io.BytesIO()
            sf.write(buf, pcm, 16000, format="WAV", subtype="PCM_16")
            r = httpx.post(f"http://127.0.0.1:{port}/v1/audio/transcriptions", timeout=120,
                           files={"file": ("a.wav", buf.getvalue(), "audio/wav")})
            want = Transcriber(model).transcribe_arrays([pcm.astype(np.float32) / 32768.0], ["a"])[0].text
            assert r.status_code == 200 and want and r.json()["text"] == want, r.text
        deadline = time.time() + 10  # both released their place in the shared count
        while httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["sessions"] and time.time() < deadline:
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["sessions"] == 0


@pytest.mark.parametrize("kill", ["worker", "engine"])
def test_a_dead_worker_stops_the_server(kill):
    with serve("--workers", "2", *(["--engines", "1"] if kill == "engine" else [])) as (proc, port):
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        pid = health["worker_pid"] if kill == "worker" else health["engines"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        code = proc.wait(60)
        out = proc.stdout.read()
    assert code == 1, out
    assert "exited with code" in out and "stopping the others" in out, out
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_workers_and_engines_exit_when_the_supervisor_is_killed():
    """SIGKILL gives the supervisor no chance to stop its children: they must not serve on as orphans."""
    with serve("--workers", "2", "--engines", "1") as (proc, port):
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        pids = [health["worker_pid"], health["engines"][0]["pid"]]
        proc.kill()
        proc.wait(10)
        deadline = time.time() + 60
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
    assert not any(_alive(p) for p in pids), pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by init) is gone for our purpose
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_bad_worker_arguments_are_refused():
    for args, msg in ((["--workers", "0"], "--workers must be >= 1"), (["--drain-timeout", "-1"], "--drain-timeout"),
                      (["--engines", "-1"], "--engines must be >= 0"),
                      (["--engines", "1", "--mode", "redecode"], "needs --mode buffered or cache-aware")):
        r = subprocess.run([sys.executable, "-m", "trt_asr", "serve", "--port", str(free_port()), *args],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and msg in r.stderr, r.stderr


@pytest.mark.parametrize("engines", [0, 1])
def test_load_tool_against_its_own_server_with_workers(tmp_path, engines):
    """`bench load --server-workers 2` (and `--server-engines 1`): its own server runs two worker processes (front-ends
    of one engine process); every stream's transcript equals the stream alone, nothing lost, and the summary says
    how the server ran. Refused where it means nothing."""
    from trt_asr.cli import main

    out = tmp_path / "s.json"
    common = ["bench", "load", "--duration", "1.5", "--model", "random:tiny", "--left-secs", "1", "--chunk-secs",
              "0.5", "--right-secs", "0.5", "--latency-budget-ms", "10000", "--drain-timeout", "30"]
    main(common + ["--streams", "4", "--server-workers", "2", "--server-engines", str(engines), "--end-spread", "1.0",
                   "--start-spread", "1.0", "--clients-per-process", "2", "--summary-json", str(out)])
    d = json.loads(out.read_text())
    run = d["runs"][0]
    assert run["n_errors"] == 0 and run["lost_audio_seconds"] == 0, run
    assert run["duplicated_words"] == 0 and run["lost_words"] == 0 and run["transcripts_checked"], run
    assert d["streams_sustained"] == 4 and f"workers: 2, engines: {engines}" in d["path"], d["path"]
    assert d["server_engines"] == engines
    assert d["end_spread_s"] == 1.0 and run["server_gc"]["frozen_objects"] > 10_000, run  # a worker's heap, frozen
    # every latency sample in one second of its stream's audio (1.5 s + up to 1 s more: seconds 0, 1 and maybe 2)
    by_second = run["latency_by_stream_second"]
    assert d["start_spread_s"] == 1.0 and sum(b["n"] for b in by_second) == run["event_latency_ms"]["n"]
    assert [b["second"] for b in by_second][:2] == [0, 1] and all(b["p50"] <= b["p99"] for b in by_second)
    # two generator processes of two clients: all four connected before the first audio, and the summary says so
    start = run["client_start"]
    assert start["connected_before_start"] and start["connect_all_s"] is not None, start
    assert 0 < start["connect_ms"]["p50"] <= start["connect_ms"]["max"] <= 1000 * start["connect_all_s"], start
    for bad in (["--in-process"], ["--url", "ws://127.0.0.1:9/v1/stream"]):
        with pytest.raises(SystemExit) as e:
            sys.exit(main(common + ["--streams", "2", "--server-workers", "2", "--server-engines", str(engines), *bad]))
        assert e.value.code == 2


@pytest.mark.parametrize("flag", [[], ["--ws-deflate"]])
def test_permessage_deflate_only_when_asked(model, pcm, flag):
    """The client offers permessage-deflate (as browsers do); the server takes it only with --ws-deflate, and the
    stream is the same either way."""
    with serve(*flag) as (proc, port):
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["gc"]["frozen_objects"] > 10_000
        c = OpenStream(port)
        ext = c.ws.response.headers.get("Sec-WebSocket-Extensions") or ""
        c.send(pcm)
        c.ws.send(json.dumps({"type": "end"}))
        c.read_until_closed(120)
    assert ("permessage-deflate" in ext) == bool(flag), ext
    check_stream_invariants(c.events)
    assert finals_text(c.events) == stream_reference(model, pcm.astype(np.float32) / 32768.0)


def test_serve_batching_options_reach_the_scheduler(model, pcm):
    """serve --fixed-batch 2 --max-batch 2 --batch-wait-ms 30: the ready event says the mode runs fixed 2-row calls;
    two concurrent streams each get exactly the transcript of the same fixed-shape mode alone; bad values refused."""
    from trt_asr.streaming import transcribe_streaming

    with serve("--fixed-batch", "2", "--max-batch", "2", "--batch-wait-ms", "30") as (proc, port):
        a, b = OpenStream(port), OpenStream(port)
        assert a.events[0]["params"].get("fixed_batch") == 2, a.events[0]
        for c in (a, b):
            c.send(pcm)
            c.ws.send(json.dumps({"type": "end"}))
        for c in (a, b):
            c.read_until_closed(120)
    audio = pcm.astype(np.float32) / 32768.0
    expected = " ".join(transcribe_streaming(model, [audio], mode="buffered", fixed_batch=2, **STREAM)[0].text.split())
    assert expected
    for c in (a, b):
        check_stream_invariants(c.events)
        assert finals_text(c.events) == expected
    for bad in (["--fixed-batch", "0"], ["--max-batch", "0"], ["--batch-wait-ms", "-1"], ["--idle-timeout", "-1"]):
        r = subprocess.run([sys.executable, "-m", "trt_asr", "serve", "--port", str(free_port()), *bad],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "must be" in r.stderr, r.stderr


def test_heap_freeze_and_gc_pauses(tmp_path):
    """freeze_heap() moves what exists into the permanent generation (a full collection no longer walks it);
    TRT_ASR_GC_FREEZE=0 leaves the heap alone; GcPauses counts every collection by generation. In a child process:
    freezing this one would change the collector for the rest of the test session."""
    code = (
        "import gc, json, os\n"
        "from trt_asr.serving.heap import GcPauses, freeze_heap\n"
        "keep = [[i] for i in range(50_000)]\n"
        "n = freeze_heap()\n"
        "p = GcPauses().install()\n"
        "gc.collect(0); gc.collect(2); gc.collect(2)\n"
        "s = p.summary(); p.uninstall(); gc.collect()\n"
        "print(json.dumps({'n': n, 'frozen': gc.get_freeze_count(), 'summary': s, 'after': p.summary()}))\n")
    out = {}
    for flag in ("1", "0"):
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, TRT_ASR_GC_FREEZE=flag),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        out[flag] = json.loads(r.stdout.strip().splitlines()[-1])
    on, off = out["1"], out["0"]
    assert on["n"] == on["frozen"] >= 50_000 and off["n"] == off["frozen"] == 0
    assert on["summary"]["collections"] == [1, 0, 2] and on["after"]["collections"] == [1, 0, 2]
    full = on["summary"]
    assert full["pause_ms_max"][2] > 0 and full["pause_ms_total"][2] >= full["pause_ms_max"][2]
