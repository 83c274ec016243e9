"""One loaded model + streaming mode, shared by every caption stream of a process (``trt-asr serve`` / ``live``)."""

from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass, field
from typing import Callable

from .dsp import DSPConfig
from .pipeline import CaptionPipeline, PipelineOptions, ScheduledCaptionPipeline
from .recognizer import RedecodeRecognizer, SharedRecognizer, model_decoder
from .transcript import CommitPolicy

MODES = ("buffered", "cache-aware", "redecode")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a .nemo file, a model folder, a Hugging Face repo id, or "
                   "random:<preset> (default: the shipped demo model)")
    p.add_argument("--engine", default="torch", help="encoder engine: torch | torch-cuda | onnxruntime | tensorrt "
                   "(onnxruntime / tensorrt: buffered and redecode modes, through their exported window encoder)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--compile", default=None, metavar="MODE", dest="compile_mode",
                   help="--engine torch-cuda: run the encoder step through torch.compile (MODE: default, "
                   "max-autotune-no-cudagraphs, ...) before capturing its CUDA graphs")
    p.add_argument("--kv-cache", default="layer_input", choices=["layer_input", "projected", "ring"],
                   help="--engine torch-cuda, cache-aware: the attention cache, as NeMo's layer inputs, as projected "
                   "keys and values, or as the layer inputs in a ring (no cache shift per layer and step: the "
                   "fastest on an H100)")
    g = p.add_argument_group("streaming")
    g.add_argument("--mode", default="buffered", choices=MODES,
                   help="buffered (full-attention models), cache-aware (streaming-trained models), or redecode "
                   "(fallback: re-decode everything each step; short clips only)")
    g.add_argument("--att-context", default=None, metavar="L,R",
                   help="cache-aware: the attention context in encoder frames, one the model was trained with "
                   "(default: its first); a chunk is R + 1 frames of 80 ms")
    g.add_argument("--left-secs", type=float, default=10.0, help="buffered: left context")
    g.add_argument("--chunk-secs", type=float, default=1.0, help="buffered: chunk (a step every chunk)")
    g.add_argument("--right-secs", type=float, default=1.0, help="buffered: right context = revisable tail")
    g.add_argument("--commit", default="engine", choices=["engine", "fast"],
                   help="engine: commit only what the engine makes final (committed text == the mode's transcript); "
                   "fast: also commit by age / stability / at endpoints (lower final latency)")
    g.add_argument("--commit-age-ms", type=float, default=1500.0, help="fast commit: text older than this")
    g.add_argument("--commit-after-updates", type=int, default=4, help="fast commit: unchanged for this many updates")
    g.add_argument("--endpoint-ms", type=float, default=800.0,
                   help="decoder endpoint: no new tokens for this long closes a caption (0: off)")
    g.add_argument("--vad-hangover-ms", type=float, default=600.0, help="energy VAD: silence that ends an utterance")
    g.add_argument("--normalize-gain", action="store_true", help="automatic gain (changes what the model hears)")


def check_engine_args(args) -> str:
    """The engine options of ``add_model_args`` that do not fit together, as a ValueError before anything loads
    (``serve`` checks them before it starts its processes); returns the engine's name."""
    from ..engines import engine_name
    from ..streaming.cache_aware import parse_att_context

    engine = engine_name(args.engine or "torch")
    kv_cache = getattr(args, "kv_cache", None) or "layer_input"
    if engine != "torch-cuda" and (getattr(args, "compile_mode", None) or kv_cache != "layer_input"):
        raise ValueError("--compile and --kv-cache are options of --engine torch-cuda")
    if kv_cache != "layer_input" and args.mode != "cache-aware":
        raise ValueError("--kv-cache is an option of --mode cache-aware")
    if getattr(args, "att_context", None):
        if args.mode != "cache-aware":
            raise ValueError("--att-context is an option of --mode cache-aware")
        parse_att_context(args.att_context)
    if args.mode == "cache-aware" and engine not in ("torch", "torch-cuda"):
        raise ValueError(f"--mode cache-aware runs on --engine torch or torch-cuda; {engine} serves buffered "
                         "streams through its exported window encoder")
    return engine


