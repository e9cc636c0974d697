"""The fast ("flex") FC-attention path equals the dense reference built from structure.may_attend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from museformer import Museformer, MuseformerConfig
from museformer import fc_blocks
from museformer.structure import AttentionPattern, SlotKind, bar_layout, dense_masks
from museformer.vocab import BOS_ID, PAD_ID, Vocab

VOCAB = Vocab.builtin("lmd6remi")
BAR, TEMPO, PITCH = VOCAB.bar_id, VOCAB.token_to_id("t-30"), VOCAB.token_to_id("p-60")
# Every flex call in this file uses one shape (compiling a new shape costs ~15 s on CPU)
H, D, BLOCK, Q_BLOCKS, S_BLOCKS = 2, 8, 16, 48, 4


def song(bar_lengths: list[int], complete: bool = True) -> list[int]:
    """BOS + bars of the given lengths (``t-*``, pitches, ``b-1``; length 1 = just ``b-1``).

    With ``complete=False`` the last bar has no ``b-1`` (an open bar without a summary).
    """
    ids = [BOS_ID]
    for i, length in enumerate(bar_lengths):
        open_bar = not complete and i == len(bar_lengths) - 1
        body = ([TEMPO] + [PITCH] * (length - 2)) if length >= 2 else []
        ids += body + ([PITCH] if open_bar and length < 2 else []) + ([] if open_bar else [BAR])
    return ids


def batch(songs: list[list[int]]) -> torch.Tensor:
    """Right-padded (B, T) batch."""
    length = max(map(len, songs))
    return torch.tensor([s + [PAD_ID] * (length - len(s)) for s in songs])


def random_batches(seed: int, count: int):
    """Random bar layouts: very short, empty (t-* b-1), long bars, open last bars, mixed batches."""
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        songs = []
        for _ in range(2):
            n_bars = int(torch.randint(1, 40, (1,), generator=g))
            if i % 3 == 0:
                lengths = torch.randint(1, 3, (n_bars,), generator=g).tolist()  # 1-2 token bars
            elif i % 3 == 1:
                lengths = torch.randint(1, 40, (n_bars,), generator=g).tolist()
                lengths[0] = 70  # a bar longer than several blocks
            else:
                lengths = torch.randint(2, 25, (n_bars,), generator=g).tolist()
            songs.append(song(lengths, complete=bool(torch.rand(1, generator=g) < 0.5)))
        yield batch(songs)


def layouts(ids: torch.Tensor, pattern: AttentionPattern, block_size: int = BLOCK):
    layout = bar_layout(ids, VOCAB, pattern)
    blocks = fc_blocks.flex_layout(
        layout, pattern, block_size, min_query_blocks=Q_BLOCKS, min_summary_blocks=S_BLOCKS
    )
    return layout, blocks


def expected_in_slots(regular_mask: torch.Tensor, blocks: fc_blocks.FlexLayout, summaries: int) -> torch.Tensor:
    """The dense mask (B, T, S + T) moved into the bar-aligned layout (B, P, S_pad + P)."""
    batch_size = regular_mask.shape[0]
    out = torch.zeros(batch_size, blocks.padded_length, blocks.summary_slots + blocks.padded_length, dtype=torch.bool)
    for b in range(batch_size):
        real = blocks.slot[b] >= 0
        slots = blocks.slot[b][real]
        rows = regular_mask[b][real]  # (T_real, S + T)
        out[b, slots[:, None], torch.arange(summaries)[None]] = rows[:, :summaries]
        out[b, slots[:, None], (blocks.summary_slots + slots)[None]] = rows[:, summaries:][:, real]
    return out


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize(
    "pattern", [AttentionPattern(), AttentionPattern(fine_offsets=(1, 3), summary_tokens=1),
                AttentionPattern(summary_tokens=0)],
    ids=["paper", "other-offsets", "no-summaries"],
)
def test_block_mask_equals_dense_mask(pattern, block_size):
    """Full blocks + mask_mod on partial blocks give exactly the dense mask on every real query."""
    for ids in random_batches(seed=block_size, count=6):
        layout = bar_layout(ids, VOCAB, pattern)
        blocks = fc_blocks.flex_layout(layout, pattern, block_size)
        _, regular_mask = dense_masks(layout, pattern)
        got = fc_blocks.effective_mask(blocks)
        want = expected_in_slots(regular_mask, blocks, layout.num_summaries)
        real = torch.zeros_like(got[..., 0])
        for b in range(ids.shape[0]):
            real[b, blocks.slot[b][blocks.slot[b] >= 0]] = True
        assert torch.equal(got[real], want[real])


def test_full_blocks_need_no_mask():
    """Every block listed as full is fully allowed by the mask_mod (no element is masked there)."""
    pattern = AttentionPattern()
    for ids in random_batches(seed=7, count=6):
        blocks = fc_blocks.flex_layout(bar_layout(ids, VOCAB, pattern), pattern, 8)
        bm, bs = blocks.block_mask, blocks.block_size
        for b in range(ids.shape[0]):
            for row in range(bm.full_kv_num_blocks.shape[2]):
                for col in bm.full_kv_indices[b, 0, row, : bm.full_kv_num_blocks[b, 0, row]].tolist():
                    q = torch.arange(row * bs, (row + 1) * bs)[:, None]
                    kv = torch.arange(col * bs, (col + 1) * bs)[None]
                    real_rows = (q[:, 0][:, None] == blocks.slot[b][None]).any(-1)
                    assert bm.mask_mod(torch.tensor(b), 0, q, kv)[real_rows].all()


def test_transposed_tables_match():
    """The per-key-block tables (used by the backward pass) list exactly the per-query-block ones."""
    pattern = AttentionPattern()
    ids = next(random_batches(seed=3, count=1))
    bm = fc_blocks.flex_layout(bar_layout(ids, VOCAB, pattern), pattern, 8).block_mask
    for num, idx, qnum, qidx in ((bm.kv_num_blocks, bm.kv_indices, bm.q_num_blocks, bm.q_indices),
                                 (bm.full_kv_num_blocks, bm.full_kv_indices, bm.full_q_num_blocks, bm.full_q_indices)):
        by_q = {(b, r, c) for b in range(ids.shape[0]) for r in range(num.shape[2]) for c in idx[b, 0, r, : num[b, 0, r]].tolist()}
        by_kv = {(b, r, c) for b in range(ids.shape[0]) for c in range(qnum.shape[2]) for r in qidx[b, 0, c, : qnum[b, 0, c]].tolist()}
        assert by_q == by_kv


def test_layout_build_never_makes_a_dense_mask():
    """A 100k-token song builds its layout in memory far below one T x T mask (O(blocks))."""
    pattern = AttentionPattern()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(50, 151, (1000,), generator=g).tolist()
    ids = batch([song(lengths)])[:, :100_000]
    blocks = fc_blocks.flex_layout(bar_layout(ids, VOCAB, pattern), pattern, 128)
    table_bytes = sum(t.numel() * t.element_size() for t in (blocks.block_mask.kv_indices, blocks.block_mask.q_indices))
    assert table_bytes < 100_000 * 100_000 // 100


def dense_summarise(sq, sk, sv, k, v, summary_mask):
    """The reference summarisation: SDPA over [summaries, regular tokens] with the dense mask."""
    return F.scaled_dot_product_attention(
        sq, torch.cat([sk, k], 2), torch.cat([sv, v], 2), attn_mask=summary_mask[:, None]
    )


def test_segment_summarise_equals_dense():
    """The segment softmax of the summarisation step equals SDPA with the dense summary mask."""
    pattern = AttentionPattern()
    g = torch.Generator().manual_seed(0)
    for ids in random_batches(seed=11, count=6):
        layout = bar_layout(ids, VOCAB, pattern)
        summary_mask, _ = dense_masks(layout, pattern)
        B, T, S = ids.shape[0], ids.shape[1], layout.num_summaries
        sq, sk, sv = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
        k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(2))
        got = fc_blocks.summarise(sq, sk, sv, k, v, layout)
        want = dense_summarise(sq, sk, sv, k, v, summary_mask)
        real = layout.summary_kind == SlotKind.SUMMARY
        torch.testing.assert_close(got.transpose(1, 2)[real], want.transpose(1, 2)[real])


def test_segment_summarise_gradients_equal_dense():
    """Gradients of the summarisation step equal the dense path's (CPU autograd)."""
    pattern = AttentionPattern()
    ids = batch([song([3, 1, 9, 2, 5]), song([4, 4], complete=False)])
    layout = bar_layout(ids, VOCAB, pattern)
    summary_mask, _ = dense_masks(layout, pattern)
    B, T, S = ids.shape[0], ids.shape[1], layout.num_summaries
    inputs = [torch.randn(B, H, n, D, dtype=torch.float64, requires_grad=True) for n in (S, S, S, T, T)]
    weight = (layout.summary_kind == SlotKind.SUMMARY)[:, None, :, None].double()
    (fc_blocks.summarise(*inputs, layout) * weight).sum().backward()
    got = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    sq, sk, sv, k, v = inputs
    want = dense_summarise(sq, sk, sv, k, v, summary_mask)
    (want * weight).sum().backward()
    for a, x in zip(got, inputs):
        torch.testing.assert_close(a, x.grad)


