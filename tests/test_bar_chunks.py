"""The bar-chunk backend equals the dense reference (outputs and gradients) and drops out exactly."""

from __future__ import annotations

import pytest
import torch

from museformer.attention import DenseBackend, FCAttention
from museformer.bar_chunks import BarChunkBackend, aggregate, build_chunks
from museformer.structure import AttentionPattern, SlotKind, bar_layout
from museformer.vocab import BOS_ID, PAD_ID, Vocab

VOCAB = Vocab.builtin("lmd6remi")
HEADS, DIM = 2, 8


def song(bar_lengths, *, bos=True, open_last=0) -> list[int]:
    """BOS, then bars of the given lengths (``b-1`` last), then an open bar of ``open_last`` tokens."""
    pitch = VOCAB.token_to_id("p-60")
    ids = [BOS_ID] if bos else []
    for n in bar_lengths:
        ids += [pitch] * (n - 1) + [VOCAB.bar_id]
    return ids + [pitch] * open_last


def batch(*songs) -> torch.Tensor:
    """Right-padded ``(B, T)`` batch."""
    length = max(len(s) for s in songs)
    return torch.tensor([s + [PAD_ID] * (length - len(s)) for s in songs])


def random_song(gen: torch.Generator, bars: int) -> list[int]:
    lengths = [int(x) for x in torch.randint(1, 12, (bars,), generator=gen)]
    lengths[int(torch.randint(0, bars, (1,), generator=gen))] = 1  # a 1-token bar (only its b-1)
    return song(lengths, bos=bool(torch.rand(1, generator=gen) < 0.8),
                open_last=int(torch.randint(0, 4, (1,), generator=gen)))


PATTERNS = {
    "paper": AttentionPattern(),
    "near": AttentionPattern(fine_offsets=(1, 2)),
    "fine-only": AttentionPattern(fine_offsets=(1, 3), summary_tokens=0),
    "no-offsets": AttentionPattern(fine_offsets=()),
    "full": AttentionPattern.full(),
}
LAYOUTS = {
    "mixed": lambda g: batch(random_song(g, 9), random_song(g, 3), random_song(g, 14)),
    "long bars": lambda g: batch(song([300, 5, 270], open_last=2), song([2, 1, 1])),  # bars past the ladder
    "one-token bars": lambda g: batch(song([1] * 20), song([1, 1], bos=False)),
    "open only": lambda g: batch(song([], open_last=7), song([3], open_last=0)),  # no complete bar in song 1
    "bos only": lambda g: batch([BOS_ID], song([2, 2])),
}


def both_steps(backend, ids, pattern, inputs, dropout_p=0.0):
    """Summarisation and aggregation outputs of one backend on the given tensors."""
    layout = bar_layout(ids, VOCAB, pattern)
    state = backend.prepare(layout, pattern)
    q, k, v, q_s, k_s, v_s, k2, v2 = inputs
    h = backend.summarise(q_s, k_s, v_s, k, v, state, dropout_p)
    return h, backend.aggregate(q, k2, v2, k, v, state, dropout_p)


