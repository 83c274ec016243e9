"""The encoder I/O contract: names, dtypes, symbolic shapes, streaming parameters, engine-build profiles and the
runtime invariants every engine step must satisfy (``encoder_streaming.contract.json``).

Cache-aware mode ("stream" step):
    audio_signal [B, F, T_in] fp32    T_in = first_chunk_input_frames (first chunk) or chunk_input_frames (later)
    length [B] int64                  real frames of audio_signal (pre-encode cache included)
    cache_last_channel [B, L, C, D], cache_last_time [B, L, D, K] fp32, cache_last_channel_len [B] int64
 -> encoder_output [B, D, T_out], encoded_lengths [B], cache_last_channel_next, cache_last_time_next,
    cache_last_channel_next_len
Buffered mode ("window" step): audio_signal [B, F, T], length [B] -> encoder_output [B, D, T'], encoded_lengths [B].

Projected-K/V variant of the stream step (``kv_cache="projected"``; the default ``"layer_input"`` is NeMo's):
cache_last_channel is replaced by cache_last_channel_k and cache_last_channel_v [B, L, C, D] (each layer's keys and
values after linear_k / linear_v; outputs ``*_next``), so a step projects only its new frames. Same dtypes, same
cache_last_time / cache_last_channel_len and the same invariants. ``cache_io`` lists a variant's caches.
Ring variant (``kv_cache="ring"``, the torch engines only): cache_last_channel_ring [B, L, R, D] holds the same C
attention inputs in a ring of R = C + T_max slots, with cache_ring_pos [B] int64 (the slot of the next frame); a
step writes its T new frames there instead of shifting the whole cache (``trt_asr.model.encoder.RingCache``).

Unlike the guide this grew from (whose invariants ``encoded_lengths == 1`` and ``cache_last_channel_len_out == 0``
described a stream whose cache was never carried), the invariants here say what a *carried* cache must do: the
cache length grows by the chunk's frames until it saturates at C, and every chunk yields its valid frames.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

import torch

from ..config import EncoderConfig
from .cache_aware import CacheAwareParams, subsampled_length

CONTRACT_VERSION = 1
FILENAME = "encoder_streaming.contract.json"

INVARIANTS = {
    "input_names": "the step receives exactly the contract's input names",
    "input_dtype": "float inputs are the engine's float dtype, lengths are int64",
    "input_shape": "inputs have the contract shapes: audio_signal [B, F, T_in] with T_in a chunk length of the "
                   "contract, caches [B, L, C, D] / [B, L, D, K], lengths [B]",
    "length_range": "0 <= length <= T_in (length counts real frames, pre-encode cache included)",
    "cache_len_range": "0 <= cache_last_channel_len <= C (how many cached attention frames are real)",
    "input_finite": "float inputs hold no NaN/Inf",
    "output_names": "the step returns exactly the contract's output names",
    "output_shape": "encoder_output is [B, D, T_out] with T_out the chunk's valid frames "
                    "(subsampled T_in minus drop_extra_pre_encoded); next caches keep the input cache shapes",
    "encoded_lengths": "encoded_lengths == valid frames of the chunk for its length: subsampled(length) - drop, "
                       "clamped at 0 (valid_out_len for every full chunk, first and later)",
    "cache_len_update": "cache_last_channel_next_len == min(cache_last_channel_len + T_out - cache_drop_size, C): "
                        "the cache is carried and fills up chunk by chunk until it holds the whole left context",
    "output_finite": "encoder_output and next caches hold no NaN/Inf",
}


class ContractViolation(RuntimeError):
    def __init__(self, invariant: str, chunk: int | None, stream: int | None, detail: str):
        self.invariant, self.chunk, self.stream, self.detail = invariant, chunk, stream, detail
        where = ", ".join(x for x in (f"chunk {chunk}" if chunk is not None else "",
                                      f"stream {stream}" if stream is not None else "") if x)
        super().__init__(f"I/O contract invariant '{invariant}' violated{' at ' + where if where else ''}: {detail} "
                         f"[{INVARIANTS.get(invariant, '')}]")


# ----------------------------------------------------------------------------------------------- variants
KV_CACHE_VARIANTS = ("layer_input", "projected", "ring")
# attention caches of each variant: (name, what it holds); the conv cache and the length are common to all
_CHANNEL_CACHES = {
    "layer_input": [("cache_last_channel", "last C attention inputs of every layer")],
    "projected": [("cache_last_channel_k", "keys (after linear_k) of the last C attention inputs of every layer"),
                  ("cache_last_channel_v", "values (after linear_v) of the last C attention inputs of every layer")],
    "ring": [("cache_last_channel_ring", "the last C attention inputs of every layer in a ring of R = C + T_max "
                                         "slots (a step writes its T frames at cache_ring_pos, mod R)")],
}
# int64 [B] per-stream counters besides cache_last_channel_len
_RING_POS = ("cache_ring_pos", "slot of the stream's next frame in cache_last_channel_ring (0 for a new stream)")


def ring_slots(params: CacheAwareParams) -> int:
    """R of the ring variant: the cache plus the most frames one chunk adds (first or later chunk)."""
    t = [subsampled_length(params.input_frames(first), params.subsampling_factor, params.causal_subsampling)
         - params.drop_extra(first) for first in (True, False)]
    return params.last_channel_cache_size + max(t)


def _check_variant(kv_cache: str) -> str:
    if kv_cache not in KV_CACHE_VARIANTS:
        raise ValueError(f"kv_cache must be one of {KV_CACHE_VARIANTS}, not {kv_cache!r}")
    return kv_cache


def cache_names(kv_cache: str = "layer_input") -> list[str]:
    """The stream step's cache inputs, in contract order (float caches first, int64 counters last)."""
    ring = [_RING_POS[0]] if _check_variant(kv_cache) == "ring" else []
    return [n for n, _ in _CHANNEL_CACHES[kv_cache]] + ["cache_last_time"] + ring + ["cache_last_channel_len"]


