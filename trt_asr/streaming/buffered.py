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

Seams (``seam=``). "nemo" is NeMo's loop as above: a step commits its whole chunk, so the decisions at the last
chunk frames are made with the least right context (R) of any frame, and a TDT duration decided there can jump up to
(largest duration - 1) frames into the next chunk, skipping frames the window saw only as right context. On the
30-minute demo recording that lost a word: a blank beat "re" (p 0.55 / 0.41) 3 frames before a seam and the next
decision jumped across it; the next window, with 2 s more right context, emits "re" there (docs/demo-model.md).
"redecode" commits each chunk only up to ``overlap_frames`` before its end (default: largest TDT duration - 1, so
a committed decision -- its frame and the frames its jump skips -- never reaches past the chunk end) and carries
the decoder state from there; the next window (same audio windows as NeMo) decodes from that frame, so the overlap
frames are decided with R + C right context. Every frame is committed by exactly one window, in one continuous
decoder pass: nothing to merge. The stream's last step commits everything. Cost: the overlap's tokens
come one step later (latency + overlap), one chunk of audio per step as before. Measured, it keeps that word and
is otherwise no better on the demo model (docs/demo-model.md), hence not the default.

A chunk is stepped once audio *past* its right context arrived (or the stream ended), so a stream that ends exactly
at a chunk boundary takes NeMo's last-chunk path. Timestamps are absolute encoder frames since the stream started
(NeMo's ``timestamps + decoded_lengths``).
"""

from __future__ import annotations

from dataclasses import dataclass
import os
from typing import Sequence

import numpy as np
import torch

from ..decoding.greedy import DecoderState, GreedyLoop
from .session import StepResult, Token


@dataclass
class BufferedConfig:
    left_frames: int = 125
    chunk_frames: int = 25
    right_frames: int = 25
    keep_last_partial_frame: bool = True
    overlap_frames: int = 0  # seam="redecode": last chunk frames left tentative and re-decoded by the next window

    @classmethod
    def from_secs(cls, model_cfg, left_secs: float = 10.0, chunk_secs: float = 2.0, right_secs: float = 2.0,
                  keep_last_partial_frame: bool = True, overlap_frames: int = 0) -> "BufferedConfig":
        """Seconds -> whole encoder frames, rounded down as NeMo's script does. The overlap is capped so that every
        step still commits a frame (< chunk) and the next window's left context holds it (<= left)."""
        features_per_sec = 1.0 / model_cfg.preprocessor.window_stride
        factor = model_cfg.encoder.subsampling_factor
        left, chunk, right = (int(s * features_per_sec / factor) for s in (left_secs, chunk_secs, right_secs))
        if chunk < 1:
            raise ValueError(f"chunk_secs={chunk_secs} is shorter than one encoder frame ({model_cfg.frame_seconds} s)")
        overlap = max(0, min(overlap_frames, chunk - 1, left))
        return cls(left, chunk, right, keep_last_partial_frame, overlap)


class BufferedStream:
    """Per-stream state. Sample counts are absolute (since the stream started) unless named ``ctx_*``."""

    def __init__(self):
        self.audio = torch.zeros(0)  # samples [audio_start, received - pending samples), on the model's device
        self.pending: list[torch.Tensor] = []  # pushed pieces (host) not yet in ``audio`` (uploaded once per step)
        self.audio_start = 0
        self.received = 0
        self.ended = False
        self.finished = False
        self.left_sample = 0  # where the next step's new audio starts (NeMo's left_sample)
        self.ctx_left = self.ctx_chunk = self.ctx_right = 0  # the current window, as NeMo's ContextSizeBatch
        self.decoder_state: DecoderState | None = None
        self.frames_decoded = 0  # encoder frames committed so far (NeMo's decoded_lengths)
        self.redecode = 0  # frames before this window's chunk that the last step left tentative (seam="redecode")
        self.steps = 0


class BufferedMode:
    """``StreamingMode`` "buffered". ``engine``: an optional ``EncoderEngine`` with mode "window" to run the encoder
    (default: the model's own PyTorch encoder). ``seam``: "nemo" (default) is NeMo's loop; "redecode" leaves the
    last ``overlap_frames`` of every chunk tentative and commits them from the next window (default: the largest TDT
    duration - 1; module docstring). The default stays NeMo's (docs/demo-model.md, "Long-form")."""

    name = "buffered"
    SEAMS = ("redecode", "nemo")

    def __init__(self, model, left_secs: float = 10.0, chunk_secs: float = 2.0, right_secs: float = 2.0, *,
                 keep_last_partial_frame: bool = True, seam: str = "nemo", overlap_frames: int | None = None,
                 config: BufferedConfig | None = None, engine=None, decoder=None, fixed_batch: int | None = None,
                 decode_loop: bool | None = None):
        if seam not in self.SEAMS:
            raise ValueError(f"seam={seam!r}; known: {', '.join(self.SEAMS)}")
        self.model = model
        self.decoder = decoder or model.greedy_decoder()
        if overlap_frames is None:
            overlap_frames = max(self.decoder.durations, default=1) - 1
        self.cfg = config or BufferedConfig.from_secs(model.cfg, left_secs, chunk_secs, right_secs,
                                                      keep_last_partial_frame,
                                                      overlap_frames if seam == "redecode" else 0)
        self.engine = engine
        # one shape for every encoder / decoder call: windows padded to the full window, batches of exactly
        # fixed_batch rows (more streams: several calls), so a stream's tokens never depend on the other streams
        # of its step, bitwise, in any precision (otherwise kernels differ by batch shape: fp32 noise, but enough to
        # flip near-tie tokens in fp16 / bf16)
        if fixed_batch is not None and fixed_batch < 1:
            raise ValueError(f"fixed_batch must be >= 1, not {fixed_batch}")
        self.fixed_batch = fixed_batch
        self._initial: dict[tuple, DecoderState] = {}
        # decode_loop: greedy decoding in GreedyLoop's static buffers (one CUDA graph per shape; the same arithmetic
        # as the decoder, so the same tokens), the host looking once per block instead of every 16 symbol steps
        # (default: on CUDA with the model's own decoder, unless TRT_ASR_DECODE_GRAPHS=0)
        if decode_loop is None:
            decode_loop = (model.device.type == "cuda" and decoder is None
                           and os.environ.get("TRT_ASR_DECODE_GRAPHS", "1") != "0")
        self.decode_loop = decode_loop
        self._loops: dict[tuple, GreedyLoop] = {}
        self._graph_pool = None
        self.sample_rate = model.cfg.sample_rate
        self.frame_seconds = model.cfg.frame_seconds
        self.samples_per_frame = model.cfg.preprocessor.hop_length * model.cfg.encoder.subsampling_factor
        spf = self.samples_per_frame
        self.left, self.chunk, self.right = (self.cfg.left_frames * spf, self.cfg.chunk_frames * spf,
                                             self.cfg.right_frames * spf)

    @torch.no_grad()
    def warmup(self, max_batch: int) -> None:
        """Silent streams (``fixed_batch`` of them, else ``max_batch``) through a first, a full and a last window, so
        the encoder's kernels and the decode loops' CUDA graphs exist before traffic arrives."""
        pcm = torch.zeros(self.left + 3 * self.chunk + self.right + self.samples_per_frame // 2)
        states = [self.new_stream() for _ in range(self.fixed_batch or max_batch)]
        for s in states:
            self.push(s, pcm)
            self.end(s)
        while any(self.ready(s) for s in states):
            self.step([s for s in states if self.ready(s)])

    @property
    def latency_seconds(self) -> float:
        """Audio that must arrive after a chunk's first sample before it is committed (chunk + right context, + the
        overlap: the first frames of a chunk are the previous step's overlap, committed one step later)."""
        return (self.chunk + self.right + self.cfg.overlap_frames * self.samples_per_frame) / self.sample_rate

    # -------------------------------------------------------------- buffering
    def new_stream(self) -> BufferedStream:
        return BufferedStream()

    def push(self, stream: BufferedStream, pcm: torch.Tensor) -> None:
        # appended, not concatenated: a 14 s buffer copied on every 100 ms push would cost O(buffer) per push
        stream.pending = [*stream.pending, pcm.to(torch.float32)]  # a new list: a failed step's restore stays exact
        stream.received += pcm.numel()

    def _upload(self, streams: Sequence[BufferedStream], device: torch.device) -> None:
        """Every stream's pushed pieces -> its audio buffer on the model's device, in ONE host->device copy for the
        whole step (windows are then cut and padded on the device: no window-sized host copies)."""
        for s in streams:
            if s.audio.device != device:  # a new (or finished) stream's empty buffer
                s.audio = torch.zeros(0, device=device)
        todo = [s for s in streams if s.pending]
        if not todo:
            return
        sizes = [sum(p.numel() for p in s.pending) for s in todo]
        pieces = [p for s in todo for p in s.pending]
        if device.type == "cuda":  # joined straight into pinned memory: an asynchronous copy, no extra host copy
            host = torch.empty(sum(sizes), pin_memory=True)
            new = torch.cat(pieces, out=host).to(device, non_blocking=True)
        else:
            new = torch.cat(pieces)
        for s, piece in zip(todo, new.split(sizes)):
            s.audio = torch.cat((s.audio, piece))
            s.pending = []

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

    def samples_to_ready(self, s: BufferedStream) -> int:
        """More samples ``ready`` needs (0: ready, or only ``end`` can make it ready); see the scheduler."""
        if s.finished or s.ended:
            return 0
        return max(self._next_right_sample(s) + 1 - s.received, 0)

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
        window = s.audio[start - s.audio_start: right_sample - s.audio_start]  # _upload()ed
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
        return self.step_end(self.step_begin(streams))

    # the scheduler splits a step (StreamingMode's optional step_begin / step_end): step_begin queues every
    # part's encoder call on the device, step_end decodes; meanwhile the host delivers the previous step's events
    @torch.no_grad()
    def step_begin(self, streams: Sequence[BufferedStream]) -> list[dict]:
        streams = list(streams)
        self._upload(streams, self.model.device)
        S = self.fixed_batch or max(len(streams), 1)
        return [self._encode_part(streams[i:i + S]) for i in range(0, len(streams), S)]

    @torch.no_grad()
    def step_end(self, parts: list[dict]) -> list[StepResult]:
        return [r for part in parts for r in self._decode_part(**part)]

    def _encode_part(self, streams: list[BufferedStream]) -> dict:
        """Advance each stream by one chunk and queue the encoder on its window (no host sync)."""
        n = len(streams)
        windows, lasts = zip(*(self._advance(s) for s in streams))
        rows = self.fixed_batch or n  # fixed_batch: rows past n repeat row 0 (computed, never read)
        windows = list(windows) + [windows[0]] * (rows - n)
        lengths = [w.numel() for w in windows]
        width = self.left + self.chunk + self.right if self.fixed_batch else max(max(lengths), 1)
        audio_bn = torch.nn.utils.rnn.pad_sequence(windows, batch_first=True)  # zero padding, on the device
        if audio_bn.shape[1] < width:
            audio_bn = torch.nn.functional.pad(audio_bn, (0, width - audio_bn.shape[1]))
        lengths_b = torch.tensor(lengths, dtype=torch.long)
        enc_bdt, enc_len = self.encode(audio_bn, _h2d(lengths_b, audio_bn.device))
        return {"streams": streams, "lasts": lasts, "enc_bdt": enc_bdt, "enc_len": enc_len}

    def _initial_state(self, device, dtype) -> DecoderState:
        key = (str(device), dtype)  # shared by every new stream: the decoder never writes a state in place
        if key not in self._initial:
            self._initial[key] = self.decoder.initial_state(1, device, dtype)
        return self._initial[key]

    def _decode_part(self, streams: list[BufferedStream], lasts: tuple, enc_bdt: torch.Tensor,
                     enc_len: torch.Tensor) -> list[StepResult]:
        device = enc_bdt.device
        spf = self.samples_per_frame
        n, rows = len(streams), enc_bdt.shape[0]
        pad = [0] * (rows - n)
        enc_len = enc_len.cpu()
        left_f = torch.tensor([s.ctx_left // spf for s in streams] + [streams[0].ctx_left // spf] * len(pad))
        chunk_f = torch.tensor([s.ctx_chunk // spf for s in streams] + [streams[0].ctx_chunk // spf] * len(pad))
        last = torch.tensor(list(lasts) + [lasts[0]] * len(pad))
        if self.cfg.keep_last_partial_frame:
            chunk_f = torch.where(last, (enc_len - left_f).clamp(min=0), chunk_f)
        chunk_f = torch.minimum(chunk_f, (enc_len - left_f).clamp(min=0))
        # seam="redecode": decoding resumes where the previous step stopped committing (``redecode`` frames before
        # this chunk, decoded there with only the right context); this step leaves its own last ``overlap`` chunk
        # frames tentative, except at the end. overlap 0 (seam="nemo") is NeMo's loop.
        redecode = torch.tensor([s.redecode for s in streams] + [streams[0].redecode] * len(pad))
        start_f = left_f - redecode
        overlap = torch.where(last, 0, torch.minimum(chunk_f, torch.tensor(self.cfg.overlap_frames)))
        commit_f = redecode + chunk_f - overlap
        tail_f = torch.where(last, 0, (enc_len - start_f - commit_f).clamp(min=0))

        initial = self._initial_state(device, enc_bdt.dtype)
        state = DecoderState.stack([s.decoder_state if s.decoder_state is not None else initial
                                    for s in streams + [streams[0]] * len(pad)])
        chunk_tokens, state = self._decode("commit", enc_bdt, start_f, commit_f, state, n)
        # tentative tail: the overlap and right-context frames, decoded from (a copy of) the state after the commit
        if int(tail_f.max()) > 0:
            tails, _ = self._decode("tail", enc_bdt, start_f + commit_f, tail_f, state, n)
        else:
            tails = [[] for _ in range(rows)]

        results = []
        for b, (s, committed, tail) in enumerate(zip(streams, chunk_tokens, tails)):
            s.decoder_state = state.row(b)
            start = s.frames_decoded
            s.frames_decoded += int(commit_f[b])
            s.redecode = int(overlap[b])
            s.finished = lasts[b]
            s.steps += 1
            if s.finished:
                s.audio, s.pending = torch.zeros(0), []
            results.append(StepResult(
                committed=[Token(label, start + frame, dur) for label, frame, dur in committed],
                tentative=[Token(label, s.frames_decoded + frame, dur) for label, frame, dur in tail],
                finished=s.finished, horizon=s.frames_decoded))
        return results

    def _decode(self, role: str, enc_bdt: torch.Tensor, start_f: torch.Tensor, count_f: torch.Tensor,
                state: DecoderState, n: int) -> tuple[list[list[tuple[int, int, int]]], DecoderState]:
        """Greedy decoding of frames [start_f, start_f + count_f) of every row from ``state`` -> tokens per row
        (frames relative to start_f), the state after them. Rows >= n are padding."""
        device = enc_bdt.device
        if not self.decode_loop:
            tokens, state = self.decoder(_frames(enc_bdt, start_f, count_f), _h2d(count_f, device), state)
            return tokens.to_lists(), state
        rows = enc_bdt.shape[0]
        frames = -(-max(int(count_f.max()), 1) // 8) * 8  # rounded up: a few loop shapes (CUDA graphs) per batch
        key = (role, rows, frames)
        loop = self._loops.get(key)
        if loop is None:
            use_graph = device.type == "cuda"
            if use_graph and self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            loop = self._loops[key] = GreedyLoop(self.model, rows, frames, device, use_graph, self._graph_pool)
        f_btj = self.model.joint.project_encoder(_frames(enc_bdt, start_f, count_f, frames).transpose(1, 2))
        h, c = state.lstm
        loop.load(f_btj, _h2d(count_f, device), n, {"h": h.transpose(0, 1), "c": c.transpose(0, 1),
                                                   "pred_out": state.pred_out, "last_label": state.last_label,
                                                   "time_jump": state.time_jump})
        block = loop.bound if device.type == "cpu" else min(2 * frames + 2, loop.bound)  # T blanks + a few labels
        loop.run(block)
        packed = loop.packed[:n].cpu().numpy()
        if packed[:, 1].any():  # the block did not finish every row: the rest of the bound (rare)
            loop.run(loop.bound - block)
            packed = loop.packed[:n].cpu().numpy()
        nxt = loop.next_state()  # views of the loop's buffers: copied out, the next call reuses them
        new_state = DecoderState((loop.h.clone(), loop.c.clone()), nxt["pred_out"].clone(), nxt["last_label"].clone(),
                                 nxt["time_jump"].clone())
        cap = loop.cap
        out = [[] for _ in range(rows)]
        for b in np.flatnonzero(packed[:, 0]):  # rows that emitted something
            out[b] = GreedyLoop.row_tokens(packed[b], cap)
        return out, new_state


def _h2d(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without waiting: a pageable copy waits for all the work queued on the device, which
    would serialise the host with the GPU (the caching host allocator keeps the pinned block until the copy ran)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _frames(enc_bdt: torch.Tensor, start_b: torch.Tensor, count_b: torch.Tensor, width: int | None = None
            ) -> torch.Tensor:
    """enc[b, :, start_b : start_b + count_b] for every b, right-padded (by repeating a valid frame) -> [B, D, width]
    (default width: the largest count)."""
    width = width or max(int(count_b.max()), 1)
    t_max = enc_bdt.shape[2]
    idx = _h2d((start_b[:, None] + torch.arange(width)[None, :]).clamp(max=max(t_max - 1, 0)), enc_bdt.device)
    return torch.gather(enc_bdt, 2, idx[:, None, :].expand(-1, enc_bdt.shape[1], -1))
