"""Cache-aware streaming (NeMo's ``cache_aware_stream_step``), batched over streams.

Each step feeds one chunk of mel frames, prefixed by the last ``pre_encode_cache`` frames of the previous chunk, and
the caches of the previous step; it returns the chunk's encoder frames and the next caches:

    audio_signal [B, F, P + T_chunk], length [B],
    cache_last_channel [B, L, C, D]      last C attention inputs of every layer      (C = left attention context)
    cache_last_time    [B, L, D, K]      last K depthwise-conv inputs of every layer (K = conv kernel - 1)
    cache_last_channel_len [B]           how many of the C cached frames are real (0 for a fresh stream)
 -> encoder_output [B, D, T_valid], encoded_lengths [B], and the three caches' next values (``*_next``).

The step is *exact* -- every chunk's output equals the offline forward with the chunked-limited attention mask --
only when nothing looks past the chunk: ``chunked_limited`` attention, causal convolutions and causal subsampling
(the tiny-cache-aware preset; NeMo's cache-aware FastConformers). Parakeet-TDT-0.6B-v3 has full attention and
symmetric (look-ahead) subsampling and convolutions: forced into this mode its outputs drift from the offline ones
(0.1-0.5 abs), so ``CacheAwareParams.for_encoder`` refuses such a model unless ``allow_inexact=True`` (then it warns).
Use buffered streaming (``trt_asr.streaming.buffered``) for v3.

First chunk: as NeMo's ``CacheAwareStreamingAudioBuffer`` (``pad_and_drop_preencoded=False``, the default), the
first chunk has ``chunk_size[0]`` frames and no pre-encode cache, later chunks ``pre_encode_cache + chunk_size[1]``
frames of which the first ``drop_extra_pre_encoded`` encoder frames are dropped. The two input lengths differ, so
an engine tells the chunk kind from ``audio_signal``'s frame count. With ``pad_and_drop_preencoded=True`` every
chunk, the first included (zero pre-encode cache), has the later chunks' shape (one engine shape, as NeMo's ONNX
export assumes), at the price of a first chunk that differs slightly from offline.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import torch

from ..config import EncoderConfig
from .frontend import StreamingFrontEnd


def parse_att_context(text: str) -> list[int]:
    """A command line's ``--att-context L,R`` -> [L, R] (encoder frames); ValueError with the option's name."""
    try:
        left, right = (int(x) for x in str(text).split(","))
    except ValueError:
        raise ValueError(f"--att-context must be L,R (two integers), got {text!r}") from None
    return [left, right]


class NonCausalStreamingError(ValueError):
    """A model whose subsampling, convolution or attention looks ahead was put in cache-aware mode."""


# ----------------------------------------------------------------------------------------------- parameters
def subsampled_length(n, factor: int, causal: bool):
    """Encoder frames from ``n`` mel frames through dw_striding (log2(factor) stride-2 convs, kernel 3).
    Works on ints and integer tensors (NeMo's ``calc_length``)."""
    pad = 3 if causal else 2  # causal: left 2 + right 1; symmetric: 1 + 1
    for _ in range(int(math.log2(factor))):
        n = (n + pad - 3) // 2 + 1
    return n


@dataclass(frozen=True)
class CacheAwareParams:
    """NeMo's ``CacheAwareStreamingConfig`` for one model and attention context; (first chunk, later chunks) pairs.

    All sizes in mel frames unless named ``*_out`` / cache sizes (encoder frames)."""

    att_context_size: tuple[int, int]
    att_context_style: str
    subsampling_factor: int
    causal_subsampling: bool
    n_layers: int
    d_model: int
    feat_in: int
    chunk_size: tuple[int, int]              # new mel frames per chunk
    shift_size: tuple[int, int]              # mel frames the stream advances per chunk
    pre_encode_cache_size: tuple[int, int]   # previous mel frames prefixed to the chunk
    drop_extra_pre_encoded: int              # encoder frames dropped after subsampling (later chunks)
    valid_out_len: int                       # encoder frames a full chunk yields
    cache_drop_size: int                     # newest encoder frames not written to the caches
    last_channel_cache_size: int             # C: attention cache frames (left context)
    last_time_cache_size: int                # K: conv cache frames (kernel - 1 for a causal conv)
    pad_and_drop_preencoded: bool = False
    exact: bool = True                       # streaming equals the offline forward (causal, chunked-limited)

    # -------------------------------------------------------------- derived
    def input_frames(self, first: bool) -> int:
        """Frames of ``audio_signal`` for a full chunk: pre-encode cache + chunk."""
        i = 0 if (first and not self.pad_and_drop_preencoded) else 1
        return self.pre_encode_cache_size[i] + self.chunk_size[i]

    def drop_extra(self, first: bool) -> int:
        return 0 if (first and not self.pad_and_drop_preencoded) else self.drop_extra_pre_encoded

    def is_first_chunk(self, input_frames: int) -> bool:
        """The chunk kind, told by the input frame count (the two kinds always differ unless pad-and-drop)."""
        if self.pad_and_drop_preencoded:
            return False  # every chunk has the later chunks' shape and drop
        if input_frames == self.input_frames(True):
            return True
        if input_frames == self.input_frames(False):
            return False
        raise ValueError(f"audio_signal has {input_frames} frames; a chunk has {self.input_frames(True)} (first) "
                         f"or {self.input_frames(False)} (later)")

    def encoder_frames(self, mel_frames, first: bool):
        """Encoder frames a chunk of ``mel_frames`` (incl. pre-encode cache) yields after the drop; int or tensor."""
        n = subsampled_length(mel_frames, self.subsampling_factor, self.causal_subsampling) - self.drop_extra(first)
        if isinstance(n, torch.Tensor):
            n = n.clamp(min=0)
        else:
            n = max(n, 0)
        if self.att_context_style == "regular" and self.valid_out_len > 0:  # NeMo's streaming_post_process
            n = n.clamp(max=self.valid_out_len) if isinstance(n, torch.Tensor) else min(n, self.valid_out_len)
        return n

    def cache_shapes(self, batch="B") -> dict[str, list]:
        """Batch-first (engine boundary) cache shapes."""
        return {
            "cache_last_channel": [batch, self.n_layers, self.last_channel_cache_size, self.d_model],
            "cache_last_time": [batch, self.n_layers, self.d_model, self.last_time_cache_size],
            "cache_last_channel_len": [batch],
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(first_chunk_input_frames=self.input_frames(True), chunk_input_frames=self.input_frames(False))
        return d

    # -------------------------------------------------------------- construction
    @classmethod
    def for_encoder(cls, cfg: EncoderConfig, att_context_size=None, chunk_size: int | None = None,
                    shift_size: int | None = None, left_chunks: int | None = None, max_context: int = 10000,
                    pad_and_drop_preencoded: bool = False, allow_inexact: bool = False) -> "CacheAwareParams":
        """Mirrors NeMo's ``ConformerEncoder.setup_streaming_params`` (dw_striding: sampling frames [1, factor],
        pre-encode cache [0, factor + 1]). ``chunk_size`` / ``shift_size`` are in encoder frames, as in NeMo."""
        att = list(att_context_size or cfg.att_context_sizes[0])
        style, n_layers, factor = cfg.att_context_style, cfg.n_layers, cfg.subsampling_factor
        conv_left, conv_right = cfg.conv_context
        if style == "chunked_limited":
            if att[1] < 0:
                raise ValueError("chunked_limited attention needs a limited right context (att_context_size[1] >= 0)")
            if att[0] > 0 and att[0] % (att[1] + 1):
                raise ValueError(f"chunked_limited needs left % (right + 1) == 0; got att_context_size={att}")
        if chunk_size is not None:
            if chunk_size < 1:
                raise ValueError("chunk_size must be >= 1 (encoder frames)")
            shift_size = chunk_size if shift_size is None else shift_size
            lookahead, cache_drop = chunk_size - 1, chunk_size - shift_size
        elif style == "chunked_limited":
            lookahead, cache_drop = att[1], 0
        elif style == "regular":
            lookahead = att[1] * n_layers + conv_right * n_layers
            cache_drop = lookahead
        else:
            raise ValueError(f"att_context_style {style!r} is not supported for cache-aware streaming")
        if chunk_size is not None and left_chunks is not None:
            cache_size = left_chunks * chunk_size
        else:
            cache_size = att[0] if att[0] >= 0 else max_context
        sampling = (1, factor)
        chunk = (sampling[0] + factor * lookahead, sampling[1] + factor * lookahead)
        shift = (sampling[0] + factor * (lookahead - cache_drop), sampling[1] + factor * (lookahead - cache_drop))
        valid_out_len = (shift[1] - sampling[1]) // factor + 1
        pre_cache = (0, factor + 1)
        drop_extra = 1 + (pre_cache[1] - 1) // factor if pre_cache[1] >= 1 else 0

        reasons = []
        if not cfg.causal_downsampling:
            reasons.append("subsampling is not causal (causal_downsampling=false): each chunk's edge frames see "
                           "zero padding instead of the next chunk")
        if conv_right > 0:
            reasons.append(f"convolutions look {conv_right} frames ahead (conv_context_size={cfg.conv_context})")
        if style == "regular" and att[1] != 0:
            reasons.append(f"attention is not chunked-limited (style {style!r}, context {att})")
        if chunk_size is not None and style == "chunked_limited" and chunk_size != att[1] + 1:
            reasons.append(f"chunk_size {chunk_size} differs from the attention chunk {att[1] + 1}")
        if reasons:
            msg = ("cache-aware streaming of this model is not exact (outputs will differ from the offline forward): "
                   + "; ".join(reasons) + ". Use buffered streaming, or pass allow_inexact=True to measure it.")
            if not allow_inexact:
                raise NonCausalStreamingError(msg)
            warnings.warn(msg, stacklevel=2)
        return cls(
            att_context_size=(int(att[0]), int(att[1])), att_context_style=style, subsampling_factor=factor,
            causal_subsampling=bool(cfg.causal_downsampling), n_layers=n_layers, d_model=cfg.d_model,
            feat_in=cfg.feat_in, chunk_size=chunk, shift_size=shift, pre_encode_cache_size=pre_cache,
            drop_extra_pre_encoded=drop_extra, valid_out_len=valid_out_len, cache_drop_size=cache_drop,
            last_channel_cache_size=cache_size, last_time_cache_size=conv_left,
            pad_and_drop_preencoded=pad_and_drop_preencoded, exact=not reasons)


def initial_caches(params: CacheAwareParams, batch: int, device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Zero caches, batch-first (NeMo's ``get_initial_cache_state``, transposed to the engine boundary)."""
    return {
        "cache_last_channel": torch.zeros(batch, params.n_layers, params.last_channel_cache_size, params.d_model,
                                          device=device, dtype=dtype),
        "cache_last_time": torch.zeros(batch, params.n_layers, params.d_model, params.last_time_cache_size,
                                       device=device, dtype=dtype),
        "cache_last_channel_len": torch.zeros(batch, dtype=torch.long, device=device),
    }


# ----------------------------------------------------------------------------------------------- chunking
def iter_chunks(features_bft: torch.Tensor, lengths: torch.Tensor, params: CacheAwareParams):
    """Split whole feature sequences into step inputs, as NeMo's ``CacheAwareStreamingAudioBuffer``:
    yields (audio_signal [B, F, P + T], length [B], first). The last chunk is zero-padded to the full chunk shape
    (``length`` tells the real frames), so an engine only ever sees the two contract shapes. Unlike NeMo's buffer,
    a last piece shorter than 8 mel frames is encoded too (as the offline forward does), not dropped."""
    b, f, total = features_bft.shape
    idx, first = 0, True
    while idx < total:
        i = 0 if (first and not params.pad_and_drop_preencoded) else 1
        chunk, shift, pre = params.chunk_size[i], params.shift_size[i], params.pre_encode_cache_size[i]
        if first and params.pad_and_drop_preencoded:
            lead = features_bft.new_zeros(b, f, pre)
        else:
            lead = features_bft[:, :, max(idx - pre, 0):idx]
            lead = torch.cat([features_bft.new_zeros(b, f, pre - lead.shape[-1]), lead], dim=-1)
        body = features_bft[:, :, idx: idx + chunk]
        real = body.shape[-1]
        body = torch.cat([body, features_bft.new_zeros(b, f, chunk - real)], dim=-1)
        length = (lengths.to(torch.long) - idx).clamp(min=0, max=real) + pre
        yield torch.cat([lead, body], dim=-1), length, first
        idx += shift
        first = False


def num_chunks(total_frames: int, params: CacheAwareParams) -> int:
    """How many steps ``iter_chunks`` makes for ``total_frames`` mel frames."""
    n, idx, first = 0, 0, True
    while idx < total_frames:
        i = 0 if (first and not params.pad_and_drop_preencoded) else 1
        n += 1
        idx += params.shift_size[i]
        first = False
    return n


def frames_for_chunks(n: int, params: CacheAwareParams) -> int:
    """Mel frames of a stream that splits into exactly ``n`` full chunks."""
    if n <= 0:
        return 0
    if params.pad_and_drop_preencoded:
        return params.shift_size[1] * (n - 1) + params.chunk_size[1]
    if n == 1:
        return params.chunk_size[0]
    return params.shift_size[0] + params.shift_size[1] * (n - 2) + params.chunk_size[1]


# ----------------------------------------------------------------------------------------------- streaming
@dataclass
class CacheAwareState:
    """One batch of streams between steps. Caches batch-first, as at the engine boundary."""

    caches: dict[str, torch.Tensor]
    decoder: object | None = None                      # trt_asr.decoding.greedy.DecoderState
    pre_encode_cache: torch.Tensor | None = None      # [B, F, P] last mel frames of the previous chunk
    chunks_done: int = 0
    frames_done: int = 0                               # encoder frames emitted so far (token timestamps)
    tokens: list = field(default_factory=list)        # per stream: [(label, frame, duration)]

    @property
    def first(self) -> bool:
        return self.chunks_done == 0


@dataclass
class StepOutput:
    encoder_output: torch.Tensor   # [B, D, T]
    encoded_lengths: torch.Tensor  # [B]
    tokens: list                   # per stream, this chunk's [(label, global frame, duration)]


class CacheAwareStreamer:
    """Cache-aware streaming of a ``TransducerModel``: chunk -> engine step -> greedy TDT with carried state.

    ``engine`` is any ``EncoderEngine`` in ``mode='stream'`` (default: the fp32 torch reference). All streams of a
    batch advance together (same chunk index); ``CacheAwareState`` holds everything carried between steps."""

    def __init__(self, model, params: CacheAwareParams | None = None, engine=None, *, allow_inexact: bool = False,
                 **param_kwargs):
        self.model = model
        self.params = params or CacheAwareParams.for_encoder(model.cfg.encoder, allow_inexact=allow_inexact,
                                                             **param_kwargs)
        if engine is None:
            from ..engines.torch_engine import TorchEncoderEngine
            engine = TorchEncoderEngine(model, mode="stream", params=self.params)
        self.engine = engine
        self.decoder = model.greedy_decoder()

    def initial_state(self, batch: int) -> CacheAwareState:
        device = self.model.device
        dec = self.decoder.initial_state(batch, device)
        pre = self.params.pre_encode_cache_size[1]
        return CacheAwareState(initial_caches(self.params, batch, device, self.model.dtype), dec,
                               torch.zeros(batch, self.params.feat_in, pre, device=device),
                               tokens=[[] for _ in range(batch)])

    def frames_needed(self, state: CacheAwareState) -> int:
        """New mel frames the next step takes."""
        i = 0 if (state.first and not self.params.pad_and_drop_preencoded) else 1
        return self.params.chunk_size[i]

    @torch.no_grad()
    def step_inputs(self, audio_signal: torch.Tensor, length: torch.Tensor, state: CacheAwareState) -> StepOutput:
        """One step from prepared inputs (pre-encode cache included), e.g. from ``iter_chunks``."""
        inputs = {"audio_signal": audio_signal.to(self.model.dtype), "length": length, **state.caches}
        out = self.engine.step(inputs)
        state.caches = {"cache_last_channel": out["cache_last_channel_next"],
                        "cache_last_time": out["cache_last_time_next"],
                        "cache_last_channel_len": out["cache_last_channel_next_len"]}
        enc, enc_len = out["encoder_output"], out["encoded_lengths"]
        tokens, state.decoder = self.decoder(enc, enc_len, state.decoder)
        chunk_tokens = [[(lab, fr + state.frames_done, d) for lab, fr, d in toks] for toks in tokens.to_lists()]
        for mine, new in zip(state.tokens, chunk_tokens):
            mine.extend(new)
        state.chunks_done += 1
        state.frames_done += enc.shape[-1]
        return StepOutput(enc, enc_len, chunk_tokens)

    def step(self, features_bft: torch.Tensor, lengths: torch.Tensor, state: CacheAwareState) -> StepOutput:
        """One chunk of new mel frames (``frames_needed`` of them; fewer real ones, per ``lengths``, at the end)."""
        p = self.params
        first = state.first and not p.pad_and_drop_preencoded
        chunk = self.frames_needed(state)
        if features_bft.shape[-1] > chunk:
            raise ValueError(f"chunk has {features_bft.shape[-1]} frames; this step takes {chunk}")
        real = features_bft.shape[-1]
        body = torch.nn.functional.pad(features_bft, (0, chunk - real))
        lead = state.pre_encode_cache[:, :, :0] if first else state.pre_encode_cache
        audio = torch.cat([lead, body], dim=-1)
        lengths = lengths.to(torch.long).clamp(max=real) + lead.shape[-1]
        if p.shift_size != p.chunk_size:
            raise NotImplementedError("incremental step() with overlapping chunks (shift < chunk); use iter_chunks")
        # the stream's last P mel frames (a first chunk may be shorter than P: keep the zeros before it)
        state.pre_encode_cache = torch.cat((state.pre_encode_cache, audio), dim=-1)[:, :, -p.pre_encode_cache_size[1]:]
        return self.step_inputs(audio, lengths, state)

    @torch.no_grad()
    def stream_features(self, features_bft: torch.Tensor, lengths: torch.Tensor):
        """Whole feature sequences through the streamer: (encoded [B, D, T], lengths [B], state with tokens)."""
        state = self.initial_state(features_bft.shape[0])
        outs, lens = [], []
        for audio, length, _ in iter_chunks(features_bft, lengths, self.params):
            o = self.step_inputs(audio, length, state)
            outs.append(o.encoder_output)
            lens.append(o.encoded_lengths)
        enc = torch.cat(outs, dim=-1) if outs else features_bft.new_zeros(features_bft.shape[0], self.params.d_model, 0)
        return enc, torch.stack(lens).sum(0) if lens else lengths.new_zeros(lengths.shape), state

    def transcribe_features(self, features_bft: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        _, _, state = self.stream_features(features_bft, lengths)
        tok = self.model.tokenizer
        ids = [[lab for lab, _, _ in t] for t in state.tokens]
        return [tok.decode(i) for i in ids] if tok is not None else [" ".join(map(str, i)) for i in ids]


# ----------------------------------------------------------------------------------------------- session mode
class CacheAwareStreamState:
    """Per-stream state of ``CacheAwareMode``: PCM not yet turned into mel frames, mel frames not yet stepped, the
    encoder caches (batch 1, batch-first) and the decoder state."""

    def __init__(self, params: CacheAwareParams, caches: dict, feat_in: int, front=None):
        self.front = front            # StreamingFrontEnd (un-normalised features), or None: normalise what arrived
        self.pcm = torch.zeros(0)     # only kept when normalising over the audio so far
        self.received = 0
        self.ended = False
        self.finished = False
        self.mel_done = 0             # mel frames computed so far (absolute)
        self.mel = torch.zeros(feat_in, 0)  # computed mel frames not yet stepped
        self.pre_encode_cache = torch.zeros(feat_in, params.pre_encode_cache_size[1])
        self.caches = caches
        self.decoder_state = None
        self.chunks_done = 0
        self.frames_done = 0          # encoder frames emitted (absolute token frames)


class CacheAwareMode:
    """``StreamingMode`` "cache_aware" for ``trt_asr.streaming.session``: PCM -> incremental log-mel -> one
    cache-aware engine step per chunk -> greedy TDT with the carried decoder state. Every token is committed at once
    (nothing is revised: the chunk's output never changes later).

    Mel frames are computed incrementally and equal the offline front end's when the model does not normalise
    features (``normalize: null``, as NeMo's cache-aware models); with ``per_feature`` normalisation (not
    streamable) they are normalised over the audio received so far, with a warning.
    ``params``: ``att_context_size``, ``chunk_size``, ``left_chunks``, ``allow_inexact`` ... as ``CacheAwareParams
    .for_encoder``; ``engine``: any ``EncoderEngine`` in stream mode (default: the torch reference)."""

    name = "cache_aware"

    def __init__(self, model, *, engine=None, params: CacheAwareParams | None = None, allow_inexact: bool = False,
                 chunk_frames: int | None = None, **param_kwargs):
        self.model = model
        if chunk_frames is not None:  # the CLI's name for NeMo's chunk_size (encoder frames)
            param_kwargs["chunk_size"] = chunk_frames
        self.params = params or CacheAwareParams.for_encoder(model.cfg.encoder, allow_inexact=allow_inexact,
                                                             **param_kwargs)
        if self.params.shift_size != self.params.chunk_size:
            raise NotImplementedError("cache-aware sessions with overlapping chunks (shift < chunk)")
        if engine is None:
            from ..engines.torch_engine import TorchEncoderEngine
            engine = TorchEncoderEngine(model, mode="stream", params=self.params)
        self.engine = engine
        self.decoder = model.greedy_decoder()
        self.sample_rate = model.cfg.sample_rate
        self.frame_seconds = model.cfg.frame_seconds
        self.featurizer = model.preprocessor.featurizer
        self.hop, self.n_fft = self.featurizer.hop, self.featurizer.n_fft
        self.normalized = bool(model.cfg.preprocessor.normalize)
        if self.normalized:
            warnings.warn("per-feature normalisation is not streamable: cache-aware sessions normalise over the "
                          "audio received so far", stacklevel=2)

    @property
    def latency_seconds(self) -> float:
        return self.params.chunk_size[1] * self.hop / self.sample_rate

    # -------------------------------------------------------------- buffering
    def new_stream(self) -> CacheAwareStreamState:
        caches = initial_caches(self.params, 1, self.model.device, self.model.dtype)
        return CacheAwareStreamState(self.params, caches, self.params.feat_in, self._new_front())

    def _new_front(self):
        return None if self.normalized else StreamingFrontEnd(self.featurizer)

    def push(self, s: CacheAwareStreamState, pcm: torch.Tensor) -> None:
        pcm = pcm.detach().to("cpu", torch.float32).reshape(-1)
        s.received += pcm.numel()
        if s.front is None:
            s.pcm = torch.cat((s.pcm, pcm))
        else:
            self._append_mel(s, s.front.push(pcm))

    def end(self, s: CacheAwareStreamState) -> None:
        s.ended = True
        if s.front is not None:
            self._append_mel(s, s.front.finish())

    @staticmethod
    def _append_mel(s, new: torch.Tensor) -> None:
        s.mel = torch.cat((s.mel, new.to(s.mel.dtype)), dim=1)
        s.mel_done += new.shape[1]

    def _frames_needed(self, s) -> int:
        return self.params.chunk_size[0 if (s.chunks_done == 0 and not self.params.pad_and_drop_preencoded) else 1]

    def _stable_frames(self, s) -> int:
        """Mel frames whose STFT window lies inside the received audio (all frames once the stream ended)."""
        if s.front is not None:
            return s.mel_done  # the streaming front end emits exactly the stable frames
        if s.ended:
            return int(self.featurizer.num_frames(torch.tensor(s.received)))
        return max((s.received - self.n_fft // 2) // self.hop + 1, 0)

    def ready(self, s: CacheAwareStreamState) -> bool:
        if s.finished:
            return False
        return s.ended or (self._stable_frames(s) - s.mel_done + s.mel.shape[1]) >= self._frames_needed(s)

    def _update_mel(self, s) -> None:
        """Normalised features only: recompute over all audio so far (per-feature statistics need all of it) and
        append the newly stable frames. (Un-normalised frames come from the streaming front end in ``push``.)"""
        if s.front is not None:
            return
        k1 = self._stable_frames(s)
        if k1 <= s.mel_done:
            return
        feats, _ = self.model.features(s.pcm[None].to(self.model.device), torch.tensor([s.received],
                                                                                       device=self.model.device))
        self._append_mel(s, feats[0, :, s.mel_done:k1].cpu())

    # -------------------------------------------------------------- one batched step
    @torch.no_grad()
    def step(self, streams):
        from .session import StepResult, Token

        for s in streams:
            self._update_mel(s)
        results: list = [None] * len(streams)
        # first and later chunks have different shapes: one engine call per kind
        kinds = [s.chunks_done == 0 for s in streams]
        for first in (True, False):
            idx = [i for i, k in enumerate(kinds) if k == first]
            if not idx:
                continue
            group = [streams[i] for i in idx]
            for i, r in zip(idx, self._step_group(group, first)):
                results[i] = r
        out = []
        for s, toks in zip(streams, results):
            out.append(StepResult(committed=[Token(lab, fr, d) for lab, fr, d in toks], tentative=[],
                                  finished=s.finished))
        return out

    def _take_chunks(self, group, first: bool) -> tuple[list[torch.Tensor], list[int]]:
        """Each stream's next chunk of mel frames behind its pre-encode cache ([F, pre + chunk], zero-padded past
        the end of a stream) and its valid length; advances the streams' feature buffers."""
        p = self.params
        first = first and not p.pad_and_drop_preencoded
        chunk = p.chunk_size[0 if first else 1]
        pre = p.pre_encode_cache_size[0 if first else 1]
        audio, lengths = [], []
        for s in group:
            body = s.mel[:, :chunk]
            s.mel = s.mel[:, chunk:]
            real = body.shape[1]
            body = torch.nn.functional.pad(body, (0, chunk - real))
            a = torch.cat((s.pre_encode_cache[:, s.pre_encode_cache.shape[1] - pre:], body), dim=1)
            # the next chunk's lead: the stream's last P mel frames (a first chunk may be shorter than P)
            s.pre_encode_cache = torch.cat((s.pre_encode_cache, a), dim=1)[:, -p.pre_encode_cache_size[1]:]
            audio.append(a)
            lengths.append(pre + real)
            s.finished = s.ended and s.mel.shape[1] == 0 and s.mel_done >= self._stable_frames(s)
        return audio, lengths

    def _step_group(self, group, first: bool):
        device, dtype = self.model.device, self.model.dtype
        audio, lengths = self._take_chunks(group, first)
        inputs = {"audio_signal": torch.stack(audio).to(device, dtype),
                  "length": torch.tensor(lengths, dtype=torch.long, device=device)}
        for name in ("cache_last_channel", "cache_last_time", "cache_last_channel_len"):
            inputs[name] = torch.cat([s.caches[name] for s in group])
        out = self.engine.step(inputs)
        from ..decoding.greedy import DecoderState
        state = DecoderState.stack([s.decoder_state if s.decoder_state is not None
                                    else self.decoder.initial_state(1, device, out["encoder_output"].dtype)
                                    for s in group])
        tokens, state = self.decoder(out["encoder_output"], out["encoded_lengths"], state)
        results = []
        for b, (s, toks) in enumerate(zip(group, tokens.to_lists())):
            s.caches = {"cache_last_channel": out["cache_last_channel_next"][b:b + 1],
                        "cache_last_time": out["cache_last_time_next"][b:b + 1],
                        "cache_last_channel_len": out["cache_last_channel_next_len"][b:b + 1]}
            s.decoder_state = state.row(b)
            results.append([(lab, s.frames_done + fr, d) for lab, fr, d in toks])
            s.frames_done += int(out["encoded_lengths"][b])
            s.chunks_done += 1
        return results


def offline_equivalent(model, features_bft: torch.Tensor, lengths: torch.Tensor, params: CacheAwareParams):
    """The offline forward the stream must equal: whole sequences, chunked-limited attention mask of the stream's
    context. Returns (encoded [B, D, T], lengths)."""
    return model.encoder(features_bft, lengths, att_context_size=list(params.att_context_size))


__all__ = ["CacheAwareMode", "CacheAwareParams", "CacheAwareState", "CacheAwareStreamState", "CacheAwareStreamer",
           "NonCausalStreamingError", "StepOutput", "frames_for_chunks", "initial_caches", "iter_chunks", "num_chunks",
           "offline_equivalent", "subsampled_length"]
