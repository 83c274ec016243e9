"""Cache-aware streaming for many streams per GPU: the whole step runs batched on the device, the host only slices PCM.

``CacheAwareMode`` does per-stream Python on every step (a CPU mel front end per stream, chunk assembly, ``torch.cat``
of caches, decoder-state stack/select, a host read of every stream's encoded length, a greedy loop that syncs per
symbol step); at 160 ms chunks that host work, not the GPU, bounds the streams per GPU. ``BatchedCacheAwareMode``
gives the same tokens with this per step, for all B streams of the batch at once:

    host    for each stream: which mel frames it steps (ints), its samples for them -> one row of a pinned array
    H2D     one copy: [B, W + 2] float32 (W samples per row; + the row's valid-sample and real-frame counts)
    device  log-mel of all B chunks (``BatchedLogMel``: the featurizer's math), pre-encode cache from the pool,
            engine step per chunk kind (first chunks have another shape), greedy TDT for the whole batch as a
            bounded, masked loop (no host sync per symbol; a CUDA graph per bucket on CUDA), new state scattered
            back into the ``SlotPool``
    D2H     one copy: [B, 2 + 3 * cap] int32 (token count, still-active flag, labels, frames, durations); a second
            one only in the rare step where the first decode block did not finish every stream
    host    encoded lengths from the formula (``CacheAwareParams.encoder_frames``), tokens -> ``StepResult``

Per-stream host state is a float32 numpy buffer of PCM not yet consumed and a few ints; the pre-encode mel cache,
the encoder caches and the decoder state (LSTM h/c, projected prediction output, last label, TDT time jump) live in
a ``SlotPool`` row on the device (``state.slot``). Streams at different chunk indices share a step (grouped by
chunk kind only). Features are unnormalised (as NeMo's cache-aware models): a model with per-feature normalisation
is refused (use ``CacheAwareMode``, which normalises over the audio so far).

Isolation (the scheduler's retry): nothing of a stream changes until the whole step has succeeded -- device state
is scattered and host state advanced only after the tokens are back.
"""

from __future__ import annotations

import inspect
import os
import weakref

import numpy as np
import torch

from ..decoding.greedy import GreedyLoop
from .cache_aware import CacheAwareParams, initial_caches
from .frontend import BatchedLogMel
from .scheduler import SlotPool, bucket_for, copy_into as _copy
from .session import StepResult, Token

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_EMPTY = np.zeros(0, dtype=np.float32)


class BatchedStreamState:
    """One stream's host state: PCM from absolute sample ``pcm_start`` on (what later chunks still need) and
    counters. Its device state is row ``slot`` of the mode's pool. ``buf`` holds samples ``buf_start`` .. ``received``
    (``pcm_start`` >= ``buf_start``) with room to append; a step only moves ``pcm_start``, a push writes only past
    ``received`` (or into a new ``buf``), so restoring a snapshot of ``__dict__`` (the scheduler does when a step
    fails) restores the stream exactly. Fields are otherwise replaced, never mutated in place."""

    def __init__(self, slot: int):
        self.slot = slot
        self.buf = _EMPTY
        self.buf_start = 0
        self.pcm_start = 0
        self.received = 0       # samples pushed
        self.ended = False
        self.finished = False
        self.mel_done = 0       # mel frames stepped
        self.chunks_done = 0
        self.frames_done = 0    # encoder frames emitted (absolute token frames)


class _Group:
    """One chunk kind's part of a step (device tensors until the step commits)."""

    def __init__(self, first: bool, streams: list, part: int = 0):
        self.first, self.streams, self.part = first, streams, part  # part: its index among the kind's sub-batches
        self.inplace = False  # its next caches live in the engine's (shared) input buffers


