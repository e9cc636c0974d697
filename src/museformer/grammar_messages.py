"""Why a token breaks the REMIGEN grammar: the messages of ``museformer.grammar``.

The grammar decides (``Grammar._allows``); this module only words a refusal for people, from the
same state and tables, so that the rules read without the prose. Every rule of
``Grammar._bounds``, every excluded token and every phase has a sentence here.
"""

from __future__ import annotations

from museformer.vocab import EOS_ID, TokenKind as K

_PHASE_TEXT = {
    "BAR_START": "the start of a bar", "AFTER_TIME_SIG": "s-*", "AFTER_BAR_TEMPO": "the bar's t-*",
    "AFTER_ONSET": "o-*", "AFTER_ONSET_TEMPO": "o-* t-*", "AFTER_INSTRUMENT": "i-*", "AFTER_PITCH": "p-*",
    "AFTER_DURATION": "d-*", "AFTER_VELOCITY": "v-*", "ENDED": "EOS",
}
_KIND_TEXT = {
    K.SPECIAL: "EOS", K.BAR: "b-1", K.ONSET: "o-*", K.TEMPO: "t-*", K.TIME_SIG: "s-*", K.INSTRUMENT: "i-*",
    K.PITCH: "p-*", K.DURATION: "d-*", K.VELOCITY: "v-*",
}


def token_text(vocab, tok: int) -> str:
    """A token for a message: its quoted text, or its id when outside the vocabulary."""
    return repr(vocab.symbols[tok]) if 0 <= tok < len(vocab) else f"id {tok} (outside the vocabulary)"


def why(grammar, cur, tok: int) -> str:
    """A sentence saying why ``tok`` may not follow the state ``cur`` (a ``Cursor``) of ``grammar``."""
    from museformer.grammar import Phase  # the grammar imports this module

    t, c = grammar._t, grammar.constraints
    if not 0 <= tok < len(t.kind_of):
        return f"ids run from 0 to {len(t.kind_of) - 1}"
    kind, value = t.kind_of[tok], t.value_of[tok]
    if tok in t.excluded:
        return f"{grammar.vocab.symbols[tok]} {t.excluded[tok]}"
    if cur.phase == Phase.ENDED:
        return "nothing but padding may follow EOS"
    at_bar_start = cur.phase == Phase.BAR_START
    if c.max_bars is not None and at_bar_start and cur.bars >= c.max_bars and tok != EOS_ID:
        return f"the song already has max_bars={c.max_bars} bars; only EOS may follow"
    if not t.accepts[cur.phase][tok]:
        expected = [_KIND_TEXT[k] for k in t.phase_kinds[cur.phase] if k != K.SPECIAL] + ["EOS"] * at_bar_start
        return f"after {_PHASE_TEXT[Phase(cur.phase).name]} comes {' or '.join(expected)}"
    if tok == EOS_ID:
        if cur.bars < c.min_bars:
            return f"EOS needs at least {c.min_bars} complete bar(s), got {cur.bars}"
        return f"EOS needs at least {c.min_tokens} tokens, got {cur.length}"
    if kind == K.ONSET and value <= cur.onset:
        return f"onsets must increase inside a bar (previous o-{cur.onset})"
    if kind == K.ONSET:
        return f"the bar has {cur.bar_len} onset positions (o-0..o-{cur.bar_len - 1})"
    if kind == K.TEMPO:
        return f"the song keeps its tempo t-{cur.tempo} (constraint tempo_changes=False)"
    if kind == K.INSTRUMENT:
        prev = t.program_of_key.get(cur.inst_key, cur.inst_key)
        return f"instruments at one onset follow sort order {grammar.sort_insts!r} strictly (previous i-{prev})"
    if kind == K.PITCH:
        if c.max_notes_per_instrument is not None and cur.notes >= c.max_notes_per_instrument:
            return f"at most {c.max_notes_per_instrument} notes per instrument and onset"
        if cur.drum and value < 128:
            return "drum (i-128) pitches are p-128..p-255"
        if not cur.drum and value > 127:
            return "non-drum pitches are p-0..p-127 (p-128 and up are drums)"
        return f"notes of one instrument at one onset go down in pitch (previous p-{cur.last_pitch})"
    if kind == K.DURATION:
        return f"equal pitches go down in duration (previous note p-{cur.last_pitch} d-{cur.last_duration})"
    return (  # velocity: the only kind left with a bound
        f"equal notes go down in velocity (previous note p-{cur.last_pitch} d-{cur.last_duration} "
        f"v-{cur.last_velocity})"
    )
