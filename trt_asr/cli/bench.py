"""``trt-asr bench load``: many concurrent real-time streams against one engine; latency, capacity, correctness.

    trt-asr bench load --streams 8 --duration 30 --model random:tiny --summary-json load.json
    trt-asr bench load --streams 4,8,16,32 --duration 20 --mode cache-aware --chunk-ms 160 --in-process
    trt-asr bench load --streams 16 --duration 30 --url ws://127.0.0.1:8000/v1/stream

Through the server (default): starts its own server process on 127.0.0.1 (unless ``--url``) and runs K WebSocket
clients in one event loop, each replaying its own audio paced in real time (``--frame-ms`` frames, starts staggered
over one chunk). ``--in-process``: the same streams pushed straight into a ``StreamScheduler`` (no network, no JSON,
no caption pipeline), so the engine+scheduler cost and the serving cost are seen apart.

Event latency = when an event arrived - when the last audio it needed was sent (server: the event's ``audio_end``
mapped to the send time of that sample; in-process: the arrival of the audio that made the chunk ready). A run
*sustains* K streams when every stream finished without error, no audio was lost, and p99 event latency stayed
under the budget (default: the chunk duration). With several K (``--streams 4,8,16``) it stops after the first K
that is not sustained and reports the largest sustained K.

Correctness: every stream's committed transcript is compared word by word with the same audio streamed alone
through the same mode (batched == alone is exact in both modes; in cache-aware mode with a streaming-trained model
that is also the offline transcript). ``duplicated_words`` / ``lost_words`` count the differences;
``lost_audio_seconds`` compares the audio sent with the audio the server (or mode) received.

Bounded: at most ``--max-streams`` (default 512) clients, every run ends after duration + ``--drain-timeout``;
traffic goes to loopback only unless ``--url`` names another host.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import difflib
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

RATE = 16000


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (load: many concurrent streams)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    lp = bsub.add_parser("load", help="K concurrent real-time streams: latency, capacity, lost/duplicated audio",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lp.add_argument("--streams", default="8", help="K, or a comma list to sweep (stops at the first K not sustained)")
    lp.add_argument("--duration", type=float, default=30.0, help="seconds of audio per stream")
    lp.add_argument("--url", default=None, help="an existing server's ws://.../v1/stream (default: start one)")
    lp.add_argument("--token", default=None, help="bearer token for --url")
    lp.add_argument("--model", default=None, help="model spec (default: the demo model / random v3)")
    lp.add_argument("--mode", default="buffered", choices=["buffered", "cache-aware"])
    lp.add_argument("--left-secs", type=float, default=10.0, help="buffered")
    lp.add_argument("--chunk-secs", type=float, default=2.0, help="buffered")
    lp.add_argument("--right-secs", type=float, default=2.0, help="buffered")
    lp.add_argument("--chunk-ms", type=float, default=560.0, help="cache-aware chunk (multiple of the 80 ms frame)")
    lp.add_argument("--left-frames", type=int, default=70, help="cache-aware left attention context (frames)")
    lp.add_argument("--in-process", action="store_true", help="no network: streams go straight to the scheduler")
    lp.add_argument("--state", default="auto", choices=["auto", "batched", "per-stream", "pooled"],
                    help="cache-aware: batched = BatchedCacheAwareMode (mel, caches, decoder state and greedy loop "
                    "batched on the device; the default: 'auto'), per-stream = CacheAwareMode, pooled = CacheAwareMode "
                    "with its state in a SlotPool (in-process only)")
    lp.add_argument("--pooled", action="store_true", help="same as --state pooled")
    lp.add_argument("--server-batching", default="scheduler", choices=["scheduler", "lock"],
                    help="own server: caption streams batched by one StreamScheduler (default, as `trt-asr serve`) "
                    "or by the lock-shared Recognizer (the previous way)")
    lp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    lp.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    lp.add_argument("--kv-cache", default="layer_input", choices=["layer_input", "projected", "ring"],
                    help="cache-aware torch-cuda engine: NeMo's layer-input attention cache, projected K/V, or the "
                    "layer inputs in a ring (no cache shift per layer and step)")
    lp.add_argument("--engine", default="torch", choices=["torch", "torch-cuda"],
                    help="encoder engine of the scheduler (torch-cuda: --dtype weights, CUDA graphs per batch bucket)")
    lp.add_argument("--compile", default=None, metavar="MODE", dest="compile_mode",
                    help="torch-cuda engine: run its encoder step through torch.compile (MODE: default, "
                    "max-autotune-no-cudagraphs, ...) before capturing the CUDA graphs; one compilation per bucket "
                    "shape (with --fixed-batch: one shape per chunk kind)")
    lp.add_argument("--max-batch", type=int, default=64, help="scheduler: streams per step at most")
    lp.add_argument("--fixed-batch", type=int, default=None, metavar="S",
                    help="every encoder/decoder call runs at batch S (padded; a step of more than S streams, up to "
                    "--max-batch, runs as sub-batches of S; buffered windows are padded to the full window), so a "
                    "stream's results never depend on which streams share its step, bitwise, in any precision (the "
                    "transcript check is then exact in fp16/bf16 too); costs padded compute at low load")
    lp.add_argument("--end-spread", type=float, default=0.0, metavar="S",
                    help="each stream is longer than --duration by a uniform random 0..S s, so the streams end over S "
                    "seconds instead of within one chunk (0: every stream ends within one chunk of the others: all K "
                    "finals at once, the worst case for the finals' latency)")
    lp.add_argument("--start-spread", type=float, default=0.0, metavar="S",
                    help="the streams start at uniform random times over S seconds (default, or below one chunk: "
                    "over one chunk, the worst case for the streams' first events); through a server every client "
                    "connects before the first audio starts (client_start in the summary: how long that took); "
                    "latency_by_stream_second in the summary shows each second of the streams apart")
    lp.add_argument("--frame-ms", type=float, default=100.0, help="client frame size")
    lp.add_argument("--send-tick-ms", type=float, default=10.0,
                    help="in-process: each frame is sent at the first tick of this period after its audio exists "
                    "(one client wake-up per tick; 0: one per frame)")
    lp.add_argument("--audio", nargs="*", default=None,
                    help="audio files to replay (default: the shipped example.wav, else synthetic speech)")
    lp.add_argument("--latency-budget-ms", type=float, default=None, help="default: the chunk duration")
    lp.add_argument("--drain-timeout", type=float, default=60.0, help="seconds after the last audio to wait")
    lp.add_argument("--no-check", action="store_true", help="skip the transcript comparison")
    lp.add_argument("--word-gate", type=float, default=None,
                    help="allowed (duplicated + lost) words / reference words for 'sustained'; default 0 for "
                    "cache-aware and with --fixed-batch (exact), 0.02 for buffered (fp32 GPU kernels differ by batch "
                    "size, so near-tie tokens of a random model can flip)")
    lp.add_argument("--max-streams", type=int, default=512, help="safety bound on K")
    lp.add_argument("--seed", type=int, default=0)
    lp.add_argument("--caption-dispatch", default="shared", choices=["shared", "thread"],
                    help="server caption path: one dispatcher thread for all streams, or a thread per stream")
    lp.add_argument("--clients-per-process", type=int, default=32,
                    help="WebSocket clients per load-generator process (one asyncio loop each; the clients of one "
                    "loop share its CPU, so past a few dozen the generator itself adds to the latency tail)")
    lp.add_argument("--batch-wait-ms", type=float, default=0.0, metavar="MS",
                    help="scheduler: with fewer than --max-batch streams ready, wait until the oldest ready chunk is "
                    "this old (fuller steps of a fixed batch shape; the wait counts in the latency)")
    lp.add_argument("--server-workers", type=int, default=1, metavar="N",
                    help="our own server: N worker processes on one port (as `trt-asr serve --workers N`)")
    lp.add_argument("--server-engines", type=int, default=0, metavar="M",
                    help="our own server: M engine processes hold the model and schedulers, the --server-workers "
                    "are front-ends only (as `trt-asr serve --engines M`)")
    lp.add_argument("--processes", type=int, default=1, metavar="P",
                    help="in-process: P worker processes share the GPU, each with its own model, engine and "
                    "scheduler and K/P of the streams, started together (one Python process's GIL bounds the "
                    "per-stream host work; a deployment runs several); latencies and transcripts are merged")
    lp.add_argument("--barrier", default=None, help=argparse.SUPPRESS)  # --processes: start together (internal)
    lp.add_argument("--latency-dump", default=None, help=argparse.SUPPRESS)  # --processes: raw latencies (internal)
    lp.add_argument("--summary-json", default=None, help="write the summary here")
    lp.set_defaults(func=run_load)


# ----------------------------------------------------------------------------------------------- helpers
def percentiles_ms(values) -> dict:
    if not len(values):
        return {"p50": None, "p95": None, "p99": None, "max": None, "n": 0}
    a = np.asarray(values, dtype=np.float64) * 1000
    return {"p50": round(float(np.percentile(a, 50)), 2), "p95": round(float(np.percentile(a, 95)), 2),
            "p99": round(float(np.percentile(a, 99)), 2), "max": round(float(a.max()), 2), "n": int(a.size)}


def mode_params(args) -> tuple[str, dict, float]:
    """(session mode name, mode params, chunk seconds)."""
    if args.mode == "buffered":
        params = {"left_secs": args.left_secs, "chunk_secs": args.chunk_secs, "right_secs": args.right_secs}
        if getattr(args, "fixed_batch", None):  # BufferedMode: full-size windows, calls of exactly S rows
            params["fixed_batch"] = args.fixed_batch
        return "buffered", params, args.chunk_secs
    frames = max(1, int(round(args.chunk_ms / 80.0)))
    params = {"chunk_size": frames, "att_context_size": [args.left_frames, frames - 1], "allow_inexact": True}
    if getattr(args, "fixed_batch", None):  # BatchedCacheAwareMode: one batch bucket
        params["buckets"] = [args.fixed_batch]
    return "cache_aware", params, frames * 0.08


def load_source_audio(paths, seconds_needed: float, seed: int) -> np.ndarray:
    from importlib import resources

    example = resources.files("trt_asr.assets").joinpath("example.wav")
    if not paths and example.is_file():  # the shipped speech clip (tiled, a different offset per stream)
        paths = [str(example)]
    if paths:
        from ..audio import load_audio

        x = np.concatenate([load_audio(p, RATE) for p in paths])
    else:
        try:
            from ..captions.testaudio import synthetic_speech
        except ImportError:  # pragma: no cover
            synthetic_speech = None
        n = max(seconds_needed, 1.0)
        if synthetic_speech is not None:
            x = synthetic_speech(n, RATE, seed)
        else:
            rng = np.random.default_rng(seed)
            x = (0.1 * rng.standard_normal(int(n * RATE))).astype(np.float32)
    reps = int(np.ceil(seconds_needed * RATE / max(x.size, 1)))
    return np.tile(x, max(reps, 1)).astype(np.float32)


def stream_audios(args, k: int) -> list[np.ndarray]:
    """K different clips of ``duration`` s (different offsets into the source), each longer by a uniform random
    part of ``--end-spread`` s when that is set."""
    spread = args.end_spread
    extra = np.random.default_rng(args.seed + 1).uniform(0, spread, k) if spread > 0 else np.zeros(k)
    lengths = [int(args.duration * RATE) + int(e * 100) * (RATE // 100) for e in extra]  # whole 10 ms: exact seconds
    src = load_source_audio(args.audio, args.duration + spread + 7.3 * k + 1, args.seed)
    hop = int(7.3 * RATE)
    # on the s16 grid: what a pcm_s16le client sends is exactly this audio (so the reference sees the same samples)
    return [(np.round(np.clip(src[(i * hop) % max(src.size - n, 1):][:n], -1, 32767 / 32768) * 32768) / 32768)
            .astype(np.float32) for i, n in enumerate(lengths)]


def words_diff(got: str, ref: str) -> tuple[int, int]:
    """(duplicated = extra words, lost = missing words) of got vs ref."""
    a, b = ref.split(), got.split()
    dup = lost = 0
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op in ("replace", "delete"):
            lost += i2 - i1
        if op in ("replace", "insert"):
            dup += j2 - j1
    return dup, lost


class GPUSampler:
    """GPU utilisation (%) sampled every 0.25 s with nvidia-smi (or torch.cuda.utilization)."""

    def __init__(self, device: str):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self.enabled = device == "cuda"
        self._thread = threading.Thread(target=self._run, daemon=True) if self.enabled else None

    def _read(self):
        if shutil.which("nvidia-smi"):
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
                                 capture_output=True, text=True, timeout=5).stdout.strip().splitlines()
            return float(out[0]) if out else None
        import torch

        return float(torch.cuda.utilization())

    def _run(self):
        while not self._stop.wait(0.25):
            try:
                v = self._read()
            except Exception:
                return
            if v is not None:
                self.samples.append(v)

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join(2)

    def summary(self):
        if not self.samples:
            return None
        a = np.asarray(self.samples)
        return {"mean": round(float(a.mean()), 1), "p95": round(float(np.percentile(a, 95)), 1),
                "max": round(float(a.max()), 1), "n": int(a.size)}


def cache_aware_state(args, mode: str) -> str | None:
    """How a cache-aware run keeps its state: "batched", "per-stream" or "pooled" (None for buffered)."""
    if mode != "cache_aware":
        return None
    if getattr(args, "pooled", False):
        return "pooled"
    state = getattr(args, "state", "auto")
    return "batched" if state == "auto" else state


def reference_texts(model, mode, params: dict, audios, max_batch: int = 64) -> list[str]:
    """Each audio streamed alone through the same mode (batched == alone, exactly). ``mode``: a name, or the mode
    object of the timed run (its engine, front end and CUDA graphs: the references also warm them up)."""
    from ..streaming.session import stream_tokens

    toks = stream_tokens(model, audios, mode, max_batch=max_batch, **params)
    return [_detok(model, [t.id for t in ts]) for ts in toks]


def _streamable_features(model, mode: str) -> bool:
    """Cache-aware mode with a per-feature-normalised model (v3): normalisation over "the audio so far" depends on
    arrival timing, so streamed != alone. Cache-aware models use unnormalised features (NeMo); do the same here so
    the figures measure the engine and the transcripts can be checked. Returns True if changed."""
    if mode.replace("-", "_") == "cache_aware" and model.cfg.preprocessor.normalize:
        model.cfg.preprocessor.normalize = None
        return True
    return False


def _jsonable_params(params: dict) -> dict:
    out = {k: v for k, v in params.items() if k != "engine"}
    if "params" in out and hasattr(out["params"], "to_dict"):
        out["params"] = out["params"].to_dict()
    return out


def _detok(model, ids) -> str:
    tok = getattr(model, "tokenizer", None)
    return tok.decode(ids).strip() if tok is not None else " ".join(map(str, ids))


# ----------------------------------------------------------------------------------------------- in-process
def _tick_up(t: float, tick: float) -> float:
    return t if tick <= 0 else np.ceil(t / tick) * tick


def run_in_process(*args, **kwargs) -> dict:
    import torch

    try:
        with torch.no_grad():  # scoped: a global set_grad_enabled would leak into the caller (e.g. tests)
            return _run_in_process(*args, **kwargs)
    finally:
        gc.unfreeze()  # _run_in_process froze what it had built before its clock (a no-op otherwise)


def _run_in_process(model, args, k: int, mode: str, params: dict, chunk_s: float, mode_obj=None) -> dict:
    from ..streaming.scheduler import SchedulerConfig, StreamScheduler
    from ..streaming.session import Recognizer

    audios = stream_audios(args, k)
    state = cache_aware_state(args, mode)
    if mode_obj is None and state == "batched":
        from ..streaming.batched_cache_aware import BatchedCacheAwareMode

        mode_obj = BatchedCacheAwareMode(model, capacity=k, **params)
    if mode_obj is not None:  # run_load shares it with the reference pass (warm CUDA graphs)
        rec = Recognizer(model, mode_obj)
    elif state == "pooled":
        from ..streaming.scheduler import pooled_cache_aware_mode

        rec = Recognizer(model, pooled_cache_aware_mode(model, capacity=k, **params))
    else:
        rec = Recognizer(model, mode, **params)
    sched = StreamScheduler(rec, SchedulerConfig(max_streams=k, max_batch=args.max_batch, idle_timeout=None,
                                                 max_buffer_seconds=max(30.0, 4 * chunk_s),
                                                 batch_wait=args.batch_wait_ms / 1000))
    frame = int(args.frame_ms / 1000 * RATE)
    rng = np.random.default_rng(args.seed)
    start_spread = getattr(args, "start_spread", 0.0) or 0.0
    offsets = rng.uniform(0, max(chunk_s, start_spread), k)
    n_frames = [int(np.ceil(a.size / frame)) for a in audios]
    streams = [sched.open() for _ in range(k)]
    committed = [[] for _ in range(k)]
    errors: list[str] = []
    refused_pushes = 0
    gpu = GPUSampler(args.device)
    # the send schedule before the clock starts (K x frames tuples: seconds at K = 1,000, which would otherwise
    # arrive as a burst)
    # send times rounded up to the client tick: one wake-up of this thread per tick, not one per frame (with K x 10
    # frames a second, per-frame wake-ups would take the GIL from the scheduler thousands of times a second); audio
    # is never sent early, and latency counts from when the scheduler received it
    tick = getattr(args, "send_tick_ms", 10.0) / 1000
    pending = sorted((_tick_up(offsets[i] + j * args.frame_ms / 1000, tick), i, j)
                     for i in range(k) for j in range(n_frames[i]))
    # everything built so far (model, audio, the send schedule: K x frames tuples) is long-lived: out of the
    # collector's reach, so a full collection during the run does not walk it (a pause in every thread)
    gc.collect()
    gc.freeze()
    sched.start()
    t0 = time.monotonic() + 0.2
    if getattr(args, "barrier", None):  # --processes: every worker starts its streams at the same moment
        t0 = _wait_barrier(args.barrier)
    sent = [0] * k
    with gpu:
        backlog: list = []
        deadline_total = t0 + args.duration + start_spread + args.end_spread + chunk_s + args.drain_timeout
        for when, i, j in pending:
            delay = t0 + when - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            piece = audios[i][j * frame:(j + 1) * frame]
            # a stream whose buffer is full keeps its audio and retries (backpressure; nothing dropped)
            backlog = [(bi, bp) for bi, bp in backlog if not streams[bi].push(bp, block=False)]
            if not streams[i].push(piece, block=False):
                refused_pushes += 1
                backlog.append((i, piece))
            sent[i] += piece.size
            if j == n_frames[i] - 1 and not any(bi == i for bi, _ in backlog):
                streams[i].end()
            if time.monotonic() > deadline_total:
                errors.append("timeout while sending")
                break
        while backlog and time.monotonic() < deadline_total:
            backlog = [(bi, bp) for bi, bp in backlog if not streams[bi].push(bp, block=True, timeout=1)]
        for st in streams:
            st.end()
        audio_end_wall = time.monotonic()
        for i, st in enumerate(streams):
            left = max(0.1, deadline_total - time.monotonic())
            for ev in st.events(timeout=left):
                if getattr(ev, "code", None):
                    errors.append(f"stream {i}: {ev.code}: {ev.message}")
                else:
                    committed[i].extend(t.id for t in ev.committed)
            if not st.done:
                errors.append(f"stream {i}: no final within the drain timeout")
        drain_s = time.monotonic() - audio_end_wall
    received = [getattr(st.session.state, "received", None) if st.session is not None else None for st in streams]
    sched.stop(drain=False)
    if getattr(args, "latency_dump", None):
        np.save(args.latency_dump, np.asarray(sched.stats.event_latency, dtype=np.float64) * 1000.0)
    stats = sched.stats.summary()
    lat = percentiles_ms(list(sched.stats.event_latency))
    step = percentiles_ms(list(sched.stats.step_seconds))
    lost_audio = sum(abs(s - r) for s, r in zip(sent, received) if r is not None) / RATE
    texts = [_detok(model, ids) for ids in committed]
    return {"audios": audios, "texts": texts, "errors": errors, "latency": lat, "step_latency": step,
            "lost_audio_seconds": lost_audio, "gpu_utilization": gpu.summary(), "drain_seconds": round(drain_s, 3),
            "refused_pushes": refused_pushes, "scheduler": stats,
            "sent_seconds": sum(sent) / RATE}


# ----------------------------------------------------------------------------------------------- server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, mode: str, params: dict, max_sessions: int, wait: bool = True):
    """Our own server process on 127.0.0.1 (the app of ``trt-asr serve`` with these mode params)."""
    port = _free_port()
    spec = {"model": args.model, "device": args.device, "dtype": args.dtype, "mode": mode, "params": params,
            "engine": getattr(args, "engine", "torch"), "kv_cache": getattr(args, "kv_cache", "layer_input"),
            "compile_mode": getattr(args, "compile_mode", None),
            "state": cache_aware_state(args, mode) or "auto",
            "port": port, "max_sessions": max_sessions, "batching": args.server_batching,
            "dispatch": getattr(args, "caption_dispatch", "shared"),
            "max_batch": args.max_batch, "workers": getattr(args, "server_workers", 1),
            "engines": getattr(args, "server_engines", 0),
            "batch_wait_ms": getattr(args, "batch_wait_ms", 0.0)}
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"trt_asr_bench_server_{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", "from trt_asr.cli.bench import _serve_main; _serve_main()",
                             json.dumps(spec)], stdout=log, stderr=subprocess.STDOUT)
    url = f"ws://127.0.0.1:{port}/v1/stream"
    if wait:
        _wait_healthy(proc, url, log.name)
    return proc, url, log.name


def _wait_healthy(proc, url: str, log_name: str) -> None:
    """Until /health answers and, with --server-workers, says every worker is up."""
    import httpx

    port = int(url.split(":")[2].split("/")[0])
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_name}")
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            body = r.json() if r.status_code == 200 else {}
            if r.status_code == 200 and body.get("workers_ready", 1) >= body.get("workers", 1):
                return
        except Exception:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start within 600 s")


def _serve_main() -> None:
    spec = json.loads(sys.argv[1])
    from ..serving.runner import serve_app, serve_workers

    workers, engines = int(spec.get("workers", 1)), int(spec.get("engines", 0))
    if workers == 1 and not engines:
        serve_app(_bench_app(spec), port=spec["port"], drain_timeout=10.0)
    else:
        # compiled on CUDA: the first process compiles and autotunes alone, the others load its kernels (same numerics)
        first_alone = bool(spec.get("compile_mode")) and str(spec.get("device") or "").startswith("cuda")
        sys.exit(serve_workers(_bench_app, (spec,), workers, port=spec["port"], max_sessions=spec["max_sessions"],
                               drain_timeout=10.0, engines=engines, engine_build=_bench_engine, engine_args=(spec,),
                               first_alone=first_alone))


def _bench_engine(spec: dict):
    """An engine process of --server-engines: the service of ``_bench_app`` (model, compiled engine, scheduler,
    warm-up) served to the front-ends."""
    from ..serving.shared_engine import EngineHost

    return EngineHost(_bench_service(spec))


def _bench_app(spec: dict, admission=None, health=None, remote=None):
    """The app of ``trt-asr serve`` with the load tool's engine options (one per worker with --server-workers; with
    --server-engines a front-end of the engine processes)."""
    from ..serving.app import Limits, create_app

    if remote is not None:
        from ..captions.service import CaptionService
        from ..serving.shared_engine import RemoteCaptionPool

        pool = RemoteCaptionPool(remote)
        svc = CaptionService(pool.model, spec["mode"].replace("_", "-"), pool.params, commit="engine",
                             endpoint_ms=None, pool=pool)
        health = pool.health(health)
    else:
        svc = _bench_service(spec)
    return create_app(svc, None, Limits(max_sessions=spec["max_sessions"]), admission=admission, health=health)


def _bench_service(spec: dict):
    if os.environ.get("TRT_ASR_SWITCH_INTERVAL"):  # GIL hand-off interval (experiments; CPython default 5 ms)
        sys.setswitchinterval(float(os.environ["TRT_ASR_SWITCH_INTERVAL"]))
    from ..captions.service import CaptionService
    from ..checkpoint import load_model

    model = load_model(spec["model"], device=spec["device"], dtype=spec["dtype"])
    _streamable_features(model, spec["mode"])
    if spec["model"]:
        model.name = spec["model"]
    pool = None
    if spec["batching"] != "lock":
        from ..engines import with_streaming_engine
        from ..streaming.scheduler import CaptionSchedulerPool, SchedulerConfig

        state = {"per-stream": "per-stream", "pooled": "per-stream"}.get(spec.get("state"), "auto")
        config = SchedulerConfig(max_streams=spec["max_sessions"] + 2, max_batch=spec["max_batch"], idle_timeout=None,
                                 sample_rate=model.cfg.sample_rate, batch_wait=spec.get("batch_wait_ms", 0.0) / 1000)
        params = with_streaming_engine(model, spec["mode"], spec["params"], spec.get("engine", "torch"),
                                       spec.get("kv_cache", "layer_input"), spec.get("compile_mode"))
        pool = CaptionSchedulerPool(model, spec["mode"], config, state=state, **params)
        mode = pool.recognizer.mode
        if hasattr(mode, "warmup") and model.device.type == "cuda":  # CUDA graphs of every bucket before traffic
            mode.warmup(min(spec["max_batch"], spec["max_sessions"]))
            if hasattr(mode, "reserve"):  # this process's share of the streams, as `serve` does
                share = int(spec.get("engines", 0)) or int(spec.get("workers", 1))
                mode.reserve(-(-spec["max_sessions"] // max(1, share)))
    svc = CaptionService(model, spec["mode"].replace("_", "-"),
                         {k: v for k, v in spec["params"].items() if k != "buckets"}, commit="engine", endpoint_ms=None,
                         batching="lock" if spec["batching"] == "lock" else "scheduler",
                         dispatch=spec.get("dispatch", "shared"), pool=pool)
    svc.warmup()
    return svc


async def _client(url, audio: np.ndarray, frame: int, offset: float, start, token, timeout: float, out: dict,
                  connected: asyncio.Event | None = None):
    """One client: connect and configure, report ``connected`` (set by its group when all of the group are), wait
    for the run's start time (``await start``: a future of a ``time.monotonic()`` instant), then send its frames
    from ``start + offset`` on in real time and read its events until the end event."""
    from websockets.asyncio.client import connect

    headers = {"Authorization": f"Bearer {token}"} if token else None
    # the wire bytes of every frame, made before the clock starts: the generator shares the server's machine, and
    # converting each frame as it is sent was half of its CPU time
    pcm = np.round(audio * 32768).clip(-32768, 32767).astype("<i2").tobytes()
    frames = [pcm[2 * i:2 * (i + frame)] for i in range(0, audio.size, frame)]
    send_t = [0.0] * len(frames)
    ends = [min(i + frame, audio.size) / RATE for i in range(0, audio.size, frame)]
    lat: list[float] = []
    lat_at: list[float] = []  # the audio time (s into the stream) of each latency sample
    lat_final: list[float] = []  # of the finals alone (at the end of a stream: its last chunk and the flush)
    finals: list[dict] = []
    errors: list[str] = []
    end_ev = None
    connect_s = None  # connection + config until the server's "ready"
    start_at = ready_at = ws = None
    try:
        t_connect = time.monotonic()
        try:
            ws = await connect(url, max_size=2**24, open_timeout=60, additional_headers=headers, ping_interval=None)
            await ws.send(json.dumps({"sample_rate": RATE, "encoding": "pcm_s16le", "channels": 1,
                                      "options": {"vad": False}}))
            first = json.loads(await asyncio.wait_for(ws.recv(), 60))
            ready_at = time.monotonic()
            connect_s = ready_at - t_connect
        finally:
            if connected is not None:
                connected.set()
        start_at = await start + offset
        if first.get("type") != "ready":
            errors.append(f"{first.get('code')}: {first.get('message')}")
            out.update(lat=lat, finals=finals, errors=errors, end=None, sent=0.0, connect_s=connect_s,
                       ready_at=ready_at)
            await ws.close()
            return
        async with ws:

            async def reader():
                nonlocal end_ev
                async for msg in ws:
                    now = time.monotonic()
                    e = json.loads(msg)
                    t = e.get("type")
                    if t in ("partial", "final") and e.get("audio_end") is not None:
                        idx = bisect.bisect_left(ends, e["audio_end"] - 1e-6)
                        if idx < len(frames) and send_t[idx] > 0:
                            lat.append(now - send_t[idx])
                            lat_at.append(e["audio_end"])
                            if t == "final":
                                lat_final.append(now - send_t[idx])
                    if t == "final":
                        finals.append(e)
                    elif t == "error":
                        errors.append(f"{e.get('code')}: {e.get('message')}")
                    elif t == "end":
                        end_ev = e

            rtask = asyncio.create_task(reader())
            for i, f in enumerate(frames):
                delay = start_at + i * frame / RATE - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                send_t[i] = time.monotonic()
                await ws.send(f)
            await ws.send(json.dumps({"type": "end"}))
            try:
                await asyncio.wait_for(rtask, timeout)
            except asyncio.TimeoutError:
                errors.append("no end event within the drain timeout")
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")
        if ws is not None:
            try:
                await ws.close()
            except Exception:
                pass
    text = ""
    for f in finals:
        piece = (f.get("text") or "").strip()
        if piece:
            text = text + piece if (f.get("continues_word") and text) else (text + " " + piece).strip()
    out.update(lat=lat, lat_at=lat_at, lat_final=lat_final, text=text, errors=errors, end=end_ev,
               sent=audio.size / RATE, connect_s=connect_s, ready_at=ready_at, start_at=start_at,
               send_late=None if start_at is None else max((t - (start_at + i * frame / RATE)
                                                            for i, t in enumerate(send_t) if t > 0), default=None))


# the clients connect first; the audio starts this long after the last of them is ready (the clock of a capacity
# run measures streaming, not a burst of K handshakes: `client_start` in the summary reports those apart)
START_DELAY_S = 0.5
CONNECT_TIMEOUT_S = 120.0


class _StartGate:
    """The generator processes' rendezvous (manager proxies, so it pickles into a worker): called by a group once
    its clients are connected, it reports that to the parent and returns the common start time once posted."""

    def __init__(self, reports, start):
        self.reports, self.start = reports, start

    def __call__(self) -> float:
        self.reports.put(os.getpid())
        deadline = time.monotonic() + CONNECT_TIMEOUT_S + 30
        while time.monotonic() < deadline:
            t = self.start.value
            if t > 0:
                return t
            time.sleep(0.01)
        return time.monotonic()  # the parent is gone or stuck: start anyway (the run's own limit still holds)


def _client_group(url, audios, frame: int, offsets, token, timeout: float, limit: float,
                  gate: Callable[[], float] | None = None) -> list[dict]:
    """One load-generator loop: these clients connect, then (``gate``: when every group is connected, with the
    common start time it returns; alone: ``START_DELAY_S`` after its own clients are) each sends from that start
    plus its offset."""
    results = [dict() for _ in audios]

    async def main():
        start = asyncio.get_running_loop().create_future()
        connected = [asyncio.Event() for _ in audios]
        tasks = [asyncio.create_task(_client(url, a, frame, o, start, token, timeout, r, c))
                 for a, o, r, c in zip(audios, offsets, results, connected)]
        await asyncio.wait_for(asyncio.gather(*(c.wait() for c in connected)), CONNECT_TIMEOUT_S)
        start.set_result(await asyncio.to_thread(gate) if gate is not None else time.monotonic() + START_DELAY_S)
        await asyncio.gather(*tasks)

    try:  # uvloop where installed (the serve extra): the generator shares the machine with the server it measures
        import uvloop
    except ImportError:
        asyncio.run(asyncio.wait_for(main(), limit + CONNECT_TIMEOUT_S))
    else:
        uvloop.run(asyncio.wait_for(main(), limit + CONNECT_TIMEOUT_S))
    return results


def run_server(args, url: str, k: int, chunk_s: float) -> dict:
    audios = stream_audios(args, k)
    frame = int(args.frame_ms / 1000 * RATE)
    rng = np.random.default_rng(args.seed)
    start_spread = getattr(args, "start_spread", 0.0) or 0.0
    offsets = rng.uniform(0, max(chunk_s, start_spread), k)
    gpu = GPUSampler(args.device)
    per = max(1, int(getattr(args, "clients_per_process", 32) or 32))
    groups = [list(range(i, min(i + per, k))) for i in range(0, k, per)]
    client_timeout = args.drain_timeout + chunk_s
    limit = args.duration + start_spread + args.end_spread + chunk_s + args.drain_timeout + 60
    gc_before = _server_gc(url)
    connect_seconds = None
    with gpu:
        t_start = time.monotonic()
        if len(groups) == 1:
            results = _client_group(url, audios, frame, offsets, args.token, client_timeout, limit)
        else:  # several generator processes; CLOCK_MONOTONIC is system-wide, so one start time serves them all
            import multiprocessing
            import queue
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")
            with ctx.Manager() as manager, ProcessPoolExecutor(len(groups), mp_context=ctx) as ex:
                list(ex.map(time.sleep, [0.5] * len(groups)))  # every worker up (imports done) before connecting
                reports, start = manager.Queue(), manager.Value("d", 0.0)
                t_connect = time.monotonic()
                futures = [ex.submit(_client_group, url, [audios[i] for i in g], frame, [offsets[i] for i in g],
                                     args.token, client_timeout, limit, _StartGate(reports, start))
                           for g in groups]
                deadline = t_connect + CONNECT_TIMEOUT_S + 10
                for _ in groups:  # every group connected (or given up on: its clients report their errors)
                    try:
                        reports.get(timeout=max(0.1, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                connect_seconds = round(time.monotonic() - t_connect, 3)
                start.value = time.monotonic() + START_DELAY_S
                results = [r for f in futures for r in f.result()]
        wall = time.monotonic() - t_start
    lat = [x for r in results for x in r.get("lat", [])]
    errors = [f"stream {i}: {e}" for i, r in enumerate(results) for e in r.get("errors", [])]
    lost = 0.0
    for r in results:
        if r.get("end") is not None:
            lost += abs(r["sent"] - float(r["end"].get("audio_duration", 0.0)))
        else:
            lost += r.get("sent", 0.0)
    return {"audios": audios, "texts": [r.get("text", "") for r in results], "errors": errors,
            "latency": percentiles_ms(lat), "step_latency": None,
            "final_latency": percentiles_ms([x for r in results for x in r.get("lat_final", [])]),
            "latency_by_stream_second": _latency_by_second(results),
            "client_start": {**_client_start(results), "connect_all_s": connect_seconds},
            "lost_audio_seconds": round(lost, 3),
            "gpu_utilization": gpu.summary(), "wall_seconds": round(wall, 2),
            "sent_seconds": round(sum(a.size for a in audios) / RATE, 3),
            "server_latency": _server_side_latency(results), "server_gc": _gc_during(gc_before, _server_gc(url))}


def _client_start(results: list[dict]) -> dict:
    """How the clients' starts went: ``connect_ms``, each one's connection and config until the server's "ready";
    ``send_late_ms``, each one's largest lag of a frame behind its real-time schedule (the generator's own lag);
    ``connected_before_start``: every client that got "ready" got it before the first one's audio started;
    ``connect_all_s`` (added by the caller with several generator processes): until all K were ready."""
    conn = [r["connect_s"] for r in results if r.get("connect_s") is not None]
    late = [r["send_late"] for r in results if r.get("send_late") is not None]
    ready = [r["ready_at"] for r in results if r.get("ready_at") is not None]
    starts = [r["start_at"] for r in results if r.get("start_at") is not None]
    return {"connect_ms": percentiles_ms(conn), "send_late_ms": percentiles_ms(late),
            "connected_before_start": bool(ready and starts and max(ready) <= min(starts))}


def _latency_by_second(results: list[dict]) -> list[dict]:
    """Event latency per whole second of stream audio (0 = each stream's first second, ...): where in the streams'
    lives the slow events are (their start, when all K connect and open at once; their steady state; their end)."""
    at = np.asarray([x for r in results for x in r.get("lat_at", [])], dtype=np.float64)
    lat = np.asarray([x for r in results for x in r.get("lat", [])], dtype=np.float64) * 1000
    if not at.size or at.size != lat.size:
        return []
    sec = np.floor(np.maximum(at - 1e-6, 0)).astype(int)
    return [{"second": int(t), "n": int((sec == t).sum()),
             **{f"p{q}": round(float(np.percentile(lat[sec == t], q)), 1) for q in (50, 99)}}
            for t in np.unique(sec)]


def _server_gc(url: str) -> dict | None:
    """The server's collector pauses so far (``GET /health`` "gc"; with several workers, one worker's)."""
    import httpx

    base = url.replace("ws://", "http://").replace("wss://", "https://").split("/v1/")[0]
    try:
        body = httpx.get(f"{base}/health", timeout=2).json()
        return dict(body["gc"], worker_pid=body.get("worker_pid"))
    except Exception:
        return None


def _gc_during(before: dict | None, after: dict | None) -> dict | None:
    """Collections and pause time of one run ("scope": "run"), or the server's whole life when the two answers
    came from different workers; ``pause_ms_max`` is always the server's so far."""
    if not before or not after or before.get("worker_pid") != after.get("worker_pid"):
        return None if not after else dict(after, scope="server")
    return dict(after, scope="run",
                collections=[a - b for a, b in zip(after["collections"], before["collections"])],
                pause_ms_total=[round(a - b, 3) for a, b in zip(after["pause_ms_total"], before["pause_ms_total"])])


