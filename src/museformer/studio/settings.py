"""What the studio offers and what a page may ask for: models, and one generation request, checked.

This module owns the studio's input rules. ``available_models`` lists the bundled models (every
folder under ``museformer/pretrained/`` that holds a checkpoint, so models added there appear
without a code change) and the ``--checkpoint`` folders given on the command line.
``parse_generate_request`` turns the page's JSON into a ``GenerateRequest``: every field is
type-checked and range-checked here or by ``SampleConfig`` / ``check_run_options``, a prompt MIDI
is read and tokenised with the chosen model's tokenizer, and any problem is one ``ParameterError``
naming the field (the server answers it with HTTP 400 and the page shows it next to the button).
Nothing here loads model weights or runs a job.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from museformer.errors import MuseformerError, ParameterError
from museformer.generate import SampleConfig, check_prompt_fits, check_run_options, prompt_from_midi

MAX_BARS = 256  # a page request; longer songs belong to `museformer generate`
MAX_SONGS = 16  # songs of one request (each is decoded in the same batch)
MAX_PROMPT_BYTES = 2 * 1024 * 1024  # an uploaded prompt MIDI
MAX_TEMPERATURE = 10.0  # beyond this every token is nearly equally likely: noise, not music
FORM_PATTERN = re.compile(r"^\s*([A-Za-z]'*\d+)(\s+[A-Za-z]'*\d+)*\s*$")  # "A8 A8 B8 A'8"

# the request fields the page sends; anything else is refused (a typo must not be ignored silently)
SAMPLING_FIELDS = ("top_k", "temperature", "top_p")  # the sampling options a model may recommend
FIELDS = ("model", "bars", "num_songs", "instruments", "tempo", "temperature", "top_k", "top_p", "seed",
          "prompt", "prompt_name", "prompt_bars", "form")


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelChoice:
    """One model the page can choose.

    Attributes:
        id: what the page sends back (unique): the bundled folder name, or the checkpoint folder's name.
        label: what the page shows.
        path: the checkpoint directory.
        bundled: shipped inside the package (else a ``--checkpoint`` folder).
    """

    id: str
    label: str
    path: Path
    bundled: bool

    @property
    def sampling(self) -> dict[str, Any]:
        """The model's sampling defaults: its ``sample.json``'s ``top_k`` / ``temperature`` / ``top_p``
        where it names them, else ``SampleConfig``'s (what the page shows and a request without them gets)."""
        from museformer.bundled import sample_defaults

        d = SampleConfig()
        given = sample_defaults(self.path)
        return {k: given.get(k, getattr(d, k)) for k in SAMPLING_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "path": str(self.path), "bundled": self.bundled,
                "sampling": self.sampling}


def bundled_models() -> list[ModelChoice]:
    """Every checkpoint folder under ``museformer/pretrained/`` (the default bundled model first,
    ``museformer.bundled.DEFAULT_MODEL``, then by name)."""
    from museformer.bundled import DEFAULT_MODEL
    from museformer.checkpoint import is_checkpoint

    root = Path(str(resources.files("museformer") / "pretrained"))
    folders = sorted((p for p in root.iterdir() if p.is_dir() and is_checkpoint(p)) if root.is_dir() else (),
                     key=lambda p: (p.name != DEFAULT_MODEL, p.name))
    return [ModelChoice(p.name, f"{p.name} (bundled{', default' if p.name == DEFAULT_MODEL else ''})", p, True)
            for p in folders]


def instrument_programs(tokenizer) -> list[int]:
    """The MIDI programs (128 = drums) the model's vocabulary can play: the page's instrument choices."""
    from museformer.vocab import TokenKind

    vocab = tokenizer.vocab
    return sorted(int(vocab.id_to_token(int(i))[2:]) for i in vocab.ids_of_kind(TokenKind.INSTRUMENT))


