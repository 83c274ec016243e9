"""The live-captions web page in headless Chromium with a fake microphone playing a WAV file: captions appear
(tentative tail styled apart, finals appended, latency shown), and the finals are exactly the transcript of the
audio the page sent (run through the same server DSP and streaming mode offline). With UPDATE_SCREENSHOT=1 it
saves docs/live-captions.png.

Needs Chromium (Debian: ``apt-get install -y chromium``) and Playwright for Python (``pip install playwright``;
no browser download: the system Chromium is used). Skipped with the reason when either is missing."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.test_server import MODEL, TOKEN, assert_heard, free_port, norm, serve_process, stream_reference

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") \
    or shutil.which("google-chrome")
# the docs screenshot is rewritten only on request (UPDATE_SCREENSHOT=1), so test runs leave the tree clean
SCREENSHOT = ROOT / "docs" / "live-captions.png"


pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian: apt-get install -y chromium)"),
]


@pytest.fixture(scope="module")
def playwright_sync():
    mod = pytest.importorskip("playwright.sync_api", reason="Playwright not installed (pip install playwright)")
    return mod


@pytest.fixture(scope="module")
def fake_mic_wav(tmp_path_factory):
    from trt_asr.captions.testaudio import make_speech_wav

    return make_speech_wav(tmp_path_factory.mktemp("browser") / "mic.wav")


@pytest.fixture(scope="module")
def page_server():
    with serve_process(free_port()) as base:
        yield base


def test_live_captions_page_with_fake_microphone(playwright_sync, page_server, fake_mic_wav, tmp_path):
    import soundfile as sf
    import torch

    torch.set_num_threads(1)
    from trt_asr.captions.dsp import StreamResampler
    from trt_asr.captions.transcript import join_finals
    from trt_asr.checkpoint import load_model

    duration = sf.info(str(fake_mic_wav)).duration
    args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={fake_mic_wav}%noloop", "--autoplay-policy=no-user-gesture-required"]
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=args,
            viewport={"width": 1100, "height": 560}, permissions=["microphone"])
        try:
            page = browser.new_page()
            logs = []
            page.on("console", lambda m: logs.append(m.text))
            page.goto(f"{page_server}/?record=1&token={TOKEN}")
            page.click("#start")
            page.wait_for_function("window.captionState.events.some(e => e.type === 'ready')", timeout=30000)
            # captions appear while audio is still playing
            page.wait_for_function("window.captionState.events.some(e => e.type === 'partial' && "
                                   "(e.stable || e.unstable))", timeout=60000)
            # let the whole file play (plus a little silence), then stop
            page.wait_for_function(f"parseFloat(document.getElementById('sent').textContent) > {duration + 1.5}",
                                   timeout=int((duration + 60) * 1000))
            shot = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "live-captions.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            page.click("#stop")
            page.wait_for_function("window.captionState.ended || window.captionState.error", timeout=60000)
            state = page.evaluate("({finals: window.captionState.finals, error: window.captionState.error,"
                                  " partialLat: window.captionState.partialLat})")
            sent = page.evaluate("window.getSentAudio()")
            finals_dom = page.locator("#finals .final .stable").all_text_contents()
            lat_text = page.locator("#lat-partial").text_content()
        finally:
            browser.close()

    assert state["error"] is None, state["error"]
    assert state["finals"], f"no finals; console: {logs[-5:]}"
    assert [norm(t) for t in finals_dom] == [norm(f["text"]) for f in state["finals"]]
    assert lat_text.strip() not in ("", "–") and state["partialLat"]
    # exactly the transcript of what the page sent, through the server's DSP and the same streaming mode
    audio = np.frombuffer(base64.b64decode(sent["b64"]), dtype="<f4")
    assert audio.size > duration * sent["rate"] * 0.9
    rs = StreamResampler(int(sent["rate"]), 16000)
    ref = np.concatenate([rs.process(audio[i:i + 4096]) for i in range(0, audio.size, 4096)]
                         + [rs.process(np.zeros(0, np.float32), last=True)])
    model = load_model(MODEL)
    assert norm(join_finals(state["finals"])) == stream_reference(model, ref)
    assert_heard(join_finals(state["finals"]), max_wer=0.3)  # real words, through the browser's resampling
    if not MODEL.startswith("random:"):  # a trained model: the captions say what the WAV says
        from trt_asr.transcribe import Transcriber

        offline = set(Transcriber(model).transcribe_files([fake_mic_wav])[0].text.lower().split())
        heard = set(join_finals(state["finals"]).lower().split())
        assert len(offline & heard) >= 0.5 * len(offline), (offline, heard)
