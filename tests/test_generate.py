"""Sampling, stopping rules, prompts, grammar-constrained songs, the Python API and the CLI."""

import json
from pathlib import Path

import pytest
import symusic
import torch

from museformer.checkpoint import save_checkpoint
from museformer.cli import main
from museformer.errors import MuseformerError
from museformer.generate import (
    SampleConfig,
    build_grammar,
    bundled_checkpoint,
    counter_uniforms,
    generate,
    prompt_from_midi,
    sample_next,
    stream,
)
from museformer.grammar import Grammar
from museformer.model import Museformer, MuseformerConfig
from museformer.tokenizer import Tokenizer
from museformer.vocab import EOS_ID, TokenKind

DATA = Path(__file__).parent / "data"
TOKENIZER = Tokenizer.preset("lmd6")
VOCAB = TOKENIZER.vocab


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Museformer(MuseformerConfig.preset("tiny")).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    directory = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(directory, model, TOKENIZER)
    return directory


def _gen(model, **options):
    options.setdefault("min_tokens", 10**6)  # run to the bar or token limit
    return generate(model=model, tokenizer=TOKENIZER, **options)


# -- sample_next -------------------------------------------------------------------------------
def test_temperature_zero_is_argmax():
    """Temperature 0 picks the largest logit of every row."""
    logits = torch.randn(5, 50)
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))


def test_top_k_and_top_p_limit_the_support():
    """Samples come only from the top-k tokens; a tiny top-p keeps only the best; -inf is never drawn."""
    logits = torch.randn(1, 30).expand(2000, 30).clone()
    logits[:, 5] = float("-inf")
    gen = torch.Generator().manual_seed(0)
    ids = sample_next(logits, top_k=4, generator=gen)
    assert set(ids.tolist()) <= set(torch.topk(logits[0], 4).indices.tolist())
    assert len(set(ids.tolist())) == 4
    assert sample_next(logits, top_p=1e-6, generator=gen).eq(logits[0].argmax()).all()
    assert 5 not in sample_next(logits, generator=gen).tolist()


