"""Numerics switches shared by the engines and decoders."""

from __future__ import annotations

import contextlib
import functools

import torch


@contextlib.contextmanager
def no_tf32():
    """PyTorch lets cuDNN run fp32 convolutions and RNNs in TF32 by default (matmuls it does not): ~1e-3 relative
    error, enough to fail the fp32 parity gate (1e-4) at the first subsampling conv. Off inside this block; fp16 /
    bf16 work is unaffected (TF32 applies to fp32 only)."""
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = prev


def without_tf32(fn):
    """``fn`` run under ``no_tf32`` (also while a CUDA graph captures it: the kernels are chosen then)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with no_tf32():
            return fn(*args, **kwargs)
    return run
