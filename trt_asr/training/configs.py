"""Configs of the two shipped demo models: v3's architecture and code paths, scaled down to ~6M parameters.

* ``demo-tdt-buffered``: like Parakeet-TDT-0.6B-v3 - full attention [-1, -1], regular style, symmetric convs,
  non-causal subsampling, per-feature normalisation.
* ``demo-tdt-cache-aware``: like NeMo's cache-aware FastConformers - chunked_limited attention with multi-context
  sizes [[70, 13], [70, 6], [70, 1], [70, 0]] (left % (right + 1) == 0; the first is the default), causal
  depthwise convs and causal subsampling, no per-feature normalisation (NeMo's ``normalize: NA``, written here as
  ``null``: NeMo's FilterbankFeatures skips normalisation for both).
"""

from __future__ import annotations

from ..config import ModelConfig, load_preset_dict

VARIANTS = ("buffered", "cache-aware")
CACHE_AWARE_CONTEXTS = [[70, 13], [70, 6], [70, 1], [70, 0]]


def demo_config(variant: str, vocab_size: int, d_model: int = 176, n_layers: int = 8, n_heads: int = 4,
                pred_hidden: int = 256, joint_hidden: int = 256, features: int = 80) -> ModelConfig:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}")
    cfg = ModelConfig.from_nemo_dict(load_preset_dict("parakeet-tdt-0.6b-v3"), vocab_size=vocab_size)
    e = cfg.encoder
    e.n_layers, e.d_model, e.n_heads = n_layers, d_model, n_heads
    e.subsampling_conv_channels = d_model
    cfg.preprocessor.features = e.feat_in = features
    if variant == "cache-aware":
        e.att_context_style = "chunked_limited"
        e.att_context_size = [list(c) for c in CACHE_AWARE_CONTEXTS]
        e.conv_context_size = "causal"
        e.causal_downsampling = True
        cfg.preprocessor.normalize = None
    else:
        e.att_context_style = "regular"
        e.att_context_size = [-1, -1]
        e.conv_context_size = None
        e.causal_downsampling = False
        cfg.preprocessor.normalize = "per_feature"
    cfg.decoder.pred_hidden = pred_hidden
    cfg.decoder.pred_rnn_layers = 1
    cfg.joint.joint_hidden = joint_hidden
    cfg.nemo = cfg.to_nemo_dict()
    cfg.nemo.pop("model_defaults", None)
    cfg.nemo["name"] = f"demo-tdt-{variant}"
    return cfg
