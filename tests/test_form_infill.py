"""Form plans and bar infilling: forked caches are exact, plans parse, repeats repeat, infill keeps the song."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from museformer.bar_candidates import SongDecoder, grammar_for
from museformer.cache import FCCache
from museformer.cli import main
from museformer.errors import MuseformerError, ParameterError
from museformer.form import (
    bar_note_sets, bar_tokens, decode_form, load_plan, parse_form, plan_error, plan_from_dict, similarity,
)
from museformer.generate import SampleConfig, generate
from museformer.grammar import Grammar
from museformer.infill import bar_starts, infill, parse_bar_ranges
from museformer.metrics import notes_from_ids, self_similarity
from museformer.model import Museformer, MuseformerConfig
from museformer.tokenizer import Tokenizer
from museformer.vocab import BOS_ID, TokenKind

DATA = Path(__file__).parent / "data"
TOKENIZER = Tokenizer.preset("lmd6")
VOCAB = TOKENIZER.vocab
SONG = [int(t) for t in TOKENIZER.encode_file(DATA / "bach_bwv269.mid", as_ids=True)]
CONFIG = SampleConfig(seed=0, top_k=8)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = Museformer(MuseformerConfig.preset("tiny")).eval()
    with torch.no_grad():  # a random model that ends bars soon: favour b-1 (keeps sampled bars short)
        model.output.weight[VOCAB.bar_id] += 0.3 * model.final_norm.weight.sign()
    return model


def _first_bars(n: int) -> list[int]:
    return SONG[: bar_starts(SONG, VOCAB.bar_id)[n]]


# -- the cache: forked rows are exact -----------------------------------------------------------
def test_forked_rows_equal_fresh_decoding_and_leave_the_parent_unchanged(model):
    """Fork a cache of one song into 3 rows, step each row through a different continuation (across
    bar ends): every step's logits equal a fresh full forward of that very prefix; the parent,
    stepped afterwards, still equals its own fresh decoding."""
    prefix = [BOS_ID] + _first_bars(2)
    rest = SONG[len(prefix) - 1:]
    continuations = [rest[:28], rest[5:33], rest[40:68]]  # three different futures of the prefix
    with torch.inference_mode():
        parent = FCCache(model, 1, capacity=16)  # small: the fork must also grow on its own
        model(torch.tensor([prefix]), cache=parent)
        fork = parent.fork([0, 0, 0])
        for step in range(28):
            ids = torch.tensor([[c[step]] for c in continuations])
            logits = model(ids, cache=fork)[:, 0]
            for row, c in enumerate(continuations):
                fresh = model(torch.tensor([prefix + c[: step + 1]]))[0, -1]
                torch.testing.assert_close(logits[row], fresh, rtol=1e-5, atol=1e-5)
        for step, token in enumerate(rest[:20]):  # the parent is where it was before the fork
            logits = model(torch.tensor([[token]]), cache=parent)[0, 0]
            fresh = model(torch.tensor([prefix + rest[: step + 1]]))[0, -1]
            torch.testing.assert_close(logits, fresh, rtol=1e-5, atol=1e-5)


def test_song_decoder_logprobs_equal_a_full_forward(model):
    """``feed`` and ``sample`` report the model's own log-probabilities (those of one full forward of
    the song), and ``continuation_logprob`` equals the full-forward sum over the counted suffix."""
    torch.set_grad_enabled(False)
    try:
        _check_song_decoder_logprobs(model)
    finally:
        torch.set_grad_enabled(True)


def _check_song_decoder_logprobs(model):
    prompt = _first_bars(2)
    song = SongDecoder(model, prompt, grammar_for(TOKENIZER, CONFIG))
    fed = song.feed(SONG[len(prompt): len(prompt) + 30])
    ids = torch.tensor([[BOS_ID] + song.ids])
    full = model(ids)[0].log_softmax(-1)  # (T, V)
    expect = full[:-1].gather(-1, ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(song.logprobs), expect, rtol=1e-4, atol=1e-4)
    assert len(fed) == 30
    pool = song.sample(3, 1, CONFIG, torch.Generator().manual_seed(1))
    assert pool and all(c.ids[-1] == VOCAB.bar_id and c.ids.count(VOCAB.bar_id) == 1 for c in pool)
    suffix = SONG[len(song.ids): len(song.ids) + 25]
    counted = [i % 3 != 0 for i in range(len(suffix))]
    scores = song.continuation_logprob([c.ids for c in pool] + [()], suffix, counted)
    for c, score in zip(list(pool) + [None], scores):
        cand = list(c.ids) if c is not None else []
        ids = torch.tensor([[BOS_ID] + song.ids + cand + suffix])
        lp = model(ids)[0].log_softmax(-1)[:-1].gather(-1, ids[0, 1:, None])[:, 0]
        if c is not None:
            torch.testing.assert_close(torch.tensor(c.logprobs), lp[len(song.ids): len(song.ids) + len(cand)],
                                       rtol=1e-4, atol=1e-4)
        tail = lp[len(song.ids) + len(cand):]
        assert score == pytest.approx(float(tail[torch.tensor(counted)].sum()), abs=1e-3)
    assert len(song.ids) == len(prompt) + 30  # sampling and scoring left the song as it was


def test_sampled_candidates_are_grammatical(model):
    """Every candidate bar sampled from a fork passes the grammar after the song it continues."""
    song = SongDecoder(model, _first_bars(3), grammar_for(TOKENIZER, CONFIG))
    grammar = Grammar.for_tokenizer(TOKENIZER)
    for c in song.sample(4, 2, CONFIG, torch.Generator().manual_seed(3)):
        assert grammar.validate(song.ids + list(c.ids), complete=False) == []
        assert c.ids.count(VOCAB.bar_id) == 2


# -- plans ------------------------------------------------------------------------------------
def test_text_plans_parse_into_bar_rules():
    """'A2 A2 B2 A'2' gives free bars, exact repeats, new material and varied repeats of the right bars."""
    plan = parse_form("A2 A2 B2 A'2", variation=0.5)
    kinds = [(r.kind, r.repeats, r.similarity) for r in plan.rules]
    assert kinds == [("free", None, None)] * 2 + [("repeat", 0, 1.0), ("repeat", 1, 1.0)] + \
        [("new", None, None)] * 2 + [("repeat", 0, 0.5), ("repeat", 1, 0.5)]
    assert plan.sections == (("A", 0, 2), ("A", 2, 2), ("B", 4, 2), ("A'", 6, 2))
    target = plan.planned_similarity()
    assert target[2, 0] == 1.0 and target[6, 0] == 0.5 and target[6, 2] == 0.5 and target[4, 0] == 0.0
    assert np.isnan(target[0, 1]) and np.isnan(target[4, 5])
    assert parse_form("verse2 chorus1 verse1").rules[3].repeats == 0


