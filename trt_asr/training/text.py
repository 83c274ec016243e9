"""Deterministic English text for the demo model: varied sentences over a fixed vocabulary (vocab.txt: ~2600
everyday words, ~200 names) plus numbers, times, dates and money spelled out as words.

Transcripts are lower-case words separated by single spaces, no punctuation: exactly what is spoken (espeak-ng
reads the same string)."""

from __future__ import annotations

import random
from functools import lru_cache
from importlib import resources

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
       "seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ORDINALS = "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth " \
           "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth".split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = "january february march april may june july august september october november december".split()


def number_words(n: int) -> str:
    """0 <= n < 1,000,000 in words, no "and": 2305 -> "two thousand three hundred five"."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    return number_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))


def ordinal_words(n: int) -> str:
    if n <= 20:
        return ORDINALS[n - 1]
    tens = TENS[n // 10]
    if n % 10 == 0:
        return tens[:-1] + "ieth"
    return tens + " " + ORDINALS[n % 10 - 1]


@lru_cache(maxsize=1)
def vocabulary() -> dict[str, list[str]]:
    text = resources.files("trt_asr.training").joinpath("vocab.txt").read_text()
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            current.append(line)
    return sections


def all_words() -> set[str]:
    """Every word the generator can produce."""
    v = vocabulary()
    out = set(v["words"]) | set(v["names"]) | set(ONES) | set(TENS[2:]) | set(ORDINALS) | set(DAYS) | set(MONTHS)
    out |= {"hundred", "thousand", "dollars", "cents", "percent", "oclock", "twentieth", "thirtieth", "point"}
    return out


class SentenceGenerator:
    """Seeded sentence source. Mixes frequency-weighted word sequences with number/name/date patterns."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        v = vocabulary()
        self.words, self.names = v["words"], v["names"]
        # flattened Zipf weights: common words often, rare words still a few times per thousand sentences
        self.weights = [1.0 / (r + 30) ** 0.7 for r in range(len(self.words))]

    def _words(self, lo: int, hi: int) -> list[str]:
        return self.rng.choices(self.words, weights=self.weights, k=self.rng.randint(lo, hi))

    def _number(self) -> str:
        r = self.rng.random()
        if r < 0.4:
            return number_words(self.rng.randint(0, 99))
        if r < 0.7:
            return number_words(self.rng.randint(100, 999))
        if r < 0.85:
            return number_words(self.rng.randint(1000, 9999))
        return number_words(self.rng.randint(10000, 999999))

    def _name(self) -> str:
        return self.rng.choice(self.names)

    def _time(self) -> str:
        h, m = self.rng.randint(1, 12), self.rng.choice([0, 5, 10, 15, 20, 30, 40, 45, 50, self.rng.randint(1, 59)])
        if m == 0:
            return number_words(h) + " oclock"
        return number_words(h) + " " + (("oh " + ONES[m]) if m < 10 else number_words(m))

    def _date(self) -> str:
        return self.rng.choice([
            f"{self.rng.choice(DAYS)} {self.rng.choice(MONTHS)} {ordinal_words(self.rng.randint(1, 31))}",
            f"{self.rng.choice(MONTHS)} {ordinal_words(self.rng.randint(1, 31))}",
            f"{self.rng.choice(DAYS)}",
        ])

    def sentence(self) -> str:
        r = self.rng.random()
        w = lambda lo, hi: " ".join(self._words(lo, hi))  # noqa: E731
        if r < 0.55:
            parts = [w(3, 14)]
        elif r < 0.65:
            parts = [self._name(), w(2, 8), self._name() if self.rng.random() < 0.5 else self._number(), w(0, 4)]
        elif r < 0.75:
            parts = [w(1, 6), self._number(), w(1, 6)]
        elif r < 0.82:
            parts = [w(1, 5), "at", self._time(), "on", self._date(), w(0, 3)]
        elif r < 0.88:
            money = f"{self._number()} dollars" + (f" and {number_words(self.rng.randint(1, 99))} cents"
                                                  if self.rng.random() < 0.3 else "")
            parts = [self._name(), w(1, 4), money]
        elif r < 0.93:
            parts = [w(1, 5), self._number(), "percent", w(0, 4)]
        elif r < 0.97:
            digits = " ".join(ONES[self.rng.randint(0, 9)] for _ in range(self.rng.randint(3, 7)))
            parts = [w(1, 4), digits, w(0, 3)]
        else:
            parts = [self._name(), self._name(), w(1, 6), self._date()]
        text = " ".join(p for p in parts if p)
        words = text.split()
        if len(words) > 24:
            words = words[:24]
        return " ".join(words)

    def sentences(self, n: int, exclude: set[str] | None = None) -> list[str]:
        out, seen = [], set(exclude or ())
        while len(out) < n:
            s = self.sentence()
            if s not in seen:
                seen.add(s)
                out.append(s)
        return out
