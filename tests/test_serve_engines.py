"""``serve`` and ``live`` run the scheduler's streaming modes on the torch-cuda engine with the options of the capacity
runs (``--engine torch-cuda --kv-cache ring --compile MODE --att-context L,R``), built as ``bench load`` builds them
(``trt_asr.engines.with_streaming_engine``). On the CPU here the engine runs its bucketed, padded code eagerly in
fp32, and every stream's captions must equal the same audio streamed alone through the reference engine (NeMo's
layer-input cache, no buckets): in process with two streams at once, and through a real ``serve --engines 1``
process over WebSocket. Options that do not fit together are refused before anything loads."""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest

from .demo_assets import demo_nemo
from .test_caption_dispatch import _run as caption_streams  # every audio a caption stream at once
from .test_server import ROOT, check_stream_invariants, finals_text, free_port, httpx, norm
from .test_server_lifecycle import OpenStream, serve

BUFFERED = {"left_secs": 4.0, "chunk_secs": 0.5, "right_secs": 0.5}


def parse_serve(*argv: str):
    from trt_asr.cli import serve as serve_cli

    p = argparse.ArgumentParser()
    serve_cli.register(p.add_subparsers())
    return p.parse_args(["serve", *argv])


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    import soundfile as sf

    from trt_asr.captions.testaudio import make_speech_wav

    audio, rate = sf.read(make_speech_wav(tmp_path_factory.mktemp("audio") / "speech.wav"), dtype="float32")
    assert rate == 16000
    return audio


def reference(model_path: str, audio: np.ndarray, mode: str, **params) -> str:
    """The same audio streamed alone through the mode's reference engine (torch, fp32, no buckets)."""
    from trt_asr.checkpoint import load_model
    from trt_asr.streaming import transcribe_streaming

    text = norm(transcribe_streaming(load_model(model_path), [audio], mode=mode, **params)[0].text)
    assert text, "the reference transcript is empty: the comparison would prove nothing"
    return text


@pytest.mark.parametrize("case", ["buffered", "cache-aware ring", "cache-aware projected"])
def test_caption_service_on_the_torch_cuda_engine_equals_the_reference_engine(case, speech):
    """The options reach the scheduler (its mode runs a TorchCudaEngine with that attention cache), and two streams
    at once each get exactly the captions of their audio streamed alone through the reference engine."""
    from trt_asr.captions.service import CaptionService
    from trt_asr.engines.torch_cuda import TorchCudaEngine

    if case == "buffered":
        model = demo_nemo("demo-tdt-buffered")
        argv = ["--mode", "buffered", *(f"--{k.replace('_', '-')}={v}" for k, v in BUFFERED.items())]
        ref_mode, ref_params, kv = "buffered", BUFFERED, "layer_input"
    else:
        model = demo_nemo("demo-tdt-cache-aware")
        kv = case.split()[1]
        argv = ["--mode", "cache-aware", "--att-context", "70,1", "--kv-cache", kv, "--fixed-batch", "2",
                "--max-batch", "2"]
        ref_mode, ref_params = "cache_aware", {"att_context_size": [70, 1]}
    svc = CaptionService.from_args(parse_serve("--model", model, "--engine", "torch-cuda", *argv))
    try:
        engine = svc._shared.recognizer.mode.engine
        assert isinstance(engine, TorchCudaEngine) and engine.kv_cache == kv
        if ref_mode == "cache_aware":
            assert svc.info()["params"]["att_context_size"] == [70, 1]  # what the ready event tells clients
            assert list(engine.params.att_context_size) == [70, 1]
        audios = [speech, speech[: int(speech.size * 0.6)]]
        for events, audio in zip(caption_streams(svc, audios), audios):
            assert finals_text(events) == reference(model, audio, ref_mode, **ref_params)
    finally:
        svc._shared.stop()


def test_serve_engine_process_runs_the_ring_cache(speech):
    """A real `serve --workers 1 --engines 1 --engine torch-cuda --kv-cache ring --att-context 70,1` process: the
    ready event carries the attention context, the front-end serves its engine link from its event loop, and a
    stream's finals over WebSocket equal the same audio streamed alone through the reference engine."""
    model = demo_nemo("demo-tdt-cache-aware")
    pcm = np.round(speech * 32767).astype(np.int16)
    with serve("--model", model, "--mode", "cache-aware", "--att-context", "70,1", "--engine", "torch-cuda",
               "--kv-cache", "ring", "--workers", "1", "--engines", "1", "--fixed-batch", "2",
               "--max-batch", "2") as (proc, port):
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        assert [e["io"] for e in health["engines"]] == ["loop"]
        client = OpenStream(port)
        assert client.events[0]["params"]["att_context_size"] == [70, 1], client.events[0]
        client.send(pcm)
        client.ws.send('{"type": "end"}')
        client.read_until_closed(120)
    check_stream_invariants(client.events)
    assert finals_text(client.events) == reference(model, pcm.astype(np.float32) / 32768.0, "cache_aware",
                                                   att_context_size=[70, 1])


@pytest.mark.parametrize("argv,message", [
    (["--mode", "cache-aware", "--engine", "onnxruntime"], "--mode cache-aware runs on --engine torch or torch-cuda"),
    (["--mode", "cache-aware", "--kv-cache", "ring"], "options of --engine torch-cuda"),
    (["--compile", "default"], "options of --engine torch-cuda"),
    (["--engine", "torch-cuda", "--kv-cache", "ring"], "--kv-cache is an option of --mode cache-aware"),
    (["--att-context", "70,1"], "--att-context is an option of --mode cache-aware"),
    (["--mode", "cache-aware", "--att-context", "70"], "--att-context must be L,R"),
    (["--engine", "nope"], "unknown engine"),
])
def test_serve_refuses_engine_options_that_do_not_fit(argv, message):
    r = subprocess.run([sys.executable, "-m", "trt_asr", "serve", "--port", str(free_port()), "--workers", "2", *argv],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr
