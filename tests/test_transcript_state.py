"""Transcript state of live captions: committed text never changes, revisions are exactly the changed suffix,
token-level LCP matches brute force, strict commits reproduce the engine's final transcript."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from trt_asr.captions.transcript import CommitPolicy, Hypothesis, Token, TranscriptState, join_finals, lcp

VOCAB = 6  # small vocabulary: many collisions, so LCPs of all lengths occur


def brute_lcp(a, b) -> int:
    return max(k for k in range(min(len(a), len(b)) + 1) if [t.id for t in a[:k]] == [t.id for t in b[:k]])


def toks(ids, start_frame=0, word_starts=None):
    """Tokens at consecutive frames; ids 0, 2, 4 begin a word (as "▁x" pieces), 1, 3, 5 continue one."""
    out = []
    for i, x in enumerate(ids):
        f = start_frame + i
        ws = x % 2 == 0
        out.append(Token(x, f * 0.08, (f + 1) * 0.08, ws, ("\u2581" if ws else "") + "abcdef"[x % 6]))
    return out


token_ids = st.lists(st.integers(0, VOCAB - 1), max_size=12)


@given(token_ids, token_ids)
def test_lcp_matches_brute_force(a, b):
    ta, tb = toks(a), toks(b)
    assert lcp(ta, tb) == brute_lcp(ta, tb)
    assert lcp(ta, tb) == lcp(tb, ta)
    assert lcp(ta, ta) == len(ta)


policies = st.one_of(
    st.just(CommitPolicy.strict()),
    st.builds(CommitPolicy,
              commit_age_ms=st.one_of(st.none(), st.floats(0, 2000)),
              commit_after_updates=st.one_of(st.none(), st.integers(0, 5)),
              commit_on_endpoint=st.booleans(),
              max_segment_s=st.floats(0.1, 5.0),
              max_segment_chars=st.integers(1, 40)))


@st.composite
def hypothesis_streams(draw):
    """A 'true' transcript; each update reveals a longer prefix as engine-final, shows a noisy tentative tail,
    and sometimes (revise=True) rewrites tokens the caption layer may already have committed."""
    n = draw(st.integers(0, 30))
    truth = draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n))
    starts = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    steps = []
    final = 0
    for _ in range(draw(st.integers(1, 10))):
        final = min(n, final + draw(st.integers(0, 5)))
        noise = draw(st.lists(st.integers(0, VOCAB - 1), max_size=5))
        keep_true = draw(st.integers(0, n - final))
        tail_ids = truth[final:final + keep_true] + noise
        revise = draw(st.booleans()) and draw(st.booleans())
        ids = truth[:final] + tail_ids
        ws = starts[:final] + [draw(st.booleans()) for _ in tail_ids]
        if revise and ids:  # the engine rewrites history (what a time-based commit may have taken)
            i = draw(st.integers(0, len(ids) - 1))
            ids = ids[:i] + [(ids[i] + 1) % VOCAB] + ids[i + 1:]
        timed = draw(st.one_of(st.none(), st.floats(0, len(ids) * 0.08 + 0.5)))
        steps.append((ids, ws, final if not revise else 0, draw(st.booleans()),
                      len(ids) * 0.08 + draw(st.floats(0, 2)), timed))
    return truth, starts, steps


@settings(max_examples=300, deadline=None)
@given(hypothesis_streams(), policies)
def test_committed_text_never_changes(stream, policy):
    truth, starts, steps = stream
    state = TranscriptState(policy=policy)
    seen_committed: list[Token] = []
    seen_segments = []
    shown_tail: list[Token] = []
    for ids, ws, final, endpoint, edge, timed in steps:
        if timed is not None:
            state.add_endpoint(timed)
        hyp = Hypothesis(toks(ids, 0, ws), final, edge, final_until=final * 0.08)
        pending = len(state._endpoints)
        upd = state.update(hyp, endpoint=endpoint)
        timed_closed = len(state._endpoints) < pending
        # committed tokens only ever grow by appending
        assert state.committed[:len(seen_committed)] == seen_committed
        assert state.committed[len(seen_committed):] == upd.newly_committed
        seen_committed = list(state.committed)
        # closed segments never change; segments tile the committed tokens in order
        assert [s.text for s in state.segments[:len(seen_segments)]] == seen_segments
        seen_segments = [s.text for s in state.segments]
        tiled = [t for s in state.segments for t in s.tokens] + state.open_segment
        assert tiled == state.committed
        # the revision is exactly the changed suffix of what was shown
        rev = upd.revision
        assert rev.keep + rev.removed == len(shown_tail)
        new_tail_before_commit = shown_tail[:rev.keep] + rev.added
        assert new_tail_before_commit[:len(upd.newly_committed)] == upd.newly_committed
        shown_tail = state.tail
        assert new_tail_before_commit[len(upd.newly_committed):] == state.tail
        # commits that are not forced (end / endpoint) stop at word boundaries
        if upd.newly_committed and state.tail and not endpoint and not timed_closed:
            assert state.tail[0].word_start
        # the partial events' stable words (kept between updates) are the open segment's words decoded afresh
        assert state.stable_word_dicts() == [{**w.as_dict(), "stable": True} for w in state.words(state.open_segment)]
    last = Hypothesis(toks(truth, 0, starts), len(truth), len(truth) * 0.08 + 1, is_last=True)
    upd = state.update(last)
    assert state.committed[:len(seen_committed)] == seen_committed
    assert state.tail == [] and state.open_segment == []
    assert [t for s in state.segments for t in s.tokens] == state.committed
    assert all(s.text for s in state.segments)
    assert state.ended and (not upd.finals or upd.finals[-1].reason == "end")


@settings(max_examples=200, deadline=None)
@given(hypothesis_streams())
def test_strict_policy_commits_exactly_the_engine_transcript(stream):
    """With engine-consistent hypotheses and the strict policy, finals == the engine's final transcript."""
    truth, starts, steps = stream
    state = TranscriptState(policy=CommitPolicy.strict())
    for ids, ws, final, endpoint, edge, timed in steps:
        if timed is not None:
            state.add_endpoint(timed)
        # engine-consistent: the final part is the truth; drop steps that rewrote history
        if ids[:final] != truth[:final]:
            continue
        state.update(Hypothesis(toks(ids, 0, starts[:final] + ws[final:]), final, edge, final_until=final * 0.08),
                     endpoint)
        assert [t.id for t in state.committed] == truth[:len(state.committed)]
    state.update(Hypothesis(toks(truth, 0, starts), len(truth), len(truth) * 0.08, is_last=True))
    assert [t.id for t in state.committed] == truth
    assert join_finals(state.segments) == state.decode(toks(truth, 0, starts))


