"""Tests of model.py / attention.py: shapes, parameter count, no leakage, batching, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from museformer import Museformer, MuseformerConfig
from museformer.attention import DenseBackend, FCAttention
from museformer.model import lm_loss, sinusoid
from museformer.structure import AttentionPattern, bar_ids, bar_layout, toy_song
from museformer.vocab import PAD_ID, Vocab

VOCAB = Vocab.builtin("lmd6remi")
ATOL = 1e-5


def tiny(**overrides) -> Museformer:
    torch.manual_seed(0)
    return Museformer(MuseformerConfig.preset("tiny", **overrides)).eval()


def song(n_bars: int, seed: int = 0, incomplete_last: bool = True) -> torch.Tensor:
    return toy_song(n_bars, VOCAB, seed=seed, incomplete_last=incomplete_last)[None]  # (1, T)


def test_paper_preset_has_16_1_million_parameters():
    """The paper preset with the LMD vocabulary (560 ids) has 16.1 M parameters (within 1 %)."""
    model = Museformer(MuseformerConfig.preset("paper"))
    assert model.config.vocab_size == 560
    assert abs(model.num_parameters() - 16.1e6) / 16.1e6 < 0.01


def test_forward_shapes_and_finite():
    """Logits are (B, T, V) and finite, for fc, fine-only and full patterns."""
    ids = song(7)
    for pattern in (AttentionPattern(), AttentionPattern(summary_tokens=0), AttentionPattern.full()):
        logits = tiny(pattern=pattern)(ids)
        assert logits.shape == (1, ids.shape[1], 560) and torch.isfinite(logits).all()


@pytest.mark.parametrize("pattern", [AttentionPattern(), AttentionPattern(fine_offsets=(1,)), AttentionPattern.full()])
def test_no_leakage_from_the_future(pattern):
    """Changing any token after position t never changes the logits at or before t."""
    model = tiny(pattern=pattern)
    ids = song(10, seed=1)
    T = ids.shape[1]
    reference = model(ids)
    generator = torch.Generator().manual_seed(0)
    for t in (0, 3, T // 3, T // 2, T - 2):
        changed = ids.clone()
        # random ids (bar ends included), so the bar structure after t changes too
        changed[0, t + 1:] = torch.randint(4, 560, (T - t - 1,), generator=generator)
        changed[0, t + 1::5] = VOCAB.bar_id
        torch.testing.assert_close(model(changed)[0, : t + 1], reference[0, : t + 1], atol=ATOL, rtol=0)


def _replace_pitch(ids: torch.Tensor, bar: int) -> torch.Tensor:
    """A copy of ids with the first pitch token of ``bar`` changed (the bar structure stays)."""
    bars = bar_ids(ids, VOCAB)[0]
    pitches = set(VOCAB.ids_of_kind(6).tolist())
    t = next(i for i in range(ids.shape[1]) if bars[i] == bar and int(ids[0, i]) in pitches)
    changed = ids.clone()
    changed[0, t] = VOCAB.token_to_id("p-30")
    return changed


def _zero_summary_path(model: Museformer) -> None:
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.key2.weight.zero_()
            layer.attention.value2.weight.zero_()


@pytest.mark.parametrize("n_layers, offsets", [(1, (1, 2, 4, 8, 12, 16, 24, 32)), (2, (4,))])
def test_coarse_bars_are_read_only_through_their_summary(n_layers, offsets):
    """A change in a coarse bar reaches later tokens only through that bar's summary (key2/value2)."""
    model = tiny(n_layers=n_layers, pattern=AttentionPattern(fine_offsets=offsets))
    ids = song(6, seed=2)
    changed = _replace_pitch(ids, bar=1)
    bars = bar_ids(ids, VOCAB)[0]
    # bars that see bar 1 only as a coarse bar, with no chain of fine bars back to it
    coarse_readers = (bars == 4) if n_layers == 1 else ((bars == 2) | (bars == 3))
    assert not torch.allclose(model(changed)[0, coarse_readers], model(ids)[0, coarse_readers], atol=ATOL)
    _zero_summary_path(model)
    torch.testing.assert_close(model(changed)[0, coarse_readers], model(ids)[0, coarse_readers], atol=ATOL, rtol=0)


def test_summary_read_first_three_bars_later():
    """Perturbing bar i's summary keys/values changes no logits of bars i, i+1, i+2, but changes bar i+3."""
    model = tiny()
    ids = song(8, seed=3)
    bars = bar_ids(ids, VOCAB)[0]
    reference = model(ids)
    summary_slot = 2  # the summary of bar 3

    def perturb(module, inputs, output):
        output = output.clone()
        output[:, summary_slot] += 10.0
        return output

    handles = [h for layer in model.layers for h in (
        layer.attention.key2.register_forward_hook(perturb), layer.attention.value2.register_forward_hook(perturb))]
    perturbed = model(ids)
    for h in handles:
        h.remove()
    unaffected = bars <= 5  # bars 1..5: up to bar 3 + 2
    torch.testing.assert_close(perturbed[0, unaffected], reference[0, unaffected], atol=ATOL, rtol=0)
    assert not torch.allclose(perturbed[0, bars == 6], reference[0, bars == 6], atol=1e-3)


