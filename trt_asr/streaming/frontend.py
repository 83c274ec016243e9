"""Incremental log-mel front end: PCM pieces of any size in, exactly the offline front end's log-mel frames out.

Why it can be exact: before normalisation every log-mel frame is local. Frame j is the FFT of the pre-emphasised
signal y[n] = x[n] - 0.97 x[n-1] (y[0] = x[0]) over samples [j*hop - n_fft/2, j*hop + n_fft/2) of the centred
STFT (zero padding before sample 0 and after the end); the Hann window (400 of the 512 taps) zeroes the rest. So
frame j is final once sample j*hop + n_fft/2 - 1 has arrived; the last frames wait for ``finish()``, which pads with
zeros exactly as the offline STFT's centre padding does.

    fe = StreamingFrontEnd(model.preprocessor.featurizer)
    mel = fe.push(pcm)      # [F, n] newly final frames (n may be 0)
    mel = fe.finish()       # [F, n] the rest: in total num_frames(N) = N // hop frames, NeMo's valid frames

What equals what: concatenating everything returned == ``featurizer.log_mel(audio)[..., :N // hop]`` for the whole
audio (max abs diff measured in tests/test_streaming_frontend.py; the same float32 ops on the same samples). This is
the *un-normalised* log-mel: what cache-aware models (``normalize: none``) consume directly. Per-feature
normalisation needs the whole utterance, so it cannot stream; buffered mode (NeMo's algorithm) instead recomputes
features for each window from the window's own samples, normalised over that window (``BufferedMode.encode``),
which differs from slices of this stream at the window edges by design.
"""

from __future__ import annotations

import torch

from ..model.frontend import MelFrontEnd


