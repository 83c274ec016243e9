"""Property-based tests (hypothesis) over the WebSocket protocol parser and the decoding of uploaded audio files.

Whatever a client sends, the parser either accepts it (and the result satisfies the limits) or raises
``ProtocolError`` with a known code; the upload decoder either returns finite mono float32 or raises ``AudioError``.
Never another exception, never a hang.

CI runs 200 cases per property; the dedicated run uses more:
    TRT_ASR_FUZZ_EXAMPLES=10000 pytest tests/test_protocol_fuzz.py
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from trt_asr.serving.protocol import (ENCODINGS, ERRORS, MAX_CONFIG_BYTES, ProtocolError, StreamConfig,  # noqa: E402
                                      check_token, decode_frame, error_for, parse_config, parse_control)

EXAMPLES = int(os.environ.get("TRT_ASR_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 200,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=15), inner, max_size=6),
    max_leaves=25)
config_like = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["config", "end", 3, None]),
    "sample_rate": st.one_of(st.integers(-10, 400000), st.sampled_from([16000, 8000, 48000, 44100]),
                             st.floats(allow_nan=True), st.booleans(), st.text(max_size=5)),
    "encoding": st.one_of(st.sampled_from(list(ENCODINGS) + ["pcm_s24le", "PCM", ""]), st.integers()),
    "channels": st.one_of(st.integers(-2, 40), st.booleans(), st.floats(allow_nan=True)),
    "options": st.one_of(st.dictionaries(st.sampled_from(["vad", "normalize_gain", "nope"]),
                                         st.one_of(st.booleans(), st.integers()), max_size=3), json_values),
}) | st.dictionaries(st.text(max_size=12), json_values, max_size=6)


def _check_config(message):
    try:
        cfg = parse_config(message)
    except ProtocolError as e:
        assert e.code in ERRORS and e.message and e.close_code in ERRORS.values()
        return None
    assert isinstance(cfg, StreamConfig)
    assert isinstance(cfg.sample_rate, int) and not isinstance(cfg.sample_rate, bool)
    assert 8000 <= cfg.sample_rate <= 192000 and 1 <= cfg.channels <= 8 and cfg.encoding in ENCODINGS
    assert type(cfg.channels) is int and set(cfg.options) <= {"vad", "normalize_gain"}
    return cfg


@FUZZ
@given(config_like)
def test_config_objects(obj):
    text = json.dumps(obj, allow_nan=True)
    cfg = _check_config(text)
    if cfg is not None:  # accepted configs are exactly the valid ones
        assert set(obj) <= {"type", "sample_rate", "encoding", "channels", "options"}
        assert obj.get("type", "config") == "config"
        assert cfg.sample_rate == obj.get("sample_rate", 16000)


@FUZZ
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300),
                 st.builds(lambda d: "[" * d + "]" * d, st.integers(0, 5000)),
                 st.builds(lambda d: '{"a":' * d + "1" + "}" * d, st.integers(0, 3000)),
                 st.builds(lambda n: '{"sample_rate": 16000, "pad": "' + "x" * n + '"}', st.integers(0, 6000))))
def test_config_arbitrary_messages(message):
    _check_config(message)


@FUZZ
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200), config_like.map(json.dumps),
                 st.dictionaries(st.sampled_from(["type", "x"]), st.sampled_from(["end", "eof", "ping", "go", 1]),
                                 max_size=2).map(json.dumps)))
def test_control_messages(message):
    try:
        kind = parse_control(message)
    except ProtocolError as e:
        assert e.code in ERRORS
        return
    assert kind in ("end", "eof", "ping")


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from(list(ENCODINGS)), st.integers(1, 8), st.integers(64, 1024))
def test_audio_frames(data, encoding, channels, limit):
    cfg = StreamConfig(16000, encoding, channels)
    try:
        x = decode_frame(data, cfg, max_frame_bytes=limit)
    except ProtocolError as e:
        assert e.code in ("bad_audio", "frame_too_large")
        assert len(data) > limit or len(data) % cfg.frame_bytes or e.message.startswith("audio contains NaN")
        return
    assert len(data) <= limit and len(data) % cfg.frame_bytes == 0
    assert x.dtype == np.float32 and x.shape == (len(data) // cfg.frame_bytes,)
    assert np.isfinite(x).all()
    if encoding == "pcm_s16le":
        assert np.abs(x).max(initial=0) <= 1.0


@FUZZ
@given(st.text(max_size=40), st.one_of(st.none(), st.text(min_size=1, max_size=40)), st.booleans())
def test_token_check(given_token, token, in_header):
    headers = {"authorization": f"Bearer {given_token}"} if in_header else {}
    query = {} if in_header else {"token": given_token}
    ok = check_token(headers, query, token)
    assert ok == (not token or given_token.strip() == token if in_header else not token or given_token == token)


def test_error_for_maps_every_exception():
    assert error_for(ProtocolError("bad_audio", "x")) == ("bad_audio", "x", 1007)
    assert error_for(RuntimeError("boom"))[0] == "internal"
    from trt_asr.streaming.scheduler import AdmissionError

    assert error_for(AdmissionError("full"))[2] == 1013


def test_examples_documented():
    """The messages in the module docstring parse."""
    cfg = parse_config('{"sample_rate": 16000, "encoding": "pcm_s16le", "channels": 1, '
                       '"options": {"vad": true, "normalize_gain": false}}')
    assert cfg == StreamConfig(16000, "pcm_s16le", 1, {"vad": True, "normalize_gain": False})
    assert parse_config('{"type": "config", "encoding": "f32le"}').encoding == "f32le"
    assert parse_control('{"type": "end"}') == "end"
    with pytest.raises(ProtocolError) as e:
        parse_config(b"\x00\x01\x02\x03")
    assert e.value.code == "config_required"
    with pytest.raises(ProtocolError) as e:
        parse_config('{"sample_rate": 16000, "languag": "en"}')
    assert e.value.code == "unknown_field" and "languag" in e.value.message
    with pytest.raises(ProtocolError) as e:
        parse_config("[" * MAX_CONFIG_BYTES)
    assert e.value.code in ("bad_json", "message_too_large")


# ----------------------------------------------------------------------------------------------- uploaded files
def _load(data: bytes):
    from trt_asr.audio import AudioError, load_audio

    try:
        x = load_audio(data, 16000)
    except AudioError as e:
        assert str(e)
        return None
    # (a file of a few samples may resample to none: 1 frame at 44.1 kHz -> 0 samples at 16 kHz)
    assert x.dtype == np.float32 and x.ndim == 1 and np.isfinite(x).all()
    return x


def _wav_header(n_bytes: int, rate: int, channels: int, bits: int, fmt: int = 1) -> bytes:
    import struct

    block = channels * bits // 8
    fmt_chunk = struct.pack("<IHHIIHH", 16, fmt, channels, rate, rate * max(block, 1), block, bits)
    return (b"RIFF" + struct.pack("<I", (36 + n_bytes) & 0xFFFFFFFF) + b"WAVEfmt " + fmt_chunk + b"data"
            + struct.pack("<I", n_bytes))


@FUZZ
@given(st.one_of(
    st.binary(max_size=4096),
    st.builds(lambda b: b"RIFF" + b, st.binary(max_size=512)),
    st.builds(lambda r, c, bits, fmt, n, body: _wav_header(n, r, c, bits, fmt) + body,
              st.integers(0, 400000), st.integers(0, 9), st.sampled_from([0, 8, 16, 24, 32, 7]),
              st.sampled_from([1, 3, 0, 2, 0xFFFE]), st.integers(0, 2**32 - 1), st.binary(max_size=1024)),
    st.builds(lambda b: b"fLaC" + b, st.binary(max_size=512)),
    st.builds(lambda b: b"OggS" + b, st.binary(max_size=512)),
))
def test_upload_decoding_garbage(data):
    _load(data)


@FUZZ
@given(st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000]), st.integers(1, 3),
       st.sampled_from(["PCM_16", "PCM_24", "PCM_32", "FLOAT", "PCM_U8"]), st.integers(1, 4000),
       st.sampled_from(["WAV", "FLAC"]), st.integers(0, 2**31 - 1))
def test_upload_decoding_valid_files(rate, channels, subtype, frames, fmt, seed):
    import soundfile as sf

    if fmt == "FLAC" and subtype not in ("PCM_16", "PCM_24"):
        subtype = "PCM_16"
    rng = np.random.default_rng(seed)
    audio = (rng.uniform(-0.9, 0.9, (frames, channels))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, audio, rate, subtype=subtype, format=fmt)
    x = _load(buf.getvalue())
    assert x is not None
    expect = frames * 16000 / rate
    assert abs(x.size - expect) <= 2
    assert np.abs(x).max(initial=0) <= 3.0  # white noise resampled overshoots (Gibbs), but stays bounded
