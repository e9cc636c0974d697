"""Form plans: "A8 A8 B8 A'8" or a bar-level JSON plan, and songs decoded to follow them.

This module owns what a plan *means* and how a song is steered towards it. The decoding mechanics
(forked caches, grammar-masked candidate bars, log-probabilities) are ``museformer.bar_candidates``;
bar similarity is ``museformer.metrics``' definition (the Jaccard index of the bars' sets of
``(onset, pitch, duration)`` notes, what ``museformer analyze`` reports).

A plan gives every bar of the song one ``BarRule``:

- ``free``: no structural wish (the first section): one sample, as plain generation would draw;
- ``repeat`` of an earlier bar at a target similarity: 1.0 is an exact repeat, whose tokens are
  copied; below 1.0 a *varied* repeat: K candidates are sampled and the one whose similarity to
  the bar it repeats is closest to the target wins (ties and trade-offs by the model's
  log-probability); a candidate with the same notes as that bar (similarity 1) never wins;
- ``new`` material: K candidates, the one least similar to the bars of earlier, different sections
  wins (again traded against log-probability).

Text form: sections separated by spaces, each ``NAME[']N`` with NAME a letter or word (``A``,
``B``, ``verse``), primes marking a varied repeat and N its bars: ``A8 A8 B8 A'8``. A section whose
name came before repeats that earlier section bar by bar (exactly, or varied with primes); it may
be shorter, not longer. JSON form (``--form-file``)::

    {"form": "A8 A8 B8 A'8", "variation": 0.6}                        # the text form, or
    {"bars": 32,
     "rules": [{"bars": "9-16", "new": true},
               {"bars": "17-24", "repeats": "1-8", "similarity": 0.8}]}

with 1-based inclusive bar ranges; bars no rule names are free.

Scoring a candidate c for bar i: ``structure(c) + logprob_weight * mean_logprob(c)``, with
``structure = -|sim(c, bar r) - target|`` for a varied repeat of bar r and ``-max_j sim(c, bar j)``
over the earlier bars j of other sections for new material (two empty bars count as equal here).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from museformer.errors import MuseformerError, ParameterError

DEFAULT_CANDIDATES = 8
DEFAULT_VARIATION = 0.6  # target similarity of a varied repeat (A')
DEFAULT_LOGPROB_WEIGHT = 0.5
VARIATIONS = ("prefix", "sample")  # how varied-repeat candidates are proposed (decode_form)
_SECTION = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*?)('*)(\d+)$")


# =============================================================================================
# plans
# =============================================================================================
@dataclass(frozen=True)
class BarRule:
    """What one bar of a plan should be.

    Attributes:
        kind: ``"free"``, ``"repeat"`` or ``"new"``.
        section: index of the section (text form) or rule (JSON form) the bar belongs to; "new"
            bars avoid the earlier bars of other sections.
        label: the section's name as written (``"A'"``), for pictures and messages.
        repeats: 0-based bar this bar repeats (``"repeat"`` only).
        similarity: target similarity to that bar; 1.0 = an exact repeat (copied).
    """

    kind: str
    section: int
    label: str = ""
    repeats: int | None = None
    similarity: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("free", "repeat", "new"):
            raise ValueError(f"bar rule kind must be free, repeat or new, got {self.kind!r}")
        if (self.kind == "repeat") != (self.repeats is not None):
            raise ValueError("a repeat rule needs the bar it repeats, and only a repeat rule has one")


@dataclass(frozen=True)
class FormPlan:
    """A song's plan: one ``BarRule`` per bar (0-based), and the text it came from."""

    rules: tuple[BarRule, ...]
    text: str = ""
    sections: tuple[tuple[str, int, int], ...] = field(default=())  # (label, first bar, bars)

    def __post_init__(self) -> None:
        if not self.rules:
            raise MuseformerError("a form plan needs at least one bar")
        for i, rule in enumerate(self.rules):
            if rule.repeats is not None and not 0 <= rule.repeats < i:
                raise MuseformerError(f"form plan: bar {i + 1} repeats bar {rule.repeats + 1}, which does not come before it")

    @property
    def num_bars(self) -> int:
        return len(self.rules)

    def planned_similarity(self) -> np.ndarray:
        """The plan as a bar x bar matrix: the target similarity of every planned pair (repeat:
        its target, also carried along chains of repeats; new vs earlier other sections: 0), NaN
        where the plan says nothing. Shapes: ``(bars, bars)`` float64, symmetric."""
        n = self.num_bars
        target = np.full((n, n), np.nan)
        origin = list(range(n))  # the first bar of each chain of repeats
        strength = [1.0] * n
        for i, r in enumerate(self.rules):
            if r.kind == "repeat":
                origin[i] = origin[r.repeats]
                strength[i] = r.similarity * strength[r.repeats]
        for i, r in enumerate(self.rules):
            target[i, i] = 1.0
            if r.kind == "repeat":
                for j in range(i):  # every bar of the same chain
                    if origin[j] == origin[i]:
                        value = r.similarity if j == r.repeats else min(strength[i], strength[j]) if j != origin[i] \
                            else strength[i]
                        target[i, j] = target[j, i] = value
            elif r.kind == "new":
                for j in range(i):
                    if self.rules[j].section != r.section:
                        target[i, j] = target[j, i] = 0.0
        return target

    def to_dict(self) -> dict[str, Any]:
        """JSON-native form (the sidecar's ``form``)."""
        return {"text": self.text, "bars": self.num_bars,
                "rules": [{"bar": i + 1, "kind": r.kind, "section": r.label,
                           **({"repeats": r.repeats + 1, "similarity": r.similarity} if r.kind == "repeat" else {})}
                          for i, r in enumerate(self.rules)]}