@dataclass
class CaptionService:
    model: object
    mode: str = "buffered"
    params: dict = field(default_factory=dict)
    commit: str = "engine"
    commit_age_ms: float = 1500.0
    commit_after_updates: int = 4
    endpoint_ms: float | None = 800.0
    vad_hangover_ms: float = 600.0
    normalize_gain: bool = False
    batching: str = "scheduler"  # "scheduler": one StreamScheduler worker batches all streams; "lock": SharedRecognizer
    dispatch: str = "shared"  # with the scheduler: "shared" caption dispatcher thread, or "thread" per stream
    scheduler_config: object = None  # a StreamScheduler's SchedulerConfig (None: the pool's defaults)
    pool: object = None  # a CaptionSchedulerPool built by the caller (e.g. over a compiled engine): used as it is

    def __post_init__(self):
        self._shared = None
        self._lock = threading.Lock()
        self._offline_lock = threading.Lock()
        self._transcriber = None
        self.decode = model_decoder(self.model)
        if self.pool is not None:
            self._shared = self.pool
        elif self.mode != "redecode" and self.batching == "scheduler":
            from ..streaming.scheduler import CaptionSchedulerPool  # FIFO batches, backpressure, isolation

            self._shared = CaptionSchedulerPool(self.model, self.mode, self.scheduler_config, **self.params)
        elif self.mode != "redecode":
            self._shared = SharedRecognizer(self.model, self.mode.replace("-", "_"), **self.params)

    @classmethod
    def from_args(cls, args, pool=None) -> "CaptionService":
        """``pool``: a ``RemoteCaptionPool`` (a front-end of ``serve --engines``): the engine processes hold the
        model and the scheduler; this service only makes the caption pipelines."""
        from ..checkpoint import load_model
        from ..engines import load_engine_model, with_streaming_engine
        from ..streaming.cache_aware import parse_att_context

        if pool is not None:
            return cls(pool.model, args.mode, pool.params, args.commit, args.commit_age_ms, args.commit_after_updates,
                       args.endpoint_ms or None, args.vad_hangover_ms, args.normalize_gain, pool=pool)
        engine = check_engine_args(args)
        kv_cache = getattr(args, "kv_cache", None) or "layer_input"
        compile_mode = getattr(args, "compile_mode", None)
        # the scheduler's streaming modes take the engine beside the model (with_streaming_engine); redecode and
        # the exported engines (onnxruntime, tensorrt) wrap the model's offline encoder instead (load_engine_model)
        engine_beside = engine == "torch-cuda" and args.mode in ("buffered", "cache-aware")
        if engine == "torch" or engine_beside:
            model = load_model(args.model, device=args.device, dtype=args.dtype)
        else:
            model = load_engine_model(engine, args.model, device=args.device, dtype=args.dtype)
        params = {}
        if args.mode == "buffered":
            params = {"left_secs": args.left_secs, "chunk_secs": args.chunk_secs, "right_secs": args.right_secs}
        if getattr(args, "att_context", None):
            params["att_context_size"] = parse_att_context(args.att_context)
        fixed = getattr(args, "fixed_batch", None)  # serve: one batch shape per engine call
        if fixed:
            if args.mode == "buffered":
                params["fixed_batch"] = fixed
            elif args.mode == "cache-aware" and not model.cfg.preprocessor.normalize:
                params["buckets"] = [fixed]
            else:
                raise ValueError("--fixed-batch needs --mode buffered, or --mode cache-aware with a model whose "
                                 "features are not normalised per utterance (the batched cache-aware state)")
        config = None
        if hasattr(args, "max_sessions"):  # serve: the scheduler's bounds follow the server's
            from ..streaming.scheduler import SchedulerConfig

            config = SchedulerConfig(max_streams=args.max_sessions + 2, max_batch=max(args.max_batch, fixed or 0),
                                     batch_wait=args.batch_wait_ms / 1000, idle_timeout=None,
                                     sample_rate=model.cfg.sample_rate)
        pool = None
        if engine_beside:  # the scheduler's pool over the engine; ``params`` stay what clients are told (JSON)
            from ..streaming.scheduler import CaptionSchedulerPool

            pool = CaptionSchedulerPool(model, args.mode, config, **with_streaming_engine(
                model, args.mode, params, engine, kv_cache, compile_mode))
        return cls(model, args.mode, params, args.commit, args.commit_age_ms, args.commit_after_updates,
                   args.endpoint_ms or None, args.vad_hangover_ms, args.normalize_gain, scheduler_config=config,
                   pool=pool)

    @property
    def sample_rate(self) -> int:
        return self.model.cfg.sample_rate

    @property
    def model_name(self) -> str:
        return getattr(self.model, "name", "model")

    def policy(self) -> CommitPolicy:
        if self.mode == "redecode" or self.commit == "fast":
            return CommitPolicy(commit_age_ms=self.commit_age_ms, commit_after_updates=self.commit_after_updates)
        return CommitPolicy.strict()

    def recognizer(self):
        if self._shared is None:
            return RedecodeRecognizer(self.model, lock=self._lock)
        return self._shared.open()

    def pipeline(self, emit: Callable[[dict], None], sample_rate: int, channels: int = 1,
                 encoding: str | None = None, options: dict | None = None) -> CaptionPipeline:
        o = options or {}
        opts = PipelineOptions(
            policy=self.policy(),
            dsp=DSPConfig(sample_rate=sample_rate, channels=channels, target_rate=self.sample_rate,
                          normalize_gain=bool(o.get("normalize_gain", self.normalize_gain)),
                          vad=bool(o.get("vad", True)), vad_hangover_ms=self.vad_hangover_ms),
            decoder_endpoint_ms=self.endpoint_ms, encoding=encoding)
        rec = self.recognizer()
        if self.dispatch == "shared" and hasattr(rec, "on_events"):  # a scheduled stream: no thread of its own
            return ScheduledCaptionPipeline(rec, emit, opts, self.decode, dispatcher=self._shared.dispatcher)
        return CaptionPipeline(rec, emit, opts, self.decode)

    def warmup(self, seconds: float = 3.0, streams: int | None = None) -> float:
        """Run a throw-away stream of low noise through the recognizer so the first real steps do not pay for lazy
        initialisation (CUDA context, kernels, allocator). ``streams``: a batching mode with ``warmup`` (the
        batched cache-aware mode) also runs every batch bucket up to that many concurrent streams once, so its
        CUDA graphs are captured now and not while the first clients wait, and reserves device state for that many
        streams (``serve`` passes its share of --max-sessions on CUDA). Returns the seconds it took."""
        import time

        import numpy as np

        t0 = time.perf_counter()
        pool = self._shared
        if getattr(pool, "remote", False):  # the engine processes warmed up themselves
            return 0.0
        mode = getattr(getattr(pool, "recognizer", None), "mode", None)
        if streams and hasattr(mode, "warmup"):
            sched = pool.scheduler
            with sched._engine_lock:  # no stream is open yet; the lock keeps the worker off the mode meanwhile
                mode.warmup(min(streams, sched.config.max_batch))
                if hasattr(mode, "reserve"):  # and slots for them all: no pool growth while streams open
                    mode.reserve(streams)
        rng = np.random.default_rng(0)
        audio = (rng.standard_normal(int(seconds * self.sample_rate)) * 0.01).astype(np.float32)
        rec = self.recognizer()
        step = self.sample_rate // 4
        for i in range(0, audio.size, step):
            rec.feed(audio[i:i + step])
        rec.finish()
        return time.perf_counter() - t0

    def transcribe_offline(self, audio):
        """One clip, full attention (POST /v1/audio/transcriptions): a ``trt_asr.transcribe.Transcript``. On an
        engine process when this is a front-end of ``serve --engines``."""
        remote = getattr(self._shared, "transcribe", None)
        if remote is not None:
            return remote(audio)
        from ..transcribe import Transcriber

        with self._offline_lock:
            if self._transcriber is None:
                self._transcriber = Transcriber(self.model)
            return self._transcriber.transcribe_arrays([audio], ["upload"])[0]

    def info(self) -> dict:
        return {"model": self.model_name, "mode": self.mode, "params": self.params, "commit": self.commit,
                "sample_rate": self.sample_rate}
