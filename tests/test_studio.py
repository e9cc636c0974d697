"""The studio server: generation end to end over HTTP, progress, one job at a time, bad input, files."""

import base64
import subprocess
import sys
import threading
import time
import types
import warnings
from pathlib import Path

import pytest
import symusic
import torch

pytest.importorskip("starlette", reason="the studio extra (starlette) is not installed")
pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx")
with warnings.catch_warnings():  # Starlette 1.x suggests httpx2, which is not yet a release everyone has
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient  # noqa: E402

import museformer  # noqa: E402
import museformer.generate  # noqa: E402
from museformer.checkpoint import save_checkpoint  # noqa: E402
from museformer.files import midi_bytes  # noqa: E402
from museformer.generate import generate, prompt_from_midi  # noqa: E402
from museformer.model import Museformer, MuseformerConfig  # noqa: E402
from museformer.studio.app import create_app  # noqa: E402
from museformer.studio.jobs import Studio  # noqa: E402
from museformer.studio.notes import bar_starts, score_notes, seconds_at  # noqa: E402
from museformer.studio.settings import available_models  # noqa: E402
from museformer.tokenizer import Tokenizer  # noqa: E402

DATA = Path(__file__).parent / "data"
TOKENIZER = Tokenizer.preset("lmd6")
SONG = {"bars": 4, "tempo": 120, "seed": 3}
SHORT = {"bars": 2, "tempo": 120, "seed": 3}  # where the length does not matter: less CPU

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("studio-ckpt") / "tiny"
    save_checkpoint(directory, Museformer(MuseformerConfig.preset("tiny")).eval(), TOKENIZER)
    return directory


@pytest.fixture
def studio(tiny_checkpoint, tmp_path):
    s = Studio(available_models([tiny_checkpoint]), tmp_path / "songs")
    yield s
    s.close()


@pytest.fixture
def client(studio):
    with TestClient(create_app(studio)) as c:
        yield c


def wait(client, job_id, timeout=60.0):
    """Poll a job until it is no longer running; its last snapshot."""
    end = time.time() + timeout
    while time.time() < end:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] != "running":
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still running after {timeout} s")


def start(client, **settings):
    response = client.post("/api/generate", json=settings)
    assert response.status_code == 202, response.text
    return response.json()["job"]


@pytest.fixture
def gate(monkeypatch):
    """Generation waits at its first bar until ``gate.release.set()``; ``gate.reached`` is set there."""
    real = museformer.generate.generate
    g = types.SimpleNamespace(reached=threading.Event(), release=threading.Event())

    def gated(*args, progress=None, **kwargs):
        bar_id = kwargs["tokenizer"].vocab.bar_id

        def on_event(song, token, finish):
            progress(song, token, finish)
            if token == bar_id and not g.reached.is_set():
                g.reached.set()
                assert g.release.wait(60), "the test never released the gate"

        return real(*args, progress=on_event, **kwargs)

    monkeypatch.setattr(museformer.generate, "generate", gated)
    yield g
    g.release.set()


# -- generation end to end ---------------------------------------------------------------------
def test_a_four_bar_song_end_to_end(client, studio, tiny_checkpoint, no_fluidsynth):
    """A page request yields a listed 4-bar song whose MIDI equals generate() with the same seed."""
    job = wait(client, start(client, **SONG)["id"])
    assert job["state"] == "done" and len(job["songs"]) == 1 and job["bars"] == 4
    name = job["songs"][0]
    listed = client.get("/api/songs").json()["songs"]
    assert [s["name"] for s in listed] == [name]
    sidecar = client.get(f"/api/songs/{name}.json").json()
    assert sidecar["bars"] == 4 and sidecar["seed"] == 3 and sidecar["options"]["tempo"] == 120
    assert sidecar["checkpoint"] == str(tiny_checkpoint) and sidecar["made_with"] == "museformer studio"
    midi = client.get(f"/api/songs/{name}.mid?download=1")
    assert midi.headers["content-type"] == "audio/midi"
    assert midi.headers["content-disposition"].startswith("attachment")
    model, tokenizer = museformer.load(tiny_checkpoint)
    same = generate(model=model, tokenizer=tokenizer, max_bars=4, tempo=120.0, seed=3)[0]
    assert midi.content == midi_bytes(same.score)  # the studio adds nothing to what generate makes
    score = symusic.Score.from_midi(midi.content)
    notes = client.get(f"/api/songs/{name}/notes").json()
    assert sum(len(t["notes"]) for t in notes["tracks"]) == score.note_num()
    assert len(notes["bars"]) == 4 + 1  # four bars: five bar lines
    assert client.get(f"/api/songs/{name}.wav").status_code == 404  # no FluidSynth: no WAV offered
    assert any("FluidSynth" in e for e in sidecar["render_errors"]) and "synthesizer" in job["message"]


