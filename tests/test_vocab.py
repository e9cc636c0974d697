"""The vocabularies: ids equal the official dict files, kinds and values per id."""

from pathlib import Path

import numpy as np
import pytest

from museformer.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, TokenKind, Vocab, parse_token

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
PACKAGED = Path(__file__).resolve().parents[1] / "src" / "museformer" / "vocabs"


@pytest.mark.parametrize("name,size", [("lmd6remi", 560), ("general", 1024)])
def test_builtin_sizes(name, size):
    """The LMD vocabulary has 560 ids and the general one 1,024, specials included."""
    assert len(Vocab.builtin(name)) == size


@pytest.mark.parametrize("name,file", [("lmd6remi", "lmd6remi_dict.txt"), ("general", "general_use_dict.txt")])
def test_ids_follow_official_dict_order(name, file):
    """Id i+4 is the i-th symbol of the official dict file; the four fairseq specials come first."""
    ref = REFERENCE / file if (REFERENCE / file).exists() else PACKAGED / file
    symbols = [line.split()[0] for line in ref.read_text().splitlines() if line.strip()]
    vocab = Vocab.builtin(name)
    assert vocab.symbols[:4] == ("<s>", "<pad>", "</s>", "<unk>")
    assert list(vocab.symbols[4:]) == symbols
    for i, s in enumerate(symbols):
        assert vocab.token_to_id(s) == i + 4


def test_special_ids():
    """fairseq specials: <s>=0, <pad>=1, </s>=2 (BOS and EOS), <unk>=3."""
    assert (PAD_ID, EOS_ID, UNK_ID, BOS_ID) == (1, 2, 3, 2)


def test_kinds_and_values():
    """Each id knows its kind and numeric value."""
    v = Vocab.builtin("lmd6remi")
    cases = {
        "b-1": (TokenKind.BAR, 1),
        "o-47": (TokenKind.ONSET, 47),
        "t-38": (TokenKind.TEMPO, 38),
        "i-128": (TokenKind.INSTRUMENT, 128),
        "p-60": (TokenKind.PITCH, 60),
        "d-95": (TokenKind.DURATION, 95),
        "v-31": (TokenKind.VELOCITY, 31),
        "<pad>": (TokenKind.SPECIAL, -1),
        "<c>": (TokenKind.OTHER, -1),
    }
    for tok, (kind, value) in cases.items():
        i = v.token_to_id(tok)
        assert v.kind(i) == kind and v.values[i] == value, tok
    g = Vocab.builtin("general")
    assert g.kind(g.token_to_id("s-253")) == TokenKind.TIME_SIG
    assert len(v.ids_of_kind(TokenKind.INSTRUMENT)) == 6
    assert len(g.ids_of_kind(TokenKind.INSTRUMENT)) == 129
    assert v.id_of(TokenKind.PITCH, 60) == v.token_to_id("p-60")


def test_encode_decode_unknown():
    """Unknown text maps to <unk>; out-of-range ids decode to <unk>; known text round-trips."""
    v = Vocab.builtin("lmd6remi")
    ids = v.encode(["p-60", "i-7", "nonsense"])
    assert ids.tolist() == [v.token_to_id("p-60"), UNK_ID, UNK_ID]
    assert v.decode([v.token_to_id("d-3"), 10_000, -1]) == ["d-3", "<unk>", "<unk>"]
    assert parse_token("x-1") == (TokenKind.OTHER, -1)
    with pytest.raises(IndexError):
        v.id_to_token(560)


def test_bad_dict_file(tmp_path):
    """A malformed dict file gives a clear error naming the file and line."""
    bad = tmp_path / "bad.txt"
    bad.write_text("p-1 1\np-2\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        Vocab.from_dict_file(bad)
    assert isinstance(Vocab.builtin("lmd6remi").kinds, np.ndarray)
