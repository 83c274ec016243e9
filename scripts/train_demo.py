#!/usr/bin/env python3
"""Train the two shipped demo models (``demo-tdt-buffered`` and ``demo-tdt-cache-aware``) on synthetic espeak-ng
speech. Seeded and resumable; built for 10-minute commands on one GPU (both variants train at once, as two processes
sharing the GPU and one synthesized data set).

Sub-commands:
  all     synthesize the call's training data, train both variants for --minutes, write a bundle to --out
  synth   only synthesize (to --data)
  train   one variant on synthesized data (what ``all`` starts twice)
  unpack  join a bundle's parts (bundle.tar.partN) into a run folder
  export  run folder -> trt_asr/assets/demo-tdt-*.nemo (fp32), docs/demo-model-training.png
  plot    only the PNG

The recipe of 2026-11-24 (four device commands of ~9 minutes, 36 minutes in all; runs/ persists on a warm
machine, or carry the returned weights back as bf16 for a resume; espeak-ng via TRT_ASR_ESPEAK):
  # 1) buffered from scratch (24 000 utterances)                  -> step 2818, val WER 2.86 %
  python scripts/train_demo.py all --variants buffered --seed 1 --call 0 --minutes 7.7 --anneal-minutes 2 \
      --batch-seconds 500 --n-train 24000 --run runs/repro/leg1 --out $OUT/leg1
  # 2) cache-aware warm-started from 1)'s buffered weights         -> step 2839, val 4.17 %
  python scripts/train_demo.py all --variants cache-aware --seed 1 --call 1 --resume runs/repro/leg1 \
      --init-from runs/repro/leg1/buffered.pt --minutes 7.7 --anneal-minutes 2 --batch-seconds 500 \
      --n-train 24000 --run runs/repro/leg2 --out $OUT/leg2
  # 3) cache-aware resumed (fresh data)                             -> step 5090, val 2.20 % (shipped)
  python scripts/train_demo.py all --variants cache-aware --seed 1 --call 2 --resume runs/repro/leg2 \
      --minutes 7.7 --anneal-minutes 2 --batch-seconds 500 --n-train 24000 --run runs/repro/leg3 --out $OUT/leg3
  # 4) buffered resumed from 1) with composites (window-like examples of 2-4 utterances) -> step 4371, val 2.20 %
  #    (shipped; the one that streams long recordings with 0 words dropped at seams)
  python scripts/train_demo.py all --variants buffered --seed 1 --call 3 --resume runs/repro/leg1 --minutes 7.6 \
      --anneal-minutes 2 --batch-seconds 500 --n-train 24000 --composites 0.4 --run runs/repro/leg1b --out $OUT/leg1b
  # here: unpack each bundle, then export (writes trt_asr/assets/*.nemo with fp16 parameters + the PNG)
  python scripts/train_demo.py unpack --parts <returned folder> --into runs/repro/legN
Call k synthesizes a fresh training set (seed 100 * seed + k), so later calls see new sentences and voices.
docs/demo-model.md says which shipped file came from which run.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trt_asr.training.configs import CACHE_AWARE_CONTEXTS, VARIANTS, demo_config  # noqa: E402
from trt_asr.training.data import (SAMPLE_RATE, assemble_example, compose_examples, heldout_audio,  # noqa: E402
                                   heldout_utterances, make_utterances, synthesize_all)
from trt_asr.training.text import SentenceGenerator  # noqa: E402

DURATIONS = [0, 1, 2, 3, 4]


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def test_sentences() -> set[str]:
    return {u.text for u in heldout_utterances()}


# ------------------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(path: Path, seed: int, vocab_size: int = 256, n: int = 30000) -> None:
    import sentencepiece as spm
    text = SentenceGenerator(seed + 12345).sentences(n)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", character_coverage=1.0, num_threads=1, minloglevel=2,
                                   bos_id=-1, eos_id=-1, unk_id=0, seed_sentencepiece_size=100000)
    path.write_bytes(buf.getvalue())


# ------------------------------------------------------------------------------------------------ synthesis
def synth(data: Path, seed: int, call: int, n_train: int, workers: int) -> None:
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    utts = make_utterances(seed * 100 + call, n_train, exclude=test_sentences())
    audio = synthesize_all(utts, workers)
    lens = np.array([len(a) for a in audio], dtype=np.int64)
    flat = np.concatenate([np.clip(a * 32767, -32768, 32767).astype(np.int16) for a in audio])
    np.save(data / "audio.npy", flat)
    np.save(data / "lengths.npy", lens)
    (data / "texts.json").write_text(json.dumps([u.text for u in utts]))
    tu = heldout_utterances()
    ta = heldout_audio(tu, synthesize_all(tu, workers))
    np.save(data / "val_audio.npy", np.concatenate(ta).astype(np.float32))
    np.save(data / "val_lengths.npy", np.array([len(a) for a in ta], dtype=np.int64))
    (data / "val_texts.json").write_text(json.dumps([u.text for u in tu]))
    log(f"synthesized {len(utts)} train utterances ({lens.sum() / SAMPLE_RATE / 3600:.2f} h) + {len(tu)} val "
        f"in {time.time() - t0:.0f} s with {workers} workers")


# ------------------------------------------------------------------------------------------------ training
class Batches:
    """Length-bucketed batches of at most `batch_seconds` of padded audio, reshuffled every epoch (seeded)."""

    def __init__(self, lengths: np.ndarray, batch_seconds: float, seed: int, max_batch: int = 512):
        self.lengths, self.seed = lengths, seed
        order = np.argsort(lengths, kind="stable")
        self.batches, cur = [], []
        for i in order:
            if cur and (len(cur) + 1) * lengths[i] / SAMPLE_RATE > batch_seconds or len(cur) >= max_batch:
                self.batches.append(cur)
                cur = []
            cur.append(int(i))
        if cur:
            self.batches.append(cur)

    def __iter__(self):
        epoch = 0
        while True:
            rng = random.Random(self.seed * 1000 + epoch)
            order = list(range(len(self.batches)))
            rng.shuffle(order)
            for b in order:
                yield epoch, self.batches[b]
            epoch += 1


def gpu_augment(x: torch.Tensor, lens: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random gain (-25..+6 dB), additive white or low-passed noise at 6-40 dB SNR (80 % of utterances)."""
    b, n = x.shape
    dev = x.device
    valid = torch.arange(n, device=dev)[None, :] < lens[:, None]
    power = (x ** 2).sum(1) / lens.clamp(min=1)
    noise = torch.randn(b, n, device=dev, generator=gen)
    if torch.rand((), generator=gen, device=dev) < 0.5:  # low-passed (pinkish) noise for the whole batch
        k = 0.9 ** torch.arange(48, device=dev, dtype=x.dtype)
        noise = torch.nn.functional.conv1d(noise[:, None], k.flip(0)[None, None], padding=47)[:, 0, :n]
    snr_db = 6 + 34 * torch.rand(b, device=dev, generator=gen)
    use = (torch.rand(b, device=dev, generator=gen) < 0.8).float()
    scale = torch.sqrt(power / 10 ** (snr_db / 10) / (noise ** 2).mean(1).clamp(min=1e-9)) * use
    x = x + noise * scale[:, None]
    gain = 10 ** ((-25 + 31 * torch.rand(b, device=dev, generator=gen)) / 20)
    return (x * gain[:, None]).clamp(-1, 1) * valid


