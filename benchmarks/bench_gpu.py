"""GPU benchmarks in one run (issues 2-4): offline RTFx vs NeMo, B=1 step latency per engine and precision,
streaming throughput vs batch. Prints a short table last and writes JSON + Markdown to --out.

    python benchmarks/bench_gpu.py --out DIR [--model random:parakeet-tdt-0.6b-v3] [--passes 3] [--nemo]

Method (as /work/shared/reference/baselines-h100.md): random calibrated weights of the exact v3 config; synthetic
speech-like audio, 128 utterances of 10-20 s (seeded); audio already in GPU memory; RTFx = audio seconds / wall
seconds for front end + encoder + greedy TDT decoding, median over passes after a warm-up pass, synchronised.
Latency: wall time of one engine.step() at B=1 (input copy, replay, output clone, synchronize), 30 warm-ups.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trt_asr.checkpoint import load_model  # noqa: E402
from trt_asr.engines.torch_cuda import TorchCudaEngine, TorchCudaTranscriber, Timing  # noqa: E402
from trt_asr.model.calibrate import synthetic_audio  # noqa: E402

_GPU_MODELS: dict = {}


def gpu_model(model, prec):
    """The model with its encoder on the GPU in ``prec`` (cached), so engines skip their own copy."""
    import types
    if prec not in _GPU_MODELS:
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[prec]
        enc = __import__("copy").deepcopy(model.encoder).to("cuda", dtype)
        _GPU_MODELS[prec] = types.SimpleNamespace(encoder=enc.eval(), cfg=model.cfg, preprocessor=model.preprocessor,
                                                  decoder=model.decoder, joint=model.joint)
    return _GPU_MODELS[prec]


OUT_DIR: Path | None = None
RESULTS: dict = {"offline": [], "latency": [], "throughput": [], "parity": [], "notes": []}


def log(*a):
    print(*a, flush=True)


def section(fn):
    def run(*a, **k):
        t0 = time.time()
        try:
            fn(*a, **k)
        except Exception as e:  # keep going: later sections still produce numbers
            traceback.print_exc()
            RESULTS["notes"].append(f"{fn.__name__} failed: {type(e).__name__}: {e}")
        log(f"[{fn.__name__}] {time.time() - t0:.1f}s")
        if OUT_DIR is not None:
            (OUT_DIR / "bench_gpu.json").write_text(json.dumps(RESULTS, indent=1))
    return run


def make_audio(n: int, seed: int = 0, lo: float = 10.0, hi: float = 20.0, sr: int = 16000):
    g = torch.Generator().manual_seed(seed)
    secs = [lo + (hi - lo) * torch.rand(1, generator=g).item() for _ in range(n)]
    lengths = torch.tensor([int(s * sr) for s in secs])
    audio = torch.zeros(n, int(lengths.max()))
    for i, s in enumerate(secs):
        audio[i, : lengths[i]] = synthetic_audio(s, sr, g)[: lengths[i]]
    return audio, lengths


def token_error_rate(hyps, refs) -> float:
    """Label edit distance / reference labels (greedy labels of one precision vs fp32)."""
    from trt_asr.training.metrics import edit_distance

    errs = sum(edit_distance(list(r), list(h)) for h, r in zip(hyps, refs))
    total = sum(len(r) for r in refs)
    return errs / max(total, 1)


# ----------------------------------------------------------------------------------------------- offline
@section
def offline(model, audio, lengths, passes, precisions, variants):
    total_s = float(lengths.sum()) / 16000
    a, l = audio.cuda(), lengths.cuda()
    ref_tokens = None
    for prec in precisions:
        for var in variants:
            if var == "graphs" and prec != "bf16" or "autocast" in var and prec == "fp32" or \
                    var == "compile" and prec != "bf16":
                continue
            torch.cuda.empty_cache()
            t0 = time.time()
            ac = "autocast" in var
            m_pipe = re.search(r"pipe(\d+)", var)  # e.g. "autocast+compile+pipe4"
            sub = int(m_pipe.group(1)) if m_pipe else 1
            tr = TorchCudaTranscriber(gpu_model(model, "fp32" if ac else prec), precision=prec,
                                      max_batch=len(lengths), max_seconds=20.5, encoder_graphs=(var == "graphs"),
                                      compile_encoder=("compile" in var), autocast=ac, sub_batches=sub,
                                      compile_dynamic=("dyn" in var),
                                      decoder_precision="bf16" if "decbf16" in var else "fp32")
            tok = tr(a, l)  # warm-up (+ compile)
            torch.cuda.synchronize()
            setup = time.time() - t0
            times, timing = [], Timing()
            for _ in range(passes):
                torch.cuda.synchronize()
                t = time.perf_counter()
                tok = tr(a, l)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            for _ in range(passes):  # split (events add a sync per stage; kept out of the wall times above)
                tr(a, l, timing)
            lists = tok.to_lists()
            if prec == "fp32" and var == "eager":
                ref_tokens = lists
            agree = ter = None
            if ref_tokens is not None:
                agree = sum(x == y for x, y in zip(lists, ref_tokens)) / len(lists)
                ter = token_error_rate([[t[0] for t in x] for x in lists], [[t[0] for t in x] for x in ref_tokens])
            med = statistics.median(times)
            row = dict(system="trt-asr torch-cuda", precision=prec, variant=var, batch=len(lengths),
                       audio_s=total_s, passes=passes, pass_s=times, rtfx=total_s / med,
                       features_s=timing.features_s / passes, encoder_s=timing.encoder_s / passes,
                       decoder_s=timing.decoder_s / passes, setup_s=setup,
                       tokens_per_s=sum(len(x) for x in lists) / total_s, utt_tokens_equal_fp32=agree,
                       token_error_rate_vs_fp32=ter)
            RESULTS["offline"].append(row)
            log(f"offline {prec} {var}: RTFx {row['rtfx']:.0f} (pass {med*1e3:.1f} ms; feat {row['features_s']*1e3:.1f}"
                f" enc {row['encoder_s']*1e3:.1f} dec {row['decoder_s']*1e3:.1f} ms) tokens/s {row['tokens_per_s']:.1f}"
                f" agree_fp32 {agree} TER_vs_fp32 {ter}")
            # the graph decoder must give the eager decoder's tokens on the same encoder output
            if prec == "fp32" and var == "eager":
                with torch.inference_mode():
                    feats, fl = tr.preprocessor(a, l)
                    out = tr.engine.step({"audio_signal": feats, "length": fl})
                    f = tr.joint_enc(out["encoder_output"].transpose(1, 2))
                    dec_model = model.greedy_decoder()
                    model.decoder.cuda(); model.joint.cuda()
                    eager_tok, _ = dec_model(out["encoder_output"], out["encoded_lengths"])
                    graph_tok = tr.decoder(f, out["encoded_lengths"])
                    model.decoder.cpu(); model.joint.cpu()
                same = eager_tok.to_lists() == graph_tok.to_lists()
                RESULTS["parity"].append(dict(check="graph decoder == eager greedy decoder (fp32, 128 utts)",
                                              equal=same))
                log("graph decoder tokens == eager decoder tokens:", same)
            del tr


@section
def nemo_offline(model, audio, lengths, passes, precisions):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.nemo_ref import nemo_decoder, nemo_encoder, nemo_joint, nemo_preprocessor
    from nemo.collections.asr.parts.submodules.transducer_decoding.tdt_label_looping import (
        GreedyBatchedTDTLabelLoopingComputer)
    total_s = float(lengths.sum()) / 16000
    pre = nemo_preprocessor(model).cuda().eval()
    enc = nemo_encoder(model).cuda().eval()
    dec, joint = nemo_decoder(model).cuda().eval(), nemo_joint(model).cuda().eval()
    comp = GreedyBatchedTDTLabelLoopingComputer(decoder=dec, joint=joint, blank_index=model.cfg.blank_id,
                                                durations=list(model.cfg.decoding.durations),
                                                max_symbols_per_step=model.cfg.decoding.max_symbols,
                                                include_duration=True, allow_cuda_graphs=True)
    a, l = audio.cuda(), lengths.cuda()
    labels = {}
    for prec in precisions:
        def run(split=None):
            with torch.inference_mode():
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                ev[0].record()
                if prec == "fp32":
                    feats, fl = pre(input_signal=a, length=l)
                    e, el = enc(audio_signal=feats, length=fl)
                else:
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        feats, fl = pre(input_signal=a, length=l)
                        e, el = enc(audio_signal=feats, length=fl)
                ev[1].record()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=prec != "fp32"):
                    hyps, _ = comp(x=e.transpose(1, 2), out_len=el)
                ev[2].record()
                if split is not None:
                    ev[2].synchronize()
                    split[0] += ev[0].elapsed_time(ev[1]) / 1e3
                    split[1] += ev[1].elapsed_time(ev[2]) / 1e3
                return hyps
        run()
        torch.cuda.synchronize()
        times = []
        for _ in range(passes):
            torch.cuda.synchronize()
            t = time.perf_counter()
            hyps = run()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        split = [0.0, 0.0]
        for _ in range(passes):
            run(split)
        med = statistics.median(times)
        ntok = int(hyps.current_lengths.sum())
        labels[prec] = [hyps.transcript[b, : int(hyps.current_lengths[b])].tolist() for b in range(len(lengths))]
        row = dict(system="NeMo 3.0.0 (greedy_batch, CUDA graphs)", precision=prec + (" autocast" if prec != "fp32" else ""),
                   variant="nemo", batch=len(lengths), audio_s=total_s, passes=passes, pass_s=times,
                   rtfx=total_s / med, features_s=None, encoder_s=split[0] / passes, decoder_s=split[1] / passes,
                   tokens_per_s=ntok / total_s)
        RESULTS["offline"].append(row)
        log(f"NeMo {prec}: RTFx {row['rtfx']:.0f} (pass {med*1e3:.1f} ms; pre+enc {row['encoder_s']*1e3:.1f} "
            f"dec {row['decoder_s']*1e3:.1f} ms) tokens/s {row['tokens_per_s']:.1f}")
    if "fp32" in labels:
        for prec, lab in labels.items():
            if prec != "fp32":
                ter = token_error_rate(lab, labels["fp32"])
                RESULTS["parity"].append(dict(check=f"NeMo {prec} autocast vs NeMo fp32 labels (same weights, audio)",
                                              token_error_rate=ter))
                log(f"NeMo {prec} vs fp32 TER {ter:.4f}")
    del pre, enc, dec, joint, comp
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- latency
def _stream_inputs(cfg, B, T, C, K, dtype, device="cuda"):
    L, D, F = cfg.encoder.n_layers, cfg.encoder.d_model, cfg.encoder.feat_in
    return {"audio_signal": torch.randn(B, F, T, device=device, dtype=dtype),
            "length": torch.full((B,), T, dtype=torch.long, device=device),
            "cache_last_channel": torch.randn(B, L, C, D, device=device, dtype=dtype) * 0.5,
            "cache_last_time": torch.randn(B, L, D, K, device=device, dtype=dtype) * 0.5,
            "cache_last_channel_len": torch.full((B,), C, dtype=torch.long, device=device)}


def _time_steps(engine, inputs, iters, warmup=30, clone=True):
    for _ in range(warmup):
        engine.step(inputs, clone=clone)
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        engine.step(inputs, clone=clone)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    ts.sort()
    q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))] * 1e3  # noqa: E731
    return q(0.5), q(0.95), q(0.99)


@section
def latency(model, shapes, engines, iters):
    for ename, prec, graphs, *rest in engines:
        compile_mode = rest[0] if rest else None
        for sname, mode, T, C, K, params in shapes:
            t0 = time.time()
            eng = TorchCudaEngine(gpu_model(model, prec), mode, prec, "cuda", use_graphs=graphs, time_quantum=1,
                                  params=params, compile_mode=compile_mode)
            inp = _stream_inputs(model.cfg, 1, T, C, K, eng.dtype)
            if mode == "window":
                inp = {k: inp[k] for k in ("audio_signal", "length")}
            p50, p95, p99 = _time_steps(eng, inp, iters)
            RESULTS["latency"].append(dict(engine=ename, precision=prec, shape=sname, B=1, T_mel=T, cache=C,
                                           p50_ms=p50, p95_ms=p95, p99_ms=p99, setup_s=time.time() - t0))
            log(f"latency {ename} {prec} {sname}: p50 {p50:.2f} p95 {p95:.2f} p99 {p99:.2f} ms")
            del eng


def stream_params(model, enc_frames: int, cache: int = 256):
    """v3 cache-aware params for a chunk of ``enc_frames`` encoder frames (80 ms each), left context ``cache``."""
    import warnings
    from trt_asr.streaming.cache_aware import CacheAwareParams
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CacheAwareParams.for_encoder(model.cfg.encoder, att_context_size=[cache, -1], chunk_size=enc_frames,
                                            allow_inexact=True)


@section
def parity_gpu(model, T=592, C=256, K=4):
    """torch-cuda (graphs) vs torch eager fp32 on the GPU, seed shape, B=2, fresh random inputs."""
    torch.manual_seed(1)
    ref = TorchCudaEngine(gpu_model(model, "fp32"), "stream", "fp32", "cuda", use_graphs=False)
    inp = _stream_inputs(model.cfg, 2, T, C, K, torch.float32)
    r = ref.step(inp)
    del ref
    for prec in ("fp32", "fp16", "bf16"):
        eng = TorchCudaEngine(gpu_model(model, prec), "stream", prec, "cuda", use_graphs=True)
        o = eng.step({k: (v.to(eng.dtype) if v.is_floating_point() else v) for k, v in inp.items()})
        row = dict(check=f"torch-cuda {prec} graphs vs torch eager fp32 (seed shape, B=2)")
        for k in ("encoder_output", "cache_last_channel_next", "cache_last_time_next"):
            a, b = o[k].float(), r[k].float()
            row[k + "_rel"] = float((a - b).norm() / b.norm().clamp_min(1e-12))
        row["lengths_equal"] = bool(torch.equal(o["encoded_lengths"], r["encoded_lengths"]))
        RESULTS["parity"].append(row)
        log(row)
        del eng


@section
def throughput(model, batches, precs, C=256, K=4, chunk_s=0.56):
    p = stream_params(model, int(round(chunk_s / 0.08)), C)
    T = p.input_frames(False)
    for prec in precs:
        eng = TorchCudaEngine(gpu_model(model, prec), "stream", prec, "cuda", use_graphs=True, batch_buckets=batches,
                              params=p)
        for B in batches:
            torch.cuda.empty_cache()
            inp = _stream_inputs(model.cfg, B, T, C, K, eng.dtype)
            iters = 50 if B <= 64 else 20
            p50, p95, p99 = _time_steps(eng, inp, iters, warmup=5, clone=False)
            row = dict(engine="torch-cuda", precision=prec, B=B, chunk_ms=int(chunk_s * 1e3), cache=C,
                       step_p50_ms=p50, streams_realtime=B * chunk_s / (p50 / 1e3),
                       audio_s_per_s=B * chunk_s / (p50 / 1e3))
            RESULTS["throughput"].append(row)
            log(f"throughput {prec} B={B}: step {p50:.2f} ms -> {row['audio_s_per_s']:.0f} audio-s/s")
            del inp
        eng._graphs.clear()
        del eng
        torch.cuda.empty_cache()


@section
def ort_probe():
    try:
        import onnxruntime as ort
        RESULTS["notes"].append(f"onnxruntime {ort.__version__} providers: {ort.get_available_providers()}")
    except Exception as e:
        RESULTS["notes"].append(f"onnxruntime not importable: {e}")
    log(RESULTS["notes"][-1])


# ----------------------------------------------------------------------------------------------- report
def table() -> str:
    lines = ["## Offline (128 utterances, 10-20 s)", "", "| system | precision | variant | RTFx | enc s | dec s |",
             "|---|---|---|---|---|---|"]
    for r in RESULTS["offline"]:
        lines.append(f"| {r['system']} | {r['precision']} | {r['variant']} | {r['rtfx']:,.0f} | "
                     f"{r['encoder_s']:.3f} | {r['decoder_s']:.3f} |")
    lines += ["", "## Step latency B=1 (ms)", "", "| engine | precision | shape | p50 | p95 | p99 |",
              "|---|---|---|---|---|---|"]
    for r in RESULTS["latency"]:
        lines.append(f"| {r['engine']} | {r['precision']} | {r['shape']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} |")
    lines += ["", "## Streaming throughput (560 ms chunks, cache 256)", "", "| precision | B | step p50 ms | audio s/s |",
              "|---|---|---|---|"]
    for r in RESULTS["throughput"]:
        lines.append(f"| {r['precision']} | {r['B']} | {r['step_p50_ms']:.2f} | {r['audio_s_per_s']:,.0f} |")
    lines += ["", "## Parity / notes", ""] + [f"- {json.dumps(r)}" for r in RESULTS["parity"]] + \
             [f"- {n}" for n in RESULTS["notes"]]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:parakeet-tdt-0.6b-v3")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--utts", type=int, default=128)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--nemo", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of sections to skip")
    ap.add_argument("--variants", default="eager,graphs")
    ap.add_argument("--batches", default="1,4,16,64,128,256,512")
    ap.add_argument("--latency-engines", default="", help="e.g. 'torch eager:fp32,torch-cuda:fp16'")
    ap.add_argument("--latency-shapes", default="", help="substrings of shape names, e.g. 'seed,560'")
    ap.add_argument("--offline-precisions", default="fp32,bf16,fp16")
    ap.add_argument("--compile", action="store_true", help="also torch.compile variants (run last)")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    global OUT_DIR
    OUT_DIR = out
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    RESULTS["meta"] = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           gpu=torch.cuda.get_device_name(), torch=torch.__version__, model=args.model,
                           command=" ".join(sys.argv), tf32=False)
    log(RESULTS["meta"])
    t0 = time.time()
    model = load_model(args.model)
    log(f"model built in {time.time() - t0:.1f}s")
    audio, lengths = make_audio(args.utts)
    log(f"audio: {len(lengths)} utterances, {float(lengths.sum()) / 16000:.0f} s per pass")
    if "ort" not in skip:
        ort_probe()
    if "parity" not in skip:
        parity_gpu(model)
    shapes = []
    if True:
        shapes = [("window 2/10/2 s (1400 mel)", "window", 1400, 0, 0, None),
                  ("seed 592 mel, cache 256", "stream", 592, 256, 4, None)]
        for ms in (80, 160, 560, 1120):
            p = stream_params(model, ms // 80)
            shapes.append((f"cache-aware {ms} ms ({p.input_frames(False)} mel, cache 256)", "stream",
                           p.input_frames(False), 256, 4, p))
        engines = [("torch eager", "fp32", False), ("torch eager", "fp16", False),
                   ("torch-cuda", "fp32", True), ("torch-cuda", "fp16", True), ("torch-cuda", "bf16", True)]
    if "latency" not in skip:
        if args.latency_engines:
            keep = args.latency_engines.split(",")
            engines = [e for e in engines if f"{e[0]}:{e[1]}" in keep]
        if args.latency_shapes:
            shapes = [s for s in shapes if any(k in s[0] for k in args.latency_shapes.split(","))]
        latency(model, shapes, engines, args.iters)
    if "offline" not in skip:
        offline(model, audio, lengths, args.passes, args.offline_precisions.split(","), args.variants.split(","))
    if args.nemo and "nemo" not in skip:
        nemo_offline(model, audio, lengths, args.passes, ["bf16", "fp32"])
    if "throughput" not in skip:
        throughput(model, [int(b) for b in args.batches.split(",")], ["bf16", "fp16"])
    if args.compile:  # last: compilation time is unbounded; earlier results are already saved
        shapes_c = [s for s in shapes if any(k in s[0] for k in ("seed", "560", "window"))]
        shapes_c = [s for s in shapes_c if "window" not in s[0]]
        latency(model, shapes_c, [("torch-cuda+compile", "fp16", True, "default")], args.iters)
        offline(model, audio, lengths, args.passes, ["bf16"], ["compile"])
    (out / "bench_gpu.json").write_text(json.dumps(RESULTS, indent=1))
    md = table()
    (out / "bench_gpu.md").write_text(f"# GPU benchmark\n\n{json.dumps(RESULTS['meta'])}\n\n{md}\n")
    log(md)


if __name__ == "__main__":
    main()
