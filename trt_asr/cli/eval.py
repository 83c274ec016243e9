"""``trt-asr eval --manifest M.jsonl``: WER / CER / RTFx of a model on a NeMo-style manifest, with a per-utterance
diff report and gates (exit code 1 when --max-wer / --max-cer fail).

Text normalisation before scoring (``trt_asr.training.metrics.normalize_text``): lower-case, apostrophes removed,
every other non-alphanumeric character -> space, whitespace collapsed. WER/CER are corpus-level (total edits /
total reference words or characters), computed with jiwer when installed, else with the built-in edit distance
(same numbers).

Modes: ``offline`` (whole utterances, batched greedy decoding). ``buffered`` / ``cache-aware`` call
``trt_asr.streaming.transcribe_arrays(model, audios, mode=..., **options)`` when the streaming package provides it.
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
    p.add_argument("--model", default=None, help="a .nemo file / folder / repo id (default: the shipped demo model)")
    p.add_argument("--mode", default="offline", choices=MODES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=0, help="only the first N utterances")
    p.add_argument("--att-context", default=None, help="L,R attention context (cache-aware models)")
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


def transcribe(model, audios, mode: str, batch_size: int, att_context=None) -> list[str]:
    if mode == "offline":
        from ..training.infer import transcribe_arrays
        return transcribe_arrays(model, audios, batch_size=batch_size, att_context_size=att_context)
    try:  # hook for the streaming package
        from .. import streaming
        fn = getattr(streaming, "transcribe_arrays")
    except (ImportError, AttributeError):
        raise SystemExit(f"mode {mode!r} needs trt_asr.streaming.transcribe_arrays(model, audios, mode=...), "
                         f"which this build does not provide yet") from None
    return fn(model, audios, mode=mode, att_context_size=att_context)


def run(args) -> int:
    import torch

    from ..checkpoint import load_model
    from ..training.data import read_manifest
    from ..training.metrics import error_counts, normalize_text

    entries = read_manifest(args.manifest)
    if args.limit:
        entries = entries[: args.limit]
    model = load_model(args.model, device=args.device)
    att = [int(v) for v in args.att_context.split(",")] if args.att_context else None
    audios = [load_audio(e["audio_filepath"], model.cfg.sample_rate) for e in entries]
    seconds = sum(len(a) for a in audios) / model.cfg.sample_rate
    t0 = time.perf_counter()
    with torch.inference_mode():
        hyps = transcribe(model, audios, args.mode, args.batch_size, att)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    refs = [e["text"] for e in entries]
    summary = score(refs, hyps)
    summary.update(model=model.name, mode=args.mode, utterances=len(entries), audio_seconds=round(seconds, 2),
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
        print(f"{summary['model']} [{args.mode}] on {len(entries)} utterances ({seconds:.0f} s): "
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
