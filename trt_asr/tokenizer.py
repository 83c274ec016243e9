"""SentencePiece tokenizer: ids -> text, and the word boundaries ("▁") used for word timestamps."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

WORD_START = "\u2581"


class Tokenizer:
    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = self.sp.get_piece_size()
        self._starts_word = [self.sp.id_to_piece(i).startswith(WORD_START) for i in range(self.vocab_size)]
        # pieces after which decoding may be cut: a normal piece "▁x..." (not a lone "▁", byte, unknown or control)
        self._cut_before = [self._starts_word[i] and len(self.sp.id_to_piece(i)) > 1
                            and not (self.sp.is_byte(i) or self.sp.is_unknown(i) or self.sp.is_control(i)
                                     or self.sp.is_unused(i)) for i in range(self.vocab_size)]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])

    def incremental(self) -> "IncrementalDecoder":
        """A decoder of a growing id list whose ``text`` equals ``decode(all ids)`` at a cost per update that does
        not grow with the stream (a live stream's committed text is re-rendered after every step)."""
        return IncrementalDecoder(self)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else ""

    def starts_word(self, i: int) -> bool:
        return 0 <= i < self.vocab_size and self._starts_word[i]

    @property
    def model_bytes(self) -> bytes:
        return self.path.read_bytes()


class IncrementalDecoder:
    """``text`` == ``tokenizer.decode(ids)`` for the ids appended so far. SentencePiece renders "▁" as a space and
    drops the first one, so cutting before a normal word-start piece gives decode(A + B) == decode(A) + " " +
    decode(B) whenever decode(A) is not empty: the text before the last such cut is kept, only the rest (the word
    being spelled) is decoded again."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self._done = ""              # decode(ids[:cut]); not empty once cut > 0
        self._cut = 0
        self._tail: list[int] = []   # ids[cut:]; starts with a cut point once cut > 0
        self._text: str | None = ""  # text as of the last extend (None: to be decoded)

    def extend(self, ids) -> str:
        tok = self.tok
        n = len(self._tail)
        self._tail.extend(i for i in ids if 0 <= i < tok.vocab_size)  # decode() skips the others too
        if len(self._tail) == n:  # nothing new (most streaming steps): the text is unchanged
            return self.text
        self._text = None
        for k in range(len(self._tail) - 1, 0, -1):  # the last cut point after the tail's first id
            if tok._cut_before[self._tail[k]]:
                head = tok.sp.decode(self._tail[:k])
                if self._cut == 0:
                    if not head:  # nothing rendered yet (e.g. a lone "▁"): keep decoding from the start
                        break
                    self._done = head
                else:
                    self._done += " " + head
                self._cut += k
                self._tail = self._tail[k:]
                break
        return self.text

    @property
    def text(self) -> str:
        if self._text is None:
            tail = self.tok.sp.decode(self._tail) if self._tail else ""
            self._text = f"{self._done} {tail}" if self._done else tail
        return self._text
