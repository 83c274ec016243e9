"""The encoder I/O contract: the JSON the CLI writes, and every runtime invariant firing on a deliberately broken
step (naming invariant, chunk and stream) while a correct carried stream passes them all."""

from __future__ import annotations

import json

import pytest
import torch

from trt_asr.checkpoint import load_model
from trt_asr.cli import main as cli
from trt_asr.engines.base import EncoderEngine
from trt_asr.engines.torch_engine import TorchEncoderEngine
from trt_asr.streaming.cache_aware import CacheAwareParams, initial_caches
from trt_asr.streaming.contract import (INVARIANTS, ContractChecker, ContractViolation, build_contract,
                                        load_contract)
from trt_asr.validation.reference import feature_chunks


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny-cache-aware")


@pytest.fixture(scope="module")
def params(tiny):
    return CacheAwareParams.for_encoder(tiny.cfg.encoder)


def _steps(tiny, params, n, batch=2):
    """(inputs, outputs) of n carried reference steps."""
    engine = TorchEncoderEngine(tiny, mode="stream", params=params, check=False)
    caches = initial_caches(params, batch)
    out = []
    for audio, length in feature_chunks(params, n, batch, seed=0):
        inputs = {"audio_signal": audio, "length": length, **caches}
        o = engine.step(inputs)
        out.append((inputs, o))
        caches = {"cache_last_channel": o["cache_last_channel_next"], "cache_last_time": o["cache_last_time_next"],
                  "cache_last_channel_len": o["cache_last_channel_next_len"]}
    return out


# ----------------------------------------------------------------------------------------------- the file
def test_contract_cli_writes_names_shapes_params_profiles_hash(tmp_path):
    out = tmp_path / "c.json"
    assert cli(["contract", "--model", "random:tiny-cache-aware", "--mode", "cache-aware", "--batch", "1", "4", "16",
                "--out", str(out)]) == 0
    c = load_contract(out)  # verifies the content hash
    assert [x["name"] for x in c["inputs"]] == ["audio_signal", "length", "cache_last_channel", "cache_last_time",
                                               "cache_last_channel_len"]
    assert [x["name"] for x in c["outputs"]] == ["encoder_output", "encoded_lengths", "cache_last_channel_next",
                                                "cache_last_time_next", "cache_last_channel_next_len"]
    shapes = {x["name"]: (x["dtype"], x["shape"]) for x in c["inputs"] + c["outputs"]}
    assert shapes["cache_last_channel"] == ("float32", ["B", "L", "C", "D"])
    assert shapes["cache_last_channel_len"] == ("int64", ["B"])
    s = c["streaming"]  # [16, 3], causal dw_striding x8: NeMo's numbers
    assert (s["chunk_size"], s["shift_size"], s["pre_encode_cache_size"]) == ([25, 32], [25, 32], [0, 9])
    assert (s["drop_extra_pre_encoded"], s["valid_out_len"], s["cache_drop_size"]) == (2, 4, 0)
    assert (s["last_channel_cache_size"], s["last_time_cache_size"]) == (16, 8)
    assert c["dims"]["T_in"] == [25, 41] and c["dims"]["T_out"] == [4] and c["exact_streaming"]
    prof = c["optimization_profiles"][0]
    assert prof["min"]["audio_signal"] == [1, 80, 25] and prof["opt"]["audio_signal"] == [4, 80, 41]
    assert prof["max"]["cache_last_channel"] == [16, 2, 16, 64]
    assert {i["id"] for i in c["invariants"]} == set(INVARIANTS)
    c["dims"]["C"] = 99
    out.write_text(json.dumps(c))
    with pytest.raises(ValueError, match="hash"):
        load_contract(out)