def test_progress_is_live_over_http(client, gate, no_fluidsynth):
    """While a job runs, GET /api/jobs/ID reports its tokens and bars so far; at the end, the songs' totals."""
    job = start(client, num_songs=2, **SONG)
    assert gate.reached.wait(60)
    live = client.get(f"/api/jobs/{job['id']}").json()
    assert live["state"] == "running" and live["bars"] == 1 and 0 < live["tokens"] and live["total_bars"] == 8
    gate.release.set()
    done = wait(client, job["id"])
    sidecars = [client.get(f"/api/songs/{n}.json").json() for n in done["songs"]]
    assert done["tokens"] == sum(s["generated_tokens"] for s in sidecars) > live["tokens"]
    assert done["bars"] == 8 and done["songs_finished"] == 2


def test_a_second_generate_while_busy_is_refused(client, studio, gate, no_fluidsynth):
    """A second request while a job runs gets 409 'busy'; the first job finishes; then a new one starts."""
    job = start(client, **SHORT)
    assert gate.reached.wait(60)
    second = client.post("/api/generate", json=SHORT)
    assert second.status_code == 409 and second.json()["error"].startswith("busy: job 1")
    assert client.get("/api/info").json()["busy"]["id"] == job["id"]
    gate.release.set()
    assert wait(client, job["id"])["state"] == "done"
    third = start(client, **SHORT)
    assert third["id"] == 2 and wait(client, 2)["state"] == "done"
    assert len(client.get("/api/songs").json()["songs"]) == 2


def test_stop_leaves_no_file(client, studio, gate, no_fluidsynth):
    """A stopped job ends 'cancelled', and no file of its songs is left in the folder."""
    job = start(client, **SHORT)
    assert gate.reached.wait(60)
    assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
    gate.release.set()
    assert wait(client, job["id"])["state"] == "cancelled"
    assert client.get("/api/songs").json()["songs"] == []
    assert not studio.out_dir.exists() or list(studio.out_dir.iterdir()) == []


def test_a_browser_that_goes_away_changes_nothing(studio, gate, no_fluidsynth):
    """A client that closes mid-generation leaves the job running; a new client finds the finished song."""
    with TestClient(create_app(studio)) as first:
        job = start(first, **SHORT)
        assert gate.reached.wait(60)
    gate.release.set()
    with TestClient(create_app(studio)) as second:
        assert wait(second, job["id"])["state"] == "done"
        assert len(second.get("/api/songs").json()["songs"]) == 1


# -- prompts -----------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_prompt_midi_starts_the_song(client, no_fluidsynth):
    """An uploaded MIDI with prompt bars 2: the song's first tokens are that prompt's (sidecar counts them)."""
    data = (DATA / "bach_bwv269.mid").read_bytes()
    job = wait(client, start(client, prompt=_b64(data), prompt_name="bwv269.mid", prompt_bars=2, **SONG)["id"])
    assert job["state"] == "done" and job["total_bars"] == 2
    sidecar = client.get(f"/api/songs/{job['songs'][0]}.json").json()
    assert sidecar["prompt_tokens"] == len(prompt_from_midi(DATA / "bach_bwv269.mid", TOKENIZER, 2))
    assert sidecar["prompt"] == "bwv269.mid" and sidecar["bars"] == 4 and len(sidecar["prompt_sha256"]) == 64


@pytest.mark.parametrize("prompt, field, words", [
    (_b64(b"hello, I am not a MIDI file, truly"), "prompt", "notes.txt is not a MIDI file"),
    ("this is not base64!", "prompt", "not valid base64"),
    ("A" * (4 * 1024 * 1024), "prompt", "MiB"),
])
def test_a_bad_upload_is_one_clear_message(client, studio, prompt, field, words):
    """A file that is not MIDI (or not base64, or too large) is a 400 naming it; the server keeps serving."""
    r = client.post("/api/generate", json={**SONG, "prompt": prompt, "prompt_name": "notes.txt"})
    assert r.status_code in (400, 413) and r.json()["field"] == field and words in r.json()["error"]
    assert studio.current() is None and client.get("/api/info").status_code == 200