def _server_side_latency(results: list[dict]) -> dict:
    """The server's own view, from each stream's end event (audio arrival at the caption pipeline -> event emitted,
    per stream p50 / p95): against the clients' end-to-end figures it splits the latency into server work and
    transport + client. Summarised over streams as the median and the max of the per-stream values."""
    out = {}
    for kind in ("partial_latency_ms", "final_latency_ms"):
        for q in ("p50", "p95"):
            vals = [((r.get("end") or {}).get("stats") or {}).get(kind, {}).get(q) for r in results]
            vals = [v for v in vals if v is not None]
            if vals:
                out[f"{kind[:-3]}_{q}_ms"] = {"median": round(float(np.median(vals)), 1), "max": round(max(vals), 1)}
    return out


# ----------------------------------------------------------------------------------------------- driver
def _wait_barrier(folder: str, timeout: float = 600.0) -> float:
    """Announce this worker ready, wait for the parent's go file (its wall-clock start time); returns that
    moment on this process's monotonic clock."""
    d = Path(folder)
    (d / f"ready_{os.getpid()}").write_text("")
    deadline = time.monotonic() + timeout
    while not (d / "go").exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the other load workers did not get ready in time")
        time.sleep(0.01)
    time.sleep(0.01)  # the file is written in one call; let it land
    start_wall = float((d / "go").read_text())
    return time.monotonic() + (start_wall - time.time())


