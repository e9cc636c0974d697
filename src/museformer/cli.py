"""The ``museformer`` command: argument parsing only; every subcommand calls a library function.

Each subcommand is one ``add_<name>(subparsers)`` function that declares its arguments and sets
``handler`` to a small function taking the parsed ``args``. Options that several commands share are
declared once (``add_tokenizer_options``, ``add_workers``, ``add_quiet``, ``add_device``,
``add_output``) and mean the same everywhere; defaults are read from the library (``_default``),
never re-typed. Errors a user can cause arrive as ``MuseformerError`` and are printed on one line
(exit status 1), never as a traceback; a ``ParameterError`` names a library parameter, which the
command's ``flags`` map turns into the option the user typed. Old spellings (``--preset``,
``evaluate --structure``) still work and print a deprecation note.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

from museformer import __version__
from museformer.errors import MuseformerError, ParameterError


# ---------------------------------------------------------------------------------------------
# shared options
# ---------------------------------------------------------------------------------------------
def _default(func, parameter: str):
    """The library's default of ``func``'s ``parameter`` (so the CLI never re-types it)."""
    return inspect.signature(func).parameters[parameter].default


class _Deprecated(argparse.Action):
    """An old spelling of an option: stores into the new option's dest and leaves a note."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        _note(namespace, f"{option_string} is deprecated; use {self.new}")


def _note(namespace, text: str) -> None:
    notes = getattr(namespace, "deprecations", None) or []
    setattr(namespace, "deprecations", notes + [text])


def _tokenizer_presets() -> list[str]:
    from museformer.tokenizer import PRESETS

    return sorted(PRESETS)


def _plain_tokenizer() -> str:
    """The preset that equals ``Tokenizer()`` (what encode and prepare use without a preset)."""
    from museformer.tokenizer import PRESETS, TokenizerConfig

    return next(name for name, config in PRESETS.items() if config == TokenizerConfig())


def add_tokenizer_options(p: argparse.ArgumentParser, default: str, flags: bool = True) -> None:
    """``--tokenizer-preset`` (old spelling ``--preset``) and, with ``flags``, the encoding options
    that change single fields of it (unset flags keep the preset's value)."""
    g = p.add_argument_group("tokenizer options")
    g.add_argument("--tokenizer-preset", default=default, choices=_tokenizer_presets(),
                   help=f"tokenizer preset: lmd6 = the paper's LMD setting, general = REMIGEN2 with the "
                   f"general vocabulary (default: {default})")
    g.add_argument("--preset", dest="tokenizer_preset", action=_Deprecated, new="--tokenizer-preset",
                   choices=_tokenizer_presets())
    if not flags:
        return
    g.add_argument("--encoding", default=None, choices=["remigen2", "remigen"], help="token layout")
    g.add_argument("--vocab", default=None, choices=["general", "lmd6remi"], help="vocabulary")
    g.add_argument("--normalize-pitch", action="store_true", default=None, help="transpose to C major / A minor")
    g.add_argument("--remove-empty-bars", action="store_true", default=None,
                   help="drop the empty bars before the first note (a song always ends with the bar of its "
                   "last note)")
    g.add_argument("--ignore-ts", action="store_true", default=None, help="do not emit time signatures")
    g.add_argument("--sort-insts", default=None, choices=["id", "6tracks"], help="instrument order in an onset")


_ENCODING_FLAGS = ("encoding", "vocab", "normalize_pitch", "remove_empty_bars", "ignore_ts", "sort_insts")


def tokenizer_from_args(args: argparse.Namespace):
    """A ``Tokenizer``: the ``--tokenizer-preset``, with the encoding flags given on top."""
    import dataclasses

    from museformer.tokenizer import Tokenizer

    config = Tokenizer.preset(args.tokenizer_preset).config
    given = {name: getattr(args, name) for name in _ENCODING_FLAGS if getattr(args, name, None) is not None}
    return Tokenizer(dataclasses.replace(config, **given))


