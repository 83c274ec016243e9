"""Buffered streaming == NeMo's buffered streaming (speech_to_text_streaming_infer_rnnt.py) token for token, and ==
offline decoding when one window covers the file.

The NeMo reference below re-runs the script's loop with NeMo's own pieces (StreamingBatchedAudioBuffer, the
preprocessor + ConformerEncoder as ``asr_model(input_signal=buffer)``, the label-looping computer with
``prev_batched_state``), built with our weights (tests/nemo_ref.py).
"""

from __future__ import annotations

import pytest
import torch

from trt_asr.checkpoint import load_model
from trt_asr.config import preset_config, tiny_config
from trt_asr.model.asr import TransducerModel
from trt_asr.model.calibrate import calibrate_random_model, synthetic_audio
from trt_asr.streaming import Recognizer, stream_tokens

torch.set_num_threads(1)
SR = 16000
SPF = 1280  # samples per encoder frame


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny")


@pytest.fixture(scope="module")
def tiny_rnnt():
    """The tiny config as a plain RNNT (no durations): the buffered path must not depend on TDT."""
    cfg = tiny_config()
    cfg.decoding.model_type, cfg.decoding.durations, cfg.joint.num_extra_outputs = "rnnt", [], 0
    cfg.nemo = cfg.to_nemo_dict()
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = TransducerModel(cfg)
        calibrate_random_model(model, seed=0, calib_seconds=3.0)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


@pytest.fixture(scope="module")
def v3_small():
    """The real v3 dimensions (1024-d, 128 mels, 8192+1 vocab, 5 durations), 2 encoder layers, calibrated."""
    cfg = preset_config("parakeet-tdt-0.6b-v3")
    cfg.encoder.n_layers = 2
    cfg.nemo = cfg.to_nemo_dict()
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = TransducerModel(cfg)
        calibrate_random_model(model, seed=0, calib_seconds=3.0)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def audio(seconds: float = None, seed: int = 0, samples: int = None) -> torch.Tensor:
    n = samples if samples is not None else int(seconds * SR)
    return synthetic_audio(n / SR + 0.01, SR, torch.Generator().manual_seed(seed))[:n]


def offline(model, a):
    enc, enc_len = model.encode(a[None], torch.tensor([a.numel()]))
    return model.greedy_decoder()(enc, enc_len)[0].to_lists()[0]


def triples(tokens):
    return [(t.id, t.frame, t.duration) for t in tokens]


