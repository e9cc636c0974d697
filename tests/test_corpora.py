"""Tests of the bundled corpus export (museformer.corpora): music21 scores -> MIDI -> shards."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import symusic

pytest.importorskip("music21")

from museformer.cli import main  # noqa: E402
from museformer.corpora import BASS, LEAD, PIANO, STRINGS, corpus_sources, export_corpus, part_programs  # noqa: E402
from museformer.data import Corpus  # noqa: E402
from museformer.errors import MuseformerError  # noqa: E402
from museformer.tokenizer import Tokenizer  # noqa: E402


def test_part_programs_are_distinct_six_track_families() -> None:
    """Top part is lead, bottom part bass, middle parts strings/piano/guitar; 4 voices all distinct."""
    assert part_programs(4) == [LEAD, STRINGS, PIANO, BASS]
    assert part_programs(2) == [LEAD, BASS]
    assert len(set(part_programs(5))) == 5


def test_bach_sources_are_scores_only() -> None:
    """The bach corpus lists MusicXML/Humdrum scores (no roman-numeral analyses), sorted, as .mid."""
    sources = corpus_sources("bach")
    assert len(sources) > 350
    assert [rel for rel, _ in sources] == sorted(rel for rel, _ in sources)
    assert all(rel.startswith("bach/") and rel.endswith(".mid") for rel, _ in sources)
    assert not any(src.suffix == ".rntxt" for _, src in sources)
    with pytest.raises(MuseformerError, match="unknown corpus"):
        corpus_sources("nope")


def test_bach_export_is_valid_four_voice_midi(tmp_path: Path) -> None:
    """Exported chorales read back as 4 tracks (S, A, T, B programs), pickups padded, and encode."""
    report = export_corpus("bach", tmp_path, limit=3, progress=False)
    assert report.written == 3 and report.failed == ()
    tok = Tokenizer(sort_insts="6tracks")
    for rel, _ in corpus_sources("bach", limit=3):
        score = symusic.Score(tmp_path / rel)
        assert [t.program for t in score.tracks] == [LEAD, STRINGS, PIANO, BASS]
        assert [t.name for t in score.tracks] == ["Soprano", "Alto", "Tenor", "Bass"]
        assert score.time_signatures[0].time == 0 and score.tempos[0].time == 0
        ids = tok.encode_file(tmp_path / rel, as_ids=True)
        assert len(ids) > 100 and ids.dtype == np.int64
    # bwv1.6 starts with a one-beat pickup in 4/4: its first note lands on beat 4 of bar 1
    first = symusic.Score(tmp_path / "bach/bwv1.6.mid")
    assert min(t.notes[0].time for t in first.tracks) == 3 * first.ticks_per_quarter
    again = export_corpus("bach", tmp_path, limit=3, progress=False)
    assert again.written == 0 and again.existing == 3


def test_cli_prepare_bach_corpus(tmp_path: Path, capsys) -> None:
    """`museformer prepare --corpus bach OUT` exports to OUT/midi and prepares loadable shards."""
    out = tmp_path / "bach"
    assert main(["prepare", "--corpus", "bach", str(out), "--limit", "4", "--workers", "1", "--quiet",
                 "--valid-fraction", "0", "--test-fraction", "0"]) == 0
    assert "4 ok" in capsys.readouterr().out
    corpus = Corpus(out, "train")
    assert len(corpus) == 4 and (corpus.lengths > 100).all()
    song = corpus[0]
    np.testing.assert_array_equal(song.ids, corpus.tokenizer.encode_file(out / "midi" / song.name, as_ids=True))


def test_missing_music21_is_a_clear_error(monkeypatch) -> None:
    """Without music21 the corpus export names the package to install."""
    monkeypatch.setitem(sys.modules, "music21", None)
    with pytest.raises(MuseformerError, match="pip install music21"):
        corpus_sources("bach")