def spec_augment(f: torch.Tensor, flen: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """2 frequency masks (<= 12 bands) and time masks (<= 5 % of the length, one per ~1.5 s)."""
    b, nf, nt = f.shape
    dev = f.device
    fill = f.sum(-1, keepdim=True) / flen.clamp(min=1)[:, None, None]
    mask = torch.zeros(b, nf, nt, dtype=torch.bool, device=dev)
    fi = torch.arange(nf, device=dev)[None, :]
    for _ in range(2):
        w = torch.randint(0, 13, (b, 1), device=dev, generator=gen)
        s = (torch.rand(b, 1, device=dev, generator=gen) * (nf - w)).long()
        mask |= ((fi >= s) & (fi < s + w))[:, :, None]
    ti = torch.arange(nt, device=dev)[None, :]
    for _ in range(max(1, nt // 150)):
        w = (torch.rand(b, 1, device=dev, generator=gen) * 0.05 * flen[:, None]).long()
        s = (torch.rand(b, 1, device=dev, generator=gen) * (flen[:, None] - w).clamp(min=1)).long()
        mask |= ((ti >= s) & (ti < s + w))[:, None, :]
    return torch.where(mask, fill, f)


def lr_at(step: int, peak: float, warmup: int) -> float:
    step = max(step, 1)
    return peak * min(step / warmup, math.sqrt(warmup / step))


class _Trainee:
    """One variant's model, optimiser and history."""

    def __init__(self, variant, tok, args, dev):
        from trt_asr.model.asr import TransducerModel
        self.variant = variant
        self.model = TransducerModel(demo_config(variant, tok.vocab_size, **json.loads(args.model_kwargs or "{}")))
        self.model.tokenizer = tok
        self.history, self.step = [], 0
        if args.resume and (Path(args.resume) / f"{variant}.pt").is_file():
            ck = torch.load(Path(args.resume) / f"{variant}.pt", map_location="cpu", weights_only=False)
            self.model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["state"].items()})
            self.history, self.step = ck["history"], ck["step"]
            log(f"[{variant}] resumed at step {self.step}")
        elif variant == "cache-aware" and args.init_from:
            # warm start from a trained buffered model: every parameter has the same shape; only the conv padding,
            # the attention mask and the feature normalisation differ
            ck = torch.load(args.init_from, map_location="cpu", weights_only=False)
            state = {k: v.float() if v.is_floating_point() else v for k, v in ck["state"].items()}
            key = "encoder.pre_encode.out.weight"  # causal subsampling keeps one more frequency bin per channel
            own = self.model.state_dict()[key]
            if state[key].shape != own.shape:
                ch = self.model.cfg.encoder.subsampling_conv_channels
                f_old, f_new = state[key].shape[1] // ch, own.shape[1] // ch
                w = torch.zeros(own.shape[0], ch, f_new)
                w[:, :, : min(f_old, f_new)] = state[key].view(-1, ch, f_old)[:, :, : min(f_old, f_new)]
                state[key] = w.reshape(own.shape)
            self.model.load_state_dict(state)
            log(f"[{variant}] initialised from {args.init_from} (step {ck['step']})")
        self.model.to(dev).train()
        self.resumed_at = self.step
        log(f"[{variant}] {self.model.num_params() / 1e6:.2f} M parameters")
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            (no_decay if p.ndim < 2 or "pos_bias" in n else decay).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-3},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=args.lr, betas=(0.9, 0.98), eps=1e-9)
        self.losses = []