def add_workers(p: argparse.ArgumentParser) -> None:
    from museformer.data import default_workers

    p.add_argument("--workers", type=int, default=default_workers(), metavar="N",
                   help=f"worker processes (default: the CPU cores, at most 8: {default_workers()} here)")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_device(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument("--device", default=default, metavar="DEV",
                   help="auto (CUDA when available), cpu, cuda or cuda:N" + (f" (default: {default})" if default else
                                                                           " (default: the run's option, auto)"))


def add_output(p: argparse.ArgumentParser, kind: str, what: str, default: str | None = None,
               required: bool = False) -> None:
    """``-o/--output``: the file (``kind="file"``) or folder (``kind="dir"``) the command writes."""
    metavar = "FILE" if kind == "file" else "DIR"
    tail = f" (default: {default})" if default else ""
    p.add_argument("-o", "--output", default=default, required=required, metavar=metavar, help=what + tail)
    p.set_defaults(output_kind=kind)


def check_output(path: str | None, kind: str, suffixes: tuple[str, ...] = ()) -> None:
    """Fail before any work when ``-o`` is of the wrong kind (``files.check_output_path``) or suffix."""
    from museformer.files import check_output_path

    if path is None:
        return
    out = check_output_path(path, kind)
    if kind == "file" and suffixes and out.suffix.lower() not in suffixes:
        raise ParameterError("output", f"{out} must end in {' or '.join(suffixes)}")


# ---------------------------------------------------------------------------------------------
# encode / decode (tokenizer)
# ---------------------------------------------------------------------------------------------
def add_encode(sub) -> None:
    p = sub.add_parser("encode", help="MIDI file -> REMIGEN token line")
    p.add_argument("input", help="MIDI file")
    add_output(p, "file", "token text file to write (default: print the line)")
    add_tokenizer_options(p, default=_plain_tokenizer())
    p.set_defaults(handler=_encode)


def _encode(args) -> int:
    from museformer.tokenizer import write_token_lines

    check_output(args.output, "file")
    tokens = tokenizer_from_args(args).encode_file(args.input)
    if args.output:
        write_token_lines(args.output, [tokens])
    else:
        print(" ".join(tokens))
    return 0


def add_decode(sub) -> None:
    p = sub.add_parser("decode", help="token text file -> MIDI file")
    p.add_argument("input", help="token text file (first line = one song)")
    add_output(p, "file", "MIDI file to write", required=True)
    p.set_defaults(handler=_decode)


def _decode(args) -> int:
    from museformer.files import write_midi_atomic
    from museformer.tokenizer import Tokenizer, read_token_lines

    check_output(args.output, "file")
    songs = read_token_lines(args.input)
    if not songs:
        raise MuseformerError(f"{args.input} holds no tokens")
    score, report = Tokenizer().decode_with_report(songs[0])
    write_midi_atomic(score, args.output)  # size-checked: a full disk is an error, never a cut file
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report.reasons.items()))
    print(f"wrote {args.output}; skipped {report.skipped} invalid token(s)" + (f" ({reasons})" if reasons else ""))
    return 0