def parse_form(text: str, variation: float = DEFAULT_VARIATION) -> FormPlan:
    """A plan from its text form, e.g. ``"A8 A8 B8 A'8"`` (see the module docstring).

    Raises:
        ParameterError("form", ...): a malformed section, a varied repeat of nothing, a repeat
            longer than what it repeats, or a bad ``variation``.
    """
    _check_similarity("variation", variation, below_one=True)
    if not isinstance(text, str) or not text.split():
        raise ParameterError("form", f"give sections like 'A8 A8 B8 A8', got {text!r}")
    rules: list[BarRule] = []
    sections: list[tuple[str, int, int]] = []
    first: dict[str, tuple[int, int]] = {}  # name -> (first bar, bars) of its first occurrence
    for index, part in enumerate(text.replace(",", " ").split()):
        m = _SECTION.match(part)
        if m is None:
            raise ParameterError("form", f"section {index + 1} {part!r}: write NAME[']BARS, e.g. A8 or A'8 or verse4")
        name, primes, count = m.group(1), m.group(2), int(m.group(3))
        if count < 1:
            raise ParameterError("form", f"section {index + 1} {part!r}: needs at least 1 bar")
        start = len(rules)
        if name in first:
            ref_start, ref_bars = first[name]
            if count > ref_bars:
                raise ParameterError("form", f"section {index + 1} {part!r} repeats {name}, which has {ref_bars} bars: "
                                     "a repeat cannot be longer than the section it repeats")
            similarity = variation if primes else 1.0
            rules += [BarRule("repeat", index, name + primes, ref_start + k, similarity) for k in range(count)]
        else:
            if primes:
                raise ParameterError("form", f"section {index + 1} {part!r} is a varied repeat of {name}, "
                                     f"but no section {name} comes before it")
            first[name] = (start, count)
            kind = "free" if not rules else "new"
            rules += [BarRule(kind, index, name) for _ in range(count)]
        sections.append((name + primes, start, count))
    return FormPlan(tuple(rules), text=" ".join(text.replace(",", " ").split()), sections=tuple(sections))


