"""Issue #4: the cache-aware stream step with NeMo's layer-input attention cache vs the projected-K/V cache, side by
side in one run (torch-cuda engine, CUDA graph per batch).

    python benchmarks/projected_kv.py --out DIR_OR_FILE.json [--model random:parakeet-tdt-0.6b-v3]
        [--precisions fp16,fp32] [--chunks 2,7] [--contexts 70,256] [--batches 1,64,256,1024] [--budget-s 190]
    python benchmarks/projected_kv.py --smoke --out /tmp/pkv.json      # tiny model, tiny batches, CPU or GPU

Every shape is v3 streaming as docs/benchmarks.md and docs/capacity.md use it: ``CacheAwareParams.for_encoder(cfg,
att_context_size=[context, chunk - 1], chunk_size=chunk, allow_inexact=True)``, later chunks (pre-encode cache
included), caches full (cache_last_channel_len == C: the steady state, and the most attention work). Per (precision,
context, chunk, batch) and variant:

* ``replay_ms`` p50/p99: the captured step alone, on the engine's static buffers (what a scheduler that keeps the
  state in place pays);
* ``step_ms`` p50/p99: ``engine.step(inputs, clone=False)``, i.e. the copy of inputs and caches into the static
  buffers + the replay (what the existing streaming modes pay; the projected cache has twice the bytes to copy);
* ``audio_s_per_s`` = B x chunk seconds / step p50 (replay p50 where the step was not measured);
* ``max_abs_diff`` between the variants' encoder outputs on the same inputs (the projected caches are the
  layer-input caches through ``project_caches``), and at B <= 64 also of the next K/V caches.

A shape is skipped (and says why) where it does not fit in free GPU memory: a captured step holds about four
cache-sized buffers (static input and output, the per-layer next caches and their stack), the step one more (the
caller's inputs). A shape that fails with out-of-memory anyway (the engine's warm-up leaves its memory cached while
the graph is captured into its own pool) is recorded as skipped, and the run goes on. The run stops starting new shapes
after ``--budget-s`` seconds (default 190: < 4 min on an H100 with model building). TF32 is off (fp32 is fp32).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import sys
import time
import types
import warnings
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trt_asr.checkpoint import load_model  # noqa: E402
from trt_asr.engines.torch_cuda import DTYPES, TorchCudaEngine  # noqa: E402
from trt_asr.engines.torch_engine import project_caches  # noqa: E402
from trt_asr.streaming.cache_aware import CacheAwareParams  # noqa: E402
from trt_asr.streaming.contract import cache_io  # noqa: E402

VARIANTS = ("layer_input", "projected")
FRAME_S = 0.08  # one encoder frame (8x subsampling of 10 ms)
MARGIN = 4 << 30  # bytes kept free for activations (a layer's K/V at B=1024, fp32) and the allocator
# cache-sized buffers a captured step holds: its static input and output, and inside the graph the per-layer next
# caches and their layer-first stack (both variants; the projected one keeps each layer's [B, C+T, D] K/V instead)
GRAPH_COPIES = 4


def log(*a):
    print(*a, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters: int, warmup: int) -> tuple[float, float]:
    """p50, p99 (ms) of ``fn()``, synchronised around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    ts.sort()
    q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))] * 1e3  # noqa: E731
    return q(0.5), q(0.99)


def free_bytes(device) -> int:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 1 << 62


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def stream_params(cfg, context: int, chunk: int) -> CacheAwareParams:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # v3 is not causal: inexact streaming, measured for its cost only
        return CacheAwareParams.for_encoder(cfg.encoder, att_context_size=[context, chunk - 1], chunk_size=chunk,
                                            allow_inexact=True)


def layer_input_inputs(params, B: int, dtype, device, seed: int) -> dict[str, torch.Tensor]:
    """Seeded step inputs of a later chunk with full layer-input caches (the same for both variants)."""
    g = torch.Generator(device=device).manual_seed(seed)
    T = params.input_frames(False)
    inputs = {"audio_signal": torch.randn(B, params.feat_in, T, generator=g, device=device, dtype=dtype),
              "length": torch.full((B,), T, dtype=torch.long, device=device)}
    for name, _, shape, dt_ in cache_io(params, "layer_input", dtype):
        if dt_ == torch.int64:
            inputs[name] = torch.full((B,), params.last_channel_cache_size, dtype=torch.long, device=device)
        else:
            inputs[name] = torch.randn(B, *shape, generator=g, device=device, dtype=dtype) * 0.5
    return inputs


