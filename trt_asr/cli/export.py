"""``trt-asr export onnx``: export a model to an ONNX model directory (encoder + decoder step + joint, config,
tokenizer, I/O contract). With no ``--mode`` the buffered (window) encoder that offline transcription needs."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("export", help="export a model (ONNX)", description=__doc__)
    fmt = p.add_subparsers(dest="format", metavar="FORMAT")
    o = fmt.add_parser("onnx", help="ONNX graphs + config + tokenizer + contract in one directory")
    o.add_argument("--model", default=None, help="a .nemo file, a model folder, a Hugging Face repo id or random:<preset>")
    o.add_argument("--mode", choices=["buffered", "cache-aware"], default="buffered",
                   help="buffered: window encoder (offline and buffered streaming; default); cache-aware: stream step")
    o.add_argument("--out", required=True, help="output directory")
    o.add_argument("--opset", type=int, default=17)
    o.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="encoder weights/IO (decoder and joint stay fp32); build fp16/bf16 TensorRT plans from fp32")
    o.add_argument("--att-context", default=None, help="cache-aware: L,R attention context (encoder frames)")
    o.add_argument("--chunk-frames", type=int, default=None, help="cache-aware: encoder frames per chunk")
    o.add_argument("--left-chunks", type=int, default=None, help="cache-aware: left context in chunks")
    o.add_argument("--max-batch", type=int, default=64, help="largest batch of the contract's build profile")
    o.add_argument("--external-data", action="store_true", help="always write weights to external .data files")
    o.add_argument("--no-check", action="store_true", help="skip onnx.checker and shape inference")
    o.set_defaults(func=run)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run(args) -> int:
    from ..checkpoint import ModelLoadError, load_model
    from ..engines.onnx_export import default_params, export_onnx

    try:
        model = load_model(args.model)
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = None
    if args.mode == "cache-aware":
        att = None
        if args.att_context:
            from ..streaming.cache_aware import parse_att_context

            try:
                att = parse_att_context(args.att_context)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        params = default_params(model, att, args.chunk_frames, args.left_chunks)
        if not params.exact:
            print("note: cache-aware streaming of this model is not exact (differs from the offline forward)",
                  file=sys.stderr)
    meta = export_onnx(model, args.out, mode=args.mode, opset=args.opset, precision=args.precision, params=params,
                       max_batch=args.max_batch, external_data=True if args.external_data else None,
                       check=not args.no_check)
    print(f"exported {model.name} ({meta['mode']}, {meta['precision']}, opset {meta['opset']}) to {args.out}: "
          f"{', '.join(meta['files'])}; contract {meta['contract_sha256'][:12]}")
    return 0
