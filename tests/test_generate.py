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


def test_cli_render_problems_do_not_cost_the_midi(checkpoint, tmp_path, capsys):
    """A missing soundfont is reported by name, and the MIDI file is written anyway."""
    out = tmp_path / "r"
    assert main(["generate", "--checkpoint", str(checkpoint), "--bars", "1", "--seed", "1",
                 "-o", str(out), "--render", "--soundfont", str(tmp_path / "nope.sf2")]) == 0
    meta = json.loads((out / "song_000.json").read_text())
    assert (out / "song_000.mid").exists()
    assert any("nope.sf2" in e for e in meta["render_errors"])
    assert "nope.sf2" in capsys.readouterr().out


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