def run_shape(model, params, prec: str, B: int, device, iters: int, use_graphs: bool) -> list[dict]:
    """Both variants at one (precision, context, chunk, batch): timing rows + the difference between them."""
    C = params.last_channel_cache_size
    chunk_s = params.valid_out_len * FRAME_S
    rows, ref = [], {}
    for variant in VARIANTS:
        row = dict(variant=variant, precision=prec, context=C, chunk_frames=params.valid_out_len,
                   chunk_ms=round(chunk_s * 1e3), B=B, T_in=params.input_frames(False))
        per_stream = sum(torch.Size(shape).numel() * torch.empty((), dtype=dt_).element_size()
                         for _, _, shape, dt_ in cache_io(params, variant, DTYPES[prec]))
        row["cache_mib_per_stream"] = round(per_stream / 2**20, 3)
        if variant == "layer_input":  # what the projected variant does not do: K and V of the C cached frames
            row["kv_reprojection_gflop"] = round(4 * params.d_model**2 * C * params.n_layers * B / 1e9, 2)
        release(device)
        free = free_bytes(device)
        if GRAPH_COPIES * B * per_stream + MARGIN > free:
            row["skipped"] = (f"does not fit: {GRAPH_COPIES} x {B} x {per_stream / 2**20:.1f} MiB of caches, "
                              f"{free / 2**30:.1f} GiB free")
        else:
            try:
                measure(row, ref, model, params, variant, prec, B, device, iters, use_graphs, per_stream)
            except torch.cuda.OutOfMemoryError as e:  # near the limit (e.g. at capture): record it, go on
                row["skipped"] = f"out of memory: {str(e).splitlines()[0][:160]}"
        rows.append(row)
        release(device)
        if "skipped" in row:
            log(f"  {variant:11s} B={B:5d}: skipped ({row['skipped']})")
            continue
        row["audio_s_per_s"] = B * chunk_s / (row.get("step_p50_ms", row["replay_p50_ms"]) / 1e3)
        log(f"  {variant:11s} B={B:5d}: replay p50 {row['replay_p50_ms']:8.2f} p99 {row['replay_p99_ms']:8.2f} ms | "
            f"step p50 {row.get('step_p50_ms', float('nan')):8.2f} p99 {row.get('step_p99_ms', float('nan')):8.2f} ms"
            f" | {row['audio_s_per_s']:10.0f} audio-s/s" +
            (f" | max|diff| {row['max_abs_diff']:.2e}" if "max_abs_diff" in row else ""))
    return rows


def measure(row: dict, ref: dict, model, params, variant: str, prec: str, B: int, device, iters: int,
            use_graphs: bool, per_stream: int) -> None:
    """One variant at one shape into ``row``; the layer-input variant leaves its outputs in ``ref`` for the
    projected one to be compared with."""
    T, C, K = params.input_frames(False), params.last_channel_cache_size, params.last_time_cache_size
    eng = TorchCudaEngine(model, "stream", prec, device, use_graphs=use_graphs, batch_buckets=(B,),
                          params=params, kv_cache=variant, copy_model=False)
    t0 = time.perf_counter()
    graph = eng.prepare(B, T, cache_size=C, time_cache=K)
    sync(device)
    row["capture_s"] = round(time.perf_counter() - t0, 3)
    warm = 3 if B >= 256 else 10
    row["replay_p50_ms"], row["replay_p99_ms"] = timed(graph, device, iters, warm)
    # the caller's inputs: one more copy of the caches (1.5 for the projected one while it is converted)
    if B * per_stream * (1.5 if variant == "projected" else 1.0) + MARGIN > free_bytes(device):
        row["step_note"] = "step not measured: the caller's copy of the caches does not fit beside the static ones"
        return
    inputs = layer_input_inputs(params, B, eng.dtype, device, seed=B)
    if variant == "projected":
        inputs.update(project_caches(eng.encoder, inputs))
        del inputs["cache_last_channel"]
        release(device)
    out = eng.step(inputs, clone=True)
    if variant == "layer_input":
        ref["encoder_output"] = out["encoder_output"].float()
        if B <= 64:
            ref["next"] = project_caches(eng.encoder, {"cache_last_channel": out["cache_last_channel_next"],
                                                       "cache_last_time": out["cache_last_time_next"],
                                                       "cache_last_channel_len": out["cache_last_channel_next_len"]})
    elif "encoder_output" in ref:
        row["max_abs_diff"] = float((out["encoder_output"].float() - ref["encoder_output"]).abs().max())
        row["max_abs_output"] = float(ref["encoder_output"].abs().max())
        for k in ("cache_last_channel_k", "cache_last_channel_v") if "next" in ref else ():
            row[f"max_abs_diff_{k}_next"] = float((out[k + "_next"].float() - ref["next"][k].float()).abs().max())
    del out
    row["step_p50_ms"], row["step_p99_ms"] = timed(partial(eng.step, inputs, clone=False), device, iters, warm)


