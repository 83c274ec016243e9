"""ONNX export + onnxruntime engine: checker/shape inference, contract hash in metadata, parity with the torch
reference through the parity harness (functional + closed loop), v3 dimensions, and `transcribe --engine onnxruntime`."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from trt_asr.checkpoint import load_model  # noqa: E402
from trt_asr.config import preset_config  # noqa: E402
from trt_asr.engines import create_engine, engine_name, load_engine_model  # noqa: E402
from trt_asr.engines.onnx_export import check_onnx, default_params, export_onnx  # noqa: E402
from trt_asr.engines.onnxruntime_engine import OnnxRuntimeEngine  # noqa: E402
from trt_asr.model.asr import TransducerModel  # noqa: E402
from trt_asr.model.calibrate import synthetic_audio  # noqa: E402
from trt_asr.streaming.cache_aware import initial_caches  # noqa: E402
from trt_asr.streaming.contract import content_hash, load_contract  # noqa: E402

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny")


@pytest.fixture(scope="module")
def tiny_ca():
    return load_model("random:tiny-cache-aware")


@pytest.fixture(scope="module")
def window_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_window")
    export_onnx(tiny, out)
    return out


@pytest.fixture(scope="module")
def v3_small():
    """Real v3 dimensions (1024-d, 128 mels, vocab 8192, 5 durations) with 2 encoder layers, random weights."""
    cfg = preset_config("parakeet-tdt-0.6b-v3")
    cfg.encoder.n_layers = 2
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = TransducerModel(cfg).eval()
    finally:
        torch.random.set_rng_state(state)
    return model


def _audio(n: int, seconds: float = 3.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.stack([synthetic_audio(seconds, 16000, g) for _ in range(n)])
    lengths = torch.tensor([a.shape[1] - 4000 * i for i in range(n)])
    return a, lengths


# ----------------------------------------------------------------------------------------------- export
def test_window_export_is_valid_loadable_directory(tiny, window_dir):
    import onnx

    meta = json.loads((window_dir / "export.json").read_text())
    assert meta["mode"] == "buffered" and meta["encoder"] == "encoder.onnx"
    contract = load_contract(window_dir / "encoder_streaming.contract.json")
    assert contract["sha256"] == content_hash(contract) == meta["contract_sha256"]
    for name in meta["files"]:
        check_onnx(window_dir / name)  # onnx.checker + strict shape inference
        m = onnx.load(str(window_dir / name), load_external_data=False)
        props = {p.key: p.value for p in m.metadata_props}
        assert props["contract_sha256"] == contract["sha256"]
    enc = onnx.load(str(window_dir / "encoder.onnx"))
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in enc.graph.input]
    assert dims[0][0] == "B" and dims[0][2] == "T"  # dynamic batch and time
    for f in ("model_config.yaml", "tokenizer.model", "vocab.txt"):
        assert (window_dir / f).is_file()
    # the directory is a model: same config and tokenizer as the source
    em = load_engine_model("onnxruntime", window_dir)
    assert em.cfg.encoder == tiny.cfg.encoder and em.tokenizer.vocab_size == tiny.tokenizer.vocab_size


def test_cache_aware_export_checks_and_matches_reference(tiny_ca, tmp_path):
    params = default_params(tiny_ca)
    meta = export_onnx(tiny_ca, tmp_path, mode="cache-aware", params=params)
    assert meta["encoder"] == "encoder_stream.onnx"
    eng = OnnxRuntimeEngine(tmp_path, mode="stream")
    ref = create_engine("torch", tiny_ca, "stream", params=params)
    caches = initial_caches(params, 3)
    for k in range(4):  # first chunk (no pre-encode cache, drop 0), then later chunks: one graph for both
        t = params.input_frames(k == 0)
        inp = {"audio_signal": torch.randn(3, tiny_ca.cfg.encoder.feat_in, t), "length": torch.tensor([t, t - 5, t]),
               **caches}
        r, o = ref.step(inp), eng.step(inp)
        for name in r:
            assert o[name].shape == r[name].shape, name
            assert torch.allclose(o[name].float(), r[name].float(), atol=1e-5), name
        caches = {"cache_last_channel": r["cache_last_channel_next"], "cache_last_time": r["cache_last_time_next"],
                  "cache_last_channel_len": r["cache_last_channel_next_len"]}


def test_engine_refuses_contract_mismatch(tiny, tmp_path):
    export_onnx(tiny, tmp_path, decoder=False, check=False)
    path = tmp_path / "encoder_streaming.contract.json"
    c = json.loads(path.read_text())
    c["model"]["name"] = "something else"
    c["sha256"] = content_hash(c)
    path.write_text(json.dumps(c))
    with pytest.raises(RuntimeError, match="contract"):
        OnnxRuntimeEngine(tmp_path)


# ----------------------------------------------------------------------------------------------- parity
def test_ort_parity_harness_closed_loop_1000_chunks_and_functional(tiny_ca):
    from trt_asr.validation.parity import Gates, make_engine, run_parity
    from trt_asr.validation.reference import LiveReference

    params = default_params(tiny_ca)
    engine = make_engine("trt_asr.engines.onnxruntime_engine:OnnxRuntimeEngine", tiny_ca, params)
    assert engine.name == "onnxruntime" and engine.mode == "stream"
    gates = Gates(atol=1e-4, max_growth=1e-5)
    closed = run_parity(engine, LiveReference(tiny_ca, params, 1000, batch=1, seed=3), "closed_loop", gates,
                        model=tiny_ca, keep_per_chunk=False)
    assert closed["passed"], json.dumps(closed["gates"])
    assert closed["chunks"] == 1000 and closed["token_agreement"]["chunks_equal_rate"] == 1.0
    functional = run_parity(engine, LiveReference(tiny_ca, params, 100, batch=2, seed=4), "functional", gates,
                            model=tiny_ca, keep_per_chunk=False)
    assert functional["passed"], json.dumps(functional["gates"])


def test_v3_dimensions_window_and_stream(v3_small, tmp_path):
    # window: encoder + full greedy decode through ORT equal the torch model
    export_onnx(v3_small, tmp_path / "w")
    em = load_engine_model("onnxruntime", tmp_path / "w")
    audio, lengths = _audio(2, 2.0)
    with torch.no_grad():
        enc, el = v3_small.encode(audio, lengths)
        ref_tok, _ = v3_small.greedy_decoder()(enc, el)
    e2, l2 = em.encode(audio, lengths)
    assert torch.equal(l2, el)
    assert float((e2 - enc).norm() / enc.norm()) < 1e-5
    tok, _ = em.greedy_decoder()(e2, l2)
    assert tok.to_lists() == ref_tok.to_lists()
    # cache-aware step at v3 dimensions (cache 64 frames), a few chunks
    params = default_params(v3_small, att_context_size=[64, -1], chunk_size=2)
    export_onnx(v3_small, tmp_path / "s", mode="cache-aware", params=params, decoder=False)
    eng = OnnxRuntimeEngine(tmp_path / "s")
    ref = create_engine("torch", v3_small, "stream", params=params)
    caches = initial_caches(params, 1)
    for k in range(3):
        t = params.input_frames(k == 0)
        inp = {"audio_signal": torch.randn(1, 128, t), "length": torch.tensor([t]), **caches}
        r, o = ref.step(inp), eng.step(inp)
        for name in r:
            rel = float((o[name].float() - r[name].float()).norm() / r[name].float().norm().clamp_min(1e-12))
            assert rel < 1e-5, (k, name, rel)
        caches = {"cache_last_channel": r["cache_last_channel_next"], "cache_last_time": r["cache_last_time_next"],
                  "cache_last_channel_len": r["cache_last_channel_next_len"]}


# ----------------------------------------------------------------------------------------------- transcribe
def test_transcribe_cli_onnxruntime_equals_torch(tiny, window_dir, tmp_path, capsys):
    import soundfile as sf

    from trt_asr.cli import main

    paths = []
    for i, secs in enumerate((3.0, 1.7)):
        a = synthetic_audio(secs, 16000, torch.Generator().manual_seed(10 + i)).numpy()
        paths.append(str(tmp_path / f"a{i}.wav"))
        sf.write(paths[-1], a, 16000)
    spec = str(tmp_path / "tiny.nemo")
    from trt_asr.checkpoint import save_nemo
    save_nemo(tiny, spec)
    assert main(["transcribe", *paths, "--model", spec, "--format", "json"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main(["transcribe", *paths, "--model", str(window_dir), "--engine", "onnxruntime", "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in got] == [r["text"] for r in ref]
    assert all(r["text"] for r in ref)


def test_export_cli(tmp_path, capsys):
    from trt_asr.cli import main

    assert main(["export", "onnx", "--model", "random:tiny-cache-aware", "--mode", "cache-aware",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "encoder_stream.onnx").is_file() and (tmp_path / "export.json").is_file()
    assert "contract" in capsys.readouterr().out


def test_factory_names():
    assert engine_name("ort") == "onnxruntime" and engine_name("TRT") == "tensorrt"
    with pytest.raises(ValueError):
        engine_name("nope")


def test_ort_window_padded_batch_matches(tiny, window_dir):
    eng = create_engine("onnxruntime", window_dir, "window")
    feats = torch.randn(3, tiny.cfg.encoder.feat_in, 180)
    lengths = torch.tensor([180, 120, 64])
    with torch.no_grad():
        r, rl = tiny.encoder(feats, lengths)
    o = eng.step({"audio_signal": feats, "length": lengths})
    assert torch.equal(o["encoded_lengths"], rl)
    np.testing.assert_allclose(o["encoder_output"].numpy(), r.numpy(), atol=1e-5)


def test_external_data_directory(tiny, tmp_path):
    """The path big (v3: 2.4 GB) encoders take: weights in one DIR/encoder.onnx.data file."""
    export_onnx(tiny, tmp_path, decoder=False, external_data=True)
    assert (tmp_path / "encoder.onnx.data").stat().st_size > 100_000
    assert (tmp_path / "encoder.onnx").stat().st_size < 200_000
    check_onnx(tmp_path / "encoder.onnx")
    feats = torch.randn(2, tiny.cfg.encoder.feat_in, 90)
    lengths = torch.tensor([90, 77])
    with torch.no_grad():
        r, _ = tiny.encoder(feats, lengths)
    o = OnnxRuntimeEngine(tmp_path).step({"audio_signal": feats, "length": lengths})
    assert torch.allclose(o["encoder_output"], r, atol=1e-5)
