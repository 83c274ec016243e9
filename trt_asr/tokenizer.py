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

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else ""

    def starts_word(self, i: int) -> bool:
        return 0 <= i < self.vocab_size and self._starts_word[i]

    @property
    def model_bytes(self) -> bytes:
        return self.path.read_bytes()