def test_per_row_generators_make_rows_independent():
    """With one generator per row, a row's sample does not depend on the other rows."""
    logits = torch.randn(3, 40)
    together = sample_next(logits, top_k=10, generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    alone = sample_next(logits[1:2], top_k=10, generator=[torch.Generator().manual_seed(2)])
    assert together[1] == alone[0]


def test_counter_uniforms_depend_only_on_seed_and_counter():
    """A song's draw depends on its own (seed, counter) alone, is in [0, 1), and the draws are uniform."""
    together = counter_uniforms([11, 12, 13], [4, 0, 9])
    alone = counter_uniforms([12], [0])
    assert together.dtype == torch.float64 and together[1] == alone[0]
    assert torch.equal(together, counter_uniforms([11, 12, 13], [4, 0, 9]))  # deterministic
    draws = counter_uniforms([7] * 20000, range(20000))
    assert float(draws.min()) >= 0.0 and float(draws.max()) < 1.0
    counts = torch.histc(draws.float(), bins=10, min=0.0, max=1.0)
    assert (counts - 2000).abs().max() < 200  # about 4.5 standard deviations
    assert counter_uniforms([7], [0]) != counter_uniforms([8], [0])


def test_uniforms_sample_the_top_k_distribution():
    """Given draws, sample_next picks what a generator with the same draws picks, and over many
    draws the top-k tokens come out with their renormalised probabilities."""
    logits = torch.randn(1, 30).expand(20000, 30).clone()
    u = torch.rand(20000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ids = sample_next(logits, top_k=5, uniforms=u)
    assert torch.equal(ids, sample_next(logits, top_k=5, generator=torch.Generator().manual_seed(3)))
    top = torch.topk(logits[0], 5)
    expected = torch.softmax(top.values, dim=-1)
    observed = torch.stack([(ids == t).double().mean() for t in top.indices])
    assert set(ids.tolist()) <= set(top.indices.tolist())
    torch.testing.assert_close(observed, expected.double(), atol=0.02, rtol=0)


def test_sample_config_validates_and_round_trips():
    """Bad options raise MuseformerError naming them; to_dict/from_dict is lossless; unknown keys fail."""
    cfg = SampleConfig(top_k=4, seed=3, instruments=(0, 128), max_bars=8)
    assert SampleConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(max_tokens=0), dict(instruments=(200,))):
        with pytest.raises(MuseformerError, match="invalid sampling option"):
            SampleConfig(**bad)
    with pytest.raises(MuseformerError, match="unknown"):
        SampleConfig.from_dict({"topk": 3})


# -- songs -----------------------------------------------------------------------------------
def test_same_seed_same_song_and_batch_independent(model):
    """Same seed -> same song; a song does not depend on the batch it was decoded in."""
    a = _gen(model, num_songs=3, seed=11, max_bars=3)
    b = _gen(model, num_songs=3, seed=11, max_bars=3, batch_size=1)
    assert [s.ids for s in a] == [s.ids for s in b]
    assert a[0].ids != a[1].ids
    assert [s.seed for s in a] == [11, 12, 13]


def test_cached_generation_equals_full_recompute(model):
    """Sampling with the cache gives exactly the tokens of re-running the whole prefix every step."""
    cfg = SampleConfig(seed=5, max_bars=3, min_tokens=0)
    grammar = build_grammar(TOKENIZER, cfg)
    prompts = [[], list(prompt_from_midi(DATA / "bach_bwv269.mid", TOKENIZER, bars=2))]
    fast = list(stream(model, prompts, cfg, seeds=[5, 6], grammar=grammar))
    slow = list(stream(model, prompts, cfg, seeds=[5, 6], grammar=grammar, recompute=True))
    assert fast == slow and len(fast) > 50


def test_grammar_constrained_songs_decode_cleanly(model):
    """With the grammar, every song is valid REMIGEN2 and decodes with zero skipped tokens, even when
    constrained to some instruments and a tempo; without it a random model produces junk."""
    songs = _gen(model, num_songs=2, seed=1, max_bars=4, instruments=(0, 128), tempo=100)
    grammar = Grammar.for_tokenizer(TOKENIZER)
    allowed_programs = {0, 128}
    tempo_id = VOCAB.id_of(TokenKind.TEMPO, round(12 * __import__("math").log2(100 / 16)))
    for song in songs:
        assert song.skipped == 0 and song.bars == 4 and song.finish == "bars"
        assert grammar.validate(song.ids, complete=False) == []
        kinds = VOCAB.kinds[song.ids]
        assert {int(VOCAB.values[t]) for t, k in zip(song.ids, kinds) if k == TokenKind.INSTRUMENT} <= allowed_programs
        assert all(t == tempo_id for t, k in zip(song.ids, kinds) if k == TokenKind.TEMPO)
        assert len(song.score.tracks) >= 1
    junk = _gen(model, seed=1, max_tokens=200, grammar=False)[0]
    assert not grammar.is_valid(junk.ids, complete=False)


def test_stopping_rules(model):
    """max_bars gives exactly that many bars; max_tokens cuts back to the last complete bar."""
    (song,) = _gen(model, seed=2, max_bars=2)
    assert song.bars == 2 and song.ids[-1] == VOCAB.bar_id and song.finish == "bars"
    (song,) = _gen(model, seed=2, max_tokens=150)
    assert song.finish == "max_tokens" and len(song.ids) <= 150 and song.ids[-1] == VOCAB.bar_id


def test_min_tokens_forbids_early_eos():
    """A model that always wants EOS still writes min_tokens tokens first, then ends at a bar end."""
    torch.manual_seed(0)
    eager = Museformer(MuseformerConfig.preset("tiny")).eval()
    with torch.no_grad():  # final features are all ones, so the logits are EOS = D, every other token 0
        eager.final_norm.weight.fill_(0.0)
        eager.final_norm.bias.fill_(1.0)
        eager.output.weight.zero_()
        eager.output.weight[EOS_ID] = 1.0
    (song,) = _gen(eager, seed=0, min_tokens=40)
    assert song.finish == "eos" and len(song.ids) >= 40 and song.ids[-1] == VOCAB.bar_id


def test_prompt_is_kept_and_continued(model):
    """A MIDI prompt cut to its first bars opens the song, which then continues past it."""
    prompt = prompt_from_midi(DATA / "bach_bwv269.mid", TOKENIZER, bars=2)
    assert sum(1 for t in prompt if t == VOCAB.bar_id) == 2 and prompt[-1] == VOCAB.bar_id
    assert prompt == list(TOKENIZER.encode_file(DATA / "bach_bwv269.mid", as_ids=True)[: len(prompt)])
    (song,) = _gen(model, prompt=DATA / "bach_bwv269.mid", prompt_bars=2, seed=3, max_bars=4)
    assert song.ids[: len(prompt)] == prompt and song.prompt_length == len(prompt) and song.bars == 4


def test_stream_yields_the_songs_tokens(model):
    """Streaming yields every token as produced; collected per song they are the songs' tokens."""
    cfg = SampleConfig(seed=4, max_bars=2, min_tokens=10**6)
    events = list(stream(model, [[], []], cfg, seeds=[4, 5], grammar=build_grammar(TOKENIZER, cfg)))
    per_song = [[t for i, t, _ in events if i == k] for k in range(2)]
    songs = _gen(model, num_songs=2, seed=4, max_bars=2)
    assert per_song == [s.ids for s in songs]
    assert [r for _, _, r in events if r is not None] == ["bars", "bars"]


def test_generate_function_is_public(model):
    """``from museformer.generate import generate`` is the Python entry point."""
    from museformer.generate import generate

    songs = generate(model=model, tokenizer=TOKENIZER, seed=1, max_bars=1, min_tokens=0)
    assert songs[0].bars == 1


# -- CLI -------------------------------------------------------------------------------------
def test_cli_writes_valid_midi_and_sidecar(checkpoint, tmp_path, capsys):
    """`museformer generate` writes MIDI files and reproducible sidecars; same seed -> same file."""
    out = tmp_path / "songs"
    args = ["generate", "--checkpoint", str(checkpoint), "--num", "2", "--bars", "2", "--seed", "7",
            "-o", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["song_000.json", "song_000.mid", "song_001.json", "song_001.mid"]
    score = symusic.Score(str(out / "song_000.mid"))
    assert score.note_num() > 0
    meta = json.loads((out / "song_000.json").read_text())
    import hashlib

    assert meta["checkpoint_sha256"] == hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert meta["seed"] == 7 and meta["options"]["max_bars"] == 2 and meta["skipped_tokens"] == 0
    assert meta["num_tokens"] > 0 and meta["bars"] == 2
    # a second run continues the numbering and reproduces the first song from its sidecar's seed
    assert main(["generate", "--checkpoint", str(checkpoint), "--bars", "2", "--seed", str(meta["seed"]),
                 "-o", str(out)]) == 0
    assert (out / "song_002.mid").read_bytes() == (out / "song_000.mid").read_bytes()


@pytest.mark.parametrize("fluidsynth", ["missing", "installed"])
def test_cli_render_problems_do_not_cost_the_midi(checkpoint, tmp_path, capsys, request, fluidsynth):
    """A missing soundfont is reported by name, and the MIDI file is written anyway, with or without FluidSynth."""
    request.getfixturevalue("no_fluidsynth" if fluidsynth == "missing" else "fake_fluidsynth")
    out = tmp_path / "r"
    assert main(["generate", "--checkpoint", str(checkpoint), "--bars", "1", "--seed", "1",
                 "-o", str(out), "--render", "--soundfont", str(tmp_path / "nope.sf2")]) == 0
    meta = json.loads((out / "song_000.json").read_text())
    assert (out / "song_000.mid").exists()
    assert any("nope.sf2" in e for e in meta["render_errors"])
    assert "nope.sf2" in capsys.readouterr().out


def test_cli_render_writes_wav_when_fluidsynth_is_there(checkpoint, tmp_path, fake_fluidsynth):
    """With FluidSynth and a soundfont (simulated), --render writes the WAV and names it in the sidecar."""
    out = tmp_path / "r"
    assert main(["generate", "--checkpoint", str(checkpoint), "--bars", "1", "--seed", "1", "-o", str(out),
                 "--render"]) == 0
    meta = json.loads((out / "song_000.json").read_text())
    assert meta["wav"] == "song_000.wav" and (out / "song_000.wav").read_bytes()[:4] == b"RIFF"


def test_cli_errors_are_one_line(tmp_path, capsys):
    """A missing checkpoint or prompt is a one-line error with exit status 1."""
    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "-o", str(tmp_path)]) == 1
    assert "none" in capsys.readouterr().err