def gpu_model(model, prec: str, device):
    """The encoder in ``prec`` on ``device`` once, shared by the engines (copy_model=False)."""
    import copy

    enc = copy.deepcopy(model.encoder).to(device=device, dtype=DTYPES[prec]).eval()
    return types.SimpleNamespace(encoder=enc, cfg=model.cfg)


def table(rows) -> str:
    lines = ["| prec | C | chunk ms | B | variant | replay p50 / p99 ms | step p50 / p99 ms | audio-s/s | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    f = lambda r, k: f"{r[k]:.2f}" if k in r else "-"  # noqa: E731
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['precision']} | {r['context']} | {r['chunk_ms']} | {r['B']} | {r['variant']} | "
                         f"skipped: {r['skipped']} | | | |")
            continue
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
        lines.append(f"| {r['precision']} | {r['context']} | {r['chunk_ms']} | {r['B']} | {r['variant']} | "
                     f"{f(r, 'replay_p50_ms')} / {f(r, 'replay_p99_ms')} | {f(r, 'step_p50_ms')} / "
                     f"{f(r, 'step_p99_ms')} | {r['audio_s_per_s']:,.0f} | {diff} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:parakeet-tdt-0.6b-v3")
    ap.add_argument("--out", default="benchmarks/results/projected_kv.json", help="a .json file or a folder")
    ap.add_argument("--precisions", default="fp16,fp32")
    ap.add_argument("--chunks", default="2,7", help="encoder frames per chunk (80 ms each): 2 = 160 ms, 7 = 560 ms")
    ap.add_argument("--contexts", default="70,256", help="left attention context = attention cache frames C")
    ap.add_argument("--batches", default="1,64,256,1024")
    ap.add_argument("--iters", type=int, default=50, help="timed steps at B <= 64 (fewer above: 20 at 256, 10 beyond)")
    ap.add_argument("--budget-s", type=float, default=190.0, help="start no new shape after this many seconds")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="random:tiny, batches 1,3, context 8, chunks 2,4, 3 "
                                                             "iterations, fp32 (and fp16 on a GPU): checks the script")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.batches, args.contexts, args.chunks, args.iters = "random:tiny", "1,3", "8", "2,4", 3
        args.precisions = "fp16,fp32" if args.device.startswith("cuda") else "fp32"  # fp16 GEMMs crawl on CPU
    out = Path(args.out)
    if out.suffix != ".json":
        out = out / "projected_kv.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t_start = time.time()
    result = {"meta": dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           torch=torch.__version__, model=args.model, command=" ".join(sys.argv), tf32=False,
                           graphs=device.type == "cuda" and not args.no_graphs),
              "rows": [], "notes": []}
    log(result["meta"])
    model = load_model(args.model)
    log(f"model built in {time.time() - t_start:.1f}s")

    def save():
        result["elapsed_s"] = round(time.time() - t_start, 1)
        out.write_text(json.dumps(result, indent=1) + "\n")

    batches = [int(b) for b in args.batches.split(",")]
    for prec in args.precisions.split(","):
        m = gpu_model(model, prec, device)
        for context in (int(c) for c in args.contexts.split(",")):
            for chunk in (int(c) for c in args.chunks.split(",")):
                params = stream_params(model.cfg, context, chunk)
                log(f"{prec} context {context} chunk {chunk} ({chunk * 80} ms, T_in {params.input_frames(False)}):")
                for B in batches:
                    if time.time() - t_start > args.budget_s:
                        note = f"{prec} C={context} chunk={chunk} B={B}: not run (time budget {args.budget_s:.0f} s)"
                        result["notes"].append(note)
                        log("  " + note)
                        continue
                    iters = args.iters if B <= 64 else max(5, args.iters * 2 // 5) if B <= 256 else \
                        max(5, args.iters // 5)
                    try:
                        result["rows"] += run_shape(m, params, prec, B, device, iters,
                                                    use_graphs=not args.no_graphs and device.type == "cuda")
                    except torch.cuda.OutOfMemoryError as e:  # estimate was optimistic: record it, go on
                        result["notes"].append(f"{prec} C={context} chunk={chunk} B={B}: out of memory ({e})"[:300])
                        log("  OOM:", result["notes"][-1])
                    release(device)
                    save()
        del m
        release(device)
    save()
    md = table(result["rows"])
    out.with_suffix(".md").write_text(f"# Projected K/V cache vs layer-input cache\n\n{json.dumps(result['meta'])}\n\n"
                                      f"{md}\n\n" + "".join(f"- {n}\n" for n in result["notes"]))
    log(md)
    log(f"total {time.time() - t_start:.1f}s -> {out}")


if __name__ == "__main__":
    main()
