"""Generating songs: sampling, prompts, stopping rules, batches and streaming.

This module owns *what to sample* and *when to stop*; the incremental forward pass (the exact
key/value + summary cache) lives in ``museformer.cache`` and the token grammar in
``museformer.grammar``.

- ``SampleConfig``: a frozen, validated description of one generation run (temperature, top-k,
  top-p, seed, stopping rules, grammar constraints). Its JSON form goes into every song's sidecar.
- ``sample_next(logits, ...)``: one pure, seeded sampling step (temperature 0 means argmax);
  ``counter_uniforms(seeds, counters)``: every song's draw of a step in one batched operation.
- ``stream(...)``: a Python generator yielding ``(song_index, token_id)`` as tokens are produced,
  for a batch of songs of different prompts and lengths; finished songs leave the batch.
- ``generate(...)``: the Python API: songs (token ids, a ``symusic.Score`` and their metadata).
- ``prompt_from_midi(path, tokenizer, bars)``: a user's MIDI as a prompt, cut to its first bars.

Writing songs to a folder (names, sidecars, renders, progress) is ``museformer.songs``.

Stopping rules, all counted over the whole song (prompt included, BOS excluded):

- without a bar limit: EOS (forbidden before ``min_tokens`` tokens, the paper's 1,024) or
  ``max_tokens`` tokens;
- with a bar limit ``max_bars`` = B: the song ends after its B-th complete bar, and EOS is forbidden
  before that, so a song has exactly B bars (``min_tokens`` does not apply) unless ``max_tokens``
  comes first;
- a song stopped by ``max_tokens`` is cut back to its last complete bar so that it decodes cleanly.

A prompt that already reaches a limit (B bars, ``max_tokens`` tokens) leaves nothing to generate and
is refused by ``generate`` with a message naming both numbers (``docs/generation.md``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from museformer.remigen import MAX_TEMPO, MIN_TEMPO
from museformer.errors import MuseformerError
from museformer.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

DEFAULT_TOP_K = 8  # the paper's setting
DEFAULT_MIN_TOKENS = 1024  # the paper forbids EOS before 1,024 tokens
DEFAULT_MAX_TOKENS = 20480  # the paper's --max-len-b
TEMPO_RANGE = (MIN_TEMPO, MAX_TEMPO)  # BPM the t-* tokens can say (remigen); others would be clipped


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleConfig:
    """How to sample one generation run. Every field is JSON-native so the sidecar can hold it.

    Attributes:
        temperature: logits are divided by it; 0 means greedy (argmax).
        top_k: keep the k most likely tokens (0 = off); the paper uses 8.
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches p
            (1.0 = off).
        seed: base seed; song ``i`` of a run uses ``seed + i``, so a song does not depend on which
            other songs share its batch (None = a random seed, recorded in the sidecar).
        max_tokens: stop when the song (prompt included) has this many tokens.
        max_bars: the song has this many complete bars (prompt included): EOS is forbidden before
            bar ``max_bars`` ends and the song stops there; None = no bar limit.
        min_tokens: EOS is forbidden before the song has this many tokens (the paper: 1,024);
            not used with ``max_bars``, which fixes the length.
        grammar: mask every step with the token grammar (guarantees songs that decode cleanly).
        instruments: allowed MIDI programs (128 = drums) for newly generated notes; None = all.
        tempo: fix the tempo (BPM) of generated bars, 16..256 (what the tempo tokens can say);
            None = the model chooses.
        tempo_changes: let the model change tempo inside a song (with the grammar). False (the
            default): every tempo token repeats the song's last one, as in nearly all training
            songs; sampling the tempo token at every bar start otherwise drifts.
    """

    temperature: float = 1.0
    top_k: int = DEFAULT_TOP_K
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_bars: int | None = None
    min_tokens: int = DEFAULT_MIN_TOKENS
    grammar: bool = True
    instruments: tuple[int, ...] | None = None
    tempo: float | None = None
    tempo_changes: bool = False

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise MuseformerError(f"invalid sampling option: {msg}")

        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            bad(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad(f"seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.max_bars is not None and (not isinstance(self.max_bars, int) or self.max_bars < 1):
            bad(f"max_bars must be an integer >= 1, got {self.max_bars!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.instruments is not None:
            programs = tuple(self.instruments)
            if not programs or any(not isinstance(p, int) or not 0 <= p <= 128 for p in programs):
                bad(f"instruments must be MIDI programs 0..127 or 128 (drums), got {self.instruments!r}")
            object.__setattr__(self, "instruments", programs)
        if self.tempo is not None and (
            not isinstance(self.tempo, (int, float)) or not TEMPO_RANGE[0] <= self.tempo <= TEMPO_RANGE[1]
        ):
            bad(f"tempo must be a BPM in {TEMPO_RANGE[0]:g}..{TEMPO_RANGE[1]:g} (the range of the tempo tokens), "
                f"got {self.tempo!r}")
        if not isinstance(self.tempo_changes, bool):
            bad(f"tempo_changes must be true or false, got {self.tempo_changes!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["instruments"] is not None:
            d["instruments"] = list(d["instruments"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise MuseformerError(f"unknown sampling option(s): {sorted(unknown)}")
        d = dict(d)
        if d.get("instruments") is not None:
            d["instruments"] = tuple(d["instruments"])
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# one sampling step
# ---------------------------------------------------------------------------------------------
def counter_uniforms(seeds, counters) -> torch.Tensor:
    """One uniform draw in [0, 1) per song from its own seed and draw counter, for all songs at once.

    ``u = splitmix64(splitmix64(seed) + counter) / 2**64`` (the top 53 bits), in numpy uint64
    arithmetic (wrapping): a counter-based stream, so song i's n-th draw depends only on
    ``(seeds[i], counters[i])``, never on which songs share its batch, and a whole batch costs a
    few array operations instead of one generator call per song.

    Shapes: seeds, counters ``(B,)`` non-negative integers -> ``(B,)`` float64.
    """
    # uint64 array arithmetic wraps silently (only numpy scalars warn): keep everything arrays
    z = _splitmix64(_splitmix64(np.asarray(seeds, dtype=np.uint64).reshape(-1))
                    + np.asarray(counters, dtype=np.uint64).reshape(-1))
    return torch.from_numpy((z >> _SHIFT_11).astype(np.float64) * 2.0**-53)


_GAMMA, _MIX1, _MIX2 = (np.array([c], dtype=np.uint64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9,
                                                                  0x94D049BB133111EB))
_SHIFT_11, _SHIFT_27, _SHIFT_30, _SHIFT_31 = (np.array([n], dtype=np.uint64) for n in (11, 27, 30, 31))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GAMMA
    x = (x ^ (x >> _SHIFT_30)) * _MIX1
    x = (x ^ (x >> _SHIFT_27)) * _MIX2
    return x ^ (x >> _SHIFT_31)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample one token per row. Pure: the result depends only on the arguments.

    Args:
        logits: ``(B, V)``; ``-inf`` marks forbidden tokens (grammar, minimum length).
        temperature: 0 means argmax.
        top_k: keep the k largest logits per row (0 = off).
        top_p: keep the smallest prefix of the sorted distribution reaching probability p.
        generator: one generator for the whole batch, or one per row (then row i's draw depends
            only on its own generator, so a song does not depend on its batch neighbours).
        uniforms: ``(B,)`` the rows' uniform draws in [0, 1), given instead of a generator
            (``counter_uniforms``: one batched draw for many songs).

    Returns:
        ``(B,)`` int64 token ids.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature != 1.0:  # x / 1.0 == x exactly: skip the op
        logits = logits / temperature
    batch, vocab = logits.shape
    index = None  # the candidates' token ids (None: all tokens, in vocabulary order)
    if top_k and top_k < vocab:
        logits, index = torch.topk(logits, top_k, dim=-1)  # (B, k), best first
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        if index is None:
            probs, index = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens (sorted)
        probs = probs.masked_fill(before >= top_p, 0.0)  # the first token always stays (before = 0)
    # Inverse-CDF sampling from one uniform draw per row: deterministic given the draws.
    if uniforms is not None:
        if uniforms.shape != (batch,):
            raise ValueError(f"uniforms must have shape ({batch},), got {tuple(uniforms.shape)}")
        u = uniforms.double()
    elif generator is None or isinstance(generator, torch.Generator):
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
    else:
        if len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch}")
        draws = [torch.rand(1, generator=g, dtype=torch.float64) for g in generator]
        u = draws[0] if batch == 1 else torch.cat(draws)
    cdf = torch.cumsum(probs.double(), dim=-1)  # (B, k)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    pick = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)  # (B, 1)
    # guard against rounding at the top end: never pick a zero-probability token
    picked_zero = probs.gather(-1, pick) <= 0
    if picked_zero.any():
        pick = torch.where(picked_zero, probs.argmax(dim=-1, keepdim=True), pick)
    return (pick if index is None else index.gather(-1, pick)).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------
def truncate_bars(ids: Sequence[int], bars: int | None, bar_id: int) -> list[int]:
    """The first ``bars`` bars of a token sequence (up to and including the ``bars``-th ``b-1``)."""
    ids = [int(t) for t in ids]
    if bars is None:
        return ids
    seen = 0
    for i, t in enumerate(ids):
        if t == bar_id:
            seen += 1
            if seen == bars:
                return ids[: i + 1]
    return ids


def prompt_from_midi(path: str | os.PathLike, tokenizer, bars: int | None = None) -> list[int]:
    """A user's MIDI file as prompt ids (no BOS), tokenised with the model's tokenizer options.

    Args:
        path: the MIDI file.
        tokenizer: the model's ``Tokenizer`` (its options decide the tokens).
        bars: keep only the first ``bars`` bars (None = the whole file).
    """
    if bars is not None and bars < 1:
        raise MuseformerError(f"--prompt-bars must be >= 1, got {bars}")
    ids = [int(t) for t in tokenizer.encode_file(path, as_ids=True)]
    unknown = sum(1 for t in ids if t == UNK_ID)
    if unknown:
        raise MuseformerError(
            f"prompt {path}: {unknown} token(s) are not in the model's vocabulary {tokenizer.vocab.name!r}"
        )
    ids = truncate_bars(ids, bars, tokenizer.vocab.bar_id)
    if not ids:
        raise MuseformerError(f"prompt {path}: no notes to continue")
    return ids


# ---------------------------------------------------------------------------------------------
# the decoding loop
# ---------------------------------------------------------------------------------------------
def build_grammar(tokenizer, config: SampleConfig):
    """The token grammar for a tokenizer with the config's constraints (None when disabled)."""
    if not config.grammar:
        return None
    from museformer.grammar import Grammar, GrammarConstraints

    # with a bar limit the song has exactly max_bars bars: EOS only after the last one
    constraints = GrammarConstraints(
        instruments=config.instruments, tempo_bpm=config.tempo, tempo_changes=config.tempo_changes,
        max_bars=config.max_bars, min_bars=config.max_bars or 1, min_tokens=config.min_tokens,
    )
    return Grammar.for_tokenizer(tokenizer, constraints=constraints)


