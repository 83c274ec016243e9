"""GPU: buffered decode_loop (CUDA graphs) == batched decoder, tokens and events, v3 dims random fp16 + tiny fp32."""
import torch, numpy as np, sys
from trt_asr.checkpoint import load_model
from trt_asr.streaming import Recognizer
from trt_asr.cli.bench import with_engine

def events(model, auds, **kw):
    rec = Recognizer(model, "buffered", max_batch=8, **kw)
    ss = [rec.open() for _ in auds]
    out = [[] for _ in auds]
    for pos in range(0, max(len(a) for a in auds) + 16000, 4000):
        for s, a in zip(ss, auds):
            if pos < len(a):
                s.feed(a[pos:pos + 4000], step=False)
            elif not s.finished:
                s.finish(step=False)
        rec.run()
        for s, o in zip(ss, out):
            o += [([(t.id, t.frame) for t in e.committed], [(t.id, t.frame) for t in e.tentative], e.final) for e in s.poll()]
    return out, rec.mode

rng = np.random.default_rng(0)
for name, dtype, ctx, fixed in [("random:tiny", "fp32", dict(left_secs=0.8, chunk_secs=0.4, right_secs=0.32), None),
                                ("random:parakeet-tdt-0.6b-v3", "fp16", dict(left_secs=4, chunk_secs=1, right_secs=1), 8)]:
    model = load_model(name, device="cuda", dtype=dtype)
    auds = [(rng.standard_normal(n) * 0.05).astype(np.float32) for n in (16000 * 7 + 333, 16000 * 5, 9000, 16000 * 9)]
    kw = dict(ctx, fixed_batch=fixed)
    if dtype != "fp32":
        kw = with_engine(model, "buffered", kw, "torch-cuda")
    ref, m0 = events(model, auds, decode_loop=False, **kw)
    got, m1 = events(model, auds, decode_loop=True, **kw)
    ntok = sum(len(c) for o in ref for c, _, _ in o)
    print(name, dtype, "loop==decoder:", got == ref, "committed tokens", ntok, "loops", sorted(m1._loops)[:6], flush=True)
    if got != ref:
        sys.exit(1)
