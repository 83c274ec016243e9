"""Shared test fixtures. Keep small: heavy objects are session-scoped and built only when a test asks for them."""

from __future__ import annotations

import os

import pytest
import torch

# CI runners have 2 cores; more threads only add contention. Override with TRT_ASR_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("TRT_ASR_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def v3_model():
    """Calibrated random-weight Parakeet-TDT-0.6B-v3 (full 24 layers, vocab 8192), fp32, CPU. Built once (~15 s)."""
    from trt_asr.checkpoint import load_model

    return load_model("random:parakeet-tdt-0.6b-v3")


@pytest.fixture(scope="session")
def nemo_v3(v3_model, tmp_path_factory):
    """NeMo EncDecRNNTBPEModel from the v3 config with ``v3_model``'s weights and tokenizer. Built once (~20 s)."""
    pytest.importorskip("nemo.collections.asr")
    from tests.nemo_ref import nemo_tdt_model

    return nemo_tdt_model(v3_model, tmp_path_factory.mktemp("nemo_v3_tokenizer"))
