"""``torch-cuda`` engine: the PyTorch model in fp16/bf16 (or fp32) with CUDA graphs and static buffers.

* Encoder steps (window or stream mode) run from CUDA graphs captured lazily per *bucket*: batch rounded up to the
  next batch bucket, time rounded up to a multiple of ``time_quantum`` mel frames (padding is masked, so padded rows
  and frames do not change the real ones). Inputs are copied into the bucket's static buffers, the graph replays, and
  the outputs are sliced (and cloned, so the caller may keep them across steps).
* Offline transcription (:class:`TorchCudaTranscriber`): mel front end (fp32, eager), encoder (graph or eager),
  then the TDT/RNNT greedy loop of ``trt_asr.decoding.greedy`` captured as a CUDA graph of ``block`` uniform steps.
  The host checks completion with a one-block lag (flag copied into pinned memory, an event per block), so the GPU
  always has the next block queued: no host sync on the hot path.
* The decoder (prediction network and joint) runs in fp32 by default, whatever the encoder's precision
  (``TorchCudaTranscriber(decoder_precision="bf16")``: in bf16, as NeMo's decoding under bf16 autocast).

Without CUDA (``device='cpu'``) everything runs eagerly through the same code (for CPU tests of the logic).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from ..decoding.greedy import BatchedTokens, masked_label_step
from ..model.encoder import ProjectedKVCache, RingCache, StreamingCache, fold_batch_norm
from ..numerics import without_tf32
from ..streaming.contract import cache_io, cache_names, float_cache_names, ring_slots

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _bucket(n: int, buckets) -> int:
    for b in buckets:
        if b >= n:
            return b
    return n


def _round_up(n: int, q: int) -> int:
    return max(q, int(math.ceil(n / q)) * q)


class _Graphed:
    """A function of static input tensors captured as a CUDA graph (or run eagerly on CPU / when disabled)."""

    def __init__(self, fn, inputs: dict[str, torch.Tensor], use_graph: bool, pool=None, warmup: int = 2):
        self.fn, self.inputs = fn, inputs
        self.graph = None
        if use_graph:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), torch.inference_mode():
                for _ in range(warmup):
                    fn(**inputs)
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool), torch.inference_mode():
                self.outputs = fn(**inputs)
        else:
            self.outputs = None

    def __call__(self):
        if self.graph is None:
            with torch.inference_mode():
                self.outputs = self.fn(**self.inputs)
        else:
            self.graph.replay()
        return self.outputs


class TorchCudaEngine:
    """EncoderEngine with CUDA graphs per (batch, time) bucket. ``model`` is a ``TransducerModel`` (any device and
    dtype: the encoder is copied to ``device`` in ``precision``)."""

    name = "torch-cuda"

    def __init__(self, model, mode: str = "window", precision: str = "fp16", device="cuda", *,
                 batch_buckets=DEFAULT_BATCH_BUCKETS, time_quantum: int = 16, use_graphs: bool | None = None,
                 params=None, drop_extra_pre_encoded: int = 0, cache_drop_size: int = 0, att_context_size=None,
                 output_dtype: torch.dtype | None = None, copy_model: bool = True, compile_mode: str | None = None,
                 autocast: bool = False, kv_cache: str = "layer_input", compile_dynamic: bool = False,
                 inplace_caches: bool = False):
        """``params``: ``trt_asr.streaming.cache_aware.CacheAwareParams`` for stream mode (first/later chunk drop,
        cache drop, attention context, valid_out_len), as the reference ``TorchEncoderEngine``; without it the
        explicit ``drop_extra_pre_encoded`` / ``cache_drop_size`` / ``att_context_size`` apply to every chunk.
        ``compile_mode``: run the step through ``torch.compile`` (e.g. "default", "max-autotune-no-cudagraphs")
        before capturing it as a CUDA graph (one compilation per bucket shape; ``compile_dynamic=True``: one
        compilation with symbolic batch and time for every shape of the window step, no recompile per length).
        ``autocast``: keep fp32 weights and run fp16/bf16 under ``torch.autocast`` (NeMo's mixed precision: layer
        norms, softmax and the residual stream stay fp32) instead of casting the weights.
        ``kv_cache``: the stream step's attention cache, "layer_input" (NeMo's ``cache_last_channel``) or
        "projected" (``cache_last_channel_k`` / ``_v``, keys and values after linear_k / linear_v: a step then
        projects only its new frames) or "ring" (the layer inputs in a ring: a step writes its new frames instead
        of shifting the whole cache, ``RingCache``); see ``trt_asr.streaming.contract``.
        ``inplace_caches`` (stream mode): each bucket's graphs write the next caches into the bucket's cache input
        buffers (shared by its chunk shapes) and return those: one cache-sized buffer set per bucket instead of
        two per shape; a caller can also fill them directly (``static_inputs``). With ``step(..., clone=False)``
        the returned caches are valid until the next step of the same bucket, whatever its shape."""
        if mode not in ("window", "stream"):
            raise ValueError(f"mode must be 'window' or 'stream', not {mode!r}")
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {list(DTYPES)}")
        self.mode, self.precision = mode, precision
        self.device = torch.device(device)
        self.autocast = autocast and precision != "fp32"
        self.compute_dtype = DTYPES[precision]
        self.dtype = torch.float32 if self.autocast else DTYPES[precision]  # weights and float I/O
        enc = model.encoder
        if copy_model and (enc.layers[0].norm_out.weight.device != self.device
                           or enc.layers[0].norm_out.weight.dtype != self.dtype):
            enc = copy.deepcopy(enc)
        self.encoder = enc.to(device=self.device, dtype=self.dtype).eval()
        if enc is not model.encoder:  # our own copy: BatchNorm folded into the depthwise convs (one op less)
            fold_batch_norm(self.encoder)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.cfg = model.cfg
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.time_quantum = time_quantum
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self.params = params
        if params is not None:
            cache_drop_size = params.cache_drop_size
            att_context_size = list(params.att_context_size)
        self.drop_extra_pre_encoded, self.cache_drop_size = drop_extra_pre_encoded, cache_drop_size
        self.att_context_size = att_context_size
        self.output_dtype = output_dtype
        self.kv_cache = kv_cache
        self.inplace_caches = bool(inplace_caches) and mode == "stream"
        self._cache_names = cache_names(kv_cache)  # validates kv_cache
        if kv_cache == "projected":
            self._stream_fn = self._stream_fn_projected
        elif kv_cache == "ring":
            if mode == "stream" and params is None:
                raise ValueError("kv_cache='ring' needs params (the ring's size)")
            self._stream_fn = self._stream_fn_ring
        self._graphs: dict[tuple, _Graphed] = {}
        self._shared_caches: dict[tuple, dict[str, torch.Tensor]] = {}  # (B, C, K) -> cache inputs (in place)
        self._pinned: dict[tuple, tuple] = {}  # host staging buffers for CPU inputs (+ the event of their last copy)
        self.compile_mode = compile_mode
        if self.autocast:
            wfn, sfn = self._window_fn, self._stream_fn

            def _ac(fn):
                def run(**kw):
                    with torch.autocast(self.device.type, dtype=self.compute_dtype):
                        return fn(**kw)
                return run
            self._window_fn, self._stream_fn = _ac(wfn), _ac(sfn)
        if compile_mode:
            kw = {} if compile_mode == "default" else {"mode": compile_mode}
            # no on-device benchmarking that changes numerics: Inductor otherwise times candidate kernel configs
            # (e.g. a reduction's block size) when it compiles, and processes compiling side by side on a busy GPU
            # (a server's engine processes, a benchmark's reference) could pick different ones, so that the same
            # stream would give different fp16 tokens in different processes
            import torch._inductor.config as inductor_config

            if hasattr(inductor_config, "deterministic"):
                inductor_config.deterministic = True
            self._window_fn = torch.compile(self._window_fn, dynamic=bool(compile_dynamic), **kw)
            self._stream_fn = torch.compile(self._stream_fn, dynamic=False, **kw)
        # outermost (around autocast and compile): cuDNN's fp32 convs without TF32, in eager runs and at capture
        self._window_fn, self._stream_fn = without_tf32(self._window_fn), without_tf32(self._stream_fn)
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    # ------------------------------------------------------------------ functions captured
    def _window_fn(self, audio_signal, length):
        enc, enc_len = self.encoder(audio_signal, length, self.att_context_size)
        return {"encoder_output": enc, "encoded_lengths": enc_len}

    def _drop(self, frames: int) -> int:
        p = self.params
        if p is None:
            return self.drop_extra_pre_encoded
        return p.drop_extra(p.is_first_chunk(frames))

    def _encode_chunk(self, audio_signal, length, cache):
        """The encoder's stream step (either cache variant) plus NeMo's streaming_post_process."""
        p = self.params
        enc, enc_len, nxt = self.encoder.stream_step(
            audio_signal, length, cache, drop_extra_pre_encoded=self._drop(audio_signal.shape[-1]),
            cache_drop_size=self.cache_drop_size, att_context_size=self.att_context_size,
            inplace=self.inplace_caches)
        if p is not None and p.att_context_style == "regular" and p.valid_out_len > 0:
            enc, enc_len = enc[:, :, : p.valid_out_len], enc_len.clamp(max=p.valid_out_len)
        return enc, enc_len, nxt

    def _stream_fn(self, audio_signal, length, cache_last_channel, cache_last_time, cache_last_channel_len):
        cache = StreamingCache(cache_last_channel.transpose(0, 1), cache_last_time.transpose(0, 1),
                               cache_last_channel_len)
        enc, enc_len, nxt = self._encode_chunk(audio_signal, length, cache)
        return {"encoder_output": enc, "encoded_lengths": enc_len,
                "cache_last_channel_next": nxt.last_channel.transpose(0, 1).contiguous(),
                "cache_last_time_next": nxt.last_time.transpose(0, 1).contiguous(),
                "cache_last_channel_next_len": nxt.last_channel_len}

    def _stream_fn_projected(self, audio_signal, length, cache_last_channel_k, cache_last_channel_v, cache_last_time,
                             cache_last_channel_len):
        cache = ProjectedKVCache(cache_last_channel_k.transpose(0, 1), cache_last_channel_v.transpose(0, 1),
                                 cache_last_time.transpose(0, 1), cache_last_channel_len)
        enc, enc_len, nxt = self._encode_chunk(audio_signal, length, cache)
        return {"encoder_output": enc, "encoded_lengths": enc_len,
                "cache_last_channel_k_next": nxt.last_k.transpose(0, 1).contiguous(),
                "cache_last_channel_v_next": nxt.last_v.transpose(0, 1).contiguous(),
                "cache_last_time_next": nxt.last_time.transpose(0, 1).contiguous(),
                "cache_last_channel_next_len": nxt.last_channel_len}

    def _stream_fn_ring(self, audio_signal, length, cache_last_channel_ring, cache_last_time, cache_ring_pos,
                        cache_last_channel_len):
        cache = RingCache(cache_last_channel_ring.transpose(0, 1), cache_last_time.transpose(0, 1),
                          cache_last_channel_len, cache_ring_pos, self.params.last_channel_cache_size)
        enc, enc_len, nxt = self._encode_chunk(audio_signal, length, cache)
        return {"encoder_output": enc, "encoded_lengths": enc_len,
                "cache_last_channel_ring_next": nxt.ring.transpose(0, 1).contiguous(),
                "cache_last_time_next": nxt.last_time.transpose(0, 1).contiguous(),
                "cache_ring_pos_next": nxt.pos, "cache_last_channel_next_len": nxt.last_channel_len}

    def cache_io(self) -> list[tuple[str, str, tuple[int, ...], torch.dtype]]:
        """Per cache of the stream step: (input name, output name, per-stream shape, dtype), in contract order.
        A streaming mode allocates ``zeros(B, *shape, dtype)`` for new streams, feeds ``out[output name]`` back as
        ``input name`` next step, and never needs to know the variant. Needs ``params`` (the cache sizes)."""
        if self.mode != "stream" or self.params is None:
            raise ValueError("cache_io() needs a stream-mode engine built with params")
        return cache_io(self.params, self.kv_cache, self.dtype)

    def _out_frames(self, t_mel: int) -> int:
        pre = self.encoder.pre_encode
        t = t_mel
        for _ in range(int(math.log2(self.cfg.encoder.subsampling_factor))):
            t = pre.out_length(t)
        return t

    # ------------------------------------------------------------------ step
    def _load(self, name: str, src: torch.Tensor, dst: torch.Tensor) -> None:
        """src -> dst (a static buffer or a slice of it). CPU inputs go through a pinned staging buffer, so the
        host-to-device copy is asynchronous; a staging buffer is rewritten only after its previous copy ran."""
        if src.device == dst.device and src.data_ptr() == dst.data_ptr() and src.stride() == dst.stride() \
                and src.shape == dst.shape:
            return  # the caller wrote the static buffer itself (static_inputs)
        if src.device.type != "cpu" or self.device.type != "cuda":
            dst.copy_(src, non_blocking=True)
            return
        key = (name, tuple(src.shape), src.dtype)
        buf, ev = self._pinned.get(key, (None, None))
        if buf is None:
            buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        elif ev is not None:
            ev.synchronize()
        buf.copy_(src)
        dst.copy_(buf, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self._pinned[key] = (buf, ev)

    def _get(self, key, make_inputs, fn):
        g = self._graphs.get(key)
        if g is None:
            g = _Graphed(fn, make_inputs(), self.use_graphs, self._pool)
            self._graphs[key] = g
        return g

    def prepare(self, batch: int, frames: int, cache_size: int | None = None, time_cache: int | None = None):
        """Capture the graph of one bucket ahead of time (so the first real step does not pay for it)."""
        B = _bucket(batch, self.batch_buckets)
        T = frames if self.mode == "stream" else _round_up(frames, self.time_quantum)
        F, D, L = self.cfg.encoder.feat_in, self.cfg.encoder.d_model, self.cfg.encoder.n_layers
        if self.mode == "window":
            key = ("w", B, T)

            def make():
                return {"audio_signal": torch.randn(B, F, T, device=self.device, dtype=self.dtype),
                        "length": torch.full((B,), T, dtype=torch.long, device=self.device)}
            return self._get(key, make, self._window_fn)
        C = cache_size
        K = time_cache if time_cache is not None else self.cfg.encoder.conv_context[0]
        key = ("s", B, T, C, K)

        def make_caches():
            R = ring_slots(self.params) if self.kv_cache == "ring" else C
            channel = {name: torch.randn(B, L, R, D, device=self.device, dtype=self.dtype)
                       for name in float_cache_names(self.kv_cache)[:-1]}  # the attention cache(s) of the variant
            ring = ({"cache_ring_pos": torch.arange(B, device=self.device) % R} if self.kv_cache == "ring" else {})
            return {**channel, "cache_last_time": torch.randn(B, L, D, K, device=self.device, dtype=self.dtype),
                    **ring, "cache_last_channel_len": torch.full((B,), C, dtype=torch.long, device=self.device)}

        def make():
            # in-place caches: the graphs of one bucket (first and later chunk shapes) share one set of cache
            # buffers, the largest per-bucket memory; a caller running two shapes in one step copies the first
            # one's next caches out before gathering the second (BatchedCacheAwareMode does)
            caches = (self._shared_caches.setdefault((B, C, K), make_caches()) if self.inplace_caches
                      else make_caches())
            return {"audio_signal": torch.randn(B, F, T, device=self.device, dtype=self.dtype),
                    "length": torch.full((B,), T, dtype=torch.long, device=self.device), **caches}
        return self._get(key, make, self._stream_fn)

    def static_inputs(self, batch: int, frames: int, cache_size: int, time_cache: int) -> dict[str, torch.Tensor]:
        """Stream mode: the input buffers of the graph that ``step`` uses for this batch bucket and chunk shape
        ([bucket, ...]). A caller that writes its inputs there (e.g. ``SlotPool.gather(out=...)``) saves a copy:
        ``step`` does not load a tensor that already is its buffer."""
        return self.prepare(batch, frames, cache_size, time_cache).inputs

    def step(self, inputs: dict[str, torch.Tensor], clone: bool = True) -> dict[str, torch.Tensor]:
        x = inputs["audio_signal"]
        b, _, t = x.shape
        if self.mode == "window":
            g = self.prepare(b, t)
            st = g.inputs
            B, T = st["audio_signal"].shape[0], st["audio_signal"].shape[2]
            if b == B and t == T:
                self._load("audio_signal", x, st["audio_signal"])
                self._load("length", inputs["length"], st["length"])
            else:
                st["audio_signal"].zero_()
                self._load("audio_signal", x, st["audio_signal"][:b, :, :t])
                st["length"].zero_()
                self._load("length", inputs["length"], st["length"][:b])
            out = g()
            t_out = self._out_frames(t)
            res = {"encoder_output": out["encoder_output"][:b, :, :t_out],
                   "encoded_lengths": out["encoded_lengths"][:b]}
        else:
            ch = inputs[self._cache_names[0]]
            C = self.params.last_channel_cache_size if self.kv_cache == "ring" else ch.shape[2]
            g = self.prepare(b, t, cache_size=C, time_cache=inputs["cache_last_time"].shape[3])
            st = g.inputs
            B = st["audio_signal"].shape[0]
            for name in ("audio_signal", "length", *self._cache_names):
                if b < B:
                    st[name][b:].zero_()
                self._load(name, inputs[name], st[name][:b])
            out = g()
            res = {k: v[:b] for k, v in out.items()}
        if clone:
            res = {k: v.clone() for k, v in res.items()}
        if self.output_dtype is not None:
            res = {k: (v.to(self.output_dtype) if v.is_floating_point() else v) for k, v in res.items()}
        return res


# ----------------------------------------------------------------------------------------------- decoding
class _AlignedJoint(torch.nn.Module):
    """A joint whose output layer has zero rows appended up to a multiple of 8 outputs, the logits sliced back:
    v3's 8,198 outputs (8,192 tokens + blank + 5 durations) make a row stride cuBLAS can only serve with unaligned
    kernels in half precision. Same logits (the extra rows are never read)."""

    def __init__(self, joint):
        super().__init__()
        self.enc, self.pred = joint.enc, joint.pred
        out = joint.joint_net[-1]
        self.n_out = out.out_features
        pad = -self.n_out % 8
        self.out = torch.nn.Linear(out.in_features, self.n_out + pad, bias=out.bias is not None,
                                   device=out.weight.device, dtype=out.weight.dtype)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.weight[: self.n_out].copy_(out.weight)
            if out.bias is not None:
                self.out.bias.zero_()
                self.out.bias[: self.n_out].copy_(out.bias)

    def project_prednet(self, pred_bh: torch.Tensor) -> torch.Tensor:
        return self.pred(pred_bh)

    def joint_after_projection(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(f + g))[..., : self.n_out]


class GraphGreedyDecoder:
    """``trt_asr.decoding.greedy.GreedyTransducerDecoder``'s uniform step on static buffers, ``block`` steps per
    CUDA graph; same tokens (it is the same arithmetic). fp32 by default, as NeMo's decoder."""

    def __init__(self, model, batch: int, max_frames: int, device="cuda", dtype=torch.float32, block: int = 16,
                 use_graph: bool | None = None):
        self.device = torch.device(device)
        self.dtype = dtype
        self.prednet = copy.deepcopy(model.decoder).to(self.device, dtype).eval()
        self.joint = _AlignedJoint(copy.deepcopy(model.joint).to(self.device, dtype).eval())
        d = model.cfg.decoding
        self.tdt = d.model_type == "tdt"
        self.max_symbols = d.max_symbols
        self.blank = self.prednet.blank_id
        self.B, self.T, self.block = batch, max_frames, block
        self.use_graph = (self.device.type == "cuda") if use_graph is None else use_graph
        B, T, dev = batch, max_frames, self.device
        J = self.joint.enc.out_features
        H, Lr = self.prednet.cfg.pred_hidden, self.prednet.cfg.pred_rnn_layers
        self.cap = T * self.max_symbols + 1
        z = lambda *s, dt=torch.long: torch.zeros(*s, dtype=dt, device=dev)  # noqa: E731
        self.s = dict(f=z(B, T, J, dt=dtype), lengths=z(B), t=z(B), active=z(B, dt=torch.bool),
                      h=z(Lr, B, H, dt=dtype), c=z(Lr, B, H, dt=dtype), g=z(B, J, dt=dtype), last_label=z(B),
                      labels=z(B, self.cap), frames=z(B, self.cap), durs=z(B, self.cap), counts=z(B),
                      last_emit_frame=z(B), emits_at_frame=z(B))
        self.batch_idx = torch.arange(B, device=dev)
        self.dur_table = torch.tensor(list(d.durations) if self.tdt else [0], dtype=torch.long, device=dev)
        with torch.inference_mode():
            blank = torch.full((1,), self.blank, dtype=torch.long, device=dev)
            h0 = torch.zeros(Lr, 1, H, device=dev, dtype=dtype)
            out, (h1, c1) = self.prednet.step(blank, (h0, h0.clone()))
            self.init_h, self.init_c, self.init_g = h1, c1, self.joint.project_prednet(out)
        self.flag_host = torch.zeros(2, dtype=torch.bool, pin_memory=self.device.type == "cuda")
        self.flag_dev = torch.zeros(1, dtype=torch.bool, device=dev)
        self.graph = None
        if self.use_graph:
            self._reset_state()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                self._block()
            torch.cuda.current_stream().wait_stream(s)
            self._reset_state()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._block()

    def _reset_state(self):
        s = self.s
        s["t"].zero_()
        s["active"].copy_(s["t"] < s["lengths"])
        s["h"].copy_(self.init_h.expand_as(s["h"]))
        s["c"].copy_(self.init_c.expand_as(s["c"]))
        s["g"].copy_(self.init_g.expand_as(s["g"]))
        s["last_label"].fill_(self.blank)
        for k in ("labels", "frames", "durs", "counts", "emits_at_frame"):
            s[k].zero_()
        s["last_emit_frame"].fill_(-1)

    @torch.inference_mode()
    def _block(self):
        s = self.s
        for _ in range(self.block):
            masked_label_step(s, self.prednet, self.joint, self.batch_idx, self.dur_table, self.blank, self.tdt,
                              self.max_symbols)
        self.flag_dev.copy_(s["active"].any().view(1))

    @torch.inference_mode()
    def __call__(self, f_btj: torch.Tensor, lengths: torch.Tensor) -> BatchedTokens:
        """f: projected encoder output [b, T, J] (b <= B, T <= max_frames), lengths [b]."""
        b, t_max, _ = f_btj.shape
        if b > self.B or t_max > self.T:
            raise ValueError(f"batch {b} x {t_max} frames exceeds the decoder's buffers {self.B} x {self.T}")
        s = self.s
        if b < self.B or t_max < self.T:
            s["f"].zero_()
            s["lengths"].zero_()
        s["f"][:b, :t_max].copy_(f_btj)
        s["lengths"][:b].copy_(lengths)
        self._reset_state()
        if self.graph is None:
            while bool(s["active"].any()):
                self._block()
        else:
            # launch blocks, reading the "still active" flag of the block before the last one: the GPU never
            # waits for the host, and at most one block runs past the end (a no-op: finished rows are masked)
            events: list[torch.cuda.Event] = []
            i = 0
            stream = torch.cuda.current_stream()
            while True:
                self.graph.replay()
                self.flag_host[i % 2].copy_(self.flag_dev[0], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
                events.append(ev)
                if i >= 1:
                    events[i - 1].synchronize()
                    if not bool(self.flag_host[(i - 1) % 2]):
                        break
                i += 1
                if i > 4 * self.cap:  # safety net
                    break
        n = int(s["counts"][:b].max()) if b else 0
        return BatchedTokens(s["labels"][:b, :n].clone(), s["frames"][:b, :n].clone(), s["durs"][:b, :n].clone(),
                             s["counts"][:b].clone())


@dataclass
class Timing:
    features_s: float = 0.0
    encoder_s: float = 0.0
    decoder_s: float = 0.0


class TorchCudaTranscriber:
    """Offline batched transcription on the GPU: front end -> encoder (torch-cuda) -> graph greedy decoder.

    ``encoder_graphs`` False runs the encoder eagerly (for large batches the graph saves little and costs memory).
    """

    def __init__(self, model, precision: str = "bf16", device="cuda", max_batch: int = 128, max_seconds: float = 20.0,
                 encoder_graphs: bool = False, decoder_block: int = 16, compile_encoder: bool = False,
                 autocast: bool = False, sub_batches: int = 1, compile_dynamic: bool = False,
                 decoder_precision: str = "fp32"):
        """``compile_dynamic``: compile the encoder once for all lengths (see ``TorchCudaEngine``).
        ``decoder_precision``: the prediction network and joint in "fp32" (default, as NeMo in fp32) or "bf16" /
        "fp16" (what NeMo's decoding does under bf16 autocast); in fp32 the joint's [B, J] x [J, V] products run
        as small-M FFMA GEMMs, the largest cost of the decoder (docs/benchmarks.md, run K).
        ``sub_batches`` > 1: sort the batch by length and run it as that many sub-batches, each one's greedy
        decoding overlapping the next one's encoder (same tokens as one batch; less padding, decoder hidden)."""
        self.device = torch.device(device)
        self.sub_batches = max(1, int(sub_batches))
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.model = model
        self.preprocessor = copy.deepcopy(model.preprocessor).to(self.device).float().eval()
        self.engine = TorchCudaEngine(model, "window", precision, self.device, use_graphs=encoder_graphs and
                                      self.device.type == "cuda",
                                      batch_buckets=(-(-max_batch // self.sub_batches),), time_quantum=64,
                                      autocast=autocast, compile_mode="default" if compile_encoder else None,
                                      compile_dynamic=compile_dynamic)
        if decoder_precision not in DTYPES:
            raise ValueError(f"decoder_precision must be one of {list(DTYPES)}, not {decoder_precision!r}")
        dec_dtype = DTYPES[decoder_precision]
        self.joint_enc = copy.deepcopy(model.joint.enc).to(self.device, dec_dtype).eval()
        sub = model.cfg.encoder.subsampling_factor
        hop = model.cfg.preprocessor.hop_length
        max_frames = int(max_seconds * model.cfg.sample_rate) // hop // sub + 2
        self.decoder = GraphGreedyDecoder(model, -(-max_batch // self.sub_batches), max_frames, self.device,
                                          dtype=dec_dtype, block=decoder_block)
        self.max_frames = max_frames

    @torch.inference_mode()
    def __call__(self, audio: torch.Tensor, lengths: torch.Tensor, timing: Timing | None = None) -> BatchedTokens:
        if self.sub_batches > 1 and len(lengths) > 1:
            return self._pipelined(audio, lengths, timing)
        cuda = self.device.type == "cuda"
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if (timing is not None and cuda) else None
        if ev:
            ev[0].record()
        feats, feat_len = self.preprocessor(audio.to(self.device, torch.float32), lengths.to(self.device))
        if ev:
            ev[1].record()
        out = self.engine.step({"audio_signal": feats.to(self.engine.dtype), "length": feat_len}, clone=False)
        f = self.joint_enc(out["encoder_output"].transpose(1, 2).to(self.joint_enc.weight.dtype))
        if ev:
            ev[2].record()
        tokens = self.decoder(f, out["encoded_lengths"])
        if ev:
            ev[3].record()
            ev[3].synchronize()
            timing.features_s += ev[0].elapsed_time(ev[1]) / 1e3
            timing.encoder_s += ev[1].elapsed_time(ev[2]) / 1e3
            timing.decoder_s += ev[2].elapsed_time(ev[3]) / 1e3
        return tokens

    @torch.inference_mode()
    def _pipelined(self, audio: torch.Tensor, lengths: torch.Tensor, timing: Timing | None) -> BatchedTokens:
        """Length-sorted sub-batches (less padding), and sub-batch i's decoder (small latency-bound kernels, on a
        side stream) runs while sub-batch i+1's encoder (large GEMMs) is already queued on the main stream."""
        cuda = self.device.type == "cuda"
        n = len(lengths)
        order = torch.argsort(lengths.cpu(), descending=True, stable=True)
        size = -(-n // self.sub_batches)
        groups = [order[i: i + size] for i in range(0, n, size)]
        main = torch.cuda.current_stream(self.device) if cuda else None
        side = self._side_stream if cuda else None
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if (timing is not None and cuda) else None

        def encode(idx):
            idx_dev = idx.to(self.device)
            n_samples = int(lengths[idx[0]])  # longest of the group (sorted)
            a = audio.index_select(0, idx_dev.to(audio.device))[:, :n_samples].to(self.device, torch.float32)
            feats, feat_len = self.preprocessor(a, lengths.index_select(0, idx_dev.to(lengths.device)).to(self.device))
            out = self.engine.step({"audio_signal": feats.to(self.engine.dtype), "length": feat_len}, clone=False)
            f = self.joint_enc(out["encoder_output"].transpose(1, 2).to(self.joint_enc.weight.dtype))
            done = torch.cuda.Event() if cuda else None
            if cuda:
                done.record(main)
            return f, out["encoded_lengths"], done

        if ev:
            ev[0].record()
        results = []
        pending = encode(groups[0])
        for gi in range(len(groups)):
            nxt = encode(groups[gi + 1]) if gi + 1 < len(groups) else None  # queued before this group's decode
            f, enc_len, done = pending
            if cuda:
                side.wait_event(done)
                with torch.cuda.stream(side):
                    results.append(self.decoder(f, enc_len))
                    f.record_stream(side)
            else:
                results.append(self.decoder(f, enc_len))
            pending = nxt
        if cuda:
            main.wait_stream(side)
        if ev:
            ev[1].record()
            ev[1].synchronize()
            timing.encoder_s += ev[0].elapsed_time(ev[1]) / 1e3  # pipelined: front end + encoder + decoder
        # back to the caller's order
        width = max(int(r.counts.max()) if len(r.counts) else 0 for r in results)
        out = {k: torch.zeros(n, width, dtype=torch.long, device=self.device) for k in ("labels", "frames", "durs")}
        counts = torch.zeros(n, dtype=torch.long, device=self.device)
        for idx, r in zip(groups, results):
            idx_dev = idx.to(self.device)
            w = r.labels.shape[1]
            for k, v in (("labels", r.labels), ("frames", r.frames), ("durs", r.durations)):
                out[k][idx_dev, :w] = v
            counts[idx_dev] = r.counts
        return BatchedTokens(out["labels"], out["frames"], out["durs"], counts)
