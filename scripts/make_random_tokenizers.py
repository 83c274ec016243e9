"""Build the SentencePiece BPE models shipped for random-weight presets (vocab 8192 like v3, 128 for tiny).

The text is pseudo-English generated from a fixed seed; these tokenizers only make random-weight models decodable.
Usage: python scripts/make_random_tokenizers.py   (writes trt_asr/assets/random-bpe-{8192,128}.model)
"""
import io
import random
from pathlib import Path

import sentencepiece as spm

ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y", "z",
          "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "sh", "sl", "sm", "sn", "sp",
          "st", "str", "th", "tr", "wh"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "ie", "oa", "y"]
CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "st", "ck", "ld", "rk", "sh", "th", "x"]


def corpus(seed: int, n_words: int, n_sentences: int) -> str:
    rng = random.Random(seed)
    words = set()
    while len(words) < n_words:
        words.add("".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                          for _ in range(rng.choice([1, 1, 2, 2, 3, 4]))))
    words = sorted(words)
    lines = []
    for _ in range(n_sentences):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))))
    return "\n".join(lines)


def main():
    out = Path(__file__).resolve().parent.parent / "trt_asr" / "assets"
    out.mkdir(parents=True, exist_ok=True)
    for vocab, n_words in ((8192, 40000), (128, 2000)):
        text = corpus(seed=vocab, n_words=n_words, n_sentences=60000 if vocab > 1000 else 5000)
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=model,
                                       vocab_size=vocab, model_type="bpe", character_coverage=1.0,
                                       num_threads=1, minloglevel=2)
        (out / f"random-bpe-{vocab}.model").write_bytes(model.getvalue())
        print(vocab, len(model.getvalue()), "bytes")


if __name__ == "__main__":
    main()