def float_cache_names(kv_cache: str = "layer_input") -> list[str]:
    return [n for n, _ in _CHANNEL_CACHES[_check_variant(kv_cache)]] + ["cache_last_time"]


def cache_io(params: CacheAwareParams, kv_cache: str = "layer_input", dtype: torch.dtype = torch.float32
             ) -> list[tuple[str, str, tuple[int, ...], torch.dtype]]:
    """Per cache of the stream step: (input name, output name, per-stream shape, dtype); the batched input is
    ``[B, *shape]``. A zero cache of these shapes is a new stream's state in every variant."""
    L, C, D, K = params.n_layers, params.last_channel_cache_size, params.d_model, params.last_time_cache_size
    shapes = {"cache_last_time": (L, D, K), "cache_last_channel_len": (), _RING_POS[0]: ()}
    if kv_cache == "ring":
        C = ring_slots(params)
    return [(name, _next_name(name), shapes.get(name, (L, C, D)),
             torch.int64 if name in ("cache_last_channel_len", _RING_POS[0]) else dtype)
            for name in cache_names(kv_cache)]


def initial_cache_state(params: CacheAwareParams, batch: int, kv_cache: str = "layer_input", device=None,
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Zero caches of a variant for ``batch`` new streams, batch-first (``initial_caches`` for any variant)."""
    return {name: torch.zeros(batch, *shape, dtype=dt, device=device)
            for name, _, shape, dt in cache_io(params, kv_cache, dtype)}


# ----------------------------------------------------------------------------------------------- building
def _io(name, dtype, shape, meaning):
    return {"name": name, "dtype": dtype, "shape": shape, "description": meaning}


def stream_io(dtype: str = "float32", kv_cache: str = "layer_input") -> tuple[list, list]:
    channel = _CHANNEL_CACHES[_check_variant(kv_cache)]
    c = "R" if kv_cache == "ring" else "C"
    ring = [_RING_POS] if kv_cache == "ring" else []
    inputs = [
        _io("audio_signal", dtype, ["B", "F", "T_in"], "mel features of one chunk, pre-encode cache frames first"),
        _io("length", "int64", ["B"], "real frames of audio_signal per stream"),
        *[_io(name, dtype, ["B", "L", c, "D"], meaning) for name, meaning in channel],
        _io("cache_last_time", dtype, ["B", "L", "D", "K"], "last K depthwise-convolution inputs of every layer"),
        *[_io(name, "int64", ["B"], meaning) for name, meaning in ring],
        _io("cache_last_channel_len", "int64", ["B"], "real frames in the attention cache (0 for a new stream)"
            if kv_cache != "layer_input" else "real frames in cache_last_channel (0 for a new stream)"),
    ]
    outputs = [
        _io("encoder_output", dtype, ["B", "D", "T_out"], "encoder frames of the chunk"),
        _io("encoded_lengths", "int64", ["B"], "valid encoder frames per stream"),
        *[_io(name + "_next", dtype, ["B", "L", c, "D"], f"{name} for the next chunk") for name, _ in channel],
        _io("cache_last_time_next", dtype, ["B", "L", "D", "K"], "cache_last_time for the next chunk"),
        *[_io(name + "_next", "int64", ["B"], f"{name} for the next chunk") for name, _ in ring],
        _io("cache_last_channel_next_len", "int64", ["B"], "cache_last_channel_len for the next chunk"),
    ]
    return inputs, outputs


def window_io(dtype: str = "float32") -> tuple[list, list]:
    return ([_io("audio_signal", dtype, ["B", "F", "T"], "mel features of one window (left + chunk + right)"),
             _io("length", "int64", ["B"], "real frames per stream")],
            [_io("encoder_output", dtype, ["B", "D", "T_out"], "encoder frames of the window"),
             _io("encoded_lengths", "int64", ["B"], "valid encoder frames per stream")])


def build_contract(enc_cfg: EncoderConfig, mode: str, params: CacheAwareParams | None = None, *,
                   model_name: str = "", batch=(1, 1, 8), window_frames=(8, 800, 2400), dtype: str = "float32",
                   window_secs: dict | None = None, kv_cache: str = "layer_input") -> dict:
    """The contract as a dict. ``mode``: 'cache-aware' (needs ``params``) or 'buffered'. ``batch`` and
    ``window_frames`` are (min, opt, max) for engine-build optimization profiles. ``kv_cache``: the stream step's
    attention cache variant; 'projected' adds ``"kv_cache": "projected"`` (absent means NeMo's 'layer_input', so
    default contracts and their hashes are unchanged)."""
    _check_variant(kv_cache)
    mode = {"stream": "cache-aware", "window": "buffered"}.get(mode, mode)
    e = enc_cfg
    model = {"name": model_name, "n_layers": e.n_layers, "d_model": e.d_model, "feat_in": e.feat_in,
             "subsampling": e.subsampling, "subsampling_factor": e.subsampling_factor,
             "causal_downsampling": bool(e.causal_downsampling), "att_context_size": e.att_context_sizes[0],
             "att_context_style": e.att_context_style, "conv_kernel_size": e.conv_kernel_size,
             "conv_context": e.conv_context}
    b_min, b_opt, b_max = batch
    if mode == "cache-aware":
        if params is None:
            raise ValueError("cache-aware contract needs streaming params")
        inputs, outputs = stream_io(dtype, kv_cache)
        t_first, t_next = params.input_frames(True), params.input_frames(False)
        dims = {"B": {"min": b_min, "opt": b_opt, "max": b_max}, "F": e.feat_in, "L": e.n_layers, "D": e.d_model,
                "C": params.last_channel_cache_size, "K": params.last_time_cache_size,
                "T_in": sorted({t_first, t_next}),
                "T_out": sorted({params.encoder_frames(t_first, True), params.encoder_frames(t_next, False)})}
        t_min, t_max = min(t_first, t_next), max(t_first, t_next)
        if kv_cache == "ring":
            dims["R"] = ring_slots(params)
        C, K, L, D, F = dims["R" if kv_cache == "ring" else "C"], dims["K"], dims["L"], dims["D"], dims["F"]
        shapes = lambda b, t: {"audio_signal": [b, F, t], "length": [b],  # noqa: E731
                               **{n: [b, L, C, D] for n, _ in _CHANNEL_CACHES[kv_cache]},
                               "cache_last_time": [b, L, D, K], "cache_last_channel_len": [b],
                               **({_RING_POS[0]: [b]} if kv_cache == "ring" else {})}
        profiles = [{"name": "chunks", "min": shapes(b_min, t_min), "opt": shapes(b_opt, t_next),
                     "max": shapes(b_max, t_max)}]
        frame_s = 0.01
        streaming = params.to_dict()
        streaming.update(
            chunk_seconds=round(params.chunk_size[1] * frame_s, 4),
            latency_seconds_first=round(params.chunk_size[0] * frame_s, 4),
            encoder_frame_seconds=round(params.subsampling_factor * frame_s, 4),
            first_chunk_rule="audio_signal with first_chunk_input_frames frames is a first chunk (no pre-encode "
                             "cache, drop 0); chunk_input_frames frames is a later chunk (drop "
                             "drop_extra_pre_encoded)" if not params.pad_and_drop_preencoded else
                             "every chunk has chunk_input_frames frames (zero pre-encode cache first) and drops "
                             "drop_extra_pre_encoded frames")
        invariants = list(INVARIANTS)
        exact = params.exact
    elif mode == "buffered":
        if kv_cache != "layer_input":
            raise ValueError("kv_cache variants are for the cache-aware (stream) step")
        inputs, outputs = window_io(dtype)
        w_min, w_opt, w_max = window_frames
        dims = {"B": {"min": b_min, "opt": b_opt, "max": b_max}, "F": e.feat_in, "D": e.d_model,
                "T": {"min": w_min, "opt": w_opt, "max": w_max}, "T_out": "subsampled(T)"}
        shapes = lambda b, t: {"audio_signal": [b, e.feat_in, t], "length": [b]}  # noqa
        profiles = [{"name": "windows", "min": shapes(b_min, w_min), "opt": shapes(b_opt, w_opt),
                     "max": shapes(b_max, w_max)}]
        streaming = {"window_frames": {"min": w_min, "opt": w_opt, "max": w_max}, **(window_secs or {})}
        invariants = ["input_names", "input_dtype", "input_shape", "length_range", "input_finite", "output_names",
                      "output_shape", "encoded_lengths", "output_finite"]
        exact = True
    else:
        raise ValueError(f"mode must be 'cache-aware' or 'buffered', not {mode!r}")
    contract = {
        "contract_version": CONTRACT_VERSION,
        "name": "encoder_streaming",
        "mode": mode,
        "step": "stream" if mode == "cache-aware" else "window",
        "model": model,
        "exact_streaming": exact,
        "inputs": inputs,
        "outputs": outputs,
        "dims": dims,
        "streaming": streaming,
        "optimization_profiles": profiles,
        "caches_layout": "batch-first at the engine boundary ([B, L, ...]); NeMo modules are layer-first",
        "invariants": [{"id": k, "meaning": INVARIANTS[k]} for k in invariants],
    }
    if kv_cache != "layer_input":
        contract["kv_cache"] = kv_cache
    contract["sha256"] = content_hash(contract)
    return contract


def content_hash(contract: dict) -> str:
    body = {k: v for k, v in contract.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_contract(contract: dict, path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(contract, indent=2) + "\n")
    return path


def load_contract(path: str | Path) -> dict:
    contract = json.loads(Path(path).read_text())
    if contract.get("sha256") != content_hash(contract):
        raise ValueError(f"{path}: content hash mismatch (edited by hand?)")
    return contract


def params_from_contract(contract: dict) -> CacheAwareParams:
    s = contract["streaming"]
    names = {f.name for f in fields(CacheAwareParams)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in s.items() if k in names}
    return CacheAwareParams(**kw)


# ----------------------------------------------------------------------------------------------- checking
class ContractChecker:
    """Cheap per-step checks of the contract's invariants (a few integer comparisons and one finiteness reduction
    per tensor). Build it from an encoder config + params, or from a contract dict (``from_contract``)."""

    def __init__(self, enc_cfg: EncoderConfig | None, mode: str, params: CacheAwareParams | None = None, *,
                 contract: dict | None = None, check_finite: bool = True, kv_cache: str = "layer_input"):
        self.mode = {"cache-aware": "stream", "buffered": "window"}.get(mode, mode)
        if contract is None:
            contract = build_contract(enc_cfg, self.mode, params, kv_cache=kv_cache)
        self.contract = contract
        self.params = params if params is not None or self.mode != "stream" else params_from_contract(contract)
        m = contract["model"]
        self.factor, self.causal = m["subsampling_factor"], m["causal_downsampling"]
        self.dims = contract["dims"]
        self.kv_cache = contract.get("kv_cache", "layer_input")
        self.input_names = [x["name"] for x in contract["inputs"]]
        self.output_names = [x["name"] for x in contract["outputs"]]
        self.check_finite = check_finite

    @classmethod
    def from_contract(cls, contract: dict, **kw) -> "ContractChecker":
        return cls(None, contract["step"], contract=contract, **kw)

    # -------------------------------------------------------------- helpers
    @staticmethod
    def _fail_rows(bad: torch.Tensor, invariant: str, chunk, detail_fn):
        if bool(bad.any()):
            row = int(torch.nonzero(bad.reshape(bad.shape[0], -1).any(-1))[0])
            raise ContractViolation(invariant, chunk, row, detail_fn(row))

    def _names(self, got, want, invariant, chunk):
        if set(got) != set(want):
            raise ContractViolation(invariant, chunk, None, f"missing {sorted(set(want) - set(got))}, "
                                                            f"unexpected {sorted(set(got) - set(want))}")

    def _shape(self, name, t, want, chunk):
        if list(t.shape) != list(want):
            raise ContractViolation("input_shape" if name in self.input_names else "output_shape", chunk, None,
                                    f"{name} has shape {list(t.shape)}, expected {list(want)}")

    def _finite(self, tensors: dict, invariant, chunk):
        if not self.check_finite:
            return
        for name, t in tensors.items():
            if t.is_floating_point():
                self._fail_rows(~torch.isfinite(t), invariant, chunk, lambda r: f"{name} holds NaN/Inf")

    # -------------------------------------------------------------- checks
    def check_inputs(self, inputs: dict, chunk: int | None = None) -> None:
        self._names(inputs, self.input_names, "input_names", chunk)
        audio, length = inputs["audio_signal"], inputs["length"]
        if not audio.is_floating_point() or length.dtype != torch.int64:
            raise ContractViolation("input_dtype", chunk, None,
                                    f"audio_signal {audio.dtype}, length {length.dtype} (want float, int64)")
        if audio.dim() != 3 or audio.shape[1] != self.dims["F"]:
            raise ContractViolation("input_shape", chunk, None,
                                    f"audio_signal has shape {list(audio.shape)}, expected [B, {self.dims['F']}, T]")
        b, _, t = audio.shape
        self._shape("length", length, [b], chunk)
        if self.mode == "stream":
            if t not in self.dims["T_in"]:
                raise ContractViolation("input_shape", chunk, None,
                                        f"audio_signal has {t} frames; chunks have {self.dims['T_in']}")
            L, C, D, K = (self.dims[k] for k in "LCDK")
            R = self.dims.get("R", C)
            float_caches = float_cache_names(self.kv_cache)
            counters = [n for n in cache_names(self.kv_cache) if n not in float_caches]
            for name in float_caches:
                if inputs[name].dtype != audio.dtype:
                    raise ContractViolation("input_dtype", chunk, None, f"{name} is {inputs[name].dtype}, "
                                                                        f"audio_signal {audio.dtype}")
            for name in counters:
                if inputs[name].dtype != torch.int64:
                    raise ContractViolation("input_dtype", chunk, None, f"{name} is not int64")
            for name in float_caches:
                self._shape(name, inputs[name], [b, L, D, K] if name == "cache_last_time" else [b, L, R, D], chunk)
            for name in counters:
                self._shape(name, inputs[name], [b], chunk)
            cl = inputs["cache_last_channel_len"]
            self._fail_rows((cl < 0) | (cl > C), "cache_len_range", chunk,
                            lambda r: f"cache_last_channel_len={int(cl[r])} outside [0, {C}]")
            if self.kv_cache == "ring":
                pos = inputs[_RING_POS[0]]
                self._fail_rows((pos < 0) | (pos >= R), "cache_len_range", chunk,
                                lambda r: f"cache_ring_pos={int(pos[r])} outside [0, {R})")
        self._fail_rows((length < 0) | (length > t), "length_range", chunk,
                        lambda r: f"length={int(length[r])} outside [0, {t}]")
        self._finite({k: inputs[k] for k in self.input_names}, "input_finite", chunk)

    def check_outputs(self, inputs: dict, outputs: dict, chunk: int | None = None) -> None:
        self._names(outputs, self.output_names, "output_names", chunk)
        audio, length = inputs["audio_signal"], inputs["length"]
        b, _, t = audio.shape
        enc, enc_len = outputs["encoder_output"], outputs["encoded_lengths"]
        if self.mode == "stream":
            p = self.params
            first = p.is_first_chunk(t)
            t_out = p.encoder_frames(t, first)
            t_internal = subsampled_length(t, p.subsampling_factor, p.causal_subsampling) - p.drop_extra(first)
            expected_len = p.encoder_frames(length.to(torch.long), first)
        else:
            t_out = subsampled_length(t, self.factor, self.causal)
            expected_len = subsampled_length(length.to(torch.long), self.factor, self.causal)
        self._shape("encoder_output", enc, [b, self.dims["D"], t_out], chunk)
        self._shape("encoded_lengths", enc_len, [b], chunk)
        self._fail_rows(enc_len.to(torch.long) != expected_len.to(enc_len.device), "encoded_lengths", chunk,
                        lambda r: f"encoded_lengths={int(enc_len[r])}, expected {int(expected_len[r])} "
                                  f"(length {int(length[r])}, {'first' if self.mode == 'stream' and first else 'later'}"
                                  f" chunk)")
        if self.mode == "stream":
            for name in cache_names(self.kv_cache):
                self._shape(_next_name(name), outputs[_next_name(name)], list(inputs[name].shape), chunk)
            cl = inputs["cache_last_channel_len"].to(torch.long)
            want = (cl + (t_internal - p.cache_drop_size)).clamp(max=p.last_channel_cache_size)
            got = outputs["cache_last_channel_next_len"].to(torch.long)
            self._fail_rows(got != want.to(got.device), "cache_len_update", chunk,
                            lambda r: f"cache_last_channel_next_len={int(got[r])}, expected "
                                      f"min({int(cl[r])} + {t_internal} - {p.cache_drop_size}, "
                                      f"{p.last_channel_cache_size}) = {int(want[r])}")
            if self.kv_cache == "ring":
                pos, R = inputs[_RING_POS[0]].to(torch.long), self.dims["R"]
                nxt = outputs[_RING_POS[0] + "_next"].to(torch.long)
                keep = t_internal - p.cache_drop_size
                want_pos = torch.remainder(pos + keep, R).to(nxt.device)
                self._fail_rows(nxt != want_pos, "cache_len_update", chunk,
                                lambda r: f"cache_ring_pos_next={int(nxt[r])}, expected ({int(pos[r])} + "
                                          f"{keep}) mod {R} = {int(want_pos[r])}")
        self._finite({k: outputs[k] for k in self.output_names}, "output_finite", chunk)


def _next_name(name: str) -> str:
    return "cache_last_channel_next_len" if name == "cache_last_channel_len" else name + "_next"
