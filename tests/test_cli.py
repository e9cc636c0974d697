"""The command line: help texts that hold, library defaults, flags mapped from library errors,
output paths checked before any work, and the old spellings kept with a note."""

from __future__ import annotations

import re

import pytest
import symusic

from museformer.cli import build_parser, build_train_config, main, sample_config_from_args


def _help(command: str) -> str:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return " ".join(sub.choices[command].format_help().split())


def test_train_help_suggests_only_real_option_keys():
    """Every KEY=VALUE example in 'train --help' is a valid training option (model.n_layers, not num_layers)."""
    examples = re.findall(r"\b((?:model\.)?[a-z_]+=[\w.\-]+)", _help("train"))
    assert "model.n_layers=2" in examples and len(examples) >= 4
    cfg = build_train_config("data", "out", preset="tiny", overrides=examples)
    assert cfg.model.n_layers == 2


def _score_with_empty_bars() -> symusic.Score:
    """4/4, 480 ticks per quarter: bars 0 and 1 empty, notes in bars 2 and 3, a tempo change in bar 6."""
    score = symusic.Score(480)
    score.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    score.tempos.append(symusic.Tempo(0, 120.0))
    score.tempos.append(symusic.Tempo(6 * 1920, 90.0))
    track = symusic.Track("piano", 0, False)
    for bar in (2, 3):
        track.notes.append(symusic.Note(bar * 1920, 480, 60, 80))
    score.tracks.append(track)
    return score


def test_remove_empty_bars_does_what_its_help_says():
    """--remove-empty-bars drops the empty bars before the first note; a song ends with the bar of its
    last note either way (the help no longer claims it also drops bars after the last note)."""
    from museformer.tokenizer import Tokenizer

    score = _score_with_empty_bars()
    plain = Tokenizer().encode(score)
    trimmed = Tokenizer(remove_empty_bars=True).encode(score)
    assert plain.count("b-1") == 4 and trimmed.count("b-1") == 2
    assert plain[-1] == trimmed[-1] == "b-1" and "t-30" not in plain  # bar 6's tempo lies after the song
    text = _help("encode")
    assert "drop the empty bars before the first note" in text and "after the last note" not in text


def test_prepare_limit_must_be_positive(tmp_path, capsys):
    """prepare --corpus --limit -1 (which dropped the last score) is one error naming --limit; nothing is written."""
    out = tmp_path / "out"
    assert main(["prepare", "--corpus", "bach", str(out), "--limit", "-1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--limit: must be a number of scores >= 1, got -1" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("command", [
    ["train", "{missing}", "{file}"],
    ["pattern", "--bars", "2", "-o", "{dir}"],
    ["pattern", "--bars", "2", "-o", "{noext}"],
    ["pattern", "--bars", "2", "-o", "{xyz}"],
    ["evaluate", "{missing}", "{missing}", "-o", "{dir}"],
    ["evaluate-structure", "{missing}", "--reference", "{missing}", "-o", "{dir}"],
    ["analyze", "{missing}", "-o", "{file}"],
    ["encode", "{missing}", "-o", "{dir}"],
])
def test_output_paths_of_the_wrong_kind_fail_before_any_work(tmp_path, capsys, command):
    """A folder where a file goes (or a file where a folder goes, or a PNG path without .png) is one
    line naming that path, before the inputs are even read (they do not exist here); nothing is written."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("keep me")
    paths = {"missing": tmp_path / "missing", "file": tmp_path / "file", "dir": tmp_path / "dir",
             "noext": tmp_path / "picture", "xyz": tmp_path / "p.xyz"}
    argv = [part.format(**paths) for part in command]
    bad = next(str(paths[k]) for k in ("file", "dir", "noext", "xyz") if f"{{{k}}}" in command)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert bad in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(paths["missing"]) not in err  # the output was checked first
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "file").read_text() == "keep me" and not any((tmp_path / "dir").iterdir())


def test_library_parameter_errors_name_the_users_flag(tmp_path, capsys):
    """A ParameterError of the library (evaluate_perplexity's max_lens) reaches the user as --max-len."""
    assert main(["evaluate", str(tmp_path), str(tmp_path), "--max-len", "1"]) == 1
    assert "error: --max-len: values must be >= 2, got [1]" in capsys.readouterr().err


def test_flag_defaults_are_the_library_defaults():
    """generate without flags samples with SampleConfig(); evaluate's defaults are evaluate_perplexity's."""
    import inspect

    from museformer.evaluate import evaluate_perplexity
    from museformer.generate import SampleConfig

    parser = build_parser()
    assert sample_config_from_args(parser.parse_args(["generate"])) == SampleConfig()
    changes = sample_config_from_args(parser.parse_args(["generate", "--tempo-changes", "--bars", "4"]))
    assert changes.tempo_changes and changes.max_bars == 4
    args = parser.parse_args(["evaluate", "ck", "data"])
    defaults = inspect.signature(evaluate_perplexity).parameters
    assert (args.split, tuple(args.max_len), args.batch_tokens) == (
        defaults["split"].default, tuple(defaults["max_lens"].default), defaults["batch_tokens"].default)
    workers = {parser.parse_args(argv).workers for argv in (["prepare", "o"], ["analyze", "i"],
                                                             ["evaluate-structure", "g", "--reference", "r"])}
    assert len(workers) == 1  # one --workers default everywhere


def test_old_spellings_still_work_with_a_deprecation_note(tmp_path, capsys):
    """--preset (now --model-preset / --tokenizer-preset) and 'evaluate --structure' (now
    'evaluate-structure') parse as before and print a note saying the new spelling."""
    parser = build_parser()
    args = parser.parse_args(["train", "d", "o", "--preset", "tiny"])
    assert args.model_preset == "tiny" and "use --model-preset" in args.deprecations[0]
    args = parser.parse_args(["encode", "x.mid", "--preset", "lmd6"])
    assert args.tokenizer_preset == "lmd6" and "use --tokenizer-preset" in args.deprecations[0]
    assert parser.parse_args(["encode", "x.mid"]).tokenizer_preset == "general"  # = Tokenizer()
    assert main(["evaluate", "--structure", str(tmp_path / "none"), "--reference", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "use 'evaluate-structure GEN --reference DIR'" in err
