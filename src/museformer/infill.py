"""Bar infilling with the whole song as context: regenerate some bars, keep every other bar as it is.

This module owns ``infill(song, bars=...)``, what ``museformer infill SONG.mid --bars 9-12`` does.
For each gap (a 1-based inclusive range of bars; several gaps are filled left to right):

1. the song up to the gap is read into one exact cache (``bar_candidates.SongDecoder``);
2. K candidates for the gap are sampled left to right in one batch (a fork of that cache, every
   token masked by the grammar), each closing exactly as many bars as the gap has;
3. every candidate is weighted by the model's likelihood of the rest of the song after it (the
   kept bars after the gap, read by one batched forward per chunk with one row per candidate,
   ``SongDecoder.continuation_logprob``): ``w_i ∝ p(suffix | prefix, candidate_i)``;
4. the result is drawn from those weights (``choose="sample"``: sampling-importance-resampling,
   an approximation of drawing the gap given the song on both sides), or their best
   (``choose="best"``).

The song's other bars are never re-encoded: the output is the input's token ids with the gap's
bars replaced, so every other bar is token-identical (tested). Bars are counted as the tokenizer
counts them (``b-1`` tokens of the encoded song; with ``remove_empty_bars`` the empty bars before
the first note are not bars). The original gap's own likelihoods are reported next to the
candidates' (how the choice compares to what was there).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from museformer.bar_candidates import Candidate, SongDecoder, grammar_for
from museformer.errors import MuseformerError, ParameterError
from museformer.generate import SampleConfig, _as_model, song_seeds
from museformer.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

DEFAULT_CANDIDATES = 8
CHOICES = ("sample", "best")


@dataclass(frozen=True)
class GapResult:
    """How one gap was filled.

    Attributes:
        first, last: the gap's bars, 1-based inclusive.
        candidates: the sampled candidates (ids and per-token log-probabilities).
        suffix_logprob: per candidate, the log-likelihood (nats) of the song's kept bars after it.
        weights: per candidate, the normalised weight it was drawn with.
        chosen: index of the candidate that went into the song.
        original_logprob: the original gap bars' own log-likelihood (given the bars before).
        original_suffix_logprob: the kept bars' log-likelihood after the original gap bars.
        suffix_tokens: how many suffix tokens counted.
    """

    first: int
    last: int
    candidates: list[Candidate]
    suffix_logprob: list[float]
    weights: list[float]
    chosen: int
    original_logprob: float
    original_suffix_logprob: float
    suffix_tokens: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-native summary (no token lists)."""
        return {"bars": f"{self.first}-{self.last}", "chosen": self.chosen, "weights": self.weights,
                "suffix_logprob": self.suffix_logprob, "candidate_logprob": [c.logprob for c in self.candidates],
                "original_logprob": self.original_logprob, "original_suffix_logprob": self.original_suffix_logprob,
                "suffix_tokens": self.suffix_tokens}


@dataclass
class InfillResult:
    """The song with its gaps filled: ``ids`` (no BOS/EOS), the decoded ``score``, one ``GapResult``
    per gap, the ``seed`` used and the original song's ``original_ids``."""

    ids: list[int]
    original_ids: list[int]
    gaps: list[GapResult]
    seed: int
    score: Any = None
    skipped: int = 0
    bars: int = 0
    options: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------
