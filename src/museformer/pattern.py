"""The picture of ``museformer pattern``: a song (a MIDI file or a made-up one) -> its attention PNG.

This module owns the choices behind that command (which song, which pattern, which title) and the
checks of its inputs; the pattern itself is ``museformer.structure`` (``AttentionPattern``,
``render_pattern``, ``toy_song``). Errors name the parameter (``ParameterError``).
"""

from __future__ import annotations

import os
from pathlib import Path

from museformer.errors import MuseformerError, ParameterError

MAX_MADE_UP_BARS = 200


def draw_pattern(
    output: str | os.PathLike,
    *,
    song: str | os.PathLike | None = None,
    bars: int | None = None,
    fine_offsets: tuple[int, ...] | None = None,
    summary_tokens: int | None = None,
    full: bool = False,
    tokenizer_preset: str = "lmd6",
    max_tokens: int = 1024,
    seed: int = 0,
) -> Path:
    """Draw who attends to whom in one song, as a PNG; returns the path written.

    Args:
        output: the PNG file to write (must end in ``.png``; not a folder).
        song: a MIDI file, tokenised with ``tokenizer_preset``, first ``max_tokens`` tokens; or
        bars: a made-up song of that many bars of random lengths (1..200), random ``seed``.
        fine_offsets, summary_tokens: the pattern (None: ``AttentionPattern``'s defaults);
        full: plain causal attention instead (the dense baseline).
    """
    from museformer import structure
    from museformer.tokenizer import Tokenizer
    from museformer.vocab import BOS_ID, Vocab

    out = Path(output)
    if out.is_dir():
        raise ParameterError("output", f"{out} is a folder; give a .png file path")
    if out.suffix.lower() != ".png":
        raise ParameterError("output", f"{out} must be a .png file path")
    if (song is None) == (bars is None):
        raise ParameterError("song", "give either a MIDI file or a number of made-up bars")
    if bars is not None and not 1 <= bars <= MAX_MADE_UP_BARS:
        raise ParameterError("bars", f"must be between 1 and {MAX_MADE_UP_BARS}, got {bars}")
    if max_tokens < 2:
        raise ParameterError("max_tokens", f"must be >= 2, got {max_tokens}")
    default = structure.AttentionPattern()
    try:
        if full:
            pattern = structure.AttentionPattern.full()
        else:
            pattern = structure.AttentionPattern(
                tuple(default.fine_offsets if fine_offsets is None else fine_offsets),
                default.summary_tokens if summary_tokens is None else summary_tokens,
            )
    except ValueError as e:
        raise ParameterError("fine_offsets", str(e)) from None
    if bars is not None:
        vocab = Vocab.builtin("lmd6remi")
        ids = structure.toy_song(bars, vocab, seed=seed, incomplete_last=True)
        title = f"{bars} made-up bars"
    else:
        try:
            tokenizer = Tokenizer.preset(tokenizer_preset)
        except ValueError as e:
            raise ParameterError("tokenizer_preset", str(e)) from None
        vocab = tokenizer.vocab
        ids = [BOS_ID] + tokenizer.encode_file(song, as_ids=True).tolist()[: max_tokens - 1]
        title = os.path.basename(song)
    summaries = "one summary token per bar" if pattern.summary_tokens else "no summary tokens"
    title += " | " + ("full causal attention" if full else f"fine offsets {list(pattern.fine_offsets)}, {summaries}")
    try:
        return structure.render_pattern(ids, pattern, vocab, out, title=title)
    except OSError as e:
        raise MuseformerError(f"cannot write {out}: {e}") from None
