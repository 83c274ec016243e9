"""Make random weights decode like a trained model would, so tests and benchmarks exercise real decoding paths.

Raw random weights are degenerate: the deep encoder gives almost the same vector at every frame, and the joint
emits a label (max_symbols of them) at every frame. Calibration, deterministic for a seed:
  1. residual branches are scaled down so each layer keeps the input's frame-to-frame variation;
  2. the joint's encoder projection is centred and rescaled on synthetic audio (noise, tones, silence);
  3. the blank logit is biased so about ``blank_fraction`` of frames are blank, and the duration logits are
     centred so every duration occurs (including 0: several labels on one frame).
"""

from __future__ import annotations

import math

import torch

from .asr import TransducerModel


def synthetic_audio(seconds: float, sample_rate: int, generator: torch.Generator) -> torch.Tensor:
    """Speech-like test signal: bursts of harmonics with varying pitch, noise and pauses."""
    n = int(seconds * sample_rate)
    t = torch.arange(n) / sample_rate
    out = torch.zeros(n)
    pos = 0
    while pos < n:
        seg = int(sample_rate * (0.08 + 0.25 * torch.rand(1, generator=generator).item()))
        kind = torch.randint(0, 4, (1,), generator=generator).item()
        end = min(n, pos + seg)
        tt = t[pos:end]
        if kind == 0:
            f0 = 90 + 200 * torch.rand(1, generator=generator).item()
            sig = sum(torch.sin(2 * math.pi * f0 * k * tt) / k for k in range(1, 6))
        elif kind == 1:
            sig = torch.randn(end - pos, generator=generator) * 0.5
        elif kind == 2:
            f = 300 + 3000 * torch.rand(1, generator=generator).item()
            sig = torch.sin(2 * math.pi * f * tt)
        else:
            sig = torch.zeros(end - pos)
        out[pos:end] = sig * (0.05 + 0.3 * torch.rand(1, generator=generator).item())
        pos = end
    return out


@torch.no_grad()
def calibrate_random_model(model: TransducerModel, seed: int = 0, blank_fraction: float = 0.5,
                           residual_scale: float = 0.25, calib_seconds: float = 6.0) -> dict:
    g = torch.Generator().manual_seed(seed + 1234)
    for layer in model.encoder.layers:
        for w in (layer.feed_forward1.linear2.weight, layer.feed_forward2.linear2.weight,
                  layer.self_attn.linear_out.weight, layer.conv.pointwise_conv2.weight):
            w.mul_(residual_scale)
    sr = model.cfg.sample_rate
    audio = torch.stack([synthetic_audio(calib_seconds, sr, g) for _ in range(2)])
    lengths = torch.full((2,), audio.shape[1], dtype=torch.long)
    was_training = model.training
    model.eval()
    enc, enc_len = model.encode(audio, lengths)
    frames = enc.transpose(1, 2).reshape(-1, enc.shape[1])  # [N, D]
    joint = model.joint
    proj = joint.enc(frames)
    joint.enc.bias.sub_(proj.mean(0))
    proj = joint.enc(frames)
    scale = 1.5 / proj.std().clamp_min(1e-6)
    joint.enc.weight.mul_(scale)
    joint.enc.bias.mul_(scale)
    # logits with the start-of-sequence prediction output
    dec = model.greedy_decoder()
    state = dec.initial_state(1, frames.device)
    logits = joint.joint_after_projection(joint.enc(frames), state.pred_out)  # [N, V+1+D]
    v1 = joint.num_classes_with_blank
    blank = v1 - 1
    bias = joint.joint_net[-1].bias
    margin = logits[:, :blank].max(-1).values - logits[:, blank]
    bias[blank] += torch.quantile(margin, blank_fraction)
    if joint.num_extra_outputs:
        bias[v1:] -= logits[:, v1:].mean(0)
    model.train(was_training)
    tokens, _ = dec(enc, enc_len)
    emitted = int(tokens.counts.sum())
    return {"tokens_per_second": emitted / (2 * calib_seconds)}
