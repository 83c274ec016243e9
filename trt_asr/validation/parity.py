"""Streaming parity of an encoder engine against a reference stream (``trt_asr.validation.reference``).

    functional:   every chunk gets the *reference* caches -> isolates one step's error
    closed_loop:  the engine's own caches are carried chunk to chunk -> what a deployment does; error that
                  accumulates through the caches shows up here (and in the stability trend)

The summary reports, per output, max / mean / p95 / p99 of the per-chunk max abs and relative error, the pass rate
at the tolerance, the contract pass rate (every step checked against the reference's contract), greedy-token
agreement (engine outputs decoded with their own carried decoder state vs the reference tokens), and the error
trend (least-squares slope per chunk, 95 % CI). Gates fail the run; on the first failing chunk, a per-layer
breakdown of the next caches names the first layer / cache where the error appears (cache_last_channel of layer l
is layer l's attention input, cache_last_time its convolution input, so the order is l.channel < l.time < l+1...).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
import torch

from ..streaming.contract import ContractChecker, ContractViolation
from .reference import CACHE_NAMES, _next
from .stability import error_trend

TREND_OUTPUTS = ("encoder_output", "cache_last_channel_next", "cache_last_time_next")  # trend: max over these


@dataclass
class Gates:
    atol: float = 1e-5
    rtol: float = 0.0
    min_pass_rate: float = 1.0
    min_contract_pass_rate: float = 1.0
    min_token_agreement: float = 1.0
    max_growth: float | None = None  # error growth over the run (95 % upper bound); default: atol


# ----------------------------------------------------------------------------------------------- engines
class PerturbedEngine:
    """Wraps an engine and breaks it on purpose, to prove the harness can fail:
    ``noise:<output>:<sigma>`` adds N(0, sigma^2) to one output; ``scale:<output>:<factor>`` scales it."""

    def __init__(self, engine, kind: str, target: str, amount: float, seed: int = 0):
        self.inner, self.kind, self.target, self.amount = engine, kind, target, amount
        self.name = f"{engine.name}+{kind}:{target}:{amount:g}"
        self.mode, self.precision, self.device = engine.mode, engine.precision, engine.device
        self.gen = torch.Generator().manual_seed(seed)

    def step(self, inputs):
        out = dict(self.inner.step(inputs))
        t = out[self.target]
        if self.kind == "noise":
            out[self.target] = t + self.amount * torch.randn(t.shape, generator=self.gen).to(t)
        elif self.kind == "scale":
            out[self.target] = t * self.amount
        else:
            raise ValueError(f"unknown perturbation {self.kind!r}")
        return out


def perturb_weight(model, name: str, sigma: float, seed: int = 0):
    """A deep copy of ``model`` with N(0, sigma^2) added to the encoder parameter ``name`` (a "wrong weight")."""
    import copy

    bad = copy.deepcopy(model)
    p = dict(bad.encoder.named_parameters())[name]
    with torch.no_grad():
        p.add_(sigma * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return bad


def make_engine(spec: str, model, params, check: bool = False, mode: str = "stream"):
    """Engine from a spec:
      torch | torch-cuda | onnxruntime | tensorrt [:fp32|fp16|bf16]   through ``trt_asr.engines.create_engine``
                                              (onnxruntime exports the model to a temporary directory first)
      <module>:<Class>                        any EncoderEngine class taking (model, mode='stream', params=...)
      <spec>+noise:<output>:<sigma>           perturbed on purpose (harness self-test); also +scale:<output>:<f>
      <spec>+weight:<param>:<sigma>           with one encoder weight perturbed
    ``check`` turns on the engine's own contract checks (the harness checks independently anyway)."""
    from ..engines import ENGINES, _ALIASES, create_engine

    base, *perturbs = spec.split("+")
    weight_perturbs = [p for p in perturbs if p.startswith("weight:")]
    for wp in weight_perturbs:
        _, pname, sigma = wp.split(":")
        model = perturb_weight(model, pname, float(sigma))
    name, _, precision = base.partition(":")
    if name.lower() in ENGINES or name.lower() in _ALIASES:
        kwargs = {"check": check} if name == "torch" else {}
        device = "cuda" if name.startswith("torch-cuda") and torch.cuda.is_available() else None
        engine = create_engine(name, model, mode, precision or "fp32", device, params=params, **kwargs)
    elif precision:
        engine = getattr(importlib.import_module(name), precision)(model, mode=mode, params=params)
    else:
        raise ValueError(f"unknown engine spec {spec!r}")
    if weight_perturbs:
        engine.name = f"{engine.name}+" + "+".join(weight_perturbs)
    for p in perturbs:
        if p.startswith("weight:"):
            continue
        kind, target, amount = p.split(":")
        engine = PerturbedEngine(engine, kind, target, float(amount))
    return engine


