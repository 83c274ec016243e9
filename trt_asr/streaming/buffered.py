"""Buffered streaming for full-attention models (v3): NeMo's ``speech_to_text_streaming_infer_rnnt.py`` algorithm,
one stream at a time in arithmetic, many streams per encoder call.

Sizes are whole encoder frames (80 ms = 1280 samples for v3): left L, chunk C, right R (defaults 10 s / 2 s / 2 s =
125 / 25 / 25 frames). Chunk k is the audio [k*C, (k+1)*C) (in samples, C = chunk frames * 1280). Its step encodes
the window [left context | chunk | right context] = samples [max(0, kC - L), (k+1)C + R) from scratch (features
computed on the window's samples alone, per-feature normalised over the window, exactly as NeMo calls the model on
its audio buffer), decodes only the chunk's encoder frames, and carries the decoder state (LSTM state, last label,
TDT time jump) to the next chunk. The right-context frames are decoded from a copy of that state: the tentative tail.

The last chunk follows NeMo's buffer arithmetic (``ContextSize.add_frames_``): when the stream ends, the buffer takes
the remaining samples; the chunk is then [everything after the previous chunk] = right context + rest, and the left
context is trimmed so the window holds at most L + C + R samples -- so the last window may start off the 80 ms grid.
NeMo decodes floor(chunk / 1280) frames there, dropping a last partial frame (< 80 ms of audio);
``keep_last_partial_frame=True`` (default) decodes every encoder frame of the last window past the left context
instead, which makes buffered == offline when one window covers the whole file. With False, tokens are NeMo's.

A chunk is stepped once audio *past* its right context arrived (or the stream ended), so a stream that ends exactly
at a chunk boundary takes NeMo's last-chunk path. Timestamps are absolute encoder frames since the stream started
(NeMo's ``timestamps + decoded_lengths``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..decoding.greedy import DecoderState
from .session import StepResult, Token


@dataclass
class BufferedConfig:
    left_frames: int = 125
    chunk_frames: int = 25
    right_frames: int = 25
    keep_last_partial_frame: bool = True

    @classmethod
    def from_secs(cls, model_cfg, left_secs: float = 10.0, chunk_secs: float = 2.0, right_secs: float = 2.0,
                  keep_last_partial_frame: bool = True) -> "BufferedConfig":
        """Seconds -> whole encoder frames, rounded down as NeMo's script does."""
        features_per_sec = 1.0 / model_cfg.preprocessor.window_stride
        factor = model_cfg.encoder.subsampling_factor
        frames = [int(s * features_per_sec / factor) for s in (left_secs, chunk_secs, right_secs)]
        if frames[1] < 1:
            raise ValueError(f"chunk_secs={chunk_secs} is shorter than one encoder frame ({model_cfg.frame_seconds} s)")
        return cls(*frames, keep_last_partial_frame=keep_last_partial_frame)


class BufferedStream:
    """Per-stream state. Sample counts are absolute (since the stream started) unless named ``ctx_*``."""

    def __init__(self):
        self.audio = torch.zeros(0)  # samples [audio_start, received)
        self.audio_start = 0
        self.received = 0
        self.ended = False
        self.finished = False
        self.left_sample = 0  # where the next step's new audio starts (NeMo's left_sample)
        self.ctx_left = self.ctx_chunk = self.ctx_right = 0  # the current window, as NeMo's ContextSizeBatch
        self.decoder_state: DecoderState | None = None
        self.frames_decoded = 0  # encoder frames committed so far (NeMo's decoded_lengths)
        self.steps = 0