def test_revision_rate_and_partial_texts():
    s = TranscriptState(policy=CommitPolicy.strict())
    s.update(Hypothesis(toks([0, 2, 4]), 0, 0.3))
    assert s.unstable_text == "a c e" and s.stable_text == ""
    u = s.update(Hypothesis(toks([0, 2, 1, 4]), 3, 0.4))  # "a", "cb" final and complete (next word started)
    assert (u.revision.keep, u.revision.removed, [t.id for t in u.revision.added]) == (2, 1, [1, 4])
    assert s.stable_text == "a cb" and s.unstable_text == "e"
    assert s.revision_rate == 1 / 5
    u = s.update(Hypothesis(toks([0, 2, 1, 4, 5]), 4, 0.5))  # "e" final, but "ef" may continue: wait
    assert s.stable_text == "a cb" and s.unstable_text == "ef"
    u = s.update(Hypothesis(toks([0, 2, 1, 4, 5]), 5, 0.5, is_last=True))
    assert [seg.text for seg in u.finals] == ["a cb ef"]


def test_divergent_engine_never_rewrites_committed_text():
    s = TranscriptState(policy=CommitPolicy(commit_age_ms=0, commit_after_updates=None))
    s.update(Hypothesis(toks([0, 2, 4, 0]), 0, 5.0))  # everything is "old": committed by age, but the last
    assert [t.id for t in s.committed] == [0, 2, 4]  # word waits (it may continue)
    s.update(Hypothesis(toks([1, 1, 1, 2, 4]), 0, 5.0))  # the engine changed its mind about the start
    assert [t.id for t in s.committed][:3] == [0, 2, 4]
    assert [t.id for t in s.committed[3:] + s.tail] == [2, 4]  # only tokens after the committed end are used


def test_timed_endpoint_closes_the_segment_once_final():
    s = TranscriptState(policy=CommitPolicy.strict())
    s.update(Hypothesis(toks([0, 2, 4]), 3, 0.3, final_until=0.24))
    assert s.stable_text == "a c" and s.unstable_text == "e"  # the last word may still continue
    s.add_endpoint(0.5)  # the VAD saw the utterance end at 0.5 s
    u = s.update(Hypothesis(toks([0, 2, 4]), 3, 0.45, final_until=0.4))
    assert not u.finals  # the engine has not finalised up to 0.5 s yet
    later = toks([0, 2, 4]) + toks([0, 2], start_frame=10)
    u = s.update(Hypothesis(later, 3, 1.0, final_until=0.6))
    assert [(f.text, f.reason) for f in u.finals] == [("a c e", "endpoint")]
    assert s.stable_text == "" and s.unstable_text == "a c"