def random_inputs(ids, pattern, gen, dtype=torch.float32):
    batch_size, length = ids.shape
    summaries = bar_layout(ids, VOCAB, pattern).num_summaries

    def r(n):
        return (torch.randn(batch_size, HEADS, n, DIM, generator=gen) * 2).to(dtype).requires_grad_()

    return [r(length), r(length), r(length), r(summaries), r(summaries), r(summaries), r(summaries), r(summaries)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pattern_name", list(PATTERNS))
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_outputs_and_gradients_equal_dense(pattern_name, layout_name, dtype):
    """Both steps' outputs and all input gradients equal the dense-mask reference.

    float32: within 1e-5 of the largest entry (the reference itself is that far from float64);
    float64: within 1e-10 (the same arithmetic up to rounding order).
    """
    gen = torch.Generator().manual_seed(sum(map(ord, pattern_name + layout_name)))
    pattern, ids = PATTERNS[pattern_name], LAYOUTS[layout_name](gen)
    inputs = random_inputs(ids, pattern, gen, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10

    def close(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=0, atol=tol * max([1.0, *expected.abs().flatten().tolist()]))
    results = []
    for backend in (DenseBackend(), BarChunkBackend()):
        for x in inputs:
            x.grad = None
        h, out = both_steps(backend, ids, pattern, inputs)
        loss = (out * torch.linspace(1, -1, out.numel(), dtype=dtype).view_as(out)).sum()
        if h.requires_grad:
            loss = loss + (h * torch.linspace(-1, 1, h.numel(), dtype=dtype).view_as(h)).sum()
        loss.backward()
        results.append((h.detach(), out.detach(), [x.grad for x in inputs]))
    (h_d, out_d, grads_d), (h_c, out_c, grads_c) = results
    close(out_c, out_d)
    close(h_c, h_d)
    for g_c, g_d in zip(grads_c, grads_d):
        if g_d is None or g_c is None:  # inputs a pattern never reads (no summaries)
            assert g_c is None or not g_c.any()
            assert g_d is None or not g_d.any()
            continue
        close(g_c, g_d)


def test_bf16_within_bf16_tolerance():
    """In bfloat16 the aggregation stays within bfloat16 rounding of the float32 reference."""
    gen = torch.Generator().manual_seed(3)
    pattern, ids = PATTERNS["paper"], LAYOUTS["mixed"](gen)
    low = [(x.detach() / 4).bfloat16() for x in random_inputs(ids, pattern, gen)]  # scores of a few units
    _, reference = both_steps(DenseBackend(), ids, pattern, [x.float() for x in low])  # same rounded inputs
    _, out = both_steps(BarChunkBackend(), ids, pattern, low)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=0.02, rtol=0.02)


def test_bf16_backward_within_bf16_tolerance():
    """In bfloat16 the recomputing backward's gradients stay within bfloat16 rounding of float32 ones."""
    gen = torch.Generator().manual_seed(6)
    pattern, ids = PATTERNS["paper"], LAYOUTS["mixed"](gen)
    low = [(x.detach() / 4).bfloat16() for x in random_inputs(ids, pattern, gen)]
    state = build_chunks(bar_layout(ids, VOCAB, pattern), pattern)
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, _, _, _, k2, v2 = (x.to(dtype).requires_grad_() for x in low)
        out = aggregate(q, k2, v2, k, v, state, 0.2, seed=3)
        (out.float() * torch.linspace(1, -1, out.numel()).view_as(out)).sum().backward()
        grads.append([x.grad.float() for x in (q, k, v, k2, v2)])
    for g_low, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_low, g_ref, atol=0.03 * float(g_ref.abs().max()), rtol=0.03)


def test_no_tensor_grows_with_length_squared():
    """The per-batch state holds O(T + chunks x keys per chunk) index elements: no mask, never T x T."""
    bars = [60] * 40  # 2,401 tokens, 40 bars
    ids = batch(song(bars))
    state = build_chunks(bar_layout(ids, VOCAB, AttentionPattern()), AttentionPattern())
    length = ids.shape[1]
    keys_read = 60 * (len(AttentionPattern().fine_offsets) + 1) + 1 + 40  # 8 fine bars + own bar + BOS + coarse
    elements = sum(x.numel() for g in state.groups
                   for x in (g.query_rows, g.key_rows, g.query_count, g.key_count, g.own_start))
    assert elements <= 1.5 * (length + 41 * keys_read) < length * length // 50