def test_bundled_model_or_clear_message(tmp_path):
    """Without a bundled model the message says to pass --checkpoint; with one, the CLI uses it."""
    try:
        bundled_checkpoint()
    except MuseformerError as e:
        assert "no bundled model" in str(e) and "--checkpoint" in str(e)
        return
    assert main(["generate", "--bars", "1", "--seed", "1", "-o", str(tmp_path)]) == 0
    assert symusic.Score(str(tmp_path / "song_000.mid")).note_num() > 0


# -- options mean what they say ----------------------------------------------------------------
def _eager_eos_model():
    """A model whose every step wants EOS most (logits: EOS = D, every other token 0)."""
    torch.manual_seed(0)
    eager = Museformer(MuseformerConfig.preset("tiny")).eval()
    with torch.no_grad():
        eager.final_norm.weight.fill_(0.0)
        eager.final_norm.bias.fill_(1.0)
        eager.output.weight.zero_()
        eager.output.weight[EOS_ID] = 1.0
    return eager


@pytest.mark.parametrize("grammar", [True, False])
def test_bars_gives_exactly_that_many_bars_even_when_eos_is_likely(grammar):
    """With max_bars = B, EOS is forbidden before bar B ends: songs have exactly B bars."""
    songs = generate(model=_eager_eos_model(), tokenizer=TOKENIZER, num_songs=2, seed=0, max_bars=3,
                     min_tokens=0, grammar=grammar, top_k=0)
    assert [(s.bars, s.finish) for s in songs] == [(3, "bars"), (3, "bars")]


