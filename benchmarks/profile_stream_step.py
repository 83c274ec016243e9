"""Where one whole cache-aware scheduler step goes on the GPU: ``BatchedCacheAwareMode.step`` (batched mel, pool
gather, engine, greedy decode block, pool scatter, token copy) as the load tool builds it (torch-cuda, in-place
caches, one batch bucket, optionally ``torch.compile``), profiled with torch.profiler. Complements
``profile_kernels.py`` (the engine alone, eager): this is the step the capacity runs time.

    python benchmarks/profile_stream_step.py --out DIR [--batch 512] [--compile default] [--kv-cache layer_input]
    python benchmarks/profile_stream_step.py --smoke --out /tmp/prof      # tiny model on the CPU

Writes DIR/step_profile.md and DIR/step_profile.json: wall ms per step (synchronised, median), engine-only wall ms
(the same graph replayed on the step's inputs), and device ms by category and by kernel.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_kernels import category  # noqa: E402
from trt_asr.streaming.contract import KV_CACHE_VARIANTS  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(args):
    from trt_asr.checkpoint import load_model
    from trt_asr.cli.bench import _streamable_features
    from trt_asr.engines import with_streaming_engine
    from trt_asr.streaming.batched_cache_aware import BatchedCacheAwareMode

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    _streamable_features(model, "cache_aware")  # as the load tool: unnormalised features (NeMo's cache-aware models)
    frames = max(1, int(round(args.chunk_ms / 80.0)))
    params = {"chunk_size": frames, "att_context_size": [args.left_frames, frames - 1], "allow_inexact": True,
              "buckets": [args.batch]}
    if args.engine == "torch-cuda":
        params = with_streaming_engine(model, "cache_aware", params, "torch-cuda", kv_cache=args.kv_cache,
                                       compile_mode=args.compile or None)
    mode = BatchedCacheAwareMode(model, capacity=args.batch, **params)
    t = time.perf_counter()
    mode.warmup(args.batch)
    sync()
    return model, mode, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="random:parakeet-tdt-0.6b-v3")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--engine", default="torch-cuda", choices=["torch-cuda", "torch"])
    ap.add_argument("--compile", default="default", help="torch.compile mode of the engine step ('' = eager)")
    ap.add_argument("--kv-cache", default="layer_input", choices=KV_CACHE_VARIANTS)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--chunk-ms", type=float, default=160)
    ap.add_argument("--left-frames", type=int, default=70)
    ap.add_argument("--steps", type=int, default=10, help="profiled steps (after as many untimed ones)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, small batch")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.dtype, args.engine, args.batch, args.steps = (
            "random:tiny-cache-aware", "cpu", "fp32", "torch", 4, 2)
        args.compile = ""  # the reference engine is not compiled
    torch.set_grad_enabled(False)
    model, mode, warm_s = build(args)
    print(f"built + warmed in {warm_s:.1f} s", flush=True)

    B = args.batch
    seconds = (2 * args.steps + 4) * args.chunk_ms / 1000 + 1.0
    rng = np.random.default_rng(0)
    streams = [mode.new_stream() for _ in range(B)]
    for s in streams:
        mode.push(s, (0.1 * rng.standard_normal(int(seconds * mode.sample_rate))).astype(np.float32))

    def one_step():
        ready = [s for s in streams if mode.ready(s)]
        assert len(ready) == B, f"only {len(ready)} of {B} streams ready"
        mode.step(ready)

    walls = []
    for _ in range(args.steps):  # first chunks (another shape) and the warm part
        one_step()
    for _ in range(args.steps):
        sync()
        t = time.perf_counter()
        one_step()
        sync()
        walls.append((time.perf_counter() - t) * 1e3)
    # the engine alone on a later-chunk input of this batch (the graph the step replays)
    eng = mode.engine
    p = mode.params
    frames_in = mode.pre[1] + mode.chunk[1]
    inputs = {"audio_signal": torch.zeros(B, p.feat_in, frames_in, device=mode.device, dtype=model.dtype),
              "length": torch.full((B,), frames_in, dtype=torch.long, device=mode.device)}
    st = mode.pool.gather([s.slot for s in streams])
    inputs.update({name: st[name].clone() for name, _, _, _ in mode.cache_io})
    kw = mode._engine_kw
    eng_walls = []
    for i in range(args.steps + 3):
        sync()
        t = time.perf_counter()
        eng.step(inputs, **kw)
        sync()
        if i >= 3:
            eng_walls.append((time.perf_counter() - t) * 1e3)

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            one_step()
        sync()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if torch.cuda.is_available():
            if e.device_type.name != "CUDA":
                continue
        else:
            us = e.self_cpu_time_total
        if us > 0:
            rows.append({"kernel": e.key[:140], "ms_per_step": us / 1e3 / 3, "calls_per_step": e.count / 3,
                         "category": category(e.key)})
    rows.sort(key=lambda r: -r["ms_per_step"])
    cats: dict[str, float] = {}
    for r in rows:
        cats[r["category"]] = cats.get(r["category"], 0.0) + r["ms_per_step"]
    total = sum(cats.values())
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    res = {"device": dev, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "command": " ".join(sys.argv), "batch": B, "model": args.model,
           "dtype": args.dtype, "compile": args.compile, "kv_cache": args.kv_cache, "warmup_s": warm_s,
           "step_wall_ms": float(np.median(walls)), "engine_wall_ms": float(np.median(eng_walls)),
           "device_ms_per_step": total, "categories": cats, "top": rows[:args.top]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_profile.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Whole batched cache-aware step ({dev}, torch {torch.__version__}, {res['date']})", "",
             f"`{res['command']}`", "",
             f"B={B}, {args.dtype}, compile={args.compile or 'no'}, kv_cache={args.kv_cache}: step wall "
             f"{res['step_wall_ms']:.2f} ms (median of {len(walls)}), engine alone {res['engine_wall_ms']:.2f} ms, "
             f"device {total:.2f} ms per step", "", "| category | ms/step | % |", "|---|---|---|"]
    lines += [f"| {c} | {v:.2f} | {100 * v / max(total, 1e-9):.1f} |" for c, v in sorted(cats.items(),
                                                                                       key=lambda kv: -kv[1])]
    lines += ["", "| ms/step | calls/step | category | kernel |", "|---|---|---|---|"]
    lines += [f"| {r['ms_per_step']:.3f} | {r['calls_per_step']:.0f} | {r['category']} | `{r['kernel']}` |"
              for r in rows[:args.top]]
    (out / "step_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
