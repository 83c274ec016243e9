"""``trt-asr eval --manifest M.jsonl``: WER / CER / RTFx of a model on a NeMo-style manifest, with a per-utterance
diff report and gates (exit code 1 when --max-wer / --max-cer fail).

Text normalisation before scoring (``trt_asr.training.metrics.normalize_text``): lower-case, apostrophes removed,
every other non-alphanumeric character -> space, whitespace collapsed. WER/CER are corpus-level (total edits /
total reference words or characters), computed with jiwer when installed, else with the built-in edit distance
(same numbers).

Modes: ``offline`` (whole utterances, batched greedy decoding); ``buffered`` (every utterance streamed through the
session API, ``trt_asr.streaming.transcribe_streaming``, with --left-secs / --chunk-secs / --right-secs, default
10 / 2 / 2 s); ``cache-aware`` (the same with the cache-aware mode, --att-context L,R in encoder frames and
--chunk-frames; needs a model trained with chunked-limited attention).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODES = ("offline", "buffered", "cache-aware")


def register(sub) -> None:
    p = sub.add_parser("eval", help="WER/CER of a model on a manifest, with gates", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="NeMo-style JSONL: audio_filepath, text[, duration]")
    p.add_argument("--model", default=None, help="a .nemo file / folder / repo id (default: the shipped demo model; "
                   "--mode cache-aware: the cache-aware one)")
    p.add_argument("--mode", default="offline", choices=MODES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=0, help="only the first N utterances")
    p.add_argument("--att-context", default=None, help="L,R attention context in encoder frames (cache-aware "
                   "mode; offline: decode a multi-context model with this context)")
    p.add_argument("--left-secs", type=float, default=10.0, help="buffered: left context (s)")
    p.add_argument("--chunk-secs", type=float, default=2.0, help="buffered: chunk (s)")
    p.add_argument("--right-secs", type=float, default=2.0, help="buffered: right context / lookahead (s)")
    p.add_argument("--chunk-frames", type=int, default=None, help="cache-aware: encoder frames per chunk")
    p.add_argument("--max-wer", type=float, default=None, help="gate: fail if WER (in %%) is above this")
    p.add_argument("--max-cer", type=float, default=None, help="gate: fail if CER (in %%) is above this")
    p.add_argument("--report", default=None, help="write per-utterance results (JSONL) here")
    p.add_argument("--show-errors", type=int, default=10, help="print this many utterances with errors")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def load_audio(path: str, sample_rate: int):
    import numpy as np
    import soundfile as sf

    x, sr = sf.read(path, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if sr != sample_rate:
        import soxr
        x = soxr.resample(x, sr, sample_rate)
    return np.ascontiguousarray(x, dtype=np.float32)


def score(refs: list[str], hyps: list[str]) -> dict:
    from ..training.metrics import error_counts, normalize_text

    out = error_counts(refs, hyps)
    try:
        import jiwer
        r = [normalize_text(x) or "<empty>" for x in refs]
        h = [normalize_text(x) for x in hyps]
        out["wer"] = jiwer.wer(r, h)
        out["cer"] = jiwer.cer(r, h)
        out["scorer"] = "jiwer"
    except ImportError:
        out["scorer"] = "builtin"
    return out


def word_diff(ref: str, hyp: str) -> str:
    """Aligned diff: [-deleted-] {+inserted+} [ref->hyp] for substitutions."""
    import difflib

    r, h = ref.split(), hyp.split()
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=r, b=h, autojunk=False).get_opcodes():
        if op == "equal":
            out += r[i1:i2]
        elif op == "delete":
            out.append("[-" + " ".join(r[i1:i2]) + "-]")
        elif op == "insert":
            out.append("{+" + " ".join(h[j1:j2]) + "+}")
        else:
            out.append("[" + " ".join(r[i1:i2]) + " -> " + " ".join(h[j1:j2]) + "]")
    return " ".join(out)


def stream_params(mode: str, left_secs: float = 10.0, chunk_secs: float = 2.0, right_secs: float = 2.0,
                  att_context=None, chunk_frames: int | None = None) -> dict:
    """Keyword arguments of ``transcribe_streaming`` for a streaming mode."""
    if mode == "buffered":
        return {"left_secs": left_secs, "chunk_secs": chunk_secs, "right_secs": right_secs}
    params = {}
    if att_context is not None:
        params["att_context_size"] = list(att_context)
    if chunk_frames:
        params["chunk_frames"] = chunk_frames
    return params


def transcribe(model, audios, mode: str, batch_size: int, att_context=None, **stream) -> list[str]:
    """Hypothesis texts. ``stream``: left_secs / chunk_secs / right_secs (buffered), chunk_frames (cache-aware)."""
    if mode == "offline":
        from ..training.infer import transcribe_arrays
        return transcribe_arrays(model, audios, batch_size=batch_size, att_context_size=att_context)
    if mode not in ("buffered", "cache-aware", "cache_aware"):
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    from ..streaming import transcribe_streaming

    params = stream_params("buffered" if mode == "buffered" else "cache-aware", att_context=att_context, **stream)
    return [t.text for t in transcribe_streaming(model, audios, mode=mode.replace("-", "_"), **params)]


def run(args) -> int:
    import torch

    from ..checkpoint import default_model_spec, load_model
    from ..training.data import read_manifest
    from ..training.metrics import error_counts, normalize_text

    entries = read_manifest(args.manifest)
    if args.limit:
        entries = entries[: args.limit]
    model = load_model(args.model or default_model_spec(args.mode), device=args.device)
    from ..streaming.cache_aware import parse_att_context

    try:
        att = parse_att_context(args.att_context) if args.att_context else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    audios = [load_audio(e["audio_filepath"], model.cfg.sample_rate) for e in entries]
    seconds = sum(len(a) for a in audios) / model.cfg.sample_rate
    t0 = time.perf_counter()
    stream = {}
    if args.mode == "buffered":
        stream = {"left_secs": args.left_secs, "chunk_secs": args.chunk_secs, "right_secs": args.right_secs}
    elif args.mode == "cache-aware" and args.chunk_frames:
        stream = {"chunk_frames": args.chunk_frames}
    try:
        with torch.inference_mode():
            hyps = transcribe(model, audios, args.mode, args.batch_size, att, **stream)
    except ValueError as e:  # e.g. cache-aware mode on a model not trained for it, bad stream parameters
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    refs = [e["text"] for e in entries]
    summary = score(refs, hyps)
    summary.update(model=model.name, mode=args.mode, stream_params=stream or None, utterances=len(entries), audio_seconds=round(seconds, 2),
                   wall_seconds=round(wall, 3), rtfx=round(seconds / wall, 1) if wall > 0 else None)
    rows = []
    for e, r, h in zip(entries, refs, hyps):
        c = error_counts([r], [h])
        rows.append({"audio_filepath": e["audio_filepath"], "ref": normalize_text(r), "hyp": normalize_text(h),
                     "word_errors": c["word_errors"], "words": c["words"],
                     "diff": word_diff(normalize_text(r), normalize_text(h))})
    if args.report:
        Path(args.report).write_text("".join(json.dumps(r) + "\n" for r in rows))
    gates = []
    if args.max_wer is not None:
        gates.append(("WER", summary["wer"] * 100, args.max_wer))
    if args.max_cer is not None:
        gates.append(("CER", summary["cer"] * 100, args.max_cer))
    failed = [g for g in gates if g[1] > g[2]]
    summary["gates"] = {name: {"value": round(v, 3), "max": m, "pass": v <= m} for name, v, m in gates}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        bad = [r for r in rows if r["word_errors"]]
        for r in sorted(bad, key=lambda r: -r["word_errors"])[: args.show_errors]:
            print(f"{Path(r['audio_filepath']).name}: {r['word_errors']}/{r['words']}  {r['diff']}")
        label = args.mode
        if args.mode == "buffered":
            label += f" {args.left_secs:g}/{args.chunk_secs:g}/{args.right_secs:g} s"
        elif att is not None:
            label += f" att {att[0]},{att[1]}"
        print(f"{summary['model']} [{label}] on {len(entries)} utterances ({seconds:.0f} s): "
              f"WER {summary['wer'] * 100:.2f} %  CER {summary['cer'] * 100:.2f} %  RTFx {summary['rtfx']}  "
              f"({len(bad)} utterances with errors; scorer {summary['scorer']})")
        for name, v, m in gates:
            print(f"gate {name} {v:.2f} % <= {m} %: {'PASS' if v <= m else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    a = p.parse_args(["eval", *sys.argv[1:]])
    sys.exit(a.func(a))
