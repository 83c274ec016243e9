"""The incremental decoder of a live stream's committed text equals decoding all ids at once (brute force), for the
shipped tokenizers, on arbitrary id sequences split into arbitrary steps."""

from __future__ import annotations

from importlib import resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trt_asr.checkpoint import load_model
from trt_asr.tokenizer import Tokenizer

ASSETS = resources.files("trt_asr.assets")
TOKENIZERS = {name: Tokenizer(ASSETS.joinpath(name)) for name in ("random-bpe-128.model", "random-bpe-8192.model")}
TOKENIZERS["demo"] = load_model(str(ASSETS.joinpath("demo-tdt-buffered.nemo"))).tokenizer


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_incremental_equals_decode_all(name, data):
    tok = TOKENIZERS[name]
    # ids: mostly real pieces, some special ones (0 = <unk>, control/byte pieces where present), some out of range
    ids = data.draw(st.lists(st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from([0, 1, 2, 3]),
                                       st.integers(tok.vocab_size, tok.vocab_size + 2)), max_size=60))
    steps = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=30))
    inc = tok.incremental()
    pos = 0
    for n in steps + [len(ids)]:
        inc.extend(ids[pos:pos + n])
        pos += n
        assert inc.text == tok.decode(ids[:pos]), ids[:pos]


def test_real_text_round_trip():
    tok = TOKENIZERS["demo"]
    ids = tok.encode("please call david at seven oclock on friday morning")
    inc = tok.incremental()
    for i in ids:
        inc.extend([i])
    assert inc.text == "please call david at seven oclock on friday morning"