class BufferedMode:
    """``StreamingMode`` "buffered". ``engine``: an optional ``EncoderEngine`` with mode "window" to run the encoder
    (default: the model's own PyTorch encoder)."""

    name = "buffered"

    def __init__(self, model, left_secs: float = 10.0, chunk_secs: float = 2.0, right_secs: float = 2.0, *,
                 keep_last_partial_frame: bool = True, config: BufferedConfig | None = None, engine=None,
                 decoder=None):
        self.model = model
        self.cfg = config or BufferedConfig.from_secs(model.cfg, left_secs, chunk_secs, right_secs,
                                                      keep_last_partial_frame)
        self.engine = engine
        self.decoder = decoder or model.greedy_decoder()
        self.sample_rate = model.cfg.sample_rate
        self.frame_seconds = model.cfg.frame_seconds
        self.samples_per_frame = model.cfg.preprocessor.hop_length * model.cfg.encoder.subsampling_factor
        spf = self.samples_per_frame
        self.left, self.chunk, self.right = (self.cfg.left_frames * spf, self.cfg.chunk_frames * spf,
                                             self.cfg.right_frames * spf)

    @property
    def latency_seconds(self) -> float:
        """Audio that must arrive after a chunk's first sample before it is committed (chunk + right context)."""
        return (self.chunk + self.right) / self.sample_rate

    # -------------------------------------------------------------- buffering
    def new_stream(self) -> BufferedStream:
        return BufferedStream()

    def push(self, stream: BufferedStream, pcm: torch.Tensor) -> None:
        stream.audio = torch.cat((stream.audio, pcm.to(torch.float32)))
        stream.received += pcm.numel()

    def end(self, stream: BufferedStream) -> None:
        stream.ended = True

    def _next_right_sample(self, s: BufferedStream) -> int:
        return s.left_sample + (self.chunk + self.right if s.left_sample == 0 else self.chunk)

    def ready(self, s: BufferedStream) -> bool:
        if s.finished:
            return False
        if s.ended:
            return True
        return s.received > self._next_right_sample(s)  # strictly: see the module docstring

    # -------------------------------------------------------------- one batched step
    def _advance(self, s: BufferedStream) -> tuple[torch.Tensor, bool]:
        """NeMo's buffer arithmetic for one stream: add the next piece of audio, return the window and is_last."""
        right_sample = self._next_right_sample(s)
        if s.ended:
            right_sample = min(right_sample, s.received)
        is_last = s.ended and right_sample >= s.received
        added = right_sample - s.left_sample
        s.ctx_left += s.ctx_chunk
        s.ctx_right += added
        if is_last:
            s.ctx_chunk, s.ctx_right = s.ctx_right, 0
        else:
            s.ctx_chunk, s.ctx_right = self.chunk, s.ctx_right - self.chunk
        extra = max(s.ctx_left + s.ctx_chunk + s.ctx_right - (self.left + self.chunk + self.right), 0)
        s.ctx_left = max(s.ctx_left - extra, 0)
        total = s.ctx_left + s.ctx_chunk + s.ctx_right
        start = right_sample - total
        window = s.audio[start - s.audio_start: right_sample - s.audio_start]
        s.left_sample = right_sample
        # later windows never start before this one (the left context only grows or slides forward)
        s.audio = s.audio[start - s.audio_start:]
        s.audio_start = start
        return window, is_last

    def encode(self, audio_bn: torch.Tensor, lengths_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows [B, N] -> encoder output [B, D, T], lengths [B]: the model's front end (per-feature
        normalisation over each window), then the encoder (or the engine's "window" step)."""
        if self.engine is None:
            return self.model.encode(audio_bn, lengths_b)
        feats, feat_len = self.model.features(audio_bn, lengths_b)
        out = self.engine.step({"audio_signal": feats, "length": feat_len})
        return out["encoder_output"], out["encoded_lengths"]

    @torch.no_grad()
    def step(self, streams: Sequence[BufferedStream]) -> list[StepResult]:
        device = self.model.device
        spf = self.samples_per_frame
        windows, lasts = zip(*(self._advance(s) for s in streams))
        lengths_b = torch.tensor([w.numel() for w in windows], dtype=torch.long)
        audio_bn = torch.zeros(len(streams), max(int(lengths_b.max()), 1))
        for b, w in enumerate(windows):
            audio_bn[b, : w.numel()] = w
        enc_bdt, enc_len = self.encode(audio_bn.to(device), lengths_b.to(device))
        enc_len = enc_len.cpu()

        left_f = torch.tensor([s.ctx_left // spf for s in streams])
        chunk_f = torch.tensor([s.ctx_chunk // spf for s in streams])
        if self.cfg.keep_last_partial_frame:
            last = torch.tensor(lasts)
            chunk_f = torch.where(last, (enc_len - left_f).clamp(min=0), chunk_f)
        chunk_f = torch.minimum(chunk_f, (enc_len - left_f).clamp(min=0))
        right_f = torch.where(torch.tensor(lasts), 0, (enc_len - left_f - chunk_f).clamp(min=0))

        state = DecoderState.stack([s.decoder_state if s.decoder_state is not None
                                    else self.decoder.initial_state(1, device, enc_bdt.dtype) for s in streams])
        chunk_tokens, state = self.decoder(_frames(enc_bdt, left_f, chunk_f), chunk_f.to(device), state)
        # tentative tail: the right-context frames, decoded from (a copy of) the state after the chunk
        if int(right_f.max()) > 0:
            tail_tokens, _ = self.decoder(_frames(enc_bdt, left_f + chunk_f, right_f), right_f.to(device), state)
            tails = tail_tokens.to_lists()
        else:
            tails = [[] for _ in streams]

        results = []
        for b, (s, committed, tail) in enumerate(zip(streams, chunk_tokens.to_lists(), tails)):
            s.decoder_state = state.select(torch.tensor([b], device=device))
            start = s.frames_decoded
            s.frames_decoded += int(chunk_f[b])
            s.finished = lasts[b]
            s.steps += 1
            if s.finished:
                s.audio = torch.zeros(0)
            results.append(StepResult(
                committed=[Token(label, start + frame, dur) for label, frame, dur in committed],
                tentative=[Token(label, s.frames_decoded + frame, dur) for label, frame, dur in tail],
                finished=s.finished, horizon=s.frames_decoded))
        return results


def _frames(enc_bdt: torch.Tensor, start_b: torch.Tensor, count_b: torch.Tensor) -> torch.Tensor:
    """enc[b, :, start_b : start_b + count_b] for every b, right-padded (by repeating a valid frame) -> [B, D, max]."""
    width = max(int(count_b.max()), 1)
    t_max = enc_bdt.shape[2]
    idx = (start_b[:, None] + torch.arange(width)[None, :]).clamp(max=max(t_max - 1, 0)).to(enc_bdt.device)
    return torch.gather(enc_bdt, 2, idx[:, None, :].expand(-1, enc_bdt.shape[1], -1))
