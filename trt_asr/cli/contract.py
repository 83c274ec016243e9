"""``trt-asr contract``: write the encoder I/O contract (encoder_streaming.contract.json) for a model and mode."""

from __future__ import annotations

import argparse
import sys


def add_model_args(p) -> None:
    p.add_argument("--model", default="random:tiny-cache-aware",
                   help="a .nemo file, a model folder, a Hugging Face repo id, or random:<preset>")


def add_stream_args(p) -> None:
    g = p.add_argument_group("cache-aware streaming parameters (as NeMo's setup_streaming_params)")
    g.add_argument("--att-context", default=None, help="L,R attention context in encoder frames (default: model's)")
    g.add_argument("--chunk-size", type=int, default=None, help="encoder frames per chunk (default: R + 1)")
    g.add_argument("--shift-size", type=int, default=None, help="encoder frames the stream advances per chunk")
    g.add_argument("--left-chunks", type=int, default=None, help="left chunks in the cache (with --chunk-size)")
    g.add_argument("--pad-and-drop-preencoded", action="store_true",
                   help="every chunk has the later chunks' shape (one engine shape; first chunk not exact)")
    g.add_argument("--allow-inexact", action="store_true",
                   help="allow a non-causal model (e.g. v3) in cache-aware mode, to measure how far it drifts")


def model_config(spec: str):
    """The model's config (a random:<preset> spec needs no weights)."""
    if spec.startswith("random:"):
        from ..config import preset_config

        return preset_config(spec[len("random:"):].partition("@")[0])
    from ..checkpoint import load_model

    return load_model(spec).cfg


def stream_params(enc_cfg, args):
    from ..streaming.cache_aware import CacheAwareParams, parse_att_context

    att = None
    if args.att_context:
        try:
            att = parse_att_context(args.att_context)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    if att is not None and att != list(enc_cfg.att_context_sizes[0]):
        enc_cfg.att_context_size = att  # a different context of the same (multi-context) model
        if enc_cfg.att_context_style == "regular" and att[1] >= 0 and args.allow_inexact:
            enc_cfg.att_context_style = "chunked_limited"
    return CacheAwareParams.for_encoder(enc_cfg, att_context_size=att, chunk_size=args.chunk_size,
                                        shift_size=args.shift_size, left_chunks=args.left_chunks,
                                        pad_and_drop_preencoded=args.pad_and_drop_preencoded,
                                        allow_inexact=args.allow_inexact)


def register(sub) -> None:
    p = sub.add_parser("contract", help="write the encoder I/O contract (JSON)", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--mode", choices=["cache-aware", "buffered"], default="cache-aware")
    add_stream_args(p)
    b = p.add_argument_group("buffered windows")
    b.add_argument("--left-secs", type=float, default=10.0)
    b.add_argument("--chunk-secs", type=float, default=2.0)
    b.add_argument("--right-secs", type=float, default=2.0)
    p.add_argument("--batch", type=int, nargs=3, default=[1, 1, 8], metavar=("MIN", "OPT", "MAX"),
                   help="batch sizes of the engine-build optimization profile")
    p.add_argument("--out", default="encoder_streaming.contract.json", help="file (or folder) to write")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..streaming.cache_aware import NonCausalStreamingError
    from ..streaming.contract import build_contract, write_contract

    cfg = model_config(args.model)
    if args.mode == "cache-aware":
        try:
            params = stream_params(cfg.encoder, args)
        except (NonCausalStreamingError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        contract = build_contract(cfg.encoder, "cache-aware", params, model_name=args.model, batch=tuple(args.batch))
    else:
        from ..streaming.buffered import BufferedConfig

        bc = BufferedConfig.from_secs(cfg, args.left_secs, args.chunk_secs, args.right_secs)
        f = cfg.encoder.subsampling_factor
        full = (bc.left_frames + bc.chunk_frames + bc.right_frames) * f
        contract = build_contract(cfg.encoder, "buffered", model_name=args.model, batch=tuple(args.batch),
                                  window_frames=(1, full, full),
                                  window_secs={"left_secs": args.left_secs, "chunk_secs": args.chunk_secs,
                                               "right_secs": args.right_secs, "left_frames_out": bc.left_frames,
                                               "chunk_frames_out": bc.chunk_frames,
                                               "right_frames_out": bc.right_frames})
    path = write_contract(contract, args.out)
    print(f"wrote {path} (sha256 {contract['sha256'][:16]}..., exact streaming: {contract['exact_streaming']})")
    return 0
