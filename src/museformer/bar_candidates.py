"""Decoding a song bar by bar with candidates: one song's cache, forked into K rows per decision.

This module owns the *mechanics* shared by form plans (``museformer.form``) and bar infilling
(``museformer.infill``): a ``SongDecoder`` holds one song's exact decoding state (an ``FCCache`` of
batch 1, the grammar state, the logits after its last token) and can

- ``sample(k, bars)``: fork its cache into ``k`` rows (``FCCache.fork``: the song itself is left
  unchanged) and sample ``bars`` complete bars in each row, all rows in one batch, every token
  masked by the grammar (so every candidate is grammatical); rows leave the batch as they close
  their last bar;
- ``feed(tokens)``: append given tokens (a chosen candidate, a copied bar, a song's own bars) to
  the song in cached forwards of a few hundred tokens, returning each token's log-probability;
- ``continuation_logprob(candidates, suffix)``: the model's log-likelihood of a fixed suffix
  after each candidate, all candidates in one batch (infilling's weights).

Log-probabilities are the model's own (``log_softmax`` of the raw logits at temperature 1): what
the model thinks of a token, not the top-k / grammar-renormalised distribution it was drawn from.
It knows nothing about plans, similarity or MIDI files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from museformer.cache import FCCache
from museformer.generate import SampleConfig, sample_next
from museformer.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

FEED_CHUNK = 256  # tokens per cached forward when feeding (bounds the (rows, chunk, slots) mask)
DEFAULT_MAX_BAR_TOKENS = 1024  # a candidate bar longer than this is dropped (a runaway loop)


@dataclass(frozen=True)
class Candidate:
    """One sampled continuation of a song.

    Attributes:
        ids: its tokens (each bar closed by ``b-1``).
        logprobs: the model's log-probability of each token given everything before it.
    """

    ids: tuple[int, ...]
    logprobs: tuple[float, ...]

    @property
    def logprob(self) -> float:
        """Sum of the tokens' log-probabilities (nats)."""
        return float(sum(self.logprobs))

    @property
    def mean_logprob(self) -> float:
        """Mean per-token log-probability (nats); 0 for no tokens."""
        return self.logprob / len(self.logprobs) if self.logprobs else 0.0


def grammar_for(tokenizer, config: SampleConfig):
    """The token grammar of bar-by-bar decoding (None when ``config.grammar`` is off): the config's
    instrument and tempo rules; lengths are the caller's (EOS is never sampled inside a bar)."""
    if not config.grammar:
        return None
    from museformer.grammar import Grammar, GrammarConstraints

    constraints = GrammarConstraints(instruments=config.instruments, tempo_bpm=config.tempo,
                                     tempo_changes=config.tempo_changes)
    return Grammar.for_tokenizer(tokenizer, constraints=constraints)