# ----------------------------------------------------------------------------------------------- parity
def _err(a: torch.Tensor, r: torch.Tensor) -> tuple[float, float, float]:
    """(max abs, mean abs, relative = max abs / max |ref|) of one output; shape mismatch -> inf."""
    if a is None or tuple(a.shape) != tuple(r.shape):
        return float("inf"), float("inf"), float("inf")
    d = (a.detach().to("cpu", torch.float64) - r.to(torch.float64)).abs()
    if d.numel() == 0:
        return 0.0, 0.0, 0.0
    m = float(d.max())
    scale = float(r.to(torch.float64).abs().max())
    return m, float(d.mean()), m / scale if scale > 0 else (0.0 if m == 0 else float("inf"))


def layer_breakdown(out: dict, ref: dict, atol: float) -> dict:
    """Per-layer max abs error of the next caches, and the first (layer, cache) over ``atol``."""
    rows, first = [], None
    for name in ("cache_last_channel_next", "cache_last_time_next"):
        if tuple(out[name].shape) != tuple(ref[name].shape):
            return {"error": f"{name} shape {list(out[name].shape)} != {list(ref[name].shape)}"}
    n_layers = ref["cache_last_channel_next"].shape[1]
    for layer in range(n_layers):
        for name in ("cache_last_channel_next", "cache_last_time_next"):
            e = float((out[name][:, layer].cpu().double() - ref[name][:, layer].double()).abs().max())
            rows.append({"layer": layer, "cache": name, "max_abs": e})
            if first is None and e > atol:
                first = {"layer": layer, "cache": name, "max_abs": e}
    return {"layers": rows, "first_over_tolerance": first}


def _stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {}
    return {"max": float(v.max()), "mean": float(v.mean()), "p95": float(np.percentile(v, 95)),
            "p99": float(np.percentile(v, 99))}


@torch.no_grad()
def run_parity(engine, reference, mode: str = "closed_loop", gates: Gates | None = None, model=None,
               progress=None, keep_per_chunk: bool = True) -> dict:
    """Compare ``engine`` with ``reference`` (a ``LiveReference`` or ``DiskReference``). ``model`` (optional)
    decodes the engine's outputs for token agreement. Returns the summary dict (``summary["passed"]``)."""
    if mode not in ("functional", "closed_loop"):
        raise ValueError("mode must be 'functional' or 'closed_loop'")
    gates = gates or Gates()
    checker = ContractChecker.from_contract(reference.contract)
    device = getattr(engine, "device", torch.device("cpu"))
    decoder = model.greedy_decoder() if model is not None else None
    dec_state = None
    stream = reference.contract["step"] == "stream"  # window (buffered) steps carry nothing: both modes agree
    output_names = [x["name"] for x in reference.contract["outputs"]]
    trend_outputs = [o for o in TREND_OUTPUTS if o in output_names]
    per = {n: {"max_abs": [], "mean_abs": [], "rel": []} for n in output_names}
    passed_chunks, contract_ok, violations = 0, 0, []
    tok_equal, tok_compared, first_tok_mismatch = 0, 0, None
    first_failure, caches, n = None, None, 0
    aborted = None
    for chunk in reference:
        k = chunk.index
        n += 1
        if mode == "functional" or caches is None or not stream:
            inputs = {name: t.clone() for name, t in chunk.inputs.items()}
        else:
            inputs = {"audio_signal": chunk.inputs["audio_signal"].clone(), "length": chunk.inputs["length"].clone(),
                      **caches}
        inputs = {name: t.to(device) for name, t in inputs.items()}
        ok = True
        try:
            checker.check_inputs(inputs, chunk=k)
        except ContractViolation as e:
            ok = False
            violations.append(str(e))
        try:
            out = engine.step(inputs)
        except ContractViolation as e:  # the engine's own checks
            violations.append(str(e))
            aborted = f"chunk {k}: engine raised {e}"
            break
        try:
            checker.check_outputs(inputs, out, chunk=k)
        except ContractViolation as e:
            ok = False
            violations.append(str(e))
        contract_ok += ok
        chunk_pass = True
        errs = {}
        for name in output_names:
            ref_t = chunk.outputs[name]
            m, mean, rel = _err(out.get(name), ref_t)
            per[name]["max_abs"].append(m)
            per[name]["mean_abs"].append(mean)
            per[name]["rel"].append(rel)
            scale = float(ref_t.abs().max()) if ref_t.numel() else 0.0
            good = m <= gates.atol + gates.rtol * scale
            chunk_pass &= good
            errs[name] = m
        passed_chunks += chunk_pass
        if not chunk_pass and first_failure is None:
            first_failure = {"chunk": k, "max_abs": errs,
                             "breakdown": layer_breakdown(out, chunk.outputs, gates.atol) if stream else None}
        if decoder is not None and chunk.tokens is not None:
            toks, dec_state = decoder(out["encoder_output"].to("cpu", torch.float32),
                                      out["encoded_lengths"].to("cpu"), dec_state if stream else None)
            mine = [[tuple(t) for t in s] for s in toks.to_lists()]
            ref_toks = [[tuple(t) for t in s] for s in chunk.tokens]
            tok_compared += 1
            if mine == ref_toks:
                tok_equal += 1
            elif first_tok_mismatch is None:
                first_tok_mismatch = k
        if stream:
            caches = {name: out[_next(name)].detach().clone() for name in CACHE_NAMES}
        if progress:
            progress(k)

    summary = {
        "engine": getattr(engine, "name", type(engine).__name__),
        "precision": getattr(engine, "precision", ""),
        "mode": mode,
        "chunks": n,
        "batch": getattr(reference, "batch", None),
        "reference_model": getattr(reference, "model_spec", ""),
        "contract_sha256": reference.contract.get("sha256"),
        "tolerance": {"atol": gates.atol, "rtol": gates.rtol},
        "outputs": {name: {"max_abs": _stats(v["max_abs"]), "mean_abs": _stats(v["mean_abs"]),
                           "rel": _stats(v["rel"])} for name, v in per.items()},
        "pass_rate": passed_chunks / n if n else 0.0,
        "contract_pass_rate": contract_ok / n if n else 0.0,
        "contract_violations": violations[:20],
        "token_agreement": ({"chunks_equal_rate": tok_equal / tok_compared if tok_compared else 1.0,
                             "chunks_compared": tok_compared, "first_mismatch_chunk": first_tok_mismatch}
                            if decoder is not None else None),
        "trend": {"metric": "max abs error per chunk over " + ", ".join(trend_outputs),
                  **error_trend(np.max([per[o]["max_abs"] for o in trend_outputs], axis=0) if n else [])},
        "first_failure": first_failure,
        "aborted": aborted,
    }
    max_growth = gates.max_growth if gates.max_growth is not None else gates.atol
    g = {
        "pass_rate": (summary["pass_rate"], gates.min_pass_rate, summary["pass_rate"] >= gates.min_pass_rate),
        "contract_pass_rate": (summary["contract_pass_rate"], gates.min_contract_pass_rate,
                               summary["contract_pass_rate"] >= gates.min_contract_pass_rate),
        "error_growth_ci95_hi": (summary["trend"]["growth_ci95_hi"], max_growth,
                                 summary["trend"]["growth_ci95_hi"] <= max_growth),
        "completed": (n, len(reference), aborted is None and n == len(reference)),
    }
    if summary["token_agreement"] is not None:
        rate = summary["token_agreement"]["chunks_equal_rate"]
        g["token_agreement"] = (rate, gates.min_token_agreement, rate >= gates.min_token_agreement)
    summary["gates"] = {k: {"value": v, "threshold": t, "passed": bool(p)} for k, (v, t, p) in g.items()}
    summary["passed"] = all(x["passed"] for x in summary["gates"].values())
    if keep_per_chunk:
        summary["per_chunk"] = {f"{name}_max_abs": v["max_abs"] for name, v in per.items()}
        summary["per_chunk"]["trend_metric"] = (np.max([per[o]["max_abs"] for o in trend_outputs], axis=0).tolist()
                                                if n else [])
    return summary


