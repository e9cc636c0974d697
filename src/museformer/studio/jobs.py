"""The studio's work: one generation job at a time in a worker thread, and the songs folder it fills.

This module owns

- ``Job``: one run (generation or infilling) and its live progress (tokens, bars, songs), read by
  the page while a worker thread writes it;
- ``Studio``: the models (loaded once, on first use), the single job slot (a second request while
  a job runs is ``Busy``, answered with HTTP 409), cancelling, and the songs folder.

A job belongs to the server, not to a browser tab: closing the page mid-generation changes nothing,
the songs are written and listed when the page comes back. Songs are written with
``songs.save_song`` (MIDI published under a fresh ``song_NNN`` name with an exclusive create, every
file atomic and size-checked); a song is listed only once its JSON sidecar exists, and the sidecar
is written last, so the page never offers a half-written file. A WAV is rendered with FluidSynth
(``museformer.render``) when it is installed; otherwise the sidecar records why not and the page
synthesises the audio itself.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from museformer.errors import MuseformerError
from museformer.studio.settings import GenerateRequest, ModelChoice

SONG_NAME = re.compile(r"^song_\d{3,9}$")
FILE_KINDS = {"mid": "audio/midi", "wav": "audio/wav", "json": "application/json"}


class Busy(MuseformerError):
    """A job is already running; the message says which and how far it is."""


class Cancelled(Exception):
    """Raised inside the progress callback to stop a job the user cancelled (or the server closing)."""


# ---------------------------------------------------------------------------------------------
# one job
# ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One run and its progress. The worker thread writes the counters; the server reads snapshots.

    Attributes:
        id: 1, 2, ... in order of submission.
        kind: ``"generate"`` or ``"infill"``.
        num_songs: songs asked for.
        total_bars: bars to generate in all (0 = unknown), for the progress bar.
        state: ``"running"``, then ``"done"``, ``"failed"`` or ``"cancelled"``.
        tokens, bars, songs_finished: progress so far (new tokens and complete bars, all songs).
        songs: names of the songs written (only complete ones: sidecar on disk).
        message: why it failed, or a note (e.g. no FluidSynth).
    """

    id: int
    kind: str
    num_songs: int
    total_bars: int
    state: str = "running"
    tokens: int = 0
    bars: int = 0
    songs_finished: int = 0
    songs: list[str] = field(default_factory=list)
    message: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def snapshot(self) -> dict[str, Any]:
        """The JSON the page polls."""
        end = self.finished if self.finished is not None else time.time()
        return {"id": self.id, "kind": self.kind, "state": self.state, "num_songs": self.num_songs,
                "total_bars": self.total_bars, "tokens": self.tokens, "bars": self.bars,
                "songs_finished": self.songs_finished, "songs": list(self.songs), "message": self.message,
                "seconds": round(end - self.started, 2)}

    def describe(self) -> str:
        done = f"{self.bars}/{self.total_bars} bars" if self.total_bars else f"{self.tokens} tokens"
        return f"job {self.id} ({self.kind}) is still running: {done}"


