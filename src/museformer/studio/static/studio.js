// museformer studio: the page. Settings -> POST /api/generate -> poll /api/jobs/ID -> one card per
// song (piano roll, audio, downloads). Every error the server answers is shown in #message.

import { instrumentColour, instrumentName, trackProgram } from "./instruments.js";
import { PianoRoll } from "./pianoroll.js";
import { synthesize } from "./synth.js";

const $ = (id) => document.getElementById(id);
const state = { info: null, job: null, prompt: null, shown: new Set() };

function say(text, isError = false) {
  const box = $("message");
  box.hidden = !text;
  box.textContent = text || "";
  box.className = isError ? "error" : "";
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new Error("the studio server cannot be reached (is `museformer studio` still running?)");
  }
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) {
    const error = new Error(body.error || `HTTP ${response.status}`);
    error.field = body.field;
    error.status = response.status;
    throw error;
  }
  return body;
}

// ---- settings ---------------------------------------------------------------------------------
function fillModels(info) {
  const select = $("model");
  for (const m of info.models) {
    const o = document.createElement("option");
    o.value = m.id; o.textContent = m.label;
    select.appendChild(o);
  }
  select.value = info.defaults.model;
  select.addEventListener("change", () => { fillInstruments(info); fillSampling(info); });
  fillInstruments(info);
  fillSampling(info);
}

const chosenModel = (info) => info.models.find((m) => m.id === $("model").value) || info.models[0];

function fillSampling(info) {  // the chosen model's recommended top-k / temperature / top-p
  const sampling = chosenModel(info).sampling || info.defaults;
  for (const name of ["top_k", "temperature", "top_p"]) {
    if ($(name) && sampling[name] !== undefined) $(name).value = sampling[name];
  }
}

function fillInstruments(info) {
  const model = chosenModel(info);
  const box = $("instruments");
  box.textContent = "";
  const programs = model.instruments || [];
  if (programs.length > 24) {  // a general vocabulary: a list is easier than 129 boxes
    box.innerHTML = '<label>instruments <input id="instrument-list" type="text" placeholder="all, or e.g. 0,25,128"></label>';
    return;
  }
  for (const p of programs) {
    const label = document.createElement("label");
    label.innerHTML = `<input type="checkbox" value="${p}"><span class="swatch"></span>`;
    label.querySelector(".swatch").style.background = instrumentColour(p);
    label.append(instrumentName(p));
    box.appendChild(label);
  }
}

function readInstruments() {
  const list = $("instrument-list");
  if (list) {
    const text = list.value.trim();
    if (!text) return [];
    return text.split(",").map((s) => (s.trim().toLowerCase().startsWith("drum") ? 128 : Number(s)));
  }
  return [...$("instruments").querySelectorAll("input:checked")].map((i) => Number(i.value));
}

const numberOrNull = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));

function readSettings() {
  const body = {
    model: $("model").value,
    bars: numberOrNull("bars"),
    num_songs: numberOrNull("num_songs"),
    instruments: readInstruments(),
    tempo: numberOrNull("tempo"),
    temperature: numberOrNull("temperature"),
    top_k: numberOrNull("top_k"),
    top_p: numberOrNull("top_p"),
    seed: numberOrNull("seed"),
    prompt_bars: numberOrNull("prompt_bars"),
  };
  if (state.info.features.form && $("form").value.trim()) body.form = $("form").value.trim();
  if (state.prompt) { body.prompt = state.prompt.base64; body.prompt_name = state.prompt.name; }
  return body;
}

async function readPrompt(file) {
  if (!file) { state.prompt = null; return; }
  if (file.size > state.info.limits.prompt_bytes) {
    say(`prompt: ${file.name} is larger than ${state.info.limits.prompt_bytes >> 20} MiB`, true);
    $("prompt").value = ""; state.prompt = null;
    return;
  }
  const bytes = new Uint8Array(await file.arrayBuffer());
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  state.prompt = { name: file.name, base64: btoa(text) };
}

// ---- jobs -------------------------------------------------------------------------------------
function showProgress(job) {
  const running = job && job.state === "running";
  $("generate").disabled = running;
  $("stop").hidden = !running;
  $("progress").hidden = !job;
  if (!job) { $("progress-text").textContent = ""; return; }
  $("progress").max = Math.max(job.total_bars, 1);
  $("progress").value = job.total_bars ? job.bars : 0;
  const bars = job.total_bars ? `${job.bars}/${job.total_bars} bars` : `${job.bars} bars`;
  $("progress-text").textContent =
    `${job.state === "running" ? "generating" : job.state}: ${job.tokens} tokens, ${bars}, ` +
    `${job.songs_finished}/${job.num_songs} songs, ${job.seconds.toFixed(1)} s`;
  $("progress-text").dataset.state = job.state;
}

async function follow(job) {
  state.job = job;
  showProgress(job);
  while (job.state === "running") {
    await new Promise((r) => setTimeout(r, 300));
    try {
      job = await api(`/api/jobs/${job.id}`);
    } catch (e) {
      say(e.message, true);
      continue;  // the server may come back; keep asking
    }
    state.job = job;
    showProgress(job);
  }
  if (job.state === "failed") say(job.message, true);
  else if (job.state === "cancelled") say(job.message);
  else say(job.message || "");
  await refreshSongs();
}

