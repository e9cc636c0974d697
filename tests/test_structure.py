"""Tests of structure.py: bar / onset ids, the FC-attention predicate and the dense masks."""

from __future__ import annotations

import pytest
import torch

from museformer.structure import (
    AttentionPattern,
    SlotKind,
    attention_masks,
    bar_ids,
    bar_layout,
    complete_bars,
    may_attend,
    onset_ids,
    pattern_picture,
    toy_song,
)
from museformer.vocab import BOS_ID, PAD_ID, Vocab

VOCAB = Vocab.builtin("lmd6remi")
O0, O12, P60, D6, V20, T30, B = (VOCAB.token_to_id(t) for t in ("o-0", "o-12", "p-60", "d-6", "v-20", "t-30", "b-1"))


def rows(text: str) -> torch.Tensor:
    """A bool matrix from lines of 0/1 characters ('|' and spaces are ignored)."""
    lines = [line.split("#")[0].replace("|", "").replace(" ", "") for line in text.strip().splitlines()]
    return torch.tensor([[c == "1" for c in line] for line in lines])


# A small song with fine offsets (1, 2): bars 1-5 complete, bar 6 incomplete, so bars 1-3 are
# coarse for the last bars.
SONG = [BOS_ID, O0, B, O0, P60, B, O0, B, O0, B, O0, B, O0, P60]
#        0      1   2  3   4    5  6   7  8   9  10  11 12  13     position
#        BOS    bar1   bar2        bar3   bar4   bar5   bar6 (no b-1)

# keys: summaries of bars 1..5 | regular tokens 0..13
EXPECTED_REGULAR = rows("""
    00000 | 1 0000000000000   # 0  BOS: only itself
    00000 | 1 1000000000000   # 1  bar 1, causal
    00000 | 1 1100000000000   # 2
    00000 | 1 1110000000000   # 3  bar 2: bar 1 (fine, -1) + own bar
    00000 | 1 1111000000000   # 4
    00000 | 1 1111100000000   # 5
    00000 | 1 1111110000000   # 6  bar 3: bars 1, 2 (fine) + own
    00000 | 1 1111111000000   # 7
    10000 | 1 0011111100000   # 8  bar 4: summary of bar 1 (coarse), bars 2, 3 + own
    10000 | 1 0011111110000   # 9
    11000 | 1 0000011111000   # 10 bar 5: summaries 1, 2; bars 3, 4 + own
    11000 | 1 0000011111100   # 11
    11100 | 1 0000000111110   # 12 bar 6 (incomplete): summaries 1-3; bars 4, 5 + own
    11100 | 1 0000000111111   # 13
""")
EXPECTED_SUMMARY = rows("""
    10000 | 0 1100000000000   # summary of bar 1: itself + all of bar 1
    01000 | 0 0011100000000   # bar 2
    00100 | 0 0000011000000   # bar 3
    00010 | 0 0000000110000   # bar 4
    00001 | 0 0000000001100   # bar 5
""")


def test_bar_and_onset_ids():
    """Bar ids are 1-based with BOS/padding 0 (b-1 belongs to its bar); onset ids follow o-k and reset per bar."""
    ids = torch.tensor([BOS_ID, T30, O0, P60, D6, V20, O12, P60, B, T30, O0, P60, PAD_ID])
    assert bar_ids(ids, VOCAB).tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0]
    assert onset_ids(ids, VOCAB).tolist() == [0, 0, 1, 1, 1, 1, 13, 13, 0, 0, 1, 1, 0]
    assert complete_bars(ids, VOCAB).item() == 1


def test_masks_equal_hand_written_matrices():
    """The dense masks equal hand-written matrices (fine offsets (1, 2), incomplete last bar)."""
    summary_mask, regular_mask = attention_masks(torch.tensor(SONG), AttentionPattern(fine_offsets=(1, 2)))
    assert summary_mask.shape == (1, 5, 5 + 14) and regular_mask.shape == (1, 14, 5 + 14)
    assert torch.equal(regular_mask[0], EXPECTED_REGULAR)
    assert torch.equal(summary_mask[0], EXPECTED_SUMMARY)