# ---------------------------------------------------------------------------------------------
# prepare (corpus preparation)
# ---------------------------------------------------------------------------------------------
def add_prepare(sub) -> None:
    from museformer.data import ON_UNKNOWN, prepare

    p = sub.add_parser(
        "prepare",
        help="encode a folder of MIDI (or a bundled corpus) into shards",
        description="Encode every *.mid/*.midi under INPUT_DIR (recursively) into train/valid/test "
        "token shards in OUT_DIR; or, with --corpus, first export a corpus bundled with music21 to "
        "OUT_DIR/midi. Re-running resumes.",
    )
    p.add_argument("paths", nargs="+", metavar="[INPUT_DIR] OUT_DIR",
                   help="input folder and output folder (only OUT_DIR with --corpus)")
    p.add_argument("--corpus", default=None, choices=["bach", "folk", "essen", "music21-all"],
                   help="export this music21 corpus to MIDI and prepare it (needs music21)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="with --corpus: only the first N scores")
    add_workers(p)
    p.add_argument("--split-lists", default=None, metavar="DIR",
                   help="folder with train.txt/valid.txt/test.txt file-name lists (as the official meta/)")
    for name in ("valid_fraction", "test_fraction"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=_default(prepare, name),
                       help=f"hash-split share of {name.split('_')[0]} (default {_default(prepare, name)})")
    on_unknown = _default(prepare, "on_unknown")
    p.add_argument("--on-unknown", default=on_unknown, choices=list(ON_UNKNOWN),
                   help=f"a song with tokens the vocabulary lacks (<unk> ids): keep it, skip it (listed in "
                   f"failed.tsv) or fail (default {on_unknown}); counts go to meta.json and the summary either way")
    add_quiet(p)
    add_tokenizer_options(p, default=_plain_tokenizer())
    p.set_defaults(handler=_prepare)


def _prepare(args) -> int:
    from museformer.data import prepare

    if args.corpus is not None:
        if len(args.paths) != 1:
            raise MuseformerError("with --corpus give only OUT_DIR")
        out_dir = Path(args.paths[0])
        from museformer.corpora import export_corpus

        exported = export_corpus(args.corpus, out_dir / "midi", workers=args.workers, limit=args.limit,
                                 progress=not args.quiet)
        for rel, why in exported.failed:
            print(f"skipped {rel}: {why}", file=sys.stderr)
        input_dir = exported.midi_dir
    else:
        if len(args.paths) != 2:
            raise MuseformerError("give INPUT_DIR and OUT_DIR (or --corpus NAME OUT_DIR)")
        if args.limit is not None:
            raise MuseformerError("--limit works only with --corpus")
        input_dir, out_dir = (Path(x) for x in args.paths)
    report = prepare(input_dir, out_dir, tokenizer_from_args(args), workers=args.workers,
                     split_lists=args.split_lists, valid_fraction=args.valid_fraction,
                     test_fraction=args.test_fraction, progress=not args.quiet, on_unknown=args.on_unknown)
    print(report.summary())
    return 0


# ---------------------------------------------------------------------------------------------
# pattern (attention pattern picture)
# ---------------------------------------------------------------------------------------------
def add_pattern(sub) -> None:
    from museformer.pattern import draw_pattern
    from museformer.structure import AttentionPattern

    default = AttentionPattern()
    p = sub.add_parser("pattern", help="draw the fine/coarse attention pattern of a song")
    p.add_argument("song", nargs="?", help="a MIDI file to tokenise (or use --bars for a made-up song)")
    p.add_argument("--bars", type=int, default=None, help="draw a made-up song of N bars of random lengths")
    p.add_argument("--fine-offsets", type=int, nargs="*", default=None, metavar="K",
                   help=f"bar distances seen token by token (default: {' '.join(map(str, default.fine_offsets))})")
    p.add_argument("--summary-tokens", type=int, choices=[0, 1], default=None,
                   help=f"summary tokens per bar (0 = fine attention only; default {default.summary_tokens})")
    p.add_argument("--full", action="store_true", help="draw plain causal attention instead (the dense baseline)")
    add_tokenizer_options(p, default=_default(draw_pattern, "tokenizer_preset"), flags=False)
    p.add_argument("--max-tokens", type=int, default=_default(draw_pattern, "max_tokens"),
                   help=f"draw only the first N tokens of SONG (default {_default(draw_pattern, 'max_tokens')})")
    p.add_argument("--seed", type=int, default=_default(draw_pattern, "seed"), help="seed of the made-up song")
    add_output(p, "file", "PNG file to write", default="pattern.png")
    p.set_defaults(handler=_pattern, flags={"song": "SONG or --bars", "tokenizer_preset": "--tokenizer-preset"})


def _pattern(args) -> int:
    from museformer.pattern import draw_pattern

    path = draw_pattern(args.output, song=args.song, bars=args.bars, fine_offsets=args.fine_offsets,
                        summary_tokens=args.summary_tokens, full=args.full, tokenizer_preset=args.tokenizer_preset,
                        max_tokens=args.max_tokens, seed=args.seed)
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on prepared data",
        description="Train on DATA_DIR (made by 'museformer prepare'), writing checkpoints, metrics.csv and "
        "the final model to OUT_DIR. Defaults follow the paper's recipe. Under 'torchrun --nproc_per_node N' "
        "the same command trains with DDP. Options: --set KEY=VALUE (Python literals; model options as "
        "model.KEY, e.g. --set model.d_model=256 max_steps=2000).",
    )
    p.add_argument("data_dir", metavar="DATA_DIR", help="prepared corpus folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="run folder: checkpoints/, model/, metrics.csv")
    p.add_argument("--model-preset", default=None, metavar="NAME",
                   help="model size, a MuseformerConfig.preset: paper, small or tiny (default: paper, or the "
                   "run's saved config with --resume)")
    p.add_argument("--preset", dest="model_preset", action=_Deprecated, new="--model-preset")
    p.add_argument("--config", default=None, metavar="FILE.json",
                   help="training options as JSON (keys as --set; 'model' may be partial)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override options, e.g. lr=1e-3 batch_tokens=8192 model.n_layers=2")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUT_DIR (exactly; starts fresh if none)")
    add_device(p, default=None)
    add_quiet(p)
    p.set_defaults(handler=_train, flags={"out_dir": "OUT_DIR", "data_dir": "DATA_DIR"})


def _train(args) -> int:
    from museformer.train import train

    shared = (["progress=False"] if args.quiet else []) + ([f"device={args.device!r}"] if args.device else [])
    cfg = build_train_config(args.data_dir, args.out_dir, preset=args.model_preset, config_file=args.config,
                             overrides=[*shared, *args.overrides], resume=args.resume)
    final = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(f"model saved to {final}")
    return 0


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``; the value is a Python literal, else the bare string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise MuseformerError(f"--set expects key=value, got {text!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()  # bare words such as device=cpu
    return key, value


def build_train_config(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    resume: bool = False,
):
    """The training options of ``museformer train``, lowest precedence first: the model preset
    (default "paper") or ``--config FILE.json`` (its partial ``model`` updates the preset), else with
    ``--resume`` and neither the run's saved ``train_config.json``; then every ``--set key=value``."""
    from museformer.model import MuseformerConfig
    from museformer.train import TrainConfig, apply_overrides, saved_config

    def model_preset(name: str):
        try:
            return MuseformerConfig.preset(name)
        except (KeyError, ValueError) as e:
            raise MuseformerError(f"unknown model preset {name!r}: {e}") from None

    paths = {"data_dir": str(data_dir), "out_dir": str(out_dir)}
    saved = saved_config(out_dir) if resume and preset is None and config_file is None else None
    if config_file is not None:
        try:
            loaded = json.loads(Path(config_file).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise MuseformerError(f"cannot read config file {config_file}: {e}") from None
        if not isinstance(loaded, dict):
            raise MuseformerError(f"config file {config_file} must hold a JSON object")
        model = model_preset(preset or "paper").to_dict()
        if isinstance(loaded.get("model"), dict):  # a partial model dict updates the preset
            model.update(loaded["model"])
        cfg = TrainConfig.from_dict({**loaded, "model": model, **paths})
    elif saved is not None:
        cfg = TrainConfig.from_dict({**saved.to_dict(), **paths})
    else:
        cfg = TrainConfig(model=model_preset(preset or "paper"), **paths)
    return apply_overrides(cfg, dict(parse_override(s) for s in overrides))


# ---------------------------------------------------------------------------------------------
# evaluate (perplexity) / evaluate-structure (structure metrics)
# ---------------------------------------------------------------------------------------------
def add_evaluate(sub) -> None:
    from museformer.evaluate import evaluate_perplexity

    p = sub.add_parser(
        "evaluate",
        help="token-level perplexity of a checkpoint on a prepared split",
        description="Token-level perplexity of CHECKPOINT on a split of DATA_DIR (made by 'museformer "
        "prepare'), songs cut to each --max-len. Structure metrics of generated songs: "
        "'museformer evaluate-structure'.",
    )
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT", help="checkpoint directory")
    p.add_argument("data_dir", nargs="?", metavar="DATA_DIR", help="prepared corpus folder")
    split = _default(evaluate_perplexity, "split")
    p.add_argument("--split", default=split, choices=["train", "valid", "test"], help=f"split (default: {split})")
    max_lens = list(_default(evaluate_perplexity, "max_lens"))
    p.add_argument("--max-len", type=int, nargs="+", default=max_lens, metavar="L",
                   help=f"cut songs to their first L tokens; several lengths allowed (default: "
                   f"{' '.join(map(str, max_lens))})")
    batch_tokens = _default(evaluate_perplexity, "batch_tokens")
    p.add_argument("--batch-tokens", type=int, default=batch_tokens,
                   help=f"tokens per forward batch (default {batch_tokens})")
    p.add_argument("--repeats", type=int, nargs="+", default=[], metavar="K",
                   help="also report the mean NLL of bars that repeat the bar K bars earlier token for token "
                   "(e.g. 8 4 for folk tunes), against all other bars: low only if the model learnt to copy")
    add_device(p)
    add_output(p, "file", "also write the results as JSON to this file")
    add_quiet(p)
    # the old spelling 'evaluate --structure GEN --reference DIR' (now 'evaluate-structure')
    p.add_argument("--structure", help=argparse.SUPPRESS)
    _structure_options(p, hidden=True)
    p.set_defaults(handler=_evaluate, flags={"max_lens": "--max-len", "checkpoint": "CHECKPOINT",
                                           "repeat_intervals": "--repeats"})


def _structure_options(p: argparse.ArgumentParser, hidden: bool = False) -> None:
    from museformer import analysis

    interval = _default(analysis.evaluate_structure, "max_interval")
    if hidden:
        p.add_argument("--reference", help=argparse.SUPPRESS)
        p.add_argument("--max-interval", type=int, default=interval, help=argparse.SUPPRESS)
        p.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
        p.add_argument("--tokenizer-preset", default=_default(analysis.evaluate_structure, "preset"),
                       choices=_tokenizer_presets(), help=argparse.SUPPRESS)
        p.add_argument("--preset", dest="tokenizer_preset", action=_Deprecated, new="--tokenizer-preset",
                       choices=_tokenizer_presets())
        p.add_argument("--only", choices=("midi", "tokens"), default=None, help=argparse.SUPPRESS)
        return
    p.add_argument("--reference", metavar="DIR", required=True, help="real songs to compare GENERATED_DIR with")
    p.add_argument("--max-interval", type=int, default=interval,
                   help=f"intervals 1..N (bars) of the similarity curve and of SE (default: {interval})")
    add_workers(p)
    add_tokenizer_options(p, default=_default(analysis.evaluate_structure, "preset"), flags=False)
    p.add_argument("--only", choices=("midi", "tokens"), default=None,
                   help="read only MIDI files or only token .txt files (needed where a folder holds both)")


def _evaluate(args) -> int:
    if args.structure is not None:
        _note(args, "'evaluate --structure GEN --reference DIR' is deprecated; use "
                    "'evaluate-structure GEN --reference DIR'")
        if args.checkpoint is not None:
            raise MuseformerError("give either CHECKPOINT DATA_DIR (perplexity) or --structure, not both")
        if args.reference is None:
            raise MuseformerError("--structure needs --reference DIR (the real songs to compare with)")
        if args.workers is None:
            from museformer.data import default_workers

            args.workers = default_workers()
        args.generated = args.structure
        return _evaluate_structure(args)
    if args.checkpoint is None or args.data_dir is None:
        raise MuseformerError("give CHECKPOINT DATA_DIR")
    from museformer.evaluate import evaluate_perplexity

    check_output(args.output, "file", (".json",))
    report = evaluate_perplexity(args.checkpoint, args.data_dir, split=args.split, max_lens=args.max_len,
                                 batch_tokens=args.batch_tokens, device=args.device, progress=not args.quiet,
                                 repeat_intervals=args.repeats)
    for r in report["results"]:
        print(f"max_len {r['max_len']:>6}: perplexity {r['perplexity']:.4f} "
              f"(mean NLL {r['mean_nll']:.4f} over {r['tokens']:,} tokens, {report['songs']} songs; "
              f"unigram baseline {r['unigram_perplexity']:.2f})")
    if "repeat_bars" in report:
        rep = report["repeat_bars"]
        for k, r in rep["repeat"].items():
            print(f"bars repeating bar b-{k}: mean NLL {r['mean_nll']:.4f} over {r['tokens']:,} tokens "
                  f"(max_len {rep['max_len']})")
        print(f"all other bars:        mean NLL {rep['other']['mean_nll']:.4f} over {rep['other']['tokens']:,} tokens")
    return _write_report(args.output, report)


def add_evaluate_structure(sub) -> None:
    p = sub.add_parser(
        "evaluate-structure",
        help="structure metrics of generated songs next to real ones",
        description="Bar-similarity curve, Similarity Error and other objective metrics of GENERATED_DIR next to "
        "--reference DIR (folders of MIDI files, token .txt files with one song per line, or prepared corpora).",
    )
    p.add_argument("generated", metavar="GENERATED_DIR", help="songs to evaluate")
    _structure_options(p)
    add_output(p, "file", "also write the results as JSON to this file")
    add_quiet(p)
    p.set_defaults(handler=_evaluate_structure, flags={"preset": "--tokenizer-preset"})


def _evaluate_structure(args) -> int:
    from museformer import analysis

    check_output(args.output, "file", (".json",))
    report = analysis.evaluate_structure(args.generated, args.reference, max_interval=args.max_interval,
                                         workers=args.workers, preset=args.tokenizer_preset,
                                         progress=not args.quiet, only=args.only)
    print(analysis.format_table(report))
    return _write_report(args.output, report)


def _write_report(output: str | None, report: dict) -> int:
    """The ``-o`` JSON of an evaluation command (when given)."""
    from museformer import analysis

    if output:
        analysis.write_json(output, report)
        print(f"wrote {output}")
    return 0


# ---------------------------------------------------------------------------------------------
# analyze (bar-similarity statistics)
# ---------------------------------------------------------------------------------------------
def add_analyze(sub) -> None:
    from museformer import analysis

    p = sub.add_parser(
        "analyze",
        help="bar-similarity statistics of a corpus",
        description="Bar-similarity statistics (Museformer section 3.1): the mean similarity of bar pairs "
        "at each interval, as CSV and PNG, the most similar intervals and suggested fine_offsets. INPUT is "
        "a folder of MIDI files, token .txt files (one song per line), or a prepared corpus folder.",
    )
    p.add_argument("input", help="folder of MIDI / token .txt files, a single such file, or a prepared corpus")
    add_output(p, "dir", "report folder", default="analysis")
    interval = _default(analysis.analyze, "max_interval")
    p.add_argument("--max-interval", type=int, default=interval, help=f"largest interval in bars (default: {interval})")
    p.add_argument("--heatmaps", type=int, default=_default(analysis.analyze, "heatmaps"), metavar="N",
                   help="also draw the self-similarity matrices of the first N songs")
    add_workers(p)
    p.add_argument("--split", default=_default(analysis.analyze, "split"),
                   choices=["all", "train", "valid", "test"], help="split of a prepared corpus (default: all)")
    add_tokenizer_options(p, default=_default(analysis.analyze, "preset"), flags=False)
    p.add_argument("--only", choices=("midi", "tokens"), default=None,
                   help="read only MIDI files or only token .txt files (needed where a folder holds both)")
    add_quiet(p)
    p.set_defaults(handler=_analyze, flags={"preset": "--tokenizer-preset"})


def _analyze(args) -> int:
    from museformer import analysis

    check_output(args.output, "dir")
    report = analysis.analyze(args.input, args.output, max_interval=args.max_interval, heatmaps=args.heatmaps,
                              workers=args.workers, preset=args.tokenizer_preset, split=args.split,
                              progress=not args.quiet, only=args.only)
    print(report.text())
    return 0


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
def add_generate(sub) -> None:
    from museformer.generate import PRECISIONS, SampleConfig
    from museformer.songs import generate_to_folder

    d = SampleConfig()
    p = sub.add_parser(
        "generate", help="generate songs with a trained (by default the bundled) model",
        description="Generate songs as MIDI files, each with a JSON sidecar (checkpoint hash, options, seed) "
        "that makes it reproducible. Lengths count the whole song, prompt included.",
    )
    from museformer.bundled import BUNDLED_MODELS, DEFAULT_MODEL

    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="NAME",
                       help=f"a bundled model: {' or '.join(BUNDLED_MODELS)} (default {DEFAULT_MODEL}; "
                       "see docs/pretrained.md)")
    which.add_argument("--checkpoint", metavar="DIR",
                       help="checkpoint directory, or a training run folder (its model/, else its newest "
                       "checkpoints/step-N) (default: the bundled model)")
    num = _default(generate_to_folder, "num_songs")
    p.add_argument("-n", "--num", type=int, default=num, metavar="N", help=f"number of songs (default {num})")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--bars", type=int, metavar="B",
                        help="songs of exactly B bars, prompt included (end-of-song only after bar B) "
                        "(default: the model's recommended length, 64 bars for the folk model; else none)")
    length.add_argument("--max-tokens", type=int, default=None, metavar="T",
                        help=f"stop each song at T tokens, cut back to its last complete bar (default {d.max_tokens})")
    p.add_argument("--min-tokens", type=int, default=None, metavar="T",
                   help=f"end-of-song is forbidden before T tokens (default {d.min_tokens}, as the paper; "
                   "unused with --bars)")
    p.add_argument("--prompt", metavar="MIDI", help="a MIDI file to continue")
    p.add_argument("--prompt-bars", type=int, metavar="N", help="use only the first N bars of the prompt")
    p.add_argument("--top-k", type=int, metavar="K",
                   help=f"sample from the K most likely tokens (default: the model's recommendation, else {d.top_k}, "
                   "as the paper; 0 = off)")
    p.add_argument("--top-p", type=float, metavar="P",
                   help=f"nucleus sampling (default: the model's recommendation, else {d.top_p} = off)")
    p.add_argument("--temperature", type=float, metavar="T",
                   help=f"softmax temperature; 0 = greedy (default: the model's recommendation, else {d.temperature})")
    p.add_argument("--seed", type=int, default=d.seed, metavar="S",
                   help="random seed; song i uses S + i (default: random, recorded)")
    p.add_argument("--instruments", type=_program_list, metavar="P[,P...]",
                   help="MIDI programs that may play new notes, 128 or 'drums' = drums (e.g. 0,25,drums)")
    p.add_argument("--tempo", type=float, metavar="BPM", help="fix the tempo of generated bars (16..256)")
    p.add_argument("--tempo-changes", action="store_true",
                   help="let the model change tempo inside a song (default: a song keeps its first tempo, "
                   "as nearly all training songs do)")
    p.add_argument("--no-grammar", action="store_true",
                   help="sample without the token grammar (songs may then contain tokens MIDI cannot use)")
    p.add_argument("--batch-size", type=int, metavar="N", help="songs decoded together (default: all)")
    _form_options(p)
    add_output(p, "dir", "output folder", default="songs")
    p.add_argument("--render", action="store_true", help="also write a piano-roll PNG and a WAV per song")
    p.add_argument("--soundfont", metavar="SF2", help="General MIDI soundfont for --render")
    add_device(p)
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="bf16: weights, activations and cache in bfloat16; auto (default): bf16 where the hardware "
                   "computes it natively (CUDA, CPUs with AMX or AVX512-BF16), else fp32 (docs/generation.md)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for PyTorch (default: PyTorch's choice; 1 is often fastest on a busy machine)")
    add_quiet(p)
    p.set_defaults(handler=_generate, flags={"max_bars": "--bars"})


