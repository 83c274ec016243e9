"""The whole transducer: mel front end -> FastConformer -> prediction network + joint, under NeMo's module names
(``preprocessor.featurizer``, ``encoder``, ``decoder``, ``joint``) so a NeMo state dict loads with strict=True."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..decoding.greedy import GreedyTransducerDecoder
from .encoder import ConformerEncoder
from .frontend import Preprocessor
from .transducer import Joint, PredictionNetwork


class TransducerModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.preprocessor.features != cfg.encoder.feat_in:
            raise ValueError(f"preprocessor.features={cfg.preprocessor.features} != encoder.feat_in={cfg.encoder.feat_in}")
        self.cfg = cfg
        self.preprocessor = Preprocessor(cfg.preprocessor)
        self.encoder = ConformerEncoder(cfg.encoder)
        self.decoder = PredictionNetwork(cfg.decoder)
        self.joint = Joint(cfg.joint, cfg.encoder.d_model, cfg.decoder.pred_hidden, cfg.decoder.vocab_size)
        self.tokenizer = None  # set by the loader (trt_asr.tokenizer.Tokenizer)
        self.name = "unnamed"
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.joint.enc.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.joint.enc.weight.dtype

    def greedy_decoder(self, sync_every: int | None = None) -> GreedyTransducerDecoder:
        d = self.cfg.decoding
        return GreedyTransducerDecoder(self.decoder, self.joint, d.durations if d.model_type == "tdt" else None,
                                       d.max_symbols, sync_every)

    def features(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, N] float32 -> mel features [B, F, T] (float32 always, as NeMo), lengths [B]."""
        return self.preprocessor(audio.float(), lengths)

    def encode(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, N] -> encoded [B, D, T] in the model's dtype, encoded lengths [B]."""
        feats, feat_len = self.features(audio, lengths)
        return self.encoder(feats.to(self.dtype), feat_len)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
