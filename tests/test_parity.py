"""The parity / stability harness: the torch engine passes closed-loop parity against an independent reference
(NeMo's cache_aware_stream_step, same weights) over 1,000 chunks, through the CLIs and the on-disk format; and the
gates FAIL when the engine is broken on purpose (noisy cache, wrong weight, slow drift), naming where."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trt_asr.checkpoint import load_model
from trt_asr.cli import main as cli
from trt_asr.streaming.cache_aware import CacheAwareParams
from trt_asr.validation.parity import Gates, make_engine, run_parity
from trt_asr.validation.reference import DiskReference, LiveReference, write_reference
from trt_asr.validation.stability import error_trend

MODEL = "random:tiny-cache-aware"


@pytest.fixture(scope="module")
def tiny():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def params(tiny):
    return CacheAwareParams.for_encoder(tiny.cfg.encoder)


@pytest.fixture(scope="module")
def torch_ref(tiny, params, tmp_path_factory):
    """A 60-chunk, 2-stream reference written by the fp32 torch engine (for the failure tests)."""
    d = tmp_path_factory.mktemp("ref_torch")
    write_reference(LiveReference(tiny, params, 60, batch=2, seed=5, model_spec=MODEL), d, chunks_per_shard=25)
    return d


# ----------------------------------------------------------------------------------------------- passing
@pytest.mark.nemo
def test_closed_loop_1000_chunks_vs_nemo_reference_cli(tmp_path):
    pytest.importorskip("nemo.collections.asr")
    ref = tmp_path / "ref"
    assert cli(["reference", "--model", MODEL, "--chunks", "1000", "--seed", "11", "--reference-engine", "nemo",
                "--chunks-per-shard", "400", "--out", str(ref)]) == 0
    index = json.loads((ref / "index.json").read_text())
    assert index["chunks"] == 1000 and len(index["shards"]) == 3 and index["reference_engine"] == "nemo"
    summary_path, plot = tmp_path / "s.json", tmp_path / "p.png"
    rc = cli(["parity", "--engine", "torch", "--ref", str(ref), "--mode", "closed_loop", "--tol", "1e-5",
              "--summary-json", str(summary_path), "--plot", str(plot)])
    s = json.loads(summary_path.read_text())
    assert rc == 0 and s["passed"], s["gates"]
    assert s["chunks"] == 1000 and s["pass_rate"] == 1.0 and s["contract_pass_rate"] == 1.0
    assert s["outputs"]["encoder_output"]["max_abs"]["max"] <= 1e-5
    assert s["outputs"]["cache_last_channel_next"]["max_abs"]["p99"] <= 1e-5
    assert s["token_agreement"]["chunks_equal_rate"] == 1.0
    lo, hi = s["trend"]["slope_ci95"]
    assert s["trend"]["growth_ci95_hi"] <= 1e-5 and lo <= s["trend"]["slope"] <= hi
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_functional_and_disk_round_trip(tiny, params, torch_ref):
    """The disk format gives back exactly what the live reference computes (same engine: zero error)."""
    disk = DiskReference(torch_ref)
    live = LiveReference(tiny, params, 60, batch=2, seed=5)
    for a, b in zip(disk, live):
        for name in ("audio_signal", "length", "cache_last_channel", "cache_last_time", "cache_last_channel_len"):
            assert torch.equal(a.inputs[name], b.inputs[name]), (a.index, name)
        for name, t in b.outputs.items():
            assert torch.equal(a.outputs[name], t)
        assert a.tokens == [[tuple(x) for x in s] for s in b.tokens]
    s = run_parity(make_engine("torch", tiny, params), disk, "functional", model=tiny)
    assert s["passed"] and s["outputs"]["encoder_output"]["max_abs"]["max"] == 0.0


# ----------------------------------------------------------------------------------------------- failing
def test_noisy_cache_fails_and_names_the_cache(torch_ref, tmp_path):
    out = tmp_path / "s.json"
    rc = cli(["parity", "--engine", "torch+noise:cache_last_time_next:1e-4", "--ref", str(torch_ref),
              "--mode", "functional", "--summary-json", str(out)])
    s = json.loads(out.read_text())
    assert rc == 1 and not s["passed"]
    assert not s["gates"]["pass_rate"]["passed"] and s["pass_rate"] == 0.0
    assert s["gates"]["contract_pass_rate"]["passed"]  # shapes and lengths are still right
    first = s["first_failure"]["breakdown"]["first_over_tolerance"]
    assert first["layer"] == 0 and first["cache"] == "cache_last_time_next"
    # functional: the reference caches go in, so the noise never reaches encoder_output
    assert s["outputs"]["encoder_output"]["max_abs"]["max"] == 0.0


def test_closed_loop_propagates_a_cache_error_that_functional_hides(tiny, params, torch_ref):
    ref = DiskReference(torch_ref)
    engine = make_engine("torch+noise:cache_last_channel_next:1e-4", tiny, params)
    func = run_parity(engine, ref, "functional")
    closed = run_parity(make_engine("torch+noise:cache_last_channel_next:1e-4", tiny, params), ref, "closed_loop")
    assert func["outputs"]["encoder_output"]["max_abs"]["max"] == 0.0
    assert closed["outputs"]["encoder_output"]["max_abs"]["max"] > 1e-5  # carried into the next chunks' output
    assert not closed["passed"] and not func["passed"]


def test_wrong_weight_fails_and_names_the_first_layer(tiny, params, torch_ref, tmp_path):
    out = tmp_path / "s.json"
    rc = cli(["parity", "--engine", "torch+weight:layers.1.feed_forward1.linear1.weight:1e-2", "--ref",
              str(torch_ref), "--mode", "closed_loop", "--summary-json", str(out)])
    s = json.loads(out.read_text())
    assert rc == 1 and not s["passed"]
    first = s["first_failure"]["breakdown"]["first_over_tolerance"]
    # layer 1's first feed-forward feeds its attention input = layer 1's cache_last_channel; layer 0 is clean
    assert first == {**first, "layer": 1, "cache": "cache_last_channel_next"}
    layer0 = [r for r in s["first_failure"]["breakdown"]["layers"] if r["layer"] == 0]
    assert all(r["max_abs"] == 0.0 for r in layer0)


def test_contract_violation_counts_and_token_gate(tiny, params, torch_ref):
    class ZeroCacheLen:  # the guide's bug: the cache length never grows (cache not carried)
        def __init__(self, inner):
            self.inner, self.name, self.mode = inner, "zero-cache-len", "stream"
            self.precision, self.device = "fp32", torch.device("cpu")

        def step(self, inputs):
            o = dict(self.inner.step(inputs))
            o["cache_last_channel_next_len"] = torch.zeros_like(o["cache_last_channel_next_len"])
            return o

    s = run_parity(ZeroCacheLen(make_engine("torch", tiny, params)), DiskReference(torch_ref), "closed_loop",
                   model=tiny)
    assert s["contract_pass_rate"] == 0.0 and not s["gates"]["contract_pass_rate"]["passed"]
    assert "cache_len_update" in s["contract_violations"][0]
    # ... and the attention then ignores its cache: the outputs and, eventually, the tokens differ
    assert s["outputs"]["encoder_output"]["max_abs"]["max"] > 1e-3 and not s["passed"]


def test_slow_drift_fails_the_trend_gate_even_within_tolerance(tiny, params, torch_ref):
    class Drift:
        def __init__(self, inner):
            self.inner, self.name, self.mode, self.k = inner, "drift", "stream", 0
            self.precision, self.device = "fp32", torch.device("cpu")

        def step(self, inputs):
            o = dict(self.inner.step(inputs))
            o["encoder_output"] = o["encoder_output"] + 1e-7 * self.k  # 6e-6 after 60 chunks: under 1e-5
            self.k += 1
            return o

    gates = Gates(atol=1e-5, max_growth=1e-6)
    s = run_parity(Drift(make_engine("torch", tiny, params)), DiskReference(torch_ref), "functional", gates)
    assert s["pass_rate"] == 1.0 and s["gates"]["pass_rate"]["passed"]
    assert not s["gates"]["error_growth_ci95_hi"]["passed"] and not s["passed"]
    assert s["trend"]["slope_ci95"][0] <= 1e-7 <= s["trend"]["slope_ci95"][1]


def test_error_trend_recovers_a_known_slope():
    rng = np.random.default_rng(0)
    x = np.arange(500)
    t = error_trend(1e-6 + 2e-9 * x + 1e-8 * rng.standard_normal(500))
    assert t["slope_ci95"][0] < 2e-9 < t["slope_ci95"][1] and abs(t["slope"] - 2e-9) < 3e-10
    flat = error_trend(1e-6 + 1e-8 * rng.standard_normal(500))
    assert abs(flat["slope"]) < 3e-11 and flat["growth_ci95_hi"] < 3e-8  # no trend: growth within the noise


def test_buffered_windows_reference_and_parity(tmp_path):
    """Buffered mode: independent windows through the window step (no caches); the same gates apply."""
    ref = tmp_path / "refw"
    assert cli(["reference", "--model", MODEL, "--mode", "buffered", "--chunks", "5", "--batch", "2",
                "--window-frames", "240", "--out", str(ref)]) == 0
    index = json.loads((ref / "index.json").read_text())
    assert index["mode"] == "buffered" and index["contract"]["step"] == "window"
    ok = tmp_path / "ok.json"
    assert cli(["parity", "--engine", "torch", "--ref", str(ref), "--summary-json", str(ok)]) == 0
    assert set(json.loads(ok.read_text())["outputs"]) == {"encoder_output", "encoded_lengths"}
    bad = tmp_path / "bad.json"
    assert cli(["parity", "--engine", "torch+weight:layers.0.conv.depthwise_conv.weight:1e-3", "--ref", str(ref),
                "--summary-json", str(bad)]) == 1
    assert not json.loads(bad.read_text())["gates"]["pass_rate"]["passed"]
