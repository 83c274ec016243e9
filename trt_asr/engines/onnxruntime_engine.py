"""``onnxruntime`` engine: the exported ONNX graphs (``trt_asr.engines.onnx_export``) under ONNX Runtime.

    OnnxRuntimeEngine(DIR)                              mode from DIR/export.json ("window" or "stream")
    OnnxRuntimeEngine(model, mode="stream", params=P)   exports ``model`` to a temporary directory first (tests,
                                                        parity harness: ``--engine trt_asr.engines.onnxruntime_engine:OnnxRuntimeEngine``)

Execution providers: CPU (CI) always; CUDA when ``device='cuda'`` and ``onnxruntime-gpu`` provides it (inputs and
outputs then go through I/O binding on torch CUDA tensors, no host copies). The engine refuses a directory whose
ONNX metadata carries another contract hash than the directory's contract file.

``OrtPredictionNetwork`` / ``OrtJoint`` give ``trt_asr.decoding.greedy.GreedyTransducerDecoder`` ONNX-backed
prediction and joint steps, so decoding runs the same greedy loop (same tokens) as the torch path.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from .onnx_export import ENCODER_FILES, export_onnx, read_export

_NP_TO_TORCH = {np.float32: torch.float32, np.float16: torch.float16, np.int64: torch.int64, np.bool_: torch.bool}


def _providers(device: str | torch.device) -> list[str]:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in avail:
            raise RuntimeError(f"device cuda asked for, but onnxruntime {ort.__version__} has no CUDA execution "
                               f"provider (available: {avail}); install onnxruntime-gpu or use device='cpu'")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(path: Path, device, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=_providers(device))


def _metadata(session) -> dict:
    return dict(session.get_modelmeta().custom_metadata_map)


class _Runner:
    """One ONNX graph: torch tensors in, torch tensors out (numpy on CPU; I/O binding on CUDA)."""

    def __init__(self, path: Path, device, threads: int | None = None):
        self.session = _session(path, device, threads)
        self.device = torch.device(device)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}
        self.meta = _metadata(self.session)

    def _cast(self, name, t: torch.Tensor) -> torch.Tensor:
        want = self.input_types[name]
        if want == "tensor(float)" and t.dtype != torch.float32:
            return t.float()
        if want == "tensor(float16)" and t.dtype != torch.float16:
            return t.half()
        if want == "tensor(int64)" and t.dtype != torch.int64:
            return t.long()
        return t

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cuda":
            return self._run_cuda(inputs)
        feed = {n: self._cast(n, inputs[n]).detach().cpu().contiguous().numpy() for n in self.input_names}
        outs = self.session.run(self.output_names, feed)
        return {n: torch.from_numpy(np.ascontiguousarray(o)) for n, o in zip(self.output_names, outs)}

    def _run_cuda(self, inputs):
        binding = self.session.io_binding()
        keep = []
        for n in self.input_names:
            t = self._cast(n, inputs[n]).to(self.device).contiguous()
            keep.append(t)
            binding.bind_input(n, "cuda", self.device.index or 0, _np_dtype(t.dtype), list(t.shape), t.data_ptr())
        for n in self.output_names:
            binding.bind_output(n, "cuda", self.device.index or 0)
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return {n: torch.from_numpy(o.numpy()).to(self.device) for n, o in zip(self.output_names, outs)}


def _np_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]


def _resolve_dir(model_or_dir, mode: str | None, params, precision: str, tmp_holder: list) -> Path:
    if isinstance(model_or_dir, (str, Path)) and Path(model_or_dir).is_dir():
        return Path(model_or_dir)
    if isinstance(model_or_dir, (str, Path)):
        from ..checkpoint import load_model
        model_or_dir = load_model(str(model_or_dir))
    tmp = tempfile.TemporaryDirectory(prefix="trt_asr_ort_")
    tmp_holder.append(tmp)  # removed with the engine
    export_onnx(model_or_dir, tmp.name, mode={"stream": "cache-aware", "window": "buffered"}.get(mode or "window"),
                params=params, precision="fp16" if precision == "fp16" else "fp32", check=False)
    return Path(tmp.name)


class OnnxRuntimeEngine:
    """EncoderEngine over ``encoder.onnx`` (window) or ``encoder_stream.onnx`` (stream)."""

    name = "onnxruntime"

    def __init__(self, model_or_dir, mode: str | None = None, params=None, precision: str = "fp32",
                 device: str | torch.device = "cpu", threads: int | None = None, check: bool = False):
        self._tmp: list = []
        self.dir = _resolve_dir(model_or_dir, mode, params, precision, self._tmp)
        self.export = read_export(self.dir)
        exported_mode = "stream" if self.export["mode"] == "cache-aware" else "window"
        if mode is not None and mode != exported_mode:
            raise ValueError(f"{self.dir} holds a {self.export['mode']} export; mode {mode!r} needs "
                             f"`trt-asr export onnx --mode {'cache-aware' if mode == 'stream' else 'buffered'}`")
        self.mode = exported_mode
        self.precision = self.export["precision"]
        self.device = torch.device(device)
        from ..streaming.contract import load_contract, params_from_contract

        self.contract = load_contract(self.dir / self.export["contract"])
        self.runner = _Runner(self.dir / ENCODER_FILES[self.export["mode"]], self.device, threads)
        got = self.runner.meta.get("contract_sha256")
        if got != self.contract["sha256"]:
            raise RuntimeError(f"{self.dir}: the encoder graph was exported for contract {got}, but the directory's "
                               f"contract is {self.contract['sha256']}; re-export")
        self.params = params_from_contract(self.contract) if self.mode == "stream" else None
        self.checker = None
        if check:
            from ..streaming.contract import ContractChecker
            self.checker = ContractChecker.from_contract(self.contract)
        self.steps = 0

    def step(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.checker is not None:
            self.checker.check_inputs(inputs, chunk=self.steps)
        out = self.runner(inputs)
        out = {k: v.to(self.device) for k, v in out.items()}
        if self.checker is not None:
            self.checker.check_outputs(inputs, out, chunk=self.steps)
        self.steps += 1
        return out


# ----------------------------------------------------------------------------------------------- decoder
class OrtPredictionNetwork:
    """Duck-types ``PredictionNetwork`` for ``GreedyTransducerDecoder``: ``step`` returns the *projected*
    prediction output (the graph includes the joint's pred projection), so ``OrtJoint.project_prednet`` is the
    identity."""

    def __init__(self, dir_: Path, device="cpu", threads: int | None = None, cfg=None):
        self.runner = _Runner(Path(dir_) / "decoder_step.onnx", device, threads)
        self.device = torch.device(device)
        self.cfg = cfg
        self.blank_id = cfg.vocab_size

    def initial_state(self, batch: int, device, dtype=torch.float32):
        shape = (self.cfg.pred_rnn_layers, batch, self.cfg.pred_hidden)
        return torch.zeros(shape, device=device, dtype=torch.float32), torch.zeros(shape, device=device,
                                                                                   dtype=torch.float32)

    def step(self, labels_b: torch.Tensor, state):
        h, c = state
        dev = labels_b.device
        out = self.runner({"targets": labels_b, "h_in": h, "c_in": c})
        return out["decoder_output"].to(dev), (out["h_out"].to(dev), out["c_out"].to(dev))


class OrtJoint:
    def __init__(self, dir_: Path, device="cpu", threads: int | None = None):
        self.enc_runner = _Runner(Path(dir_) / "joint_enc.onnx", device, threads)
        self.runner = _Runner(Path(dir_) / "joint.onnx", device, threads)

    def project_encoder(self, enc_btd: torch.Tensor) -> torch.Tensor:
        return self.enc_runner({"encoder_frames": enc_btd})["encoder_projected"].to(enc_btd.device)

    def project_prednet(self, pred: torch.Tensor) -> torch.Tensor:
        return pred

    def joint_after_projection(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.runner({"encoder_projected": f, "decoder_output": g})["logits"].to(f.device)


def model_config_from_dir(dir_: Path):
    """(ModelConfig, Tokenizer | None) of an exported directory, without building any weights."""
    import yaml

    from ..config import ModelConfig
    from ..tokenizer import Tokenizer

    meta = read_export(dir_)
    cfg_dict = yaml.safe_load((Path(dir_) / "model_config.yaml").read_text())
    cfg = ModelConfig.from_nemo_dict(cfg_dict, vocab_size=meta["vocab_size"])
    tok_path = Path(dir_) / "tokenizer.model"
    return cfg, (Tokenizer(tok_path) if tok_path.is_file() else None), meta


def describe(dir_: Path) -> str:
    return json.dumps(read_export(dir_), indent=2)