def train(args) -> None:
    from trt_asr.tokenizer import Tokenizer
    from trt_asr.training.infer import transcribe_arrays
    from trt_asr.training.loss import tdt_loss_fast
    from trt_asr.training.metrics import error_counts

    variants = args.variants.split(",")
    run = Path(args.run)
    dev = torch.device(args.device)
    seed = args.seed
    torch.manual_seed(seed * 100 + args.call)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    tok = Tokenizer(run / "tokenizer.model")
    trainees = [_Trainee(v, tok, args, dev) for v in variants]

    data = Path(args.data)
    audio = np.load(data / "audio.npy", mmap_mode="r")
    lengths = np.load(data / "lengths.npy")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    texts = json.loads((data / "texts.json").read_text())
    # examples: every utterance, plus --composites x N utterances joined by pauses (window-like, for buffered)
    examples = compose_examples(lengths, int(args.composites * len(lengths)), seed * 100 + args.call + 77,
                                max_seconds=args.composite_seconds)
    targets = [tok.encode(" ".join(texts[i] for i in idx)) for idx, _ in examples]
    ex_lengths = np.array([int(lengths[idx].sum()) + sum(pauses) for idx, pauses in examples], dtype=np.int64)
    if args.composites:
        log(f"{len(examples) - len(lengths)} composite examples of 2-4 utterances "
            f"({ex_lengths[len(lengths):].sum() / SAMPLE_RATE / 3600:.2f} h) beside {len(lengths)} single ones")

    def example_audio(e: int) -> np.ndarray:
        idx, pauses = examples[e]
        return assemble_example([audio[offsets[i]: offsets[i + 1]] for i in idx], pauses)
    va, vl = np.load(data / "val_audio.npy"), np.load(data / "val_lengths.npy")
    voff = np.concatenate([[0], np.cumsum(vl)])
    val_audio = [va[voff[i]: voff[i + 1]] for i in range(len(vl))]
    val_texts = json.loads((data / "val_texts.json").read_text())
    if args.n_val:
        val_audio, val_texts = val_audio[: args.n_val], val_texts[: args.n_val]
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed * 7919 + args.call)
    ctx_rng = random.Random(seed + args.call)

    def validate(tr, ctx=None):
        tr.model.eval()
        hyps = transcribe_arrays(tr.model, val_audio, batch_size=64, att_context_size=ctx)
        tr.model.train()
        return error_counts(val_texts, hyps), hyps

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t_start = time.time()
    budget = args.minutes * 60
    next_val = args.val_every
    n_batches = 0
    for epoch, idx in Batches(ex_lengths, args.batch_seconds, seed * 100 + args.call):
        elapsed = time.time() - t_start
        if elapsed > budget:
            break
        n_batches += 1
        timing = 5 <= n_batches <= 8
        tm = {}
        t0 = time.time()
        lens = torch.tensor([int(ex_lengths[i]) for i in idx])
        x = torch.zeros(len(idx), int(lens.max()))
        for k, i in enumerate(idx):
            x[k, : lens[k]] = torch.from_numpy(example_audio(i).astype(np.float32) / 32768.0)
        tl = torch.tensor([len(targets[i]) for i in idx])
        y = torch.zeros(len(idx), int(tl.max()), dtype=torch.long)
        for k, i in enumerate(idx):
            y[k, : tl[k]] = torch.tensor(targets[i])
        x, lens, y, tl = x.to(dev, non_blocking=True), lens.to(dev), y.to(dev), tl.to(dev)
        x = gpu_augment(x, lens, gen)
        if timing:
            sync()
            tm["batch"] = time.time() - t0
        for tr in trainees:
            model = tr.model
            lr = lr_at(tr.step, args.lr, args.warmup)
            if tr.resumed_at:
                lr *= min(1.0, (tr.step - tr.resumed_at + 1) / 200)
            if args.anneal_minutes > 0:
                lr *= min(1.0, max(0.02, (budget - elapsed) / (args.anneal_minutes * 60)))
            for g in tr.opt.param_groups:
                g["lr"] = lr
            t1 = time.time()
            feats, flen = model.features(x, lens)
            feats = spec_augment(feats, flen, gen)
            ctx = ctx_rng.choice(CACHE_AWARE_CONTEXTS) if tr.variant == "cache-aware" else None
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                enc, elen = model.encoder(feats, flen, att_context_size=ctx)
            pred, _ = model.decoder(y)  # LSTM in float32
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                logits = model.joint(enc.transpose(1, 2), pred)
            if timing:
                sync()
                tm[f"{tr.variant}:fwd"] = time.time() - t1
                t1 = time.time()
            loss = tdt_loss_fast(logits, y, elen, tl, blank=tok.vocab_size, durations=DURATIONS, sigma=0.02,
                                 reduction="mean_volume")
            if timing:
                sync()
                tm[f"{tr.variant}:loss"] = time.time() - t1
                t1 = time.time()
            tr.opt.zero_grad(set_to_none=True)
            loss.backward()
            if timing:
                sync()
                tm[f"{tr.variant}:bwd"] = time.time() - t1
                t1 = time.time()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            tr.opt.step()
            if timing:
                sync()
                tm[f"{tr.variant}:opt"] = time.time() - t1
            tr.step += 1
            tr.losses.append(loss.detach())
            if tr.step % 50 == 0:
                mean_loss = torch.stack(tr.losses).mean().item()
                tr.losses = []
                tr.history.append({"step": tr.step, "call": args.call, "time": round(elapsed, 1), "loss": mean_loss,
                                   "lr": lr, "grad_norm": float(gnorm), "epoch": epoch})
                if tr.step % 200 == 0:
                    log(f"[{tr.variant}] step {tr.step} epoch {epoch} loss/token {mean_loss:.4f} lr {lr:.2e} "
                        f"|g| {float(gnorm):.2f} {elapsed:.0f}s")
        if timing:
            log(f"timing (B={len(idx)}, T_audio={int(lens.max()) / SAMPLE_RATE:.1f}s, U={int(tl.max())}): "
                + " ".join(f"{k}={v * 1000:.0f}ms" for k, v in tm.items()))
        if elapsed > next_val:
            next_val += args.val_every
            for tr in trainees:
                m, hyps = validate(tr)
                tr.history.append({"step": tr.step, "call": args.call, "time": round(elapsed, 1),
                                   "val_wer": m["wer"], "val_cer": m["cer"]})
                log(f"[{tr.variant}] step {tr.step} VAL WER {m['wer'] * 100:.2f} % CER {m['cer'] * 100:.2f} % | "
                    f"{val_texts[0]!r} -> {hyps[0]!r}")
    for tr in trainees:
        m, hyps = validate(tr)
        tr.history.append({"step": tr.step, "call": args.call, "time": round(time.time() - t_start, 1),
                           "val_wer": m["wer"], "val_cer": m["cer"]})
        log(f"[{tr.variant}] final step {tr.step} VAL WER {m['wer'] * 100:.2f} % CER {m['cer'] * 100:.2f} %")
        if tr.variant == "cache-aware":
            for c in CACHE_AWARE_CONTEXTS[1:]:
                mc, _ = validate(tr, c)
                log(f"[{tr.variant}] context {c}: VAL WER {mc['wer'] * 100:.2f} %")
                tr.history.append({"step": tr.step, "call": args.call, f"val_wer_{c[0]}_{c[1]}": mc["wer"]})
        dtype = torch.bfloat16 if args.save_dtype == "bf16" else torch.float32
        torch.save({"state": {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.cpu()
                              for k, v in tr.model.state_dict().items()},
                    "history": tr.history, "step": tr.step, "variant": tr.variant,
                    "model_kwargs": args.model_kwargs}, run / f"{tr.variant}.pt")
        log(f"[{tr.variant}] saved {run / f'{tr.variant}.pt'}")


