"""ONNX export of a ``TransducerModel`` into a *loadable model directory*.

    export_onnx(model, out_dir, mode="buffered" | "cache-aware", opset=17, precision="fp32", params=None)

writes::

    out_dir/
      encoder.onnx            window (buffered/offline) encoder:  audio_signal [B, F, T], length [B]
                              -> encoder_output [B, D, T_out], encoded_lengths [B]              (mode buffered)
      encoder_stream.onnx     cache-aware step (contract names, caches batch-first [B, L, ...])  (mode cache-aware)
      decoder_step.onnx       prediction-network step + joint pred projection:
                              targets [B] int64, h_in [L, B, H], c_in [L, B, H] -> decoder_output [B, J], h_out, c_out
      joint_enc.onnx          joint encoder projection: encoder_frames [B, T, D] -> encoder_projected [B, T, J]
      joint.onnx              joint after projection: encoder_projected [B, J], decoder_output [B, J] -> logits [B, V+1+d]
      *.onnx.data             external weights (one file per graph) when a graph is over ~2 GB (or external_data=True)
      model_config.yaml       the NeMo model config (so the directory is a model description)
      tokenizer.model, vocab.txt
      encoder_streaming.contract.json   the I/O contract; its sha256 is in every ONNX's metadata (contract_sha256)
      export.json             what was exported (mode, precision, opset, files, contract hash, vocab size)

The encoder graphs have dynamic batch and time. The cache-aware graph decides the first-chunk rule (no
pre-encode cache, drop 0) from its input length at run time, so one graph serves first and later chunks.
The decoder/joint graphs are always fp32 (as NeMo decodes in fp32); ``precision`` applies to the encoder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import yaml
from torch import nn

from ..model.encoder import attention_masks

EXPORT_META = "export.json"
ENCODER_FILES = {"buffered": "encoder.onnx", "cache-aware": "encoder_stream.onnx"}
DECODER_FILES = ("decoder_step.onnx", "joint_enc.onnx", "joint.onnx")
EXTERNAL_THRESHOLD = 1_900_000_000  # bytes of weights above which a graph keeps them in an external file


# ----------------------------------------------------------------------------------------------- wrappers
class WindowEncoder(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, audio_signal, length):
        return self.encoder(audio_signal, length)


class StreamEncoder(nn.Module):
    """``ConformerEncoder.stream_step`` with the contract's batch-first caches and a run-time first-chunk rule."""

    def __init__(self, encoder, params):
        super().__init__()
        self.encoder, self.p = encoder, params

    def forward(self, audio_signal, length, cache_last_channel, cache_last_time, cache_last_channel_len):
        return self._step(audio_signal, length, (cache_last_channel,), cache_last_time, cache_last_channel_len)

    def _step(self, audio_signal, length, channel_caches, cache_last_time, cache_last_channel_len):
        """``channel_caches``: (cache_last_channel,) or, projected-K/V variant, (cache_last_channel_k, _v)."""
        p, enc = self.p, self.encoder
        x, lengths = enc.pre_encode(audio_signal.transpose(1, 2), length)
        drop_later = p.drop_extra_pre_encoded
        if drop_later > 0:
            t_in = torch._shape_as_tensor(audio_signal)[2]
            if p.pad_and_drop_preencoded:
                drop = torch.full_like(t_in, drop_later)
            else:  # a first chunk (no pre-encode cache) keeps every frame
                drop = (t_in != p.input_frames(True)).to(torch.long) * drop_later
            t_x = torch._shape_as_tensor(x)[1]
            x = x.index_select(1, torch.arange(drop, t_x, device=x.device))
            lengths = (lengths - drop).clamp(min=0)
        ch = [c.transpose(0, 1) for c in channel_caches]
        tm = cache_last_time.transpose(0, 1)
        cache_len = ch[0].shape[2]
        t = x.shape[1]
        x, pos_emb = enc.pos_enc(x, cache_len=cache_len)
        offset = cache_len - cache_last_channel_len
        pad_mask, att_mask = attention_masks(lengths + cache_len, t + cache_len, list(p.att_context_size),
                                             p.att_context_style, offset=offset)
        pad_mask, att_mask = pad_mask[:, cache_len:], att_mask[:, cache_len:]
        next_ch, next_tm = [], []
        for i, layer in enumerate(enc.layers):
            if len(ch) == 2:
                x, c1, t1 = layer(x, att_mask, pos_emb, pad_mask, None, tm[i], p.cache_drop_size,
                                  cache_kv=(ch[0][i], ch[1][i]))
            else:
                x, c1, t1 = layer(x, att_mask, pos_emb, pad_mask, ch[0][i], tm[i], p.cache_drop_size)
                c1 = (c1,)
            next_ch.append(c1)
            next_tm.append(t1)
        next_len = torch.clamp(cache_last_channel_len + (t - p.cache_drop_size), max=cache_len)
        out = x.transpose(1, 2)
        if p.att_context_style == "regular" and p.valid_out_len > 0:  # NeMo's streaming_post_process
            out, lengths = out[:, :, : p.valid_out_len], lengths.clamp(max=p.valid_out_len)
        next_channel = [torch.stack([c[j] for c in next_ch], 1) for j in range(len(ch))]
        return (out, lengths, *next_channel, torch.stack(next_tm, 1), next_len)


