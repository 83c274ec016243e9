"""Reference streams for parity: per-chunk encoder inputs, caches and outputs of the fp32 torch reference engine,
plus the greedy tokens decoded from them with the carried decoder state. Cache-aware mode steps carried chunks;
buffered mode ("window" step) steps independent windows (no caches; tokens decoded per window).

Two sources with one interface (iterate -> ``RefChunk``):

* ``LiveReference``: runs the reference engine alongside the engine under test, so a long v3 run needs no disk;
* ``DiskReference``: reads what ``write_reference`` wrote -- safetensors shards (fp32, int64) + ``index.json``:

      DIR/index.json               model spec, mode, streaming params, contract hash, seed, batch, chunks, shards
      DIR/shard-00000.safetensors  keys "<chunk>/<in|out>/<name>" for the shard's chunks; tokens in index.json
                                   (input caches only for chunk 0: chunk k's are chunk k-1's output caches)

Inputs are seeded Gaussian log-mel-like features (or a given feature sequence): the stream's chunk k's new frames
come from one ``torch.Generator`` in order, so chunk k of a 1,000-chunk run never needs the whole sequence in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..streaming.cache_aware import CacheAwareParams, initial_caches
from ..streaming.contract import build_contract, params_from_contract

OUTPUT_NAMES = ("encoder_output", "encoded_lengths", "cache_last_channel_next", "cache_last_time_next",
                "cache_last_channel_next_len")
CACHE_NAMES = ("cache_last_channel", "cache_last_time", "cache_last_channel_len")


@dataclass
class RefChunk:
    index: int
    inputs: dict[str, torch.Tensor]   # audio_signal, length and the reference caches fed to this chunk
    outputs: dict[str, torch.Tensor]  # the reference engine's outputs
    tokens: list = field(default_factory=list)  # per stream: [(label, frame in chunk, duration)]


def feature_chunks(params: CacheAwareParams, n_chunks: int, batch: int = 1, seed: int = 0,
                   features: torch.Tensor | None = None, scale: float = 1.0) -> Iterator[tuple]:
    """Step inputs (audio_signal [B, F, T_in], length [B]) for ``n_chunks`` full chunks: pre-encode cache frames
    from the previous chunk, then new frames (seeded N(0, scale^2), or taken from ``features`` [B, F, T])."""
    g = torch.Generator().manual_seed(seed)
    pre_max = params.pre_encode_cache_size[1]
    prev = torch.zeros(batch, params.feat_in, pre_max)
    pos = 0
    for k in range(n_chunks):
        first = k == 0 and not params.pad_and_drop_preencoded
        i = 0 if first else 1
        chunk, pre = params.chunk_size[i], params.pre_encode_cache_size[i]
        if features is not None:
            new = features[:, :, pos: pos + chunk]
            if new.shape[-1] < chunk:
                raise ValueError(f"features have {features.shape[-1]} frames; {n_chunks} chunks need more")
        else:
            new = torch.randn(batch, params.feat_in, chunk, generator=g) * scale
        pos += params.shift_size[i]
        audio = torch.cat([prev[:, :, pre_max - pre:], new], dim=-1)
        prev = audio[:, :, audio.shape[-1] - pre_max:]
        yield audio, torch.full((batch,), audio.shape[-1], dtype=torch.long)


def window_chunks(feat_in: int, n_windows: int, window_frames: int, batch: int = 1, seed: int = 0,
                  scale: float = 1.0) -> Iterator[tuple]:
    """Buffered-mode step inputs: independent windows [B, F, window_frames]; stream b > 0 is shorter (padded), so
    masking of the padding is exercised too."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_windows):
        audio = torch.randn(batch, feat_in, window_frames, generator=g) * scale
        length = torch.tensor([max(window_frames - 37 * b, 1) for b in range(batch)], dtype=torch.long)
        audio = audio * (torch.arange(window_frames)[None, :] < length[:, None])[:, None, :]
        yield audio, length