def format_summary(s: dict) -> str:
    lines = [f"parity {s['engine']} ({s['precision']}) vs reference {s['reference_model']}: {s['mode']}, "
             f"{s['chunks']} chunks, atol {s['tolerance']['atol']:g}"]
    for name, st in s["outputs"].items():
        a, r = st["max_abs"], st["rel"]
        if a:
            lines.append(f"  {name:30s} max {a['max']:.3e}  mean {a['mean']:.3e}  p95 {a['p95']:.3e}  "
                         f"p99 {a['p99']:.3e}  rel max {r['max']:.3e}")
    t = s["trend"]
    lines.append(f"  trend ({t['metric']}): slope {t['slope']:.3e}/chunk, 95% CI [{t['slope_ci95'][0]:.3e}, "
                 f"{t['slope_ci95'][1]:.3e}], growth over run <= {t['growth_ci95_hi']:.3e}")
    for name, gt in s["gates"].items():
        lines.append(f"  gate {name:22s} {'PASS' if gt['passed'] else 'FAIL'}  value {gt['value']}  "
                     f"threshold {gt['threshold']}")
    if s.get("first_failure"):
        ff = s["first_failure"]
        first = (ff.get("breakdown") or {}).get("first_over_tolerance")
        lines.append(f"  first failing chunk {ff['chunk']}: " + ", ".join(f"{k} {v:.2e}" for k, v in
                                                                        ff["max_abs"].items()))
        if first:
            lines.append(f"  error first appears in layer {first['layer']} {first['cache']} "
                         f"(max abs {first['max_abs']:.3e})")
        elif "layers" in (ff.get("breakdown") or {}):
            lines.append("  every layer's next caches are within tolerance: the error appears after the last "
                         "cache (last layer's attention/feed-forward or the output)")
    for v in s["contract_violations"][:3]:
        lines.append(f"  contract: {v}")
    if s.get("aborted"):
        lines.append(f"  aborted: {s['aborted']}")
    lines.append("PASSED" if s["passed"] else "FAILED")
    return "\n".join(lines)