def parse_bar_ranges(text: str | Sequence, num_bars: int) -> list[tuple[int, int]]:
    """1-based inclusive bar ranges from ``"9-12"``, ``"9-12,20-21"``, ``"7"`` or a list of
    ``(first, last)`` / ints, checked against a song of ``num_bars`` bars; sorted.

    Raises:
        ParameterError("bars", ...): a malformed range, a range outside the song, or two that overlap.
    """
    if isinstance(text, str):
        parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
        if not parts:
            raise ParameterError("bars", f"give bar ranges like 9-12 or 9-12,20-21, got {text!r}")
        ranges = []
        for part in parts:
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if m is None:
                raise ParameterError("bars", f"{part!r} is not a bar range like 9-12 or 7")
            ranges.append((int(m.group(1)), int(m.group(2) or m.group(1))))
    else:
        ranges = []
        for item in text:
            pair = (item, item) if isinstance(item, int) else tuple(item)
            if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
                raise ParameterError("bars", f"{item!r} is not a bar range (first, last)")
            ranges.append(pair)
        if not ranges:
            raise ParameterError("bars", "give at least one bar range")
    for first, last in ranges:
        if first < 1 or last < first:
            raise ParameterError("bars", f"{first}-{last} is not a range of bars (bars count from 1, first <= last)")
        if last > num_bars:
            raise ParameterError("bars", f"{first}-{last} is outside the song, which has {num_bars} bars")
    ranges.sort()
    for (a, b), (c, d) in zip(ranges, ranges[1:]):
        if c <= b:
            raise ParameterError("bars", f"ranges {a}-{b} and {c}-{d} overlap")
    return ranges


def song_ids(song: str | os.PathLike | Sequence[int], tokenizer) -> list[int]:
    """A song as token ids (no BOS/EOS): a MIDI file tokenised with the model's tokenizer, or ids."""
    if isinstance(song, (str, os.PathLike)):
        path = song
        try:
            ids = [int(t) for t in tokenizer.encode_file(path, as_ids=True)]
        except MuseformerError:
            raise
        except Exception as e:  # symusic's own errors for a file that is not MIDI
            raise MuseformerError(f"song {path}: cannot read it as MIDI ({e})") from None
        unknown = sum(1 for t in ids if t == UNK_ID)
        if unknown:
            raise MuseformerError(f"song {path}: {unknown} token(s) are not in the model's vocabulary "
                                  f"{tokenizer.vocab.name!r}")
    else:
        path = "song"
        ids = [int(t) for t in song]
        while ids and ids[0] == BOS_ID:
            ids = ids[1:]
        if ids and ids[-1] == EOS_ID:
            ids = ids[:-1]
        if any(t in (PAD_ID, UNK_ID, EOS_ID, BOS_ID) for t in ids):
            raise MuseformerError("song: ids may not hold padding, unknown, BOS or EOS tokens inside the song")
    if not any(t == tokenizer.vocab.bar_id for t in ids):
        raise MuseformerError(f"{path}: the song has no complete bar to infill")
    return ids


def bar_starts(ids: Sequence[int], bar_id: int) -> list[int]:
    """Index of the first token of every complete bar, plus one past the last bar's ``b-1``."""
    starts = [0]
    for i, t in enumerate(ids):
        if t == bar_id:
            starts.append(i + 1)
    return starts


# ---------------------------------------------------------------------------------------------
# infilling some instruments only: the other instruments' notes are kept, token for token
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _KeptEvent:
    """One kept instrument's notes at one onset of a gap bar: ``tokens`` = ``i-x`` then its notes."""

    onset: int
    key: int  # the instrument's sort key (the order inside an onset)
    tokens: tuple[int, ...]


def instrument_key(program: int, sort_insts: str) -> int:
    """Sort key of an instrument inside an onset, as the grammar orders them (2 rank, +1 for the
    second program of a shared rank)."""
    from museformer.remigen import SIX_TRACK_RANK

    if sort_insts == "6tracks":
        return 2 * SIX_TRACK_RANK.get(program, 99) + (program == 32)
    return 2 * program