@pytest.mark.parametrize("text, message", [
    ("", "give sections"),
    ("A8 B", "write NAME[']BARS"),
    ("A'4 B4", "no section A comes before"),
    ("A4 A8", "cannot be longer"),
    ("A0", "at least 1 bar"),
    ("A4 +4", "write NAME[']BARS"),
])
def test_bad_text_plans_fail_clearly(text, message):
    """A malformed plan is one ParameterError naming --form and the section."""
    with pytest.raises(ParameterError, match="form") as info:
        parse_form(text)
    assert message in str(info.value)


def test_json_plans_parse_and_bad_ones_name_the_rule(tmp_path):
    """Bar-level JSON plans give repeats / new bars (1-based ranges); malformed rules fail naming the rule."""
    plan = plan_from_dict({"bars": 6, "rules": [{"bars": "3-4", "new": True},
                                                {"bars": "5-6", "repeats": "1-2", "similarity": 0.8}]})
    assert [r.kind for r in plan.rules] == ["free", "free", "new", "new", "repeat", "repeat"]
    assert plan.rules[5].repeats == 1 and plan.rules[5].similarity == 0.8
    assert load_plan({"form": "A1 A1"}).rules[1].repeats == 0
    bad = [({"bars": 4, "rules": [{"bars": "3-5", "new": True}]}, "rule 1 'bars'"),
           ({"bars": 4, "rules": [{"bars": "1-2", "repeats": "3-4"}]}, "only repeat bars before"),
           ({"bars": 4, "rules": [{"bars": "3-4", "repeats": "1"}]}, "differ in length"),
           ({"bars": 4, "rules": [{"bars": "2", "new": True}, {"bars": "2-3", "new": True}]}, "overlap"),
           ({"bars": 4, "rules": [{"bars": "3", "repeats": "1", "similarity": 2}]}, "similarity"),
           ({"bars": 4, "rules": [{"bars": "3", "copy": "1"}]}, "unknown key"),
           ({"bars": 0}, "'bars'"), ({"sections": []}, "unknown key")]
    for d, message in bad:
        with pytest.raises(MuseformerError, match=message):
            plan_from_dict(d)
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(MuseformerError, match="plan.json: not JSON"):
        load_plan(form_file=path)


