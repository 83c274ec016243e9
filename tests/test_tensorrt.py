"""TensorRT engine. The build/run tests need ``import tensorrt`` and a CUDA GPU and skip elsewhere (no machine of
this project has TensorRT: the full builder is not installable on the CI image and the GPU machine has none).
The plan-metadata and profile logic runs everywhere."""

from __future__ import annotations

import json

import pytest
import torch

from trt_asr.engines.tensorrt_engine import PlanMismatch, check_plan_metadata, parse_profile_arg

try:
    import tensorrt  # noqa: F401
    HAVE_TRT = hasattr(tensorrt, "Builder")
    WHY = "" if HAVE_TRT else "tensorrt is the lean runtime only (no Builder)"
except ImportError:
    HAVE_TRT, WHY = False, "tensorrt is not installed (not installable here; no project machine has TensorRT)"
needs_trt = pytest.mark.skipif(not (HAVE_TRT and torch.cuda.is_available()),
                               reason=WHY or "TensorRT needs a CUDA GPU")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("onnx")
    from trt_asr.checkpoint import load_model
    from trt_asr.engines.onnx_export import default_params, export_onnx

    model = load_model("random:tiny-cache-aware")
    out = tmp_path_factory.mktemp("trt_onnx")
    export_onnx(model, out, mode="cache-aware", params=default_params(model), max_batch=8)
    return model, out


def test_profiles_from_contract_and_override(exported):
    from trt_asr.streaming.contract import load_contract

    _, out = exported
    c = load_contract(out / "encoder_streaming.contract.json")
    p = parse_profile_arg("contract", c)
    assert p == c["optimization_profiles"]
    q = parse_profile_arg("B=2:4:32", c)[0]
    assert q["min"]["cache_last_channel"][0] == 2 and q["max"]["audio_signal"][0] == 32
    with pytest.raises(ValueError):
        parse_profile_arg("B=8:4:2", c)


def test_plan_metadata_refusals():
    meta = {"contract_sha256": "abc", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    gpu = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    check_plan_metadata(meta, "abc", gpu)
    with pytest.raises(PlanMismatch, match="contract"):
        check_plan_metadata(meta, "def", gpu)
    with pytest.raises(PlanMismatch, match="GPU|built on"):
        check_plan_metadata(meta, "abc", {"gpu": "NVIDIA A100", "compute_capability": "8.0"})


@needs_trt
@pytest.mark.gpu
@pytest.mark.parametrize("precision,atol", [("fp32", 1e-4), ("fp16", 2e-2)])
def test_build_and_parity(exported, tmp_path, precision, atol):
    from trt_asr.engines.onnx_export import default_params
    from trt_asr.engines.tensorrt_engine import TensorRTEngine, build_engine
    from trt_asr.validation.parity import Gates, run_parity
    from trt_asr.validation.reference import LiveReference

    model, out = exported
    plan = build_engine(out, precision, tmp_path / f"enc.{precision}.plan", timing_cache=tmp_path / "t.cache")
    meta = json.loads((tmp_path / f"enc.{precision}.plan.json").read_text())
    assert meta["precision"] == precision and meta["tensorrt_version"]
    engine = TensorRTEngine(plan)
    params = default_params(model)
    s = run_parity(engine, LiveReference(model, params, 200, batch=1), "closed_loop", Gates(atol=atol, max_growth=atol),
                   model=model, keep_per_chunk=False)
    assert s["contract_pass_rate"] == 1.0 and s["chunks"] == 200
    if precision == "fp32":
        assert s["passed"], json.dumps(s["gates"])


@needs_trt
@pytest.mark.gpu
def test_refuses_other_contract(exported, tmp_path):
    from trt_asr.engines.tensorrt_engine import TensorRTEngine, build_engine

    _, out = exported
    plan = build_engine(out, "fp32", tmp_path / "enc.plan")
    meta_path = tmp_path / "enc.plan.json"
    meta = json.loads(meta_path.read_text())
    meta["contract_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(PlanMismatch):
        TensorRTEngine(plan)


def test_skip_reason_is_stated():
    if not HAVE_TRT:
        assert WHY
