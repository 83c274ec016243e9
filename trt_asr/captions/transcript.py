"""Transcript state for live captions: a *committed prefix* that never changes plus a *revisable suffix*.

Every recognizer update brings a hypothesis for the whole stream (tokens with absolute times, and how many leading
tokens the engine itself guarantees final). ``TranscriptState.update``

1. splices the hypothesis onto the committed prefix (tokens already committed are never taken back: if the engine's
   hypothesis disagrees with them, only its tokens that start after the committed end are used),
2. compares the new revisable tail with the previous one (token-level longest common prefix) and reports only the
   changed suffix (``Revision``),
3. commits a prefix of the tail under the commit policy: tokens the engine marks final; tokens ending more than
   ``commit_age_ms`` behind the live edge; tokens unchanged for ``commit_after_updates`` updates; everything at an
   endpoint. Commits stop at word boundaries (a word is never split between committed and tentative text) unless
   the whole tail is committed.
4. closes a *segment* (a caption ``final``) at an endpoint or when it grows past ``max_segment_s`` /
   ``max_segment_chars`` (split at a committed word boundary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..tokenizer import WORD_START


@dataclass(frozen=True)
class Token:
    id: int
    start: float  # seconds, absolute stream time
    end: float
    word_start: bool = True  # begins a new word (SentencePiece "▁")
    piece: str = ""

    def same(self, other: "Token") -> bool:
        return self.id == other.id


@dataclass
class Hypothesis:
    """The recognizer's current best guess for the whole stream (or for everything after ``offset`` tokens)."""

    tokens: list[Token]
    final_count: int = 0  # leading tokens the engine guarantees will not change
    audio_end: float = 0.0  # live edge: seconds of audio that produced this hypothesis
    is_last: bool = False  # the stream has ended; everything is final
    final_until: float | None = None  # the engine's output before this time is final (None: unknown)


@dataclass
class Word:
    text: str
    start: float
    end: float
    stable: bool = True

    def as_dict(self) -> dict:
        return {"word": self.text, "start": round(self.start, 3), "end": round(self.end, 3)}


@dataclass
class Revision:
    keep: int  # tokens of the previous tail that are unchanged
    removed: int  # tokens of the previous tail that were replaced
    added: list[Token]  # the new suffix


@dataclass
class Segment:
    id: int
    tokens: list[Token]
    text: str
    start: float
    end: float
    words: list[Word]
    reason: str  # "endpoint", "max_length", "end"
    continues_word: bool = False  # the first token continues the previous segment's last word (join without space)


@dataclass
class Update:
    """What one call to ``TranscriptState.update`` changed."""

    revision: Revision
    newly_committed: list[Token]
    finals: list[Segment]
    changed: bool  # anything visible changed (tail or commits)
    audio_end: float


def join_finals(finals) -> str:
    """The whole transcript from final segments (``Segment`` objects or final events): joined with one space,
    or with none where a segment continues the previous one's last word."""
    out = ""
    for f in finals:
        text, cont = (f["text"], f.get("continues_word", False)) if isinstance(f, dict) else (f.text, f.continues_word)
        out += text if (cont or not out) else " " + text
    return out


def lcp(a: Sequence[Token], b: Sequence[Token]) -> int:
    """Length of the token-level longest common prefix (by token id)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i].id == b[i].id:
        i += 1
    return i


@dataclass
class CommitPolicy:
    commit_age_ms: float | None = 1500.0  # commit tokens ending this far behind the live edge; None: never
    commit_after_updates: int | None = 4  # commit tokens unchanged for this many updates; None: never
    commit_on_endpoint: bool = True
    max_segment_s: float = 8.0  # close a caption segment after this much audio ...
    max_segment_chars: int = 160  # ... or this many characters (at a committed word boundary)

    @classmethod
    def strict(cls) -> "CommitPolicy":
        """Commit only what the engine guarantees final (and everything at the end): committed text is then exactly
        the engine's final transcript."""
        return cls(commit_age_ms=None, commit_after_updates=None, commit_on_endpoint=False)


def default_decode(ids: list[int], tokens: Sequence[Token] = ()) -> str:
    text = "".join(t.piece for t in tokens).replace(WORD_START, " ")
    return " ".join(text.split())


