// General MIDI instrument names and colours: one colour per GM family (program / 8), drums apart.
// Used by the piano roll, its legend, the instrument checkboxes and the synthesizer's voices.

const FAMILIES = [
  "piano", "chromatic percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass",
  "reed", "pipe", "synth lead", "synth pad", "synth effects", "ethnic", "percussive", "sound effects",
];
// the six instruments of the paper's LMD setting get their own names
const NAMES = { 0: "piano", 25: "guitar", 43: "bass (contrabass)", 48: "strings", 80: "square lead", 128: "drums" };
const COLOURS = [
  "#3b6fd8", "#8e5bd6", "#c25bb4", "#e0862b", "#2e9e6a", "#d24b4b", "#b5463a", "#c9a227",
  "#5aa0c8", "#57b38e", "#e05a8a", "#7d8fd8", "#9c7a4b", "#6b9c3a", "#a06a42", "#7a7a7a",
];
const DRUM_COLOUR = "#444b55";
// the six LMD instruments get colours far apart (two of them share the strings family)
const OWN_COLOURS = { 0: "#3b6fd8", 25: "#e0862b", 43: "#2e9e6a", 48: "#d24b4b", 80: "#c25bb4" };

export function instrumentName(program) {
  if (program === 128) return NAMES[128];
  return NAMES[program] || `${FAMILIES[Math.floor(program / 8)]} (${program})`;
}

export function instrumentColour(program) {
  if (program === 128) return DRUM_COLOUR;
  return OWN_COLOURS[program] || COLOURS[Math.floor(program / 8) % 16];
}

export function family(program) {
  return program === 128 ? "drums" : FAMILIES[Math.floor(program / 8)];
}

export function trackProgram(track) {
  return track.drum ? 128 : track.program;
}