# ------------------------------------------------------------------------------------------------ orchestration
def cmd_all(args) -> None:
    out = Path(args.out)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    if args.resume and (Path(args.resume) / "tokenizer.model").is_file():
        (run / "tokenizer.model").write_bytes((Path(args.resume) / "tokenizer.model").read_bytes())
    else:
        train_tokenizer(run / "tokenizer.model", args.seed)
    synth(Path(args.data), args.seed, args.call, args.n_train, args.workers)
    code = 0
    try:
        train(args)
    except Exception:
        import traceback
        traceback.print_exc()
        code = 1
    bundle(run, out)
    if code:
        sys.exit(code)


def bundle(run: Path, out: Path, part_bytes: int = 15 * 2 ** 20) -> None:
    """run folder -> out/bundle.tar.partN (the device returns files of <= 16 MiB)."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(run.iterdir()):
            if f.is_file():
                tar.add(f, arcname=f.name)
    data = buf.getvalue()
    for i in range(0, len(data), part_bytes):
        (out / f"bundle.tar.part{i // part_bytes}").write_bytes(data[i: i + part_bytes])
    log(f"bundle: {len(data) / 2 ** 20:.1f} MiB in {math.ceil(len(data) / part_bytes)} parts")


def cmd_unpack(args) -> None:
    parts = sorted(Path(args.parts).glob("bundle.tar.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    data = b"".join(p.read_bytes() for p in parts)
    into = Path(args.into)
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    print("unpacked", [m for m in os.listdir(into)])


def load_trained(run: Path, variant: str):
    from trt_asr.model.asr import TransducerModel
    from trt_asr.tokenizer import Tokenizer
    tok = Tokenizer(run / "tokenizer.model")
    ck = torch.load(run / f"{variant}.pt", map_location="cpu", weights_only=False)
    cfg = demo_config(variant, tok.vocab_size, **json.loads(ck.get("model_kwargs") or "{}"))
    model = TransducerModel(cfg)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["state"].items()})
    model.tokenizer = tok
    model.name = f"demo-tdt-{variant}"
    return model.eval(), ck


def cmd_export(args) -> None:
    from trt_asr.checkpoint import save_nemo
    run = Path(args.run)
    for v in args.variants.split(","):
        if not (run / f"{v}.pt").is_file():
            continue
        model, ck = load_trained(run, v)
        path = save_nemo(model, ROOT / "trt_asr" / "assets" / f"demo-tdt-{v}.nemo", weights_dtype=args.weights_dtype)
        print(f"{path}: {path.stat().st_size / 2 ** 20:.1f} MiB, step {ck['step']}")
    cmd_plot(args)


def cmd_plot(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run = Path(args.run)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for v, color in zip(VARIANTS, ("tab:blue", "tab:orange")):
        if not (run / f"{v}.pt").is_file():
            continue
        h = torch.load(run / f"{v}.pt", map_location="cpu", weights_only=False)["history"]
        tr = [e for e in h if "loss" in e]
        va = [e for e in h if "val_wer" in e]
        a1.plot([e["step"] for e in tr], [e["loss"] for e in tr], color=color, label=f"demo-tdt-{v}")
        a2.plot([e["step"] for e in va], [100 * e["val_wer"] for e in va], "o-", color=color, ms=3,
                label=f"demo-tdt-{v}")
    a1.set(xlabel="step", ylabel="TDT loss per token (train, augmented)", yscale="log", title="training loss")
    a2.set(xlabel="step", ylabel="WER % (held-out voices and sentences)", yscale="log", title="held-out WER (greedy, offline)")
    for a in (a1, a2):
        a.grid(alpha=0.3, which="both")
        a.legend()
    fig.tight_layout()
    dst = ROOT / "docs" / "demo-model-training.png"
    dst.parent.mkdir(exist_ok=True)
    fig.savefig(dst, dpi=90)
    print("wrote", dst)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(s):
        s.add_argument("--run", default="/tmp/demo_run", help="folder for tokenizer, checkpoints, histories")
        s.add_argument("--data", default="/dev/shm/demo_data")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--call", type=int, default=0, help="index of this command in the recipe (fresh data)")
        s.add_argument("--minutes", type=float, default=6.5, help="training time of this command")
        s.add_argument("--resume", default=None, help="folder with tokenizer.model and <variant>.pt")
        s.add_argument("--lr", type=float, default=2e-3)
        s.add_argument("--warmup", type=int, default=500)
        s.add_argument("--batch-seconds", type=float, default=800.0)
        s.add_argument("--val-every", type=float, default=75.0, help="seconds of training between validations")
        s.add_argument("--anneal-minutes", type=float, default=0.0, help="decay lr linearly over the last minutes")
        s.add_argument("--save-dtype", choices=("fp32", "bf16"), default="fp32")
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--model-kwargs", default="", help="JSON kwargs for demo_config (smoke tests)")
        s.add_argument("--init-from", default=None, help="cache-aware: warm start from this buffered <variant>.pt")
        s.add_argument("--n-val", type=int, default=0, help="validate on the first N held-out utterances (0: all)")
        s.add_argument("--composites", type=float, default=0.0,
                       help="add this many x N examples of 2-4 utterances joined by 0.3-3 s pauses (window-like)")
        s.add_argument("--composite-seconds", type=float, default=20.0, help="longest composite example")

    s = sub.add_parser("all")
    common(s)
    s.add_argument("--out", required=True)
    s.add_argument("--variants", default="buffered,cache-aware")
    s.add_argument("--n-train", type=int, default=16000)
    s.add_argument("--workers", type=int, default=os.cpu_count())
    s = sub.add_parser("synth")
    common(s)
    s.add_argument("--n-train", type=int, default=16000)
    s.add_argument("--workers", type=int, default=os.cpu_count())
    s = sub.add_parser("train")
    common(s)
    s.add_argument("--variants", default="buffered,cache-aware")
    s = sub.add_parser("unpack")
    s.add_argument("--parts", required=True)
    s.add_argument("--into", required=True)
    for name in ("export", "plot"):
        s = sub.add_parser(name)
        s.add_argument("--run", required=True)
        s.add_argument("--variants", default="buffered,cache-aware", help="export: which variants to ship")
        s.add_argument("--weights-dtype", choices=("fp16", "fp32"), default="fp16",
                       help="export: parameter storage in the .nemo (fp16 keeps both demo models ~14 MiB)")
    args = p.parse_args(argv)
    if args.cmd == "all":
        cmd_all(args)
    elif args.cmd == "synth":
        synth(Path(args.data), args.seed, args.call, args.n_train, args.workers)
    elif args.cmd == "train":
        train(args)
    elif args.cmd == "unpack":
        cmd_unpack(args)
    elif args.cmd == "export":
        cmd_export(args)
    elif args.cmd == "plot":
        cmd_plot(args)


if __name__ == "__main__":
    main()