def test_flex_aggregate_equals_dense():
    """Compiled flex aggregation (float32, CPU) equals SDPA with the dense regular mask."""
    pattern = AttentionPattern()
    g = torch.Generator().manual_seed(1)
    for ids in random_batches(seed=5, count=3):
        layout, blocks = layouts(ids, pattern)
        _, regular_mask = dense_masks(layout, pattern)
        B, T, S = ids.shape[0], ids.shape[1], layout.num_summaries
        q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
        k2, v2 = (torch.randn(B, H, S, D, generator=g) for _ in range(2))
        got = fc_blocks.aggregate(q, k, v, k2, v2, blocks)
        want = F.scaled_dot_product_attention(q, torch.cat([k2, k], 2), torch.cat([v2, v], 2), attn_mask=regular_mask[:, None])
        real = layout.token_kind != SlotKind.PAD
        torch.testing.assert_close(got.transpose(1, 2)[real], want.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
        assert not got.transpose(1, 2)[~real].any()  # PAD rows are zeros, as in the dense backend


@pytest.mark.parametrize("pattern", [AttentionPattern(), AttentionPattern.full()], ids=["fc", "full"])
def test_model_logits_flex_equal_dense(pattern):
    """A tiny model gives the same logits with attention_backend 'flex' as with 'dense' (float32)."""
    torch.manual_seed(0)
    config = MuseformerConfig.preset("tiny", pattern=pattern)
    dense = Museformer(config).eval()
    flex = Museformer(MuseformerConfig.preset("tiny", pattern=pattern, attention_backend="flex")).eval()
    flex.load_state_dict(dense.state_dict())
    ids = batch([song([5, 2, 9, 1, 3, 7, 4, 2, 8]), song([3, 6, 2], complete=False)])
    with torch.no_grad():
        want, got = dense(ids), flex(ids)
    real = ids != PAD_ID
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)