def song_seeds(config: SampleConfig, num_songs: int) -> list[int]:
    """Seed of every song of a run: ``seed + i``; a random base seed when the config has none."""
    base = config.seed if config.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    return [base + i for i in range(num_songs)]


def _finish_reasons(length: np.ndarray, bar: np.ndarray, config: SampleConfig,
                    eos: np.ndarray | None = None) -> list[str | None]:
    """Why each song ends now, by precedence: ``"eos"`` (it sampled EOS), ``"bars"`` (``max_bars``
    reached), ``"max_tokens"``; None where it goes on. Shapes: ``(B,)`` arrays -> B reasons."""
    by_bars = bar >= config.max_bars if config.max_bars is not None else np.zeros(len(bar), dtype=bool)
    by_tokens = length >= config.max_tokens
    eos = np.zeros(len(bar), dtype=bool) if eos is None else eos
    return ["eos" if e else "bars" if b else "max_tokens" if t else None
            for e, b, t in zip(eos.tolist(), by_bars.tolist(), by_tokens.tolist())]


def stream(
    model,
    prompts: Sequence[Sequence[int]],
    config: SampleConfig,
    *,
    seeds: Sequence[int],
    grammar=None,
    recompute: bool = False,
) -> Iterator[tuple[int, int, str | None]]:
    """Generate a batch of songs together, yielding every token as soon as it is sampled.

    Args:
        model: a ``Museformer`` in eval mode.
        prompts: one id list per song (without BOS; may be empty); songs may differ in length.
        config: sampling and stopping rules.
        seeds: one seed per song (its own random stream, independent of the other songs: the
            song's n-th token uses ``counter_uniforms(seed, n)``).
        grammar: a ``Grammar`` whose masks are applied at every step (None = unconstrained).
        recompute: re-run the whole prefix at every step instead of using the cache (what the
            official code does; for tests and benchmarks only).

    Yields:
        ``(song, token, finish)``: the song's index in ``prompts``, the new token id (``EOS_ID``
        when the song ends with EOS) and, on the song's last event, why it ended: ``"eos"``,
        ``"bars"`` or ``"max_tokens"`` (else None). A prompt that already meets a stopping rule
        yields one event with token ``-1``.
    """
    from museformer.cache import Decoder, RecomputeDecoder

    vocab = model.vocab
    bar_id = vocab.bar_id
    prompts = [[int(t) for t in p] for p in prompts]
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} songs")
    lengths = [len(p) for p in prompts]
    bars = [sum(1 for t in p if t == bar_id) for p in prompts]

    active = []
    for i, reason in enumerate(_finish_reasons(np.array(lengths), np.array(bars), config)):
        if reason is None:
            active.append(i)
        else:
            yield i, -1, reason
    if not active:
        return
    device = next(model.parameters()).device
    longest = max(lengths[i] for i in active)
    decoder = (RecomputeDecoder if recompute else Decoder)(model, capacity=min(longest + 1 + config.max_tokens, 4096))
    logits = decoder.prefill([[BOS_ID] + prompts[i] for i in active])
    state = None
    if grammar is not None:
        # prompts are checked for syntax; constraints (instruments, tempo) steer only new tokens
        state = grammar.prefill(grammar.start(len(active), device), [prompts[i] for i in active], strict=False)
    never = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
    never[[0, PAD_ID, UNK_ID]] = True  # "<s>" is reserved, padding and unknown are not music
    # per active song, as arrays (the per-step bookkeeping is vectorised; only the events loop)
    rows = np.array(active)  # song index of each row
    seed = np.array([int(seeds[i]) for i in active], dtype=np.uint64)
    draws = np.zeros(len(active), dtype=np.int64)  # tokens sampled so far (the song's draw counter)
    length = np.array([lengths[i] for i in active])
    bar = np.array([bars[i] for i in active])
    max_bars = config.max_bars
    while True:
        # one mask of every forbidden token (fewer tensor ops per step: this loop runs per token)
        forbid = never.expand(len(rows), -1).clone() if state is None else ~grammar.allowed(state)  # (B, V)
        forbid |= never
        short = length < config.min_tokens if max_bars is None else bar < max_bars  # EOS only after bar B
        if short.any():
            forbid[:, EOS_ID] |= torch.from_numpy(short).to(device)
        logits = logits.float().masked_fill(forbid, float("-inf"))
        stuck = torch.isinf(logits).all(dim=-1)  # constraints left nothing: end the song
        if bool(stuck.any()):
            logits[stuck, EOS_ID] = 0.0
        next_ids = sample_next(logits, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                               uniforms=counter_uniforms(seed, draws)).to(device)
        draws += 1
        if state is not None:
            state = grammar.advance(state, next_ids)
        tokens = next_ids.cpu().numpy()
        eos = tokens == EOS_ID
        length += ~eos
        bar += tokens == bar_id
        reasons = _finish_reasons(length, bar, config, eos)
        for i, token, reason in zip(rows.tolist(), tokens.tolist(), reasons):
            yield i, token, reason
        done = np.array([r is not None for r in reasons])
        if done.any():
            keep = np.flatnonzero(~done)
            if not keep.size:
                return
            rows, seed, draws, length, bar = rows[keep], seed[keep], draws[keep], length[keep], bar[keep]
            kept = torch.from_numpy(keep).to(device)
            decoder.keep(kept)
            next_ids = next_ids.index_select(0, kept)
            if state is not None:
                state = state.select(kept)
        logits = decoder.step(next_ids)


