"""Batched greedy TDT / RNNT decoding, label-looping style, with no Python loop over utterances.

Every utterance b keeps a frame pointer t_b, the prediction-network state, and a count of labels emitted at its
last label frame. One step, for all utterances at once:

    logits = joint(f[b, t_b], g_b);  label = argmax(tokens + blank);  d = durations[argmax(duration logits)]
    blank:      t_b += max(d, 1)
    non-blank:  emit (label, t_b, d); g_b <- prediction(label); t_b += d;
                if d == 0 and max_symbols labels were already emitted at t_b: t_b += 1   (NeMo's forced blank)

An utterance is finished when t_b >= its length. This is NeMo's ``greedy_batch`` (label looping) unrolled into one
uniform step, so the tokens, frames and the duration that moved t_b are the same as NeMo's. For RNNT the "duration"
of blank is 1 and of a label 0. The loop checks for completion every ``sync_every`` steps only: on a GPU that is
one host sync per ``sync_every`` steps, not one per token (finished utterances are masked, so extra steps are no-ops).

Streaming carries ``DecoderState`` between chunks: LSTM state, projected prediction output, last label, and
``time_jump`` = how far the last advance overshot the end of the chunk (the next chunk starts there).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..model.transducer import Joint, LSTMState, PredictionNetwork
from ..numerics import without_tf32


@dataclass
class DecoderState:
    lstm: LSTMState  # (h, c) [layers, B, H]
    pred_out: torch.Tensor  # projected prediction output [B, J]
    last_label: torch.Tensor  # [B], blank if nothing emitted yet
    time_jump: torch.Tensor  # [B] frames into the next chunk where decoding resumes

    def row(self, b: int) -> "DecoderState":
        """Row b as a batch of one: views (no device work), valid as long as nobody writes the batch in place
        (the decoder never does)."""
        h, c = self.lstm
        return DecoderState((h[:, b:b + 1], c[:, b:b + 1]), self.pred_out[b:b + 1], self.last_label[b:b + 1],
                            self.time_jump[b:b + 1])

    @staticmethod
    def stack(states: list["DecoderState"]) -> "DecoderState":
        return DecoderState(
            (torch.cat([s.lstm[0] for s in states], 1), torch.cat([s.lstm[1] for s in states], 1)),
            torch.cat([s.pred_out for s in states]), torch.cat([s.last_label for s in states]),
            torch.cat([s.time_jump for s in states]))


@dataclass
class BatchedTokens:
    """Emitted tokens per utterance, padded: labels/frames/durations [B, N]; counts [B]."""

    labels: torch.Tensor
    frames: torch.Tensor
    durations: torch.Tensor
    counts: torch.Tensor

    def to_lists(self) -> list[list[tuple[int, int, int]]]:
        labels, frames, durs, counts = (x.cpu().tolist() for x in (self.labels, self.frames, self.durations, self.counts))
        return [list(zip(labels[b][:n], frames[b][:n], durs[b][:n])) for b, n in enumerate(counts)]


class GreedyTransducerDecoder:
    def __init__(self, prednet: PredictionNetwork, joint: Joint, durations: list[int] | None, max_symbols: int = 10,
                 sync_every: int | None = None):
        self.prednet, self.joint = prednet, joint
        self.blank = prednet.blank_id
        self.tdt = bool(durations)
        self.durations = list(durations or [])
        self.max_symbols = max_symbols
        self.sync_every = sync_every

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def initial_state(self, batch: int, device, dtype=torch.float32) -> DecoderState:
        lstm = self.prednet.initial_state(batch, device, dtype)
        blank = torch.full((batch,), self.blank, dtype=torch.long, device=device)
        out, lstm = self.prednet.step(blank, lstm)
        return DecoderState(lstm, self.joint.project_prednet(out), blank, torch.zeros_like(blank))

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    @without_tf32
    def __call__(self, encoded_bdt: torch.Tensor, lengths: torch.Tensor,
                 state: DecoderState | None = None) -> tuple[BatchedTokens, DecoderState]:
        """encoded [B, D, T] (NeMo layout), lengths [B] -> tokens, state after the last frame."""
        b, _, t_max = encoded_bdt.shape
        device = encoded_bdt.device
        f = self.joint.project_encoder(encoded_bdt.transpose(1, 2))  # [B, T, J]
        dtype = f.dtype
        if state is None:
            state = self.initial_state(b, device, dtype)
        h, c = state.lstm
        g = state.pred_out.to(dtype)
        last_label = state.last_label.clone()
        lengths = lengths.to(device=device, dtype=torch.long)
        batch = torch.arange(b, device=device)
        last_frame = (lengths - 1).clamp(min=0)
        t = state.time_jump.to(torch.long).clone()
        active = t < lengths
        num_tokens = 1 + self.blank
        dur_table = torch.tensor(self.durations or [0], dtype=torch.long, device=device)
        capacity = max(t_max, 1) * self.max_symbols + 1
        labels_out = torch.zeros(b, capacity, dtype=torch.long, device=device)
        frames_out = torch.zeros_like(labels_out)
        durs_out = torch.zeros_like(labels_out)
        counts = torch.zeros(b, dtype=torch.long, device=device)
        last_emit_frame = torch.full((b,), -1, dtype=torch.long, device=device)
        emits_at_frame = torch.zeros(b, dtype=torch.long, device=device)
        sync_every = self.sync_every or (1 if device.type == "cpu" else 16)
        if t_max == 0:
            active = torch.zeros_like(active)
        steps = 0
        while bool(active.any()):
            for _ in range(sync_every):
                logits = self.joint.joint_after_projection(f[batch, torch.minimum(t, last_frame)], g)
                label = logits[:, :num_tokens].argmax(-1)
                is_blank = label == self.blank
                if self.tdt:
                    dur = dur_table[logits[:, num_tokens:].argmax(-1)]
                    dur = torch.where(is_blank & (dur == 0), 1, dur)
                else:
                    dur = is_blank.long()
                emit = active & ~is_blank
                # record (slot `counts` is overwritten until something is emitted there)
                labels_out[batch, counts] = label
                frames_out[batch, counts] = t
                durs_out[batch, counts] = dur
                counts += emit
                same_frame = last_emit_frame == t
                emits_at_frame = torch.where(emit, torch.where(same_frame, emits_at_frame + 1, 1), emits_at_frame)
                last_emit_frame = torch.where(emit, t, last_emit_frame)
                last_label = torch.where(emit, label, last_label)
                # prediction network advances only where a label was emitted
                out, (h_new, c_new) = self.prednet.step(torch.where(emit, label, self.blank), (h, c))
                keep = emit[None, :, None]
                h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
                g = torch.where(emit[:, None], self.joint.project_prednet(out), g)
                t = t + dur * active
                t = t + (emit & (emits_at_frame >= self.max_symbols) & (last_emit_frame == t))
                active = t < lengths
                steps += 1
        n = int(counts.max()) if b else 0
        tokens = BatchedTokens(labels_out[:, :n], frames_out[:, :n], durs_out[:, :n], counts)
        new_state = DecoderState((h, c), g, last_label, t - lengths)
        return tokens, new_state


@without_tf32  # the prediction network's cuDNN LSTM in fp32 as on the CPU (also when captured in a CUDA graph)
def masked_label_step(s: dict, prednet, joint, batch_idx: torch.Tensor, dur_table: torch.Tensor, blank: int,
                      tdt: bool, max_symbols: int) -> None:
    """One step of ``GreedyTransducerDecoder``'s loop for every row at once, in place on static tensors, so that a
    fixed number of steps can be captured in a CUDA graph (rows past their end are masked: extra steps are no-ops).

    ``s`` holds f [B, T, J] (projected encoder frames), lengths, t, active, counts, last_label, last_emit_frame,
    emits_at_frame [B]; h, c [layers, B, H]; g [B, J] (projected prediction output); labels, frames, durs [B, cap]
    (slot ``counts`` is written every step and kept only when a label is emitted)."""
    t, h, c, g, counts = s["t"], s["h"], s["c"], s["g"], s["counts"]
    active = s["active"].bool()
    last_frame = (s["lengths"] - 1).clamp(min=0)
    num_tokens = 1 + blank
    logits = joint.joint_after_projection(s["f"][batch_idx, torch.minimum(t, last_frame)], g)
    label = logits[:, :num_tokens].argmax(-1)
    is_blank = label == blank
    if tdt:
        dur = dur_table[logits[:, num_tokens:].argmax(-1)]
        dur = torch.where(is_blank & (dur == 0), 1, dur)  # a blank must advance
    else:
        dur = is_blank.long()
    emit = active & ~is_blank
    s["labels"][batch_idx, counts] = label
    s["frames"][batch_idx, counts] = t
    s["durs"][batch_idx, counts] = dur
    counts.add_(emit)
    same_frame = s["last_emit_frame"] == t
    s["emits_at_frame"].copy_(torch.where(emit, torch.where(same_frame, s["emits_at_frame"] + 1, 1),
                                          s["emits_at_frame"]))
    s["last_emit_frame"].copy_(torch.where(emit, t, s["last_emit_frame"]))
    s["last_label"].copy_(torch.where(emit, label, s["last_label"]))
    out, (h_new, c_new) = prednet.step(torch.where(emit, label, blank), (h, c))
    keep = emit[None, :, None]
    h.copy_(torch.where(keep, h_new, h))
    c.copy_(torch.where(keep, c_new, c))
    g.copy_(torch.where(emit[:, None], joint.project_prednet(out), g))
    t.add_(dur * active)
    # max_symbols labels at one frame: force the frame on (NeMo's rule)
    t.add_(emit & (s["emits_at_frame"] >= max_symbols) & (s["last_emit_frame"] == t))
    s["active"].copy_(t < s["lengths"])


class GreedyLoop:
    """Static buffers of the batched greedy TDT/RNNT loop for one (batch bucket, encoder frames) shape.

    ``run(n)`` does n uniform steps of ``GreedyTransducerDecoder`` (the same arithmetic, so the same tokens) on
    the carried state, then packs [count, active, labels, frames, durations] per row into ``packed`` for one D2H
    copy. On CUDA each n is one CUDA graph. Steps past a row's end are no-ops (masked), so a fixed n is exact.
    Used by the batched cache-aware and the buffered modes (whose step shapes repeat)."""

    def __init__(self, model, batch: int, frames: int, device, use_graph: bool, graph_pool=None):
        d = model.cfg.decoding
        self.prednet, self.joint = model.decoder, model.joint
        self.blank = self.prednet.blank_id
        self.tdt = d.model_type == "tdt"
        self.max_symbols = d.max_symbols
        self.B, self.T = batch, frames
        # per frame at most max_symbols steps (then a blank, a duration or the forced advance moves t on): the loop
        # is done after T * max_symbols steps whatever the labels, and emits fewer than cap tokens
        self.bound = frames * self.max_symbols
        self.cap = self.bound + 1
        dt = model.dtype
        J = self.joint.enc.out_features
        H, Lr = self.prednet.cfg.pred_hidden, self.prednet.cfg.pred_rnn_layers

        def z(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)
        self.f, self.lengths, self.t, self.active = z(batch, frames, J, dtype=dt), z(batch), z(batch), z(batch)
        self.h, self.c, self.g = z(Lr, batch, H, dtype=dt), z(Lr, batch, H, dtype=dt), z(batch, J, dtype=dt)
        self.last_label, self.counts = z(batch), z(batch)
        self.labels, self.frames, self.durs = z(batch, self.cap), z(batch, self.cap), z(batch, self.cap)
        self.last_emit_frame, self.emits_at_frame = z(batch), z(batch)
        self.packed = z(batch, 2 + 3 * self.cap, dtype=torch.int32)
        self.batch_idx = torch.arange(batch, device=device)
        self.dur_table = torch.tensor(list(d.durations) if self.tdt else [0], dtype=torch.long, device=device)
        self.use_graph, self.graph_pool = use_graph, graph_pool
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def load(self, f_btj: torch.Tensor, lengths: torch.Tensor, n: int, state: dict) -> None:
        """A chunk's projected encoder frames and the gathered decoder state; rows >= n are padding (inactive)."""
        b, t = f_btj.shape[:2]
        self.f[:, :t].copy_(f_btj)
        self.f[:, t:].zero_()
        self.lengths.copy_(lengths)
        self.lengths[n:].zero_()
        self.h.copy_(state["h"].transpose(0, 1))
        self.c.copy_(state["c"].transpose(0, 1))
        self.g.copy_(state["pred_out"])
        self.last_label.copy_(state["last_label"])
        self.t.copy_(state["time_jump"])
        self.active.copy_(self.t < self.lengths)
        self.counts.zero_()
        self.last_emit_frame.fill_(-1)
        self.emits_at_frame.zero_()

    @staticmethod
    def row_tokens(row, cap: int) -> list[tuple[int, int, int]]:
        """One row of ``packed`` (on the host) -> its (label, frame, duration) tokens."""
        cnt = int(row[0])
        if not cnt:
            return []
        return list(zip(row[2:2 + cnt].tolist(), row[2 + cap:2 + cap + cnt].tolist(),
                        row[2 + 2 * cap:2 + 2 * cap + cnt].tolist()))

    def next_state(self) -> dict:
        return {"h": self.h.transpose(0, 1), "c": self.c.transpose(0, 1), "pred_out": self.g,
                "last_label": self.last_label, "time_jump": self.t - self.lengths}

    def _steps(self, n: int, until_done: bool = False) -> None:
        s = {k: getattr(self, k) for k in ("f", "lengths", "t", "active", "h", "c", "g", "labels", "frames", "durs",
                                           "counts", "emits_at_frame", "last_emit_frame", "last_label")}
        for _ in range(n):
            if until_done and not bool(self.active.any()):  # CPU: looking is free, so stop when all are done
                break
            masked_label_step(s, self.prednet, self.joint, self.batch_idx, self.dur_table, self.blank, self.tdt,
                              self.max_symbols)
        p, cap = self.packed, self.cap
        p[:, 0].copy_(self.counts)
        p[:, 1].copy_(self.active)
        p[:, 2:2 + cap].copy_(self.labels)
        p[:, 2 + cap:2 + 2 * cap].copy_(self.frames)
        p[:, 2 + 2 * cap:].copy_(self.durs)

    def run(self, n: int) -> None:
        if n <= 0:
            return
        if not self.use_graph:
            self._steps(n, until_done=self.f.device.type == "cpu")
            return
        graph = self._graphs.get(n)
        if graph is None:  # capture on the current (loaded) buffers: warm-up on a side stream, then reload them
            saved = {k: v.clone() for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
            try:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    self._steps(n)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.graph_pool):
                    self._steps(n)
            except RuntimeError as e:  # a safety net: the same steps eagerly (slower, same tokens)
                warnings.warn(f"greedy loop CUDA graph capture failed ({e}); running it eagerly", stacklevel=2)
                self.use_graph = False
                graph = None
            for k, v in saved.items():
                getattr(self, k).copy_(v)
            if graph is None:
                self._steps(n)
                return
            self._graphs[n] = graph
        graph.replay()
