"""``trt-asr parity``: streaming parity of an encoder engine against a reference stream (a folder written by
``trt-asr reference``, or --live: the reference engine runs alongside, no disk). Exits 1 when a gate fails."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .contract import add_model_args, add_stream_args
from .reference import add_reference_args, load_for_reference, make_live


def register(sub) -> None:
    p = sub.add_parser("parity", help="streaming parity of an engine vs a reference", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--engine", default="torch",
                   help="torch | torch-cuda[:fp16] | onnxruntime | tensorrt | module:Class, optionally +noise:<output>:<sigma> / "
                        "+weight:<param>:<sigma> (deliberately broken, to test the harness)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ref", help="reference folder (trt-asr reference --out)")
    src.add_argument("--live", action="store_true", help="run the reference alongside (needs --model etc.)")
    p.add_argument("--mode", choices=["functional", "closed_loop"], default="closed_loop")
    p.add_argument("--stream-mode", choices=["cache-aware", "buffered"], default="cache-aware",
                   help="with --live: carried chunks or independent windows (a --ref folder says its own)")
    p.add_argument("--summary-json", default=None, help="write the summary here")
    p.add_argument("--plot", default=None, help="PNG of the error per chunk with the fitted trend")
    p.add_argument("--tol", type=float, default=1e-5, help="abs tolerance per output per chunk")
    p.add_argument("--rtol", type=float, default=0.0, help="plus rtol * max|reference|")
    p.add_argument("--min-pass-rate", type=float, default=1.0)
    p.add_argument("--min-contract-pass-rate", type=float, default=1.0)
    p.add_argument("--min-token-agreement", type=float, default=1.0)
    p.add_argument("--max-growth", type=float, default=None,
                   help="max error growth over the run (95%% upper bound of the trend); default: --tol")
    p.add_argument("--no-decode", action="store_true", help="skip greedy-token agreement")
    add_model_args(p)
    add_stream_args(p)
    add_reference_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint import load_model
    from ..streaming.cache_aware import NonCausalStreamingError
    from ..validation.parity import Gates, format_summary, make_engine, run_parity
    from ..validation.reference import DiskReference
    from ..validation.stability import plot_stability

    try:
        if args.ref:
            reference = DiskReference(args.ref)
            model = load_model(reference.model_spec if args.model == "random:tiny-cache-aware" else args.model)
            params = reference.params
        else:
            model, params = load_for_reference(args, args.stream_mode)
            reference = make_live(model, params, args, args.stream_mode, decode=not args.no_decode)
    except (NonCausalStreamingError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine = make_engine(args.engine, model, params, mode=reference.contract["step"])
    gates = Gates(atol=args.tol, rtol=args.rtol, min_pass_rate=args.min_pass_rate,
                  min_contract_pass_rate=args.min_contract_pass_rate, min_token_agreement=args.min_token_agreement,
                  max_growth=args.max_growth)
    summary = run_parity(engine, reference, args.mode, gates, model=None if args.no_decode else model)
    print(format_summary(summary))
    if args.summary_json:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_text(json.dumps(summary, indent=1) + "\n")
    if args.plot:
        per = {k: v for k, v in summary["per_chunk"].items() if "len" not in k and k != "trend_metric"}
        plot_stability(per, summary["trend"], args.plot, tol=args.tol,
                       title=f"{summary['engine']} vs reference ({summary['mode']}, {summary['chunks']} chunks)")
    return 0 if summary["passed"] else 1
