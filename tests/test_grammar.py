"""Grammar: random constrained walks stay valid and decode cleanly; rules; constraints; prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zlib

import pytest
import torch

from museformer.errors import MuseformerError
from museformer.grammar import Grammar, GrammarConstraints, Phase
from museformer.remigen import tempo_bin
from museformer.tokenizer import Tokenizer, read_token_lines
from museformer.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, TokenKind

DATA = Path(__file__).parent / "data"
GOLDENS = sorted((DATA / "golden").glob("*.txt"))
# golden file suffix -> grammar options (tests/test_tokenizer.py has the full tokenizer options)
GOLDEN_GRAMMAR = {
    "remigen2": dict(encoding="remigen2", ignore_ts=False, sort_insts="id"),
    "remigen2_ts_norm": dict(encoding="remigen2", ignore_ts=False, sort_insts="id"),
    "remigen2_lmd6": dict(encoding="remigen2", ignore_ts=True, sort_insts="6tracks"),
    "remigen": dict(encoding="remigen", ignore_ts=False, sort_insts="id"),
    "remigen_norm_trim": dict(encoding="remigen", ignore_ts=False, sort_insts="id"),
    "remigen_ignore_ts_trim": dict(encoding="remigen", ignore_ts=True, sort_insts="id"),
}
SETTINGS = [
    ("lmd6remi", "remigen2", True, "6tracks"),
    ("lmd6remi", "remigen2", True, "id"),
    ("lmd6remi", "remigen", True, "6tracks"),
] + [
    ("general", enc, ts, sort)
    for enc in ("remigen2", "remigen")
    for ts in (True, False)
    for sort in ("id", "6tracks")
]


pytestmark = pytest.mark.usefixtures("one_thread")


def walk(grammar: Grammar, batch: int, steps: int, seed: int, state=None, eos_boost: float = 0.0):
    """Sample ``steps`` tokens per row among the allowed ones (random logits); return tokens, state."""
    gen = torch.Generator().manual_seed(seed)
    state = grammar.start(batch) if state is None else state
    out = []
    for _ in range(steps):
        allowed = grammar.allowed(state)
        assert allowed.any(dim=1).all(), "a sequence has no allowed next token"
        logits = torch.randn(batch, allowed.shape[1], generator=gen)
        logits[:, EOS_ID] += eos_boost
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=1)
        tok = torch.multinomial(probs, 1, generator=gen)[:, 0]
        assert grammar.is_allowed(state, tok).all()
        state = grammar.advance(state, tok, strict=True)
        out.append(tok)
    return torch.stack(out, dim=1), state


def until_last_bar(row: list[int], bar_id: int) -> list[int]:
    """A sampled row cut after its EOS, or else after its last b-1 (a complete song)."""
    if EOS_ID in row:
        return row[: row.index(EOS_ID) + 1]
    ends = [i for i, t in enumerate(row) if t == bar_id]
    return row[: ends[-1] + 1] if ends else []


@pytest.mark.parametrize("vocab,encoding,ignore_ts,sort", SETTINGS)
def test_random_constrained_walks_are_valid_and_decode_without_skips(vocab, encoding, ignore_ts, sort):
    """Thousands of sampled steps: every row always has a choice, validates, and decodes with 0 skips."""
    grammar = Grammar(vocab, encoding, ignore_ts, sort)
    tok = Tokenizer(encoding=encoding, ignore_ts=ignore_ts, sort_insts=sort, vocab=vocab)
    tokens, state = walk(grammar, batch=12, steps=250, seed=zlib.crc32(repr((vocab, encoding, ignore_ts, sort)).encode()) % 1000)
    assert not state.violated.any()
    for row in tokens.tolist():
        assert grammar.validate(row, complete=False) == []
        song = until_last_bar(row, grammar.vocab.bar_id)
        if not song:  # a row still inside its first bar: already checked as a prefix above
            continue
        assert grammar.validate(song) == []
        _, report = tok.decode_with_report(song)
        assert report.skipped == 0, report.reasons
    # the walks really exercise the grammar: many bars in all
    assert int(state.bars.sum()) >= 12


@pytest.mark.parametrize("vocab,encoding,ignore_ts,sort", SETTINGS[:1] + SETTINGS[-4:])
def test_walks_from_random_start_states(vocab, encoding, ignore_ts, sort):
    """Walks continued from prefilled states (a random cut of a random walk) stay valid."""
    grammar = Grammar(vocab, encoding, ignore_ts, sort)
    first, _ = walk(grammar, batch=6, steps=120, seed=1)
    cuts = torch.randint(0, 120, (6,), generator=torch.Generator().manual_seed(2)).tolist()
    prompts = [row[:c] for row, c in zip(first.tolist(), cuts)]
    state = grammar.prefill(grammar.start(6), prompts)
    more, state = walk(grammar, batch=6, steps=150, seed=3, state=state)
    for prompt, row in zip(prompts, more.tolist()):
        assert grammar.validate(prompt + row, complete=False) == []


@pytest.mark.parametrize("vocab,encoding,ignore_ts,sort", [SETTINGS[0], SETTINGS[4], SETTINGS[9]])
def test_cached_masks_equal_the_rules_token_by_token(vocab, encoding, ignore_ts, sort):
    """allowed() (a mask cached per situation) equals the token-by-token rule check that validate
    uses, for every row at every step of a walk, and the state equals one stepped token by token."""
    grammar = Grammar(vocab, encoding, ignore_ts, sort, GrammarConstraints(max_notes_per_instrument=3, max_bars=3))
    tokens, _ = walk(grammar, batch=3, steps=60, seed=4)
    state = grammar.start(3)
    for step in range(tokens.shape[1]):
        allowed = grammar.allowed(state)
        for b in range(3):
            one = grammar.state_of(tokens[b, :step])
            assert one.rows[0] == state.rows[b]
            assert allowed[b].tolist() == [grammar._allows(state.rows[b], t) for t in range(len(grammar.vocab))]
        state = grammar.advance(state, tokens[:, step])


def test_decoder_and_grammar_agree_on_random_token_streams():
    """On random streams (valid walks, the same with random tokens swapped in, and plain random ids),
    every stream the grammar accepts decodes with no skipped token, every stream the decoder must skip
    tokens of is rejected by the grammar, and re-encoding an accepted stream's decoding gives a stream
    the grammar accepts."""
    for vocab, encoding, ignore_ts, sort in (SETTINGS[0], SETTINGS[-1]):
        grammar = Grammar(vocab, encoding, ignore_ts, sort, GrammarConstraints(bar_positions=96))
        tok = Tokenizer(encoding=encoding, ignore_ts=ignore_ts, sort_insts=sort, vocab=vocab)
        walks, _ = walk(grammar, batch=16, steps=150, seed=11)
        gen = torch.Generator().manual_seed(12)
        streams = []
        for row in walks.tolist():
            song = until_last_bar(row, grammar.vocab.bar_id)
            streams.append(song)
            broken = list(song)
            for _ in range(3):
                broken[int(torch.randint(len(broken), (1,), generator=gen))] = int(
                    torch.randint(len(grammar.vocab), (1,), generator=gen))
            streams.append(broken)
            streams.append(torch.randint(len(grammar.vocab), (40,), generator=gen).tolist())
        verdicts = {"accepted": 0, "skipped": 0}
        for ids in streams:
            valid = grammar.is_valid(ids, complete=False)
            score, report = tok.decode_with_report(ids)
            assert not (valid and report.skipped), (grammar.vocab.decode(ids), report.reasons)
            verdicts["skipped"] += report.skipped > 0
            if valid and score.note_num():
                verdicts["accepted"] += 1
                again = tok.encode(score, as_ids=True)
                assert grammar.validate(again) == [], grammar.vocab.decode(ids)
        assert verdicts["accepted"] >= 10 and verdicts["skipped"] >= 10, verdicts


@pytest.mark.parametrize("golden", GOLDENS, ids=lambda p: p.stem)
def test_official_encoder_dumps_are_valid(golden):
    """Every official MidiProcessor dump in tests/data/golden validates (any meter: 96 positions)."""
    stem, config = golden.stem.split(".")
    grammar = Grammar("general", constraints=GrammarConstraints(bar_positions=96), **GOLDEN_GRAMMAR[config])
    assert grammar.validate(read_token_lines(golden)[0]) == []


def test_tokenizer_encodings_of_the_fixture_files_are_valid():
    """The tokenizer's own ids for every fixture MIDI validate under Grammar.for_tokenizer."""
    # ignore_ts keeps each file's bar lengths (a 5/4 fixture has 60 positions), so allow 96
    wide = GrammarConstraints(bar_positions=96)
    for path in sorted(DATA.glob("*.mid")):
        for tok in (Tokenizer.preset("lmd6"), Tokenizer(), Tokenizer(encoding="remigen", sort_insts="6tracks")):
            grammar = Grammar.for_tokenizer(tok, constraints=wide)
            ids = tok.encode_file(path, as_ids=True)
            assert UNK_ID not in ids.tolist(), path.name  # program 32 joins bass 43 in lmd6remi
            assert grammar.validate(np.concatenate([[BOS_ID], ids, [EOS_ID]])) == [], path.name


