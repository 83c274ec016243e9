"""Encoder engines behind one interface (``trt_asr.engines.base.EncoderEngine``) and a factory.

    from trt_asr.engines import create_engine, load_engine_model

    engine = create_engine("onnxruntime", "exported_dir", mode="window")              # EncoderEngine
    engine = create_engine("torch-cuda", "random:parakeet-tdt-0.6b-v3", mode="stream", precision="fp16",
                           device="cuda", params=CacheAwareParams(...))
    out = engine.step({"audio_signal": feats, "length": lens})                        # contract names

    model = load_engine_model("onnxruntime", "exported_dir", device="cpu")            # TransducerModel-like
    enc, enc_len = model.encode(audio, lengths); tokens, _ = model.greedy_decoder()(enc, enc_len)

Engines: ``torch`` (fp32 eager reference), ``torch-cuda`` (fp16/bf16/fp32, CUDA graphs), ``onnxruntime`` (an
exported directory, CPU or CUDA EP), ``tensorrt`` (a serialized plan built by ``trt-asr build-engine``).
Modes: ``window`` (aliases buffered, offline) and ``stream`` (alias cache-aware).
"""

from __future__ import annotations

from pathlib import Path

import torch

ENGINES = ("torch", "torch-cuda", "onnxruntime", "tensorrt")
_ALIASES = {"ort": "onnxruntime", "onnx": "onnxruntime", "trt": "tensorrt", "cuda": "torch-cuda",
            "torch_cuda": "torch-cuda", "torchcuda": "torch-cuda"}
_MODES = {"window": "window", "buffered": "window", "offline": "window", "stream": "stream",
          "cache-aware": "stream", "cache_aware": "stream"}


def engine_name(name: str) -> str:
    n = _ALIASES.get(name.lower(), name.lower())
    if n not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    return n


def _mode(mode: str | None) -> str | None:
    if mode is None:
        return None
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; use window (buffered/offline) or stream (cache-aware)")
    return _MODES[mode]


def _as_model(model_or_spec, device="cpu"):
    if isinstance(model_or_spec, (str, Path)) or model_or_spec is None:
        from ..checkpoint import load_model
        return load_model(None if model_or_spec is None else str(model_or_spec), device=device)
    return model_or_spec


def create_engine(name: str, model_or_dir, mode: str = "window", precision: str = "fp32",
                  device: str | torch.device | None = None, params=None, **kwargs):
    """An EncoderEngine. ``model_or_dir``: a TransducerModel, a model spec (``load_model``), an exported ONNX
    directory (onnxruntime) or a plan / directory holding ``encoder*.plan`` (tensorrt). ``params``: the
    ``CacheAwareParams`` of stream mode (defaults from the model config / the exported contract)."""
    name, mode = engine_name(name), _mode(mode) or "window"
    if name == "torch":
        from .torch_engine import TorchEncoderEngine
        if precision != "fp32":
            raise ValueError("the torch reference engine is fp32; use torch-cuda for fp16/bf16")
        model = _as_model(model_or_dir, device or "cpu")
        return TorchEncoderEngine(model, mode=mode, params=params, **kwargs)
    if name == "torch-cuda":
        from .torch_cuda import TorchCudaEngine
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if mode == "stream" and params is None:
            from .onnx_export import default_params
            params = default_params(_as_model(model_or_dir))
        return TorchCudaEngine(_as_model(model_or_dir), mode=mode, precision=precision, device=device,
                               params=params, **kwargs)
    if name == "onnxruntime":
        from .onnxruntime_engine import OnnxRuntimeEngine
        return OnnxRuntimeEngine(model_or_dir, mode=mode, params=params, precision=precision,
                                 device=device or "cpu", **kwargs)
    from .tensorrt_engine import TensorRTEngine
    return TensorRTEngine(model_or_dir, mode=mode, device=device or "cuda", **kwargs)


KV_CACHES = ("layer_input", "projected", "ring")