class LiveReference:
    """Runs the fp32 torch reference engine chunk by chunk (closed loop on its own caches)."""

    def __init__(self, model, params: CacheAwareParams | None, n_chunks: int, batch: int = 1, seed: int = 0,
                 features: torch.Tensor | None = None, decode: bool = True, model_spec: str = "",
                 engine: str = "torch", mode: str = "cache-aware", window_frames: int = 1400):
        from ..engines.torch_engine import TorchEncoderEngine

        self.model, self.params, self.n_chunks, self.batch, self.seed = model, params, n_chunks, batch, seed
        self.features, self.decode, self.mode, self.window_frames = features, decode, mode, window_frames
        step = {"cache-aware": "stream", "buffered": "window"}[mode]
        if engine == "torch":
            self.engine = TorchEncoderEngine(model, mode=step, params=params)
        elif engine == "nemo" and step == "stream":
            self.engine = NemoEncoderEngine(model, params=params)
        else:
            raise ValueError(f"reference engine must be 'torch' or 'nemo' (cache-aware only), not {engine!r}")
        self.engine_name = engine
        self.model_spec = model_spec or getattr(model, "name", "")
        self.contract = build_contract(model.cfg.encoder, mode, params, model_name=self.model_spec,
                                       window_frames=(1, window_frames, window_frames))

    def __len__(self) -> int:
        return self.n_chunks

    @torch.no_grad()
    def __iter__(self) -> Iterator[RefChunk]:
        if self.mode == "buffered":  # independent windows: no caches; tokens decoded per window
            decoder = self.model.greedy_decoder() if self.decode else None
            for k, (audio, length) in enumerate(window_chunks(self.model.cfg.encoder.feat_in, self.n_chunks,
                                                              self.window_frames, self.batch, self.seed)):
                inputs = {"audio_signal": audio, "length": length}
                outputs = self.engine.step(inputs)
                tokens = decoder(outputs["encoder_output"], outputs["encoded_lengths"])[0].to_lists() if decoder \
                    else []
                yield RefChunk(k, inputs, outputs, tokens)
            return
        caches = initial_caches(self.params, self.batch)
        decoder = self.model.greedy_decoder() if self.decode else None
        state = decoder.initial_state(self.batch, torch.device("cpu")) if decoder else None
        for k, (audio, length) in enumerate(feature_chunks(self.params, self.n_chunks, self.batch, self.seed,
                                                            self.features)):
            inputs = {"audio_signal": audio, "length": length, **caches}
            outputs = self.engine.step(inputs)
            tokens = []
            if decoder is not None:
                toks, state = decoder(outputs["encoder_output"], outputs["encoded_lengths"], state)
                tokens = toks.to_lists()
            caches = {n: outputs[_next(n)] for n in CACHE_NAMES}
            yield RefChunk(k, inputs, outputs, tokens)


def _next(name: str) -> str:
    return "cache_last_channel_next_len" if name == "cache_last_channel_len" else name + "_next"