def _program_list(text: str) -> tuple[int, ...]:
    programs = []
    for part in text.replace(" ", "").split(","):
        if part.lower() in ("drums", "drum"):
            programs.append(128)
        elif part.isdigit():
            programs.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"{part!r} is not a MIDI program (0..127) or 'drums'")
    return tuple(programs)


def sample_config_from_args(args: argparse.Namespace):
    """The ``SampleConfig`` of ``museformer generate``'s flags."""
    from museformer.generate import SampleConfig

    d = SampleConfig()
    return SampleConfig(
        temperature=d.temperature if args.temperature is None else args.temperature,
        top_k=d.top_k if args.top_k is None else args.top_k, top_p=d.top_p if args.top_p is None else args.top_p,
        seed=args.seed,
        max_tokens=d.max_tokens if args.max_tokens is None else args.max_tokens, max_bars=args.bars,
        min_tokens=d.min_tokens if args.min_tokens is None else args.min_tokens,
        grammar=not args.no_grammar, instruments=args.instruments, tempo=args.tempo,
        tempo_changes=args.tempo_changes,
    )


def chosen_sample_options(args: argparse.Namespace) -> list[str]:
    """The ``SampleConfig`` fields whose ``generate`` flag was given (the rest may come from the
    model's ``sample.json``: ``generate.with_model_defaults``)."""
    flags = (("max_bars", args.bars), ("max_tokens", args.max_tokens), ("min_tokens", args.min_tokens),
             ("top_k", args.top_k), ("temperature", args.temperature), ("top_p", args.top_p))
    return [name for name, value in flags if value is not None]