def test_contract_cli_buffered_and_v3_refusal(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert cli(["contract", "--model", "random:parakeet-tdt-0.6b-v3", "--mode", "buffered", "--out", str(out)]) == 0
    c = load_contract(out)
    assert [x["name"] for x in c["inputs"]] == ["audio_signal", "length"] and c["dims"]["F"] == 128
    assert c["optimization_profiles"][0]["max"]["audio_signal"] == [8, 128, (125 + 25 + 25) * 8]
    # v3 is not causal: cache-aware mode is refused (exit 2) unless asked to measure it
    assert cli(["contract", "--model", "random:parakeet-tdt-0.6b-v3", "--out", str(tmp_path / "x.json")]) == 2
    assert "not exact" in capsys.readouterr().err
    assert cli(["contract", "--model", "random:parakeet-tdt-0.6b-v3", "--att-context", "70,13", "--allow-inexact",
                "--out", str(tmp_path / "y.json")]) == 0
    y = load_contract(tmp_path / "y.json")
    assert not y["exact_streaming"] and y["dims"]["T_in"] == [105, 121] and y["dims"]["K"] == 4


# ----------------------------------------------------------------------------------------------- invariants
def test_engine_implements_protocol_and_correct_stream_passes(tiny, params):
    engine = TorchEncoderEngine(tiny, mode="stream", params=params)  # checks on by default
    assert isinstance(engine, EncoderEngine) and engine.checker is not None
    caches = initial_caches(params, 2)
    lens = []
    for audio, length in feature_chunks(params, 8, 2, seed=1):
        o = engine.step({"audio_signal": audio, "length": length, **caches})
        caches = {"cache_last_channel": o["cache_last_channel_next"], "cache_last_time": o["cache_last_time_next"],
                  "cache_last_channel_len": o["cache_last_channel_next_len"]}
        assert o["encoded_lengths"].tolist() == [4, 4]
        lens.append(int(o["cache_last_channel_next_len"][0]))
    # the cache is carried: it fills by 4 frames a chunk up to the left context (not the guide's "always 0")
    assert lens == [4, 8, 12, 16, 16, 16, 16, 16]


def _mutations(params):
    """(invariant, stage, mutate(inputs, outputs) -> (inputs, outputs), stream or None)."""
    C = params.last_channel_cache_size

    def put(d, k, v):
        d = dict(d)
        d[k] = v
        return d

    def row(t, b, value):
        t = t.clone()
        t[b] = value
        return t

    return [
        ("input_names", "in", lambda i, o: ({k: v for k, v in i.items() if k != "length"}, o), None),
        ("input_dtype", "in", lambda i, o: (put(i, "length", i["length"].int()), o), None),
        ("input_dtype", "in", lambda i, o: (put(i, "cache_last_time", i["cache_last_time"].double()), o), None),
        ("input_shape", "in", lambda i, o: (put(i, "audio_signal", i["audio_signal"][:, :, :-3]), o), None),
        ("input_shape", "in", lambda i, o: (put(i, "cache_last_channel", i["cache_last_channel"][:, :, 1:]), o), None),
        ("length_range", "in", lambda i, o: (put(i, "length", row(i["length"], 1, 99)), o), 1),
        ("cache_len_range", "in", lambda i, o: (put(i, "cache_last_channel_len",
                                                    row(i["cache_last_channel_len"], 1, C + 1)), o), 1),
        ("input_finite", "in", lambda i, o: (put(i, "cache_last_time", row(i["cache_last_time"], 1, float("nan"))),
                                             o), 1),
        ("output_names", "out", lambda i, o: (i, {k: v for k, v in o.items() if k != "cache_last_time_next"}), None),
        ("output_shape", "out", lambda i, o: (i, put(o, "encoder_output", o["encoder_output"][:, :, :3])), None),
        ("output_shape", "out", lambda i, o: (i, put(o, "cache_last_time_next", o["cache_last_time_next"][:, :1])),
         None),
        ("encoded_lengths", "out", lambda i, o: (i, put(o, "encoded_lengths", row(o["encoded_lengths"], 1, 1))), 1),
        # the guide's invariant "cache_last_channel_len_out == 0" is exactly what a carried cache must NOT do
        ("cache_len_update", "out", lambda i, o: (i, put(o, "cache_last_channel_next_len",
                                                         torch.zeros_like(o["cache_last_channel_next_len"]))), 0),
        ("cache_len_update", "out", lambda i, o: (i, put(o, "cache_last_channel_next_len",
                                                         row(o["cache_last_channel_next_len"], 1, C + 4))), 1),
        ("output_finite", "out", lambda i, o: (i, put(o, "encoder_output", row(o["encoder_output"], 1, float("inf")))),
         1),
    ]


def test_every_invariant_fires_on_a_broken_step(tiny, params):
    checker = ContractChecker(tiny.cfg.encoder, "stream", params)
    steps = _steps(tiny, params, 3)
    for k, (i, o) in enumerate(steps):  # the genuine steps pass
        checker.check_inputs(i, chunk=k)
        checker.check_outputs(i, o, chunk=k)
    fired = set()
    for invariant, stage, mutate, stream in _mutations(params):
        i, o = mutate(*steps[2])
        with pytest.raises(ContractViolation) as e:
            if stage == "in":
                checker.check_inputs(i, chunk=2)
            else:
                checker.check_outputs(i, o, chunk=2)
        assert e.value.invariant == invariant, (invariant, str(e.value))
        assert e.value.chunk == 2 and e.value.stream == stream, str(e.value)
        assert f"'{invariant}'" in str(e.value) and "chunk 2" in str(e.value)
        fired.add(invariant)
    assert fired == set(INVARIANTS)


def test_engine_raises_naming_chunk_and_stream(tiny, params):
    engine = TorchEncoderEngine(tiny, mode="stream", params=params)
    caches = initial_caches(params, 3)
    chunks = list(feature_chunks(params, 3, 3, seed=2))
    for audio, length in chunks[:2]:
        o = engine.step({"audio_signal": audio, "length": length, **caches})
        caches = {"cache_last_channel": o["cache_last_channel_next"], "cache_last_time": o["cache_last_time_next"],
                  "cache_last_channel_len": o["cache_last_channel_next_len"]}
    caches["cache_last_channel"] = caches["cache_last_channel"].clone()
    caches["cache_last_channel"][2, 1, 0, 0] = float("nan")
    with pytest.raises(ContractViolation, match=r"'input_finite' violated at chunk 2, stream 2"):
        engine.step({"audio_signal": chunks[2][0], "length": chunks[2][1], **caches})
    # window mode: encoded_lengths and shapes
    window = TorchEncoderEngine(tiny, mode="window")
    feats = torch.randn(2, 80, 100)
    out = window.step({"audio_signal": feats, "length": torch.tensor([100, 57])})
    assert out["encoded_lengths"].tolist() == [14, 8]  # causal dw_striding: 100 -> 51 -> 26 -> 14
    with pytest.raises(ContractViolation, match="length_range"):
        window.step({"audio_signal": feats, "length": torch.tensor([100, 101])})


def test_contract_built_from_file_checks_like_the_engine(tiny, params, tmp_path):
    """Other engines (onnxruntime, tensorrt) check against the JSON alone."""
    c = build_contract(tiny.cfg.encoder, "cache-aware", params)
    checker = ContractChecker.from_contract(json.loads(json.dumps(c)))
    (i, o), = _steps(tiny, params, 1)
    checker.check_inputs(i, chunk=0)
    checker.check_outputs(i, o, chunk=0)
    bad = dict(o, encoded_lengths=o["encoded_lengths"] + 1)
    with pytest.raises(ContractViolation, match="encoded_lengths"):
        checker.check_outputs(i, bad, chunk=0)
