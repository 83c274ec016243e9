"""Checkpoint compatibility with NeMo: the v3 architecture's state dict, and .nemo archives both ways
(NeMo ``save_to`` -> our ``load_model``; our ``save_nemo`` -> NeMo ``restore_from``)."""

from __future__ import annotations

from importlib import resources

import pytest
import torch

from trt_asr.checkpoint import load_model, save_nemo
from trt_asr.config import load_preset_dict, preset_config
from trt_asr.model.asr import TransducerModel
from trt_asr.model.calibrate import calibrate_random_model, synthetic_audio
from trt_asr.tokenizer import Tokenizer

pytest.importorskip("nemo.collections.asr")
from tests.nemo_ref import nemo_tdt_model  # noqa: E402

pytestmark = pytest.mark.nemo

V3_TENSORS = 725
V3_PARAMS = 627_008_134


def test_v3_config_is_the_reference():
    """The config we hand NeMo for v3 (``to_nemo_dict``) keeps every value of the reference model_config.yaml."""
    ref = load_preset_dict("parakeet-tdt-0.6b-v3")
    ours = preset_config("parakeet-tdt-0.6b-v3").to_nemo_dict()

    def check(a, b, path):
        if isinstance(a, dict):
            for k, v in a.items():
                assert k in b, f"{path}.{k} missing"
                check(v, b[k], f"{path}.{k}")
        else:
            assert a == b, f"{path}: reference {a!r}, ours {b!r}"

    for section in ("preprocessor", "encoder", "decoder", "joint", "decoding", "model_defaults", "loss"):
        check(ref[section], ours[section], section)


def test_v3_state_dict_matches_nemo(v3_model, nemo_v3):
    nemo_state = nemo_v3.state_dict()
    assert len(nemo_state) == V3_TENSORS
    assert sum(p.numel() for p in nemo_v3.parameters()) == V3_PARAMS
    ours = v3_model.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in nemo_state.items()}
    assert v3_model.num_params() == V3_PARAMS
    v3_model.load_state_dict(nemo_state, strict=True)  # same values: nemo_v3 was built from v3_model's weights


# ----------------------------------------------------------------------------------------------- round trips
@pytest.fixture(scope="module")
def small_v3_vocab_model():
    """v3 config (vocab 8192, joint/pred dims, 5 durations) with a small encoder (1 layer, d_model 256), the bundled
    8192-piece SentencePiece tokenizer, calibrated random weights."""
    cfg = preset_config("parakeet-tdt-0.6b-v3")
    e = cfg.encoder
    e.n_layers, e.d_model, e.n_heads, e.subsampling_conv_channels = 1, 256, 4, 64
    cfg.nemo = cfg.to_nemo_dict()
    torch.manual_seed(21)
    model = TransducerModel(cfg)
    calibrate_random_model(model, seed=21, calib_seconds=2.0)
    model.tokenizer = Tokenizer(str(resources.files("trt_asr.assets").joinpath("random-bpe-8192.model")))
    return model.eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    lengths = [52000, 30000, 7000]
    audio = torch.randn(len(lengths), max(lengths), generator=g) * 0.2
    for b, n in enumerate(lengths):
        audio[b, :n] = synthetic_audio(n / 16000 + 0.01, 16000, g)[:n]
    return audio, torch.tensor(lengths)


@torch.no_grad()
def ours_run(model, audio, lengths):
    enc, enc_len = model.encode(audio, lengths)
    tokens, _ = model.greedy_decoder()(enc, enc_len)
    return enc, enc_len, [[(lab, fr) for lab, fr, _ in utt] for utt in tokens.to_lists()]


@torch.no_grad()
def nemo_run(nemo, audio, lengths):
    """NeMo's own pipeline: preprocessor -> encoder -> model.decoding (greedy_batch, as configured)."""
    feats, feat_len = nemo.preprocessor(input_signal=audio, length=lengths)
    enc, enc_len = nemo.encoder(audio_signal=feats, length=feat_len)
    hyps = nemo.decoding.rnnt_decoder_predictions_tensor(enc, enc_len, return_hypotheses=True)
    tokens = [list(zip(h.y_sequence.tolist(), torch.as_tensor(h.timestamp).tolist())) for h in hyps]
    return enc, enc_len, tokens