def available_models(checkpoints: list[str | os.PathLike] | tuple = ()) -> list[ModelChoice]:
    """The ``--checkpoint`` folders (first: the first one is the default) and the bundled models.

    Raises:
        MuseformerError: a checkpoint folder does not exist or holds no checkpoint (before the
            server starts, so the user sees it on the command line); no model at all.
    """
    from museformer.checkpoint import resolve_checkpoint

    choices: list[ModelChoice] = []
    taken: set[str] = set()
    for given in checkpoints:
        directory = resolve_checkpoint(given)
        name = Path(given).resolve().name or "checkpoint"
        unique, n = name, 2
        while unique in taken:
            unique, n = f"{name}-{n}", n + 1
        taken.add(unique)
        choices.append(ModelChoice(unique, f"{unique} ({given})", directory, False))
    for model in bundled_models():
        if model.id not in taken:
            taken.add(model.id)
            choices.append(model)
    if not choices:
        raise MuseformerError("no model to offer: this install has no bundled model; pass --checkpoint DIR")
    return choices


# ---------------------------------------------------------------------------------------------
# a generation request
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateRequest:
    """One checked generation request from the page.

    Attributes:
        model: the chosen model.
        num_songs: how many songs.
        config: sampling options (``max_bars`` = the song length, prompt included).
        prompt_ids: the prompt as token ids (no BOS), already cut to ``prompt_bars``; None = none.
        prompt_name: the uploaded file's name (for the sidecar).
        prompt_sha256: hash of the uploaded bytes (for the sidecar).
        prompt_bars: bars of the prompt kept (None = all).
        form: a form plan such as ``"A8 A8 B8 A8"`` (only when the library has form plans).
        prompt_bar_count: complete bars in ``prompt_ids``.
    """

    model: ModelChoice
    num_songs: int
    config: SampleConfig
    prompt_ids: list[int] | None = None
    prompt_name: str | None = None
    prompt_sha256: str | None = None
    prompt_bars: int | None = None
    form: str | None = None
    prompt_bar_count: int = 0

    @property
    def total_bars(self) -> int:
        """Bars to generate in all (prompt bars excluded), for the progress bar."""
        return self.num_songs * max(int(self.config.max_bars or 0) - self.prompt_bar_count, 0)