def test_prompt_bars_that_fill_the_song_are_refused(client):
    """prompt bars >= bars leaves nothing to generate: a 400 that says so."""
    data = _b64((DATA / "bach_bwv269.mid").read_bytes())
    r = client.post("/api/generate", json={**SONG, "prompt": data, "prompt_bars": 4})
    assert r.status_code == 400 and r.json()["field"] == "prompt_bars" and "nothing to generate" in r.json()["error"]


# -- bad settings ------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, field", [
    ({"bars": 0}, "bars"),
    ({"bars": 2.5}, "bars"),
    ({"bars": 100000}, "bars"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"num_songs": 10000}, "num_songs"),
    ({"seed": "x"}, "seed"),
    ({"tempo": 1000}, "tempo"),
    ({"instruments": [0, 300]}, "instruments"),
    ({"model": "nope"}, "model"),
    ({"loudness": 11}, "loudness"),
    ({"prompt_bars": 2}, "prompt_bars"),
    ({"form": "A8 A8"}, "form"),  # form plans are made unavailable below
])
def test_absurd_settings_are_one_clear_message(client, studio, settings, field, monkeypatch):
    """Each bad setting is a 400 whose JSON names the field; no job starts; the server keeps serving."""
    import museformer.studio.features

    monkeypatch.setattr(museformer.studio.features, "form_supported", lambda: False)
    r = client.post("/api/generate", json=settings)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field and r.json()["error"].startswith(field + ":")
    assert studio.current() is None and client.get("/api/info").status_code == 200


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]"])
def test_a_body_that_is_not_settings_is_refused(client, body):
    """A body that is not a JSON object of settings is a 400."""
    r = client.post("/api/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "request"


# -- files -------------------------------------------------------------------------------------
def test_wav_is_offered_when_fluidsynth_renders(client, fake_fluidsynth):
    """With FluidSynth (simulated), the song has a WAV, served as audio/wav and named in the sidecar."""
    job = wait(client, start(client, **SHORT)["id"])
    name = job["songs"][0]
    sidecar = client.get(f"/api/songs/{name}.json").json()
    assert sidecar["wav"] == f"{name}.wav" and sidecar["render_errors"] == []
    wav = client.get(f"/api/songs/{name}.wav")
    assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav" and wav.content[:4] == b"RIFF"
    assert client.get("/api/info").json()["wav"] is True


def test_a_short_wav_is_never_offered(client, studio, fake_fluidsynth, monkeypatch):
    """A WAV cut short (a failing FluidSynth) is not kept: the MIDI is listed, the WAV is not, no temp file remains."""
    monkeypatch.setenv("FAKE_FLUIDSYNTH_SHORT", "1")
    job = wait(client, start(client, **SHORT)["id"])
    name = job["songs"][0]
    sidecar = client.get(f"/api/songs/{name}.json").json()
    assert "wav" not in sidecar and any("fluidsynth did not produce" in e or "bytes" in e
                                        for e in sidecar["render_errors"]), sidecar["render_errors"]
    assert client.get(f"/api/songs/{name}.wav").status_code == 404
    assert sorted(p.name for p in studio.out_dir.iterdir()) == [f"{name}.json", f"{name}.mid"]


def test_only_complete_songs_are_listed(client, studio, no_fluidsynth):
    """A MIDI without its sidecar (a song being written), a broken sidecar or a foreign name is not offered."""
    wait(client, start(client, **SHORT)["id"])
    (studio.out_dir / "song_007.mid").write_bytes(b"MThd")  # sidecar not written yet
    (studio.out_dir / "song_008.mid").write_bytes(b"MThd")
    (studio.out_dir / "song_008.json").write_text("{cut")
    assert [s["name"] for s in client.get("/api/songs").json()["songs"]] == ["song_000"]
    for path in ("/api/songs/song_007.mid", "/api/songs/song_008.mid", "/api/songs/..%2Fsongs%2Fsong_000.mid",
                 "/api/songs/song_000.exe", "/api/songs/song_007/notes"):
        assert client.get(path).status_code == 404, path


def test_the_page_and_its_assets_are_served_locally(client):
    """The page and every script and stylesheet it names come from the studio; none from elsewhere."""
    page = client.get("/")
    assert page.status_code == 200 and "museformer studio" in page.text
    assets = [a.split('"')[0] for a in page.text.split('src="')[1:] + page.text.split('href="')[1:]]
    local = [a for a in assets if a.startswith("/static/")]
    assert local and all(a.startswith(("/static/", "data:")) for a in assets), assets
    for asset in local:
        assert client.get(asset).status_code == 200, asset
    for script in ("studio.js", "pianoroll.js", "synth.js", "instruments.js"):
        text = client.get(f"/static/{script}").text
        assert "http://" not in text and "https://" not in text, script


# -- optional features -------------------------------------------------------------------------
def test_form_plans_appear_when_generate_takes_them(client, studio, monkeypatch, no_fluidsynth):
    """With a generate(form=...) the page offers the plan, and a plan reaches generate with its bar count."""
    real = museformer.generate.generate
    seen = {}

    def with_form(*args, form=None, **kwargs):
        seen["form"], seen["bars"] = form, kwargs["config"].max_bars
        return real(*args, **kwargs)

    monkeypatch.setattr(museformer.generate, "generate", with_form)
    assert client.get("/api/info").json()["features"]["form"] is True
    assert client.post("/api/generate", json={"form": "A 8"}).status_code == 400
    job = wait(client, start(client, form="A2  B1 A'1", tempo=120, seed=1)["id"])
    assert job["state"] == "done" and seen == {"form": "A2 B1 A'1", "bars": 4}
    assert client.get(f"/api/songs/{job['songs'][0]}.json").json()["form"] == "A2 B1 A'1"


def test_infill_regenerates_the_selected_bars(client, studio, monkeypatch, no_fluidsynth):
    """Selected bars of a song go to museformer.infill.infill; the new listed song keeps every other bar."""
    import museformer.infill
    import museformer.studio.features

    with monkeypatch.context() as without:
        without.setattr(museformer.studio.features, "infill_function", lambda: None)
        assert client.get("/api/info").json()["features"]["infill"] is False
        assert client.post("/api/infill", json={"song": "song_000", "bars": [1, 1]}).status_code == 404
    calls = {}
    real = museformer.infill.infill

    def spy(ids, bars, **kwargs):
        calls["bars"], calls["ids"] = bars, list(ids)
        return real(ids, bars, **kwargs)

    monkeypatch.setattr(museformer.infill, "infill", spy)
    assert client.get("/api/info").json()["features"]["infill"] is True
    original = wait(client, start(client, **SONG)["id"])["songs"][0]
    bad = client.post("/api/infill", json={"song": original, "bars": [3, 9]})
    assert bad.status_code == 400 and bad.json()["field"] == "bars"
    started = client.post("/api/infill", json={"song": original, "bars": [2, 3], "seed": 5})
    assert started.status_code == 202, started.text
    job = wait(client, started.json()["job"]["id"])
    assert job["state"] == "done", job
    assert calls["bars"] == [(2, 3)]
    before = calls["ids"]
    assert before == [int(t) for t in TOKENIZER.encode_file(studio.out_dir / f"{original}.mid", as_ids=True)]
    after = [int(t) for t in TOKENIZER.encode_file(studio.out_dir / f"{job['songs'][0]}.mid", as_ids=True)]
    bar = TOKENIZER.vocab.bar_id

    def bars_of(ids):
        out, cur = [], []
        for t in ids:
            cur.append(t)
            if t == bar:
                out.append(cur)
                cur = []
        return out

    assert len(bars_of(after)) == len(bars_of(before))
    assert bars_of(after)[0] == bars_of(before)[0] and bars_of(after)[3:] == bars_of(before)[3:]
    sidecar = client.get(f"/api/songs/{job['songs'][0]}.json").json()
    assert sidecar["infill_of"] == original and sidecar["infill_bars"] == [2, 3] and sidecar["seed"] == 5


# -- note JSON ---------------------------------------------------------------------------------
def _score(tempos, signatures, notes, tpq=480):
    score = symusic.Score(tpq)
    for tick, qpm in tempos:
        score.tempos.append(symusic.Tempo(tick, qpm))
    for tick, num, den in signatures:
        score.time_signatures.append(symusic.TimeSignature(tick, num, den))
    track = symusic.Track(program=0)
    for tick, duration, pitch in notes:
        track.notes.append(symusic.Note(tick, duration, pitch, 90))
    score.tracks.append(track)
    return score


def test_seconds_follow_the_tempo_map():
    """120 BPM then 60 BPM from beat 2: ticks 480, 960, 1440 are 0.5 s, 1.0 s and 2.0 s."""
    score = _score([(0, 120), (960, 60)], [], [])
    assert seconds_at([0, 480, 960, 1440], score).tolist() == pytest.approx([0.0, 0.5, 1.0, 2.0])
    assert seconds_at([480], _score([], [], [])).tolist() == pytest.approx([0.5])  # no tempo: MIDI's 120


def test_bar_lines_follow_time_signatures_and_notes_stop_at_the_last_bar():
    """A 3/4 bar then 4/4 bars; a note held past the last bar is cut there and adds no bar."""
    score = _score([(0, 120)], [(0, 3, 4), (1440, 4, 4)], [(0, 480, 60), (1500, 100000, 64)])
    assert bar_starts(score) == [0, 1440, 3360]
    assert bar_starts(score, min_bars=3) == [0, 1440, 3360, 5280]
    notes = score_notes(score)
    assert [n[:4] for n in notes["tracks"][0]["notes"]] == [[0, 480, 60, 90], [1500, 3360 - 1500, 64, 90]]
    assert notes["duration"] == pytest.approx(3360 / 960)


# -- the command -------------------------------------------------------------------------------
def test_the_command_prints_its_url_and_serves(tiny_checkpoint, tmp_path):
    """`museformer studio --port 0` prints a URL on which the page's API answers, listing the checkpoint."""
    import httpx

    env = {**__import__("os").environ, "PYTHONPATH": str(Path(museformer.__file__).parents[1])}
    process = subprocess.Popen(
        [sys.executable, "-m", "museformer", "studio", "--port", "0", "--checkpoint", str(tiny_checkpoint),
         "-o", str(tmp_path / "songs"), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line.startswith("museformer studio: http://127.0.0.1:"), line + process.stderr.read()
        url = line.split()[2]
        info = httpx.get(url + "api/info", timeout=30).json()
        assert info["models"][0]["id"] == "tiny" and info["defaults"]["model"] == "tiny"
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.parametrize("args, words", [
    (["--checkpoint", "/no/such/checkpoint"], "no such checkpoint"),
    (["--port", "70000"], "--port must be 0..65535"),
])
def test_the_command_refuses_bad_options_in_one_line(args, words, capsys, tmp_path):
    """A missing checkpoint or an impossible port is one error line, before anything is served."""
    from museformer.cli import main

    assert main(["studio", "-o", str(tmp_path / "songs"), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_a_taken_port_is_one_clear_error(tmp_path):
    """Listening on a port that is in use fails with a message naming the address."""
    from museformer.errors import MuseformerError
    from museformer.studio.app import _listen

    taken = _listen("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(MuseformerError, match=f"cannot listen on 127.0.0.1:{port}"):
            _listen("127.0.0.1", port)
    finally:
        taken.close()



def test_without_the_extra_the_command_says_what_to_install(monkeypatch, capsys, tmp_path):
    """Without starlette installed, `museformer studio` is one line naming the studio extra."""
    import museformer.studio.app as app
    from museformer.cli import main

    monkeypatch.setattr(app, "Starlette", None)
    assert main(["studio", "-o", str(tmp_path / "songs")]) == 1
    assert "pip install 'museformer[studio]'" in capsys.readouterr().err


def test_a_models_recommended_sampling_is_what_the_page_shows_and_a_request_gets(tiny_checkpoint, tmp_path):
    """A checkpoint whose sample.json recommends top_k 0 and temperature 0.9: /api/info lists them for
    that model (the page fills its fields from them), and a request that leaves them out gets them;
    a request that sets them keeps its own."""
    import json
    import shutil

    from museformer.studio.settings import parse_generate_request

    recommending = tmp_path / "recommending"
    shutil.copytree(tiny_checkpoint, recommending)
    (recommending / "sample.json").write_text(json.dumps({"max_bars": 64, "top_k": 0, "temperature": 0.9}))
    models = available_models([tiny_checkpoint, recommending])
    studio = Studio(models, tmp_path / "songs")
    try:
        with TestClient(create_app(studio)) as client:
            listed = {m["id"]: m["sampling"] for m in client.get("/api/info").json()["models"]}
    finally:
        studio.close()
    assert listed["tiny"] == {"top_k": 8, "temperature": 1.0, "top_p": 1.0}
    assert listed["recommending"] == {"top_k": 0, "temperature": 0.9, "top_p": 1.0}
    plain = parse_generate_request({"model": "recommending"}, models, studio.tokenizer_of).config
    assert (plain.top_k, plain.temperature, plain.max_bars) == (0, 0.9, 8)  # the page's bars, not 64
    chosen = parse_generate_request({"model": "recommending", "top_k": 5, "temperature": 1.2}, models,
                                    studio.tokenizer_of).config
    assert (chosen.top_k, chosen.temperature) == (5, 1.2)
    assert parse_generate_request({"model": "tiny"}, models, studio.tokenizer_of).config.top_k == 8