class KeptParts:
    """One candidate's rule while infilling only some instruments (REMIGEN2 tokens).

    In every gap bar the bar's opening tokens and the notes of every instrument *not* in
    ``targets`` are those of the original bar, in their places; the model writes only notes of the
    target instruments, at the original onsets or at new ones between them. ``allowed()`` is the
    mask of tokens that keep this possible (on top of the grammar), ``advance`` follows the tokens.
    """

    def __init__(self, bars: Sequence[Sequence[int]], targets: Sequence[int], vocab, sort_insts: str) -> None:
        from museformer.vocab import TokenKind as K

        self.K, self.vocab, self.sort_insts = K, vocab, sort_insts
        self.kinds = np.asarray(vocab.kinds, dtype=np.int64)
        self.values = np.asarray(vocab.values, dtype=np.int64)
        targets = set(int(t) for t in targets)
        is_inst = self.kinds == K.INSTRUMENT
        self.target_ids = np.zeros(len(self.kinds), dtype=bool)
        self.target_ids[is_inst] = np.isin(self.values[is_inst], sorted(targets))
        self.key_of = np.full(len(self.kinds), -1, dtype=np.int64)
        self.key_of[is_inst] = [instrument_key(int(v), sort_insts) for v in self.values[is_inst]]
        self.openings: list[list[int]] = []
        self.events: list[list[_KeptEvent]] = []
        for bar in bars:
            body = list(bar[:-1])  # without b-1
            first = next((i for i, t in enumerate(body) if self.kinds[t] == K.ONSET), len(body))
            self.openings.append(body[:first])
            events: list[_KeptEvent] = []
            onset, current = -1, None
            for t in body[first:]:
                kind = self.kinds[t]
                if kind == K.ONSET:
                    onset, current = int(self.values[t]), None
                elif kind == K.INSTRUMENT:
                    current = None if self.target_ids[t] else [int(t)]
                    if current is not None:
                        events.append(_KeptEvent(onset, int(self.key_of[t]), ()))
                if current is not None and kind != K.ONSET:
                    if kind != K.INSTRUMENT:
                        current.append(int(t))
                    events[-1] = _KeptEvent(onset, events[-1].key, tuple(current))
            self.events.append(events)
        self.bar, self.event = 0, 0
        self.queue: list[int] = list(self.openings[0]) if self.openings else []
        self.in_event = False
        self.onset, self.key, self.last, self.target_playing = -1, -1, int(K.BAR), False

    def _next(self) -> _KeptEvent | None:
        events = self.events[self.bar] if self.bar < len(self.events) else []
        return events[self.event] if self.event < len(events) else None

    def allowed(self) -> np.ndarray | None:
        """Bool ``(V,)`` of the tokens this rule allows next; None = whatever the grammar allows."""
        K, kinds = self.K, self.kinds
        if self.bar >= len(self.events):
            return None
        mask = np.zeros(len(kinds), dtype=bool)
        if self.queue:
            mask[self.queue[0]] = True
            return mask
        nxt = self._next()
        pending = nxt is not None and nxt.onset == self.onset  # a kept instrument still due at this onset
        below = (self.key_of < nxt.key) if pending else np.ones(len(kinds), dtype=bool)
        if self.last == K.ONSET:  # an instrument must follow
            mask |= self.target_ids & below
        elif self.last in (K.INSTRUMENT, K.PITCH, K.DURATION):
            return None  # inside a target instrument's note: the grammar decides
        else:  # after the bar's opening or a note's velocity
            if self.last == K.VELOCITY and self.target_playing:
                mask |= kinds == K.PITCH
            if self.onset >= 0:
                mask |= self.target_ids & below & (self.key_of > self.key)
            if not pending:
                onsets = (kinds == K.ONSET) & (self.values > self.onset)
                if nxt is not None:
                    onsets &= self.values <= nxt.onset
                mask |= onsets
                if nxt is None:
                    mask[self.vocab.bar_id] = True
        if pending:
            mask[nxt.tokens[0]] = True
        return mask

    def advance(self, token: int) -> None:
        """Follow the token the candidate took."""
        K = self.K
        kind = int(self.kinds[token])
        if self.queue:
            self.queue.pop(0)
        elif kind == K.INSTRUMENT and not self.target_ids[token]:  # a kept instrument's turn: its notes follow
            self.queue = list(self._next().tokens[1:])
            self.in_event = True
        if kind == K.ONSET:
            self.onset, self.key = int(self.values[token]), -1
        elif kind == K.INSTRUMENT:
            self.key, self.target_playing = int(self.key_of[token]), bool(self.target_ids[token])
        elif kind == K.BAR:
            self.bar, self.event, self.onset, self.key = self.bar + 1, 0, -1, -1
            self.queue = list(self.openings[self.bar]) if self.bar < len(self.openings) else []
        self.last = kind
        if self.in_event and not self.queue:
            self.in_event, self.event = False, self.event + 1