def saved_elements(ids, pattern, backend) -> int:
    """Elements autograd keeps for the backward of one aggregation (each storage counted once)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, _, _, _, k2, v2 = random_inputs(ids, pattern, gen)
    state = backend.prepare(bar_layout(ids, VOCAB, pattern), pattern)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backend.aggregate(q, k2, v2, k, v, state, 0.1)
    return sum(seen.values())


def test_saved_for_backward_grows_linearly_in_length():
    """Doubling the song (same bar length) doubles what the recomputing backward keeps; the plain-ops
    path, whose scores include every coarse summary, keeps more and grows faster."""
    pattern = AttentionPattern()
    short, long = batch(song([4] * 100)), batch(song([4] * 200))  # coarse summaries dominate the keys
    recompute = [saved_elements(ids, pattern, BarChunkBackend()) for ids in (short, long)]
    plain = [saved_elements(ids, pattern, BarChunkBackend(recompute=False)) for ids in (short, long)]
    length_ratio = long.shape[1] / short.shape[1]
    assert abs(recompute[1] / recompute[0] - length_ratio) < 0.05 * length_ratio, recompute
    assert recompute[1] <= long.shape[1] * HEADS * 6 * DIM  # q, k, v, out + k2, v2
    assert plain[1] / plain[0] > 1.3 * length_ratio and plain[1] > 10 * recompute[1], plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_recomputed_backward_with_dropout_equals_plain_ops(layout_name, dtype):
    """With dropout, the recomputing backward redraws the forward's masks: output and all gradients
    equal those of the plain-ops path with the same seed (float32 1e-5 of the largest entry, float64 1e-10)."""
    gen = torch.Generator().manual_seed(sum(map(ord, layout_name)))
    pattern, ids = PATTERNS["paper"], LAYOUTS[layout_name](gen)
    q, k, v, _, _, _, k2, v2 = inputs = random_inputs(ids, pattern, gen, dtype)
    state = build_chunks(bar_layout(ids, VOCAB, pattern), pattern)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    results = []
    for recompute in (True, False):
        for x in inputs:
            x.grad = None
        out = aggregate(q, k2, v2, k, v, state, 0.3, seed=1234, recompute=recompute)
        (out * torch.linspace(1, -1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        results.append([out.detach()] + [x.grad for x in (q, k, v, k2, v2)])
    assert not torch.allclose(results[0][0], aggregate(q, k2, v2, k, v, state))  # the masks did drop weights
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=tol * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_recomputed_backward_passes_gradcheck(dropout_p):
    """torch.autograd.gradcheck (float64, fast mode) of the recomputing aggregation, with and without dropout."""
    gen = torch.Generator().manual_seed(2)
    pattern, ids = PATTERNS["near"], batch(song([3, 1, 2, 2], open_last=2), song([2, 1], bos=False))
    q, k, v, _, _, _, k2, v2 = random_inputs(ids, pattern, gen, torch.float64)
    state = build_chunks(bar_layout(ids, VOCAB, pattern), pattern)
    assert torch.autograd.gradcheck(lambda *x: aggregate(*x, state, dropout_p, seed=7), (q, k2, v2, k, v),
                                    fast_mode=True)


def test_dropout_seed_comes_from_the_default_generator():
    """torch.manual_seed fixes the aggregation's dropout masks; another draw gives other masks."""
    gen = torch.Generator().manual_seed(4)
    pattern, ids = PATTERNS["paper"], LAYOUTS["mixed"](gen)
    q, k, v, _, _, _, k2, v2 = random_inputs(ids, pattern, gen)
    state = build_chunks(bar_layout(ids, VOCAB, pattern), pattern)
    torch.manual_seed(9)
    first, second = aggregate(q, k2, v2, k, v, state, 0.2), aggregate(q, k2, v2, k, v, state, 0.2)
    torch.manual_seed(9)
    again = aggregate(q, k2, v2, k, v, state, 0.2)
    assert torch.equal(first, again) and not torch.equal(first, second)


