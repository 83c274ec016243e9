// Live captions page: microphone -> AudioWorklet -> WebSocket (f32le at the AudioContext rate; the server
// resamples) -> caption events (docs/events.md). Partial = committed text + tentative tail (styled differently);
// finals are appended. Latency = now - when the audio the event covers was sent.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const record = params.get("record") === "1"; // tests: keep the audio that was sent
  const state = { events: [], finals: [], ended: false, error: null, sentChunks: [], partialLat: [], finalLat: [] };
  window.captionState = state;
  let ctx = null, stream = null, node = null, ws = null, sentSamples = 0, rate = 0;
  const sendTimes = []; // [audio seconds at end of chunk, performance.now()]

  if (params.get("token")) $("token").value = params.get("token");

  function sentAt(audioSec) {
    // wall time when the sample at audioSec was sent (first chunk whose end >= audioSec)
    let lo = 0, hi = sendTimes.length - 1;
    if (hi < 0) return null;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (sendTimes[mid][0] >= audioSec - 1e-6) hi = mid; else lo = mid + 1;
    }
    return sendTimes[lo][1];
  }
  function median(a) {
    if (!a.length) return null;
    const s = [...a].sort((x, y) => x - y);
    return s[Math.floor((s.length - 1) / 2)];
  }
  function setStatus(s) { $("status").textContent = s; }

  function onEvent(e) {
    state.events.push(e);
    const now = performance.now();
    if (e.type === "ready") {
      $("model").textContent = e.model; $("mode").textContent = e.mode; setStatus("listening");
    } else if (e.type === "partial") {
      $("stable").textContent = e.stable;
      $("unstable").textContent = e.unstable;
      const t = sentAt(e.audio_end);
      if (t !== null && (e.stable || e.unstable)) {
        const lat = now - t; state.partialLat.push(lat);
        $("lat-partial").textContent = lat.toFixed(0);
        $("lat-partial-p50").textContent = median(state.partialLat).toFixed(0);
      }
    } else if (e.type === "final") {
      state.finals.push(e);
      const div = document.createElement("div");
      div.className = "final";
      const ts = document.createElement("span"); ts.className = "t"; ts.textContent = e.start.toFixed(2);
      const tx = document.createElement("span"); tx.className = "stable"; tx.textContent = e.text;
      div.append(ts, tx);
      $("finals").append(div);
      $("stable").textContent = ""; $("unstable").textContent = "";
      const t = sentAt(e.end);
      if (t !== null) {
        const lat = now - t; state.finalLat.push(lat);
        $("lat-final").textContent = lat.toFixed(0);
        $("lat-final-p50").textContent = median(state.finalLat).toFixed(0);
      }
    } else if (e.type === "error") {
      state.error = e; setStatus("error: " + e.message);
    } else if (e.type === "end") {
      state.ended = true;
      const st = e.stats || {}, pl = st.partial_latency_ms || {}, fl = st.final_latency_ms || {};
      setStatus(`ended · server partial p50/p95 ${pl.p50}/${pl.p95} ms · final p50/p95 ${fl.p50}/${fl.p95} ms`);
    }
  }

  async function start() {
    $("start").disabled = true;
    state.ended = false; state.error = null;
    sentSamples = 0; sendTimes.length = 0; state.sentChunks = []; // audio times restart at 0 for a new stream
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: {
        echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 } });
      ctx = new AudioContext();
      rate = ctx.sampleRate; $("rate").textContent = rate;
      await ctx.audioWorklet.addModule("/static/worklet.js");
      const src = ctx.createMediaStreamSource(stream);
      node = new AudioWorkletNode(ctx, "capture-processor");
      const mute = ctx.createGain(); mute.gain.value = 0;
      src.connect(node); node.connect(mute); mute.connect(ctx.destination);
    } catch (err) {
      setStatus("microphone error: " + err); $("start").disabled = false; return;
    }
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const tok = $("token").value.trim();
    ws = new WebSocket(`${proto}//${location.host}/v1/stream` + (tok ? `?token=${encodeURIComponent(tok)}` : ""));
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      ws.send(JSON.stringify({ sample_rate: rate, encoding: "f32le", channels: 1, options: {} }));
      node.port.onmessage = (m) => {
        if (!ws || ws.readyState !== WebSocket.OPEN) return;
        const block = m.data;
        ws.send(block.buffer);
        sentSamples += block.length;
        sendTimes.push([sentSamples / rate, performance.now()]);
        if (record) state.sentChunks.push(block);
        $("sent").textContent = (sentSamples / rate).toFixed(1);
      };
      $("stop").disabled = false;
    };
    ws.onmessage = (m) => { try { onEvent(JSON.parse(m.data)); } catch (err) { console.error(err); } };
    ws.onclose = (c) => { if (!state.ended && !state.error) setStatus(`closed (${c.code} ${c.reason})`); cleanup(); };
    ws.onerror = () => setStatus("connection error");
  }

  function cleanup() {
    if (node) node.port.onmessage = null;
    if (stream) stream.getTracks().forEach((t) => t.stop());
    if (ctx) ctx.close();
    node = stream = ctx = null;
    $("start").disabled = false; $("stop").disabled = true;
  }

  function stop() {
    $("stop").disabled = true;
    if (node) node.port.onmessage = null; // stop sending before "end"
    if (ws && ws.readyState === WebSocket.OPEN) { ws.send(JSON.stringify({ type: "end" })); setStatus("finishing"); }
  }

  // tests: the exact audio that was sent, as base64 little-endian float32
  window.getSentAudio = () => {
    const n = state.sentChunks.reduce((a, c) => a + c.length, 0);
    const all = new Float32Array(n); let o = 0;
    for (const c of state.sentChunks) { all.set(c, o); o += c.length; }
    const bytes = new Uint8Array(all.buffer); let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return { rate, b64: btoa(s) };
  };
  $("start").onclick = start;
  $("stop").onclick = stop;
})();