class StreamEncoderProjectedKV(StreamEncoder):
    """The projected-K/V variant of the contract: per-layer keys / values cached after linear_k / linear_v."""

    def forward(self, audio_signal, length, cache_last_channel_k, cache_last_channel_v, cache_last_time,
                cache_last_channel_len):
        return self._step(audio_signal, length, (cache_last_channel_k, cache_last_channel_v), cache_last_time,
                          cache_last_channel_len)


class DecoderStep(nn.Module):
    def __init__(self, prednet, joint):
        super().__init__()
        self.prednet, self.joint = prednet, joint

    def forward(self, targets, h_in, c_in):
        out, (h, c) = self.prednet.step(targets, (h_in, c_in))
        return self.joint.project_prednet(out), h, c


class JointEnc(nn.Module):
    def __init__(self, joint):
        super().__init__()
        self.joint = joint

    def forward(self, encoder_frames):
        return self.joint.project_encoder(encoder_frames)


class JointAfterProjection(nn.Module):
    def __init__(self, joint):
        super().__init__()
        self.joint = joint

    def forward(self, encoder_projected, decoder_output):
        return self.joint.joint_after_projection(encoder_projected, decoder_output)


# ----------------------------------------------------------------------------------------------- helpers
def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes, opset: int,
            metadata: dict, external_data: bool | None = None) -> Path:
    """torch.onnx (TorchScript exporter: predictable dynamic shapes for this model), then re-save with metadata
    and, for big graphs, one external-data file beside it."""
    import onnx

    module = module.eval()
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    big = nbytes > EXTERNAL_THRESHOLD if external_data is None else external_data
    with tempfile.TemporaryDirectory(prefix="trt_asr_onnx_") as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(module, args, str(raw), input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False)
        model = onnx.load(str(raw), load_external_data=True)
    module.eval()  # the exporter restores the wrapper's mode; keep everything in eval
    del model.metadata_props[:]
    for k, v in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = str(k), str(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    if (path.parent / data_name).exists():
        (path.parent / data_name).unlink()
    if big:
        _constants_to_initializers(model)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def _constants_to_initializers(model, min_bytes: int = 1024) -> None:
    """Large ``Constant`` nodes (e.g. the positional-encoding table) -> initializers, so they go to external data."""
    from onnx import numpy_helper

    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = node.attribute[0].t
            if numpy_helper.to_array(t).nbytes >= min_bytes:
                t.name = node.output[0]
                model.graph.initializer.append(t)
                continue
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def check_onnx(path: str | Path, strict_shapes: bool = True) -> None:
    """``onnx.checker`` (by path: works for external data) and full shape inference (raises on failure)."""
    import onnx

    path = str(path)
    onnx.checker.check_model(path, full_check=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "inferred.onnx")
        onnx.shape_inference.infer_shapes_path(path, out, check_type=True, strict_mode=strict_shapes)


def _copy_tokenizer(model, out: Path) -> None:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return
    (out / "tokenizer.model").write_bytes(tok.model_bytes)
    (out / "vocab.txt").write_text("".join(tok.piece(i) + "\n" for i in range(tok.vocab_size)), encoding="utf-8")


def default_params(model, att_context_size=None, chunk_size=None, left_chunks=None):
    import warnings as _w

    from ..streaming.cache_aware import CacheAwareParams
    with _w.catch_warnings():
        _w.simplefilter("ignore")
        return CacheAwareParams.for_encoder(model.cfg.encoder, att_context_size=att_context_size,
                                            chunk_size=chunk_size, left_chunks=left_chunks, allow_inexact=True)


# ----------------------------------------------------------------------------------------------- export
def export_onnx(model, out_dir: str | Path, mode: str = "buffered", *, opset: int = 17, precision: str = "fp32",
                params=None, max_batch: int = 64, window_frames=(8, 1400, 3000), external_data: bool | None = None,
                check: bool = True, decoder: bool = True, kv_cache: str = "layer_input") -> dict:
    """Export ``model`` (a TransducerModel, any device) to ``out_dir``; returns the export metadata dict.
    ``kv_cache="projected"`` (cache-aware only) exports the projected-K/V variant of the stream step
    (``cache_last_channel_k`` / ``_v`` instead of ``cache_last_channel``; see ``trt_asr.streaming.contract``)."""
    from ..streaming.contract import build_contract, stream_io, write_contract

    mode = {"stream": "cache-aware", "window": "buffered", None: "buffered"}.get(mode, mode)
    if mode not in ENCODER_FILES:
        raise ValueError(f"mode must be 'buffered' or 'cache-aware', not {mode!r}")
    if precision not in ("fp32", "fp16"):
        raise ValueError("ONNX export supports fp32 and fp16 (build bf16/fp16 TensorRT plans from the fp32 graph)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float32 if precision == "fp32" else torch.float16
    cpu = torch.device("cpu")
    enc_cfg = model.cfg.encoder
    import copy
    encoder = copy.deepcopy(model.encoder).to(cpu, dtype).eval()
    if mode == "cache-aware" and params is None:
        params = default_params(model)
    onnx_dtype = "float32" if precision == "fp32" else "float16"
    if kv_cache != "layer_input" and mode != "cache-aware":
        raise ValueError("kv_cache variants are for the cache-aware (stream) step")
    if kv_cache == "ring":
        raise ValueError("kv_cache='ring' is a layout of the torch engines (a scatter into the cache); export "
                         "'layer_input' (NeMo's) or 'projected'")
    contract = build_contract(enc_cfg, mode, params, model_name=getattr(model, "name", ""),
                              batch=(1, 1, max_batch), window_frames=window_frames, dtype=onnx_dtype,
                              kv_cache=kv_cache)
    write_contract(contract, out)
    meta_common = {"producer": "trt-asr", "contract_sha256": contract["sha256"],
                   "contract_version": contract["contract_version"], "model_name": getattr(model, "name", ""),
                   "mode": mode, "precision": precision}
    F, D, L = enc_cfg.feat_in, enc_cfg.d_model, enc_cfg.n_layers
    files = []
    g = torch.Generator().manual_seed(0)
    if mode == "buffered":
        T = 200
        args = (torch.randn(2, F, T, generator=g).to(dtype), torch.tensor([T, T - 37]))
        path = _export(WindowEncoder(encoder), args, out / ENCODER_FILES[mode], ["audio_signal", "length"],
                       ["encoder_output", "encoded_lengths"],
                       {"audio_signal": {0: "B", 2: "T"}, "length": {0: "B"}, "encoder_output": {0: "B", 2: "T_out"},
                        "encoded_lengths": {0: "B"}}, opset, {**meta_common, "graph": "encoder"}, external_data)
    else:
        C, K = params.last_channel_cache_size, params.last_time_cache_size
        T = params.input_frames(False)
        if kv_cache == "layer_input":
            args = (torch.randn(2, F, T, generator=g).to(dtype), torch.tensor([T, T - 3]),
                    torch.randn(2, L, C, D, generator=g).to(dtype), torch.randn(2, L, D, K, generator=g).to(dtype),
                    torch.tensor([C, max(C // 2, 0)]))
            path = _export(StreamEncoder(encoder, params), args, out / ENCODER_FILES[mode],
                           ["audio_signal", "length", "cache_last_channel", "cache_last_time", "cache_last_channel_len"],
                           ["encoder_output", "encoded_lengths", "cache_last_channel_next", "cache_last_time_next",
                            "cache_last_channel_next_len"],
                           {"audio_signal": {0: "B", 2: "T_in"}, "length": {0: "B"}, "cache_last_channel": {0: "B"},
                            "cache_last_time": {0: "B"}, "cache_last_channel_len": {0: "B"},
                            "encoder_output": {0: "B", 2: "T_out"}, "encoded_lengths": {0: "B"},
                            "cache_last_channel_next": {0: "B"}, "cache_last_time_next": {0: "B"},
                            "cache_last_channel_next_len": {0: "B"}},
                           opset, {**meta_common, "graph": "encoder_stream"}, external_data)
        else:  # names from the contract's variant; every dim but batch (and the chunk's time) is static
            ins, outs = stream_io(onnx_dtype, kv_cache)
            args = (torch.randn(2, F, T, generator=g).to(dtype), torch.tensor([T, T - 3]),
                    *[torch.randn(2, L, C, D, generator=g).to(dtype) for _ in ins[2:-2]],
                    torch.randn(2, L, D, K, generator=g).to(dtype), torch.tensor([C, max(C // 2, 0)]))
            axes = {x["name"]: {i: d for i, d in enumerate(x["shape"]) if d in ("B", "T_in", "T_out")}
                    for x in ins + outs}
            path = _export(StreamEncoderProjectedKV(encoder, params), args, out / ENCODER_FILES[mode],
                           [x["name"] for x in ins], [x["name"] for x in outs], axes, opset,
                           {**meta_common, "graph": "encoder_stream", "kv_cache": kv_cache}, external_data)
    files.append(path.name)
    del encoder
    if decoder:
        prednet = copy.deepcopy(model.decoder).to(cpu, torch.float32).eval()
        joint = copy.deepcopy(model.joint).to(cpu, torch.float32).eval()
        Lr, H = prednet.cfg.pred_rnn_layers, prednet.cfg.pred_hidden
        J = joint.enc.out_features
        meta = {**meta_common, "precision": "fp32"}
        _export(DecoderStep(prednet, joint), (torch.tensor([0, prednet.blank_id]), torch.zeros(Lr, 2, H),
                                              torch.zeros(Lr, 2, H)),
                out / "decoder_step.onnx", ["targets", "h_in", "c_in"], ["decoder_output", "h_out", "c_out"],
                {"targets": {0: "B"}, "h_in": {1: "B"}, "c_in": {1: "B"}, "decoder_output": {0: "B"},
                 "h_out": {1: "B"}, "c_out": {1: "B"}}, opset, {**meta, "graph": "decoder_step"})
        _export(JointEnc(joint), (torch.randn(2, 7, D, generator=g),), out / "joint_enc.onnx", ["encoder_frames"],
                ["encoder_projected"], {"encoder_frames": {0: "B", 1: "T"}, "encoder_projected": {0: "B", 1: "T"}},
                opset, {**meta, "graph": "joint_enc"})
        _export(JointAfterProjection(joint), (torch.randn(2, J, generator=g), torch.randn(2, J, generator=g)),
                out / "joint.onnx", ["encoder_projected", "decoder_output"], ["logits"],
                {"encoder_projected": {0: "B"}, "decoder_output": {0: "B"}, "logits": {0: "B"}},
                opset, {**meta, "graph": "joint"})
        files += list(DECODER_FILES)
    cfg = model.cfg.to_nemo_dict()
    if getattr(model, "tokenizer", None) is not None:
        _copy_tokenizer(model, out)
        cfg["tokenizer"] = {**(cfg.get("tokenizer") or {}), "dir": None, "type": "bpe",
                            "model_path": "tokenizer.model", "vocab_path": "vocab.txt"}
    (out / "model_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    meta = {"format": "trt-asr-onnx", "version": 1, "mode": mode, "precision": precision, "opset": opset,
            "encoder": ENCODER_FILES[mode], "files": files, "contract": "encoder_streaming.contract.json",
            "contract_sha256": contract["sha256"], "vocab_size": model.cfg.decoder.vocab_size,
            "model_name": getattr(model, "name", ""), "torch": torch.__version__,
            "streaming_params": params.to_dict() if params is not None else None}
    if kv_cache != "layer_input":
        meta["kv_cache"] = kv_cache
    (out / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
    if check:
        for name in files:
            check_onnx(out / name)
    return meta


def read_export(dir_: str | Path) -> dict:
    path = Path(dir_) / EXPORT_META
    if not path.is_file():
        raise FileNotFoundError(f"{dir_} is not an exported ONNX model directory (no {EXPORT_META}); "
                                f"run `trt-asr export onnx --model M --out DIR` first")
    return json.loads(path.read_text())


def remove_export(dir_: str | Path) -> None:
    shutil.rmtree(dir_, ignore_errors=True)
