"""The incremental decoder is exact: cached logits equal a full forward's at every step."""

import pytest
import torch

from museformer.cache import Decoder, FCCache, RecomputeDecoder
from museformer.model import Museformer, MuseformerConfig
from museformer.structure import AttentionPattern, SlotKind, toy_song
from museformer.vocab import BOS_ID, Vocab

VOCAB = Vocab.builtin("lmd6remi")


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(pattern: AttentionPattern, seed: int = 0) -> Museformer:
    torch.manual_seed(seed)
    model = Museformer(MuseformerConfig.preset("tiny", pattern=pattern)).eval()
    # give the summary-specific weights some size so a wrong summary would show in the logits
    with torch.no_grad():
        for layer in model.layers:
            if layer.attention.has_summaries:
                layer.attention.summary_bias.normal_(0, 0.5)
            layer.attention.regular_bias.normal_(0, 0.5)
    return model


def _decode_and_compare(model, songs, prompt_lengths, capacity, check_prefix_every=0, tolerance=1e-5, **options):
    """Teacher-force ``songs`` through a Decoder (batched, songs leave when done); compare to forward."""
    close = dict(rtol=tolerance, atol=tolerance)
    full = [model(s[None])[0] for s in songs]  # (T, V) each; the model is causal
    dec = Decoder(model, capacity=capacity, **options)
    logits = dec.prefill([s[:p] for s, p in zip(songs, prompt_lengths)])
    for i, p in enumerate(prompt_lengths):
        torch.testing.assert_close(logits[i], full[i][p - 1], **close)
    pos, active, steps, capacities = list(prompt_lengths), list(range(len(songs))), 0, set()
    while active:
        logits = dec.step(torch.stack([songs[i][pos[i]] for i in active]))
        for row, i in enumerate(active):
            torch.testing.assert_close(logits[row], full[i][pos[i]], **close)
            if check_prefix_every and pos[i] % check_prefix_every == 0:
                prefix = model(songs[i][None, : pos[i] + 1])[0, -1]  # a full forward of this very prefix
                torch.testing.assert_close(logits[row], prefix, **close)
            pos[i] += 1
        steps += 1
        keep = [row for row, i in enumerate(active) if pos[i] < len(songs[i])]
        if len(keep) < len(active):
            dec.keep(keep)
            active = [active[row] for row in keep]
        capacities.add(dec.cache.capacity if active else 0)
    return dec, steps, capacities


def test_exact_every_step_short_offsets_batch_prompts_and_eviction():
    """Fine offsets (1, 2, 4), 45 bars, 3 songs of different prompts and lengths: equal logits at every
    step, while old regular slots are evicted and the buffer grows."""
    model = _model(AttentionPattern(fine_offsets=(1, 2, 4)))
    songs = [toy_song(n, VOCAB, seed=n, max_notes=2) for n in (45, 20, 33)]
    dec, steps, capacities = _decode_and_compare(model, songs, [1, 37, 9], capacity=24, check_prefix_every=7)
    assert steps == max(len(s) for s in songs) - 1
    assert dec.evicted > 0  # dead slots were dropped ...
    assert len(capacities - {0}) >= 1


def test_exact_every_step_default_offsets_past_32_bars():
    """The paper's offsets (1..32): a 60-bar song plus a shorter one stay exact at every step."""
    model = _model(AttentionPattern())
    songs = [toy_song(60, VOCAB, seed=3, max_notes=1), toy_song(36, VOCAB, seed=4, max_notes=1)]
    dec, _, capacities = _decode_and_compare(model, songs, [1, 15], capacity=16)
    assert max(capacities) > 16  # it grew
    assert dec.evicted > 0


@pytest.mark.parametrize(
    "pattern", [AttentionPattern(fine_offsets=(1, 2), summary_tokens=0), AttentionPattern.full()], ids=["fine-only", "full"]
)
def test_exact_other_patterns(pattern):
    """Fine-only and full (dense baseline) patterns decode exactly too."""
    model = _model(pattern)
    songs = [toy_song(12, VOCAB, seed=5, max_notes=2), toy_song(7, VOCAB, seed=6)]
    _decode_and_compare(model, songs, [3, 1], capacity=16)


@pytest.mark.parametrize(
    "pattern", [AttentionPattern(fine_offsets=(1, 2, 4)), AttentionPattern(fine_offsets=(1, 2), summary_tokens=0),
                AttentionPattern.full()], ids=["fc", "fine-only", "full"]
)
def test_bf16_cached_decoding_equals_the_bf16_forward(pattern):
    """A bf16 model decodes with a bf16 cache (weights, activations, masks) and its cached logits equal
    its own full forward's within bf16 rounding, across eviction and a batch of different prompts;
    both stay near the float32 model."""
    model = _model(pattern)
    songs = [toy_song(n, VOCAB, seed=n, max_notes=2) for n in (30, 14)]
    with torch.no_grad():
        fp32 = [model(s[None])[0] for s in songs]
    bf16 = model.to(torch.bfloat16)
    dec, _, _ = _decode_and_compare(bf16, songs, [1, 9], capacity=24, tolerance=3e-2)
    assert dec.cache.joint_keys.dtype == torch.bfloat16
    with torch.no_grad():
        for s, reference in zip(songs, fp32):
            torch.testing.assert_close(bf16(s[None])[0].float(), reference, rtol=0, atol=0.15)