async function generate(event) {
  event.preventDefault();
  say("");
  try {
    const { job } = await api("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(readSettings()),
    });
    await follow(job);
  } catch (e) {
    say(e.message, true);
    if (e.field && $(e.field)) $(e.field).focus();
  }
}

async function infill(name, selection, model) {
  say("");
  try {
    const { job } = await api("/api/infill", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ song: name, bars: selection, model, temperature: numberOrNull("temperature"),
                             top_k: numberOrNull("top_k"), top_p: numberOrNull("top_p"), seed: numberOrNull("seed") }),
    });
    await follow(job);
  } catch (e) { say(e.message, true); }
}

// ---- songs ------------------------------------------------------------------------------------
async function refreshSongs() {
  let songs;
  try { ({ songs } = await api("/api/songs")); } catch (e) { say(e.message, true); return; }
  // newest first; add the cards not shown yet, above the older ones
  for (const sidecar of songs.slice().reverse()) {
    if (!state.shown.has(sidecar.name)) {
      state.shown.add(sidecar.name);
      await addSong(sidecar);
    }
  }
}

async function addSong(sidecar) {
  const card = $("song-template").content.firstElementChild.cloneNode(true);
  const name = sidecar.name;
  card.id = `song-${name}`;
  card.querySelector(".title").textContent = name;
  const facts = [`${sidecar.bars} bars`, `${sidecar.num_tokens} tokens`, `seed ${sidecar.seed}`, sidecar.studio_model || ""];
  if (sidecar.infill_of) facts.push(`bars ${sidecar.infill_bars.join("-")} of ${sidecar.infill_of} regenerated`);
  if (sidecar.form) facts.push(`form ${sidecar.form}`);
  card.querySelector(".facts").textContent = facts.filter(Boolean).join(" · ");
  const base = `/api/songs/${name}`;
  card.querySelector(".dl-mid").href = `${base}.mid?download=1`;
  card.querySelector(".dl-json").href = `${base}.json?download=1`;
  const wavLink = card.querySelector(".dl-wav");
  $("songs").prepend(card);

  const song = await api(`${base}/notes`);
  const selection = card.querySelector(".selection");
  const infillButton = card.querySelector(".infill");
  const roll = new PianoRoll(card.querySelector(".roll"), song, (bars) => {
    selection.textContent = bars[0] === bars[1] ? `bar ${bars[0]} selected` : `bars ${bars[0]}-${bars[1]} selected`;
    infillButton.hidden = !state.info.features.infill;
  });
  infillButton.addEventListener("click", () => infill(name, roll.selection, sidecar.studio_model));
  roll.draw();
  const legend = card.querySelector(".legend");
  for (const track of song.tracks) {
    const item = document.createElement("span");
    item.innerHTML = '<span class="swatch"></span>';
    item.firstChild.style.background = instrumentColour(trackProgram(track));
    item.append(`${instrumentName(trackProgram(track))} (${track.notes.length})`);
    legend.appendChild(item);
  }

  const audio = card.querySelector(".audio");
  const source = card.querySelector(".audio-source");
  roll.follow(audio);
  if (sidecar.wav) {
    audio.src = `${base}.wav`;
    wavLink.href = `${base}.wav?download=1`;
    wavLink.hidden = false;
    source.textContent = "FluidSynth";
  } else {
    source.textContent = "in-browser synthesizer (no FluidSynth on the server)";
    try {
      const { blob, dropped } = await synthesize(song);
      audio.src = URL.createObjectURL(blob);
      wavLink.href = audio.src;
      wavLink.download = `${name}-browser-synth.wav`;
      wavLink.textContent = "WAV (browser synth)";
      wavLink.hidden = false;
      if (dropped) source.textContent += `, ${dropped} notes left out`;
    } catch (e) {
      source.textContent = `no audio: ${e.message}`;
    }
  }
  audio.addEventListener("loadedmetadata", () => { audio.dataset.duration = String(audio.duration); });
}

// ---- start ------------------------------------------------------------------------------------
async function start() {
  try {
    state.info = await api("/api/info");
  } catch (e) { say(e.message, true); return; }
  const info = state.info;
  fillModels(info);
  $("bars").max = info.limits.bars;
  $("num_songs").max = info.limits.num_songs;
  $("form-row").hidden = !info.features.form;
  $("folder").textContent = `songs folder: ${info.songs_folder}` + (info.wav ? " · WAV by FluidSynth" : " · audio by the browser");
  $("settings").addEventListener("submit", generate);
  $("stop").addEventListener("click", () => state.job && api(`/api/jobs/${state.job.id}/cancel`, { method: "POST" }).catch((e) => say(e.message, true)));
  $("prompt").addEventListener("change", (e) => readPrompt(e.target.files[0]));
  $("clear-prompt").addEventListener("click", () => { $("prompt").value = ""; state.prompt = null; });
  await refreshSongs();
  if (info.busy) await follow(info.busy);  // a job started before this page was (re)opened
  document.body.dataset.ready = "1";
}

start();
