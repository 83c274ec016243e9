"""Composite training examples (scripts/train_demo.py --composites): utterances joined by pauses, exactly as
described, deterministic, within bounds."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from trt_asr.training.data import SAMPLE_RATE, assemble_example, compose_examples


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 12 * SAMPLE_RATE), min_size=4, max_size=40), st.integers(0, 60),
       st.integers(0, 2**31 - 1), st.floats(5.0, 30.0))
def test_composites_are_bounded_and_deterministic(lengths, n, seed, max_seconds):
    lengths = np.array(lengths)
    ex = compose_examples(lengths, n, seed, max_seconds=max_seconds)
    assert ex == compose_examples(lengths, n, seed, max_seconds=max_seconds)
    assert ex[: len(lengths)] == [([i], []) for i in range(len(lengths))]
    assert len(ex) == len(lengths) + n
    for idx, pauses in ex[len(lengths):]:
        assert 1 <= len(idx) <= 4 and len(pauses) == len(idx) - 1
        assert len(set(idx)) == len(idx) and all(0 <= i < len(lengths) for i in idx)
        assert all(0.3 * SAMPLE_RATE - 1 <= p <= 3.0 * SAMPLE_RATE for p in pauses)
        total = int(lengths[idx].sum()) + sum(pauses)
        assert total <= max_seconds * SAMPLE_RATE or len(idx) == 1  # one long utterance stays as it is


def test_assembled_audio_is_the_utterances_with_silent_pauses():
    rng = np.random.default_rng(0)
    pieces = [rng.integers(-3000, 3000, size=n).astype(np.int16) for n in (5, 3, 7)]
    x = assemble_example(pieces, [4, 2])
    assert x.dtype == np.int16 and len(x) == 5 + 4 + 3 + 2 + 7
    assert np.array_equal(x[:5], pieces[0]) and not x[5:9].any()
    assert np.array_equal(x[9:12], pieces[1]) and not x[12:14].any() and np.array_equal(x[14:], pieces[2])
    assert np.array_equal(assemble_example(pieces[:1], []), pieces[0])