# -- songs that follow a plan -------------------------------------------------------------------
def test_exact_repeat_reproduces_the_bar_and_varied_repeat_never_copies(model):
    """In 'A2 B1 A2 A'2' bars 4-5 are token-identical to bars 1-2; bars 6-7 are not copies of them;
    the song is grammatical and has the plan's bars; the similarities are metrics' (analyze's)."""
    plan = parse_form("A2 B1 A2 A'2")
    result = decode_form(model, TOKENIZER, plan, CONFIG, seed=5, candidates=3)
    bars = bar_tokens(result.ids, VOCAB.bar_id)
    assert len(bars) == 7
    assert bars[3] == bars[0] and bars[4] == bars[1]
    assert result.how[3:5] == ["copied", "copied"] and result.how[5].startswith("chosen of")
    sets = bar_note_sets(result.ids, VOCAB)
    assert similarity(sets[5], sets[0]) < 1.0 and similarity(sets[6], sets[1]) < 1.0
    assert Grammar.for_tokenizer(TOKENIZER).validate(result.ids, complete=False) == []
    matrix = self_similarity(notes_from_ids(result.ids, VOCAB))
    for i, sim in enumerate(result.bar_similarity):
        if plan.rules[i].kind == "repeat" and not np.isnan(matrix[i, plan.rules[i].repeats]):
            assert sim == pytest.approx(matrix[i, plan.rules[i].repeats])
    assert plan_error(plan, matrix)["pairs"] > 0


def test_generate_with_a_form_and_a_prompt_keeps_the_prompt(model):
    """generate(form=...) gives songs of the plan's bars starting with the prompt's bars, reproducibly."""
    prompt = _first_bars(2)
    songs = generate(model=model, tokenizer=TOKENIZER, prompt=prompt, form="A2 A2 B1", candidates=2, seed=7)
    again = generate(model=model, tokenizer=TOKENIZER, prompt=prompt, form="A2 A2 B1", candidates=2, seed=7)
    assert songs[0].ids == again[0].ids and songs[0].bars == 5
    assert songs[0].ids[: len(prompt)] == prompt
    assert bar_tokens(songs[0].ids, VOCAB.bar_id)[2:4] == bar_tokens(prompt, VOCAB.bar_id)
    with pytest.raises(ParameterError, match="max_bars"):
        generate(model=model, tokenizer=TOKENIZER, form="A2 B2", max_bars=5)


# -- infilling --------------------------------------------------------------------------------
def test_infill_keeps_every_other_bar_token_identical(model):
    """Filling bars 3-4 and 7 changes only those bars: every other bar is token-identical, the gaps
    hold as many bars as before, the song stays grammatical, and the weights sum to 1."""
    song = _first_bars(9)
    result = infill(song, "3-4,7", model=model, tokenizer=TOKENIZER, candidates=3, seed=11, top_k=8)
    before, after = bar_tokens(song, VOCAB.bar_id), bar_tokens(result.ids, VOCAB.bar_id)
    assert len(after) == len(before) == 9
    for i in (0, 1, 4, 5, 7, 8):
        assert after[i] == before[i]
    assert Grammar.for_tokenizer(TOKENIZER).validate(result.ids, complete=False) == []
    for gap in result.gaps:
        assert sum(gap.weights) == pytest.approx(1.0)
        chosen = list(gap.candidates[gap.chosen].ids)
        first = bar_starts(result.ids, VOCAB.bar_id)[gap.first - 1]
        assert result.ids[first: first + len(chosen)] == chosen
    again = infill(song, "3-4,7", model=model, tokenizer=TOKENIZER, candidates=3, seed=11, top_k=8)
    assert again.ids == result.ids