def test_prefill_with_incomplete_last_bar_and_padding_tensor():
    """A right-padded prompt tensor whose last bar is open prefills to the same logits as forward."""
    model = _model(AttentionPattern(fine_offsets=(1, 2, 4)))
    a = toy_song(9, VOCAB, seed=1, incomplete_last=True)
    b = toy_song(3, VOCAB, seed=2)
    ids = torch.nn.utils.rnn.pad_sequence([a, b], batch_first=True, padding_value=1)
    logits = Decoder(model).prefill(ids)
    torch.testing.assert_close(logits[0], model(a[None])[0, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], model(b[None])[0, -1], rtol=1e-5, atol=1e-5)


def test_summary_slots_hold_bar_summaries():
    """After decoding, one SUMMARY slot per complete bar exists, at the position of its b-1."""
    model = _model(AttentionPattern())
    song = toy_song(5, VOCAB, seed=8)
    dec = Decoder(model)
    dec.prefill([song[:1]])
    for t in range(1, len(song)):
        dec.step(song[t : t + 1])
    cache = dec.cache
    summary = cache.summary_kind[0] == SlotKind.SUMMARY
    assert cache.summary_bar[0][summary].tolist() == [1, 2, 3, 4, 5] and int(cache.summary_used[0]) == 5
    ends = torch.nonzero(song == VOCAB.bar_id).flatten()
    assert cache.summary_pos[0][summary].tolist() == ends.tolist()
    assert int((cache.kind[0] == SlotKind.PREFIX).sum()) == 1 and int(cache.used[0]) == len(song)


def test_evict_keeps_live_slots_in_order():
    """FCCache.evict drops only regular slots older than the pattern's horizon and keeps order."""
    model = _model(AttentionPattern(fine_offsets=(1, 2, 4)))  # horizon 4
    cache = FCCache(model, 1, capacity=8)
    kinds = [SlotKind.PREFIX, SlotKind.REGULAR, SlotKind.REGULAR, SlotKind.REGULAR, SlotKind.REGULAR, SlotKind.REGULAR]
    cache.kind[0, :6] = torch.tensor([int(k) for k in kinds])
    cache.bar[0, :6] = torch.tensor([0, 1, 1, 2, 2, 5])
    cache.pos[0, :6] = torch.arange(6)
    cache.keys[0, 0, 0, :6, 0] = torch.arange(6.0)
    cache.used[0] = 6
    assert cache.evict(torch.tensor([6])) == 2  # bar 1 (6 - 4 = 2 > 1) is dead
    assert cache.used.tolist() == [4]
    assert cache.keys[0, 0, 0, :4, 0].tolist() == [0.0, 3.0, 4.0, 5.0]
    assert cache.bar[0, :4].tolist() == [0, 2, 2, 5] and cache.kind[0, 4:].eq(SlotKind.PAD).all()


def test_recompute_decoder_matches_cached_decoder():
    """The reference full-recompute decoder gives the same logits as the cache."""
    model = _model(AttentionPattern(fine_offsets=(1, 2)))
    song = toy_song(6, VOCAB, seed=9)
    cached, slow = Decoder(model), RecomputeDecoder(model)
    torch.testing.assert_close(cached.prefill([song[:4]]), slow.prefill([song[:4]]), rtol=1e-5, atol=1e-5)
    for t in range(4, len(song)):
        torch.testing.assert_close(cached.step(song[t : t + 1]), slow.step(song[t : t + 1]), rtol=1e-5, atol=1e-5)


def test_decoder_refuses_training_mode():
    """Dropout would make decoding inexact, so a model in training mode is refused."""
    model = Museformer(MuseformerConfig.preset("tiny"))
    with pytest.raises(ValueError, match="eval"):
        Decoder(model.train())
    assert BOS_ID == 2


def test_a_changed_layer_module_changes_cached_decoding_the_same_way():
    """A forward hook scaling one LayerNorm's output changes the full forward, and cached decoding
    (prefill and every step) still equals it: decoding runs through the model's own modules."""
    model = _model(AttentionPattern(fine_offsets=(1, 2)))
    song = toy_song(6, VOCAB, seed=10)
    plain = model(song[None])[0]
    handle = model.layers[1].ffn_norm.register_forward_hook(lambda module, inputs, output: output * 1.5)
    try:
        hooked = model(song[None])[0]
        assert not torch.allclose(hooked, plain, atol=1e-3)
        dec = Decoder(model)
        torch.testing.assert_close(dec.prefill([song[:5]])[0], hooked[4], rtol=1e-5, atol=1e-5)
        for t in range(5, len(song)):
            torch.testing.assert_close(dec.step(song[t : t + 1])[0], hooked[t], rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()


def test_chunks_after_the_prompt_equal_the_full_forward():
    """A cached forward of several tokens per song (after a prefill) gives the full forward's logits
    for every one of them, across bar ends (summaries made inside the chunk)."""
    model = _model(AttentionPattern(fine_offsets=(1, 2)))
    songs = [toy_song(8, VOCAB, seed=11), toy_song(6, VOCAB, seed=12)]
    full = [model(s[None])[0] for s in songs]
    cache = FCCache(model, 2, capacity=16)
    with torch.no_grad():
        model(torch.stack([songs[0][:3], songs[1][:3]]), cache=cache)
        start = 3
        for size in (7, 1, 12, 5):
            chunk = torch.stack([songs[0][start : start + size], songs[1][start : start + size]])
            logits = model(chunk, cache=cache)
            for b in range(2):
                torch.testing.assert_close(logits[b], full[b][start : start + size], rtol=1e-5, atol=1e-5)
            start += size
