"""Log-mel front end, numerically identical to NeMo's ``AudioToMelSpectrogramPreprocessor`` at inference.

Pipeline: pre-emphasis (0.97, samples past the length zeroed) -> centred STFT with zero padding (n_fft 512, hop 160,
symmetric Hann window of 400) -> power spectrum -> Slaney mel (128 bands, 0-8 kHz) -> log(x + 2^-24) ->
per-feature normalisation over the valid frames (unbiased variance, std + 1e-5) -> frames past the length zeroed.

N samples give N // hop + 1 STFT frames, of which N // hop are "valid" (NeMo's length).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..config import PreprocessorConfig

NORMALIZE_EPS = 1e-5


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * m
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), freqs)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None,
                   norm: str | None = "slaney") -> np.ndarray:
    """Triangular Slaney-scale mel filters [n_mels, n_fft // 2 + 1], float32 (librosa's ``filters.mel`` defaults)."""
    fmax = sample_rate / 2 if fmax is None else fmax
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    mel_f = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((n_mels, n_fft // 2 + 1), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    if norm == "slaney":
        weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights


def normalize_per_feature(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per mel band: subtract the mean and divide by (unbiased std + 1e-5) over each utterance's valid frames."""
    valid = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]  # [B, T]
    count = valid.sum(dim=1, keepdim=True).to(x.dtype)  # [B, 1]
    mean = torch.where(valid[:, None], x, 0.0).sum(dim=2) / count
    var = torch.where(valid[:, None], x - mean[:, :, None], 0.0).pow(2).sum(dim=2) / (count - 1.0)
    std = torch.sqrt(var)
    std = std.masked_fill(std.isnan(), 0.0) + NORMALIZE_EPS
    out = (x - mean[:, :, None]) / std[:, :, None]
    return out.masked_fill(~valid[:, None], 0.0)


class MelFrontEnd(nn.Module):
    """NeMo's ``FilterbankFeatures``; buffers ``window`` and ``fb`` carry its state-dict names."""

    def __init__(self, cfg: PreprocessorConfig):
        super().__init__()
        if cfg.window != "hann":
            raise ValueError(f"only the hann window is supported (config says {cfg.window!r})")
        if cfg.frame_splicing != 1:
            raise ValueError("frame_splicing > 1 is not supported")
        self.cfg = cfg
        self.n_fft, self.hop, self.win = cfg.n_fft, cfg.hop_length, cfg.win_length
        self.stft_pad = (self.n_fft - self.hop) // 2 if cfg.exact_pad else None
        self.register_buffer("window", torch.hann_window(self.win, periodic=False))
        fb = mel_filterbank(cfg.sample_rate, self.n_fft, cfg.features, cfg.lowfreq, cfg.highfreq, cfg.mel_norm)
        self.register_buffer("fb", torch.from_numpy(fb).unsqueeze(0))

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Valid feature frames for a number of samples (NeMo's ``get_seq_len``)."""
        pad = self.stft_pad * 2 if self.stft_pad is not None else self.n_fft // 2 * 2
        return torch.div(num_samples + pad - self.n_fft, self.hop, rounding_mode="floor").to(torch.long)

    def log_mel(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Un-normalised log-mel [B, F, frames] for audio [B, N] (float32) with valid sample counts [B]."""
        x = audio.float()
        if self.stft_pad is not None:
            x = nn.functional.pad(x, (self.stft_pad, self.stft_pad))
        if self.training and self.cfg.dither > 0:
            x = x + self.cfg.dither * torch.randn_like(x)
        if self.cfg.preemph is not None:
            within = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
            x = torch.cat((x[:, :1], x[:, 1:] - self.cfg.preemph * x[:, :-1]), dim=1).masked_fill(~within, 0.0)
        spec = torch.stft(x, self.n_fft, hop_length=self.hop, win_length=self.win, window=self.window.float(),
                          center=self.stft_pad is None, pad_mode="constant", return_complex=True)
        power = torch.view_as_real(spec).pow(2).sum(-1).sqrt()
        if self.cfg.mag_power != 1.0:
            power = power.pow(self.cfg.mag_power)
        mel = torch.matmul(self.fb.float(), power)
        if self.cfg.log:
            mel = torch.log(mel + self.cfg.log_zero_guard_value)
        return mel

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(audio.device.type, enabled=False):
            frames = self.num_frames(lengths)
            frames = torch.where(lengths == 0, torch.zeros_like(frames), frames)
            x = self.log_mel(audio, lengths)
            if self.cfg.normalize == "per_feature":
                x = normalize_per_feature(x, frames)
            elif self.cfg.normalize:
                raise ValueError(f"normalize={self.cfg.normalize!r} is not supported (per_feature or none)")
            within = torch.arange(x.shape[-1], device=x.device)[None, :] < frames[:, None]
            x = x.masked_fill(~within[:, None], self.cfg.pad_value)
            if self.cfg.pad_to and self.cfg.pad_to > 0 and x.shape[-1] % self.cfg.pad_to:
                x = nn.functional.pad(x, (0, self.cfg.pad_to - x.shape[-1] % self.cfg.pad_to), value=self.cfg.pad_value)
        return x, frames


class Preprocessor(nn.Module):
    """Holds the featurizer under NeMo's module path ``preprocessor.featurizer``."""

    def __init__(self, cfg: PreprocessorConfig):
        super().__init__()
        self.featurizer = MelFrontEnd(cfg)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.featurizer(audio, lengths)
