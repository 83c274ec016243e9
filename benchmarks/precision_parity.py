"""fp16 / bf16 against fp32 on the GPU (issue #4's reduced-precision gates), in one run:

1. offline greedy transcripts (front end fp32 -> torch-cuda encoder -> graph greedy decoder) of the held-out demo
   test set (100 utterances of real synthetic speech) for the shipped demo models and random-weight v3:
   the share of utterances whose tokens are identical to fp32, the token error rate vs fp32, WER vs the reference
   text (demo models);
2. closed loop: the whole test set concatenated into one stream (386 s) through the cache-aware demo model's
   torch-cuda stream engine (160 ms and 1.12 s chunks, caches carried), per-chunk max |encoder output - fp32|,
   the fitted error slope with its 95 % CI (error growth), and token identity of the streamed transcript.

The fp32 reference runs with TF32 off (cuBLAS and cuDNN), so it is IEEE fp32.

    python benchmarks/precision_parity.py --out benchmarks/results/precision_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trt_asr.audio import load_audio  # noqa: E402
from trt_asr.checkpoint import load_model  # noqa: E402
from trt_asr.engines.torch_cuda import TorchCudaEngine, TorchCudaTranscriber  # noqa: E402
from trt_asr.streaming.cache_aware import CacheAwareParams, CacheAwareStreamer  # noqa: E402
from trt_asr.training.metrics import edit_distance, error_counts  # noqa: E402
from trt_asr.validation.stability import error_trend  # noqa: E402

ASSETS = ROOT / "trt_asr" / "assets"
DEV = "cuda"
VARIANTS = [("fp16", False), ("bf16", False), ("fp16", True), ("bf16", True)]  # (precision, autocast)


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def test_set():
    rows = [json.loads(x) for x in (ROOT / "tests/data/demo_test/manifest.jsonl").read_text().splitlines() if x]
    audio = [torch.from_numpy(load_audio(ROOT / "tests/data/demo_test" / r["audio_filepath"], 16000)) for r in rows]
    return audio, [r["text"] for r in rows]


def batch(audio):
    lengths = torch.tensor([a.numel() for a in audio])
    x = torch.zeros(len(audio), int(lengths.max()))
    for i, a in enumerate(audio):
        x[i, : a.numel()] = a
    return x, lengths


def ter(hyps, refs) -> float:
    errs = sum(edit_distance(r, h) for h, r in zip(hyps, refs))
    return errs / max(1, sum(len(r) for r in refs))


def detok(model, ids):
    return model.tokenizer.decode(ids).strip() if model.tokenizer is not None else ""


def offline(name, model, audio, texts):
    x, lengths = batch(audio)
    rows, ref = [], None
    for prec, ac in [("fp32", False)] + VARIANTS:
        tr = TorchCudaTranscriber(model, precision=prec, device=DEV, max_batch=len(audio), max_seconds=float(lengths.max()) / 16000
                                  + 1, autocast=ac)
        toks = [[t[0] for t in u] for u in tr(x, lengths).to_lists()]
        if ref is None:
            ref = toks
        same = sum(a == b for a, b in zip(toks, ref)) / len(ref)
        row = {"model": name, "precision": prec, "autocast": ac, "utterances": len(ref),
               "utt_tokens_equal_fp32": same, "token_error_rate_vs_fp32": ter(toks, ref)}
        if model.tokenizer is not None and texts is not None and not name.startswith("random"):
            row["wer"] = error_counts(texts, [detok(model, t) for t in toks])["wer"]
        rows.append(row)
        log(json.dumps(row))
        del tr
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return rows


def closed_loop(model, audio, att):
    """All utterances as one stream through the stream engine; per-chunk error vs the fp32 engine."""
    p = CacheAwareParams.for_encoder(model.cfg.encoder, att_context_size=list(att))
    a = torch.cat(audio)[None].to(DEV)
    feats, flen = model.features(a, torch.tensor([a.shape[1]], device=DEV))
    out, ref_enc, ref_tok = [], None, None
    per_chunk = p.valid_out_len
    for prec, ac in [("fp32", False)] + VARIANTS:
        eng = TorchCudaEngine(model, "stream", prec, DEV, params=p, output_dtype=torch.float32, autocast=ac,
                              batch_buckets=(1,))
        streamer = CacheAwareStreamer(model, p, eng)
        t0 = time.time()
        enc, enc_len, state = streamer.stream_features(feats, flen)
        wall = time.time() - t0
        enc = enc[0, :, : int(enc_len[0])].float()
        toks = [t[0] for t in state.tokens[0]]
        n_chunks = -(-enc.shape[1] // per_chunk)
        if ref_enc is None:
            ref_enc, ref_tok = enc, toks
        err = (enc - ref_enc).abs()
        chunk_err = [float(err[:, k * per_chunk:(k + 1) * per_chunk].max()) for k in range(n_chunks)]
        trend = error_trend(chunk_err)
        row = {"att_context": list(att), "chunk_ms": per_chunk * 80, "precision": prec, "autocast": ac,
               "chunks": n_chunks, "stream_seconds": round(a.shape[1] / 16000, 1),
               "max_abs_err": max(chunk_err), "median_chunk_err": float(np.median(chunk_err)),
               "p99_chunk_err": float(np.percentile(chunk_err, 99)),
               "ref_abs_max": float(ref_enc.abs().max()),
               "slope_per_chunk": trend["slope"], "slope_ci95": trend["slope_ci95"],
               "growth_over_run": trend["growth"], "tokens_equal_fp32": toks == ref_tok,
               "token_error_rate_vs_fp32": ter([toks], [ref_tok]), "wall_s": round(wall, 2)}
        out.append(row)
        log(json.dumps(row))
        del eng, streamer
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/precision.json")
    ap.add_argument("--skip-random", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the code (no reduced precision check)")
    ap.add_argument("--utts", type=int, default=100)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    audio, texts = test_set()
    audio, texts = audio[: args.utts], texts[: args.utts]
    global DEV
    DEV = args.device
    res = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": "python " + " ".join(sys.argv), "offline": [], "closed_loop": []}
    with torch.inference_mode():
        m = load_model(str(ASSETS / "demo-tdt-buffered.nemo"), device=DEV)
        res["offline"] += offline("demo-tdt-buffered", m, audio, texts)
        del m
        m = load_model(str(ASSETS / "demo-tdt-cache-aware.nemo"), device=DEV)
        res["offline"] += offline("demo-tdt-cache-aware [70,13]", m, audio, texts)
        for att in ((70, 1), (70, 13)):
            res["closed_loop"] += closed_loop(m, audio, att)
        del m
        if not args.skip_random:
            m = load_model("random:parakeet-tdt-0.6b-v3", device=DEV)
            res["offline"] += offline("random v3 (calibrated)", m, audio, None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    log("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