class SongDecoder:
    """One song's decoding state: its tokens, an exact cache of batch 1, its grammar state.

    Args:
        model: a ``Museformer`` in eval mode.
        prompt: the song's first tokens (no BOS; may be empty).
        grammar: the ``Grammar`` masking sampled tokens (None = unconstrained).
        max_bar_tokens: a sampled bar longer than this is given up (its row is dropped).
    """

    def __init__(self, model, prompt: Sequence[int] = (), grammar=None,
                 max_bar_tokens: int = DEFAULT_MAX_BAR_TOKENS) -> None:
        if model.training:
            raise ValueError("SongDecoder needs the model in eval mode (model.eval())")
        self.model, self.grammar, self.max_bar_tokens = model, grammar, max_bar_tokens
        self.device = next(model.parameters()).device
        self.bar_id = model.vocab.bar_id
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        ids = [BOS_ID] + [int(t) for t in prompt]
        with torch.inference_mode():
            self.cache = FCCache(model, 1, capacity=len(ids) + 512)
            logits = model(torch.tensor([ids[:FEED_CHUNK]], device=self.device), cache=self.cache)[0]  # (T, V)
        self.logits = logits[-1].float().clone()  # (V,) after the last token read
        self.state = grammar.start(1, self.device) if grammar is not None else None
        first = logits[:-1].float().log_softmax(-1).gather(-1, torch.tensor(ids[1:FEED_CHUNK], device=self.device)[:, None])
        self.ids, self.logprobs = ids[1:FEED_CHUNK], first[:, 0].tolist()
        if self.state is not None:
            self.state = grammar.prefill(self.state, [self.ids], strict=False)
        if len(ids) > FEED_CHUNK:
            self.feed(ids[FEED_CHUNK:])

    @property
    def bars(self) -> int:
        """Complete bars so far."""
        return sum(1 for t in self.ids if t == self.bar_id)

    # -- fixed tokens ------------------------------------------------------------------------------
    def feed(self, tokens: Sequence[int]) -> list[float]:
        """Append ``tokens`` to the song; returns the model's log-probability of each one.

        The grammar state follows (a token it forbids only flags the state, as a prompt's would).
        """
        tokens = [int(t) for t in tokens]
        out: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(tokens), FEED_CHUNK):
                chunk = tokens[start:start + FEED_CHUNK]
                ids = torch.tensor([chunk], device=self.device)  # (1, T)
                logits = self.model(ids, cache=self.cache)[0].float()  # (T, V)
                before = torch.cat([self.logits[None], logits[:-1]])  # (T, V) the logits each token was read from
                out += before.log_softmax(-1).gather(-1, ids[0, :, None])[:, 0].tolist()
                self.logits = logits[-1].clone()
        if self.state is not None:
            self.state = self.grammar.prefill(self.state, [tokens], strict=False)
        self.ids += tokens
        self.logprobs += out
        return out

    # -- candidates --------------------------------------------------------------------------------
    def sample(self, k: int, bars: int, config: SampleConfig, generator: torch.Generator,
               progress=None, forced: Sequence[Sequence[int]] | None = None,
               steer: Callable[[], Any] | None = None) -> list[Candidate]:
        """``k`` candidate continuations of ``bars`` complete bars each, sampled in one batch.

        The song is not changed (feed the chosen candidate's ids to continue it). Candidates whose
        bar runs past ``max_bar_tokens`` are dropped, so fewer than ``k`` may come back.

        Args:
            k: rows to sample (the song's cache is forked into ``k`` copies).
            bars: bars each candidate closes.
            config: temperature, top-k, top-p (its stopping rules do not apply here).
            generator: the random stream of this decision (one for the whole batch).
            progress: optional ``progress(row, token, finish)`` per sampled token; ``finish`` is
                ``"bars"`` when the row's last bar closes.
            forced: optional, per row, tokens the row starts with instead of sampling them (e.g.
                the first onsets of a bar to vary); the model goes on from there.
            steer: optional factory of one rule object per row, narrowing the grammar further:
                ``rule.allowed()`` gives a bool ``(V,)`` numpy mask (or None: no narrowing) of the
                next token and ``rule.advance(token)`` follows the sampled token (infilling some
                instruments while keeping the others: ``infill.KeptParts``).
        """
        if k < 1 or bars < 1:
            raise ValueError(f"need k >= 1 and bars >= 1, got k={k}, bars={bars}")
        forced = [[int(t) for t in f] for f in forced] if forced is not None else [[] for _ in range(k)]
        if len(forced) != k:
            raise ValueError(f"{len(forced)} forced prefixes for {k} rows")
        V = self.logits.shape[-1]
        never = torch.zeros(V, dtype=torch.bool, device=self.device)
        never[[0, PAD_ID, UNK_ID, EOS_ID]] = True  # the caller decides where the song ends
        results: dict[int, Candidate] = {}
        rows = list(range(k))  # candidate index of each live row
        ids: list[list[int]] = [[] for _ in range(k)]
        lps: list[list[float]] = [[] for _ in range(k)]
        closed, in_bar = [0] * k, [0] * k
        rules = [steer() for _ in range(k)] if steer is not None else None
        with torch.inference_mode():
            cache = self.cache.fork([0] * k)
            state = None if self.state is None else self.state.select([0] * k)
            logits = self.logits[None].expand(k, V)  # (k, V)
            while rows:
                forbid = never.expand(len(rows), V) if state is None else (~self.grammar.allowed(state)) | never
                if rules is not None:
                    narrow = [(row, rules[c].allowed()) for row, c in enumerate(rows)]
                    narrow = [(row, m) for row, m in narrow if m is not None]
                    if narrow:
                        at, masks = zip(*narrow)
                        forbid = forbid.clone()
                        forbid[list(at)] |= ~torch.from_numpy(np.stack(masks)).to(self.device)
                masked = logits.masked_fill(forbid, float("-inf"))
                stuck = torch.isinf(masked).all(dim=-1)
                if bool(stuck.any()):  # only possible without the bar token allowed: close the bar
                    masked[stuck, self.bar_id] = 0.0
                next_ids = sample_next(masked, temperature=config.temperature, top_k=config.top_k,
                                       top_p=config.top_p, generator=generator).to(self.device)  # (R,)
                force = [(row, forced[c][len(ids[c])]) for row, c in enumerate(rows) if len(ids[c]) < len(forced[c])]
                if force:
                    at, tokens = zip(*force)
                    next_ids[list(at)] = torch.tensor(tokens, device=self.device)
                token_lp = logits.log_softmax(-1).gather(-1, next_ids[:, None])[:, 0].tolist()
                if state is not None:
                    state = self.grammar.advance(state, next_ids)
                keep = []
                for row, (c, token) in enumerate(zip(rows, next_ids.tolist())):
                    if rules is not None:
                        rules[c].advance(token)
                    ids[c].append(token)
                    lps[c].append(token_lp[row])
                    in_bar[c] += 1
                    finish = None
                    if token == self.bar_id:
                        closed[c] += 1
                        in_bar[c] = 0
                        if closed[c] == bars:
                            results[c] = Candidate(tuple(ids[c]), tuple(lps[c]))
                            finish = "bars"
                    if progress is not None:
                        progress(c, token, finish)
                    if finish is None and in_bar[c] < self.max_bar_tokens:
                        keep.append(row)
                if len(keep) < len(rows):
                    if not keep:
                        break
                    index = torch.tensor(keep, device=self.device)
                    cache.select(index)
                    next_ids = next_ids.index_select(0, index)
                    if state is not None:
                        state = state.select(index)
                    rows = [rows[r] for r in keep]
                logits = self.model(next_ids[:, None], cache=cache)[:, 0].float()  # (R, V)
        return [results[c] for c in sorted(results)]

    def continuation_logprob(self, candidates: Sequence[Sequence[int]], suffix: Sequence[int],
                             counted: Sequence[bool] | None = None) -> list[float]:
        """The model's log-likelihood of ``suffix`` after the song plus each candidate.

        All candidates run in one batch: a fork of the song's cache with one row per candidate
        reads the candidate (right-padded to the longest) and then the suffix, in chunks of
        ``FEED_CHUNK`` tokens. The song is not changed.

        Args:
            candidates: token lists (each may be empty).
            suffix: the tokens that follow every candidate.
            counted: per suffix token, whether its log-probability counts (default: all).

        Returns:
            per candidate, the summed log-probability (nats) of the counted suffix tokens.
        """
        suffix = [int(t) for t in suffix]
        counted = [True] * len(suffix) if counted is None else list(counted)
        if len(counted) != len(suffix):
            raise ValueError(f"{len(counted)} counted flags for {len(suffix)} suffix tokens")
        K = len(candidates)
        if K == 0:
            return []
        if not suffix:
            return [0.0] * K
        lengths = torch.tensor([len(c) for c in candidates], device=self.device)  # (K,)
        width = int(lengths.max())
        total = torch.zeros(K, dtype=torch.float64, device=self.device)
        with torch.inference_mode():
            cache = self.cache.fork([0] * K)
            last = self.logits[None].expand(K, -1)  # (K, V) logits before the suffix's first token
            if width:
                padded = torch.full((K, width), PAD_ID, dtype=torch.long, device=self.device)
                for i, c in enumerate(candidates):
                    padded[i, : len(c)] = torch.tensor(list(c), dtype=torch.long)
                logits = self.model(padded, cache=cache).float()  # (K, width, V)
                at = (lengths - 1).clamp(min=0)
                last = torch.where((lengths > 0)[:, None], logits[torch.arange(K), at], last)
            for start in range(0, len(suffix), FEED_CHUNK):
                chunk = suffix[start:start + FEED_CHUNK]
                ids = torch.tensor([chunk] * K, device=self.device)  # (K, T)
                logits = self.model(ids, cache=cache).float()  # (K, T, V)
                before = torch.cat([last[:, None], logits[:, :-1]], dim=1)  # (K, T, V)
                lp = before.log_softmax(-1).gather(-1, ids[..., None])[..., 0].double()  # (K, T)
                weight = torch.tensor(counted[start:start + FEED_CHUNK], dtype=torch.float64, device=self.device)
                total += (lp * weight).sum(dim=1)
                last = logits[:, -1]
        return total.tolist()

