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
    p.add_argument("--max-sessions", type=int, default=16, help="concurrent WebSocket streams (all workers)")
    p.add_argument("--workers", type=int, default=1, help="server processes on one port, each with its own model "
                   "and scheduler on the same device (one process's GIL limits how many streams it can carry)")
    p.add_argument("--engines", type=int, default=0, metavar="M", help="M engine processes hold the model and a "
                   "scheduler each, and the --workers processes are front-ends only (sockets, audio, captions), each "
                   "opening its streams on the engine with the fewest of them; 0: every worker has its own model")
    g = p.add_argument_group("batching (one scheduler per worker, or per engine with --engines, batches its streams)")
    g.add_argument("--max-batch", type=int, default=32, help="streams in one engine step at most")
    g.add_argument("--fixed-batch", type=int, default=None, metavar="S", help="every engine call has exactly S rows "
                   "(one shape: CUDA graphs, and each stream bitwise the same as alone in any precision)")
    g.add_argument("--batch-wait-ms", type=float, default=0.0, help="with fewer than --max-batch streams ready, wait "
                   "up to this long for more (fuller fixed-shape steps; adds to latency)")
    p.add_argument("--ws-deflate", action="store_true", help="accept WebSocket permessage-deflate (off: zlib on "
                   "every audio frame costs CPU per message and 16-bit PCM hardly compresses)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGINT / SIGTERM: seconds the open streams "
                   "get to finish (their finals and 'end' go out, then close code 1001)")
    p.add_argument("--max-upload-mb", type=float, default=25.0, help="POST /v1/audio/transcriptions limit")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="a stream whose client sends nothing (no audio, "
                   "no end) for this many seconds is finalised and closed (error idle_timeout), freeing its place; "
                   "0: never")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up stream at start-up")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    from ..captions.service import add_model_args

    add_model_args(p)
    p.set_defaults(func=run)


def build_app(args, admission=None, health=None, remote=None):
    """The app for these args: loads the model and warms it up (in each worker with --workers), or, with
    ``remote`` (--engines), connects to the engine processes. Module-level so a spawned worker can be handed it."""
    from ._captions import load_caption_service
    from ..serving.app import Limits, create_app

    if remote is not None:
        from ..captions.service import CaptionService
        from ..serving.shared_engine import RemoteCaptionPool

        pool = RemoteCaptionPool(remote)
        svc = CaptionService.from_args(args, pool=pool)
        health = pool.health(health)
    else:
        svc = load_caption_service(args)
        if svc is None:
            raise SystemExit(2)
        if not args.no_warmup:
            per_worker = -(-args.max_sessions // max(1, args.workers))  # the streams one worker is likely to carry
            svc.warmup(streams=per_worker if svc.model.device.type == "cuda" else None)
    limits = Limits(max_sessions=args.max_sessions, max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
                    idle_timeout=args.idle_timeout)
    return create_app(svc, args.token, limits, admission=admission, health=health)


def build_engine(args):
    """An engine process of ``--engines``: the model, its scheduler (sized for every stream of the server: the
    front-ends may put them all on one engine) and the warm-up; served to the front-ends by ``EngineHost``."""
    from ._captions import load_caption_service
    from ..serving.shared_engine import EngineHost

    svc = load_caption_service(args)
    if svc is None:
        raise SystemExit(2)
    if not args.no_warmup:
        per_engine = -(-args.max_sessions // max(1, args.engines))
        svc.warmup(streams=per_engine if svc.model.device.type == "cuda" else None)
    return EngineHost(svc)


def run(args) -> int:
    import importlib.util

    if importlib.util.find_spec("uvicorn") is None:
        print("error: serving needs the [serve] extra: pip install 'trt-asr-engine[serve]'", file=sys.stderr)
        return 2
    from ..serving.runner import serve_app, serve_workers

    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    if args.engines < 0 or (args.engines and args.mode == "redecode"):
        print("error: --engines must be >= 0, and needs --mode buffered or cache-aware (a scheduler)",
              file=sys.stderr)
        return 2
    if args.max_batch < 1 or (args.fixed_batch is not None and args.fixed_batch < 1) or args.batch_wait_ms < 0:
        print("error: --max-batch and --fixed-batch must be >= 1, --batch-wait-ms >= 0", file=sys.stderr)
        return 2
    if args.drain_timeout < 0 or args.idle_timeout < 0:
        print(f"error: --drain-timeout and --idle-timeout must be >= 0, got {args.drain_timeout} and "
              f"{args.idle_timeout}", file=sys.stderr)
        return 2
    from ..captions.service import check_engine_args

    try:
        check_engine_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.token = args.token or os.environ.get("TRT_ASR_TOKEN") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.token:
        print(f"warning: binding {args.host} without --token: anyone who can reach it can use it", file=sys.stderr)
    where = f"http://{args.host}:{args.port}/"
    if args.workers == 1 and not args.engines:
        try:
            app = build_app(args)
        except SystemExit as e:
            return int(e.code or 0)
        svc = app.state.service
        print(f"trt-asr serve: {where} (model {svc.model_name}, mode {svc.mode})", file=sys.stderr, flush=True)
        serve_app(app, args.host, args.port, args.drain_timeout, args.log_level, ws_deflate=args.ws_deflate)
        return 0
    engines = f", {args.engines} engine processes" if args.engines else ""
    # compiled on CUDA: the first model process compiles and autotunes alone, the others load its kernels and tuned
    # configurations (the same numerics in every process; serve_workers says why)
    first_alone = bool(args.compile_mode) and args.device == "cuda"
    return serve_workers(build_app, (args,), args.workers, args.host, args.port, args.max_sessions,
                         args.drain_timeout, args.log_level,
                         on_ready=lambda: print(f"trt-asr serve: {where} ({args.workers} workers{engines}, mode "
                                                f"{args.mode})", file=sys.stderr, flush=True),
                         ws_deflate=args.ws_deflate, engines=args.engines, engine_build=build_engine,
                         engine_args=(args,), first_alone=first_alone)
