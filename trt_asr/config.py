"""Typed model configuration, read from (and written back to) NeMo's ``model_config.yaml``.

Only inference-relevant fields are typed; the original NeMo dictionary is kept in ``ModelConfig.nemo`` so that a
checkpoint written by this package carries the config NeMo expects.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


@dataclass
class PreprocessorConfig:
    sample_rate: int = 16000
    window_size: float = 0.025
    window_stride: float = 0.01
    window: str = "hann"
    features: int = 128
    n_fft: int = 512
    normalize: str | None = "per_feature"
    log: bool = True
    dither: float = 1e-5  # training only
    pad_to: int = 0
    pad_value: float = 0.0
    preemph: float | None = 0.97
    lowfreq: float = 0.0
    highfreq: float | None = None
    log_zero_guard_value: float = 2**-24
    mag_power: float = 2.0
    frame_splicing: int = 1
    mel_norm: str | None = "slaney"
    exact_pad: bool = False

    @property
    def win_length(self) -> int:
        return int(self.window_size * self.sample_rate)

    @property
    def hop_length(self) -> int:
        return int(self.window_stride * self.sample_rate)


@dataclass
class EncoderConfig:
    feat_in: int = 128
    n_layers: int = 24
    d_model: int = 1024
    n_heads: int = 8
    ff_expansion_factor: int = 4
    subsampling: str = "dw_striding"
    subsampling_factor: int = 8
    subsampling_conv_channels: int = 256
    causal_downsampling: bool = False
    self_attention_model: str = "rel_pos"
    # One [left, right] pair, or several for a multi-context model (the first is the default, as in NeMo).
    att_context_size: list = field(default_factory=lambda: [-1, -1])
    att_context_style: str = "regular"  # or "chunked_limited"
    xscaling: bool = False
    untie_biases: bool = True
    pos_emb_max_len: int = 5000
    conv_kernel_size: int = 9
    conv_norm_type: str = "batch_norm"
    conv_context_size: Any = None  # None (symmetric), "causal" or [left, right]
    use_bias: bool = False
    dropout: float = 0.1  # training only, as the three below
    dropout_pre_encoder: float = 0.1
    dropout_att: float = 0.1

    @property
    def att_context_sizes(self) -> list[list[int]]:
        acs = self.att_context_size
        if acs and isinstance(acs[0], (list, tuple)):
            return [list(a) for a in acs]
        return [list(acs) if acs else [-1, -1]]

    @property
    def conv_context(self) -> list[int]:
        k = self.conv_kernel_size
        if self.conv_context_size is None:
            return [(k - 1) // 2, (k - 1) // 2]
        if self.conv_context_size == "causal":
            return [k - 1, 0]
        left, right = self.conv_context_size
        if left + right + 1 != k:
            raise ValueError(f"conv_context_size {self.conv_context_size} does not fit kernel {k}")
        return [int(left), int(right)]


@dataclass
class DecoderConfig:
    vocab_size: int = 8192
    pred_hidden: int = 640
    pred_rnn_layers: int = 2
    blank_as_pad: bool = True


@dataclass
class JointConfig:
    joint_hidden: int = 640
    activation: str = "relu"
    num_extra_outputs: int = 5


@dataclass
class DecodingConfig:
    model_type: str = "tdt"  # "tdt" or "rnnt"
    durations: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    max_symbols: int = 10


@dataclass
class ModelConfig:
    preprocessor: PreprocessorConfig = field(default_factory=PreprocessorConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    nemo: dict = field(default_factory=dict, repr=False)  # the full NeMo config, for writing .nemo archives

    @property
    def sample_rate(self) -> int:
        return self.preprocessor.sample_rate

    @property
    def blank_id(self) -> int:
        return self.decoder.vocab_size

    @property
    def frame_seconds(self) -> float:
        """Seconds per encoder output frame (80 ms for v3)."""
        return self.preprocessor.window_stride * self.encoder.subsampling_factor

    # ------------------------------------------------------------------ NeMo dict <-> typed config
    @classmethod
    def from_nemo_dict(cls, cfg: dict, vocab_size: int | None = None) -> "ModelConfig":
        cfg = copy.deepcopy(cfg)
        pre = _pick(PreprocessorConfig, cfg.get("preprocessor", {}))
        enc = _pick(EncoderConfig, cfg.get("encoder", {}))
        dec_cfg = cfg.get("decoder", {}) or {}
        prednet = dec_cfg.get("prednet", {}) or {}
        joint_cfg = cfg.get("joint", {}) or {}
        jointnet = joint_cfg.get("jointnet", {}) or {}
        vocab = vocab_size or dec_cfg.get("vocab_size") or joint_cfg.get("num_classes")
        if vocab is None and cfg.get("labels"):
            vocab = len(cfg["labels"])
        if vocab is None:
            raise ValueError("cannot tell the vocabulary size: config has no decoder.vocab_size and no tokenizer given")
        dec = DecoderConfig(
            vocab_size=int(vocab),
            pred_hidden=int(prednet.get("pred_hidden", 640)),
            pred_rnn_layers=int(prednet.get("pred_rnn_layers", 1)),
            blank_as_pad=bool(dec_cfg.get("blank_as_pad", True)),
        )
        joint = JointConfig(
            joint_hidden=int(jointnet.get("joint_hidden", 640)),
            activation=str(jointnet.get("activation", "relu")),
            num_extra_outputs=int(joint_cfg.get("num_extra_outputs", 0) or 0),
        )
        d = cfg.get("decoding", {}) or {}
        durations = d.get("durations") or (cfg.get("model_defaults", {}) or {}).get("tdt_durations") or []
        model_type = d.get("model_type") or ("tdt" if durations else "rnnt")
        greedy = d.get("greedy", {}) or {}
        decoding = DecodingConfig(
            model_type=model_type,
            durations=[int(x) for x in durations] if model_type == "tdt" else [],
            max_symbols=int(greedy.get("max_symbols", 10) or 10),
        )
        if model_type == "tdt" and joint.num_extra_outputs != len(decoding.durations):
            raise ValueError(
                f"TDT config mismatch: joint.num_extra_outputs={joint.num_extra_outputs} "
                f"but {len(decoding.durations)} durations"
            )
        return cls(pre, enc, dec, joint, decoding, nemo=cfg)

    @classmethod
    def from_yaml(cls, path: str | Path, vocab_size: int | None = None) -> "ModelConfig":
        with open(path) as f:
            return cls.from_nemo_dict(yaml.safe_load(f), vocab_size=vocab_size)

    def to_nemo_dict(self) -> dict:
        """A NeMo-style config holding this config's values (on top of the original NeMo dict, if any)."""
        cfg = copy.deepcopy(self.nemo) if self.nemo else {}
        cfg.setdefault("target", "nemo.collections.asr.models.rnnt_bpe_models.EncDecRNNTBPEModel")
        cfg["sample_rate"] = self.sample_rate
        pre = cfg.setdefault("preprocessor", {})
        pre.setdefault("_target_", "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor")
        pre.update(dataclasses.asdict(self.preprocessor))
        for k in ("preemph", "lowfreq", "highfreq", "log_zero_guard_value", "mag_power", "mel_norm", "exact_pad"):
            if getattr(self.preprocessor, k) == getattr(PreprocessorConfig(), k):
                pre.pop(k, None)  # keep NeMo's defaults implicit, as real configs do
        enc = cfg.setdefault("encoder", {})
        enc.setdefault("_target_", "nemo.collections.asr.modules.ConformerEncoder")
        enc.update(dataclasses.asdict(self.encoder))
        enc.setdefault("feat_out", -1)
        dec = cfg.setdefault("decoder", {})
        dec.setdefault("_target_", "nemo.collections.asr.modules.RNNTDecoder")
        dec["vocab_size"] = self.decoder.vocab_size
        dec["blank_as_pad"] = self.decoder.blank_as_pad
        prednet = dec.setdefault("prednet", {})
        prednet.update(pred_hidden=self.decoder.pred_hidden, pred_rnn_layers=self.decoder.pred_rnn_layers)
        joint = cfg.setdefault("joint", {})
        joint.setdefault("_target_", "nemo.collections.asr.modules.RNNTJoint")
        joint["num_classes"] = self.decoder.vocab_size
        joint["num_extra_outputs"] = self.joint.num_extra_outputs
        jn = joint.setdefault("jointnet", {})
        jn.update(
            joint_hidden=self.joint.joint_hidden,
            activation=self.joint.activation,
            encoder_hidden=self.encoder.d_model,
            pred_hidden=self.decoder.pred_hidden,
        )
        dcfg = cfg.setdefault("decoding", {})
        dcfg.setdefault("strategy", "greedy_batch")
        dcfg["model_type"] = self.decoding.model_type
        if self.decoding.model_type == "tdt":
            dcfg["durations"] = list(self.decoding.durations)
        else:
            dcfg.pop("durations", None)
        dcfg.setdefault("greedy", {})["max_symbols"] = self.decoding.max_symbols
        # NeMo's EncDecRNNT(BPE)Model takes the joint's input sizes from model_defaults and the decoding durations
        # (and the joint's output split) from the loss config: keep both consistent with the typed config.
        md = cfg.get("model_defaults") or {}
        md.update(enc_hidden=self.encoder.d_model, pred_hidden=self.decoder.pred_hidden,
                  joint_hidden=self.joint.joint_hidden)
        loss = cfg.get("loss") or {}
        if self.decoding.model_type == "tdt":
            md.update(tdt_durations=list(self.decoding.durations), num_tdt_durations=len(self.decoding.durations))
            if loss.get("loss_name") != "tdt":
                loss = {"loss_name": "tdt", "tdt_kwargs": {"fastemit_lambda": 0.0, "clamp": -1.0, "sigma": 0.02,
                                                           "omega": 0.1}}
            loss.setdefault("tdt_kwargs", {})["durations"] = list(self.decoding.durations)
        else:
            md.pop("tdt_durations", None)
            md.pop("num_tdt_durations", None)
            if loss.get("loss_name") not in (None, "default", "warprnnt_numba"):
                loss = {"loss_name": "default"}
        cfg["model_defaults"] = md
        if loss:
            cfg["loss"] = loss
        return cfg