def test_lmd6_preset_grammar_settings():
    """for_tokenizer takes encoding, ts, sort order and vocabulary from the tokenizer."""
    grammar = Grammar.for_tokenizer(Tokenizer.preset("lmd6"))
    assert (grammar.vocab.name, grammar.encoding, grammar.ignore_ts, grammar.sort_insts) == (
        "lmd6remi",
        "remigen2",
        True,
        "6tracks",
    )


LMD = Grammar("lmd6remi", "remigen2", ignore_ts=True, sort_insts="6tracks")
GEN_TS = Grammar("general", "remigen2", ignore_ts=False, sort_insts="id")
REMIGEN = Grammar("general", "remigen", ignore_ts=False, sort_insts="id")
NOTE = "p-60 d-6 v-20"

VALID = [
    (LMD, f"t-38 o-0 i-80 p-72 d-6 v-20 {NOTE} i-128 p-164 d-0 v-20 o-12 i-0 {NOTE} b-1"),
    (LMD, "t-38 b-1 t-30 o-47 i-48 p-60 d-95 v-31 b-1"),  # empty bar, last onset, last duration
    (LMD, f"t-38 o-0 i-0 {NOTE} {NOTE} p-60 d-6 v-19 p-60 d-5 v-31 p-59 d-95 v-31 b-1"),  # ties allowed
    (GEN_TS, "s-9 t-30 b-1 s-9 t-30 o-0 i-0 p-60 d-1 v-1 i-128 p-130 d-1 v-1 b-1"),
    (GEN_TS, "s-8 t-30 o-35 i-5 p-60 d-1 v-1 b-1"),  # 3/4: 36 positions
    (REMIGEN, "s-9 b-1 s-9 o-0 t-30 i-0 p-60 d-1 v-1 o-3 t-31 i-1 p-60 d-1 v-1 b-1"),
    (Grammar("general", "remigen", ignore_ts=True), "b-1 o-0 t-30 i-0 p-60 d-1 v-1 b-1"),
    (Grammar("general", sort_insts="6tracks"), "t-30 o-0 i-43 p-40 d-1 v-1 i-32 p-40 d-1 v-1 i-25 p-1 d-1 v-1 b-1"),
    (Grammar("general", sort_insts="6tracks"), "t-30 o-0 i-32 p-40 d-1 v-1 i-43 p-40 d-1 v-1 b-1"),
]

