"""The shipped demo models (buffered: full attention; cache-aware: multi-context chunked-limited attention): load
offline, transcribe the shipped example, and stay under the issue's 5 % WER gate on the committed held-out set
(sentences and voice variants never seen in training)."""

from importlib import resources
from pathlib import Path

import pytest
import torch

from trt_asr.checkpoint import default_model_spec, load_model
from tests.demo_assets import demo_nemo

ASSETS = resources.files("trt_asr.assets")
MANIFEST = Path(__file__).parent / "data" / "demo_test" / "manifest.jsonl"
VARIANTS = ["demo-tdt-buffered", "demo-tdt-cache-aware"]
ISSUE_GATE_WER = 0.05  # issue #7: offline WER <= 5 % on the held-out set
# Regression bars, offline, per attention context of the cache-aware model (measured as shipped: buffered 2.34 %;
# cache-aware (step 5090) [70,13] 1.81 %, [70,6] 2.23 %, [70,1] 2.98 %, [70,0] 3.83 %; one word error = 0.11 %).
# Only the default context carries the 5 % gate; lower-latency contexts trade accuracy for latency.
OFFLINE_MAX_WER = {"demo-tdt-buffered": ISSUE_GATE_WER, "demo-tdt-cache-aware": ISSUE_GATE_WER}
# example.wav (9 words): both exact as shipped; the bars leave one word of slack for a retrained model
EXAMPLE_MAX_WER = {"demo-tdt-buffered": 0.15, "demo-tdt-cache-aware": 0.15}
CONTEXT_MAX_WER = {(70, 6): 0.035, (70, 1): 0.04, (70, 0): 0.05}


@pytest.fixture(scope="module")
def heldout():
    from trt_asr.cli.eval import load_audio
    from trt_asr.training.data import read_manifest

    entries = read_manifest(MANIFEST)
    return [load_audio(e["audio_filepath"], 16000) for e in entries], [e["text"] for e in entries]


def test_default_model_is_the_shipped_demo():
    demo_nemo("demo-tdt-buffered")
    assert default_model_spec().endswith("demo-tdt-buffered.nemo")
    assert default_model_spec("offline").endswith("demo-tdt-buffered.nemo")
    assert default_model_spec("buffered").endswith("demo-tdt-buffered.nemo")
    demo_nemo("demo-tdt-cache-aware")
    # the full-attention model cannot stream cache-aware: that mode defaults to the cache-aware model
    assert default_model_spec("cache-aware").endswith("demo-tdt-cache-aware.nemo")
    assert default_model_spec("cache_aware").endswith("demo-tdt-cache-aware.nemo")


@pytest.mark.parametrize("name", VARIANTS)
def test_demo_model_size_and_config(name):
    import io
    import tarfile

    path = Path(demo_nemo(name))
    assert path.stat().st_size <= 30 * 2**20
    model = load_model(str(path))
    # stored with fp16 parameters (half the size) and fp32 buffers (mel filterbank, BatchNorm statistics); the
    # loaded model is fp32 throughout
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("model_weights.ckpt"))
        stored = torch.load(io.BytesIO(tar.extractfile(member).read()), map_location="cpu")
    params = dict(model.named_parameters())
    assert {k: v.dtype for k, v in stored.items() if k in params} == {k: torch.float16 for k in params}
    assert all(v.dtype == torch.float32 for k, v in stored.items() if k not in params and v.is_floating_point())
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())
    assert model.tokenizer is not None
    assert model.cfg.decoding.model_type == "tdt" and model.cfg.decoding.durations == [0, 1, 2, 3, 4]
    e = model.cfg.encoder
    if name.endswith("cache-aware"):
        assert e.att_context_style == "chunked_limited" and e.conv_context_size == "causal" and e.causal_downsampling
        for left, right in e.att_context_sizes:
            assert left % (right + 1) == 0
        assert not model.cfg.preprocessor.normalize
    else:
        assert e.att_context_sizes == [[-1, -1]] and e.att_context_style == "regular"
        assert model.cfg.preprocessor.normalize == "per_feature"


@pytest.mark.parametrize("name", VARIANTS)
def test_example_wav(name):
    from trt_asr.cli.eval import load_audio
    from trt_asr.training.infer import transcribe_arrays
    from trt_asr.training.metrics import wer

    model = load_model(demo_nemo(name))
    audio = load_audio(str(ASSETS.joinpath("example.wav")), model.cfg.sample_rate)
    ref = ASSETS.joinpath("example.txt").read_text().strip()
    hyp = transcribe_arrays(model, [audio])[0]
    assert wer([ref], [hyp]) <= EXAMPLE_MAX_WER[name], hyp