def plan_from_dict(d: dict[str, Any], source: str = "plan") -> FormPlan:
    """A plan from its JSON form (see the module docstring); ``source`` names the input in errors."""
    if not isinstance(d, dict):
        raise MuseformerError(f"{source}: a form plan is a JSON object, got {type(d).__name__}")
    if "form" in d:
        extra = set(d) - {"form", "variation"}
        if extra:
            raise MuseformerError(f"{source}: with 'form' only 'variation' may be given, not {sorted(extra)}")
        try:
            return parse_form(d["form"], d.get("variation", DEFAULT_VARIATION))
        except ParameterError as e:
            raise MuseformerError(f"{source}: {e.message}") from None
    unknown = set(d) - {"bars", "rules"}
    if unknown:
        raise MuseformerError(f"{source}: unknown key(s) {sorted(unknown)} (use 'form', or 'bars' and 'rules')")
    bars = d.get("bars")
    if not isinstance(bars, int) or isinstance(bars, bool) or bars < 1:
        raise MuseformerError(f"{source}: 'bars' must be the song's number of bars (an integer >= 1), got {bars!r}")
    rules: list[BarRule | None] = [None] * bars
    for n, spec in enumerate(d.get("rules", [])):
        where = f"{source}: rule {n + 1}"
        if not isinstance(spec, dict):
            raise MuseformerError(f"{where}: a rule is an object like {{\"bars\": \"9-16\", \"new\": true}}")
        unknown = set(spec) - {"bars", "new", "repeats", "similarity"}
        if unknown:
            raise MuseformerError(f"{where}: unknown key(s) {sorted(unknown)}")
        first, last = _bar_range(spec.get("bars"), bars, f"{where} 'bars'")
        is_new, repeats = spec.get("new", False), spec.get("repeats")
        if (repeats is None) == (not is_new) or is_new not in (True, False):
            raise MuseformerError(f"{where}: give either \"new\": true or \"repeats\": \"FIRST-LAST\"")
        label = f"rule {n + 1}"
        for b in range(first, last + 1):
            if rules[b] is not None:
                raise MuseformerError(f"{where}: bar {b + 1} already has a rule (ranges overlap)")
        if is_new:
            for b in range(first, last + 1):
                rules[b] = BarRule("new", n, label)
            continue
        r_first, r_last = _bar_range(repeats, bars, f"{where} 'repeats'")
        if r_last - r_first != last - first:
            raise MuseformerError(f"{where}: bars {first + 1}-{last + 1} and repeats {r_first + 1}-{r_last + 1} "
                                  "differ in length")
        if r_last >= first:
            raise MuseformerError(f"{where}: bars {first + 1}-{last + 1} can only repeat bars before them, "
                                  f"not {r_first + 1}-{r_last + 1}")
        similarity = spec.get("similarity", 1.0)
        try:
            _check_similarity("similarity", similarity)
        except ParameterError as e:
            raise MuseformerError(f"{where}: {e}") from None
        for k in range(last - first + 1):
            rules[first + k] = BarRule("repeat", n, label, r_first + k, float(similarity))
    free = len(d.get("rules", []))  # bars without a rule form one more, free "section" each
    filled = tuple(r if r is not None else BarRule("free", free + i, "") for i, r in enumerate(rules))
    return FormPlan(filled, text=json.dumps(d, sort_keys=True))


def load_plan(form: str | os.PathLike | dict | FormPlan | None = None, form_file: str | os.PathLike | None = None,
              variation: float = DEFAULT_VARIATION) -> FormPlan | None:
    """A plan from what a caller gave: a ``FormPlan``, its text form, its JSON dict, or a JSON file."""
    if form is not None and form_file is not None:
        raise MuseformerError("give either --form or --form-file, not both")
    if form_file is not None:
        path = Path(form_file)
        try:
            d = json.loads(path.read_text())
        except OSError as e:
            raise MuseformerError(f"--form-file {path}: cannot read it ({e.strerror or e})") from None
        except json.JSONDecodeError as e:
            raise MuseformerError(f"--form-file {path}: not JSON ({e.msg}, line {e.lineno})") from None
        return plan_from_dict(d, source=f"--form-file {path}")
    if form is None or isinstance(form, FormPlan):
        return form
    if isinstance(form, dict):
        return plan_from_dict(form)
    return parse_form(str(form), variation)


def plan_bars(plan: FormPlan, config):
    """``config`` with ``max_bars`` set to the plan's bars (a different ``max_bars`` is an error)."""
    import dataclasses

    if config.max_bars is not None and config.max_bars != plan.num_bars:
        raise ParameterError("max_bars", f"{config.max_bars} bars, but the form plan has {plan.num_bars}: "
                             "leave it out (the plan gives the length) or make them agree")
    return dataclasses.replace(config, max_bars=plan.num_bars)