def test_sampling_options_are_checked(model):
    """Tempo outside the tokens' range, batch size 0, prompts that leave nothing to generate: clear errors."""
    from museformer.generate import TEMPO_RANGE
    from museformer.remigen import N_TEMPO_BINS, tempo_bin

    assert int(tempo_bin(TEMPO_RANGE[0])) == 0 and int(tempo_bin(TEMPO_RANGE[1])) == N_TEMPO_BINS - 1
    for tempo in (1000, 15.9, 0, -5):
        with pytest.raises(MuseformerError, match=r"tempo must be a BPM in 16\.\.256"):
            SampleConfig(tempo=tempo)
    SampleConfig(tempo=16), SampleConfig(tempo=256)
    with pytest.raises(MuseformerError, match="batch-size must be >= 1"):
        _gen(model, max_bars=1, batch_size=0)
    with pytest.raises(MuseformerError, match="--prompt-bars 8 leaves nothing to generate.*--bars 4"):
        _gen(model, prompt=DATA / "bach_bwv269.mid", prompt_bars=8, max_bars=4)
    with pytest.raises(MuseformerError, match="the prompt has [0-9]+ bars, so --bars 2"):
        _gen(model, prompt=DATA / "bach_bwv269.mid", max_bars=2)
    prompt = prompt_from_midi(DATA / "bach_bwv269.mid", TOKENIZER, bars=2)
    with pytest.raises(MuseformerError, match=f"the prompt has {len(prompt)} tokens, so --max-tokens 10"):
        _gen(model, prompt=prompt, max_tokens=10)


