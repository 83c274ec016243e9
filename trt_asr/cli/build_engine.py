"""``trt-asr build-engine``: build a TensorRT plan from an exported ONNX directory (``trt-asr export onnx``), with the
optimization profiles of its I/O contract, a timing cache and a workspace limit; writes PLAN and PLAN.json."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("build-engine", help="build a TensorRT plan from an exported ONNX directory",
                       description=__doc__)
    p.add_argument("--onnx", required=True, help="directory written by `trt-asr export onnx`")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp16")
    p.add_argument("--profiles", default="contract",
                   help="'contract' (default: the contract's profiles), a JSON file of profiles, or B=min:opt:max"
                        "[,T=min:opt:max] to override the batch / window ranges")
    p.add_argument("--out", default=None, help="plan path (default DIR/<encoder>.<precision>.plan)")
    p.add_argument("--workspace-gib", type=float, default=4.0)
    p.add_argument("--timing-cache", default=None, help="timing cache file (default DIR/timing.cache)")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0-5")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engines.onnx_export import read_export
    from ..engines.tensorrt_engine import build_engine, parse_profile_arg
    from ..streaming.contract import load_contract
    from pathlib import Path

    try:
        export = read_export(args.onnx)
        contract = load_contract(Path(args.onnx) / export["contract"])
        profiles = parse_profile_arg(args.profiles, contract)
        plan = build_engine(args.onnx, args.precision, args.out, profiles=profiles, workspace_gib=args.workspace_gib,
                            timing_cache=args.timing_cache, optimization_level=args.opt_level, verbose=args.verbose)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"built {plan} ({args.precision}); metadata {plan}.json")
    return 0
