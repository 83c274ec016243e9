"""``trt-asr serve``: live captions over WebSocket (/v1/stream), OpenAI-compatible POST /v1/audio/transcriptions,
GET /health, and a live-captions web page at /. Binds 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import os
import sys


def register(sub) -> None:
    p = sub.add_parser("serve", help="WebSocket / HTTP server with a live-captions web page", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' (or ?token= on the "
                   "WebSocket); default: $TRT_ASR_TOKEN if set")
    p.add_argument("--max-sessions", type=int, default=16, help="concurrent WebSocket streams")
    p.add_argument("--max-upload-mb", type=float, default=25.0, help="POST /v1/audio/transcriptions limit")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up stream at start-up")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    from ..captions.service import add_model_args

    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        import uvicorn
    except ImportError:
        print("error: serving needs the [serve] extra: pip install 'trt-asr-engine[serve]'", file=sys.stderr)
        return 2

    from ._captions import load_caption_service
    from ..serving.app import MAX_FRAME_BYTES, Limits, create_app

    token = args.token or os.environ.get("TRT_ASR_TOKEN") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not token:
        print(f"warning: binding {args.host} without --token: anyone who can reach it can use it", file=sys.stderr)
    svc = load_caption_service(args)
    if svc is None:
        return 2
    if not args.no_warmup:
        svc.warmup(streams=args.max_sessions if svc.model.device.type == "cuda" else None)
    limits = Limits(max_sessions=args.max_sessions, max_upload_bytes=int(args.max_upload_mb * (1 << 20)))
    app = create_app(svc, token, limits)
    print(f"trt-asr serve: http://{args.host}:{args.port}/ (model {svc.model_name}, mode {svc.mode})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, ws_max_size=4 * MAX_FRAME_BYTES,
                ws="websockets-sansio" if _has_sansio() else "auto")
    return 0


def _has_sansio() -> bool:
    try:
        import uvicorn.protocols.websockets.websockets_sansio_impl  # noqa: F401
        return True
    except Exception:
        return False