# ---------------------------------------------------------------------------------------------
# songs: the Python API
# ---------------------------------------------------------------------------------------------
@dataclass
class Song:
    """One generated song.

    Attributes:
        ids: the song's token ids (prompt included; no BOS, no EOS).
        prompt_length: how many of ``ids`` came from the prompt.
        finish: why it ended: ``"eos"``, ``"bars"`` or ``"max_tokens"``.
        seed: the seed of its random stream (same model, options and seed -> same song).
        score: the decoded ``symusic.Score``.
        bars: complete bars (closed by ``b-1``).
        skipped: tokens the decoder could not use (0 with grammar-constrained decoding).
        form: with a form plan, how each bar was made (``museformer.form.FormResult``); else None.
    """

    ids: list[int]
    prompt_length: int
    finish: str
    seed: int
    score: Any = None
    bars: int = 0
    skipped: int = 0
    form: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


def _as_model(model, tokenizer, checkpoint, device):
    """(model, tokenizer, checkpoint dir or None) from what the caller gave.

    ``model`` is a loaded model (with its ``tokenizer``), the name of a bundled model
    (``museformer.bundled.BUNDLED_MODELS``) or None (then ``checkpoint``, else the default bundled model).
    """
    if model is not None and not isinstance(model, str):
        if tokenizer is None:
            raise MuseformerError("pass the model's tokenizer together with model=")
        return model, tokenizer, None
    from museformer.checkpoint import load, resolve_checkpoint

    if isinstance(model, str) and checkpoint is not None:
        raise MuseformerError(f"give a bundled model name (model={model!r}) or a checkpoint, not both")
    directory = resolve_checkpoint(checkpoint) if checkpoint is not None else bundled_checkpoint(model)
    model, tokenizer = load(directory, device=device)
    return model, tokenizer, directory


