"""``trt-asr transcribe AUDIO...``: offline (or streamed) transcription to text, JSON, SRT or WebVTT."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FORMATS = ("text", "json", "srt", "vtt")


def register(sub) -> None:
    p = sub.add_parser("transcribe", help="transcribe audio files", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("audio", nargs="+", help="audio files (any format soundfile reads, any rate / channels)")
    p.add_argument("--model", default=None, help="a .nemo file, a model folder, a Hugging Face repo id, or "
                   "random:<preset> (default: the shipped demo model; with --stream cache-aware the cache-aware one)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="encoder/decoder precision")
    p.add_argument("--batch-size", type=int, default=16, help="utterances per encoder call")
    p.add_argument("--format", default="text", choices=FORMATS, help="output format")
    p.add_argument("--output-dir", default=None, help="write one file per input here instead of printing")
    p.add_argument("--engine", default="torch", help="torch | torch-cuda | onnxruntime | tensorrt")
    p.add_argument("--max-window-secs", type=float, default=300.0,
                   help="longer audio is transcribed in buffered windows (bounded memory)")
    s = p.add_argument_group("streaming (transcribe by streaming each file through the session API)")
    s.add_argument("--stream", choices=["buffered", "cache-aware"], default=None)
    s.add_argument("--left-secs", type=float, default=10.0, help="buffered: left context")
    s.add_argument("--chunk-secs", type=float, default=2.0, help="buffered: chunk")
    s.add_argument("--right-secs", type=float, default=2.0, help="buffered: right context (lookahead)")
    s.add_argument("--att-context", default=None, help="cache-aware: L,R attention context in encoder frames")
    s.add_argument("--chunk-frames", type=int, default=None, help="cache-aware: encoder frames per chunk")
    p.set_defaults(func=run)


def _render(tr, fmt: str) -> str:
    from ..formats import to_srt, to_vtt

    if fmt == "text":
        return tr.text + "\n"
    if fmt == "srt":
        return to_srt(tr.words)
    if fmt == "vtt":
        return to_vtt(tr.words)
    return json.dumps(tr.to_dict(), ensure_ascii=False, indent=2) + "\n"


def run(args) -> int:
    import torch

    from ..audio import AudioError, load_audio
    from ..checkpoint import ModelLoadError, default_model_spec, load_model
    from ..transcribe import Transcriber, Transcript

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    if args.model is None:  # --stream cache-aware needs the cache-aware demo model
        args.model = default_model_spec(args.stream)
    try:
        model = _load(args, load_model)
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if model.name.startswith("random:"):
        print(f"note: model {model.name} has RANDOM weights; its transcripts are meaningless", file=sys.stderr)

    if args.stream:
        from ..streaming import transcribe_streaming

        arrays, results = {}, {}
        for path in args.audio:
            try:
                arrays[path] = load_audio(path, model.cfg.sample_rate)
            except AudioError as e:
                results[path] = Transcript(audio=path, text="", duration=0.0, error=str(e))
        params = _stream_params(args)
        try:
            outs = transcribe_streaming(model, list(arrays.values()), mode=args.stream, **params) if arrays else []
        except ValueError as e:  # e.g. cache-aware mode on a model not trained for it, bad stream parameters
            print(f"error: {e}", file=sys.stderr)
            return 2
        for path, tr in zip(arrays, outs):
            tr.audio = path
            tr.duration = len(arrays[path]) / model.cfg.sample_rate
            results[path] = tr
        transcripts = [results[p] for p in args.audio]
    else:
        transcriber = Transcriber(model, batch_size=args.batch_size, max_window_seconds=args.max_window_secs)
        transcripts = transcriber.transcribe_files(args.audio, progress=len(args.audio) > 1)

    failed = 0
    for tr in transcripts:
        if tr.error:
            failed += 1
            print(f"error: {tr.error}", file=sys.stderr)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        ext = {"text": "txt"}.get(args.format, args.format)
        for tr in transcripts:
            if not tr.error:
                (out / f"{Path(tr.audio).stem}.{ext}").write_text(_render(tr, args.format), encoding="utf-8")
    elif args.format == "json":
        doc = [dict(tr.to_dict(), model=model.name) for tr in transcripts]
        sys.stdout.write(json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
    else:
        for tr in transcripts:
            if not tr.error:
                sys.stdout.write(_render(tr, args.format))
    return 1 if failed else 0


def _load(args, load_model):
    if args.engine in ("torch", None):
        return load_model(args.model, device=args.device, dtype=args.dtype)
    from ..engines import load_engine_model  # onnxruntime / tensorrt / torch-cuda wrap the same model API

    return load_engine_model(args.engine, args.model, device=args.device, dtype=args.dtype)


def _stream_params(args) -> dict:
    if args.stream == "buffered":
        return {"left_secs": args.left_secs, "chunk_secs": args.chunk_secs, "right_secs": args.right_secs}
    params = {}
    if args.att_context:
        from ..streaming.cache_aware import parse_att_context

        try:
            params["att_context_size"] = parse_att_context(args.att_context)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    if args.chunk_frames:
        params["chunk_frames"] = args.chunk_frames
    return params
