"""Transducer prediction network and joint, with NeMo's ``RNNTDecoder`` / ``RNNTJoint`` parameter names.

The blank label doubles as the start symbol (``blank_as_pad``): its embedding row is all zeros.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import DecoderConfig, JointConfig

LSTMState = tuple[torch.Tensor, torch.Tensor]  # (h, c), each [layers, B, H]


class _LSTMDropout(nn.Module):
    """Keeps NeMo's path ``dec_rnn.lstm``."""

    def __init__(self, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_tbh: torch.Tensor, state: LSTMState | None):
        y, state = self.lstm(x_tbh, state)
        return self.dropout(y), state


class PredictionNetwork(nn.Module):
    """``decoder.prediction``: Embedding(vocab + 1, H, padding_idx=blank) -> LSTM(H, layers)."""

    def __init__(self, cfg: DecoderConfig, dropout: float = 0.2):
        super().__init__()
        if not cfg.blank_as_pad:
            raise ValueError("only blank_as_pad prediction networks are supported")
        self.cfg = cfg
        self.blank_id = cfg.vocab_size
        self.prediction = nn.ModuleDict({
            "embed": nn.Embedding(cfg.vocab_size + 1, cfg.pred_hidden, padding_idx=cfg.vocab_size),
            "dec_rnn": _LSTMDropout(cfg.pred_hidden, cfg.pred_rnn_layers, dropout),
        })

    def initial_state(self, batch: int, device, dtype=torch.float32) -> LSTMState:
        shape = (self.cfg.pred_rnn_layers, batch, self.cfg.pred_hidden)
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def step(self, labels_b: torch.Tensor, state: LSTMState | None) -> tuple[torch.Tensor, LSTMState]:
        """One label per utterance [B] -> prediction output [B, H] and the next state."""
        y = self.prediction["embed"](labels_b).unsqueeze(0)  # [1, B, H]
        out, state = self.prediction["dec_rnn"](y, state)
        return out[0], state

    def forward(self, labels_bu: torch.Tensor, state: LSTMState | None = None) -> tuple[torch.Tensor, LSTMState]:
        """Teacher forcing for training: labels [B, U] -> outputs [B, U+1, H] (blank/SOS prepended)."""
        b = labels_bu.shape[0]
        sos = torch.full((b, 1), self.blank_id, dtype=labels_bu.dtype, device=labels_bu.device)
        y = self.prediction["embed"](torch.cat([sos, labels_bu], dim=1)).transpose(0, 1)
        out, state = self.prediction["dec_rnn"](y, state)
        return out.transpose(0, 1), state


class Joint(nn.Module):
    """``joint``: logits = Linear(ReLU(enc(f) + pred(g))); outputs vocab + blank (+ TDT durations)."""

    def __init__(self, cfg: JointConfig, encoder_hidden: int, pred_hidden: int, vocab_size: int,
                 dropout: float = 0.2):
        super().__init__()
        if cfg.activation != "relu":
            raise ValueError(f"joint activation {cfg.activation!r} is not supported (relu only)")
        self.num_classes_with_blank = vocab_size + 1
        self.num_extra_outputs = cfg.num_extra_outputs
        self.pred = nn.Linear(pred_hidden, cfg.joint_hidden)
        self.enc = nn.Linear(encoder_hidden, cfg.joint_hidden)
        self.joint_net = nn.Sequential(nn.ReLU(), nn.Dropout(dropout),
                                       nn.Linear(cfg.joint_hidden, vocab_size + 1 + cfg.num_extra_outputs))

    def project_encoder(self, enc_btd: torch.Tensor) -> torch.Tensor:
        return self.enc(enc_btd)

    def project_prednet(self, pred_bh: torch.Tensor) -> torch.Tensor:
        return self.pred(pred_bh)

    def joint_after_projection(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.joint_net(f + g)

    def forward(self, enc_btd: torch.Tensor, pred_buh: torch.Tensor) -> torch.Tensor:
        """Full lattice for training: [B, T, D] x [B, U+1, H] -> logits [B, T, U+1, V+1(+durations)]."""
        return self.joint_net(self.enc(enc_btd).unsqueeze(2) + self.pred(pred_buh).unsqueeze(1))