PRECISIONS = ("auto", "bf16", "fp32")


def decoding_precision(precision: str, device: str | torch.device) -> str:
    """``"bf16"`` or ``"fp32"``: what ``precision`` means for decoding on ``device``.

    ``"auto"`` is bf16 where the hardware computes it natively (CUDA; CPUs with AMX or AVX512-BF16:
    ``evaluate.uses_bf16``), else fp32: on an AVX2-only CPU bf16 products are emulated and slower.

    Raises:
        MuseformerError: ``precision`` is not one of ``PRECISIONS``.
    """
    from museformer.evaluate import uses_bf16

    if precision not in PRECISIONS:
        raise MuseformerError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return "bf16" if uses_bf16(torch.device(device), precision) else "fp32"


def decoding_model(model, precision: str, *, owned: bool):
    """The model that decodes at ``precision`` (``"bf16"`` or ``"fp32"``, see ``decoding_precision``).

    bf16 casts the weights, so activations and the cache (``FCCache`` takes the weights' dtype) are
    bf16 too; the sampler reads float32 logits. A model the caller still holds (``owned=False``) is
    copied, never cast in place.
    """
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if next(model.parameters()).dtype == dtype:
        return model
    import copy

    return (model if owned else copy.deepcopy(model)).to(dtype)