# ----------------------------------------------------------------------------------------------- NeMo reference
@torch.inference_mode()
def nemo_buffered(model, audios, left_secs, chunk_secs, right_secs):
    """NeMo's script loop for a batch of audios -> per audio [(label, abs frame, duration)], and the decoder's
    time jumps after each step (to see TDT jumps crossing seams)."""
    pytest.importorskip("nemo.collections.asr")
    from nemo.collections.asr.parts.utils.streaming_utils import ContextSize, StreamingBatchedAudioBuffer
    from torch.nn.utils.rnn import pad_sequence

    from tests.nemo_ref import nemo_encoder, nemo_greedy_computer, nemo_preprocessor

    pre, enc = nemo_preprocessor(model), nemo_encoder(model)
    pre.featurizer.dither, pre.featurizer.pad_to = 0.0, 0  # as the script sets them
    computer = nemo_greedy_computer(model)
    stride, factor = model.cfg.preprocessor.window_stride, model.cfg.encoder.subsampling_factor
    feat2samples = (int(SR * stride) // factor) * factor
    enc2samples = feat2samples * factor
    frames = ContextSize(left=int(left_secs / stride / factor), chunk=int(chunk_secs / stride / factor),
                         right=int(right_secs / stride / factor))
    ctx = ContextSize(left=frames.left * enc2samples, chunk=frames.chunk * enc2samples,
                      right=frames.right * enc2samples)

    audio_batch = pad_sequence(list(audios), batch_first=True)
    lengths = torch.tensor([a.numel() for a in audios])
    out = [[] for _ in audios]
    jumps = []
    state = None
    left_sample, right_sample = 0, min(ctx.chunk + ctx.right, audio_batch.shape[1])
    buffer = StreamingBatchedAudioBuffer(batch_size=len(audios), context_samples=ctx, dtype=torch.float32,
                                         device="cpu")
    rest = lengths.clone()
    while left_sample < audio_batch.shape[1]:
        chunk_length = min(right_sample, audio_batch.shape[1]) - left_sample
        is_last_batch = chunk_length >= rest
        chunk_lengths = torch.where(is_last_batch, rest, torch.full_like(rest, chunk_length))
        buffer.add_audio_batch_(audio_batch[:, left_sample:right_sample], audio_lengths=chunk_lengths,
                                is_last_chunk=right_sample >= audio_batch.shape[1], is_last_chunk_batch=is_last_batch)
        feats, feat_len = pre(input_signal=buffer.samples, length=buffer.context_size_batch.total())
        encoded, _ = enc(audio_signal=feats, length=feat_len)
        encoded = encoded.transpose(1, 2)[:, buffer.context_size.subsample(enc2samples).left:]
        hyps, state = computer(x=encoded, out_len=buffer.context_size_batch.subsample(enc2samples).chunk,
                                  prev_batched_state=state)
        for b in range(len(audios)):
            n = int(hyps.current_lengths[b])
            durs = hyps.token_durations[b, :n].tolist() if hyps.token_durations is not None else [0] * n  # RNNT: 0
            out[b] += list(zip(hyps.transcript[b, :n].tolist(), hyps.timestamps[b, :n].tolist(), durs))
        jumps.append(state.time_jumps.tolist() if state.time_jumps is not None else [0] * len(audios))  # RNNT
        rest -= chunk_lengths
        left_sample = right_sample
        right_sample = min(right_sample + ctx.chunk, audio_batch.shape[1])
    return out, jumps


def ours_streamed(model, a, piece_secs, **params):
    """Feed in pieces, record the decoder's time jump after every committed step."""
    rec = Recognizer(model, "buffered", **params)
    s = rec.open()
    jumps, piece = [], max(1, int(piece_secs * SR))
    for pos in range(0, a.numel(), piece):
        s.feed(a[pos:pos + piece], step=False)
        while rec.step():
            jumps.append(int(s.state.decoder_state.time_jump))
    s.finish(step=False)
    while rec.step():
        jumps.append(int(s.state.decoder_state.time_jump))
    assert s.finished
    return triples(s.tokens), jumps


CTX = dict(left_secs=0.8, chunk_secs=0.4, right_secs=0.32)  # 10 / 5 / 4 encoder frames
# lengths: ragged, a multiple of 80 ms, ending exactly at a chunk boundary (+ right context), shorter than one window
LENGTHS = [int(4.37 * SR), 40 * SPF, 9 * 5 * SPF + 4 * SPF, 9 * 5 * SPF + 4 * SPF + 1, 7 * SPF + 33, 1000]


@pytest.mark.nemo
@pytest.mark.parametrize("n", LENGTHS)
def test_tiny_equals_nemo_buffered(tiny, n):
    a = audio(samples=n, seed=n)
    ref, ref_jumps = nemo_buffered(tiny, [a], **CTX)
    ours, jumps = ours_streamed(tiny, a, piece_secs=0.13, keep_last_partial_frame=False, seam="nemo", **CTX)
    assert ours == ref[0]
    assert jumps == [j[0] for j in ref_jumps]  # same decoder state carried across every seam
    if n % SPF == 0:  # no partial last frame: the default (offline-consistent) mode is NeMo's too
        assert triples(stream_tokens(tiny, [a], piece_secs=0.05, seam="nemo", **CTX)[0]) == ref[0]


@pytest.mark.nemo
@pytest.mark.parametrize("decode_loop", [False, True])
@pytest.mark.parametrize("n", [int(4.37 * SR), 9 * 5 * SPF + 4 * SPF])
def test_rnnt_equals_nemo_buffered(tiny_rnnt, n, decode_loop):
    a = audio(samples=n, seed=n + 1)
    ref, _ = nemo_buffered(tiny_rnnt, [a], **CTX)
    ours, jumps = ours_streamed(tiny_rnnt, a, piece_secs=0.13, keep_last_partial_frame=False, seam="nemo",
                                decode_loop=decode_loop, **CTX)
    assert len(ours) > 10 and ours == ref[0] and set(jumps) == {0}


@pytest.mark.nemo
def test_tiny_nemo_batch_of_equal_lengths(tiny):
    """Several streams in one encoder call / decoder loop == NeMo's batched loop (equal lengths: NeMo's shared
    buffer arithmetic is exact for those) in labels and frames, and == NeMo run per stream in everything.
    (NeMo's batched loop records a wrong *duration* for an utterance whose label was found while another one was
    still skipping blanks -- it re-reads the duration at the advanced frame; its frames and labels are right.)"""
    auds = [audio(samples=int(3.5 * SR), seed=s) for s in range(3)]
    ref, _ = nemo_buffered(tiny, auds, **CTX)
    ours = [triples(t) for t in stream_tokens(tiny, auds, piece_secs=0.1, keep_last_partial_frame=False, seam="nemo",
                                              **CTX)]
    assert [[(lab, f) for lab, f, _ in x] for x in ours] == [[(lab, f) for lab, f, _ in x] for x in ref]
    assert ours == [nemo_buffered(tiny, [a], **CTX)[0][0] for a in auds]


@pytest.mark.nemo
@pytest.mark.parametrize("decode_loop", [False, True])  # True: GreedyLoop's static buffers (CUDA graphs on a GPU)
def test_v3_dims_equal_nemo_with_seam_crossing_jumps(v3_small, decode_loop):
    a = audio(samples=int(6.1 * SR), seed=3)
    ctx = dict(left_secs=1.6, chunk_secs=0.8, right_secs=0.8)
    ref, ref_jumps = nemo_buffered(v3_small, [a], **ctx)
    ours, jumps = ours_streamed(v3_small, a, piece_secs=0.25, keep_last_partial_frame=False, seam="nemo",
                                decode_loop=decode_loop, **ctx)
    assert len(ref[0]) > 10
    assert ours == ref[0]
    assert jumps == [j[0] for j in ref_jumps]
    assert any(j > 0 for j in jumps[:-1])  # a TDT duration carried decoding past a chunk seam


def test_tdt_jump_crosses_seams_tiny(tiny):
    _, jumps = ours_streamed(tiny, audio(6.0, seed=11), piece_secs=0.2, seam="nemo", **CTX)
    assert any(j > 0 for j in jumps[:-1])


def steps_of(model, a, piece_secs, **params):
    """(committed triples, horizon, carried time jump) after every step of one stream."""
    rec = Recognizer(model, "buffered", **params)
    s = rec.open()
    out, piece = [], max(1, int(piece_secs * SR))
    for pos in range(0, a.numel() + piece, piece):
        if pos < a.numel():
            s.feed(a[pos:pos + piece], step=False)
        else:
            s.finish(step=False)
        while rec.step():
            ev = s.poll()[-1]
            out.append((triples(ev.committed), s.horizon, int(s.state.decoder_state.time_jump)))
    return out, rec.mode


def test_redecode_seam_commits_no_jump_past_the_chunk_end(tiny):
    """seam="redecode": each step commits up to ``overlap_frames`` (= largest TDT duration - 1) before its
    chunk end and the next window re-decodes from there with the carried state. On audio where NeMo's loop carries
    TDT jumps across chunk ends, the redecode loop's carried jump never leaves the re-decoded frames, so no committed
    decision skips frames the window saw only as right context; commits tile the frames in order (no frame twice)."""
    a = audio(6.0, seed=11)
    nemo, _ = steps_of(tiny, a, 0.2, seam="nemo", **CTX)
    steps, mode = steps_of(tiny, a, 0.2, seam="redecode", **CTX)
    overlap, chunk = mode.cfg.overlap_frames, mode.cfg.chunk_frames
    assert mode.name == "buffered" and overlap == max(tiny.cfg.decoding.durations) - 1 == 3
    assert any(jump > 0 for _, _, jump in nemo[:-1])  # NeMo: decisions at the chunk end jump into the next chunk
    assert [h for _, h, _ in nemo[:-1]] == [chunk * (k + 1) for k in range(len(nemo) - 1)]
    # redecode: the commit boundary is the chunk end minus the overlap, the same windows as NeMo's
    assert [h for _, h, _ in steps[:-1]] == [chunk * (k + 1) - overlap for k in range(len(steps) - 1)]
    assert len(steps) == len(nemo) and steps[-1][1] == nemo[-1][1]
    assert all(jump <= overlap for _, _, jump in steps[:-1])  # resumes inside the frames the next window re-decodes
    previous = 0
    for committed, horizon, jump in steps:
        assert all(previous <= f < horizon for _, f, _ in committed)
        previous = horizon
    # overlap 0 is NeMo's loop
    assert steps_of(tiny, a, 0.2, seam="redecode", overlap_frames=0, **CTX)[0] == nemo
    assert steps_of(tiny, a, 0.2, **CTX)[0] == nemo  # the default is NeMo's loop


@pytest.mark.parametrize("fixed_batch", [None, 4])
def test_decode_loop_equals_decoder_with_batches_and_tails(tiny, fixed_batch):
    """GreedyLoop decoding (static buffers, frames rounded up to 8, padding rows inactive, a block then the rest of
    the bound) gives every event of every stream -- committed and tentative tokens, horizons -- exactly as the
    batched decoder does, over ragged streams sharing steps (seam="redecode": tails and re-decoded overlaps)."""
    auds = [audio(samples=n, seed=n) for n in (int(3.3 * SR), 40 * SPF, 7 * SPF + 33, int(5.1 * SR), 9000, 3000)]

    def events(decode_loop):
        rec = Recognizer(tiny, "buffered", seam="redecode", fixed_batch=fixed_batch, decode_loop=decode_loop,
                         max_batch=6, **CTX)
        sessions = [rec.open() for _ in auds]
        out = [[] for _ in auds]
        for pos in range(0, max(a.numel() for a in auds) + SR, 2000):
            for s, a in zip(sessions, auds):
                if pos < a.numel():
                    s.feed(a[pos:pos + 2000], step=False)
                elif not s.finished:
                    s.finish(step=False)
            rec.run()
            for s, o in zip(sessions, out):
                o += [(triples(e.committed), triples(e.tentative), e.final) for e in s.poll()]
        assert all(s.finished for s in sessions)
        return out, rec.mode

    ref, _ = events(False)
    got, mode = events(True)
    assert got == ref and sum(len(c) for o in ref for c, _, _ in o) > 30 and any(t for o in ref for _, t, _ in o)
    assert mode._loops and all(key[2] % 8 == 0 for key in mode._loops)
    from trt_asr.streaming.buffered import BufferedMode

    warm = BufferedMode(tiny, fixed_batch=3, decode_loop=True, **CTX)
    warm.warmup(max_batch=8)  # fixed batch: 3 rows whatever max_batch; a full window's commit and tail loops
    assert {(role, rows) for role, rows, _ in warm._loops} == {("commit", 3), ("tail", 3)}


def test_redecode_overlap_is_capped_by_chunk_and_left_context(tiny):
    from trt_asr.streaming.buffered import BufferedMode

    redecode = dict(seam="redecode")
    assert BufferedMode(tiny, 0.8, 0.4, 0.32, **redecode).cfg.overlap_frames == 3  # 10/5/4 frames, durations [0..4]
    assert BufferedMode(tiny, 0.8, 0.16, 0.32, **redecode).cfg.overlap_frames == 1  # < chunk: each step commits
    assert BufferedMode(tiny, 0.0, 0.4, 0.32, **redecode).cfg.overlap_frames == 0  # no left context to re-decode
    assert BufferedMode(tiny, 0.8, 0.4, 0.32).cfg.overlap_frames == 0  # default seam="nemo"
    with pytest.raises(ValueError):
        BufferedMode(tiny, seam="middle")


@pytest.mark.parametrize("n", [int(3.37 * SR), 30 * SPF, 5])
def test_whole_file_window_equals_offline(tiny, n):
    a = audio(samples=n, seed=n)
    got = stream_tokens(tiny, [a], left_secs=10, chunk_secs=6, right_secs=2, piece_secs=0.07)[0]
    assert triples(got) == offline(tiny, a)


def test_v3_dims_whole_file_equals_offline(v3_small):
    a = audio(3.3, seed=5)
    got = stream_tokens(v3_small, [a], left_secs=4, chunk_secs=2, right_secs=2, piece_secs=0.5)[0]
    assert len(got) > 5 and triples(got) == offline(v3_small, a)


def test_tentative_tail_is_right_context_decoding(tiny):
    """Tentative tokens lie in the right-context frames; with no more audio they would be the start of what
    the next chunk commits (not asserted equal: the next window sees more context)."""
    rec = Recognizer(tiny, "buffered", **CTX)
    s = rec.open()
    events = s.feed(audio(2.0, seed=4))
    assert events and not events[-1].final
    horizon, overlap = s.state.frames_decoded, rec.mode.cfg.overlap_frames
    assert events[-1].tentative
    for t in events[-1].tentative:
        # the re-decoded overlap + right context (+ at most one TDT jump into it)
        assert horizon <= t.frame < horizon + overlap + 4 + 4
    assert s.finish()[-1].final


@pytest.mark.nemo
@pytest.mark.slow
def test_full_v3_equals_nemo_buffered(v3_model):
    """The full 24-layer v3 (calibrated random weights) over a few chunks."""
    a = audio(samples=26 * SPF + 700, seed=8)
    ctx = dict(left_secs=0.8, chunk_secs=0.48, right_secs=0.48)  # 10 / 6 / 6 frames: 4 steps
    ref, ref_jumps = nemo_buffered(v3_model, [a], **ctx)
    ours, jumps = ours_streamed(v3_model, a, piece_secs=0.3, keep_last_partial_frame=False, seam="nemo", **ctx)
    assert len(jumps) >= 3 and len(ref[0]) > 5
    assert ours == ref[0]
    assert jumps == [j[0] for j in ref_jumps]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fixed_batch_is_bitwise_batch_invariant(dtype):
    """``BufferedMode(fixed_batch=3)``: every window padded to the full window, every call exactly 3 rows (steps of
    up to 5 streams run as sub-batches), so each stream's encoder output of every step is BITWISE what it is when
    the stream runs alone, whatever shares its step. Without it fp32 on this CPU differs by ~1e-6 (batch shape
    and padding width change the kernels), enough to flip near-tie tokens in fp16 / bf16 on a GPU."""
    import numpy as np

    from trt_asr.streaming.buffered import BufferedMode
    from trt_asr.streaming.scheduler import SchedulerConfig, StreamScheduler

    class Traced(BufferedMode):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.traces, self.calls = {}, []

        def encode(self, audio_bn, lengths_b):
            self.calls.append(tuple(audio_bn.shape))
            return super().encode(audio_bn, lengths_b)

        def _decode_part(self, streams, lasts, enc_bdt, enc_len):
            for b, s in enumerate(streams):
                self.traces.setdefault(id(s), (s, []))[1].append(enc_bdt[b, :, :int(enc_len[b])].clone())
            return super()._decode_part(streams, lasts, enc_bdt, enc_len)

        def take(self):
            by_len = {s.received: rows for s, rows in self.traces.values()}
            self.traces = {}
            return by_len

    model = load_model("random:tiny", dtype=dtype)
    params = dict(left_secs=0.64, chunk_secs=0.32, right_secs=0.16)
    rng = np.random.default_rng(1)
    lengths = [SR * 3, SR * 2 + 777, 9000, SR * 3 + 3333, 20000, 5000]
    audios = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in lengths]
    mode = Traced(model, **params, fixed_batch=3)
    for a in audios:
        stream_tokens(model, [a], mode, piece_secs=0.1)
    alone = mode.take()
    sched = StreamScheduler(Recognizer(model, mode), SchedulerConfig(max_streams=8, max_batch=5, idle_timeout=None))
    streams = [sched.open() for _ in audios]
    pos = [0] * len(audios)
    while any(p < a.size for p, a in zip(pos, audios)):  # random piece sizes, stepping as they come
        for i, (st, a) in enumerate(zip(streams, audios)):
            if pos[i] < a.size:
                k = int(rng.integers(160, 11200))
                st.push(a[pos[i]:pos[i] + k])
                pos[i] += k
                if pos[i] >= a.size:
                    st.end()
        sched.step()
    sched.run_until_idle()
    batched = mode.take()
    assert max(sched.stats.batch_sizes) > 3 and len(set(mode.calls)) == 1 and mode.calls[0][0] == 3
    for n in lengths:
        assert len(alone[n]) == len(batched[n]) >= (2 if n > 9000 else 1), n
        for k, (x, y) in enumerate(zip(alone[n], batched[n])):
            assert torch.equal(x, y), (n, k)
