"""Where the GPU time goes: CUDA kernel time by kernel and by category for the v3 cache-aware stream step and the
offline encoder pass (torch.profiler, eager and compiled). It answers "which kernels to make cheaper", not "how
fast": the timings in docs/benchmarks.md come from bench_gpu.py / projected_kv.py / load_capacity.py.

    python benchmarks/profile_kernels.py --out DIR [--stream 'fp16:1024:2,fp32:256:2'] [--offline bf16-autocast,compile]
    python benchmarks/profile_kernels.py --smoke --out /tmp/prof       # tiny model, CPU or GPU

Stream shapes are ``precision:B:chunk_frames`` (later chunks, caches full, context 70, as projected_kv.py). Per
section: wall ms of one call (median of 5, synchronised), CUDA ms in the profile, top kernels and a category table
(gemm / attention / conv / copy+cat / norm / elementwise / other), written to DIR/profile.md and DIR/profile.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import re
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from trt_asr.checkpoint import load_model  # noqa: E402
from trt_asr.engines.torch_cuda import DTYPES  # noqa: E402
from trt_asr.engines.torch_engine import TorchEncoderEngine, project_caches  # noqa: E402

CATEGORIES = [  # first match wins; kernel names of cuBLAS/cuDNN/flash/triton/aten
    ("attention", r"fmha|flash|attention|softmax"),
    ("gemm", r"gemm|sm90_xmma|cutlass|nvjet|ampere_.*(s|h)\d+gemm|matmul|splitk|Kernel2"),
    ("conv", r"conv|implicit|winograd|dgrad|wgrad|fprop"),
    ("copy+cat", r"copy|cat|CatArray|index|gather|scatter|fill|memcpy|memset"),
    ("norm", r"norm|welford"),
    ("elementwise", r"elementwise|vectorized|unrolled|triton_|reduce|silu|glu|where|masked"),
]


def category(name: str) -> str:
    for cat, pat in CATEGORIES:
        if re.search(pat, name, re.IGNORECASE):
            return cat
    return "other"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_ms(fn, n=5) -> float:
    fn()
    sync()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]


def profile(name: str, fn, top: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ms = wall_ms(fn)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=acts) as prof:
        fn()
        sync()
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "self_cuda_time_total", 0)
        if torch.cuda.is_available() and e.device_type.name != "CUDA":
            continue
        if not torch.cuda.is_available():
            dev_us = e.self_cpu_time_total
        if dev_us > 0:
            rows.append({"kernel": e.key[:140], "ms": dev_us / 1e3, "calls": e.count, "category": category(e.key)})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    cats: dict[str, float] = {}
    for r in rows:
        cats[r["category"]] = cats.get(r["category"], 0.0) + r["ms"]
    print(f"\n== {name}: wall {ms:.2f} ms, device {total:.2f} ms in {sum(r['calls'] for r in rows)} kernels", flush=True)
    for c, v in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"   {c:12s} {v:9.2f} ms {100 * v / max(total, 1e-9):5.1f} %")
    for r in rows[:top]:
        print(f"   {r['ms']:9.3f} ms {r['calls']:6d}x [{r['category']}] {r['kernel']}")
    return {"name": name, "wall_ms": ms, "device_ms": total, "categories": cats, "top": rows[:top]}


def stream_section(model, prec: str, B: int, chunk: int, variant: str, device, top: int) -> dict:
    from projected_kv import layer_input_inputs, stream_params

    params = stream_params(model.cfg, 70, chunk)
    enc = copy.deepcopy(model.encoder).to(device=device, dtype=DTYPES[prec]).eval()
    eng = TorchEncoderEngine(types.SimpleNamespace(encoder=enc), "stream", params, check=False, kv_cache=variant)
    inputs = layer_input_inputs(params, B, DTYPES[prec], device, seed=B)
    if variant == "projected":
        inputs.update(project_caches(enc, inputs))
        del inputs["cache_last_channel"]
    with torch.inference_mode():
        res = profile(f"stream {prec} B={B} chunk={chunk} ({chunk * 80} ms) {variant}", lambda: eng.step(inputs), top)
    res.update(kind="stream", precision=prec, B=B, chunk_frames=chunk, variant=variant)
    return res


def offline_sections(model, variants: list[str], device, n_utts: int, top: int) -> list[dict]:
    from bench_gpu import make_audio

    audio, lengths = make_audio(n_utts)
    m = copy.deepcopy(model).to(device).eval()
    a, lens = audio.to(device), lengths.to(device)
    with torch.inference_mode():
        feats, flen = m.features(a, lens)
    out = []
    for var in variants:
        enc = m.encoder
        if var == "bf16-weights":
            enc = copy.deepcopy(m.encoder).to(torch.bfloat16)
        fn_enc = torch.compile(enc) if "compile" in var else enc
        use_autocast = "autocast" in var

        def run(fn_enc=fn_enc, use_autocast=use_autocast, var=var):
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=use_autocast):
                f = feats.to(torch.bfloat16) if var == "bf16-weights" else feats
                return fn_enc(f, flen)

        t0 = time.perf_counter()
        run()
        sync()
        print(f"[{var}] first call {time.perf_counter() - t0:.1f} s", flush=True)
        res = profile(f"offline encoder {var} B={n_utts} ({float(lengths.sum()) / 16000:.0f} s audio)", run, top)
        res.update(kind="offline", variant=var, audio_s=float(lengths.sum()) / 16000)
        out.append(res)
    return out


def pipeline_sections(model, variants: list[str], device, n_utts: int, top: int) -> list[dict]:
    """The whole offline pass as bench_gpu.py times it (front end, encoder, graph greedy decoder; e.g.
    "autocast+compile+pipe2"): device time vs wall time says how much of the pass the GPU sits idle."""
    from bench_gpu import gpu_model, make_audio

    from trt_asr.engines.torch_cuda import TorchCudaTranscriber

    audio, lengths = make_audio(n_utts)
    a, lens = audio.to(device), lengths.to(device)
    out = []
    for var in variants:
        ac = "autocast" in var
        sub = int(var.split("pipe")[1]) if "pipe" in var else 1
        tr = TorchCudaTranscriber(gpu_model(model, "fp32" if ac else "bf16"), precision="bf16", max_batch=n_utts,
                                  max_seconds=20.5, compile_encoder="compile" in var, autocast=ac, sub_batches=sub)
        t0 = time.perf_counter()
        tr(a, lens)
        sync()
        print(f"[pipeline {var}] first call {time.perf_counter() - t0:.1f} s", flush=True)
        res = profile(f"offline pipeline bf16 {var} B={n_utts}", lambda: tr(a, lens), top)
        res.update(kind="pipeline", variant=var, audio_s=float(lengths.sum()) / 16000,
                   rtfx=float(lengths.sum()) / 16000 / (res["wall_ms"] / 1e3))
        print(f"   RTFx {res['rtfx']:.0f}; GPU idle {100 * (1 - res['device_ms'] / res['wall_ms']):.0f} % of the pass "
              f"(kernel time summed; overlapping streams can exceed the wall)", flush=True)
        out.append(res)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="random:parakeet-tdt-0.6b-v3")
    ap.add_argument("--stream", default="fp16:1024:2,fp32:256:2,fp16:1024:2:projected")
    ap.add_argument("--offline", default="bf16-autocast,bf16-autocast-compile")
    ap.add_argument("--pipeline", default="", help="whole offline passes, e.g. autocast+compile+pipe2")
    ap.add_argument("--utts", type=int, default=128)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--smoke", action="store_true", help="tiny model, small shapes")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.stream, args.utts = "random:tiny-cache-aware", "fp32:4:2,fp32:4:2:projected", 4
        args.offline = "bf16-autocast"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = load_model(args.model)
    results = []
    for spec in filter(None, args.stream.split(",")):
        prec, B, chunk, *var = spec.split(":")
        try:
            results.append(stream_section(model, prec, int(B), int(chunk), var[0] if var else "layer_input", device,
                                          args.top))
        except torch.cuda.OutOfMemoryError as e:
            print(f"{spec}: out of memory ({str(e)[:120]})", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the section's model copy and inputs are gone with its frame
    if args.offline:
        results += offline_sections(model, args.offline.split(","), device, args.utts, args.top)
    if args.pipeline and torch.cuda.is_available():
        results += pipeline_sections(model, args.pipeline.split(","), device, args.utts, args.top)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "model": args.model,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "command": " ".join(sys.argv)}
    (out / "profile.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"# Kernel profile ({meta['device']}, torch {meta['torch']}, {meta['date']})", "",
             f"`{meta['command']}`", ""]
    for r in results:
        lines += [f"## {r['name']}", "", f"wall {r['wall_ms']:.2f} ms, device {r['device_ms']:.2f} ms", "",
                  "| category | ms | % |", "|---|---|---|"]
        lines += [f"| {c} | {v:.2f} | {100 * v / max(r['device_ms'], 1e-9):.1f} |"
                  for c, v in sorted(r["categories"].items(), key=lambda kv: -kv[1])]
        lines += ["", "| ms | calls | category | kernel |", "|---|---|---|---|"]
        lines += [f"| {t['ms']:.3f} | {t['calls']} | {t['category']} | `{t['kernel']}` |" for t in r["top"]]
        lines.append("")
    (out / "profile.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
