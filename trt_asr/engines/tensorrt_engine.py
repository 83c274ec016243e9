"""``tensorrt`` engine: build a serialized plan from an exported ONNX directory, and run it behind EncoderEngine.

    build_engine(onnx_dir, "fp16", out="DIR/encoder.fp16.plan")      (CLI: trt-asr build-engine --onnx DIR ...)
    TensorRTEngine("DIR/encoder.fp16.plan")  or  TensorRTEngine(DIR)  (the only *.plan in DIR)

Written against the public TensorRT (10.x) Python API: ``Builder`` -> ``NetworkDefinition`` filled by
``OnnxParser.parse_from_file`` (external weights resolved beside the file) -> ``BuilderConfig`` with one
optimization profile per contract profile (``IOptimizationProfile.set_shape``), a timing cache
(``create_timing_cache`` / ``set_timing_cache``, saved back after the build), a workspace memory-pool limit
(``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``) and the precision flag -> ``build_serialized_network``.
Beside the plan, ``PLAN.json`` records TensorRT version, GPU name and compute capability, precision, profiles and
the contract hash. The runner refuses a plan whose contract hash differs from its ONNX directory's contract or
whose GPU is not this one, binds every I/O tensor by name (``set_input_shape``, ``set_tensor_address``) to
pre-allocated torch CUDA buffers sized for the profile maximum, and runs ``execute_async_v3`` on the current
torch stream.

Nothing here was run: no machine of this project has TensorRT (the full builder is not installable here and the GPU
machine has none). ``tests/test_tensorrt.py`` runs it where ``import tensorrt`` works and skips elsewhere.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import torch

PRECISIONS = ("fp32", "fp16", "bf16")


class PlanMismatch(RuntimeError):
    pass


def _trt():
    try:
        import tensorrt as trt
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError("TensorRT is not installed (pip install tensorrt, on a machine with an NVIDIA GPU); "
                           "use --engine torch-cuda or onnxruntime instead") from e
    return trt


def _logger(trt, verbose: bool = False):
    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


# ----------------------------------------------------------------------------------------------- profiles
def profiles_from_contract(contract: dict, override: list[dict] | None = None) -> list[dict]:
    """The contract's optimization profiles ``[{name, min: {input: shape}, opt: ..., max: ...}]`` (or
    ``override``), checked: every input of the contract has min <= opt <= max shapes of the same rank."""
    profiles = override or contract["optimization_profiles"]
    names = [x["name"] for x in contract["inputs"]]
    for p in profiles:
        for k in ("min", "opt", "max"):
            missing = set(names) - set(p[k])
            if missing:
                raise ValueError(f"profile {p.get('name')!r} has no {k} shape for {sorted(missing)}")
        for n in names:
            lo, mid, hi = p["min"][n], p["opt"][n], p["max"][n]
            if not (len(lo) == len(mid) == len(hi)) or any(a > b for a, b in zip(lo, mid)) or \
                    any(a > b for a, b in zip(mid, hi)):
                raise ValueError(f"profile {p.get('name')!r}: {n} needs min <= opt <= max, got {lo} {mid} {hi}")
    return profiles


def parse_profile_arg(text: str, contract: dict) -> list[dict]:
    """``--profiles`` value: ``contract`` (default), a JSON file of profiles, or ``B=1:8:64[,T=...]`` overriding
    the contract profile's batch (and window-T) ranges."""
    if text in (None, "", "contract"):
        return profiles_from_contract(contract)
    path = Path(text)
    if path.is_file():
        return profiles_from_contract(contract, json.loads(path.read_text()))
    base = json.loads(json.dumps(contract["optimization_profiles"][0]))
    for item in text.split(","):
        dim, _, rng = item.partition("=")
        lo, mid, hi = (int(x) for x in rng.split(":"))
        for n, shape in base["min"].items():
            axis = 0 if dim == "B" else (2 if dim in ("T", "T_in") and n == "audio_signal" else None)
            if axis is None or axis >= len(shape):
                continue
            base["min"][n][axis], base["opt"][n][axis], base["max"][n][axis] = lo, mid, hi
    base["name"] = f"custom:{text}"
    return profiles_from_contract(contract, [base])


