"""The token vocabularies: ids, token text and token kinds.

This module owns the mapping between token text (``"p-60"``) and integer ids. The ids are exactly
those of the official Museformer / MidiProcessor dictionaries (fairseq format, ``symbol count`` per
line), with fairseq's four special symbols first: ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2,
``<unk>`` = 3. ``</s>`` (id 2) serves as both BOS and EOS, as in the official code.

Two vocabularies ship with the package:

- ``"lmd6remi"``: the LMD 6-track vocabulary the paper's model uses (556 symbols, 560 ids);
- ``"general"``: the general-use REMIGEN vocabulary (1,020 symbols, 1,024 ids).

It knows nothing about MIDI; the tokenizer and the model both build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from importlib import resources
from pathlib import Path

import numpy as np

PAD_ID = 1  # "<pad>"
EOS_ID = 2  # "</s>"
UNK_ID = 3  # "<unk>"
# As in fairseq language modelling (and the official Museformer), "</s>" is also the
# beginning-of-song token: source = [</s>] + tokens, target = tokens + [</s>]. "<s>" (id 0) is
# reserved by the dictionary format and never produced.
BOS_ID = EOS_ID
SPECIAL_SYMBOLS = ("<s>", "<pad>", "</s>", "<unk>")

BUILTIN_VOCABS = {"lmd6remi": "lmd6remi_dict.txt", "general": "general_use_dict.txt"}


class TokenKind(IntEnum):
    """What a token means musically. Stored per id in ``Vocab.kinds`` (int8)."""

    SPECIAL = 0  # <s> <pad> </s> <unk>
    BAR = 1  # b-*    end of bar
    ONSET = 2  # o-*    position inside the bar (12 per quarter note)
    TEMPO = 3  # t-*
    TIME_SIG = 4  # s-*
    INSTRUMENT = 5  # i-*  program 0..127, 128 = drums
    PITCH = 6  # p-*    0..127, drums 128 + drum pitch
    DURATION = 7  # d-*
    VELOCITY = 8  # v-*
    OTHER = 9  # symbols the official dicts reserve but no encoder here produces (<c>, u-*, e-*)


PREFIX_KINDS = {
    "b": TokenKind.BAR,
    "o": TokenKind.ONSET,
    "t": TokenKind.TEMPO,
    "s": TokenKind.TIME_SIG,
    "i": TokenKind.INSTRUMENT,
    "p": TokenKind.PITCH,
    "d": TokenKind.DURATION,
    "v": TokenKind.VELOCITY,
}


def parse_token(token: str) -> tuple[TokenKind, int]:
    """Split a token text into its kind and value: ``"p-60"`` -> ``(PITCH, 60)``.

    Special and unknown-shaped symbols give ``(SPECIAL, -1)`` or ``(OTHER, -1)``.
    """
    if token in SPECIAL_SYMBOLS:
        return TokenKind.SPECIAL, -1
    prefix, sep, value = token.partition("-")
    kind = PREFIX_KINDS.get(prefix)
    if kind is None or not sep or not value.isdigit():
        return TokenKind.OTHER, -1
    return kind, int(value)


@dataclass(frozen=True)
class Vocab:
    """An immutable vocabulary: ``symbols[i]`` is the text of id ``i``.

    Attributes:
        name: ``"lmd6remi"``, ``"general"`` or the stem of the dict file it was read from.
        symbols: token text per id, specials first.
        kinds: ``TokenKind`` per id, shape ``(len(self),)``, int8.
        values: the number after the dash per id (``p-60`` -> 60), -1 for specials, int32.
    """

    name: str
    symbols: tuple[str, ...]
    kinds: np.ndarray = field(init=False, repr=False, compare=False)
    values: np.ndarray = field(init=False, repr=False, compare=False)
    _index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if tuple(self.symbols[:4]) != SPECIAL_SYMBOLS:
            raise ValueError(f"vocabulary {self.name!r} must start with {SPECIAL_SYMBOLS}")
        if len(set(self.symbols)) != len(self.symbols):
            raise ValueError(f"vocabulary {self.name!r} has duplicate symbols")
        parsed = [parse_token(s) for s in self.symbols]
        kinds = np.array([k for k, _ in parsed], dtype=np.int8)
        values = np.array([v for _, v in parsed], dtype=np.int32)
        kinds.setflags(write=False)
        values.setflags(write=False)
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "_index", {s: i for i, s in enumerate(self.symbols)})

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict_file(cls, path: str | Path, name: str | None = None) -> Vocab:
        """Read a fairseq dict file (``symbol count`` per line) and prepend the four specials."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ValueError(f"cannot read vocabulary file {path}: {e.strerror}") from None
        symbols = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'symbol count', got {line!r}")
            symbols.append(parts[0])
        return cls(name or path.stem.removesuffix("_dict"), SPECIAL_SYMBOLS + tuple(symbols))

    @classmethod
    def builtin(cls, name: str) -> Vocab:
        """One of the official vocabularies shipped with the package: ``lmd6remi`` or ``general``."""
        if name not in BUILTIN_VOCABS:
            raise ValueError(f"unknown vocabulary {name!r}; choose from {sorted(BUILTIN_VOCABS)}")
        ref = resources.files("museformer") / "vocabs" / BUILTIN_VOCABS[name]
        with resources.as_file(ref) as path:
            return cls.from_dict_file(path, name=name)

    # -- lookups --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, token: str) -> bool:
        return token in self._index

    def token_to_id(self, token: str) -> int:
        """The id of a token text; ``UNK_ID`` when the vocabulary lacks it."""
        return self._index.get(token, UNK_ID)

    def id_to_token(self, token_id: int) -> str:
        """The text of an id; raises ``IndexError`` for ids outside the vocabulary."""
        if not 0 <= token_id < len(self.symbols):
            raise IndexError(f"token id {token_id} outside vocabulary {self.name!r} (size {len(self)})")
        return self.symbols[token_id]

    def encode(self, tokens: list[str] | tuple[str, ...]) -> np.ndarray:
        """Token texts -> ids (int64 array); unknown tokens become ``UNK_ID``."""
        index = self._index
        return np.fromiter((index.get(t, UNK_ID) for t in tokens), dtype=np.int64, count=len(tokens))

    def decode(self, ids) -> list[str]:
        """Ids -> token texts; ids outside the vocabulary become ``"<unk>"``."""
        n = len(self.symbols)
        return [self.symbols[i] if 0 <= i < n else "<unk>" for i in (int(x) for x in ids)]

    def kind(self, token_id: int) -> TokenKind:
        """The ``TokenKind`` of one id."""
        return TokenKind(int(self.kinds[token_id]))

    def ids_of_kind(self, kind: TokenKind) -> np.ndarray:
        """All ids of one kind, in id order."""
        return np.flatnonzero(self.kinds == kind)

    def id_of(self, kind: TokenKind, value: int) -> int:
        """The id of ``(kind, value)``, e.g. ``(PITCH, 60)`` -> id of ``"p-60"``; UNK if absent."""
        prefix = next(p for p, k in PREFIX_KINDS.items() if k == kind)
        return self.token_to_id(f"{prefix}-{value}")

    @property
    def bar_id(self) -> int:
        """The id of ``b-1``, the only bar token the encoders produce."""
        return self.token_to_id("b-1")