def _generate(args) -> int:
    from museformer.songs import generate_to_folder
    from museformer.train import resolve_device

    from museformer.checkpoint import resolve_checkpoint
    from museformer.generate import bundled_checkpoint, with_model_defaults

    check_output(args.output, "dir")
    directory = resolve_checkpoint(args.checkpoint) if args.checkpoint else bundled_checkpoint(args.model)
    config = with_model_defaults(sample_config_from_args(args), directory, chosen_sample_options(args))
    generate_to_folder(
        args.output, directory, num_songs=args.num, prompt=args.prompt, prompt_bars=args.prompt_bars,
        config=config, batch_size=args.batch_size, device=str(resolve_device(args.device)),
        render=args.render, soundfont=args.soundfont, threads=args.threads, log=print, progress=not args.quiet,
        form=args.form, form_file=args.form_file, candidates=args.candidates, precision=args.precision,
    )
    return 0


def _form_options(p: argparse.ArgumentParser) -> None:
    """``generate``'s form-plan options (``museformer.form``)."""
    from museformer.form import DEFAULT_CANDIDATES

    g = p.add_argument_group("form plans (docs/structure_control.md)")
    plan = g.add_mutually_exclusive_group()
    plan.add_argument("--form", metavar="PLAN",
                      help="sections NAME[']BARS, e.g. \"A8 A8 B8 A'8\": a repeated name repeats that section "
                      "(exactly; with ' varied), a new name is new material; the plan gives the song's bars")
    plan.add_argument("--form-file", metavar="PLAN.json",
                      help='a bar-level plan: {"bars": 32, "rules": [{"bars": "9-16", "new": true}, '
                      '{"bars": "17-24", "repeats": "1-8", "similarity": 0.8}]}')
    g.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, metavar="K",
                   help=f"candidate bars sampled per planned bar (default {DEFAULT_CANDIDATES})")