def bundled_checkpoint(name: str | None = None) -> Path:
    """The bundled model ``name`` (None = the default; ``museformer.bundled``)."""
    from museformer import bundled

    return bundled.bundled_checkpoint(name)


LENGTH_OPTIONS = ("max_bars", "max_tokens", "min_tokens")


def with_model_defaults(config: SampleConfig, directory: Path | None, given: Sequence[str] = ()) -> SampleConfig:
    """``config`` with the defaults a checkpoint recommends (its ``sample.json``) for the options
    the caller did not choose (``given``). The length options go together: a caller who chose any
    of ``LENGTH_OPTIONS`` gets none of the recommended lengths; a sampling option (``top_k``,
    ``temperature``, ``top_p``) is kept from the checkpoint unless the caller chose that one."""
    from museformer.bundled import sample_defaults

    if directory is None:
        return config
    given = set(given) | (set(LENGTH_OPTIONS) if set(given) & set(LENGTH_OPTIONS) else set())
    defaults = {k: v for k, v in sample_defaults(directory).items() if k not in given}
    return dataclasses.replace(config, **defaults) if defaults else config


def generate(
    checkpoint: str | os.PathLike | None = None,
    *,
    model=None,
    tokenizer=None,
    num_songs: int = 1,
    prompt: str | os.PathLike | Sequence[int] | None = None,
    prompt_bars: int | None = None,
    config: SampleConfig | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    progress=None,
    form=None,
    candidates: int = 8,
    precision: str = "fp32",
    **options: Any,
) -> list[Song]:
    """Generate songs with a checkpoint (default: the bundled model) or a given model.

    Args:
        checkpoint: a checkpoint directory or a training run folder (its ``model/``, else its newest
            ``checkpoints/step-N``: ``checkpoint.resolve_checkpoint``); None = a bundled model.
        model, tokenizer: an already loaded model (eval mode) and its tokenizer; or ``model`` =
            the name of a bundled model (``"folk"``, ``"chorales"``; None = the default one).
            Without ``config`` and length options, a bundled model's recommended length applies
            (the folk model: ``max_bars=64``; ``museformer.bundled.sample_defaults``).
        num_songs: how many songs.
        prompt: a MIDI file to continue, or prompt ids (no BOS); None = start from scratch.
        prompt_bars: keep only the first bars of the prompt.
        config: sampling options; keyword ``options`` override its fields
            (e.g. ``generate(max_bars=16, seed=1)``).
        batch_size: songs decoded together (None = all of them; else >= 1).
        device: where the model runs (``"cpu"`` or ``"cuda"``).
        progress: optional callable ``progress(song, token, finish)`` called for every event.
        form: a form plan the songs follow (``museformer.form``): its text (``"A8 A8 B8 A'8"``), its
            JSON dict or a ``FormPlan``; songs then have the plan's bars (``max_bars``, if given,
            must agree) and are decoded bar by bar, ``candidates`` candidate bars per planned bar.
        candidates: K, candidate bars per planned bar with ``form`` (unused without it).
        precision: ``"fp32"``, ``"bf16"`` (weights, activations and cache in bfloat16) or
            ``"auto"`` (bf16 where the hardware computes it natively; ``decoding_precision``).

    Returns:
        the songs, in order; each has its ids, seed, finish reason and decoded score.

    Raises:
        MuseformerError: a bad option, or a prompt that leaves nothing to generate (it already has
            ``max_bars`` bars or ``max_tokens`` tokens).
    """
    given = list(options) if config is None else [f.name for f in dataclasses.fields(SampleConfig)]
    config = dataclasses.replace(config or SampleConfig(), **options) if options else (config or SampleConfig())
    plan = None
    if form is not None:  # bar-by-bar decoding to a plan: museformer.form
        from museformer.form import load_plan, plan_bars

        plan = load_plan(form)
        config = plan_bars(plan, config)
    check_run_options(config, num_songs=num_songs, batch_size=batch_size, prompt_bars=prompt_bars)
    batch_size = num_songs if batch_size is None else batch_size
    precision = decoding_precision(precision, device)
    given_model = model is not None and not isinstance(model, str)
    model, tokenizer, directory = _as_model(model, tokenizer, checkpoint, device)
    model = decoding_model(model, precision, owned=not given_model)
    config = with_model_defaults(config, directory, given)
    check_run_options(config, num_songs=num_songs, batch_size=batch_size, prompt_bars=prompt_bars)
    model.eval()
    if prompt is None:
        prompt_ids: list[int] = []
    elif isinstance(prompt, (str, os.PathLike)):
        prompt_ids = prompt_from_midi(prompt, tokenizer, prompt_bars)
    else:
        prompt_ids = truncate_bars(prompt, prompt_bars, tokenizer.vocab.bar_id)
        if prompt_ids and prompt_ids[0] == BOS_ID:
            prompt_ids = prompt_ids[1:]
    check_prompt_fits(prompt_ids, config, tokenizer.vocab.bar_id)
    grammar = build_grammar(tokenizer, config)
    seeds = song_seeds(config, num_songs)
    if plan is not None:
        from museformer.form import form_songs

        return form_songs(model, tokenizer, plan, config, seeds, prompt_ids, candidates, progress)
    songs: list[Song] = []
    for start in range(0, num_songs, batch_size):
        count = min(batch_size, num_songs - start)
        ids = [list(prompt_ids) for _ in range(count)]
        finish: list[str | None] = [None] * count
        for i, token, reason in stream(model, ids, config, seeds=seeds[start:start + count], grammar=grammar):
            if token >= 0 and token != EOS_ID:
                ids[i].append(token)
            if reason is not None:
                finish[i] = reason
            if progress is not None:
                progress(start + i, token, reason)
        for i in range(count):
            song_ids = ids[i]
            if finish[i] == "max_tokens":
                song_ids = _cut_to_last_bar(song_ids, tokenizer.vocab.bar_id, len(prompt_ids))
            score, report = tokenizer.decode_with_report(song_ids)
            n_bars = sum(1 for t in song_ids if t == tokenizer.vocab.bar_id)
            songs.append(Song(song_ids, len(prompt_ids), finish[i], seeds[start + i], score, n_bars, report.skipped))
    return songs