class StreamingFrontEnd:
    def __init__(self, featurizer: MelFrontEnd):
        if featurizer.stft_pad is not None:
            raise ValueError("exact_pad=True front ends are not supported for streaming")
        self.fe = featurizer
        self.cfg = featurizer.cfg
        self.hop, self.n_fft = featurizer.hop, featurizer.n_fft
        self.half = self.n_fft // 2
        # features are computed on the CPU from CPU audio, whatever device the model is on
        self.window = featurizer.window.detach().float().cpu()
        self.fb = featurizer.fb.detach().float().cpu()
        self.reset()

    def reset(self) -> None:
        # pre-emphasised samples from absolute index (self.start - half), the centre padding included
        self.y = torch.zeros(self.half)
        self.start = 0  # absolute sample index of y[half]
        self.last_x = None  # last raw sample (pre-emphasis needs one sample of history)
        self.received = 0
        self.frames_out = 0
        self.finished = False

    @property
    def feat_dim(self) -> int:
        return self.cfg.features

    def push(self, pcm: torch.Tensor) -> torch.Tensor:
        """float32 samples [N] -> newly final log-mel frames [F, n]."""
        if self.finished:
            raise RuntimeError("push() after finish()")
        x = pcm.detach().to("cpu", torch.float32).reshape(-1)
        if x.numel():
            p = self.cfg.preemph
            if p is None:
                y = x
            elif self.last_x is None:  # stream start: y[0] = x[0], as offline
                y = torch.cat((x[:1], x[1:] - p * x[:-1]))
            else:
                y = x - p * torch.cat((self.last_x, x[:-1]))
            self.last_x = x[-1:].clone()
            self.y = torch.cat((self.y, y))
            self.received += x.numel()
        # frame j needs samples up to j*hop + half - 1
        ready = max((self.received - self.half) // self.hop + 1, 0) if self.received >= self.half else 0
        return self._emit(ready)

    def finish(self) -> torch.Tensor:
        """End of audio: the remaining valid frames (offline: N // hop frames in total)."""
        if self.finished:
            return torch.zeros(self.feat_dim, 0)
        self.finished = True
        total = self.received // self.hop
        self.y = torch.cat((self.y, torch.zeros(self.half)))  # the offline STFT's right centre padding
        return self._emit(total)

    def _emit(self, upto: int) -> torch.Tensor:
        n = upto - self.frames_out
        if n <= 0:
            return torch.zeros(self.feat_dim, 0)
        # y[0] is absolute padded index (frames_out * hop); frames need n_fft samples each
        seg = self.y[: (n - 1) * self.hop + self.n_fft]
        mel = self._log_mel(seg)
        self.frames_out += n
        self.y = self.y[n * self.hop:]
        return mel[:, :n]

    def _log_mel(self, seg: torch.Tensor) -> torch.Tensor:
        return framed_log_mel(seg[None], self.fe, self.window, self.fb)[0]


def framed_log_mel(y_bn: torch.Tensor, featurizer: MelFrontEnd, window: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """The offline front end's ops after pre-emphasis and padding (center=False on already padded samples):
    pre-emphasised rows [B, N] -> log-mel [B, F, 1 + (N - n_fft) // hop]. ``window`` / ``fb``: the featurizer's,
    on the rows' device."""
    cfg = featurizer.cfg
    spec = torch.stft(y_bn, featurizer.n_fft, hop_length=featurizer.hop, win_length=featurizer.win, window=window,
                      center=False, return_complex=True)
    power = torch.view_as_real(spec).pow(2).sum(-1).sqrt()
    if cfg.mag_power != 1.0:
        power = power.pow(cfg.mag_power)
    mel = torch.matmul(fb, power)
    if cfg.log:
        mel = torch.log(mel + cfg.log_zero_guard_value)
    return mel


def offline_log_mel(featurizer: MelFrontEnd, audio_n: torch.Tensor) -> torch.Tensor:
    """The reference: un-normalised log-mel of the whole audio, valid frames only -> [F, N // hop]."""
    n = audio_n.numel()
    mel = featurizer.log_mel(audio_n[None].float(), torch.tensor([n]))[0]
    return mel[:, : n // featurizer.hop]


class BatchedLogMel:
    """``StreamingFrontEnd``'s frames for many streams at once, on any device: each row holds the raw samples of
    ``n`` consecutive frames plus ONE sample before them (pre-emphasis needs it) and says how many of its
    pre-emphasised samples are real (the rest are zeros, as the offline STFT's right padding).

        lm = BatchedLogMel(model.preprocessor.featurizer, device)
        x = ...  # [B, lm.samples(n)]: absolute samples [j0*hop - n_fft/2 - 1, ...) of frames j0 .. j0+n-1
        mel = lm(x, y_valid)  # [B, F, n]; y_valid [B]: pre-emphasised samples x[:, 1:] that exist

    The same float32 ops as ``StreamingFrontEnd`` (pre-emphasis, then ``framed_log_mel``), so frames agree within
    FFT rounding (tests/test_batched_cache_aware.py)."""

    def __init__(self, featurizer: MelFrontEnd, device="cpu"):
        if featurizer.stft_pad is not None:
            raise ValueError("exact_pad=True front ends are not supported for streaming")
        self.featurizer, self.cfg = featurizer, featurizer.cfg
        self.hop, self.n_fft = featurizer.hop, featurizer.n_fft
        self.window = featurizer.window.detach().float().to(device)
        self.fb = featurizer.fb.detach().float().to(device)  # [1, F, n_fft // 2 + 1]

    def samples(self, n_frames: int) -> int:
        """Row width for ``n_frames`` frames: their STFT span plus the pre-emphasis history sample."""
        return (n_frames - 1) * self.hop + self.n_fft + 1

    def __call__(self, x_bw: torch.Tensor, y_valid_b: torch.Tensor) -> torch.Tensor:
        p = self.cfg.preemph
        y = x_bw[:, 1:] if p is None else x_bw[:, 1:] - p * x_bw[:, :-1]
        # samples at / past the end of a stream are zero after pre-emphasis (the offline front end masks them)
        y = y.masked_fill(torch.arange(y.shape[1], device=y.device)[None, :] >= y_valid_b[:, None], 0.0)
        return framed_log_mel(y, self.featurizer, self.window, self.fb)