# ---------------------------------------------------------------------------------------------
# infill
# ---------------------------------------------------------------------------------------------
def add_infill(sub) -> None:
    from museformer.generate import SampleConfig
    from museformer.infill import CHOICES, DEFAULT_CANDIDATES

    d = SampleConfig()
    p = sub.add_parser(
        "infill", help="regenerate some bars of a song, with the whole song as context",
        description="Regenerate the bars given by --bars (1-based, inclusive) of SONG.mid and write OUT.mid; every "
        "other bar stays token-identical. Candidates for each gap are sampled left to right and weighted by the "
        "model's likelihood of the rest of the song after them; the result is drawn from those weights. "
        "OUT.json records the candidates' weights and likelihoods.",
    )
    p.add_argument("song", metavar="SONG.mid", help="the song (MIDI)")
    p.add_argument("--bars", required=True, metavar="RANGES", help="bars to regenerate, e.g. 9-12 or 9-12,20-21")
    add_output(p, "file", "MIDI file to write (its sidecar goes next to it as .json)", required=True)
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint directory or training run folder "
                   "(default: the bundled model)")
    p.add_argument("-n", "--num", type=int, default=DEFAULT_CANDIDATES, metavar="N",
                   help=f"candidates sampled per gap (default {DEFAULT_CANDIDATES})")
    p.add_argument("--instruments", type=_program_list, metavar="P[,P...]",
                   help="regenerate only these instruments' notes in the bars (MIDI programs, 128 or 'drums' = "
                   "drums); the other instruments' notes there stay as they are")
    p.add_argument("--choose", default="sample", choices=list(CHOICES),
                   help="draw the result from the weights (sample, default) or take the best")
    p.add_argument("--top-k", type=int, default=d.top_k, metavar="K", help=f"top-k sampling (default {d.top_k})")
    p.add_argument("--top-p", type=float, default=d.top_p, metavar="P", help=f"nucleus sampling (default {d.top_p})")
    p.add_argument("--temperature", type=float, default=d.temperature, metavar="T",
                   help=f"softmax temperature (default {d.temperature})")
    p.add_argument("--seed", type=int, default=d.seed, metavar="S", help="random seed (default: random, recorded)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, metavar="T",
                   help=f"the longest song accepted, in tokens (default {d.max_tokens}, the paper's context)")
    p.add_argument("--render", action="store_true", help="also write a piano-roll PNG of OUT.mid")
    add_device(p)
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch")
    p.set_defaults(handler=_infill, flags={"candidates": "--num", "max_tokens": "--max-tokens"})