def check_run_options(config: SampleConfig, *, num_songs: int, batch_size: int | None,
                      prompt_bars: int | None) -> None:
    """Options of a run that ``SampleConfig`` alone cannot judge; ``MuseformerError`` naming the option."""
    if not isinstance(num_songs, int) or num_songs < 1:
        raise MuseformerError(f"number of songs must be >= 1, got {num_songs}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise MuseformerError(f"--batch-size must be >= 1 (omit it to decode all songs together), got {batch_size}")
    if prompt_bars is not None:
        if not isinstance(prompt_bars, int) or prompt_bars < 1:
            raise MuseformerError(f"--prompt-bars must be >= 1, got {prompt_bars}")
        if config.max_bars is not None and prompt_bars >= config.max_bars:
            raise MuseformerError(
                f"--prompt-bars {prompt_bars} leaves nothing to generate: songs have --bars {config.max_bars} bars "
                f"in all, prompt included (use fewer prompt bars or more --bars)"
            )


def check_prompt_fits(prompt_ids: Sequence[int], config: SampleConfig, bar_id: int) -> None:
    """Refuse a prompt that already reaches a length limit (0 tokens would be generated)."""
    bars = sum(1 for t in prompt_ids if t == bar_id)
    if config.max_bars is not None and bars >= config.max_bars:
        raise MuseformerError(
            f"the prompt has {bars} bars, so --bars {config.max_bars} (which counts the prompt) leaves nothing to "
            f"generate; pass --prompt-bars N below {config.max_bars} or a larger --bars"
        )
    if len(prompt_ids) >= config.max_tokens:
        raise MuseformerError(
            f"the prompt has {len(prompt_ids)} tokens, so --max-tokens {config.max_tokens} (which counts the "
            f"prompt) leaves nothing to generate"
        )


def _cut_to_last_bar(ids: list[int], bar_id: int, keep_at_least: int) -> list[int]:
    """Drop an unfinished last bar (but never prompt tokens)."""
    for i in range(len(ids) - 1, keep_at_least - 1, -1):
        if ids[i] == bar_id:
            return ids[: i + 1]
    return ids[:keep_at_least] if keep_at_least else ids


# ---------------------------------------------------------------------------------------------
# writing songs to a folder lives in museformer.songs; these names stay importable from here
# ---------------------------------------------------------------------------------------------
_SONGS_NAMES = ("file_sha256", "save_song", "generate_to_folder", "song_name", "next_song_number", "SONG_PREFIX")


def __getattr__(name: str):
    if name in _SONGS_NAMES:
        from museformer import songs

        return getattr(songs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