INVALID = [  # (grammar, tokens, words the first problem must contain)
    (LMD, "o-0 i-0 p-60 d-6 v-20 b-1", "start of a bar"),  # missing tempo
    (LMD, "t-38 o-0 p-60 d-6 v-20 b-1", "after o-* comes i-*"),
    (LMD, "t-38 o-0 i-0 d-6 v-20 b-1", "after i-* comes p-*"),
    (LMD, "t-38 o-0 i-0 p-60 v-20 b-1", "after p-* comes d-*"),
    (LMD, "t-38 o-0 i-0 p-60 d-6 b-1", "after d-* comes v-*"),
    (LMD, f"t-38 o-12 i-0 {NOTE} o-12 i-0 {NOTE} b-1", "onsets must increase"),
    (LMD, f"t-38 o-12 i-0 {NOTE} o-5 i-0 {NOTE} b-1", "onsets must increase"),
    (LMD, f"t-38 o-48 i-0 {NOTE} b-1", "48 onset positions"),
    (GEN_TS, "s-8 t-30 o-36 i-5 p-60 d-1 v-1 b-1", "36 onset positions"),
    (LMD, f"t-38 o-0 i-0 {NOTE} i-80 {NOTE} b-1", "sort order '6tracks'"),
    (LMD, f"t-38 o-0 i-0 {NOTE} i-0 {NOTE} b-1", "sort order"),
    (GEN_TS, "s-9 t-30 o-0 i-5 p-60 d-1 v-1 i-2 p-60 d-1 v-1 b-1", "sort order 'id'"),
    (Grammar("general", sort_insts="6tracks"), "t-30 o-0 i-43 p-40 d-1 v-1 i-32 p-40 d-1 v-1 i-43", "sort order"),
    (LMD, f"t-38 o-0 i-0 {NOTE} p-61 d-6 v-20 b-1", "go down in pitch"),
    (LMD, f"t-38 o-0 i-0 {NOTE} p-60 d-7 v-20 b-1", "go down in duration"),
    (LMD, f"t-38 o-0 i-0 {NOTE} p-60 d-6 v-21 b-1", "go down in velocity"),
    (LMD, "t-38 o-0 i-128 p-60 d-6 v-20 b-1", "drum (i-128) pitches"),
    (LMD, "t-38 o-0 i-0 p-160 d-6 v-20 b-1", "non-drum pitches"),
    (LMD, f"t-38 o-0 i-0 {NOTE} </s>", "after v-* comes"),
    (LMD, "t-38 b-1 </s> t-38 b-1", "nothing but padding"),
    (LMD, "t-38 b-0", "b-1"),
    (LMD, "t-38 o-0 i-0 p-60 d-96 v-20 b-1", "96 duration bins"),
    (LMD, "t-38 o-0 i-0 p-60 d-6 v-20", "end of sequence"),  # unfinished bar
    (LMD, "", "end of sequence"),  # no bar at all
    (LMD, f"t-38 <c> o-0 i-0 {NOTE} b-1", "not part of the REMIGEN grammar"),
    (GEN_TS, "t-30 o-0 i-0 p-60 d-1 v-1 b-1", "after the start of a bar comes s-*"),
    (REMIGEN, "s-9 o-0 i-0 p-60 d-1 v-1 b-1", "after o-* comes t-*"),
    (REMIGEN, "s-9 t-30 o-0 t-30 i-0 p-60 d-1 v-1 b-1", "after s-* comes o-* or b-1"),
    (LMD, "s-9 t-38 b-1", "not in vocabulary"),
]


