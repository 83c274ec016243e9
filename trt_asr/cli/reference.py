"""``trt-asr reference``: write a reference stream (per-chunk inputs, caches, outputs and greedy tokens of the fp32
reference engine) as safetensors shards + index.json, for ``trt-asr parity --ref DIR``."""

from __future__ import annotations

import argparse
import sys

from .contract import add_model_args, add_stream_args, stream_params


def add_reference_args(p) -> None:
    p.add_argument("--chunks", type=int, default=50, help="chunks to stream")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic mel features")
    p.add_argument("--batch", type=int, default=1, help="streams per step")
    p.add_argument("--reference-engine", choices=["torch", "nemo"], default="torch",
                   help="torch: fp32 eager reference engine; nemo: NeMo's cache_aware_stream_step (same weights)")
    p.add_argument("--window-frames", type=int, default=1400,
                   help="buffered mode: mel frames per window (v3 default 10+2+2 s = 1400)")


def load_for_reference(args, mode: str = "cache-aware"):
    """(model, params) for the CLI args; the model's attention context follows --att-context. Buffered windows
    need no streaming params (None)."""
    from ..checkpoint import load_model

    model = load_model(args.model)
    params = stream_params(model.cfg.encoder, args) if mode == "cache-aware" else None
    return model, params


def make_live(model, params, args, mode: str, decode: bool = True):
    from ..validation.reference import LiveReference

    return LiveReference(model, params, args.chunks, batch=args.batch, seed=args.seed, model_spec=args.model,
                         engine=args.reference_engine, decode=decode, mode=mode, window_frames=args.window_frames)


def register(sub) -> None:
    p = sub.add_parser("reference", help="write a cache-aware reference stream for parity", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--mode", choices=["cache-aware", "buffered"], default="cache-aware",
                   help="cache-aware: carried chunks (stream step); buffered: independent windows (window step)")
    add_stream_args(p)
    add_reference_args(p)
    p.add_argument("--chunks-per-shard", type=int, default=256)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..streaming.cache_aware import NonCausalStreamingError
    from ..validation.reference import write_reference

    try:
        model, params = load_for_reference(args, args.mode)
        ref = make_live(model, params, args, args.mode)
    except (NonCausalStreamingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = write_reference(ref, args.out, chunks_per_shard=args.chunks_per_shard)
    print(f"wrote {args.chunks} {'chunks' if args.mode == 'cache-aware' else 'windows'} x {args.batch} streams "
          f"to {path.parent} (index {path.name})")
    return 0
