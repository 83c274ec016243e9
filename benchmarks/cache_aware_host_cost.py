"""Host cost of one cache-aware step per streaming mode, on the CPU: B streams each get one chunk of audio
(``push``) and ONE ``mode.step`` runs them all; repeated, timed.

    python benchmarks/cache_aware_host_cost.py --model random:tiny-cache-aware --batches 64,256,1024

Modes: ``plain`` (CacheAwareMode: per-stream CPU mel, torch.cat of caches, decoder state stack/select),
``pooled`` (scheduler.pooled_cache_aware_mode: SlotPool state, per-stream mel), ``batched``
(BatchedCacheAwareMode: batched mel, pooled state, masked greedy loop, one D2H). ``--engine null`` replaces the
encoder by one that returns zeros of the right shapes, so what is left is the mode's own cost (front end, chunk
assembly, state, greedy loop, per-stream Python) -- on a GPU that part is what bounds the streams per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


class NullEngine:
    """Encoder outputs of the right shapes at (almost) no cost: zeros, lengths from the formula, caches passed on."""

    name, mode, precision = "null", "stream", "fp32"

    def __init__(self, model, params):
        self.p, self.device, self.dtype = params, model.device, model.dtype

    def step(self, inputs):
        p, x = self.p, inputs["audio_signal"]
        first = p.is_first_chunk(x.shape[-1])
        t = p.encoder_frames(x.shape[-1], first)
        return {"encoder_output": torch.zeros(x.shape[0], p.d_model, t, dtype=self.dtype),
                "encoded_lengths": p.encoder_frames(inputs["length"], first),
                "cache_last_channel_next": inputs["cache_last_channel"],
                "cache_last_time_next": inputs["cache_last_time"],
                "cache_last_channel_next_len": inputs["cache_last_channel_len"]}


def make_mode(kind: str, model, engine: str, capacity: int):
    from trt_asr.streaming.batched_cache_aware import BatchedCacheAwareMode
    from trt_asr.streaming.cache_aware import CacheAwareMode, CacheAwareParams
    from trt_asr.streaming.scheduler import pooled_cache_aware_mode

    params = CacheAwareParams.for_encoder(model.cfg.encoder)
    kw = {"params": params}
    if engine == "null":
        kw["engine"] = NullEngine(model, params)
    if kind == "plain":
        return CacheAwareMode(model, **kw)
    if kind == "pooled":
        return pooled_cache_aware_mode(model, capacity=capacity, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512,
                                                                           1024, 2048), **kw)
    return BatchedCacheAwareMode(model, capacity=capacity, **kw)


def measure(kind: str, model, b: int, engine: str, steps: int, seed: int = 0) -> dict:
    mode = make_mode(kind, model, engine, b)
    chunk = mode.params.chunk_size[1] * model.preprocessor.featurizer.hop
    rng = np.random.default_rng(seed)
    audio = torch.from_numpy((rng.standard_normal(chunk * (steps + 4)) * 0.1).astype(np.float32))
    states = [mode.new_stream() for _ in range(b)]
    pos = 0
    python_s = []  # batched mode: its per-stream Python (staging rows, committing tokens), timed apart
    for name in ("_stage_rows", "_commit_host"):
        if hasattr(mode, name):
            def timed(*a, _f=getattr(mode, name)):
                t = time.perf_counter()
                r = _f(*a)
                python_s.append(time.perf_counter() - t)
                return r
            setattr(mode, name, timed)

    def cycle():
        nonlocal pos
        piece = audio[pos:pos + chunk]
        pos += chunk
        t0 = time.perf_counter()
        for s in states:
            mode.push(s, piece)
        t1 = time.perf_counter()
        ready = [s for s in states if mode.ready(s)]
        if ready:
            mode.step(ready)
        return t1 - t0, time.perf_counter() - t1, len(ready)

    with torch.no_grad():
        for _ in range(3):  # first chunks, then later ones; warm
            cycle()
        push, step = [], []
        python_s.clear()
        for _ in range(steps):
            a, c, n = cycle()
            push.append(a)
            step.append(c)
    total = np.add(push, step)
    return {"mode": kind, "batch": b, "engine": engine, "streams_per_step": n,
            "push_ms": round(1e3 * float(np.median(push)), 2), "step_ms": round(1e3 * float(np.median(step)), 2),
            "cycle_ms": round(1e3 * float(np.median(total)), 2), "steps_per_s": round(1 / float(np.median(total)), 1),
            "us_per_stream": round(1e6 * float(np.median(total)) / b, 1),
            # host Python per step: push + (batched) staging and committing; plain/pooled: push = per-stream mel
            "python_ms": round(1e3 * (float(np.median(push)) + sum(python_s) / steps), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:tiny-cache-aware")
    ap.add_argument("--batches", default="64,256,1024")
    ap.add_argument("--modes", default="plain,pooled,batched")
    ap.add_argument("--engines", default="null,torch")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from trt_asr.checkpoint import load_model

    model = load_model(args.model)
    model.cfg.preprocessor.normalize = None
    rows = []
    for engine in args.engines.split(","):
        for b in [int(x) for x in args.batches.split(",")]:
            for kind in args.modes.split(","):
                r = measure(kind, model, b, engine, args.steps)
                rows.append(r)
                print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
