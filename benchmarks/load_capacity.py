"""Capacity sweep: the largest K whose p99 event latency stays under the chunk duration, for buffered 2/10/2 and
cache-aware 160 / 560 ms chunks, in-process (scheduler + engine only) and through the server.

    python benchmarks/load_capacity.py --model random:parakeet-tdt-0.6b-v3 --device cuda --out benchmarks/results
    python benchmarks/load_capacity.py --model random:tiny --quick          # CPU smoke run of the same code

Each configuration is one ``trt-asr bench load`` process (sweeping K upwards, stopping at the first K not
sustained) under its own time limit; results go to ``<out>/load_<name>.json`` and a table to stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [  # name, bench args, K sweep (full), K sweep (quick)
    ("buffered_2-10-2_inproc", ["--mode", "buffered", "--in-process"], "64,128", "2,4"),
    ("cache-aware_160ms_inproc", ["--mode", "cache-aware", "--chunk-ms", "160", "--in-process"], "8,16", "2,4"),
    ("cache-aware_560ms_inproc", ["--mode", "cache-aware", "--chunk-ms", "560", "--in-process"], "16,32", "2,4"),
    ("buffered_2-10-2_server", ["--mode", "buffered"], "32,128", "2,4"),
    ("cache-aware_160ms_server", ["--mode", "cache-aware", "--chunk-ms", "160"], "16,64", "2"),
    ("cache-aware_560ms_server", ["--mode", "cache-aware", "--chunk-ms", "560"], "32,128", "2"),
    ("cache-aware_160ms_inproc_pooled", ["--mode", "cache-aware", "--chunk-ms", "160", "--in-process", "--pooled"],
     "8,16", "2"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:parakeet-tdt-0.6b-v3")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="tiny sweeps (CPU smoke test)")
    ap.add_argument("--only", default=None, help="comma list of config names")
    ap.add_argument("--time-limit", type=float, default=90.0, help="seconds per configuration")
    ap.add_argument("--total-limit", type=float, default=420.0, help="seconds for everything")
    ap.add_argument("--engine", default="torch", choices=["torch", "torch-cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--kv-cache", default="layer_input", choices=["layer_input", "projected", "ring"])
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--fixed-batch", type=int, default=None, help="bench load --fixed-batch S (exact in fp16/bf16)")
    ap.add_argument("--compile", default=None, metavar="MODE", help="bench load --compile MODE (torch-cuda engine)")
    ap.add_argument("--ks", default=None, help="K sweep for every selected config (default: per config)")
    ap.add_argument("--state", default="auto", choices=["auto", "batched", "per-stream"],
                    help="cache-aware configs: batched (BatchedCacheAwareMode, the default) or per-stream "
                    "(CacheAwareMode); the *_pooled config always runs the SlotPool CacheAwareMode")
    ap.add_argument("--drain-timeout", type=float, default=20.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    rows = []
    for name, extra, ks, ks_quick in CONFIGS:
        if args.only and name not in args.only.split(","):
            continue
        left = args.total_limit - (time.monotonic() - t_start)
        if left < 20:
            rows.append((name, "not run (time)", None, None))
            continue
        dest = out / f"load_{name}.json"
        sweep = args.ks or (ks_quick if args.quick else ks)
        cmd = [sys.executable, "-m", "trt_asr", "bench", "load", "--model", args.model, "--device", args.device,
               "--duration", str(args.duration), "--streams", sweep,
               "--max-streams", str(max(512, *(int(k) for k in sweep.split(",") if k.strip()))),
               "--engine", args.engine, "--dtype", args.dtype, "--kv-cache", args.kv_cache, "--max-batch", str(args.max_batch),
               "--drain-timeout", str(args.drain_timeout), "--state", args.state, "--summary-json", str(dest),
               *(["--fixed-batch", str(args.fixed_batch)] if args.fixed_batch else []),
               *(["--compile", args.compile] if args.compile else []), *extra]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        try:
            subprocess.run(cmd, timeout=min(args.time_limit, left), stdout=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            print(f"{name}: time limit", file=sys.stderr, flush=True)
        if dest.exists():
            d = json.loads(dest.read_text())
            runs = " ".join(f"K={r['streams']}:{'ok' if r['sustained'] else 'NO'}(p99={r['p99_latency_ms']})"
                            for r in d["runs"])
            rows.append((name, d["streams_sustained"], d["p99_latency_ms"], runs))
        else:
            rows.append((name, "failed / no result", None, None))
    print(f"{'config':28s} {'max K sustained':>16s} {'p99 ms':>9s}  runs")
    for name, k, p99, runs in rows:
        print(f"{name:28s} {k!s:>16s} {p99!s:>9s}  {runs or ''}")
    (out / "load_capacity_table.json").write_text(json.dumps(
        {"model": args.model, "device": args.device, "duration": args.duration, "engine": args.engine,
         "dtype": args.dtype, "max_batch": args.max_batch, "state": args.state,
         "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         "rows": [dict(zip(("config", "max_k_sustained", "p99_ms", "runs"), r)) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