def _infill(args) -> int:
    from museformer.infill import infill, write_infill
    from museformer.songs import use_threads
    from museformer.train import resolve_device

    check_output(args.output, "file", (".mid", ".midi"))
    if not Path(args.song).is_file():
        raise ParameterError("song", f"{args.song}: no such file")
    use_threads(args.threads)
    result = infill(args.song, args.bars, args.checkpoint, candidates=args.num, choose=args.choose,
                    instruments=args.instruments,
                    device=str(resolve_device(args.device)), top_k=args.top_k, top_p=args.top_p,
                    temperature=args.temperature, seed=args.seed, max_tokens=args.max_tokens)
    write_infill(result, args.output, source=str(args.song), checkpoint=args.checkpoint)
    for gap in result.gaps:
        print(f"bars {gap.first}-{gap.last}: candidate {gap.chosen} of {len(gap.candidates)} "
              f"(weight {gap.weights[gap.chosen]:.2f}; rest of the song: {gap.suffix_logprob[gap.chosen]:.1f} nats "
              f"vs {gap.original_suffix_logprob:.1f} after the original bars)")
    print(f"wrote {args.output} ({result.bars} bars) and {Path(args.output).with_suffix('.json')}")
    if args.render:
        from museformer.render import piano_roll

        print(f"wrote {piano_roll(result.score, Path(args.output).with_suffix('.png'))}")
    return 0