@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "0"], "max_tokens must be an integer >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--tempo", "1000"], "tempo must be a BPM in 16..256"),
    (["--bars", "4", "--prompt", str(DATA / "bach_bwv269.mid"), "--prompt-bars", "8"], "--prompt-bars 8"),
])
def test_cli_rejects_options_before_loading_the_model(tmp_path, capsys, monkeypatch, args, message):
    """Bad generation options are one line, exit 1, before the model is loaded and nothing is written."""
    import museformer.songs

    monkeypatch.setattr(museformer.songs, "_as_model", lambda *a: pytest.fail("loaded the model"))
    assert main(["generate", "-o", str(tmp_path / "out"), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_output_that_is_a_file_is_refused_before_work(tmp_path, capsys, monkeypatch):
    """`generate -o FILE` names the file and stops before loading the model."""
    import museformer.songs

    monkeypatch.setattr(museformer.songs, "_as_model", lambda *a: pytest.fail("loaded the model"))
    (tmp_path / "taken").write_text("keep")
    assert main(["generate", "--bars", "1", "-o", str(tmp_path / "taken")]) == 1
    assert "taken is an existing file" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "keep"


def test_checkpoint_may_be_a_training_run_folder(checkpoint, tmp_path):
    """--checkpoint RUN uses RUN/model; the sidecar names the checkpoint actually used."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / "model")
    out = tmp_path / "songs"
    assert main(["generate", "--checkpoint", str(run), "--bars", "1", "--seed", "1", "-o", str(out), "--quiet"]) == 0
    assert json.loads((out / "song_000.json").read_text())["checkpoint"] == str(run / "model")


def test_concurrent_runs_into_one_folder_never_overwrite(checkpoint, tmp_path, monkeypatch):
    """Two generate runs into one folder at once keep every song (names claimed by exclusive create)."""
    import threading

    import museformer.songs
    from museformer.generate import SampleConfig
    from museformer.songs import generate_to_folder

    real = museformer.songs.generate
    both_generated = threading.Barrier(2, timeout=60)

    def generate_then_wait(*args, **kwargs):  # both runs pick their names at the same moment
        songs = real(*args, **kwargs)
        both_generated.wait()
        return songs

    monkeypatch.setattr(museformer.songs, "generate", generate_then_wait)
    out = tmp_path / "songs"
    results = {}

    def run(seed):
        results[seed] = generate_to_folder(out, checkpoint, num_songs=3, config=SampleConfig(seed=seed, max_bars=1))

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (10, 20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = sorted(sc["midi"] for sidecars in results.values() for sc in sidecars)
    assert names == [f"song_{i:03d}.mid" for i in range(6)]
    for sidecars in results.values():  # every file holds the song its sidecar describes
        for sc in sidecars:
            stem = sc["midi"][:-4]
            assert json.loads((out / f"{stem}.json").read_text())["seed"] == sc["seed"]
    seeds = sorted(json.loads(p.read_text())["seed"] for p in out.glob("song_*.json"))
    assert seeds == [10, 11, 12, 20, 21, 22]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("fault", ["short", "enospc"])
def test_full_disk_leaves_no_song_and_fails_in_one_line(checkpoint, tmp_path, capsys, monkeypatch, fault):
    """A song write that is cut (or fails with ENOSPC) is one error line; no file under a song name."""
    import errno

    import museformer.files

    real_fdopen = museformer.files.os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            if fault == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            self.f.write(bytes(data)[: len(data) // 2])  # a writer that drops ENOSPC silently
            return len(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(museformer.files.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    out = tmp_path / "songs"
    assert main(["generate", "--checkpoint", str(checkpoint), "--bars", "1", "--seed", "1", "-o", str(out),
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "song_000.mid" in err
    assert ("only" in err and "bytes reached the disk" in err) if fault == "short" else "No space left" in err
    assert list(out.iterdir()) == []


def test_progress_bar_counts_bars_and_is_off_when_quiet(checkpoint, tmp_path, monkeypatch):
    """generate's progress bar counts every bar of every song; --quiet (progress=False) shows none."""
    import tqdm.auto

    from museformer.generate import SampleConfig
    from museformer.songs import generate_to_folder

    bars = []

    class Recorder:
        def __init__(self, **kwargs):
            bars.append(self)
            self.kwargs, self.n = kwargs, 0

        def update(self, n):
            self.n += n

        def set_postfix_str(self, *a, **k):
            self.postfix = a[0]

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    generate_to_folder(tmp_path / "a", checkpoint, num_songs=2, config=SampleConfig(seed=1, max_bars=2),
                       progress=True)
    (bar,) = bars
    assert bar.kwargs["total"] == 4 and bar.kwargs["unit"] == "bar" and bar.kwargs["disable"] is None
    assert bar.n == 4 and bar.postfix == "2/2 songs" and bar.closed
    generate_to_folder(tmp_path / "b", checkpoint, num_songs=1, config=SampleConfig(seed=1, max_bars=1))
    assert len(bars) == 1


# -- precision -------------------------------------------------------------------------------
def test_bf16_generation_leaves_the_callers_model_alone(model):
    """``precision="bf16"`` decodes a bf16 copy: the caller's float32 model is untouched, songs are
    whole and decodable, and the same seed gives the same bf16 song again."""
    songs = _gen(model, num_songs=2, seed=3, max_bars=3, precision="bf16")
    assert next(model.parameters()).dtype == torch.float32
    assert [s.bars for s in songs] == [3, 3] and all(s.skipped == 0 for s in songs)
    again = _gen(model, num_songs=1, seed=3, max_bars=3, precision="bf16")
    assert again[0].ids == songs[0].ids


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    """``auto`` follows the hardware: AMX or AVX512-BF16 -> bf16, an AVX2-only CPU -> fp32; a wrong
    name is one error naming --precision."""
    from museformer.generate import decoding_precision

    for amx, avx512_bf16, expected in [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert decoding_precision("auto", "cpu") == expected
    assert decoding_precision("fp32", "cpu") == "fp32" and decoding_precision("bf16", "cpu") == "bf16"
    with pytest.raises(MuseformerError, match="--precision must be one of auto, bf16, fp32, got 'fp16'"):
        decoding_precision("fp16", "cpu")


def test_cli_precision_is_recorded_in_the_sidecar(checkpoint, tmp_path, capsys):
    """`generate --precision bf16` writes songs whose sidecar says bf16; a bad name is refused."""
    out = tmp_path / "songs"
    assert main(["generate", "--checkpoint", str(checkpoint), "--bars", "2", "--seed", "1",
                 "--precision", "bf16", "-o", str(out), "--quiet"]) == 0
    assert json.loads((out / "song_000.json").read_text())["precision"] == "bf16"
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", str(checkpoint), "--precision", "fp16", "-o", str(out)])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
