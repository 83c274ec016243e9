"""Offline batched greedy transcription with a TransducerModel (used for validation curves and ``trt-asr eval``)."""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def transcribe_arrays(model, audios: list[np.ndarray], batch_size: int = 32, att_context_size=None) -> list[str]:
    """Float audio arrays at the model's sample rate -> transcripts (sorted by length internally for speed)."""
    device = model.device
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    out: list[str] = [""] * len(audios)
    dec = model.greedy_decoder()
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        lens = torch.tensor([len(audios[i]) for i in idx])
        x = torch.zeros(len(idx), int(lens.max()))
        for k, i in enumerate(idx):
            x[k, : len(audios[i])] = torch.from_numpy(np.asarray(audios[i], dtype=np.float32))
        x, lens = x.to(device), lens.to(device)
        feats, flen = model.features(x, lens)
        enc, elen = model.encoder(feats.to(model.dtype), flen, att_context_size=att_context_size)
        tokens, _ = dec(enc, elen)
        for k, toks in enumerate(tokens.to_lists()):
            out[idx[k]] = model.tokenizer.decode([t for t, _, _ in toks])
    return out
