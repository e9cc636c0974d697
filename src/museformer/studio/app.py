"""The studio's HTTP side: Starlette routes over a ``Studio``, and ``serve()`` with uvicorn.

Routes (all JSON except the page, its static files and the song files):

- ``GET /``: the page; ``GET /static/...``: its CSS and JavaScript (package data, no CDN);
- ``GET /api/info``: models, defaults, limits, optional features, whether FluidSynth can render WAVs;
- ``POST /api/generate``: start a job from the page's settings -> 202 ``{"job": {...}}``;
  400 ``{"error", "field"}`` for a bad setting or upload, 409 while another job runs, 413 for a
  body over the limit;
- ``GET /api/jobs/ID``: a job's progress; ``POST /api/jobs/ID/cancel``: stop it;
- ``POST /api/infill``: regenerate bars of a song (only when ``features.infill_supported()``);
- ``GET /api/songs``: the complete songs, newest first; ``GET /api/songs/NAME/notes``: note JSON;
- ``GET /api/songs/NAME.mid|.wav|.json``: the files (``?download=1`` as an attachment).

Every error a user can cause is a 4xx JSON body with one message; an unexpected exception in a
request is a 500 JSON body; neither stops the server. Jobs run in a worker thread (``jobs``), so a
browser that disconnects mid-generation affects nothing.
"""

from __future__ import annotations

import json
import socket
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from museformer.errors import MuseformerError, ParameterError
from museformer.studio.jobs import FILE_KINDS, Busy, Studio
from museformer.studio.settings import (
    MAX_BARS,
    MAX_PROMPT_BYTES,
    MAX_SONGS,
    MAX_TEMPERATURE,
    available_models,
    instrument_programs,
    parse_generate_request,
)

MAX_BODY_BYTES = MAX_PROMPT_BYTES * 4 // 3 + 64 * 1024  # a base64 prompt plus the settings
STATIC = Path(str(resources.files("museformer.studio") / "static"))
DEFAULT_PORT = 8765

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError:  # the studio extra is not installed
    Starlette = None  # type: ignore[assignment,misc]

STUDIO_EXTRA_HELP = "museformer studio needs the studio extra: pip install 'museformer[studio]' (starlette, uvicorn)"


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


