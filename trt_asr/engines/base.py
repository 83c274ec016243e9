"""The one small interface every encoder engine implements (torch, torch-cuda, onnxruntime, tensorrt).

An engine runs one *step* for a batch of streams: named inputs in, named outputs out, with the names, dtypes and
shapes of the I/O contract (``trt_asr.streaming.contract``). Tensors are torch tensors on ``engine.device``.

Offline / buffered mode ("window" step):   audio_signal [B, F, T], length [B]
                                        -> encoder_output [B, D, T'], encoded_lengths [B]
Cache-aware mode ("stream" step):         audio_signal, length, cache_last_channel [B, L, C, D],
                                           cache_last_time [B, L, D, K], cache_last_channel_len [B]
                                        -> encoder_output, encoded_lengths, cache_last_channel_next,
                                           cache_last_time_next, cache_last_channel_next_len
(Caches are batch-first at the engine boundary, as in NeMo's ONNX export; NeMo's modules are layer-first.)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class EncoderEngine(Protocol):
    name: str          # "torch", "torch-cuda", "onnxruntime", "tensorrt"
    mode: str          # "window" or "stream"
    precision: str     # "fp32", "fp16", "bf16"
    device: torch.device

    def step(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run one step for a batch; never keeps state between calls (the caller carries caches)."""
        ...
