"""The ``museformer`` command: argument parsing only; every subcommand calls a library function.

Each subcommand is one ``add_<name>(subparsers)`` function that declares its arguments and sets
``handler`` to a small function taking the parsed ``args``. Errors a user can cause arrive as
``MuseformerError`` and are printed on one line (exit status 1), never as a traceback.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path
from typing import Any

from museformer import __version__
from museformer.errors import MuseformerError


# ---------------------------------------------------------------------------------------------
# encode / decode (tokenizer)
# ---------------------------------------------------------------------------------------------
def add_encoding_options(p: argparse.ArgumentParser) -> None:
    """The tokenizer options shared by ``encode`` and ``prepare`` (unset flags keep the defaults)."""
    g = p.add_argument_group("encoding options")
    g.add_argument("--preset", default=None, help="start from a named tokenizer preset, e.g. lmd6")
    g.add_argument("--encoding", default=None, choices=["remigen2", "remigen"], help="token layout")
    g.add_argument("--vocab", default=None, choices=["general", "lmd6remi"], help="vocabulary")
    g.add_argument("--normalize-pitch", action="store_true", default=None,
                   help="transpose to C major / A minor")
    g.add_argument("--remove-empty-bars", action="store_true", default=None,
                   help="drop empty bars before the first and after the last note")
    g.add_argument("--ignore-ts", action="store_true", default=None, help="do not emit time signatures")
    g.add_argument("--sort-insts", default=None, choices=["id", "6tracks"], help="instrument order in an onset")


def tokenizer_from_args(args: argparse.Namespace):
    """A ``Tokenizer`` from ``add_encoding_options`` flags: the preset, then the flags given."""
    from museformer.tokenizer import Tokenizer

    options = {}
    if args.preset is not None:
        try:
            options = Tokenizer.preset(args.preset).config.to_dict()
        except (KeyError, ValueError) as e:
            raise MuseformerError(f"unknown preset {args.preset!r} ({e})") from None
    for name in ("encoding", "vocab", "normalize_pitch", "remove_empty_bars", "ignore_ts", "sort_insts"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    try:
        return Tokenizer(**options)
    except (TypeError, ValueError) as e:
        raise MuseformerError(f"bad encoding options: {e}") from None


def add_encode(sub) -> None:
    p = sub.add_parser("encode", help="MIDI file -> REMIGEN token line")
    p.add_argument("input", help="MIDI file")
    p.add_argument("-o", "--output", help="token text file to write (default: print the line)")
    add_encoding_options(p)
    p.set_defaults(handler=_encode)


def _encode(args) -> int:
    from museformer.tokenizer import write_token_lines

    tokens = tokenizer_from_args(args).encode_file(args.input)
    if args.output:
        write_token_lines(args.output, [tokens])
    else:
        print(" ".join(tokens))
    return 0


def add_decode(sub) -> None:
    p = sub.add_parser("decode", help="token text file -> MIDI file")
    p.add_argument("input", help="token text file (first line = one song)")
    p.add_argument("-o", "--output", required=True, help="MIDI file to write")
    p.set_defaults(handler=_decode)


def _decode(args) -> int:
    from museformer.tokenizer import Tokenizer, read_token_lines, write_midi

    songs = read_token_lines(args.input)
    if not songs:
        raise MuseformerError(f"{args.input} holds no tokens")
    score, report = Tokenizer().decode_with_report(songs[0])
    write_midi(score, args.output)
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report.reasons.items()))
    print(f"wrote {args.output}; skipped {report.skipped} invalid token(s)" + (f" ({reasons})" if reasons else ""))
    return 0


# ---------------------------------------------------------------------------------------------
# prepare (corpus preparation)
# ---------------------------------------------------------------------------------------------
def add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="encode a folder of MIDI (or a bundled corpus) into shards",
        description="Encode every *.mid/*.midi under INPUT_DIR (recursively) into train/valid/test "
        "token shards in OUT_DIR; or, with --corpus, first export a corpus bundled with music21 to "
        "OUT_DIR/midi. Re-running resumes.",
    )
    p.add_argument("paths", nargs="+", metavar="[INPUT_DIR] OUT_DIR",
                   help="input folder and output folder (only OUT_DIR with --corpus)")
    p.add_argument("--corpus", default=None, choices=["bach", "music21-all"],
                   help="export this music21 corpus to MIDI and prepare it (needs music21)")
    p.add_argument("--limit", type=int, default=None, help="with --corpus: only the first N scores")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="worker processes (default: CPU cores, at most 8)")
    p.add_argument("--split-lists", default=None, metavar="DIR",
                   help="folder with train.txt/valid.txt/test.txt file-name lists (as the official meta/)")
    p.add_argument("--valid-fraction", type=float, default=0.1, help="hash-split share of valid (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="hash-split share of test (default 0.1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_encoding_options(p)
    p.set_defaults(handler=_prepare)


def _prepare(args) -> int:
    from pathlib import Path

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
        input_dir, out_dir = (Path(x) for x in args.paths)
    report = prepare(input_dir, out_dir, tokenizer_from_args(args), workers=args.workers,
                     split_lists=args.split_lists, valid_fraction=args.valid_fraction,
                     test_fraction=args.test_fraction, progress=not args.quiet)
    print(report.summary())
    return 0


# ---------------------------------------------------------------------------------------------
# pattern (attention pattern picture)
# ---------------------------------------------------------------------------------------------
def add_pattern(sub) -> None:
    p = sub.add_parser("pattern", help="draw the fine/coarse attention pattern of a song")
    p.add_argument("song", nargs="?", help="a MIDI file to tokenise (or use --bars for a made-up song)")
    p.add_argument("--bars", type=int, default=None, help="draw a made-up song of N bars of random lengths")
    p.add_argument("--fine-offsets", type=int, nargs="*", default=None, metavar="K",
                   help="bar distances seen token by token (default: 1 2 4 8 12 16 24 32)")
    p.add_argument("--summary-tokens", type=int, choices=[0, 1], default=1,
                   help="summary tokens per bar (0 = fine attention only)")
    p.add_argument("--full", action="store_true", help="draw plain causal attention instead (the dense baseline)")
    p.add_argument("--preset", default="lmd6", help="tokenizer preset used for SONG (default lmd6)")
    p.add_argument("--max-tokens", type=int, default=1024, help="draw only the first N tokens of SONG")
    p.add_argument("--seed", type=int, default=0, help="random seed of the made-up song")
    p.add_argument("-o", "--output", default="pattern.png", help="PNG file to write")
    p.set_defaults(handler=_pattern)


def _pattern(args) -> int:
    from museformer import structure
    from museformer.vocab import BOS_ID, Vocab

    if (args.song is None) == (args.bars is None):
        raise MuseformerError("give either a MIDI file or --bars N")
    try:
        if args.full:
            pattern = structure.AttentionPattern.full()
        else:
            offsets = structure.AttentionPattern().fine_offsets if args.fine_offsets is None else args.fine_offsets
            pattern = structure.AttentionPattern(tuple(offsets), args.summary_tokens)
    except ValueError as e:
        raise MuseformerError(f"bad pattern options: {e}") from None
    if args.bars is not None:
        if not 1 <= args.bars <= 200:
            raise MuseformerError(f"--bars must be between 1 and 200, got {args.bars}")
        vocab = Vocab.builtin("lmd6remi")
        ids = structure.toy_song(args.bars, vocab, seed=args.seed, incomplete_last=True)
        title = f"{args.bars} made-up bars"
    else:
        from museformer.tokenizer import Tokenizer

        try:
            tokenizer = Tokenizer.preset(args.preset)
        except ValueError as e:
            raise MuseformerError(str(e)) from None
        vocab = tokenizer.vocab
        ids = [BOS_ID] + tokenizer.encode_file(args.song, as_ids=True).tolist()[: max(args.max_tokens - 1, 1)]
        title = os.path.basename(args.song)
    summaries = "one summary token per bar" if pattern.summary_tokens else "no summary tokens"
    title += " | " + ("full causal attention" if args.full else f"fine offsets {list(pattern.fine_offsets)}, {summaries}")
    path = structure.render_pattern(ids, pattern, vocab, args.output, title=title)
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# train / evaluate
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
    p.add_argument("--preset", default=None, choices=["paper", "small", "tiny"],
                   help="model size (default: paper, or the run's saved config with --resume)")
    p.add_argument("--config", default=None, metavar="FILE.json",
                   help="training options as JSON (keys as --set; 'model' may be partial)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override options, e.g. lr=1e-3 batch_tokens=8192 model.num_layers=2")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUT_DIR (exactly; starts fresh if none)")
    p.set_defaults(handler=_train)


def _train(args) -> int:
    from museformer.train import train

    cfg = build_train_config(args.data_dir, args.out_dir, preset=args.preset, config_file=args.config,
                             overrides=args.overrides, resume=args.resume)
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


def add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="perplexity of a checkpoint, or structure metrics of songs",
        description="Either 'museformer evaluate CHECKPOINT DATA_DIR' (token-level perplexity on a prepared "
        "split) or 'museformer evaluate --structure GENERATED_DIR --reference DIR' (bar-similarity curve, "
        "Similarity Error and other objective metrics of generated songs next to real ones; folders of "
        "MIDI files, token .txt files (one song per line) or prepared corpora).",
    )
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory (perplexity)")
    p.add_argument("data_dir", nargs="?", help="prepared corpus folder (perplexity)")
    p.add_argument("--split", default="test", help="split of DATA_DIR to evaluate (perplexity; default: test)")
    p.add_argument("--max-len", type=int, nargs="+", default=[1024, 5120, 10240], metavar="L",
                   help="truncate songs to their first L tokens; several lengths allowed (perplexity)")
    p.add_argument("--batch-tokens", type=int, default=16_384, help="tokens per forward batch (perplexity)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (perplexity; default: auto)")
    p.add_argument("--structure", metavar="GENERATED_DIR", help="songs to evaluate with the structure metrics")
    p.add_argument("--reference", metavar="DIR", help="real songs to compare GENERATED_DIR with")
    p.add_argument("--max-interval", type=int, default=64,
                   help="intervals 1..N (bars) of the similarity curve and of SE (default: 64)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--preset", default="lmd6", choices=("lmd6", "general"),
                   help="tokenizer that encodes MIDI inputs (default: lmd6, the paper's LMD setting)")
    p.add_argument("-o", "--output", help="also write the results as JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_evaluate)


def _evaluate(args) -> int:
    from museformer import analysis

    if args.structure is not None:
        if args.reference is None:
            raise MuseformerError("--structure needs --reference DIR (the real songs to compare with)")
        if args.checkpoint is not None:
            raise MuseformerError("give either CHECKPOINT DATA_DIR (perplexity) or --structure, not both")
        report = analysis.evaluate_structure(args.structure, args.reference, max_interval=args.max_interval,
                                             workers=args.workers, preset=args.preset, progress=not args.quiet)
        print(analysis.format_table(report))
    else:
        if args.checkpoint is None or args.data_dir is None:
            raise MuseformerError("give CHECKPOINT DATA_DIR (perplexity) or --structure DIR --reference DIR")
        from museformer.evaluate import evaluate_perplexity

        report = evaluate_perplexity(args.checkpoint, args.data_dir, split=args.split, max_lens=args.max_len,
                                     batch_tokens=args.batch_tokens, device=args.device)
        for r in report["results"]:
            print(f"max_len {r['max_len']:>6}: perplexity {r['perplexity']:.4f} "
                  f"(mean NLL {r['mean_nll']:.4f} over {r['tokens']:,} tokens, {report['songs']} songs; "
                  f"unigram baseline {r['unigram_perplexity']:.2f})")
    if args.output:
        analysis.write_json(args.output, report)
        print(f"wrote {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------
# analyze (bar-similarity statistics)
# ---------------------------------------------------------------------------------------------
def add_analyze(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="bar-similarity statistics of a corpus",
        description="Bar-similarity statistics (Museformer section 3.1): the mean similarity of bar pairs "
        "at each interval, as CSV and PNG, the most similar intervals and suggested fine_offsets. INPUT is "
        "a folder of MIDI files, token .txt files (one song per line), or a prepared corpus folder.",
    )
    p.add_argument("input", help="folder of MIDI / token .txt files, a single such file, or a prepared corpus")
    p.add_argument("-o", "--output", default="analysis", help="report folder (default: analysis)")
    p.add_argument("--max-interval", type=int, default=64, help="largest interval in bars (default: 64)")
    p.add_argument("--heatmaps", type=int, default=0, metavar="N",
                   help="also draw the self-similarity matrices of the first N songs")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--split", default="all", help="split of a prepared corpus: all, train, valid or test")
    p.add_argument("--preset", default="lmd6", choices=("lmd6", "general"),
                   help="tokenizer that encodes MIDI inputs (default: lmd6, the paper's LMD setting)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_analyze)


def _analyze(args) -> int:
    from museformer import analysis

    report = analysis.analyze(args.input, args.output, max_interval=args.max_interval, heatmaps=args.heatmaps,
                              workers=args.workers, preset=args.preset, split=args.split,
                              progress=not args.quiet)
    print(report.text())
    return 0


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
def add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate songs with a trained (by default the bundled) model",
        description="Generate songs as MIDI files, each with a JSON sidecar (checkpoint hash, options, seed) "
        "that makes it reproducible. Lengths count the whole song, prompt included.",
    )
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint directory (default: the bundled model)")
    p.add_argument("-n", "--num", type=int, default=1, metavar="N", help="number of songs (default 1)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--bars", type=int, metavar="B", help="stop each song after B complete bars")
    length.add_argument("--max-tokens", type=int, metavar="T",
                        help="stop each song at T tokens, cut back to its last complete bar (default 20480)")
    p.add_argument("--min-tokens", type=int, default=1024, metavar="T",
                   help="end-of-song is forbidden before T tokens (default 1024, as the paper)")
    p.add_argument("--prompt", metavar="MIDI", help="a MIDI file to continue")
    p.add_argument("--prompt-bars", type=int, metavar="N", help="use only the first N bars of the prompt")
    p.add_argument("--top-k", type=int, default=8, metavar="K", help="sample from the K most likely tokens "
                   "(default 8, as the paper; 0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (default 1.0 = off)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="softmax temperature; 0 = greedy")
    p.add_argument("--seed", type=int, metavar="S", help="random seed; song i uses S + i (default: random, recorded)")
    p.add_argument("--instruments", type=_program_list, metavar="P[,P...]",
                   help="MIDI programs that may play new notes, 128 or 'drums' = drums (e.g. 0,25,drums)")
    p.add_argument("--tempo", type=float, metavar="BPM", help="fix the tempo of generated bars")
    p.add_argument("--no-grammar", action="store_true",
                   help="sample without the token grammar (songs may then contain tokens MIDI cannot use)")
    p.add_argument("--batch-size", type=int, metavar="N", help="songs decoded together (default: all)")
    p.add_argument("-o", "--output", default="songs", metavar="OUT_DIR", help="output folder (default ./songs)")
    p.add_argument("--render", action="store_true", help="also write a piano-roll PNG and a WAV per song")
    p.add_argument("--soundfont", metavar="SF2", help="General MIDI soundfont for --render")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for PyTorch (default: PyTorch's choice; 1 is often fastest on a busy machine)")
    p.set_defaults(handler=_generate)


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


def _generate(args) -> int:
    from museformer.generate import DEFAULT_MAX_TOKENS, SampleConfig, generate_to_folder

    config = SampleConfig(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS, max_bars=args.bars, min_tokens=args.min_tokens,
        grammar=not args.no_grammar, instruments=args.instruments, tempo=args.tempo,
    )
    generate_to_folder(
        args.output, args.checkpoint, num_songs=args.num, prompt=args.prompt, prompt_bars=args.prompt_bars,
        config=config, batch_size=args.batch_size, device=args.device, render=args.render,
        soundfont=args.soundfont, threads=args.threads, log=print,
    )
    return 0


# ---------------------------------------------------------------------------------------------
def _not_yet(name: str):
    def handler(args) -> int:
        raise MuseformerError(f"'museformer {name}' is not available in this version yet (no model yet)")

    return handler


COMMANDS = (add_encode, add_decode, add_prepare, add_pattern, add_train, add_evaluate, add_analyze, add_generate)


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except MuseformerError as e:
        print(f"museformer {args.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"museformer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
