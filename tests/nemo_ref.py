"""NeMo reference modules built from a ``TransducerModel`` with identical weights, for parity tests.

Importable without NeMo: NeMo is imported only inside the functions. Typical use::

    pytest.importorskip("nemo.collections.asr")
    from tests.nemo_ref import nemo_decode, nemo_encoder, nemo_preprocessor, nemo_tdt_model

    ref = nemo_encoder(model)                  # nemo.collections.asr.modules.ConformerEncoder, eval, same weights
    enc, enc_len = ref(audio_signal=feats, length=feat_len)
    hyps = nemo_decode(model, enc, enc_len)    # NeMo's greedy_batch (label looping): [(label, frame, dur)] per utt
    computer = nemo_greedy_computer(model)     # the label-looping computer itself (prev_batched_state for chunks)
    nemo = nemo_tdt_model(model)               # full EncDecRNNTBPEModel with our weights and tokenizer

All modules are built from ``model.cfg.to_nemo_dict()`` (the config our checkpoints carry), in eval mode, fp32, CPU.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import torch


def _quiet_nemo() -> None:
    for name in ("nemo_logger", "nemo", "NeMo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from nemo.utils import logging as nemo_logging

        nemo_logging.setLevel(logging.ERROR)
    except Exception:  # pragma: no cover
        pass


def _cfg(model_or_cfg) -> dict:
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    return cfg.to_nemo_dict() if hasattr(cfg, "to_nemo_dict") else copy.deepcopy(cfg)


def _kwargs(section: dict) -> dict:
    return {k: v for k, v in section.items() if k != "_target_"}


def _load(module: torch.nn.Module, state: dict) -> torch.nn.Module:
    module.load_state_dict(state, strict=True)
    return module.float().eval()


# ----------------------------------------------------------------------------------------------- modules
def nemo_preprocessor(model_or_cfg):
    """NeMo ``AudioToMelSpectrogramPreprocessor`` from our preprocessor config (eval: no dither)."""
    _quiet_nemo()
    from nemo.collections.asr.modules import AudioToMelSpectrogramPreprocessor

    pre = AudioToMelSpectrogramPreprocessor(**_kwargs(_cfg(model_or_cfg)["preprocessor"]))
    return pre.eval()


def nemo_encoder(model, **overrides):
    """NeMo ``ConformerEncoder`` with our encoder's weights. ``overrides`` replace config fields (e.g. att_context_size)."""
    _quiet_nemo()
    from nemo.collections.asr.modules import ConformerEncoder

    kw = _kwargs(_cfg(model)["encoder"])
    kw.update(overrides)
    return _load(ConformerEncoder(**kw), model.encoder.state_dict())


def nemo_decoder(model):
    """NeMo ``RNNTDecoder`` (prediction network) with our weights."""
    _quiet_nemo()
    from nemo.collections.asr.modules import RNNTDecoder

    return _load(RNNTDecoder(**_kwargs(_cfg(model)["decoder"])), model.decoder.state_dict())


def nemo_joint(model):
    """NeMo ``RNNTJoint`` with our weights (num_extra_outputs = number of TDT durations)."""
    _quiet_nemo()
    from nemo.collections.asr.modules import RNNTJoint

    return _load(RNNTJoint(**_kwargs(_cfg(model)["joint"])), model.joint.state_dict())


# ----------------------------------------------------------------------------------------------- decoding
def nemo_greedy_computer(model, decoder=None, joint=None, max_symbols: int | None = None):
    """NeMo's label-looping greedy computer (what ``strategy: greedy_batch`` runs; CUDA graphs off):
    ``GreedyBatchedTDTLabelLoopingComputer`` for TDT, ``GreedyBatchedRNNTLabelLoopingComputer`` for RNNT."""
    _quiet_nemo()
    decoder = decoder if decoder is not None else nemo_decoder(model)
    joint = joint if joint is not None else nemo_joint(model)
    d = model.cfg.decoding
    max_symbols = d.max_symbols if max_symbols is None else max_symbols
    if d.model_type == "tdt":
        from nemo.collections.asr.parts.submodules.transducer_decoding.tdt_label_looping import (
            GreedyBatchedTDTLabelLoopingComputer,
        )

        return GreedyBatchedTDTLabelLoopingComputer(
            decoder=decoder, joint=joint, blank_index=model.cfg.blank_id, durations=list(d.durations),
            max_symbols_per_step=max_symbols, include_duration=True, allow_cuda_graphs=False)
    from nemo.collections.asr.parts.submodules.transducer_decoding.rnnt_label_looping import (
        GreedyBatchedRNNTLabelLoopingComputer,
    )

    return GreedyBatchedRNNTLabelLoopingComputer(
        decoder=decoder, joint=joint, blank_index=model.cfg.blank_id, max_symbols_per_step=max_symbols,
        allow_cuda_graphs=False)


