"""The fp32 eager PyTorch engine: the reference implementation of the encoder I/O contract.

    TorchEncoderEngine(model, mode="stream", params=CacheAwareParams)   cache-aware step (``stream_step``)
    TorchEncoderEngine(model, mode="window")                             offline / buffered window
    TorchEncoderEngine(model, mode="stream", params=..., kv_cache="projected")   projected-K/V cache variant
    TorchEncoderEngine(model, mode="stream", params=..., kv_cache="ring")        ring cache variant (no cache shift)

Caches are batch-first at this boundary ([B, L, C, D], [B, L, D, K]); the encoder module is layer-first, so the
engine transposes on the way in and out. With ``check=True`` (default) every step checks the contract's runtime
invariants (``trt_asr.streaming.contract``) and raises ``ContractViolation`` naming invariant, chunk and stream.
"""

from __future__ import annotations

import torch

from ..model.encoder import ProjectedKVCache, RingCache, StreamingCache
from ..streaming.cache_aware import CacheAwareParams
from ..streaming.contract import ContractChecker, cache_io
from ..numerics import without_tf32


class TorchEncoderEngine:
    name = "torch"

    def __init__(self, model, mode: str = "stream", params: CacheAwareParams | None = None, *, check: bool = True,
                 allow_inexact: bool = False, kv_cache: str = "layer_input"):
        """``kv_cache``: the stream step's attention cache, "layer_input" (NeMo's ``cache_last_channel``),
        "projected" (``cache_last_channel_k`` / ``_v``: keys and values after linear_k / linear_v) or "ring"
        (``cache_last_channel_ring`` + ``cache_ring_pos``: the layer inputs in a ring, see ``RingCache``)."""
        if mode not in ("stream", "window"):
            raise ValueError(f"mode must be 'stream' or 'window', not {mode!r}")
        self.encoder = model.encoder if hasattr(model, "encoder") else model
        self.mode = mode
        self.device = next(self.encoder.parameters()).device
        dtype = next(self.encoder.parameters()).dtype
        self.precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        if mode == "stream" and params is None:
            params = CacheAwareParams.for_encoder(self.encoder.cfg, allow_inexact=allow_inexact)
        self.params = params
        self.kv_cache = kv_cache
        self.checker = ContractChecker(self.encoder.cfg, mode, params, kv_cache=kv_cache) if check else None
        self.steps = 0  # only to name the chunk in contract violations; no model state is kept

    @torch.no_grad()
    @without_tf32  # the fp32 reference on a GPU computes as on the CPU (cuDNN convs would use TF32)
    def step(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.checker is not None:
            self.checker.check_inputs(inputs, chunk=self.steps)
        outputs = self._stream(inputs) if self.mode == "stream" else self._window(inputs)
        if self.checker is not None:
            self.checker.check_outputs(inputs, outputs, chunk=self.steps)
        self.steps += 1
        return outputs

    def cache_io(self) -> list[tuple[str, str, tuple[int, ...], torch.dtype]]:
        """Per cache of the stream step: (input name, output name, per-stream shape, dtype), in contract order.
        A streaming mode allocates ``zeros(B, *shape, dtype)`` for new streams, feeds ``out[output name]`` back as
        ``input name`` next step, and never needs to know the variant."""
        dtype = next(self.encoder.parameters()).dtype
        return cache_io(self.params, self.kv_cache, dtype)

    def _window(self, inputs):
        enc, enc_len = self.encoder(inputs["audio_signal"], inputs["length"])
        return {"encoder_output": enc, "encoded_lengths": enc_len}

    def _stream(self, inputs):
        p = self.params
        audio = inputs["audio_signal"]
        first = p.is_first_chunk(audio.shape[-1])
        if self.kv_cache == "projected":
            cache = ProjectedKVCache(inputs["cache_last_channel_k"].transpose(0, 1),
                                     inputs["cache_last_channel_v"].transpose(0, 1),
                                     inputs["cache_last_time"].transpose(0, 1),
                                     inputs["cache_last_channel_len"].to(torch.long))
        elif self.kv_cache == "ring":
            cache = RingCache(inputs["cache_last_channel_ring"].transpose(0, 1), inputs["cache_last_time"].transpose(0, 1),
                              inputs["cache_last_channel_len"].to(torch.long), inputs["cache_ring_pos"].to(torch.long),
                              p.last_channel_cache_size)
        else:
            cache = StreamingCache(inputs["cache_last_channel"].transpose(0, 1),
                                   inputs["cache_last_time"].transpose(0, 1),
                                   inputs["cache_last_channel_len"].to(torch.long))
        enc, enc_len, nxt = self.encoder.stream_step(
            audio, inputs["length"], cache, drop_extra_pre_encoded=p.drop_extra(first),
            cache_drop_size=p.cache_drop_size, att_context_size=list(p.att_context_size))
        if p.att_context_style == "regular" and p.valid_out_len > 0:  # NeMo's streaming_post_process
            enc, enc_len = enc[:, :, : p.valid_out_len], enc_len.clamp(max=p.valid_out_len)
        out = {"encoder_output": enc, "encoded_lengths": enc_len.to(torch.long)}
        if self.kv_cache == "projected":
            out["cache_last_channel_k_next"] = nxt.last_k.transpose(0, 1).contiguous()
            out["cache_last_channel_v_next"] = nxt.last_v.transpose(0, 1).contiguous()
        elif self.kv_cache == "ring":
            out["cache_last_channel_ring_next"] = nxt.ring.transpose(0, 1).contiguous()
            out["cache_ring_pos_next"] = nxt.pos
        else:
            out["cache_last_channel_next"] = nxt.last_channel.transpose(0, 1).contiguous()
        out["cache_last_time_next"] = nxt.last_time.transpose(0, 1).contiguous()
        out["cache_last_channel_next_len"] = nxt.last_channel_len.to(torch.long)
        return out


def project_caches(model, caches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Batch-first layer-input caches (``cache_last_channel``, ...) -> the projected-K/V variant's caches
    (``cache_last_channel_k`` / ``_v``, the rest as is), so a stream can switch variant between two steps.
    ``model``: a TransducerModel or its encoder, on the caches' device and dtype."""
    encoder = model.encoder if hasattr(model, "encoder") else model
    layer_first = StreamingCache(caches["cache_last_channel"].transpose(0, 1), caches["cache_last_time"],
                                 caches["cache_last_channel_len"])
    kv = encoder.project_cache(layer_first)  # k, v keep the batch-first memory of cache_last_channel
    return {"cache_last_channel_k": kv.last_k.transpose(0, 1).contiguous(),
            "cache_last_channel_v": kv.last_v.transpose(0, 1).contiguous(),
            "cache_last_time": caches["cache_last_time"], "cache_last_channel_len": caches["cache_last_channel_len"]}
