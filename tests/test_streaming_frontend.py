"""Incremental log-mel == the offline front end's log-mel for the concatenated audio, for any split of the PCM.

Truth: ``MelFrontEnd.log_mel`` on the whole audio (itself tested against NeMo's preprocessor elsewhere), valid
frames only (N // hop). Same float32 ops on the same samples; the STFT / mel matmul run on different frame batches,
so equality is to float rounding (measured max |diff| ~1e-6 on log values of magnitude ~10).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from trt_asr.config import preset_config, tiny_config
from trt_asr.model.calibrate import synthetic_audio
from trt_asr.model.frontend import MelFrontEnd
from trt_asr.streaming.frontend import StreamingFrontEnd, offline_log_mel

torch.set_num_threads(1)
SR = 16000
ATOL = 2e-5
FRONTS = {"v3": MelFrontEnd(preset_config("parakeet-tdt-0.6b-v3").preprocessor).eval(),
          "tiny": MelFrontEnd(tiny_config().preprocessor).eval()}


def signal(n: int, seed: int) -> torch.Tensor:
    return synthetic_audio(n / SR + 0.01, SR, torch.Generator().manual_seed(seed))[:n]


def stream(fe: MelFrontEnd, audio: torch.Tensor, cuts: list[int]) -> tuple[torch.Tensor, list[int]]:
    s = StreamingFrontEnd(fe)
    outs, counts, pos = [], [], 0
    for end in sorted(set(cuts)) + [audio.numel()]:
        outs.append(s.push(audio[pos:end]))
        counts.append(s.frames_out)
        pos = end
    outs.append(s.finish())
    return torch.cat(outs, dim=1), counts


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 3 * SR), seed=st.integers(0, 10_000), data=st.data(), which=st.sampled_from(sorted(FRONTS)))
def test_any_split_equals_offline(n, seed, data, which):
    fe = FRONTS[which]
    audio = signal(n, seed)
    cuts = data.draw(st.lists(st.integers(0, n), max_size=12))
    got, counts = stream(fe, audio, cuts)
    ref = offline_log_mel(fe, audio)
    assert got.shape == ref.shape == (fe.cfg.features, n // fe.hop)
    assert torch.allclose(got, ref, atol=ATOL, rtol=0)
    # frames appear only once final: after m samples, exactly the frames whose window lies inside [0, m)
    for end, count in zip(sorted(set(cuts)) + [n], counts):
        assert count == (max((end - fe.n_fft // 2) // fe.hop + 1, 0) if end >= fe.n_fft // 2 else 0)


@settings(max_examples=10, deadline=None)
@given(piece=st.sampled_from([1, 7, 160, 161, 256, 400, 1280, 4999]))
def test_fixed_pieces_v3(piece):
    fe = FRONTS["v3"]
    audio = signal(SR + 123, piece)
    got, _ = stream(fe, audio, list(range(piece, audio.numel(), piece)))
    assert torch.allclose(got, offline_log_mel(fe, audio), atol=ATOL, rtol=0)


def test_final_frames_do_not_depend_on_the_future():
    """What push() returned for a prefix equals the offline log-mel of the full audio AND of any longer prefix:
    frames are emitted only when no later sample can change them."""
    fe = FRONTS["v3"]
    audio = signal(2 * SR, 1)
    s = StreamingFrontEnd(fe)
    early = s.push(audio[:7000])
    for m in (7000, 9000, audio.numel()):
        assert torch.allclose(early, offline_log_mel(fe, audio[:m])[:, : early.shape[1]], atol=ATOL, rtol=0)