# ---------------------------------------------------------------------------------------------
# render
# ---------------------------------------------------------------------------------------------
def add_render(sub) -> None:
    p = sub.add_parser("render", help="piano-roll PNG and/or WAV of any MIDI file",
                       description="Draw SONG.mid as a piano roll (SONG.png) and/or synthesise it (SONG.wav, "
                       "needs FluidSynth and a General MIDI soundfont). Without --png/--wav, both.")
    p.add_argument("song", metavar="SONG.mid", help="MIDI file")
    p.add_argument("--png", action="store_true", help="write the piano roll SONG.png")
    p.add_argument("--wav", action="store_true", help="write audio SONG.wav")
    p.add_argument("-o", "--output-dir", metavar="DIR", help="folder for the files (default: next to SONG.mid)")
    p.add_argument("--soundfont", metavar="SF2", help="General MIDI soundfont for --wav")
    p.set_defaults(handler=_render)


def _render(args) -> int:
    from pathlib import Path

    from museformer.render import render_file

    both = not args.png and not args.wav
    stem = Path(args.song).stem
    folder = Path(args.output_dir) if args.output_dir else Path(args.song).parent
    done = render_file(args.song, png=(both or args.png) and folder / f"{stem}.png",
                       wav=(both or args.wav) and folder / f"{stem}.wav", soundfont=args.soundfont)
    for what in ("png", "wav"):
        if what in done:
            print(f"wrote {done[what]}")
    errors = [f"{what}: {done[what + '_error']}" for what in ("png", "wav") if what + "_error" in done]
    if errors:
        raise MuseformerError("; ".join(errors))
    return 0


# ---------------------------------------------------------------------------------------------
# studio (the web page; needs the studio extra, imported only when the command runs)
# ---------------------------------------------------------------------------------------------
def add_studio(sub) -> None:
    p = sub.add_parser("studio", help="a local web page to make, see and hear songs (needs the studio extra)",
                       description="Start the studio: a web server on this machine; open the printed URL in a "
                       "browser. Nothing is fetched from the internet. Needs: pip install 'museformer[studio]'.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 = any free port)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="DIR",
                   help="also offer this checkpoint or training run folder (repeatable; the first is the default)")
    add_output(p, "dir", "folder the songs are written to", default="studio-songs")
    add_device(p)
    p.set_defaults(handler=_studio)


def _studio(args) -> int:
    from museformer.studio.app import serve
    from museformer.train import resolve_device

    check_output(args.output, "dir")
    serve(args.host, args.port, args.checkpoint, args.output, device=str(resolve_device(args.device)))
    return 0


# ---------------------------------------------------------------------------------------------
COMMANDS = (add_encode, add_decode, add_prepare, add_pattern, add_train, add_evaluate, add_evaluate_structure,
            add_analyze, add_generate, add_infill, add_render, add_studio)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="museformer",
        description="Museformer: long, structured multi-track music generation with fine- and "
        "coarse-grained attention.",
    )
    parser.add_argument("--version", action="version", version=f"museformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def _flag_of(args, parameter: str) -> str:
    """The option that fed a library parameter: the command's ``flags`` map, else ``--the-name``."""
    flags = {"output": "-o/--output", **(getattr(args, "flags", None) or {})}
    return flags.get(parameter, "--" + parameter.replace("_", "-"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.handler(args) or 0)
    except ParameterError as e:
        print(f"museformer {args.command}: error: {_flag_of(args, e.parameter)}: {e.message}", file=sys.stderr)
        code = 1
    except MuseformerError as e:
        print(f"museformer {args.command}: error: {e}", file=sys.stderr)
        code = 1
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"museformer {args.command}: interrupted", file=sys.stderr)
        code = 130
    for note in getattr(args, "deprecations", None) or []:
        print(f"museformer {args.command}: note: {note}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
