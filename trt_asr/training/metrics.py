"""Word/character error rates with a documented normalisation (no dependency; ``jiwer`` gives the same numbers).

Normalisation (``normalize_text``): lower-case; apostrophes removed ("o'clock" -> "oclock"); every other character
that is not a letter or digit becomes a space; runs of spaces collapse. The demo model's transcripts are already in
this form."""

from __future__ import annotations

import re


def normalize_text(text: str) -> str:
    text = text.lower().replace("'", "").replace("\u2019", "")
    text = re.sub(r"[^0-9a-z\u00c0-\u024f]+", " ", text)
    return " ".join(text.split())


def edit_distance(ref: list, hyp: list) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def error_counts(refs: list[str], hyps: list[str]) -> dict:
    """Totals over a corpus: word errors / reference words, char errors / reference chars (normalised text)."""
    we = wn = ce = cn = 0
    for r, h in zip(refs, hyps):
        r, h = normalize_text(r), normalize_text(h)
        we += edit_distance(r.split(), h.split())
        wn += len(r.split())
        ce += edit_distance(list(r), list(h))
        cn += len(r)
    return {"wer": we / max(wn, 1), "cer": ce / max(cn, 1), "word_errors": we, "words": wn,
            "char_errors": ce, "chars": cn}


def wer(refs: list[str], hyps: list[str]) -> float:
    return error_counts(refs, hyps)["wer"]
