// A piano roll on a canvas, drawn from the server's note JSON (notes.py): one colour per
// instrument, bar lines and numbers, a playhead that follows an <audio> element, and a bar
// selection by dragging (what "regenerate selected bars" sends).

import { instrumentColour, trackProgram } from "./instruments.js";

export class PianoRoll {
  constructor(canvas, song, onSelect) {
    this.canvas = canvas;
    this.song = song;               // {tpq, duration, bars: [{tick, time}], tracks: [...]}
    this.onSelect = onSelect;
    this.selection = null;          // [first, last] bar numbers from 1, inclusive
    this.playTime = null;           // seconds, while playing
    const pitches = song.tracks.flatMap((t) => t.notes.map((n) => (t.drum ? null : n[2]))).filter((p) => p !== null);
    this.low = pitches.length ? Math.max(Math.min(...pitches) - 2, 0) : 36;
    this.high = pitches.length ? Math.min(Math.max(...pitches) + 2, 127) : 84;
    this.barCount = Math.max(song.bars.length - 1, 1);
    this._drag = null;
    canvas.addEventListener("mousedown", (e) => this._down(e));
    window.addEventListener("mousemove", (e) => this._move(e));
    window.addEventListener("mouseup", () => this._up());
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  // x in bars (fractional) of a tick / of a time in seconds
  barOfTick(tick) {
    const bars = this.song.bars;
    let i = 0;
    while (i + 2 < bars.length && bars[i + 1].tick <= tick) i++;
    return i + (tick - bars[i].tick) / Math.max(bars[i + 1].tick - bars[i].tick, 1);
  }
  barOfTime(time) {
    const bars = this.song.bars;
    let i = 0;
    while (i + 2 < bars.length && bars[i + 1].time <= time) i++;
    return i + (time - bars[i].time) / Math.max(bars[i + 1].time - bars[i].time, 1e-6);
  }

  draw() {
    const c = this.canvas;
    const width = c.clientWidth || 800;
    const height = c.clientHeight || 240;
    const scale = window.devicePixelRatio || 1;
    if (c.width !== Math.round(width * scale)) c.width = Math.round(width * scale);
    if (c.height !== Math.round(height * scale)) c.height = Math.round(height * scale);
    const g = c.getContext("2d");
    g.setTransform(scale, 0, 0, scale, 0, 0);
    g.clearRect(0, 0, width, height);
    const left = 4, top = 14, drumLane = this.song.tracks.some((t) => t.drum) ? 26 : 0;
    const plotH = height - top - 4 - drumLane;
    const xOf = (bar) => left + (bar / this.barCount) * (width - left - 4);
    const rows = this.high - this.low + 1;
    const yOf = (pitch) => top + ((this.high - pitch) / rows) * plotH;
    const rowH = Math.max(plotH / rows, 1.5);
    // selection
    if (this.selection) {
      g.fillStyle = "rgba(47, 111, 222, 0.12)";
      g.fillRect(xOf(this.selection[0] - 1), 0, xOf(this.selection[1]) - xOf(this.selection[0] - 1), height);
    }
    // bar lines and numbers
    g.font = "10px system-ui, sans-serif";
    g.textBaseline = "top";
    const every = Math.max(1, Math.ceil(this.barCount / ((width - 10) / 28)));
    for (let b = 0; b <= this.barCount; b++) {
      const x = Math.round(xOf(b)) + 0.5;
      g.strokeStyle = b % 4 === 0 ? "#c4cbd3" : "#e4e8ec";
      g.beginPath(); g.moveTo(x, top); g.lineTo(x, height); g.stroke();
      if (b < this.barCount && b % every === 0) { g.fillStyle = "#8a949f"; g.fillText(String(b + 1), x + 2, 1); }
    }
    if (drumLane) {
      g.fillStyle = "#f0f2f4";
      g.fillRect(left, height - drumLane - 2, width - left - 4, drumLane);
    }
    // notes
    let drawn = 0;
    for (const track of this.song.tracks) {
      g.fillStyle = instrumentColour(trackProgram(track));
      g.globalAlpha = 0.85;
      for (const [tick, length, pitch] of track.notes) {
        const x0 = xOf(this.barOfTick(tick));
        const x1 = Math.max(xOf(this.barOfTick(tick + length)), x0 + 1.5);
        const y = track.drum ? height - drumLane - 2 + ((pitch % 12) / 12) * (drumLane - 2) : yOf(pitch);
        g.fillRect(x0, y, x1 - x0, track.drum ? 2 : rowH);
        drawn++;
      }
    }
    g.globalAlpha = 1;
    // playhead
    if (this.playTime !== null) {
      const x = Math.round(xOf(this.barOfTime(this.playTime))) + 0.5;
      g.strokeStyle = "#d03030"; g.lineWidth = 1.5;
      g.beginPath(); g.moveTo(x, 0); g.lineTo(x, height); g.stroke();
      g.lineWidth = 1;
    }
    c.dataset.drawnNotes = String(drawn);
    c.dataset.bars = String(this.barCount);
  }

  follow(audio) {
    const tick = () => {
      this.playTime = audio.paused && audio.currentTime === 0 ? null : audio.currentTime;
      this.draw();
      if (!audio.paused) requestAnimationFrame(tick);
    };
    audio.addEventListener("play", () => requestAnimationFrame(tick));
    audio.addEventListener("seeked", tick);
    audio.addEventListener("ended", () => { this.playTime = null; this.draw(); });
  }

  _barAt(event) {
    const r = this.canvas.getBoundingClientRect();
    const fraction = (event.clientX - r.left - 4) / Math.max(r.width - 8, 1);
    return Math.min(Math.max(Math.floor(fraction * this.barCount) + 1, 1), this.barCount);
  }
  _down(e) { this._drag = this._barAt(e); this._setSelection(this._drag, this._drag); }
  _move(e) { if (this._drag !== null) { const b = this._barAt(e); this._setSelection(Math.min(b, this._drag), Math.max(b, this._drag)); } }
  _up() { this._drag = null; }
  _setSelection(first, last) {
    this.selection = [first, last];
    this.draw();
    if (this.onSelect) this.onSelect(this.selection);
  }
}