def _strip_options(argv: list[str], names: set[str]) -> list[str]:
    """argv without the given ``--name value`` / ``--name=value`` options."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if a.split("=", 1)[0] in names and "=" in a:
            continue
        out.append(a)
    return out


def run_load_processes(args, ks: list[int]) -> int:
    """``--in-process --processes P``: each K is split over P workers (``bench load --in-process`` children on
    the same GPU), started together; their raw event latencies and transcript checks are merged."""
    import tempfile

    base = _strip_options(getattr(args, "argv", sys.argv[1:]), {"--processes", "--streams", "--summary-json", "--seed", "--barrier",
                                         "--latency-dump"})
    P = args.processes
    runs = []
    for k in ks:
        parts = [k // P + (1 if i < k % P else 0) for i in range(P)]
        with tempfile.TemporaryDirectory(prefix="trt_asr_load_") as tmp:
            procs = []
            for i, kk in enumerate(parts):
                cmd = [sys.executable, "-m", "trt_asr", *base, "--streams", str(kk), "--seed", str(args.seed * 1000 + i),
                       "--summary-json", f"{tmp}/part{i}.json", "--barrier", tmp, "--latency-dump", f"{tmp}/lat{i}.npy"]
                procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/log{i}.txt", "w")))
            deadline = time.monotonic() + 900
            while len(list(Path(tmp).glob("ready_*"))) < P:
                if any(pr.poll() is not None for pr in procs) or time.monotonic() > deadline:
                    for pr in procs:
                        pr.kill()
                    logs = "\n".join(Path(f"{tmp}/log{i}.txt").read_text()[-2000:] for i in range(P))
                    print(f"error: a load worker failed before the start:\n{logs}", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            (Path(tmp) / "go.tmp").write_text(repr(time.time() + 0.5))
            os.replace(Path(tmp) / "go.tmp", Path(tmp) / "go")
            for pr in procs:
                pr.wait()
            missing = [i for i in range(P) if not Path(f"{tmp}/part{i}.json").exists()]
            if missing:
                logs = "\n".join(Path(f"{tmp}/log{i}.txt").read_text()[-2000:] for i in missing)
                print(f"error: load worker(s) {missing} wrote no summary:\n{logs}", file=sys.stderr)
                return 1
            summaries = [json.loads(Path(f"{tmp}/part{i}.json").read_text()) for i in range(P)]
            lat = np.concatenate([np.load(f"{tmp}/lat{i}.npy") for i in range(P)])
        run = _merge_runs(k, [sm["runs"][-1] for sm in summaries], lat, args, summaries[0]["latency_budget_ms"])
        runs.append(run)
        print(f"K={k:4d} ({P} processes: {parts}) sustained={run['sustained']!s:5} p50={run['p50_latency_ms']} "
              f"p99={run['p99_latency_ms']} ms dup_words={run['duplicated_words']} lost_words={run['lost_words']} "
              f"errors={run['n_errors']} gpu={run['gpu_utilization']}", file=sys.stderr, flush=True)
        if not run["sustained"] and len(ks) > 1:
            break
    best = max((r for r in runs if r["sustained"]), key=lambda r: r["streams"], default=runs[0])
    summary = {**{key: v for key, v in summaries[0].items() if key != "runs"},
               "streams_sustained": best["streams_sustained"], "lost_audio_seconds": best["lost_audio_seconds"],
               "duplicated_words": best["duplicated_words"], "p50_latency_ms": best["p50_latency_ms"],
               "p99_latency_ms": best["p99_latency_ms"], "processes": P,
               "path": f"in-process, {P} worker processes sharing the GPU",
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
               "runs": runs}
    text = json.dumps(summary, indent=2)
    if args.summary_json:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_text(text + "\n")
    print(text)
    return 0 if runs and runs[0]["sustained"] else 1


def _merge_runs(k: int, parts: list[dict], lat_ms: np.ndarray, args, budget_ms: float) -> dict:
    pct = {f"p{q}": (round(float(np.percentile(lat_ms, q)), 2) if lat_ms.size else None) for q in (50, 95, 99)}
    pct.update(max=round(float(lat_ms.max()), 2) if lat_ms.size else None, n=int(lat_ms.size))
    total = {key: sum(r[key] for r in parts) for key in ("duplicated_words", "lost_words", "reference_words",
                                                          "n_errors")}
    lost_audio = sum(r["lost_audio_seconds"] for r in parts)
    gate = parts[0]["word_gate"]
    words_ok = total["duplicated_words"] + total["lost_words"] <= gate * max(total["reference_words"], 1)
    sustained = (all(r["transcripts_checked"] or args.no_check for r in parts) and total["n_errors"] == 0
                 and lost_audio < 1e-3 and pct["p99"] is not None and pct["p99"] <= budget_ms and words_ok)
    gpus = [r["gpu_utilization"]["mean"] for r in parts if r.get("gpu_utilization")]
    return {"streams": k, "sustained": sustained, "streams_sustained": k if sustained else 0,
            "processes": [{key: r[key] for key in ("streams", "p50_latency_ms", "p99_latency_ms", "step_latency_ms",
                                                   "scheduler", "seconds") if key in r} for r in parts],
            "lost_audio_seconds": round(lost_audio, 4), **total, "word_gate": gate,
            "transcripts_checked": all(r["transcripts_checked"] for r in parts),
            "p50_latency_ms": pct["p50"], "p95_latency_ms": pct["p95"], "p99_latency_ms": pct["p99"],
            "event_latency_ms": pct,
            "gpu_utilization": {"mean": round(float(np.mean(gpus)), 1) if gpus else None,
                                "note": "each worker samples the whole GPU; mean of the workers' means"},
            "errors": [e for r in parts for e in r["errors"]][:20]}


def run_load(args) -> int:
    ks = [int(x) for x in str(args.streams).split(",") if x.strip()]
    if not ks or min(ks) < 1 or max(ks) > args.max_streams:
        print(f"error: --streams must be 1..{args.max_streams}", file=sys.stderr)
        return 2
    if args.compile_mode and args.engine != "torch-cuda":
        print("error: --compile MODE is an option of the torch-cuda engine (add --engine torch-cuda)", file=sys.stderr)
        return 2
    if args.send_tick_ms < 0:
        print(f"error: --send-tick-ms must be >= 0, not {args.send_tick_ms:g}", file=sys.stderr)
        return 2
    if args.batch_wait_ms < 0:
        print(f"error: --batch-wait-ms must be >= 0, not {args.batch_wait_ms:g}", file=sys.stderr)
        return 2
    if args.server_workers < 1 or ((args.server_workers > 1 or args.server_engines) and (args.in_process or args.url)):
        print("error: --server-workers N (N >= 1) and --server-engines are for runs against our own server (no "
              "--in-process, no --url)", file=sys.stderr)
        return 2
    if args.server_engines < 0 or (args.server_engines and args.server_batching == "lock"):
        print("error: --server-engines M needs M >= 0 and the scheduler's batching", file=sys.stderr)
        return 2
    if args.processes > 1:
        if not args.in_process or min(ks) < args.processes:
            print("error: --processes P is for --in-process runs with at least P streams", file=sys.stderr)
            return 2
        return run_load_processes(args, ks)
    if args.fixed_batch is not None:
        if args.fixed_batch < 1 or (args.mode == "cache-aware"
                                    and cache_aware_state(args, "cache_aware") != "batched"):
            print("error: --fixed-batch S needs S >= 1 (and for --mode cache-aware the batched state)",
                  file=sys.stderr)
            return 2
        args.max_batch = max(args.max_batch, args.fixed_batch)
    if args.url and not args.url.startswith(("ws://127.0.0.1", "ws://localhost", "ws://[::1]")):
        print(f"note: sending load to a non-loopback server {args.url}", file=sys.stderr)
    mode, params, chunk_s = mode_params(args)
    budget_s = (args.latency_budget_ms / 1000) if args.latency_budget_ms else chunk_s
    need_model = args.in_process or not args.url or not args.no_check
    model = None
    mode_obj = None
    proc = None
    url = args.url
    server_log = None
    runs = []
    try:
        if not args.in_process and not url:  # the server loads its model while we load ours
            proc, url, server_log = start_server(args, mode, params, max(ks) + 2, wait=False)
            if args.compile_mode and str(args.device or "").startswith("cuda"):
                # but compiles first: our references then load its kernels and tuned configurations from the
                # Inductor cache instead of tuning beside it (serve_workers' first_alone says why)
                _wait_healthy(proc, url, server_log)
        if need_model and (args.model or not args.url):
            from ..checkpoint import load_model

            model = load_model(args.model, device=args.device, dtype=args.dtype)
            _streamable_features(model, mode)
            if args.engine != "torch":  # one engine (its CUDA graphs) for the references and the timed runs
                from ..engines import with_streaming_engine

                params = with_streaming_engine(model, mode, params, args.engine, args.kv_cache, args.compile_mode)
            if cache_aware_state(args, mode) == "batched":
                # one mode object for the references and every timed run: warm CUDA graphs, and the references
                # are the same mode's (GPU mel) transcripts of each stream
                from ..streaming.batched_cache_aware import BatchedCacheAwareMode

                # in-process: every slot up front (growing the pool mid-run copies all caches); server runs use
                # it only for the references
                mode_obj = BatchedCacheAwareMode(model, capacity=max(ks) if args.in_process else 64, **params)
                if model.device.type == "cuda":  # CUDA graphs and lazy kernels of every bucket, before timing
                    t_warm = time.monotonic()
                    mode_obj.warmup(min(args.max_batch, max(ks)))
                    print(f"batched cache-aware mode warmed up in {time.monotonic() - t_warm:.1f} s",
                          file=sys.stderr, flush=True)
            elif mode == "buffered" and args.in_process:
                # one mode object too: the reference pass captures its decode loops' CUDA graphs before timing
                from ..streaming.buffered import BufferedMode

                mode_obj = BufferedMode(model, **params)
                if model.device.type == "cuda":
                    mode_obj.warmup(args.max_batch)
        if proc is not None:
            _wait_healthy(proc, url, server_log)
        for k in ks:
            t0 = time.monotonic()
            refs = None
            if model is not None and not args.no_check:
                # before the timed run: also warms up the kernels of every batch size up to min(k, 64)
                refs = reference_texts(model, mode_obj or mode, {} if mode_obj else params, stream_audios(args, k),
                                       max_batch=args.max_batch if args.fixed_batch else 64)
            if args.in_process:
                r = run_in_process(model, args, k, mode, params, chunk_s, mode_obj=mode_obj)
            else:
                r = run_server(args, url, k, chunk_s)
            dup = lost_words = 0
            checked = False
            ref_words = 0
            if refs is not None:
                for got, ref in zip(r["texts"], refs):
                    ref_words += len(ref.split())
                    d, l = words_diff(got, ref)
                    dup += d
                    lost_words += l
                checked = True
            p99 = r["latency"]["p99"]
            gate = args.word_gate if args.word_gate is not None else (
                0.0 if mode == "cache_aware" or args.fixed_batch else 0.02)  # one batch shape: exact in any precision
            words_ok = (dup + lost_words) <= gate * max(ref_words, 1)
            sustained = (not r["errors"] and r["lost_audio_seconds"] < 1e-3 and p99 is not None
                         and p99 <= budget_s * 1000 and words_ok)
            run = {"streams": k, "sustained": sustained, "streams_sustained": k if sustained else 0,
                   "lost_audio_seconds": round(r["lost_audio_seconds"], 4), "duplicated_words": dup,
                   "lost_words": lost_words, "reference_words": ref_words, "word_gate": gate,
                   "transcripts_checked": checked,
                   "p50_latency_ms": r["latency"]["p50"], "p95_latency_ms": r["latency"]["p95"],
                   "p99_latency_ms": p99, "event_latency_ms": r["latency"], "step_latency_ms": r["step_latency"],
                   "gpu_utilization": r["gpu_utilization"], "errors": r["errors"][:20],
                   "n_errors": len(r["errors"]), "seconds": round(time.monotonic() - t0, 2)}
            for key in ("scheduler", "refused_pushes", "drain_seconds", "wall_seconds", "server_latency",
                        "final_latency", "latency_by_stream_second", "client_start", "server_gc"):
                if key in r:
                    run[key] = r[key]
            runs.append(run)
            print(f"K={k:4d} sustained={sustained!s:5} p50={run['p50_latency_ms']} p99={p99} ms "
                  f"lost_audio={run['lost_audio_seconds']} s dup_words={dup} lost_words={lost_words} "
                  f"errors={len(r['errors'])} gpu={r['gpu_utilization']}", file=sys.stderr, flush=True)
            _write_summary(args, runs, mode, params, budget_s, model, server_log, quiet=True)
            if not sustained and len(ks) > 1:
                break
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    _write_summary(args, runs, mode, params, budget_s, model, server_log)
    return 0 if runs and runs[0]["sustained"] or not runs else 1


def _write_summary(args, runs, mode, params, budget_s, model, server_log, quiet: bool = False) -> dict:
    """The summary (top level: the largest sustained K, else the first run); written after every K."""
    best = max((r for r in runs if r["sustained"]), key=lambda r: r["streams"], default=runs[0] if runs else {})
    import torch

    summary = {
        "streams_sustained": best.get("streams_sustained", 0),
        "lost_audio_seconds": best.get("lost_audio_seconds"),
        "duplicated_words": best.get("duplicated_words"),
        "p50_latency_ms": best.get("p50_latency_ms"),
        "p99_latency_ms": best.get("p99_latency_ms"),
        "latency_budget_ms": round(budget_s * 1000, 1),
        "path": "in-process" if args.in_process else ("server:" + (args.url or "own 127.0.0.1 server")
                                                      + f" (batching: {args.server_batching}, "
                                                      f"workers: {getattr(args, 'server_workers', 1)}, "
                                                      f"engines: {getattr(args, 'server_engines', 0)})"),
        "mode": mode, "mode_params": _jsonable_params(params), "engine": getattr(args, "engine", "torch"),
        "kv_cache": getattr(args, "kv_cache", "layer_input"), "compile": getattr(args, "compile_mode", None),
        "state": cache_aware_state(args, mode),
        "model": args.model or "default", "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else None,
        "features_normalize": (None if model is None else model.cfg.preprocessor.normalize),
        "dtype": args.dtype, "duration_s": args.duration, "end_spread_s": args.end_spread,
        "start_spread_s": args.start_spread, "frame_ms": args.frame_ms,
        "send_tick_ms": getattr(args, "send_tick_ms", None), "max_batch": args.max_batch,
        "batch_wait_ms": getattr(args, "batch_wait_ms", 0.0), "server_workers": getattr(args, "server_workers", 1),
        "server_engines": getattr(args, "server_engines", 0),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
        "runs": runs,
    }
    if server_log:
        summary["server_log"] = server_log
    text = json.dumps(summary, indent=2)
    if args.summary_json:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_text(text + "\n")
    if not quiet:
        print(text)
    return summary