@pytest.mark.parametrize("grammar,text", VALID)
def test_hand_written_valid_sequences(grammar, text):
    """Sequences following every rule are accepted, with or without BOS/EOS."""
    tokens = text.split()
    assert grammar.validate(tokens) == []
    ids = [BOS_ID] + grammar.vocab.encode(tokens).tolist() + [EOS_ID, PAD_ID, PAD_ID]
    assert grammar.is_valid(ids)


@pytest.mark.parametrize("grammar,text,words", INVALID)
def test_hand_written_invalid_sequences(grammar, text, words):
    """Each broken rule is found, and the first message names it."""
    if words == "not in vocabulary":
        with pytest.raises(MuseformerError, match=words):
            grammar.validate(text.split())
        return
    problems = grammar.validate(text.split() if text else [])
    assert problems and words in problems[0], problems


def test_invalid_sequences_are_rejected_by_the_batched_machine_too():
    """advance(strict=True) raises at the first disallowed token; strict=False flags the row."""
    for grammar, text, _ in INVALID:
        if not text or "s-9 t-38" in text:
            continue
        ids = grammar.vocab.encode(text.split())
        bad = grammar.validate(text.split())[0]
        if bad.startswith("end of sequence"):
            continue
        state = grammar.start(1)
        with pytest.raises(MuseformerError, match="not allowed"):
            for t in ids:
                state = grammar.advance(state, torch.tensor([t]), strict=True)
        state = grammar.start(1)
        for t in ids:
            state = grammar.advance(state, torch.tensor([t]))
        assert bool(state.violated[0])