def assert_same_outputs(a, b):
    (enc_a, len_a, tok_a), (enc_b, len_b, tok_b) = a, b
    assert torch.equal(len_a, len_b)
    for i, n in enumerate(len_a.tolist()):
        assert (enc_a[i, :, :n] - enc_b[i, :, :n]).abs().max().item() <= 1e-4
    assert sum(map(len, tok_a)) > 5
    assert tok_a == tok_b


def test_nemo_save_to_then_our_load(small_v3_vocab_model, batch, tmp_path):
    nemo = nemo_tdt_model(small_v3_vocab_model, tmp_path / "tok")
    path = tmp_path / "from_nemo.nemo"
    nemo.save_to(str(path))
    ours = load_model(str(path))  # strict state-dict load
    assert ours.cfg.decoding.model_type == "tdt" and ours.cfg.decoding.durations == [0, 1, 2, 3, 4]
    assert ours.tokenizer is not None and ours.tokenizer.vocab_size == 8192
    assert ours.tokenizer.model_bytes == small_v3_vocab_model.tokenizer.model_bytes
    assert_same_outputs(ours_run(ours, *batch), nemo_run(nemo, *batch))


def test_our_save_nemo_then_nemo_restore(small_v3_vocab_model, batch, tmp_path):
    from nemo.collections.asr.models import ASRModel

    path = save_nemo(small_v3_vocab_model, tmp_path / "ours.nemo")
    nemo = ASRModel.restore_from(str(path), map_location="cpu").eval()  # class from the config's target
    assert type(nemo).__name__ == "EncDecRNNTBPEModel"
    assert nemo.tokenizer.vocab_size == 8192
    text = "hello world"
    assert nemo.tokenizer.text_to_ids(text) == small_v3_vocab_model.tokenizer.encode(text)
    assert_same_outputs(ours_run(small_v3_vocab_model, *batch), nemo_run(nemo, *batch))
    # and back: our loader reads our own archive strictly, with the same result
    again = load_model(str(path))
    assert_same_outputs(ours_run(again, *batch), nemo_run(nemo, *batch))


def _tiny_rnnt():
    from trt_asr.config import tiny_config

    cfg = tiny_config(n_layers=2)
    cfg.decoding.model_type, cfg.decoding.durations, cfg.joint.num_extra_outputs = "rnnt", [], 0
    cfg.nemo = cfg.to_nemo_dict()
    torch.manual_seed(5)
    model = TransducerModel(cfg)
    calibrate_random_model(model, seed=5, calib_seconds=2.0)
    model.tokenizer = Tokenizer(str(resources.files("trt_asr.assets").joinpath("random-bpe-128.model")))
    return model.eval()


@pytest.mark.parametrize("kind", ["tiny-cache-aware", "tiny-rnnt"])
def test_small_configs_save_nemo_then_nemo_restore(kind, batch, tmp_path):
    """Config fields beyond v3's (chunked_limited attention, causal convolutions and subsampling; plain RNNT
    without durations) survive ``save_nemo`` -> NeMo ``restore_from``, with identical outputs."""
    from nemo.collections.asr.models import ASRModel

    model = load_model("random:tiny-cache-aware") if kind == "tiny-cache-aware" else _tiny_rnnt()
    nemo = ASRModel.restore_from(str(save_nemo(model, tmp_path / f"{kind}.nemo")), map_location="cpu").eval()
    if kind == "tiny-cache-aware":
        assert nemo.encoder.att_context_style == "chunked_limited"
        assert list(nemo.encoder.att_context_size) == [16, 3]
        assert nemo.encoder.layers[0].conv.depthwise_conv._left_padding == 8  # causal: kernel 9, all left
    else:
        assert nemo.joint.num_extra_outputs == 0
        assert type(nemo.decoding.decoding).__name__ == "GreedyBatchedRNNTInfer"
    assert_same_outputs(ours_run(model, *batch), nemo_run(nemo, *batch))