class BatchedCacheAwareMode:
    """``StreamingMode`` "cache_aware" with the whole step batched on the model's device (module docstring).

    ``engine``: any ``EncoderEngine`` in stream mode (default: the torch reference); ``params`` / ``allow_inexact``
    / ``chunk_frames`` / ``att_context_size`` ... as ``CacheAwareMode``. ``capacity``: initial pool slots (the pool
    doubles when full). ``buckets``: batch sizes the per-step buffers are rounded up to (the engine's own buckets
    by default, so its CUDA graphs match). ``decode_block``: greedy steps before the host looks at the tokens (the
    loop is exact whatever it is; a block that finishes every stream needs one D2H copy per step). ``use_graphs``:
    CUDA graphs for the decode loop (default: on CUDA unless ``TRT_ASR_DECODE_GRAPHS=0``)."""

    name = "cache_aware"
    accepts_numpy = True  # push() takes float32 numpy pieces as they are (the scheduler's inbox holds numpy)

    def __init__(self, model, *, engine=None, params: CacheAwareParams | None = None, allow_inexact: bool = False,
                 chunk_frames: int | None = None, capacity: int = 64, buckets=None, decode_block: int | None = None,
                 use_graphs: bool | None = None, **param_kwargs):
        if model.cfg.preprocessor.normalize:
            raise ValueError("BatchedCacheAwareMode needs unnormalised features (normalize: none, as NeMo's "
                             "cache-aware models); per-feature normalisation is not streamable: use CacheAwareMode")
        self.model = model
        if chunk_frames is not None:
            param_kwargs["chunk_size"] = chunk_frames
        self.params = p = params or CacheAwareParams.for_encoder(model.cfg.encoder, allow_inexact=allow_inexact,
                                                                 **param_kwargs)
        if p.shift_size != p.chunk_size:
            raise NotImplementedError("cache-aware sessions with overlapping chunks (shift < chunk)")
        if engine is None:
            from ..engines.torch_engine import TorchEncoderEngine
            engine = TorchEncoderEngine(model, mode="stream", params=p)
        self.engine = engine
        self._engine_kw = {"clone": False} if "clone" in inspect.signature(engine.step).parameters else {}
        self.device = model.device
        self.sample_rate = model.cfg.sample_rate
        self.frame_seconds = model.cfg.frame_seconds
        fe = model.preprocessor.featurizer
        self.mel = BatchedLogMel(fe, self.device)
        self.hop, self.half = fe.hop, fe.n_fft // 2
        self.pad_drop = p.pad_and_drop_preencoded
        self.chunk = (p.chunk_size[0] if not self.pad_drop else p.chunk_size[1], p.chunk_size[1])  # (first, later)
        self.pre = (p.pre_encode_cache_size[0] if not self.pad_drop else p.pre_encode_cache_size[1],
                    p.pre_encode_cache_size[1])
        self.width = self.mel.samples(max(self.chunk))  # samples per staging row
        self.buckets = tuple(sorted(buckets or getattr(engine, "batch_buckets", None) or DEFAULT_BUCKETS))
        if use_graphs is None:  # TRT_ASR_DECODE_GRAPHS=0 turns the greedy loop's CUDA graphs off
            use_graphs = self.device.type == "cuda" and os.environ.get("TRT_ASR_DECODE_GRAPHS", "1") != "0"
        self.use_graphs = use_graphs
        self.decode_block = decode_block
        self._enc_frames: dict[tuple[int, bool], int] = {}
        self._loops: dict[tuple, GreedyLoop] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._stage = None  # pinned [rows, width + 2] float32 staging array (and its numpy view)
        self._tokens_host = None
        self._tokens_host_view = None
        self.cache_io = self._cache_io()
        self._cache_outputs = {out for _, out, _, _ in self.cache_io}
        self.pool = self._make_pool(capacity)
        self._unreset: list[int] = []  # slots acquired since the last step, not yet reset

    # -------------------------------------------------------------- setup
    def _cache_io(self) -> list[tuple[str, str, tuple, torch.dtype]]:
        """(input name, output name, per-stream shape, dtype) of the engine's caches: ``engine.cache_io()`` when the
        engine has one (e.g. a projected-K/V variant), else the contract's three caches."""
        io = getattr(self.engine, "cache_io", None)
        if callable(io):
            try:
                return [(i, o, tuple(shape), dt) for i, o, shape, dt in io()]
            except ValueError:  # e.g. an engine built without streaming params: the contract's caches
                pass
        zero = initial_caches(self.params, 1, "cpu", self.model.dtype)
        out = {"cache_last_channel": "cache_last_channel_next", "cache_last_time": "cache_last_time_next",
               "cache_last_channel_len": "cache_last_channel_next_len"}
        return [(k, out[k], tuple(v.shape[1:]), v.dtype) for k, v in zero.items()]

    def _make_pool(self, capacity: int) -> SlotPool:
        dec = self.model.greedy_decoder().initial_state(1, self.device, self.model.dtype)
        h, c = dec.lstm
        init = {"h": h[:, 0], "c": c[:, 0], "pred_out": dec.pred_out[0], "last_label": dec.last_label[0],
                "time_jump": dec.time_jump[0]}
        specs = {name: (shape, dt) for name, _, shape, dt in self.cache_io}
        # the stream's last P mel frames (zeros before its start), fp32 as the front end's output
        specs["pre_mel"] = ((self.params.feat_in, self.pre[1]), torch.float32)
        specs.update({k: (tuple(v.shape), v.dtype) for k, v in init.items()})
        return SlotPool(capacity, specs, self.device, self.buckets, init=init, growable=True)

    @property
    def latency_seconds(self) -> float:
        return self.params.chunk_size[1] * self.hop / self.sample_rate

    # -------------------------------------------------------------- StreamingMode
    def new_stream(self) -> BatchedStreamState:
        s = BatchedStreamState(self.pool.acquire(reset=False))
        self._unreset.append(s.slot)  # reset with the others before the next step gathers (one copy per key)
        s._free_slot = weakref.finalize(s, self.pool.release, s.slot)  # runs once: release(), finish or garbage
        return s

    def reserve(self, streams: int) -> None:
        """Device state for ``streams`` concurrent streams now. The pool grows by doubling when full, and each
        doubling copies every open stream's state in the scheduler's thread while those streams wait: a server that
        expects many streams pays for that at start-up instead (the in-process load tool sizes its pool likewise)."""
        self.pool.grow(int(streams))

    def release(self, s: BatchedStreamState) -> None:
        """The stream is gone (finished, closed, failed): its slot goes back to the pool."""
        fin = getattr(s, "_free_slot", None)
        if fin is not None:
            fin()

    def push(self, s: BatchedStreamState, pcm) -> None:
        if isinstance(pcm, torch.Tensor):
            pcm = pcm.detach()
            if pcm.device.type != "cpu" or pcm.dtype != torch.float32:
                pcm = pcm.to("cpu", torch.float32)
            x = pcm.reshape(-1).numpy()
        else:
            x = np.asarray(pcm, dtype=np.float32).reshape(-1)
        m = x.size
        if m:
            end = s.received - s.buf_start
            if end + m > s.buf.size:  # a new buffer: the live samples, room for about a second more
                live = s.buf[s.pcm_start - s.buf_start:end]
                buf = np.empty(max(2 * (live.size + m), 16384), np.float32)
                _copy(buf, 0, live)
                s.buf, s.buf_start, end = buf, s.pcm_start, live.size
            _copy(s.buf, end, x)
            s.received += m

    def end(self, s: BatchedStreamState) -> None:
        s.ended = True

    def _frames_available(self, s) -> int:
        """Mel frames whose STFT window lies in the received audio (all N // hop once the stream ended), as
        ``StreamingFrontEnd`` emits them."""
        if s.ended:
            return s.received // self.hop
        return (s.received - self.half) // self.hop + 1 if s.received >= self.half else 0

    def ready(self, s: BatchedStreamState) -> bool:
        if s.finished:
            return False
        first = s.chunks_done == 0
        return s.ended or self._frames_available(s) - s.mel_done >= self.chunk[0 if first else 1]

    def samples_to_ready(self, s: BatchedStreamState) -> int:
        """More samples ``ready`` needs (0: ready, or only ``end`` can make it ready): the scheduler visits a stream
        when its queued audio reaches this, not on every push."""
        if s.finished or s.ended:
            return 0
        k = self.chunk[0 if s.chunks_done == 0 else 1]
        return max(self.half + (s.mel_done + k - 1) * self.hop - s.received, 0)

    def encoder_frames(self, mel_frames: int, first: bool) -> int:
        key = (mel_frames, first)
        n = self._enc_frames.get(key)
        if n is None:
            n = self._enc_frames[key] = int(self.params.encoder_frames(mel_frames, first and not self.pad_drop))
        return n

    # -------------------------------------------------------------- one batched step
    def step(self, streams) -> list[StepResult]:
        return self.step_end(self.step_begin(streams))

    @torch.no_grad()
    def step_begin(self, streams):
        """Stage the batch and launch its device work (front end, engine, decode block, the tokens' D2H copy);
        returns a handle for ``step_end``. Nothing of a stream is committed yet. One step in flight at a time."""
        n = len(streams)
        if self._unreset:
            self.pool.reset_many(self._unreset)
            self._unreset = []
        # chunk kinds: first-chunk rows, then later-chunk rows (one engine call per kind); a kind with more streams
        # than the largest bucket runs as sub-batches of that bucket (each its own front end, engine call and decode
        # loop), so with one bucket every call has the same shape whatever the step's size
        is_first = [s.chunks_done == 0 and not self.pad_drop for s in streams]
        top = self.buckets[-1]
        parts = []
        for first in (True, False):
            idx = [i for i in range(n) if is_first[i] == first]
            parts += [(first, j // top, idx[j:j + top]) for j in range(0, len(idx), top)]
        offsets, rows = [], 0
        for _, _, idx in parts:  # each sub-batch's rows start a block of its bucket's size in the staging array
            offsets.append(rows)
            rows += bucket_for(len(idx), self.buckets)
        order = [i for _, _, idx in parts for i in idx]
        real = self._stage_rows([(streams[i], first, r0 + k) for (first, _, idx), r0 in zip(parts, offsets)
                                 for k, i in enumerate(idx)], rows)
        x_all = self._stage_t[:rows]
        if self.device.type != "cpu":
            x_all = x_all.to(self.device, non_blocking=True)
        w = self.width
        groups = []
        for (first, part, idx), r0 in zip(parts, offsets):
            # the front end runs on the sub-batch's whole bucket of rows (rows past its streams are stale or zero;
            # nothing reads them): one shape per bucket, so a row's mel never depends on the other rows
            x = x_all[r0:r0 + bucket_for(len(idx), self.buckets)]
            mel = self.mel(x[:, :w], x[:, w].long())  # [rows, F, max chunk]
            real_dev = x[:, w + 1].long()
            mel.masked_fill_(torch.arange(mel.shape[-1], device=mel.device)[None, None, :] >= real_dev[:, None, None],
                             0.)
            g = _Group(first, [streams[i] for i in idx], part)
            if groups:  # the next call may reuse the buffers holding the previous one's next caches
                prev = groups[-1]
                prev.out = {k: (v.clone() if k in self._cache_outputs else v) for k, v in prev.out.items()}
            self._run_group(g, mel[:len(idx)], real_dev[:len(idx)])
            groups.append(g)
        return streams, groups, order, real, self._tokens_copy(groups)

    @torch.no_grad()
    def step_end(self, handle) -> list[StepResult]:
        """Wait for ``step_begin``'s device work, then commit: pool state, host counters, tokens per stream."""
        streams, groups, order, real, host = handle
        n = len(streams)
        host = self._tokens_wait(host)
        if host[:, 1].any():  # a decode block did not finish every stream: run the rest of the bound (rare)
            for g in groups:
                g.loop.run(g.loop.bound - g.block)
            host = self._tokens_to_host(groups)

        # commit: device state back into the pool, then the host state
        for g in groups:
            nxt = {name: g.out[out] for name, out, _, _ in self.cache_io}
            nxt.update(g.loop.next_state(), pre_mel=g.pre_mel)
            self.pool.scatter([s.slot for s in g.streams], nxt)
        results: list = [None] * n
        for i, r in zip(order, self._commit_host(groups, host, real)):
            results[i] = r
        return results

    def _commit_host(self, groups, host: np.ndarray, real: list[int]) -> list[StepResult]:
        """Tokens of each row (chunk-local frames + the stream's frame offset) and the streams' counters, in row
        order. Encoded lengths come from the formula, never from the device."""
        out, row, hop, half = [], 0, self.hop, self.half
        for g in groups:
            cap = g.loop.cap
            pre = self.pre[0 if g.first else 1]
            for s in g.streams:
                off = s.frames_done
                toks = [Token(lab, off + fr, d) for lab, fr, d in GreedyLoop.row_tokens(host[row], cap)]
                k = real[row]
                s.frames_done += self.encoder_frames(pre + k, g.first)
                s.chunks_done += 1
                s.mel_done += k
                keep_from = s.mel_done * hop - half - 1  # the next chunk's first sample (and its history)
                if keep_from > s.pcm_start:
                    s.pcm_start = min(keep_from, s.received)
                s.finished = s.ended and s.mel_done >= s.received // hop
                if s.finished:
                    self.release(s)
                out.append(StepResult(committed=toks, tentative=[], finished=s.finished))
                row += 1
        return out

    def _stage_rows(self, placed, rows: int) -> list[int]:
        """``placed``: (stream, first chunk?, staging row). Each stream's samples for its chunk's mel frames -> its
        row of the pinned staging array (+ its valid pre-emphasised sample count and real frame count in the last
        two columns). Returns the real frames, in ``placed`` order."""
        w, hop, half = self.width, self.hop, self.half
        if self._stage is None or self._stage.shape[0] < rows:
            self._stage_t = torch.zeros(rows, w + 2, dtype=torch.float32, pin_memory=self.device.type == "cuda")
            self._stage = self._stage_t.numpy()
            self._zeros = np.zeros(w, np.float32)
        stage = self._stage
        zeros = self._zeros
        real = []
        for s, first, i in placed:
            chunk = self.chunk[0 if first else 1]
            avail = s.received // hop if s.ended else ((s.received - half) // hop + 1 if s.received >= half else 0)
            k = min(chunk, max(avail - s.mel_done, 0))
            real.append(k)
            a0 = s.mel_done * hop - half - 1  # absolute index of the row's first sample (pre-emphasis history)
            row = stage[i]
            lo, hi = max(a0, s.pcm_start), min(a0 + w, s.received)
            if hi > lo:
                if lo > a0:
                    _copy(row, 0, zeros[:lo - a0])
                _copy(row, lo - a0, s.buf[lo - s.buf_start:hi - s.buf_start])
                if hi - a0 < w:
                    _copy(row, hi - a0, zeros[:w - (hi - a0)])
            else:
                _copy(row, 0, zeros[:w])
            row[w] = min(max(s.received - a0 - 1, 0), w)  # pre-emphasised samples that exist (exact in float32)
            row[w + 1] = k
        return real

    def _run_group(self, g: _Group, mel: torch.Tensor, real: torch.Tensor) -> None:
        """Engine step + greedy decode block for one chunk kind (no pool or host state changes yet)."""
        n = len(g.streams)
        chunk, pre, P = self.chunk[0 if g.first else 1], self.pre[0 if g.first else 1], self.pre[1]
        slots = [s.slot for s in g.streams]
        # bucket rows: [n real | copies of the first]; caches straight into the engine's graph inputs when it
        # updates them in place (one cache-sized buffer set per bucket, not three)
        dst = self._engine_cache_inputs(bucket_for(n, self.pool.buckets), pre + chunk)
        g.inplace = dst is not None
        st = self.pool.gather(slots, out=dst)
        b = st["pre_mel"].shape[0]
        body, length = mel[:, :, :chunk], real + pre
        if b > n:
            body = torch.cat((body, body[:1].expand(b - n, -1, -1)))
            length = torch.cat((length, length[:1].expand(b - n)))
        audio = torch.cat((st["pre_mel"][:, :, P - pre:], body), dim=-1)  # [b, F, pre + chunk]
        g.pre_mel = torch.cat((st["pre_mel"], audio), dim=-1)[:, :, -P:]  # the stream's last P frames
        inputs = {"audio_signal": audio.to(self.model.dtype), "length": length,
                  **{name: st[name] for name, _, _, _ in self.cache_io}}
        g.out = out = self.engine.step(inputs, **self._engine_kw)
        enc = out["encoder_output"].to(self.model.dtype)
        t = enc.shape[-1]
        key = (b, max(t, 1), g.first, g.part)  # one per sub-batch: all wait in their buffers for the one D2H
        loop = self._loops.get(key)
        if loop is None:
            loop = self._loops[key] = GreedyLoop(self.model, b, max(t, 1), self.device, self.use_graphs,
                                                  self._graph_pool)
        loop.load(self.model.joint.project_encoder(enc.transpose(1, 2)), out["encoded_lengths"], n, st)
        g.loop, g.block = loop, self._block(loop)
        loop.run(g.block)

    def _engine_cache_inputs(self, b: int, frames: int) -> dict[str, torch.Tensor] | None:
        if not getattr(self.engine, "inplace_caches", False):
            return None
        p = self.params
        static = self.engine.static_inputs(b, frames, p.last_channel_cache_size, p.last_time_cache_size)
        out = {name: static[name] for name, _, _, _ in self.cache_io}
        return out if all(t.shape[0] == b for t in out.values()) else None  # other buckets: gather then copy

    def _tokens_to_host(self, groups) -> np.ndarray:
        return self._tokens_wait(self._tokens_copy(groups))

    def _tokens_wait(self, copied) -> np.ndarray:
        if isinstance(copied, np.ndarray):
            return copied
        copied.synchronize()
        return self._tokens_host_view

    def _tokens_copy(self, groups):
        """Every group's packed tokens in ONE device->host copy (pinned); returns the copy's CUDA event (or the
        tokens themselves on the CPU). ``_tokens_wait`` waits for it."""
        parts = [g.loop.packed[:len(g.streams)] for g in groups]
        width = max(p.shape[1] for p in parts)
        if len(parts) > 1:
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]
        packed = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self.device.type == "cpu":
            return packed.numpy().copy()
        buf = self._tokens_host
        if buf is None or buf.shape[0] < packed.shape[0] or buf.shape[1] < width:
            buf = self._tokens_host = torch.empty((max(packed.shape[0], bucket_for(packed.shape[0], self.buckets)),
                                                   width), dtype=torch.int32, pin_memory=True)
        dst = buf[:packed.shape[0], :width]
        dst.copy_(packed, non_blocking=True)
        self._tokens_host_view = dst.numpy()
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return done

    # -------------------------------------------------------------- warm-up
    @torch.no_grad()
    def warmup(self, max_batch: int, seconds: float = 1.0) -> None:
        """Run every batch bucket up to ``max_batch`` once (first, later and last chunks; both decode blocks), so
        the engine's and the decoder's CUDA graphs exist before timed traffic arrives."""
        audio = torch.zeros(int(seconds * self.sample_rate))
        sizes = [x for x in self.buckets if x <= bucket_for(max_batch, self.buckets)]
        if max_batch > self.buckets[-1]:  # steps of several sub-batches: their decode loops too
            sizes.append(max_batch)
        for b in sizes:
            states = [self.new_stream() for _ in range(b)]
            for s in states:
                self.push(s, audio)
                self.end(s)
            while any(self.ready(s) for s in states):
                self.step([s for s in states if self.ready(s)])
            for s in states:
                self.release(s)
        for loop in self._loops.values():
            loop.run(loop.bound - self._block(loop))

    def _block(self, loop: GreedyLoop) -> int:
        """Greedy steps before the host looks: a chunk of T frames usually needs T blanks plus a few labels (on
        the CPU the loop stops by itself when every row is done, so the whole bound is one block)."""
        if self.decode_block is None and self.device.type == "cpu":
            return loop.bound
        return min(self.decode_block or 2 * loop.T + 2, loop.bound)


__all__ = ["BatchedCacheAwareMode", "BatchedStreamState"]