def test_batch_masks_are_per_song_with_padding():
    """In a padded batch each song keeps its own masks; padding rows and columns are all False."""
    short = [BOS_ID, O0, B, O0, P60, B, O0]  # 2 complete bars
    batch = torch.full((2, len(SONG)), PAD_ID)
    batch[0] = torch.tensor(SONG)
    batch[1, : len(short)] = torch.tensor(short)
    pattern = AttentionPattern(fine_offsets=(1, 2))
    summary_mask, regular_mask = attention_masks(batch, pattern)
    assert torch.equal(regular_mask[0], EXPECTED_REGULAR) and torch.equal(summary_mask[0], EXPECTED_SUMMARY)
    alone_s, alone_r = attention_masks(torch.tensor(short), pattern)  # S = 2 alone, 5 in the batch
    n = len(short)
    keys = list(range(2)) + [5 + t for t in range(n)]  # this song's summary slots + its tokens
    assert torch.equal(regular_mask[1][:n][:, keys], alone_r[0])
    assert torch.equal(summary_mask[1][:2][:, keys], alone_s[0])
    assert not regular_mask[1][n:].any() and not regular_mask[1][:, 5 + n:].any()  # padding tokens
    assert not summary_mask[1][2:].any() and not regular_mask[1][:, 2:5].any()  # padding summary slots


def test_fine_and_coarse_cover_every_earlier_bar_once():
    """With the paper's offsets a token sees every earlier bar exactly once: by its tokens or by its summary."""
    pattern = AttentionPattern()
    song = toy_song(40, VOCAB, seed=3, incomplete_last=True)
    layout = bar_layout(song, VOCAB, pattern)
    summary_mask, regular_mask = attention_masks(song, pattern)
    S = layout.num_summaries
    assert S == 40
    bars = layout.token_bar[0].tolist()
    for t in range(1, len(song)):
        b = bars[t]
        for earlier in range(1, b):
            reads_summary = bool(regular_mask[0, t, earlier - 1])
            bar_tokens = [S + j for j in range(len(song)) if bars[j] == earlier]
            reads_tokens = regular_mask[0, t, bar_tokens]
            fine = (b - earlier) in pattern.fine_offsets
            assert reads_tokens.all() == fine and reads_tokens.any() == fine
            assert reads_summary == (not fine)
        assert regular_mask[0, t, S]  # BOS
        own = [S + j for j in range(len(song)) if bars[j] == b]
        assert regular_mask[0, t, own].tolist() == [S + j <= S + t for j in range(len(song)) if bars[j] == b]


def test_summary_never_read_by_its_own_or_next_two_bars():
    """A bar's summary is read first by the bar three later (default offsets), never by bars i, i+1, i+2."""
    pattern = AttentionPattern()
    assert pattern.first_coarse_distance == 3
    song = toy_song(12, VOCAB, seed=1)
    layout = bar_layout(song, VOCAB, pattern)
    _, regular_mask = attention_masks(song, pattern)
    bars = layout.token_bar[0]
    for i in range(1, 13):
        readers = bars[regular_mask[0, :, i - 1]]
        assert readers.numel() == 0 or readers.min().item() >= i + 3
        if i + 3 <= 12:
            assert (readers == i + 3).any()


def test_predicate_on_scalars_and_prefix():
    """The predicate works on scalars: BOS reads only itself; a summary reads its bar without causality."""
    p = AttentionPattern()
    R, S_, P = SlotKind.REGULAR, SlotKind.SUMMARY, SlotKind.PREFIX
    assert may_attend(P, 0, 0, P, 0, 0, p)
    assert not may_attend(P, 0, 0, R, 1, 1, p)
    assert may_attend(R, 5, 40, P, 0, 0, p)
    assert may_attend(S_, 2, 10, R, 2, 9, p) and may_attend(S_, 2, 10, R, 2, 10, p)
    assert not may_attend(S_, 2, 10, R, 1, 3, p) and not may_attend(S_, 2, 10, S_, 1, 3, p)
    assert not may_attend(R, 1, 3, R, 1, 4, p)  # causal inside the bar
    assert not may_attend(SlotKind.PAD, 1, 3, R, 1, 1, p) and not may_attend(R, 1, 3, SlotKind.PAD, 1, 1, p)


def test_full_and_fine_only_patterns():
    """'full' is plain causal attention over the tokens; summary_tokens=0 removes summaries and coarse bars."""
    song = toy_song(6, VOCAB, seed=2, incomplete_last=True)
    T = len(song)
    s_full, r_full = attention_masks(song, AttentionPattern.full())
    assert s_full.shape == (1, 0, T)
    assert torch.equal(r_full[0], torch.tril(torch.ones(T, T, dtype=torch.bool)))
    s_fine, r_fine = attention_masks(song, AttentionPattern(summary_tokens=0, fine_offsets=(1,)))
    assert s_fine.shape == (1, 0, T)
    bars = bar_ids(song, VOCAB)
    distance = bars[:, None] - bars[None, :]
    expected = torch.tril(torch.ones(T, T, dtype=torch.bool)) & ((distance <= 1) | (bars[None, :] == 0))
    expected[0] = False
    expected[0, 0] = True
    assert torch.equal(r_fine[0], expected)


