"""Writing generated songs to a folder: what ``museformer generate`` does after sampling.

This module owns the output folder of a generation run: song names (``song_000``, ``song_001``,
... claimed with an exclusive create so that concurrent runs never overwrite each other), the MIDI
file and its JSON sidecar (checkpoint hash, options, seed: everything needed to reproduce the song),
optional renders (piano roll, WAV), and the progress bar. Sampling, prompts and stopping rules are
``museformer.generate``'s; every file is written through ``museformer.files`` (atomic, size-checked).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from museformer.errors import MuseformerError, ParameterError
from museformer.generate import (
    SampleConfig,
    Song,
    _as_model,
    check_run_options,
    decoding_model,
    decoding_precision,
    generate,
    song_seeds,
)
from museformer.vocab import EOS_ID


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (checkpoint weights, prompt MIDI)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


SONG_PREFIX = "song_"


def song_name(number: int) -> str:
    """The file stem of song ``number`` in an output folder: ``song_000``, ``song_001``, ..."""
    return f"{SONG_PREFIX}{number:03d}"


def next_song_number(out_dir: str | os.PathLike) -> int:
    """One past the highest ``song_NNN.mid`` in a folder (0 when there is none): where numbering starts."""
    numbers = (int(p.stem[len(SONG_PREFIX):]) for p in Path(out_dir).glob(f"{SONG_PREFIX}*.mid")
               if p.stem[len(SONG_PREFIX):].isdigit())
    return 1 + max(numbers, default=-1)


def use_threads(threads: int | None) -> None:
    """Set PyTorch's CPU thread count for this run (None: leave it as it is).

    Raises:
        ParameterError("threads", ...): fewer than 1.
    """
    if threads is None:
        return
    if threads < 1:
        raise ParameterError("threads", f"must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def save_song(song: Song, out_dir: str | os.PathLike, name: str | None = None, *, metadata: dict[str, Any],
              render: bool = False, soundfont: str | os.PathLike | None = None, start: int = 0) -> dict[str, Any]:
    """Write one song: ``NAME.mid``, ``NAME.json`` (how to reproduce it) and, with ``render``,
    ``NAME.png`` (piano roll) and ``NAME.wav``. Every file is written atomically and checked
    (a short write, e.g. on a full disk, is a ``WriteError`` and never leaves a cut file).

    With ``name=None`` the song takes the first free name ``song_NNN`` (NNN >= ``start``), claimed
    with an exclusive create (``files.write_bytes_new``): runs writing into one folder at the same
    time never overwrite each other. A given ``name`` replaces that song.

    Rendering problems (no matplotlib, no FluidSynth or soundfont) never cost the MIDI file: they
    are returned under ``"render_errors"`` (and recorded in the sidecar).

    Returns:
        the sidecar dict that was written.
    """
    from museformer.files import (
        midi_bytes,
        write_bytes_atomic,
        write_bytes_new,
        write_text_atomic,
    )

    out = Path(out_dir)
    data = midi_bytes(song.score)
    if name is None:
        number, midi = write_bytes_new(data, lambda n: out / f"{song_name(n)}.mid", start)
        name = song_name(number)
    else:
        midi = out / f"{name}.mid"
        write_bytes_atomic(midi, data)
    sidecar = {
        **metadata,
        "midi": midi.name,
        "seed": song.seed,
        "num_tokens": song.num_tokens,
        "prompt_tokens": song.prompt_length,
        "generated_tokens": song.num_tokens - song.prompt_length,
        "bars": song.bars,
        "finish": song.finish,
        "skipped_tokens": song.skipped,
        "render_errors": [],
    }
    if render:
        from museformer.render import piano_roll, render_audio

        for what, call in (("png", lambda: piano_roll(song.score, out / f"{name}.png")),
                           ("wav", lambda: render_audio(song.score, out / f"{name}.wav", soundfont=soundfont))):
            try:
                call()
                sidecar[what] = f"{name}.{what}"
            except MuseformerError as e:
                sidecar["render_errors"].append(f"{what}: {e}")
    write_text_atomic(out / f"{name}.json", json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def generate_to_folder(
    out_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    *,
    model: str | None = None,
    num_songs: int = 1,
    prompt: str | os.PathLike | None = None,
    prompt_bars: int | None = None,
    config: SampleConfig | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    render: bool = False,
    soundfont: str | os.PathLike | None = None,
    threads: int | None = None,
    log=None,
    progress: bool = False,
    form=None,
    form_file: str | os.PathLike | None = None,
    candidates: int = 8,
    precision: str = "fp32",
) -> list[dict[str, Any]]:
    """What ``museformer generate`` does: generate songs and write them with their sidecars.

    Songs are named ``song_000.mid``, ``song_001.mid``, ... (continuing after the highest existing
    number; each name is claimed with an exclusive create, so neither a second run nor one running
    at the same time into the same folder ever overwrites a song). Every option and the output
    folder are checked before the model is loaded. ``progress`` shows a tqdm bar (bars with a bar
    limit, else tokens) on a terminal. ``model`` names a bundled model (instead of ``checkpoint``);
    with neither, the default bundled model. ``config`` is used as given (the CLI applies a bundled
    model's recommended length itself). With ``form`` (plan text or dict) or ``form_file`` (JSON)
    songs follow a form plan (``museformer.form``; the sidecar records it) and ``render`` also
    draws ``song_NNN_form.png``, the plan next to the achieved bar similarity. ``precision``: fp32,
    bf16 or auto (``generate.decoding_precision``; the sidecar records what was used). Returns the sidecars.
    """
    import platform

    from museformer import __version__
    from museformer.files import check_output_path

    config = config or SampleConfig()
    plan = None
    if form is not None or form_file is not None:
        from museformer.form import load_plan, plan_bars

        plan = load_plan(form, form_file)
        config = plan_bars(plan, config)
    check_output_path(out_dir, "dir", what="output folder")
    check_run_options(config, num_songs=num_songs, batch_size=batch_size, prompt_bars=prompt_bars)
    use_threads(threads)
    if prompt_bars is not None and prompt is None:
        raise MuseformerError("--prompt-bars needs --prompt MIDI")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise MuseformerError(f"--device must be cpu or cuda, got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise MuseformerError("--device cuda: no CUDA GPU is available to this PyTorch")
    precision = decoding_precision(precision, device)
    model, tokenizer, directory = _as_model(model, None, checkpoint, device)
    model = decoding_model(model, precision, owned=True)  # loaded here: cast in place, not copied
    if config.seed is None:  # fix the seed now so the sidecars can name it
        config = dataclasses.replace(config, seed=song_seeds(config, 1)[0])
    with _progress_bar(progress, num_songs, config, tokenizer.vocab.bar_id) as on_event:
        songs = generate(model=model, tokenizer=tokenizer, num_songs=num_songs, prompt=prompt,
                         prompt_bars=prompt_bars, config=config, batch_size=batch_size, device=device,
                         progress=on_event, form=plan, candidates=candidates, precision=precision)
    out = Path(out_dir)
    first = next_song_number(out)
    metadata = {
        "museformer_version": __version__,
        "checkpoint": str(directory),
        "checkpoint_sha256": file_sha256(directory / "model.safetensors"),
        "options": config.to_dict(),
        "num_songs": num_songs,
        "batch_size": batch_size or num_songs,
        "prompt": None if prompt is None else str(prompt),
        "prompt_sha256": None if prompt is None else file_sha256(prompt),
        "prompt_bars": prompt_bars,
        "device": str(device),
        "precision": precision,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        **({"form": plan.to_dict(), "candidates": candidates} if plan is not None else {}),
    }
    sidecars = []
    for k, song in enumerate(songs):
        sidecar = save_song(song, out, metadata={**metadata, "song_index": k}, render=render,
                            soundfont=soundfont, start=first)
        first = int(Path(sidecar["midi"]).stem[len(SONG_PREFIX):]) + 1
        sidecars.append(sidecar)
        if log is not None:
            log(f"{out / sidecar['midi']}: {song.num_tokens} tokens, {sidecar['bars']} bars ({song.finish})")
            for problem in sidecar["render_errors"]:
                log(f"  not rendered: {problem}")
        if render and plan is not None:  # the plan next to the achieved bar similarity
            from museformer.form import render_form

            picture = out / f"{Path(sidecar['midi']).stem}_form.png"
            try:
                render_form(plan, song.ids, tokenizer.vocab, picture, title=sidecar["midi"])
                if log is not None:
                    log(f"  plan vs achieved similarity: {picture}")
            except MuseformerError as e:
                if log is not None:
                    log(f"  not rendered: form png: {e}")
    return sidecars



class _progress_bar:
    """A tqdm bar over a run's bars (with a bar limit) or tokens; a no-op when ``enabled`` is False.

    tqdm's ``disable=None`` turns it off when stderr is not a terminal (logs, pipes), as ``prepare``.
    Entering yields the ``progress(song, token, finish)`` callback for ``generate``.
    """

    def __init__(self, enabled: bool, num_songs: int, config: SampleConfig, bar_id: int) -> None:
        self.enabled, self.num_songs, self.config, self.bar_id = enabled, num_songs, config, bar_id
        self.bar = None
        self.finished = 0

    def __enter__(self):
        if not self.enabled:
            return None
        from tqdm.auto import tqdm

        by_bars = self.config.max_bars is not None
        self.bar = tqdm(total=self.num_songs * self.config.max_bars if by_bars else None,
                        unit="bar" if by_bars else "token", desc="generating", disable=None, leave=True)
        self.by_bars = by_bars
        return self.on_event

    def on_event(self, song: int, token: int, finish: str | None) -> None:
        if token >= 0 and token != EOS_ID and (token == self.bar_id or not self.by_bars):
            self.bar.update(1)
        if finish is not None:
            self.finished += 1
            self.bar.set_postfix_str(f"{self.finished}/{self.num_songs} songs", refresh=False)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
