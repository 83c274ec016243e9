"""``trt-asr live [--mic | FILE | -]``: live captions in the terminal (the same pipeline as ``trt-asr serve``),
optionally written to WebVTT / SRT / JSON lines as they happen; ``--stats`` prints latency and stability."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    p = sub.add_parser("live", help="live captions from a file, stdin or the microphone", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("input", nargs="?", default=None, help="audio file, or - for raw PCM on stdin")
    p.add_argument("--mic", action="store_true", help="capture from the default microphone (needs [mic] extra)")
    p.add_argument("--realtime", action="store_true", help="pace a file in real time (default: as fast as possible)")
    p.add_argument("--speed", type=float, default=1.0, help="with --realtime: playback speed factor")
    p.add_argument("--chunk-ms", type=float, default=100.0, help="capture block size")
    p.add_argument("--rate", type=int, default=16000, help="stdin: sample rate")
    p.add_argument("--channels", type=int, default=1, help="stdin / mic: channels")
    p.add_argument("--encoding", default="pcm_s16le", choices=["pcm_s16le", "f32le"], help="stdin: sample format")
    p.add_argument("--seconds", type=float, default=None, help="mic: stop after this many seconds")
    p.add_argument("--vtt", default=None, help="write WebVTT captions here (incrementally)")
    p.add_argument("--srt", default=None, help="write SRT captions here (incrementally)")
    p.add_argument("--jsonl", default=None, help="write every event as a JSON line here ('-': stdout)")
    p.add_argument("--stats", action="store_true", help="print latency (p50/p95) and stability at the end")
    p.add_argument("--quiet", action="store_true", help="no terminal captions")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up stream before capture starts")
    from ..captions.service import add_model_args

    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..audio import AudioError
    from ._captions import load_caption_service
    from ..captions.sinks import CaptionFileWriter, JsonLinesWriter, TerminalView
    from ..captions.sources import file_source, mic_source, stdin_source

    if not args.mic and args.input is None:
        print("error: give an audio FILE, - for raw PCM on stdin, or --mic", file=sys.stderr)
        return 2
    svc = load_caption_service(args)
    if svc is None:
        return 2
    try:
        if args.mic:
            info, chunks = mic_source(16000, args.channels, max_seconds=args.seconds)
        elif args.input == "-":
            info, chunks = stdin_source(args.rate, args.channels, args.encoding, args.chunk_ms)
        else:
            info, chunks = file_source(args.input, args.chunk_ms, realtime=args.realtime, speed=args.speed)
    except (AudioError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    sinks = []
    if not args.quiet and args.jsonl != "-":
        sinks.append(TerminalView(show_latency=args.stats))
    if args.vtt:
        sinks.append(CaptionFileWriter(args.vtt, "vtt"))
    if args.srt:
        sinks.append(CaptionFileWriter(args.srt, "srt"))
    if args.jsonl:
        sinks.append(JsonLinesWriter(sys.stdout if args.jsonl == "-" else args.jsonl))
    result = {}
    errors = []

    def emit(event):
        for s in sinks:
            s(event)
        if event["type"] == "end":
            result.update(event)
        elif event["type"] == "error":
            errors.append(event)

    if not args.no_warmup:
        svc.warmup()
    pipe = svc.pipeline(emit, info.sample_rate, info.channels).start()
    try:
        for x in chunks:
            pipe.push(x)
    except KeyboardInterrupt:
        pass
    finally:
        pipe.close()
        while not pipe.join(0.2):
            pass
    if args.stats:
        st = result.get("stats", {})
        pl, fl, tl = (st.get(k, {}) for k in ("partial_latency_ms", "final_latency_ms", "token_latency_ms"))
        print(f"partial latency: p50 {pl.get('p50')} ms, p95 {pl.get('p95')} ms (n={pl.get('n')}); "
              f"final latency: p50 {fl.get('p50')} ms, p95 {fl.get('p95')} ms (n={fl.get('n')}); "
              f"token first-shown latency: p50 {tl.get('p50')} ms, p95 {tl.get('p95')} ms; "
              f"revision rate {st.get('revision_rate')}, committed changes {st.get('committed_changes')}, "
              f"RTF {st.get('rtf')}", file=sys.stderr)
        print(json.dumps({"stats": st, "mode": svc.mode, "model": svc.model_name, "params": svc.params}),
              file=sys.stderr)
    return 1 if errors else 0