def test_batched_equals_single():
    """A right-padded batch of songs with different bar structures gives each song's logits alone."""
    model = tiny()
    songs = [song(9, seed=4)[0], song(3, seed=5, incomplete_last=False)[0], song(6, seed=6)[0]]
    T = max(len(s) for s in songs)
    batch = torch.full((len(songs), T), PAD_ID)
    for i, s in enumerate(songs):
        batch[i, : len(s)] = s
    logits = model(batch)
    assert torch.isfinite(logits).all()
    for i, s in enumerate(songs):
        torch.testing.assert_close(logits[i, : len(s)], model(s[None])[0], atol=ATOL, rtol=1e-5)


def test_given_bar_and_onset_ids_are_used():
    """Passing the bar/onset ids that structure.py computes gives the same logits as computing them."""
    from museformer.structure import onset_ids

    model = tiny()
    ids = song(5)
    torch.testing.assert_close(model(ids, bar_ids(ids, VOCAB), onset_ids(ids, VOCAB)), model(ids))


def test_gradients_reach_every_parameter():
    """One backward pass (train mode, padded batch) gives a finite, non-zero gradient to every parameter."""
    torch.manual_seed(0)
    model = Museformer(MuseformerConfig.preset("tiny", dropout=0.1, attention_dropout=0.1)).train()
    a, b = song(8, seed=7)[0], song(4, seed=8)[0]
    batch = torch.full((2, len(a)), PAD_ID)
    batch[0], batch[1, : len(b)] = a, b
    targets = torch.cat([batch[:, 1:], torch.full((2, 1), PAD_ID)], dim=1)
    lm_loss(model(batch), targets).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert any("key2" in n for n, _ in model.named_parameters()) and any("value2" in n for n, _ in model.named_parameters())


def test_attention_matches_explicit_softmax():
    """FCAttention equals attention written out by hand: summaries first, key2/value2, one softmax per query."""
    torch.manual_seed(0)
    pattern = AttentionPattern(fine_offsets=(1,))
    D, H = 8, 2
    attn = FCAttention(D, H, 0.0, True, DenseBackend()).eval()
    with torch.no_grad():
        for bias in (attn.regular_bias, attn.summary_bias):
            bias.normal_()
    ids = song(4, seed=9)
    layout = bar_layout(ids, VOCAB, pattern)
    masks = attn.backend.prepare(layout, pattern)
    T, S = ids.shape[1], layout.num_summaries
    x, s = torch.randn(1, T, D), torch.randn(1, S, D)
    out_x, out_s = attn(x, s, masks)

    def proj(inp, bias):  # (L, D) -> 3 x (H, L, Dh)
        return [(inp @ w.weight.T + b).view(-1, H, D // H).transpose(0, 1)
                for w, b in zip((attn.q_proj, attn.k_proj, attn.v_proj), bias)]

    def softmax_attend(q, k, v, mask):  # one softmax over the allowed keys
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D // H)
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v

    qr, kr, vr = proj(x[0], attn.regular_bias)
    qs, ks, vs = proj(s[0], attn.summary_bias)
    h = softmax_attend(qs, torch.cat([ks, kr], 1), torch.cat([vs, vr], 1), masks.summary.allowed[0, 0])
    h = h.transpose(0, 1).reshape(S, D)
    k2 = attn.key2(h).view(S, H, D // H).transpose(0, 1)
    v2 = attn.value2(h).view(S, H, D // H).transpose(0, 1)
    a = softmax_attend(qr, torch.cat([k2, kr], 1), torch.cat([v2, vr], 1), masks.regular.allowed[0, 0])
    a = a.transpose(0, 1).reshape(T, D)
    torch.testing.assert_close(out_x[0], attn.out_proj(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_s[0], attn.out_proj(h), atol=1e-5, rtol=1e-5)


def test_sinusoid_and_loss():
    """Sinusoids are zero for index 0 and sin|cos otherwise; lm_loss ignores padding targets."""
    emb = sinusoid(torch.tensor([0, 1, 5]), 8)
    assert emb.shape == (3, 8) and emb[0].abs().sum() == 0
    torch.testing.assert_close(emb[2, :4], torch.sin(5 * torch.exp(torch.arange(4) * -math.log(10000) / 3)))
    logits = torch.randn(2, 3, 10)
    targets = torch.tensor([[4, 5, PAD_ID], [6, PAD_ID, PAD_ID]])
    keep = targets != PAD_ID
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(lm_loss(logits, targets), expected)


def test_config_round_trip_presets_and_validation():
    """Configs round-trip through dicts; unknown keys, bad values and unknown presets are errors."""
    for name in ("paper", "small", "tiny"):
        config = MuseformerConfig.preset(name)
        assert MuseformerConfig.from_dict(config.to_dict()) == config
    assert MuseformerConfig.preset("tiny", vocab="general").vocab_size == 1024
    with pytest.raises(ValueError, match="unknown model config keys"):
        MuseformerConfig.from_dict({**MuseformerConfig().to_dict(), "n_experts": 4})
    for bad in (dict(d_model=30, n_heads=4), dict(dropout=1.5), dict(attention_backend="cuda"), dict(n_layers=0)):
        with pytest.raises(ValueError):
            MuseformerConfig(**bad)
    with pytest.raises(ValueError, match="unknown model preset"):
        MuseformerConfig.preset("huge")
    with pytest.raises(ValueError, match="vocab_size"):
        Museformer(MuseformerConfig.preset("tiny", vocab_size=100))
