// The in-browser synthesizer: used when the server has no FluidSynth to render a WAV, so that
// playback always works. The song (note JSON, times in seconds) is rendered offline with the
// WebAudio API into a buffer, encoded as a 16-bit WAV and handed to an <audio> element, which then
// has a duration, a seek bar and a download like the server's WAV.

import { family } from "./instruments.js";

const SAMPLE_RATE = 22050;
const MAX_NOTES = 20000;      // a bound on rendering work; later notes are left out (said on the page)
const TAIL = 1.0;             // seconds of release after the last note

// a voice per GM family: oscillator wave, how loud, attack/decay shape
function voiceOf(program) {
  const f = family(program);
  if (f === "bass") return { wave: "sawtooth", gain: 0.22, attack: 0.005, sustain: 0.6, filter: 900 };
  if (f === "strings" || f === "ensemble" || f === "synth pad") return { wave: "sawtooth", gain: 0.12, attack: 0.06, sustain: 0.8, filter: 2400 };
  if (f === "synth lead") return { wave: "square", gain: 0.09, attack: 0.005, sustain: 0.7, filter: 3000 };
  if (f === "guitar") return { wave: "triangle", gain: 0.2, attack: 0.003, sustain: 0.25, filter: 3500 };
  if (f === "organ" || f === "reed" || f === "pipe" || f === "brass") return { wave: "square", gain: 0.08, attack: 0.02, sustain: 0.8, filter: 2000 };
  return { wave: "triangle", gain: 0.22, attack: 0.003, sustain: 0.2, filter: 4000 };  // piano and the rest
}

function noiseBuffer(context) {
  const buffer = context.createBuffer(1, SAMPLE_RATE, SAMPLE_RATE);
  const data = buffer.getChannelData(0);
  let seed = 12345;  // a fixed noise: the same song always sounds the same
  for (let i = 0; i < data.length; i++) { seed = (seed * 1103515245 + 12345) & 0x7fffffff; data[i] = seed / 0x3fffffff - 1; }
  return buffer;
}

function pitchedNote(context, out, voice, pitch, velocity, start, length) {
  const osc = context.createOscillator();
  osc.type = voice.wave;
  osc.frequency.value = Math.min(440 * Math.pow(2, (pitch - 69) / 12), SAMPLE_RATE / 2 - 1);
  const filter = context.createBiquadFilter();
  filter.type = "lowpass";
  filter.frequency.value = voice.filter;
  const amp = context.createGain();
  const peak = voice.gain * (velocity / 127);
  const end = start + Math.max(length, 0.05);
  amp.gain.setValueAtTime(0, start);
  amp.gain.linearRampToValueAtTime(peak, start + voice.attack);
  amp.gain.setTargetAtTime(peak * voice.sustain, start + voice.attack, 0.15);
  amp.gain.setTargetAtTime(0, end, 0.06);
  osc.connect(filter).connect(amp).connect(out);
  osc.start(start);
  osc.stop(end + 0.4);
}

function drumHit(context, out, noise, pitch, velocity, start) {
  const level = 0.35 * (velocity / 127);
  if (pitch === 35 || pitch === 36) {  // bass drum: a falling sine
    const osc = context.createOscillator();
    const amp = context.createGain();
    osc.frequency.setValueAtTime(120, start);
    osc.frequency.exponentialRampToValueAtTime(45, start + 0.12);
    amp.gain.setValueAtTime(level * 1.6, start);
    amp.gain.exponentialRampToValueAtTime(0.001, start + 0.25);
    osc.connect(amp).connect(out);
    osc.start(start); osc.stop(start + 0.3);
    return;
  }
  const src = context.createBufferSource();
  src.buffer = noise;
  const filter = context.createBiquadFilter();
  const cymbal = pitch >= 42 && pitch !== 45 && pitch !== 47 && pitch !== 48 && pitch !== 50;
  filter.type = cymbal ? "highpass" : "bandpass";
  filter.frequency.value = cymbal ? 7000 : 1800;
  const amp = context.createGain();
  const decay = cymbal ? (pitch === 46 || pitch === 49 || pitch === 57 ? 0.35 : 0.06) : 0.15;
  amp.gain.setValueAtTime(level, start);
  amp.gain.exponentialRampToValueAtTime(0.001, start + decay);
  src.connect(filter).connect(amp).connect(out);
  src.start(start, (pitch * 0.01) % 0.5); src.stop(start + decay + 0.05);
}

// Render the song; resolves to {blob: a WAV Blob, notes: how many were played, dropped: left out}
export async function synthesize(song) {
  const duration = song.duration + TAIL;
  const context = new OfflineAudioContext(1, Math.ceil(duration * SAMPLE_RATE), SAMPLE_RATE);
  const master = context.createDynamicsCompressor();
  master.connect(context.destination);
  const noise = noiseBuffer(context);
  let played = 0, dropped = 0;
  for (const track of song.tracks) {
    const voice = voiceOf(track.program);
    for (const [, , pitch, velocity, start, length] of track.notes) {
      if (played >= MAX_NOTES) { dropped++; continue; }
      if (track.drum) drumHit(context, master, noise, pitch, velocity, start);
      else pitchedNote(context, master, voice, pitch, velocity, start, length);
      played++;
    }
  }
  const buffer = await context.startRendering();
  return { blob: encodeWav(buffer.getChannelData(0), SAMPLE_RATE), notes: played, dropped };
}

// 16-bit mono PCM WAV
export function encodeWav(samples, rate) {
  const bytes = new ArrayBuffer(44 + samples.length * 2);
  const v = new DataView(bytes);
  const text = (at, s) => { for (let i = 0; i < s.length; i++) v.setUint8(at + i, s.charCodeAt(i)); };
  text(0, "RIFF"); v.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, rate, true); v.setUint32(28, rate * 2, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true);
  text(36, "data"); v.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    v.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return new Blob([bytes], { type: "audio/wav" });
}