def _pick(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (d or {}).items() if k in names})


PRESETS = {
    "parakeet-tdt-0.6b-v3": "parakeet-tdt-0.6b-v3.yaml",
}


def tiny_config(vocab_size: int = 128, att_context_style: str = "regular", att_context_size=(-1, -1),
                causal: bool = False, n_layers: int = 2, d_model: int = 64) -> ModelConfig:
    """A small config on the same code paths as v3, for fast tests."""
    cfg = ModelConfig.from_nemo_dict(load_preset_dict("parakeet-tdt-0.6b-v3"), vocab_size=vocab_size)
    e = cfg.encoder
    e.n_layers, e.d_model, e.n_heads = n_layers, d_model, 4
    e.subsampling_conv_channels = 32
    e.att_context_size = list(att_context_size)
    e.att_context_style = att_context_style
    if causal:
        e.causal_downsampling = True
        e.conv_context_size = "causal"
    cfg.preprocessor.features = e.feat_in = 80
    cfg.decoder.pred_hidden = 48
    cfg.decoder.pred_rnn_layers = 1
    cfg.joint.joint_hidden = 48
    cfg.nemo = cfg.to_nemo_dict()
    cfg.nemo.pop("model_defaults", None)
    return cfg


def load_preset_dict(name: str) -> dict:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    text = resources.files("trt_asr.presets").joinpath(PRESETS[name]).read_text()
    return yaml.safe_load(text)


def preset_config(name: str, vocab_size: int | None = None) -> ModelConfig:
    """Named configs: ``parakeet-tdt-0.6b-v3``, ``tiny`` (full attention) and ``tiny-cache-aware``
    (chunked-limited attention [16, 3], causal convolutions and subsampling)."""
    if name == "tiny":
        return tiny_config()
    if name == "tiny-cache-aware":
        return tiny_config(att_context_style="chunked_limited", att_context_size=[16, 3], causal=True)
    d = load_preset_dict(name)
    return ModelConfig.from_nemo_dict(d, vocab_size=vocab_size or 8192)