def test_instrument_and_tempo_constraints():
    """Walks with fixed instruments, tempo and time signature use only those tokens."""
    c = GrammarConstraints(instruments=(0, 128), tempo_bpm=120, time_signature=(3, 4))
    grammar = Grammar("general", "remigen", ignore_ts=False, constraints=c)
    tokens, _ = walk(grammar, batch=8, steps=200, seed=5)
    texts = {grammar.vocab.symbols[t] for t in tokens.flatten().tolist()}
    assert {t for t in texts if t[0] == "i"} <= {"i-0", "i-128"}
    assert {t for t in texts if t[0] == "t"} == {f"t-{tempo_bin(120)}"} == {"t-35"}
    assert {t for t in texts if t[0] == "s"} == {"s-8"}
    assert max(int(t[2:]) for t in texts if t[0] == "o") < 36
    problems = grammar.validate("s-8 o-0 t-35 i-25 p-60 d-1 v-1 b-1".split())
    assert "allowed instruments [0, 128]" in problems[0]


def test_tempo_changes_off_keeps_the_first_tempo():
    """With tempo_changes=False (the sampling default) every t-* repeats the song's last tempo (bar
    and onset tempos, both encodings); the grammar alone still accepts songs that change tempo."""
    from museformer.generate import SampleConfig, build_grammar

    off = GrammarConstraints(tempo_changes=False)
    for steady in (Grammar("general", "remigen", True, constraints=off), build_grammar(Tokenizer.preset("lmd6"), SampleConfig())):
        tokens, state = walk(steady, batch=8, steps=300, seed=13)
        assert not state.violated.any()
        for row in tokens.tolist():
            tempos = {t for t in row if steady.vocab.kinds[t] == TokenKind.TEMPO}
            assert len(tempos) == 1
    lmd = Grammar("lmd6remi", constraints=GrammarConstraints(tempo_changes=False))
    change = f"t-38 o-0 i-0 {NOTE} b-1 t-30 o-0 i-0 {NOTE} b-1"
    assert "keeps its tempo t-38" in lmd.validate(change.split())[0]
    assert LMD.validate(change.split()) == []
    # a prompt that already changed tempo continues with its last tempo
    state = lmd.prefill(lmd.start(1), [lmd.vocab.encode(change.split()[:-1]).tolist()], strict=False)
    state = lmd.advance(state, torch.tensor([lmd.vocab.bar_id]))
    allowed = lmd.allowed(state)[0].nonzero().flatten().tolist()
    assert [lmd.vocab.symbols[i] for i in allowed if lmd.vocab.kinds[i] == TokenKind.TEMPO] == ["t-30"]


def test_bar_and_length_constraints():
    """Exact bars end the song after that many bars; min_tokens keeps EOS away until then."""
    exact = Grammar("lmd6remi", constraints=GrammarConstraints(min_bars=3, max_bars=3))
    tokens, state = walk(exact, batch=8, steps=400, seed=6, eos_boost=3.0)
    assert state.finished.all() and (state.bars == 3).all()
    for row in tokens.tolist():
        assert row.count(exact.vocab.bar_id) == 3 and row[row.index(EOS_ID) - 1] == exact.vocab.bar_id
    assert "only EOS may follow" in exact.validate("t-1 b-1 t-1 b-1 t-1 b-1 t-1 b-1".split())[0]
    assert "at least 3 complete bar" in exact.validate("t-1 b-1 t-1 b-1".split())[0]

    long = Grammar("lmd6remi", constraints=GrammarConstraints(min_tokens=60))
    tokens, state = walk(long, batch=8, steps=150, seed=7, eos_boost=6.0)
    for row in tokens.tolist():
        if EOS_ID in row:
            assert row.index(EOS_ID) >= 60
    assert state.finished.any()
    assert "at least 60 tokens" in long.validate("t-1 b-1".split())[0]


def test_max_notes_per_instrument():
    """No instrument plays more than the given number of notes at one onset."""
    grammar = Grammar("lmd6remi", constraints=GrammarConstraints(max_notes_per_instrument=2))
    tokens, _ = walk(grammar, batch=8, steps=300, seed=8)
    for row in tokens.tolist():
        run = 0
        for text in grammar.vocab.decode(row):
            run = run + 1 if text[0] == "p" else (run if text[0] in "dv" else 0)
            assert run <= 2
    assert "at most 2 notes" in grammar.validate(f"t-1 o-0 i-0 {NOTE} {NOTE} {NOTE} b-1".split())[0]