def _integer(body: dict, name: str, low: int, high: int, default: int | None = None, *,
             optional: bool = False) -> int | None:
    value = body.get(name, default)
    if value is None or value == "":
        if optional:
            return None
        raise ParameterError(name, "is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ParameterError(name, f"must be a whole number, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise ParameterError(name, f"must be between {low} and {high}, got {value}")
    return value


def _number(body: dict, name: str, default: float | None, *, optional: bool = False) -> float | None:
    value = body.get(name, default)
    if value is None or value == "":
        if optional:
            return None
        raise ParameterError(name, "is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterError(name, f"must be a number, got {value!r}")
    return float(value)


def _instruments(value: Any) -> tuple[int, ...] | None:
    if value is None or value == [] or value == "":
        return None
    if not isinstance(value, list) or any(isinstance(p, bool) or not isinstance(p, int) for p in value):
        raise ParameterError("instruments", f"must be a list of MIDI programs (0..127, 128 = drums), got {value!r}")
    return tuple(sorted(set(value)))


def decode_prompt(text: Any, name: str) -> bytes:
    """The uploaded prompt's bytes from the page's base64 text; ``ParameterError`` when it is not that."""
    if not isinstance(text, str):
        raise ParameterError("prompt", "must be the file's content as base64 text")
    if len(text) > MAX_PROMPT_BYTES * 4 // 3 + 4:
        raise ParameterError("prompt", f"{name} is larger than {MAX_PROMPT_BYTES // 1024 // 1024} MiB; "
                             "a prompt needs only its first bars")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ParameterError("prompt", f"{name}: the upload is not valid base64") from None


def read_prompt(data: bytes, name: str, tokenizer, bars: int | None) -> list[int]:
    """Prompt ids of an uploaded MIDI file; ``ParameterError("prompt", ...)`` naming the file otherwise."""
    import symusic

    try:
        symusic.Score.from_midi(data)
    except Exception as e:  # symusic raises RuntimeError for bytes that are not a Standard MIDI File
        reason = str(e).split(":")[1].strip() if ":" in str(e) else str(e)
        raise ParameterError("prompt", f"{name} is not a MIDI file ({reason})") from None
    with tempfile.TemporaryDirectory(prefix="museformer-studio-") as folder:
        path = Path(folder) / "prompt.mid"
        path.write_bytes(data)
        try:
            return prompt_from_midi(path, tokenizer, bars)
        except MuseformerError as e:
            raise ParameterError("prompt", str(e).replace(str(path), name)) from None


def parse_generate_request(body: Any, models: list[ModelChoice], tokenizer_of) -> GenerateRequest:
    """Check the page's JSON request field by field.

    Args:
        body: the decoded JSON body.
        models: the models on offer (``available_models``).
        tokenizer_of: ``ModelChoice -> Tokenizer`` (cached by the caller; loads no weights).

    Raises:
        ParameterError: the first bad field, named; the message says what is allowed.
    """
    if not isinstance(body, dict):
        raise ParameterError("request", "must be a JSON object of settings")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ParameterError(unknown[0], f"is not a setting (known: {', '.join(FIELDS)})")
    by_id = {m.id: m for m in models}
    model_id = body.get("model") or models[0].id
    if model_id not in by_id:
        raise ParameterError("model", f"{model_id!r} is not one of {', '.join(by_id)}")
    model = by_id[model_id]
    recommended = model.sampling
    bars = _integer(body, "bars", 1, MAX_BARS, 8)
    num_songs = _integer(body, "num_songs", 1, MAX_SONGS, 1)
    temperature = _number(body, "temperature", recommended["temperature"])
    if temperature > MAX_TEMPERATURE:
        raise ParameterError("temperature", f"must be between 0 and {MAX_TEMPERATURE:g}, got {temperature:g}")
    form = body.get("form") or None
    if form is not None:
        from museformer.studio.features import form_supported

        if not form_supported():
            raise ParameterError("form", "form plans need a museformer with form support (museformer.form)")
        if not isinstance(form, str) or not FORM_PATTERN.match(form):
            raise ParameterError("form", f"must be sections such as 'A8 A8 B8 A8' (a letter, then bars), got {form!r}")
        bars = sum(int(n) for n in re.findall(r"\d+", form))
        if not 1 <= bars <= MAX_BARS:
            raise ParameterError("form", f"the plan has {bars} bars; at most {MAX_BARS}")
        form = " ".join(form.split())
    options = dict(
        temperature=temperature,
        top_k=_integer(body, "top_k", 0, 100_000, recommended["top_k"]),
        top_p=_number(body, "top_p", recommended["top_p"]),
        seed=_integer(body, "seed", 0, 2**31 - 1, optional=True),
        max_bars=bars,
        instruments=_instruments(body.get("instruments")),
        tempo=_number(body, "tempo", None, optional=True),
    )
    try:
        config = SampleConfig(**options)
    except MuseformerError as e:
        # SampleConfig says "invalid sampling option: top_p must be ..."; name the field alone
        text = str(e).removeprefix("invalid sampling option: ")
        field = text.split(" ", 1)[0]
        raise ParameterError(field if field in FIELDS else "settings", text.split(" ", 1)[-1]) from None
    prompt_bars = _integer(body, "prompt_bars", 1, MAX_BARS, optional=True)
    prompt_ids = prompt_name = prompt_sha = None
    if body.get("prompt"):
        prompt_name = str(body.get("prompt_name") or "the uploaded file")[:200]
        data = decode_prompt(body["prompt"], prompt_name)
        prompt_sha = hashlib.sha256(data).hexdigest()
        try:
            check_run_options(config, num_songs=num_songs, batch_size=None, prompt_bars=prompt_bars)
        except MuseformerError as e:
            message = str(e).replace("--prompt-bars ", "").replace("--bars", "bars")
            raise ParameterError("prompt_bars", message) from None
        tokenizer = tokenizer_of(model)
        prompt_ids = read_prompt(data, prompt_name, tokenizer, prompt_bars)
        try:
            check_prompt_fits(prompt_ids, config, tokenizer.vocab.bar_id)
        except MuseformerError as e:
            raise ParameterError("prompt_bars", str(e).replace("--prompt-bars", "prompt bars")
                                 .replace("--bars", "bars")) from None
    elif prompt_bars is not None:
        raise ParameterError("prompt_bars", "needs a prompt MIDI file")
    prompt_bar_count = 0 if prompt_ids is None else sum(1 for t in prompt_ids if t == tokenizer.vocab.bar_id)
    return GenerateRequest(model, num_songs, config, prompt_ids, prompt_name, prompt_sha, prompt_bars, form,
                           prompt_bar_count)