# ----------------------------------------------------------------------------------------------- metadata
def gpu_identity() -> dict:
    if not torch.cuda.is_available():
        return {"gpu": None, "compute_capability": None}
    cc = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{cc[0]}.{cc[1]}"}


def check_plan_metadata(meta: dict, contract_sha256: str, gpu: dict | None = None) -> None:
    """Raise ``PlanMismatch`` if the plan was built for another contract or another GPU."""
    if meta.get("contract_sha256") != contract_sha256:
        raise PlanMismatch(f"plan was built for contract {meta.get('contract_sha256')}, but the model directory's "
                           f"contract is {contract_sha256}: rebuild it with `trt-asr build-engine`")
    gpu = gpu if gpu is not None else gpu_identity()
    if meta.get("gpu") != gpu.get("gpu") or meta.get("compute_capability") != gpu.get("compute_capability"):
        raise PlanMismatch(f"plan was built on {meta.get('gpu')} (sm {meta.get('compute_capability')}), this is "
                           f"{gpu.get('gpu')} (sm {gpu.get('compute_capability')}): TensorRT plans are not portable "
                           f"across GPUs; rebuild it here")


def plan_meta_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


# ----------------------------------------------------------------------------------------------- build
def build_engine(onnx_dir: str | Path, precision: str = "fp16", out: str | Path | None = None, *,
                 profiles: list[dict] | None = None, workspace_gib: float = 4.0, timing_cache: str | Path | None = None,
                 optimization_level: int = 3, verbose: bool = False) -> Path:
    """Build ``onnx_dir``'s encoder graph into a serialized plan; returns the plan path."""
    from ..streaming.contract import load_contract
    from .onnx_export import ENCODER_FILES, read_export

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    trt = _trt()
    onnx_dir = Path(onnx_dir)
    export = read_export(onnx_dir)
    contract = load_contract(onnx_dir / export["contract"])
    onnx_path = onnx_dir / ENCODER_FILES[export["mode"]]
    profiles = profiles_from_contract(contract, profiles)
    out = Path(out) if out else onnx_dir / f"{onnx_path.stem}.{precision}.plan"
    timing_cache = Path(timing_cache) if timing_cache else onnx_dir / "timing.cache"

    logger = _logger(trt, verbose)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = optimization_level
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32 (the parity reference)
    cache_blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    input_names = [network.get_input(i).name for i in range(network.num_inputs)]
    want = [x["name"] for x in contract["inputs"]]
    if sorted(input_names) != sorted(want):
        raise RuntimeError(f"{onnx_path} inputs {input_names} differ from the contract's {want}")
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name in input_names:
            prof.set_shape(name, tuple(p["min"][name]), tuple(p["opt"][name]), tuple(p["max"][name]))
        config.add_optimization_profile(prof)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT build failed (see the log above)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    meta = {"format": "trt-asr-plan", "tensorrt_version": trt.__version__, **gpu_identity(),
            "precision": precision, "mode": export["mode"], "profiles": profiles,
            "contract_sha256": contract["sha256"], "onnx_dir": str(onnx_dir.resolve()), "onnx": onnx_path.name,
            "workspace_gib": workspace_gib, "optimization_level": optimization_level,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    plan_meta_path(out).write_text(json.dumps(meta, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------------------------- run
def _torch_dtype(trt, dt):
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}
    for name, tdt in (("BF16", torch.bfloat16), ("INT64", torch.int64)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = tdt
    return table[dt]


def _find_plan(path: Path) -> Path:
    if path.is_file():
        return path
    plans = sorted(path.glob("*.plan"))
    if len(plans) != 1:
        raise FileNotFoundError(f"{path}: expected one *.plan file (found {len(plans)}); build one with "
                                f"`trt-asr build-engine --onnx {path} --precision fp16`, or pass the plan path")
    return plans[0]


class TensorRTEngine:
    """EncoderEngine over a serialized TensorRT plan (window or stream mode, from the plan's metadata)."""

    name = "tensorrt"

    def __init__(self, plan_or_dir, mode: str | None = None, device="cuda", profile: int = 0, check: bool = False,
                 **_ignored):
        from ..streaming.contract import load_contract
        from .onnx_export import read_export

        trt = _trt()
        self.trt = trt
        self.plan = _find_plan(Path(plan_or_dir))
        meta_path = plan_meta_path(self.plan)
        if not meta_path.is_file():
            raise PlanMismatch(f"{self.plan} has no metadata file {meta_path.name}; rebuild with trt-asr build-engine")
        self.meta = json.loads(meta_path.read_text())
        self.onnx_dir = Path(self.meta["onnx_dir"])
        if not self.onnx_dir.is_dir():  # moved together with the plan
            self.onnx_dir = self.plan.parent
        export = read_export(self.onnx_dir)
        self.contract = load_contract(self.onnx_dir / export["contract"])
        check_plan_metadata(self.meta, self.contract["sha256"])
        self.mode = "stream" if self.meta["mode"] == "cache-aware" else "window"
        if mode is not None and {"buffered": "window", "cache-aware": "stream"}.get(mode, mode) != self.mode:
            raise ValueError(f"{self.plan} is a {self.meta['mode']} plan, not {mode}")
        self.precision = self.meta["precision"]
        self.device = torch.device(device)
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if self.engine is None:
            raise PlanMismatch(f"TensorRT {trt.__version__} could not deserialize {self.plan} (built with "
                               f"{self.meta.get('tensorrt_version')})")
        self.context = self.engine.create_execution_context()
        self.profile = profile
        if profile:
            self.context.set_optimization_profile_async(profile, torch.cuda.current_stream().cuda_stream)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        want_in = [x["name"] for x in self.contract["inputs"]]
        want_out = [x["name"] for x in self.contract["outputs"]]
        if sorted(self.inputs) != sorted(want_in) or sorted(self.outputs) != sorted(want_out):
            raise PlanMismatch(f"plan I/O {self.inputs} -> {self.outputs} differs from the contract's "
                               f"{want_in} -> {want_out}")
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        # pre-allocate every I/O buffer at the profile maximum (outputs: shapes the context infers from it)
        prof = self.meta["profiles"][profile]
        for n in self.inputs:
            self.context.set_input_shape(n, tuple(prof["max"][n]))
        self.buffers = {}
        for n in names:
            shape = tuple(self.context.get_tensor_shape(n))
            numel = 1
            for s in shape:
                numel *= max(int(s), 1)
            self.buffers[n] = torch.empty(numel, dtype=self.dtypes[n], device=self.device)
            self.context.set_tensor_address(n, self.buffers[n].data_ptr())
        self.checker = None
        if check:
            from ..streaming.contract import ContractChecker
            self.checker = ContractChecker.from_contract(self.contract)
        self.steps = 0

    def step(self, inputs: dict[str, torch.Tensor], clone: bool = True) -> dict[str, torch.Tensor]:
        if self.checker is not None:
            self.checker.check_inputs(inputs, chunk=self.steps)
        for n in self.inputs:
            t = inputs[n]
            if not self.context.set_input_shape(n, tuple(t.shape)):
                raise ValueError(f"{n} shape {tuple(t.shape)} is outside the plan's profile "
                                 f"{self.meta['profiles'][self.profile]['min'][n]}..."
                                 f"{self.meta['profiles'][self.profile]['max'][n]}")
            view = self.buffers[n][: t.numel()].view(t.shape)
            view.copy_(t.to(self.dtypes[n]), non_blocking=True)
        out = {}
        for n in self.outputs:
            shape = tuple(int(s) for s in self.context.get_tensor_shape(n))
            numel = 1
            for s in shape:
                numel *= s
            out[n] = self.buffers[n][:numel].view(shape)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if not self.context.execute_async_v3(stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        if clone:
            out = {k: v.clone() for k, v in out.items()}
        if self.checker is not None:
            self.checker.check_outputs(inputs, out, chunk=self.steps)
        self.steps += 1
        return out