# ---------------------------------------------------------------------------------------------
# infilling
# ---------------------------------------------------------------------------------------------
def infill(
    song: str | os.PathLike | Sequence[int],
    bars: str | Sequence,
    checkpoint: str | os.PathLike | None = None,
    *,
    model=None,
    tokenizer=None,
    candidates: int = DEFAULT_CANDIDATES,
    choose: str = "sample",
    instruments: Sequence[int] | None = None,
    config: SampleConfig | None = None,
    device: str | torch.device = "cpu",
    progress=None,
    **options: Any,
) -> InfillResult:
    """Regenerate some bars of a song with the whole song as context; every other bar stays as it is.

    Args:
        song: a MIDI file, or the song's token ids (no BOS).
        bars: the bars to regenerate, 1-based inclusive: ``"9-12"``, ``"9-12,20-21"`` or
            ``[(9, 12)]``.
        checkpoint: a checkpoint directory or run folder (None = the bundled model, unless
            ``model`` is given).
        model, tokenizer: an already loaded model and its tokenizer.
        candidates: K, candidates sampled per gap.
        choose: ``"sample"`` (draw from the weights) or ``"best"`` (the highest weight).
        instruments: regenerate only these instruments' notes in the gap (MIDI programs, 128 =
            drums): every other instrument's notes there stay as they were (``KeptParts``; REMIGEN2
            tokens only). None = the whole bars.
        config: sampling options (temperature, top-k/p, seed, grammar, instruments, tempo);
            ``max_tokens`` is the longest song accepted. Keyword ``options`` override its fields.
        device: where the model runs.
        progress: optional ``progress(candidate, token, finish)`` for every sampled token
            (``finish="bars"`` when a candidate has filled its gap), as ``generate``'s callback.

    Returns:
        the new song with, per gap, the candidates, their weights and the original's likelihoods.

    Raises:
        ParameterError: ``bars`` outside the song, overlapping or malformed; ``candidates`` < 1; a
            bad ``choose``. MuseformerError: a song longer than ``max_tokens`` or without bars.
    """
    config = dataclasses.replace(config or SampleConfig(), **options) if options else (config or SampleConfig())
    if not isinstance(candidates, int) or isinstance(candidates, bool) or candidates < 1:
        raise ParameterError("candidates", f"must be an integer >= 1, got {candidates!r}")
    if choose not in CHOICES:
        raise ParameterError("choose", f"choose from {CHOICES}, got {choose!r}")
    model, tokenizer, _ = _as_model(model, tokenizer, checkpoint, device)
    model.eval()
    if instruments is not None:
        instruments = tuple(instruments)
        if not instruments or any(not isinstance(p, int) or not 0 <= p <= 128 for p in instruments):
            raise ParameterError("instruments", f"give MIDI programs 0..127 or 128 (drums), got {instruments!r}")
        if tokenizer.config.encoding != "remigen2":
            raise ParameterError("instruments", "infilling some instruments only needs REMIGEN2 tokens, where each "
                                 f"onset lists its instruments; this model uses {tokenizer.config.encoding!r}")
        config = dataclasses.replace(config, instruments=None)  # the kept parts play their own instruments
    original = song_ids(song, tokenizer)
    if len(original) >= config.max_tokens:
        raise MuseformerError(f"the song has {len(original)} tokens, more than the model's context of --max-tokens "
                              f"{config.max_tokens}; pass a larger --max-tokens or a shorter song")
    bar_id = tokenizer.vocab.bar_id
    starts = bar_starts(original, bar_id)
    gaps = parse_bar_ranges(bars, len(starts) - 1)
    seed = song_seeds(config, 1)[0]
    generator = torch.Generator().manual_seed(seed)
    in_gap = [False] * len(original)
    for first, last in gaps:
        for i in range(starts[first - 1], starts[last]):
            in_gap[i] = True
    decoder = SongDecoder(model, original[: starts[gaps[0][0] - 1]], grammar_for(tokenizer, config))
    results: list[GapResult] = []
    for n, (first, last) in enumerate(gaps):
        lo, hi = starts[first - 1], starts[last]
        if n:  # the kept bars between the previous gap and this one
            decoder.feed(original[starts[gaps[n - 1][1]]:lo])
        steer = None
        if instruments is not None:
            gap_bars = [original[starts[b]:starts[b + 1]] for b in range(first - 1, last)]
            steer = lambda gap_bars=gap_bars: KeptParts(gap_bars, instruments, tokenizer.vocab,  # noqa: E731
                                                        tokenizer.config.sort_insts)
        pool = decoder.sample(candidates, last - first + 1, config, generator, progress=progress, steer=steer)
        if not pool:
            raise MuseformerError(f"bars {first}-{last}: every candidate ran past {decoder.max_bar_tokens} tokens "
                                  "in one bar")
        suffix = original[hi:]
        counted = [not g for g in in_gap[hi:]]
        scores = decoder.continuation_logprob([c.ids for c in pool] + [original[lo:hi]], suffix, counted)
        original_suffix = scores.pop()
        weights = torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0)
        if choose == "best":
            chosen = int(weights.argmax())
        else:
            chosen = int(torch.multinomial(weights, 1, generator=generator))
        original_lp = _logprob_of(decoder, original[lo:hi])
        decoder.feed(pool[chosen].ids)
        results.append(GapResult(first, last, pool, scores, weights.tolist(), chosen, original_lp, original_suffix,
                                 sum(counted)))
    decoder_tail = original[starts[gaps[-1][1]]:]
    ids = decoder.ids + decoder_tail  # the rest of the song, token-identical (not re-read)
    score, report = tokenizer.decode_with_report(ids)
    return InfillResult(ids, original, results, seed, score, report.skipped, sum(1 for t in ids if t == bar_id),
                        {"candidates": candidates, "choose": choose, **config.to_dict(), "seed": seed,
                         "infill_instruments": None if instruments is None else list(instruments)})


def _logprob_of(decoder: SongDecoder, tokens: Sequence[int]) -> float:
    """Log-likelihood of ``tokens`` right after the decoder's song, without changing it."""
    if not tokens:
        return 0.0
    return decoder.continuation_logprob([[]], tokens)[0]


def write_infill(result: InfillResult, output: str | os.PathLike, *, source: str | None = None,
                 checkpoint: str | None = None) -> dict[str, Any]:
    """Write the infilled song (MIDI, atomically) and its JSON sidecar ``OUT.json``; returns the sidecar."""
    import json
    from pathlib import Path

    from museformer import __version__
    from museformer.files import midi_bytes, write_bytes_atomic, write_text_atomic

    out = Path(output)
    write_bytes_atomic(out, midi_bytes(result.score))
    sidecar = {"museformer_version": __version__, "source": source, "checkpoint": checkpoint,
               "options": result.options, "seed": result.seed, "bars": result.bars, "num_tokens": len(result.ids),
               "skipped_tokens": result.skipped, "gaps": [g.to_dict() for g in result.gaps]}
    write_text_atomic(out.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
    return sidecar


__all__ = ["GapResult", "InfillResult", "KeptParts", "infill", "parse_bar_ranges", "write_infill"]