@pytest.mark.parametrize("name", VARIANTS)
def test_offline_wer_on_heldout(name, heldout):
    """The issue's gate: offline WER <= 5 % (the cache-aware model at its default context [70,13])."""
    from trt_asr.training.infer import transcribe_arrays
    from trt_asr.training.metrics import error_counts

    audios, refs = heldout
    model = load_model(demo_nemo(name))
    hyps = transcribe_arrays(model, audios, batch_size=25)
    m = error_counts(refs, hyps)
    assert m["words"] > 500
    assert m["wer"] <= OFFLINE_MAX_WER[name], f"{name}: WER {m['wer']:.3%}"


@pytest.mark.parametrize("att", list(CONTEXT_MAX_WER), ids=lambda a: f"{a[0]}-{a[1]}")
def test_cache_aware_offline_wer_per_context(att, heldout):
    """The multi-context model at its lower-latency contexts (offline forward with that chunked-limited mask)."""
    from trt_asr.training.infer import transcribe_arrays
    from trt_asr.training.metrics import wer

    audios, refs = heldout
    model = load_model(demo_nemo("demo-tdt-cache-aware"))
    assert list(att) in [list(c) for c in model.cfg.encoder.att_context_sizes]
    got = wer(refs, transcribe_arrays(model, audios, batch_size=25, att_context_size=list(att)))
    assert got <= CONTEXT_MAX_WER[att], f"context {list(att)}: WER {got:.3%}"


def test_eval_cli_gate(tmp_path):
    from trt_asr.cli import main

    demo_nemo("demo-tdt-buffered")
    small = tmp_path / "m.jsonl"
    lines = MANIFEST.read_text().splitlines()[:10]
    import json
    fixed = []
    for line in lines:
        d = json.loads(line)
        d["audio_filepath"] = str(MANIFEST.parent / d["audio_filepath"])
        fixed.append(json.dumps(d))
    small.write_text("\n".join(fixed) + "\n")
    report = tmp_path / "r.jsonl"
    assert main(["eval", "--manifest", str(small), "--max-wer", "100", "--report", str(report)]) == 0
    assert len(report.read_text().splitlines()) == 10
    assert main(["eval", "--manifest", str(small), "--max-wer", "-1"]) == 1


# ------------------------------------------------------------------------------------------------ data generation
def test_sentences_are_deterministic_and_in_vocabulary():
    from trt_asr.training.data import heldout_utterances, make_utterances
    from trt_asr.training.text import SentenceGenerator, all_words

    a, b = SentenceGenerator(3).sentences(200), SentenceGenerator(3).sentences(200)
    assert a == b and len(set(a)) == 200
    words = all_words()
    assert all(w in words for s in a for w in s.split())
    test = {u.text for u in heldout_utterances()}
    train = make_utterances(0, 500, exclude=test)
    assert not test & {u.text for u in train}
    assert all(u.voice.split("+")[-1] not in ("f4", "m4") for u in train)
    assert all(u.voice.split("+")[-1] in ("f4", "m4") for u in heldout_utterances(20))


def test_committed_manifest_matches_heldout_definition():
    from trt_asr.training.data import heldout_utterances, read_manifest

    entries = read_manifest(MANIFEST)
    utts = heldout_utterances()[: len(entries)]
    assert [e["text"] for e in entries] == [u.text for u in utts]
    assert all(Path(e["audio_filepath"]).is_file() and e["duration"] > 0.5 for e in entries)


def test_synthesis_and_longform_are_deterministic(tmp_path):
    import json
    import shutil
    import subprocess
    import sys

    import numpy as np

    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed")
    from trt_asr.training.data import make_utterances, synthesize

    u = make_utterances(11, 1, heldout=True)[0]
    x, y = synthesize(u), synthesize(u)
    assert np.array_equal(x, y) and len(x) > 8000
    script = Path(__file__).parent.parent / "scripts" / "synth_longform.py"
    subprocess.run([sys.executable, str(script), "--minutes", "0.3", "--out", str(tmp_path), "--workers", "1"],
                   check=True, capture_output=True)
    meta = json.loads((tmp_path / "longform.json").read_text())
    assert meta["duration"] >= 18 and len(meta["segments"]) >= 3
    starts = [s["start"] for s in meta["segments"]]
    assert starts == sorted(starts)
