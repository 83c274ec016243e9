// AudioWorklet: downmix the microphone to mono and post ~40 ms Float32 blocks to the page (never blocks audio).
class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.buf = new Float32Array(2048);
    this.n = 0;
  }
  process(inputs) {
    const chans = inputs[0];
    if (!chans || chans.length === 0) return true;
    const frames = chans[0].length;
    for (let i = 0; i < frames; i++) {
      let s = 0;
      for (let c = 0; c < chans.length; c++) s += chans[c][i];
      this.buf[this.n++] = s / chans.length;
      if (this.n === this.buf.length) {
        this.port.postMessage(this.buf.slice(0));
        this.n = 0;
      }
    }
    return true;
  }
}
registerProcessor("capture-processor", CaptureProcessor);