def _check_similarity(name: str, value, below_one: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and 0.0 <= value <= 1.0 and not (below_one and value >= 1.0)
    if not ok:
        need = "in [0, 1)" if below_one else "in [0, 1] (1 = an exact repeat)"
        raise ParameterError(name, f"a similarity must be a number {need}, got {value!r}")
    return float(value)


def _bar_range(text, bars: int, where: str) -> tuple[int, int]:
    """0-based inclusive (first, last) of a 1-based ``"9-16"`` / ``"9"`` / 9 inside a song of ``bars``."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text)) if isinstance(text, (str, int)) else None
    if m is None or isinstance(text, bool):
        raise MuseformerError(f"{where}: write a bar range like \"9-16\" or \"17\", got {text!r}")
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 1 <= first <= last <= bars:
        raise MuseformerError(f"{where}: {text!r} is not a range of bars inside 1..{bars}")
    return first - 1, last - 1


# =============================================================================================
# bars and similarity (metrics' definition)
# =============================================================================================
def bar_note_sets(ids: Sequence[int], vocab) -> list[frozenset]:
    """Each complete bar's set of ``(onset, pitch, duration)`` notes (``metrics`` bar similarity)."""
    from museformer.metrics import notes_from_ids

    notes = notes_from_ids(list(ids), vocab)
    sets: list[set] = [set() for _ in range(notes.num_bars)]
    for b, o, p, d in zip(notes.bar.tolist(), notes.onset.tolist(), notes.pitch.tolist(), notes.duration.tolist()):
        sets[b].add((o, p, d))
    return [frozenset(s) for s in sets]


def similarity(a: frozenset, b: frozenset, empty: float = 1.0) -> float:
    """Jaccard similarity of two bars' note sets; ``empty`` for two empty bars (they are alike)."""
    union = len(a | b)
    return len(a & b) / union if union else empty


def plan_error(plan: FormPlan, achieved: np.ndarray) -> dict[str, float]:
    """How far a song's self-similarity matrix is from its plan.

    Returns ``mae`` (mean absolute error over the planned pairs i < j where both are defined),
    ``same`` / ``different`` (mean achieved similarity of planned repeat pairs / planned new-vs-other
    pairs), ``varied`` / ``varied_target`` (mean achieved / planned similarity of the pairs planned
    strictly between 0 and 1: varied repeats) and ``pairs`` (how many pairs counted).
    """
    target = plan.planned_similarity()
    n = min(len(achieved), plan.num_bars)
    target, achieved = target[:n, :n], achieved[:n, :n]
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    planned = upper & ~np.isnan(target) & ~np.isnan(achieved)
    same = planned & (target > 0)
    different = planned & (target == 0)

    def mean(mask) -> float:
        return float(achieved[mask].mean()) if mask.any() else math.nan

    varied = planned & (target > 0) & (target < 1)
    return {"mae": float(np.abs(achieved - target)[planned].mean()) if planned.any() else math.nan,
            "same": mean(same), "different": mean(different), "varied": mean(varied),
            "varied_target": float(target[varied].mean()) if varied.any() else math.nan,
            "pairs": float(planned.sum())}


# =============================================================================================
# decoding a song that follows a plan
# =============================================================================================
@dataclass(frozen=True)
class FormResult:
    """One song decoded to a plan: its ids, and per bar how it was made and what it scored."""

    ids: list[int]
    prompt_length: int
    bar_logprobs: list[float]  # mean per-token log-probability of each bar (nats)
    bar_similarity: list[float | None]  # to the bar it repeats (repeats), max to other sections (new)
    how: list[str]  # per bar: "prompt", "sampled", "copied", "chosen of K"


def score_candidate(notes: frozenset, rule: BarRule, song_sets: Sequence[frozenset], plan: FormPlan,
                    mean_logprob: float, logprob_weight: float) -> tuple[float, float | None]:
    """``(score, similarity)`` of one candidate bar under its rule (higher is better); -inf for a
    varied repeat that copies its bar's notes."""
    if rule.kind == "repeat":
        sim = similarity(notes, song_sets[rule.repeats])
        if sim >= 1.0:
            return -math.inf, sim  # a varied repeat must not be a copy
        return -abs(sim - rule.similarity) + logprob_weight * mean_logprob, sim
    if rule.kind == "new":
        others = [similarity(notes, s) for j, s in enumerate(song_sets) if plan.rules[j].section != rule.section]
        sim = max(others, default=0.0)
        return -sim + logprob_weight * mean_logprob, sim
    return logprob_weight * mean_logprob, None


def decode_form(model, tokenizer, plan: FormPlan, config, *, seed: int, prompt: Sequence[int] = (),
                candidates: int = DEFAULT_CANDIDATES, logprob_weight: float = DEFAULT_LOGPROB_WEIGHT,
                variation: str = "prefix", progress=None, song_index: int = 0) -> FormResult:
    """One song of ``plan.num_bars`` bars, decoded bar by bar to follow the plan.

    Args:
        model, tokenizer: a ``Museformer`` in eval mode and its tokenizer.
        plan: the plan; the prompt's bars (if any) stand for the plan's first bars.
        config: a ``SampleConfig`` (temperature, top-k/p, grammar, instruments, tempo).
        seed: this song's random stream.
        prompt: prompt ids (no BOS), complete bars.
        candidates: K, candidate bars sampled per planned bar (varied repeats, new material).
        logprob_weight: weight of the candidate's mean log-probability in its score.
        variation: how candidates of a varied repeat are proposed: ``"prefix"`` (candidate j
            starts with the first onsets of the bar it repeats, from none to most of them, and
            the model goes on from there: ``variation_prefixes``) or ``"sample"`` (plain samples).
        progress: optional ``progress(song_index, token, finish)`` for every token of the song as
            its bars are decided (``finish="bars"`` on the last).
    """
    from museformer.bar_candidates import SongDecoder, grammar_for

    if variation not in VARIATIONS:
        raise ParameterError("variation", f"choose from {VARIATIONS}, got {variation!r}")
    if not isinstance(candidates, int) or candidates < 1:
        raise ParameterError("candidates", f"must be an integer >= 1, got {candidates!r}")
    vocab = tokenizer.vocab
    prompt = [int(t) for t in prompt]
    prompt_bars = sum(1 for t in prompt if t == vocab.bar_id)
    if prompt_bars > plan.num_bars:
        raise MuseformerError(f"the prompt has {prompt_bars} bars, more than the plan's {plan.num_bars}")
    if prompt and prompt[-1] != vocab.bar_id:
        raise MuseformerError("a prompt for a form plan must end with a complete bar (b-1)")
    song = SongDecoder(model, prompt, grammar_for(tokenizer, config))
    generator = torch.Generator().manual_seed(int(seed))
    bars = bar_tokens(prompt, vocab.bar_id)
    sets = [frozenset(s) for s in bar_note_sets(prompt, vocab)]
    bar_lp = [float(np.mean(song.logprobs[a:b])) for a, b in _bar_spans(prompt, vocab.bar_id)]
    sims: list[float | None] = [None] * prompt_bars
    how = ["prompt"] * prompt_bars
    for i in range(prompt_bars, plan.num_bars):
        rule = plan.rules[i]
        if rule.kind == "repeat" and rule.similarity >= 1.0:
            tokens = bars[rule.repeats]
            lps = song.feed(tokens)
            chosen, sim, made = tokens, 1.0, "copied"
        else:
            k = 1 if rule.kind == "free" else candidates
            chosen, lps, sim, made = None, None, None, None
            for _ in range(3):  # a varied repeat whose every candidate copies its bar: sample again
                forced = None
                if rule.kind == "repeat" and variation == "prefix":
                    forced = variation_prefixes(bars[rule.repeats], k, vocab)
                pool = song.sample(k, 1, config, generator, forced=forced)
                scored = [(score_candidate(frozenset(bar_note_sets(c.ids, vocab)[0]), rule, sets, plan,
                                           c.mean_logprob, logprob_weight), c) for c in pool]
                scored = [(s, c) for s, c in scored if s[0] > -math.inf]
                if scored:
                    (_, sim), best = max(scored, key=lambda sc: sc[0][0])
                    chosen, made = list(best.ids), ("sampled" if k == 1 else f"chosen of {len(pool)}")
                    break
            if chosen is None:
                raise MuseformerError(f"bar {i + 1}: no candidate bar fits its rule ({rule.kind}) in 3 rounds of {k}")
            lps = song.feed(chosen)
        if progress is not None:
            for n, token in enumerate(chosen):
                progress(song_index, token, "bars" if i == plan.num_bars - 1 and n == len(chosen) - 1 else None)
        bars.append(list(chosen))
        sets.append(frozenset(bar_note_sets(chosen, vocab)[0]))
        bar_lp.append(float(np.mean(lps)))
        sims.append(sim)
        how.append(made)
    return FormResult(song.ids, len(prompt), bar_lp, sims, how)


def variation_prefixes(bar: Sequence[int], k: int, vocab) -> list[list[int]]:
    """K forced starts for the candidates of a varied repeat of ``bar``: candidate j keeps the
    bar's tokens before its onset number ``round(j * m / K)`` of m onsets (j = 0: only the bar's
    opening tokens, before its first onset), so the candidates span "all new" to "mostly kept"
    and the score picks the one nearest the target similarity. The last onset is never kept (a
    candidate always adds something of its own)."""
    from museformer.vocab import TokenKind

    kinds = vocab.kinds
    onsets = [i for i, t in enumerate(bar) if kinds[int(t)] == TokenKind.ONSET]
    if not onsets:
        return [[] for _ in range(k)]
    m = len(onsets)
    cut = [onsets[min(round(j * m / k), m - 1)] for j in range(k)]
    return [list(bar[:c]) for c in cut]


def bar_tokens(ids: Sequence[int], bar_id: int) -> list[list[int]]:
    """The complete bars of a token sequence, each a list ending with ``b-1``."""
    return [list(ids[a:b]) for a, b in _bar_spans(ids, bar_id)]


def _bar_spans(ids: Sequence[int], bar_id: int) -> list[tuple[int, int]]:
    spans, start = [], 0
    for i, t in enumerate(ids):
        if t == bar_id:
            spans.append((start, i + 1))
            start = i + 1
    return spans


# =============================================================================================
# picture: the plan next to the achieved similarity matrix
# =============================================================================================
def render_form(plan: FormPlan, ids: Sequence[int], vocab, path: str | os.PathLike, title: str = "") -> Path:
    """A PNG of the plan's target matrix next to the song's achieved bar self-similarity.

    Needs matplotlib (the ``render`` extra); written atomically.
    """
    from museformer.files import atomic_path
    from museformer.metrics import notes_from_ids, self_similarity
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MuseformerError("drawing a form picture needs matplotlib: pip install matplotlib") from None
    achieved = self_similarity(notes_from_ids(list(ids), vocab))
    target = plan.planned_similarity()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), constrained_layout=True)
    for ax, matrix, name in ((axes[0], target, f"plan: {plan.text if len(plan.text) < 40 else 'bar rules'}"),
                             (axes[1], achieved, "achieved bar similarity")):
        shown = np.ma.masked_invalid(matrix)
        n = len(matrix)
        image = ax.imshow(shown, vmin=0, vmax=1, cmap="magma", origin="upper", interpolation="nearest",
                          extent=(0.5, n + 0.5, n + 0.5, 0.5))  # bars numbered from 1, as users count them
        ax.set_title(name, fontsize=10, pad=16)
        ax.set_xlabel("bar")
        ax.set_ylabel("bar")
        for label, start, count in plan.sections:
            ax.add_patch(plt.Rectangle((start + 0.5, start + 0.5), count, count, fill=False, ec="cyan", lw=0.8))
            if ax is axes[0]:
                ax.text(start + count / 2 + 0.5, 0.4, label, ha="center", va="bottom", fontsize=8)
    axes[0].text(0.5, -0.14, "white: pairs the plan says nothing about", transform=axes[0].transAxes,
                 ha="center", va="top", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="Jaccard similarity of the bars' notes")
    if title:
        fig.suptitle(title, fontsize=10, y=1.04)
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


# =============================================================================================
# songs (what generate(form=...) returns)
# =============================================================================================
def form_songs(model, tokenizer, plan: FormPlan, config, seeds: Sequence[int], prompt: Sequence[int] = (),
               candidates: int = DEFAULT_CANDIDATES, progress=None) -> list:
    """``generate.Song`` objects, one per seed, each decoded to ``plan`` (``decode_form``).

    Each song also carries ``form``: its ``FormResult`` (per-bar log-probabilities, similarities
    and how each bar was made)."""
    from museformer.generate import Song

    songs = []
    for index, seed in enumerate(seeds):
        result = decode_form(model, tokenizer, plan, config, seed=seed, prompt=prompt, candidates=candidates,
                             progress=progress, song_index=index)
        score, report = tokenizer.decode_with_report(result.ids)
        song = Song(list(result.ids), result.prompt_length, "bars", int(seed), score, plan.num_bars, report.skipped,
                    form=result)
        songs.append(song)
    return songs