def test_prefill_matches_stepping_and_reports_bad_prompts():
    """prefill equals token-by-token advance, skips padding and BOS, and names a bad prompt token."""
    grammar = LMD
    prompt = grammar.vocab.encode(f"t-38 o-0 i-80 {NOTE} o-12 i-0 p-60 d-6".split()).tolist()
    stepped = grammar.start(1)
    for t in prompt:
        stepped = grammar.advance(stepped, torch.tensor([t]), strict=True)
    padded = [[PAD_ID, PAD_ID, BOS_ID] + prompt, [BOS_ID] + prompt + [PAD_ID]]
    filled = grammar.prefill(grammar.start(2), padded)
    assert filled.rows == stepped.rows * 2
    assert filled.phase.tolist() == [Phase.AFTER_DURATION] * 2
    assert grammar.allowed(filled)[:, grammar.vocab.token_to_id("v-3")].all()

    bad = [prompt, grammar.vocab.encode("t-38 o-0 i-0 p-60 p-60".split()).tolist()]
    with pytest.raises(MuseformerError, match=r"prompt 1 .* token 4 \('p-60'\): after p-\* comes d-\*"):
        grammar.prefill(grammar.start(2), bad)
    assert grammar.prefill(grammar.start(2), bad, strict=False).violated.tolist() == [False, True]


def test_constraints_checks():
    """Constraints normalise instruments and reject bad values, each error naming the constraint."""
    c = GrammarConstraints(instruments=(128, 0, 0), tempo_bpm=100.0, min_tokens=1024, max_bars=64)
    assert c.instruments == (0, 128)
    for bad in (
        dict(instruments=(200,)),
        dict(instruments=()),
        dict(tempo_bpm=-3),
        dict(min_bars=0),
        dict(min_bars=4, max_bars=2),
        dict(min_tokens=-1),
        dict(time_signature=(3, 5)),
        dict(max_notes_per_instrument=0),
        dict(bar_positions=200),
        dict(tempo_changes="no"),
    ):
        with pytest.raises(MuseformerError, match=f"constraint ({'|'.join(bad)})="):
            GrammarConstraints(**bad)
    with pytest.raises(MuseformerError, match="no time-signature tokens"):
        Grammar("lmd6remi", ignore_ts=False)
    with pytest.raises(MuseformerError, match="no instrument left"):
        Grammar("lmd6remi", constraints=GrammarConstraints(instruments=(5,)))
    with pytest.raises(MuseformerError, match="sort_insts"):
        Grammar("general", sort_insts="pitch")


def test_state_select_and_device_tables():
    """select() reorders rows; a state built for one row continues like the original."""
    tokens, state = walk(LMD, batch=4, steps=40, seed=9)
    picked = state.select([2, 2, 0])
    assert picked.batch_size == 3 and picked.phase.tolist() == [state.phase[i].item() for i in (2, 2, 0)]
    resumed = LMD.state_of(tokens[2])
    assert LMD.allowed(resumed)[0].tolist() == LMD.allowed(state)[2].tolist()


@pytest.mark.parametrize("vocab,encoding,ignore_ts,sort", SETTINGS[:4])
def test_single_song_fast_path_equals_batched_path(vocab, encoding, ignore_ts, sort):
    """A batch of one allows and flags exactly what a batch of two does, also after forced tokens."""
    grammar = Grammar(vocab, encoding, ignore_ts, sort, constraints=GrammarConstraints(max_bars=6))
    gen = torch.Generator().manual_seed(7)
    one, two = grammar.start(1), grammar.start(2)
    for step in range(600):
        allowed_one, allowed_two = grammar.allowed(one), grammar.allowed(two)
        assert torch.equal(allowed_one[0], allowed_two[0]) and torch.equal(allowed_two[0], allowed_two[1])
        if step % 50 == 49:  # now and then force a token the grammar forbids: both paths must flag it
            tok = torch.nonzero(~allowed_one[0]).flatten()[:1]
        else:
            choices = torch.nonzero(allowed_one[0]).flatten()
            tok = choices[torch.randint(len(choices), (1,), generator=gen)]
        one = grammar.advance(one, tok)
        two = grammar.advance(two, tok.repeat(2))
        assert bool(one.violated[0]) == bool(two.violated[0]) == bool(two.violated[1])
        if bool(one.violated[0]) or bool(one.finished[0]):
            one, two = grammar.start(1), grammar.start(2)