def test_flex_refuses_attention_dropout():
    """The flex backend raises instead of silently skipping attention dropout."""
    backend = fc_blocks.FlexBackend()
    layout = bar_layout(batch([song([3, 3])]), VOCAB, AttentionPattern())
    state = backend.prepare(layout, AttentionPattern())
    q = torch.zeros(1, H, 1, D)
    with pytest.raises(ValueError, match="dropout"):
        backend.summarise(q, q, q, q, q, state, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout"):
        backend.aggregate(q, q, q, q, q, state, dropout_p=0.1)


def test_auto_backend_choice():
    """'auto' uses the bar chunks (recomputing backward) on CPU, with or without gradients; flex on CUDA except for dropout."""
    from museformer.attention import AutoBackend, DenseBackend
    from museformer.bar_chunks import BarChunks

    backend, pattern = AutoBackend(), AttentionPattern()
    long = bar_layout(batch([song([100] * 50)]), VOCAB, pattern)
    assert isinstance(backend.prepare(long, pattern).state, BarChunks)  # grad enabled
    with torch.no_grad():
        assert isinstance(backend.prepare(long, pattern).state, BarChunks)
    assert backend.choose(on_cuda=False, grad=True).recompute  # the linear-memory (recomputing) backward
    # on CUDA: flex, except for training with attention dropout, which flex does not have
    assert isinstance(backend.choose(on_cuda=True, grad=True), fc_blocks.FlexBackend)
    assert isinstance(AutoBackend(attention_dropout=0.1).choose(on_cuda=True, grad=True), DenseBackend)
    assert isinstance(AutoBackend(attention_dropout=0.1).choose(on_cuda=True, grad=False), fc_blocks.FlexBackend)


def test_prefill_through_flex_then_cached_steps_equal_dense():
    """A prompt read into the cache by the 'flex' backend (the model's own forward) and the cached
    steps after it give the dense model's full-forward logits."""
    from museformer.cache import Decoder

    torch.manual_seed(0)
    dense = Museformer(MuseformerConfig.preset("tiny")).eval()
    flex = Museformer(MuseformerConfig.preset("tiny", attention_backend="flex")).eval()
    flex.load_state_dict(dense.state_dict())
    songs = [song([5, 2, 9, 1, 3, 7, 4, 2, 8]), song([3, 6, 2], complete=False)]
    ids = batch(songs)  # the shape of test_model_logits_flex_equal_dense: no new compilation
    with torch.no_grad():
        full = [dense(torch.tensor([s + s[1:8]]))[0] for s in songs]  # each song, then 7 more tokens
    dec = Decoder(flex)
    logits = dec.prefill(ids)
    for b, s in enumerate(songs):
        torch.testing.assert_close(logits[b], full[b][len(s) - 1], atol=1e-4, rtol=1e-4)
    # continue both songs with the same 7 tokens (their own first tokens after BOS)
    for t in range(7):
        logits = dec.step(torch.tensor([s[1 + t] for s in songs]))
        for b, s in enumerate(songs):
            torch.testing.assert_close(logits[b], full[b][len(s) + t], atol=1e-4, rtol=1e-4)