class NemoEncoderEngine:
    """NeMo's ``ConformerEncoder.cache_aware_stream_step`` behind the EncoderEngine protocol (fp32, CPU), built
    with our weights: an independent reference for the torch engine. NeMo is imported only here."""

    name, mode, precision = "nemo", "stream", "fp32"

    def __init__(self, model, mode: str = "stream", params: CacheAwareParams | None = None):
        import logging

        for log_name in ("nemo_logger", "nemo", "NeMo"):
            logging.getLogger(log_name).setLevel(logging.ERROR)
        from nemo.collections.asr.modules import ConformerEncoder

        kw = {k: v for k, v in model.cfg.to_nemo_dict()["encoder"].items() if k != "_target_"}
        self.encoder = ConformerEncoder(**kw)
        self.encoder.load_state_dict(model.encoder.state_dict(), strict=True)
        self.encoder = self.encoder.float().eval()
        self.params = params or CacheAwareParams.for_encoder(model.cfg.encoder, allow_inexact=True)
        self.encoder.setup_streaming_params(att_context_size=list(self.params.att_context_size))
        self.device = torch.device("cpu")

    @torch.no_grad()
    def step(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        first = self.params.is_first_chunk(inputs["audio_signal"].shape[-1])
        enc, enc_len, ch, tm, ch_len = self.encoder.cache_aware_stream_step(
            processed_signal=inputs["audio_signal"], processed_signal_length=inputs["length"],
            cache_last_channel=inputs["cache_last_channel"].transpose(0, 1),
            cache_last_time=inputs["cache_last_time"].transpose(0, 1),
            cache_last_channel_len=inputs["cache_last_channel_len"],
            keep_all_outputs=True, drop_extra_pre_encoded=self.params.drop_extra(first))
        return {"encoder_output": enc, "encoded_lengths": enc_len.to(torch.long),
                "cache_last_channel_next": ch.transpose(0, 1).contiguous(),
                "cache_last_time_next": tm.transpose(0, 1).contiguous(),
                "cache_last_channel_next_len": ch_len.to(torch.long)}


# ----------------------------------------------------------------------------------------------- disk format
def write_reference(source: LiveReference, out_dir: str | Path, chunks_per_shard: int = 256,
                    progress=None) -> Path:
    """Write a reference run: safetensors shards + index.json. Returns the index path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, tokens, buf, first = [], [], {}, 0

    def flush(last: int):
        nonlocal buf, first
        if not buf:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(buf, str(out / name))
        shards.append({"file": name, "first_chunk": first, "last_chunk": last})
        buf, first = {}, last + 1

    k = -1
    for chunk in source:
        k = chunk.index
        for n, t in chunk.inputs.items():
            if k > 0 and n in CACHE_NAMES:
                continue  # a chunk's input caches are the previous chunk's outputs (closed-loop reference)
            buf[f"{k}/in/{n}"] = t.detach().cpu().clone(memory_format=torch.contiguous_format)
        for n, t in chunk.outputs.items():
            buf[f"{k}/out/{n}"] = t.detach().cpu().clone(memory_format=torch.contiguous_format)
        tokens.append(chunk.tokens)
        if (k + 1) % chunks_per_shard == 0:
            flush(k)
        if progress:
            progress(k)
    flush(k)
    index = {
        "format": "trt-asr-reference-v1",
        "model": source.model_spec,
        "mode": source.mode,
        "reference_engine": source.engine_name,
        "seed": source.seed,
        "batch": source.batch,
        "chunks": k + 1,
        "dtype": "float32",
        "contract_sha256": source.contract["sha256"],
        "contract": source.contract,
        "shards": shards,
        "tokens": tokens,
    }
    path = out / "index.json"
    path.write_text(json.dumps(index) + "\n")
    return path


class DiskReference:
    """Reads a reference directory chunk by chunk (one shard in memory at a time)."""

    def __init__(self, ref_dir: str | Path):
        self.dir = Path(ref_dir)
        self.index = json.loads((self.dir / "index.json").read_text())
        self.contract = self.index["contract"]
        self.mode = self.index.get("mode", "cache-aware")
        self.params = params_from_contract(self.contract) if self.mode == "cache-aware" else None
        self.model_spec = self.index["model"]
        self.batch = self.index["batch"]

    def __len__(self) -> int:
        return self.index["chunks"]

    def __iter__(self) -> Iterator[RefChunk]:
        from safetensors.torch import load_file

        prev = None
        for shard in self.index["shards"]:
            data = load_file(str(self.dir / shard["file"]))
            for k in range(shard["first_chunk"], shard["last_chunk"] + 1):
                inputs = {key.split("/", 2)[2]: v for key, v in data.items() if key.startswith(f"{k}/in/")}
                outputs = {key.split("/", 2)[2]: v for key, v in data.items() if key.startswith(f"{k}/out/")}
                if prev is not None and self.mode == "cache-aware":
                    inputs.update({n: prev[_next(n)] for n in CACHE_NAMES})
                prev = outputs
                tokens = self.index["tokens"][k] if k < len(self.index["tokens"]) else []
                yield RefChunk(k, inputs, outputs, [[tuple(t) for t in s] for s in tokens])