def test_pattern_validation_and_dict_round_trip():
    """Bad patterns raise ValueError; to_dict/from_dict round-trips; unknown keys are an error."""
    p = AttentionPattern(fine_offsets=[4, 1, 2])
    assert p.fine_offsets == (1, 2, 4)
    assert AttentionPattern.from_dict(p.to_dict()) == p
    for bad in (dict(fine_offsets=(0,)), dict(fine_offsets=(1, 1)), dict(summary_tokens=2), dict(kind="sparse"),
                dict(kind="full")):
        with pytest.raises(ValueError):
            AttentionPattern(**bad)
    with pytest.raises(ValueError, match="unknown"):
        AttentionPattern.from_dict({"fine_offsets": [1], "coarse": True})


def test_pattern_picture_codes():
    """The picture marks summarisation, coarse summaries, BOS, fine and own-bar cells where the masks allow."""
    pattern = AttentionPattern(fine_offsets=(1, 2))
    code, layout = pattern_picture(torch.tensor(SONG), pattern, VOCAB)
    allowed = torch.cat(attention_masks(torch.tensor(SONG), pattern), dim=1)[0]
    assert code.shape == (19, 19)
    assert torch.equal(torch.from_numpy(code > 0), allowed)
    assert set(code[:5].flatten().tolist()) == {0, 5} and code[5 + 8, 0] == 4 and code[5 + 8, 5] == 3


def test_cli_pattern_writes_png(tmp_path):
    """`museformer pattern --bars N` writes a PNG; a bad option is a one-line error (exit 1)."""
    pytest.importorskip("matplotlib")
    from museformer.cli import main

    out = tmp_path / "pattern.png"
    assert main(["pattern", "--bars", "6", "--fine-offsets", "1", "2", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["pattern", "--bars", "6", "--fine-offsets", "0", "-o", str(out)]) == 1
    assert main(["pattern", "-o", str(out)]) == 1


def test_bar_tracker_equals_bar_and_onset_ids():
    """BarTracker, fed a padded batch chunk by chunk (whole, token by token, uneven), gives exactly
    bar_ids / onset_ids of the whole songs, including onsets carried across chunks."""
    from museformer.structure import BarTracker

    songs = [toy_song(n, VOCAB, seed=n, incomplete_last=bool(n % 2)) for n in (4, 7, 1)]
    songs[1][5] = VOCAB.token_to_id("o-12")  # a second onset inside a bar
    ids = torch.nn.utils.rnn.pad_sequence(songs, batch_first=True, padding_value=PAD_ID)
    want_bars, want_onsets = bar_ids(ids, VOCAB), onset_ids(ids, VOCAB)
    for sizes in ([ids.shape[1]], [1] * ids.shape[1], [2, 5, 1, 9, 3, 100]):
        tracker, got, start = BarTracker(VOCAB, ids.shape[0]), [], 0
        for size in sizes:
            if start >= ids.shape[1]:
                break
            bars, onsets, positions = tracker.advance(ids[:, start : start + size])
            longest = int((ids != PAD_ID).sum(1).argmax())  # padding does not advance a song
            assert positions[longest].tolist() == list(range(start, start + bars.shape[1]))
            got.append((bars, onsets))
            start += size
        assert torch.equal(torch.cat([g[0] for g in got], 1), want_bars)
        assert torch.equal(torch.cat([g[1] for g in got], 1), want_onsets)
    assert tracker.closed.tolist() == complete_bars(ids, VOCAB).tolist()


def test_bar_relation_is_the_rule_everything_uses():
    """bar_relation: distance 0 and the fine offsets are fine, other earlier bars coarse (only with
    summaries); the horizon and first coarse distance follow from it."""
    from museformer.structure import bar_relation

    distance = torch.arange(-2, 40)
    for pattern in (AttentionPattern(), AttentionPattern(fine_offsets=(1, 3)), AttentionPattern(summary_tokens=0)):
        fine, coarse = bar_relation(distance, pattern)
        assert distance[fine].tolist() == list(pattern.fine_distances)
        want_coarse = [d for d in range(1, 40) if d not in pattern.fine_distances] if pattern.has_summaries else []
        assert distance[coarse].tolist() == want_coarse
        assert pattern.horizon == max(pattern.fine_distances)
    assert AttentionPattern().first_coarse_distance == 3 and AttentionPattern.full().horizon is None