@torch.inference_mode()
def nemo_decode(model, encoded_bdt: torch.Tensor, lengths: torch.Tensor, computer=None,
                max_symbols: int | None = None) -> list[list[tuple[int, int, int]]]:
    """NeMo greedy_batch on encoder output [B, D, T] -> per utterance [(label, frame, duration)], the format of our
    ``BatchedTokens.to_lists()`` (duration is 0 for RNNT labels, as ours).

    NB: with a batch of more than one utterance, NeMo 3.0's TDT label looping may record a wrong duration for a
    label (its inner blank-skipping loop overwrites the batch's durations unmasked; labels and frames are right):
    compare durations at batch size 1. See ``tests/test_nemo_parity.py::test_nemo_batched_duration_quirk``."""
    computer = computer if computer is not None else nemo_greedy_computer(model, max_symbols=max_symbols)
    hyps, _ = computer(x=encoded_bdt.transpose(1, 2).float(), out_len=lengths)
    out = []
    for b in range(encoded_bdt.shape[0]):
        n = int(hyps.current_lengths[b])
        labels = hyps.transcript[b, :n].tolist()
        frames = hyps.timestamps[b, :n].tolist()
        durs = hyps.token_durations[b, :n].tolist() if getattr(hyps, "token_durations", None) is not None else [0] * n
        out.append(list(zip(labels, frames, durs)))
    return out


# ----------------------------------------------------------------------------------------------- full model
def write_tokenizer_dir(model, folder: str | Path) -> Path:
    """A NeMo BPE tokenizer dir (``tokenizer.model`` + ``vocab.txt``) holding the model's SentencePiece model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = model.tokenizer
    if tok is None:
        raise ValueError("model has no tokenizer")
    (folder / "tokenizer.model").write_bytes(tok.model_bytes)
    (folder / "vocab.txt").write_text("".join(tok.piece(i) + "\n" for i in range(tok.vocab_size)))
    return folder


def nemo_model_config(model, tokenizer_dir: str | Path) -> dict:
    """Our NeMo config, made buildable as an ``EncDecRNNTBPEModel`` (tokenizer dir, no data sets)."""
    cfg = _cfg(model)
    cfg["tokenizer"] = {"dir": str(tokenizer_dir), "type": "bpe"}
    for key in ("train_ds", "validation_ds", "test_ds", "optim"):
        cfg.pop(key, None)
    cfg.pop("target", None)
    return cfg


def nemo_tdt_model(model, tokenizer_dir: str | Path | None = None):
    """NeMo ``EncDecRNNTBPEModel`` (TDT or RNNT per config) with our weights and tokenizer, eval, CPU.

    The tokenizer files go to ``tokenizer_dir`` (a fresh temporary dir if None; NeMo copies them into the model's
    artifacts, so a ``.save_to()`` archive stays self-contained)."""
    _quiet_nemo()
    from nemo.collections.asr.models import EncDecRNNTBPEModel
    from omegaconf import OmegaConf

    tokenizer_dir = write_tokenizer_dir(model, tokenizer_dir or tempfile.mkdtemp(prefix="nemo_ref_tok_"))
    nemo = EncDecRNNTBPEModel(cfg=OmegaConf.create(nemo_model_config(model, tokenizer_dir)))
    nemo.load_state_dict(model.state_dict(), strict=True)
    return nemo.float().eval()