async def _json_body(request: Request) -> Any:
    """The request's JSON body, refusing one over ``MAX_BODY_BYTES`` before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ParameterError("prompt", f"the request is {int(declared) // 1024} KiB; at most "
                             f"{MAX_PROMPT_BYTES // 1024 // 1024} MiB of prompt MIDI")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ParameterError("prompt", f"the request is over {MAX_BODY_BYTES // 1024} KiB")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except ValueError:
        raise ParameterError("request", "the body is not JSON") from None


def create_app(studio: Studio) -> Starlette:
    """The Starlette application of a studio (also what the tests drive with ``TestClient``)."""
    if Starlette is None:
        raise MuseformerError(STUDIO_EXTRA_HELP)

    async def page(request: Request):
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    async def info(request: Request):
        from museformer.generate import SampleConfig
        from museformer.render import find_fluidsynth, find_soundfont
        from museformer.studio.features import features

        d = SampleConfig()
        return JSONResponse({
            "models": [{**m.to_dict(), "instruments": instrument_programs(studio.tokenizer_of(m))}
                       for m in studio.models],
            "defaults": {"model": studio.models[0].id, "bars": 8, "num_songs": 1, "temperature": d.temperature,
                         "top_k": d.top_k, "top_p": d.top_p, "seed": None, "tempo": None, "instruments": []},
            "limits": {"bars": MAX_BARS, "num_songs": MAX_SONGS, "temperature": MAX_TEMPERATURE,
                       "prompt_bytes": MAX_PROMPT_BYTES},
            "features": features(),
            "wav": find_fluidsynth() is not None and find_soundfont() is not None,
            "songs_folder": str(studio.out_dir.resolve()),
            "busy": (studio.current().snapshot() if studio.current() else None),
        })

    async def start_generate(request: Request):
        body = await _json_body(request)
        if studio.current() is not None:  # answer "busy" before the (possibly slow) prompt checks
            raise Busy(f"busy: {studio.current().describe()}; wait for it to finish or press Stop")
        job = studio.submit_generate(parse_generate_request(body, studio.models, studio.tokenizer_of))
        return JSONResponse({"job": job.snapshot()}, status_code=202)

    async def start_infill(request: Request):
        from museformer.generate import SampleConfig
        from museformer.studio.features import infill_supported

        if not infill_supported():
            return _error(404, "bar infilling needs a museformer with museformer.infill")
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ParameterError("request", "must be a JSON object")
        song = str(body.get("song", ""))
        sidecar = studio.sidecar(song)
        if sidecar is None:
            raise ParameterError("song", f"{song!r} is not a song of this studio")
        bars = body.get("bars")
        if (not isinstance(bars, list) or len(bars) != 2 or any(isinstance(b, bool) or not isinstance(b, int)
                                                                 for b in bars)):
            raise ParameterError("bars", f"must be [first, last], bar numbers from 1, got {bars!r}")
        first, last = bars
        if not 1 <= first <= last <= int(sidecar.get("bars") or 0):
            raise ParameterError("bars", f"must lie within the song's bars 1..{sidecar.get('bars')}, "
                                 f"got {first}-{last}")
        settings = {k: body[k] for k in ("temperature", "top_k", "top_p", "seed") if body.get(k) is not None}
        try:
            config = SampleConfig(**settings)
        except (MuseformerError, TypeError) as e:
            raise ParameterError("settings", str(e)) from None
        job = studio.submit_infill(song, first, last, config, body.get("model"))
        return JSONResponse({"job": job.snapshot()}, status_code=202)

    async def job_status(request: Request):
        job = studio.job(request.path_params["job_id"])
        return JSONResponse(job.snapshot()) if job else _error(404, "no such job")

    async def job_cancel(request: Request):
        job = studio.cancel(request.path_params["job_id"])
        return JSONResponse(job.snapshot()) if job else _error(404, "no such job")

    async def songs(request: Request):
        return JSONResponse({"songs": studio.songs()})

    async def song_notes(request: Request):
        notes = studio.notes(request.path_params["name"])
        return JSONResponse(notes) if notes is not None else _error(404, "no such song")

    async def song_file(request: Request):
        name, kind = request.path_params["name"], request.path_params["kind"]
        path = studio.song_file(name, kind)
        if path is None:
            return _error(404, f"no {kind} file for song {name!r}")
        disposition = "attachment" if request.query_params.get("download") else "inline"
        return FileResponse(path, media_type=FILE_KINDS[kind], filename=path.name,
                            content_disposition_type=disposition)

    async def user_error(request: Request, exc: Exception):
        if isinstance(exc, Busy):
            return _error(409, str(exc), "generate")
        if isinstance(exc, ParameterError):
            return _error(400, f"{exc.parameter}: {exc.message}", exc.parameter)
        return _error(400, str(exc))

    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    async def server_error(request: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    routes = [
        Route("/", page),
        Route("/api/info", info),
        Route("/api/generate", start_generate, methods=["POST"]),
        Route("/api/infill", start_infill, methods=["POST"]),
        Route("/api/jobs/{job_id:int}", job_status),
        Route("/api/jobs/{job_id:int}/cancel", job_cancel, methods=["POST"]),
        Route("/api/songs", songs),
        Route("/api/songs/{name}/notes", song_notes),
        Route("/api/songs/{name}.{kind}", song_file),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={MuseformerError: user_error, HTTPException: http_error,
                                                         Exception: server_error})


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 = any free port); ``MuseformerError`` naming the address if it fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise MuseformerError(f"--host {host}: {e.strerror or e}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise MuseformerError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, checkpoints: list[str] | tuple = (),
          out_dir: str | Path = "studio-songs", device: str = "cpu", log=print) -> None:
    """Run the studio until Ctrl+C: check the models and folder, listen, print the URL, serve.

    Raises:
        MuseformerError: the studio extra is missing, a checkpoint is bad, the songs folder is a
            file, or the address cannot be used (all before anything is served).
    """
    if Starlette is None:
        raise MuseformerError(STUDIO_EXTRA_HELP)
    try:
        import uvicorn
    except ImportError:
        raise MuseformerError(STUDIO_EXTRA_HELP) from None
    from museformer.files import check_output_path

    if not 0 <= port <= 65535:
        raise MuseformerError(f"--port must be 0..65535, got {port}")
    check_output_path(out_dir, "dir", what="songs folder")
    studio = Studio(available_models(checkpoints), out_dir, device=device)
    app = create_app(studio)
    sock = _listen(host, port)
    log(f"museformer studio: {url_of(sock)}  (songs go to {Path(out_dir).resolve()}; Ctrl+C stops)")
    sys.stdout.flush()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    finally:
        studio.close()
        sock.close()