def test_infill_of_one_instrument_keeps_the_other_instruments_notes(model):
    """Infilling only the strings (48) in bar 3 of a six-track song: every note of the other
    instruments in that bar is kept (onset, pitch, duration, velocity), the other bars are
    token-identical, and the song stays grammatical."""
    song = [int(t) for t in TOKENIZER.encode_file(DATA / "synthetic_six_tracks.mid", as_ids=True)]
    song = song[: bar_starts(song, VOCAB.bar_id)[4]]  # 4 bars are enough
    result = infill(song, "3", model=model, tokenizer=TOKENIZER, candidates=2, seed=4, instruments=[48])
    before, after = bar_tokens(song, VOCAB.bar_id), bar_tokens(result.ids, VOCAB.bar_id)
    assert len(after) == len(before) and all(after[i] == before[i] for i in range(len(before)) if i != 2)

    def kept_notes(bar):  # (onset, instrument, pitch, duration, velocity) of the other instruments
        notes, onset, inst = [], -1, -1
        for i, t in enumerate(bar):
            kind, value = int(VOCAB.kinds[t]), int(VOCAB.values[t])
            onset = value if kind == TokenKind.ONSET else onset
            inst = value if kind == TokenKind.INSTRUMENT else inst
            if kind == TokenKind.PITCH and inst != 48:
                notes.append((onset, inst, value, int(VOCAB.values[bar[i + 1]]), int(VOCAB.values[bar[i + 2]])))
        return notes

    assert kept_notes(after[2]) == kept_notes(before[2]) and kept_notes(before[2])
    assert after[2][0] == before[2][0]  # the bar's tempo token
    assert Grammar.for_tokenizer(TOKENIZER).validate(result.ids, complete=False) == []
    with pytest.raises(ParameterError, match="instruments"):
        infill(song, "3", model=model, tokenizer=TOKENIZER, instruments=[200])


@pytest.mark.parametrize("ranges, message", [
    ("3-12", "outside the song, which has 9 bars"),
    ("0-2", "bars count from 1"),
    ("5-3", "first <= last"),
    ("2-4,4-5", "overlap"),
    ("two", "not a bar range"),
    ("", "give bar ranges"),
])
def test_bad_bar_ranges_fail_clearly(ranges, message):
    """Bars outside the song, reversed, overlapping or malformed: one ParameterError naming --bars."""
    with pytest.raises(ParameterError, match=message) as info:
        parse_bar_ranges(ranges, 9)
    assert info.value.parameter == "bars"


def test_infill_refuses_a_song_longer_than_the_context(model):
    """A song with more tokens than max_tokens is refused with both numbers named."""
    with pytest.raises(MuseformerError, match=f"has {len(SONG)} tokens, more than the model's context"):
        infill(SONG, "2", model=model, tokenizer=TOKENIZER, max_tokens=100)


def test_cli_infill_and_generate_form(tmp_path, model, capsys):
    """`museformer infill` writes OUT.mid + OUT.json and keeps the other bars; `generate --form` writes
    songs with the plan in the sidecar; bad ranges and plans are one line naming the option."""
    from museformer.checkpoint import save_checkpoint
    from museformer.files import midi_bytes

    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model, TOKENIZER)
    song = tmp_path / "song.mid"
    song.write_bytes(midi_bytes(TOKENIZER.decode(_first_bars(5))))
    # read back without key normalisation: the new bars' notes would move the whole song's key
    # estimate (and so every kept bar's pitches) on re-encoding, though the file keeps them
    plain = Tokenizer(config=dataclasses.replace(TOKENIZER.config, normalize_pitch=False))
    ids = [int(t) for t in plain.encode_file(song, as_ids=True)]
    out = tmp_path / "out.mid"
    assert main(["infill", str(song), "--bars", "2-3", "-o", str(out), "--checkpoint", str(ckpt), "--num", "2",
                 "--seed", "1"]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["gaps"][0]["bars"] == "2-3" and len(sidecar["gaps"][0]["weights"]) <= 2
    new = [int(t) for t in plain.encode_file(out, as_ids=True)]
    assert bar_tokens(new, VOCAB.bar_id)[0] == bar_tokens(ids, VOCAB.bar_id)[0]
    assert bar_tokens(new, VOCAB.bar_id)[3:] == bar_tokens(ids, VOCAB.bar_id)[3:]
    capsys.readouterr()
    assert main(["infill", str(song), "--bars", "4-9", "-o", str(out), "--checkpoint", str(ckpt)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["museformer infill: error: --bars: 4-9 is outside the song, which has 5 bars"]
    folder = tmp_path / "songs"
    assert main(["generate", "--form", "A1 A1 B1", "--candidates", "2", "--seed", "3", "--checkpoint", str(ckpt),
                 "-o", str(folder), "--quiet"]) == 0
    sidecar = json.loads((folder / "song_000.json").read_text())
    assert sidecar["form"]["bars"] == 3 and sidecar["bars"] == 3
    capsys.readouterr()
    assert main(["generate", "--form", "A2 A'4", "-o", str(folder), "--checkpoint", str(ckpt)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("museformer generate: error: --form: section 2")