def one_hot_values(ids, pattern, gen):
    """Inputs whose values are one-hot per key, so an output row *is* that query's weight row."""
    inputs = [x.detach() for x in random_inputs(ids, pattern, gen)]
    length, summaries = ids.shape[1], inputs[3].shape[2]
    keys = summaries + length
    eye = torch.eye(keys).expand(ids.shape[0], HEADS, keys, keys)
    inputs[6] = torch.randn(ids.shape[0], HEADS, summaries, keys, generator=gen)  # k2 padded to width `keys`
    for i in (0, 1, 3, 4):
        inputs[i] = torch.nn.functional.pad(inputs[i], (0, keys - DIM))
    inputs[2], inputs[7] = eye[:, :, summaries:], eye[:, :, :summaries]  # v of tokens, v2 of summaries
    inputs[5] = torch.zeros(ids.shape[0], HEADS, summaries, keys)
    return inputs


def test_dropout_keeps_weights_exactly_or_drops_them():
    """With dropout every weight is 0 or exactly weight / (1 - p); about 1 - p of the read ones stay."""
    gen = torch.Generator().manual_seed(5)
    pattern, ids = PATTERNS["paper"], LAYOUTS["mixed"](gen)
    inputs = one_hot_values(ids, pattern, gen)
    # scaled so that the no-dropout weights are the same (the scale is 1 / sqrt(width))
    _, weights = both_steps(BarChunkBackend(), ids, pattern, inputs)
    torch.manual_seed(0)
    p = 0.25
    _, dropped = both_steps(BarChunkBackend(), ids, pattern, inputs, dropout_p=p)
    read = weights > 0
    kept = dropped > 0
    assert not (kept & ~read).any()
    torch.testing.assert_close(dropped[kept], weights[kept] / (1 - p), atol=1e-6, rtol=1e-5)
    fraction = kept.sum() / read.sum()
    assert abs(float(fraction) - (1 - p)) < 0.03, float(fraction)


def test_dropout_expectation_equals_no_dropout():
    """The mean of many dropout draws equals the no-dropout output (both steps), and gradients flow."""
    gen = torch.Generator().manual_seed(7)
    pattern, ids = PATTERNS["near"], LAYOUTS["mixed"](gen)
    inputs = random_inputs(ids, pattern, gen)
    backend = BarChunkBackend()
    state = backend.prepare(bar_layout(ids, VOCAB, pattern), pattern)
    q, k, v, q_s, k_s, v_s, k2, v2 = inputs

    def run(p):
        return backend.summarise(q_s, k_s, v_s, k, v, state, p), backend.aggregate(q, k2, v2, k, v, state, p)

    h_ref, out_ref = (x.detach() for x in run(0.0))
    torch.manual_seed(1)
    draws = 300
    h_sum, out_sum = torch.zeros_like(h_ref), torch.zeros_like(out_ref)
    with torch.no_grad():
        for _ in range(draws):
            h, out = run(0.1)
            h_sum += h
            out_sum += out
    h, out = run(0.1)
    spread = out_ref.abs().max() * 0.05  # a missing 1 / (1 - p) rescale would be off by 0.1
    assert (out_sum / draws - out_ref).abs().max() < spread
    assert (h_sum / draws - h_ref).abs().max() < spread
    (h.sum() + out.sum()).backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in inputs)


def test_layer_with_chunk_backend_equals_dense_layer():
    """A whole FCAttention layer (projections, both steps, key2/value2) gives the dense layer's output."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(11)
    ids = LAYOUTS["mixed"](gen)
    pattern = AttentionPattern()
    layout = bar_layout(ids, VOCAB, pattern)
    x = torch.randn(*ids.shape, 16)
    s = torch.randn(ids.shape[0], layout.num_summaries, 16)
    dense = FCAttention(16, 2, 0.0, True, DenseBackend())
    chunks = FCAttention(16, 2, 0.0, True, BarChunkBackend())
    chunks.load_state_dict(dense.state_dict())
    out_d = dense(x, s, dense.backend.prepare(layout, pattern))
    out_c = chunks(x, s, chunks.backend.prepare(layout, pattern))
    real = (layout.token_kind != SlotKind.PAD)[..., None]
    torch.testing.assert_close(out_c[0] * real, out_d[0] * real, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_c[1], out_d[1], atol=1e-5, rtol=1e-5)