class TranscriptState:
    def __init__(self, decode: Callable[[list[int]], str] | None = None, policy: CommitPolicy | None = None):
        self._decode = decode
        self.policy = policy or CommitPolicy()
        self.committed: list[Token] = []  # everything committed, all segments
        self.segment_start_index = 0  # index into committed where the open segment begins
        self.tail: list[Token] = []  # revisable suffix
        self._stable_updates: list[int] = []  # per tail token: consecutive updates it survived unchanged
        self.segments: list[Segment] = []
        self.updates = 0
        self.revised_tokens = 0  # tail tokens taken back (revision-rate numerator)
        self.emitted_tail_tokens = 0  # tail tokens ever shown (denominator)
        self.audio_end = 0.0
        self.ended = False
        self._endpoints: list[float] = []  # utterance ends (audio time) waiting for the engine to finalise them
        self._decoded: dict[tuple[int, ...], str] = {}  # token ids -> decoded text (bounded)
        self._stable_words: list | None = None  # stable_word_dicts' words of the open segment so far

    def add_endpoint(self, time: float) -> None:
        """An utterance ended at ``time`` (e.g. the VAD saw silence): the open segment closes there as soon as
        everything before ``time`` is final (or at once under a policy that commits at endpoints)."""
        self._endpoints.append(time)
        self._endpoints.sort()

    # ------------------------------------------------------------------ text helpers
    def decode(self, tokens: Sequence[Token]) -> str:
        if not tokens:
            return ""
        if self._decode is None:
            return default_decode([t.id for t in tokens], tokens)
        # every update decodes the open segment, the tail and each word again, nearly all unchanged since the last
        # update; a SentencePiece call costs tens of microseconds, a dict lookup well under one
        key = tuple(t.id for t in tokens)
        text = self._decoded.get(key)
        if text is None:
            if len(self._decoded) >= 512:
                self._decoded.clear()
            text = self._decoded[key] = " ".join(self._decode(list(key)).split())
        return text

    def words(self, tokens: Sequence[Token], stable: bool = True) -> list[Word]:
        groups: list[list[Token]] = []
        for t in tokens:
            if not groups or (t.word_start and groups[-1]):
                groups.append([t])
            else:
                groups[-1].append(t)
        out = []
        for g in groups:
            w = self._word(g, stable)
            if w is not None:
                out.append(w)
        return out

    def _word(self, group: Sequence[Token], stable: bool = True) -> Word | None:
        text = self.decode(group)
        return Word(text, group[0].start, max(group[-1].end, group[0].start), stable) if text else None

    def stable_word_dicts(self) -> list[dict]:
        """The open segment's words as a partial event lists them (``as_dict`` with ``stable: True``): the same as
        ``words(open_segment)``. Every partial lists the whole open segment, so the words before its last are kept
        between calls: within a segment committed tokens only grow, and a word followed by a word start is done."""
        start, toks = self.segment_start_index, self.committed
        cache = self._stable_words
        if cache is None or cache[0] != start:  # [segment start, first token after the cached words, their dicts]
            cache = self._stable_words = [start, start, []]
        n = len(toks)
        if n <= start:
            return []
        last = n - 1  # the last word's first token (a word start, or the segment's first token)
        while last > start and not toks[last].word_start:
            last -= 1
        i = cache[1]
        while i < last:  # words that are now followed by another word start: decode them once
            j = i + 1
            while j < last and not toks[j].word_start:
                j += 1
            w = self._word(toks[i:j])
            if w is not None:
                cache[2].append({**w.as_dict(), "stable": True})
            i = cache[1] = j
        out = list(cache[2])
        w = self._word(toks[last:])
        if w is not None:
            out.append({**w.as_dict(), "stable": True})
        return out

    @property
    def open_segment(self) -> list[Token]:
        return self.committed[self.segment_start_index:]

    @property
    def stable_text(self) -> str:
        return self.decode(self.open_segment)

    @property
    def unstable_text(self) -> str:
        return self.decode(self.tail)

    @property
    def committed_text(self) -> str:
        return self.decode(self.committed)

    @property
    def revision_rate(self) -> float:
        return self.revised_tokens / self.emitted_tail_tokens if self.emitted_tail_tokens else 0.0

    # ------------------------------------------------------------------ splice
    def _splice(self, hyp: Hypothesis) -> tuple[list[Token], int]:
        """The part of the hypothesis after the committed prefix, and how many of those tokens are engine-final."""
        tokens = hyp.tokens
        n = len(self.committed)
        # fast path (long streams): the engine kept our committed prefix if it still has our last committed token
        # at the same place; engines never change final tokens, so only a mismatch needs the full comparison
        same_end = n == 0 or (len(tokens) >= n and tokens[n - 1].id == self.committed[n - 1].id
                              and tokens[n - 1].start == self.committed[n - 1].start)
        if same_end and (hyp.final_count >= n or lcp(tokens, self.committed) >= n):
            rest = tokens[n:]
            final = max(0, hyp.final_count - n)
        else:  # the engine revised committed text (e.g. a time-based commit): keep ours, take its later tokens
            edge = self.committed[-1].end if self.committed else 0.0
            first = next((i for i, t in enumerate(tokens) if t.start >= edge - 1e-6), len(tokens))
            rest = tokens[first:]
            final = max(0, hyp.final_count - first)
        if hyp.is_last:
            final = len(rest)
        return rest, min(final, len(rest))

    # ------------------------------------------------------------------ update
    def update(self, hyp: Hypothesis, endpoint: bool = False) -> Update:
        if self.ended:
            raise RuntimeError("transcript already ended")
        self.updates += 1
        self.audio_end = max(self.audio_end, hyp.audio_end)
        new_tail, engine_final = self._splice(hyp)
        keep = lcp(self.tail, new_tail)
        removed = len(self.tail) - keep
        self.revised_tokens += removed
        self.emitted_tail_tokens += len(new_tail) - keep
        revision = Revision(keep, removed, new_tail[keep:])
        stable = [c + 1 for c in self._stable_updates[:keep]] + [0] * (len(new_tail) - keep)
        self.tail, self._stable_updates = new_tail, stable

        # ---- commit a prefix of the tail
        p = self.policy
        everything = hyp.is_last or (endpoint and p.commit_on_endpoint)
        n_commit = len(self.tail) if everything else engine_final
        if not everything:
            i = n_commit
            while i < len(self.tail):
                t = self.tail[i]
                old = p.commit_age_ms is not None and (self.audio_end - t.end) * 1000.0 >= p.commit_age_ms
                settled = p.commit_after_updates is not None and self._stable_updates[i] >= p.commit_after_updates
                if not (old or settled):
                    break
                i += 1
            # stop at a word boundary: the token after the committed prefix must start a word; at the end of the
            # tail the next token is unknown, so the last word waits (except at an endpoint: silence ends words)
            while i > 0 and ((i < len(self.tail) and not self.tail[i].word_start) or
                             (i == len(self.tail) and not endpoint)):
                i -= 1
            n_commit = i
        newly = self.tail[:n_commit]
        if newly:
            self.committed.extend(newly)
            self.tail = self.tail[n_commit:]
            self._stable_updates = self._stable_updates[n_commit:]
        finals = []
        # ---- timed endpoints: close the open segment at T once the engine finalised everything before T
        while self._endpoints and not hyp.is_last:
            t_end = self._endpoints[0]
            ready = hyp.final_until is not None and hyp.final_until >= t_end
            if not (ready or p.commit_on_endpoint):
                break
            self._endpoints.pop(0)
            k = 0
            while k < len(self.tail) and self.tail[k].start < t_end:
                k += 1
            if k:  # final (held back only for a word boundary) or committed by the endpoint policy
                newly = newly + self.tail[:k]
                self.committed.extend(self.tail[:k])
                self.tail = self.tail[k:]
                self._stable_updates = self._stable_updates[k:]
            seg = self.open_segment
            cut = 0
            while cut < len(seg) and seg[cut].start < t_end:
                cut += 1
            if cut:
                finals += self._close(cut, "endpoint")
        if hyp.is_last:
            finals += self._close_segments(force=True, reason="end")
            self.ended = True
        elif endpoint and (p.commit_on_endpoint or not self.tail):
            finals += self._close_segments(force=True, reason="endpoint")
        else:
            finals += self._close_segments(force=False, reason="max_length")
        changed = bool(revision.added or revision.removed or newly or finals)
        return Update(revision, newly, finals, changed, self.audio_end)

    def _close_segments(self, force: bool, reason: str) -> list[Segment]:
        out = []
        while True:
            seg = self.open_segment
            if not seg:
                return out
            if force:
                cut = len(seg)
            else:
                p = self.policy
                too_long = (seg[-1].end - seg[0].start > p.max_segment_s) or len(self.decode(seg)) > p.max_segment_chars
                if not too_long:
                    return out
                # the longest prefix within the limits that ends on a word boundary (at least one word)
                cut = 0
                for i in range(1, len(seg) + 1):
                    nxt_ok = i == len(seg) and (not self.tail or self.tail[0].word_start) or \
                        (i < len(seg) and seg[i].word_start)
                    if not nxt_ok:
                        continue
                    within = seg[i - 1].end - seg[0].start <= p.max_segment_s and \
                        len(self.decode(seg[:i])) <= p.max_segment_chars
                    if within or cut == 0:
                        cut = i
                    if not within:
                        break
                if cut == 0:
                    return out
            out += self._close(cut, reason)
            if force:
                return out

    def _close(self, cut: int, reason: str) -> list[Segment]:
        """Close the first ``cut`` tokens of the open segment as a final segment."""
        toks = self.open_segment[:cut]
        self.segment_start_index += cut
        text = self.decode(toks)
        if not toks or not text:
            return []
        s = Segment(len(self.segments), toks, text, toks[0].start, max(toks[-1].end, toks[0].start),
                    self.words(toks), reason, bool(self.segments) and not toks[0].word_start)
        self.segments.append(s)
        return [s]