# ---------------------------------------------------------------------------------------------
# the studio
# ---------------------------------------------------------------------------------------------
class Studio:
    """Models, the one job slot and the songs folder of a running studio.

    Args:
        models: the models on offer (``settings.available_models``).
        out_dir: the songs folder (created on first write).
        device: where models run (``"cpu"``, ``"cuda"``...).
    """

    def __init__(self, models: list[ModelChoice], out_dir: str | Path, device: str = "cpu") -> None:
        self.models = list(models)
        self.out_dir = Path(out_dir)
        self.device = str(device)
        self._lock = threading.Lock()  # guards the job slot and the caches
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._current: Job | None = None
        self._thread: threading.Thread | None = None
        self._loaded: dict[str, tuple[Any, Any]] = {}
        self._tokenizers: dict[str, Any] = {}
        self._hashes: dict[str, str] = {}

    # -- models --------------------------------------------------------------------------------
    def model_choice(self, model_id: str | None) -> ModelChoice:
        for m in self.models:
            if m.id == model_id:
                return m
        return self.models[0]

    def tokenizer_of(self, choice: ModelChoice):
        """The model's tokenizer (from ``tokenizer.json``; no weights are read)."""
        from museformer.checkpoint import TOKENIZER_FILE
        from museformer.tokenizer import Tokenizer

        with self._lock:
            if choice.id not in self._tokenizers:
                self._tokenizers[choice.id] = Tokenizer.load(choice.path / TOKENIZER_FILE)
            return self._tokenizers[choice.id]

    def _model(self, choice: ModelChoice):
        """(model, tokenizer), loaded once per model (in the worker thread: it may take a while)."""
        from museformer.checkpoint import load
        from museformer.songs import file_sha256

        if choice.id not in self._loaded:
            model, tokenizer = load(choice.path, device=self.device)
            self._hashes[choice.id] = file_sha256(choice.path / "model.safetensors")
            self._loaded[choice.id] = (model, tokenizer)
        return self._loaded[choice.id]

    # -- jobs ----------------------------------------------------------------------------------
    def job(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def current(self) -> Job | None:
        return self._current if self._current is not None and self._current.running else None

    def _start(self, kind: str, num_songs: int, total_bars: int, work) -> Job:
        """Claim the job slot and run ``work(job)`` in a worker thread; ``Busy`` when it is taken."""
        with self._lock:
            if self._current is not None and self._current.running:
                raise Busy(f"busy: {self._current.describe()}; wait for it to finish or press Stop")
            job = Job(next(self._ids), kind, num_songs, total_bars)
            self._jobs[job.id] = job
            self._current = job
            thread = threading.Thread(target=self._run, args=(job, work), name=f"museformer-studio-job-{job.id}",
                                      daemon=True)
            self._thread = thread
            thread.start()
        return job

    def _run(self, job: Job, work) -> None:
        try:
            work(job)
            job.state = "done"
        except Cancelled:
            job.state = "cancelled"
            job.message = "stopped; songs finished before the stop are kept" if job.songs else "stopped"
        except MuseformerError as e:
            job.state, job.message = "failed", str(e)
        except Exception as e:  # a bug must end the job with a message, never the server
            job.state, job.message = "failed", f"internal error: {type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            job.finished = time.time()

    def cancel(self, job_id: int) -> Job | None:
        """Ask a running job to stop (it stops at its next token)."""
        job = self._jobs.get(job_id)
        if job is not None and job.running:
            job.cancel.set()
        return job

    def close(self, timeout: float = 30.0) -> None:
        """Stop the running job (if any) and wait for its thread: the server is shutting down."""
        job, thread = self._current, self._thread
        if job is not None and job.running:
            job.cancel.set()
        if thread is not None:
            thread.join(timeout)

    def _progress(self, job: Job, bar_id: int):
        from museformer.vocab import EOS_ID

        def on_event(song: int, token: int, finish: str | None) -> None:
            if job.cancel.is_set():
                raise Cancelled()
            if token >= 0 and token != EOS_ID:
                job.tokens += 1
                job.bars += token == bar_id
            if finish is not None:
                job.songs_finished += 1

        return on_event

    # -- generation ----------------------------------------------------------------------------
    def submit_generate(self, request: GenerateRequest) -> Job:
        """Start a generation job; ``Busy`` while another one runs."""
        return self._start("generate", request.num_songs, request.total_bars,
                           lambda job: self._generate(job, request))

    def _generate(self, job: Job, request: GenerateRequest) -> None:
        from museformer.generate import generate, song_seeds

        model, tokenizer = self._model(request.model)
        config = request.config
        if config.seed is None:  # fix the seed now so that the sidecars can name it
            config = dataclasses.replace(config, seed=song_seeds(config, 1)[0])
        extra = {"form": request.form} if request.form else {}
        songs = generate(model=model, tokenizer=tokenizer, num_songs=request.num_songs,
                         prompt=request.prompt_ids, config=config, device=self.device,
                         progress=self._progress(job, tokenizer.vocab.bar_id), **extra)
        metadata = self._metadata(request.model, config, request.num_songs)
        metadata.update({"prompt": request.prompt_name, "prompt_sha256": request.prompt_sha256,
                         "prompt_bars": request.prompt_bars, "form": request.form})
        self._save(job, songs, metadata)

    def submit_infill(self, song: str, first: int, last: int, config, model_id: str | None = None) -> Job:
        """Start a job that regenerates bars ``first..last`` of a song (``features.run_infill``)."""
        return self._start("infill", 1, last - first + 1,
                           lambda job: self._infill(job, song, first, last, config, model_id))

    def _infill(self, job: Job, song: str, first: int, last: int, config, model_id: str | None) -> None:
        from museformer.generate import song_seeds
        from museformer.studio.features import run_infill

        sidecar = self.sidecar(song)
        choice = self.model_choice(model_id or (sidecar or {}).get("studio_model"))
        model, tokenizer = self._model(choice)
        if config.seed is None:
            config = dataclasses.replace(config, seed=song_seeds(config, 1)[0])
        ids = [int(t) for t in tokenizer.encode_file(self.out_dir / f"{song}.mid", as_ids=True)]
        songs = run_infill(ids, first, last, model=model, tokenizer=tokenizer, config=config,
                           progress=self._progress(job, tokenizer.vocab.bar_id))
        metadata = self._metadata(choice, config, len(songs))
        metadata.update({"infill_of": song, "infill_bars": [first, last]})
        self._save(job, songs, metadata)

    def _metadata(self, choice: ModelChoice, config, num_songs: int) -> dict[str, Any]:
        import platform

        import torch

        from museformer import __version__

        return {"museformer_version": __version__, "made_with": "museformer studio", "studio_model": choice.id,
                "checkpoint": str(choice.path), "checkpoint_sha256": self._hashes.get(choice.id),
                "options": config.to_dict(), "num_songs": num_songs, "batch_size": num_songs,
                "device": self.device, "torch_version": torch.__version__,
                "python_version": platform.python_version()}

    def _save(self, job: Job, songs: list, metadata: dict[str, Any]) -> None:
        """Write the songs (MIDI, then WAV when FluidSynth can, then the sidecar last) and list them."""
        from museformer.files import write_text_atomic
        from museformer.render import render_audio
        from museformer.songs import SONG_PREFIX, next_song_number, save_song

        first = next_song_number(self.out_dir)
        for k, song in enumerate(songs):
            if job.cancel.is_set():
                raise Cancelled()
            sidecar = save_song(song, self.out_dir, metadata={**metadata, "song_index": k}, start=first)
            name = Path(sidecar["midi"]).stem
            first = int(name[len(SONG_PREFIX):]) + 1
            try:
                render_audio(song.score, self.out_dir / f"{name}.wav")
                sidecar["wav"] = f"{name}.wav"
            except MuseformerError as e:
                sidecar["render_errors"].append(f"wav: {e}")
                job.message = "no WAV: the page plays its own synthesizer (" + str(e).split(":")[0] + ")"
            write_text_atomic(self.out_dir / f"{name}.json", json.dumps(sidecar, indent=2) + "\n")
            job.songs.append(name)

    # -- the songs folder ------------------------------------------------------------------------
    def sidecar(self, name: str) -> dict[str, Any] | None:
        """A listed song's sidecar (None when the name is not a complete song of this folder)."""
        if not SONG_NAME.match(name):
            return None
        midi, path = self.out_dir / f"{name}.mid", self.out_dir / f"{name}.json"
        if not midi.is_file() or not path.is_file():
            return None
        try:
            sidecar = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(sidecar, dict):
            return None
        sidecar["name"] = name
        sidecar["wav"] = sidecar.get("wav") if (self.out_dir / f"{name}.wav").is_file() else None
        return sidecar

    def songs(self) -> list[dict[str, Any]]:
        """Every complete song of the folder, newest first."""
        if not self.out_dir.is_dir():
            return []
        names = sorted((p.stem for p in self.out_dir.glob("song_*.json") if SONG_NAME.match(p.stem)),
                       key=lambda n: int(n[5:]), reverse=True)
        return [s for s in (self.sidecar(n) for n in names) if s is not None]

    def song_file(self, name: str, kind: str) -> Path | None:
        """The path of a listed song's ``.mid``, ``.wav`` or ``.json`` (None when not offered)."""
        sidecar = self.sidecar(name)
        if sidecar is None or kind not in FILE_KINDS or (kind == "wav" and not sidecar.get("wav")):
            return None
        return self.out_dir / f"{name}.{kind}"

    def notes(self, name: str) -> dict[str, Any] | None:
        """The song as note JSON (``notes.score_notes``), None when it is not a listed song."""
        import symusic

        from museformer.studio.notes import score_notes

        path = self.song_file(name, "mid")
        if path is None:
            return None
        bars = int(self.sidecar(name).get("bars") or 0)
        return score_notes(symusic.Score(str(path)), bars)