def with_streaming_engine(model, mode: str, params: dict, engine: str = "torch-cuda", kv_cache: str = "layer_input",
                          compile_mode: str | None = None) -> dict:
    """The keyword arguments of a scheduler's streaming mode (``CaptionSchedulerPool``, ``Recognizer``) with its
    encoder on ``engine``: ``params`` (the mode's own: buffered windows, or cache-aware ``att_context_size`` /
    ``chunk_size`` / ``allow_inexact`` / ``buckets``) plus the engine object. ``torch``: the mode's own reference
    engine (``params`` unchanged). ``torch-cuda``: the model's encoder in the model's dtype, one CUDA graph per
    (batch bucket, shape), optionally through ``torch.compile`` (``compile_mode``); in cache-aware mode with the
    attention cache layout ``kv_cache`` (NeMo's layer inputs, projected K/V, or the layer inputs in a ring) and
    caches updated in place. What ``bench load``, ``serve`` and ``live`` run."""
    name = engine_name(engine)
    if name == "torch":
        return params
    if name != "torch-cuda":
        raise ValueError(f"the scheduler's streaming modes run on the torch or torch-cuda engine, not {name}")
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache={kv_cache!r}; choose one of {', '.join(KV_CACHES)}")
    from .torch_cuda import TorchCudaEngine

    prec = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[model.dtype]
    if _mode(mode.replace("_", "-")) == "window":
        eng = TorchCudaEngine(model, "window", prec, model.device, output_dtype=model.dtype, compile_mode=compile_mode)
        return {**params, "engine": eng}
    from ..streaming.cache_aware import CacheAwareParams

    cp = CacheAwareParams.for_encoder(model.cfg.encoder, att_context_size=params.get("att_context_size"),
                                      chunk_size=params.get("chunk_size"),
                                      allow_inexact=params.get("allow_inexact", False))
    # batch buckets up to 2048: the batched cache-aware mode steps up to its scheduler's max_batch streams at once
    eng = TorchCudaEngine(model, "stream", prec, model.device, params=cp, output_dtype=model.dtype,
                          batch_buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048), kv_cache=kv_cache,
                          inplace_caches=True, compile_mode=compile_mode)
    return {"params": cp, "engine": eng, **({"buckets": params["buckets"]} if params.get("buckets") else {})}


# ----------------------------------------------------------------------------------------------- model facade
class EngineModel:
    """The parts of ``TransducerModel`` that offline transcription uses (``encode``, ``features``,
    ``greedy_decoder``, ``cfg``, ``tokenizer``, ``name``, ``device``), with the encoder run by an engine."""

    def __init__(self, cfg, tokenizer, name: str, engine, preprocessor, prednet, joint, device):
        self.cfg, self.tokenizer, self.name, self.engine = cfg, tokenizer, name, engine
        self.preprocessor, self.prednet, self.joint = preprocessor, prednet, joint
        self._device = torch.device(device)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def eval(self):
        return self

    @torch.no_grad()
    def features(self, audio, lengths):
        return self.preprocessor(audio.float().to(self.device), lengths.to(self.device))

    @torch.no_grad()
    def encode(self, audio, lengths):
        feats, feat_len = self.features(audio, lengths)
        out = self.engine.step({"audio_signal": feats, "length": feat_len.to(torch.long)})
        return out["encoder_output"].float().to(self.device), out["encoded_lengths"].to(self.device)

    def greedy_decoder(self, sync_every: int | None = None):
        from ..decoding.greedy import GreedyTransducerDecoder
        d = self.cfg.decoding
        return GreedyTransducerDecoder(self.prednet, self.joint, d.durations if d.model_type == "tdt" else None,
                                       d.max_symbols, sync_every)


def load_engine_model(engine: str, model: str | Path | None, device: str = "cpu", dtype: str = "fp32",
                      **kwargs) -> EngineModel:
    """A TransducerModel-like object whose encoder runs on ``engine`` (what ``trt-asr transcribe --engine``
    uses). torch-cuda: any model spec; onnxruntime: an exported directory (or a model spec, exported to a
    temporary directory first); tensorrt: an exported directory holding a plan built by ``build-engine``."""
    name = engine_name(engine)
    if name == "torch":
        from ..checkpoint import load_model
        return load_model(None if model is None else str(model), device=device, dtype=dtype)
    if name == "torch-cuda":
        import copy
        m = _as_model(model, "cpu")
        eng = create_engine("torch-cuda", m, "window", dtype, device, output_dtype=torch.float32, **kwargs)
        pre = copy.deepcopy(m.preprocessor).to(device).float().eval()
        dec, joint = copy.deepcopy(m.decoder).to(device).float().eval(), copy.deepcopy(m.joint).to(device).float().eval()
        return EngineModel(m.cfg, m.tokenizer, m.name, eng, pre, dec, joint, device)
    from ..model.frontend import Preprocessor
    from .onnxruntime_engine import OnnxRuntimeEngine, OrtJoint, OrtPredictionNetwork, model_config_from_dir
    holder = None
    if name == "onnxruntime":
        eng = OnnxRuntimeEngine(model, mode="window", precision=dtype, device=device, **kwargs)
        dir_ = eng.dir
        holder = eng
    else:
        from .tensorrt_engine import TensorRTEngine
        eng = TensorRTEngine(model, mode="window", device=device, **kwargs)
        dir_ = eng.onnx_dir
    cfg, tok, meta = model_config_from_dir(dir_)
    dec_device = device if name == "onnxruntime" else "cpu"
    prednet = OrtPredictionNetwork(dir_, dec_device, cfg=cfg.decoder)
    joint = OrtJoint(dir_, dec_device)
    pre = Preprocessor(cfg.preprocessor).to(device).eval()
    m = EngineModel(cfg, tok, meta.get("model_name") or Path(dir_).name, eng, pre, prednet, joint, device)
    m._holder = holder  # keeps a temporary export alive
    return m
